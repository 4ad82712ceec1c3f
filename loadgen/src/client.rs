//! One simulated browser: connects, pings on its schedule with one ping in
//! flight, optionally reports `delay_time` and renames itself, counts every
//! frame the server sends, answers keepalive Pings, and closes with 1000
//! when the run stops.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

use crate::cli::Protocol;
use crate::runner::{
    CLOSE_TIMEOUT, CONNECT_TIMEOUT, DELAY_OBSERVERS, DRAIN, PING_TIMEOUT, RENAME_INTERVAL, Shared,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Commands counted in a fixed array, so the common case allocates nothing.
const KNOWN_COMMANDS: [&str; 9] = [
    "welcome",
    "pong",
    "roster",
    "connect",
    "disconnect",
    "change_name",
    "delays",
    "delay_times",
    "error",
];
/// Distinct unknown commands tracked per client before lumping into `_other`,
/// so a misbehaving server cannot grow our memory without bound.
const MAX_OTHER_COMMANDS: usize = 32;
/// Prefix of the names the renamer sets; the rest is the send time in µs.
const RENAME_PREFIX: &str = "lg-";
/// Fractional part of the golden ratio: spreads the clients' first pings
/// evenly over one interval so they do not fire in lockstep.
const GOLDEN: f64 = 0.618_033_988_749_894_9;
/// The start of a `roster` frame as the gateway writes it.
const ROSTER_PREFIX: &str = r#"{"command":"roster""#;
/// The start of a `delays` frame as the gateway writes it.
const DELAYS_PREFIX: &str = r#"{"command":"delays""#;

/// With `--measure-delays`, `delay_time` is the send time in Unix µs modulo
/// this (60 s, the highest delay the server accepts), sent as ms.
const DELAY_CLOCK_US: u64 = 60_000_000;

/// Client-side WebSocket buffers: small, since 10,000 clients of the
/// default 128 KiB read buffer would need over a gigabyte.
fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// The fields of a server frame the client looks at; everything else is
/// skipped by serde.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow)]
    command: Cow<'a, str>,
    seq: Option<u64>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel_name: Option<Cow<'a, str>>,
}

/// A `delays` frame, parsed only by delay observers.
#[derive(Deserialize)]
struct DelaysFrame<'a> {
    #[serde(borrow)]
    delay_times: HashMap<Cow<'a, str>, DelayEntry>,
}

#[derive(Deserialize)]
struct DelayEntry {
    /// A number, or `"-"` for a client without a sample.
    delay_time: serde_json::Value,
}

/// Frames received by one client, by command.
#[derive(Default)]
struct FrameCounts {
    known: [u64; KNOWN_COMMANDS.len()],
    other: BTreeMap<String, u64>,
}

impl FrameCounts {
    fn add(&mut self, command: &str) {
        if let Some(i) = KNOWN_COMMANDS.iter().position(|known| *known == command) {
            self.known[i] += 1;
        } else if self.other.len() < MAX_OTHER_COMMANDS || self.other.contains_key(command) {
            *self.other.entry(command.to_owned()).or_default() += 1;
        } else {
            *self.other.entry("_other".to_owned()).or_default() += 1;
        }
    }

    fn into_entries(self) -> impl Iterator<Item = (String, u64)> {
        KNOWN_COMMANDS
            .iter()
            .zip(self.known)
            .filter(|(_, n)| *n > 0)
            .map(|(command, n)| ((*command).to_owned(), n))
            .chain(self.other)
    }
}

#[derive(Clone, Copy)]
struct InFlight {
    seq: u64,
    sent_at: Instant,
    /// Sent inside the measurement window, so its RTT is a sample.
    counted: bool,
}

/// How the connection loop ended.
enum Outcome {
    /// The run stopped; we close the connection.
    Stopped,
    /// The server closed (with this code) or the connection broke (1006).
    Closed(u16),
}

/// Connects client `index` and drives it until the run stops or the server
/// drops it. Every outcome ends up in `shared`'s counters.
pub(crate) async fn run(index: u32, shared: Arc<Shared>) {
    let target = index as usize % shared.urls.len();
    let connect = timeout(
        CONNECT_TIMEOUT,
        connect_async_with_config(shared.urls[target].as_str(), Some(client_ws_config()), true),
    );
    let connected = tokio::select! {
        biased;
        () = shared.stop.cancelled() => {
            shared.attempt_finished();
            return;
        }
        result = connect => result,
    };
    let mut ws = match connected {
        Ok(Ok((ws, _response))) => ws,
        Ok(Err(error)) => return shared.connect_failed(&error),
        Err(_) => {
            return shared.connect_failed(&format_args!("no handshake within {CONNECT_TIMEOUT:?}"));
        }
    };
    shared.connected();

    let mut client = Client::new(index, target, Arc::clone(&shared));
    match client.drive(&mut ws).await {
        Outcome::Stopped => {
            let _ = timeout(CLOSE_TIMEOUT, async {
                let close = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "loadgen done".into(),
                };
                if ws.close(Some(close)).await.is_ok() {
                    // Read until the server's close reply ends the stream.
                    while let Some(Ok(_)) = ws.next().await {}
                }
            })
            .await;
        }
        Outcome::Closed(code) => {
            shared.closed_by_server(code);
            // Let tungstenite flush its close reply, if it owes one.
            let _ = timeout(CLOSE_TIMEOUT, async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
    }
    shared.client_finished(client.frames.into_entries());
}

struct Client {
    shared: Arc<Shared>,
    v2: bool,
    pinging: bool,
    send_delay: bool,
    measure_broadcast: bool,
    /// Index of the endpoint this client connected to.
    target: usize,
    /// Send the send time as `delay_time` (`--measure-delays`).
    clock_delays: bool,
    /// Parse `delays` frames and record their latency.
    delay_observer: bool,
    /// Own id, from `welcome`.
    channel_name: Option<String>,
    /// This client's number.
    index: u32,
    /// `--watch`: how many to watch, until the watch is sent.
    watch_pending: Option<u32>,
    /// Time between pings; `None` for closed loop.
    interval: Option<Duration>,
    seq: u64,
    in_flight: Option<InFlight>,
    next_ping: Instant,
    /// Only for the designated renamer.
    next_rename: Option<Instant>,
    /// Drain deadline, once the run stopped.
    stopping: Option<Instant>,
    frames: FrameCounts,
}

impl Client {
    fn new(index: u32, target: usize, shared: Arc<Shared>) -> Self {
        let config = &shared.config;
        let now = Instant::now();
        let interval = (config.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / config.rate));
        let phase = (f64::from(index) * GOLDEN).fract();
        let renamer = config.measure_broadcast
            && shared
                .renamer_claimed
                .compare_exchange(false, true, Relaxed, Relaxed)
                .is_ok();
        if renamer {
            shared.renamer_target.store(target, Relaxed);
        }
        Self {
            v2: config.protocol == Protocol::V2,
            pinging: !config.idle,
            send_delay: config.send_delay,
            measure_broadcast: config.measure_broadcast,
            target,
            clock_delays: config.measure_delays,
            delay_observer: config.measure_delays && index < DELAY_OBSERVERS,
            channel_name: None,
            index,
            watch_pending: config.watch,
            interval,
            seq: 0,
            in_flight: None,
            next_ping: now + interval.map_or(Duration::ZERO, |iv| iv.mul_f64(phase)),
            next_rename: renamer.then(|| now + RENAME_INTERVAL),
            stopping: None,
            frames: FrameCounts::default(),
            shared,
        }
    }

    async fn drive(&mut self, ws: &mut Ws) -> Outcome {
        let stop = self.shared.stop.clone();
        loop {
            if let Some(deadline) = self.stopping
                && (self.in_flight.is_none() || Instant::now() >= deadline)
            {
                return Outcome::Stopped;
            }
            let wake = self.next_wake();
            let flow = tokio::select! {
                biased;
                () = stop.cancelled(), if self.stopping.is_none() => {
                    self.stopping = Some(Instant::now() + DRAIN);
                    ControlFlow::Continue(())
                }
                message = ws.next() => match message {
                    Some(Ok(message)) => self.on_message(ws, message).await,
                    Some(Err(_)) | None => ControlFlow::Break(Outcome::Closed(1006)),
                },
                () = sleep_until(wake) => self.on_timer(ws).await,
            };
            if let ControlFlow::Break(outcome) = flow {
                return outcome;
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(3600);
        if let Some(in_flight) = &self.in_flight {
            wake = wake.min(in_flight.sent_at + PING_TIMEOUT);
        }
        if let Some(deadline) = self.stopping {
            return wake.min(deadline);
        }
        if self.pinging && self.in_flight.is_none() {
            wake = wake.min(self.next_ping);
        }
        if let Some(at) = self.next_rename {
            wake = wake.min(at);
        }
        wake
    }

    async fn on_timer(&mut self, ws: &mut Ws) -> ControlFlow<Outcome> {
        let now = Instant::now();
        if self
            .in_flight
            .is_some_and(|in_flight| now >= in_flight.sent_at + PING_TIMEOUT)
        {
            self.shared.counters.timeouts.fetch_add(1, Relaxed);
            self.in_flight = None;
        }
        if self.stopping.is_some() {
            return ControlFlow::Continue(());
        }
        if let Some(at) = self.next_rename.filter(|at| now >= *at) {
            self.next_rename = Some((at + RENAME_INTERVAL).max(now));
            if self.shared.in_window() {
                let text = format!(
                    r#"{{"command":"change_name","name":"{RENAME_PREFIX}{}"}}"#,
                    unix_micros()
                );
                send(ws, text).await?;
                self.shared.counters.renames_sent.fetch_add(1, Relaxed);
            }
        }
        if self.pinging && self.in_flight.is_none() && now >= self.next_ping {
            self.send_ping(ws).await?;
        }
        ControlFlow::Continue(())
    }

    async fn send_ping(&mut self, ws: &mut Ws) -> ControlFlow<Outcome> {
        self.seq += 1;
        let text = if self.v2 {
            format!(r#"{{"command":"ping","seq":{}}}"#, self.seq)
        } else {
            r#"{"command":"ping"}"#.to_owned()
        };
        let counted = self.shared.in_window();
        let sent_at = Instant::now();
        send(ws, text).await?;
        self.in_flight = Some(InFlight {
            seq: self.seq,
            sent_at,
            counted,
        });
        if counted {
            self.shared.counters.pings_sent.fetch_add(1, Relaxed);
        }
        // Keep the schedule, but never build up a backlog after slow pongs.
        // Closed loop: the pong handler makes the next ping due at once.
        if let Some(interval) = self.interval {
            self.next_ping = (self.next_ping + interval).max(sent_at);
        }
        ControlFlow::Continue(())
    }

    async fn on_message(&mut self, ws: &mut Ws, message: Message) -> ControlFlow<Outcome> {
        match message {
            Message::Text(text) => self.on_text(ws, text.as_str()).await,
            Message::Binary(_) => {
                self.frames.add("_binary");
                ControlFlow::Continue(())
            }
            // tungstenite queues the Pong reply itself; it goes out with the
            // next read or write.
            Message::Ping(_) => {
                self.frames.add("_ws_ping");
                ControlFlow::Continue(())
            }
            Message::Pong(_) | Message::Frame(_) => ControlFlow::Continue(()),
            Message::Close(frame) => {
                ControlFlow::Break(Outcome::Closed(frame.map_or(1005, |f| u16::from(f.code))))
            }
        }
    }

    async fn on_text(&mut self, ws: &mut Ws, text: &str) -> ControlFlow<Outcome> {
        let received_at = Instant::now();
        // The large frames, unless this client reads them: counted by their
        // prefix (the server puts `command` first), not parsed.
        if text.starts_with(ROSTER_PREFIX) {
            self.frames.add("roster");
            return ControlFlow::Continue(());
        }
        if text.starts_with(DELAYS_PREFIX) {
            if self.shared.in_window() {
                let n = text.len() as u64;
                self.shared.counters.delays_bytes.fetch_add(n, Relaxed);
            }
            if !self.delay_observer {
                self.frames.add("delays");
                return ControlFlow::Continue(());
            }
        }
        let Ok(frame) = serde_json::from_str::<Incoming<'_>>(text) else {
            self.frames.add("_unparsed");
            return ControlFlow::Continue(());
        };
        self.frames.add(&frame.command);
        match frame.command.as_ref() {
            "pong" => return self.on_pong(ws, frame.seq, received_at).await,
            "change_name" if self.measure_broadcast => {
                let sent_micros = frame
                    .name
                    .as_deref()
                    .and_then(|name| name.strip_prefix(RENAME_PREFIX))
                    .and_then(|micros| micros.parse::<u64>().ok());
                if let Some(sent_micros) = sent_micros {
                    let same = self.shared.renamer_target.load(Relaxed) == self.target;
                    self.shared
                        .record_broadcast(unix_micros().saturating_sub(sent_micros), same);
                }
            }
            "welcome" => {
                self.channel_name = frame.channel_name.map(Cow::into_owned);
                if self.watch_pending.is_some()
                    && let Some(id) = &self.channel_name
                {
                    self.shared.add_id(id);
                }
            }
            "delays" if self.delay_observer && self.shared.in_window() => {
                self.on_delays(text);
            }
            "error" => {
                self.shared.counters.server_errors.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    async fn on_pong(
        &mut self,
        ws: &mut Ws,
        seq: Option<u64>,
        received_at: Instant,
    ) -> ControlFlow<Outcome> {
        let matched = self
            .in_flight
            .filter(|in_flight| !self.v2 || seq == Some(in_flight.seq));
        let Some(in_flight) = matched else {
            self.shared.counters.unexpected_pongs.fetch_add(1, Relaxed);
            return ControlFlow::Continue(());
        };
        self.in_flight = None;
        let rtt = received_at - in_flight.sent_at;
        if let Some(n) = self.watch_pending
            && self.shared.in_window()
        {
            self.watch_pending = None;
            let ids =
                self.shared
                    .ids_to_watch(self.index, n as usize, self.channel_name.as_deref());
            let text = serde_json::json!({"command": "watch", "channel_names": ids}).to_string();
            send(ws, text).await?;
        }
        self.shared.counters.pongs.fetch_add(1, Relaxed);
        if in_flight.counted {
            self.shared.counters.pings.fetch_add(1, Relaxed);
            self.shared
                .record_rtt(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX));
        }
        if self.interval.is_none() {
            self.next_ping = received_at;
        }
        if self.send_delay && self.stopping.is_none() {
            let ms = if self.clock_delays {
                (unix_micros() % DELAY_CLOCK_US) as f64 / 1000.0
            } else {
                rtt.as_secs_f64() * 1000.0
            };
            // The original pages send whole milliseconds; v2 pages send the
            // fraction and the seq of the ping it belongs to.
            let text = if self.v2 {
                format!(
                    r#"{{"command":"delay_time","delay_time":{ms:.3},"seq":{}}}"#,
                    in_flight.seq
                )
            } else {
                format!(r#"{{"command":"delay_time","delay_time":{ms:.0}}}"#)
            };
            send(ws, text).await?;
        }
        ControlFlow::Continue(())
    }
}

impl Client {
    /// Records, for every other client's value in a `delays` frame, how long
    /// ago it was sent (the value is its send time, see `DELAY_CLOCK_US`).
    fn on_delays(&self, text: &str) {
        let Ok(frame) = serde_json::from_str::<DelaysFrame<'_>>(text) else {
            return;
        };
        let now = unix_micros() % DELAY_CLOCK_US;
        for (id, entry) in &frame.delay_times {
            if self.channel_name.as_deref() == Some(id.as_ref()) {
                continue;
            }
            if let Some(sent) = entry.delay_time.as_f64() {
                self.shared.record_delay(delay_age(now, sent));
            }
        }
    }
}

/// Microseconds from `sent_ms` (a `delay_time` holding a send time modulo
/// 60 s, in ms) to `now_us` (modulo 60 s, in µs), across the wrap.
fn delay_age(now_us: u64, sent_ms: f64) -> u64 {
    let sent_us = (sent_ms * 1000.0).round() as i64;
    let clock = DELAY_CLOCK_US as i64;
    (now_us as i64 - sent_us).rem_euclid(clock) as u64
}

/// Sends a text frame; a failed or stalled write ends the connection.
async fn send(ws: &mut Ws, text: String) -> ControlFlow<Outcome> {
    match timeout(PING_TIMEOUT, ws.send(Message::text(text))).await {
        Ok(Ok(())) => ControlFlow::Continue(()),
        Ok(Err(_)) | Err(_) => ControlFlow::Break(Outcome::Closed(1006)),
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_counts_bound_unknown_commands() {
        let mut counts = FrameCounts::default();
        counts.add("pong");
        counts.add("pong");
        counts.add("welcome");
        for i in 0..MAX_OTHER_COMMANDS + 5 {
            counts.add(&format!("x{i}"));
        }
        counts.add("x0");
        let map: BTreeMap<String, u64> = counts.into_entries().collect();
        assert_eq!(map["pong"], 2);
        assert_eq!(map["welcome"], 1);
        assert_eq!(map["x0"], 2);
        assert_eq!(map["_other"], 5);
        assert!(!map.contains_key("roster"));
    }

    #[test]
    fn delay_ages_wrap_around_the_minute() {
        assert_eq!(delay_age(1_500_000, 1000.0), 500_000);
        assert_eq!(delay_age(100_000, 59_900.0), 200_000);
        assert_eq!(delay_age(2_000, 1.5), 500);
        let frame: DelaysFrame<'_> = serde_json::from_str(
            r#"{"command":"delays","delay_times":{"a":{"delay_time":12.5,"median":1},"b":{"delay_time":"-"}}}"#,
        )
        .unwrap();
        assert_eq!(frame.delay_times["a"].delay_time.as_f64(), Some(12.5));
        assert_eq!(frame.delay_times["b"].delay_time.as_f64(), None);
    }

    #[test]
    fn incoming_frames_parse_with_extra_keys() {
        let frame: Incoming<'_> = serde_json::from_str(
            r#"{"command":"change_name","channel_name":"abc","name":"lg-17","extra":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(frame.command, "change_name");
        assert_eq!(frame.name.as_deref(), Some("lg-17"));
        assert_eq!(frame.seq, None);
        let frame: Incoming<'_> =
            serde_json::from_str(r#"{"command":"pong","seq":7,"server_time":1}"#).unwrap();
        assert_eq!(frame.seq, Some(7));
        assert!(serde_json::from_str::<Incoming<'_>>(r#"{"seq":1}"#).is_err());
    }
}
