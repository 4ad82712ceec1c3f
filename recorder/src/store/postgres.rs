//! The Postgres store of the distributed recorder.
//!
//! Inserts send whole columns as arrays and `UNNEST` them: one statement
//! and one round trip per [`INSERT_CHUNK`] rows, prepared once per
//! connection. A call that fits one chunk (the recorder's usual batch)
//! writes clients and samples in a single statement, which is a transaction
//! by itself; larger calls use an explicit transaction.
//!
//! sqlx 0.9.0 does not set `TCP_NODELAY` (sqlx issue 4335, fixed upstream
//! after 0.9.0), so the last segment of a large insert can wait for the
//! server's delayed ACK (about 40 ms). The recorder hides this by keeping
//! two inserts in flight; a Unix-socket URL (`?host=/var/run/postgresql`)
//! avoids it altogether.
//!
//! Migrations may run as another role than the reads and writes
//! ([`PgStore::connect_split`]): the schema's owner applies them, and the
//! recorder's runtime role, which may only `SELECT`, `INSERT` and `DELETE`
//! (`k8s/components/postgres-roles/roles.sql`, docs/security.md "Postgres"), only checks
//! that nothing is pending. A runtime role never runs DDL when the schema is
//! up to date.
//!
//! Migrations are safe when several replicas start at once: sqlx's migrator
//! (sqlx-postgres 0.9, `migrate.rs`, `lock()`) takes
//! `pg_advisory_lock(id derived from the database name)` before it reads
//! the applied migrations and releases it after applying the rest, so the
//! replicas apply them one after the other and the later ones find nothing
//! to do. We run it on a connection of its own and close that connection
//! afterwards, so even a failed migration cannot leave the session-level
//! lock held on a pooled connection.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use services::messages::{ClientRecord, RecordBatch, SampleRecord, StatsBucket, StoredSample};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres};

use super::{
    Access, HistoryRow, InsertOutcome, PRUNE_CHUNK, ReadLimits, Store, StoreError, bucket_width,
    stored_sample, to_db, window_start,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Rows per `INSERT … SELECT FROM UNNEST(…)` statement.
pub const INSERT_CHUNK: usize = 10_000;

const INSERT_CLIENTS: &str = "\
    INSERT INTO clients (channel_name, public, token_digest, gateway, connected_at_us) \
    SELECT * FROM UNNEST($1::text[], $2::boolean[], $3::text[], $4::text[], $5::bigint[]) \
    ON CONFLICT (channel_name) DO NOTHING";

const INSERT_SAMPLES: &str = "\
    INSERT INTO samples (channel_name, n, seq, at_us, delay_ms, public) \
    SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], \
                         $5::double precision[], $6::boolean[]) \
    ON CONFLICT DO NOTHING";

/// Clients and samples in one statement: a statement is a transaction of
/// its own, so a batch that fits one chunk costs a single round trip
/// instead of four (BEGIN, clients, samples, COMMIT).
const INSERT_BOTH: &str = "\
    WITH new_clients AS ( \
        INSERT INTO clients (channel_name, public, token_digest, gateway, connected_at_us) \
        SELECT * FROM UNNEST($1::text[], $2::boolean[], $3::text[], $4::text[], $5::bigint[]) \
        ON CONFLICT (channel_name) DO NOTHING) \
    INSERT INTO samples (channel_name, n, seq, at_us, delay_ms, public) \
    SELECT * FROM UNNEST($6::text[], $7::bigint[], $8::bigint[], $9::bigint[], \
                         $10::double precision[], $11::boolean[]) \
    ON CONFLICT DO NOTHING";

/// Whether a client with samples but no `clients` row is public: one probe
/// of the primary key. (`bool_and(public)` here let the planner walk all of
/// `samples_public_at` for an id with no samples: 160-380 ms at 1M rows,
/// docs/benchmarks.md, 2026-11-30.) A client's samples all share its page,
/// so its first sample says it.
pub const ACCESS_BY_SAMPLES: &str = "\
    SELECT public FROM samples WHERE channel_name = $1 ORDER BY channel_name, n LIMIT 1";

/// Percentiles by linear interpolation between closest ranks:
/// `percentile_cont(f)` is the definition
/// [`services::stats::percentile_sorted`] computes (docs/protocol.md,
/// "Statistics"). Buckets are floored to multiples of the width (`$2`).
const STATS: &str = "\
    SELECT at_us - ((at_us % $2) + $2) % $2 AS start_us, \
           count(*) AS n, \
           min(delay_ms), \
           percentile_cont(0.5) WITHIN GROUP (ORDER BY delay_ms), \
           percentile_cont(0.95) WITHIN GROUP (ORDER BY delay_ms), \
           percentile_cont(0.99) WITHIN GROUP (ORDER BY delay_ms), \
           max(delay_ms) \
    FROM samples WHERE public = TRUE AND at_us >= $1 \
    GROUP BY 1 ORDER BY 1";

/// Applies the pending migrations over `url`, on a connection of its own.
/// When none is pending nothing else is done, so a role without DDL
/// rights passes when the schema is up to date.
///
/// # Errors
/// Unreachable server, or a failed migration (a role without the rights
/// to apply a pending one gets Postgres's `permission denied`).
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    let opts = PgConnectOptions::from_str(url)?;
    let mut conn = PgConnection::connect_with(&opts).await?;
    let migrated = match up_to_date(&mut conn).await {
        true => Ok(()),
        false => MIGRATOR.run(&mut conn).await,
    };
    let locked_down = match migrated {
        Ok(()) => lock_down_migrations_table(&mut conn).await,
        Err(_) => Ok(()),
    };
    // Closing ends the session, and with it any advisory lock.
    let _ = conn.close().await;
    migrated?;
    locked_down
}

/// The migrations table is read by every role (to see that nothing is
/// pending) but written by its owner alone: the default privileges that
/// give the runtime role `INSERT` and `DELETE` on every new table are taken
/// back for this one. Does nothing for a role that did not grant them (a
/// single-role setup, or a runtime role after its check).
const LOCK_DOWN_MIGRATIONS: &str = "    DO $$ DECLARE r record; BEGIN       FOR r IN SELECT DISTINCT grantee FROM information_schema.role_table_grants                WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'                  AND privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')                  AND grantee <> current_user AND grantor = current_user       LOOP         EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON _sqlx_migrations FROM %I',                        r.grantee);       END LOOP;     END $$";

async fn lock_down_migrations_table(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql(LOCK_DOWN_MIGRATIONS).execute(conn).await?;
    Ok(())
}

/// Whether every migration is applied, unchanged: read-only, so any role
/// that may read the migrations table can ask.
async fn up_to_date(conn: &mut PgConnection) -> bool {
    use sqlx::migrate::Migrate as _;
    let Ok(applied) = conn.list_applied_migrations(&MIGRATOR.table_name).await else {
        // No migrations table yet (or not readable): let the migrator say.
        return false;
    };
    let Ok(None) = conn.dirty_version(&MIGRATOR.table_name).await else {
        return false;
    };
    MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .all(|m| {
            applied
                .iter()
                .any(|a| a.version == m.version && a.checksum == m.checksum)
        })
}

/// The advisory lock key that serializes pruning across replicas.
const PRUNE_LOCK: i64 = 0x7069_6e67_7072_756e; // "pingprun"

async fn prune_locked(conn: &mut PgConnection, older_than_us: i64) -> Result<u64, StoreError> {
    let mut deleted = 0;
    loop {
        // `public IN (TRUE, FALSE)` lets the (public, at_us) index find the
        // old rows.
        let n = sqlx::query(
            "DELETE FROM samples WHERE (channel_name, n) IN (SELECT channel_name, n \
             FROM samples WHERE public IN (TRUE, FALSE) AND at_us < $1 LIMIT $2)",
        )
        .bind(older_than_us)
        .bind(PRUNE_CHUNK)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        deleted += n;
        if n < PRUNE_CHUNK as u64 {
            break;
        }
    }
    sqlx::query(
        "DELETE FROM clients c WHERE c.connected_at_us < $1 AND NOT EXISTS \
         (SELECT 1 FROM samples s WHERE s.channel_name = c.channel_name)",
    )
    .bind(older_than_us)
    .execute(&mut *conn)
    .await?;
    Ok(deleted)
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Binds the client columns, as arrays, to the next five parameters.
fn bind_clients<'q>(q: PgQuery<'q>, clients: &[&ClientRecord]) -> PgQuery<'q> {
    q.bind(
        clients
            .iter()
            .map(|c| c.channel_name.clone())
            .collect::<Vec<_>>(),
    )
    .bind(clients.iter().map(|c| c.public).collect::<Vec<_>>())
    .bind(
        clients
            .iter()
            .map(|c| c.token_digest.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        clients
            .iter()
            .map(|c| c.gateway.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        clients
            .iter()
            .map(|c| c.connected_at_us)
            .collect::<Vec<_>>(),
    )
}

/// Binds the sample columns, as arrays, to the next six parameters.
fn bind_samples<'q>(q: PgQuery<'q>, samples: &[&SampleRecord]) -> PgQuery<'q> {
    q.bind(
        samples
            .iter()
            .map(|s| s.channel_name.clone())
            .collect::<Vec<_>>(),
    )
    .bind(samples.iter().map(|s| to_db(s.n)).collect::<Vec<_>>())
    .bind(samples.iter().map(|s| s.seq.map(to_db)).collect::<Vec<_>>())
    .bind(samples.iter().map(|s| s.at_us).collect::<Vec<_>>())
    .bind(samples.iter().map(|s| s.delay_ms).collect::<Vec<_>>())
    .bind(samples.iter().map(|s| s.public).collect::<Vec<_>>())
}

/// A Postgres database.
#[derive(Clone)]
pub struct PgStore {
    /// Inserts, pruning and the health check's ping.
    pool: PgPool,
    /// History and statistics reads, with their statement timeout.
    reads: PgPool,
}

impl PgStore {
    /// Connects to `url` with the default [`ReadLimits`].
    ///
    /// # Errors
    /// As [`PgStore::connect_with`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, ReadLimits::default()).await
    }

    /// Connects to `url`, applies the migrations (under sqlx's advisory
    /// lock) and opens two small pools: one for inserts, pruning and the
    /// ping, one of `reads.connections` for reads, each read cut off by
    /// `reads.statement_timeout`.
    ///
    /// # Errors
    /// A malformed URL, an unreachable server, or a failed migration.
    pub async fn connect_with(url: &str, reads: ReadLimits) -> Result<Self, StoreError> {
        Self::connect_split(url, None, reads).await
    }

    /// Like [`PgStore::connect_with`], with the migrations applied over
    /// `migrate_url` (the schema owner) when it is given; the pools use
    /// `url` (the runtime role) only. Without `migrate_url`, `url` applies
    /// the migrations that are pending, if any.
    ///
    /// # Errors
    /// As [`PgStore::connect_with`].
    pub async fn connect_split(
        url: &str,
        migrate_url: Option<&str>,
        reads: ReadLimits,
    ) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url)?;
        migrate(migrate_url.unwrap_or(url)).await?;
        let read_opts = opts.clone().options([(
            "statement_timeout",
            reads.statement_timeout.as_millis().max(1).to_string(),
        )]);
        let pool = PgPoolOptions::new()
            // Two inserts in flight, the pruner and the pinger.
            .max_connections(4)
            // Fail fast while the server is down: the caller retries.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(opts)
            .await?;
        let reads = PgPoolOptions::new()
            .max_connections(reads.connections.max(1))
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(read_opts)
            .await?;
        Ok(Self { pool, reads })
    }

    /// The connection pool (tests and tools).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl Store for PgStore {
    async fn insert(&self, batches: &[RecordBatch]) -> Result<InsertOutcome, StoreError> {
        let clients: Vec<&ClientRecord> = batches.iter().flat_map(|b| &b.clients).collect();
        let samples: Vec<&SampleRecord> = batches.iter().flat_map(|b| &b.samples).collect();
        let inserted = if clients.len() <= INSERT_CHUNK && samples.len() <= INSERT_CHUNK {
            let q = bind_samples(bind_clients(sqlx::query(INSERT_BOTH), &clients), &samples);
            q.execute(&self.pool).await?.rows_affected()
        } else {
            let mut tx = self.pool.begin().await?;
            for chunk in clients.chunks(INSERT_CHUNK) {
                bind_clients(sqlx::query(INSERT_CLIENTS), chunk)
                    .execute(&mut *tx)
                    .await?;
            }
            let mut inserted = 0;
            for chunk in samples.chunks(INSERT_CHUNK) {
                inserted += bind_samples(sqlx::query(INSERT_SAMPLES), chunk)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
            inserted
        };
        Ok(InsertOutcome {
            inserted,
            duplicates: samples.len() as u64 - inserted,
        })
    }

    async fn access(&self, channel_name: &str) -> Result<Option<Access>, StoreError> {
        let client: Option<(bool, Option<String>)> =
            sqlx::query_as("SELECT public, token_digest FROM clients WHERE channel_name = $1")
                .bind(channel_name)
                .fetch_optional(&self.reads)
                .await?;
        if let Some(client) = client {
            return Ok(Some(Access::from(client)));
        }
        let public: Option<bool> = sqlx::query_scalar(ACCESS_BY_SAMPLES)
            .bind(channel_name)
            .fetch_optional(&self.reads)
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
             WHERE channel_name = $1 AND at_us >= $2 ORDER BY at_us, n LIMIT $3",
        )
        .bind(channel_name)
        .bind(since_us.unwrap_or(i64::MIN))
        .bind(limit)
        .fetch_all(&self.reads)
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
        let rows: Vec<(i64, i64, f64, f64, f64, f64, f64)> = sqlx::query_as(STATS)
            .bind(window_start(now_us, window))
            .bind(width)
            .fetch_all(&self.reads)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(start_us, count, min, p50, p95, p99, max)| StatsBucket {
                start_us,
                count: count as u64,
                min,
                p50,
                p95,
                p99,
                max,
            })
            .collect())
    }

    async fn prune(&self, older_than_us: i64) -> Result<u64, StoreError> {
        // One replica prunes at a time; the others skip this round instead
        // of deleting the same rows and deadlocking each other.
        let mut conn = self.pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(PRUNE_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Ok(0);
        }
        let pruned = prune_locked(&mut conn, older_than_us).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(PRUNE_LOCK)
            .execute(&mut *conn)
            .await;
        if unlocked.is_err() {
            // Never hand a connection that may still hold the lock back to
            // the pool: closing it ends the session and the lock.
            drop(conn.detach());
        }
        pruned
    }

    async fn ping(&self) -> bool {
        let q = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(
            tokio::time::timeout(Duration::from_secs(2), q).await,
            Ok(Ok(_))
        )
    }
}
