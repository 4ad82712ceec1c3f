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

pub mod block;
pub(crate) mod device;
pub mod postgres;
pub mod sketch;
pub mod sqlite;
pub(crate) mod tier;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use services::messages::{
    ClientRecord, HistoryBucket, RecordBatch, SampleRecord, SamplesQuery, StatsBucket, StoredSample,
};

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
    /// Samples refused because their client's record names another
    /// gateway than the batch carrying them (docs/security.md, "The bus").
    pub foreign_samples: u64,
    /// Client records refused because they name another gateway than the
    /// batch carrying them.
    pub foreign_clients: u64,
}

/// The trust rule between gateways (docs/security.md, "The bus"): a
/// gateway speaks for its own clients only. A client record is stored
/// only when it names the gateway of the batch carrying it (the recorder
/// has checked that the batch's gateway is the one whose subject it was
/// published on, which NATS's permissions reserve to that gateway); a
/// sample is stored only when its client has no stored record or one
/// naming its batch's gateway. Returns the records to store and how many
/// were refused.
pub(crate) fn own_clients(batches: &[RecordBatch]) -> (Vec<&ClientRecord>, u64) {
    let mut refused = 0;
    let mut own = Vec::new();
    for b in batches {
        for c in &b.clients {
            if c.gateway == b.gateway {
                own.push(c);
            } else {
                refused += 1;
            }
        }
    }
    (own, refused)
}

/// The gateway of each sample of `batches` (in their order) as an index
/// into the list of the batches' gateways, and that list.
pub(crate) fn sample_gateways(batches: &[RecordBatch]) -> (Vec<i32>, Vec<String>) {
    let mut names: Vec<String> = Vec::new();
    let mut of_sample = Vec::new();
    for b in batches {
        let i = match names.iter().position(|g| *g == b.gateway) {
            Some(i) => i,
            None => {
                names.push(b.gateway.clone());
                names.len() - 1
            }
        };
        of_sample.extend(std::iter::repeat_n(i as i32, b.samples.len()));
    }
    (of_sample, names)
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
    /// A packed block in the database does not decode.
    #[error(transparent)]
    Corrupt(#[from] block::Corrupt),
    /// A sample's client row vanished between two statements of an insert
    /// (pruned meanwhile): the insert is retried.
    #[error("client row missing while inserting samples; retrying")]
    ClientVanished,
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
            StoreError::InvalidQuery(_) | StoreError::Corrupt(_) => true,
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
    /// unknown or its [`Access`] does not let the query's token digest read
    /// it: the caller
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
        if !access.allows(q.token_digest.as_deref()) {
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

    /// The history of the browser whose device digest is `device`
    /// ([`services::ids::device_digest`]): every sample of every connection
    /// that presented it, from the whole minute holding `now_us - window`
    /// to the minute holding `now_us`, in buckets of `bucket` (whole
    /// minutes, starting at multiples of the width), only buckets with
    /// samples, oldest first (docs/architecture.md, "Devices"). Reads the
    /// device's minute and hour rollups and its staged samples, each an
    /// index range. `None` for an unknown device.
    ///
    /// # Errors
    /// A bucket that is not whole minutes, or the database failed.
    async fn device_history(
        &self,
        device: &str,
        window: Duration,
        bucket: Duration,
        now_us: i64,
    ) -> Result<Option<Vec<HistoryBucket>>, StoreError>;

    /// Forgets the browser whose device digest is `device`: deletes its
    /// minute rollups, the samples (blocks and staged), `channels` and
    /// `clients` rows of every connection linked to it, and its `devices`
    /// row, in one transaction under the packing fence. Returns how many
    /// connections were deleted; `None` for an unknown device.
    ///
    /// # Errors
    /// The database failed; nothing was deleted.
    async fn forget_device(&self, device: &str) -> Result<Option<u64>, StoreError>;

    /// Packs the staged samples older than `before_us` into blocks
    /// ([`block`]), a few hundred clients per transaction. Returns how many
    /// samples were packed. Reads return the same samples before and after.
    ///
    /// # Errors
    /// The database failed; what was packed so far stays packed.
    async fn pack(&self, before_us: i64) -> Result<u64, StoreError> {
        let mut packed = 0;
        let mut after = i32::MIN;
        while let Some((moved, next)) = self.pack_step(before_us, after).await? {
            packed += moved;
            if moved == 0 && next <= after {
                tracing::warn!(
                    client = next,
                    "packing made no progress; stopping this round"
                );
                break;
            }
            after = next;
        }
        Ok(packed)
    }

    /// One transaction of [`Store::pack`]: packs the staged samples older
    /// than `before_us` of the next clients with staged samples after the
    /// id `after` (at most [`PACK_CLIENTS`] clients, [`PACK_ROWS`] rows).
    /// Returns how many samples it packed and where the next step starts;
    /// `None` when no client after `after` has staged samples.
    ///
    /// # Errors
    /// The database failed; nothing of this step was packed.
    async fn pack_step(&self, before_us: i64, after: i32)
    -> Result<Option<(u64, i32)>, StoreError>;

    /// Folds the room's partial minute rollups (appended by inserts,
    /// docs/architecture.md "Rollups") into its rollup tiers and deletes
    /// them, 10,000 a transaction under the packing fence, so
    /// each counts once however many recorders fold at once. Returns how
    /// many it folded.
    ///
    /// # Errors
    /// The database failed; what was folded so far stays folded.
    async fn fold_room_parts(&self) -> Result<u64, StoreError>;

    /// Creates the time partitions of packed samples the next days need,
    /// and those of past days within `retention` (zero: none) that have
    /// blocks waiting in the default partition. Returns how many it
    /// created. SQLite has no partitions: nothing to do.
    ///
    /// # Errors
    /// The database failed.
    async fn maintain_partitions(
        &self,
        now_us: i64,
        retention: Duration,
    ) -> Result<u32, StoreError> {
        let _ = (now_us, retention);
        Ok(0)
    }

    /// Deletes the rollup rows (the room's and the devices', every tier)
    /// that ended by `older_than_us`, each a range of a time index, then
    /// the devices left without connections and rollups; returns how many
    /// rollup rows were deleted.
    ///
    /// # Errors
    /// The database failed.
    async fn prune_rollups(&self, older_than_us: i64) -> Result<u64, StoreError>;

    /// Deletes the samples older than `older_than_us` (Unix µs), and the
    /// clients that connected before then and have no sample left. Packed
    /// samples go a whole block at a time, once the block's end has passed
    /// `older_than_us` (so up to [`block::BLOCK_US`] later); on Postgres a
    /// whole day's partition at a time, once the day has passed it. Returns how many
    /// samples were deleted.
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
/// statement timeout. (SQLite, the standalone store, has one pool; its
/// reads are interrupted at the same timeout by a progress handler; the
/// recorder's read budget applies to both.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Connections of the read pool: the recorder's `--read-concurrency`.
    pub connections: u32,
    /// How long one read may run (`--read-timeout-ms`): Postgres'
    /// `statement_timeout`, SQLite's progress handler.
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
        let store = sqlite::SqliteStore::connect_with(url, reads)
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
    /// token whose digest was stored: `presented` is the digest of the
    /// token the reader presented (the token never reaches the recorder),
    /// compared in constant time.
    pub fn allows(&self, presented: Option<&str>) -> bool {
        if self.public {
            return true;
        }
        match (&self.token_digest, presented) {
            (Some(stored), Some(presented)) => services::ids::digest_matches(stored, presented),
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

/// A sample of an insert as the store keeps it.
pub(crate) fn to_sample(s: &SampleRecord) -> block::Sample {
    block::Sample {
        at_us: s.at_us,
        n: to_db(s.n),
        seq: s.seq.map(to_db),
        delay_ms: s.delay_ms,
    }
}

/// A staged row as both backends read it:
/// `(channel_id, n, seq, at_us, delay_ms)`.
pub(crate) type StagedRow = (i32, i64, Option<i64>, i64, f64);

/// A staged row as a sample of its client.
pub(crate) fn staged_sample((c, n, seq, at_us, delay_ms): StagedRow) -> (i32, block::Sample) {
    (
        c,
        block::Sample {
            at_us,
            n,
            seq,
            delay_ms,
        },
    )
}

/// A sample with its client's id.
pub(crate) type ClientSample = (i32, block::Sample);

/// A block row to write: `(channel_id, block_start_us, samples, data)`.
pub(crate) type BlockRow = (i32, i64, i32, Vec<u8>);

/// The distinct `(channel_id, block_start_us)` of `samples`, as two
/// columns.
pub(crate) fn block_keys(samples: &[(i32, block::Sample)]) -> (Vec<i32>, Vec<i64>) {
    let keys: BTreeSet<(i32, i64)> = samples
        .iter()
        .map(|(c, s)| (*c, block::block_of(s.at_us)))
        .collect();
    keys.into_iter().unzip()
}

/// What merging samples into their blocks gives ([`merge_blocks`]).
#[derive(Debug, Default)]
pub(crate) struct Merged {
    /// The block rows to write.
    pub rows: Vec<BlockRow>,
    /// The samples that were new.
    pub added: Vec<ClientSample>,
    /// How the merged blocks' jitter pairs changed, per connection and
    /// minute ([`device`]).
    pub pairs: Vec<device::PairDelta>,
}

/// The blocks that result from adding `incoming` to the blocks `stored`
/// (`(channel_id, block_start_us, data)` of the same keys, as read from the
/// database), the samples of `incoming` that were new ([`block::merge`]),
/// and the changes of the blocks' jitter pairs.
///
/// # Errors
/// A stored block does not decode.
pub(crate) fn merge_blocks(
    stored: Vec<(i32, i64, Vec<u8>)>,
    incoming: &[(i32, block::Sample)],
) -> Result<Merged, StoreError> {
    let mut groups: BTreeMap<(i32, i64), (Vec<block::Sample>, Vec<block::Sample>)> =
        BTreeMap::new();
    for (c, start, data) in stored {
        groups.entry((c, start)).or_default().0 = block::decode(&data)?;
    }
    for (c, s) in incoming {
        groups
            .entry((*c, block::block_of(s.at_us)))
            .or_default()
            .1
            .push(*s);
    }
    let mut merged = Merged::default();
    for ((c, start), (old, new)) in groups {
        if new.is_empty() {
            continue;
        }
        let before = old.clone();
        let (all, new) = block::merge(old, &new);
        if !new.is_empty() {
            let count = i32::try_from(all.len()).unwrap_or(i32::MAX);
            merged.pairs.extend(
                device::pair_deltas(&before, &all)
                    .into_iter()
                    .map(|(minute, (sum, n))| (c, minute, sum, n)),
            );
            merged.rows.push((c, start, count, block::encode(&all)));
            merged.added.extend(new.into_iter().map(|s| (c, s)));
        }
    }
    Ok(merged)
}

/// Whether the new samples of a block write are in the room's rollups
/// already (docs/architecture.md, "Rollups").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoomCount {
    /// Packing: they were counted when staged (the parts their insert
    /// appended).
    Staged,
    /// Late samples, merged straight into their blocks: the write appends
    /// their parts.
    Late,
}

/// Width of a rollup: one minute.
pub const MINUTE_US: i64 = 60_000_000;

/// The public room's samples of one minute, or of a statistics bucket:
/// count, extremes and a [`sketch::Sketch`] of the delays.
/// (Public for tools that write rollups, e.g. the scale benchmark.)
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    /// Samples.
    pub count: u64,
    /// Smallest delay, ms.
    pub min: f64,
    /// Largest delay, ms.
    pub max: f64,
    /// The delays' sketch.
    pub sketch: sketch::Sketch,
}

/// A `room_minutes` row: `(minute_us, samples, min_ms, max_ms, sketch)`.
pub(crate) type RollupRow = (i64, i64, f64, f64, Vec<u8>);

impl Rollup {
    /// Adds one delay, ms.
    pub fn add(&mut self, v: f64) {
        self.min = if self.count == 0 { v } else { self.min.min(v) };
        self.max = if self.count == 0 { v } else { self.max.max(v) };
        self.count += 1;
        self.sketch.add(v);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Rollup) {
        if other.count == 0 {
            return;
        }
        self.min = if self.count == 0 {
            other.min
        } else {
            self.min.min(other.min)
        };
        self.max = if self.count == 0 {
            other.max
        } else {
            self.max.max(other.max)
        };
        self.count += other.count;
        self.sketch.merge(&other.sketch);
    }

    /// The rollup of a row.
    ///
    /// # Errors
    /// Its sketch does not decode.
    pub(crate) fn from_row((_, count, min, max, data): RollupRow) -> Result<Self, StoreError> {
        Ok(Self {
            count: u64::try_from(count).unwrap_or(0),
            min,
            max,
            sketch: sketch::Sketch::decode(&data)?,
        })
    }

    /// Its row starting at `start`.
    pub(crate) fn to_row(&self, start: i64) -> RollupRow {
        (
            start,
            i64::try_from(self.count).unwrap_or(i64::MAX),
            self.min,
            self.max,
            self.sketch.encode(),
        )
    }
}

/// The room's minute rollups of the samples of `added` (the new samples
/// of a commit) whose connection is in `public`.
pub(crate) fn minute_rollups(
    added: &[ClientSample],
    public: &BTreeSet<i32>,
) -> BTreeMap<i64, Rollup> {
    room_parts(
        added
            .iter()
            .filter(|(c, _)| public.contains(c))
            .map(|(_, s)| (s.at_us, s.delay_ms)),
    )
}

/// The minute rollups of public `(at_us, delay_ms)` samples: the rows of
/// `room_minute_parts` an insert appends for the samples it stored for
/// the first time (docs/architecture.md, "Rollups").
pub(crate) fn room_parts(samples: impl IntoIterator<Item = (i64, f64)>) -> BTreeMap<i64, Rollup> {
    let mut minutes: BTreeMap<i64, Rollup> = BTreeMap::new();
    for (at_us, delay_ms) in samples {
        minutes
            .entry(bucket_start(at_us, MINUTE_US))
            .or_default()
            .add(delay_ms);
    }
    minutes
}

/// The rows of a room tier to write: `stored` rows (of the same keys) with
/// `new` added.
///
/// # Errors
/// A stored sketch does not decode.
pub(crate) fn merge_rollups(
    stored: Vec<RollupRow>,
    new: BTreeMap<i64, Rollup>,
) -> Result<Vec<RollupRow>, StoreError> {
    let mut stored: BTreeMap<i64, Rollup> = stored
        .into_iter()
        .map(|row| Ok((row.0, Rollup::from_row(row)?)))
        .collect::<Result<_, StoreError>>()?;
    Ok(new
        .into_iter()
        .map(|(start, r)| {
            let total = stored.entry(start).or_default();
            total.merge(&r);
            total.to_row(start)
        })
        .collect())
}

/// Statistics from room rollup rows for buckets of `width` (a multiple of
/// [`MINUTE_US`]): rows of any tiers whose width divides `width` and the
/// partial minute rows not folded yet ([`tier::read_room_rollups`]), in
/// any order. Count, min and max are exact; the percentiles are the
/// sketch's ([`sketch`]'s bound).
///
/// # Errors
/// A stored sketch does not decode.
pub(crate) fn stats_from_rollups(
    width: i64,
    rollups: Vec<RollupRow>,
) -> Result<Vec<StatsBucket>, StoreError> {
    /// A bucket's samples: count, min, max, their sketches summed.
    #[derive(Default)]
    struct Bucket {
        count: u64,
        min: f64,
        max: f64,
        sketch: sketch::Accumulator,
    }
    let mut buckets: BTreeMap<i64, Bucket> = BTreeMap::new();
    // Tier rows come oldest first, then the parts oldest first: a
    // bucket's rows are mostly adjacent, so the map is looked up about
    // once per bucket, not per row.
    let mut current: Option<(i64, Bucket)> = None;
    for (minute, count, min, max, data) in rollups {
        let start = bucket_start(minute, width);
        if current.as_ref().is_none_or(|(s, _)| *s != start) {
            if let Some((s, b)) = current.take() {
                buckets.insert(s, b);
            }
            current = Some((start, buckets.remove(&start).unwrap_or_default()));
        }
        let Some((_, b)) = current.as_mut() else {
            continue;
        };
        let count = u64::try_from(count).unwrap_or(0);
        if count == 0 {
            continue;
        }
        b.min = if b.count == 0 { min } else { b.min.min(min) };
        b.max = if b.count == 0 { max } else { b.max.max(max) };
        b.count += count;
        b.sketch.add_encoded(&data)?;
    }
    if let Some((s, b)) = current {
        buckets.insert(s, b);
    }
    Ok(buckets
        .into_iter()
        .map(|(start, b)| {
            let q = |q| b.sketch.quantile(q).unwrap_or(0.0);
            StatsBucket {
                start_us: start,
                count: b.count,
                min: b.min,
                p50: q(0.5),
                p95: q(0.95),
                p99: q(0.99),
                max: b.max,
            }
        })
        .collect())
}

/// Rows packed per transaction, at most.
pub const PACK_ROWS: i64 = 10_000;
/// Clients looked at per packing transaction, at most.
pub const PACK_CLIENTS: i64 = 64;

/// What one packing transaction does, from the staged rows it read: the
/// rows of `clients` older than `before`, ordered by client, time and
/// counter, at most [`PACK_ROWS`].
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PackStep {
    /// The samples to pack.
    pub samples: Vec<(i32, block::Sample)>,
    /// The clients whose `packed_before_us` moves, and where to.
    pub marks: Vec<(i32, i64)>,
    /// Where the next transaction starts: clients after this id.
    pub next_after: i32,
}

impl PackStep {
    /// Plans a step over `clients` (ascending) from their staged `rows`.
    /// When the rows were cut at [`PACK_ROWS`], the last client is packed
    /// only up to its last row's time and the next step starts with it.
    pub(crate) fn plan(clients: &[i32], rows: Vec<(i32, block::Sample)>, before: i64) -> Self {
        let truncated = rows.len() as i64 >= PACK_ROWS;
        let cut = truncated
            .then(|| rows.last().map(|(c, s)| (*c, s.at_us)))
            .flatten();
        let mut step = PackStep {
            next_after: clients.last().copied().unwrap_or(i32::MAX),
            ..Self::default()
        };
        for (c, s) in rows {
            match cut {
                Some((cc, at)) if c == cc => {
                    if s.at_us < at {
                        step.samples.push((c, s));
                    }
                }
                _ => step.samples.push((c, s)),
            }
        }
        let mut marked: BTreeSet<i32> = step.samples.iter().map(|(c, _)| *c).collect();
        if let Some((cc, at)) = cut {
            step.next_after = cc - 1;
            marked.remove(&cc);
            step.marks.push((cc, at));
        }
        step.marks.extend(marked.into_iter().map(|c| (c, before)));
        step.marks.sort_unstable();
        step
    }
}

/// A history read over the packed blocks and then the staged rows of one
/// client, stopping at the limit.
pub(crate) struct History {
    since: i64,
    limit: usize,
    /// What is read so far, oldest first.
    pub samples: Vec<StoredSample>,
}

impl History {
    /// A read of samples at or after `since`, at most `limit`.
    pub(crate) fn new(since: Option<i64>, limit: i64) -> Self {
        Self {
            since: since.unwrap_or(i64::MIN),
            limit: usize::try_from(limit).unwrap_or(0),
            samples: Vec::new(),
        }
    }

    /// The first block that can hold a sample of the read.
    pub(crate) fn first_block(&self) -> i64 {
        block::block_of(self.since)
    }

    /// The earliest time still read.
    pub(crate) fn since(&self) -> i64 {
        self.since
    }

    /// How many more samples the read takes.
    pub(crate) fn remaining(&self) -> usize {
        self.limit - self.samples.len()
    }

    /// Adds a block's samples (blocks come oldest first).
    ///
    /// # Errors
    /// The block does not decode.
    pub(crate) fn push_block(&mut self, data: &[u8]) -> Result<(), StoreError> {
        for s in block::decode(data)? {
            if self.remaining() == 0 {
                break;
            }
            if s.at_us >= self.since {
                self.samples
                    .push(stored_sample((s.at_us, s.delay_ms, s.seq)));
            }
        }
        Ok(())
    }
}

/// The staged public samples of a statistics window, oldest first (`$1`:
/// the window's start). Both backends take this SQL.
pub(crate) const STATS_STAGED: &str = "\
    SELECT s.at_us, s.delay_ms FROM sample_staging s JOIN channels c ON c.id = s.channel_id \
    WHERE c.public AND s.at_us >= $1 ORDER BY s.at_us";

/// The packed public blocks of a statistics window in start order (`$1`:
/// the first block).
pub(crate) const STATS_BLOCKS: &str = "\
    SELECT b.block_start_us, b.data FROM sample_blocks b JOIN channels c ON c.id = b.channel_id \
    WHERE c.public AND b.block_start_us >= $1 ORDER BY b.block_start_us";

/// The statistics of `buckets` once the `blocks` of [`STATS_BLOCKS`] are
/// added.
///
/// # Errors
/// The database failed or a block does not decode.
pub(crate) async fn fold_blocks<S>(
    mut buckets: Buckets,
    mut blocks: S,
) -> Result<Vec<StatsBucket>, StoreError>
where
    S: futures_util::Stream<Item = Result<(i64, Vec<u8>), sqlx::Error>> + Unpin,
{
    use futures_util::TryStreamExt as _;
    while let Some((start, data)) = blocks.try_next().await? {
        buckets.push_block(start, &data)?;
    }
    Ok(buckets.finish())
}

/// Statistics buckets over the staged samples (all read first, sorted by
/// time) and the packed blocks (then streamed in start order); a bucket is
/// summarized and its values dropped as soon as neither can add to it.
pub(crate) struct Buckets {
    since: i64,
    width: i64,
    staged: std::vec::IntoIter<(i64, f64)>,
    next_staged: Option<(i64, f64)>,
    open: BTreeMap<i64, Vec<f64>>,
    done: Vec<StatsBucket>,
}

impl Buckets {
    /// Buckets of `width` µs over the samples at or after `since`, starting
    /// with the staged `(at_us, delay_ms)` (sorted by time).
    pub(crate) fn new(since: i64, width: i64, staged: Vec<(i64, f64)>) -> Self {
        let mut staged = staged.into_iter();
        Self {
            since,
            width,
            next_staged: staged.next(),
            staged,
            open: BTreeMap::new(),
            done: Vec::new(),
        }
    }

    /// The first block that can hold a sample of the window.
    pub(crate) fn first_block(&self) -> i64 {
        block::block_of(self.since)
    }

    fn push(&mut self, at_us: i64, delay_ms: f64) {
        if at_us >= self.since {
            self.open
                .entry(bucket_start(at_us, self.width))
                .or_default()
                .push(delay_ms);
        }
    }

    /// Adds the staged samples before `until`.
    fn push_staged(&mut self, until: i64) {
        while let Some((at, v)) = self.next_staged.filter(|(at, _)| *at < until) {
            self.push(at, v);
            self.next_staged = self.staged.next();
        }
    }

    /// Adds the block starting at `start` (blocks come in start order):
    /// buckets ending at or before `start` are complete.
    ///
    /// # Errors
    /// The block does not decode.
    pub(crate) fn push_block(&mut self, start: i64, data: &[u8]) -> Result<(), StoreError> {
        self.push_staged(start);
        while let Some(entry) = self.open.first_entry() {
            if entry.key().saturating_add(self.width) > start {
                break;
            }
            let (s, values) = entry.remove_entry();
            self.close(s, values);
        }
        for s in block::decode(data)? {
            self.push(s.at_us, s.delay_ms);
        }
        Ok(())
    }

    fn close(&mut self, start: i64, mut values: Vec<f64>) {
        values.sort_by(f64::total_cmp);
        self.done.push(bucket_stats(start, &values));
    }

    /// Every bucket with samples, oldest first.
    pub(crate) fn finish(mut self) -> Vec<StatsBucket> {
        self.push_staged(i64::MAX);
        if let Some((at, v)) = self.next_staged.take() {
            self.push(at, v);
        }
        for (s, values) in std::mem::take(&mut self.open) {
            self.close(s, values);
        }
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privacy_rule() {
        let token = "secret";
        let digest = services::ids::token_digest(token);
        let may_read = |public, stored: Option<&str>, token: Option<&str>| {
            Access {
                public,
                token_digest: stored.map(str::to_owned),
            }
            .allows(token.map(services::ids::token_digest).as_deref())
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
        let stored = Access {
            public: false,
            token_digest: Some(digest.clone()),
        };
        assert!(
            !stored.allows(Some(token)),
            "a query carries the digest; a token in its place is no match"
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
