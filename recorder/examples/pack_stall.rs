//! How long packing holds back staging inserts: the latency of the store's
//! inserts (p50/p99/max) while nothing else runs, and while packing runs,
//! with the fence held through each packing transaction (as before,
//! [`Packing::FencedThroughout`]) and only for its check and writes
//! ([`Packing::FenceLast`], the default), in one run on one database.
//!
//! Run with `bash bench/pack_stall.sh` (or `cargo run --release -p
//! pingapp-recorder --example pack_stall -- --clients 2000 --per-client 600`).
//!
//! Each packing phase starts from `--clients` × `--per-client` staged
//! samples in the past (one a second each, delays in thousandths of a ms:
//! 1.2M by default, 120 packing transactions of 10,000 rows), generated in
//! SQL. While [`Store::pack`] moves them into blocks, one task inserts
//! batches of `--batch` samples of other clients (now: staged, not late),
//! one insert after the other, and times each; the idle phase does the
//! same inserts for as long without packing.

use std::time::{Duration, Instant};

use clap::Parser;
use recorder::store::Store as _;
use recorder::store::postgres::{Packing, PgStore};
use services::messages::{ClientRecord, RecordBatch, SampleRecord};

/// Benchmark settings.
#[derive(Debug, Parser)]
struct Args {
    /// Clients with staged samples to pack.
    #[arg(long, default_value_t = 2_000)]
    clients: i64,
    /// Staged samples of each.
    #[arg(long, default_value_t = 600)]
    per_client: i64,
    /// Samples per timed insert (each of a different client).
    #[arg(long, default_value_t = 100)]
    batch: u64,
}

const T0: i64 = 1_767_225_600_000_000; // 2026-01-01

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = testkit::fresh_database().await;
    println!(
        "database {}; {} clients x {} staged samples per packing phase, inserts of {}",
        db.name, args.clients, args.per_client, args.batch
    );
    let store = PgStore::connect(&db.url).await?;
    let pool = store.pool().clone();
    sqlx::query(
        "INSERT INTO channels (channel_name, public) \
         SELECT 'old' || c, c % 3 <> 0 FROM generate_series(1, $1) c",
    )
    .bind(args.clients)
    .execute(&pool)
    .await?;
    let mut inserter = Inserter::new(args.batch);
    // Warm up: the inserters' clients exist, statements are prepared.
    for _ in 0..20 {
        inserter.insert(&store).await?;
    }
    let mut results = Vec::new();
    // Idle: as many inserts as the first packing phase will take, roughly.
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(inserter.insert(&store).await?);
    }
    results.push(("no packing".to_owned(), idle, None));
    for packing in [Packing::FencedThroughout, Packing::FenceLast] {
        sqlx::raw_sql(
            "TRUNCATE sample_blocks, room_minutes; \
             DELETE FROM sample_staging WHERE channel_id IN \
                 (SELECT id FROM channels WHERE channel_name LIKE 'old%'); \
             UPDATE channels SET packed_before_us = -9223372036854775808 \
                 WHERE channel_name LIKE 'old%'",
        )
        .execute(&pool)
        .await?;
        sqlx::query(
            "INSERT INTO sample_staging (channel_id, n, seq, at_us, delay_ms) \
             SELECT c.id, i, i + 1, $2 + i * 1000000 + c.id * 97, \
                    round((15 + 10 * random())::numeric, 3)::float8 \
             FROM channels c, generate_series(0, $1 - 1) i WHERE c.channel_name LIKE 'old%'",
        )
        .bind(args.per_client)
        .bind(T0)
        .execute(&pool)
        .await?;
        sqlx::raw_sql("VACUUM ANALYZE sample_staging")
            .execute(&pool)
            .await?;
        let packer = PgStore::connect(&db.url).await?.with_packing(packing);
        let started = Instant::now();
        // Every old sample; not the inserters' (now).
        let before = T0 + (args.per_client + 1_200) * 1_000_000;
        let mut pack = tokio::spawn(async move { packer.pack(before).await });
        let mut during = Vec::new();
        let packed = loop {
            tokio::select! {
                packed = &mut pack => break packed??,
                took = inserter.insert(&store) => during.push(took?),
            }
        };
        let rate = packed as f64 / started.elapsed().as_secs_f64();
        results.push((format!("{packing:?}"), during, Some((packed, rate))));
    }
    println!(
        "\n| inserts of {} samples | inserts | p50 | p99 | max | packed | packing samples/s |",
        args.batch
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (what, mut took, packed) in results {
        took.sort();
        let q =
            |q: f64| took[((took.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
        let (n, rate) = packed.map_or((String::new(), String::new()), |(n, r)| {
            (n.to_string(), format!("{r:.0}"))
        });
        println!(
            "| {what} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {n} | {rate} |",
            took.len(),
            q(0.5),
            q(0.99),
            q(1.0)
        );
    }
    pool.close().await;
    Ok(())
}

/// Inserts batches of new samples of its own clients, now.
struct Inserter {
    batch: u64,
    n: u64,
}

impl Inserter {
    fn new(batch: u64) -> Self {
        Self { batch, n: 0 }
    }

    /// One timed insert.
    async fn insert(&mut self, store: &PgStore) -> anyhow::Result<Duration> {
        let now = services::unix_us();
        let clients = (0..self.batch)
            .map(|c| ClientRecord {
                channel_name: format!("live{c}"),
                public: true,
                token_digest: None,
                gateway: "bench".into(),
                connected_at_us: now,
                device: None,
            })
            .collect();
        let samples = (0..self.batch)
            .map(|c| SampleRecord {
                channel_name: format!("live{c}"),
                n: self.n,
                seq: Some(self.n),
                at_us: now,
                delay_ms: 20.0,
                public: true,
            })
            .collect();
        self.n += 1;
        let b = RecordBatch {
            gateway: "bench".into(),
            clients,
            samples,
        };
        let t = Instant::now();
        let o = store.insert(std::slice::from_ref(&b)).await?;
        anyhow::ensure!(o.inserted == self.batch, "{o:?}");
        Ok(t.elapsed())
    }
}
