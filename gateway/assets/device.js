// PingApp "Your history": this browser's identity and its history across
// reloads (docs/protocol.md, "Your history"; docs/security.md).
//
// The identity is a secret the browser keeps in localStorage under
// DEVICE_KEY: 32 random bytes, base64url (43 characters). Both pages send
// it with `{"command":"device","secret":S}` right after every welcome, so
// every connection of this browser counts under the same identity. Only
// this secret unlocks the history: GET /api/device/history?window=W with
// `Authorization: Bearer S`; DELETE /api/device forgets it, after which the
// page makes a new secret and reconnects.

/** localStorage key of the browser's secret. */
export const DEVICE_KEY = "pingapp.device";

/** The windows the panel offers: button label, API window. */
export const DEVICE_WINDOWS = [
  { key: "1h", label: "1 hour" },
  { key: "1d", label: "1 day" },
  { key: "7d", label: "1 week" },
  { key: "31d", label: "1 month" },
];

/** The panel refreshes this often while the page is visible (ms). */
export const REFRESH_MS = 60000;
/** The first fetch after the first samples waits this long (ms): the recorder stores in batches. */
const FIRST_DELAY_MS = 2000;

const SECRET_RE = /^[A-Za-z0-9_-]{22,128}$/;

/** Whether `s` is a well-formed device secret (services::ids::valid_device_secret). */
export function validSecret(s) {
  return typeof s === "string" && SECRET_RE.test(s);
}

/** base64url without padding of `bytes`. */
export function base64url(bytes) {
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** A new secret: 32 bytes from crypto.getRandomValues, base64url. */
export function newSecret() {
  return base64url(crypto.getRandomValues(new Uint8Array(32)));
}

/**
 * The browser's identity: the secret in localStorage, made on first use.
 * Without storage (disabled, private mode) it lives as long as the page.
 */
export class DeviceIdentity {
  constructor(storage = safeStorage()) {
    this.storage = storage;
    this.secret = null;
    /** Whether the secret was made by this page (nothing can be stored under it yet). */
    this.fresh = false;
  }

  /** The secret, read or made (and stored) once. */
  get() {
    if (this.secret) return this.secret;
    let s = null;
    try {
      s = this.storage?.getItem(DEVICE_KEY) ?? null;
    } catch {
      s = null;
    }
    if (!validSecret(s)) {
      s = newSecret();
      this.save(s);
      this.fresh = true;
    }
    this.secret = s;
    return s;
  }

  /** Drops the secret and makes a new one: a new identity from now on. */
  renew() {
    try {
      this.storage?.removeItem(DEVICE_KEY);
    } catch {
      /* storage disabled */
    }
    this.secret = null;
    return this.get();
  }

  save(s) {
    try {
      this.storage?.setItem(DEVICE_KEY, s);
    } catch {
      /* storage disabled: the identity lasts as long as the page */
    }
  }
}

function safeStorage() {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null;
  }
}

/**
 * The summary of a window from its buckets ({count, min, mean, p50, p99,
 * max, jitter}): samples and mean exact; p50 and p99 the count-weighted
 * quantiles of the buckets' own p50 and p99 (each bucket is one value per
 * sample), jitter the mean of the buckets' jitter weighted by their pairs.
 * All null without samples.
 */
export function summarizeBuckets(buckets) {
  const out = { count: 0, mean: null, p50: null, p99: null, min: null, max: null, jitter: null };
  const good = (Array.isArray(buckets) ? buckets : []).filter(
    (b) => b && Number.isFinite(b.count) && b.count > 0 && Number.isFinite(b.mean),
  );
  if (!good.length) return out;
  let sum = 0;
  let jw = 0;
  let js = 0;
  for (const b of good) {
    out.count += b.count;
    sum += b.mean * b.count;
    if (Number.isFinite(b.min)) out.min = out.min === null ? b.min : Math.min(out.min, b.min);
    if (Number.isFinite(b.max)) out.max = out.max === null ? b.max : Math.max(out.max, b.max);
    if (Number.isFinite(b.jitter) && b.count > 1) {
      js += b.jitter * (b.count - 1);
      jw += b.count - 1;
    }
  }
  out.mean = sum / out.count;
  out.p50 = weightedQuantile(good, "p50", 0.5);
  out.p99 = weightedQuantile(good, "p99", 0.99);
  out.jitter = jw > 0 ? js / jw : null;
  return out;
}

/** The q-quantile of the buckets' `key` values, each counted `count` times. */
function weightedQuantile(buckets, key, q) {
  const items = buckets
    .filter((b) => Number.isFinite(b[key]))
    .map((b) => ({ v: b[key], w: b.count }))
    .sort((a, b) => a.v - b.v);
  if (!items.length) return null;
  const total = items.reduce((s, i) => s + i.w, 0);
  const rank = q * total;
  let seen = 0;
  for (const i of items) {
    seen += i.w;
    if (seen >= rank) return i.v;
  }
  return items[items.length - 1].v;
}

/**
 * Buckets of an API answer as chart points, oldest first: { t (bucket
 * start, ms), count, min, p50, p95, max }; malformed entries dropped.
 */
export function bucketPoints(body) {
  const list = Array.isArray(body?.buckets) ? body.buckets : [];
  const out = [];
  for (const b of list) {
    if (!b || typeof b.start !== "string") continue;
    const t = Date.parse(b.start);
    if (!Number.isFinite(t) || !Number.isFinite(b.count) || !Number.isFinite(b.p50)) continue;
    out.push({
      t,
      count: b.count,
      min: Number.isFinite(b.min) ? b.min : b.p50,
      mean: Number.isFinite(b.mean) ? b.mean : b.p50,
      p50: b.p50,
      p95: Number.isFinite(b.p95) ? b.p95 : b.p50,
      p99: Number.isFinite(b.p99) ? b.p99 : b.p50,
      max: Number.isFinite(b.max) ? b.max : b.p50,
      jitter: Number.isFinite(b.jitter) ? b.jitter : null,
    });
  }
  out.sort((a, b) => a.t - b.t);
  return out;
}

/**
 * Polls this browser's history for the chosen window. `onData({ window,
 * windowMs, bucketMs, points, summary })` gets every answer (an empty one
 * on 404: nothing stored yet, or forgotten); `onStatus(text, state)` the
 * panel's status line.
 */
export class DeviceHistoryPoller {
  /**
   * @param {DeviceIdentity} identity
   * @param {(data: {window: string, windowMs: number, bucketMs: number, points: object[], summary: object}) => void} onData
   * @param {(text: string, state: string) => void} onStatus
   */
  constructor(identity, onData, onStatus) {
    this.identity = identity;
    this.onData = onData;
    this.onStatus = onStatus;
    this.window = DEVICE_WINDOWS[0].key;
    this.timer = 0;
    this.first = 0;
    this.abort = null;
    this.started = false;
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.started) this.poll();
    });
  }

  /**
   * Starts polling every REFRESH_MS while visible, and now unless the
   * identity is new (nothing can be stored under it yet: the first
   * samples trigger the first fetch, and no 404 is asked for).
   */
  start() {
    if (this.started) return;
    this.started = true;
    this.identity.get();
    if (this.identity.fresh) this.clear();
    else this.poll();
    this.timer = setInterval(() => this.poll(), REFRESH_MS);
  }

  /** After this connection's first samples: one fetch a moment later, so they show at once. */
  samplesSent() {
    if (this.first) return;
    this.first = setTimeout(() => this.poll(), FIRST_DELAY_MS);
  }

  /** A new connection: its first samples trigger a fetch again. */
  connected() {
    clearTimeout(this.first);
    this.first = 0;
  }

  /** Shows another window. */
  setWindow(key) {
    if (!DEVICE_WINDOWS.some((w) => w.key === key)) return;
    this.window = key;
    this.poll(true);
  }

  /** Shows an empty history at once (after forgetting). */
  clear() {
    this.abort?.abort();
    this.abort = null;
    this.onData({ window: this.window, windowMs: 0, bucketMs: 0, points: [], summary: summarizeBuckets([]) });
    this.onStatus("no samples recorded yet", "empty");
  }

  async poll(force = false) {
    if (document.hidden && !force) return;
    if (this.abort) {
      if (!force) return;
      this.abort.abort();
    }
    const abort = new AbortController();
    this.abort = abort;
    const window = this.window;
    try {
      const res = await fetch(`/api/device/history?window=${encodeURIComponent(window)}`, {
        headers: { Authorization: `Bearer ${this.identity.get()}`, Accept: "application/json" },
        cache: "no-store",
        signal: abort.signal,
      });
      if (this.abort !== abort) return;
      if (res.status === 404) {
        this.onData({ window, windowMs: 0, bucketMs: 0, points: [], summary: summarizeBuckets([]) });
        this.onStatus("no samples recorded yet", "empty");
        return;
      }
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const body = await res.json();
      if (this.abort !== abort) return;
      const points = bucketPoints(body);
      const summary = summarizeBuckets(points);
      this.onData({
        window,
        windowMs: Number.isFinite(body?.window_ms) ? body.window_ms : 0,
        bucketMs: Number.isFinite(body?.bucket_ms) ? body.bucket_ms : 0,
        points,
        summary,
      });
      this.onStatus(`updated ${new Date().toLocaleTimeString()}`, summary.count ? "ok" : "empty");
    } catch (e) {
      if (e?.name === "AbortError") return;
      this.onStatus(`history unavailable (${e?.message ?? "error"}); retrying`, "error");
    } finally {
      if (this.abort === abort) this.abort = null;
    }
  }

  /**
   * Forgets this browser: DELETE /api/device with the secret, then a new
   * secret (which is fresh: nothing is fetched for it before its first
   * samples). Resolves to the number of connections forgotten (0 when the
   * server knew none); rejects when the server could not forget.
   */
  async forget() {
    const res = await fetch("/api/device", {
      method: "DELETE",
      headers: { Authorization: `Bearer ${this.identity.get()}`, Accept: "application/json" },
      cache: "no-store",
    });
    if (res.status !== 200 && res.status !== 404) throw new Error(`HTTP ${res.status}`);
    const body = res.status === 200 ? await res.json() : null;
    this.identity.renew();
    clearTimeout(this.first);
    this.first = 0;
    this.clear();
    return Number.isFinite(body?.channels) ? body.channels : 0;
  }
}
