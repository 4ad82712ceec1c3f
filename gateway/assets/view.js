// PingApp public room: the pure part of the virtualized roster (no DOM).
//
// The server holds the room sorted and filtered and sends a page only a
// window of it (docs/protocol.md, "Public room: the view"). These
// functions decide which rows the page renders for a scroll position, and
// which window to ask the server for so that the screen stays covered
// while the user scrolls on; roster.js does the DOM and the messages. Node
// tests: gateway/tests/js/view.test.mjs.

/** The server's largest window (`limit` of a `view`). */
export const MAX_LIMIT = 200;
/** Rows rendered above and below the screen, so a short scroll shows no gap. */
export const OVERSCAN = 6;
/** The sort keys the server knows, and the orders. */
export const SORTS = ["name", "delay"];
export const ORDERS = ["asc", "desc"];
/** The longest filter the server accepts (characters). */
export const MAX_FILTER = 64;

/**
 * The rows to render: positions `first` (inclusive) to `last` (exclusive)
 * of a list of `matched` rows of `rowPx` pixels, seen from `top` pixels
 * into the list through a viewport `height` pixels tall, plus OVERSCAN on
 * either side. At most `ceil(height / rowPx) + 1 + 2 * OVERSCAN` rows,
 * whatever the list's length.
 */
export function renderRange(top, height, rowPx, matched) {
  const n = Math.max(0, Math.floor(matched) || 0);
  if (!(rowPx > 0) || n === 0) return { first: 0, last: 0 };
  const from = Math.floor(Math.max(0, top) / rowPx);
  const to = Math.ceil((Math.max(0, top) + Math.max(0, height)) / rowPx);
  return {
    first: Math.min(n, Math.max(0, from - OVERSCAN)),
    last: Math.min(n, to + OVERSCAN),
  };
}

/**
 * The window to ask for around the screen: the rows on screen with about
 * a screen above and a screen below (at most MAX_LIMIT rows), so that
 * scrolling by up to a screen needs no new window.
 */
export function windowFor(top, height, rowPx, matched) {
  const screen = rowPx > 0 ? Math.ceil(Math.max(0, height) / rowPx) + 1 : 1;
  const limit = Math.min(MAX_LIMIT, Math.max(screen * 3, 2 * OVERSCAN + screen));
  const first = rowPx > 0 ? Math.floor(Math.max(0, top) / rowPx) : 0;
  let offset = Math.max(0, first - Math.floor((limit - screen) / 2));
  // Near the end, slide back so the window is full.
  const n = Math.max(0, Math.floor(matched) || 0);
  if (offset + limit > n) offset = Math.max(0, n - limit);
  return { offset, limit };
}

/**
 * Whether a window of `count` rows from `offset` holds every row of
 * `first..last` that exists in a list of `matched` rows: rows past the
 * window's end are fine when the window reaches the end of the list.
 */
export function covers(offset, count, first, last, matched) {
  if (last <= first) return true;
  return first >= offset && offset + count >= Math.min(last, matched);
}

/** The sort and filter a view frame answers, as a comparable key. */
export function orderKey(sort, order, filter) {
  return `${sort}\u0000${order}\u0000${filter}`;
}

/**
 * A filter as the page sends it: trimmed, lower-cased (the server compares
 * names ignoring case and answers with the filter lower-cased), at most
 * MAX_FILTER characters.
 */
export function normalizeFilter(text) {
  const t = typeof text === "string" ? text.trim().toLowerCase() : "";
  return [...t].slice(0, MAX_FILTER).join("");
}
