//! The packed form of a client's samples: one row per client and time block
//! holding its samples delta-encoded in a `bytea` / `BLOB`
//! (docs/architecture.md, "Sample storage").
//!
//! # Format (version 1)
//! ```text
//! byte 0      version, 1
//! byte 1      flags: bit 0 set = delays are whole thousandths of a ms
//! varint      number of samples
//! per sample, in (at_us, n) order, each value a LEB128 varint:
//!   zigzag(at_us - previous at_us)            (previous starts at 0)
//!   zigzag(n - previous n - 1)                 (previous starts at -1)
//!   seq: 0 when absent, else zigzag(seq - previous seq - 1) + 1
//!                                              (previous starts at -1)
//!   delay: zigzag(q - previous q) with q = delay × 1000 (previous 0)
//!          when bit 0 is set, else the f64's 8 bytes, little-endian
//! ```
//! Differences wrap around in 64 bits, so every value round-trips. The
//! pages report delays rounded to thousandths of a millisecond
//! (`gateway/assets/connection.js`), which then take 2–3 bytes instead of
//! 8; a block with any other delay keeps all its delays' exact bits. A
//! sample once a second costs about 7 bytes.
//!
//! Samples are identified by the gateway's counter `n` (with the client):
//! [`merge`] keeps one sample per `n`, which makes packing and late
//! redeliveries idempotent.

use std::collections::BTreeMap;

/// Width of a block: 10 minutes of one client's samples (600 samples at
/// one a second, ~4 KB packed).
pub const BLOCK_US: i64 = 600_000_000;

/// The format version this module writes and reads.
const VERSION: u8 = 1;
/// Flag: delays are encoded as whole thousandths.
const THOUSANDTHS: u8 = 1;

/// One sample as the store keeps it (`n` and `seq` as stored bigints,
/// the stored bits of the wire's `u64`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When the gateway accepted it, Unix µs.
    pub at_us: i64,
    /// The gateway's counter of the client's samples.
    pub n: i64,
    /// The client's ping number.
    pub seq: Option<i64>,
    /// Milliseconds.
    pub delay_ms: f64,
}

impl Sample {
    /// The read order: time, then counter.
    fn key(&self) -> (i64, i64) {
        (self.at_us, self.n)
    }
}

/// The start of the block holding `at_us` (for the first, partial block
/// of the `i64` range: `i64::MIN`).
pub fn block_of(at_us: i64) -> i64 {
    at_us.saturating_sub(at_us.rem_euclid(BLOCK_US))
}

/// A block that does not decode: the database holds bytes this version did
/// not write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt sample block: {0}")]
pub struct Corrupt(&'static str);

impl Corrupt {
    /// Bytes that do not decode, and what is wrong with them.
    pub(crate) fn new(why: &'static str) -> Self {
        Self(why)
    }
}

/// Packs `samples`, which must be sorted by `(at_us, n)` (as [`merge`]
/// returns them).
pub fn encode(samples: &[Sample]) -> Vec<u8> {
    let thousandths = samples.iter().all(|s| thousandths_of(s.delay_ms).is_some());
    let mut out = Vec::with_capacity(8 + samples.len() * 8);
    out.push(VERSION);
    out.push(if thousandths { THOUSANDTHS } else { 0 });
    put_varint(&mut out, samples.len() as u128);
    let (mut at, mut n, mut seq, mut q) = (0i64, -1i64, -1i64, 0i64);
    for s in samples {
        put_varint(&mut out, zigzag(s.at_us.wrapping_sub(at)));
        put_varint(&mut out, zigzag(s.n.wrapping_sub(n).wrapping_sub(1)));
        match s.seq {
            None => put_varint(&mut out, 0),
            Some(v) => {
                put_varint(&mut out, zigzag(v.wrapping_sub(seq).wrapping_sub(1)) + 1);
                seq = v;
            }
        }
        if thousandths {
            let v = thousandths_of(s.delay_ms).unwrap_or_default();
            put_varint(&mut out, zigzag(v.wrapping_sub(q)));
            q = v;
        } else {
            out.extend_from_slice(&s.delay_ms.to_le_bytes());
        }
        (at, n) = (s.at_us, s.n);
    }
    out
}

/// Unpacks a block written by [`encode`], in `(at_us, n)` order.
///
/// # Errors
/// The bytes are not a block of this format.
pub fn decode(data: &[u8]) -> Result<Vec<Sample>, Corrupt> {
    let mut r = Reader { data, pos: 0 };
    if r.byte()? != VERSION {
        return Err(Corrupt("unknown version"));
    }
    let thousandths = r.byte()? & THOUSANDTHS != 0;
    let count = usize::try_from(r.varint()?).map_err(|_| Corrupt("count"))?;
    // Every sample takes at least 4 bytes: a bad count cannot allocate much.
    let mut samples = Vec::with_capacity(count.min(data.len() / 4));
    let (mut at, mut n, mut seq, mut q) = (0i64, -1i64, -1i64, 0i64);
    for _ in 0..count {
        at = at.wrapping_add(unzigzag(r.varint()?));
        n = n.wrapping_add(1).wrapping_add(unzigzag(r.varint()?));
        let s = match r.varint()? {
            0 => None,
            code => {
                seq = seq.wrapping_add(1).wrapping_add(unzigzag(code - 1));
                Some(seq)
            }
        };
        let delay_ms = if thousandths {
            q = q.wrapping_add(unzigzag(r.varint()?));
            q as f64 / 1000.0
        } else {
            let bytes = r.take(8)?;
            f64::from_le_bytes(bytes.try_into().map_err(|_| Corrupt("delay"))?)
        };
        samples.push(Sample {
            at_us: at,
            n,
            seq: s,
            delay_ms,
        });
    }
    if r.pos != data.len() {
        return Err(Corrupt("trailing bytes"));
    }
    Ok(samples)
}

/// `stored` (a decoded block, or nothing) with `incoming` added, one
/// sample per `n` (a stored sample wins), sorted by `(at_us, n)`; and the
/// samples of `incoming` that were new.
pub fn merge(stored: Vec<Sample>, incoming: &[Sample]) -> (Vec<Sample>, Vec<Sample>) {
    let mut by_n: BTreeMap<i64, Sample> = stored.into_iter().map(|s| (s.n, s)).collect();
    let mut added = Vec::new();
    for s in incoming {
        if let std::collections::btree_map::Entry::Vacant(e) = by_n.entry(s.n) {
            e.insert(*s);
            added.push(*s);
        }
    }
    let mut all: Vec<Sample> = by_n.into_values().collect();
    all.sort_by_key(Sample::key);
    (all, added)
}

/// `delay_ms` as whole thousandths, if that representation is exact.
fn thousandths_of(delay_ms: f64) -> Option<i64> {
    let scaled = (delay_ms * 1000.0).round();
    if !scaled.is_finite() || scaled.abs() > 9.0e15 {
        return None;
    }
    let q = scaled as i64;
    ((q as f64 / 1000.0).to_bits() == delay_ms.to_bits()).then_some(q)
}

fn zigzag(v: i64) -> u128 {
    u128::from(((v << 1) ^ (v >> 63)) as u64)
}

fn unzigzag(v: u128) -> i64 {
    let v = v as u64;
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, Corrupt> {
        let b = *self.data.get(self.pos).ok_or(Corrupt("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, len: usize) -> Result<&[u8], Corrupt> {
        let end = self.pos.checked_add(len).ok_or(Corrupt("truncated"))?;
        let bytes = self.data.get(self.pos..end).ok_or(Corrupt("truncated"))?;
        self.pos = end;
        Ok(bytes)
    }

    fn varint(&mut self) -> Result<u128, Corrupt> {
        let mut v = 0u128;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            v |= u128::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Corrupt("varint too long"))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn sample(at_us: i64, n: i64, seq: Option<i64>, delay_ms: f64) -> Sample {
        Sample {
            at_us,
            n,
            seq,
            delay_ms,
        }
    }

    fn sorted(mut v: Vec<Sample>) -> Vec<Sample> {
        v.sort_by_key(Sample::key);
        v
    }

    fn assert_round_trip(samples: &[Sample]) {
        let back = decode(&encode(samples)).expect("decodes");
        assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            assert_eq!((a.at_us, a.n, a.seq), (b.at_us, b.n, b.seq));
            assert_eq!(a.delay_ms.to_bits(), b.delay_ms.to_bits(), "{a:?} {b:?}");
        }
    }

    #[test]
    fn extreme_values_round_trip() {
        assert_round_trip(&[]);
        assert_round_trip(&sorted(vec![
            sample(i64::MIN, i64::MIN, Some(i64::MAX), f64::MAX),
            sample(-1, -1, None, -0.0),
            sample(0, i64::MAX, Some(i64::MIN), f64::NAN),
            sample(i64::MAX, 0, Some(-1), f64::INFINITY),
            sample(i64::MAX, 1, Some(0), 1e-300),
        ]));
        assert_round_trip(&[sample(5, 1, Some(1), 12.345), sample(6, 2, None, -0.0)]);
    }

    #[test]
    fn random_blocks_round_trip() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..500 {
            let len = rng.random_range(0..300);
            let thousandths = rng.random_bool(0.5);
            let mut at = rng.random_range(-1_000_000_000_000i64..4_000_000_000_000_000);
            let mut n = rng.random::<i64>();
            let samples: Vec<Sample> = (0..len)
                .map(|_| {
                    at = at.wrapping_add(rng.random_range(0..3_000_000));
                    n = n.wrapping_add(rng.random_range(-2..5));
                    let seq = rng
                        .random_bool(0.9)
                        .then(|| rng.random::<i64>() >> rng.random_range(0..64));
                    let delay = if thousandths {
                        f64::from(rng.random_range(0..2_000_000u32)) / 1000.0
                    } else {
                        f64::from_bits(rng.random())
                    };
                    sample(at, n, seq, delay)
                })
                .collect();
            assert_round_trip(&sorted(samples));
        }
    }

    #[test]
    fn page_delays_take_a_few_bytes() {
        // One sample a second for a block, delays as the pages send them.
        let samples: Vec<Sample> = (0..600)
            .map(|i| {
                let delay = f64::from(20_000 + (i * 7919) % 3000) / 1000.0;
                sample(
                    1_700_000_000_000_000 + i64::from(i) * 1_000_000 + i64::from(i % 7),
                    i64::from(i),
                    Some(i64::from(i) + 3),
                    delay,
                )
            })
            .collect();
        let bytes = encode(&samples).len();
        assert!(bytes <= 600 * 8, "{bytes} bytes");
        assert_round_trip(&samples);
        let mut raw = samples.clone();
        raw[17].delay_ms = 0.1 + 0.2;
        assert!(encode(&raw).len() > bytes, "one inexact delay: raw f64s");
        assert_round_trip(&raw);
    }

    #[test]
    fn merge_keeps_one_sample_per_n() {
        let stored = vec![sample(10, 1, None, 1.0), sample(20, 2, None, 2.0)];
        let incoming = [
            sample(15, 5, None, 5.0),
            sample(20, 2, None, 9.0),
            sample(15, 5, None, 7.0),
        ];
        let (all, added) = merge(stored, &incoming);
        assert_eq!(added, [sample(15, 5, None, 5.0)]);
        assert_eq!(
            all.iter()
                .map(|s| (s.at_us, s.n, s.delay_ms))
                .collect::<Vec<_>>(),
            [(10, 1, 1.0), (15, 5, 5.0), (20, 2, 2.0)]
        );
    }

    #[test]
    fn corrupt_blocks_are_refused() {
        let good = encode(&[sample(1, 1, Some(1), 1.5)]);
        assert!(decode(&[]).is_err());
        assert!(decode(&[2, 0, 0]).is_err());
        assert!(decode(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long).is_err());
        assert!(
            decode(&[
                1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f
            ])
            .is_err()
        );
    }

    #[test]
    fn blocks_align() {
        assert_eq!(block_of(0), 0);
        assert_eq!(block_of(BLOCK_US - 1), 0);
        assert_eq!(block_of(BLOCK_US), BLOCK_US);
        assert_eq!(block_of(-1), -BLOCK_US);
        assert_eq!(block_of(i64::MIN), i64::MIN);
    }
}
