// PingApp connection: one WebSocket (protocol v2) with automatic reconnect
// and the ping loop.
//
// Ping loop: one ping in flight, timed with performance.now(). After a pong
// the next ping goes out one interval after the previous one was sent; a
// ping with no pong within the timeout counts as lost and the next ping goes
// out at once. A pong whose seq is not the one in flight is ignored. After
// every pong the measured delay is reported back with `delay_time`.
//
// Reconnect: see backoffDelay() in stats.js for the formula. The attempt
// counter resets once a connection is healthy (welcome and a first pong),
// and on close code 1012 (the server is restarting: not our fault, so the
// next try starts at the shortest delay).

import { backoffDelay, isNum } from "./stats.js";

/** A connection that got no welcome within this time is abandoned (ms). */
const CONNECT_TIMEOUT_MS = 10000;
/** Longest hold of the first ping while the page settles after welcome (ms). */
const FIRST_PING_GATE_MS = 3000;
/** Lost pings in a row after which a silent connection is abandoned. */
const DEAD_AFTER_LOST = 3;

/** Human text for a close event. */
export function describeClose(code, reason) {
  const known = {
    1000: "closed",
    1001: "server going away",
    1006: "connection lost",
    1008: "closed by the server (policy violation, e.g. too many messages)",
    1009: "closed by the server (message too big)",
    1011: "server error",
    1012: "server restarting",
    1013: "server busy, try again later",
  };
  const text = known[code] ?? `closed (code ${code})`;
  return reason ? `${text}: ${reason}` : text;
}

function positiveInt(v, fallback, max) {
  return isNum(v) && v > 0 ? Math.min(max, Math.round(v)) : fallback;
}

/**
 * The page's connection. `handlers` may define:
 * - onStatus({ state, text, retryAt })   state: connecting | open | reconnecting | closed
 * - onWelcome(session)                    { id, name, gateway, token, page, pingIntervalMs, pingTimeoutMs };
 *                                         may return a Promise: the first ping waits for it (3 s at most)
 * - onSample({ seq, rtt, serverTime })
 * - onLoss({ seq })
 * - onServerRtt(ms)
 * - onServerError({ code, detail })
 * - onMessage(msg)                        any other command (roster, connect, delays, ...)
 * - onDisconnect({ code, reason })        the current connection ended
 * - deviceSecret()                        this browser's identity (device.js), sent with
 *                                         `device` right after every welcome, before the
 *                                         first ping and so before the first sample
 */
export class PingConnection {
  constructor(page, handlers) {
    this.page = page;
    this.handlers = handlers;
    this.ws = null;
    this.session = null;
    this.attempt = 0;
    this.stopped = true;
    this.seq = 0;
    this.inflight = null;
    this.healthy = false;
    this.lostInRow = 0;
    this.lastFrameAt = 0;
    this.timers = { ping: 0, timeout: 0, connect: 0, retry: 0, countdown: 0 };
    this.onOnline = () => {
      if (!this.stopped && !this.ws) this.connect();
    };
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws/${this.page}/?v=2`;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    window.addEventListener("online", this.onOnline);
    this.connect();
  }

  /** Closes for good (page hidden into the back/forward cache, ...). */
  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onOnline);
    this.clearTimers();
    const ws = this.ws;
    if (ws) {
      this.detach(ws);
      try {
        ws.close(1000, "page closed");
      } catch {
        /* already closing */
      }
      this.ended(1000, "page closed");
    }
    this.status("closed", "disconnected");
  }

  /** Skips the remaining backoff wait. */
  retryNow() {
    if (!this.stopped && !this.ws) this.connect();
  }

  /** Sends a message object; false when not connected. */
  send(obj) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || !this.session) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  get connected() {
    return !!(this.ws && this.session && this.ws.readyState === WebSocket.OPEN);
  }

  // ---- internals -------------------------------------------------------

  status(state, text, retryAt = null) {
    this.handlers.onStatus?.({ state, text, retryAt });
  }

  clearTimers() {
    clearTimeout(this.timers.ping);
    clearTimeout(this.timers.timeout);
    clearTimeout(this.timers.connect);
    clearTimeout(this.timers.retry);
    clearInterval(this.timers.countdown);
  }

  detach(ws) {
    ws.onopen = null;
    ws.onmessage = null;
    ws.onerror = null;
    ws.onclose = null;
  }

  connect() {
    this.clearTimers();
    this.session = null;
    this.inflight = null;
    this.healthy = false;
    this.lostInRow = 0;
    this.seq = 0;
    this.status("connecting", this.attempt ? "reconnecting…" : "connecting…");
    let ws;
    try {
      ws = new WebSocket(this.url());
    } catch (e) {
      this.scheduleReconnect(`cannot connect: ${e.message}`);
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => this.onFrame(ev);
    ws.onerror = () => {
      /* a close event follows and carries the outcome */
    };
    ws.onclose = (ev) => {
      this.detach(ws);
      this.ws = null;
      this.ended(ev.code, ev.reason);
      if (ev.code === 1012) this.attempt = 0;
      this.scheduleReconnect(describeClose(ev.code, ev.reason));
    };
    this.timers.connect = setTimeout(() => {
      if (!this.session) this.abandon("no welcome from the server");
    }, CONNECT_TIMEOUT_MS);
  }

  /** Gives up on the current socket without waiting for a close handshake. */
  abandon(reason) {
    const ws = this.ws;
    if (!ws) return;
    this.detach(ws);
    this.ws = null;
    try {
      ws.close(4000, reason.slice(0, 100));
    } catch {
      /* ignore */
    }
    this.ended(4000, reason);
    this.scheduleReconnect(reason);
  }

  ended(code, reason) {
    clearTimeout(this.timers.ping);
    clearTimeout(this.timers.timeout);
    clearTimeout(this.timers.connect);
    this.inflight = null;
    const hadSession = !!this.session;
    this.session = null;
    if (hadSession) this.handlers.onDisconnect?.({ code, reason });
  }

  scheduleReconnect(reason) {
    if (this.stopped) return;
    this.clearTimers();
    if (navigator.onLine === false) {
      this.status("closed", `offline: ${reason}; waiting for the network`);
      return;
    }
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    const retryAt = performance.now() + delay;
    const tick = () => {
      const left = Math.max(0, retryAt - performance.now()) / 1000;
      this.status("reconnecting", `${reason} · retrying in ${left.toFixed(1)} s`, retryAt);
    };
    tick();
    this.timers.countdown = setInterval(tick, 100);
    this.timers.retry = setTimeout(() => this.connect(), delay);
  }

  onFrame(ev) {
    this.lastFrameAt = performance.now();
    if (typeof ev.data !== "string") return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object" || Array.isArray(msg)) return;
    switch (msg.command) {
      case "welcome":
        this.onWelcome(msg);
        break;
      case "pong":
        this.onPong(msg);
        break;
      case "server_rtt":
        if (isNum(msg.rtt_ms)) this.handlers.onServerRtt?.(msg.rtt_ms);
        break;
      case "error":
        this.handlers.onServerError?.({
          code: typeof msg.code === "string" ? msg.code : "error",
          detail: typeof msg.detail === "string" ? msg.detail : "",
        });
        break;
      default:
        if (this.session) this.handlers.onMessage?.(msg);
    }
  }

  onWelcome(msg) {
    if (typeof msg.channel_name !== "string" || this.session) return;
    clearTimeout(this.timers.connect);
    this.session = {
      id: msg.channel_name,
      name: typeof msg.name === "string" ? msg.name : msg.channel_name,
      gateway: typeof msg.gateway === "string" ? msg.gateway : "",
      token: typeof msg.token === "string" ? msg.token : "",
      page: msg.page === "public" || msg.page === "private" ? msg.page : this.page,
      pingIntervalMs: positiveInt(msg.ping_interval_ms, 1000, 60000),
      pingTimeoutMs: positiveInt(msg.ping_timeout_ms, 3000, 60000),
    };
    this.status("open", "connected");
    // The browser's identity first (docs/protocol.md, "Your history"):
    // the gateway takes it only before the connection's first sample.
    const secret = this.handlers.deviceSecret?.();
    if (secret) this.send({ command: "device", secret });
    const session = this.session;
    const gate = this.handlers.onWelcome?.(session);
    if (!gate || typeof gate.then !== "function") {
      this.sendPing();
      return;
    }
    // The page asked to hold the first ping until it has settled (the public
    // page renders a roster snapshot first): a ping in flight during a long
    // main-thread task would measure that task, not the network.
    let started = false;
    const first = () => {
      if (started || this.session !== session) return;
      started = true;
      this.sendPing();
    };
    gate.then(first, first);
    this.timers.ping = setTimeout(first, FIRST_PING_GATE_MS);
  }

  sendPing() {
    clearTimeout(this.timers.ping);
    if (!this.send({ command: "ping", seq: this.seq + 1 })) return;
    this.seq += 1;
    this.inflight = { seq: this.seq, t0: performance.now() };
    this.timers.timeout = setTimeout(() => this.onPingTimeout(), this.session.pingTimeoutMs);
  }

  onPingTimeout() {
    const p = this.inflight;
    if (!p) return;
    this.inflight = null;
    this.lost(p.seq);
    if (!this.ws) return;
    const silentFor = performance.now() - this.lastFrameAt;
    if (this.lostInRow >= DEAD_AFTER_LOST && silentFor >= DEAD_AFTER_LOST * this.session.pingTimeoutMs) {
      this.abandon(`no answer for ${(silentFor / 1000).toFixed(0)} s`);
      return;
    }
    this.sendPing();
  }

  lost(seq) {
    this.lostInRow += 1;
    this.handlers.onLoss?.({ seq });
  }

  onPong(msg) {
    const p = this.inflight;
    if (!p || !this.session || msg.seq !== p.seq) return; // late or unknown pong
    const now = performance.now();
    const rtt = now - p.t0;
    this.inflight = null;
    clearTimeout(this.timers.timeout);
    if (rtt > this.session.pingTimeoutMs) {
      // The timeout timer ran late (throttled background tab): still lost.
      this.lost(p.seq);
      this.sendPing();
      return;
    }
    this.lostInRow = 0;
    const delay = Math.round(rtt * 1000) / 1000;
    this.send({ command: "delay_time", delay_time: delay, seq: p.seq });
    if (!this.healthy) {
      this.healthy = true;
      this.attempt = 0;
    }
    this.handlers.onSample?.({
      seq: p.seq,
      rtt,
      serverTime: isNum(msg.server_time) ? msg.server_time : null,
    });
    const wait = Math.max(0, p.t0 + this.session.pingIntervalMs - performance.now());
    this.timers.ping = setTimeout(() => this.sendPing(), wait);
  }
}
