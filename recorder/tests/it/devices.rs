//! A browser's own history across reloads (docs/architecture.md,
//! "Devices"), on both backends: per-device minute rollups equal to the
//! raw samples (count, min, max, mean exact, percentiles within the
//! sketch's bound, jitter by its definition) whatever the order of
//! deliveries, redeliveries, late samples and packing; devices never see
//! each other; forgetting removes everything of one device and nothing
//! else; retention of rollups and devices; the migration to 0006 keeps a
//! populated database's samples.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use recorder::store::Store;
use recorder::store::block::{BLOCK_US, block_of};
use recorder::store::postgres::PgStore;
use recorder::store::sqlite::SqliteStore;
use services::messages::{ClientRecord, HistoryBucket, RecordBatch, SampleRecord};
use sqlx::migrate::Migrator;

use crate::helpers::{TestPg, TestSqlite, batch, client, samples};
use crate::packing::{assert_percentiles_within_bound, random_samples};
use crate::store::query;

const BASE_US: i64 = 1_700_000_000_000_000;
const MINUTE: i64 = 60_000_000;

contract!(
    device_rollups_equal_the_raw_samples,
    retention_prunes_rollups_then_devices,
);

/// The digest of a browser's secret, as the gateway puts it on the record.
fn dev(secret: &str) -> String {
    services::ids::device_digest(secret)
}

/// A client record of a connection that presented `secret`.
fn client_of(id: &str, public: bool, secret: Option<&str>) -> ClientRecord {
    let mut c = client(id, public, (!public).then_some("tok"));
    c.device = secret.map(dev);
    c
}

/// What the store must hold: every distinct `(client, n)` once.
#[derive(Default)]
struct Model {
    samples: BTreeMap<(String, u64), SampleRecord>,
}

impl Model {
    fn add(&mut self, s: &SampleRecord) {
        self.samples
            .entry((s.channel_name.clone(), s.n))
            .or_insert_with(|| s.clone());
    }

    /// The history of the connections `channels` over `[first, end)` in
    /// buckets of `width`, by the definitions (docs/architecture.md,
    /// "Devices"): jitter pairs are consecutive samples of one connection
    /// within one block, counted in the bucket of the later sample. With
    /// each bucket's sorted delays.
    fn history(
        &self,
        channels: &[&str],
        first: i64,
        end: i64,
        width: i64,
    ) -> Vec<(HistoryBucket, Vec<f64>)> {
        #[derive(Default)]
        struct Acc {
            values: Vec<f64>,
            sum: f64,
            jitter: f64,
            pairs: u64,
        }
        let mut buckets: BTreeMap<i64, Acc> = BTreeMap::new();
        for id in channels {
            let mut mine: Vec<&SampleRecord> = self
                .samples
                .values()
                .filter(|s| s.channel_name == *id)
                .collect();
            mine.sort_by_key(|s| (s.at_us, s.n as i64));
            for (i, s) in mine.iter().enumerate() {
                if s.at_us < first || s.at_us >= end {
                    continue;
                }
                let b = buckets
                    .entry(s.at_us - s.at_us.rem_euclid(width))
                    .or_default();
                b.values.push(s.delay_ms);
                b.sum += s.delay_ms;
                if i > 0 && block_of(mine[i - 1].at_us) == block_of(s.at_us) {
                    b.jitter += (s.delay_ms - mine[i - 1].delay_ms).abs();
                    b.pairs += 1;
                }
            }
        }
        buckets
            .into_iter()
            .map(|(start_us, mut a)| {
                a.values.sort_by(f64::total_cmp);
                let p = |q| services::stats::percentile_sorted(&a.values, q).unwrap();
                let n = a.values.len();
                let b = HistoryBucket {
                    start_us,
                    count: n as u64,
                    min: a.values[0],
                    mean: a.sum / n as f64,
                    p50: p(50.0),
                    p95: p(95.0),
                    p99: p(99.0),
                    max: a.values[n - 1],
                    jitter: (a.pairs > 0).then(|| a.jitter / a.pairs as f64),
                };
                (b, a.values)
            })
            .collect()
    }
}

/// Count, min and max exact; mean and jitter to float rounding; each
/// percentile within the sketch's bound (docs/architecture.md, "Rollups").
fn assert_history(got: &[HistoryBucket], expected: &[(HistoryBucket, Vec<f64>)], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: bucket count");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    for (g, (e, values)) in got.iter().zip(expected) {
        assert_eq!(
            (g.start_us, g.count, g.min.to_bits(), g.max.to_bits()),
            (e.start_us, e.count, e.min.to_bits(), e.max.to_bits()),
            "{what}: {g:?} != {e:?}"
        );
        assert!(close(g.mean, e.mean), "{what}: mean: {g:?} != {e:?}");
        match (g.jitter, e.jitter) {
            (None, None) => {}
            (Some(a), Some(b)) => assert!(close(a, b), "{what}: jitter: {g:?} != {e:?}"),
            _ => panic!("{what}: jitter: {g:?} != {e:?}"),
        }
        assert_percentiles_within_bound([g.p50, g.p95, g.p99], values, &(what, g));
    }
}

/// The store's history of `secret`'s device against the model's, for a
/// few bucket widths (whole hours read hour rows, and minute rows before
/// the window's first whole hour) and two windows: one holding all the
/// data, one starting in the middle of an hour of it.
async fn check_device(store: &dyn Store, model: &Model, secret: &str, channels: &[&str]) {
    for (now, window_s) in [
        (BASE_US + 12 * 3_600_000_000, 13 * 3600),
        (BASE_US + 3 * 3_600_000_000 + 17 * MINUTE + 5, 2 * 3600),
    ] {
        let window = Duration::from_secs(window_s);
        let first = {
            let start = now - window.as_micros() as i64;
            start - start.rem_euclid(MINUTE)
        };
        let end = now - now.rem_euclid(MINUTE) + MINUTE;
        for width in [MINUTE, 7 * MINUTE, 60 * MINUTE, 120 * MINUTE] {
            let got = store
                .device_history(
                    &dev(secret),
                    window,
                    Duration::from_micros(width as u64),
                    now,
                )
                .await
                .expect("device history")
                .unwrap_or_else(|| panic!("{secret} is known"));
            assert_history(
                &got,
                &model.history(channels, first, end, width),
                &format!("{secret}, {width} µs buckets to {now}"),
            );
        }
    }
}

/// Three connections of one browser (one private), one of another, one
/// without a device: random batches, some delivered twice, packed at
/// random times (so later samples arrive late for packed blocks). Each
/// device's history equals the model's at every stage; after everything
/// is packed and delivered again, still.
async fn device_rollups_equal_the_raw_samples(store: Arc<dyn Store>) {
    for seed in 0..3u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (a, b) = (format!("a-{seed}"), format!("b-{seed}"));
        let conns: Vec<(String, bool, Option<&str>)> = vec![
            (format!("a0-{seed}"), true, Some(a.as_str())),
            (format!("a1-{seed}"), true, Some(a.as_str())),
            (format!("a2-{seed}"), false, Some(a.as_str())),
            (format!("b0-{seed}"), true, Some(b.as_str())),
            (format!("n0-{seed}"), true, None),
        ];
        let mut all: Vec<SampleRecord> = Vec::new();
        let mut firsts = Vec::new();
        for (id, public, _) in &conns {
            let count = rng.random_range(150..400);
            let mut s = random_samples(&mut rng, id, *public, count);
            firsts.push(s.remove(0));
            all.extend(s);
        }
        // Mostly in order, as gateways send them, with some shuffling.
        all.shuffle(&mut rng);
        let mut keyed: Vec<(i64, SampleRecord)> = all
            .into_iter()
            .map(|s| (s.at_us / 1_200_000_000 + rng.random_range(0..2), s))
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        let mut batches: Vec<RecordBatch> = vec![batch(
            conns
                .iter()
                .map(|(id, public, secret)| client_of(id, *public, *secret))
                .collect(),
            firsts,
        )];
        let mut rest: Vec<SampleRecord> = keyed.into_iter().map(|(_, s)| s).collect();
        while !rest.is_empty() {
            let k = rng.random_range(1..=rest.len().min(60));
            batches.push(batch(Vec::new(), rest.drain(..k).collect()));
        }
        let a_conns: Vec<&str> = conns[..3].iter().map(|c| c.0.as_str()).collect();
        let b_conns = [conns[3].0.as_str()];
        let mut model = Model::default();
        for i in 0..batches.len() {
            let mut deliveries = vec![i];
            if i > 0 && rng.random_bool(0.3) {
                deliveries.push(rng.random_range(0..i));
            }
            for d in deliveries {
                store
                    .insert(std::slice::from_ref(&batches[d]))
                    .await
                    .expect("insert");
                batches[d].samples.iter().for_each(|s| model.add(s));
            }
            if rng.random_bool(0.15) {
                let at = batches[i].samples[0].at_us + rng.random_range(-2 * BLOCK_US..BLOCK_US);
                store.pack(block_of(at)).await.expect("pack");
            }
            if i == batches.len() / 2 {
                check_device(&*store, &model, &a, &a_conns).await;
                check_device(&*store, &model, &b, &b_conns).await;
            }
        }
        check_device(&*store, &model, &a, &a_conns).await;
        check_device(&*store, &model, &b, &b_conns).await;
        store.pack(i64::MAX).await.expect("pack all");
        check_device(&*store, &model, &a, &a_conns).await;
        for batch in &batches {
            let o = store
                .insert(std::slice::from_ref(batch))
                .await
                .expect("redeliver");
            assert_eq!(o.inserted, 0, "redelivered after packing");
        }
        store.pack(i64::MAX).await.expect("pack again");
        check_device(&*store, &model, &a, &a_conns).await;
        check_device(&*store, &model, &b, &b_conns).await;
        // Nobody else: an unknown browser, or the connection id itself.
        for unknown in [dev("never-seen-0123456789"), conns[4].0.clone()] {
            assert_eq!(
                store
                    .device_history(
                        &unknown,
                        Duration::from_secs(86_400),
                        Duration::from_secs(60),
                        BASE_US
                    )
                    .await
                    .expect("read"),
                None
            );
        }
        // The raw history of each connection is still read by channel.
        for (id, _, _) in &conns {
            let read = store
                .samples(&query(id, Some("tok")))
                .await
                .expect("read")
                .expect("known");
            assert_eq!(
                read.len(),
                model.samples.keys().filter(|(c, _)| c == id).count()
            );
        }
    }
}

/// The history of `secret`'s device over the day before `now`, in buckets
/// of `bucket_s` seconds.
async fn last_day(
    store: &dyn Store,
    secret: &str,
    bucket_s: u64,
    now: i64,
) -> Option<Vec<HistoryBucket>> {
    store
        .device_history(
            &dev(secret),
            Duration::from_secs(86_400),
            Duration::from_secs(bucket_s),
            now,
        )
        .await
        .expect("read")
}

/// Raw retention leaves a device's rollups (its long history); rollup
/// retention deletes minutes by age, then the device once it has neither
/// connections nor rollups. A device whose connections still have samples
/// is kept.
async fn retention_prunes_rollups_then_devices(store: Arc<dyn Store>) {
    let start = block_of(BASE_US);
    let mut first = batch(vec![client_of("a0", true, Some("ret-a"))], Vec::new());
    first.samples = samples("a0", true, 0..100, start);
    store.insert(&[first]).await.unwrap();
    store.pack(start + BLOCK_US).await.unwrap();
    let mut other = batch(vec![client_of("b0", true, Some("ret-b"))], Vec::new());
    other.samples = samples("b0", true, 0..10, start + 5 * BLOCK_US);
    store.insert(&[other]).await.unwrap();
    let total = |h: Option<Vec<HistoryBucket>>| -> Option<u64> {
        h.map(|b| b.iter().map(|b| b.count).sum())
    };
    let read = |secret| last_day(&*store, secret, 3600, start + 6 * BLOCK_US);
    assert_eq!(total(read("ret-a").await), Some(100));

    // Raw retention: a0's samples and connection go, its minutes stay.
    store.prune(start + 2 * BLOCK_US).await.unwrap();
    assert_eq!(store.samples(&query("a0", None)).await.unwrap(), None);
    assert_eq!(total(read("ret-a").await), Some(100), "rollups outlive raw");

    // Rollup retention: the first minute (samples 0..60) goes; the hour
    // row stays until the whole hour has passed the cutoff…
    assert!(store.prune_rollups(start + MINUTE).await.unwrap() >= 1);
    assert_eq!(
        total(last_day(&*store, "ret-a", 60, start + 6 * BLOCK_US).await),
        Some(40)
    );
    assert_eq!(total(read("ret-a").await), Some(100), "the whole hour");
    // …then the rest, and the device without anything left.
    store
        .prune_rollups(start + 2 * 3_600_000_000)
        .await
        .unwrap();
    assert_eq!(read("ret-a").await, None, "pruned device");
    // b0 has staged samples and no rollups: kept.
    assert_eq!(total(read("ret-b").await), Some(10));
}

/// Counts rows of either backend.
enum Db {
    Pg(sqlx::PgPool),
    Lite(sqlx::SqlitePool),
}

impl Db {
    async fn count(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Db::Pg(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
            Db::Lite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        }
    }

    /// Rows of `table` whose `column` is one of the quoted names.
    async fn rows(&self, table: &str, column: &str, names: &str) -> i64 {
        self.count(&format!(
            "SELECT count(*) FROM {table} WHERE {column} IN ({names})"
        ))
        .await
    }
}

#[tokio::test]
async fn postgres_forget_removes_every_trace_of_one_device() {
    let pg = TestPg::new().await;
    forget_removes_every_trace_of_one_device(pg.dyn_store(), Db::Pg(pg.store.pool().clone())).await;
}

#[tokio::test]
async fn sqlite_forget_removes_every_trace_of_one_device() {
    let db = TestSqlite::new().await;
    forget_removes_every_trace_of_one_device(db.dyn_store(), Db::Lite(db.store.pool().clone()))
        .await;
}

/// Forgetting a device deletes its rollups, the samples (packed and
/// staged), channel and client rows of its connections and its device row;
/// another device is untouched; samples of the device still in the stream
/// recreate it afterwards (documented).
async fn forget_removes_every_trace_of_one_device(store: Arc<dyn Store>, db: Db) {
    let start = block_of(BASE_US);
    let first_a = batch(
        vec![
            client_of("fa0", true, Some("forget-a")),
            client_of("fa1", false, Some("forget-a")),
            client_of("fb0", true, Some("forget-b")),
        ],
        [
            samples("fa0", true, 0..700, start),
            samples("fa1", false, 0..300, start),
            samples("fb0", true, 0..300, start),
        ]
        .concat(),
    );
    store.insert(std::slice::from_ref(&first_a)).await.unwrap();
    // The first block packed (rollups), the rest staged.
    store.pack(start + BLOCK_US).await.unwrap();
    let read = |secret| last_day(&*store, secret, 60, start + 2 * BLOCK_US);
    let b_before = read("forget-b").await.expect("b known");
    let a_before = read("forget-a").await.expect("a known");
    assert_eq!(a_before.iter().map(|b| b.count).sum::<u64>(), 1000);
    let names = "'fa0', 'fa1'";
    assert!(db.rows("channels", "channel_name", names).await == 2);
    let b_minutes = db.count("SELECT count(*) FROM device_minutes").await;
    assert!(b_minutes > 10, "rollups of both devices: {b_minutes}");

    // Act
    assert_eq!(
        store.forget_device(&dev("forget-a")).await.unwrap(),
        Some(2)
    );

    // Assert: nothing of a is left…
    assert_eq!(read("forget-a").await, None);
    assert_eq!(store.samples(&query("fa0", None)).await.unwrap(), None);
    assert_eq!(
        store.samples(&query("fa1", Some("tok"))).await.unwrap(),
        None
    );
    assert_eq!(db.rows("channels", "channel_name", names).await, 0);
    assert_eq!(db.rows("clients", "channel_name", names).await, 0);
    assert_eq!(db.count("SELECT count(*) FROM devices").await, 1);
    let left = "SELECT (SELECT count(*) FROM sample_staging) \
                + (SELECT coalesce(sum(samples), 0) FROM sample_blocks)";
    assert_eq!(db.count(left).await, 300, "only fb0's samples");
    let b_rows = db
        .count("SELECT count(*) FROM device_minutes m JOIN devices d ON d.id = m.device_id")
        .await;
    assert_eq!(
        db.count("SELECT count(*) FROM device_minutes").await,
        b_rows
    );
    // …and b is untouched.
    assert_eq!(read("forget-b").await, Some(b_before));
    assert_eq!(
        store
            .samples(&query("fb0", None))
            .await
            .unwrap()
            .unwrap()
            .len(),
        300
    );
    assert_eq!(store.forget_device(&dev("forget-a")).await.unwrap(), None);
    assert_eq!(
        store.forget_device(&dev("nobody-at-all")).await.unwrap(),
        None
    );

    // A redelivery of a's first batch after the forget stores it again.
    store.insert(&[first_a]).await.unwrap();
    let again = read("forget-a").await.expect("recreated by later samples");
    assert_eq!(again.iter().map(|b| b.count).sum::<u64>(), 1000);
}

/// Every migration but the last: the schema before 0006.
fn before_devices(all: &Migrator) -> Migrator {
    let n = all.migrations.len();
    let mut old = Migrator {
        migrations: Cow::Owned(all.migrations[..n - 1].to_vec()),
        ..Migrator::DEFAULT
    };
    old.set_locking(true);
    old
}

/// 2,000 staged samples of a connection in the schema before 0006.
const OLD_ROWS: &str = "\
    INSERT INTO clients VALUES ('old', TRUE, NULL, 'gw', 1); \
    INSERT INTO channels (channel_name, public) VALUES ('old', TRUE); \
    INSERT INTO sample_staging (channel_id, n, seq, at_us, delay_ms) \
    SELECT (SELECT id FROM channels WHERE channel_name = 'old'), i, i, \
           1700000000000000 + i * 1000000, (i % 997) / 8.0 FROM generate_series(0, 1999) i";

/// After the migration: the old samples read the same, packed or not, and
/// new connections with a device get their history.
async fn after_migration(store: Arc<dyn Store>) {
    let read = || async {
        store
            .samples(&query("old", None))
            .await
            .unwrap()
            .expect("old connection")
    };
    let before = read().await;
    assert_eq!(before.len(), 2000);
    assert_eq!(before[1999].at_us, BASE_US + 1999 * 1_000_000);
    store.pack(i64::MAX).await.unwrap();
    assert_eq!(read().await, before, "packed");
    let start = block_of(BASE_US);
    store
        .insert(&[batch(
            vec![client_of("new", true, Some("migrated"))],
            samples("new", true, 0..50, start),
        )])
        .await
        .unwrap();
    store.pack(i64::MAX).await.unwrap();
    let h = store
        .device_history(
            &dev("migrated"),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            start + 600_000_000,
        )
        .await
        .unwrap()
        .expect("device");
    assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 50);
}

#[tokio::test]
async fn a_populated_postgres_database_migrates_to_devices() {
    let db = testkit::fresh_database().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    before_devices(&sqlx::migrate!("./migrations/postgres"))
        .run(&pool)
        .await
        .unwrap();
    let sql = OLD_ROWS.replace("i * 1000000", "i::bigint * 1000000");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let store = Arc::new(PgStore::connect(&db.url).await.expect("migrates"));
    after_migration(store).await;
}

#[tokio::test]
async fn a_populated_sqlite_database_migrates_to_devices() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    {
        let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
        let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
            .await
            .unwrap();
        before_devices(&sqlx::migrate!("./migrations/sqlite"))
            .run(&pool)
            .await
            .unwrap();
        let sql = OLD_ROWS.replace("TRUE", "1").replace(
            "generate_series(0, 1999) i",
            "(WITH RECURSIVE g(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM g WHERE i < 1999) \
             SELECT i FROM g)",
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let store = Arc::new(SqliteStore::connect(&url).await.expect("migrates"));
    after_migration(store).await;
}
