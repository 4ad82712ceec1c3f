// Unit tests of the pages' pure statistics module. Run: node --test gateway/tests/js/
import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as S from "../../assets/stats.js";

// The vectors services/src/stats.rs checks too: one definition, two languages.
const VECTORS = JSON.parse(readFileSync(new URL("./stats_vectors.json", import.meta.url), "utf8"));

/** `got` equals `expected` within a relative 1e-12 (null for null). */
function assertClose(got, expected, what) {
  if (expected === null) {
    assert.equal(got, null, what);
    return;
  }
  assert.ok(
    typeof got === "number" && Math.abs(got - expected) <= 1e-12 * Math.max(1, Math.abs(expected)),
    `${what}: got ${got}, expected ${expected}`,
  );
}

/** A seeded pseudo-random generator (mulberry32): the same run every time. */
function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test("percentiles match the shared vectors", () => {
  assert.ok(VECTORS.percentiles.length >= 5, "the vectors file lost its cases");
  for (const c of VECTORS.percentiles) {
    for (const [p, expected] of Object.entries(c.expected)) {
      assertClose(S.quantile(c.values, Number(p) / 100), expected, `${c.name} p${p}`);
    }
    assertClose(S.median(c.values), c.expected["50"], `${c.name} median`);
    const sum = S.summarize(c.values);
    assertClose(sum.median, c.expected["50"], `${c.name} summarize median`);
    assertClose(sum.p95, c.expected["95"], `${c.name} summarize p95`);
    assertClose(sum.p99, c.expected["99"], `${c.name} summarize p99`);
  }
});
test("jitter matches the shared vectors", () => {
  for (const c of VECTORS.jitter) assertClose(S.jitter(c.values), c.expected, `${c.name} jitter`);
});
test("quantiles", () => {
  assert.equal(S.median([3, 1, 2]), 2);
  assert.equal(S.median([1, 2, 3, 4]), 2.5);
  assert.equal(S.quantile([], 0.5), null);
  assert.equal(S.quantile([5], 0.99), 5);
  assert.equal(S.quantile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 0.95), 10.5);
  assert.equal(S.median([1, null, 3]), 2);
});
test("jitter", () => {
  assert.equal(S.jitter([1]), null);
  assert.equal(S.jitter([1, 3, 2]), 1.5);
  assert.equal(S.jitter([1, null, 3]), 2);
});
test("summarize: fixed outcomes", () => {
  // 10, lost, 30, 20, lost, 40: four samples, two losses.
  const s = S.summarize([10, null, 30, 20, null, 40]);
  assert.deepEqual(
    { last: s.last, min: s.min, max: s.max, count: s.count, lost: s.lost },
    { last: 40, min: 10, max: 40, count: 4, lost: 2 },
  );
  assertClose(s.median, 25, "median");
  assertClose(s.p95, 38.5, "p95"); // h = 3 * 0.95 = 2.85: 30 + 0.85 * 10
  assertClose(s.p99, 39.7, "p99");
  assertClose(s.jitter, (20 + 10 + 20) / 3, "jitter");
  assertClose(s.loss, (2 / 6) * 100, "loss");
  const e = S.summarize([]);
  assert.equal(e.loss, null); assert.equal(e.median, null); assert.equal(e.count, 0);
  assert.equal(S.summarize([null, null]).loss, 100);
});
test("SessionStats keeps what summarize computes (seeded outcomes)", () => {
  const random = seeded(20261130);
  const outs = [];
  const sess = new S.SessionStats();
  for (let i = 0; i < 500; i++) {
    const v = i % 17 === 0 ? null : random() * 100;
    outs.push(v);
    if (v === null) sess.addLoss(i); else sess.addSample(v, i);
  }
  const a = S.summarize(outs), b = sess.summary();
  assert.equal(b.count, 500 - 30);
  assert.equal(b.lost, 30);
  for (const k of Object.keys(a)) assertClose(b[k], a[k], k);
  assert.deepEqual(sess.recentSummary(60), S.summarize(outs.slice(-60)));
});
test("format", () => {
  assert.equal(S.formatMs(null), "–");
  assert.equal(S.formatMs(0.4123), "0.412 ms");
  assert.equal(S.formatMs(23.456), "23.46 ms");
  assert.equal(S.formatMs(153.26), "153.3 ms");
  assert.equal(S.formatPercent(0), "0.0 %");
  assert.equal(S.formatTick(2.5, 2.5), "2.5 ms");
  assert.equal(S.formatTick(0.2, 0.1), "0.2 ms");
  assert.equal(S.formatTick(20, 10), "20 ms");
});
test("ticks", () => {
  assert.deepEqual(S.niceTicks(9.3, 5).ticks, [0, 2, 4, 6, 8, 10]);
  assert.deepEqual(S.niceTicks(0.43, 4).ticks, [0, 0.2, 0.4, 0.6]);
  const t = S.timeTicks(0, 60000, 5); assert.equal(t.step, 15000);
});
test("name", () => {
  assert.deepEqual(S.validateName("  bob "), { ok: true, name: "bob" });
  assert.equal(S.validateName("   ").ok, false);
  assert.equal(S.validateName("a\u0007b").ok, false);
  assert.equal(S.validateName("é".repeat(64)).ok, true);
  assert.equal(S.validateName("😀".repeat(64)).ok, true);
  assert.equal(S.validateName("x".repeat(65)).ok, false);
});
test("backoff", () => {
  assert.equal(S.backoffDelay(0, () => 0), 500);
  assert.equal(S.backoffDelay(0, () => 0.999999) < 1000, true);
  assert.equal(Math.round(S.backoffDelay(10, () => 0.9999999)), 20000);
  assert.equal(Math.round(S.backoffDelay(2, () => 1)), 4000);
});
test("band/bucket", () => {
  const b = S.slidingBand([1, null, 3], 1);
  assert.equal(b[1].mid, 2);
  const k = S.bucketize([{t:0,v:1},{t:1,v:3},{t:9,v:5}], 0, 10, 2);
  assert.equal(k.length, 2); assert.equal(k[0].median, 2); assert.equal(k[1].max, 5);
});
