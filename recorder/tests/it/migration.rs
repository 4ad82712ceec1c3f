//! A database of the first layout (one row per sample, migration 0001)
//! keeps every sample through the migration to packed storage, on both
//! backends: the same history, access and statistics before and after, and
//! after packing.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use recorder::store::Store;
use recorder::store::postgres::PgStore;
use recorder::store::sqlite::SqliteStore;
use services::messages::{StatsBucket, StoredSample};
use sqlx::migrate::Migrator;

use crate::store::query;

/// The first migration only: the layout before packed storage.
fn first_layout(migrator: &Migrator) -> Migrator {
    let mut old = Migrator {
        migrations: Cow::Owned(migrator.migrations[..1].to_vec()),
        ..Migrator::DEFAULT
    };
    old.set_locking(true);
    old
}

/// Old-layout rows: 3 clients with rows (one private) and one without,
/// 3,000 samples over an hour, some delays no whole thousandth.
const OLD_DATA: &str = "\
    INSERT INTO clients VALUES ('pub', TRUE, NULL, 'gw', 1), ('priv', FALSE, 'DIGEST', 'gw', 1), \
                               ('idle', TRUE, NULL, 'gw', 1); \
    INSERT INTO samples (channel_name, n, seq, at_us, delay_ms, public) \
    SELECT CASE i % 3 WHEN 0 THEN 'pub' WHEN 1 THEN 'priv' ELSE 'norow' END, i / 3, \
           CASE WHEN i % 7 = 0 THEN NULL ELSE i END, \
           1700000000000000 + i::bigint * 1200000, \
           CASE WHEN i % 11 = 0 THEN i / 7.0 ELSE (i % 997) / 8.0 END, i % 3 <> 1 \
    FROM generate_series(0, 2999) i";

/// What the store shows of the old data.
async fn snapshot(store: &dyn Store) -> (Vec<Option<Vec<StoredSample>>>, Vec<StatsBucket>) {
    let mut reads = Vec::new();
    for (id, token) in [
        ("pub", None),
        ("priv", None),
        ("priv", Some("t")),
        ("norow", None),
        ("idle", None),
        ("none", None),
    ] {
        reads.push(store.samples(&query(id, token)).await.expect("read"));
    }
    let stats = store
        .stats(
            Duration::from_secs(7200),
            Duration::from_secs(60),
            1_700_000_000_000_000 + 3_700_000_000,
        )
        .await
        .expect("stats");
    (reads, stats)
}

async fn check(
    store: Arc<dyn Store>,
    expected: &(Vec<Option<Vec<StoredSample>>>, Vec<StatsBucket>),
) {
    let got = snapshot(&*store).await;
    assert_eq!(got.0, expected.0, "history and access");
    assert_eq!(got.1.len(), expected.1.len());
    for (g, e) in got.1.iter().zip(&expected.1) {
        assert_eq!(
            (g.start_us, g.count, g.min, g.max),
            (e.start_us, e.count, e.min, e.max)
        );
        assert!(
            (g.p50 - e.p50).abs() < 1e-9 && (g.p99 - e.p99).abs() < 1e-9,
            "{g:?} {e:?}"
        );
    }
    store.pack(i64::MAX).await.expect("pack everything");
    let packed = snapshot(&*store).await;
    assert_eq!(packed.0, expected.0, "history and access once packed");
}

fn expected_counts(reads: &[Option<Vec<StoredSample>>]) {
    let lens: Vec<Option<usize>> = reads.iter().map(|r| r.as_ref().map(Vec::len)).collect();
    assert_eq!(lens, [Some(1000), None, None, Some(1000), Some(0), None]);
}

#[tokio::test]
async fn a_populated_postgres_database_keeps_its_samples() {
    // Arrange: the first layout with data; its answers.
    let db = testkit::fresh_database().await;
    let all = sqlx::migrate!("./migrations/postgres");
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    first_layout(&all).run(&pool).await.unwrap();
    sqlx::raw_sql(OLD_DATA).execute(&pool).await.unwrap();
    let old_history: Vec<(i64, f64, Option<i64>)> = sqlx::query_as(
        "SELECT at_us, delay_ms, seq FROM samples WHERE channel_name = 'pub' ORDER BY at_us, n",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    // Act: the recorder opens it and migrates.
    let store: Arc<dyn Store> = Arc::new(PgStore::connect(&db.url).await.expect("migrates"));
    // Assert
    let expected = snapshot(&*store).await;
    expected_counts(&expected.0);
    let pub_history = expected.0[0].as_ref().unwrap();
    assert_eq!(pub_history.len(), old_history.len());
    for (s, (at, delay, seq)) in pub_history.iter().zip(&old_history) {
        assert_eq!(
            (s.at_us, s.delay_ms.to_bits(), s.seq),
            (*at, delay.to_bits(), seq.map(|v| v as u64))
        );
    }
    check(store, &expected).await;
}

#[tokio::test]
async fn a_populated_sqlite_database_keeps_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    let all = sqlx::migrate!("./migrations/sqlite");
    {
        let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
        let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
            .await
            .unwrap();
        first_layout(&all).run(&pool).await.unwrap();
        let sql = OLD_DATA
            .replace("TRUE", "1")
            .replace("FALSE", "0")
            .replace("i::bigint", "i")
            .replace("generate_series(0, 2999) i", "(WITH RECURSIVE g(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM g WHERE i < 2999) SELECT i FROM g)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(&url).await.expect("migrates"));
    let expected = snapshot(&*store).await;
    expected_counts(&expected.0);
    check(store, &expected).await;
}
