//! Recorder throughput: how many samples a second go from JetStream into
//! Postgres through the real [`recorder::Recorder`], next to a baseline of
//! the same `UNNEST` inserts straight into Postgres without NATS.
//!
//! Run with `cargo run --release -p pingapp-recorder --example throughput --
//! --samples 1000000 --batch 1000` (or `bash bench/recorder_throughput.sh`).
//! Each phase gets a fresh database on the server of `--database-url`
//! (dropped afterwards), and the stream a random subject prefix (deleted
//! afterwards).
//!
//! 0. The floor: the same rows in one `COPY` into the staging table
//!    (client ids resolved beforehand).
//! 1. Baselines: `PgStore::insert` of `--batch-max-samples` samples at a
//!    time straight into Postgres, one insert at a time, then two at a time
//!    (as the recorder commits); their ratio to the COPY is what the store's
//!    statements cost, the recorder's ratio to the latter what NATS and
//!    the consume loop cost.
//! 2. Recorder: all batches are first persisted in the stream (timed
//!    separately), then a recorder starts and is timed until every sample
//!    is committed and acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt as _;
use recorder::store::Store as _;
use recorder::store::postgres::PgStore;
use recorder::{Recorder, RecorderConfig};
use services::bus::SharedBus;
use services::bus::nats::NatsBus;
use services::messages::{ClientRecord, RecordBatch, SampleRecord};
use services::subjects::Subjects;
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

/// Benchmark settings.
#[derive(Debug, Parser)]
struct Args {
    /// Samples in all.
    #[arg(long, default_value_t = 1_000_000)]
    samples: usize,
    /// Samples per record batch (one stream message).
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Samples per database insert (the recorder's batch_max_samples).
    #[arg(long, default_value_t = 5_000)]
    batch_max_samples: usize,
    /// A Postgres server where this user may create databases.
    #[arg(
        long,
        env = "PINGAPP_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// NATS with JetStream.
    #[arg(
        long,
        env = "PINGAPP_TEST_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = services::telemetry::init(services::config::LogFormat::Text, "test");
    }
    let batches = make_batches(args.samples, args.batch.max(1));
    let total: usize = batches.iter().map(|b| b.samples.len()).sum();
    println!(
        "{total} samples in {} batches of {}, {} samples per insert",
        batches.len(),
        args.batch,
        args.batch_max_samples
    );

    // 0. The floor: the same rows COPYed straight into the staging table
    //    (client ids resolved beforehand), on a fresh database.
    let copy_rate = copy_baseline(&args.database_url, &batches, total).await?;
    println!("baseline  raw COPY into sample_staging:  {copy_rate:>10.0} samples/s");

    // 1. Baselines: the store alone, each on a fresh database.
    let per_insert = (args.batch_max_samples / args.batch.max(1)).max(1);
    let groups: Vec<&[RecordBatch]> = batches.chunks(per_insert).collect();
    let mut baseline = 0.0;
    for in_flight in [1, 2] {
        let db = FreshDb::create(&args.database_url).await?;
        let store = PgStore::connect(&db.url).await?;
        let started = Instant::now();
        let results: Vec<_> = futures_util::stream::iter(groups.iter().map(|g| store.insert(g)))
            .buffer_unordered(in_flight)
            .collect()
            .await;
        baseline = rate(total, started.elapsed());
        for r in results {
            r?;
        }
        println!(
            "store     inserts, {in_flight} at a time:             {baseline:>10.0} samples/s ({:.2} of COPY)",
            baseline / copy_rate
        );
        store.pool().close().await;
        db.drop_db().await;
    }

    // 2. The recorder: stream → recorder → Postgres.
    let db = FreshDb::create(&args.database_url).await?;
    let store = Arc::new(PgStore::connect(&db.url).await?);
    let bus = Arc::new(NatsBus::connect(&args.nats_url, "throughput").await?);
    let subjects = Subjects::new(&format!("bench{:08x}", rand::random::<u32>()));
    let mut cfg = RecorderConfig::new(subjects.clone());
    cfg.batch_max_samples = args.batch_max_samples;
    cfg.retention = Duration::ZERO;
    cfg.stream_max_age = Duration::from_secs(3600);
    subjects
        .samples_stream()
        .ensure(&*bus, cfg.stream_max_age, cfg.stream_max_bytes)
        .await?;
    let started = Instant::now();
    let topic = subjects.samples("bench");
    for (i, b) in batches.iter().enumerate() {
        topic.persist(&*bus, b, &format!("b{i}")).await?;
    }
    let publish = rate(total, started.elapsed());
    println!("publish   into JetStream:                {publish:>10.0} samples/s");
    let stream = subjects.samples_stream();
    let held = stream.state(&*bus).await?;
    println!(
        "stream    after publishing:  {:>8} messages {:>12} bytes (what limits retention keeps after the acks)",
        held.messages, held.bytes
    );

    let registry = prometheus::Registry::new();
    let shared: SharedBus = bus.clone();
    let recorder = Recorder::build(
        cfg,
        shared,
        store.clone(),
        &registry,
        services::admin::Readiness::new(),
    )
    .await?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(recorder.run(shutdown.clone()));
    loop {
        let persisted: u64 = metric(&registry, "pingapp_recorder_samples_persisted_total");
        if persisted as usize >= total {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "only {persisted} of {total} samples persisted after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let through = rate(total, elapsed);
    shutdown.cancel();
    task.await??;
    // The last acknowledgements may still be on their way.
    let mut left = stream.state(&*bus).await?;
    for _ in 0..100 {
        if left.messages == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = stream.state(&*bus).await?;
    }
    println!(
        "stream    after every ack:   {:>8} messages {:>12} bytes (work queue)",
        left.messages, left.bytes
    );
    println!("recorder  JetStream -> Postgres:         {through:>10.0} samples/s");
    println!(
        "recorder / baseline (2 at a time): {:.2}  ({} inserts, {:.1} ms mean insert)",
        through / baseline,
        metric::<u64>(&registry, "pingapp_recorder_insert_duration_seconds_count"),
        1000.0 * metric::<f64>(&registry, "pingapp_recorder_insert_duration_seconds_sum")
            / metric::<f64>(&registry, "pingapp_recorder_insert_duration_seconds_count").max(1.0)
    );
    let stored: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM sample_staging) \
              + (SELECT coalesce(sum(samples), 0) FROM sample_blocks)::bigint",
    )
    .fetch_one(store.pool())
    .await?;
    anyhow::ensure!(
        stored as usize == total,
        "{stored} stored, {total} expected"
    );

    let js = async_nats::jetstream::new(bus.client().clone());
    let _ = js.delete_stream(subjects.samples_stream().name()).await;
    store.pool().close().await;
    db.drop_db().await;
    Ok(())
}

/// `total` samples of 1,000 clients in record batches of `per_batch`.
fn make_batches(total: usize, per_batch: usize) -> Vec<RecordBatch> {
    let now = services::unix_us();
    let clients = 1_000;
    (0..total.div_ceil(per_batch))
        .map(|b| {
            let samples = (b * per_batch..((b + 1) * per_batch).min(total))
                .map(|i| SampleRecord {
                    channel_name: format!("client{:04}", i % clients),
                    n: (i / clients) as u64,
                    seq: Some((i / clients) as u64),
                    at_us: now - (total - i) as i64 * 1_000,
                    delay_ms: 5.0 + (i % 97) as f64 * 0.37,
                    public: i % 3 != 0,
                })
                .collect();
            let new_clients = if b * per_batch < clients {
                (b * per_batch..((b + 1) * per_batch).min(clients))
                    .map(|c| ClientRecord {
                        channel_name: format!("client{c:04}"),
                        public: c % 3 != 0,
                        token_digest: None,
                        gateway: "bench".into(),
                        connected_at_us: now,
                        device: None,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            RecordBatch {
                gateway: "bench".into(),
                clients: new_clients,
                samples,
            }
        })
        .collect()
}

/// Samples a second of one `COPY … FROM STDIN` of every sample into
/// `sample_staging`, text format, formatting included.
async fn copy_baseline(server: &str, batches: &[RecordBatch], total: usize) -> anyhow::Result<f64> {
    use std::fmt::Write as _;
    let db = FreshDb::create(server).await?;
    let store = PgStore::connect(&db.url).await?;
    let names: std::collections::BTreeSet<&str> = batches
        .iter()
        .flat_map(|b| b.samples.iter().map(|s| s.channel_name.as_str()))
        .collect();
    sqlx::query("INSERT INTO channels (channel_name, public) SELECT unnest($1::text[]), TRUE")
        .bind(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .execute(store.pool())
        .await?;
    let ids: std::collections::HashMap<String, i32> =
        sqlx::query_as("SELECT channel_name, id FROM channels")
            .fetch_all(store.pool())
            .await?
            .into_iter()
            .collect();
    let mut conn = store.pool().acquire().await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw("COPY sample_staging (channel_id, n, seq, at_us, delay_ms) FROM STDIN")
        .await?;
    let mut buf = String::with_capacity(1 << 20);
    for s in batches.iter().flat_map(|b| &b.samples) {
        let seq = s
            .seq
            .map_or_else(|| "\\N".to_owned(), |v| (v as i64).to_string());
        writeln!(
            buf,
            "{}\t{}\t{}\t{}\t{}",
            ids[&s.channel_name], s.n as i64, seq, s.at_us, s.delay_ms
        )?;
        if buf.len() >= 1 << 20 {
            copy.send(buf.as_bytes()).await?;
            buf.clear();
        }
    }
    copy.send(buf.as_bytes()).await?;
    let copied = copy.finish().await?;
    let r = rate(total, started.elapsed());
    anyhow::ensure!(
        copied as usize == total,
        "{copied} copied, {total} expected"
    );
    drop(conn);
    store.pool().close().await;
    db.drop_db().await;
    Ok(r)
}

fn rate(samples: usize, elapsed: Duration) -> f64 {
    samples as f64 / elapsed.as_secs_f64()
}

/// The value of an unlabelled metric.
fn metric<T: std::str::FromStr + Default>(registry: &prometheus::Registry, name: &str) -> T {
    services::metrics::render(registry)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_default()
}

/// A database created for one phase.
struct FreshDb {
    url: String,
    server: String,
    name: String,
}

impl FreshDb {
    async fn create(server: &str) -> anyhow::Result<Self> {
        let name = format!("bench_{:016x}", rand::random::<u64>());
        let mut c = sqlx::PgConnection::connect(server)
            .await
            .with_context(|| format!("connecting to {server}; is PostgreSQL running?"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await?;
        // Replace the database in the URL, keeping any query (e.g. `?host=`).
        let (path, query) = server.split_once('?').unwrap_or((server, ""));
        let base = path.rsplit_once('/').map_or(path, |(b, _)| b);
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        Ok(Self {
            url: format!("{base}/{name}{query}"),
            server: server.to_owned(),
            name,
        })
    }

    async fn drop_db(self) {
        if let Ok(mut c) = sqlx::PgConnection::connect(&self.server).await {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
        }
    }
}
