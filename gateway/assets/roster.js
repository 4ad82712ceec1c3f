// PingApp public roster table: the rows of the page's view of the room
// (docs/protocol.md, "Public room: the view") and the own row.
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
    /** The room's size from the last view frame (null: count the model). */
    this.total = null;
    /** The window's ids in order, from the last `view` frame. */
    this.order = [];
    this.reorder = false;
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
      case "view":
        this.applyView(msg);
        return true;
      case "view_update":
        this.applyUpdate(msg);
        return true;
      default:
        return false;
    }
  }

  /** The own client id (its row is marked and kept on top). */
  setSelf(id) {
    this.selfId = id;
    this.haveSnapshot = false;
    this.total = null;
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

  /**
   * A `view` frame (docs/protocol.md, "Public room: the view"): the rows
   * of the window and the own row replace the model; rows that stay keep
   * their elements. The first one after a (re)connect rebuilds the table.
   */
  applyView(msg) {
    const first = !this.haveSnapshot;
    if (first) this.model.clear();
    const keep = new Set();
    const order = [];
    if (msg.me && typeof msg.me === "object" && typeof msg.me.channel_name === "string") {
      this.setRec(msg.me, !first);
      keep.add(msg.me.channel_name);
    }
    for (const r of Array.isArray(msg.rows) ? msg.rows : []) {
      if (!r || typeof r !== "object" || typeof r.channel_name !== "string") continue;
      this.setRec(r, !first);
      keep.add(r.channel_name);
      order.push(r.channel_name);
    }
    if (this.selfId !== null && this.model.has(this.selfId)) keep.add(this.selfId);
    for (const id of [...this.model.keys()]) {
      if (!keep.has(id)) this.remove(id);
    }
    this.order = order;
    this.reorder = true;
    this.setTotal(msg.total);
    if (first) {
      this.dirty.clear();
      this.rebuild = true;
      this.haveSnapshot = true;
      this.setStale(false);
    }
    this.schedule();
  }

  /** A `view_update` frame: changed rows of the window, the own row, the count. */
  applyUpdate(msg) {
    if (msg.rows && typeof msg.rows === "object") {
      for (const [id, r] of Object.entries(msg.rows)) {
        if (this.model.has(id) && r && typeof r === "object") this.setRec({ ...r, channel_name: id }, true);
      }
    }
    if (msg.me && typeof msg.me === "object" && msg.me.channel_name === this.selfId) {
      this.setRec(msg.me, true);
    }
    this.setTotal(msg.total);
    this.schedule();
  }

  /** Sets a row's record from a view row; `touch`: mark it for the DOM. */
  setRec(r, touch) {
    const id = r.channel_name;
    let rec = this.model.get(id);
    if (!rec) {
      rec = { id, name: id, gateway: "", delay_time: null, median: null, jitter: null };
      this.model.set(id, rec);
    }
    rec.name = text(r.name, id);
    rec.gateway = text(r.gateway);
    for (const f of DELAY_FIELDS) rec[f] = delayValue(r[f]);
    if (touch) this.touch(id);
  }

  /** The room's size (`total` of a view frame). */
  setTotal(total) {
    if (Number.isInteger(total) && total >= 0) this.total = total;
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
    if (this.reorder && !this.pending.size) this.applyOrder();
    const n = this.total ?? this.model.size;
    this.countEl.dataset.count = String(n);
    this.countEl.textContent = n === 1 ? "1 client" : `${n} clients`;
    this.checkRendered();
    this.onFlush?.();
  }

  /** Puts the rows in the window's order, the own row first; moves only if needed. */
  applyOrder() {
    this.reorder = false;
    const want = [];
    const self = this.selfId !== null ? this.rows.get(this.selfId) : undefined;
    if (self) want.push(self.tr);
    for (const id of this.order) {
      const row = this.rows.get(id);
      if (row && id !== this.selfId) want.push(row.tr);
    }
    const now = this.tbody.children;
    if (want.length === now.length && want.every((tr, i) => now[i] === tr)) return;
    for (const tr of want) this.tbody.appendChild(tr);
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
