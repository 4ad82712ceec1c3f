//! Bytes per sample on disk in Postgres, and the cost of the API's reads,
//! for the packed layout against the first layout (one row per sample), on
//! the same synthetic samples in the same database and run.
//!
//! Run with `bash bench/storage_bytes.sh [SAMPLES] [CLIENTS]`. Steps:
//!
//! 1. A fresh database: the recorder's migrations (packed layout) in
//!    schema `public`, the first migration alone in schema `v1`.
//! 2. `SAMPLES` rows in `v1.samples`, generated in SQL: `CLIENTS` clients
//!    (two thirds public), one sample a second each with ±25 ms of jitter,
//!    delays rounded to thousandths of a ms as the pages send them
//!    (15–25 ms, 2% up to 200 ms more), seq = n + 1.
//! 3. The same rows staged in the packed layout, then packed by the
//!    store's own `pack` (timed); VACUUM ANALYZE of both, REINDEX of the
//!    emptied staging table (its size before is printed).
//! 4. Sizes of each layout's tables: heap, TOAST and indexes
//!    (`pg_total_relation_size`), divided by `SAMPLES`.
//! 5. p50/p99 of 200 history reads (a random client, `limit=1000` from a
//!    random time) and of 10 of the widest statistics query (31 days in
//!    10-minute buckets), each through the store and as the first
//!    layout's SQL against `v1`.
//!
//! With `--devices`, every client is a browser of its own (a `devices` row
//! linked to its channel before packing, docs/architecture.md "Devices"),
//! so packing also writes `device_minutes`; their sizes join the table,
//! with bytes per device-minute row, and step 5 adds 200 device history
//! reads of the widest window (31 days in 4-hour buckets) and of the last
//! hour in 1-minute buckets; then the worst case: one device given a row
//! for every minute and every hour of 31 days (copies of one of its rows)
//! and 20 reads of 31 days in 4-hour buckets (hour rows, and minute rows
//! for the partial hours at both ends) and of the last hour in minutes.
//!
//! With `--scale 1000000,10000000,100000000` it skips the first layout and
//! measures the reads at each size instead, on packed data generated
//! straight into the recorder's tables (`support/scale.rs`;
//! `bench/storage_scale.sh`).

#[path = "support/scale.rs"]
mod scale;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use rand::{Rng, SeedableRng};
use recorder::store::Store as _;
use recorder::store::postgres::PgStore;
use services::messages::SamplesQuery;

/// Benchmark settings.
#[derive(Debug, Parser)]
struct Args {
    /// Samples in all.
    #[arg(long, default_value_t = 10_000_000)]
    samples: i64,
    /// Clients they belong to.
    #[arg(long, default_value_t = 1_000)]
    clients: i64,
    /// Keep the database afterwards (its name is printed).
    #[arg(long)]
    keep: bool,
    /// A device (browser identity) per client, so packing writes
    /// per-device minute rollups too.
    #[arg(long)]
    devices: bool,
    /// Instead: the reads' cost at these sizes (ascending, cumulative, one
    /// run), on generated packed data (`support/scale.rs`).
    #[arg(long, value_delimiter = ',')]
    scale: Vec<i64>,
    /// History reads per size in `--scale` mode.
    #[arg(long, default_value_t = 500)]
    history_reads: usize,
    /// Reads of each statistics query per size in `--scale` mode.
    #[arg(long, default_value_t = 100)]
    stats_reads: usize,
}

const FIRST_LAYOUT: &str = include_str!("../migrations/postgres/0001_init.sql");

/// The first layout's queries, as they were (recorder 2026-11-30).
const V1_HISTORY: &str = "SELECT at_us, delay_ms, seq FROM v1.samples \
    WHERE channel_name = $1 AND at_us >= $2 ORDER BY at_us, n LIMIT $3";
const V1_STATS: &str = "\
    SELECT at_us - ((at_us % $2) + $2) % $2 AS start_us, count(*) AS n, min(delay_ms), \
           percentile_cont(0.5) WITHIN GROUP (ORDER BY delay_ms), \
           percentile_cont(0.95) WITHIN GROUP (ORDER BY delay_ms), \
           percentile_cont(0.99) WITHIN GROUP (ORDER BY delay_ms), max(delay_ms) \
    FROM v1.samples WHERE public = TRUE AND at_us >= $1 GROUP BY 1 ORDER BY 1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.scale.is_empty() {
        return scale::run(&args.scale, args.history_reads, args.stats_reads).await;
    }
    let db = testkit::fresh_database().await;
    println!(
        "database {} ({} samples, {} clients)",
        db.name, args.samples, args.clients
    );
    let store = PgStore::connect(&db.url).await.context("migrating")?;
    let pool = store.pool().clone();
    // Step 1: the first layout beside the packed one.
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql("CREATE SCHEMA v1; SET search_path = v1")
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql(FIRST_LAYOUT).execute(&mut *conn).await?;
    sqlx::raw_sql("SET search_path = public")
        .execute(&mut *conn)
        .await?;
    drop(conn);
    // Step 2: the samples.
    let start_us: i64 = 1_767_225_600_000_000; // 2026-01-01
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO v1.clients SELECT 'client' || c, c % 3 <> 0, NULL, 'bench', $2 \
         FROM generate_series(0, $1 - 1) c",
    )
    .bind(args.clients)
    .bind(start_us)
    .execute(&pool)
    .await?;
    sqlx::query("SELECT setseed(0.25)").execute(&pool).await?;
    sqlx::query(
        "INSERT INTO v1.samples (channel_name, n, seq, at_us, delay_ms, public) \
         SELECT 'client' || (i % $2), i / $2, i / $2 + 1, \
                $3 + (i / $2) * 1000000 + (i % $2) * 997 + (random() * 50000)::bigint, \
                round((15 + 10 * random() + CASE WHEN random() < 0.02 THEN 200 * random() ELSE 0 END)::numeric, 3)::float8, \
                (i % $2) % 3 <> 0 \
         FROM generate_series(0, $1 - 1) i",
    )
    .bind(args.samples)
    .bind(args.clients)
    .bind(start_us)
    .execute(&pool)
    .await?;
    println!(
        "generated the first layout in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Step 3: the same rows, packed.
    let t = Instant::now();
    sqlx::raw_sql(
        "INSERT INTO clients SELECT * FROM v1.clients; \
         INSERT INTO channels (channel_name, public) \
             SELECT channel_name, public FROM v1.clients ORDER BY channel_name; \
         INSERT INTO sample_staging SELECT c.id, s.n, s.seq, s.at_us, s.delay_ms \
             FROM v1.samples s JOIN channels c USING (channel_name)",
    )
    .execute(&pool)
    .await?;
    if args.devices {
        sqlx::raw_sql(
            "INSERT INTO devices (digest, created_at_us) \
                 SELECT encode(sha256(convert_to('device-' || channel_name, 'UTF8')), 'hex'), 0 \
                 FROM channels ORDER BY id; \
             UPDATE channels c SET device_id = d.id FROM devices d \
                 WHERE d.digest = encode(sha256(convert_to('device-' || c.channel_name, 'UTF8')), 'hex')",
        )
        .execute(&pool)
        .await?;
    }
    println!("staged in {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let packed = store.pack(i64::MAX).await?;
    let pack_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        packed as i64 == args.samples,
        "{packed} packed, {} expected",
        args.samples
    );
    println!(
        "packed {packed} samples in {pack_s:.1} s: {:.0} samples/s",
        packed as f64 / pack_s
    );
    sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await?;
    // The bulk staging left its indexes at full size (empty pages, reused
    // by later inserts); a recorder's staging holds minutes of samples.
    let bloat: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('sample_staging')")
        .fetch_one(&pool)
        .await?;
    sqlx::raw_sql("REINDEX TABLE sample_staging")
        .execute(&pool)
        .await?;
    println!(
        "staging after the bulk load: {bloat} bytes (empty pages); reindexed for the sizes below"
    );
    // Step 4: sizes.
    println!("\n| layout | table | heap | TOAST | indexes | total | bytes/sample |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    let mut totals = Vec::new();
    for (layout, tables) in [
        ("first (v1)", vec!["v1.samples", "v1.clients"]),
        (
            "packed",
            vec![
                "public.sample_blocks",
                "public.sample_staging",
                "public.channels",
                "public.clients",
                "public.room_minutes",
                "public.devices",
                "public.device_minutes",
                "public.device_hours",
            ],
        ),
    ] {
        let mut total = 0i64;
        for table in tables {
            // A partitioned table's parts are its partitions' sums.
            let (heap, toast, indexes, all): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT sum(pg_relation_size(c.oid))::bigint, \
                        sum(coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0))::bigint, \
                        sum(pg_indexes_size(c.oid))::bigint, sum(pg_total_relation_size(c.oid))::bigint \
                 FROM pg_class c WHERE c.oid IN \
                     (SELECT relid FROM pg_partition_tree($1::regclass) UNION SELECT $1::regclass)",
            )
            .bind(table)
            .fetch_one(&pool)
            .await?;
            total += all;
            println!(
                "| {layout} | {table} | {heap} | {toast} | {indexes} | {all} | {:.2} |",
                all as f64 / args.samples as f64
            );
        }
        println!(
            "| {layout} | **all** | | | | {total} | **{:.2}** |",
            total as f64 / args.samples as f64
        );
        totals.push(total);
    }
    println!(
        "\npacked / first layout: {:.3}",
        totals[1] as f64 / totals[0] as f64
    );
    if args.devices {
        for table in ["device_minutes", "device_hours"] {
            let (rows, bytes): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT count(*) FROM {table}), pg_total_relation_size('{table}')"
            )))
            .fetch_one(&pool)
            .await?;
            println!(
                "{table}: {rows} rows, {:.1} bytes per row, {:.2} bytes per sample, \
                 {:.1} samples per row",
                bytes as f64 / rows.max(1) as f64,
                bytes as f64 / args.samples as f64,
                args.samples as f64 / rows.max(1) as f64
            );
        }
    }
    // Step 5: reads.
    let end_us = start_us + args.samples / args.clients * 1_000_000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut packed_ms = Vec::new();
    let mut v1_ms = Vec::new();
    for _ in 0..200 {
        let id = format!("client{}", rng.random_range(0..args.clients));
        let since = rng.random_range(start_us..end_us);
        let t = Instant::now();
        let got = store
            .samples(&SamplesQuery {
                channel_name: id.clone(),
                token_digest: None,
                since_us: Some(since),
                limit: 1000,
                deadline_unix_ms: None,
            })
            .await?;
        packed_ms.push(t.elapsed());
        let t = Instant::now();
        let old: Vec<(i64, f64, Option<i64>)> = sqlx::query_as(V1_HISTORY)
            .bind(&id)
            .bind(since)
            .bind(1000i64)
            .fetch_all(&pool)
            .await?;
        v1_ms.push(t.elapsed());
        if let Some(got) = got {
            anyhow::ensure!(
                got.len() == old.len(),
                "history of {id}: {} != {}",
                got.len(),
                old.len()
            );
        }
    }
    report("history, limit 1000", &mut packed_ms, &mut v1_ms);
    let (mut packed_ms, mut v1_ms) = (Vec::new(), Vec::new());
    let window = Duration::from_secs(31 * 86_400);
    let bucket = Duration::from_secs(600);
    for _ in 0..10 {
        let t = Instant::now();
        let got = store.stats(window, bucket, end_us).await?;
        packed_ms.push(t.elapsed());
        let t = Instant::now();
        let old: Vec<(i64, i64, f64, f64, f64, f64, f64)> = sqlx::query_as(V1_STATS)
            .bind(end_us - 31 * 86_400 * 1_000_000)
            .bind(600_000_000i64)
            .fetch_all(&pool)
            .await?;
        v1_ms.push(t.elapsed());
        anyhow::ensure!(
            got.len() == old.len(),
            "stats: {} buckets != {}",
            got.len(),
            old.len()
        );
    }
    report("stats, 31 d in 10 min buckets", &mut packed_ms, &mut v1_ms);
    if args.devices {
        let mut digests = Vec::new();
        for _ in 0..200 {
            let c = rng.random_range(0..args.clients);
            digests.push(device_of(&pool, c).await?);
        }
        for (what, window, bucket) in [
            ("31 d in 4 h buckets", 31 * 86_400, 4 * 3600),
            ("1 h in 1 min buckets", 3600, 60),
        ] {
            let mut ms = device_reads(&store, &digests, (window, bucket), end_us, 1).await?;
            println!(
                "device history, {what}: p50 {:.2} ms p99 {:.2} ms",
                percentile_ms(&mut ms, 0.5),
                percentile_ms(&mut ms, 0.99)
            );
        }
        // The worst case: a device with samples in every minute of 31 days.
        let digest = device_of(&pool, 0).await?;
        let full = 31 * 1440;
        sqlx::query(
            "INSERT INTO device_minutes \
             SELECT m.device_id, $2 - k::bigint * 60000000 - 60000000, m.samples, m.sum_ms, m.min_ms, \
                    m.max_ms, m.jitter_sum_ms, m.jitter_pairs, m.sketch \
             FROM (SELECT * FROM device_minutes WHERE device_id = \
                       (SELECT id FROM devices WHERE digest = $1) LIMIT 1) m, \
                  generate_series(0, $3 - 1) k \
             ON CONFLICT DO NOTHING",
        )
        .bind(&digest)
        .bind(end_us - end_us.rem_euclid(60_000_000))
        .bind(full)
        .execute(&pool)
        .await?;
        sqlx::query(
            "INSERT INTO device_hours \
             SELECT m.device_id, $2 - k::bigint * 3600000000, m.samples, m.sum_ms, m.min_ms, \
                    m.max_ms, m.jitter_sum_ms, m.jitter_pairs, m.sketch \
             FROM (SELECT * FROM device_minutes WHERE device_id = \
                       (SELECT id FROM devices WHERE digest = $1) LIMIT 1) m, \
                  generate_series(0, 31 * 24) k \
             ON CONFLICT DO NOTHING",
        )
        .bind(&digest)
        .bind(end_us - end_us.rem_euclid(3_600_000_000))
        .execute(&pool)
        .await?;
        for (what, window, bucket, buckets) in [
            ("31 d in 4 h buckets", 31 * 86_400, 4 * 3600, 186),
            ("1 h in 1 min buckets", 3600, 60, 60),
        ] {
            let digests = vec![digest.clone(); 20];
            let mut ms = device_reads(&store, &digests, (window, bucket), end_us, buckets).await?;
            println!(
                "device history, {what}, a device with a row every minute and hour: \
                 p50 {:.2} ms p99 {:.2} ms",
                percentile_ms(&mut ms, 0.5),
                percentile_ms(&mut ms, 0.99)
            );
        }
    }
    pool.close().await;
    if args.keep {
        std::mem::forget(db);
    }
    Ok(())
}

/// The device digest `--devices` gave client `c`.
async fn device_of(pool: &sqlx::PgPool, c: i64) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar(
        "SELECT encode(sha256(convert_to('device-client' || $1, 'UTF8')), 'hex')",
    )
    .bind(c.to_string())
    .fetch_one(pool)
    .await?)
}

/// One device history read per digest, `(window, bucket)` in seconds, up
/// to `end_us`, each with at least `buckets` buckets; their times.
async fn device_reads(
    store: &PgStore,
    digests: &[String],
    (window, bucket): (u64, u64),
    end_us: i64,
    buckets: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for digest in digests {
        let t = Instant::now();
        let got = store
            .device_history(
                digest,
                Duration::from_secs(window),
                Duration::from_secs(bucket),
                end_us,
            )
            .await?
            .with_context(|| format!("device {digest} known"))?;
        times.push(t.elapsed());
        anyhow::ensure!(got.len() >= buckets, "{} buckets", got.len());
    }
    Ok(times)
}

/// The quantile `q` of `v`, in ms (nearest rank).
fn percentile_ms(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0
}

fn report(what: &str, packed: &mut [Duration], v1: &mut [Duration]) {
    let p = percentile_ms;
    println!(
        "{what}: packed p50 {:.2} ms p99 {:.2} ms; first layout p50 {:.2} ms p99 {:.2} ms",
        p(packed, 0.5),
        p(packed, 0.99),
        p(v1, 0.5),
        p(v1, 0.99)
    );
}
