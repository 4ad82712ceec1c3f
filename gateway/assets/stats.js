// PingApp statistics: pure functions on arrays of delay samples (ms).
//
// Nothing here touches the DOM, the network or the clock, so every function
// can be tested with plain arrays (node --test, or a browser console).
//
// Conventions:
// - a "sample" is a finite number of milliseconds;
// - an "outcome" is one ping's result: a sample, or `null` for a lost ping;
// - every function returns `null` where there is no data, never NaN.

/** Size of the "recent" window: the last 60 pings (samples or losses). */
export const RECENT_WINDOW = 60;

/** Number of pings the live chart shows. */
export const LIVE_WINDOW = 120;

/** True for a finite number. */
export function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

/** The finite numbers of `values`, sorted ascending, as a new Float64Array. */
export function sortedSamples(values) {
  const out = [];
  for (const v of values) if (isNum(v)) out.push(v);
  return Float64Array.from(out).sort();
}

/**
 * Quantile `q` (0..1) of an ascending array, by linear interpolation between
 * closest ranks (the "R-7" / numpy default definition). The one percentile
 * definition of PingApp (docs/protocol.md, "Statistics"): `/api/stats` and
 * the roster's median use the same (services/src/stats.rs, Postgres'
 * `percentile_cont`), checked against the same vectors
 * (gateway/tests/js/stats_vectors.json).
 */
export function quantileSorted(sorted, q) {
  const n = sorted.length;
  if (n === 0) return null;
  if (n === 1) return sorted[0];
  const h = (n - 1) * Math.min(1, Math.max(0, q));
  const lo = Math.floor(h);
  const hi = Math.min(n - 1, lo + 1);
  return sorted[lo] + (h - lo) * (sorted[hi] - sorted[lo]);
}

/** Quantile of unsorted values (nulls ignored). */
export function quantile(values, q) {
  return quantileSorted(sortedSamples(values), q);
}

/** Median of unsorted values (nulls ignored). */
export function median(values) {
  return quantile(values, 0.5);
}

/**
 * Jitter: mean absolute difference of consecutive samples. Lost pings
 * (nulls) are skipped, so the samples either side of a loss are consecutive.
 * Needs at least two samples.
 */
export function jitter(values) {
  let prev = null;
  let sum = 0;
  let pairs = 0;
  for (const v of values) {
    if (!isNum(v)) continue;
    if (prev !== null) {
      sum += Math.abs(v - prev);
      pairs += 1;
    }
    prev = v;
  }
  return pairs === 0 ? null : sum / pairs;
}

/** Loss in percent: lost / (received + lost) * 100; null when no ping ended. */
export function lossPercent(received, lost) {
  const total = received + lost;
  return total === 0 ? null : (lost / total) * 100;
}

/**
 * Statistics of a list of ping outcomes (numbers, or null for lost pings).
 * Returns { last, min, max, median, p95, p99, jitter, count, lost, loss }.
 */
export function summarize(outcomes) {
  const sorted = sortedSamples(outcomes);
  let last = null;
  for (let i = outcomes.length - 1; i >= 0; i -= 1) {
    if (isNum(outcomes[i])) {
      last = outcomes[i];
      break;
    }
  }
  const count = sorted.length;
  const lost = outcomes.length - count;
  return {
    last,
    min: count ? sorted[0] : null,
    max: count ? sorted[count - 1] : null,
    median: quantileSorted(sorted, 0.5),
    p95: quantileSorted(sorted, 0.95),
    p99: quantileSorted(sorted, 0.99),
    jitter: jitter(outcomes),
    count,
    lost,
    loss: lossPercent(count, lost),
  };
}

/** Index of the first element of ascending `arr` greater than `v`. */
export function upperBound(arr, v) {
  let lo = 0;
  let hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (arr[mid] <= v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * Whole-session statistics, kept incrementally so that a long session stays
 * cheap: a sorted copy of every sample (binary insertion), running jitter,
 * and the last `keep` outcomes for the recent window and the live chart.
 * `summary()` returns exactly what `summarize(allOutcomes)` would.
 */
export class SessionStats {
  constructor(keep = Math.max(RECENT_WINDOW, LIVE_WINDOW)) {
    this.keep = keep;
    this.sorted = [];
    this.lost = 0;
    this.last = null;
    this.absDiffSum = 0;
    this.pairs = 0;
    /** Last `keep` outcomes, oldest first: { seq, rtt } with rtt null if lost. */
    this.recent = [];
  }

  addSample(rtt, seq = null) {
    if (!isNum(rtt)) return;
    if (this.last !== null) {
      this.absDiffSum += Math.abs(rtt - this.last);
      this.pairs += 1;
    }
    this.last = rtt;
    this.sorted.splice(upperBound(this.sorted, rtt), 0, rtt);
    this.push({ seq, rtt });
  }

  addLoss(seq = null) {
    this.lost += 1;
    this.push({ seq, rtt: null });
  }

  push(outcome) {
    this.recent.push(outcome);
    if (this.recent.length > this.keep) this.recent.splice(0, this.recent.length - this.keep);
  }

  /** Outcomes (numbers or null) of the last `n` pings, oldest first. */
  lastOutcomes(n) {
    return this.recent.slice(-n).map((o) => o.rtt);
  }

  summary() {
    const s = this.sorted;
    const count = s.length;
    return {
      last: this.last,
      min: count ? s[0] : null,
      max: count ? s[count - 1] : null,
      median: quantileSorted(s, 0.5),
      p95: quantileSorted(s, 0.95),
      p99: quantileSorted(s, 0.99),
      jitter: this.pairs ? this.absDiffSum / this.pairs : null,
      count,
      lost: this.lost,
      loss: lossPercent(count, this.lost),
    };
  }

  recentSummary(n = RECENT_WINDOW) {
    return summarize(this.lastOutcomes(n));
  }
}

/**
 * Sliding-window spread for the live chart: for each index i, the quantiles
 * `qLo`, 0.5 and `qHi` of the samples in [i - half, i + half] (nulls skipped).
 * Returns an array of { lo, mid, hi } (or null where the window is empty).
 */
export function slidingBand(values, half = 5, qLo = 0.05, qHi = 0.95) {
  const out = new Array(values.length);
  for (let i = 0; i < values.length; i += 1) {
    const win = values.slice(Math.max(0, i - half), i + half + 1);
    const s = sortedSamples(win);
    out[i] = s.length
      ? { lo: quantileSorted(s, qLo), mid: quantileSorted(s, 0.5), hi: quantileSorted(s, qHi) }
      : null;
  }
  return out;
}

/**
 * SmokePing-style buckets for the history chart: splits [t0, t1) into `n`
 * equal time buckets and returns, for each non-empty one,
 * { t (bucket centre), min, median, max, count }. `points` are { t, v }.
 */
export function bucketize(points, t0, t1, n) {
  if (n <= 0 || !(t1 > t0)) return [];
  const width = (t1 - t0) / n;
  const groups = Array.from({ length: n }, () => []);
  for (const p of points) {
    if (!isNum(p.t) || !isNum(p.v)) continue;
    const i = Math.min(n - 1, Math.max(0, Math.floor((p.t - t0) / width)));
    groups[i].push(p.v);
  }
  const out = [];
  groups.forEach((g, i) => {
    if (!g.length) return;
    const s = Float64Array.from(g).sort();
    out.push({
      t: t0 + (i + 0.5) * width,
      min: s[0],
      median: quantileSorted(s, 0.5),
      max: s[s.length - 1],
      count: s.length,
    });
  });
  return out;
}

/** Smallest "nice" number (1, 2, 2.5, 5 times a power of ten) >= v. */
export function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v * (1 - 1e-9)) return m * p;
  return 10 * p;
}

/**
 * Ticks for a y axis from 0 to at least `max`, about `count` of them:
 * returns { max, step, ticks }, every tick a multiple of a nice step.
 */
export function niceTicks(max, count = 5) {
  const step = niceCeil((max > 0 ? max : 1) / Math.max(1, count));
  const top = Math.max(step, Math.ceil(max / step - 1e-9) * step);
  const ticks = [];
  for (let i = 0; i * step <= top + step * 1e-9; i += 1) ticks.push(+(i * step).toPrecision(12));
  return { max: top, step, ticks };
}

/** Time steps (ms) the history axis may use. */
const TIME_STEPS = [
  1e3, 2e3, 5e3, 10e3, 15e3, 30e3, 60e3, 120e3, 300e3, 600e3, 900e3, 1800e3, 3600e3, 7200e3,
  10800e3, 21600e3, 43200e3, 86400e3, 172800e3, 604800e3,
];

/** Time ticks (ms since epoch, multiples of a nice step) within [t0, t1]. */
export function timeTicks(t0, t1, count = 5) {
  const span = Math.max(1, t1 - t0);
  const step = TIME_STEPS.find((s) => span / s <= count) ?? TIME_STEPS[TIME_STEPS.length - 1];
  const ticks = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return { step, ticks };
}

/** Decimals for a millisecond value: 3 below 10 ms, 2 below 100 ms, else 1. */
export function msDecimals(v) {
  const a = Math.abs(v);
  if (a < 10) return 3;
  if (a < 100) return 2;
  return 1;
}

/** "12.35 ms", or "–" without data. */
export function formatMs(v) {
  return isNum(v) ? `${v.toFixed(msDecimals(v))} ms` : "–";
}

/** Like formatMs without the unit (table cells under a "(ms)" header). */
export function formatMsBare(v) {
  return isNum(v) ? v.toFixed(msDecimals(v)) : "–";
}

/** "0.0 %", or "–" without data. */
export function formatPercent(v) {
  return isNum(v) ? `${v.toFixed(1)} %` : "–";
}

/** "123", or "–" without data. */
export function formatCount(v) {
  return isNum(v) ? String(Math.round(v)) : "–";
}

/** Axis label for a tick value in ms, with the step's precision. */
export function formatTick(v, step) {
  let decimals = 0;
  while (decimals < 3 && Math.abs(step * 10 ** decimals - Math.round(step * 10 ** decimals)) > 1e-6) {
    decimals += 1;
  }
  return `${v.toFixed(decimals)} ms`;
}

/**
 * Validates a display name the way the server does: trimmed, 1..=64
 * characters (Unicode code points), no control characters (category Cc).
 * Returns { ok: true, name } or { ok: false, error }.
 */
export function validateName(raw) {
  const name = String(raw ?? "").trim();
  const chars = Array.from(name).length;
  if (chars === 0) return { ok: false, error: "The name is empty." };
  if (chars > 64) return { ok: false, error: `The name has ${chars} characters; at most 64 are allowed.` };
  if (/\p{Cc}/u.test(name)) return { ok: false, error: "The name contains control characters." };
  return { ok: true, name };
}

/** Reconnect delays: the first is at least this long (ms). */
export const BACKOFF_MIN_MS = 500;
/** Reconnect delays: never longer than this (ms). */
export const BACKOFF_MAX_MS = 20000;

/**
 * Reconnect delay before attempt number `attempt` (0 for the first retry):
 * exponential backoff with full jitter above a 500 ms floor,
 *
 *     cap   = min(20000, 1000 * 2^attempt)
 *     delay = 500 + random() * (cap - 500)          (ms)
 *
 * so attempt 0 waits 0.5-1 s, 1: 0.5-2 s, 2: 0.5-4 s, 3: 0.5-8 s,
 * 4: 0.5-16 s, 5 and later: 0.5-20 s, uniformly. The floor keeps a client
 * from hammering a server that refuses it; the uniform spread keeps the
 * clients of a restarted gateway from reconnecting in lockstep.
 * `random` returns a number in [0, 1).
 */
export function backoffDelay(attempt, random = Math.random) {
  const n = Math.max(0, Math.min(30, Math.floor(attempt)));
  const cap = Math.min(BACKOFF_MAX_MS, 1000 * 2 ** n);
  return BACKOFF_MIN_MS + random() * (cap - BACKOFF_MIN_MS);
}
