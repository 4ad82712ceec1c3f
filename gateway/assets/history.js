// PingApp history: this connection's samples as the recorder persisted them.
//
// GET /api/clients/{id}/samples?limit=1000[&since=RFC3339] with the
// connection's bearer token, every REFRESH_MS while the page is visible.
// The API returns the oldest samples first, so after the first page the
// poller asks only for what is newer than the last sample it has (dedup by
// seq, in case `since` is inclusive).

import { isNum } from "./stats.js";

const REFRESH_MS = 10000;
const FIRST_DELAY_MS = 2000;
const PAGE = 1000;
const MAX_PAGES_PER_POLL = 5;
const MAX_POINTS = 20000;

export class HistoryPoller {
  /**
   * @param {(points: {t:number,v:number}[]) => void} onPoints
   * @param {(text: string, state: string) => void} onStatus
   */
  constructor(onPoints, onStatus) {
    this.onPoints = onPoints;
    this.onStatus = onStatus;
    this.session = null;
    this.timer = 0;
    this.abort = null;
    this.reset();
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.session && this.started) this.poll();
    });
  }

  reset() {
    this.points = [];
    this.seen = new Set();
    this.since = null;
    this.started = false;
  }

  /** Follows a new connection (new id and token): forgets the old history. */
  start(session) {
    this.stop();
    this.session = session;
    this.onPoints(this.points);
    this.onStatus("waiting for the first samples…", "waiting");
  }

  /** Called after each own sample: the first fetch waits for a few to be recorded. */
  sampleSent() {
    if (!this.session || this.started) return;
    this.started = true;
    this.timer = setTimeout(() => {
      this.poll();
      this.timer = setInterval(() => this.poll(), REFRESH_MS);
    }, FIRST_DELAY_MS);
  }

  stop() {
    clearTimeout(this.timer);
    clearInterval(this.timer);
    this.timer = 0;
    this.abort?.abort();
    this.abort = null;
    this.session = null;
    this.reset();
  }

  async poll() {
    const session = this.session;
    if (!session || this.abort || document.hidden) return;
    const abort = new AbortController();
    this.abort = abort;
    try {
      for (let page = 0; page < MAX_PAGES_PER_POLL; page += 1) {
        let url = `/api/clients/${encodeURIComponent(session.id)}/samples?limit=${PAGE}`;
        if (this.since) url += `&since=${encodeURIComponent(this.since)}`;
        const res = await fetch(url, {
          headers: { Authorization: `Bearer ${session.token}`, Accept: "application/json" },
          cache: "no-store",
          signal: abort.signal,
        });
        if (res.status === 404) {
          if (!this.points.length) this.onStatus("no samples recorded yet", "empty");
          return;
        }
        if (!res.ok) throw new Error(`HTTP ${res.status}`);
        const body = await res.json();
        if (this.session !== session) return;
        const samples = Array.isArray(body?.samples) ? body.samples : [];
        let added = 0;
        for (const s of samples) {
          if (!s || typeof s !== "object" || typeof s.at !== "string") continue;
          const t = Date.parse(s.at);
          if (!isNum(t) || !isNum(s.delay_time)) continue;
          const key = isNum(s.seq) ? s.seq : s.at;
          this.since = s.at;
          if (this.seen.has(key)) continue;
          this.seen.add(key);
          this.points.push({ t, v: s.delay_time });
          added += 1;
        }
        if (samples.length < PAGE || added === 0) break;
      }
      this.points.sort((a, b) => a.t - b.t);
      if (this.points.length > MAX_POINTS) this.points.splice(0, this.points.length - MAX_POINTS);
      this.onPoints(this.points);
      const time = new Date().toLocaleTimeString();
      const n = this.points.length;
      this.onStatus(`${n} sample${n === 1 ? "" : "s"} from the recorder · updated ${time}`, "ok");
    } catch (e) {
      if (e?.name === "AbortError" || this.session !== session) return;
      this.onStatus(`history unavailable (${e?.message ?? "error"}); retrying`, "error");
    } finally {
      if (this.abort === abort) this.abort = null;
    }
  }
}
