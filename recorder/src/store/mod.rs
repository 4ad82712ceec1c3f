//! Where samples are kept: the [`Store`] trait and its two implementations,
//! [`postgres::PgStore`] for the distributed recorder and
//! [`sqlite::SqliteStore`] for the standalone binary. One contract test
//! (`tests/it/store.rs`) runs against both.
//!
//! Both schemas live in `migrations/{postgres,sqlite}` and are applied by
//! [`connect`]. Writes are idempotent: a sample's key is the client id and
//! the gateway's counter `n`, so a batch delivered twice inserts nothing the
//! second time.
//!
//! Who may read a client's history is decided in one place,
//! [`Store::samples`], from what each backend reports through
//! [`Store::access`].
//!
//! Percentiles are interpolated between closest ranks on both backends, the
//! one definition docs/protocol.md ("Statistics") names: Postgres computes
//! them with `percentile_cont`, SQLite hands the sorted values to
//! [`services::stats::percentile_sorted`], so both return the same numbers
//! for the same data, and the pages compute the same.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use services::messages::{RecordBatch, SamplesQuery, StatsBucket, StoredSample};

/// The most samples one history read returns (the shared API bound).
pub const MAX_SAMPLES: u32 = services::limits::MAX_SAMPLES;

/// Rows deleted per statement while pruning, so a first prune of a large
/// table does not hold one huge transaction.
const PRUNE_CHUNK: i64 = 50_000;

/// What an insert did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Samples that were not stored before.
    pub inserted: u64,
    /// Samples already stored (a redelivered or re-sent batch).
    pub duplicates: u64,
}

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or refused a statement.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The request makes no sense (e.g. a zero bucket width).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
}

impl StoreError {
    /// Whether retrying the same statement with the same data can never
    /// succeed: the database rejected the data itself (a data exception such
    /// as a NUL byte in text, a constraint violation, a key too large for
    /// the index). Connection loss, timeouts, a shutting-down or full
    /// server are not permanent: those are retried until they pass.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => {
                use sqlx::error::ErrorKind;
                matches!(
                    e.kind(),
                    ErrorKind::UniqueViolation
                        | ErrorKind::ForeignKeyViolation
                        | ErrorKind::NotNullViolation
                        | ErrorKind::CheckViolation
                ) || e
                    .code()
                    // Postgres SQLSTATE classes: 22 data exception,
                    // 54 program limit exceeded (e.g. index row too large).
                    .is_some_and(|c| c.len() == 5 && (c.starts_with("22") || c.starts_with("54")))
            }
            StoreError::Database(sqlx::Error::Encode(_)) => true,
            StoreError::InvalidQuery(_) => true,
            _ => false,
        }
    }
}

/// Persistent storage of clients and their delay samples.
#[async_trait]
pub trait Store: Send + Sync {
    /// Stores the clients, then the samples, of every batch in one
    /// transaction. Clients already stored are kept as they are; samples
    /// already stored (same client and `n`) are counted as duplicates.
    ///
    /// # Errors
    /// Nothing was stored; see [`StoreError::is_permanent`].
    async fn insert(&self, batches: &[RecordBatch]) -> Result<InsertOutcome, StoreError>;

    /// One client's samples, oldest first, at or after `since_us`, at most
    /// `limit` (capped at [`MAX_SAMPLES`]). `None` when the client is
    /// unknown or its [`Access`] does not let `token` read it: the caller
    /// cannot tell these apart. Both backends share this rule; they only
    /// say who the client is ([`Store::access`]) and read the rows
    /// ([`Store::read_history`]).
    ///
    /// # Errors
    /// The database failed.
    async fn samples(&self, q: &SamplesQuery) -> Result<Option<Vec<StoredSample>>, StoreError> {
        let Some(access) = self.access(&q.channel_name).await? else {
            return Ok(None);
        };
        if !access.allows(q.token.as_deref()) {
            return Ok(None);
        }
        let history = self
            .read_history(&q.channel_name, q.since_us, effective_limit(q.limit))
            .await?;
        Ok(Some(history))
    }

    /// Who may read the history of `channel_name`: `None` for an unknown
    /// client. A client with samples but no client row (which should not
    /// happen) is public only if every sample is, and has no token.
    ///
    /// # Errors
    /// The database failed.
    async fn access(&self, channel_name: &str) -> Result<Option<Access>, StoreError>;

    /// The samples of `channel_name`, oldest first, at or after `since_us`,
    /// at most `limit`, whoever asks: callers go through [`Store::samples`],
    /// which applies the privacy rule first.
    ///
    /// # Errors
    /// The database failed.
    async fn read_history(
        &self,
        channel_name: &str,
        since_us: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSample>, StoreError>;

    /// Statistics of the public samples from `now_us - window` on, per
    /// bucket of width `bucket`; buckets start at multiples of the width
    /// (Unix time), only buckets with samples are returned, oldest first.
    ///
    /// # Errors
    /// A zero bucket width, or the database failed.
    async fn stats(
        &self,
        window: Duration,
        bucket: Duration,
        now_us: i64,
    ) -> Result<Vec<StatsBucket>, StoreError>;

    /// Deletes the samples older than `older_than_us` (Unix µs), and the
    /// clients that connected before then and have no sample left. Returns
    /// how many samples were deleted.
    ///
    /// # Errors
    /// The database failed; what was deleted so far stays deleted.
    async fn prune(&self, older_than_us: i64) -> Result<u64, StoreError>;

    /// Whether the database answers (within a couple of seconds).
    async fn ping(&self) -> bool;
}

/// Opens the store at `url`: `postgres://…` / `postgresql://…` for
/// Postgres, `sqlite:…` for SQLite (the file is created if missing;
/// `sqlite::memory:` keeps everything in memory). Applies the migrations.
///
/// # Errors
/// Unknown scheme, unreachable database, or failed migration.
pub async fn connect(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    connect_with(url, ReadLimits::default()).await
}

/// The budget of history and statistics reads against Postgres
/// (docs/architecture.md, "Bounds"): their own pool, so they can never take
/// the connections of inserts, pruning or the health check's ping, and a
/// statement timeout. (SQLite, the standalone store, has one writer and
/// no statement timeout; the recorder's read budget applies to both.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Connections of the read pool: the recorder's `--read-concurrency`.
    pub connections: u32,
    /// Postgres `statement_timeout` of every read (`--read-timeout-ms`).
    pub statement_timeout: Duration,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            connections: 3,
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Like [`connect`], with `reads` as the read budget of a Postgres store.
///
/// # Errors
/// As [`connect`].
pub async fn connect_with(url: &str, reads: ReadLimits) -> anyhow::Result<Arc<dyn Store>> {
    connect_split(url, None, reads).await
}

/// Like [`connect_with`]; a Postgres store applies its migrations over
/// `migrate_url` when given (the schema owner, docs/security.md
/// "Postgres"), and reads and writes over `url` only.
///
/// # Errors
/// As [`connect`].
pub async fn connect_split(
    url: &str,
    migrate_url: Option<&str>,
    reads: ReadLimits,
) -> anyhow::Result<Arc<dyn Store>> {
    use anyhow::Context as _;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = postgres::PgStore::connect_split(url, migrate_url, reads)
            .await
            .context("opening the Postgres database")?;
        Ok(Arc::new(store))
    } else if url.starts_with("sqlite:") {
        let store = sqlite::SqliteStore::connect(url)
            .await
            .context("opening the SQLite database")?;
        Ok(Arc::new(store))
    } else {
        anyhow::bail!("unsupported database URL (expected postgres:// or sqlite:)")
    }
}

/// Like [`connect_split`], but keeps trying for up to `patience` while the
/// database is not reachable yet (a container starting next to it), with
/// the jittered backoff of [`services::retry`].
///
/// # Errors
/// The last error once `patience` is spent, or at once for a bad URL.
pub async fn connect_retrying(
    url: &str,
    migrate_url: Option<&str>,
    patience: Duration,
    reads: ReadLimits,
) -> anyhow::Result<Arc<dyn Store>> {
    retrying(patience, || connect_split(url, migrate_url, reads)).await
}

/// Applies the pending Postgres migrations over `url` (the schema owner)
/// and nothing else, retrying like [`connect_retrying`]: `recorder
/// --migrate-only`, for a Kubernetes init container or Job.
///
/// # Errors
/// As [`connect_retrying`].
pub async fn migrate_retrying(url: &str, patience: Duration) -> anyhow::Result<()> {
    use anyhow::Context as _;
    retrying(patience, || async {
        postgres::migrate(url)
            .await
            .context("applying the Postgres migrations")
    })
    .await
}

/// Runs `attempt` until it succeeds, fails for good, or `patience` is spent.
async fn retrying<T, F, Fut>(patience: Duration, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff =
        services::retry::Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match attempt().await {
            Err(e) if is_retryable(&e) => {
                let delay = backoff.next_delay();
                if tokio::time::Instant::now() + delay >= deadline {
                    return Err(e);
                }
                tracing::warn!(error = %format!("{e:#}"), "database not reachable yet; retrying");
                tokio::time::sleep(delay).await;
            }
            done => return done,
        }
    }
}

fn is_retryable(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<StoreError>() {
        Some(StoreError::Database(
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_),
        )) => true,
        // Postgres still starting ("57P03"), shutting down, or out of
        // connections ("53300").
        Some(StoreError::Database(sqlx::Error::Database(e))) => e
            .code()
            .is_some_and(|c| c.starts_with("57") || c.starts_with("53") || c.starts_with("08")),
        _ => false,
    }
}

/// What decides who may read a client's history, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Public clients' samples are readable by anyone.
    pub public: bool,
    /// The digest of a private client's token ([`services::ids::token_digest`]).
    pub token_digest: Option<String>,
}

impl Access {
    /// The privacy rule (`docs/protocol.md`, "HTTP API"): a public client's
    /// history is readable by anyone; a private client's only with the
    /// token whose digest was stored, compared in constant time.
    pub fn allows(&self, token: Option<&str>) -> bool {
        if self.public {
            return true;
        }
        match (&self.token_digest, token) {
            (Some(stored), Some(token)) => services::ids::token_matches(stored, token),
            _ => false,
        }
    }
}

impl From<(bool, Option<String>)> for Access {
    /// A client row: `(public, token_digest)`.
    fn from((public, token_digest): (bool, Option<String>)) -> Self {
        Self {
            public,
            token_digest,
        }
    }
}

impl Access {
    /// A client known only from its samples: no token can read it.
    pub fn without_token(public: bool) -> Self {
        Self {
            public,
            token_digest: None,
        }
    }
}

/// A history row as both backends read it: `(at_us, delay_ms, seq)`.
pub(crate) type HistoryRow = (i64, f64, Option<i64>);

/// A history row as the API returns it.
pub(crate) fn stored_sample((at_us, delay_ms, seq): HistoryRow) -> StoredSample {
    StoredSample {
        at_us,
        delay_ms,
        seq: seq.map(from_db),
    }
}

/// The limit a history read really applies.
pub(crate) fn effective_limit(limit: u32) -> i64 {
    i64::from(limit.min(MAX_SAMPLES))
}

/// The first time a stats window covers, saturating instead of overflowing.
pub(crate) fn window_start(now_us: i64, window: Duration) -> i64 {
    now_us.saturating_sub(i64::try_from(window.as_micros()).unwrap_or(i64::MAX))
}

/// A bucket width in µs, refusing zero.
pub(crate) fn bucket_width(bucket: Duration) -> Result<i64, StoreError> {
    match i64::try_from(bucket.as_micros()) {
        Ok(w) if w > 0 => Ok(w),
        Ok(_) => Err(StoreError::InvalidQuery(
            "bucket width must be positive".into(),
        )),
        Err(_) => Err(StoreError::InvalidQuery("bucket width too large".into())),
    }
}

/// The start of the bucket holding `at_us` (floor to a multiple of `width`).
pub(crate) fn bucket_start(at_us: i64, width: i64) -> i64 {
    at_us - at_us.rem_euclid(width)
}

/// Statistics of one bucket from its values sorted ascending (not empty).
pub(crate) fn bucket_stats(start_us: i64, sorted: &[f64]) -> StatsBucket {
    use services::stats::percentile_sorted;
    let p = |q| percentile_sorted(sorted, q).unwrap_or(0.0);
    StatsBucket {
        start_us,
        count: sorted.len() as u64,
        min: sorted.first().copied().unwrap_or(0.0),
        p50: p(50.0),
        p95: p(95.0),
        p99: p(99.0),
        max: sorted.last().copied().unwrap_or(0.0),
    }
}

/// Sample counters are `u64` on the wire and `bigint` in the database: the
/// bits are kept as they are, so every value round-trips.
pub(crate) fn to_db(v: u64) -> i64 {
    v as i64
}

/// The inverse of [`to_db`].
pub(crate) fn from_db(v: i64) -> u64 {
    v as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privacy_rule() {
        let token = "secret";
        let digest = services::ids::token_digest(token);
        let may_read = |public, stored: Option<&str>, token| {
            Access {
                public,
                token_digest: stored.map(str::to_owned),
            }
            .allows(token)
        };
        assert!(may_read(true, None, None));
        assert!(may_read(true, Some(&digest), Some("wrong")));
        assert!(may_read(false, Some(&digest), Some(token)));
        assert!(!may_read(false, Some(&digest), Some("wrong")));
        assert!(!may_read(false, Some(&digest), None));
        assert!(!may_read(false, None, Some(token)));
        assert!(
            !may_read(false, Some(token), Some(token)),
            "the digest, not the token, is stored"
        );
    }

    #[test]
    fn buckets_align_to_multiples_of_the_width() {
        assert_eq!(bucket_start(125, 60), 120);
        assert_eq!(bucket_start(120, 60), 120);
        assert_eq!(bucket_start(-1, 60), -60);
        assert!(bucket_width(Duration::ZERO).is_err());
        assert_eq!(bucket_width(Duration::from_secs(1)).unwrap(), 1_000_000);
        assert_eq!(window_start(-10, Duration::from_secs(u64::MAX)), i64::MIN);
        assert_eq!(window_start(5_000_000, Duration::from_secs(2)), 3_000_000);
    }

    #[test]
    fn bucket_statistics_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        let b = bucket_stats(7, &v);
        assert_eq!((b.start_us, b.count, b.min, b.max), (7, 200, 1.0, 200.0));
        // h = 199 * f: p50 between 100 and 101, p95 between 190 and 191, ...
        for (got, expected) in [(b.p50, 100.5), (b.p95, 190.05), (b.p99, 198.01)] {
            assert!((got - expected).abs() < 1e-9, "{got} != {expected}");
        }
    }

    #[test]
    fn counters_round_trip_through_bigint() {
        for v in [0, 1, i64::MAX as u64, u64::MAX] {
            assert_eq!(from_db(to_db(v)), v);
        }
        assert_eq!(effective_limit(u32::MAX), i64::from(MAX_SAMPLES));
        assert_eq!(effective_limit(3), 3);
    }
}
