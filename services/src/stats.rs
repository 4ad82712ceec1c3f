//! Rolling delay statistics of one client: last, median and jitter over a
//! window of recent samples. The gateway keeps one per connection; the
//! numbers travel in presence reports and reach every public page.

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

/// The median of the values (the mean of the middle two for an even count);
/// 0 for none.
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
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

/// The nearest-rank percentile `p` (0..=100) of sorted values; `None` for none.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
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

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&v, 50.0), Some(50.0));
        assert_eq!(percentile_sorted(&v, 99.0), Some(99.0));
        assert_eq!(percentile_sorted(&v, 100.0), Some(100.0));
        assert_eq!(percentile_sorted(&v, 0.0), Some(1.0));
        assert_eq!(percentile_sorted(&[], 50.0), None);
    }
}
