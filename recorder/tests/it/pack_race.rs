//! Staging and packing at the same time, on Postgres (docs/architecture.md,
//! "Why staging and packing cannot race"): two inserters (new samples,
//! late ones and redeliveries) and two packing replicas (which also fold
//! the room's partial rollups) run concurrently; packing reads without the fence and takes it only to check and write
//! ([`recorder::store::postgres::Packing::FenceLast`]). Afterwards every
//! sample is stored exactly once and counted once in the room's rollups.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use recorder::store::Store;
use recorder::store::block::{BLOCK_US, block_of};
use recorder::store::postgres::{Packing, PgStore};
use services::messages::{RecordBatch, SampleRecord, SamplesQuery};

use crate::helpers::{TestPg, batch, client};

const CLIENTS: usize = 12;
/// Samples of each client: one a second over three blocks.
const PER_CLIENT: u64 = 1_800;
const T0: i64 = 1_700_000_400_000_000 - 1_700_000_400_000_000 % BLOCK_US;

fn all_batches(rng: &mut StdRng) -> Vec<RecordBatch> {
    let mut all: Vec<SampleRecord> = (0..CLIENTS)
        .flat_map(|c| {
            (0..PER_CLIENT).map(move |n| SampleRecord {
                channel_name: format!("c{c}"),
                n,
                seq: Some(n),
                at_us: T0 + n as i64 * 1_000_000 + c as i64,
                delay_ms: (n % 97) as f64 + 0.5,
                public: c % 3 != 0,
            })
        })
        .collect();
    // Roughly in time order, as gateways send them, a minute of disorder.
    all.shuffle(rng);
    let mut keyed: Vec<(i64, SampleRecord)> = all
        .into_iter()
        .map(|s| (s.at_us / 60_000_000 + rng.random_range(0..2), s))
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    let all: Vec<SampleRecord> = keyed.into_iter().map(|(_, s)| s).collect();
    let mut batches: Vec<RecordBatch> = all
        .chunks(40)
        .map(|chunk| batch(Vec::new(), chunk.to_vec()))
        .collect();
    batches[0].clients = (0..CLIENTS)
        .map(|c| client(&format!("c{c}"), c % 3 != 0, Some("tok")))
        .collect();
    batches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_staging_and_packing_store_each_sample_once() {
    let pg = TestPg::new().await;
    let mut rng = StdRng::seed_from_u64(11);
    let batches = Arc::new(all_batches(&mut rng));
    // The client rows first, so every later batch has them.
    pg.store.insert(&batches[..1]).await.unwrap();
    let inserted_until = Arc::new(AtomicI64::new(T0));
    let done = Arc::new(AtomicBool::new(false));

    let mut inserters = Vec::new();
    for part in 0..2usize {
        let (store, batches, until) = (pg.store.clone(), batches.clone(), inserted_until.clone());
        inserters.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(part as u64);
            for (i, b) in batches.iter().enumerate().skip(1) {
                if i % 2 != part {
                    continue;
                }
                store.insert(std::slice::from_ref(b)).await.unwrap();
                until.fetch_max(b.samples[0].at_us, Ordering::Relaxed);
                // Redeliveries of an earlier batch: mostly late by now.
                if rng.random_bool(0.2) {
                    let old = &batches[rng.random_range(1..=i)];
                    store.insert(std::slice::from_ref(old)).await.unwrap();
                }
            }
        }));
    }
    let mut packers = Vec::new();
    for _ in 0..2 {
        let store = PgStore::connect(&pg.url)
            .await
            .unwrap()
            .with_packing(Packing::FenceLast);
        let (until, done) = (inserted_until.clone(), done.clone());
        packers.push(tokio::spawn(async move {
            let mut packed = 0;
            while !done.load(Ordering::Relaxed) {
                // Up to the block before the newest inserted sample, so
                // inserts keep landing just after (and late samples
                // before) the packed boundary.
                let before = block_of(until.load(Ordering::Relaxed)) - BLOCK_US / 5;
                packed += store.pack(before).await.unwrap();
                // Both replicas fold the room's parts too, at once.
                store.fold_room_parts().await.unwrap();
                tokio::task::yield_now().await;
            }
            packed
        }));
    }
    for i in inserters {
        i.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut packed = 0;
    for p in packers {
        packed += p.await.unwrap();
    }
    assert!(packed > 0, "packing ran while staging");
    pg.store.pack(i64::MAX).await.unwrap();
    pg.store.fold_room_parts().await.unwrap();

    // Every sample once: each client's whole history is its n's.
    for c in 0..CLIENTS {
        let got = pg
            .store
            .samples(&SamplesQuery {
                channel_name: format!("c{c}"),
                token_digest: Some(services::ids::token_digest("tok")),
                since_us: None,
                limit: 10_000,
                deadline_unix_ms: None,
            })
            .await
            .unwrap()
            .expect("known client");
        let seqs: Vec<u64> = got.iter().map(|s| s.seq.unwrap()).collect();
        let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(seqs.len(), distinct.len(), "c{c}: a sample stored twice");
        assert_eq!(
            distinct,
            (0..PER_CLIENT).collect::<BTreeSet<_>>(),
            "c{c}: a sample lost"
        );
    }
    assert_eq!(pg.count().await, (CLIENTS as u64 * PER_CLIENT) as i64);
    // And counted once in the room's minutes.
    let public = (0..CLIENTS).filter(|c| c % 3 != 0).count() as i64 * PER_CLIENT as i64;
    let rolled: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(samples), 0)::bigint FROM room_minutes")
            .fetch_one(pg.store.pool())
            .await
            .unwrap();
    assert_eq!(rolled, public);
}
