// PingApp charts: small canvas code, no library.
//
// CanvasChart owns one <canvas>: it sizes the backing store for
// devicePixelRatio, redraws on resize and on a colour-scheme change, and
// never draws more than once per animation frame (request() coalesces).
// Colours come from CSS custom properties (--chart-*), so light and dark
// themes live in app.css. After each draw the canvas carries the number of
// samples it shows in `data-points` (the browser tests read it).

import {
  LIVE_WINDOW,
  bucketize,
  formatTick,
  isNum,
  niceTicks,
  slidingBand,
  timeTicks,
} from "./stats.js";

const FONT = "12px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";

function readTheme(el) {
  const cs = getComputedStyle(el);
  const v = (name, fallback) => cs.getPropertyValue(name).trim() || fallback;
  return {
    text: v("--chart-text", "#555"),
    grid: v("--chart-grid", "#ddd"),
    point: v("--chart-point", "#1f6feb"),
    line: v("--chart-line", "#0b3d91"),
    band: v("--chart-band", "rgba(31,111,235,0.18)"),
    loss: v("--chart-loss", "#d1242f"),
  };
}

export class CanvasChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {(ctx: CanvasRenderingContext2D, w: number, h: number, theme: object) => void} draw
   */
  constructor(canvas, draw) {
    this.canvas = canvas;
    this.drawFn = draw;
    this.frame = 0;
    if (typeof ResizeObserver === "function") {
      new ResizeObserver(() => this.request()).observe(canvas);
    } else {
      window.addEventListener("resize", () => this.request());
    }
    matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => this.request());
    this.request();
  }

  /** Schedules a redraw at the next animation frame (at most one per frame). */
  request() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const c = this.canvas;
    const w = c.clientWidth;
    const h = c.clientHeight;
    if (w === 0 || h === 0) return;
    const dpr = window.devicePixelRatio || 1;
    const bw = Math.round(w * dpr);
    const bh = Math.round(h * dpr);
    if (c.width !== bw || c.height !== bh) {
      c.width = bw;
      c.height = bh;
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = FONT;
    this.drawFn(ctx, w, h, readTheme(c));
  }
}

/** Plot area inside a w x h canvas, leaving room for the axes' labels. */
function plotArea(w, h) {
  const left = 64;
  const right = 12;
  const top = 12;
  const bottom = 24;
  return { x: left, y: top, w: Math.max(10, w - left - right), h: Math.max(10, h - top - bottom) };
}

/** Draws horizontal grid lines and ms labels; returns the value -> y mapping. */
function yAxis(ctx, plot, maxValue, theme) {
  const count = Math.max(2, Math.min(6, Math.floor(plot.h / 40)));
  const { max, step, ticks } = niceTicks(maxValue, count);
  const y = (v) => plot.y + plot.h - (v / max) * plot.h;
  ctx.strokeStyle = theme.grid;
  ctx.fillStyle = theme.text;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const t of ticks) {
    const yy = Math.round(y(t)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(plot.x, yy);
    ctx.lineTo(plot.x + plot.w, yy);
    ctx.stroke();
    ctx.fillText(formatTick(t, step), plot.x - 6, yy);
  }
  return y;
}

function emptyMessage(ctx, plot, theme, message) {
  ctx.fillStyle = theme.text;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(message, plot.x + plot.w / 2, plot.y + plot.h / 2);
}

/** Fills the band between lo(i) and hi(i) over runs of non-null entries. */
function fillBand(ctx, band, xOf, y, color) {
  ctx.fillStyle = color;
  let i = 0;
  while (i < band.length) {
    if (!band[i]) {
      i += 1;
      continue;
    }
    let j = i;
    while (j + 1 < band.length && band[j + 1]) j += 1;
    ctx.beginPath();
    ctx.moveTo(xOf(i), y(band[i].hi));
    for (let k = i + 1; k <= j; k += 1) ctx.lineTo(xOf(k), y(band[k].hi));
    for (let k = j; k >= i; k -= 1) ctx.lineTo(xOf(k), y(band[k].lo));
    ctx.closePath();
    ctx.fill();
    i = j + 1;
  }
}

/**
 * The live chart: the last LIVE_WINDOW pings, newest on the right. Points are
 * samples, the band spans p5..p95 of a sliding window of 11 pings, the line
 * is that window's median, red ticks at the top are lost pings.
 * `getOutcomes()` returns numbers (ms) or null for lost pings, oldest first.
 */
export function liveChartDrawer(getOutcomes) {
  return (ctx, w, h, theme) => {
    const plot = plotArea(w, h);
    const values = getOutcomes().slice(-LIVE_WINDOW);
    const band = slidingBand(values, 5, 0.05, 0.95);
    let max = 0;
    for (const v of values) if (isNum(v) && v > max) max = v;
    const y = yAxis(ctx, plot, max > 0 ? max * 1.08 : 1, theme);
    const offset = LIVE_WINDOW - values.length;
    const xOf = (i) => plot.x + ((offset + i + 0.5) / LIVE_WINDOW) * plot.w;

    // x axis: pings ago
    ctx.fillStyle = theme.text;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let ago = 0; ago <= LIVE_WINDOW; ago += 30) {
      const x = plot.x + ((LIVE_WINDOW - ago) / LIVE_WINDOW) * plot.w;
      const label = ago === 0 ? "now" : `−${ago}`;
      const half = ctx.measureText(label).width / 2;
      ctx.fillText(label, Math.min(x, w - half - 1), plot.y + plot.h + 6);
    }

    let drawn = 0;
    for (const v of values) if (isNum(v)) drawn += 1;
    ctx.canvas.dataset.points = String(drawn);
    if (!values.length) {
      emptyMessage(ctx, plot, theme, "waiting for samples…");
      return;
    }
    fillBand(ctx, band, xOf, y, theme.band);

    ctx.strokeStyle = theme.line;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    band.forEach((b, i) => {
      if (!b) {
        pen = false;
        return;
      }
      if (pen) ctx.lineTo(xOf(i), y(b.mid));
      else ctx.moveTo(xOf(i), y(b.mid));
      pen = true;
    });
    ctx.stroke();

    ctx.fillStyle = theme.point;
    const r = plot.w / LIVE_WINDOW > 5 ? 2.5 : 1.8;
    values.forEach((v, i) => {
      if (!isNum(v)) return;
      ctx.beginPath();
      ctx.arc(xOf(i), y(v), r, 0, Math.PI * 2);
      ctx.fill();
    });

    ctx.strokeStyle = theme.loss;
    ctx.lineWidth = 2;
    values.forEach((v, i) => {
      if (v !== null) return;
      const x = Math.round(xOf(i)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x, plot.y);
      ctx.lineTo(x, plot.y + 10);
      ctx.stroke();
    });
  };
}

/** Draws vertical grid lines and time labels under the plot for [t0, t1]. */
function timeAxis(ctx, plot, w, t0, t1, x, theme, labelOf) {
  const { step, ticks } = timeTicks(t0, t1, Math.max(2, Math.floor(plot.w / 90)));
  ctx.strokeStyle = theme.grid;
  ctx.fillStyle = theme.text;
  ctx.lineWidth = 1;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of ticks) {
    const xx = Math.round(x(t)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(xx, plot.y);
    ctx.lineTo(xx, plot.y + plot.h);
    ctx.stroke();
    const label = labelOf(t, step);
    const half = ctx.measureText(label).width / 2;
    ctx.fillText(label, Math.min(Math.max(xx, plot.x + half), w - half - 1), plot.y + plot.h + 6);
  }
}

function timeLabel(t, step) {
  const d = new Date(t);
  const pad = (n) => String(n).padStart(2, "0");
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return step < 60000 ? `${hm}:${pad(d.getSeconds())}` : hm;
}

/**
 * The history chart: samples from the recorder on a time axis. Up to about
 * one sample per 3 px they are drawn as points joined by a thin line; beyond
 * that, SmokePing-style: per time bucket a min..max bar and the median line.
 * `getPoints()` returns { t: ms since epoch, v: ms }, ascending by t.
 */
export function historyChartDrawer(getPoints) {
  return (ctx, w, h, theme) => {
    const plot = plotArea(w, h);
    const points = getPoints();
    let max = 0;
    for (const p of points) if (p.v > max) max = p.v;
    const y = yAxis(ctx, plot, max > 0 ? max * 1.08 : 1, theme);
    ctx.canvas.dataset.points = String(points.length);
    if (!points.length) {
      emptyMessage(ctx, plot, theme, "no samples recorded yet");
      return;
    }
    let t0 = points[0].t;
    let t1 = points[points.length - 1].t;
    // At least 10 s wide; a shorter history sits at the right edge, newest
    // last, like the live chart.
    if (t1 - t0 < 10000) t0 = t1 - 10000;
    const pad = (t1 - t0) * 0.01;
    t0 -= pad;
    t1 += pad;
    const x = (t) => plot.x + ((t - t0) / (t1 - t0)) * plot.w;

    timeAxis(ctx, plot, w, t0, t1, x, theme, timeLabel);

    const buckets = Math.max(1, Math.floor(plot.w / 3));
    if (points.length <= buckets) {
      ctx.strokeStyle = theme.band;
      ctx.lineWidth = 1;
      ctx.beginPath();
      points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.v)) : ctx.moveTo(x(p.t), y(p.v))));
      ctx.stroke();
      ctx.fillStyle = theme.point;
      for (const p of points) {
        ctx.beginPath();
        ctx.arc(x(p.t), y(p.v), 2, 0, Math.PI * 2);
        ctx.fill();
      }
      return;
    }
    const groups = bucketize(points, t0, t1, buckets);
    const bw = Math.max(1, plot.w / buckets);
    ctx.fillStyle = theme.band;
    for (const b of groups) {
      const top = y(b.max);
      ctx.fillRect(x(b.t) - bw / 2, top, bw, Math.max(1, y(b.min) - top));
    }
    ctx.strokeStyle = theme.line;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    groups.forEach((b, i) => (i ? ctx.lineTo(x(b.t), y(b.median)) : ctx.moveTo(x(b.t), y(b.median))));
    ctx.stroke();
  };
}

function dayOrTimeLabel(t, step) {
  if (step < 86400e3) return timeLabel(t, step);
  const d = new Date(t);
  return `${d.getDate()}.${d.getMonth() + 1}.`;
}

/**
 * The "Your history" chart: one entry per bucket of this browser's
 * history on a time axis spanning the window (newest on the right): a
 * min–max bar per bucket in the band colour, a p95 tick, and the p50 line
 * through p50 points. `getData()` returns { points: [{ t (bucket start,
 * ms), count, min, p50, p95, max }], windowMs, bucketMs }. The canvas
 * carries the buckets drawn in `data-points` and their samples in
 * `data-samples`.
 */
export function deviceChartDrawer(getData) {
  return (ctx, w, h, theme) => {
    const plot = plotArea(w, h);
    const { points, windowMs, bucketMs } = getData();
    let max = 0;
    let samples = 0;
    for (const p of points) {
      if (p.max > max) max = p.max;
      samples += p.count;
    }
    const y = yAxis(ctx, plot, max > 0 ? max * 1.08 : 1, theme);
    ctx.canvas.dataset.points = String(points.length);
    ctx.canvas.dataset.samples = String(samples);
    if (!points.length) {
      emptyMessage(ctx, plot, theme, "no samples recorded yet");
      return;
    }
    const width = bucketMs > 0 ? bucketMs : 60000;
    const t1 = Math.max(Date.now(), points[points.length - 1].t + width);
    const t0 = windowMs > 0 ? t1 - windowMs : Math.min(points[0].t, t1 - 10 * width);
    const x = (t) => plot.x + ((t - t0) / (t1 - t0)) * plot.w;

    timeAxis(ctx, plot, w, t0, t1, x, theme, dayOrTimeLabel);

    const bw = Math.max(2, (width / (t1 - t0)) * plot.w * 0.8);
    const mid = (p) => x(p.t + width / 2);
    ctx.fillStyle = theme.band;
    for (const p of points) {
      const top = y(p.max);
      ctx.fillRect(mid(p) - bw / 2, top, bw, Math.max(1, y(p.min) - top));
    }
    ctx.strokeStyle = theme.line;
    ctx.lineWidth = 1;
    for (const p of points) {
      const yy = Math.round(y(p.p95)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(mid(p) - bw / 2, yy);
      ctx.lineTo(mid(p) + bw / 2, yy);
      ctx.stroke();
    }
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(mid(p), y(p.p50)) : ctx.moveTo(mid(p), y(p.p50))));
    ctx.stroke();
    ctx.fillStyle = theme.point;
    const r = bw > 6 ? 2.5 : 1.8;
    for (const p of points) {
      ctx.beginPath();
      ctx.arc(mid(p), y(p.p50), r, 0, Math.PI * 2);
      ctx.fill();
    }
  };
}
