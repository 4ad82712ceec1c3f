// PingApp page script (entry module for /private/ and /public/).
//
// Reads <body data-page="private|public">, connects to /ws/<page>/?v=2 and
// wires the connection to the statistics grid, the live chart, the history
// chart (private) and the roster table and rename form (public).
// Modules: stats.js (pure functions), connection.js (WebSocket, reconnect,
// ping loop), chart.js (canvas), roster.js (table), history.js (recorder API),
// device.js (this browser's identity and its history across reloads).

import { PingConnection } from "./connection.js";
import { CanvasChart, deviceChartDrawer, historyChartDrawer, liveChartDrawer } from "./chart.js";
import { DeviceHistoryPoller, DeviceIdentity } from "./device.js";
import { HistoryPoller } from "./history.js";
import { RosterTable } from "./roster.js";
import {
  LIVE_WINDOW,
  RECENT_WINDOW,
  SessionStats,
  formatCount,
  formatMs,
  formatPercent,
  isNum,
  validateName,
} from "./stats.js";

/** The statistics cells: data-stat key, label, tooltip, formatter. */
const STATS = [
  { key: "last", label: "Last", fmt: formatMs },
  { key: "min", label: "Min", fmt: formatMs },
  { key: "median", label: "Median", fmt: formatMs },
  { key: "p95", label: "p95", fmt: formatMs },
  { key: "p99", label: "p99", fmt: formatMs },
  { key: "jitter", label: "Jitter", fmt: formatMs, title: "Mean absolute difference of consecutive samples" },
  { key: "loss", label: "Loss", fmt: formatPercent, title: "Pings with no pong within the timeout" },
  { key: "count", label: "Samples", fmt: formatCount },
  {
    key: "server_rtt",
    label: "Server-measured RTT",
    fmt: formatMs,
    title: "Measured by the server with WebSocket Ping control frames, every few seconds",
    session: false,
  },
];

const NAME_KEY = "pingapp.name";

/** After "Forget this browser" closes the connection, how long its last samples get to be stored before the DELETE (ms). */
const FORGET_SETTLE_MS = 1500;

const $ = (id) => document.getElementById(id);

function make(tag, props = {}, children = []) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(el.dataset, v);
    else el[k] = v;
  }
  el.append(...children);
  return el;
}

/** Builds the stats grid: per stat a session value and a "last 60" value. */
function buildStatsGrid(container) {
  const cells = new Map();
  for (const s of STATS) {
    const value = make("output", {
      id: `stat-${s.key.replace("_", "-")}`,
      className: "stat-value",
      textContent: "–",
      dataset: { stat: s.key, window: "session", value: "" },
    });
    const cell = make("div", { className: "stat", title: s.title ?? "" }, [
      make("span", { className: "stat-label", textContent: s.label }),
      value,
    ]);
    const entry = { session: value, recent: null, fmt: s.fmt };
    if (s.session === false) {
      cell.append(make("span", { className: "stat-recent", textContent: "by the server" }));
    } else {
      const recent = make("output", {
        id: `stat-recent-${s.key}`,
        textContent: "–",
        dataset: { stat: s.key, window: "recent", value: "" },
      });
      cell.append(make("span", { className: "stat-recent" }, [`last ${RECENT_WINDOW}: `, recent]));
      entry.recent = recent;
    }
    cells.set(s.key, entry);
    container.append(cell);
  }
  return cells;
}

function setOutput(el, value, fmt) {
  if (!el) return;
  const text = fmt(value);
  if (el.textContent !== text) el.textContent = text;
  const raw = isNum(value) ? String(value) : "";
  if (el.dataset.value !== raw) el.dataset.value = raw;
}

/** Measures the performance.now() resolution (ms) with a short busy loop. */
function timerResolution() {
  let prev = performance.now();
  const end = prev + 3;
  let best = Infinity;
  for (let changes = 0; changes < 30; ) {
    const t = performance.now();
    if (t !== prev) {
      best = Math.min(best, t - prev);
      prev = t;
      changes += 1;
    }
    if (t > end) break;
  }
  return best;
}

function showTimer(el) {
  if (!el) return;
  const fine = window.crossOriginIsolated === true;
  const res = timerResolution();
  el.dataset.fine = String(fine);
  if (isNum(res)) el.dataset.resolutionUs = String(Math.round(res * 1000));
  el.textContent = `fine timer: ${fine ? "yes" : "no"}`;
  el.title = `crossOriginIsolated: ${fine}; performance.now() step ≈ ${
    isNum(res) ? `${(res * 1000).toFixed(0)} µs` : "unknown"
  }`;
}

function loadName() {
  try {
    return sessionStorage.getItem(NAME_KEY);
  } catch {
    return null;
  }
}

function saveName(name) {
  try {
    sessionStorage.setItem(NAME_KEY, name);
  } catch {
    /* storage disabled: the name is just not restored after a reconnect */
  }
}

function main() {
  const page = document.body.dataset.page;
  if (page !== "private" && page !== "public") return;

  showTimer($("timer-resolution"));

  // ---- messages and status ---------------------------------------------
  const messages = $("messages");
  let messageTimer = 0;
  const showMessage = (text, kind = "info", code = "") => {
    if (!messages) return;
    clearTimeout(messageTimer);
    messages.textContent = text;
    messages.dataset.kind = kind;
    messages.dataset.code = code;
    messages.hidden = false;
    messageTimer = setTimeout(() => {
      messages.hidden = true;
      messages.textContent = "";
      messages.dataset.code = "";
    }, 12000);
  };

  const statusEl = $("status");
  const statusText = $("status-text");
  const retryBtn = $("retry-now");
  const renameBtn = /** @type {HTMLButtonElement | null} */ ($("change-name"));

  // ---- statistics and live chart ---------------------------------------
  const stats = new SessionStats(Math.max(RECENT_WINDOW, LIVE_WINDOW));
  let serverRtt = null;
  const cells = buildStatsGrid($("stats"));
  let statsFrame = 0;
  const renderStats = () => {
    statsFrame = 0;
    const all = stats.summary();
    const recent = stats.recentSummary(RECENT_WINDOW);
    for (const [key, c] of cells) {
      if (key === "server_rtt") {
        setOutput(c.session, serverRtt, c.fmt);
        continue;
      }
      setOutput(c.session, all[key], c.fmt);
      setOutput(c.recent, recent[key], c.fmt);
    }
  };
  const scheduleStats = () => {
    if (!statsFrame) statsFrame = requestAnimationFrame(renderStats);
  };
  renderStats();

  const liveCanvas = /** @type {HTMLCanvasElement | null} */ ($("live-chart"));
  const liveChart = liveCanvas
    ? new CanvasChart(liveCanvas, liveChartDrawer(() => stats.lastOutcomes(LIVE_WINDOW)))
    : null;

  // ---- history (private page) ------------------------------------------
  const historyCanvas = /** @type {HTMLCanvasElement | null} */ ($("history-chart"));
  let historyPoints = [];
  const historyChart = historyCanvas
    ? new CanvasChart(historyCanvas, historyChartDrawer(() => historyPoints))
    : null;
  const historyStatus = $("history-status");
  const history = historyChart
    ? new HistoryPoller(
        (points) => {
          historyPoints = points;
          historyChart.request();
        },
        (text, state) => {
          if (!historyStatus) return;
          historyStatus.textContent = text;
          historyStatus.dataset.state = state;
        },
      )
    : null;

  // ---- your history across reloads (private page) ----------------------
  // Both pages present the browser's identity; only the private page shows
  // what it unlocks.
  const identity = new DeviceIdentity();
  const deviceCanvas = /** @type {HTMLCanvasElement | null} */ ($("device-chart"));
  let deviceData = { points: [], windowMs: 0, bucketMs: 0 };
  const deviceChart = deviceCanvas ? new CanvasChart(deviceCanvas, deviceChartDrawer(() => deviceData)) : null;
  const deviceSummary = $("device-summary");
  const deviceStatus = $("device-status");
  const deviceHistory = deviceChart
    ? new DeviceHistoryPoller(
        identity,
        (data) => {
          deviceData = data;
          deviceChart.request();
          if (!deviceSummary) return;
          const s = data.summary;
          deviceSummary.dataset.count = String(s.count);
          deviceSummary.dataset.window = data.window;
          deviceSummary.textContent = s.count
            ? `${formatCount(s.count)} samples · mean ${formatMs(s.mean)} · p50 ${formatMs(s.p50)} · ` +
              `p99 ${formatMs(s.p99)} · jitter ${formatMs(s.jitter)}`
            : "no samples recorded yet";
        },
        (text, state) => {
          if (!deviceStatus) return;
          deviceStatus.textContent = text;
          deviceStatus.dataset.state = state;
        },
      )
    : null;
  const windowButtons = [...document.querySelectorAll("#device-windows button[data-window]")];
  for (const b of windowButtons) {
    b.addEventListener("click", () => {
      for (const o of windowButtons) o.setAttribute("aria-pressed", String(o === b));
      deviceHistory?.setWindow(/** @type {HTMLElement} */ (b).dataset.window);
    });
  }
  const forgetBtn = /** @type {HTMLButtonElement | null} */ ($("device-forget"));

  // ---- roster and rename (public page) ---------------------------------
  const rosterEl = /** @type {HTMLTableElement | null} */ ($("roster"));
  const nameInput = /** @type {HTMLInputElement | null} */ ($("name"));
  let session = null;
  let restoring = false; // the rename in flight restores the name after a reconnect
  // The table asks the server for the rows around the screen (a v2 `view`,
  // see roster.js); `conn` exists by the time it sends.
  const roster = rosterEl
    ? new RosterTable(rosterEl, $("client-count"), {
        scroller: rosterEl.closest(".table-wrap"),
        filterInput: /** @type {HTMLInputElement | null} */ ($("roster-filter")),
        send: (msg) => conn.send(msg),
      })
    : null;

  const setWhoami = () => {
    const set = (id, v) => {
      const el = $(id);
      if (el) el.textContent = v;
    };
    set("self-name", session ? session.name : "–");
    set("self-id", session ? session.id : "–");
    set("self-gateway", session ? session.gateway || "–" : "–");
  };

  // ---- the connection --------------------------------------------------
  const conn = new PingConnection(page, {
    deviceSecret: () => identity.get(),
    onStatus({ state, text }) {
      if (statusEl.dataset.state !== state) statusEl.dataset.state = state;
      if (statusText.textContent !== text) statusText.textContent = text;
      if (retryBtn) retryBtn.hidden = state !== "reconnecting";
      if (renameBtn) renameBtn.disabled = state !== "open";
    },
    onWelcome(s) {
      session = { ...s };
      setWhoami();
      const interval = $("ping-interval");
      if (interval) interval.textContent = (s.pingIntervalMs / 1000).toLocaleString();
      if (roster) {
        roster.setSelf(s.id);
        const saved = loadName();
        if (saved && saved !== s.name && validateName(saved).ok) {
          restoring = conn.send({ command: "change_name", name: saved });
        }
      }
      if (nameInput) nameInput.placeholder = s.name;
      history?.start(s);
      deviceHistory?.connected();
      return roster ? roster.whenRendered() : undefined;
    },
    onSample({ seq, rtt }) {
      stats.addSample(rtt, seq);
      roster?.noteOwnSample(Math.round(rtt * 1000) / 1000);
      scheduleStats();
      liveChart?.request();
      history?.sampleSent();
      deviceHistory?.samplesSent();
    },
    onLoss({ seq }) {
      stats.addLoss(seq);
      scheduleStats();
      liveChart?.request();
    },
    onServerRtt(ms) {
      serverRtt = ms;
      scheduleStats();
    },
    onServerError({ code, detail }) {
      showMessage(detail ? `Server error (${code}): ${detail}` : `Server error (${code})`, "error", code);
    },
    onMessage(msg) {
      roster?.handle(msg);
    },
    onDisconnect() {
      roster?.setStale(true);
      history?.stop();
    },
  });

  // A rename is confirmed by the own row of the next view frame.
  if (roster) {
    roster.onMe = (me) => {
      if (!session || me.id !== session.id || me.name === session.name) return;
      session.name = me.name;
      setWhoami();
      if (nameInput) nameInput.placeholder = me.name;
      saveName(me.name);
      if (nameInput && nameInput.value.trim() === me.name) nameInput.value = "";
      if (!restoring) showMessage(`Your name is now “${me.name}”.`, "info", "renamed");
      restoring = false;
    };
  }

  retryBtn?.addEventListener("click", () => conn.retryNow());

  // Forgetting: the connection stops first (its samples are the old
  // identity's) and its last samples get FORGET_SETTLE_MS to be stored,
  // then DELETE, a new secret, and a new connection under it.
  forgetBtn?.addEventListener("click", async () => {
    if (!deviceHistory) return;
    forgetBtn.disabled = true;
    conn.stop();
    if (deviceStatus) {
      deviceStatus.textContent = "forgetting…";
      deviceStatus.dataset.state = "forgetting";
    }
    await new Promise((r) => setTimeout(r, FORGET_SETTLE_MS));
    try {
      const channels = await deviceHistory.forget();
      showMessage(
        `This browser was forgotten (${channels} connection${channels === 1 ? "" : "s"}); it has a new identity now.`,
        "info",
        "forgotten",
      );
    } catch (e) {
      showMessage(`Could not forget this browser (${e?.message ?? "error"}); try again.`, "error", "forget_failed");
    } finally {
      forgetBtn.disabled = false;
      conn.start();
    }
  });

  $("name-form")?.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const check = validateName(nameInput.value);
    if (!check.ok) {
      showMessage(check.error, "error", "client_bad_name");
      return;
    }
    restoring = false;
    if (!conn.send({ command: "change_name", name: check.name })) {
      showMessage("Not connected; try again once the status says connected.", "error", "not_connected");
      return;
    }
  });

  window.addEventListener("pagehide", (ev) => {
    if (ev.persisted) conn.stop();
  });
  window.addEventListener("pageshow", (ev) => {
    if (ev.persisted) conn.start();
  });

  conn.start();
  deviceHistory?.start();
}

main();
