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
    CLOSE_TIMEOUT, CONNECT_TIMEOUT, DELAY_OBSERVERS, DRAIN, PING_TIMEOUT, POKE_RECYCLE,
    POKE_RENAME, RENAME_INTERVAL, Shared,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Commands counted in a fixed array, so the common case allocates nothing.
const KNOWN_COMMANDS: [&str; 12] = [
    "welcome",
    "pong",
    "roster",
    "connect",
    "disconnect",
    "change_name",
    "delays",
    "delay_times",
    "error",
    "view",
    "view_update",
    "server_rtt",
];
/// Distinct unknown commands tracked per client before lumping into `_other`,
/// so a misbehaving server cannot grow our memory without bound.
pub(crate) const MAX_OTHER_COMMANDS: usize = 32;
/// Prefix of the names the renamer sets; the rest is the send time in µs.
const RENAME_PREFIX: &str = "lg-";
/// Fractional part of the golden ratio: spreads the clients' first pings
/// evenly over one interval so they do not fire in lockstep.
const GOLDEN: f64 = 0.618_033_988_749_894_9;
/// The start of every frame as the gateway (and echo-server) writes it:
/// `command` first, so a frame's command is read without parsing it.
const COMMAND_PREFIX: &str = r#"{"command":""#;
/// Most rows an observer remembers the last delay of (a view holds at
/// most 200; churn brings new ids): beyond it the memory starts over.
const MAX_SEEN: usize = 4096;

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

/// The one field of an `error` frame loadgen reads (docs/protocol.md,
/// "Errors"); error frames are rare, so parsing them costs nothing.
#[derive(Deserialize)]
struct ErrorFrame<'a> {
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
}

/// The `code` of an `error` frame; [`NO_CODE`] when it has no string code
/// or is not JSON.
fn error_code(text: &str) -> Cow<'_, str> {
    serde_json::from_str::<ErrorFrame<'_>>(text)
        .ok()
        .and_then(|frame| frame.code)
        .unwrap_or(Cow::Borrowed(NO_CODE))
}

/// How an `error` frame without a string `code` is counted.
pub(crate) const NO_CODE: &str = "_none";

/// The frames that carry other clients' delays, parsed only by delay
/// observers: `delays` (`delay_times`: id -> entry), `view` (`rows`: a
/// list of rows) and `view_update` (`rows`: id -> row); docs/protocol.md.
#[derive(Deserialize)]
struct DelayCarrier {
    delay_times: Option<HashMap<String, serde_json::Value>>,
    rows: Option<serde_json::Value>,
}

impl DelayCarrier {
    /// Every (id, delay) pair the frame holds; rows without a numeric
    /// `delay_time` (no sample yet: `null`, or v1's `"-"`) are left out.
    fn delays(&self) -> Vec<(&str, f64)> {
        let number = |entry: &serde_json::Value| entry.get("delay_time")?.as_f64();
        let mut out = Vec::new();
        if let Some(map) = &self.delay_times {
            out.extend(
                map.iter()
                    .filter_map(|(id, e)| Some((id.as_str(), number(e)?))),
            );
        }
        match &self.rows {
            Some(serde_json::Value::Array(rows)) => out.extend(
                rows.iter()
                    .filter_map(|row| Some((row.get("channel_name")?.as_str()?, number(row)?))),
            ),
            Some(serde_json::Value::Object(rows)) => out.extend(
                rows.iter()
                    .filter_map(|(id, row)| Some((id.as_str(), number(row)?))),
            ),
            _ => {}
        }
        out
    }
}

/// The command of a frame that starts with [`COMMAND_PREFIX`].
fn command_of(text: &str) -> Option<&str> {
    let rest = text.strip_prefix(COMMAND_PREFIX)?;
    Some(&rest[..rest.find('"')?])
}

/// The `seq` of a `pong` frame, read without parsing the frame (its keys
/// are `command`, `seq`, `server_time`, no nested objects).
fn pong_seq(text: &str) -> Option<u64> {
    let rest = &text[text.find(r#""seq":"#)? + 6..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Frames received by one client, by command.
#[derive(Default)]
struct FrameCounts {
    known: [u64; KNOWN_COMMANDS.len()],
    other: BTreeMap<String, u64>,
}

/// Adds `n` to `key`'s count in `map`, or to `_other`'s once `map` holds
/// `max` other keys: a misbehaving server cannot grow it without bound.
pub(crate) fn count_bounded(map: &mut BTreeMap<String, u64>, key: &str, n: u64, max: usize) {
    if let Some(count) = map.get_mut(key) {
        *count += n;
    } else if map.len() < max {
        map.insert(key.to_owned(), n);
    } else {
        *map.entry("_other".to_owned()).or_default() += n;
    }
}

impl FrameCounts {
    fn add(&mut self, command: &str) {
        if let Some(i) = KNOWN_COMMANDS.iter().position(|known| *known == command) {
            self.known[i] += 1;
        } else {
            count_bounded(&mut self.other, command, 1, MAX_OTHER_COMMANDS);
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
    /// `--churn` picked this client: close and connect again as a new one.
    Recycled,
    /// The server closed (with this code) or the connection broke (1006).
    Closed(u16),
}

/// Connects client `index` and drives it until the run stops or the server
/// drops it; with `--churn` it closes and connects again as a new client
/// when asked. Every outcome ends up in `shared`'s counters.
pub(crate) async fn run(index: u32, shared: Arc<Shared>) {
    let mut replacement = false;
    // One identity per simulated browser, kept across churn reconnects.
    let device = shared.config.device.then(|| {
        format!(
            r#"{{"command":"device","secret":"{}"}}"#,
            services::ids::new_token()
        )
    });
    loop {
        let Some(mut ws) = connect(index, &shared, replacement).await else {
            return;
        };
        // Before any ping, so before the first sample (the gateway reads
        // frames only after its welcome). A failed send shows up as the
        // closed socket the drive below reports.
        if let Some(frame) = &device {
            let _ = send(&mut ws, frame.clone()).await;
        }
        let target = index as usize % shared.urls.len();
        let mut client = Client::new(index, target, Arc::clone(&shared));
        let outcome = client.drive(&mut ws).await;
        let recycled = matches!(outcome, Outcome::Recycled);
        match outcome {
            Outcome::Stopped | Outcome::Recycled => {
                let reason = if recycled {
                    "loadgen churn"
                } else {
                    "loadgen done"
                };
                let _ = timeout(CLOSE_TIMEOUT, async {
                    let close = CloseFrame {
                        code: CloseCode::Normal,
                        reason: reason.into(),
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
        if !recycled {
            return;
        }
        // The server saw this close as churn even when the run stops during
        // its handshake; only the replacement is skipped then.
        shared.counters.churn_closed.fetch_add(1, Relaxed);
        if shared.stop.is_cancelled() {
            return;
        }
        replacement = true;
    }
}

/// Opens client `index`'s connection; `None` when the run stopped first or
/// the connect failed (counted: a first connect in the ramp's tally, a
/// replacement in the churn's).
async fn connect(index: u32, shared: &Shared, replacement: bool) -> Option<Ws> {
    let target = index as usize % shared.urls.len();
    let connect = timeout(
        CONNECT_TIMEOUT,
        connect_async_with_config(shared.urls[target].as_str(), Some(client_ws_config()), true),
    );
    let connected = tokio::select! {
        biased;
        () = shared.stop.cancelled() => {
            if !replacement {
                shared.attempt_finished();
            }
            return None;
        }
        result = connect => result,
    };
    let error = match connected {
        Ok(Ok((ws, _response))) => {
            if replacement {
                shared.reconnected();
            } else {
                shared.connected();
            }
            return Some(ws);
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no handshake within {CONNECT_TIMEOUT:?}"),
    };
    if replacement {
        shared.counters.churn_failed.fetch_add(1, Relaxed);
    } else {
        shared.connect_failed(&error);
    }
    None
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
    /// Renames sent on `--renames`' behalf.
    renames: u64,
    /// Delay observers: the last delay seen per other client.
    seen: HashMap<String, f64>,
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
            renames: 0,
            seen: HashMap::new(),
            frames: FrameCounts::default(),
            shared,
        }
    }

    async fn drive(&mut self, ws: &mut Ws) -> Outcome {
        let stop = self.shared.stop.clone();
        let shared = Arc::clone(&self.shared);
        let poke = shared.pokes.get(self.index as usize);
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
                flags = wait_poke(poke), if poke.is_some() && self.stopping.is_none() => {
                    self.on_poke(ws, flags).await
                }
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

    /// `--churn` and `--renames` asked for something. Delay observers and
    /// the renamer of `--measure-broadcast` stay (they measure).
    async fn on_poke(&mut self, ws: &mut Ws, flags: u8) -> ControlFlow<Outcome> {
        if flags & POKE_RENAME != 0 {
            self.renames += 1;
            let text = format!(
                r#"{{"command":"change_name","name":"lg{}-{}"}}"#,
                self.index, self.renames
            );
            send(ws, text).await?;
            self.shared.counters.renames.fetch_add(1, Relaxed);
        }
        if flags & POKE_RECYCLE != 0 && !self.delay_observer && self.next_rename.is_none() {
            return ControlFlow::Break(Outcome::Recycled);
        }
        ControlFlow::Continue(())
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
        let in_window = self.shared.in_window();
        if in_window {
            let n = text.len() as u64;
            self.shared.counters.bytes_received.fetch_add(n, Relaxed);
        }
        // Most frames are only counted: their command is read from the
        // prefix, never parsed (the cheap path 10,000 clients need).
        let command = command_of(text);
        match command {
            Some("pong") => {
                self.frames.add("pong");
                return self.on_pong(ws, pong_seq(text), received_at).await;
            }
            Some("error") => {
                self.frames.add("error");
                self.shared.server_error(&error_code(text));
                return ControlFlow::Continue(());
            }
            Some(carrier @ ("delays" | "view" | "view_update")) => {
                if carrier == "delays" && in_window {
                    let n = text.len() as u64;
                    self.shared.counters.delays_bytes.fetch_add(n, Relaxed);
                }
                self.frames.add(carrier);
                if self.delay_observer && in_window {
                    self.on_delays(text);
                }
                return ControlFlow::Continue(());
            }
            Some("welcome") => {}
            Some("change_name") if self.measure_broadcast => {}
            Some(other) => {
                self.frames.add(other);
                return ControlFlow::Continue(());
            }
            None => {}
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
            "error" => self.shared.server_error(&error_code(text)),
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
    /// Records, for every other client's value in a frame that carries
    /// delays, how long ago it was sent (the value is its send time, see
    /// `DELAY_CLOCK_US`). A `view` frame repeats the rows of its window
    /// whether they changed or not, and a row may scroll into the window
    /// long after its last report: so a value counts only when the
    /// observer saw that client before with another value, i.e. exactly
    /// when an update reached it.
    fn on_delays(&mut self, text: &str) {
        let Ok(frame) = serde_json::from_str::<DelayCarrier>(text) else {
            return;
        };
        let now = unix_micros() % DELAY_CLOCK_US;
        if self.seen.len() > MAX_SEEN {
            self.seen.clear();
        }
        for (id, sent) in frame.delays() {
            if self.channel_name.as_deref() == Some(id) {
                continue;
            }
            match self.seen.insert(id.to_owned(), sent) {
                Some(before) if before != sent => {
                    self.shared.record_delay(delay_age(now, sent));
                }
                _ => {}
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

/// The next poke of this client's [`Poke`](crate::runner::Poke); never
/// without one.
async fn wait_poke(poke: Option<&crate::runner::Poke>) -> u8 {
    match poke {
        Some(poke) => poke.wait().await,
        None => std::future::pending().await,
    }
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
        let delays = |text: &str| {
            let frame: DelayCarrier = serde_json::from_str(text).unwrap();
            let mut pairs: Vec<(String, f64)> = frame
                .delays()
                .into_iter()
                .map(|(id, d)| (id.to_owned(), d))
                .collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            pairs
        };
        let a = |d: f64| ("a".to_owned(), d);
        assert_eq!(
            delays(
                r#"{"command":"delays","delay_times":{"a":{"delay_time":12.5,"median":1},"b":{"delay_time":"-"}}}"#
            ),
            [a(12.5)]
        );
        assert_eq!(
            delays(
                r#"{"command":"view","total":3,"rows":[{"channel_name":"a","delay_time":12.5},{"channel_name":"b","delay_time":null}],"me":{"channel_name":"c","delay_time":1}}"#
            ),
            [a(12.5)]
        );
        assert_eq!(
            delays(
                r#"{"command":"view_update","total":3,"rows":{"a":{"channel_name":"a","delay_time":12.5}}}"#
            ),
            [a(12.5)]
        );
        assert!(delays(r#"{"command":"view_update","total":3}"#).is_empty());
    }

    #[test]
    fn commands_and_pong_seqs_read_without_parsing() {
        assert_eq!(command_of(r#"{"command":"pong","seq":7}"#), Some("pong"));
        assert_eq!(
            command_of(r#"{"command":"view_update","total":1}"#),
            Some("view_update")
        );
        assert_eq!(command_of(r#"{"seq":7,"command":"pong"}"#), None);
        assert_eq!(command_of(r#"{"command":"pong"#), None);
        assert_eq!(
            pong_seq(r#"{"command":"pong","seq":17,"server_time":1}"#),
            Some(17)
        );
        assert_eq!(pong_seq(r#"{"command":"pong","seq":9}"#), Some(9));
        assert_eq!(pong_seq(r#"{"command":"pong"}"#), None);
    }

    #[test]
    fn error_frames_are_counted_by_code() {
        assert_eq!(
            error_code(r#"{"command":"error","code":"busy","detail":"x"}"#),
            "busy"
        );
        assert_eq!(error_code(r#"{"command":"error","detail":"x"}"#), NO_CODE);
        assert_eq!(error_code(r#"{"command":"error","code":7}"#), NO_CODE);
        assert_eq!(error_code(r#"{"command":"error""#), NO_CODE);
        let mut codes = BTreeMap::new();
        for i in 0..5 {
            count_bounded(&mut codes, &format!("c{i}"), 1, 3);
        }
        count_bounded(&mut codes, "c0", 2, 3);
        assert_eq!(codes["c0"], 3);
        assert_eq!(codes["_other"], 2);
        assert_eq!(codes.len(), 4);
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
