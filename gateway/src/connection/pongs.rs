//! Sample integrity (docs/security.md, "Samples"): a `delay_time` is
//! recorded only against a pong this connection sent and no sample used
//! yet, and only when the claimed delay fits in the time the server saw
//! pass since that pong's ping arrived, plus a margin
//! (`--max-delay-excess-ms`). The two spans differ by one-way times: the
//! client's starts before its ping left, the server's ends after the sample
//! travelled, so a ping slowed on its way up makes an honest claim exceed
//! the server's span by up to that slowdown.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most pongs remembered while no sample uses them; older ones are
/// forgotten (the pages have one ping in flight).
pub const MAX_UNUSED_PONGS: usize = 8;

/// Why a sample was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No unused pong matches it (no ping, a `seq` never pinged or
    /// already used, or a v2 sample without `seq`).
    NoPong,
    /// The claimed delay is longer than the time since its ping arrived
    /// plus the margin.
    Implausible,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoPong => "no_pong",
            Refusal::Implausible => "implausible",
        }
    }
}

/// The pongs a connection sent that no sample used yet.
#[derive(Debug, Default)]
pub struct Pongs {
    /// Each pong's `seq` (as the ping carried it) and when its ping
    /// arrived, oldest first.
    unused: VecDeque<(Option<u64>, Instant)>,
}

impl Pongs {
    /// Notes a pong sent for a ping with `seq` that arrived at `received`.
    pub fn sent(&mut self, seq: Option<u64>, received: Instant) {
        if self.unused.len() == MAX_UNUSED_PONGS {
            self.unused.pop_front();
        }
        self.unused.push_back((seq, received));
    }

    /// Uses the pong a sample of `delay_ms` for `seq`, arriving at `now`,
    /// refers to. v2 (`by_seq_only`): the unused pong with that `seq`. v1:
    /// that one if there is one, else the oldest unused pong (the original
    /// pages send no `seq`). A matched pong is used up even when the
    /// sample is implausible (longer than the time since its ping arrived
    /// plus `margin`).
    pub fn take(
        &mut self,
        seq: Option<u64>,
        by_seq_only: bool,
        delay_ms: f64,
        now: Instant,
        margin: Duration,
    ) -> Result<(), Refusal> {
        let at = match seq.and_then(|s| self.unused.iter().position(|(q, _)| *q == Some(s))) {
            Some(i) => i,
            None if by_seq_only || self.unused.is_empty() => return Err(Refusal::NoPong),
            None => 0,
        };
        let (_, received) = self.unused.remove(at).expect("index in range");
        let measured = now.saturating_duration_since(received) + margin;
        if delay_ms > measured.as_secs_f64() * 1000.0 {
            return Err(Refusal::Implausible);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: Duration = Duration::from_millis(500);

    #[test]
    fn one_sample_per_pong_within_the_time_that_passed() {
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        let mut p = Pongs::default();
        assert_eq!(p.take(Some(1), true, 5.0, t0, M), Err(Refusal::NoPong));
        p.sent(Some(1), t0);
        assert_eq!(
            p.take(Some(2), true, 5.0, later(10), M),
            Err(Refusal::NoPong)
        );
        assert_eq!(p.take(None, true, 5.0, later(10), M), Err(Refusal::NoPong));
        assert_eq!(p.take(Some(1), true, 5.0, later(10), M), Ok(()));
        assert_eq!(
            p.take(Some(1), true, 5.0, later(10), M),
            Err(Refusal::NoPong),
            "used"
        );

        p.sent(Some(2), t0);
        assert_eq!(
            p.take(Some(2), true, 60_000.0, later(20), M),
            Err(Refusal::Implausible)
        );
        assert_eq!(
            p.take(Some(2), true, 1.0, later(20), M),
            Err(Refusal::NoPong),
            "used up"
        );
        p.sent(Some(3), t0);
        assert_eq!(
            p.take(Some(3), true, 1499.0, later(1000), M),
            Ok(()),
            "margin"
        );

        // v1: by order, at most one per pong.
        p.sent(None, t0);
        p.sent(None, t0);
        assert_eq!(p.take(None, false, 5.0, later(5), M), Ok(()));
        assert_eq!(p.take(Some(9), false, 5.0, later(5), M), Ok(()));
        assert_eq!(p.take(None, false, 5.0, later(5), M), Err(Refusal::NoPong));

        for s in 0..20 {
            p.sent(Some(s), t0);
        }
        assert_eq!(
            p.take(Some(0), true, 1.0, later(5), M),
            Err(Refusal::NoPong),
            "forgotten"
        );
        assert_eq!(p.take(Some(19), true, 1.0, later(5), M), Ok(()));
    }
}
