//! The PingApp gateway: serves the pages, the WebSocket endpoints and the
//! HTTP API; answers every ping itself; forwards samples to the durable
//! stream and presence events to presence; fans presence's broadcasts out
//! to its own public clients.
//!
//! [`Gateway::build`] binds the listener (port 0 works in tests) and
//! subscribes; [`Gateway::run`] serves until the shutdown token is
//! cancelled, then drains: every client gets close 1012, presence is told
//! goodbye, pending samples are flushed.

pub mod api;
pub mod caps;
pub mod config;
pub mod connection;
pub mod feed;
pub mod guard;
pub mod hub;
pub mod index;
pub mod metrics;
pub mod mirror;
pub mod pages;
pub mod persist;
pub mod reporter;
pub mod room;
pub mod state;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{ConnectInfo, Extension, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use services::admin::{Latch, Readiness};
use services::bus::SharedBus;
use services::protocol::{Page, Version};
use services::subjects::Subjects;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::add_extension::AddExtension;
use tower_http::set_header::SetResponseHeaderLayer;

pub use config::GatewayArgs;
use connection::wire::{Metered, WireMeter};
use metrics::GatewayMetrics;
use persist::{Batcher, BatcherHandle};
use reporter::{Reporter, ReporterConfig, ReporterHandle};
use room::Room;
use state::Shared;

/// Longest the drain waits for the goodbye to presence to be sent.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long samples stay in the durable stream if no recorder takes them
/// (stored samples leave it at once: it is a work queue).
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

/// Everything a gateway needs to start.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Limits and timings.
    pub args: GatewayArgs,
    /// This gateway's id, shown to clients and unique among gateways.
    pub gateway_id: String,
    /// Subject names.
    pub subjects: Subjects,
    /// Where to listen for browsers.
    pub listen: SocketAddr,
}

/// A gateway, bound and subscribed, ready to [`Gateway::run`].
///
/// Its parts, each owning its own state (docs/architecture.md):
/// the connections (one task each, [`connection`]), the [`Room`] (roster
/// copy and local fan-out), the presence [`Reporter`] task, the roster
/// [`feed`] tasks, and the sample [`Batcher`] task.
pub struct Gateway {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// Stops the feed tasks and the connections when the drain starts.
    stop: CancellationToken,
    feed: Vec<JoinHandle<()>>,
    reporter: (ReporterHandle, JoinHandle<()>),
    batcher: BatcherHandle,
    readiness: Readiness,
    /// Set when the gateway starts serving.
    started: Latch,
}

impl Gateway {
    /// Binds the listener, creates the durable stream if needed, subscribes
    /// to presence's subjects and starts the background parts.
    ///
    /// # Errors
    /// The address cannot be bound or the bus refuses the subscriptions.
    pub async fn build(
        cfg: GatewayConfig,
        bus: SharedBus,
        registry: &prometheus::Registry,
        readiness: Readiness,
    ) -> anyhow::Result<Self> {
        let started = readiness.latch("gateway");
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let stream = cfg.subjects.samples_stream();
        if let Err(e) = stream
            .ensure(&*bus, STREAM_MAX_AGE, cfg.args.stream_max_bytes)
            .await
        {
            // An old limits-retention stream not yet drained stays as it
            // is until the recorder has stored its batches and migrates it
            // (docs/architecture.md, "The durable sample stream"); batches
            // go there meanwhile. Without any stream, nothing can be stored.
            stream
                .state(&*bus)
                .await
                .map_err(|_| e)
                .context("creating the sample stream")?;
            tracing::warn!("the sample stream is not at its settings yet; using it as it is");
        }
        let broadcasts = cfg
            .subjects
            .broadcast()
            .subscribe(&*bus)
            .await
            .context("subscribing to broadcasts")?;
        let syncs = cfg
            .subjects
            .presence_sync()
            .subscribe(&*bus)
            .await
            .context("subscribing to presence sync")?;

        let metrics = GatewayMetrics::new(registry);
        let stop = CancellationToken::new();
        let (records, batcher) = Batcher {
            bus: bus.clone(),
            topic: cfg.subjects.samples(&cfg.gateway_id),
            gateway_id: cfg.gateway_id.clone(),
            metrics: metrics.clone(),
            drain_timeout: cfg.args.drain_timeout(),
            buffer_bytes: cfg.args.persist_buffer_bytes,
        }
        .spawn();
        let (reporter, reporter_task) = Reporter::spawn(
            ReporterConfig {
                gateway_id: cfg.gateway_id.clone(),
                topic: cfg.subjects.gateway_reports(&cfg.gateway_id),
                roster_tick: cfg.args.roster_tick(),
                heartbeat_interval: cfg.args.heartbeat_interval(),
                piece_clients: cfg.args.presence_piece_clients as usize,
                lists: metrics.presence_lists.clone(),
            },
            bus.clone(),
            syncs,
        );
        let room = Arc::new(Room::new(reporter.clone(), metrics.clone()));
        let ticks = {
            let room = room.clone();
            let stop = stop.clone();
            let period = cfg.args.roster_tick();
            let pacing = cfg.args.view_fanout();
            async move { room.run_ticks(period, pacing, stop).await }
        };
        let source = feed::RosterSource {
            bus: bus.clone(),
            service: cfg.subjects.roster_request(),
            page: cfg.args.presence_piece_clients,
            metrics: metrics.clone(),
        };
        let feed = vec![
            tokio::spawn(ticks),
            tokio::spawn(feed::broadcasts(
                room.clone(),
                broadcasts,
                source.clone(),
                stop.clone(),
            )),
            tokio::spawn(feed::fetch_roster(room.clone(), source, stop.clone())),
        ];
        let b = bus.clone();
        readiness.add_check("nats", move || b.is_connected());
        let origins = guard::OriginPolicy::new(&cfg.args.allowed_origins);
        let ip_limits = Arc::new(guard::IpLimits::new(
            cfg.args.max_connections_per_ip,
            cfg.args.max_connects_per_ip_per_second,
            cfg.args.trusted_proxies.clone(),
        ));
        let api_budget = guard::IpBudget::new(cfg.args.max_api_requests_per_ip_per_second);
        let caps = caps::Caps::new(
            cfg.args.max_connections,
            cfg.args.max_public_clients,
            cfg.args.max_v1_public_clients,
        );
        for (kind, max) in [
            ("connections", cfg.args.max_connections),
            ("public", cfg.args.max_public_clients),
            ("v1_public", cfg.args.max_v1_public_clients),
        ] {
            metrics
                .connection_cap
                .with_label_values(&[kind])
                .set(i64::from(max));
        }
        let shared = Arc::new(Shared {
            origins,
            ip_limits,
            api_budget,
            caps,
            args: cfg.args,
            gateway_id: cfg.gateway_id,
            subjects: cfg.subjects,
            bus,
            metrics,
            room,
            records,
            shutdown: stop.clone(),
            tracker: TaskTracker::new(),
        });
        Ok(Self {
            listener,
            shared,
            stop,
            feed,
            reporter: (reporter, reporter_task),
            batcher,
            readiness,
            started,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Serves until `shutdown` is cancelled, then drains: readiness turns
    /// 503, every connection gets close 1012 and leaves the room, presence
    /// is told goodbye, and accepted samples are flushed to the bus.
    ///
    /// # Errors
    /// The listener failed.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Gateway {
            listener,
            shared,
            stop,
            feed,
            reporter: (reporter, reporter_task),
            batcher,
            readiness,
            started,
        } = self;
        let app = router(shared.clone());
        started.set();
        let drain = {
            let readiness = readiness.clone();
            let stop = stop.clone();
            async move {
                shutdown.cancelled().await;
                readiness.set_draining();
                stop.cancel();
            }
        };
        let served = serve_http(listener, app, &shared.args, drain)
            .await
            .context("serving");
        // Whatever ended the serving, the parts drain in order.
        stop.cancel();

        // axum does not wait for upgraded connections: the tracker does.
        let drain_timeout = shared.args.drain_timeout();
        shared.tracker.close();
        if tokio::time::timeout(drain_timeout, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout: some connections did not close in time");
        }
        for task in feed {
            let _ = task.await;
        }
        // While NATS is down a publish may wait for the reconnect: the
        // goodbye is not worth more than the final flush.
        if tokio::time::timeout(GOODBYE_TIMEOUT, reporter.goodbye())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout: presence was not told goodbye");
            reporter_task.abort();
        }
        let _ = reporter_task.await;
        let bus = shared.bus.clone();
        batcher.close().await;
        let _ = bus.flush().await;
        served
    }
}

/// Serves HTTP/1 (WebSocket upgrades included) on `listener` until
/// `drain` resolves, then lets every open HTTP connection finish its
/// request and close (upgraded connections are the tracker's, not these),
/// waiting at most the drain timeout.
///
/// Served with hyper's own builder rather than `axum::serve`, whose header
/// read timeout cannot be set: a client gets `--header-timeout-ms` to send
/// a request's headers, the upgrade's included (a slowloris trickling
/// them, or sending nothing, is cut; docs/security.md). Each request
/// carries its peer's address as [`ConnectInfo`], for the per-IP caps.
///
/// # Errors
/// None yet: accept errors are logged and retried, as `axum::serve` does.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    args: &GatewayArgs,
    drain: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(args.header_timeout());
    let conns = TaskTracker::new();
    let closing = CancellationToken::new();
    let mut drain = std::pin::pin!(drain);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait, as axum does.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut drain => break,
        };
        // Pongs must leave at once, not wait for Nagle and delayed ACKs.
        let _ = tcp.set_nodelay(true);
        // Every connection reads through a frame meter, armed at the
        // upgrade (connection::wire).
        let meter = WireMeter::wired();
        let service = TowerToHyperService::new(AddExtension::new(
            AddExtension::new(app.clone(), ConnectInfo(peer)),
            meter.clone(),
        ));
        let conn = http
            .serve_connection(TokioIo::new(Metered::new(tcp, meter)), service)
            .with_upgrades();
        let closing = closing.clone();
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = closing.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    closing.cancel();
    conns.close();
    if tokio::time::timeout(args.drain_timeout(), conns.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: some HTTP connections did not close in time");
    }
    Ok(())
}

/// Every route of the public listener.
pub fn router(shared: Arc<Shared>) -> Router {
    let mut app = Router::new()
        .route("/ws/private/", get(ws_private))
        .route("/ws/private", get(ws_private))
        .route("/ws/public/", get(ws_public))
        .route("/ws/public", get(ws_public))
        .merge(api::router(shared.clone()))
        .merge(pages::router())
        .with_state(shared);
    for (name, value) in pages::SECURITY_HEADERS {
        app = app.layer(SetResponseHeaderLayer::if_not_present(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        ));
    }
    app
}

#[derive(Deserialize)]
struct WsParams {
    v: Option<String>,
}

async fn ws_private(
    ws: WebSocketUpgrade,
    State(shared): State<Arc<Shared>>,
    Query(p): Query<WsParams>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    meter: Option<Extension<Arc<WireMeter>>>,
    headers: HeaderMap,
) -> Response {
    let meter = meter.map_or_else(WireMeter::unwired, |Extension(m)| m);
    guarded_upgrade(ws, shared, Page::Private, p, peer, meter, &headers)
}

async fn ws_public(
    ws: WebSocketUpgrade,
    State(shared): State<Arc<Shared>>,
    Query(p): Query<WsParams>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    meter: Option<Extension<Arc<WireMeter>>>,
    headers: HeaderMap,
) -> Response {
    let meter = meter.map_or_else(WireMeter::unwired, |Extension(m)| m);
    guarded_upgrade(ws, shared, Page::Public, p, peer, meter, &headers)
}

/// Refuses the upgrade when a check of [`guard`] fails or the gateway is
/// at a connection cap ([`caps`]), counted by reason; upgrades otherwise.
fn guarded_upgrade(
    ws: WebSocketUpgrade,
    shared: Arc<Shared>,
    page: Page,
    p: WsParams,
    peer: SocketAddr,
    meter: Arc<WireMeter>,
    headers: &HeaderMap,
) -> Response {
    let refused = |reason: &str| shared.metrics.refused.with_label_values(&[reason]).inc();
    if !shared.origins.allows(headers) {
        refused("origin");
        return guard::forbidden_origin();
    }
    let version = if p.v.as_deref() == Some("2") {
        Version::V2
    } else {
        Version::V1
    };
    let cap = match shared.caps.admit(page, version) {
        Ok(cap) => cap,
        Err(why) => {
            refused(why.as_str());
            return why.response();
        }
    };
    let ip = shared.ip_limits.client_ip(peer.ip(), headers);
    match shared.ip_limits.admit(ip) {
        Ok(slot) => upgrade(ws, shared, page, version, (slot, cap), meter),
        Err(why) => {
            refused(why.as_str());
            why.response()
        }
    }
}

/// The most a v1 public connection's write buffer may hold: room for a
/// `delay_times` roster of several hundred thousand clients.
const MAX_WRITE_BUFFER_V1: usize = 256 << 20;

/// The most any other connection's write buffer may hold: a v2 page's
/// largest frame is a full view (at most 200 rows and its own, some
/// 100 KB with the longest names).
const MAX_WRITE_BUFFER: usize = 1 << 20;

/// Bytes a v1 public connection gathers before writing: its event frames
/// are small and many.
const V1_WRITE_THRESHOLD: usize = 16 * 1024;

fn upgrade(
    ws: WebSocketUpgrade,
    shared: Arc<Shared>,
    page: Page,
    version: Version,
    slot: (guard::IpSlot, caps::CapSlot),
    meter: Arc<WireMeter>,
) -> Response {
    let max_frame = shared.args.max_frame_bytes as usize;
    // Small buffers keep an idle connection cheap (tungstenite's defaults
    // are 128 KiB per connection; the write buffer only grows while queued
    // broadcasts are written, and a ping's pong is flushed at once); frames
    // larger than our own limit but
    // within tungstenite's still get a proper 1009 from us.
    // The read buffer is allocated up front and zero-filled before every
    // read: 1 KiB holds dozens of client messages (a ping is ~30 bytes), and
    // tungstenite grows it for a larger frame. 4 KiB cost 3 KiB more per
    // idle connection (bench/idle_memory.sh).
    // The write buffer must hold the largest frame we send, and keeps its
    // capacity afterwards (tungstenite never shrinks it): for a v2 page a
    // full view, O(view) whatever the room; for a v1 public page the whole
    // roster (`delay_times`, about 60 bytes per client), which is why v1
    // public connections have a cap of their own. Slow readers are bounded
    // by the outbound queue and the write timeout, not by this cap.
    // Frames gathered before a write (`--ws-write-buffer-bytes`, default
    // 0) are what made that capacity grow past the largest frame: with a
    // 16 KiB threshold, a few ~6.5 KB view frames queued behind each other
    // left a 26 KiB buffer in every connection (docs/benchmarks.md,
    // "Memory per public connection"). v1 public pages receive many small
    // event frames and keep 16 KiB: their buffer is roster-sized anyway.
    let (max_write, write_threshold) = if page == Page::Public && version == Version::V1 {
        (MAX_WRITE_BUFFER_V1, V1_WRITE_THRESHOLD)
    } else {
        (MAX_WRITE_BUFFER, shared.args.ws_write_buffer_bytes as usize)
    };
    let args = &shared.args;
    let max_ws_frame = (max_frame * 4).max(64 * 1024);
    // From here on every frame the client sends is charged as it arrives.
    meter.arm(
        connection::Budget::new(
            args.max_messages_per_second,
            args.max_bytes_per_second,
            args.max_frame_bytes,
        ),
        max_ws_frame as u64,
    );
    ws.read_buffer_size(1024)
        .write_buffer_size(write_threshold)
        .max_write_buffer_size(max_write)
        .max_frame_size(max_ws_frame)
        .max_message_size(max_ws_frame)
        .on_upgrade(move |socket| {
            let tracker = shared.tracker.clone();
            tracker.track_future(async move {
                connection::serve(socket, meter, shared, page, version).await;
                // The address's count drops when the connection ends (or
                // with the closure, if the upgrade never completes).
                drop(slot);
            })
        })
}
