//! Per-connection budgets (docs/protocol.md, "Limits"): token buckets over
//! every frame the client sends (control frames included), its bytes, and
//! its renames.

use std::time::Instant;

/// A token bucket: holds at most `burst` tokens, refills at `rate` tokens
/// a second, and each admitted event takes its cost. A client may send a
/// burst at once and then keep up the rate for ever, but never more: unlike
/// a fixed window, no pair of windows lets twice the limit through at their
/// edge.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate` a second.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Whether the bucket would be full at `at` (nothing taken lately).
    pub fn is_full(&self, at: Instant) -> bool {
        let elapsed = self
            .last
            .map_or(0.0, |last| at.saturating_duration_since(last).as_secs_f64());
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes `cost` tokens at `at`; false (and nothing taken) when there
    /// are not enough.
    pub fn admit(&mut self, at: Instant, cost: f64) -> bool {
        if let Some(last) = self.last {
            let refill = at.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(self.last.map_or(at, |last| last.max(at)));
        if self.tokens < cost {
            return false;
        }
        self.tokens -= cost;
        true
    }
}

/// What a connection may send: messages and bytes, each a token bucket.
#[derive(Debug)]
pub struct Budget {
    messages: TokenBucket,
    bytes: TokenBucket,
}

impl Budget {
    /// `messages` frames a second sustained with a burst of as many, and
    /// `bytes` bytes a second with a burst of as many (at least one frame
    /// of `max_frame` bytes).
    pub fn new(messages: u32, bytes: u32, max_frame: u32) -> Self {
        let (m, b) = (f64::from(messages), f64::from(bytes));
        Self {
            messages: TokenBucket::new(m, m),
            bytes: TokenBucket::new(b, b.max(f64::from(max_frame))),
        }
    }

    /// Counts one frame of `len` bytes received at `at`; false when it is
    /// over either budget.
    pub fn admit(&mut self, at: Instant, len: usize) -> bool {
        // Both are taken only if both have room: the order matters not.
        self.messages.admit(at, 1.0) && self.bytes.admit(at, len as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_and_no_more() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut b = TokenBucket::new(10.0, 5.0);
        for i in 0..5 {
            assert!(b.admit(t0, 1.0), "burst {i}");
        }
        assert!(!b.admit(t0, 1.0), "the burst is spent");
        assert!(!b.admit(ms(50), 1.0), "half a token back");
        assert!(b.admit(ms(100), 1.0), "one token a tenth of a second");
        // Sustained: one every 100 ms for a while, never two.
        for i in 2..50 {
            assert!(b.admit(ms(i * 100), 1.0), "tick {i}");
            assert!(!b.admit(ms(i * 100), 1.0), "tick {i} twice");
        }
        // A long pause refills to the burst, not beyond.
        let later = ms(60_000);
        for _ in 0..5 {
            assert!(b.admit(later, 1.0));
        }
        assert!(!b.admit(later, 1.0));
    }

    #[test]
    fn bytes_count_as_well_as_messages() {
        let t0 = Instant::now();
        let mut b = Budget::new(100, 1000, 400);
        assert!(b.admit(t0, 400));
        assert!(b.admit(t0, 400));
        assert!(!b.admit(t0, 400), "1,200 bytes at once");
        let mut small = Budget::new(100, 100, 400);
        assert!(small.admit(t0, 400), "the burst holds one largest frame");
        assert!(!small.admit(t0, 1));
    }
}
