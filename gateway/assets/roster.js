// PingApp public roster: a virtualized table driven by the v2 view
// (docs/protocol.md, "Public room: the view").
//
// The server keeps the room sorted and filtered and sends this page the
// room's size and a window of rows (`view`), then at most one change to it
// per roster tick (`view_update`, or a new `view` when the window's rows
// moved). The page asks for the window around the screen (view.js) as the
// user scrolls, sorts or filters, debounced, so a page in a room of
// 100,000 holds and renders about as much as one in a room of 50.
//
// DOM: the list's tbody is as tall as the whole sorted, filtered list; only
// the rows near the screen exist, absolutely placed at their position
// (reused by id while scrolling, so a row that stays on screen is never
// rebuilt); rows of the list not yet in a window the server sent are
// blank placeholders until it arrives. The own row is also pinned under
// the header. Every client-controlled string goes in through textContent
// / dataset, never as HTML.

import { formatMsBare, isNum, jitter, median } from "./stats.js";
import {
  MAX_FILTER,
  ORDERS,
  SORTS,
  covers,
  normalizeFilter,
  orderKey,
  renderRange,
  windowFor,
} from "./view.js";

const DELAY_FIELDS = ["delay_time", "median", "jitter"];
/**
 * Own samples the pinned row's median and jitter cover: the server's
 * window (services/src/stats.rs, `WINDOW`), so the page shows for itself
 * what the others see of it. The server sends `me` only for a rename
 * (docs/protocol.md, "Public room: the view").
 */
export const OWN_WINDOW = 32;
/** Wait after the last scroll event before asking for a new window (ms). */
export const SCROLL_DEBOUNCE_MS = 80;
/** Wait after the last keystroke in the filter before asking (ms). */
export const FILTER_DEBOUNCE_MS = 250;
/** Longest a wanted window waits while the user keeps scrolling (ms). */
export const VIEW_MAX_WAIT_MS = 250;
/** Row height when the stylesheet does not say (`--row-h`, px). */
const DEFAULT_ROW_PX = 34;
/** Detached row elements kept for reuse. */
const POOL_MAX = 64;

/** A delay value as the model keeps it: a finite number or null. */
function delayValue(v) {
  return isNum(v) ? v : null;
}

/** A row of a view frame as the model keeps it, or null when malformed. */
function record(row) {
  if (!row || typeof row !== "object" || typeof row.channel_name !== "string") return null;
  const rec = {
    id: row.channel_name,
    name: typeof row.name === "string" ? row.name : row.channel_name,
    gateway: typeof row.gateway === "string" ? row.gateway : "",
    delay_time: null,
    median: null,
    jitter: null,
  };
  for (const f of DELAY_FIELDS) rec[f] = delayValue(row[f]);
  return rec;
}

function count(v) {
  return Number.isInteger(v) && v >= 0 ? v : null;
}

export class RosterTable {
  /**
   * @param {HTMLTableElement} table  the table: a thead and a tbody.rows
   * @param {HTMLElement} countEl     shows "N clients"
   * @param {object} [opts]
   * @param {HTMLElement} [opts.scroller]            the scrolling box (default: the table's parent)
   * @param {HTMLInputElement | null} [opts.filterInput]  the name filter
   * @param {(msg: object) => boolean} [opts.send]   sends a message; false when not connected
   */
  constructor(table, countEl, opts = {}) {
    this.table = table;
    this.thead = table.tHead ?? table.createTHead();
    this.tbody =
      /** @type {HTMLTableSectionElement} */ (table.querySelector("tbody.rows")) ??
      table.tBodies[0] ??
      table.createTBody();
    this.countEl = countEl;
    this.scroller = opts.scroller ?? table.parentElement;
    this.send = opts.send ?? (() => false);
    this.filterInput = opts.filterInput ?? null;
    /** What the user asked for. */
    this.sort = "name";
    this.order = "asc";
    this.filter = "";
    /** What the server said: the room's size, the filter's matches, a window. */
    this.total = 0;
    this.matched = 0;
    this.win = { key: orderKey("name", "asc", ""), offset: 0, rows: [] };
    /** id -> index in win.rows */
    this.index = new Map();
    this.me = null;
    this.selfId = null;
    /** This connection's last OWN_WINDOW delays, oldest first. */
    this.ownSamples = [];
    /** The view last sent on this connection (its JSON), to send each once. */
    this.sent = null;
    this.haveView = false;
    this.waiters = [];
    /** Rendered rows: key (id, or "@pos" for a placeholder) -> row. */
    this.rendered = new Map();
    this.pool = [];
    this.pinned = null;
    this.frame = 0;
    this.viewTimer = 0;
    /** When the pending view request must go out at the latest (ms, performance.now()). */
    this.viewDue = 0;
    this.rowPx = DEFAULT_ROW_PX;
    /** Called after every DOM update. */
    this.onFlush = null;
    /** Called with the own row when its name changed (a rename confirmed). */
    this.onMe = null;

    this.readRowHeight();
    this.scroller?.addEventListener(
      "scroll",
      () => {
        this.schedule();
        this.scheduleView(SCROLL_DEBOUNCE_MS);
      },
      { passive: true },
    );
    window.addEventListener("resize", () => {
      this.readRowHeight();
      this.schedule();
      this.scheduleView(SCROLL_DEBOUNCE_MS);
    });
    for (const th of this.thead.querySelectorAll("th[data-sort]")) {
      const button = th.querySelector("button");
      button?.addEventListener("click", () => this.sortBy(/** @type {HTMLElement} */ (th).dataset.sort));
    }
    if (this.filterInput) {
      this.filterInput.maxLength = MAX_FILTER;
      this.filterInput.addEventListener("input", () => {
        const filter = normalizeFilter(this.filterInput.value);
        if (filter === this.filter) return;
        this.filter = filter;
        this.toTop();
        this.scheduleView(FILTER_DEBOUNCE_MS);
      });
    }
    this.showSort();
  }

  // ---- the connection's events -----------------------------------------

  /** The own client id (a new connection: its first view is awaited). */
  setSelf(id) {
    this.selfId = id;
    this.me = null;
    this.ownSamples = [];
    this.sent = null;
    this.haveView = false;
    clearTimeout(this.viewTimer);
    this.viewTimer = 0;
  }

  /** Marks the whole table out of date (connection lost). */
  setStale(stale) {
    this.table.classList.toggle("stale", stale);
  }

  /** Resolves once the first view of this connection is on screen. */
  whenRendered() {
    return new Promise((resolve) => {
      this.waiters.push(resolve);
      this.checkRendered();
    });
  }

  checkRendered() {
    if (!this.haveView || this.frame || !this.waiters.length) return;
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }

  /** Routes a server message; returns true when it was a roster message. */
  handle(msg) {
    switch (msg.command) {
      case "view":
        this.onView(msg);
        return true;
      case "view_update":
        this.onUpdate(msg);
        return true;
      default:
        return false;
    }
  }

  onView(msg) {
    this.setCounts(msg);
    this.setMe(msg.me);
    // The server answers with the filter lower-cased, as the page sends it.
    const filter = typeof msg.filter === "string" ? msg.filter.toLowerCase() : "";
    const key = orderKey(this.sort, this.order, this.filter);
    // A window of an older sort or filter (the user changed it since):
    // only its counts and own row are current.
    if (key === orderKey(msg.sort, msg.order, filter) && Array.isArray(msg.rows)) {
      const rows = [];
      for (const r of msg.rows) {
        const rec = record(r);
        if (rec) rows.push(rec);
      }
      this.win = { key, offset: count(msg.offset) ?? 0, rows };
      this.index = new Map(rows.map((r, i) => [r.id, i]));
    }
    this.haveView = true;
    this.setStale(false);
    this.schedule();
    this.scheduleView(0);
  }

  onUpdate(msg) {
    this.setCounts(msg);
    this.setMe(msg.me);
    if (msg.rows && typeof msg.rows === "object") {
      for (const [id, r] of Object.entries(msg.rows)) {
        const i = this.index.get(id);
        const rec = record(r);
        if (i !== undefined && rec && rec.id === id) this.win.rows[i] = rec;
      }
    }
    this.schedule();
  }

  setCounts(msg) {
    const total = count(msg.total);
    const matched = count(msg.matched);
    if (total !== null) this.total = total;
    if (matched !== null) this.matched = matched;
    else if (total !== null && !this.filter) this.matched = total;
  }

  setMe(row) {
    const rec = record(row);
    if (!rec || rec.id !== this.selfId) return;
    const renamed = this.me !== null && this.me.name !== rec.name;
    const first = this.me === null;
    this.me = rec;
    this.applyOwnStats();
    if (renamed || first) this.onMe?.(rec);
  }

  /**
   * One of this page's own samples (the delay it sent): the pinned row
   * shows it and the median and jitter of the last OWN_WINDOW.
   */
  noteOwnSample(delay) {
    if (!isNum(delay)) return;
    this.ownSamples.push(delay);
    if (this.ownSamples.length > OWN_WINDOW) this.ownSamples.shift();
    if (this.applyOwnStats()) this.schedule();
  }

  /** Puts the own samples' statistics in the own row; true if it changed. */
  applyOwnStats() {
    const n = this.ownSamples.length;
    if (!this.me || n === 0) return false;
    this.me.delay_time = this.ownSamples[n - 1];
    this.me.median = median(this.ownSamples);
    this.me.jitter = n > 1 ? jitter(this.ownSamples) : 0;
    return true;
  }

  // ---- sort, filter, scroll ----------------------------------------------

  /** Sorts by `key` ("name" or "delay"); the same key again flips the order. */
  sortBy(key) {
    if (!SORTS.includes(key)) return;
    if (key === this.sort) this.order = this.order === "asc" ? "desc" : "asc";
    else {
      this.sort = key;
      this.order = "asc";
    }
    this.showSort();
    this.toTop();
    this.scheduleView(0);
  }

  showSort() {
    for (const th of this.thead.querySelectorAll("th[data-sort]")) {
      const el = /** @type {HTMLElement} */ (th);
      const on = el.dataset.sort === this.sort;
      el.setAttribute("aria-sort", on ? (this.order === "asc" ? "ascending" : "descending") : "none");
    }
  }

  toTop() {
    if (this.scroller) this.scroller.scrollTop = 0;
    this.schedule();
  }

  readRowHeight() {
    const v = parseFloat(getComputedStyle(this.tbody).getPropertyValue("--row-h"));
    this.rowPx = v > 0 ? v : DEFAULT_ROW_PX;
  }

  /** The list's scroll position and visible height, in px. */
  viewport() {
    const s = this.scroller;
    if (!s) return { top: 0, height: 0 };
    return { top: s.scrollTop - this.tbody.offsetTop, height: s.clientHeight };
  }

  /**
   * Debounced: asks for the window `ms` after the last call, but at most
   * VIEW_MAX_WAIT_MS after the first of a burst, so a long scroll gets
   * rows on the way, not only once it stops.
   */
  scheduleView(ms) {
    const now = performance.now();
    if (!this.viewTimer) this.viewDue = now + VIEW_MAX_WAIT_MS;
    clearTimeout(this.viewTimer);
    this.viewTimer = setTimeout(
      () => {
        this.viewTimer = 0;
        this.requestView();
      },
      Math.max(0, Math.min(ms, this.viewDue - now)),
    );
  }

  /**
   * Asks the server for the window around the screen, unless the window
   * it sent covers the screen already or the same request is in flight.
   */
  requestView() {
    if (!this.haveView) return; // the default view comes unasked
    if (!SORTS.includes(this.sort) || !ORDERS.includes(this.order)) return;
    const { top, height } = this.viewport();
    const key = orderKey(this.sort, this.order, this.filter);
    const range = renderRange(top, height, this.rowPx, this.matched);
    if (key === this.win.key && covers(this.win.offset, this.win.rows.length, range.first, range.last, this.matched)) {
      return;
    }
    const { offset, limit } = windowFor(top, height, this.rowPx, this.matched);
    const view = { command: "view", sort: this.sort, order: this.order, filter: this.filter, offset, limit };
    const text = JSON.stringify(view);
    if (text === this.sent) return;
    if (this.send(view)) this.sent = text;
  }

  // ---- the DOM -------------------------------------------------------------

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.flush();
    });
  }

  /** Renders the rows near the screen (normally from requestAnimationFrame). */
  flush() {
    const rowPx = this.rowPx;
    const usable = this.win.key === orderKey(this.sort, this.order, this.filter);
    const n = this.matched;
    const { top, height } = this.viewport();
    const { first, last } = renderRange(top, height, rowPx, n);
    this.tbody.style.height = `${n * rowPx}px`;
    this.table.setAttribute("aria-rowcount", String(n + 1));

    const wanted = [];
    for (let pos = first; pos < last; pos++) {
      const i = pos - this.win.offset;
      const rec = usable && i >= 0 && i < this.win.rows.length ? this.win.rows[i] : null;
      wanted.push({ pos, rec, key: rec ? rec.id : `@${pos}` });
    }
    const keep = new Set(wanted.map((w) => w.key));
    for (const [key, row] of this.rendered) {
      if (keep.has(key)) continue;
      this.rendered.delete(key);
      this.pool.push(row);
    }
    let prev = null;
    for (const w of wanted) {
      let row = this.rendered.get(w.key);
      if (!row) {
        row = this.pool.pop() ?? this.createRow();
        this.rendered.set(w.key, row);
      }
      this.fillRow(row, w.rec, w.pos);
      const place = prev ? prev.nextSibling : this.tbody.firstChild;
      if (place !== row.tr) this.tbody.insertBefore(row.tr, place);
      prev = row.tr;
    }
    for (const row of this.pool) row.tr.remove();
    if (this.pool.length > POOL_MAX) this.pool.length = POOL_MAX;

    this.fillPinned();
    this.showCount();
    this.checkRendered();
    this.onFlush?.();
  }

  showCount() {
    const t = this.total;
    const all = t === 1 ? "1 client" : `${t.toLocaleString("en")} clients`;
    const text = this.filter ? `${this.matched.toLocaleString("en")} of ${all} match` : all;
    if (this.countEl.textContent !== text) this.countEl.textContent = text;
    this.countEl.dataset.count = String(t);
    this.countEl.dataset.matched = String(this.matched);
  }

  /** The own row, pinned under the header (hidden until the server sent it). */
  fillPinned() {
    if (!this.pinned) {
      this.pinned = this.createRow();
      this.pinned.tr.classList.add("pinned");
      this.thead.appendChild(this.pinned.tr);
    }
    this.pinned.tr.hidden = !this.me;
    if (this.me) this.fillRow(this.pinned, this.me, -1);
  }

  createRow() {
    const tr = document.createElement("tr");
    tr.setAttribute("role", "row"); // explicit: the CSS lays the table out as a grid
    const cell = () => {
      const td = document.createElement("td");
      td.setAttribute("role", "cell");
      return td;
    };
    const nameTd = cell();
    nameTd.className = "name";
    const nameSpan = document.createElement("span");
    nameSpan.className = "name-text";
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "you";
    badge.hidden = true;
    nameTd.append(nameSpan, badge);
    const gwTd = cell();
    gwTd.className = "gateway";
    const cells = { name: nameSpan, gateway: gwTd };
    tr.append(nameTd, gwTd);
    for (const f of DELAY_FIELDS) {
      const td = cell();
      td.className = "num";
      td.dataset.field = f;
      cells[f] = td;
      tr.appendChild(td);
    }
    return { tr, cells, badge, shown: {} };
  }

  /** Shows `rec` (or a placeholder for null) in `row`, at list position `pos` (-1: pinned). */
  fillRow(row, rec, pos) {
    const tr = row.tr;
    if (pos >= 0) {
      const y = `translateY(${pos * this.rowPx}px)`;
      if (row.shown.y !== y) {
        row.shown.y = y;
        tr.style.transform = y;
        tr.setAttribute("aria-rowindex", String(pos + 2));
      }
    }
    const id = rec ? rec.id : "";
    if (row.shown.id !== id) {
      row.shown.id = id;
      if (rec) tr.dataset.id = id;
      else delete tr.dataset.id;
      tr.classList.toggle("placeholder", !rec);
    }
    const self = !!rec && rec.id === this.selfId;
    if (row.shown.self !== self) {
      row.shown.self = self;
      tr.classList.toggle("self", self);
      if (self) tr.dataset.self = "true";
      else delete tr.dataset.self;
      row.badge.hidden = !self;
    }
    const name = rec ? rec.name : "";
    if (row.shown.title !== name) {
      row.shown.title = name;
      row.cells.name.title = name;
    }
    this.setCell(row, "name", name);
    this.setCell(row, "gateway", rec ? rec.gateway : "");
    for (const f of DELAY_FIELDS) this.setCell(row, f, rec ? formatMsBare(rec[f]) : "");
  }

  setCell(row, key, value) {
    if (row.shown[key] === value) return;
    row.shown[key] = value;
    row.cells[key].textContent = value;
  }

  // ---- for tests and the page script -------------------------------------

  /** The own row (the server's name, the page's own statistics), or null. */
  get own() {
    return this.me;
  }

  /** The rows in the DOM now (the bound the Chromium test checks). */
  get domRows() {
    return this.tbody.children.length;
  }
}
