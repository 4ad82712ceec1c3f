//! The SQLite store of the standalone binary: one file in WAL mode, so
//! history and statistics reads run beside the single writer. SQLite has no
//! statement timeout: a progress handler interrupts a read that runs past
//! the read timeout ([`ReadLimits::statement_timeout`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use services::messages::SampleRecord;
use services::messages::{ClientRecord, HistoryBucket, RecordBatch, StatsBucket, StoredSample};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection as _, QueryBuilder, Sqlite, SqliteConnection};

use super::block::{self, Sample};
use super::device::{self, DeviceMinuteRow, PairDelta};
use super::tier;
use super::{
    Access, Buckets, History, InsertOutcome, MINUTE_US, PACK_CLIENTS, PACK_ROWS, PRUNE_CHUNK,
    PackStep, ReadLimits, Rollup, RollupRow, RoomCount, STATS_BLOCKS, STATS_STAGED, StagedRow,
    Store, StoreError, block_keys, bucket_start, bucket_width, fold_blocks, merge_blocks,
    merge_rollups, minute_rollups, own_clients, room_parts, staged_sample, stats_from_rollups,
    stored_sample, to_sample, window_start,
};
use crate::read_budget;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per statement: 5 or 6 parameters a row stays well under SQLite's
/// limit of 32,766 parameters a statement.
const INSERT_CHUNK: usize = 1_000;

/// SQLite virtual-machine steps between two checks of a read's deadline.
const PROGRESS_STEPS: i32 = 10_000;

/// A SQLite database file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// How long one read may run: SQLite has no `statement_timeout`, so a
    /// progress handler interrupts a read past it (SQLITE_INTERRUPT).
    read_timeout: Duration,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url`, e.g.
    /// `sqlite://pingapp.db` or `sqlite::memory:`, and applies the
    /// migrations.
    ///
    /// # Errors
    /// A malformed URL, an unusable file, or a failed migration.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, ReadLimits::default()).await
    }

    /// Like [`SqliteStore::connect`], every read cut off after
    /// `reads.statement_timeout` (`reads.connections` does not apply: the
    /// recorder's read budget bounds the reads at once).
    ///
    /// # Errors
    /// As [`SqliteStore::connect`].
    pub async fn connect_with(url: &str, reads: ReadLimits) -> Result<Self, StoreError> {
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
            // A read that was cut off or abandoned leaves its deadline
            // behind: no other use of the connection inherits it.
            .before_acquire(|conn, _| {
                Box::pin(async move {
                    conn.lock_handle().await?.remove_progress_handler();
                    Ok(true)
                })
            })
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        backfill_room_tiers(&pool).await?;
        backfill_parts(&pool).await?;
        Ok(Self {
            pool,
            read_timeout: reads.statement_timeout,
        })
    }

    /// A connection for one read, interrupted once the read's budget is
    /// spent ([`crate::read_budget`]): the earlier of the asker's deadline
    /// and the read timeout, or as soon as nobody waits for the answer.
    async fn read_conn(&self) -> Result<PoolConnection<Sqlite>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let deadline = Instant::now() + read_budget::time_left(self.read_timeout);
        let cancel = read_budget::cancellation();
        conn.lock_handle()
            .await?
            .set_progress_handler(PROGRESS_STEPS, move || {
                Instant::now() < deadline && !cancel.as_ref().is_some_and(|c| c.is_cancelled())
            });
        Ok(conn)
    }

    /// The connection pool (tests and tools).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Opens a write transaction at once (`BEGIN IMMEDIATE`): a deferred one
/// that reads first would fail instead of waiting when another writer
/// committed meanwhile.
async fn begin_write(pool: &SqlitePool) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
    Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
}

/// Merges `samples` into their blocks (and their rollups, see
/// [`update_rollups`]); returns how many were new.
async fn merge_into_blocks(
    conn: &mut SqliteConnection,
    samples: &[(i32, Sample)],
    room: RoomCount,
) -> Result<u64, StoreError> {
    let (clients, starts) = block_keys(samples);
    let keys: Vec<(i32, i64)> = clients.into_iter().zip(starts).collect();
    let mut stored = Vec::new();
    for chunk in keys.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT channel_id, block_start_us, data FROM sample_blocks \
             WHERE (channel_id, block_start_us) IN (",
        );
        qb.push_values(chunk, |mut row, (c, b)| {
            row.push_bind(*c).push_bind(*b);
        });
        qb.push(")");
        stored.extend(
            qb.build_query_as::<(i32, i64, Vec<u8>)>()
                .fetch_all(&mut *conn)
                .await?,
        );
    }
    let merged = merge_blocks(stored, samples)?;
    for chunk in merged.rows.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO sample_blocks (channel_id, block_start_us, samples, data) ",
        );
        qb.push_values(chunk, |mut row, (c, b, n, data)| {
            row.push_bind(*c)
                .push_bind(*b)
                .push_bind(*n)
                .push_bind(data.clone());
        });
        qb.push(
            " ON CONFLICT (channel_id, block_start_us) \
             DO UPDATE SET samples = excluded.samples, data = excluded.data",
        );
        qb.build().execute(&mut *conn).await?;
    }
    update_rollups(conn, &merged.added, &merged.pairs, room).await?;
    Ok(merged.added.len() as u64)
}

/// Adds the samples of `added` (new in their blocks) of connections with
/// a device, with the `pairs` changes, to their devices' minutes, and,
/// for [`RoomCount::Late`], the public ones to the room's partial
/// rollups, in the caller's write transaction.
async fn update_rollups(
    conn: &mut SqliteConnection,
    added: &[(i32, Sample)],
    pairs: &[PairDelta],
    room: RoomCount,
) -> Result<(), StoreError> {
    let ids: BTreeSet<i32> = added.iter().map(|(c, _)| *c).collect();
    let mut public = BTreeSet::new();
    let mut devices = HashMap::new();
    let ids: Vec<i32> = ids.into_iter().collect();
    for chunk in ids.chunks(INSERT_CHUNK) {
        let mut qb =
            QueryBuilder::<Sqlite>::new("SELECT id, public, device_id FROM channels WHERE id IN (");
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        qb.push(")");
        let rows: Vec<(i32, bool, Option<i32>)> = qb.build_query_as().fetch_all(&mut *conn).await?;
        for (id, p, d) in rows {
            if p {
                public.insert(id);
            }
            if let Some(d) = d {
                devices.insert(id, d);
            }
        }
    }
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

/// Appends the room's partial minute rollups `minutes` ([`tier::PARTS`]).
async fn append_parts(
    conn: &mut SqliteConnection,
    minutes: BTreeMap<i64, Rollup>,
) -> Result<(), StoreError> {
    let rows = minutes.iter().map(|(m, r)| r.to_row(*m)).collect();
    upsert_room_rows(conn, tier::PARTS, rows).await
}

/// Adds `new` to the stored rows of the same keys in the room's `tier`.
async fn update_room_tier(
    conn: &mut SqliteConnection,
    tier: tier::Tier,
    new: BTreeMap<i64, Rollup>,
) -> Result<(), StoreError> {
    let keys: Vec<i64> = new.keys().copied().collect();
    let mut stored: Vec<RollupRow> = Vec::new();
    for chunk in keys.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {} FROM {} WHERE {} IN (",
            tier.room_columns(),
            tier.table,
            tier.column
        ));
        let mut list = qb.separated(", ");
        for k in chunk {
            list.push_bind(*k);
        }
        qb.push(")");
        stored.extend(
            qb.build_query_as::<RollupRow>()
                .fetch_all(&mut *conn)
                .await?,
        );
    }
    upsert_room_rows(conn, tier, merge_rollups(stored, new)?).await
}

/// Writes `rows` into the room's `tier`, replacing the rows of the same
/// keys.
async fn upsert_room_rows(
    conn: &mut SqliteConnection,
    tier: tier::Tier,
    rows: Vec<RollupRow>,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "INSERT INTO {} ({}) ",
            tier.table,
            tier.room_columns()
        ));
        qb.push_values(chunk, |mut row, (m, n, min, max, sketch)| {
            row.push_bind(*m)
                .push_bind(*n)
                .push_bind(*min)
                .push_bind(*max)
                .push_bind(sketch.clone());
        });
        qb.push(tier.room_on_conflict());
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// The backfill of the coarse room tiers from the minute rows stored
/// before migration 0007 ([`tier::Backfill`]), once, in one write
/// transaction (one writer at a time: no packing meanwhile) that deletes
/// the migration's marker.
async fn backfill_room_tiers(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = begin_write(pool).await?;
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
/// ([`tier::backfill_parts`]), once, in one write transaction.
async fn backfill_parts(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = begin_write(pool).await?;
    tier::backfill_parts!(tx, upsert_room_rows);
    tx.commit().await?;
    Ok(())
}

/// Adds `new` to the stored rows of the same keys in `tier`.
async fn update_tier(
    conn: &mut SqliteConnection,
    tier: device::Tier,
    new: BTreeMap<(i32, i64), device::DeviceMinute>,
) -> Result<(), StoreError> {
    let keys: Vec<(i32, i64)> = new.keys().copied().collect();
    let mut stored: Vec<DeviceMinuteRow> = Vec::new();
    for chunk in keys.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {} FROM {} WHERE (device_id, {}) IN (",
            tier.columns(),
            tier.table,
            tier.column
        ));
        qb.push_values(chunk, |mut row, (d, m)| {
            row.push_bind(*d).push_bind(*m);
        });
        qb.push(")");
        stored.extend(qb.build_query_as().fetch_all(&mut *conn).await?);
    }
    let rows = device::merge_device_minutes(stored, new)?;
    // 9 parameters a row.
    for chunk in rows.chunks(INSERT_CHUNK / 2) {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "INSERT INTO {} ({}) ",
            tier.table,
            tier.columns()
        ));
        qb.push_values(
            chunk,
            |mut row, (d, m, n, sum, min, max, js, jp, sketch)| {
                row.push_bind(*d)
                    .push_bind(*m)
                    .push_bind(*n)
                    .push_bind(*sum)
                    .push_bind(*min)
                    .push_bind(*max)
                    .push_bind(*js)
                    .push_bind(*jp)
                    .push_bind(sketch.clone());
            },
        );
        qb.push(tier.on_conflict());
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Upserts the devices of `clients` and links their connections that have
/// no device yet, in the caller's write transaction, before any of their
/// samples is packed.
async fn link_devices(
    conn: &mut SqliteConnection,
    clients: &[&ClientRecord],
) -> Result<(), StoreError> {
    let with_device: Vec<(&ClientRecord, &String)> = clients
        .iter()
        .filter_map(|c| c.device.as_ref().map(|d| (*c, d)))
        .collect();
    for chunk in with_device.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new("INSERT INTO devices (digest, created_at_us) ");
        qb.push_values(chunk, |mut row, (c, d)| {
            row.push_bind((*d).clone()).push_bind(c.connected_at_us);
        });
        qb.push(" ON CONFLICT (digest) DO NOTHING");
        qb.build().execute(&mut *conn).await?;
    }
    for (c, d) in with_device {
        sqlx::query(
            "UPDATE channels SET device_id = (SELECT id FROM devices WHERE digest = ?) \
             WHERE channel_name = ? AND device_id IS NULL",
        )
        .bind(d)
        .bind(&c.channel_name)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// By client id: its `channels` id, `packed_before_us`, and the gateway
/// its stored record names (none without a record).
type ChannelIds = HashMap<String, (i32, i64, Option<String>)>;

/// The ids, `packed_before_us` and stored records' gateways of the
/// clients of `samples`, creating the missing `channels` rows, and which
/// of those ids are public.
async fn channel_ids(
    conn: &mut SqliteConnection,
    samples: &[&SampleRecord],
) -> Result<(ChannelIds, BTreeSet<i32>), StoreError> {
    let mut public: BTreeMap<&str, bool> = BTreeMap::new();
    for s in samples {
        *public.entry(&s.channel_name).or_insert(true) &= s.public;
    }
    let names: Vec<(&str, bool)> = public.into_iter().collect();
    let mut ids = HashMap::with_capacity(names.len());
    let mut public_ids = BTreeSet::new();
    for chunk in names.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new("INSERT INTO channels (channel_name, public) ");
        qb.push_values(chunk, |mut row, (name, public)| {
            row.push_bind(name.to_string()).push_bind(*public);
        });
        qb.push(" ON CONFLICT (channel_name) DO NOTHING");
        qb.build().execute(&mut *conn).await?;
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT ch.channel_name, ch.id, ch.packed_before_us, ch.public, cl.gateway \
             FROM channels ch LEFT JOIN clients cl ON cl.channel_name = ch.channel_name \
             WHERE ch.channel_name IN (",
        );
        let mut list = qb.separated(", ");
        for (name, _) in chunk {
            list.push_bind(name.to_string());
        }
        qb.push(")");
        let rows: Vec<(String, i32, i64, bool, Option<String>)> =
            qb.build_query_as().fetch_all(&mut *conn).await?;
        for (name, id, mark, public, gateway) in rows {
            if public {
                public_ids.insert(id);
            }
            ids.insert(name, (id, mark, gateway));
        }
    }
    Ok((ids, public_ids))
}

/// One packing transaction over the clients after `after`; `None` when no
/// client has staged samples there.
async fn pack_step(
    pool: &SqlitePool,
    before: i64,
    after: i32,
) -> Result<Option<(u64, i32)>, StoreError> {
    let mut tx = begin_write(pool).await?;
    let clients: Vec<i32> = sqlx::query_scalar(
        "SELECT DISTINCT channel_id FROM sample_staging WHERE channel_id > ? \
         ORDER BY channel_id LIMIT ?",
    )
    .bind(after)
    .bind(PACK_CLIENTS)
    .fetch_all(&mut *tx)
    .await?;
    if clients.is_empty() {
        return Ok(None);
    }
    let mut qb = QueryBuilder::<Sqlite>::new(
        "SELECT channel_id, n, seq, at_us, delay_ms FROM sample_staging WHERE channel_id IN (",
    );
    let mut list = qb.separated(", ");
    for c in &clients {
        list.push_bind(*c);
    }
    qb.push(") AND at_us < ")
        .push_bind(before)
        .push(" ORDER BY channel_id, at_us, n LIMIT ")
        .push_bind(PACK_ROWS);
    let rows: Vec<StagedRow> = qb.build_query_as().fetch_all(&mut *tx).await?;
    let rows = rows.into_iter().map(staged_sample).collect();
    let step = PackStep::plan(&clients, rows, before);
    if !step.samples.is_empty() {
        merge_into_blocks(&mut tx, &step.samples, RoomCount::Staged).await?;
    }
    let mut moved = 0;
    for (c, mark) in &step.marks {
        moved += sqlx::query("DELETE FROM sample_staging WHERE channel_id = ? AND at_us < ?")
            .bind(c)
            .bind(mark)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("UPDATE channels SET packed_before_us = max(packed_before_us, ?) WHERE id = ?")
            .bind(mark)
            .bind(c)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Some((moved, step.next_after)))
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, batches: &[RecordBatch]) -> Result<InsertOutcome, StoreError> {
        let mut tx = begin_write(&self.pool).await?;
        let (clients, foreign_clients) = own_clients(batches);
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
        let samples: Vec<&SampleRecord> = batches.iter().flat_map(|b| &b.samples).collect();
        let (ids, public_ids) = channel_ids(&mut tx, &samples).await?;
        link_devices(&mut tx, &clients).await?;
        let mut staged = Vec::with_capacity(samples.len());
        let mut late = Vec::new();
        let mut foreign_samples = 0;
        for b in batches {
            for s in &b.samples {
                let (id, mark, gateway) = &ids[s.channel_name.as_str()];
                if gateway.as_ref().is_some_and(|g| *g != b.gateway) {
                    foreign_samples += 1;
                } else if s.at_us >= *mark {
                    staged.push((*id, to_sample(s)));
                } else {
                    late.push((*id, to_sample(s)));
                }
            }
        }
        let mut inserted = 0;
        let mut public = Vec::new();
        for chunk in staged.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO sample_staging (channel_id, n, seq, at_us, delay_ms) ",
            );
            qb.push_values(chunk, |mut row, (c, s)| {
                row.push_bind(*c)
                    .push_bind(s.n)
                    .push_bind(s.seq)
                    .push_bind(s.at_us)
                    .push_bind(s.delay_ms);
            });
            qb.push(" ON CONFLICT DO NOTHING RETURNING channel_id, at_us, delay_ms");
            let new: Vec<(i32, i64, f64)> = qb.build_query_as().fetch_all(&mut *tx).await?;
            inserted += new.len() as u64;
            public.extend(
                new.into_iter()
                    .filter(|(c, _, _)| public_ids.contains(c))
                    .map(|(_, at, d)| (at, d)),
            );
        }
        append_parts(&mut tx, room_parts(public)).await?;
        if !late.is_empty() {
            inserted += merge_into_blocks(&mut tx, &late, RoomCount::Late).await?;
        }
        tx.commit().await?;
        Ok(InsertOutcome {
            inserted,
            duplicates: samples.len() as u64 - inserted - foreign_samples,
            foreign_samples,
            foreign_clients,
        })
    }

    async fn access(&self, channel_name: &str) -> Result<Option<Access>, StoreError> {
        let mut conn = self.read_conn().await?;
        let client: Option<(bool, Option<String>)> =
            sqlx::query_as("SELECT public, token_digest FROM clients WHERE channel_name = ?")
                .bind(channel_name)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(client) = client {
            return Ok(Some(Access::from(client)));
        }
        let public: Option<bool> =
            sqlx::query_scalar("SELECT public FROM channels WHERE channel_name = ?")
                .bind(channel_name)
                .fetch_optional(&mut *conn)
                .await?;
        Ok(public.map(Access::without_token))
    }

    async fn read_history(
        &self,
        channel_name: &str,
        since_us: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSample>, StoreError> {
        let mut history = History::new(since_us, limit);
        // One read transaction, one snapshot: packing moves samples.
        let mut conn = self.read_conn().await?;
        let mut tx = conn.begin().await?;
        let id: Option<i32> = sqlx::query_scalar("SELECT id FROM channels WHERE channel_name = ?")
            .bind(channel_name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else {
            return Ok(Vec::new());
        };
        let mut blocks = sqlx::query_as::<_, (Vec<u8>,)>(
            "SELECT data FROM sample_blocks WHERE channel_id = ? AND block_start_us >= ? \
             ORDER BY block_start_us",
        )
        .bind(id)
        .bind(history.first_block())
        .fetch(&mut *tx);
        while history.remaining() > 0 {
            match blocks.try_next().await? {
                Some((data,)) => history.push_block(&data)?,
                None => break,
            }
        }
        drop(blocks);
        if history.remaining() > 0 {
            let rows: Vec<(i64, f64, Option<i64>)> = sqlx::query_as(
                "SELECT at_us, delay_ms, seq FROM sample_staging \
                 WHERE channel_id = ? AND at_us >= ? ORDER BY at_us, n LIMIT ?",
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
        let mut conn = self.read_conn().await?;
        let mut tx = conn.begin().await?;
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
            let mut tx = begin_write(&self.pool).await?;
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
        pack_step(&self.pool, before_us, after).await
    }

    async fn device_history(
        &self,
        device: &str,
        window: Duration,
        bucket: Duration,
        now_us: i64,
    ) -> Result<Option<Vec<HistoryBucket>>, StoreError> {
        let (width, first, end) = device::window(now_us, window, bucket)?;
        // One read transaction, one snapshot: packing moves samples.
        let mut conn = self.read_conn().await?;
        let tx = conn.begin().await?;
        device::read_device_history!(tx, device, width, first, end)
    }

    async fn forget_device(&self, device: &str) -> Result<Option<u64>, StoreError> {
        // One writer at a time: no packing or insert runs meanwhile.
        let mut tx = begin_write(&self.pool).await?;
        let id: Option<i32> = sqlx::query_scalar(device::DEVICE_ID)
            .bind(device)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else {
            tx.commit().await?;
            return Ok(None);
        };
        for sql in [
            "DELETE FROM sample_blocks WHERE channel_id IN \
             (SELECT id FROM channels WHERE device_id = ?)",
            "DELETE FROM sample_staging WHERE channel_id IN \
             (SELECT id FROM channels WHERE device_id = ?)",
            "DELETE FROM clients WHERE channel_name IN \
             (SELECT channel_name FROM channels WHERE device_id = ?)",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        for tier in [device::MINUTES, device::HOURS] {
            sqlx::query(sqlx::AssertSqlSafe(tier.forget_sql()))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let channels = sqlx::query("DELETE FROM channels WHERE device_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM devices WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(channels))
    }

    async fn prune_rollups(&self, older_than_us: i64) -> Result<u64, StoreError> {
        let mut tx = begin_write(&self.pool).await?;
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
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        sqlx::query(
            "DELETE FROM devices WHERE \
             NOT EXISTS (SELECT 1 FROM channels c WHERE c.device_id = devices.id) AND \
             NOT EXISTS (SELECT 1 FROM device_minutes m WHERE m.device_id = devices.id) AND \
             NOT EXISTS (SELECT 1 FROM device_hours h WHERE h.device_id = devices.id)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn prune(&self, older_than_us: i64) -> Result<u64, StoreError> {
        let mut deleted = 0u64;
        let last_start = older_than_us.saturating_sub(block::BLOCK_US);
        loop {
            let counts: Vec<i64> = sqlx::query_scalar(
                "DELETE FROM sample_blocks WHERE rowid IN (SELECT rowid FROM sample_blocks \
                 WHERE block_start_us <= ? LIMIT ?) RETURNING samples",
            )
            .bind(last_start)
            .bind(PRUNE_CHUNK / 100)
            .fetch_all(&self.pool)
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
                 FROM sample_staging WHERE at_us < ? LIMIT ?)",
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
        let mut tx = begin_write(&self.pool).await?;
        sqlx::query(
            "DELETE FROM channels WHERE \
             NOT EXISTS (SELECT 1 FROM sample_staging s WHERE s.channel_id = channels.id) AND \
             NOT EXISTS (SELECT 1 FROM sample_blocks b WHERE b.channel_id = channels.id)",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM clients WHERE connected_at_us < ? AND NOT EXISTS \
             (SELECT 1 FROM channels ch WHERE ch.channel_name = clients.channel_name)",
        )
        .bind(older_than_us)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
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
