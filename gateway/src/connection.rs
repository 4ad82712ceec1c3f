//! One WebSocket connection, from upgrade to close, on one task.
//!
//! The task answers pings itself (no bus, no shared lock on that path),
//! writes broadcasts from its bounded outbound queue, sends keepalive Ping
//! frames, and enforces the frame-size, rate and idle limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use services::ids::{new_client_id, new_token, token_digest};
use services::messages::{ClientRecord, GatewayUpdate, RosterClient, SampleRecord};
use services::protocol::{
    ClientCommand, ErrorCode, PONG_V1, Page, ProtocolError, ServerMessage, Version, close_code,
    parse_client, write_pong,
};
use services::stats::RollingStats;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::persist::RecordItem;
use crate::state::Shared;

/// Longest a single write may wait for a client to take data.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most queued frames written with one flush.
const MAX_WRITE_BATCH: usize = 256;

/// Why the connection ended, as a close code and reason.
struct Ending(u16, &'static str);

/// Serves one upgraded connection until it ends.
pub async fn serve(socket: WebSocket, shared: Arc<Shared>, page: Page, version: Version) {
    let metrics = &shared.metrics;
    let labels = [page.as_str(), version.as_str()];
    metrics.connections.with_label_values(&labels).inc();
    metrics.connects.with_label_values(&labels).inc();
    let mut conn = Connection::new(shared.clone(), page, version);
    let code = conn.run(socket).await;
    conn.leave().await;
    metrics.connections.with_label_values(&labels).dec();
    metrics
        .disconnects
        .with_label_values(&[&code.to_string()])
        .inc();
}

struct Connection {
    shared: Arc<Shared>,
    page: Page,
    version: Version,
    id: String,
    name: String,
    hub_key: Option<u64>,
    stats: RollingStats,
    samples: u64,
    kick: CancellationToken,
}

impl Connection {
    fn new(shared: Arc<Shared>, page: Page, version: Version) -> Self {
        let id = new_client_id();
        Self {
            shared,
            page,
            version,
            name: id.clone(),
            id,
            hub_key: None,
            stats: RollingStats::default(),
            samples: 0,
            kick: CancellationToken::new(),
        }
    }

    fn public(&self) -> bool {
        self.page == Page::Public
    }

    fn v2(&self) -> bool {
        self.version == Version::V2
    }

    /// Runs the connection; returns the close code it ended with.
    async fn run(&mut self, mut socket: WebSocket) -> u16 {
        let shared = self.shared.clone();
        let args = &shared.args;
        // Only public clients get broadcasts: a private one allocates no
        // queue (a tokio channel costs about 1.5 KiB before its first frame).
        let (out_tx, mut out_rx) = if self.public() {
            let (tx, rx) = mpsc::channel::<Utf8Bytes>(args.outbound_queue as usize);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let token = self.v2().then(new_token);
        let now_ms = services::unix_ms();

        let _ = shared
            .records
            .send(RecordItem::Client(ClientRecord {
                channel_name: self.id.clone(),
                public: self.public(),
                token_digest: token.as_deref().map(token_digest),
                gateway: shared.gateway_id.clone(),
                connected_at_us: now_ms * 1000,
            }))
            .await;

        if let Some(out_tx) = out_tx {
            self.hub_key = Some(shared.hub.register(self.v2(), out_tx, self.kick.clone()));
            let me = RosterClient {
                channel_name: self.id.clone(),
                name: self.name.clone(),
                gateway: shared.gateway_id.clone(),
                connected_at_ms: now_ms,
                stats: None,
            };
            shared
                .mirror
                .lock()
                .expect("mirror lock")
                .upsert_local(me.clone());
            shared
                .report(|local| {
                    local.clients.insert(me.channel_name.clone(), me.clone());
                    Some(GatewayUpdate::Connect { client: me })
                })
                .await;
        }

        if let Some(token) = token {
            let welcome = ServerMessage::Welcome {
                channel_name: self.id.clone(),
                name: self.name.clone(),
                gateway: shared.gateway_id.clone(),
                ping_interval_ms: args.ping_interval_ms,
                ping_timeout_ms: args.ping_timeout_ms(),
                token,
                page: self.page,
            };
            if !self
                .send(&mut socket, Utf8Bytes::from(welcome.to_json()), "welcome")
                .await
            {
                return close_code::GOING_AWAY;
            }
            if self.public() {
                let roster = shared.mirror.lock().expect("mirror lock").v2_frame();
                if !self.send(&mut socket, roster, "roster").await {
                    return close_code::GOING_AWAY;
                }
            }
        }

        let ending = self.main_loop(&mut socket, &mut out_rx).await;
        close(socket, ending.0, ending.1).await;
        ending.0
    }

    async fn main_loop(
        &mut self,
        socket: &mut WebSocket,
        out_rx: &mut Option<mpsc::Receiver<Utf8Bytes>>,
    ) -> Ending {
        let shared = self.shared.clone();
        let args = &shared.args;
        let max_frame = args.max_frame_bytes as usize;
        let max_rate = args.max_messages_per_second;
        let idle_timeout = args.idle_timeout();
        let mut keepalive = tokio::time::interval_at(
            tokio::time::Instant::now() + args.keepalive_interval(),
            args.keepalive_interval(),
        );
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut window_start = Instant::now();
        let mut window_count: u32 = 0;
        let mut ping_sent: Option<(u64, Instant)> = None;
        let mut ping_counter: u64 = 0;
        let mut pong_buf = String::with_capacity(64);
        let ping_metric = shared
            .metrics
            .pings
            .with_label_values(&[self.version.as_str()]);
        let ping_in = shared.metrics.messages_in.with_label_values(&["ping"]);
        let pong_out = shared.metrics.messages_out.with_label_values(&["pong"]);
        let ping_duration = shared
            .metrics
            .ping_duration
            .with_label_values(&[] as &[&str]);
        let shutdown = shared.shutdown.clone();
        let kick = self.kick.clone();
        let mut queue_open = self.public();

        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ending(close_code::RESTART, "service restart"),
                _ = kick.cancelled() => {
                    return Ending(close_code::TRY_AGAIN_LATER, "too slow: outbound queue overflowed");
                }
                incoming = socket.recv() => {
                    let received = Instant::now();
                    let msg = match incoming {
                        None => return Ending(close_code::GOING_AWAY, ""),
                        Some(Err(e)) => {
                            let text = e.to_string();
                            if text.contains("Space limit exceeded") || text.contains("too long") {
                                return Ending(close_code::TOO_BIG, "frame too large");
                            }
                            return Ending(close_code::GOING_AWAY, "");
                        }
                        Some(Ok(m)) => m,
                    };
                    last_heard = received;
                    match msg {
                        Message::Ping(_) => continue,
                        Message::Pong(payload) => {
                            if let Some((n, sent)) = ping_sent
                                && payload.as_ref() == n.to_be_bytes()
                            {
                                    ping_sent = None;
                                    let rtt = sent.elapsed();
                                    shared.metrics.server_rtt.with_label_values(&[] as &[&str]).observe(rtt.as_secs_f64());
                                    if self.v2() {
                                        let f = ServerMessage::ServerRtt { rtt_ms: round3(rtt.as_secs_f64() * 1000.0) };
                                        if !self.send(socket, Utf8Bytes::from(f.to_json()), "server_rtt").await {
                                            return Ending(close_code::GOING_AWAY, "");
                                        }
                                    }
                                }
                                                        continue;
                        }
                        Message::Close(_) => return Ending(close_code::NORMAL, ""),
                        Message::Text(_) | Message::Binary(_) => {}
                    }
                    if received.duration_since(window_start) >= Duration::from_secs(1) {
                        window_start = received;
                        window_count = 0;
                    }
                    window_count += 1;
                    if window_count > max_rate {
                        return Ending(close_code::POLICY, "too many messages");
                    }
                    let text = match msg {
                        Message::Text(t) => t,
                        Message::Binary(b) => {
                            if b.len() > max_frame {
                                return Ending(close_code::TOO_BIG, "frame too large");
                            }
                            let e = ProtocolError { code: ErrorCode::BadJson, detail: "binary frames are not supported; send JSON text".into() };
                            if !self.send_error(socket, &e).await {
                                return Ending(close_code::GOING_AWAY, "");
                            }
                            continue;
                        }
                        _ => unreachable!("control frames handled above"),
                    };
                    if text.len() > max_frame {
                        return Ending(close_code::TOO_BIG, "frame too large");
                    }
                    match parse_client(text.as_str()) {
                        Ok(ClientCommand::Ping { seq }) => {
                            // The hot path: answered here and now.
                            ping_in.inc();
                            let frame = match (self.version, seq) {
                                (Version::V1, None) => Utf8Bytes::from_static(PONG_V1),
                                (Version::V1, Some(_)) => {
                                    write_pong(&mut pong_buf, seq, None);
                                    Utf8Bytes::from(pong_buf.clone())
                                }
                                (Version::V2, _) => {
                                    write_pong(&mut pong_buf, seq, Some(services::unix_ms()));
                                    Utf8Bytes::from(pong_buf.clone())
                                }
                            };
                            if !self.send_raw(socket, Message::Text(frame)).await {
                                return Ending(close_code::GOING_AWAY, "");
                            }
                            pong_out.inc();
                            ping_metric.inc();
                            ping_duration.observe(received.elapsed().as_secs_f64());
                        }
                        Ok(ClientCommand::DelayTime { delay_ms, seq }) => {
                            shared.metrics.messages_in.with_label_values(&["delay_time"]).inc();
                            if !self.on_delay(socket, delay_ms, seq).await {
                                return Ending(close_code::GOING_AWAY, "");
                            }
                        }
                        Ok(ClientCommand::ChangeName { name }) => {
                            shared.metrics.messages_in.with_label_values(&["change_name"]).inc();
                            if !self.public() {
                                let e = ProtocolError {
                                    code: ErrorCode::UnknownCommand,
                                    detail: "change_name is only available on the public page".into(),
                                };
                                if !self.send_error(socket, &e).await {
                                    return Ending(close_code::GOING_AWAY, "");
                                }
                                continue;
                            }
                            self.rename(name).await;
                        }
                        Ok(ClientCommand::Watch { channel_names }) => {
                            shared.metrics.messages_in.with_label_values(&["watch"]).inc();
                            // Only delays depend on it: a no-op for v1 and
                            // private pages, which get none.
                            if let Some(key) = self.hub_key {
                                shared.hub.set_watch(key, channel_names.map(|ids| ids.into_iter().collect()));
                            }
                        }
                        Err(e) => {
                            shared.metrics.messages_in.with_label_values(&["invalid"]).inc();
                            if !self.send_error(socket, &e).await {
                                return Ending(close_code::GOING_AWAY, "");
                            }
                        }
                    }
                }
                frame = recv_queued(out_rx), if queue_open => match frame {
                    Some(frame) => {
                        let rx = out_rx.as_mut().expect("a frame came from the queue");
                        // Write whatever else is queued too, with one flush:
                        // bursts (a crowd joining) cost one syscall, not many.
                        let mut batch = Vec::with_capacity(rx.len() + 1);
                        batch.push(frame);
                        while batch.len() < MAX_WRITE_BATCH {
                            match rx.try_recv() {
                                Ok(f) => batch.push(f),
                                Err(_) => break,
                            }
                        }
                        if !self.send_batch(socket, batch).await {
                            return Ending(close_code::GOING_AWAY, "");
                        }
                    }
                    None => queue_open = false,
                },
                _ = keepalive.tick() => {
                    if last_heard.elapsed() >= idle_timeout {
                        return Ending(close_code::GOING_AWAY, "idle timeout");
                    }
                    ping_counter += 1;
                    ping_sent = Some((ping_counter, Instant::now()));
                    let payload = Bytes::copy_from_slice(&ping_counter.to_be_bytes());
                    if !self.send_raw(socket, Message::Ping(payload)).await {
                        return Ending(close_code::GOING_AWAY, "");
                    }
                }
            }
        }
    }

    async fn on_delay(&mut self, socket: &mut WebSocket, delay_ms: f64, seq: Option<u64>) -> bool {
        let shared = self.shared.clone();
        shared
            .metrics
            .client_delay
            .with_label_values(&[self.page.as_str()])
            .observe(delay_ms / 1000.0);
        let stats = self.stats.push(delay_ms);
        self.samples += 1;
        let sample = SampleRecord {
            channel_name: self.id.clone(),
            n: self.samples,
            seq,
            at_us: services::unix_us(),
            delay_ms,
            public: self.public(),
        };
        // Bounded: if the batcher ever falls this far behind, this client
        // waits rather than the sample being lost.
        let _ = shared.records.send(RecordItem::Sample(sample)).await;
        if !self.public() {
            return true;
        }
        shared.note_delay(&self.id, stats);
        if self.version == Version::V1 {
            let frame = shared.mirror.lock().expect("mirror lock").v1_frame();
            return self.send(socket, frame, "delay_times").await;
        }
        true
    }

    async fn rename(&mut self, name: String) {
        self.name = name.clone();
        let id = self.id.clone();
        self.shared
            .report(|local| {
                if let Some(c) = local.clients.get_mut(&id) {
                    c.name = name.clone();
                }
                Some(GatewayUpdate::Rename {
                    channel_name: id,
                    name,
                })
            })
            .await;
    }

    /// Leaves the roster and the hub.
    async fn leave(&mut self) {
        if let Some(key) = self.hub_key.take() {
            self.shared.hub.unregister(key);
            let id = self.id.clone();
            self.shared
                .report(|local| {
                    local.clients.remove(&id);
                    local.dirty.remove(&id);
                    Some(GatewayUpdate::Disconnect { channel_name: id })
                })
                .await;
        }
    }

    async fn send_error(&self, socket: &mut WebSocket, e: &ProtocolError) -> bool {
        self.shared
            .metrics
            .errors
            .with_label_values(&[e.code.as_str()])
            .inc();
        self.send(socket, Utf8Bytes::from(e.to_frame()), "error")
            .await
    }

    async fn send(&self, socket: &mut WebSocket, frame: Utf8Bytes, command: &str) -> bool {
        self.shared
            .metrics
            .messages_out
            .with_label_values(&[command])
            .inc();
        self.send_raw(socket, Message::Text(frame)).await
    }

    /// Writes queued broadcast frames with a single flush, under the same
    /// rules as [`Connection::send_raw`].
    async fn send_batch(&self, socket: &mut WebSocket, batch: Vec<Utf8Bytes>) -> bool {
        let write = async {
            for frame in batch {
                socket.feed(Message::Text(frame)).await?;
            }
            socket.flush().await
        };
        tokio::select! {
            r = tokio::time::timeout(WRITE_TIMEOUT, write) => matches!(r, Ok(Ok(()))),
            _ = self.kick.cancelled() => false,
            _ = self.shared.shutdown.cancelled() => false,
        }
    }

    /// Sends one frame unless the client is kicked, the gateway drains, or
    /// the client takes no data for [`WRITE_TIMEOUT`] meanwhile: a client
    /// that stopped reading must not pin the task.
    async fn send_raw(&self, socket: &mut WebSocket, msg: Message) -> bool {
        tokio::select! {
            r = tokio::time::timeout(WRITE_TIMEOUT, socket.send(msg)) => matches!(r, Ok(Ok(()))),
            _ = self.kick.cancelled() => false,
            _ = self.shared.shutdown.cancelled() => false,
        }
    }
}

/// The next queued broadcast; never resolves for a client without a queue.
async fn recv_queued(rx: &mut Option<mpsc::Receiver<Utf8Bytes>>) -> Option<Utf8Bytes> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends a close frame, then reads until the client's close arrives (or a
/// second passes), so unread input does not turn the close into a reset.
async fn close(mut socket: WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let linger = async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(m)) = socket.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
    let _ = socket.close().await;
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
