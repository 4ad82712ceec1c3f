//! The `--scale` mode of the `storage_bytes` example: the cost of the
//! API's reads at 1M, 10M and 100M samples (or any sizes) in one run,
//! on packed data generated straight into the recorder's layout.
//!
//! # The data
//! One fresh database with the recorder's migrations. Time runs over
//! [`SPAN_DAYS`] days (the widest statistics window, so the widest
//! query reads its whole 44,640 minute rows at every size; a recorder
//! keeps minute rollups 400 days by default, so in production that window
//! is always full; raw samples at this age need `--retention 31d`). A
//! *client* is one browser session: [`SESSION_SAMPLES`] samples one a
//! second (an hour; cut short at the end of the span), starting at a
//! uniformly random time of the span. Sizes are reached by adding clients,
//! in the same distribution: 1M samples are ~280 clients (0.4 at a time
//! on average), 100M ~27,800 (37 at a time). Two thirds are public.
//! Delays as the pages send them (thousandths of a ms, 15–25 ms, 2% up
//! to 200 ms more), ±25 ms of jitter on the second.
//!
//! The recorder's state at `now` (the span's end, 7 minutes into a
//! block): every block that ended by `now` − 1 min is packed, the rest is
//! staged (the last 7 minutes of the clients then active); each client's
//! `packed_before_us` is that boundary. Blocks are encoded by the store's
//! own [`block::encode`] and written in time order (as packing writes
//! them) by a binary `COPY` into the day partitions of `sample_blocks`,
//! created by the store's own function; the public room's minute rollups
//! by the store's [`Rollup`] (its sketch), `COPY`ed into `room_minutes`; staged
//! samples into `sample_staging`, and the partial minute rollups of the
//! public ones into `room_minute_parts` as a recorder inserting once a
//! second appends them (a row per second of each size's new clients).
//! Then `VACUUM ANALYZE`.
//!
//! Every client is a browser with a device of its own
//! (docs/architecture.md, "Devices"): its `devices` row, its connection
//! linked to it, and its `device_minutes` and `device_hours` rows
//! computed as packing does (count, sum, extremes, jitter pairs within a
//! block, sketch) from its packed samples. The room's coarser tiers
//! (`room_ten_minutes`, `room_hours`) are the merges of its minutes.
//!
//! # The reads, through the store's own read functions
//! - history: [`Store::samples`] of a random client, `limit=1000`, from a
//!   random time within its session (the access check included);
//! - `/api/stats` ([`Store::stats`]) in every shape [`STATS`] lists: the
//!   widest the API allows (31 days in hourly buckets), the widest in
//!   10-minute and 1-minute buckets, 1 hour in 1-minute buckets, the
//!   widest raw-block read (15 minutes in 10-second buckets), and as the
//!   baseline the plan before the coarser tiers: 31 days from the minute
//!   rows (61-minute buckets divide no coarser tier: 44,640 rows, as
//!   31 days in 10-minute buckets read before);
//! - a device's month: [`Store::device_history`] of a random client's
//!   device over 31 days in 4-hour buckets (the page's month);
//! - as the baseline of the room's partial rollups (migration 0008), the
//!   query every statistics read in whole minutes ran before them on top
//!   of its tier rows: the window's staged public samples.
//!
//! Each size adds its clients to the previous size's data and measures
//! again, so one run gives every size on the same machine state.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use recorder::store::Rollup;
use recorder::store::Store as _;
use recorder::store::block::{self, BLOCK_US, Sample};
use recorder::store::postgres::PgStore;
use services::messages::SamplesQuery;
use sqlx::PgPool;

/// Days of samples: the widest statistics window.
pub const SPAN_DAYS: i64 = 31;
/// Samples of one client (an hour at one a second).
pub const SESSION_SAMPLES: i64 = 3_600;

const SECOND_US: i64 = 1_000_000;
const MINUTE_US: i64 = 60 * SECOND_US;
const DAY_US: i64 = 86_400 * SECOND_US;
/// The span's first day: 2026-01-01.
const BASE_US: i64 = 1_767_225_600_000_000;
/// The recorder's clock: the span's end, 7 minutes into a block.
const NOW_US: i64 = BASE_US + SPAN_DAYS * DAY_US + 7 * MINUTE_US;
/// Samples at or after this are staged (their block ended less than a
/// minute ago, or not at all), the others packed.
const PACKED_BEFORE_US: i64 = NOW_US - 7 * MINUTE_US;

/// Every client's token (a private client's history needs it).
const TOKEN: &str = "bench-token";

/// One client: a session of `samples` samples from `start_us`.
#[derive(Debug, Clone, Copy)]
struct Client {
    id: i32,
    start_us: i64,
    samples: i64,
}

impl Client {
    fn public(&self) -> bool {
        self.id % 3 != 0
    }

    fn name(&self) -> String {
        format!("client{}", self.id)
    }

    /// Its device's digest (a device per client).
    fn device(&self) -> String {
        services::ids::device_digest(&format!("device{}", self.id))
    }

    fn end_us(&self) -> i64 {
        self.start_us + self.samples * SECOND_US
    }

    /// Sample `i`: a pure function of the client and `i`.
    fn sample(&self, i: i64) -> Sample {
        let h = splitmix(((self.id as u64) << 32) ^ i as u64);
        let unit = |bits: u64| (bits & 0xff_ffff) as f64 / f64::from(1u32 << 24);
        let jitter = (unit(h) * 50_000.0) as i64 - 25_000;
        let slow = if unit(h >> 24) < 0.02 {
            200.0 * unit(h >> 40)
        } else {
            0.0
        };
        let delay = 15.0 + 10.0 * unit(h >> 16) + slow;
        Sample {
            at_us: self.start_us + i * SECOND_US + jitter,
            n: i,
            seq: Some(i + 1),
            delay_ms: (delay * 1000.0).round() / 1000.0,
        }
    }

    /// The samples in `[from, to)`, in order.
    fn samples_in(&self, from: i64, to: i64) -> Vec<Sample> {
        let first = ((from - self.start_us - 25_000) / SECOND_US).max(0);
        let last = ((to - self.start_us + 25_000) / SECOND_US + 1).min(self.samples);
        (first..last)
            .map(|i| self.sample(i))
            .filter(|s| s.at_us >= from && s.at_us < to)
            .collect()
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A binary `COPY` stream's rows.
struct CopyRows(Vec<u8>);

impl CopyRows {
    fn new() -> Self {
        let mut buf = b"PGCOPY\n\xff\r\n\0".to_vec();
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Self(buf)
    }
    fn row(&mut self, fields: i16) {
        self.0.extend_from_slice(&fields.to_be_bytes());
    }
    fn field(&mut self, bytes: &[u8]) {
        self.0
            .extend_from_slice(&i32::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
        self.0.extend_from_slice(bytes);
    }
    fn null(&mut self) {
        self.0.extend_from_slice(&(-1i32).to_be_bytes());
    }
    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}

/// `COPY`s `data` (a whole binary stream) with `statement`.
async fn copy(pool: &PgPool, statement: &str, data: Vec<u8>) -> anyhow::Result<u64> {
    let mut conn = pool.acquire().await?;
    let mut copy = conn.copy_in_raw(statement).await?;
    for chunk in data.chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    Ok(copy.finish().await?)
}

/// p50 and p99 of `d`, ms.
fn percentiles(d: &mut [Duration]) -> (f64, f64) {
    d.sort();
    let p = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    (p(0.5), p(0.99))
}

/// The statistics reads timed at each size: label, window and bucket
/// (seconds), and whether the API accepts it
/// ([`services::limits::check_stats`]).
const STATS: [(&str, u64, u64); 6] = [
    ("31 d / 1 h (widest allowed)", 31 * 86_400, 3_600),
    ("7 d / 10 min", 7 * 86_400, 600),
    ("1 d / 1 min", 86_400, 60),
    ("1 h / 1 min", 3_600, 60),
    ("15 min / 10 s (raw blocks)", 900, 10),
    ("31 d / 61 min (minute rows: before)", 31 * 86_400, 61 * 60),
];

/// The baseline read of the room's partial rollups: the staged public
/// samples every whole-minute statistics read took before them.
const STAGED_LABEL: &str = "staged public samples (read before 0008)";

/// One size's figures: p50 and p99 (ms) of each read.
struct Figures {
    samples: i64,
    clients: usize,
    bytes: i64,
    history: (f64, f64),
    stats: Vec<(f64, f64)>,
    device: (f64, f64),
}

/// Runs the scale mode for the cumulative `sizes` (ascending).
pub async fn run(sizes: &[i64], history_reads: usize, stats_reads: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        sizes.windows(2).all(|w| w[0] < w[1]) && sizes.first().is_some_and(|&s| s > 0),
        "--scale takes ascending sizes"
    );
    let db = testkit::fresh_database().await;
    println!("database {}; sizes {sizes:?}", db.name);
    let store = PgStore::connect(&db.url).await.context("migrating")?;
    let pool = store.pool().clone();
    for day in 0..=SPAN_DAYS {
        let lo = BASE_US + day * DAY_US;
        let name = chrono::DateTime::from_timestamp_micros(lo)
            .context("day")?
            .format("sample_blocks_d%Y%m%d")
            .to_string();
        sqlx::query("SELECT pingapp_create_day_partition($1, $2, $3)")
            .bind(name)
            .bind(lo)
            .bind(lo + DAY_US)
            .execute(&pool)
            .await?;
    }
    let mut clients: Vec<Client> = Vec::new();
    let mut minutes: Vec<Rollup> = (0..=SPAN_DAYS * 1440 + 10)
        .map(|_| Rollup::default())
        .collect();
    let mut rng_state = 0x5eed_u64;
    let mut next_random = move || {
        rng_state = splitmix(rng_state);
        rng_state
    };
    let mut total = 0i64;
    let mut figures = Vec::new();
    for &size in sizes {
        // New clients up to `size` samples in all.
        let first_new = clients.len();
        while total < size {
            let start = BASE_US + (next_random() % ((NOW_US - BASE_US) as u64)) as i64;
            let fits = (NOW_US - start) / SECOND_US;
            let samples = SESSION_SAMPLES.min(fits).min(size - total).max(1);
            clients.push(Client {
                id: i32::try_from(clients.len() + 1)?,
                start_us: start,
                samples,
            });
            total += samples;
        }
        let new = &clients[first_new..];
        let t = Instant::now();
        let (written, staged) = write(&pool, new, &mut minutes).await?;
        anyhow::ensure!(
            written + staged == total - figures.last().map_or(0, |f: &Figures| f.samples),
            "wrote {written} + {staged} samples"
        );
        sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await?;
        println!(
            "{size} samples: {} new clients, {written} packed and {staged} staged samples written in {:.1} s",
            new.len(),
            t.elapsed().as_secs_f64()
        );
        let bytes: i64 = sqlx::query_scalar(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c WHERE c.oid IN ( \
               SELECT relid FROM pg_partition_tree('sample_blocks') \
               UNION SELECT unnest(ARRAY['sample_staging', 'channels', 'clients', 'room_minutes', \
                 'room_ten_minutes', 'room_hours', 'room_minute_parts'])::regclass)",
        )
        .fetch_one(&pool)
        .await?;
        let device_bytes: i64 = sqlx::query_scalar(
            "SELECT sum(pg_total_relation_size(c))::bigint FROM \
             unnest(ARRAY['devices', 'device_minutes', 'device_hours']::regclass[]) c",
        )
        .fetch_one(&pool)
        .await?;
        println!(
            "  devices (one per client): {:.2} bytes/sample more",
            device_bytes as f64 / total as f64
        );
        // Reads.
        let mut history = Vec::new();
        for _ in 0..history_reads {
            let c = clients[(next_random() % clients.len() as u64) as usize];
            let since = c.start_us + (next_random() % (c.end_us() - c.start_us) as u64) as i64;
            let t = Instant::now();
            let got = store
                .samples(&SamplesQuery {
                    channel_name: c.name(),
                    token_digest: Some(services::ids::token_digest(TOKEN)),
                    since_us: Some(since),
                    limit: 1000,
                    deadline_unix_ms: None,
                })
                .await?
                .context("a generated client is not found")?;
            history.push(t.elapsed());
            let expected = c.samples_in(since, i64::MAX).len().min(1000);
            anyhow::ensure!(
                got.len() == expected,
                "history of {}: {} samples, {expected} expected",
                c.name(),
                got.len()
            );
        }
        let mut stats = Vec::new();
        for (label, window, bucket) in STATS {
            let (window, bucket) = (Duration::from_secs(window), Duration::from_secs(bucket));
            let allowed = services::limits::check_stats(window, bucket).is_ok();
            let mut took = Vec::new();
            let mut got = Vec::new();
            for _ in 0..stats_reads {
                let t = Instant::now();
                got = store.stats(window, bucket, NOW_US).await?;
                took.push(t.elapsed());
            }
            let buckets = got.len();
            if bucket.as_secs() % 60 == 0 {
                // Every public sample of the window counted once: the
                // packed ones from the tiers, the staged ones from parts.
                let from = NOW_US - window.as_micros() as i64;
                let from = from - from.rem_euclid(MINUTE_US);
                let expected: u64 = clients
                    .iter()
                    .filter(|c| c.public())
                    .map(|c| c.samples_in(from, i64::MAX).len() as u64)
                    .sum();
                let count: u64 = got.iter().map(|b| b.count).sum();
                anyhow::ensure!(
                    count == expected,
                    "stats {label}: {count} samples, {expected} expected"
                );
            }
            let (p50, p99) = percentiles(&mut took);
            println!(
                "  stats {label} ({buckets} buckets, {}): p50 {p50:.2} p99 {p99:.2} ms",
                if allowed {
                    "allowed"
                } else {
                    "refused by the API"
                }
            );
            stats.push((p50, p99));
        }
        // The baseline of the parts (migration 0008): what every statistics
        // read in whole minutes took before them on top of its tier rows,
        // the window's staged public samples, by the query it ran.
        let mut took = Vec::new();
        let from = NOW_US - 31 * DAY_US;
        let mut staged_rows = 0;
        for _ in 0..stats_reads {
            let t = Instant::now();
            let rows: Vec<(i64, f64)> = sqlx::query_as(
                "SELECT s.at_us, s.delay_ms FROM sample_staging s \
                 JOIN channels c ON c.id = s.channel_id \
                 WHERE c.public AND s.at_us >= $1 ORDER BY s.at_us",
            )
            .bind(from - from.rem_euclid(MINUTE_US))
            .fetch_all(&pool)
            .await?;
            took.push(t.elapsed());
            staged_rows = rows.len();
        }
        let (p50, p99) = percentiles(&mut took);
        println!("  {STAGED_LABEL} ({staged_rows} rows): p50 {p50:.2} p99 {p99:.2} ms");
        stats.push((p50, p99));
        let mut device = Vec::new();
        let month = Duration::from_secs(31 * 86_400);
        for _ in 0..history_reads {
            let c = clients[(next_random() % clients.len() as u64) as usize];
            let t = Instant::now();
            let got = store
                .device_history(
                    &c.device(),
                    month,
                    services::limits::default_device_bucket(month),
                    NOW_US,
                )
                .await?
                .context("a generated device is not found")?;
            device.push(t.elapsed());
            let count: u64 = got.iter().map(|b| b.count).sum();
            anyhow::ensure!(
                count == c.samples_in(NOW_US - SPAN_DAYS * DAY_US, i64::MAX).len() as u64,
                "device history of {}: {count} samples",
                c.name()
            );
        }
        let f = Figures {
            samples: total,
            clients: clients.len(),
            bytes,
            history: percentiles(&mut history),
            stats,
            device: percentiles(&mut device),
        };
        println!(
            "{total} samples, {} clients, {:.2} bytes/sample: history p50 {:.2} p99 {:.2} ms; \
             device month p50 {:.2} p99 {:.2} ms",
            f.clients,
            f.bytes as f64 / total as f64,
            f.history.0,
            f.history.1,
            f.device.0,
            f.device.1,
        );
        figures.push(f);
    }
    let base = &figures[0];
    let mut head = "| samples | clients | bytes/sample | history | device month".to_owned();
    for (label, _, _) in STATS {
        head.push_str(&format!(" | stats {label}"));
    }
    head.push_str(&format!(" | {STAGED_LABEL}"));
    println!("\np50 / p99, ms; then p99 / the first size's p99\n{head} |");
    println!("{}|", "| ---: ".repeat(6 + STATS.len()));
    for f in &figures {
        let mut line = format!(
            "| {} | {} | {:.2} | {:.2} / {:.2} ({:.2}) | {:.2} / {:.2} ({:.2})",
            f.samples,
            f.clients,
            f.bytes as f64 / f.samples as f64,
            f.history.0,
            f.history.1,
            f.history.1 / base.history.1,
            f.device.0,
            f.device.1,
            f.device.1 / base.device.1,
        );
        for (i, (p50, p99)) in f.stats.iter().enumerate() {
            line.push_str(&format!(
                " | {p50:.2} / {p99:.2} ({:.2})",
                p99 / base.stats[i].1
            ));
        }
        println!("{line} |");
    }
    pool.close().await;
    Ok(())
}

/// Writes the `new` clients: their `channels` and `clients` rows, their
/// packed blocks in time order, their staged samples, and the room's
/// minute rollups again (all clients so far, from `minutes`). Returns the
/// packed and staged sample counts.
async fn write(
    pool: &PgPool,
    new: &[Client],
    minutes: &mut [Rollup],
) -> anyhow::Result<(i64, i64)> {
    // Channels and clients.
    let mut rows = CopyRows::new();
    for c in new {
        rows.row(3);
        rows.field(&c.id.to_be_bytes());
        rows.field(c.device().as_bytes());
        rows.field(&c.start_us.to_be_bytes());
    }
    copy(
        pool,
        "COPY devices (id, digest, created_at_us) FROM STDIN (FORMAT binary)",
        rows.finish(),
    )
    .await?;
    let mut rows = CopyRows::new();
    for c in new {
        rows.row(5);
        rows.field(&c.id.to_be_bytes());
        rows.field(c.name().as_bytes());
        rows.field(&[u8::from(c.public())]);
        rows.field(&PACKED_BEFORE_US.to_be_bytes());
        rows.field(&c.id.to_be_bytes());
    }
    copy(
        pool,
        "COPY channels (id, channel_name, public, packed_before_us, device_id) \
         FROM STDIN (FORMAT binary)",
        rows.finish(),
    )
    .await?;
    write_devices(pool, new).await?;
    sqlx::query(
        "INSERT INTO clients (channel_name, public, token_digest, gateway, connected_at_us) \
         SELECT channel_name, public, $3, 'bench', $1 FROM channels WHERE id >= $2",
    )
    .bind(BASE_US)
    .bind(new[0].id)
    .bind(services::ids::token_digest(TOKEN))
    .execute(pool)
    .await?;
    // Blocks, in time order: each block period's blocks of every client
    // active then (as packing writes them), in COPYs of ~32 MB.
    let mut by_start: Vec<Client> = new.to_vec();
    by_start.sort_by_key(|c| c.start_us);
    let mut active: Vec<Client> = Vec::new();
    let mut next = 0;
    let (mut packed, mut staged) = (0i64, 0i64);
    let mut rows = CopyRows::new();
    let blocks_sql =
        "COPY sample_blocks (channel_id, block_start_us, samples, data) FROM STDIN (FORMAT binary)";
    let mut period = block::block_of(BASE_US - SECOND_US);
    while period < PACKED_BEFORE_US {
        let end = period + BLOCK_US;
        while next < by_start.len() && by_start[next].start_us - 25_000 < end {
            active.push(by_start[next]);
            next += 1;
        }
        active.retain(|c| c.end_us() + 25_000 > period);
        for c in &active {
            let samples = c.samples_in(period, end);
            if samples.is_empty() {
                continue;
            }
            if c.public() {
                for s in &samples {
                    minutes[((s.at_us - BASE_US) / MINUTE_US) as usize].add(s.delay_ms);
                }
            }
            packed += samples.len() as i64;
            rows.row(4);
            rows.field(&c.id.to_be_bytes());
            rows.field(&period.to_be_bytes());
            rows.field(&i32::try_from(samples.len())?.to_be_bytes());
            rows.field(&block::encode(&samples));
        }
        if rows.0.len() > 32 << 20 {
            copy(
                pool,
                blocks_sql,
                std::mem::replace(&mut rows, CopyRows::new()).finish(),
            )
            .await?;
        }
        period = end;
    }
    copy(pool, blocks_sql, rows.finish()).await?;
    // Staged: the samples from PACKED_BEFORE_US on, and the room's partial
    // minute rollups their inserts appended: one insert a second (a
    // recorder's batching), so a part per second of the new clients'
    // public samples.
    let mut rows = CopyRows::new();
    let mut parts: std::collections::BTreeMap<i64, Rollup> = std::collections::BTreeMap::new();
    for c in new {
        for s in c.samples_in(PACKED_BEFORE_US, i64::MAX) {
            if c.public() {
                parts
                    .entry(s.at_us - s.at_us.rem_euclid(SECOND_US))
                    .or_default()
                    .add(s.delay_ms);
            }
            staged += 1;
            rows.row(5);
            rows.field(&c.id.to_be_bytes());
            rows.field(&s.n.to_be_bytes());
            match s.seq {
                Some(seq) => rows.field(&seq.to_be_bytes()),
                None => rows.null(),
            }
            rows.field(&s.at_us.to_be_bytes());
            rows.field(&s.delay_ms.to_be_bytes());
        }
    }
    copy(
        pool,
        "COPY sample_staging (channel_id, n, seq, at_us, delay_ms) FROM STDIN (FORMAT binary)",
        rows.finish(),
    )
    .await?;
    let mut rows = CopyRows::new();
    for (second, r) in &parts {
        rollup_row(&mut rows, second - second.rem_euclid(MINUTE_US), r)?;
    }
    copy(
        pool,
        "COPY room_minute_parts (minute_us, samples, min_ms, max_ms, sketch) \
         FROM STDIN (FORMAT binary)",
        rows.finish(),
    )
    .await?;
    // The room's minutes, all again.
    sqlx::query("TRUNCATE room_minutes").execute(pool).await?;
    let mut rows = CopyRows::new();
    for (i, m) in minutes.iter().enumerate() {
        if m.count == 0 {
            continue;
        }
        rollup_row(&mut rows, BASE_US + i as i64 * MINUTE_US, m)?;
    }
    copy(
        pool,
        "COPY room_minutes (minute_us, samples, min_ms, max_ms, sketch) FROM STDIN (FORMAT binary)",
        rows.finish(),
    )
    .await?;
    // The coarser tiers: merges of the minutes.
    for (table, column, per) in [
        ("room_ten_minutes", "ten_minute_us", 10),
        ("room_hours", "hour_us", 60),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {table}")))
            .execute(pool)
            .await?;
        let mut rows = CopyRows::new();
        for (i, group) in minutes.chunks(per).enumerate() {
            let mut r = Rollup::default();
            for m in group {
                r.merge(m);
            }
            if r.count == 0 {
                continue;
            }
            rollup_row(&mut rows, BASE_US + (i * per) as i64 * MINUTE_US, &r)?;
        }
        copy(
            pool,
            &format!(
                "COPY {table} ({column}, samples, min_ms, max_ms, sketch) FROM STDIN (FORMAT binary)"
            ),
            rows.finish(),
        )
        .await?;
    }
    Ok((packed, staged))
}

/// A room rollup row of `r` starting at `start`.
fn rollup_row(rows: &mut CopyRows, start: i64, r: &Rollup) -> anyhow::Result<()> {
    rows.row(5);
    rows.field(&start.to_be_bytes());
    rows.field(&i64::try_from(r.count)?.to_be_bytes());
    rows.field(&r.min.to_be_bytes());
    rows.field(&r.max.to_be_bytes());
    rows.field(&r.sketch.encode());
    Ok(())
}

/// One device's packed samples of a minute or an hour, as
/// `device_minutes` and `device_hours` keep them.
#[derive(Default)]
struct DeviceRow {
    rollup: Rollup,
    sum: f64,
    jitter_sum: f64,
    pairs: i64,
}

/// Writes the device rollups of the `new` clients (a device each): per
/// minute and per hour, from their packed samples; a jitter pair is two
/// consecutive samples within one block, in the minute of the later one
/// (recorder/src/store/device.rs).
async fn write_devices(pool: &PgPool, new: &[Client]) -> anyhow::Result<()> {
    let (mut minute_rows, mut hour_rows) = (CopyRows::new(), CopyRows::new());
    for c in new {
        let mut minutes: std::collections::BTreeMap<i64, DeviceRow> = Default::default();
        let mut period = block::block_of(c.start_us - 25_000);
        while period < PACKED_BEFORE_US.min(c.end_us() + 25_000) {
            let samples = c.samples_in(period, period + BLOCK_US);
            for (i, s) in samples.iter().enumerate() {
                let m = minutes
                    .entry(s.at_us - s.at_us.rem_euclid(MINUTE_US))
                    .or_default();
                m.rollup.add(s.delay_ms);
                m.sum += s.delay_ms;
                if i > 0 {
                    m.jitter_sum += (s.delay_ms - samples[i - 1].delay_ms).abs();
                    m.pairs += 1;
                }
            }
            period += BLOCK_US;
        }
        let mut hours: std::collections::BTreeMap<i64, DeviceRow> = Default::default();
        for (minute, m) in &minutes {
            let h = hours
                .entry(minute - minute.rem_euclid(60 * MINUTE_US))
                .or_default();
            h.rollup.merge(&m.rollup);
            h.sum += m.sum;
            h.jitter_sum += m.jitter_sum;
            h.pairs += m.pairs;
        }
        for (rows, tier) in [(&mut minute_rows, &minutes), (&mut hour_rows, &hours)] {
            for (start, r) in tier {
                rows.row(9);
                rows.field(&c.id.to_be_bytes());
                rows.field(&start.to_be_bytes());
                rows.field(&i64::try_from(r.rollup.count)?.to_be_bytes());
                rows.field(&r.sum.to_be_bytes());
                rows.field(&r.rollup.min.to_be_bytes());
                rows.field(&r.rollup.max.to_be_bytes());
                rows.field(&r.jitter_sum.to_be_bytes());
                rows.field(&r.pairs.to_be_bytes());
                rows.field(&r.rollup.sketch.encode());
            }
        }
        if minute_rows.0.len() > 32 << 20 {
            copy_device_rows(pool, "device_minutes", "minute_us", &mut minute_rows).await?;
        }
    }
    copy_device_rows(pool, "device_minutes", "minute_us", &mut minute_rows).await?;
    copy_device_rows(pool, "device_hours", "hour_us", &mut hour_rows).await?;
    Ok(())
}

/// `COPY`s `rows` into a device tier and starts them over.
async fn copy_device_rows(
    pool: &PgPool,
    table: &str,
    column: &str,
    rows: &mut CopyRows,
) -> anyhow::Result<()> {
    let data = std::mem::replace(rows, CopyRows::new()).finish();
    copy(
        pool,
        &format!(
            "COPY {table} (device_id, {column}, samples, sum_ms, min_ms, max_ms, jitter_sum_ms, \
             jitter_pairs, sketch) FROM STDIN (FORMAT binary)"
        ),
        data,
    )
    .await?;
    Ok(())
}
