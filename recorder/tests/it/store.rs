//! The store contract, written once and run against SQLite and Postgres.

use std::sync::Arc;
use std::time::Duration;

use recorder::store::{InsertOutcome, Store};
use services::messages::{SampleRecord, SamplesQuery, StatsBucket};

use crate::helpers::{TestPg, TestSqlite, batch, client, samples};
use crate::packing::{
    packing_keeps_reads_and_prunes_whole_blocks, redelivery_and_packing_store_each_sample_once,
};

contract!(
    inserts_are_idempotent,
    large_inserts_span_several_statements,
    private_history_needs_the_token,
    history_is_oldest_first_with_since_and_limit,
    stats_cover_public_samples_per_bucket,
    prune_deletes_old_samples_and_clients,
    redelivery_and_packing_store_each_sample_once,
    packing_keeps_reads_and_prunes_whole_blocks,
    a_gateway_speaks_for_its_own_clients_only,
);

/// A history query for all of `id`'s samples (up to the API's limit).
pub(crate) fn query(id: &str, token: Option<&str>) -> SamplesQuery {
    SamplesQuery {
        channel_name: id.to_owned(),
        token_digest: token.map(services::ids::token_digest),
        since_us: None,
        limit: 10_000,
        deadline_unix_ms: None,
    }
}

async fn count(store: &dyn Store, id: &str) -> usize {
    store
        .samples(&query(id, None))
        .await
        .expect("read")
        .map_or(0, |s| s.len())
}

async fn inserts_are_idempotent(store: Arc<dyn Store>) {
    // Arrange
    let first = batch(vec![client("a", true, None)], samples("a", true, 0..100, 0));
    // Act and assert: new, then all duplicates.
    let o = store.insert(std::slice::from_ref(&first)).await.unwrap();
    assert_eq!(
        o,
        InsertOutcome {
            inserted: 100,
            duplicates: 0,
            ..Default::default()
        }
    );
    let o = store.insert(std::slice::from_ref(&first)).await.unwrap();
    assert_eq!(
        o,
        InsertOutcome {
            inserted: 0,
            duplicates: 100,
            ..Default::default()
        }
    );
    // Overlapping batches in one call, and a duplicate inside one batch.
    let mut dup_inside = samples("a", true, 150..160, 0);
    dup_inside.extend(samples("a", true, 155..160, 0));
    let o = store
        .insert(&[
            batch(vec![], samples("a", true, 50..150, 0)),
            batch(vec![client("b", true, None)], samples("b", true, 0..10, 0)),
            batch(vec![], dup_inside),
        ])
        .await
        .unwrap();
    assert_eq!(
        o,
        InsertOutcome {
            inserted: 70,
            duplicates: 55,
            ..Default::default()
        }
    );
    assert_eq!(count(&*store, "a").await, 160);
    assert_eq!(count(&*store, "b").await, 10);
    // Nothing at all.
    assert_eq!(store.insert(&[]).await.unwrap(), InsertOutcome::default());
    let o = store.insert(&[batch(vec![], vec![])]).await.unwrap();
    assert_eq!(o, InsertOutcome::default());
    // A known client is kept as it was first stored.
    store
        .insert(&[batch(vec![client("a", false, Some("t"))], vec![])])
        .await
        .unwrap();
    assert_eq!(count(&*store, "a").await, 160, "a stays public");
    // Extreme counters round-trip; a missing seq stays missing.
    let odd = vec![
        SampleRecord {
            channel_name: "c".into(),
            n: u64::MAX,
            seq: Some(u64::MAX),
            at_us: 5,
            delay_ms: 0.125,
            public: true,
        },
        SampleRecord {
            channel_name: "c".into(),
            n: 0,
            seq: None,
            at_us: 6,
            delay_ms: 60_000.0,
            public: true,
        },
    ];
    store
        .insert(&[batch(vec![client("c", true, None)], odd)])
        .await
        .unwrap();
    let got = store.samples(&query("c", None)).await.unwrap().unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].at_us, got[0].seq, got[0].delay_ms),
        (5, Some(u64::MAX), 0.125)
    );
    assert_eq!(
        (got[1].at_us, got[1].seq, got[1].delay_ms),
        (6, None, 60_000.0)
    );
}

async fn large_inserts_span_several_statements(store: Arc<dyn Store>) {
    // More rows than one statement takes, on either backend.
    let clients: Vec<_> = (0..12_000)
        .map(|i| client(&format!("c{i}"), true, None))
        .collect();
    let first = batch(clients, samples("a", true, 0..12_000, 0));
    let o = store.insert(std::slice::from_ref(&first)).await.unwrap();
    assert_eq!(
        o,
        InsertOutcome {
            inserted: 12_000,
            duplicates: 0,
            ..Default::default()
        }
    );
    let o = store
        .insert(&[first, batch(vec![], samples("a", true, 12_000..25_000, 0))])
        .await
        .unwrap();
    assert_eq!(
        o,
        InsertOutcome {
            inserted: 13_000,
            duplicates: 12_000,
            ..Default::default()
        }
    );
    assert_eq!(count(&*store, "a").await, 10_000, "capped at MAX_SAMPLES");
    assert_eq!(count(&*store, "c11999").await, 0);
    assert!(
        store
            .samples(&query("c11999", None))
            .await
            .unwrap()
            .is_some()
    );
}

async fn private_history_needs_the_token(store: Arc<dyn Store>) {
    // Arrange: a public client, a private one with a token, a private v1
    // client without one, and samples without a client row.
    store
        .insert(&[batch(
            vec![
                client("pub", true, None),
                client("priv", false, Some("secret")),
                client("v1", false, None),
            ],
            [
                samples("pub", true, 0..3, 0),
                samples("priv", false, 0..4, 0),
                samples("v1", false, 0..2, 0),
                samples("orphan-pub", true, 0..2, 0),
                samples("orphan-priv", false, 0..2, 0),
            ]
            .concat(),
        )])
        .await
        .unwrap();
    let read = |id: &'static str, token: Option<&'static str>| {
        let store = store.clone();
        async move {
            store
                .samples(&query(id, token))
                .await
                .unwrap()
                .map(|s| s.len())
        }
    };
    // Public: anyone, token or not.
    assert_eq!(read("pub", None).await, Some(3));
    assert_eq!(read("pub", Some("whatever")).await, Some(3));
    // Private: only with the right token; otherwise exactly like unknown.
    assert_eq!(read("priv", Some("secret")).await, Some(4));
    assert_eq!(read("priv", None).await, None);
    assert_eq!(read("priv", Some("wrong")).await, None);
    let digest = services::ids::token_digest("secret");
    let with_digest = store.samples(&query("priv", Some(&digest))).await.unwrap();
    assert_eq!(with_digest, None, "the stored digest is not a token");
    assert_eq!(read("nobody", None).await, None);
    assert_eq!(read("nobody", Some("secret")).await, None);
    // A private client without a token is readable by nobody.
    assert_eq!(read("v1", None).await, None);
    assert_eq!(read("v1", Some("")).await, None);
    // No client row: the samples' own flag decides.
    assert_eq!(read("orphan-pub", None).await, Some(2));
    assert_eq!(read("orphan-priv", None).await, None);
}

async fn history_is_oldest_first_with_since_and_limit(store: Arc<dyn Store>) {
    // Arrange: samples inserted out of order.
    let mut s = samples("a", true, 0..20, 1_000_000_000);
    s.reverse();
    s.swap(3, 11);
    store
        .insert(&[batch(vec![client("a", true, None)], s)])
        .await
        .unwrap();
    // Oldest first.
    let all = store.samples(&query("a", None)).await.unwrap().unwrap();
    let times: Vec<i64> = all.iter().map(|s| s.at_us).collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(times, sorted);
    assert_eq!(all.len(), 20);
    assert_eq!(all[0].delay_ms, 0.0);
    assert_eq!(all[0].seq, Some(0));
    // since: at or after.
    let q = SamplesQuery {
        since_us: Some(1_000_000_000 + 15 * 1_000_000),
        ..query("a", None)
    };
    let recent = store.samples(&q).await.unwrap().unwrap();
    assert_eq!(
        recent.iter().map(|s| s.delay_ms).collect::<Vec<_>>(),
        [15.0, 16.0, 17.0, 18.0, 19.0]
    );
    // limit: the oldest `limit`.
    let q = SamplesQuery {
        limit: 3,
        ..query("a", None)
    };
    let first = store.samples(&q).await.unwrap().unwrap();
    assert_eq!(
        first.iter().map(|s| s.delay_ms).collect::<Vec<_>>(),
        [0.0, 1.0, 2.0]
    );
    let q = SamplesQuery {
        limit: 0,
        ..query("a", None)
    };
    assert_eq!(store.samples(&q).await.unwrap(), Some(vec![]));
    // Since in the future: found, but empty.
    let q = SamplesQuery {
        since_us: Some(i64::MAX),
        ..query("a", None)
    };
    assert_eq!(store.samples(&q).await.unwrap(), Some(vec![]));
}

async fn stats_cover_public_samples_per_bucket(store: Arc<dyn Store>) {
    // Arrange: minute buckets; `now` is 10 s into the third minute.
    const MIN: i64 = 60_000_000;
    let t0 = 1_700_000_040 * 1_000_000; // a multiple of a minute
    assert_eq!(t0 % MIN, 0);
    let now = t0 + 2 * MIN + 10_000_000;
    let sample = |id: &str, n: u64, at_us: i64, delay_ms: f64, public: bool| SampleRecord {
        channel_name: id.into(),
        n,
        seq: None,
        at_us,
        delay_ms,
        public,
    };
    let mut s = Vec::new();
    // Bucket t0: 1..=200 ms, shuffled in time within its first 10 s.
    for i in 1..=200u64 {
        let at = t0 + ((i * 7919) % 200) as i64 * 50_000;
        s.push(sample("p", i, at, i as f64, true));
    }
    // Bucket t0 + 2 min: three samples.
    for (i, d) in [(1000u64, 30.0), (1001, 10.0), (1002, 20.0)] {
        s.push(sample("p", i, t0 + 2 * MIN + 1_000, d, true));
    }
    // Private samples with extreme values in both buckets: never counted.
    s.push(sample("q", 1, t0 + 5, 9_999.0, false));
    s.push(sample("q", 2, t0 + 2 * MIN, 0.001, false));
    // Public, but outside the window.
    s.push(sample("p", 2000, t0 - 5 * MIN, 0.5, true));
    store
        .insert(&[batch(
            vec![client("p", true, None), client("q", false, Some("k"))],
            s,
        )])
        .await
        .unwrap();

    // Act: sub-minute buckets read the samples themselves.
    let window = Duration::from_secs(3 * 60);
    let buckets = store
        .stats(window, Duration::from_secs(10), now)
        .await
        .unwrap();

    // Assert: percentiles interpolated between closest ranks (the one
    // definition, docs/protocol.md "Statistics"), empty buckets left out.
    let rounded = |b: &StatsBucket| StatsBucket {
        p50: round6(b.p50),
        p95: round6(b.p95),
        p99: round6(b.p99),
        ..b.clone()
    };
    assert_eq!(
        buckets.iter().map(rounded).collect::<Vec<_>>(),
        vec![
            StatsBucket {
                start_us: t0,
                count: 200,
                min: 1.0,
                p50: 100.5,
                p95: 190.05,
                p99: 198.01,
                max: 200.0,
            },
            StatsBucket {
                start_us: t0 + 2 * MIN,
                count: 3,
                min: 10.0,
                p50: 20.0,
                p95: 29.0,
                p99: 29.8,
                max: 30.0,
            },
        ]
    );
    // Minute buckets read the room's rollups: the same buckets, count,
    // min and max exact, percentiles within the sketch's bound.
    let minutes = store
        .stats(window, Duration::from_secs(60), now)
        .await
        .unwrap();
    assert_eq!(minutes.len(), 2);
    let values: [Vec<f64>; 2] = [(1..=200).map(f64::from).collect(), vec![10.0, 20.0, 30.0]];
    for ((m, b), values) in minutes.iter().zip(&buckets).zip(&values) {
        assert_eq!(
            (m.start_us, m.count, m.min, m.max),
            (b.start_us, b.count, b.min, b.max)
        );
        crate::packing::assert_percentiles_within_bound([m.p50, m.p95, m.p99], values, m);
    }
    // A wider window reaches the old sample; the window start need not be
    // aligned, the buckets are.
    let wide = store
        .stats(Duration::from_secs(10 * 60), Duration::from_secs(60), now)
        .await
        .unwrap();
    assert_eq!(wide.len(), 3);
    assert_eq!(wide[0].start_us, t0 - 5 * MIN);
    assert_eq!((wide[0].count, wide[0].min, wide[0].max), (1, 0.5, 0.5));
    // One bucket for everything.
    let one = store
        .stats(window, Duration::from_secs(3600), now)
        .await
        .unwrap();
    assert_eq!(one.iter().map(|b| b.count).sum::<u64>(), 203);
    // Nothing in an empty window; a zero bucket is refused.
    let none = store
        .stats(
            Duration::from_secs(1),
            Duration::from_secs(60),
            t0 + 10 * MIN,
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    let err = store.stats(window, Duration::ZERO, now).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");
}

async fn prune_deletes_old_samples_and_clients(store: Arc<dyn Store>) {
    // Arrange: "old" has only old samples, "mixed" old and new ones,
    // "fresh" connected after the cutoff without samples yet.
    let cutoff = 1_000_000_000;
    let mut fresh = client("fresh", true, None);
    fresh.connected_at_us = cutoff + 1;
    store
        .insert(&[batch(
            vec![
                client("old", true, None),
                client("mixed", true, None),
                fresh,
            ],
            [
                samples("old", true, 0..5, cutoff - 100_000_000),
                samples("mixed", true, 0..3, cutoff - 3_000_000),
                samples("mixed", true, 3..6, cutoff),
            ]
            .concat(),
        )])
        .await
        .unwrap();
    // Act
    let pruned = store.prune(cutoff).await.unwrap();
    // Assert
    assert_eq!(pruned, 8);
    assert_eq!(
        store.samples(&query("old", None)).await.unwrap(),
        None,
        "client gone too"
    );
    assert_eq!(count(&*store, "mixed").await, 3);
    assert_eq!(
        store.samples(&query("fresh", None)).await.unwrap(),
        Some(vec![])
    );
    assert_eq!(store.prune(cutoff).await.unwrap(), 0);
}

/// The stores are usable through `connect` by URL, too.
#[tokio::test]
async fn connect_picks_the_backend_by_scheme() {
    let sqlite = TestSqlite::new().await;
    assert!(sqlite.store.ping().await);
    let mem = recorder::store::connect("sqlite::memory:").await.unwrap();
    mem.insert(&[batch(
        vec![client("m", true, None)],
        samples("m", true, 0..3, 0),
    )])
    .await
    .unwrap();
    assert_eq!(
        count(&*mem, "m").await,
        3,
        "one connection keeps one in-memory database"
    );
    let pg = TestPg::new().await;
    let again = recorder::store::connect(&pg.url)
        .await
        .expect("migrations run twice");
    assert!(again.ping().await);
    assert!(recorder::store::connect("mysql://x").await.is_err());
}

/// Several replicas starting at once migrate one after the other.
#[tokio::test]
async fn concurrent_migrations_are_safe() {
    // Arrange: an empty database (the fixture migrated it; undo that).
    let pg = TestPg::new().await;
    sqlx::raw_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        .execute(pg.store.pool())
        .await
        .unwrap();
    // Act: four replicas start at once.
    let opens = (0..4).map(|_| recorder::store::connect(&pg.url));
    let results = futures_util::future::join_all(opens).await;
    // Assert
    for r in results {
        r.expect("every replica starts");
    }
    assert_eq!(pg.count().await, 0);
}

/// `v` rounded to 6 decimals: both backends interpolate in floating point,
/// and the last bit may differ between them.
fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// A history read for an unknown id costs an index probe, not a scan: on a
/// few hundred thousand samples, the access check by client reads a handful
/// of pages (`bool_and(public)` over the samples walked a whole index).
#[tokio::test]
async fn an_unknown_id_costs_an_index_probe_not_a_scan() {
    let pg = TestPg::new().await;
    let pool = pg.store.pool();
    sqlx::query(
        "INSERT INTO channels (channel_name, public) \
         SELECT 'c' || i, i % 2 = 0 FROM generate_series(0, 499) i",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sample_staging SELECT c.id, i, i, i * 1000, 1.5 \
         FROM generate_series(1, 300000) i JOIN channels c ON c.channel_name = 'c' || (i % 500)",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    // The generic plan, as a prepared statement runs it after a few calls.
    // (The statement below is a constant of ours, not input.)
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    let explain = format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
        recorder::store::postgres::ACCESS_BY_SAMPLES
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(explain))
        .bind("nobody-like-this")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    // EXPLAIN's `json` column is its text on the wire.
    let plan: String = sqlx::Row::try_get_unchecked(&row, 0).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let top = &plan[0]["Plan"];
    let pages =
        top["Shared Hit Blocks"].as_u64().unwrap() + top["Shared Read Blocks"].as_u64().unwrap();
    assert!(pages < 20, "{pages} pages read for an unknown id: {plan}");

    // And the access check still finds a known client without a row.
    assert_eq!(count(&*pg.store, "c8").await, 600, "c8 is public");
}

/// Reads have their own pool and statement timeout: a read stuck behind a
/// lock is cut off after `statement_timeout`; the ping, on the other pool,
/// answers meanwhile.
#[tokio::test]
async fn reads_are_cut_off_by_their_statement_timeout() {
    let pg = TestPg::new().await;
    let limits = recorder::store::ReadLimits {
        connections: 1,
        statement_timeout: Duration::from_millis(300),
    };
    let store = recorder::store::postgres::PgStore::connect_with(&pg.url, limits)
        .await
        .unwrap();
    store
        .insert(&[batch(
            vec![client("a", true, None)],
            samples("a", true, 0..3, 0),
        )])
        .await
        .unwrap();
    let mut blocker = pg.store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE channels IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), store.samples(&query("a", None)))
        .await
        .expect("the read ends without the lock being released");
    assert!(read.is_err(), "a blocked read fails: {read:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "cut off by the statement timeout after {took:?}"
    );
    // The lock holds only channels: the ping (SELECT 1) answers.
    assert!(store.ping().await, "the ping has its own pool");

    blocker.rollback().await.unwrap();
    assert_eq!(count(&store, "a").await, 3);
}

/// SQLite has no statement timeout: a progress handler interrupts a read
/// past the read timeout, and the connection is clean for what follows.
#[tokio::test]
async fn sqlite_reads_are_cut_off_by_the_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let cut = |ms| recorder::store::ReadLimits {
        connections: 1,
        statement_timeout: Duration::from_millis(ms),
    };
    let strict = recorder::store::sqlite::SqliteStore::connect_with(&url, cut(0))
        .await
        .unwrap();
    strict
        .insert(&[batch(
            vec![client("a", true, None)],
            samples("a", true, 0..5000, 0),
        )])
        .await
        .unwrap();
    let window = Duration::from_secs(86_400);
    let now = 10_000_000_000;
    // Sub-minute buckets: the read that takes the samples themselves
    // (900 of them here; minute buckets read a few rollup rows).
    let raw = (
        Duration::from_secs(900),
        Duration::from_secs(10),
        5_000_000_000,
    );
    let err = strict
        .stats(raw.0, raw.1, raw.2)
        .await
        .expect_err("a read past its deadline is interrupted");
    assert!(err.to_string().contains("interrupt"), "{err}");
    // Writes on the same pool are not cut off by a read's deadline.
    let o = strict
        .insert(&[batch(Vec::new(), samples("a", true, 5000..6000, 0))])
        .await
        .expect("a write after an interrupted read");
    assert_eq!(o.inserted, 1000);
    let patient = recorder::store::sqlite::SqliteStore::connect_with(&url, cut(5000))
        .await
        .unwrap();
    let buckets = patient
        .stats(window, Duration::from_secs(60), now)
        .await
        .unwrap();
    assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 6000);
    let buckets = patient.stats(raw.0, raw.1, raw.2).await.unwrap();
    assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 1900);
}

/// The trust rule between gateways (docs/security.md, "The bus"): a
/// client record naming another gateway than its batch is not stored; a
/// sample is not stored when its client's record names another gateway
/// than the sample's batch; both are counted, and redelivery changes
/// nothing.
async fn a_gateway_speaks_for_its_own_clients_only(store: Arc<dyn Store>) {
    // Arrange: gw1's client a with three samples.
    store
        .insert(&[batch(
            vec![client("a", true, None)],
            samples("a", true, 0..3, 0),
        )])
        .await
        .unwrap();
    // gw2 sends a record claiming to be gw1's client b, a record of its
    // own client c, samples for gw1's client a, and samples for c and for
    // d (no record anywhere: accepted, as a client whose record is lost).
    let mut claimed = client("b", true, None);
    claimed.gateway = "gw1".into();
    let mut own = client("c", true, None);
    own.gateway = "gw2".into();
    let mut forged = batch(vec![claimed, own], samples("a", true, 3..6, 0));
    forged.gateway = "gw2".into();
    forged.samples.extend(samples("c", true, 0..2, 0));
    forged.samples.extend(samples("d", true, 0..1, 0));

    // Act
    let o = store.insert(std::slice::from_ref(&forged)).await.unwrap();

    // Assert
    assert_eq!(
        o,
        InsertOutcome {
            inserted: 3,
            duplicates: 0,
            foreign_samples: 3,
            foreign_clients: 1,
        }
    );
    assert_eq!(count(&*store, "a").await, 3, "a's history is gw1's alone");
    assert_eq!(count(&*store, "c").await, 2);
    assert_eq!(count(&*store, "d").await, 1);
    assert_eq!(store.samples(&query("b", None)).await.unwrap(), None);
    // The same batch again: nothing new, the same refusals.
    let o = store.insert(std::slice::from_ref(&forged)).await.unwrap();
    assert_eq!(
        o,
        InsertOutcome {
            inserted: 0,
            duplicates: 3,
            foreign_samples: 3,
            foreign_clients: 1,
        }
    );
    // Together with gw1's own batch in one insert: each batch is judged by
    // its own gateway.
    let o = store
        .insert(&[batch(vec![], samples("a", true, 3..6, 0)), forged.clone()])
        .await
        .unwrap();
    assert_eq!((o.inserted, o.foreign_samples), (3, 3));
    assert_eq!(count(&*store, "a").await, 6);
}
