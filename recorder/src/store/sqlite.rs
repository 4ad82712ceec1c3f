//! The SQLite store of the standalone binary: one file in WAL mode, so
//! history and statistics reads run beside the single writer.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use services::messages::{RecordBatch, StatsBucket, StoredSample};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};

use super::{
    Access, HistoryRow, InsertOutcome, PRUNE_CHUNK, Store, StoreError, bucket_start, bucket_stats,
    bucket_width, stored_sample, to_db, window_start,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per `INSERT`: 6 parameters a row stays well under SQLite's limit of
/// 32,766 parameters a statement.
const INSERT_CHUNK: usize = 1_000;

/// A SQLite database file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url`, e.g.
    /// `sqlite://pingapp.db` or `sqlite::memory:`, and applies the
    /// migrations.
    ///
    /// # Errors
    /// A malformed URL, an unusable file, or a failed migration.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL is durable against process crashes; a power
            // loss may lose the last transactions, never corrupt the file.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        // Every connection to `:memory:` is a database of its own: keep
        // exactly one, for ever.
        let pool_opts = if in_memory {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(4)
        };
        let pool = pool_opts
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// The connection pool (tests and tools).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, batches: &[RecordBatch]) -> Result<InsertOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let clients: Vec<_> = batches.iter().flat_map(|b| &b.clients).collect();
        for chunk in clients.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO clients (channel_name, public, token_digest, gateway, connected_at_us) ",
            );
            qb.push_values(chunk, |mut row, c| {
                row.push_bind(c.channel_name.clone())
                    .push_bind(c.public)
                    .push_bind(c.token_digest.clone())
                    .push_bind(c.gateway.clone())
                    .push_bind(c.connected_at_us);
            });
            qb.push(" ON CONFLICT (channel_name) DO NOTHING");
            qb.build().execute(&mut *tx).await?;
        }
        let samples: Vec<_> = batches.iter().flat_map(|b| &b.samples).collect();
        let mut inserted = 0;
        for chunk in samples.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO samples (channel_name, n, seq, at_us, delay_ms, public) ",
            );
            qb.push_values(chunk, |mut row, s| {
                row.push_bind(s.channel_name.clone())
                    .push_bind(to_db(s.n))
                    .push_bind(s.seq.map(to_db))
                    .push_bind(s.at_us)
                    .push_bind(s.delay_ms)
                    .push_bind(s.public);
            });
            qb.push(" ON CONFLICT DO NOTHING");
            inserted += qb.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(InsertOutcome {
            inserted,
            duplicates: samples.len() as u64 - inserted,
        })
    }

    async fn access(&self, channel_name: &str) -> Result<Option<Access>, StoreError> {
        let client: Option<(bool, Option<String>)> =
            sqlx::query_as("SELECT public, token_digest FROM clients WHERE channel_name = ?")
                .bind(channel_name)
                .fetch_optional(&self.pool)
                .await?;
        if let Some(client) = client {
            return Ok(Some(Access::from(client)));
        }
        let public: Option<bool> =
            sqlx::query_scalar("SELECT min(public) FROM samples WHERE channel_name = ?")
                .bind(channel_name)
                .fetch_one(&self.pool)
                .await?;
        Ok(public.map(Access::without_token))
    }

    async fn read_history(
        &self,
        channel_name: &str,
        since_us: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSample>, StoreError> {
        let rows: Vec<HistoryRow> = sqlx::query_as(
            "SELECT at_us, delay_ms, seq FROM samples \
             WHERE channel_name = ? AND at_us >= ? ORDER BY at_us, n LIMIT ?",
        )
        .bind(channel_name)
        .bind(since_us.unwrap_or(i64::MIN))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(stored_sample).collect())
    }

    async fn stats(
        &self,
        window: Duration,
        bucket: Duration,
        now_us: i64,
    ) -> Result<Vec<StatsBucket>, StoreError> {
        let width = bucket_width(bucket)?;
        let since = window_start(now_us, window);
        // Rows come in time order, so buckets complete one after the other
        // and only one bucket's values are held at a time.
        let mut rows = sqlx::query_as::<_, (i64, f64)>(
            "SELECT at_us, delay_ms FROM samples WHERE public = 1 AND at_us >= ? ORDER BY at_us",
        )
        .bind(since)
        .fetch(&self.pool);
        let mut buckets = Vec::new();
        let mut current: Option<(i64, Vec<f64>)> = None;
        while let Some((at_us, delay_ms)) = rows.try_next().await? {
            let start = bucket_start(at_us, width);
            match &mut current {
                Some((s, values)) if *s == start => values.push(delay_ms),
                _ => {
                    if let Some((s, mut values)) = current.take() {
                        values.sort_by(f64::total_cmp);
                        buckets.push(bucket_stats(s, &values));
                    }
                    current = Some((start, vec![delay_ms]));
                }
            }
        }
        if let Some((s, mut values)) = current {
            values.sort_by(f64::total_cmp);
            buckets.push(bucket_stats(s, &values));
        }
        Ok(buckets)
    }

    async fn prune(&self, older_than_us: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            // `public IN (0, 1)` lets the (public, at_us) index find the
            // old rows.
            let n = sqlx::query(
                "DELETE FROM samples WHERE rowid IN (SELECT rowid FROM samples \
                 WHERE public IN (0, 1) AND at_us < ? LIMIT ?)",
            )
            .bind(older_than_us)
            .bind(PRUNE_CHUNK)
            .execute(&self.pool)
            .await?
            .rows_affected();
            deleted += n;
            if n < PRUNE_CHUNK as u64 {
                break;
            }
        }
        sqlx::query(
            "DELETE FROM clients WHERE connected_at_us < ? AND NOT EXISTS \
             (SELECT 1 FROM samples s WHERE s.channel_name = clients.channel_name)",
        )
        .bind(older_than_us)
        .execute(&self.pool)
        .await?;
        Ok(deleted)
    }

    async fn ping(&self) -> bool {
        let q = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(
            tokio::time::timeout(Duration::from_secs(2), q).await,
            Ok(Ok(_))
        )
    }
}
