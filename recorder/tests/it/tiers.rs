//! The public room's rollup tiers (docs/architecture.md, "Rollups"):
//! `room_ten_minutes` and `room_hours` hold exactly the sums of their
//! minutes whatever the order of deliveries, redeliveries and packing;
//! statistics read from them equal statistics read from the minutes, and
//! do not change when the inserts' partial minute rows are folded into
//! them; a populated database of migration 0006 gets both tiers backfilled
//! by 0007 and its staged samples counted by 0008, and answers every figure
//! as before, on both backends, also when several recorders open it at
//! once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recorder::store::Rollup;
use recorder::store::Store;
use recorder::store::postgres::PgStore;
use recorder::store::sqlite::SqliteStore;
use services::messages::{RecordBatch, SampleRecord, StatsBucket};
use sqlx::migrate::Migrator;

use crate::helpers::{TestPg, TestSqlite, batch, client};
use crate::packing::{assert_percentiles_within_bound, random_samples};

const MINUTE: i64 = 60_000_000;
/// The room's tiers: table, time column, width.
const TIERS: [(&str, &str, i64); 3] = [
    ("room_minutes", "minute_us", MINUTE),
    ("room_ten_minutes", "ten_minute_us", 10 * MINUTE),
    ("room_hours", "hour_us", 60 * MINUTE),
];

/// A rollup row: `(start, samples, min, max, sketch)`.
type Row = (i64, i64, f64, f64, Vec<u8>);

/// The database under a store, for reading its tables.
enum Db {
    Pg(sqlx::PgPool),
    Lite(sqlx::SqlitePool),
}

impl Db {
    /// Every row of a tier, oldest first.
    async fn rows(&self, table: &str, column: &str) -> Vec<Row> {
        let sql = format!(
            "SELECT {column}, samples, min_ms, max_ms, sketch FROM {table} ORDER BY {column}"
        );
        match self {
            Db::Pg(p) => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(p).await,
            Db::Lite(p) => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(p).await,
        }
        .expect("read a tier")
    }

    /// How many rows `table` has.
    async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        match self {
            Db::Pg(p) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_one(p)
                    .await
            }
            Db::Lite(p) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_one(p)
                    .await
            }
        }
        .expect("count")
    }

    async fn execute(&self, sql: String) {
        match self {
            Db::Pg(p) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(p)
                .await
                .map(drop),
            Db::Lite(p) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(p)
                .await
                .map(drop),
        }
        .expect("execute");
    }
}

fn floor(at: i64, width: i64) -> i64 {
    at - at.rem_euclid(width)
}

fn row(start: i64, r: &Rollup) -> Row {
    (start, r.count as i64, r.min, r.max, r.sketch.encode())
}

/// The rows of a tier of `width` over the delays `(at_us, delay_ms)`.
fn model_rows(samples: &[(i64, f64)], width: i64) -> Vec<Row> {
    let mut rows: BTreeMap<i64, Rollup> = BTreeMap::new();
    for (at, v) in samples {
        rows.entry(floor(*at, width)).or_default().add(*v);
    }
    rows.iter().map(|(s, r)| row(*s, r)).collect()
}

/// Every tier equals the rows computed from `samples` (the public ones).
async fn assert_tiers(db: &Db, samples: &[(i64, f64)]) {
    for (table, column, width) in TIERS {
        assert_eq!(
            db.rows(table, column).await,
            model_rows(samples, width),
            "{table}"
        );
    }
}

/// Every coarse tier equals the merges of the minute rows.
async fn assert_coarse_rows_sum_minutes(db: &Db) {
    let minutes = db.rows("room_minutes", "minute_us").await;
    for (table, column, width) in &TIERS[1..] {
        let mut expected: BTreeMap<i64, Rollup> = BTreeMap::new();
        for (m, n, min, max, sketch) in &minutes {
            expected
                .entry(floor(*m, *width))
                .or_default()
                .merge(&Rollup {
                    count: *n as u64,
                    min: *min,
                    max: *max,
                    sketch: recorder::store::sketch::Sketch::decode(sketch).unwrap(),
                });
        }
        let expected: Vec<Row> = expected.iter().map(|(s, r)| row(*s, r)).collect();
        assert_eq!(db.rows(table, column).await, expected, "{table}");
    }
}

/// The statistics over `minutes` from `first` (a whole minute) on, in
/// buckets of `width`: `(start, count, min, max, p50, p95, p99)`.
fn stats_from_minutes(minutes: &[Row], first: i64, width: i64) -> Vec<StatsBucket> {
    let mut buckets: BTreeMap<i64, Rollup> = BTreeMap::new();
    for (m, n, min, max, sketch) in minutes.iter().filter(|r| r.0 >= first) {
        buckets.entry(floor(*m, width)).or_default().merge(&Rollup {
            count: *n as u64,
            min: *min,
            max: *max,
            sketch: recorder::store::sketch::Sketch::decode(sketch).unwrap(),
        });
    }
    buckets
        .into_iter()
        .map(|(start_us, r)| {
            let q = |q| r.sketch.quantile(q).unwrap();
            StatsBucket {
                start_us,
                count: r.count,
                min: r.min,
                p50: q(0.5),
                p95: q(0.95),
                p99: q(0.99),
                max: r.max,
            }
        })
        .collect()
}

/// Statistics in buckets of whole hours, ten minutes and minutes (read
/// from whichever tier divides the bucket) equal those summed from the
/// minute rows, exactly; and against the raw `samples`, counts and
/// extremes are exact and the percentiles within the sketch's bound.
async fn assert_stats_match_minutes(
    store: &dyn Store,
    db: &Db,
    samples: &[(i64, f64)],
    now: i64,
    widths: &[i64],
) {
    let minutes = db.rows("room_minutes", "minute_us").await;
    let start = samples.iter().map(|s| s.0).min().unwrap();
    // A window starting mid-minute, neither on an hour nor on ten minutes.
    let since = start + 13 * MINUTE + 20_000_000;
    let window = Duration::from_micros((now - since) as u64);
    let first = floor(since, MINUTE);
    for width in widths.iter().map(|m| m * MINUTE) {
        let got = store
            .stats(window, Duration::from_micros(width as u64), now)
            .await
            .expect("stats");
        assert_eq!(
            got,
            stats_from_minutes(&minutes, first, width),
            "width {width}"
        );
        let mut raw: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for (at, v) in samples.iter().filter(|s| s.0 >= first) {
            raw.entry(floor(*at, width)).or_default().push(*v);
        }
        assert_eq!(got.len(), raw.len(), "width {width}: buckets");
        for (b, (start, mut values)) in got.iter().zip(raw) {
            values.sort_by(f64::total_cmp);
            assert_eq!(
                (b.start_us, b.count, b.min, b.max),
                (
                    start,
                    values.len() as u64,
                    values[0],
                    values[values.len() - 1]
                )
            );
            assert_percentiles_within_bound([b.p50, b.p95, b.p99], &values, b);
        }
    }
}

/// Random batches of 4 clients (3 public) over about four hours, each
/// delivered once or twice, packed at random points, then all packed and
/// all delivered again: every tier equals the sums of the distinct public
/// samples, and the coarse tiers the sums of their minutes at every step.
async fn tiers_sum_their_samples_once(store: Arc<dyn Store>, db: Db) {
    let mut rng = StdRng::seed_from_u64(11);
    let mut all: Vec<SampleRecord> = Vec::new();
    for (id, public) in [("p0", true), ("p1", true), ("q0", false), ("p2", true)] {
        let count = rng.random_range(250..400);
        all.extend(random_samples(&mut rng, id, public, count));
    }
    let mut keyed: Vec<(i64, SampleRecord)> = all
        .into_iter()
        .map(|s| (s.at_us + rng.random_range(0..600_000_000), s))
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    let all: Vec<SampleRecord> = keyed.into_iter().map(|(_, s)| s).collect();
    let mut batches: Vec<RecordBatch> = Vec::new();
    let mut rest = all.as_slice();
    while !rest.is_empty() {
        let k = rng.random_range(1..=rest.len().min(40));
        batches.push(batch(Vec::new(), rest[..k].to_vec()));
        rest = &rest[k..];
    }
    batches[0].clients = vec![
        client("p0", true, None),
        client("p1", true, None),
        client("q0", false, Some("tok")),
    ];
    for i in 0..batches.len() {
        store.insert(&batches[i..=i]).await.expect("insert");
        if i > 0 && rng.random_bool(0.3) {
            let j = rng.random_range(0..i);
            store.insert(&batches[j..=j]).await.expect("redeliver");
        }
        if rng.random_bool(0.2) {
            store.fold_room_parts().await.expect("fold");
            assert_coarse_rows_sum_minutes(&db).await;
        }
        if rng.random_bool(0.2) {
            let at = batches[i].samples[0].at_us;
            store
                .pack(at - rng.random_range(0..3_600_000_000))
                .await
                .expect("pack");
        }
    }
    store.pack(i64::MAX).await.expect("pack all");
    for b in &batches {
        let o = store
            .insert(std::slice::from_ref(b))
            .await
            .expect("redeliver");
        assert_eq!(o.inserted, 0);
    }
    store.pack(i64::MAX).await.expect("pack again");
    // Statistics read the parts not folded yet as they read the tiers.
    let now = all.iter().map(|s| s.at_us).max().unwrap() + 5 * MINUTE;
    let window = Duration::from_secs(6 * 3600);
    let mut before = Vec::new();
    for width in [60, 10, 1, 7] {
        let bucket = Duration::from_secs(width * 60);
        before.push(store.stats(window, bucket, now).await.expect("stats"));
    }
    let parts: i64 = db.count("room_minute_parts").await;
    assert!(parts > 0, "parts left to fold");
    assert_eq!(store.fold_room_parts().await.expect("fold"), parts as u64);
    assert_eq!(db.count("room_minute_parts").await, 0);
    for (width, before) in [60, 10, 1, 7].into_iter().zip(before) {
        let bucket = Duration::from_secs(width * 60);
        assert_eq!(
            store.stats(window, bucket, now).await.expect("stats"),
            before,
            "{width} min buckets, parts folded"
        );
    }
    // The first copy of every (client, n) is the stored one.
    let mut distinct: BTreeMap<(String, u64), (bool, i64, f64)> = BTreeMap::new();
    for s in &all {
        distinct
            .entry((s.channel_name.clone(), s.n))
            .or_insert((s.public, s.at_us, s.delay_ms));
    }
    let public: Vec<(i64, f64)> = distinct
        .values()
        .filter(|(p, _, _)| *p)
        .map(|(_, at, v)| (*at, *v))
        .collect();
    assert_tiers(&db, &public).await;
    let end = public.iter().map(|s| s.0).max().unwrap();
    assert!(end - public.iter().map(|s| s.0).min().unwrap() > 2 * 3_600_000_000);
    let widths = [60, 120, 10, 20, 1, 7];
    assert_stats_match_minutes(&*store, &db, &public, end + 5 * MINUTE, &widths).await;
    // Retention removes the rows that ended by its bound, in every tier.
    let bound = floor(end, 3_600_000_000);
    store.prune_rollups(bound).await.expect("prune");
    let kept: Vec<(i64, f64)> = public.into_iter().filter(|s| s.0 >= bound).collect();
    assert_tiers(&db, &kept).await;
}

#[tokio::test]
async fn sqlite_tiers_sum_their_samples_once() {
    let t = TestSqlite::new().await;
    let db = Db::Lite(t.store.pool().clone());
    tiers_sum_their_samples_once(t.dyn_store(), db).await;
}

#[tokio::test]
async fn postgres_tiers_sum_their_samples_once() {
    let t = TestPg::new().await;
    let db = Db::Pg(t.store.pool().clone());
    tiers_sum_their_samples_once(t.dyn_store(), db).await;
}

/// The migrations up to 0006 only.
fn up_to_0006(migrator: &Migrator) -> Migrator {
    let mut old = Migrator {
        migrations: std::borrow::Cow::Owned(
            migrator
                .migrations
                .iter()
                .filter(|m| m.version <= 6)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    };
    old.set_locking(true);
    old
}

/// 12,500 minutes of room rollups (more than a page of the backfill),
/// from a time on no hour, 1 to 6 random delays each, and the delays.
fn old_minutes() -> (Vec<Row>, Vec<(i64, f64)>) {
    let mut rng = StdRng::seed_from_u64(6);
    let base = floor(1_700_000_000_000_000, MINUTE) + 7 * MINUTE;
    let mut samples = Vec::new();
    for i in 0..12_500 {
        let minute = base + i * MINUTE;
        for _ in 0..rng.random_range(1..=6) {
            let v = (rng.random_range(1_000..300_000) as f64) / 1000.0;
            samples.push((minute + rng.random_range(0..MINUTE), v));
        }
    }
    (model_rows(&samples, MINUTE), samples)
}

/// Inserts `rows` into `room_minutes` as literal SQL (`blob` formats a
/// sketch for the backend).
async fn insert_minutes(db: &Db, rows: &[Row], blob: fn(&[u8]) -> String) {
    for chunk in rows.chunks(1_000) {
        let values: Vec<String> = chunk
            .iter()
            .map(|(m, n, min, max, sketch)| {
                format!("({m}, {n}, {min:?}, {max:?}, {})", blob(sketch))
            })
            .collect();
        db.execute(format!(
            "INSERT INTO room_minutes (minute_us, samples, min_ms, max_ms, sketch) VALUES {}",
            values.join(", ")
        ))
        .await;
    }
}

/// Samples staged before migration 0008, inserted as literal SQL: 300
/// public ones over the last 5 minutes of `samples` and the 5 minutes
/// after (some in minutes with rows, some not), and 50 private ones.
/// Returns the public ones.
async fn stage_old_samples(db: &Db, samples: &[(i64, f64)]) -> Vec<(i64, f64)> {
    let mut rng = StdRng::seed_from_u64(8);
    let end = samples.iter().map(|s| s.0).max().unwrap();
    db.execute(
        "INSERT INTO channels (id, channel_name, public) VALUES (1, 'pub', TRUE), (2, 'priv', FALSE)"
            .into(),
    )
    .await;
    let mut public = Vec::new();
    let mut values = Vec::new();
    for n in 0..350 {
        let at = end - 5 * MINUTE + rng.random_range(0..10 * MINUTE);
        let v = (rng.random_range(1_000..300_000) as f64) / 1000.0;
        let channel = if n < 300 { 1 } else { 2 };
        if channel == 1 {
            public.push((at, v));
        }
        values.push(format!("({channel}, {n}, NULL, {at}, {v:?})"));
    }
    db.execute(format!(
        "INSERT INTO sample_staging (channel_id, n, seq, at_us, delay_ms) VALUES {}",
        values.join(", ")
    ))
    .await;
    public
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a migrated 0006 database must show: both coarse tiers backfilled
/// (0007), the samples staged before 0008 counted in the room's rollups
/// once folded (their parts written by 0008's backfill), every tier the
/// sums of the old minutes' samples and those, both backfills marked done,
/// and the same statistics as the minutes give.
async fn assert_upgraded(store: &dyn Store, db: &Db, samples: &[(i64, f64)]) {
    store.fold_room_parts().await.expect("fold");
    assert_eq!(
        db.rows("room_minutes", "minute_us").await,
        model_rows(samples, MINUTE)
    );
    assert_tiers(db, samples).await;
    assert_eq!(
        db.count("room_parts_backfill").await,
        0,
        "0008 backfill done"
    );
    let now = samples.iter().map(|s| s.0).max().unwrap() + MINUTE;
    // Not in minute buckets: 12,500 of them take long in a debug build.
    assert_stats_match_minutes(store, db, samples, now, &[60, 180, 10, 30]).await;
    assert_eq!(
        db.count("room_tiers_backfill").await,
        0,
        "backfill marked done"
    );
}

#[tokio::test]
async fn a_populated_0006_postgres_database_gets_its_tiers_backfilled() {
    let pg = testkit::fresh_database().await;
    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    up_to_0006(&sqlx::migrate!("./migrations/postgres"))
        .run(&pool)
        .await
        .unwrap();
    let (minutes, samples) = old_minutes();
    let db = Db::Pg(pool);
    insert_minutes(&db, &minutes, |b| format!("'\\x{}'::bytea", hex(b))).await;
    let samples = [samples.clone(), stage_old_samples(&db, &samples).await].concat();
    // Three recorders start at once (each on a thread of its own, as
    // processes would): one migrates and backfills, the others wait for it
    // and find it done.
    let opening: Vec<_> = (0..3)
        .map(|_| {
            let url = pg.url.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async { PgStore::connect(&url).await.map(drop) })
            })
        })
        .collect();
    for o in opening {
        o.join().unwrap().expect("opens");
    }
    let stores = [PgStore::connect(&pg.url).await.expect("opens again")];
    for store in &stores {
        assert_upgraded(store, &db, &samples).await;
    }
}

#[tokio::test]
async fn a_populated_0006_sqlite_database_gets_its_tiers_backfilled() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
    let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
        .await
        .unwrap();
    up_to_0006(&sqlx::migrate!("./migrations/sqlite"))
        .run(&pool)
        .await
        .unwrap();
    let (minutes, samples) = old_minutes();
    let db = Db::Lite(pool);
    insert_minutes(&db, &minutes, |b| format!("X'{}'", hex(b))).await;
    let samples = [samples.clone(), stage_old_samples(&db, &samples).await].concat();
    let store = SqliteStore::connect(&url).await.expect("migrates");
    assert_upgraded(&store, &db, &samples).await;
    // Opened again: nothing to do, nothing changes.
    drop(store);
    let store = SqliteStore::connect(&url).await.expect("opens again");
    assert_upgraded(&store, &db, &samples).await;
}
