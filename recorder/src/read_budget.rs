//! How long the read running in a task may take, and whether anybody
//! still waits for it (docs/architecture.md, "Bounds").
//!
//! A query carries its asker's deadline (`deadline_unix_ms`); the
//! responder runs the store's read inside [`ReadBudget::run`], and the
//! stores cut the read off at the earlier of that deadline and their own
//! read timeout: Postgres by `SET LOCAL statement_timeout` in the read
//! transaction, SQLite by its progress handler, which also stops when the
//! budget's [`CancellationToken`] is cancelled (the responder cancels it
//! when the asker leaves, or when the answer is dropped). The budget is a
//! task-local, so the [`crate::store::Store`] methods keep their
//! signatures and every read a responder runs gets it.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

tokio::task_local! {
    static BUDGET: ReadBudget;
}

/// The deadline and cancellation of one read.
#[derive(Debug, Clone, Default)]
pub struct ReadBudget {
    /// When the asker stops waiting; `None`: only the read timeout.
    pub deadline: Option<Instant>,
    /// Cancelled once nobody waits for the answer.
    pub cancel: CancellationToken,
}

impl ReadBudget {
    /// The budget of a query that carries `deadline_unix_ms` (the
    /// asker's clock, Unix ms), as a deadline on this process's monotonic
    /// clock.
    pub fn until_unix_ms(deadline_unix_ms: Option<i64>) -> Self {
        let deadline = deadline_unix_ms.map(|at| {
            let left = at.saturating_sub(services::unix_ms());
            Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0))
        });
        Self {
            deadline,
            cancel: CancellationToken::new(),
        }
    }

    /// Whether nobody waits any more: the deadline has passed or the
    /// budget was cancelled.
    pub fn is_spent(&self) -> bool {
        self.cancel.is_cancelled() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Runs `read` with this budget: the stores' reads inside it stop at
    /// the deadline or on cancellation.
    pub async fn run<F: Future>(self, read: F) -> F::Output {
        BUDGET.scope(self, read).await
    }
}

/// How long the read running in this task may still take, at most
/// `timeout` (the store's read timeout); `timeout` outside a budget.
pub(crate) fn time_left(timeout: Duration) -> Duration {
    BUDGET
        .try_with(|b| {
            b.deadline.map_or(timeout, |d| {
                timeout.min(d.saturating_duration_since(Instant::now()))
            })
        })
        .unwrap_or(timeout)
}

/// The cancellation of the read running in this task, if it has a budget.
pub(crate) fn cancellation() -> Option<CancellationToken> {
    BUDGET.try_with(|b| b.cancel.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_earlier_of_deadline_and_timeout() {
        let timeout = Duration::from_secs(5);
        assert_eq!(time_left(timeout), timeout, "no budget: the timeout");
        let far = ReadBudget::until_unix_ms(Some(services::unix_ms() + 3_600_000));
        assert_eq!(far.run(async { time_left(timeout) }).await, timeout);
        let near = ReadBudget::until_unix_ms(Some(services::unix_ms() + 1_000));
        let left = near.run(async { time_left(timeout) }).await;
        assert!(left <= Duration::from_secs(1) && left > Duration::ZERO);
        let past = ReadBudget::until_unix_ms(Some(services::unix_ms() - 1_000));
        assert!(past.is_spent());
        assert_eq!(past.run(async { time_left(timeout) }).await, Duration::ZERO);
        let none = ReadBudget::until_unix_ms(None);
        assert!(!none.is_spent());
        none.cancel.cancel();
        assert!(none.is_spent());
    }
}
