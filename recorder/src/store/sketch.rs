//! A mergeable quantile sketch with a relative error bound: a log-bucketed
//! histogram in the manner of DDSketch (Masson, Rim, Lee, VLDB 2019).
//!
//! A delay `x > 0` falls in bucket `i = ceil(log_γ x)` with
//! `γ = (1 + α) / (1 − α)` and `α` = [`RELATIVE_ERROR`] (1%); the bucket is
//! represented by `2γ^i / (γ + 1)`, which is within `α` of every value in
//! `(γ^(i−1), γ^i]`. Zero (and negative values, which delays are not) has
//! a bucket of its own. Merging adds counts, so minutes merge into hours
//! and days without losing the bound.
//!
//! **The bound.** For the quantile `q` of `n` values the sketch returns the
//! representative of the bucket holding the value of rank
//! `round(q × (n − 1))` (0-based): within 1% of that sample. The exact
//! percentile of docs/protocol.md ("Statistics") interpolates between the
//! samples of ranks `floor(q × (n − 1))` and `ceil(q × (n − 1))`; the
//! estimate lies within 1% of the interval between those two samples.
//!
//! # Encoding
//! `varint zero_count`, `varint bucket_count`, then per non-empty bucket in
//! ascending order `zigzag varint (index − previous index)` (previous
//! starts at 0) and `varint count`.

use std::collections::BTreeMap;

/// The relative error bound α.
pub const RELATIVE_ERROR: f64 = 0.01;

/// `γ = (1 + α) / (1 − α)`.
fn gamma() -> f64 {
    (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR)
}

/// A sketch of non-negative values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    zero: u64,
    buckets: BTreeMap<i32, u64>,
}

impl Sketch {
    /// An empty sketch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one value (non-finite values are ignored; values ≤ 0 count as
    /// zero).
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if x <= 0.0 {
            self.zero += 1;
            return;
        }
        *self.buckets.entry(index(x)).or_insert(0) += 1;
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Sketch) {
        self.zero += other.zero;
        for (i, c) in &other.buckets {
            *self.buckets.entry(*i).or_insert(0) += c;
        }
    }

    /// How many values it holds.
    pub fn count(&self) -> u64 {
        self.zero + self.buckets.values().sum::<u64>()
    }

    /// The estimate of quantile `q` (0 to 1); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(self.zero, self.buckets.iter().map(|(i, c)| (*i, *c)), q)
    }

    /// The sketch as bytes (see the module's "Encoding").
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.buckets.len() * 3);
        put_varint(&mut out, self.zero);
        put_varint(&mut out, self.buckets.len() as u64);
        let mut prev = 0i64;
        for (i, c) in &self.buckets {
            let i = i64::from(*i);
            put_varint(&mut out, ((i - prev) << 1 ^ ((i - prev) >> 63)) as u64);
            put_varint(&mut out, *c);
            prev = i;
        }
        out
    }

    /// The sketch [`Sketch::encode`] wrote.
    ///
    /// # Errors
    /// Not a sketch of this format.
    pub fn decode(data: &[u8]) -> Result<Self, super::block::Corrupt> {
        let mut buckets = BTreeMap::new();
        let zero = parse(data, |i, c| {
            buckets.insert(i, c);
        })?;
        Ok(Self { zero, buckets })
    }
}

/// The bucket of a value `x > 0`.
fn index(x: f64) -> i32 {
    let i = (x.ln() / gamma().ln()).ceil();
    i.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
}

/// Reads an encoded sketch: calls `bucket(index, count)` for each bucket in
/// ascending order and returns the zero count.
fn parse(data: &[u8], mut bucket: impl FnMut(i32, u64)) -> Result<u64, super::block::Corrupt> {
    let corrupt = super::block::Corrupt::new;
    let mut pos = 0;
    let mut varint = || -> Result<u64, super::block::Corrupt> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *data.get(pos).ok_or(corrupt("truncated sketch"))?;
            pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("sketch varint too long"))
    };
    let zero = varint()?;
    let len = varint()?;
    let mut prev = 0i64;
    for _ in 0..len {
        let z = varint()?;
        let d = (z >> 1) as i64 ^ -((z & 1) as i64);
        prev = prev.checked_add(d).ok_or(corrupt("sketch index"))?;
        let i = i32::try_from(prev).map_err(|_| corrupt("sketch index"))?;
        bucket(i, varint()?);
    }
    if pos != data.len() {
        return Err(corrupt("trailing bytes in sketch"));
    }
    Ok(zero)
}

/// The estimate of quantile `q` of the values counted by `zero` and
/// `buckets` (ascending `(index, count)`): the representative of the
/// bucket holding rank `round(q × (n − 1))`; `None` when empty.
fn quantile(zero: u64, buckets: impl Iterator<Item = (i32, u64)> + Clone, q: f64) -> Option<f64> {
    let n = zero + buckets.clone().map(|(_, c)| c).sum::<u64>();
    if n == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * (n - 1) as f64).round() as u64;
    if rank < zero {
        return Some(0.0);
    }
    let mut seen = zero;
    for (i, c) in buckets {
        seen += c;
        if rank < seen {
            let g = gamma();
            return Some(2.0 * g.powi(i) / (g + 1.0));
        }
    }
    None
}

/// Sums many sketches quickly: the counts of the buckets between the
/// lowest and the highest seen, in one array, so adding an encoded sketch
/// costs a pass over its bytes (no map, no allocation per sketch). What
/// statistics over thousands of minute rollups use; the result is the
/// same [`Sketch`] as merging them one by one.
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    zero: u64,
    lowest: i32,
    counts: Vec<u64>,
}

impl Accumulator {
    /// Adds count `c` to bucket `i`.
    fn bump(&mut self, i: i32, c: u64) {
        if self.counts.is_empty() {
            self.lowest = i;
        } else if i < self.lowest {
            let grow = (i64::from(self.lowest) - i64::from(i)) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.lowest = i;
        }
        let k = (i64::from(i) - i64::from(self.lowest)) as usize;
        if k >= self.counts.len() {
            self.counts.resize(k + 1, 0);
        }
        self.counts[k] += c;
    }

    /// Adds one value, as [`Sketch::add`].
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if x <= 0.0 {
            self.zero += 1;
        } else {
            self.bump(index(x), 1);
        }
    }

    /// Adds the values of an encoded sketch ([`Sketch::encode`]).
    ///
    /// # Errors
    /// Not a sketch of this format; what was read of it is added.
    pub fn add_encoded(&mut self, data: &[u8]) -> Result<(), super::block::Corrupt> {
        let zero = parse(data, |i, c| self.bump(i, c))?;
        self.zero += zero;
        Ok(())
    }

    /// The estimate of quantile `q` of everything added, as
    /// [`Sketch::quantile`] of [`Accumulator::into_sketch`] gives it,
    /// without building the sketch (statistics take three per bucket).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let lowest = i64::from(self.lowest);
        quantile(
            self.zero,
            self.counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(move |(k, c)| ((lowest + k as i64) as i32, *c)),
            q,
        )
    }

    /// The sketch of everything added.
    pub fn into_sketch(self) -> Sketch {
        let lowest = i64::from(self.lowest);
        Sketch {
            zero: self.zero,
            buckets: self
                .counts
                .into_iter()
                .enumerate()
                .filter(|(_, c)| *c > 0)
                .map(|(k, c)| ((lowest + k as i64) as i32, c))
                .collect(),
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The bound of the module documentation, on random data: the estimate
    /// lies within α of the interval between the samples of the two ranks
    /// the exact percentile interpolates between.
    #[test]
    fn quantiles_stay_within_the_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for round in 0..300 {
            let n = rng.random_range(1..2000);
            let heavy = round % 3 == 0;
            let mut values: Vec<f64> = (0..n)
                .map(|_| {
                    if rng.random_bool(0.01) {
                        0.0
                    } else if heavy {
                        rng.random::<f64>().powi(4) * 5000.0
                    } else {
                        15.0 + rng.random::<f64>() * 30.0
                    }
                })
                .collect();
            // Split in parts and merge them, as rollups do.
            let mut parts = vec![Sketch::new(); rng.random_range(1..5)];
            for v in &values {
                let k = rng.random_range(0..parts.len());
                parts[k].add(*v);
            }
            let mut sketch = Sketch::new();
            for p in &parts {
                sketch.merge(&Sketch::decode(&p.encode()).unwrap());
            }
            assert_eq!(sketch.count(), n as u64);
            values.sort_by(f64::total_cmp);
            for q in [0.0, 0.5, 0.95, 0.99, 1.0] {
                let h = q * (n - 1) as f64;
                let (lo, hi) = (values[h.floor() as usize], values[h.ceil() as usize]);
                let est = sketch.quantile(q).unwrap();
                assert!(
                    est >= lo * (1.0 - RELATIVE_ERROR) - 1e-12
                        && est <= hi * (1.0 + RELATIVE_ERROR) + 1e-12,
                    "q {q}: {est} outside [{lo}, {hi}] ± 1%"
                );
            }
        }
    }

    #[test]
    fn the_accumulator_sums_as_merging_does() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut merged = Sketch::new();
        let mut acc = Accumulator::default();
        for _ in 0..50 {
            let mut one = Sketch::new();
            for _ in 0..rng.random_range(0..40) {
                let x = match rng.random_range(0..10) {
                    0 => 0.0,
                    1 => rng.random_range(0.0001..0.01),
                    _ => rng.random_range(1.0..5000.0),
                };
                one.add(x);
                if rng.random_bool(0.1) {
                    merged.add(x);
                    acc.add(x);
                }
            }
            merged.merge(&one);
            acc.add_encoded(&one.encode()).unwrap();
        }
        for q in [0.0, 0.01, 0.5, 0.95, 0.99, 1.0] {
            assert_eq!(acc.quantile(q), merged.quantile(q), "q {q}");
        }
        assert_eq!(acc.into_sketch(), merged);
        assert_eq!(Accumulator::default().quantile(0.5), None);
        assert!(Accumulator::default().add_encoded(&[1, 5]).is_err());
    }

    #[test]
    fn empty_zero_and_corrupt_sketches() {
        assert_eq!(Sketch::new().quantile(0.5), None);
        let mut s = Sketch::new();
        s.add(0.0);
        s.add(f64::NAN);
        assert_eq!((s.count(), s.quantile(1.0)), (1, Some(0.0)));
        assert_eq!(Sketch::decode(&s.encode()).unwrap(), s);
        assert!(Sketch::decode(&[]).is_err());
        assert!(Sketch::decode(&[0, 1]).is_err());
        let mut long = s.encode();
        long.push(0);
        assert!(Sketch::decode(&long).is_err());
    }
}
