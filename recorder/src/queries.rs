//! The query responders: history ([`SamplesQuery`]), statistics
//! ([`StatsQuery`]), a browser's own history ([`DeviceHistoryQuery`]) and
//! forgetting a browser ([`ForgetDeviceQuery`]) over the bus, answered by
//! whichever replica of the queue group gets them, all under one read
//! budget. Bad input is answered with the `Error`
//! variant, never a panic; a request without a reply subject is ignored.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use services::bus::{BusError, Inbox, Incoming, Payload, SharedBus};
use services::limits::{BadRequest, check_device_history, check_stats, default_device_bucket};
use services::messages::{
    DeviceHistoryQuery, DeviceHistoryReply, ForgetDeviceQuery, ForgetDeviceReply, ReplyErrorKind,
    SamplesQuery, SamplesReply, StatsQuery, StatsReply,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::DbHealth;
use crate::metrics::Metrics;
use crate::read_budget::ReadBudget;
use crate::store::{Store, StoreError};

/// How long a caller refused as busy should wait before asking again.
pub const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the responders share.
#[derive(Clone)]
pub(crate) struct Responder {
    pub bus: SharedBus,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<DbHealth>,
    /// The read budget, shared by every query kind (`--read-concurrency`):
    /// a query beyond it is answered `Busy` at once, without touching the
    /// database, so reads can never queue up in front of ingestion or the
    /// health check.
    pub reads: Arc<Semaphore>,
}

/// A query the recorder answers: its reply type, its metrics label, and
/// how it is answered.
pub(crate) trait Query: Payload + Sync {
    /// What answers it.
    type Reply: Payload + Sync;
    /// The `kind` label of its metrics and spans.
    const KIND: &'static str;
    /// The answer to `query` (or to a request that did not decode) and its
    /// outcome label.
    fn answer(
        r: &Responder,
        query: &Result<Self, BusError>,
    ) -> impl Future<Output = (Self::Reply, &'static str)> + Send;
    /// The answer beyond the read budget.
    fn busy() -> Self::Reply;
    /// When the asker stops waiting, Unix ms, if the query says.
    fn deadline_unix_ms(&self) -> Option<i64>;
}

impl Query for SamplesQuery {
    type Reply = SamplesReply;
    const KIND: &'static str = "samples";
    fn answer(
        r: &Responder,
        query: &Result<Self, BusError>,
    ) -> impl Future<Output = (SamplesReply, &'static str)> + Send {
        r.samples(query)
    }
    fn busy() -> SamplesReply {
        samples_error(busy())
    }
    fn deadline_unix_ms(&self) -> Option<i64> {
        self.deadline_unix_ms
    }
}

impl Query for StatsQuery {
    type Reply = StatsReply;
    const KIND: &'static str = "stats";
    fn answer(
        r: &Responder,
        query: &Result<Self, BusError>,
    ) -> impl Future<Output = (StatsReply, &'static str)> + Send {
        r.stats(query)
    }
    fn busy() -> StatsReply {
        stats_error(busy())
    }
    fn deadline_unix_ms(&self) -> Option<i64> {
        self.deadline_unix_ms
    }
}

impl Query for DeviceHistoryQuery {
    type Reply = DeviceHistoryReply;
    const KIND: &'static str = "device_history";
    fn answer(
        r: &Responder,
        query: &Result<Self, BusError>,
    ) -> impl Future<Output = (DeviceHistoryReply, &'static str)> + Send {
        r.device_history(query)
    }
    fn busy() -> DeviceHistoryReply {
        let (kind, message) = busy();
        DeviceHistoryReply::Error { kind, message }
    }
    fn deadline_unix_ms(&self) -> Option<i64> {
        self.deadline_unix_ms
    }
}

impl Query for ForgetDeviceQuery {
    type Reply = ForgetDeviceReply;
    const KIND: &'static str = "forget_device";
    fn answer(
        r: &Responder,
        query: &Result<Self, BusError>,
    ) -> impl Future<Output = (ForgetDeviceReply, &'static str)> + Send {
        r.forget_device(query)
    }
    fn busy() -> ForgetDeviceReply {
        let (kind, message) = busy();
        ForgetDeviceReply::Error { kind, message }
    }
    fn deadline_unix_ms(&self) -> Option<i64> {
        self.deadline_unix_ms
    }
}

impl Responder {
    /// Answers the requests of `sub` until `stop`, as many at a time as
    /// the read budget allows and `Busy` beyond it; the answers in flight
    /// are tracked by `tracker`.
    pub async fn serve<Q: Query>(
        self,
        mut sub: Inbox<Q, Q::Reply>,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        let kind = Q::KIND;
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                msg = sub.next() => msg,
            };
            let Some(msg) = msg else {
                tracing::warn!(kind, "query subscription closed");
                return;
            };
            let this = self.clone();
            match self.reads.clone().try_acquire_owned() {
                Ok(permit) => {
                    tracker.spawn(async move {
                        this.answer(msg).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    tracker.spawn(async move { this.refuse_busy(msg).await });
                }
            }
        }
    }

    async fn answer<Q: Query>(&self, req: Incoming<Q, Q::Reply>) {
        // A child of the gateway's request span (trace context in headers).
        let span = tracing::info_span!("recorder.query", kind = Q::KIND);
        services::telemetry::set_parent_from(&span, &req.headers);
        async {
            if !req.wants_reply() {
                self.metrics.query(Q::KIND, "no_reply");
                return;
            }
            // Read no longer than the asker waits, and not at all when it
            // has stopped waiting (docs/architecture.md, "Bounds").
            let budget =
                ReadBudget::until_unix_ms(req.message.as_ref().ok().and_then(Q::deadline_unix_ms));
            if budget.is_spent() {
                self.metrics.query(Q::KIND, "deadline");
                return;
            }
            // Cancels the read (SQLite's progress handler) however this
            // ends: answered, abandoned, or dropped.
            let _cancel_on_drop = budget.cancel.clone().drop_guard();
            let deadline = budget.clone();
            let read = budget.run(Q::answer(self, &req.message));
            let (answer, outcome) = tokio::select! {
                answered = read => answered,
                () = req.requester_gone(&*self.bus) => {
                    self.metrics.query(Q::KIND, "abandoned");
                    return;
                }
            };
            if deadline.is_spent() {
                // Nobody reads an answer past the deadline.
                self.metrics.query(Q::KIND, "deadline");
                return;
            }
            self.metrics.query(Q::KIND, outcome);
            if let Err(e) = req.reply(&*self.bus, &answer).await {
                tracing::warn!(error = %e, kind = Q::KIND, "could not send a query answer");
            }
        }
        .instrument(span)
        .await;
    }

    /// Answers `Busy` without reading anything.
    async fn refuse_busy<Q: Query>(&self, req: Incoming<Q, Q::Reply>) {
        if !req.wants_reply() {
            self.metrics.query(Q::KIND, "no_reply");
            return;
        }
        self.metrics.query(Q::KIND, "busy");
        if let Err(e) = req.reply(&*self.bus, &Q::busy()).await {
            tracing::warn!(error = %e, kind = Q::KIND, "could not send a busy answer");
        }
    }

    async fn samples(
        &self,
        query: &Result<SamplesQuery, BusError>,
    ) -> (SamplesReply, &'static str) {
        let q = match query {
            Ok(q) => q,
            Err(e) => return (samples_error(bad_request(e)), "bad_request"),
        };
        if !self.health.is_up() {
            return (samples_error(unavailable()), "error");
        }
        match self.store.samples(q).await {
            Ok(Some(samples)) => (SamplesReply::Found { samples }, "found"),
            Ok(None) => (SamplesReply::NotFound, "not_found"),
            Err(StoreError::InvalidQuery(why)) => (samples_error(bad_request(why)), "bad_request"),
            Err(e) => {
                tracing::warn!(error = %e, "history query failed");
                (samples_error(unavailable()), "error")
            }
        }
    }

    async fn stats(&self, query: &Result<StatsQuery, BusError>) -> (StatsReply, &'static str) {
        let (window, bucket) = match query
            .as_ref()
            .map_err(|e| BadRequest(e.to_string()))
            .and_then(validate_stats)
        {
            Ok(wb) => wb,
            Err(e) => return (stats_error(bad_request(e)), "bad_request"),
        };
        if !self.health.is_up() {
            return (stats_error(unavailable()), "error");
        }
        match self.store.stats(window, bucket, services::unix_us()).await {
            Ok(buckets) => (StatsReply::Ok { buckets }, "ok"),
            Err(StoreError::InvalidQuery(why)) => (stats_error(bad_request(why)), "bad_request"),
            Err(e) => {
                tracing::warn!(error = %e, "statistics query failed");
                (stats_error(unavailable()), "error")
            }
        }
    }
}

impl Responder {
    async fn device_history(
        &self,
        query: &Result<DeviceHistoryQuery, BusError>,
    ) -> (DeviceHistoryReply, &'static str) {
        let error = |(kind, message)| DeviceHistoryReply::Error { kind, message };
        let (q, window, bucket) = match query
            .as_ref()
            .map_err(|e| BadRequest(e.to_string()))
            .and_then(|q| validate_device_history(q).map(|(w, b)| (q, w, b)))
        {
            Ok(v) => v,
            Err(e) => return (error(bad_request(e)), "bad_request"),
        };
        if !self.health.is_up() {
            return (error(unavailable()), "error");
        }
        match self
            .store
            .device_history(&q.device, window, bucket, services::unix_us())
            .await
        {
            Ok(Some(buckets)) => (DeviceHistoryReply::Found { buckets }, "found"),
            Ok(None) => (DeviceHistoryReply::NotFound, "not_found"),
            Err(StoreError::InvalidQuery(why)) => (error(bad_request(why)), "bad_request"),
            Err(e) => {
                tracing::warn!(error = %e, "device history query failed");
                (error(unavailable()), "error")
            }
        }
    }

    async fn forget_device(
        &self,
        query: &Result<ForgetDeviceQuery, BusError>,
    ) -> (ForgetDeviceReply, &'static str) {
        let error = |(kind, message)| ForgetDeviceReply::Error { kind, message };
        let q = match query
            .as_ref()
            .map_err(|e| BadRequest(e.to_string()))
            .and_then(|q| check_digest(&q.device).map(|()| q))
        {
            Ok(q) => q,
            Err(e) => return (error(bad_request(e)), "bad_request"),
        };
        if !self.health.is_up() {
            return (error(unavailable()), "error");
        }
        match self.store.forget_device(&q.device).await {
            Ok(Some(channels)) => (ForgetDeviceReply::Forgotten { channels }, "forgotten"),
            Ok(None) => (ForgetDeviceReply::NotFound, "not_found"),
            Err(e) => {
                tracing::warn!(error = %e, "forgetting a device failed");
                (error(unavailable()), "error")
            }
        }
    }
}

/// Checks that `device` looks like a [`services::ids::device_digest`]: 64
/// lowercase hex digits.
fn check_digest(device: &str) -> Result<(), BadRequest> {
    if device.len() == 64
        && device
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(BadRequest("device must be a 64-digit hex digest".into()))
    }
}

/// Checks a device history query against the shared bounds
/// ([`services::limits::check_device_history`]); a `bucket_ms` of 0 takes
/// [`services::limits::default_device_bucket`] for the window. Returns the
/// window and bucket width.
///
/// # Errors
/// Why the query is refused, for the caller to show.
pub fn validate_device_history(q: &DeviceHistoryQuery) -> Result<(Duration, Duration), BadRequest> {
    check_digest(&q.device)?;
    let window = Duration::from_millis(q.window_ms);
    let bucket = match q.bucket_ms {
        0 => default_device_bucket(window),
        ms => Duration::from_millis(ms),
    };
    check_device_history(window, bucket)?;
    Ok((window, bucket))
}

/// The refusal of a bad query: the caller's fault.
fn bad_request(why: impl std::fmt::Display) -> (ReplyErrorKind, String) {
    (ReplyErrorKind::BadRequest, format!("bad request: {why}"))
}

/// The answer beyond the read budget.
fn busy() -> (ReplyErrorKind, String) {
    (
        ReplyErrorKind::Busy,
        format!(
            "too many reads at once; retry after {} s",
            BUSY_RETRY_AFTER.as_secs()
        ),
    )
}

/// The answer while the database cannot be used.
fn unavailable() -> (ReplyErrorKind, String) {
    (ReplyErrorKind::Unavailable, "database unavailable".into())
}

fn samples_error((kind, message): (ReplyErrorKind, String)) -> SamplesReply {
    SamplesReply::Error { kind, message }
}

fn stats_error((kind, message): (ReplyErrorKind, String)) -> StatsReply {
    StatsReply::Error { kind, message }
}

/// Checks a statistics query against the shared bounds
/// ([`services::limits::check_stats`]). Returns the window and bucket width.
///
/// # Errors
/// Why the query is refused, for the caller to show.
pub fn validate_stats(q: &StatsQuery) -> Result<(Duration, Duration), BadRequest> {
    let window = Duration::from_millis(q.window_ms);
    let bucket = Duration::from_millis(q.bucket_ms);
    check_stats(window, bucket)?;
    Ok((window, bucket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_queries_are_validated() {
        use services::limits::MAX_BUCKETS;
        let q = |window_s: u64, bucket_s: u64| StatsQuery {
            window_ms: window_s.saturating_mul(1000),
            bucket_ms: bucket_s.saturating_mul(1000),
            deadline_unix_ms: None,
        };
        assert_eq!(
            validate_stats(&q(3600, 60)),
            Ok((Duration::from_secs(3600), Duration::from_secs(60)))
        );
        assert!(validate_stats(&q(0, 60)).is_err());
        assert!(validate_stats(&q(60, 0)).is_err());
        assert!(validate_stats(&q(u64::MAX, 1)).is_err());
        assert!(
            validate_stats(&q(900, 1)).is_ok(),
            "raw blocks up to 15 min"
        );
        assert!(
            validate_stats(&q(MAX_BUCKETS, 1)).is_err(),
            "raw blocks over 15 min"
        );
        assert!(validate_stats(&q(31 * 86_400, 3600)).is_ok());
        assert!(
            validate_stats(&q(31 * 86_400, 600)).is_err(),
            "over the row budget"
        );
        assert!(validate_stats(&q(MAX_BUCKETS + 1, 1)).is_err());
        assert!(validate_stats(&q(10_000, 1)).is_err());
        assert!(
            validate_stats(&q(u64::MAX, u64::MAX)).is_err(),
            "past 31 days"
        );
        let half = StatsQuery {
            window_ms: 2000,
            bucket_ms: 500,
            deadline_unix_ms: None,
        };
        assert_eq!(
            validate_stats(&half),
            Ok((Duration::from_secs(2), Duration::from_millis(500)))
        );
    }

    #[test]
    fn device_history_queries_are_validated() {
        let q = |device: &str, window_ms: u64, bucket_ms: u64| DeviceHistoryQuery {
            device: device.to_owned(),
            window_ms,
            bucket_ms,
            deadline_unix_ms: None,
        };
        let d = services::ids::device_digest("0123456789abcdefghijklmnop");
        assert_eq!(
            validate_device_history(&q(&d, 3_600_000, 0)),
            Ok((Duration::from_secs(3600), Duration::from_secs(60)))
        );
        assert!(validate_device_history(&q(&d, 3_600_000, 90_000)).is_err());
        assert!(validate_device_history(&q(&d, 1_000, 60_000)).is_err());
        assert!(validate_device_history(&q(&d, u64::MAX, 0)).is_err());
        assert!(validate_device_history(&q("not-a-digest", 3_600_000, 60_000)).is_err());
        assert!(validate_device_history(&q(&d.to_uppercase(), 3_600_000, 60_000)).is_err());
    }

    #[test]
    fn errors_say_whose_fault() {
        let SamplesReply::Error { kind, message } = samples_error(bad_request("no")) else {
            unreachable!()
        };
        assert_eq!(
            (kind, message.as_str()),
            (ReplyErrorKind::BadRequest, "bad request: no")
        );
        let StatsReply::Error { kind, .. } = stats_error(unavailable()) else {
            unreachable!()
        };
        assert_eq!(kind, ReplyErrorKind::Unavailable);
    }
}
