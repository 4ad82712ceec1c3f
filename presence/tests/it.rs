//! Presence end to end: fake gateways publish reports, a subscriber on the
//! broadcast subject watches what presence says. Over a real NATS server of
//! each test's own (the test kit's [`testkit::NatsServer`], on a random
//! port) and once over the in-memory bus. Every test also uses its own
//! subject prefix.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use presence::{Presence, PresenceConfig};
use prometheus::Registry;
use services::admin::Readiness;
use services::bus::memory::MemoryBus;
use services::bus::nats::NatsBus;
use services::bus::{Bus as _, BusError, Inbox, SharedBus};
use services::messages::{
    Broadcast, GatewayReport, GatewayUpdate, RosterClient, RosterRequest, client_digest,
};
use services::stats::DelayStats;
use services::subjects::Subjects;
use testkit::NatsServer;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const HEARTBEAT: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------- helpers

/// Logs are silent unless `TEST_LOG` is set.
fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = services::telemetry::init(services::config::LogFormat::Text, "test");
    }
}

/// A connected bus to the test's own NATS server (the test kit's).
async fn nats(server: &NatsServer, name: &str) -> NatsBus {
    init_logs();
    let url = server.url();
    let bus = NatsBus::connect(&url, name)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to NATS at {url}: {e}"));
    testkit::eventually(Duration::from_secs(5), "the NATS client connected", || {
        std::future::ready(bus.is_connected())
    })
    .await;
    bus
}

/// A round trip through the server: every subscription made on `bus` before
/// is in place afterwards.
async fn settle(bus: &SharedBus, subjects: &Subjects) {
    let probe = format!("{}.nobody", subjects.prefix());
    match bus
        .request(
            &probe,
            bytes::Bytes::new(),
            Vec::new(),
            Duration::from_secs(2),
        )
        .await
    {
        Err(BusError::NoResponders(_)) | Err(BusError::Timeout(_)) => {}
        other => panic!("unexpected answer on {probe}: {other:?}"),
    }
}

/// Subjects under a fresh random prefix.
fn fresh_subjects() -> Subjects {
    init_logs();
    Subjects::new(&format!("t{}", services::ids::new_client_id()))
}

/// Short intervals keep the tests fast.
fn test_config(subjects: &Subjects, replica: &str) -> PresenceConfig {
    let mut cfg = PresenceConfig::new(subjects.clone());
    cfg.replica_id = replica.to_owned();
    cfg.roster_tick = Duration::from_millis(100);
    cfg.warmup = Duration::from_millis(700);
    cfg.lease_ttl = Duration::from_millis(1500);
    cfg.snapshot_interval = Duration::from_secs(60);
    cfg
}

/// Best effort: the lease bucket of the test's prefix goes away.
async fn delete_lease_bucket(bus: &NatsBus, subjects: &Subjects) {
    let js = async_nats::jetstream::new(bus.client().clone());
    let _ = js.delete_key_value(subjects.lease_bucket()).await;
}

/// One running presence replica.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    registry: Registry,
}

impl Running {
    async fn start(cfg: PresenceConfig, bus: SharedBus) -> Self {
        let registry = Registry::new();
        let readiness = Readiness::new();
        let p = Presence::build(cfg, bus, &registry, readiness.clone())
            .await
            .expect("presence builds");
        readiness.set_started();
        assert_eq!(readiness.status(), Ok(()), "ready once built and connected");
        let stop = CancellationToken::new();
        let task = tokio::spawn(p.run(stop.clone()));
        Self {
            stop,
            task,
            registry,
        }
    }

    fn metric(&self, name: &str) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            // A family is either a gauge or a counter; the other reads 0.
            .map(|m| m.get_gauge().get_value() + m.get_counter().get_value())
            .sum()
    }

    fn is_active(&self) -> bool {
        self.metric("pingapp_presence_active") == 1.0
    }

    async fn stop(self) {
        self.stop.cancel();
        timeout(Duration::from_secs(5), self.task)
            .await
            .expect("presence stops promptly")
            .expect("presence task did not panic")
            .expect("presence returns Ok on shutdown");
    }
}

/// What a fake gateway knows; events and heartbeats take their `seq` under
/// the same lock as the client list, as a real gateway must.
struct GwState {
    seq: u64,
    clients: Vec<RosterClient>,
}

/// How a fake gateway heartbeats.
#[derive(Clone, Copy)]
enum Mode {
    /// As an older gateway: every heartbeat lists every client, and a sync
    /// request is answered with such a heartbeat.
    Legacy,
    /// As a current gateway: heartbeats carry the count and digest, and a
    /// sync request naming it (or every gateway) is answered with the full
    /// list in pieces of this many clients.
    Digest(usize),
}

/// A gateway as presence sees it: reports on its subject, a heartbeat
/// every [`HEARTBEAT`], and an answer to every sync request.
struct FakeGateway {
    id: String,
    bus: SharedBus,
    subjects: Subjects,
    state: Arc<Mutex<GwState>>,
    heartbeats: Option<JoinHandle<()>>,
}

impl FakeGateway {
    async fn start(bus: SharedBus, subjects: &Subjects, id: &str) -> Self {
        Self::start_as(bus, subjects, id, Mode::Legacy).await
    }

    async fn start_as(bus: SharedBus, subjects: &Subjects, id: &str, mode: Mode) -> Self {
        let state = Arc::new(Mutex::new(GwState {
            seq: 0,
            clients: Vec::new(),
        }));
        let mut sync = subjects.presence_sync().subscribe(&*bus).await.unwrap();
        settle(&bus, subjects).await;
        let (b, s, st, gw) = (bus.clone(), subjects.clone(), state.clone(), id.to_owned());
        let heartbeats = tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            loop {
                let asked = tokio::select! {
                    _ = every.tick() => false,
                    Some(m) = sync.next() => m.message.is_ok_and(|r| r.asks(&gw)),
                };
                let mut st = st.lock().await;
                let clients = st.clients.clone();
                let interval_ms = HEARTBEAT.as_millis() as u64;
                match mode {
                    Mode::Digest(piece) if asked => {
                        let pieces: Vec<&[RosterClient]> = if clients.is_empty() {
                            vec![&[]]
                        } else {
                            clients.chunks(piece).collect()
                        };
                        let n = pieces.len();
                        for (part, chunk) in pieces.into_iter().enumerate() {
                            let update = GatewayUpdate::Clients {
                                part: part as u32,
                                last: part + 1 == n,
                                clients: chunk.to_vec(),
                            };
                            send(&b, &s, &gw, &mut st, update).await;
                        }
                    }
                    Mode::Digest(_) => {
                        let update = GatewayUpdate::Heartbeat {
                            clients: vec![],
                            interval_ms,
                            count: Some(clients.len() as u64),
                            digest: Some(digest_of(
                                clients
                                    .iter()
                                    .map(|c| (c.channel_name.as_str(), c.name.as_str())),
                            )),
                        };
                        send(&b, &s, &gw, &mut st, update).await;
                    }
                    Mode::Legacy => {
                        let update = GatewayUpdate::Heartbeat {
                            clients,
                            interval_ms,
                            count: None,
                            digest: None,
                        };
                        send(&b, &s, &gw, &mut st, update).await;
                    }
                }
            }
        });
        Self {
            id: id.to_owned(),
            bus,
            subjects: subjects.clone(),
            state,
            heartbeats: Some(heartbeats),
        }
    }

    fn client(&self, id: &str) -> RosterClient {
        RosterClient {
            channel_name: id.to_owned(),
            name: id.to_owned(),
            gateway: self.id.clone(),
            connected_at_ms: services::unix_ms(),
            stats: None,
        }
    }

    async fn report(&self, update: GatewayUpdate) {
        let mut st = self.state.lock().await;
        match &update {
            GatewayUpdate::Connect { client } => st.clients.push(client.clone()),
            GatewayUpdate::Disconnect { channel_name } => {
                st.clients.retain(|c| &c.channel_name != channel_name)
            }
            GatewayUpdate::Rename { channel_name, name } => {
                for c in st
                    .clients
                    .iter_mut()
                    .filter(|c| &c.channel_name == channel_name)
                {
                    c.name.clone_from(name);
                }
            }
            _ => {}
        }
        send(&self.bus, &self.subjects, &self.id, &mut st, update).await;
    }

    async fn connect(&self, id: &str) -> RosterClient {
        let client = self.client(id);
        self.report(GatewayUpdate::Connect {
            client: client.clone(),
        })
        .await;
        client
    }

    /// A client joins, but its report is lost on the way (its `seq` is
    /// used up all the same).
    async fn connect_lost(&self, id: &str) {
        let client = self.client(id);
        let mut st = self.state.lock().await;
        st.clients.push(client);
        st.seq += 1;
    }

    /// The gateway dies without a goodbye.
    fn kill(&mut self) {
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn send(
    bus: &SharedBus,
    subjects: &Subjects,
    gw: &str,
    st: &mut GwState,
    update: GatewayUpdate,
) {
    st.seq += 1;
    let report = GatewayReport {
        gateway: gw.to_owned(),
        seq: st.seq,
        update,
    };
    subjects
        .gateway_reports(gw)
        .publish(&**bus, &report)
        .await
        .expect("report published");
}

/// Everything presence broadcasts.
struct Watcher {
    sub: Inbox<Broadcast>,
}

impl Watcher {
    async fn start(bus: &SharedBus, subjects: &Subjects) -> Self {
        let sub = subjects.broadcast().subscribe(&**bus).await.unwrap();
        settle(bus, subjects).await;
        Self { sub }
    }

    async fn next(&mut self, within: Duration) -> Option<Broadcast> {
        let m = timeout(within, self.sub.next()).await.ok()??;
        Some(m.message.expect("broadcasts decode"))
    }

    /// Waits for the first broadcast matching `pred`; returns it and every
    /// broadcast seen before it.
    async fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        pred: impl Fn(&Broadcast) -> bool,
    ) -> (Broadcast, Vec<Broadcast>) {
        let deadline = Instant::now() + within;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(b) if pred(&b) => return (b, before),
                Some(b) => before.push(b),
                None => panic!("no {what} within {within:?}; saw {before:?}"),
            }
        }
    }

    /// Waits for the connects of all of `ids`, in any order: reports of
    /// different gateways travel on different connections.
    async fn wait_connects(&mut self, ids: &[&str]) {
        let mut missing: BTreeSet<&str> = ids.iter().copied().collect();
        while !missing.is_empty() {
            let (b, _) = self
                .wait_for(SOON, "connects", |b| matches!(b, Broadcast::Connect { .. }))
                .await;
            if let Broadcast::Connect { client } = b {
                missing.remove(client.channel_name.as_str());
            }
        }
    }

    /// Every broadcast within `period`.
    async fn collect(&mut self, period: Duration) -> Vec<Broadcast> {
        let deadline = Instant::now() + period;
        let mut seen = Vec::new();
        while let Some(b) = self
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            seen.push(b);
        }
        seen
    }
}

/// The periodic (and warm-up, and takeover) roster digest.
fn is_snapshot(b: &Broadcast) -> bool {
    matches!(b, Broadcast::Digest { .. })
}

/// The XOR of the client digests of `(id, name)` pairs.
fn digest_of<'a>(clients: impl IntoIterator<Item = (&'a str, &'a str)>) -> u64 {
    clients
        .into_iter()
        .fold(0, |d, (id, name)| d ^ client_digest(id, name))
}

/// Asserts that `b` is the digest of exactly these `(id, name)` clients.
fn assert_digest(b: &Broadcast, clients: &[(&str, &str)]) {
    let expected = Broadcast::Digest {
        count: clients.len() as u64,
        digest: digest_of(clients.iter().copied()),
    };
    assert_eq!(b, &expected, "the digest of {clients:?}");
}

fn is_connect_of(id: &str) -> impl Fn(&Broadcast) -> bool + '_ {
    move |b| matches!(b, Broadcast::Connect { client } if client.channel_name == id)
}

fn is_disconnect_of(id: &str) -> impl Fn(&Broadcast) -> bool + '_ {
    move |b| matches!(b, Broadcast::Disconnect { channel_name } if channel_name == id)
}

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The whole roster, fetched in pages of two (and checked against one
/// legacy whole-roster reply).
async fn roster(bus: &SharedBus, subjects: &Subjects) -> BTreeSet<String> {
    let service = subjects.roster_request();
    let mut all = BTreeSet::new();
    let mut after = None;
    loop {
        let req = RosterRequest {
            after,
            limit: Some(2),
        };
        let reply = service
            .request(&**bus, &req, Duration::from_secs(2))
            .await
            .expect("presence answers roster requests with a RosterReply");
        assert!(reply.clients.len() <= 2, "a page holds at most its limit");
        all.extend(reply.clients.into_iter().map(|c| c.channel_name));
        match reply.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let whole = service
        .request(&**bus, &RosterRequest::default(), Duration::from_secs(2))
        .await
        .expect("presence answers an older gateway's request");
    assert_eq!(whole.next, None);
    let whole: BTreeSet<String> = whole.clients.into_iter().map(|c| c.channel_name).collect();
    assert_eq!(whole, all, "pages and the whole roster agree");
    all
}

const SOON: Duration = Duration::from_secs(3);

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn nats_events_are_broadcast() {
    let subjects = fresh_subjects();
    let server = NatsServer::start().await;
    let admin = nats(&server, "admin").await;
    let watch_bus: SharedBus = Arc::new(nats(&server, "watcher").await);
    let gw_bus: SharedBus = Arc::new(nats(&server, "gateway").await);
    let mut watcher = Watcher::start(&watch_bus, &subjects).await;
    let p = Running::start(
        test_config(&subjects, "a"),
        Arc::new(nats(&server, "presence").await),
    )
    .await;
    // Arrange: the warm-up ends with an (empty) snapshot.
    let (snap, _) = watcher
        .wait_for(SOON, "warm-up snapshot", is_snapshot)
        .await;
    assert_digest(&snap, &[]);
    let gw = FakeGateway::start(gw_bus.clone(), &subjects, "gw-1").await;

    // Connect.
    let a = gw.connect("a").await;
    let (b, before) = watcher.wait_for(SOON, "connect", is_connect_of("a")).await;
    assert_eq!(b, Broadcast::Connect { client: a });
    assert!(before.is_empty(), "nothing before the connect: {before:?}");
    assert_eq!(roster(&gw_bus, &subjects).await, ids(&["a"]));

    // Delays are coalesced into one broadcast with the latest numbers.
    let stats = |ms: f64| DelayStats {
        delay_time: ms,
        median: ms,
        jitter: 1.0,
    };
    for ms in [10.0, 11.0, 12.0] {
        // Reports without a tick (older gateways): the deadline sends them.
        gw.report(GatewayUpdate::Delays {
            delays: [("a".to_owned(), stats(ms))].into_iter().collect(),
            tick_ms: None,
        })
        .await;
    }
    let (b, _) = watcher
        .wait_for(
            SOON,
            "delays of 12 ms",
            |b| matches!(b, Broadcast::Delays { delays } if delays.get("a") == Some(&stats(12.0))),
        )
        .await;
    let Broadcast::Delays { delays } = b else {
        unreachable!()
    };
    assert_eq!(delays.len(), 1);

    // A bad payload is counted and changes nothing.
    gw_bus
        .publish(
            subjects.gateway_reports("gw-1").subject(),
            bytes::Bytes::from_static(b"{nope"),
            Vec::new(),
        )
        .await
        .unwrap();

    // Rename, then disconnect.
    gw.report(GatewayUpdate::Rename {
        channel_name: "a".into(),
        name: "Ada".into(),
    })
    .await;
    let (b, _) = watcher
        .wait_for(SOON, "rename", |b| matches!(b, Broadcast::Rename { .. }))
        .await;
    assert_eq!(
        b,
        Broadcast::Rename {
            channel_name: "a".into(),
            name: "Ada".into()
        }
    );
    gw.report(GatewayUpdate::Disconnect {
        channel_name: "a".into(),
    })
    .await;
    watcher
        .wait_for(SOON, "disconnect", is_disconnect_of("a"))
        .await;
    assert!(roster(&gw_bus, &subjects).await.is_empty());
    assert_eq!(p.metric("pingapp_presence_bad_reports_total"), 1.0);
    assert!(p.metric("pingapp_presence_heartbeats_total") >= 1.0);

    p.stop().await;
    delete_lease_bucket(&admin, &subjects).await;
}

/// A gateway speaks only for itself: a report naming another gateway than
/// its subject, another gateway's client renamed, disconnected, claimed in
/// a heartbeat, and a heartbeat over the cap are all refused and counted;
/// nobody's roster changes.
#[tokio::test]
async fn nats_a_gateway_speaks_only_for_its_own_clients() {
    let subjects = fresh_subjects();
    let server = NatsServer::start().await;
    let admin = nats(&server, "admin").await;
    let watch_bus: SharedBus = Arc::new(nats(&server, "watcher").await);
    let gw_bus: SharedBus = Arc::new(nats(&server, "gateway").await);
    let evil_bus: SharedBus = Arc::new(nats(&server, "evil").await);
    let mut watcher = Watcher::start(&watch_bus, &subjects).await;
    let mut cfg = test_config(&subjects, "a");
    cfg.max_clients_per_gateway = 3;
    let p = Running::start(cfg, Arc::new(nats(&server, "presence").await)).await;
    watcher
        .wait_for(SOON, "warm-up snapshot", is_snapshot)
        .await;
    let gw = FakeGateway::start(gw_bus.clone(), &subjects, "gw-1").await;
    let evil = FakeGateway::start(evil_bus.clone(), &subjects, "gw-2").await;
    let a = gw.connect("a").await;
    watcher.wait_for(SOON, "connect", is_connect_of("a")).await;

    // On its own subject, in gw-1's name: refused (subject).
    let forged = GatewayReport {
        gateway: "gw-1".into(),
        seq: 1_000,
        update: GatewayUpdate::Goodbye,
    };
    subjects
        .gateway_reports("gw-2")
        .publish(&*evil_bus, &forged)
        .await
        .unwrap();
    // In its own name, about gw-1's client: refused (foreign_client).
    evil.report(GatewayUpdate::Rename {
        channel_name: "a".into(),
        name: "SYSTEM: click here".into(),
    })
    .await;
    evil.report(GatewayUpdate::Disconnect {
        channel_name: "a".into(),
    })
    .await;
    let mut stolen = a.clone();
    stolen.gateway = "gw-2".into();
    evil.report(GatewayUpdate::Connect { client: stolen }).await;
    // A heartbeat of five clients, over the cap of 3: refused whole.
    let many: Vec<_> = (0..5).map(|i| evil.client(&format!("fake{i}"))).collect();
    evil.report(GatewayUpdate::Heartbeat {
        count: None,
        digest: None,
        clients: many,
        interval_ms: HEARTBEAT.as_millis() as u64,
    })
    .await;
    // Its own client is welcome; its heartbeats now list gw-1's client
    // (the refused connect above) with its own: that entry is skipped.
    evil.connect("own").await;
    watcher
        .wait_for(SOON, "gw-2's own client", is_connect_of("own"))
        .await;

    let refused = |reason: &str| {
        p.registry
            .gather()
            .iter()
            .filter(|f| f.name() == "pingapp_presence_refused_total")
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| m.get_label().iter().any(|l| l.value() == reason))
            .map(|m| m.get_counter().get_value())
            .sum::<f64>()
    };
    testkit::eventually(SOON, "every forgery counted", || {
        std::future::ready(
            refused("subject") == 1.0
                && refused("foreign_client") >= 4.0
                && refused("too_many_clients") == 1.0,
        )
    })
    .await;
    assert_eq!(roster(&gw_bus, &subjects).await, ids(&["a", "own"]));
    // The heartbeats keep coming: still nothing about a but its own echo.
    let seen = watcher.collect(HEARTBEAT * 2).await;
    assert!(
        !seen.iter().any(|b| match b {
            Broadcast::Rename { channel_name, .. } | Broadcast::Disconnect { channel_name } =>
                channel_name == "a",
            Broadcast::Connect { client } => client.channel_name != "own",
            _ => false,
        }),
        "nothing forged was broadcast: {seen:?}"
    );
    // gw-1 itself still renames its client.
    gw.report(GatewayUpdate::Rename {
        channel_name: "a".into(),
        name: "Ada".into(),
    })
    .await;
    watcher
        .wait_for(
            SOON,
            "the honest rename",
            |b| matches!(b, Broadcast::Rename { name, .. } if name == "Ada"),
        )
        .await;

    p.stop().await;
    delete_lease_bucket(&admin, &subjects).await;
}

#[tokio::test]
async fn nats_a_tick_leaves_once_every_gateway_closed_it() {
    let subjects = fresh_subjects();
    let server = NatsServer::start().await;
    let watch_bus: SharedBus = Arc::new(nats(&server, "watcher").await);
    let mut watcher = Watcher::start(&watch_bus, &subjects).await;
    // An hour-long tick: its deadline does not come during the test, so only
    // the gateways' closing reports can release the updates.
    let mut cfg = test_config(&subjects, "a");
    cfg.roster_tick = Duration::from_secs(3600);
    let p = Running::start(cfg, Arc::new(nats(&server, "presence").await)).await;
    watcher
        .wait_for(SOON, "warm-up snapshot", is_snapshot)
        .await;
    let g1 = FakeGateway::start(Arc::new(nats(&server, "gw-1").await), &subjects, "gw-1").await;
    let g2 = FakeGateway::start(Arc::new(nats(&server, "gw-2").await), &subjects, "gw-2").await;
    g1.connect("a").await;
    g2.connect("b").await;
    watcher.wait_connects(&["a", "b"]).await;
    let stats = |ms: f64| DelayStats {
        delay_time: ms,
        median: ms,
        jitter: 0.5,
    };
    let tick = services::unix_ms().div_euclid(1000) * 1000;
    let close = |ms: f64, id: &str, tick: i64| GatewayUpdate::Delays {
        delays: [(id.to_owned(), stats(ms))].into_iter().collect(),
        tick_ms: Some(tick),
    };

    g1.report(close(7.0, "a", tick)).await;
    let early = watcher.collect(Duration::from_millis(500)).await;
    assert!(
        early.is_empty(),
        "nothing leaves while gw-2 has not closed the tick: {early:?}"
    );
    g2.report(close(9.0, "b", tick)).await;
    let (b, _) = watcher
        .wait_for(SOON, "the tick's delays", |b| {
            matches!(b, Broadcast::Delays { .. })
        })
        .await;
    let Broadcast::Delays { delays } = b else {
        unreachable!()
    };
    assert_eq!(
        delays,
        [("a".to_owned(), stats(7.0)), ("b".to_owned(), stats(9.0))].into(),
        "one broadcast with both gateways' updates"
    );
    // The next tick, closed by both (one of them with nothing new).
    g2.report(close(10.0, "b", tick + 1000)).await;
    g1.report(GatewayUpdate::Delays {
        delays: Default::default(),
        tick_ms: Some(tick + 1000),
    })
    .await;
    let (b, _) = watcher
        .wait_for(SOON, "the next tick's delays", |b| {
            matches!(b, Broadcast::Delays { .. })
        })
        .await;
    assert_eq!(
        b,
        Broadcast::Delays {
            delays: [("b".to_owned(), stats(10.0))].into()
        }
    );
    let flushes = |trigger: &str| {
        p.registry
            .gather()
            .iter()
            .filter(|f| f.name() == "pingapp_presence_delay_flushes_total")
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| m.get_label().iter().any(|l| l.value() == trigger))
            .map(|m| m.get_counter().get_value())
            .sum::<f64>()
    };
    assert_eq!(flushes("all_reported"), 2.0);
    assert_eq!(flushes("deadline"), 0.0);
    p.stop().await;
}

#[tokio::test]
async fn nats_silent_gateway_is_expired() {
    let subjects = fresh_subjects();
    let server = NatsServer::start().await;
    let admin = nats(&server, "admin").await;
    let watch_bus: SharedBus = Arc::new(nats(&server, "watcher").await);
    let mut watcher = Watcher::start(&watch_bus, &subjects).await;
    let p = Running::start(
        test_config(&subjects, "a"),
        Arc::new(nats(&server, "presence").await),
    )
    .await;
    watcher
        .wait_for(SOON, "warm-up snapshot", is_snapshot)
        .await;
    let mut gw = FakeGateway::start(
        Arc::new(nats(&server, "gateway").await),
        &subjects,
        "gw-dies",
    )
    .await;
    let survivor = FakeGateway::start(
        Arc::new(nats(&server, "gateway2").await),
        &subjects,
        "gw-lives",
    )
    .await;
    gw.connect("a").await;
    gw.connect("b").await;
    survivor.connect("c").await;
    watcher.wait_connects(&["a", "b", "c"]).await;

    // Act: the gateway dies without a goodbye, after presence learned its
    // heartbeat interval (before that, the 2 s default applies). Each fake
    // gateway heartbeats once at start and then every HEARTBEAT: four
    // processed heartbeats mean a whole interval passed after both first
    // ones were sent, so both gateways' intervals are known.
    testkit::eventually(
        Duration::from_secs(10),
        "presence heard 4 heartbeats",
        || std::future::ready(p.metric("pingapp_presence_heartbeats_total") >= 4.0),
    )
    .await;
    gw.kill();
    let died = Instant::now();

    // Assert: both its clients are disconnected within 10 s, the other
    // gateway's client stays.
    let mut gone = BTreeSet::new();
    while gone.len() < 2 {
        let left = Duration::from_secs(10).saturating_sub(died.elapsed());
        match watcher.next(left).await {
            Some(Broadcast::Disconnect { channel_name }) => {
                gone.insert(channel_name);
            }
            Some(_) => {}
            None => panic!("only {gone:?} disconnected within 10 s"),
        }
    }
    assert_eq!(gone, ids(&["a", "b"]));
    assert_eq!(roster(&watch_bus, &subjects).await, ids(&["c"]));
    assert_eq!(p.metric("pingapp_presence_expirations_total"), 1.0);
    assert_eq!(p.metric("pingapp_presence_expired_clients_total"), 2.0);
    assert!(p.metric("pingapp_presence_heartbeats_missed_total") >= 2.0);
    assert_eq!(p.metric("pingapp_presence_roster_size"), 1.0);

    p.stop().await;
    delete_lease_bucket(&admin, &subjects).await;
}

#[tokio::test]
async fn nats_restart_is_invisible_to_pages() {
    let subjects = fresh_subjects();
    let server = NatsServer::start().await;
    let admin = nats(&server, "admin").await;
    let watch_bus: SharedBus = Arc::new(nats(&server, "watcher").await);
    let mut watcher = Watcher::start(&watch_bus, &subjects).await;
    let first = Running::start(
        test_config(&subjects, "presence-0"),
        Arc::new(nats(&server, "p1").await),
    )
    .await;
    watcher
        .wait_for(SOON, "warm-up snapshot", is_snapshot)
        .await;
    let g1 = FakeGateway::start(Arc::new(nats(&server, "g1").await), &subjects, "g1").await;
    let g2 = FakeGateway::start(Arc::new(nats(&server, "g2").await), &subjects, "g2").await;
    for (gw, id) in [(&g1, "a"), (&g1, "b"), (&g2, "c"), (&g2, "d")] {
        gw.connect(id).await;
    }
    watcher.wait_connects(&["a", "b", "c", "d"]).await;

    // Act: presence restarts (same replica id, as a restarted pod has) while
    // the gateways keep heartbeating.
    first.stop().await;
    let second = Running::start(
        test_config(&subjects, "presence-0"),
        Arc::new(nats(&server, "p2").await),
    )
    .await;

    // Assert: no page hears of a connect or disconnect; the snapshot after
    // the warm-up holds the whole roster.
    let (snap, before) = watcher
        .wait_for(
            Duration::from_secs(10),
            "snapshot after restart",
            is_snapshot,
        )
        .await;
    assert!(
        before.is_empty(),
        "spurious broadcasts after restart: {before:?}"
    );
    assert_digest(&snap, &[("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]);
    let later = watcher.collect(Duration::from_secs(1)).await;
    assert!(
        later
            .iter()
            .all(|b| !matches!(b, Broadcast::Disconnect { .. } | Broadcast::Connect { .. })),
        "spurious broadcasts after restart: {later:?}"
    );
    assert!(second.is_active());

    second.stop().await;
    delete_lease_bucket(&admin, &subjects).await;
}

#[tokio::test]
async fn nats_two_replicas_broadcast_once_and_fail_over() {
    let subjects = fresh_subjects();
    let server = NatsServer::start().await;
    let admin = nats(&server, "admin").await;
    let watch_bus: SharedBus = Arc::new(nats(&server, "watcher").await);
    let mut watcher = Watcher::start(&watch_bus, &subjects).await;
    let a = Running::start(
        test_config(&subjects, "a"),
        Arc::new(nats(&server, "pa").await),
    )
    .await;
    let b = Running::start(
        test_config(&subjects, "b"),
        Arc::new(nats(&server, "pb").await),
    )
    .await;
    watcher
        .wait_for(SOON, "warm-up snapshot", is_snapshot)
        .await;
    let gw = FakeGateway::start(Arc::new(nats(&server, "gw").await), &subjects, "gw").await;

    // Exactly one broadcast per event.
    gw.connect("x").await;
    gw.report(GatewayUpdate::Rename {
        channel_name: "x".into(),
        name: "Xavier".into(),
    })
    .await;
    let seen = watcher.collect(Duration::from_secs(1)).await;
    let connects = seen.iter().filter(|b| is_connect_of("x")(b)).count();
    let renames = seen
        .iter()
        .filter(|b| matches!(b, Broadcast::Rename { .. }))
        .count();
    assert_eq!((connects, renames), (1, 1), "saw {seen:?}");
    assert_eq!(
        u8::from(a.is_active()) + u8::from(b.is_active()),
        1,
        "exactly one active replica"
    );

    // Act: the active replica goes away.
    let (gone, survivor) = if a.is_active() { (a, b) } else { (b, a) };
    gone.stop().await;
    let stopped = Instant::now();

    // Assert: the other takes over within 10 s with a snapshot, no client
    // lost, and broadcasts from then on.
    let (snap, before) = watcher
        .wait_for(Duration::from_secs(10), "takeover snapshot", is_snapshot)
        .await;
    assert!(stopped.elapsed() < Duration::from_secs(10));
    assert!(before.is_empty(), "broadcasts during failover: {before:?}");
    assert_digest(&snap, &[("x", "Xavier")]);
    assert!(survivor.is_active());
    gw.connect("y").await;
    let seen = watcher.collect(Duration::from_secs(1)).await;
    assert_eq!(
        seen.iter().filter(|b| is_connect_of("y")(b)).count(),
        1,
        "saw {seen:?}"
    );

    survivor.stop().await;
    delete_lease_bucket(&admin, &subjects).await;
}

#[tokio::test]
async fn memory_bus_end_to_end() {
    let subjects = fresh_subjects();
    let bus: SharedBus = Arc::new(MemoryBus::new());
    let mut watcher = Watcher::start(&bus, &subjects).await;
    let p = Running::start(test_config(&subjects, "mem"), bus.clone()).await;
    watcher
        .wait_for(SOON, "warm-up snapshot", is_snapshot)
        .await;
    let mut gw = FakeGateway::start(bus.clone(), &subjects, "gw").await;

    let a = gw.connect("a").await;
    let (b, _) = watcher.wait_for(SOON, "connect", is_connect_of("a")).await;
    assert_eq!(b, Broadcast::Connect { client: a });
    assert_eq!(roster(&bus, &subjects).await, ids(&["a"]));

    // Presence learned the interval from the gateway's first heartbeat;
    // its second one comes a whole interval later.
    testkit::eventually(
        Duration::from_secs(10),
        "presence heard 2 heartbeats",
        || std::future::ready(p.metric("pingapp_presence_heartbeats_total") >= 2.0),
    )
    .await;
    gw.kill();
    watcher
        .wait_for(Duration::from_secs(3), "expiry", is_disconnect_of("a"))
        .await;
    assert!(roster(&bus, &subjects).await.is_empty());
    p.stop().await;
}

/// A NATS server, a watcher of the broadcasts, a connection for fake
/// gateways, and one presence replica past its warm-up.
struct Stage {
    subjects: Subjects,
    server: NatsServer,
    admin: NatsBus,
    watcher: Watcher,
    gw_bus: SharedBus,
}

impl Stage {
    async fn start(replica: &str) -> (Stage, Running) {
        let subjects = fresh_subjects();
        let server = NatsServer::start().await;
        let admin = nats(&server, "admin").await;
        let watch_bus: SharedBus = Arc::new(nats(&server, "watcher").await);
        let gw_bus: SharedBus = Arc::new(nats(&server, "gateway").await);
        let mut watcher = Watcher::start(&watch_bus, &subjects).await;
        let p = Running::start(
            test_config(&subjects, replica),
            Arc::new(nats(&server, "presence").await),
        )
        .await;
        watcher.wait_for(SOON, "warm-up digest", is_snapshot).await;
        let stage = Stage {
            subjects,
            server,
            admin,
            watcher,
            gw_bus,
        };
        (stage, p)
    }
}

#[tokio::test]
async fn nats_a_lost_connect_is_repaired_by_the_heartbeat_digest() {
    let (stage, p) = Stage::start("a").await;
    let Stage {
        subjects,
        admin,
        mut watcher,
        gw_bus,
        ..
    } = stage;
    let gw = FakeGateway::start_as(gw_bus.clone(), &subjects, "gw-1", Mode::Digest(2)).await;
    gw.connect("a").await;
    watcher.wait_connects(&["a"]).await;
    // In agreement: heartbeats ask for nothing.
    watcher.collect(HEARTBEAT * 3).await;
    assert_eq!(p.metric("pingapp_presence_sync_requests_total"), 0.0);

    // Act: presence misses the connect of b.
    gw.connect_lost("b").await;

    // Assert: the next heartbeat's digest disagrees, presence asks this
    // gateway for its list, and b is announced, within a few heartbeats.
    let (b, before) = watcher
        .wait_for(
            HEARTBEAT * 5,
            "b announced after a resync",
            is_connect_of("b"),
        )
        .await;
    assert!(matches!(b, Broadcast::Connect { client } if client.gateway == "gw-1"));
    assert!(
        before
            .iter()
            .all(|b| !matches!(b, Broadcast::Connect { .. } | Broadcast::Disconnect { .. })),
        "only b changed: {before:?}"
    );
    assert_eq!(roster(&gw_bus, &subjects).await, ids(&["a", "b"]));
    assert!(p.metric("pingapp_presence_sync_requests_total") >= 1.0);
    // In agreement again: no more requests once the list is in.
    watcher.collect(HEARTBEAT * 2).await;
    let asked = p.metric("pingapp_presence_sync_requests_total");
    watcher.collect(HEARTBEAT * 4).await;
    assert_eq!(p.metric("pingapp_presence_sync_requests_total"), asked);

    p.stop().await;
    delete_lease_bucket(&admin, &subjects).await;
}

#[tokio::test]
async fn nats_a_restarted_presence_rebuilds_the_roster_from_pieces() {
    let (stage, first) = Stage::start("presence-0").await;
    let Stage {
        subjects,
        server,
        admin,
        mut watcher,
        gw_bus,
    } = stage;
    // Pieces of two clients: five clients come in three pieces.
    let g1 = FakeGateway::start_as(
        Arc::new(nats(&server, "g1").await),
        &subjects,
        "g1",
        Mode::Digest(2),
    )
    .await;
    let g2 = FakeGateway::start_as(
        Arc::new(nats(&server, "g2").await),
        &subjects,
        "g2",
        Mode::Digest(2),
    )
    .await;
    for (gw, id) in [
        (&g1, "a"),
        (&g1, "b"),
        (&g1, "c"),
        (&g1, "d"),
        (&g1, "e"),
        (&g2, "f"),
    ] {
        gw.connect(id).await;
    }
    watcher.wait_connects(&["a", "b", "c", "d", "e", "f"]).await;

    // Act: presence restarts; the gateways answer its sync request with
    // their lists in pieces.
    first.stop().await;
    let second = Running::start(
        test_config(&subjects, "presence-0"),
        Arc::new(nats(&server, "p2").await),
    )
    .await;

    // Assert: the digest after the warm-up is the whole roster's, no page
    // heard of a connect or disconnect, and every piece arrived.
    let (digest, before) = watcher
        .wait_for(Duration::from_secs(10), "digest after restart", is_snapshot)
        .await;
    assert!(
        before.is_empty(),
        "spurious broadcasts after restart: {before:?}"
    );
    let all = ["a", "b", "c", "d", "e", "f"].map(|id| (id, id));
    assert_digest(&digest, &all);
    assert_eq!(
        roster(&gw_bus, &subjects).await,
        ids(&["a", "b", "c", "d", "e", "f"])
    );
    assert!(
        second.metric("pingapp_presence_events_total") >= 4.0,
        "3 pieces from g1 and 1 from g2 at least"
    );
    assert_eq!(second.metric("pingapp_presence_broken_pieces_total"), 0.0);

    second.stop().await;
    delete_lease_bucket(&admin, &subjects).await;
}
