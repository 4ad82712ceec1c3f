//! The recorder service end to end: over the machine's NATS server with
//! JetStream and Postgres, and over the in-memory bus with SQLite (the
//! standalone composition).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use recorder::store::{Access, InsertOutcome, Store, StoreError};
use services::bus::memory::MemoryBus;
use services::bus::{Bus, SharedBus};
use services::messages::{
    DeviceHistoryQuery, DeviceHistoryReply, ForgetDeviceQuery, ForgetDeviceReply, RecordBatch,
    ReplyErrorKind, SamplesQuery, SamplesReply, StatsBucket, StatsQuery, StatsReply, decode,
    encode,
};
use services::subjects::Subjects;

use testkit::eventually;

use crate::helpers::{
    Running, TestNats, TestPg, TestSqlite, batch, client, persist, samples, test_config,
};

const WAIT: Duration = Duration::from_secs(10);

fn wave(id_prefix: &str, batches: usize, per_batch: u64) -> Vec<RecordBatch> {
    (0..batches)
        .map(|i| {
            let id = format!("{id_prefix}{i}");
            batch(
                vec![client(&id, true, None)],
                samples(&id, true, 0..per_batch, services::unix_us()),
            )
        })
        .collect()
}

async fn wait_for_count(nats: &TestNats, pg: &TestPg, expected: i64) {
    eventually(WAIT, &format!("{expected} samples stored"), || async {
        pg.count().await >= expected
    })
    .await;
    // And not one more: once the consumer has every message acknowledged,
    // no redelivery can add a row.
    eventually(WAIT, "every message delivered and acknowledged", || async {
        let info = consumer_info(nats).await;
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    assert_eq!(pg.count().await, expected);
}

/// The recorders' durable consumer, as the NATS server reports it.
async fn consumer_info(nats: &TestNats) -> async_nats::jetstream::consumer::Info {
    let js = async_nats::jetstream::new(nats.bus.client().clone());
    let stream = js
        .get_stream(nats.subjects.samples_stream().name())
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&nats.subjects.recorder_durable())
        .await
        .unwrap();
    consumer.info().await.unwrap().clone()
}

async fn ask_samples(bus: &dyn Bus, subjects: &Subjects, q: &SamplesQuery) -> SamplesReply {
    subjects
        .query_samples()
        .request(bus, q, Duration::from_secs(5))
        .await
        .expect("a SamplesReply")
}

async fn ask_stats(bus: &dyn Bus, subjects: &Subjects, payload: Bytes) -> StatsReply {
    let reply = bus
        .request(
            subjects.query_stats().subject(),
            payload,
            Vec::new(),
            Duration::from_secs(5),
        )
        .await
        .expect("stats answer");
    decode(&reply).expect("a StatsReply")
}

pub(crate) fn history(id: &str, token: Option<&str>) -> SamplesQuery {
    SamplesQuery {
        channel_name: id.to_owned(),
        token_digest: token.map(services::ids::token_digest),
        since_us: None,
        limit: 1000,
        deadline_unix_ms: None,
    }
}

pub(crate) fn found(reply: SamplesReply) -> usize {
    match reply {
        SamplesReply::Found { samples } => samples.len(),
        other => panic!("expected Found, got {other:?}"),
    }
}

/// Two replicas share the durable consumer; a batch persisted twice under
/// different message ids is stored once.
#[tokio::test]
async fn batches_are_stored_exactly_once_by_two_replicas() {
    // Arrange
    let nats = TestNats::new().await;
    let pg = TestPg::new().await;
    let a = Running::start(
        test_config(nats.subjects.clone()),
        nats.shared(),
        pg.dyn_store(),
    )
    .await;
    let bus_b: SharedBus = nats.connect_again().await;
    let b = Running::start(test_config(nats.subjects.clone()), bus_b, pg.dyn_store()).await;
    let batches = wave("c", 20, 50);
    // Act
    for (i, x) in batches.iter().enumerate() {
        persist(&*nats.bus, &nats.subjects, x, &format!("m{i}")).await;
    }
    persist(&*nats.bus, &nats.subjects, &batches[3], "m3-again").await;
    persist(&*nats.bus, &nats.subjects, &batches[7], "m7-again").await;
    // Assert
    wait_for_count(&nats, &pg, 1000).await;
    let dups = || {
        a.metric("pingapp_recorder_duplicates_total")
            + b.metric("pingapp_recorder_duplicates_total")
    };
    eventually(
        WAIT,
        "both re-sent batches counted as duplicates",
        || async { dups() >= 100.0 },
    )
    .await;
    assert_eq!(dups(), 100.0);
    let persisted = a.metric("pingapp_recorder_samples_persisted_total")
        + b.metric("pingapp_recorder_samples_persisted_total");
    assert_eq!(persisted, 1000.0);
    assert_eq!(a.metric("pingapp_recorder_consumer_pending"), 0.0);
    assert_eq!(b.metric("pingapp_recorder_consumer_pending"), 0.0);
    assert!(a.readiness.status().is_ok());
    a.stop().await;
    b.stop().await;
}

/// A recorder stopped in the middle of the stream is replaced by a new one
/// that resumes where it stopped: nothing lost, nothing twice.
#[tokio::test]
async fn a_new_recorder_resumes_where_the_old_one_stopped() {
    let nats = TestNats::new().await;
    let pg = TestPg::new().await;
    let first = Running::start(
        test_config(nats.subjects.clone()),
        nats.connect_again().await,
        pg.dyn_store(),
    )
    .await;
    for (i, x) in wave("one", 10, 30).iter().enumerate() {
        persist(&*nats.bus, &nats.subjects, x, &format!("one{i}")).await;
    }
    wait_for_count(&nats, &pg, 300).await;
    first.stop().await;
    // A stopped replica's outstanding pull requests would swallow new
    // messages until the ack wait (30 s) brings them back; the server drops
    // them once it sees the connection gone.
    no_pull_requests_waiting(&nats).await;
    // While no recorder runs, the stream keeps what gateways send.
    for (i, x) in wave("two", 10, 30).iter().enumerate() {
        persist(&*nats.bus, &nats.subjects, x, &format!("two{i}")).await;
    }
    eventually(WAIT, "the stream holds the 10 new batches", || async {
        consumer_info(&nats).await.num_pending == 10
    })
    .await;
    assert_eq!(
        pg.count().await,
        300,
        "nothing stored while no recorder runs"
    );
    let second = Running::start(
        test_config(nats.subjects.clone()),
        nats.connect_again().await,
        pg.dyn_store(),
    )
    .await;
    wait_for_count(&nats, &pg, 600).await;
    assert_eq!(second.metric("pingapp_recorder_duplicates_total"), 0.0);
    second.stop().await;
}

async fn no_pull_requests_waiting(nats: &TestNats) {
    eventually(
        WAIT,
        "no pull request of the stopped recorder left",
        || async { consumer_info(nats).await.num_waiting == 0 },
    )
    .await;
}

/// History and statistics are answered over the bus; a private client's
/// history needs its token.
#[tokio::test]
async fn history_and_stats_are_answered_over_nats() {
    let nats = TestNats::new().await;
    let pg = TestPg::new().await;
    let rec = Running::start(
        test_config(nats.subjects.clone()),
        nats.shared(),
        pg.dyn_store(),
    )
    .await;
    let now = services::unix_us();
    let mut private = samples("priv", false, 0..5, now - 60_000_000);
    private[0].delay_ms = 50_000.0;
    let b = batch(
        vec![
            client("pub", true, None),
            client("priv", false, Some("tok")),
        ],
        [samples("pub", true, 1..11, now - 60_000_000), private].concat(),
    );
    persist(&*nats.bus, &nats.subjects, &b, "q1").await;
    wait_for_count(&nats, &pg, 15).await;
    let (bus, s) = (&*nats.bus, &nats.subjects);

    assert_eq!(found(ask_samples(bus, s, &history("pub", None)).await), 10);
    assert_eq!(
        found(ask_samples(bus, s, &history("priv", Some("tok"))).await),
        5
    );
    for q in [
        history("priv", None),
        history("priv", Some("nope")),
        history("ghost", None),
    ] {
        assert_eq!(
            ask_samples(bus, s, &q).await,
            SamplesReply::NotFound,
            "{q:?}"
        );
    }
    let bad = bus
        .request(
            s.query_samples().subject(),
            Bytes::from_static(b"{not json"),
            Vec::new(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(matches!(decode(&bad).unwrap(), SamplesReply::Error { .. }));

    let q = encode(&StatsQuery {
        window_ms: 3600 * 1000,
        bucket_ms: 3600 * 1000,
        deadline_unix_ms: None,
    });
    let StatsReply::Ok { buckets } = ask_stats(bus, s, q).await else {
        panic!("stats failed");
    };
    let total: u64 = buckets.iter().map(|b| b.count).sum();
    assert_eq!(total, 10, "only the public samples: {buckets:?}");
    assert!(
        buckets
            .iter()
            .all(|b: &StatsBucket| b.max <= 10.0 && b.min >= 1.0)
    );
    let bad = encode(&StatsQuery {
        window_ms: 3600 * 1000,
        bucket_ms: 0,
        deadline_unix_ms: None,
    });
    assert!(matches!(
        ask_stats(bus, s, bad).await,
        StatsReply::Error { .. }
    ));
    let garbage = Bytes::from_static(b"\xff");
    assert!(matches!(
        ask_stats(bus, s, garbage).await,
        StatsReply::Error { .. }
    ));
    assert_eq!(
        rec.metric("pingapp_recorder_queries_total"),
        9.0,
        "every query counted"
    );
    rec.stop().await;
}

/// A browser's own history and forgetting it are answered over the bus:
/// found for the device of the connections that presented it, not found
/// for any other digest, bad bounds refused; forgetting deletes it.
#[tokio::test]
async fn device_history_and_forget_are_answered_over_nats() {
    let nats = TestNats::new().await;
    let pg = TestPg::new().await;
    let rec = Running::start(
        test_config(nats.subjects.clone()),
        nats.shared(),
        pg.dyn_store(),
    )
    .await;
    let digest = services::ids::device_digest("service-test-secret-0123");
    let now = services::unix_us();
    let mut first = client("tab1", true, None);
    first.device = Some(digest.clone());
    let mut second = client("tab2", false, Some("tok"));
    second.device = Some(digest.clone());
    let b = batch(
        vec![first, second, client("other", true, None)],
        [
            samples("tab1", true, 0..6, now - 120_000_000),
            samples("tab2", false, 0..4, now - 60_000_000),
            samples("other", true, 0..3, now - 60_000_000),
        ]
        .concat(),
    );
    persist(&*nats.bus, &nats.subjects, &b, "d1").await;
    wait_for_count(&nats, &pg, 13).await;
    let (bus, s) = (&*nats.bus, &nats.subjects);
    let ask = |device: &str, window_ms: u64, bucket_ms: u64| {
        let q = DeviceHistoryQuery {
            device: device.to_owned(),
            window_ms,
            bucket_ms,
            deadline_unix_ms: None,
        };
        async move {
            s.query_device_history()
                .request(bus, &q, Duration::from_secs(5))
                .await
                .expect("device history reply")
        }
    };

    let DeviceHistoryReply::Found { buckets } = ask(&digest, 3_600_000, 0).await else {
        panic!("the device is known");
    };
    assert_eq!(
        buckets.iter().map(|b| b.count).sum::<u64>(),
        10,
        "{buckets:?}"
    );
    let stranger = services::ids::device_digest("somebody-else-entirely");
    assert_eq!(
        ask(&stranger, 3_600_000, 60_000).await,
        DeviceHistoryReply::NotFound
    );
    for (device, window_ms, bucket_ms) in [
        (digest.as_str(), 3_600_000, 90_000),
        (digest.as_str(), 40 * 86_400_000, 0),
        ("tab1", 3_600_000, 60_000),
    ] {
        let DeviceHistoryReply::Error { kind, .. } = ask(device, window_ms, bucket_ms).await else {
            panic!("refused: {device} {window_ms} {bucket_ms}");
        };
        assert_eq!(kind, ReplyErrorKind::BadRequest);
    }

    let forget = |device: String| async move {
        s.forget_device()
            .request(
                bus,
                &ForgetDeviceQuery {
                    device,
                    deadline_unix_ms: None,
                },
                Duration::from_secs(5),
            )
            .await
            .expect("forget reply")
    };
    assert_eq!(
        forget(digest.clone()).await,
        ForgetDeviceReply::Forgotten { channels: 2 }
    );
    assert_eq!(forget(digest.clone()).await, ForgetDeviceReply::NotFound);
    assert_eq!(
        ask(&digest, 3_600_000, 60_000).await,
        DeviceHistoryReply::NotFound
    );
    assert_eq!(
        ask_samples(bus, s, &history("tab1", None)).await,
        SamplesReply::NotFound
    );
    assert_eq!(found(ask_samples(bus, s, &history("other", None)).await), 3);
    rec.stop().await;
}

/// Reads beyond the read budget are answered `Busy` at once, without
/// waiting for the database, while the reads within it go on.
#[tokio::test]
async fn reads_beyond_the_budget_are_answered_busy_at_once() {
    let nats = TestNats::new().await;
    let pg = TestPg::new().await;
    let mut cfg = test_config(nats.subjects.clone());
    cfg.read_concurrency = 1;
    let rec = Running::start(cfg, nats.shared(), pg.dyn_store()).await;
    let now = services::unix_us();
    let b = batch(
        vec![client("pub", true, None)],
        samples("pub", true, 1..4, now),
    );
    persist(&*nats.bus, &nats.subjects, &b, "busy1").await;
    wait_for_count(&nats, &pg, 3).await;

    // A lock makes the one read within the budget wait for the database.
    let mut blocker = pg.store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE clients IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (bus, s) = (nats.bus.clone(), nats.subjects.clone());
    let slow = tokio::spawn(async move { ask_samples(&*bus, &s, &history("pub", None)).await });
    eventually(
        Duration::from_secs(5),
        "the first read waits on the lock",
        || async {
            sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'clients'::regclass",
        )
        .fetch_one(pg.store.pool())
        .await
        .unwrap()
            > 0
        },
    )
    .await;

    let started = std::time::Instant::now();
    let refused = ask_samples(&*nats.bus, &nats.subjects, &history("pub", None)).await;
    assert!(
        matches!(
            &refused,
            SamplesReply::Error {
                kind: ReplyErrorKind::Busy,
                ..
            }
        ),
        "{refused:?}"
    );
    let q = encode(&StatsQuery {
        window_ms: 3600 * 1000,
        bucket_ms: 60 * 1000,
        deadline_unix_ms: None,
    });
    assert!(matches!(
        ask_stats(&*nats.bus, &nats.subjects, q).await,
        StatsReply::Error {
            kind: ReplyErrorKind::Busy,
            ..
        }
    ));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "busy is answered at once"
    );

    blocker.rollback().await.unwrap();
    assert_eq!(found(slow.await.unwrap()), 3, "the read within the budget");
    assert_eq!(
        found(ask_samples(&*nats.bus, &nats.subjects, &history("pub", None)).await),
        3,
        "the budget is free again"
    );
    rec.stop().await;
}

/// A message that is not a record batch, and a batch the database refuses
/// (a NUL byte in text), are dropped; the messages after them still arrive.
#[tokio::test]
async fn poison_messages_do_not_block_the_stream() {
    let nats = TestNats::new().await;
    let pg = TestPg::new().await;
    let mut cfg = test_config(nats.subjects.clone());
    cfg.batch_wait = Duration::from_millis(200); // gather all three in one insert
    let rec = Running::start(cfg, nats.shared(), pg.dyn_store()).await;
    let subject = nats.subjects.samples("gw1");
    nats.bus
        .persist(
            subject.subject(),
            Bytes::from_static(b"garbage"),
            Vec::new(),
            "p1",
        )
        .await
        .unwrap();
    let refused = batch(
        vec![client("nul\0id", true, None)],
        samples("nul\0id", true, 0..3, 0),
    );
    persist(&*nats.bus, &nats.subjects, &refused, "p2").await;
    let good = batch(
        vec![client("good", true, None)],
        samples("good", true, 0..7, 0),
    );
    persist(&*nats.bus, &nats.subjects, &good, "p3").await;

    wait_for_count(&nats, &pg, 7).await;
    assert_eq!(rec.metric("pingapp_recorder_undecodable_total"), 1.0);
    eventually(WAIT, "the refused batch dropped", || async {
        rec.metric("pingapp_recorder_rejected_total") == 1.0
    })
    .await;
    assert_eq!(rec.metric("pingapp_recorder_consumer_pending"), 0.0);
    rec.stop().await;
}

/// The standalone composition: the in-memory bus and SQLite.
#[tokio::test]
async fn standalone_over_the_memory_bus_and_sqlite() {
    let bus = MemoryBus::new();
    let shared: SharedBus = Arc::new(bus.clone());
    let db = TestSqlite::new().await;
    let subjects = Subjects::new("mem");
    let rec = Running::start(
        test_config(subjects.clone()),
        shared.clone(),
        db.dyn_store(),
    )
    .await;
    let now = services::unix_us();
    let b = batch(
        vec![client("a", true, None), client("p", false, Some("t"))],
        [
            samples("a", true, 0..4, now - 1_000_000),
            samples("p", false, 0..2, now),
        ]
        .concat(),
    );
    persist(&bus, &subjects, &b, "x").await;
    persist(&bus, &subjects, &b, "x-again").await;
    bus.persist(
        subjects.samples("gw1").subject(),
        Bytes::from_static(b"nope"),
        Vec::new(),
        "junk",
    )
    .await
    .unwrap();

    eventually(WAIT, "history readable", || async {
        matches!(ask_samples(&bus, &subjects, &history("a", None)).await,
            SamplesReply::Found { samples } if samples.len() == 4)
    })
    .await;
    assert_eq!(
        found(ask_samples(&bus, &subjects, &history("p", Some("t"))).await),
        2
    );
    assert_eq!(
        ask_samples(&bus, &subjects, &history("p", None)).await,
        SamplesReply::NotFound
    );
    let StatsReply::Ok { buckets } = ask_stats(
        &bus,
        &subjects,
        encode(&StatsQuery {
            window_ms: 600 * 1000,
            bucket_ms: 60 * 1000,
            deadline_unix_ms: None,
        }),
    )
    .await
    else {
        panic!("stats failed");
    };
    assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 4);
    let absurd = encode(&StatsQuery {
        window_ms: u64::MAX,
        bucket_ms: u64::MAX,
        deadline_unix_ms: None,
    });
    let StatsReply::Error { kind, message } = ask_stats(&bus, &subjects, absurd).await else {
        panic!("an absurd bucket is refused");
    };
    assert_eq!(kind, ReplyErrorKind::BadRequest, "{message}");
    assert!(message.starts_with("bad request"), "{message}");
    eventually(WAIT, "duplicate batch counted", || async {
        rec.metric("pingapp_recorder_duplicates_total") == 6.0
    })
    .await;
    assert_eq!(rec.metric("pingapp_recorder_undecodable_total"), 1.0);
    rec.stop().await;
}

/// A store that fails while `down` is set, as a database outage does.
struct Flaky {
    inner: Arc<dyn Store>,
    down: AtomicBool,
}

#[async_trait]
impl Store for Flaky {
    async fn insert(&self, batches: &[RecordBatch]) -> Result<InsertOutcome, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Database(sqlx::Error::PoolTimedOut));
        }
        self.inner.insert(batches).await
    }
    async fn access(&self, channel_name: &str) -> Result<Option<Access>, StoreError> {
        self.inner.access(channel_name).await
    }
    async fn read_history(
        &self,
        channel_name: &str,
        since_us: Option<i64>,
        limit: i64,
    ) -> Result<Vec<services::messages::StoredSample>, StoreError> {
        self.inner.read_history(channel_name, since_us, limit).await
    }
    async fn stats(
        &self,
        window: Duration,
        bucket: Duration,
        now_us: i64,
    ) -> Result<Vec<StatsBucket>, StoreError> {
        self.inner.stats(window, bucket, now_us).await
    }
    async fn pack_step(
        &self,
        before_us: i64,
        after: i32,
    ) -> Result<Option<(u64, i32)>, StoreError> {
        self.inner.pack_step(before_us, after).await
    }
    async fn fold_room_parts(&self) -> Result<u64, StoreError> {
        self.inner.fold_room_parts().await
    }
    async fn prune(&self, older_than_us: i64) -> Result<u64, StoreError> {
        self.inner.prune(older_than_us).await
    }
    async fn prune_rollups(&self, older_than_us: i64) -> Result<u64, StoreError> {
        self.inner.prune_rollups(older_than_us).await
    }
    async fn device_history(
        &self,
        device: &str,
        window: Duration,
        bucket: Duration,
        now_us: i64,
    ) -> Result<Option<Vec<services::messages::HistoryBucket>>, StoreError> {
        self.inner
            .device_history(device, window, bucket, now_us)
            .await
    }
    async fn forget_device(&self, device: &str) -> Result<Option<u64>, StoreError> {
        self.inner.forget_device(device).await
    }
    async fn ping(&self) -> bool {
        !self.down.load(Ordering::SeqCst) && self.inner.ping().await
    }
}

async fn stored(store: &dyn Store, id: &str) -> usize {
    store
        .samples(&history(id, None))
        .await
        .unwrap()
        .map_or(0, |s| s.len())
}

/// While the database is down the batch is retried, not acknowledged, and
/// readiness says so; once it is back everything is stored once.
#[tokio::test]
async fn a_database_outage_loses_nothing() {
    let bus = MemoryBus::new();
    let db = TestSqlite::new().await;
    let flaky = Arc::new(Flaky {
        inner: db.dyn_store(),
        down: AtomicBool::new(false),
    });
    let subjects = Subjects::new("outage");
    let rec = Running::start(
        test_config(subjects.clone()),
        Arc::new(bus.clone()),
        flaky.clone(),
    )
    .await;
    assert!(rec.readiness.status().is_ok());
    flaky.down.store(true, Ordering::SeqCst);
    persist(
        &bus,
        &subjects,
        &batch(vec![client("a", true, None)], samples("a", true, 0..9, 0)),
        "1",
    )
    .await;

    eventually(WAIT, "insert retried", || async {
        rec.metric("pingapp_recorder_database_errors_total") >= 3.0
    })
    .await;
    assert_eq!(rec.readiness.status(), Err("database down".into()));
    // Queries say whose fault a refusal is: the database's now, but a query
    // beyond the bounds (6,000 buckets) is the caller's all the same.
    let stats = |window_ms, bucket_ms| {
        encode(&StatsQuery {
            window_ms,
            bucket_ms,
            deadline_unix_ms: None,
        })
    };
    for (query, expected) in [
        (stats(3_600_000, 60_000), ReplyErrorKind::Unavailable),
        (stats(6_000_000, 1_000), ReplyErrorKind::BadRequest),
    ] {
        let StatsReply::Error { kind, message } = ask_stats(&bus, &subjects, query).await else {
            panic!("refused while the database is down");
        };
        assert_eq!(kind, expected, "{message}");
    }
    let StatsReply::Error { kind, .. } = ask_stats(&bus, &subjects, stats(900_000, 180)).await
    else {
        panic!("5,000 buckets of 15 minutes are within bounds, but the database is down");
    };
    assert_eq!(kind, ReplyErrorKind::Unavailable);
    assert_eq!(
        rec.metric("pingapp_recorder_consumer_pending"),
        1.0,
        "held, not acknowledged"
    );
    assert_eq!(stored(&*db.store, "a").await, 0);

    flaky.down.store(false, Ordering::SeqCst);
    eventually(WAIT, "stored after the outage", || async {
        stored(&*db.store, "a").await == 9
    })
    .await;
    eventually(WAIT, "ready again", || async {
        rec.readiness.status().is_ok()
    })
    .await;
    assert_eq!(rec.metric("pingapp_recorder_consumer_pending"), 0.0);
    rec.stop().await;
}

/// Shutdown during an outage hands the deliveries back to the stream, and
/// the next recorder stores them.
#[tokio::test]
async fn shutdown_during_an_outage_hands_deliveries_back() {
    let bus = MemoryBus::new();
    let db = TestSqlite::new().await;
    let flaky = Arc::new(Flaky {
        inner: db.dyn_store(),
        down: AtomicBool::new(true),
    });
    let subjects = Subjects::new("handback");
    let rec = Running::start(
        test_config(subjects.clone()),
        Arc::new(bus.clone()),
        flaky.clone(),
    )
    .await;
    persist(
        &bus,
        &subjects,
        &batch(vec![client("a", true, None)], samples("a", true, 0..4, 0)),
        "1",
    )
    .await;
    eventually(WAIT, "insert failing", || async {
        rec.metric("pingapp_recorder_database_errors_total") >= 1.0
    })
    .await;
    rec.stop().await;

    let next = Running::start(
        test_config(subjects.clone()),
        Arc::new(bus.clone()),
        db.dyn_store(),
    )
    .await;
    eventually(WAIT, "stored by the next recorder", || async {
        stored(&*db.store, "a").await == 4
    })
    .await;
    assert_eq!(next.metric("pingapp_recorder_redeliveries_total"), 1.0);
    next.stop().await;
}

/// Shutdown commits and acknowledges the batch being gathered.
#[tokio::test]
async fn shutdown_commits_the_batch_in_hand() {
    let bus = MemoryBus::new();
    let db = TestSqlite::new().await;
    let subjects = Subjects::new("drain");
    let mut cfg = test_config(subjects.clone());
    cfg.batch_wait = Duration::from_secs(60);
    let rec = Running::start(cfg, Arc::new(bus.clone()), db.dyn_store()).await;
    persist(
        &bus,
        &subjects,
        &batch(vec![client("a", true, None)], samples("a", true, 0..5, 0)),
        "1",
    )
    .await;
    eventually(WAIT, "delivery in hand", || async {
        rec.metric("pingapp_recorder_consumer_pending") == 1.0
    })
    .await;
    assert_eq!(stored(&*db.store, "a").await, 0, "still gathering");
    let registry = rec.registry.clone();
    rec.stop().await;
    assert_eq!(stored(&*db.store, "a").await, 5);
    assert_eq!(
        crate::helpers::metric(&registry, "pingapp_recorder_consumer_pending"),
        0.0
    );
}

/// `pingapp_recorder_foreign_records_total{kind}`.
fn foreign(rec: &Running, kind: &str) -> f64 {
    crate::helpers::labelled_metric(
        &rec.registry,
        "pingapp_recorder_foreign_records_total",
        &[("kind", kind)],
    )
}

/// A gateway speaks for its own clients only (docs/security.md, "The
/// bus"), through the real stream: a batch published on gw2's subject
/// that names gw1 is dropped whole; gw2's samples for gw1's client are
/// refused while its own client's are stored; both are counted, and the
/// client's history is gw1's alone.
#[tokio::test]
async fn a_gateway_cannot_write_for_another_gateways_clients() {
    let nats = TestNats::new().await;
    let pg = TestPg::new().await;
    let rec = Running::start(
        test_config(nats.subjects.clone()),
        nats.shared(),
        pg.dyn_store(),
    )
    .await;
    let now = services::unix_us();
    let first = batch(vec![client("a", true, None)], samples("a", true, 0..5, now));
    persist(&*nats.bus, &nats.subjects, &first, "a").await;
    wait_for_count(&nats, &pg, 5).await;

    // gw2, on its own subject, claims to be gw1.
    let claim = batch(vec![], samples("a", true, 5..10, now));
    nats.subjects
        .samples("gw2")
        .persist(&*nats.bus, &claim, "claim")
        .await
        .expect("persist");
    // gw2 in its own name: samples for gw1's client a, and for its own c.
    let mut own = client("c", true, None);
    own.gateway = "gw2".into();
    let mut forged = batch(vec![own], samples("a", true, 10..15, now));
    forged.gateway = "gw2".into();
    forged.samples.extend(samples("c", true, 0..1, now));
    persist(&*nats.bus, &nats.subjects, &forged, "forged").await;

    wait_for_count(&nats, &pg, 6).await;
    eventually(WAIT, "the refusals counted", || async {
        foreign(&rec, "batch") == 5.0 && foreign(&rec, "sample") == 5.0
    })
    .await;
    assert_eq!(foreign(&rec, "client"), 0.0);
    let reply = ask_samples(&*nats.bus, &nats.subjects, &history("a", None)).await;
    assert_eq!(found(reply), 5, "a's history is gw1's alone");
    let reply = ask_samples(&*nats.bus, &nats.subjects, &history("c", None)).await;
    assert_eq!(found(reply), 1);
    rec.stop().await;
}
