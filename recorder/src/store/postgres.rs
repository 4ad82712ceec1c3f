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

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use services::messages::{
    ClientRecord, HistoryBucket, RecordBatch, SampleRecord, StatsBucket, StoredSample,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres};

use super::block::{self, Sample};
use super::device::{self, DeviceMinuteRow, PairDelta};
use super::tier;
use super::{
    Access, Buckets, History, InsertOutcome, MINUTE_US, Merged, PACK_CLIENTS, PACK_ROWS,
    PRUNE_CHUNK, PackStep, ReadLimits, Rollup, RollupRow, RoomCount, STATS_BLOCKS, STATS_STAGED,
    StagedRow, Store, StoreError, block_keys, bucket_start, bucket_width, fold_blocks,
    merge_blocks, merge_rollups, minute_rollups, own_clients, room_parts, sample_gateways,
    staged_sample, stats_from_rollups, stored_sample, to_db, window_start,
};
use crate::read_budget;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Samples per insert statement.
pub const INSERT_CHUNK: usize = 10_000;

/// New clients and their `channels` rows in one statement. A `channels`
/// row is inserted only when missing, so the identity sequence is not
/// spent on every batch.
const INSERT_CLIENTS: &str = "\
    WITH new_clients AS ( \
        INSERT INTO clients (channel_name, public, token_digest, gateway, connected_at_us) \
        SELECT * FROM UNNEST($1::text[], $2::boolean[], $3::text[], $4::text[], $5::bigint[]) \
        ON CONFLICT (channel_name) DO NOTHING) \
    INSERT INTO channels (channel_name, public) \
    SELECT t.name, bool_and(t.public) FROM UNNEST($6::text[], $7::boolean[]) AS t(name, public) \
    WHERE NOT EXISTS (SELECT 1 FROM channels c WHERE c.channel_name = t.name) \
    GROUP BY t.name ORDER BY t.name \
    ON CONFLICT (channel_name) DO NOTHING";

/// Stages the samples newer than their client's `packed_before_us` and
/// returns the others (late: their block is packed) with a first row
/// `(-1, staged count)`, a row `(-3, refused count)` for the samples
/// whose client's record names another gateway than theirs (`$6`, an
/// index into `$7`, [`super::own_clients`]), a row `(-2, 0, NULL, at_us,
/// delay_ms)` per newly staged sample of a public client (for the room's
/// partial rollups), and a row with a NULL client for a sample whose
/// client row is missing. The no-op `UPDATE` of the fence takes its ROW
/// EXCLUSIVE lock before the statement's snapshot, so packing (SHARE ROW
/// EXCLUSIVE) never runs between reading `packed_before_us` and staging.
const STAGE_SAMPLES: &str = "\
    WITH fence AS (UPDATE sample_pack_fence SET id = id WHERE FALSE RETURNING 1), \
    input AS ( \
        SELECT c.id AS channel_id, c.packed_before_us, t.n, t.seq, t.at_us, t.delay_ms, \
               coalesce(cl.gateway <> ($7::text[])[t.gw + 1], FALSE) AS other_gateway \
        FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::double precision[], \
                    $6::integer[]) AS t(name, n, seq, at_us, delay_ms, gw) \
        LEFT JOIN channels c ON c.channel_name = t.name \
        LEFT JOIN clients cl ON cl.channel_name = t.name), \
    staged AS ( \
        INSERT INTO sample_staging (channel_id, n, seq, at_us, delay_ms) \
        SELECT channel_id, n, seq, at_us, delay_ms FROM input \
        WHERE channel_id IS NOT NULL AND NOT other_gateway AND at_us >= packed_before_us \
        ON CONFLICT DO NOTHING RETURNING channel_id, at_us, delay_ms) \
    SELECT -1 AS channel_id, (SELECT count(*) FROM staged) AS n, NULL::bigint AS seq, \
           0::bigint AS at_us, 0::double precision AS delay_ms \
    UNION ALL \
    SELECT -3, (SELECT count(*) FROM input WHERE other_gateway), NULL, 0, 0 \
    UNION ALL \
    SELECT -2, 0, NULL, s.at_us, s.delay_ms FROM staged s JOIN channels c ON c.id = s.channel_id \
    WHERE c.public \
    UNION ALL \
    SELECT channel_id, n, seq, at_us, delay_ms FROM input \
    WHERE NOT other_gateway AND (channel_id IS NULL OR at_us < packed_before_us)";

/// Upserts the devices of client records (`$1` channel names, `$2` device
/// digests, `$3` connection times) and links their `channels` rows that
/// have no device yet. `DO UPDATE` returns the id of a device another
/// recorder inserted meanwhile too. It takes the fence's ROW EXCLUSIVE lock
/// like staging, so forgetting and pruning devices (under the fence) never
/// run between the upsert and the link.
const LINK_DEVICES: &str = "\
    WITH fence AS (UPDATE sample_pack_fence SET id = id WHERE FALSE RETURNING 1), \
    t AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS t(name, digest, at)), \
    dev AS ( \
        INSERT INTO devices (digest, created_at_us) \
        SELECT digest, min(at) FROM t GROUP BY digest ORDER BY digest \
        ON CONFLICT (digest) DO UPDATE SET digest = excluded.digest RETURNING id, digest) \
    UPDATE channels c SET device_id = dev.id FROM t JOIN dev ON dev.digest = t.digest \
    WHERE c.channel_name = t.name AND c.device_id IS NULL";

/// Deletes the devices left without connections and rollups.
const PRUNE_DEVICES: &str = "\
    DELETE FROM devices d WHERE \
    NOT EXISTS (SELECT 1 FROM channels c WHERE c.device_id = d.id) AND \
    NOT EXISTS (SELECT 1 FROM device_minutes m WHERE m.device_id = d.id) AND \
    NOT EXISTS (SELECT 1 FROM device_hours h WHERE h.device_id = d.id)";

/// Serializes every writer of `sample_blocks` against staging inserts.
const LOCK_FENCE: &str = "LOCK TABLE sample_pack_fence IN SHARE ROW EXCLUSIVE MODE";

const SELECT_BLOCKS: &str = "\
    SELECT channel_id, block_start_us, data FROM sample_blocks \
    WHERE (channel_id, block_start_us) IN (SELECT * FROM UNNEST($1::integer[], $2::bigint[]))";

const UPSERT_BLOCKS: &str = "\
    INSERT INTO sample_blocks (channel_id, block_start_us, samples, data) \
    SELECT * FROM UNNEST($1::integer[], $2::bigint[], $3::integer[], $4::bytea[]) \
    ON CONFLICT (channel_id, block_start_us) \
    DO UPDATE SET samples = excluded.samples, data = excluded.data";

/// The next clients with staged samples after `$1`: a skip scan of the
/// staging primary key, one index probe per client.
const STAGED_CLIENTS: &str = "\
    WITH RECURSIVE c AS ( \
        (SELECT channel_id FROM sample_staging WHERE channel_id > $1 ORDER BY channel_id LIMIT 1) \
        UNION ALL \
        SELECT (SELECT s.channel_id FROM sample_staging s WHERE s.channel_id > c.channel_id \
                ORDER BY s.channel_id LIMIT 1) \
        FROM c WHERE c.channel_id IS NOT NULL) \
    SELECT channel_id FROM c WHERE channel_id IS NOT NULL LIMIT $2";

/// Who may read a client without a `clients` row: its `channels` row.
pub const ACCESS_BY_SAMPLES: &str = "SELECT public FROM channels WHERE channel_name = $1";

/// Blocks per history query: 8 blocks of 600 samples hold most reads.
const HISTORY_BLOCKS: i64 = 8;

/// Reads see one snapshot: packing moves samples between the tables.
const SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// A connection holding the maintenance lock.
struct Locked<'a>(Option<&'a mut PoolConnection<Postgres>>);

/// Takes the advisory lock that serializes maintenance (partitions,
/// pruning) across replicas; `None` when another replica holds it: it
/// skips this round instead of doing the same work and deadlocking.
async fn lock_maintenance(
    conn: &mut PoolConnection<Postgres>,
) -> Result<Option<Locked<'_>>, StoreError> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(PRUNE_LOCK)
        .fetch_one(&mut **conn)
        .await?;
    Ok(locked.then_some(Locked(Some(conn))))
}

impl Locked<'_> {
    fn conn(&mut self) -> &mut PgConnection {
        self.0
            .as_deref_mut()
            .map(|c| &mut **c)
            .expect("locked until unlock")
    }

    /// Releases the lock; a connection that may still hold it is closed
    /// instead of going back to the pool (closing ends the session and
    /// the lock).
    async fn unlock(mut self) {
        let Some(conn) = self.0.take() else { return };
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(PRUNE_LOCK)
            .execute(&mut **conn)
            .await;
        if unlocked.is_err() {
            conn.close_on_drop();
        }
    }
}

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

/// The advisory lock key that serializes maintenance across replicas.
const PRUNE_LOCK: i64 = 0x7069_6e67_7072_756e; // "pingprun"

async fn prune_locked(conn: &mut PgConnection, older_than_us: i64) -> Result<u64, StoreError> {
    let mut deleted = 0u64;
    // Whole days that ended by the cutoff: their partitions go.
    for (name, day) in partitions(conn).await? {
        if day.saturating_add(DAY_US) > older_than_us {
            continue;
        }
        let sql = format!("SELECT coalesce(sum(samples), 0)::bigint FROM {name}");
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query("SELECT pingapp_drop_day_partition($1)")
            .bind(&name)
            .execute(&mut *conn)
            .await?;
        tracing::info!(partition = %name, samples = n, "dropped a day of packed samples");
        deleted += u64::try_from(n).unwrap_or(0);
    }
    // Blocks in the default partition (days without a partition of their
    // own), whole blocks that ended by the cutoff, by an index range.
    let last_start = older_than_us.saturating_sub(block::BLOCK_US);
    loop {
        let counts: Vec<i32> = sqlx::query_scalar(
            "DELETE FROM sample_blocks_default WHERE (channel_id, block_start_us) IN \
             (SELECT channel_id, block_start_us FROM sample_blocks_default \
              WHERE block_start_us <= $1 LIMIT $2) RETURNING samples",
        )
        .bind(last_start)
        .bind(PRUNE_CHUNK / 100)
        .fetch_all(&mut *conn)
        .await?;
        deleted += counts
            .iter()
            .map(|&n| u64::try_from(n).unwrap_or(0))
            .sum::<u64>();
        if (counts.len() as i64) < PRUNE_CHUNK / 100 {
            break;
        }
    }
    loop {
        let n = sqlx::query(
            "DELETE FROM sample_staging WHERE (channel_id, n) IN (SELECT channel_id, n \
             FROM sample_staging WHERE at_us < $1 LIMIT $2)",
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
    // Clients without samples left; under the fence, so a late sample
    // being packed finds its client row.
    let mut tx = conn.begin().await?;
    sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
    sqlx::query(
        "DELETE FROM channels ch WHERE \
         NOT EXISTS (SELECT 1 FROM sample_staging s WHERE s.channel_id = ch.id) AND \
         NOT EXISTS (SELECT 1 FROM sample_blocks b WHERE b.channel_id = ch.id)",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query(
        "DELETE FROM clients c WHERE c.connected_at_us < $1 AND NOT EXISTS \
         (SELECT 1 FROM channels ch WHERE ch.channel_name = c.channel_name)",
    )
    .bind(older_than_us)
    .execute(&mut *conn)
    .await?;
    Ok(deleted)
}

/// A UTC day in µs.
const DAY_US: i64 = 86_400_000_000;

/// Days of partitions created ahead of today.
pub const PARTITIONS_AHEAD: i64 = 2;

/// Past days' partitions created in one maintenance round, at most.
const PARTITIONS_PER_ROUND: usize = 64;

/// The name of the partition of the UTC day starting at `day_us`.
fn partition_name(day_us: i64) -> String {
    let day = chrono::DateTime::from_timestamp_micros(day_us).unwrap_or_default();
    format!("sample_blocks_d{}", day.format("%Y%m%d"))
}

/// The day partitions of `sample_blocks` and their days' starts.
async fn partitions(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, StoreError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'sample_blocks'::regclass",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(names
        .into_iter()
        .filter_map(|name| {
            let digits = name.strip_prefix("sample_blocks_d")?;
            let day = chrono::NaiveDate::parse_from_str(digits, "%Y%m%d").ok()?;
            let start = day.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros();
            // Only names this code writes: the name goes into SQL.
            (partition_name(start) == name).then_some((name, start))
        })
        .collect())
}

/// Creates the partition of the day starting at `day_us`, moving its
/// blocks out of the default partition, under the fence (no block is
/// written meanwhile).
async fn create_partition(conn: &mut PgConnection, day_us: i64) -> Result<(), StoreError> {
    let name = partition_name(day_us);
    let (lo, hi) = (day_us, day_us + DAY_US);
    let mut tx = conn.begin().await?;
    sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
    // DDL through the schema owner's function (migration 0005): the
    // recorder's own role may not run it (docs/security.md, "Postgres").
    sqlx::query("SELECT pingapp_create_day_partition($1, $2, $3)")
        .bind(&name)
        .bind(lo)
        .bind(hi)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(partition = %name, "created a day partition of packed samples");
    Ok(())
}

/// Creates the missing partitions: today and [`PARTITIONS_AHEAD`] days,
/// and past days within `retention` with blocks in the default partition.
async fn ensure_partitions(
    conn: &mut PgConnection,
    now_us: i64,
    retention: Duration,
) -> Result<u32, StoreError> {
    let existing: BTreeSet<i64> = partitions(conn)
        .await?
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let day = |us: i64| us - us.rem_euclid(DAY_US);
    let today = day(now_us);
    let mut wanted: BTreeSet<i64> = (0..=PARTITIONS_AHEAD).map(|d| today + d * DAY_US).collect();
    if !retention.is_zero() {
        let horizon =
            day(now_us.saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX)));
        let waiting: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT block_start_us - block_start_us % $1 FROM sample_blocks_default \
             WHERE block_start_us >= $2 AND block_start_us < $3",
        )
        .bind(DAY_US)
        .bind(horizon.max(0))
        .bind(today)
        .fetch_all(&mut *conn)
        .await?;
        wanted.extend(waiting.into_iter().take(PARTITIONS_PER_ROUND));
    }
    let mut created = 0;
    for d in wanted.difference(&existing) {
        create_partition(conn, *d).await?;
        created += 1;
    }
    Ok(created)
}

fn bind_clients<'q>(
    q: sqlx::query::Query<'q, Postgres, PgArguments>,
    clients: &[&ClientRecord],
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
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

/// Upserts the devices of `clients` and links their connections
/// ([`LINK_DEVICES`]), before any of their samples is staged; nothing to
/// do (no statement) when no record carries a device.
async fn link_devices(
    conn: &mut PgConnection,
    clients: &[&ClientRecord],
) -> Result<(), StoreError> {
    let with_device: Vec<(&ClientRecord, &String)> = clients
        .iter()
        .filter_map(|c| c.device.as_ref().map(|d| (*c, d)))
        .collect();
    for chunk in with_device.chunks(INSERT_CHUNK) {
        sqlx::query(LINK_DEVICES)
            .bind(
                chunk
                    .iter()
                    .map(|(c, _)| c.channel_name.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(chunk.iter().map(|(_, d)| (*d).clone()).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|(c, _)| c.connected_at_us)
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The clients of `samples` and whether all their samples are public.
fn sample_clients(samples: &[&SampleRecord]) -> (Vec<String>, Vec<bool>) {
    let mut by_name: BTreeMap<&str, bool> = BTreeMap::new();
    for s in samples {
        *by_name.entry(&s.channel_name).or_insert(true) &= s.public;
    }
    by_name.into_iter().map(|(n, p)| (n.to_owned(), p)).unzip()
}

/// A row of [`STAGE_SAMPLES`]: a [`StagedRow`] whose client may be missing.
type StageRow = (Option<i32>, i64, Option<i64>, i64, f64);

/// What [`stage`] did with a chunk.
struct Staged {
    /// Samples staged.
    staged: u64,
    /// Samples refused: their client's record names another gateway.
    foreign: u64,
    /// The late samples, for their blocks.
    late: Vec<(i32, Sample)>,
}

/// Stages one chunk (`gateways`: each sample's gateway, an index into
/// `names`) and appends the room's partial minute rollups of its newly
/// staged public samples, in one transaction.
async fn stage(
    conn: &mut PgConnection,
    samples: &[&SampleRecord],
    gateways: &[i32],
    names: &[String],
) -> Result<Staged, StoreError> {
    let mut tx = conn.begin().await?;
    let rows: Vec<StageRow> = sqlx::query_as(STAGE_SAMPLES)
        .bind(
            samples
                .iter()
                .map(|s| s.channel_name.clone())
                .collect::<Vec<_>>(),
        )
        .bind(samples.iter().map(|s| to_db(s.n)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| s.seq.map(to_db)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| s.at_us).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| s.delay_ms).collect::<Vec<_>>())
        .bind(gateways)
        .bind(names)
        .fetch_all(&mut *tx)
        .await?;
    let (mut staged, mut foreign) = (0, 0);
    let mut late = Vec::new();
    let mut public = Vec::new();
    for (channel_id, n, seq, at_us, delay_ms) in rows {
        match channel_id {
            Some(-1) => staged = u64::try_from(n).unwrap_or(0),
            Some(-3) => foreign = u64::try_from(n).unwrap_or(0),
            Some(-2) => public.push((at_us, delay_ms)),
            Some(c) => late.push((
                c,
                Sample {
                    at_us,
                    n,
                    seq,
                    delay_ms,
                },
            )),
            None => return Err(StoreError::ClientVanished),
        }
    }
    append_parts(&mut tx, room_parts(public)).await?;
    tx.commit().await?;
    Ok(Staged {
        staged,
        foreign,
        late,
    })
}

/// Appends the room's partial minute rollups `minutes` ([`tier::PARTS`]).
async fn append_parts(
    conn: &mut PgConnection,
    minutes: BTreeMap<i64, Rollup>,
) -> Result<(), StoreError> {
    let rows = minutes.iter().map(|(m, r)| r.to_row(*m)).collect();
    upsert_room_rows(conn, tier::PARTS, rows).await
}

/// Merges `samples` into their blocks (and their rollups, see
/// [`update_rollups`]); the caller holds the fence. Returns how many were
/// new.
async fn merge_into_blocks(
    conn: &mut PgConnection,
    samples: &[(i32, Sample)],
    room: RoomCount,
) -> Result<u64, StoreError> {
    let (clients, starts) = block_keys(samples);
    let stored: Vec<(i32, i64, Vec<u8>)> = sqlx::query_as(SELECT_BLOCKS)
        .bind(&clients)
        .bind(&starts)
        .fetch_all(&mut *conn)
        .await?;
    let merged = merge_blocks(stored, samples)?;
    let added = merged.added.len() as u64;
    write_blocks(conn, merged, room).await?;
    Ok(added)
}

/// Writes merged blocks and adds the samples new in them to the minute
/// rollups (their devices', and the room's for late samples); the caller
/// holds the fence.
async fn write_blocks(
    conn: &mut PgConnection,
    merged: Merged,
    room: RoomCount,
) -> Result<(), StoreError> {
    let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (c, start, count, data) in merged.rows {
        cols.0.push(c);
        cols.1.push(start);
        cols.2.push(count);
        cols.3.push(data);
    }
    sqlx::query(UPSERT_BLOCKS)
        .bind(cols.0)
        .bind(cols.1)
        .bind(cols.2)
        .bind(cols.3)
        .execute(&mut *conn)
        .await?;
    update_rollups(conn, &merged.added, &merged.pairs, room).await
}

/// Adds the samples of `added` (new in their blocks) of connections with
/// a device, with the `pairs` changes, to their devices' minutes, and,
/// for [`RoomCount::Late`], the public ones to the room's partial
/// rollups; the caller holds the fence, so each sample is added once.
async fn update_rollups(
    conn: &mut PgConnection,
    added: &[(i32, Sample)],
    pairs: &[PairDelta],
    room: RoomCount,
) -> Result<(), StoreError> {
    let mut ids: Vec<i32> = added.iter().map(|(c, _)| *c).collect();
    ids.sort_unstable();
    ids.dedup();
    let channels: Vec<(i32, bool, Option<i32>)> =
        sqlx::query_as("SELECT id, public, device_id FROM channels WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
    let public: BTreeSet<i32> = channels
        .iter()
        .filter(|(_, p, _)| *p)
        .map(|(c, _, _)| *c)
        .collect();
    let devices: std::collections::HashMap<i32, i32> = channels
        .iter()
        .filter_map(|(c, _, d)| d.map(|d| (*c, d)))
        .collect();
    if !devices.is_empty() {
        let minutes = device::device_deltas(added, pairs, &devices);
        update_tier(conn, device::HOURS, device::hour_deltas(&minutes)).await?;
        update_tier(conn, device::MINUTES, minutes).await?;
    }
    match room {
        RoomCount::Staged => Ok(()),
        RoomCount::Late => append_parts(conn, minute_rollups(added, &public)).await,
    }
}

/// Adds `new` to the stored rows of the same keys in the room's `tier`;
/// the caller holds the fence (the only writer of the tiers is the fold).
async fn update_room_tier(
    conn: &mut PgConnection,
    tier: tier::Tier,
    new: BTreeMap<i64, Rollup>,
) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    let keys: Vec<i64> = new.keys().copied().collect();
    let stored: Vec<RollupRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM {} WHERE {} = ANY($1)",
        tier.room_columns(),
        tier.table,
        tier.column
    )))
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await?;
    upsert_room_rows(conn, tier, merge_rollups(stored, new)?).await
}

/// Writes `rows` into the room's `tier`, replacing the rows of the same
/// keys.
async fn upsert_room_rows(
    conn: &mut PgConnection,
    tier: tier::Tier,
    rows: Vec<RollupRow>,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (m, n, min, max, sketch) in rows {
        cols.0.push(m);
        cols.1.push(n);
        cols.2.push(min);
        cols.3.push(max);
        cols.4.push(sketch);
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} ({}) \
         SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::double precision[], \
                              $4::double precision[], $5::bytea[]){}",
        tier.table,
        tier.room_columns(),
        tier.room_on_conflict()
    )))
    .bind(cols.0)
    .bind(cols.1)
    .bind(cols.2)
    .bind(cols.3)
    .bind(cols.4)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The backfill of the coarse room tiers from the minute rows stored
/// before migration 0007 ([`tier::Backfill`]), once: under the packing
/// fence, claimed by deleting the migration's marker in the same
/// transaction, so of several recorders starting together one does it and
/// the others find it done. Every coarse row is recomputed from its
/// minutes (replacing what is there), so it is right whatever packing
/// wrote before.
async fn backfill_room_tiers(pool: &PgPool) -> Result<(), StoreError> {
    let pending: i64 = sqlx::query_scalar(tier::BACKFILL_PENDING)
        .fetch_one(pool)
        .await?;
    if pending == 0 {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
    if sqlx::query(tier::CLAIM_BACKFILL)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 0
    {
        tx.commit().await?;
        return Ok(());
    }
    tier::backfill_pages!(tx, upsert_room_rows);
    tx.commit().await?;
    Ok(())
}

/// The parts of the public samples staged before migration 0008
/// (`room_parts_backfill`, [`tier::backfill_parts`]), once: under the
/// packing fence, the rows deleted and their parts appended in one
/// transaction, so of several recorders starting together one does it and
/// the others find the table empty.
async fn backfill_parts(pool: &PgPool) -> Result<(), StoreError> {
    let pending: bool = sqlx::query_scalar(tier::PARTS_BACKFILL_PENDING)
        .fetch_one(pool)
        .await?;
    if !pending {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
    tier::backfill_parts!(tx, upsert_room_rows);
    tx.commit().await?;
    Ok(())
}

/// Adds `new` to the stored rows of the same keys in `tier`.
async fn update_tier(
    conn: &mut PgConnection,
    tier: device::Tier,
    new: BTreeMap<(i32, i64), device::DeviceMinute>,
) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    let (devices, minutes): (Vec<i32>, Vec<i64>) = new.keys().copied().unzip();
    let select = format!(
        "SELECT {} FROM {} WHERE (device_id, {}) IN \
         (SELECT * FROM UNNEST($1::integer[], $2::bigint[]))",
        tier.columns(),
        tier.table,
        tier.column
    );
    let stored: Vec<DeviceMinuteRow> = sqlx::query_as(sqlx::AssertSqlSafe(select))
        .bind(&devices)
        .bind(&minutes)
        .fetch_all(&mut *conn)
        .await?;
    let rows = device::merge_device_minutes(stored, new)?;
    let mut c = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (d, m, n, sum, min, max, js, jp, sketch) in rows {
        c.0.push(d);
        c.1.push(m);
        c.2.push(n);
        c.3.push(sum);
        c.4.push(min);
        c.5.push(max);
        c.6.push(js);
        c.7.push(jp);
        c.8.push(sketch);
    }
    let upsert = format!(
        "INSERT INTO {} ({}) \
         SELECT * FROM UNNEST($1::integer[], $2::bigint[], $3::bigint[], $4::double precision[], \
                              $5::double precision[], $6::double precision[], \
                              $7::double precision[], $8::bigint[], $9::bytea[]){}",
        tier.table,
        tier.columns(),
        tier.on_conflict()
    );
    sqlx::query(sqlx::AssertSqlSafe(upsert))
        .bind(c.0)
        .bind(c.1)
        .bind(c.2)
        .bind(c.3)
        .bind(c.4)
        .bind(c.5)
        .bind(c.6)
        .bind(c.7)
        .bind(c.8)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// How packing holds back staging inserts (docs/architecture.md, "Why
/// staging and packing cannot race").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Packing {
    /// Reads and encodes without the fence, then takes it only to check
    /// that nothing it read changed and to write: inserts wait for the
    /// writes alone. The default.
    #[default]
    FenceLast,
    /// Under the fence from the start of each transaction (what packing
    /// did before; kept as the fallback, and for the benchmark's baseline
    /// in `recorder/examples/pack_stall.rs`).
    FencedThroughout,
}

/// The staged rows of each `(client, mark)` older than the mark: count
/// and sum of `n` (as text: the sum of bigints is a numeric).
const STAGED_BELOW_MARKS: &str = "\
    SELECT t.c, count(s.n), coalesce(sum(s.n), 0)::text \
    FROM UNNEST($1::integer[], $2::bigint[]) AS t(c, b) \
    LEFT JOIN sample_staging s ON s.channel_id = t.c AND s.at_us < t.b \
    GROUP BY t.c";

/// The blocks of these keys and their sample counts.
const BLOCK_COUNTS: &str = "\
    SELECT channel_id, block_start_us, samples FROM sample_blocks \
    WHERE (channel_id, block_start_us) IN (SELECT * FROM UNNEST($1::integer[], $2::bigint[]))";

/// Per client of `marks`: how many of `samples` it has and the sum of
/// their `n`, as [`STAGED_BELOW_MARKS`] reports them.
fn staged_fingerprint(
    marks: &[(i32, i64)],
    samples: &[(i32, Sample)],
) -> BTreeMap<i32, (i64, String)> {
    let mut sums: BTreeMap<i32, (i64, i128)> = marks.iter().map(|(c, _)| (*c, (0, 0))).collect();
    for (c, s) in samples {
        let e = sums.entry(*c).or_default();
        e.0 += 1;
        e.1 += i128::from(s.n);
    }
    sums.into_iter()
        .map(|(c, (n, sum))| (c, (n, sum.to_string())))
        .collect()
}

/// One packing step over the clients after `after`; `None` when no client
/// has staged samples there.
///
/// The reading, decoding and encoding happen before the fence is taken
/// (a snapshot of the staged rows and their blocks); then, under the
/// fence, a check that the staged rows below the marks and the blocks'
/// sample counts are still what was read (staging only adds rows, block
/// writers only add samples, and both hold the fence to do so), and the
/// writes. When anything changed meanwhile (a sample staged below a mark
/// before its client's `packed_before_us` moved, a late merge or another
/// replica packing the same blocks), the step is done again under the
/// fence throughout ([`pack_step_fenced`]). Staging inserts wait only for
/// the check and the writes.
async fn pack_step(
    pool: &PgPool,
    before: i64,
    after: i32,
) -> Result<Option<(u64, i32)>, StoreError> {
    let mut conn = pool.acquire().await?;
    let Some(step) = plan_pack_step(&mut conn, before, after).await? else {
        return Ok(None);
    };
    let (keys_c, keys_s) = block_keys(&step.samples);
    let stored: Vec<(i32, i64, i32, Vec<u8>)> = sqlx::query_as(
        "SELECT channel_id, block_start_us, samples, data FROM sample_blocks \
         WHERE (channel_id, block_start_us) IN (SELECT * FROM UNNEST($1::integer[], $2::bigint[]))",
    )
    .bind(&keys_c)
    .bind(&keys_s)
    .fetch_all(&mut *conn)
    .await?;
    let counts: BTreeMap<(i32, i64), i32> =
        stored.iter().map(|(c, b, n, _)| ((*c, *b), *n)).collect();
    let merged = merge_blocks(
        stored.into_iter().map(|(c, b, _, d)| (c, b, d)).collect(),
        &step.samples,
    )?;
    let expected = staged_fingerprint(&step.marks, &step.samples);
    let (marked, marks): (Vec<i32>, Vec<i64>) = step.marks.iter().copied().unzip();

    let mut tx = conn.begin().await?;
    sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
    let staged_now: BTreeMap<i32, (i64, String)> = sqlx::query_as(STAGED_BELOW_MARKS)
        .bind(&marked)
        .bind(&marks)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(c, n, sum): (i32, i64, String)| (c, (n, sum)))
        .collect();
    let counts_now: BTreeMap<(i32, i64), i32> = sqlx::query_as(BLOCK_COUNTS)
        .bind(&keys_c)
        .bind(&keys_s)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(c, b, n): (i32, i64, i32)| ((c, b), n))
        .collect();
    if staged_now != expected || counts_now != counts {
        tx.rollback().await?;
        drop(conn);
        tracing::debug!("staged rows or blocks changed while packing; packing under the fence");
        return pack_step_fenced(pool, before, after).await;
    }
    if !merged.rows.is_empty() {
        write_blocks(&mut tx, merged, RoomCount::Staged).await?;
    }
    let moved = move_marks(&mut tx, &step.marks).await?;
    tx.commit().await?;
    Ok(Some((moved, step.next_after)))
}

/// One packing transaction over the clients after `after`, under the
/// fence from its start: staging inserts wait for all of it. `None` when
/// no client has staged samples there. The fallback of [`pack_step`] (and
/// what packing was before, [`Packing::FencedThroughout`]).
async fn pack_step_fenced(
    pool: &PgPool,
    before: i64,
    after: i32,
) -> Result<Option<(u64, i32)>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
    let Some(step) = plan_pack_step(&mut tx, before, after).await? else {
        return Ok(None);
    };
    if !step.samples.is_empty() {
        merge_into_blocks(&mut tx, &step.samples, RoomCount::Staged).await?;
    }
    let moved = move_marks(&mut tx, &step.marks).await?;
    tx.commit().await?;
    Ok(Some((moved, step.next_after)))
}

/// Deletes the staged samples of each `(client, mark)` older than the
/// mark (just packed) and raises the clients' `packed_before_us` to it;
/// the caller holds the fence. Returns how many rows left staging.
async fn move_marks(conn: &mut PgConnection, marks: &[(i32, i64)]) -> Result<u64, StoreError> {
    let (marked, marks): (Vec<i32>, Vec<i64>) = marks.iter().copied().unzip();
    let moved = sqlx::query(
        "DELETE FROM sample_staging s USING UNNEST($1::integer[], $2::bigint[]) AS t(c, b) \
         WHERE s.channel_id = t.c AND s.at_us < t.b",
    )
    .bind(&marked)
    .bind(&marks)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query(
        "UPDATE channels SET packed_before_us = GREATEST(packed_before_us, t.b) \
         FROM UNNEST($1::integer[], $2::bigint[]) AS t(c, b) WHERE id = t.c",
    )
    .bind(&marked)
    .bind(&marks)
    .execute(&mut *conn)
    .await?;
    Ok(moved)
}

/// The next packing step after client `after` ([`PackStep::plan`]) from
/// the staged rows; `None` when no client after `after` has any.
async fn plan_pack_step(
    conn: &mut PgConnection,
    before: i64,
    after: i32,
) -> Result<Option<PackStep>, StoreError> {
    let clients: Vec<i32> = sqlx::query_scalar(STAGED_CLIENTS)
        .bind(after)
        .bind(PACK_CLIENTS)
        .fetch_all(&mut *conn)
        .await?;
    if clients.is_empty() {
        return Ok(None);
    }
    let rows: Vec<StagedRow> = sqlx::query_as(SELECT_STAGED)
        .bind(&clients)
        .bind(before)
        .bind(PACK_ROWS)
        .fetch_all(&mut *conn)
        .await?;
    let rows = rows.into_iter().map(staged_sample).collect();
    Ok(Some(PackStep::plan(&clients, rows, before)))
}

/// The staged rows of clients `$1` older than `$2`, in packing order, at
/// most `$3`.
const SELECT_STAGED: &str = "\
    SELECT channel_id, n, seq, at_us, delay_ms FROM sample_staging \
    WHERE channel_id = ANY($1) AND at_us < $2 ORDER BY channel_id, at_us, n LIMIT $3";

/// A Postgres database.
#[derive(Clone)]
pub struct PgStore {
    /// Inserts, pruning and the health check's ping.
    pool: PgPool,
    /// History and statistics reads, with their statement timeout.
    reads: PgPool,
    /// That statement timeout (`--read-timeout-ms`).
    read_timeout: Duration,
    /// How packing takes the fence.
    packing: Packing,
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
        let reads_limits = reads;
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
        // The read connections are opened in the background (sqlx keeps
        // `min_connections` open), not before the store is returned: a
        // recorder starting against a busy server is ready sooner, and
        // the connections are there for the first reads soon after
        // (opening one on demand, a DNS lookup and a SCRAM handshake in a
        // container, could take longer than the acquire timeout, which
        // answered the first reads after a start 503 in the compose test).
        // They stay open.
        backfill_room_tiers(&pool).await?;
        backfill_parts(&pool).await?;
        let reads = PgPoolOptions::new()
            .max_connections(reads.connections.max(1))
            .min_connections(reads.connections.max(1))
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(read_opts);
        Ok(Self {
            pool,
            reads,
            read_timeout: reads_limits.statement_timeout,
            packing: Packing::default(),
        })
    }

    /// The connection pool (tests and tools).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// This store, packing as `packing` says (benchmarks and tests; the
    /// recorder uses the default).
    pub fn with_packing(mut self, packing: Packing) -> Self {
        self.packing = packing;
        self
    }

    /// A read transaction (one snapshot, [`SNAPSHOT`]) whose statements
    /// stop when the read's budget does ([`crate::read_budget`]): the
    /// earlier of the asker's deadline and the read timeout, by `SET
    /// LOCAL statement_timeout` (no extra round trip without a deadline).
    async fn begin_read(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.reads.begin_with(SNAPSHOT).await?;
        let left = read_budget::time_left(self.read_timeout);
        if left < self.read_timeout {
            // 0 would mean no timeout at all.
            let ms = left.as_millis().max(1);
            sqlx::query("SELECT set_config('statement_timeout', $1, true)")
                .bind(ms.to_string())
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }
}

#[async_trait]
impl Store for PgStore {
    async fn insert(&self, batches: &[RecordBatch]) -> Result<InsertOutcome, StoreError> {
        let (clients, foreign_clients) = own_clients(batches);
        let samples: Vec<&SampleRecord> = batches.iter().flat_map(|b| &b.samples).collect();
        let (gateways, gateway_names) = sample_gateways(batches);
        let mut conn = self.pool.acquire().await?;
        // Client rows first, in statements (transactions) of their own: a
        // row stored twice is harmless, a later failure retries the batch.
        // Usually one statement: the batch's new clients and its samples'
        // clients fit one chunk each.
        let (names, public) = sample_clients(&samples);
        let chunks = clients.len().max(names.len()).div_ceil(INSERT_CHUNK);
        for i in 0..chunks {
            let part = |len: usize| (i * INSERT_CHUNK).min(len)..((i + 1) * INSERT_CHUNK).min(len);
            bind_clients(sqlx::query(INSERT_CLIENTS), &clients[part(clients.len())])
                .bind(&names[part(names.len())])
                .bind(&public[part(public.len())])
                .execute(&mut *conn)
                .await?;
        }
        link_devices(&mut conn, &clients).await?;
        let (mut inserted, mut foreign_samples) = (0, 0);
        let mut late = Vec::new();
        for (chunk, gateways) in samples
            .chunks(INSERT_CHUNK)
            .zip(gateways.chunks(INSERT_CHUNK))
        {
            let staged = stage(&mut conn, chunk, gateways, &gateway_names).await?;
            inserted += staged.staged;
            foreign_samples += staged.foreign;
            late.extend(staged.late);
        }
        if !late.is_empty() {
            let mut tx = conn.begin().await?;
            sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
            let (mut clients, _) = block_keys(&late);
            clients.dedup();
            let found: i64 = sqlx::query_scalar("SELECT count(*) FROM channels WHERE id = ANY($1)")
                .bind(&clients)
                .fetch_one(&mut *tx)
                .await?;
            if found != clients.len() as i64 {
                return Err(StoreError::ClientVanished);
            }
            inserted += merge_into_blocks(&mut tx, &late, RoomCount::Late).await?;
            tx.commit().await?;
        }
        Ok(InsertOutcome {
            inserted,
            duplicates: samples.len() as u64 - inserted - foreign_samples,
            foreign_samples,
            foreign_clients,
        })
    }

    async fn access(&self, channel_name: &str) -> Result<Option<Access>, StoreError> {
        // In a read transaction too: it stops at the read's deadline.
        let mut tx = self.begin_read().await?;
        let client: Option<(bool, Option<String>)> =
            sqlx::query_as("SELECT public, token_digest FROM clients WHERE channel_name = $1")
                .bind(channel_name)
                .fetch_optional(&mut *tx)
                .await?;
        let access = match client {
            Some(client) => Some(Access::from(client)),
            None => sqlx::query_scalar(ACCESS_BY_SAMPLES)
                .bind(channel_name)
                .fetch_optional(&mut *tx)
                .await?
                .map(Access::without_token),
        };
        tx.commit().await?;
        Ok(access)
    }

    async fn read_history(
        &self,
        channel_name: &str,
        since_us: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSample>, StoreError> {
        let mut history = History::new(since_us, limit);
        // One snapshot: packing moves samples from staging to blocks.
        let mut tx = self.begin_read().await?;
        let id: Option<i32> = sqlx::query_scalar("SELECT id FROM channels WHERE channel_name = $1")
            .bind(channel_name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else {
            return Ok(Vec::new());
        };
        let mut from = history.first_block();
        while history.remaining() > 0 {
            let blocks: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT block_start_us, data FROM sample_blocks \
                 WHERE channel_id = $1 AND block_start_us >= $2 \
                 ORDER BY block_start_us LIMIT $3",
            )
            .bind(id)
            .bind(from)
            .bind(HISTORY_BLOCKS)
            .fetch_all(&mut *tx)
            .await?;
            for (_, data) in &blocks {
                history.push_block(data)?;
            }
            match blocks.last() {
                Some((start, _)) if blocks.len() as i64 == HISTORY_BLOCKS => from = start + 1,
                _ => break,
            }
        }
        if history.remaining() > 0 {
            let rows: Vec<(i64, f64, Option<i64>)> = sqlx::query_as(
                "SELECT at_us, delay_ms, seq FROM sample_staging \
                 WHERE channel_id = $1 AND at_us >= $2 ORDER BY at_us, n LIMIT $3",
            )
            .bind(id)
            .bind(history.since())
            .bind(history.remaining() as i64)
            .fetch_all(&mut *tx)
            .await?;
            history.samples.extend(rows.into_iter().map(stored_sample));
        }
        tx.commit().await?;
        Ok(history.samples)
    }

    async fn stats(
        &self,
        window: Duration,
        bucket: Duration,
        now_us: i64,
    ) -> Result<Vec<StatsBucket>, StoreError> {
        let width = bucket_width(bucket)?;
        let since = window_start(now_us, window);
        let mut tx = self.begin_read().await?;
        if width % MINUTE_US == 0 {
            let first = bucket_start(since, MINUTE_US);
            let rollups = tier::read_room_rollups!(tx, width, first);
            tx.commit().await?;
            return stats_from_rollups(width, rollups);
        }
        let staged: Vec<(i64, f64)> = sqlx::query_as(STATS_STAGED)
            .bind(since)
            .fetch_all(&mut *tx)
            .await?;
        let buckets = Buckets::new(since, width, staged);
        let first = buckets.first_block();
        let stats = fold_blocks(
            buckets,
            sqlx::query_as(STATS_BLOCKS).bind(first).fetch(&mut *tx),
        )
        .await?;
        tx.commit().await?;
        Ok(stats)
    }

    async fn fold_room_parts(&self) -> Result<u64, StoreError> {
        let mut folded = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
            let n = tier::fold_page!(tx, update_room_tier);
            tx.commit().await?;
            folded += n;
            if n < tier::FOLD_PAGE as u64 {
                return Ok(folded);
            }
        }
    }

    async fn pack_step(
        &self,
        before_us: i64,
        after: i32,
    ) -> Result<Option<(u64, i32)>, StoreError> {
        match self.packing {
            Packing::FenceLast => pack_step(&self.pool, before_us, after).await,
            Packing::FencedThroughout => pack_step_fenced(&self.pool, before_us, after).await,
        }
    }

    async fn device_history(
        &self,
        device: &str,
        window: Duration,
        bucket: Duration,
        now_us: i64,
    ) -> Result<Option<Vec<HistoryBucket>>, StoreError> {
        let (width, first, end) = device::window(now_us, window, bucket)?;
        // One snapshot: packing moves samples from staging into rollups.
        let tx = self.begin_read().await?;
        device::read_device_history!(tx, device, width, first, end)
    }

    async fn forget_device(&self, device: &str) -> Result<Option<u64>, StoreError> {
        // On the read pool: a request from the API, under the read budget
        // and statement timeout, never holding a connection of inserts.
        let mut tx = self.reads.begin().await?;
        // Under the fence: no packing or late merge runs meanwhile, and no
        // insert stages a sample or links a connection to this device.
        sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
        let id: Option<i32> = sqlx::query_scalar(device::DEVICE_ID)
            .bind(device)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else {
            tx.commit().await?;
            return Ok(None);
        };
        let channels: Vec<(i32, String)> =
            sqlx::query_as("SELECT id, channel_name FROM channels WHERE device_id = $1")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        let (ids, names): (Vec<i32>, Vec<String>) = channels.into_iter().unzip();
        for sql in [
            "DELETE FROM sample_blocks WHERE channel_id = ANY($1)",
            "DELETE FROM sample_staging WHERE channel_id = ANY($1)",
            "DELETE FROM channels WHERE id = ANY($1)",
        ] {
            sqlx::query(sql).bind(&ids).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM clients WHERE channel_name = ANY($1)")
            .bind(&names)
            .execute(&mut *tx)
            .await?;
        for sql in [
            device::MINUTES.forget_sql(),
            device::HOURS.forget_sql(),
            "DELETE FROM devices WHERE id = $1".to_owned(),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Some(ids.len() as u64))
    }

    async fn prune_rollups(&self, older_than_us: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for sql in [
            tier::ROOM[0].prune_sql(),
            tier::ROOM[1].prune_sql(),
            tier::ROOM[2].prune_sql(),
            tier::PARTS.prune_sql(),
            device::MINUTES.prune_sql(),
            device::HOURS.prune_sql(),
        ] {
            deleted += sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(older_than_us)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        // Under the fence, so no insert links a connection to a device
        // this finds without any.
        let mut tx = self.pool.begin().await?;
        sqlx::query(LOCK_FENCE).execute(&mut *tx).await?;
        sqlx::query(PRUNE_DEVICES).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn maintain_partitions(
        &self,
        now_us: i64,
        retention: Duration,
    ) -> Result<u32, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let Some(mut conn) = lock_maintenance(&mut conn).await? else {
            return Ok(0);
        };
        let created = ensure_partitions(conn.conn(), now_us, retention).await;
        conn.unlock().await;
        created
    }

    async fn prune(&self, older_than_us: i64) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let Some(mut conn) = lock_maintenance(&mut conn).await? else {
            return Ok(0);
        };
        let pruned = prune_locked(conn.conn(), older_than_us).await;
        conn.unlock().await;
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
