// Unit tests of the pages' pure statistics module. Run: node --test gateway/tests/js/
import test from "node:test";
import assert from "node:assert/strict";
import * as S from "../../assets/stats.js";

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
test("summarize & session equal", () => {
  const outs = [];
  const sess = new S.SessionStats();
  for (let i = 0; i < 500; i++) {
    const v = i % 17 === 0 ? null : Math.random() * 100;
    outs.push(v);
    if (v === null) sess.addLoss(i); else sess.addSample(v, i);
  }
  const a = S.summarize(outs), b = sess.summary();
  for (const k of Object.keys(a)) assert.ok(Math.abs(a[k] - b[k]) < 1e-9, k);
  assert.deepEqual(sess.recentSummary(60), S.summarize(outs.slice(-60)));
  const e = S.summarize([]);
  assert.equal(e.loss, null); assert.equal(e.median, null); assert.equal(e.count, 0);
  assert.equal(S.summarize([null, null]).loss, 100);
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
