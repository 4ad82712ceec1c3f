//! One WebSocket connection, from upgrade to close, on one task.
//!
//! [`serve`] opens the connection (records the client, seats a public one
//! in the room, sends the v2 welcome and roster), then runs a loop whose
//! every branch is one call: a client frame (`Connection::on_frame`, which
//! dispatches each command to its own handler in `commands.rs`), a queued
//! broadcast, a keepalive tick, or the stop signal. Every step returns
//! `Result<(), Ending>`: the first [`Ending`] is the close frame sent.
//!
//! The ping path takes no lock and touches no bus: a pong is written on
//! this task at once.

mod commands;
mod ending;
mod pongs;
mod rate;
pub mod wire;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use prometheus::{Histogram, IntCounter};
use services::ids::{new_client_id, new_token, token_digest};
use services::messages::{ClientRecord, RosterClient};
use services::protocol::{ErrorCode, Page, ProtocolError, ServerMessage, Version};
use services::stats::RollingStats;
use tokio::sync::mpsc;
use tokio::time::Interval;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use ending::Ending;
use pongs::Pongs;
pub use rate::{Budget, TokenBucket};
use wire::WireMeter;

use crate::room::Seat;
use crate::state::Shared;

/// Longest a single write may wait for a client to take data.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most queued frames written with one flush.
const MAX_WRITE_BATCH: usize = 256;

/// Serves one upgraded connection until it ends.
///
/// `meter` charges the client's frames (docs/security.md, "Per-connection
/// budgets"); the caller has armed it.
pub async fn serve(
    socket: WebSocket,
    meter: Arc<WireMeter>,
    shared: Arc<Shared>,
    page: Page,
    version: Version,
) {
    let metrics = shared.metrics.clone();
    let labels = [page.as_str(), version.as_str()];
    metrics.connections.with_label_values(&labels).inc();
    metrics.connects.with_label_values(&labels).inc();
    let mut conn = Connection::new(socket, meter, shared, page, version);
    // The one-time steps and the rarer commands run boxed: a task's future
    // is as large as its largest await, and every idle connection holds one
    // (docs/benchmarks.md, "Memory per idle connection").
    let ending = match Box::pin(conn.open()).await {
        Ok(()) => conn.serve_until_ended().await,
        Err(ending) => ending,
    };
    Box::pin(conn.leave()).await;
    Box::pin(conn.close(ending)).await;
    metrics.connections.with_label_values(&labels).dec();
    metrics
        .disconnects
        .with_label_values(&[&ending.code().to_string()])
        .inc();
}

/// The metric children the ping path touches, looked up once.
struct HotMetrics {
    ping_in: IntCounter,
    pong_out: IntCounter,
    pings: IntCounter,
    ping_duration: Histogram,
}

/// A connection's state. Only its own task touches it.
struct Connection {
    socket: WebSocket,
    shared: Arc<Shared>,
    page: Page,
    version: Version,
    id: String,
    name: String,
    /// Its seat in the public room (public pages only).
    seat: Option<Seat>,
    /// Broadcasts for this client (public pages only; a private one
    /// allocates no queue: a tokio channel costs about 1.5 KiB).
    queue: Option<mpsc::Receiver<Utf8Bytes>>,
    /// Public pages: a child of the gateway's shutdown token, cancelled
    /// alone when the client's queue overflows. Private pages: the shutdown
    /// token itself.
    kick: CancellationToken,
    /// Resolves when `kick` (or the shutdown) is cancelled; created once,
    /// not per message.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    stats: RollingStats,
    samples: u64,
    /// Pongs sent that no sample used yet: every sample needs one.
    pongs: Pongs,
    /// Every frame and byte from the client counts against its budget,
    /// continuation and control frames included.
    meter: Arc<WireMeter>,
    /// Renames count against it too.
    renames: TokenBucket,
    /// The client's record until its first sample carries it to the
    /// recorder: nothing is written for a client that never sends one.
    unrecorded: Option<ClientRecord>,
    keepalive: Interval,
    last_heard: Instant,
    /// The keepalive Ping in flight: its number and when it left.
    ping_sent: Option<(u64, Instant)>,
    pings_sent: u64,
    pong_buf: String,
    hot: HotMetrics,
}

impl Connection {
    fn new(
        socket: WebSocket,
        meter: Arc<WireMeter>,
        shared: Arc<Shared>,
        page: Page,
        version: Version,
    ) -> Self {
        let id = new_client_id();
        // Only a public client has a queue that can overflow: a private one
        // stops with the gateway alone, and needs no token of its own.
        let kick = match page {
            Page::Public => shared.shutdown.child_token(),
            Page::Private => shared.shutdown.clone(),
        };
        let args = &shared.args;
        let mut keepalive = tokio::time::interval_at(
            tokio::time::Instant::now() + args.keepalive_interval(),
            args.keepalive_interval(),
        );
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let m = &shared.metrics;
        let hot = HotMetrics {
            ping_in: m.messages_in.with_label_values(&["ping"]),
            pong_out: m.messages_out.with_label_values(&["pong"]),
            pings: m.pings.with_label_values(&[version.as_str()]),
            ping_duration: m.ping_duration.with_label_values(&[] as &[&str]),
        };
        Self {
            socket,
            page,
            version,
            name: id.clone(),
            id,
            seat: None,
            queue: None,
            stopped: Box::pin(kick.clone().cancelled_owned()),
            kick,
            stats: RollingStats::default(),
            samples: 0,
            pongs: Pongs::default(),
            meter,
            renames: args.rename_budget(),
            unrecorded: None,
            keepalive,
            last_heard: Instant::now(),
            ping_sent: None,
            pings_sent: 0,
            pong_buf: String::with_capacity(64),
            hot,
            shared,
        }
    }

    fn public(&self) -> bool {
        self.page == Page::Public
    }

    fn v2(&self) -> bool {
        self.version == Version::V2
    }

    /// Prepares the client's record (sent with its first sample), seats a
    /// public one, and sends the v2 welcome (and, public, its first view).
    async fn open(&mut self) -> Result<(), Ending> {
        let shared = self.shared.clone();
        let token = self.v2().then(new_token);
        let now_ms = services::unix_ms();
        let record = ClientRecord {
            channel_name: self.id.clone(),
            public: self.public(),
            token_digest: token.as_deref().map(token_digest),
            gateway: shared.gateway_id.clone(),
            connected_at_us: now_ms * 1000,
            device: None,
        };
        self.unrecorded = Some(record);

        if self.public() {
            let (tx, rx) = mpsc::channel(shared.args.outbound_queue as usize);
            let me = RosterClient {
                channel_name: self.id.clone(),
                name: self.name.clone(),
                gateway: shared.gateway_id.clone(),
                connected_at_ms: now_ms,
                stats: None,
            };
            self.queue = Some(rx);
            self.seat = Some(shared.room.join(me, self.v2(), tx, self.kick.clone()).await);
        }
        if let Some(token) = token {
            let welcome = ServerMessage::Welcome {
                channel_name: self.id.clone(),
                name: self.name.clone(),
                gateway: shared.gateway_id.clone(),
                ping_interval_ms: shared.args.ping_interval_ms,
                ping_timeout_ms: shared.args.ping_timeout_ms(),
                token,
                page: self.page,
            };
            self.send(Utf8Bytes::from(welcome.to_json()), "welcome")
                .await?;
            // A public v2 page's first view is already in its queue
            // (`Room::join`), written right after this.
        }
        Ok(())
    }

    /// Runs the loop until something ends the connection.
    async fn serve_until_ended(&mut self) -> Ending {
        loop {
            if let Err(ending) = self.step().await {
                return ending;
            }
        }
    }

    /// Waits for the next thing to do and does it.
    async fn step(&mut self) -> Result<(), Ending> {
        tokio::select! {
            biased;
            _ = &mut self.stopped => Err(Ending::stopped(self.shared.shutdown.is_cancelled())),
            frame = self.socket.recv() => self.on_frame(frame).await,
            queued = recv_queued(&mut self.queue) => self.on_queued(queued).await,
            _ = self.keepalive.tick() => self.on_keepalive().await,
        }
    }

    /// One frame (or the end of the stream) from the client.
    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, axum::Error>>,
    ) -> Result<(), Ending> {
        let received = Instant::now();
        let msg = match frame {
            None => return Err(Ending::Lost),
            Some(Err(e)) => {
                // A read the meter failed: its reason, not "lost".
                return Err(match self.meter.tripped() {
                    Some(trip) => trip.ending(),
                    None => Ending::from_ws_error(e),
                });
            }
            Some(Ok(msg)) => msg,
        };
        self.last_heard = received;
        let len = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
            Message::Close(_) => return Err(Ending::ClientClosed),
        };
        // Every frame counts, control frames included: a Ping flood costs
        // the gateway as much as a ping command flood. The meter counted
        // each frame as it arrived (fragments too); this charges the
        // message only when no meter reads the socket.
        if !self.meter.admit_message(received, len) {
            return Err(Ending::TooFast);
        }
        if len > self.shared.args.max_frame_bytes as usize {
            return Err(Ending::TooBig);
        }
        match msg {
            // tungstenite answers Pings itself.
            Message::Ping(_) | Message::Close(_) => Ok(()),
            Message::Pong(payload) => Box::pin(self.on_pong(&payload)).await,
            Message::Text(text) => self.on_text(text, received).await,
            Message::Binary(_) => {
                let e = ProtocolError {
                    code: ErrorCode::BadJson,
                    detail: "binary frames are not supported; send JSON text".into(),
                };
                Box::pin(self.send_error(&e)).await
            }
        }
    }

    /// The client's answer to a keepalive Ping: the server-side RTT.
    async fn on_pong(&mut self, payload: &[u8]) -> Result<(), Ending> {
        let Some((n, sent)) = self.ping_sent else {
            return Ok(());
        };
        if payload != n.to_be_bytes() {
            return Ok(());
        }
        self.ping_sent = None;
        let rtt = sent.elapsed();
        self.shared
            .metrics
            .server_rtt
            .with_label_values(&[] as &[&str])
            .observe(rtt.as_secs_f64());
        if self.v2() {
            let rtt_ms = (rtt.as_secs_f64() * 1_000_000.0).round() / 1000.0;
            let frame = ServerMessage::ServerRtt { rtt_ms };
            self.send(Utf8Bytes::from(frame.to_json()), "server_rtt")
                .await?;
        }
        Ok(())
    }

    /// Queued broadcasts: this one and whatever else is queued, written
    /// with one flush (a crowd joining costs one syscall, not many).
    async fn on_queued(&mut self, first: Option<Utf8Bytes>) -> Result<(), Ending> {
        let (Some(first), Some(rx)) = (first, self.queue.as_mut()) else {
            // The hub let go of the queue: no more broadcasts.
            self.queue = None;
            return Ok(());
        };
        let mut batch = Vec::with_capacity(rx.len() + 1);
        batch.push(first);
        while batch.len() < MAX_WRITE_BATCH {
            match rx.try_recv() {
                Ok(frame) => batch.push(frame),
                Err(_) => break,
            }
        }
        let socket = &mut self.socket;
        let write = async move {
            for frame in batch {
                socket.feed(Message::Text(frame)).await?;
            }
            socket.flush().await
        };
        bounded_write(write, &mut self.stopped, &self.shared).await
    }

    /// Sends a keepalive Ping, or ends a client silent too long.
    async fn on_keepalive(&mut self) -> Result<(), Ending> {
        if self.last_heard.elapsed() >= self.shared.args.idle_timeout() {
            return Err(Ending::Idle);
        }
        self.pings_sent += 1;
        self.ping_sent = Some((self.pings_sent, Instant::now()));
        let payload = Bytes::copy_from_slice(&self.pings_sent.to_be_bytes());
        self.write(Message::Ping(payload)).await
    }

    /// Sends an error frame; the connection stays open.
    async fn send_error(&mut self, e: &ProtocolError) -> Result<(), Ending> {
        self.shared
            .metrics
            .errors
            .with_label_values(&[e.code.as_str()])
            .inc();
        self.send(Utf8Bytes::from(e.to_frame()), "error").await
    }

    /// Sends one text frame, counted under `command`.
    async fn send(&mut self, frame: Utf8Bytes, command: &str) -> Result<(), Ending> {
        self.shared
            .metrics
            .messages_out
            .with_label_values(&[command])
            .inc();
        self.write(Message::Text(frame)).await
    }

    /// Writes one message; see [`bounded_write`].
    async fn write(&mut self, msg: Message) -> Result<(), Ending> {
        let write = self.socket.send(msg);
        bounded_write(write, &mut self.stopped, &self.shared).await
    }

    /// Leaves the room (public pages).
    async fn leave(&mut self) {
        if let Some(seat) = self.seat.take() {
            self.shared.room.leave(seat).await;
        }
    }

    /// Sends the close frame, then reads until the client's close arrives
    /// (or a second passes), so unread input does not turn the close into
    /// a reset.
    async fn close(self, ending: Ending) {
        let mut socket = self.socket;
        let frame = CloseFrame {
            code: ending.code(),
            reason: Utf8Bytes::from_static(ending.reason()),
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
}

/// Runs a write unless the connection is stopped meanwhile or the client
/// takes no data for [`WRITE_TIMEOUT`]: a client that stopped reading must
/// not pin the task. A write that completes at once (the usual case: a
/// small frame to a reading client) costs no timer.
async fn bounded_write(
    write: impl Future<Output = Result<(), axum::Error>>,
    stopped: &mut Pin<Box<WaitForCancellationFutureOwned>>,
    shared: &Shared,
) -> Result<(), Ending> {
    let mut write = std::pin::pin!(write);
    if let Some(done) = (&mut write).now_or_never() {
        return done.map_err(|_| Ending::Lost);
    }
    tokio::select! {
        done = tokio::time::timeout(WRITE_TIMEOUT, write) => match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Ending::Lost),
        },
        _ = stopped => Err(Ending::stopped(shared.shutdown.is_cancelled())),
    }
}

/// The next queued broadcast; never resolves for a client without a queue.
async fn recv_queued(rx: &mut Option<mpsc::Receiver<Utf8Bytes>>) -> Option<Utf8Bytes> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
