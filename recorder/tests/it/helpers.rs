//! Test fixtures: a fresh database per test (a SQLite temp file, or a new
//! database on the machine's Postgres server), a NATS bus with a random
//! subject prefix, a recorder running in the background, and sample data.
//!
//! Logs stay silent unless `TEST_LOG` is set. Postgres and NATS must be
//! running; a test that cannot reach them fails and says how to fix it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use recorder::store::Store;
use recorder::store::postgres::PgStore;
use recorder::store::sqlite::SqliteStore;
use recorder::{Recorder, RecorderConfig};
use services::admin::Readiness;
use services::bus::nats::NatsBus;
use services::bus::{Bus, SharedBus};
use services::messages::{ClientRecord, RecordBatch, SampleRecord};
use services::subjects::Subjects;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Runs each contract test against both backends, each on a fresh database.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = crate::helpers::TestSqlite::new().await;
                    super::$name(db.dyn_store()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = crate::helpers::TestPg::new().await;
                    super::$name(db.dyn_store()).await;
                }
            )*
        }
    };
}

/// Default server for the NATS tests.
pub const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

/// Installs the log subscriber when `TEST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = services::telemetry::init(services::config::LogFormat::Text, "test");
    }
}

/// A SQLite database in a temporary file, deleted on drop.
pub struct TestSqlite {
    /// The store over it.
    pub store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

impl TestSqlite {
    /// A new, migrated database.
    pub async fn new() -> Self {
        init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("recorder.db").display());
        let store = SqliteStore::connect(&url).await.expect("open SQLite");
        Self {
            store: Arc::new(store),
            _dir: dir,
        }
    }

    /// The store as the service sees it.
    pub fn dyn_store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
}

/// A fresh database on the machine's Postgres server
/// ([`testkit::fresh_database`]), migrated, dropped on drop.
pub struct TestPg {
    /// The store over it.
    pub store: Arc<PgStore>,
    /// Its URL.
    pub url: String,
    _db: testkit::Database,
}

impl TestPg {
    /// Creates `test_<random>` and migrates it.
    ///
    /// # Panics
    /// Postgres is not reachable: start it or set `PINGAPP_TEST_DATABASE_URL`.
    pub async fn new() -> Self {
        init_logs();
        let db = testkit::fresh_database().await;
        let store = PgStore::connect(&db.url).await.expect("open Postgres");
        Self {
            store: Arc::new(store),
            url: db.url.clone(),
            _db: db,
        }
    }

    /// The store as the service sees it.
    pub fn dyn_store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// How many samples are stored.
    pub async fn count(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM sample_staging) \
                  + (SELECT coalesce(sum(samples), 0) FROM sample_blocks)::bigint",
        )
        .fetch_one(self.store.pool())
        .await
        .expect("count samples")
    }
}

/// A NATS bus under a random subject prefix; the test's stream is deleted
/// on drop.
pub struct TestNats {
    /// The bus.
    pub bus: Arc<NatsBus>,
    /// The test's subjects.
    pub subjects: Subjects,
    url: String,
}

impl TestNats {
    /// Connects to the machine's NATS server.
    ///
    /// # Panics
    /// NATS is not reachable: start nats-server with JetStream or set
    /// `PINGAPP_TEST_NATS_URL`.
    pub async fn new() -> Self {
        init_logs();
        let url =
            std::env::var("PINGAPP_TEST_NATS_URL").unwrap_or_else(|_| DEFAULT_NATS.to_owned());
        let bus = connect_nats(&url).await;
        Self {
            bus,
            subjects: Subjects::new(&testkit::unique_prefix()),
            url,
        }
    }

    /// Another connection to the same server (a second replica).
    pub async fn connect_again(&self) -> Arc<NatsBus> {
        connect_nats(&self.url).await
    }

    /// The bus as the service sees it.
    pub fn shared(&self) -> SharedBus {
        self.bus.clone()
    }
}

async fn connect_nats(url: &str) -> Arc<NatsBus> {
    let hint = "Start nats-server with JetStream (`start-stop-daemon --start --oknodo --background \
                --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server`) \
                or set PINGAPP_TEST_NATS_URL";
    let addr = url.trim_start_matches("nats://");
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("cannot reach NATS at {url}: {e}. {hint}"),
        Err(_) => panic!("timed out reaching NATS at {url}. {hint}"),
    }
    let bus = tokio::time::timeout(
        Duration::from_secs(10),
        NatsBus::connect(url, "recorder-test"),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out connecting to NATS at {url}. {hint}"))
    .unwrap_or_else(|e| panic!("cannot connect to NATS at {url}: {e}. {hint}"));
    Arc::new(bus)
}

impl Drop for TestNats {
    fn drop(&mut self) {
        let url = self.url.clone();
        let stream = self.subjects.samples_stream();
        // A connection of the clean-up thread's runtime: the test's runtime
        // is blocked in this drop.
        testkit::block_on_own_thread(move || async move {
            let connect = async_nats::connect(url);
            let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
                return;
            };
            let js = async_nats::jetstream::new(client);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), js.delete_stream(stream.name())).await;
        });
    }
}

/// A recorder running in the background.
pub struct Running {
    /// Its metrics.
    pub registry: Registry,
    /// Its readiness.
    pub readiness: Readiness,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Builds a recorder with small batches and starts it.
    pub async fn start(cfg: RecorderConfig, bus: SharedBus, store: Arc<dyn Store>) -> Running {
        let registry = Registry::new();
        let readiness = Readiness::new();
        let recorder = Recorder::build(cfg, bus, store, &registry, readiness.clone())
            .await
            .expect("build recorder");
        readiness.set_started();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(recorder.run(shutdown.clone()));
        Running {
            registry,
            readiness,
            shutdown,
            task,
        }
    }

    /// The value of an unlabelled metric (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.registry, name)
    }

    /// Starts the drain and waits for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("recorder stops in time")
            .expect("recorder task")
            .expect("recorder run");
    }
}

/// The test configuration: short batch wait, no pruning.
pub fn test_config(subjects: Subjects) -> RecorderConfig {
    let mut cfg = RecorderConfig::new(subjects);
    cfg.batch_wait = Duration::from_millis(20);
    cfg.batch_max_samples = 500;
    cfg.retention = Duration::ZERO;
    cfg.stream_max_age = Duration::from_secs(3600);
    cfg
}

/// The value of an unlabelled (or the sum of a labelled) metric.
pub fn metric(registry: &Registry, name: &str) -> f64 {
    services::metrics::render(registry)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of `name`'s samples carrying every one of `labels`.
pub fn labelled_metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let prefix = format!("{name}{{");
    services::metrics::render(registry)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| want.iter().all(|w| l.contains(w.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A client record.
pub fn client(id: &str, public: bool, token: Option<&str>) -> ClientRecord {
    ClientRecord {
        channel_name: id.to_owned(),
        public,
        token_digest: token.map(services::ids::token_digest),
        gateway: "gw1".to_owned(),
        connected_at_us: 1_000,
        device: None,
    }
}

/// Samples `ns` of client `id`: sample `n` is at `base_us + n` seconds with
/// a delay of `n` ms.
pub fn samples(
    id: &str,
    public: bool,
    ns: std::ops::Range<u64>,
    base_us: i64,
) -> Vec<SampleRecord> {
    ns.map(|n| SampleRecord {
        channel_name: id.to_owned(),
        n,
        seq: Some(n * 10),
        at_us: base_us + n as i64 * 1_000_000,
        delay_ms: n as f64,
        public,
    })
    .collect()
}

/// A batch from gateway `gw1`.
pub fn batch(clients: Vec<ClientRecord>, samples: Vec<SampleRecord>) -> RecordBatch {
    RecordBatch {
        gateway: "gw1".to_owned(),
        clients,
        samples,
    }
}

/// Persists `batch` on the stream under `msg_id`, on its gateway's subject.
pub async fn persist(bus: &dyn Bus, subjects: &Subjects, batch: &RecordBatch, msg_id: &str) {
    subjects
        .samples(&batch.gateway)
        .persist(bus, batch, msg_id)
        .await
        .expect("persist");
}
