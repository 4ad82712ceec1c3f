//! Packed storage (docs/architecture.md, "Sample storage"): whatever the
//! order of deliveries, redeliveries and packing, every sample is stored
//! once and reads return what a plain model of the samples returns; and a
//! database of the first layout keeps its samples through the migration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use recorder::store::Store;
use recorder::store::block::BLOCK_US;
use services::messages::{RecordBatch, SampleRecord, SamplesQuery, StatsBucket, StoredSample};

use crate::helpers::{batch, client, samples};

const BASE_US: i64 = 1_700_000_000_000_000;

fn query(id: &str, token: Option<&str>, since_us: Option<i64>, limit: u32) -> SamplesQuery {
    SamplesQuery {
        channel_name: id.to_owned(),
        token_digest: token.map(services::ids::token_digest),
        since_us,
        limit,
        deadline_unix_ms: None,
    }
}

async fn history(
    store: &dyn Store,
    id: &str,
    since_us: Option<i64>,
    limit: u32,
) -> Vec<StoredSample> {
    store
        .samples(&query(id, Some("tok"), since_us, limit))
        .await
        .expect("read")
        .unwrap_or_else(|| panic!("{id} readable"))
}

/// What the store must return: every distinct `(client, n)` once, the
/// first copy winning.
#[derive(Default)]
struct Model {
    samples: BTreeMap<(String, u64), SampleRecord>,
}

impl Model {
    fn add(&mut self, s: &SampleRecord) -> bool {
        let key = (s.channel_name.clone(), s.n);
        if self.samples.contains_key(&key) {
            return false;
        }
        self.samples.insert(key, s.clone());
        true
    }

    fn history(&self, id: &str, since_us: Option<i64>, limit: usize) -> Vec<StoredSample> {
        let mut v: Vec<&SampleRecord> = self
            .samples
            .values()
            .filter(|s| s.channel_name == id && s.at_us >= since_us.unwrap_or(i64::MIN))
            .collect();
        v.sort_by_key(|s| (s.at_us, s.n as i64));
        v.into_iter()
            .take(limit)
            .map(|s| StoredSample {
                at_us: s.at_us,
                delay_ms: s.delay_ms,
                seq: s.seq,
            })
            .collect()
    }

    /// The exact statistics of the public samples at or after `since`, and
    /// each bucket's sorted delays.
    fn stats(&self, since: i64, width: i64) -> Vec<(StatsBucket, Vec<f64>)> {
        let mut buckets: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for s in self
            .samples
            .values()
            .filter(|s| s.public && s.at_us >= since)
        {
            buckets
                .entry(s.at_us - s.at_us.rem_euclid(width))
                .or_default()
                .push(s.delay_ms);
        }
        buckets
            .into_iter()
            .map(|(start_us, mut v)| {
                v.sort_by(f64::total_cmp);
                let p = |q| services::stats::percentile_sorted(&v, q).unwrap();
                let b = StatsBucket {
                    start_us,
                    count: v.len() as u64,
                    min: v[0],
                    p50: p(50.0),
                    p95: p(95.0),
                    p99: p(99.0),
                    max: v[v.len() - 1],
                };
                (b, v)
            })
            .collect()
    }
}

/// Samples of `id` over about `blocks` blocks, in time order, with equal
/// times, missing seqs and, now and then, a delay that is no whole
/// thousandth.
pub(crate) fn random_samples(
    rng: &mut StdRng,
    id: &str,
    public: bool,
    count: u64,
) -> Vec<SampleRecord> {
    let mut at = BASE_US + rng.random_range(0..BLOCK_US);
    (0..count)
        .map(|n| {
            at += if rng.random_bool(0.05) {
                0
            } else {
                rng.random_range(1..90_000_000)
            };
            let delay_ms = if rng.random_bool(0.02) {
                rng.random::<f64>() * 500.0
            } else {
                f64::from(rng.random_range(0..400_000u32)) / 1000.0
            };
            SampleRecord {
                channel_name: id.to_owned(),
                n,
                seq: rng.random_bool(0.9).then(|| n + 7),
                at_us: at,
                delay_ms,
                public,
            }
        })
        .collect()
}

fn assert_same_history(got: &[StoredSample], expected: &[StoredSample], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: count");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            g.at_us == e.at_us && g.seq == e.seq && g.delay_ms.to_bits() == e.delay_ms.to_bits(),
            "{what}: sample {i}: {g:?} != {e:?}"
        );
    }
}

/// Count, min and max exact; each percentile within the sketch's bound
/// (docs/architecture.md, "Rollups"): within 1% of the interval between
/// the two samples the exact percentile interpolates between.
fn assert_stats_within_bound(got: &[StatsBucket], expected: &[(StatsBucket, Vec<f64>)]) {
    assert_eq!(got.len(), expected.len(), "bucket count");
    for (g, (e, values)) in got.iter().zip(expected) {
        assert_eq!(
            (g.start_us, g.count, g.min, g.max),
            (e.start_us, e.count, e.min, e.max)
        );
        assert_percentiles_within_bound([g.p50, g.p95, g.p99], values, g);
    }
}

/// Each of the estimates of p50, p95 and p99 of the sorted `values` within
/// the sketch's bound (docs/architecture.md, "Rollups"): within 1% of the
/// interval between the two samples the exact percentile interpolates
/// between.
pub(crate) fn assert_percentiles_within_bound(
    estimates: [f64; 3],
    values: &[f64],
    what: &dyn std::fmt::Debug,
) {
    use recorder::store::sketch::RELATIVE_ERROR;
    for (est, q) in estimates.into_iter().zip([0.5, 0.95, 0.99]) {
        let h = q * (values.len() - 1) as f64;
        let (lo, hi) = (values[h.floor() as usize], values[h.ceil() as usize]);
        assert!(
            est >= lo * (1.0 - RELATIVE_ERROR) - 1e-9 && est <= hi * (1.0 + RELATIVE_ERROR) + 1e-9,
            "p{}: {est} outside [{lo}, {hi}] ± 1%: {what:?}",
            q * 100.0
        );
    }
}

/// Exactly the model's statistics (no rollups involved).
fn assert_same_stats(got: &[StatsBucket], expected: &[(StatsBucket, Vec<f64>)]) {
    assert_eq!(got.len(), expected.len(), "bucket count");
    for (g, (e, _)) in got.iter().zip(expected) {
        assert_eq!(
            (g.start_us, g.count, g.min, g.max),
            (e.start_us, e.count, e.min, e.max)
        );
        for (a, b) in [(g.p50, e.p50), (g.p95, e.p95), (g.p99, e.p99)] {
            assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{g:?} != {e:?}");
        }
    }
}

const CLIENTS: [(&str, bool); 4] = [("p0", true), ("p1", true), ("q0", false), ("p2", true)];

async fn check_reads(store: &dyn Store, model: &Model, rng: &mut StdRng) {
    for (id, _) in CLIENTS {
        let all = model.history(id, None, 10_000);
        assert_same_history(&history(store, id, None, 10_000).await, &all, id);
        let since = all[rng.random_range(0..all.len())].at_us;
        let limit = rng.random_range(1..200);
        assert_same_history(
            &history(store, id, Some(since), limit).await,
            &model.history(id, Some(since), limit as usize),
            "since and limit",
        );
    }
    let now = BASE_US + 40 * BLOCK_US;
    let window = Duration::from_micros((now - BASE_US) as u64);
    // Whole minutes: from the room's rollups (tiers and parts).
    let width = 7 * 60_000_000;
    let got = store
        .stats(window, Duration::from_micros(width as u64), now)
        .await
        .expect("stats");
    let first_minute = BASE_US - BASE_US.rem_euclid(60_000_000);
    assert_stats_within_bound(&got, &model.stats(first_minute, width));
    // Other widths: from the samples themselves, exact.
    let width = 450_000_000;
    let got = store
        .stats(window, Duration::from_micros(width as u64), now)
        .await
        .expect("stats");
    assert_same_stats(&got, &model.stats(BASE_US, width));
}

/// Random batches, each delivered once or more, packing at random times
/// (so later samples land in packed blocks): every sample stored once,
/// reads equal to the model's before and after everything is packed.
pub async fn redelivery_and_packing_store_each_sample_once(store: Arc<dyn Store>) {
    for seed in 0..3u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut all: Vec<SampleRecord> = Vec::new();
        for (id, public) in CLIENTS {
            let count = rng.random_range(150..400);
            all.extend(random_samples(&mut rng, id, public, count));
        }
        // Mostly in order, as gateways send them, with some shuffling.
        all.shuffle(&mut rng);
        let mut keyed: Vec<(i64, SampleRecord)> = all
            .into_iter()
            .map(|s| (s.at_us / 1_200_000_000 + rng.random_range(0..2), s))
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        let all: Vec<SampleRecord> = keyed.into_iter().map(|(_, s)| s).collect();
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut rest = all.as_slice();
        while !rest.is_empty() {
            let k = rng.random_range(1..=rest.len().min(60));
            batches.push(batch(Vec::new(), rest[..k].to_vec()));
            rest = &rest[k..];
        }
        batches[0].clients = vec![
            client("p0", true, None),
            client("p1", true, None),
            client("q0", false, Some("tok")),
        ];
        let mut model = Model::default();
        let (mut inserted, mut duplicates) = (0u64, 0u64);
        for i in 0..batches.len() {
            let mut deliveries = vec![i];
            if i > 0 && rng.random_bool(0.3) {
                deliveries.push(rng.random_range(0..i));
            }
            for d in deliveries {
                let o = store
                    .insert(std::slice::from_ref(&batches[d]))
                    .await
                    .expect("insert");
                let new = batches[d].samples.iter().filter(|s| model.add(s)).count() as u64;
                assert_eq!(o.inserted, new, "batch {d}: new samples");
                inserted += o.inserted;
                duplicates += o.duplicates;
            }
            if rng.random_bool(0.2) {
                store.fold_room_parts().await.expect("fold");
            }
            if rng.random_bool(0.15) {
                let at = batches[i].samples[0].at_us + rng.random_range(-2 * BLOCK_US..BLOCK_US);
                store
                    .pack(at - at.rem_euclid(BLOCK_US))
                    .await
                    .expect("pack");
            }
            if i == batches.len() / 2 {
                check_reads(&*store, &model, &mut rng).await;
            }
        }
        assert_eq!(inserted, model.samples.len() as u64, "seed {seed}");
        check_reads(&*store, &model, &mut rng).await;
        // Everything packed and folded, then every batch delivered again:
        // nothing new.
        store.pack(i64::MAX).await.expect("pack all");
        check_reads(&*store, &model, &mut rng).await;
        store.fold_room_parts().await.expect("fold all");
        check_reads(&*store, &model, &mut rng).await;
        for b in &batches {
            let o = store
                .insert(std::slice::from_ref(b))
                .await
                .expect("redeliver");
            assert_eq!(o.inserted, 0, "redelivered after packing");
            duplicates += o.duplicates;
        }
        assert!(duplicates >= all.len() as u64);
        check_reads(&*store, &model, &mut rng).await;
        // A fresh start for the next seed.
        store.prune(i64::MAX).await.expect("prune all");
        store
            .prune_rollups(i64::MAX)
            .await
            .expect("prune all rollups");
    }
}

/// Packing keeps reads as they were; retention then drops whole blocks.
pub async fn packing_keeps_reads_and_prunes_whole_blocks(store: Arc<dyn Store>) {
    // Two blocks' worth of one sample a second, from a block start.
    let n = 2 * (BLOCK_US / 1_000_000) as u64;
    store
        .insert(&[batch(
            vec![client("a", true, None)],
            samples("a", true, 0..n, BASE_US - BASE_US % BLOCK_US),
        )])
        .await
        .unwrap();
    let start = BASE_US - BASE_US % BLOCK_US;
    let before = history(&*store, "a", None, 10_000).await;
    assert_eq!(
        store.pack(start + BLOCK_US).await.unwrap(),
        n / 2,
        "the first block"
    );
    assert_eq!(
        store.pack(start + BLOCK_US).await.unwrap(),
        0,
        "nothing left to pack"
    );
    assert_same_history(
        &history(&*store, "a", None, 10_000).await,
        &before,
        "after packing",
    );
    // A retention cutoff inside the first block keeps it whole…
    assert_eq!(store.prune(start + BLOCK_US / 2).await.unwrap(), 0);
    // …and one at its end drops it at once.
    assert_eq!(store.prune(start + BLOCK_US).await.unwrap(), n / 2);
    assert_same_history(
        &history(&*store, "a", None, 10_000).await,
        &before[n as usize / 2..],
        "pruned",
    );
}

/// The `samples` view decodes blocks in SQL to exactly what was stored.
#[tokio::test]
async fn the_samples_view_shows_every_stored_sample() {
    let pg = crate::helpers::TestPg::new().await;
    let mut rng = StdRng::seed_from_u64(7);
    let mut model = Model::default();
    for (id, public) in CLIENTS {
        let mut s = random_samples(&mut rng, id, public, 300);
        s[3].delay_ms = -0.0;
        s[4].delay_ms = 1e-310;
        s[5].delay_ms = f64::MAX;
        s[6].seq = Some(u64::MAX);
        s.iter().for_each(|s| {
            model.add(s);
        });
        pg.store.insert(&[batch(Vec::new(), s)]).await.unwrap();
    }
    pg.store.pack(BASE_US + 3 * BLOCK_US).await.unwrap();
    let rows: Vec<(String, i64, Option<i64>, i64, f64, bool)> = sqlx::query_as(
        "SELECT channel_name, n, seq, at_us, delay_ms, public FROM samples ORDER BY channel_name, n",
    )
    .fetch_all(pg.store.pool())
    .await
    .unwrap();
    let packed: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(samples), 0)::bigint FROM sample_blocks")
            .fetch_one(pg.store.pool())
            .await
            .unwrap();
    assert!(packed > 100, "some samples are packed: {packed}");
    assert_eq!(rows.len(), model.samples.len());
    for ((name, n, seq, at_us, delay, public), s) in rows.iter().zip(model.samples.values()) {
        assert_eq!(
            (
                name.as_str(),
                *n as u64,
                seq.map(|v| v as u64),
                *at_us,
                delay.to_bits(),
                *public
            ),
            (
                s.channel_name.as_str(),
                s.n,
                s.seq,
                s.at_us,
                s.delay_ms.to_bits(),
                s.public
            ),
        );
    }
}

/// Postgres keeps packed samples in day partitions: created ahead of time
/// (and for past days whose blocks waited in the default partition), and
/// dropped whole by retention.
#[tokio::test]
async fn day_partitions_are_created_ahead_and_dropped_whole() {
    const DAY: i64 = 86_400_000_000;
    let pg = crate::helpers::TestPg::new().await;
    let store = &pg.store;
    let today = BASE_US - BASE_US.rem_euclid(DAY);
    let now = today + 3_600_000_000;
    // Two days ago, packed before any partition existed (as after the
    // migration), and today's samples, staged.
    store
        .insert(&[batch(
            vec![client("a", true, None)],
            [
                samples("a", true, 0..100, today - 2 * DAY),
                samples("a", true, 100..200, today),
            ]
            .concat(),
        )])
        .await
        .unwrap();
    store.pack(today).await.unwrap();
    let before = history(&**store, "a", None, 10_000).await;
    let names = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'sample_blocks'::regclass ORDER BY 1",
        )
        .fetch_all(store.pool())
        .await
        .unwrap()
    };
    // Act: today, two days ahead, and the past day with blocks waiting.
    let created = store
        .maintain_partitions(now, Duration::from_secs(30 * 86_400))
        .await
        .unwrap();
    // Assert
    assert_eq!(created, 4);
    let day = |d: i64| {
        chrono::DateTime::from_timestamp_micros(today + d * DAY)
            .unwrap()
            .format("sample_blocks_d%Y%m%d")
            .to_string()
    };
    let mut expected = vec![
        day(-2),
        day(0),
        day(1),
        day(2),
        "sample_blocks_default".to_owned(),
    ];
    expected.sort();
    assert_eq!(names().await, expected);
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM sample_blocks_default")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(waiting, 0, "moved into their day's partition");
    assert_eq!(
        store
            .maintain_partitions(now, Duration::from_secs(30 * 86_400))
            .await
            .unwrap(),
        0
    );
    store.pack(now).await.unwrap();
    assert_same_history(
        &history(&**store, "a", None, 10_000).await,
        &before,
        "partitioned",
    );
    // Retention: the day that ended by the cutoff goes as a whole table;
    // today's blocks stay even where older than the cutoff.
    assert_eq!(store.prune(today - DAY).await.unwrap(), 100);
    assert!(!names().await.contains(&day(-2)));
    assert_eq!(
        store.prune(today + BLOCK_US).await.unwrap(),
        0,
        "today's partition is kept whole"
    );
    assert_same_history(
        &history(&**store, "a", None, 10_000).await,
        &before[100..],
        "pruned",
    );
}
