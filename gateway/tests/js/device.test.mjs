// Unit tests of the pages' browser identity and history summary (device.js).
// Run: node --test gateway/tests/js/
import test from "node:test";
import assert from "node:assert/strict";
import * as D from "../../assets/device.js";

/** A localStorage stand-in: a Map behind the Storage methods the module uses. */
function memoryStorage() {
  const m = new Map();
  return {
    getItem: (k) => (m.has(k) ? m.get(k) : null),
    setItem: (k, v) => m.set(k, String(v)),
    removeItem: (k) => m.delete(k),
    map: m,
  };
}

test("new secrets are 43 base64url characters, each one different", () => {
  const seen = new Set();
  for (let i = 0; i < 200; i += 1) {
    const s = D.newSecret();
    assert.match(s, /^[A-Za-z0-9_-]{43}$/);
    assert.ok(D.validSecret(s));
    seen.add(s);
  }
  assert.equal(seen.size, 200);
  assert.equal(D.base64url(Uint8Array.from([0xfb, 0xff, 0xfe])), "-__-");
  assert.equal(D.base64url(Uint8Array.from([1])), "AQ");
});

test("validSecret follows the server's rule (22 to 128 base64url characters)", () => {
  assert.ok(D.validSecret("a".repeat(22)));
  assert.ok(D.validSecret("A-_z".repeat(32)));
  for (const bad of [null, undefined, 42, "", "a".repeat(21), "a".repeat(129), `${"a".repeat(30)}=`, `${"a".repeat(30)}+`]) {
    assert.equal(D.validSecret(bad), false, String(bad));
  }
});

test("the identity is kept in storage, reused, and renewed when forgotten", () => {
  const storage = memoryStorage();
  const a = new D.DeviceIdentity(storage);
  const s = a.get();
  assert.equal(a.fresh, true);
  assert.equal(storage.map.get(D.DEVICE_KEY), s);
  assert.equal(a.get(), s, "stable within the page");
  const reloaded = new D.DeviceIdentity(storage);
  assert.equal(reloaded.get(), s, "the same after a reload");
  assert.equal(reloaded.fresh, false);
  const t = reloaded.renew();
  assert.notEqual(t, s);
  assert.equal(storage.map.get(D.DEVICE_KEY), t);
  // A malformed stored value is replaced.
  storage.setItem(D.DEVICE_KEY, "tampered!");
  const u = new D.DeviceIdentity(storage).get();
  assert.ok(D.validSecret(u));
  assert.equal(storage.map.get(D.DEVICE_KEY), u);
  // Without storage: a secret for the page's life.
  const broken = {
    getItem() {
      throw new Error("denied");
    },
    setItem() {
      throw new Error("denied");
    },
    removeItem() {
      throw new Error("denied");
    },
  };
  const none = new D.DeviceIdentity(broken);
  assert.ok(D.validSecret(none.get()));
  assert.equal(none.get(), none.get());
});

test("buckets become points, oldest first, malformed ones dropped", () => {
  const body = {
    window_ms: 3600000,
    bucket_ms: 60000,
    buckets: [
      { start: "2026-11-30T10:01:00.000000Z", count: 2, min: 1, mean: 2, p50: 2, p95: 3, p99: 3, max: 3, jitter: 2 },
      { start: "2026-11-30T10:00:00.000000Z", count: 1, min: 5, mean: 5, p50: 5, p95: 5, p99: 5, max: 5, jitter: null },
      { start: "nope", count: 1, p50: 1 },
      { count: 1, p50: 1 },
      null,
    ],
  };
  const p = D.bucketPoints(body);
  assert.deepEqual(
    p.map((x) => [x.t, x.count, x.p50, x.jitter]),
    [
      [Date.parse("2026-11-30T10:00:00Z"), 1, 5, null],
      [Date.parse("2026-11-30T10:01:00Z"), 2, 2, 2],
    ],
  );
  assert.deepEqual(D.bucketPoints({}), []);
  assert.deepEqual(D.bucketPoints(null), []);
});

test("the summary: exact count, mean, min and max; weighted p50, p99 and jitter", () => {
  const empty = D.summarizeBuckets([]);
  assert.deepEqual(empty, { count: 0, mean: null, p50: null, p99: null, min: null, max: null, jitter: null });
  const s = D.summarizeBuckets([
    { count: 3, min: 1, mean: 2, p50: 2, p99: 3, max: 3, jitter: 1 },
    { count: 1, min: 10, mean: 10, p50: 10, p99: 10, max: 10, jitter: null },
    { count: 6, min: 4, mean: 5, p50: 5, p99: 9, max: 9, jitter: 2 },
  ]);
  assert.equal(s.count, 10);
  assert.equal(s.mean, (3 * 2 + 10 + 6 * 5) / 10);
  assert.equal(s.min, 1);
  assert.equal(s.max, 10);
  // p50 values 2 (x3), 5 (x6), 10 (x1): the 5th of 10 is 5.
  assert.equal(s.p50, 5);
  // p99 values 3 (x3), 9 (x6), 10 (x1): rank 9.9 is 10.
  assert.equal(s.p99, 10);
  // Jitter weighted by each bucket's pairs: (1*2 + 2*5) / 7.
  assert.equal(s.jitter, (1 * 2 + 2 * 5) / 7);
});
