//! Rolling delay statistics of one client: last, median and jitter over a
//! window of recent samples. The gateway keeps one per connection; the
//! numbers travel in presence reports and reach every public page.
//!
//! Also the one definition of a percentile for every Rust surface
//! ([`percentile_sorted`]: linear interpolation between closest ranks, the
//! definition docs/protocol.md "Statistics" names), the same as the pages'
//! `quantileSorted` in `gateway/assets/stats.js` and Postgres'
//! `percentile_cont`. The unit tests below and the pages' tests
//! (`gateway/tests/js`) check both against the same fixed vectors,
//! `gateway/tests/js/stats_vectors.json`.

use std::collections::VecDeque;

/// How many recent samples the median and jitter are computed over.
pub const WINDOW: usize = 32;

/// The statistics of one client's recent samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DelayStats {
    /// The latest sample.
    pub delay_time: f64,
    /// Median of the window.
    pub median: f64,
    /// Mean absolute difference of consecutive samples in the window.
    pub jitter: f64,
}

/// A bounded window of recent samples.
#[derive(Debug, Default, Clone)]
pub struct RollingStats {
    window: VecDeque<f64>,
}

impl RollingStats {
    /// Adds a sample and returns the statistics including it.
    pub fn push(&mut self, delay_ms: f64) -> DelayStats {
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(delay_ms);
        DelayStats {
            delay_time: delay_ms,
            median: median(self.window.iter().copied()),
            jitter: jitter(self.window.iter().copied()),
        }
    }
}

/// The median of the values: [`percentile_sorted`] at 50, which is the
/// middle value for an odd count and the mean of the middle two for an even
/// one; 0 for none.
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, 50.0).unwrap_or(0.0)
}

/// Mean absolute difference of consecutive values; 0 for fewer than two.
pub fn jitter(values: impl Iterator<Item = f64>) -> f64 {
    let mut prev: Option<f64> = None;
    let (mut sum, mut n) = (0.0, 0u32);
    for x in values {
        if let Some(p) = prev {
            sum += (x - p).abs();
            n += 1;
        }
        prev = Some(x);
    }
    if n == 0 { 0.0 } else { sum / f64::from(n) }
}

/// The percentile `p` (0..=100, clamped) of values sorted ascending, by
/// linear interpolation between the closest ranks: with `h = (n - 1) *
/// p / 100`, the value at index `floor(h)` plus the fraction of `h` times
/// the step to the next one ("R-7", numpy's default, Postgres'
/// `percentile_cont`). `None` for no values.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let h = last as f64 * (p / 100.0).clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(last);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_jitter() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(jitter([10.0, 12.0, 9.0].into_iter()), 2.5);
        assert_eq!(jitter([10.0].into_iter()), 0.0);
    }

    #[test]
    fn rolling_window_forgets_old_samples() {
        let mut r = RollingStats::default();
        for _ in 0..WINDOW {
            r.push(1000.0);
        }
        let mut s = r.push(1.0);
        for _ in 0..WINDOW {
            s = r.push(1.0);
        }
        assert_eq!(s.median, 1.0);
        assert_eq!(s.jitter, 0.0);
        assert_eq!(s.delay_time, 1.0);
    }

    /// The vectors the pages' tests check too (`gateway/tests/js`).
    const VECTORS: &str = include_str!("../../gateway/tests/js/stats_vectors.json");

    /// `expected` within a relative 1e-12 of `got` (`null` for `None`).
    fn close(got: Option<f64>, expected: &serde_json::Value) -> bool {
        match (got, expected.as_f64()) {
            (None, None) => expected.is_null(),
            (Some(g), Some(e)) => (g - e).abs() <= 1e-12 * e.abs().max(1.0),
            _ => false,
        }
    }

    #[test]
    fn percentiles_match_the_shared_vectors() {
        let doc: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let cases = doc["percentiles"].as_array().unwrap();
        assert!(cases.len() >= 5, "the vectors file lost its cases");
        for case in cases {
            let mut values: Vec<f64> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            values.sort_by(f64::total_cmp);
            for (p, expected) in case["expected"].as_object().unwrap() {
                let got = percentile_sorted(&values, p.parse().unwrap());
                assert!(
                    close(got, expected),
                    "{}: p{p} = {got:?}, expected {expected}",
                    case["name"]
                );
            }
            let median_expected = &case["expected"]["50"];
            if !values.is_empty() {
                let got = median(values.iter().copied());
                assert!(
                    close(Some(got), median_expected),
                    "{}: median {got}",
                    case["name"]
                );
            }
        }
    }

    #[test]
    fn jitter_matches_the_shared_vectors() {
        let doc: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        for case in doc["jitter"].as_array().unwrap() {
            let values: Vec<f64> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            // Rust says 0 where the page shows no number.
            let got = Some(jitter(values.iter().copied())).filter(|_| values.len() >= 2);
            assert!(
                close(got, &case["expected"]),
                "{}: jitter {got:?}, expected {}",
                case["name"],
                case["expected"]
            );
        }
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&v, 50.0), Some(50.5));
        assert_eq!(percentile_sorted(&v, 0.0), Some(1.0));
        assert_eq!(percentile_sorted(&v, 100.0), Some(100.0));
        assert_eq!(percentile_sorted(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile_sorted(&[], 50.0), None);
    }
}
