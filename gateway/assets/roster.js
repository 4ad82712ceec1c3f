// PingApp public roster table.
//
// The model (id -> client record) changes at once with every message; the
// table follows at the next animation frame, touching only the rows whose
// client changed (a Map id -> row elements; no full re-render except for a
// new roster snapshot). Every client-controlled string goes in through
// textContent / dataset, never as HTML.

import { formatMsBare, isNum } from "./stats.js";

const DELAY_FIELDS = ["delay_time", "median", "jitter"];
/** Rows created per animation frame while a snapshot is being built. */
const CHUNK = 400;
/**
 * Above this many clients the page asks the server for the delays of the
 * rows in view only (a v2 `watch`, see docs/protocol.md): every client's
 * delay, every second, for thousands of clients is more than a browser
 * needs for a table that shows a few dozen rows.
 */
export const WATCH_ABOVE = 100;
/** The server's limit on the ids of one `watch`. */
export const WATCH_MAX = 200;

/** A delay value as the model keeps it: a finite number or null. */
function delayValue(v) {
  return isNum(v) ? v : null;
}

function text(v, fallback = "") {
  return typeof v === "string" ? v : fallback;
}

export class RosterTable {
  /**
   * @param {HTMLTableElement} table  the table (with a tbody)
   * @param {HTMLElement} countEl     shows "N clients"
   */
  constructor(table, countEl) {
    this.table = table;
    this.tbody = table.tBodies[0] ?? table.appendChild(document.createElement("tbody"));
    this.countEl = countEl;
    this.model = new Map();
    this.rows = new Map();
    this.dirty = new Set();
    this.rebuild = false;
    this.selfId = null;
    this.frame = 0;
    /** Ids still to be turned into rows after a snapshot, in order. */
    this.pending = new Set();
    /** Set by reset(); cleared by setSelf() (a new connection awaits a new snapshot). */
    this.haveSnapshot = false;
    this.waiters = [];
    /** Called after every DOM update (the rows in view may have moved). */
    this.onFlush = null;
  }

  /**
   * The ids to watch: the own row and the rows in view of `scroller` (plus
   * half a screen below), at most `max`; or null while the roster is small
   * enough to get every update.
   */
  watchIds(scroller, max = WATCH_MAX) {
    if (this.model.size <= WATCH_ABOVE) return null;
    const ids = [];
    if (this.selfId !== null && this.model.has(this.selfId)) ids.push(this.selfId);
    const top = scroller.scrollTop;
    const bottom = top + scroller.clientHeight * 1.5;
    const rows = /** @type {HTMLCollectionOf<HTMLElement>} */ (this.tbody.children);
    // Rows are in document order, so their offsets grow: find the first
    // one that ends below the top edge.
    let lo = 0;
    let hi = rows.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const r = rows[mid];
      if (r.offsetTop + r.offsetHeight <= top) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < rows.length && ids.length < max; i++) {
      const r = rows[i];
      if (r.offsetTop >= bottom) break;
      const id = r.dataset.id;
      if (id && id !== this.selfId) ids.push(id);
    }
    return ids;
  }

  /** Resolves once the next roster snapshot is completely in the DOM. */
  whenRendered() {
    return new Promise((resolve) => {
      this.waiters.push(resolve);
      this.checkRendered();
    });
  }

  checkRendered() {
    if (!this.haveSnapshot || this.rebuild || this.pending.size || !this.waiters.length) return;
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }

  /** Routes a server message; returns true when it was a roster message. */
  handle(msg) {
    switch (msg.command) {
      case "roster":
        this.reset(msg.clients);
        return true;
      case "connect":
        this.connect(msg);
        return true;
      case "change_name":
        this.rename(msg.channel_name, msg.name);
        return true;
      case "disconnect":
        this.remove(msg.channel_name);
        return true;
      case "delays":
        this.delays(msg.delay_times);
        return true;
      default:
        return false;
    }
  }

  /** The own client id (its row is marked and kept on top). */
  setSelf(id) {
    this.selfId = id;
    this.haveSnapshot = false;
  }

  /** Marks the whole table out of date (connection lost). */
  setStale(stale) {
    this.table.classList.toggle("stale", stale);
  }

  /** Replaces everything with a roster snapshot `{ID: {name, gateway, ...}}`. */
  reset(clients) {
    this.model.clear();
    if (clients && typeof clients === "object") {
      for (const [id, c] of Object.entries(clients)) {
        const rec = { id, name: id, gateway: "", delay_time: null, median: null, jitter: null };
        if (c && typeof c === "object") {
          rec.name = text(c.name, id);
          rec.gateway = text(c.gateway);
          for (const f of DELAY_FIELDS) rec[f] = delayValue(c[f]);
        }
        this.model.set(id, rec);
      }
    }
    this.dirty.clear();
    this.rebuild = true;
    this.haveSnapshot = true;
    this.setStale(false);
    this.schedule();
  }

  connect(msg) {
    const id = msg.channel_name;
    if (typeof id !== "string") return;
    let rec = this.model.get(id);
    if (!rec) {
      rec = { id, name: id, gateway: "", delay_time: null, median: null, jitter: null };
      this.model.set(id, rec);
    }
    if (typeof msg.name === "string") rec.name = msg.name;
    if (typeof msg.gateway === "string") rec.gateway = msg.gateway;
    this.touch(id);
  }

  /** A rename of an unknown client is ignored (it may have left already). */
  rename(id, name) {
    const rec = typeof id === "string" ? this.model.get(id) : undefined;
    if (!rec || typeof name !== "string") return;
    rec.name = name;
    this.touch(id);
  }

  remove(id) {
    if (typeof id !== "string" || !this.model.delete(id)) return;
    this.touch(id);
  }

  /** Partial delay updates `{ID: {delay_time, median, jitter}}`; unknown ids ignored. */
  delays(updates) {
    if (!updates || typeof updates !== "object") return;
    for (const [id, d] of Object.entries(updates)) {
      const rec = this.model.get(id);
      if (!rec || !d || typeof d !== "object") continue;
      for (const f of DELAY_FIELDS) if (f in d) rec[f] = delayValue(d[f]);
      this.touch(id);
    }
  }

  get(id) {
    return this.model.get(id);
  }

  get size() {
    return this.model.size;
  }

  touch(id) {
    this.dirty.add(id);
    this.schedule();
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.flush();
    });
  }

  /**
   * Applies pending changes to the DOM (normally from requestAnimationFrame).
   * A snapshot is built in chunks of CHUNK rows per frame, so that a roster
   * of thousands never blocks the main thread (which would delay pongs and
   * inflate the measured delay).
   */
  flush() {
    if (this.rebuild) {
      this.rebuild = false;
      this.rows.clear();
      this.tbody.replaceChildren();
      this.pending = new Set(this.model.keys());
      if (this.selfId !== null && this.pending.has(this.selfId)) {
        this.pending.delete(this.selfId);
        this.tbody.appendChild(this.createRow(this.model.get(this.selfId)).tr);
      }
    }
    if (this.pending.size) {
      const frag = document.createDocumentFragment();
      let n = 0;
      for (const id of this.pending) {
        this.pending.delete(id);
        const rec = this.model.get(id);
        if (rec && !this.rows.has(id)) frag.appendChild(this.createRow(rec).tr);
        n += 1;
        if (n >= CHUNK) break;
      }
      this.tbody.appendChild(frag);
      if (this.pending.size) this.schedule();
    }
    for (const id of this.dirty) {
      if (this.pending.has(id)) continue; // its row is built later, from the current model
      const rec = this.model.get(id);
      const row = this.rows.get(id);
      if (!rec) {
        if (row) {
          row.tr.remove();
          this.rows.delete(id);
        }
      } else if (!row) {
        const created = this.createRow(rec);
        if (id === this.selfId) this.tbody.prepend(created.tr);
        else this.tbody.appendChild(created.tr);
      } else {
        this.updateRow(row, rec);
      }
    }
    this.dirty.clear();
    const n = this.model.size;
    this.countEl.dataset.count = String(n);
    this.countEl.textContent = n === 1 ? "1 client" : `${n} clients`;
    this.checkRendered();
    this.onFlush?.();
  }

  createRow(rec) {
    const tr = document.createElement("tr");
    tr.setAttribute("role", "row"); // explicit: the CSS lays the table out as a grid
    tr.dataset.id = rec.id;
    const isSelf = rec.id === this.selfId;
    const cell = () => {
      const td = document.createElement("td");
      td.setAttribute("role", "cell");
      return td;
    };
    const nameTd = cell();
    nameTd.className = "name";
    const nameSpan = document.createElement("span");
    nameSpan.className = "name-text";
    nameTd.appendChild(nameSpan);
    if (isSelf) {
      tr.classList.add("self");
      tr.dataset.self = "true";
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "you";
      nameTd.appendChild(badge);
    }
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
    const row = { tr, cells, shown: {} };
    this.rows.set(rec.id, row);
    this.updateRow(row, rec);
    return row;
  }

  updateRow(row, rec) {
    if (row.shown.name !== rec.name) row.cells.name.title = rec.name;
    this.setCell(row, "name", rec.name);
    this.setCell(row, "gateway", rec.gateway);
    for (const f of DELAY_FIELDS) this.setCell(row, f, formatMsBare(rec[f]));
  }

  setCell(row, key, value) {
    if (row.shown[key] === value) return;
    row.shown[key] = value;
    row.cells[key].textContent = value;
  }
}
