// Unit tests of the virtualized roster's window arithmetic (assets/view.js).
// Run: node --test gateway/tests/js/
import test from "node:test";
import assert from "node:assert/strict";
import * as V from "../../assets/view.js";

const ROW = 34;
const SCREEN = 600; // px: 18 rows visible (17.6)

test("the rendered rows are the screen plus the overscan, whatever the list's length", () => {
  const visible = Math.ceil(SCREEN / ROW) + 1;
  for (const matched of [0, 1, 20, 10_000, 100_000, 1_000_000]) {
    for (const top of [0, 17, 5000, 340_000, 34 * 999_990]) {
      const { first, last } = V.renderRange(top, SCREEN, ROW, matched);
      assert.ok(0 <= first && first <= last && last <= matched, `${matched} ${top}: ${first}..${last}`);
      assert.ok(last - first <= visible + 2 * V.OVERSCAN, `${matched} ${top}: ${last - first} rows`);
    }
  }
  assert.deepEqual(V.renderRange(0, SCREEN, ROW, 5), { first: 0, last: 5 });
  // Scrolled to row 100: from 100 - overscan to the last row on screen + overscan.
  assert.deepEqual(V.renderRange(100 * ROW, SCREEN, ROW, 10_000), {
    first: 100 - V.OVERSCAN,
    last: 100 + Math.ceil(SCREEN / ROW) + V.OVERSCAN,
  });
  // Beyond the end (the list shrank): nothing.
  assert.deepEqual(V.renderRange(1e6, SCREEN, ROW, 10), { first: 10, last: 10 });
  assert.deepEqual(V.renderRange(0, SCREEN, 0, 10), { first: 0, last: 0 });
});

test("the window asked for covers the screen with a screen to spare on each side", () => {
  for (const matched of [3, 50, 10_000, 100_000]) {
    for (let top = 0; top < Math.min(matched, 5000) * ROW; top += 977) {
      const w = V.windowFor(top, SCREEN, ROW, matched);
      assert.ok(w.limit <= V.MAX_LIMIT && w.offset >= 0, JSON.stringify(w));
      const r = V.renderRange(top, SCREEN, ROW, matched);
      // The window's rows as the server would send them: up to the end.
      const count = Math.max(0, Math.min(w.limit, matched - w.offset));
      assert.ok(V.covers(w.offset, count, r.first, r.last, matched), `${matched} ${top}: ${JSON.stringify(w)}`);
      // Scrolling on by less than half a screen either way needs no new window.
      for (const d of [-SCREEN / 2, SCREEN / 2]) {
        const r2 = V.renderRange(Math.max(0, top + d), SCREEN, ROW, matched);
        assert.ok(V.covers(w.offset, count, r2.first, r2.last, matched), `${matched} ${top}${d}`);
      }
    }
  }
  // At the end of the list the window slides back to stay full.
  assert.deepEqual(V.windowFor(9_990 * ROW, SCREEN, ROW, 10_000), { offset: 10_000 - 57, limit: 57 });
});

test("covers: a window must start at or before the first row and reach the last (or the list's end)", () => {
  assert.equal(V.covers(0, 100, 0, 30, 1000), true);
  assert.equal(V.covers(10, 100, 0, 30, 1000), false);
  assert.equal(V.covers(0, 20, 0, 30, 1000), false);
  assert.equal(V.covers(0, 20, 0, 30, 20), true, "the list ends with the window");
  assert.equal(V.covers(0, 0, 0, 0, 0), true, "nothing to show");
  assert.equal(V.covers(500, 0, 0, 30, 1000), false, "an empty window far away");
});

test("filters are trimmed and cut to the server's limit, in characters", () => {
  assert.equal(V.normalizeFilter("  ann "), "ann");
  assert.equal(V.normalizeFilter("ÄnN"), "änn");
  assert.equal(V.normalizeFilter(null), "");
  const long = "é".repeat(70);
  assert.equal([...V.normalizeFilter(long)].length, V.MAX_FILTER);
  assert.equal(V.normalizeFilter("😀".repeat(70)), "😀".repeat(V.MAX_FILTER));
  assert.notEqual(V.orderKey("name", "asc", ""), V.orderKey("name", "desc", ""));
  assert.notEqual(V.orderKey("name", "asc", "a"), V.orderKey("name", "asc", ""));
});
