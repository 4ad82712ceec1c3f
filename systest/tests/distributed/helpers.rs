//! The distributed deployment under test, and clients that talk to it like
//! browsers do.
//!
//! A [`Deployment`] is one test's world: its own `nats-server` (temp dir,
//! random port), its own database, its own subject prefix. Services are the
//! real `gateway`, `presence` and `recorder` binaries, started with short
//! timings so failures are detected in a second or two.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Connection;
pub use testkit::eventually;
pub use testkit::ws::{Client, WAIT, is};
use testkit::{Database, NatsServer, Service, free_addr, unique_prefix};
use tokio::task::JoinHandle;

/// Gateways heartbeat this often; presence expires a gateway after three
/// missed heartbeats.
pub const HEARTBEAT_MS: u64 = 400;

/// One test's deployment: NATS, a database, a subject prefix.
pub struct Deployment {
    /// The test's own NATS server.
    pub nats: NatsServer,
    /// The test's subject prefix.
    pub prefix: String,
    /// The database the recorder writes to.
    pub db_url: String,
    /// Extra environment of every service started.
    pub env: Vec<(String, String)>,
    _db: Option<Database>,
}

impl Deployment {
    /// NATS and a fresh database on the machine's PostgreSQL.
    pub async fn new() -> Deployment {
        let (nats, db) = tokio::join!(NatsServer::start(), testkit::fresh_database());
        Deployment {
            nats,
            prefix: unique_prefix(),
            db_url: db.url.clone(),
            env: Vec::new(),
            _db: Some(db),
        }
    }

    /// NATS with the shipped configuration (`deploy/nats`: an nkey
    /// identity per service and per gateway of `gateways`, subject
    /// permissions, TLS) and a fresh database; every service started
    /// connects with its own identity.
    pub async fn secured(gateways: &[&str]) -> Deployment {
        let prefix = unique_prefix();
        let (nats, db) = tokio::join!(
            NatsServer::start_secured(&prefix, gateways),
            testkit::fresh_database()
        );
        Deployment {
            nats,
            prefix,
            db_url: db.url.clone(),
            env: Vec::new(),
            _db: Some(db),
        }
    }

    /// The NATS identity and TLS flags of `user` (`presence`, `recorder`,
    /// `gateway-{id}`) when the server is secured; none otherwise.
    pub fn nats_identity(&self, user: &str) -> Vec<String> {
        if !self.nats.is_secured() {
            return Vec::new();
        }
        vec![
            "--nats-creds".to_owned(),
            self.nats.creds(user).display().to_string(),
            "--nats-tls-ca".to_owned(),
            self.nats.tls_ca().display().to_string(),
        ]
    }

    /// Whether the recorders' durable consumer has delivered and had
    /// acknowledged every message of the samples stream (false while the
    /// stream or consumer does not exist yet).
    pub async fn consumer_settled(&self) -> bool {
        let subjects = services::subjects::Subjects::new(&self.prefix);
        let Ok(client) = async_nats::connect(self.nats.url()).await else {
            return false;
        };
        let js = async_nats::jetstream::new(client);
        let Ok(stream) = js.get_stream(subjects.samples_stream().name()).await else {
            return false;
        };
        let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
            stream.get_consumer(&subjects.recorder_durable()).await;
        let Ok(mut consumer) = consumer else {
            return false;
        };
        match consumer.info().await {
            Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
            Err(_) => false,
        }
    }

    /// The same deployment, with `key=value` in every service's environment.
    pub fn with_env(mut self, key: &str, value: &str) -> Deployment {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    fn command(&self, name: &str) -> testkit::ServiceBuilder {
        let mut b = Service::command(name);
        for (k, v) in &self.env {
            b = b.env(k, v);
        }
        b
    }

    /// NATS and the given database (e.g. on a [`testkit::PgCluster`]).
    pub async fn with_database(db_url: String) -> Deployment {
        Deployment {
            nats: NatsServer::start().await,
            prefix: unique_prefix(),
            db_url,
            env: Vec::new(),
            _db: None,
        }
    }

    /// Starts the gateway `id` and waits until it is ready.
    pub async fn gateway(&self, id: &str) -> Node {
        let (listen, admin) = (free_addr(), free_addr());
        let svc = self
            .command("gateway")
            .label(format!("gateway {id}"))
            .args(["--listen", &listen.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--nats-url", &self.nats.url()])
            .args(["--subject-prefix", &self.prefix])
            .args(["--gateway-id", id])
            .args(self.nats_identity(&format!("gateway-{id}")))
            .args(["--heartbeat-interval-ms", &HEARTBEAT_MS.to_string()])
            .args(["--roster-tick-ms", "100"])
            .args(["--drain-timeout-ms", "3000"])
            // Tests poll the API every 20 ms from one address while they
            // wait for the recorder: no per-IP API budget
            // (docs/security.md).
            .args(["--max-api-requests-per-ip-per-second", "0"])
            .spawn();
        Node::ready(svc, Some(listen), admin).await
    }

    /// Starts a presence replica and waits until it is ready.
    pub async fn presence(&self) -> Node {
        self.presence_with_lease_ttl(1500).await
    }

    /// Starts a presence replica whose leader lease lapses `ttl_ms` after
    /// its last renewal, and waits until it is ready.
    pub async fn presence_with_lease_ttl(&self, ttl_ms: u64) -> Node {
        let admin = free_addr();
        let svc = self
            .command("presence")
            .args(["--admin-listen", &admin.to_string()])
            .args(["--nats-url", &self.nats.url()])
            .args(["--subject-prefix", &self.prefix])
            .args(["--roster-tick-ms", "100"])
            .args(["--lease-ttl-ms", &ttl_ms.to_string()])
            .args(self.nats_identity("presence"))
            .spawn();
        Node::ready(svc, None, admin).await
    }

    /// Starts a recorder and waits until it is ready.
    pub async fn recorder(&self) -> Node {
        self.recorder_with_batch_wait(20).await
    }

    /// Starts a recorder that gathers deliveries for `batch_wait_ms` before
    /// each insert, and waits until it is ready.
    pub async fn recorder_with_batch_wait(&self, batch_wait_ms: u64) -> Node {
        let admin = free_addr();
        let svc = self
            .command("recorder")
            .args(["--admin-listen", &admin.to_string()])
            .args(["--nats-url", &self.nats.url()])
            .args(["--database-url", &self.db_url])
            .args(["--subject-prefix", &self.prefix])
            .args(["--batch-wait-ms", &batch_wait_ms.to_string()])
            .args(["--ack-wait-ms", "2000"])
            .args(["--retention", "0"])
            .args(self.nats_identity("recorder"))
            .spawn();
        Node::ready(svc, None, admin).await
    }

    /// The samples stored in the database: per client, `(n, seq)` pairs.
    pub async fn stored(&self) -> BTreeMap<String, Vec<(i64, Option<i64>)>> {
        stored(&self.db_url).await
    }

    /// How many sample rows the database holds.
    pub async fn count(&self) -> i64 {
        count(&self.db_url).await
    }
}

/// Per client, the `(n, seq)` pairs stored in `samples`, ordered by `n`.
pub async fn stored(db_url: &str) -> BTreeMap<String, Vec<(i64, Option<i64>)>> {
    let mut conn = sqlx::PgConnection::connect(db_url)
        .await
        .expect("connect to the test database");
    let rows: Vec<(String, i64, Option<i64>)> =
        sqlx::query_as("SELECT channel_name, n, seq FROM samples ORDER BY channel_name, n")
            .fetch_all(&mut conn)
            .await
            .expect("read samples");
    let _ = conn.close().await;
    let mut out: BTreeMap<String, Vec<(i64, Option<i64>)>> = BTreeMap::new();
    for (id, n, seq) in rows {
        out.entry(id).or_default().push((n, seq));
    }
    out
}

/// Rows in `samples` (0 while the recorder has not created the table yet).
pub async fn count(db_url: &str) -> i64 {
    let Ok(mut conn) = sqlx::PgConnection::connect(db_url).await else {
        return 0;
    };
    let n = sqlx::query_scalar("SELECT count(*) FROM samples")
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
    let _ = conn.close().await;
    n
}

/// Waits until the database holds exactly the samples `sent` (client id →
/// number of samples, sent with `seq` 0, 1, 2, ...) and the recorders'
/// consumer has every message acknowledged (so no redelivery can add a
/// row), then checks each was stored exactly once: `n` runs 1..=count and
/// the seqs are the ones sent.
pub async fn assert_stored_exactly_once(
    d: &Deployment,
    sent: &BTreeMap<String, u64>,
    within: Duration,
) {
    let db_url = d.db_url.as_str();
    let expected: i64 = sent.values().map(|&n| n as i64).sum();
    eventually(
        within,
        &format!("{expected} samples in Postgres, every delivery acknowledged"),
        || async {
            let n = count(db_url).await;
            assert!(
                n <= expected,
                "more rows ({n}) than samples sent ({expected})"
            );
            n == expected && d.consumer_settled().await
        },
    )
    .await;
    let stored = stored(db_url).await;
    let ids: BTreeSet<&String> = stored.keys().collect();
    let sent_ids: BTreeSet<&String> = sent.keys().filter(|id| sent[*id] > 0).collect();
    assert_eq!(ids, sent_ids, "samples of exactly the clients that sent");
    for (id, rows) in &stored {
        let k = sent[id];
        let ns: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let seqs: BTreeSet<i64> = rows.iter().filter_map(|r| r.1).collect();
        assert_eq!(ns, (1..=k as i64).collect::<Vec<_>>(), "client {id}: n");
        assert_eq!(
            seqs,
            (0..k as i64).collect::<BTreeSet<_>>(),
            "client {id}: every seq sent, once"
        );
    }
}

/// A service process with its addresses.
pub struct Node {
    /// The process.
    pub svc: Service,
    /// The public listener (gateways only).
    pub addr: Option<SocketAddr>,
    /// The admin listener.
    pub admin: SocketAddr,
}

impl Node {
    async fn ready(mut svc: Service, addr: Option<SocketAddr>, admin: SocketAddr) -> Node {
        svc.wait_ready(admin).await;
        Node { svc, addr, admin }
    }

    /// Starts the stopped process again (same flags and ports) and waits
    /// until it is ready.
    pub async fn start_again(&mut self) {
        self.svc.start_again();
        self.svc.wait_ready(self.admin).await;
    }

    /// The public listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("a gateway")
    }

    /// Connects a WebSocket client to `path`.
    pub async fn ws(&self, path: &str) -> Client {
        Client::connect(self.addr(), path).await
    }

    /// GET a JSON document from the public listener: status and body.
    pub async fn get_json(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        self.call_json(reqwest::Method::GET, path, bearer).await
    }

    /// A `method` request to the public listener: status and JSON body
    /// (null when the body is not JSON).
    pub async fn call_json(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
    ) -> (u16, Value) {
        let mut req =
            reqwest::Client::new().request(method, format!("http://{}{path}", self.addr()));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    /// The ids in `/api/roster`.
    pub async fn roster_ids(&self) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        let mut cursor = String::new();
        // Every page of the paged roster (docs/protocol.md).
        loop {
            let path = format!("/api/roster?limit=1000&cursor={cursor}");
            let (status, body) = self.get_json(&path, None).await;
            assert_eq!(status, 200, "{body}");
            ids.extend(
                body["clients"]
                    .as_array()
                    .expect("clients")
                    .iter()
                    .map(|c| c["channel_name"].as_str().unwrap().to_owned()),
            );
            match body["next_cursor"].as_str() {
                Some(next) => cursor = next.to_owned(),
                None => return ids,
            }
        }
    }

    /// Sum of the samples of metric `name` on the admin listener.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The `delay_time`s of a history answer (`/api/clients/{id}/samples`), in
/// its order.
pub fn delays(body: &Value) -> Vec<f64> {
    body["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| s["delay_time"].as_f64().expect("a delay"))
        .collect()
}

/// A v2 public client past its welcome and first view (returned too).
pub async fn public_v2(node: &Node) -> (Client, Value) {
    let mut c = node.ws("/ws/public/?v=2").await;
    let welcome = c.recv().await;
    assert_eq!(welcome["command"], "welcome", "{welcome}");
    c.id = welcome["channel_name"].as_str().unwrap().to_owned();
    c.token = welcome["token"].as_str().unwrap().to_owned();
    let view = c.recv().await;
    assert_eq!(view["command"], "view", "{view}");
    (c, view)
}

/// A v2 private client past its welcome.
pub async fn private_v2(node: &Node) -> Client {
    let mut c = node.ws("/ws/private/?v=2").await;
    let welcome = c.recv().await;
    assert_eq!(welcome["command"], "welcome", "{welcome}");
    c.id = welcome["channel_name"].as_str().unwrap().to_owned();
    c.token = welcome["token"].as_str().unwrap().to_owned();
    c
}

/// A v1 public client (the original page), which learns its id from its
/// own connect: the first connect of a client the gateway's roster did not
/// hold before (a broadcast of an earlier connect may still be on its way
/// to this gateway's pages).
pub async fn public_v1(node: &Node) -> Client {
    let before = node.roster_ids().await;
    let mut c = node.ws("/ws/public/").await;
    let own = c
        .recv_until("connect", |v| {
            v["channel_name"]
                .as_str()
                .is_some_and(|id| !before.contains(id))
        })
        .await;
    c.id = own["channel_name"].as_str().unwrap().to_owned();
    c
}

/// Clients that send a delay sample every `every` (seq 0, 1, 2, ...) on a
/// task of their own until stopped, reading and dropping what they get.
pub struct Senders {
    stop: Arc<AtomicBool>,
    tasks: Vec<(String, JoinHandle<u64>)>,
    total: Arc<AtomicU64>,
}

impl Senders {
    /// Starts sending on `clients`.
    pub fn start(clients: Vec<Client>, every: Duration) -> Senders {
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let tasks = clients
            .into_iter()
            .map(|c| {
                let id = c.id.clone();
                let (stop, total) = (stop.clone(), total.clone());
                let task = tokio::spawn(async move {
                    let mut sender = c.into_sender();
                    let mut tick = tokio::time::interval(every);
                    let mut seq = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        tick.tick().await;
                        // Samples answer a pong (docs/security.md): the
                        // gateway handles frames in order, so the pong of
                        // this ping is sent before the sample arrives.
                        sender.send(json!({"command": "ping", "seq": seq})).await;
                        sender
                            .send(json!({
                                "command": "delay_time",
                                "delay_time": 10.0 + (seq % 7) as f64,
                                "seq": seq,
                            }))
                            .await;
                        seq += 1;
                        total.fetch_add(1, Ordering::SeqCst);
                    }
                    // Frames are read in order: the close follows the last
                    // sample, so the gateway has taken every sample sent.
                    sender.close().await;
                    seq
                });
                (id, task)
            })
            .collect();
        Senders { stop, tasks, total }
    }

    /// Samples sent so far, all clients together.
    pub fn sent(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    /// Stops sending; returns how many samples each client sent.
    pub async fn stop(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::SeqCst);
        let mut out = BTreeMap::new();
        for (id, task) in self.tasks {
            out.insert(id, task.await.expect("sender task"));
        }
        out
    }
}
