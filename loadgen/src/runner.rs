//! One run from start to summary: connects at the ramp rate, opens the
//! measurement window once every client connected or failed, stops after
//! `--duration` (or on a signal), drains, and folds every client's counters
//! into a [`Summary`].

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::Config;
use crate::client;
use crate::summary::{
    BroadcastStats, ChurnStats, DelayStats, ErrorCounts, LatencyStats, SelfUsage, Summary,
    new_histogram, per_second,
};
use crate::usage;

/// A ping with no pong for this long counts as a timeout.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP connect plus WebSocket handshake must finish within this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the window ends, how long clients wait for in-flight pongs.
pub(crate) const DRAIN: Duration = Duration::from_secs(2);
/// How long a client waits for the server's close frame.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the designated client renames itself with `--measure-broadcast`.
pub(crate) const RENAME_INTERVAL: Duration = Duration::from_secs(1);
/// With `--measure-delays`, clients `0..DELAY_OBSERVERS` (spread over the
/// targets like every client) parse `delays` frames and record latencies.
pub(crate) const DELAY_OBSERVERS: u32 = 16;

/// Live counters, updated by every client and read by the progress line and
/// the summary. Relaxed ordering: each is an independent tally.
#[derive(Default)]
pub(crate) struct Counters {
    /// Clients whose connect attempt finished, either way.
    pub(crate) attempted: AtomicU64,
    /// Clients whose handshake succeeded.
    pub(crate) connected: AtomicU64,
    /// Connections open right now.
    pub(crate) open: AtomicU64,
    pub(crate) connect_failed: AtomicU64,
    /// Every answered ping, window or not (for the progress line).
    pub(crate) pongs: AtomicU64,
    /// Pings sent in the window.
    pub(crate) pings_sent: AtomicU64,
    /// Pings sent in the window and answered.
    pub(crate) pings: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) unexpected_pongs: AtomicU64,
    pub(crate) server_errors: AtomicU64,
    pub(crate) closed_by_server: AtomicU64,
    pub(crate) renames_sent: AtomicU64,
    /// Bytes of the `delays` frames received in the window.
    pub(crate) delays_bytes: AtomicU64,
    /// `--churn`: connections closed to be replaced by a new client.
    pub(crate) churn_closed: AtomicU64,
    /// `--churn`: replacement connections that succeeded / failed.
    pub(crate) churn_connected: AtomicU64,
    pub(crate) churn_failed: AtomicU64,
    /// `--renames`: renames sent.
    pub(crate) renames: AtomicU64,
    /// Bytes of every text frame received in the window, all clients.
    pub(crate) bytes_received: AtomicU64,
}

/// Asks client `i` to do something from outside its task (`--churn`,
/// `--renames`): a flag word and a wake-up, one per client.
#[derive(Default)]
pub(crate) struct Poke {
    flags: AtomicU8,
    notify: Notify,
}

/// [`Poke`] flag: close and connect again as a new client.
pub(crate) const POKE_RECYCLE: u8 = 1;
/// [`Poke`] flag: rename yourself.
pub(crate) const POKE_RENAME: u8 = 2;

impl Poke {
    fn send(&self, flag: u8) {
        self.flags.fetch_or(flag, Relaxed);
        self.notify.notify_one();
    }

    /// Waits for a poke and returns (and clears) its flags.
    pub(crate) async fn wait(&self) -> u8 {
        loop {
            let flags = self.flags.swap(0, Relaxed);
            if flags != 0 {
                return flags;
            }
            self.notify.notified().await;
        }
    }
}

/// State shared by the runner and every client task.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// The first endpoint, for messages.
    pub(crate) url: String,
    /// Every endpoint; client `i` connects to `urls[i % urls.len()]`.
    pub(crate) urls: Vec<String>,
    /// Cancelled when the window ends (or on a signal): clients stop
    /// pinging, drain and close.
    pub(crate) stop: CancellationToken,
    /// Set when the window opens; pings sent before it are warm-up.
    pub(crate) window_start: OnceLock<Instant>,
    /// Taken by the first client to connect when measuring broadcasts: it is
    /// the one that renames itself.
    pub(crate) renamer_claimed: AtomicBool,
    /// Index into `urls` of the renamer's endpoint; `usize::MAX` until claimed.
    pub(crate) renamer_target: AtomicUsize,
    pub(crate) counters: Counters,
    /// Woken by the client whose attempt completes the ramp.
    all_attempted: Notify,
    connect_error_logged: AtomicBool,
    rtt: Mutex<Histogram<u64>>,
    broadcast: Mutex<Histogram<u64>>,
    /// Broadcast latency at receivers on the renamer's endpoint / another one.
    broadcast_same: Mutex<Histogram<u64>>,
    broadcast_other: Mutex<Histogram<u64>>,
    delays: Mutex<Histogram<u64>>,
    /// Every simulated client's id, in the order their welcomes came.
    ids: Mutex<Vec<String>>,
    /// One per client with `--churn` or `--renames`, else empty.
    pub(crate) pokes: Vec<Poke>,
    closed_by_server: Mutex<BTreeMap<u16, u64>>,
    /// `error` frames by `code`, at most [`MAX_ERROR_CODES`] codes.
    server_error_codes: Mutex<BTreeMap<String, u64>>,
    frames: Mutex<BTreeMap<String, u64>>,
}

/// Distinct `error` frame codes counted before the rest are lumped into
/// `_other` (the gateway has about ten; docs/protocol.md, "Errors").
const MAX_ERROR_CODES: usize = 32;

/// Locks a mutex that only guards counters, ignoring poisoning (a panicked
/// holder cannot leave a tally inconsistent).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new(config: Config) -> Self {
        let urls = config.ws_urls();
        let pokes = if config.churn > 0.0 || config.renames > 0.0 {
            (0..config.clients).map(|_| Poke::default()).collect()
        } else {
            Vec::new()
        };
        Self {
            url: urls[0].clone(),
            urls,
            config,
            stop: CancellationToken::new(),
            window_start: OnceLock::new(),
            renamer_claimed: AtomicBool::new(false),
            renamer_target: AtomicUsize::new(usize::MAX),
            counters: Counters::default(),
            all_attempted: Notify::new(),
            connect_error_logged: AtomicBool::new(false),
            rtt: Mutex::new(new_histogram()),
            broadcast: Mutex::new(new_histogram()),
            broadcast_same: Mutex::new(new_histogram()),
            broadcast_other: Mutex::new(new_histogram()),
            delays: Mutex::new(new_histogram()),
            ids: Mutex::new(Vec::new()),
            pokes,
            closed_by_server: Mutex::new(BTreeMap::new()),
            server_error_codes: Mutex::new(BTreeMap::new()),
            frames: Mutex::new(BTreeMap::new()),
        }
    }

    /// Registers a client's id (from its welcome) for `--watch`.
    pub(crate) fn add_id(&self, id: &str) {
        lock(&self.ids).push(id.to_owned());
    }

    /// Up to `n` ids of other simulated clients for client `index` to
    /// watch: a run of consecutive ones, starting at a place that depends
    /// on `index`, without `own`.
    pub(crate) fn ids_to_watch(&self, index: u32, n: usize, own: Option<&str>) -> Vec<String> {
        let ids = lock(&self.ids);
        if ids.is_empty() {
            return Vec::new();
        }
        let start = (u64::from(index).wrapping_mul(2_654_435_761) % ids.len() as u64) as usize;
        ids.iter()
            .cycle()
            .skip(start)
            .take(ids.len())
            .filter(|id| Some(id.as_str()) != own)
            .take(n)
            .cloned()
            .collect()
    }

    /// Whether the measurement window is open right now.
    pub(crate) fn in_window(&self) -> bool {
        self.window_start.get().is_some() && !self.stop.is_cancelled()
    }

    /// Marks one connect attempt as finished, waking the runner after the last.
    pub(crate) fn attempt_finished(&self) {
        let done = self.counters.attempted.fetch_add(1, Relaxed) + 1;
        if done == u64::from(self.config.clients) {
            self.all_attempted.notify_one();
        }
    }

    pub(crate) fn connected(&self) {
        self.counters.connected.fetch_add(1, Relaxed);
        self.counters.open.fetch_add(1, Relaxed);
        self.attempt_finished();
    }

    /// A replacement connection (`--churn`) succeeded.
    pub(crate) fn reconnected(&self) {
        self.counters.churn_connected.fetch_add(1, Relaxed);
        self.counters.open.fetch_add(1, Relaxed);
    }

    /// Counts a failed connect; the first one is also printed, since a
    /// wrong URL otherwise only shows up as a number.
    pub(crate) fn connect_failed(&self, error: &dyn fmt::Display) {
        self.counters.connect_failed.fetch_add(1, Relaxed);
        if !self.connect_error_logged.swap(true, Relaxed) {
            eprintln!(
                "loadgen: connect to {} failed: {error} (further failures are only counted)",
                self.url
            );
        }
        self.attempt_finished();
    }

    pub(crate) fn closed_by_server(&self, code: u16) {
        self.counters.closed_by_server.fetch_add(1, Relaxed);
        *lock(&self.closed_by_server).entry(code).or_default() += 1;
    }

    /// Counts an `error` frame with its `code`.
    pub(crate) fn server_error(&self, code: &str) {
        self.counters.server_errors.fetch_add(1, Relaxed);
        client::count_bounded(
            &mut lock(&self.server_error_codes),
            code,
            1,
            MAX_ERROR_CODES,
        );
    }

    pub(crate) fn record_rtt(&self, micros: u64) {
        lock(&self.rtt).saturating_record(micros.max(1));
    }

    /// Records a rename's delivery latency at a receiver connected to
    /// `same_target`: the renamer's endpoint, or another one.
    pub(crate) fn record_broadcast(&self, micros: u64, same_target: bool) {
        lock(&self.broadcast).saturating_record(micros.max(1));
        let split = if same_target {
            &self.broadcast_same
        } else {
            &self.broadcast_other
        };
        lock(split).saturating_record(micros.max(1));
    }

    /// Records how late one `delay_time` value showed up in a `delays` frame.
    pub(crate) fn record_delay(&self, micros: u64) {
        lock(&self.delays).saturating_record(micros.max(1));
    }

    /// Called once per client when it is done: closes its gauge slot and
    /// merges its frame counts.
    pub(crate) fn client_finished(&self, frames: impl IntoIterator<Item = (String, u64)>) {
        self.counters.open.fetch_sub(1, Relaxed);
        let mut all = lock(&self.frames);
        for (command, n) in frames {
            *all.entry(command).or_default() += n;
        }
    }

    fn live_errors(&self) -> u64 {
        let c = &self.counters;
        [
            &c.connect_failed,
            &c.timeouts,
            &c.unexpected_pongs,
            &c.server_errors,
            &c.closed_by_server,
        ]
        .iter()
        .map(|counter| counter.load(Relaxed))
        .sum()
    }
}

/// The once-a-second progress line on stderr.
struct Progress {
    enabled: bool,
    started: Instant,
    last_at: Instant,
    last_pongs: u64,
}

impl Progress {
    fn report(&mut self, shared: &Shared, phase: &str) {
        let now = Instant::now();
        let pongs = shared.counters.pongs.load(Relaxed);
        let rate = per_second(pongs - self.last_pongs, (now - self.last_at).as_secs_f64());
        (self.last_at, self.last_pongs) = (now, pongs);
        if self.enabled {
            eprintln!(
                "loadgen: {phase:<5} {:>6.1}s  connected {}/{}  pings/s {rate:.0}  errors {}",
                (now - self.started).as_secs_f64(),
                shared.counters.open.load(Relaxed),
                shared.config.clients,
                shared.live_errors()
            );
        }
    }
}

/// Runs the load test described by `config` and returns its summary.
///
/// Clients connect at `config.ramp` per second; each starts pinging as soon
/// as it is connected. The measurement window opens once every client has
/// connected or failed and lasts `config.duration`; only pings sent inside
/// it count towards the RTT statistics and the ping rate. Then clients stop
/// pinging, wait up to 2 s for pongs in flight, and close with code 1000.
///
/// `shutdown` (e.g. SIGINT) ends the window early; during the ramp it skips
/// the window. A run where no client connected still returns a summary,
/// with `clients_connected == 0`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Summary {
    let clients = u64::from(config.clients);
    let shared = Arc::new(Shared::new(config));
    let tracker = TaskTracker::new();
    let started = Instant::now();
    tokio::pin!(shutdown);

    tracker.spawn(connect_all(Arc::clone(&shared), tracker.clone(), started));
    tracker.close();

    let mut progress = Progress {
        enabled: shared.config.progress,
        started,
        last_at: started,
        last_pongs: 0,
    };
    let mut tick = interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);

    // Ramp: wait until every client connected or failed.
    let mut interrupted = false;
    while shared.counters.attempted.load(Relaxed) < clients {
        tokio::select! {
            () = shared.all_attempted.notified() => {}
            _ = tick.tick() => progress.report(&shared, "ramp"),
            () = &mut shutdown => {
                interrupted = true;
                break;
            }
        }
    }
    let ramp_end = Instant::now();
    let connected = shared.counters.connected.load(Relaxed);

    // Window.
    let mut window = Duration::ZERO;
    let mut cpu_start = None;
    if interrupted {
        eprintln!("loadgen: interrupted while connecting");
    } else if connected == 0 {
        eprintln!("loadgen: no client could connect to {}", shared.url);
    } else {
        if shared.config.progress {
            eprintln!(
                "loadgen: all clients connected: {connected}/{clients} ({} failed) in {:.2}s; measuring for {:?}",
                shared.counters.connect_failed.load(Relaxed),
                (ramp_end - started).as_secs_f64(),
                shared.config.duration
            );
        }
        let _ = shared.window_start.set(ramp_end);
        cpu_start = usage::cpu_time();
        if !shared.pokes.is_empty() {
            tokio::spawn(poke_clients(Arc::clone(&shared)));
        }
        let end = ramp_end + shared.config.duration;
        loop {
            tokio::select! {
                () = sleep_until(end) => break,
                _ = tick.tick() => progress.report(&shared, "run"),
                () = &mut shutdown => {
                    eprintln!("loadgen: interrupted, stopping early");
                    break;
                }
            }
        }
        window = ramp_end.elapsed();
    }
    // loadgen's own cost over the window, before the drain.
    let own = cpu_start
        .zip(usage::cpu_time())
        .map(|(start, end)| (end - start, usage::memory_kib()));

    // Drain: clients finish in-flight pings and close.
    shared.stop.cancel();
    let hard_deadline = Instant::now() + DRAIN + CLOSE_TIMEOUT + Duration::from_secs(1);
    loop {
        tokio::select! {
            () = tracker.wait() => break,
            _ = tick.tick() => progress.report(&shared, "drain"),
            () = sleep_until(hard_deadline) => {
                eprintln!(
                    "loadgen: {} connections did not close in time; their frame counts are missing",
                    shared.counters.open.load(Relaxed)
                );
                break;
            }
        }
    }

    summarize(
        &shared,
        (ramp_end - started).as_secs_f64(),
        window.as_secs_f64(),
        own,
    )
}

/// `--churn` and `--renames`: while the window is open, pokes one client
/// every `1 / rate` seconds for each, round robin. Churn skips the first
/// [`DELAY_OBSERVERS`] clients (they measure, and the renamer of
/// `--measure-broadcast` is usually among them) unless there are few
/// clients; renames start half way round, so a client is rarely asked for
/// both at once.
async fn poke_clients(shared: Arc<Shared>) {
    let config = &shared.config;
    let n = shared.pokes.len();
    let churn_from = if n > 2 * DELAY_OBSERVERS as usize {
        DELAY_OBSERVERS as usize
    } else {
        0
    };
    let schedule = |rate: f64| (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let (churn_every, rename_every) = (schedule(config.churn), schedule(config.renames));
    let start = Instant::now();
    let (mut churn_at, mut rename_at) = (start, start);
    let (mut churned, mut renamed) = (0usize, 0usize);
    loop {
        let next = match (churn_every, rename_every) {
            (Some(_), Some(_)) => churn_at.min(rename_at),
            (Some(_), None) => churn_at,
            (None, Some(_)) => rename_at,
            (None, None) => return,
        };
        tokio::select! {
            () = shared.stop.cancelled() => return,
            () = sleep_until(next) => {}
        }
        let now = Instant::now();
        if let Some(every) = churn_every {
            while churn_at <= now {
                let i = churn_from + churned % (n - churn_from);
                shared.pokes[i].send(POKE_RECYCLE);
                churned += 1;
                churn_at += every;
            }
        }
        if let Some(every) = rename_every {
            while rename_at <= now {
                shared.pokes[(n / 2 + renamed) % n].send(POKE_RENAME);
                renamed += 1;
                rename_at += every;
            }
        }
    }
}

/// Spawns one client task per `1 / ramp` seconds until all are started or
/// the run stops.
async fn connect_all(shared: Arc<Shared>, tracker: TaskTracker, started: Instant) {
    let spacing = 1.0 / shared.config.ramp;
    for index in 0..shared.config.clients {
        let at = started + Duration::from_secs_f64(f64::from(index) * spacing);
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            () = sleep_until(at) => {}
        }
        tracker.spawn(client::run(index, Arc::clone(&shared)));
    }
}

fn summarize(
    shared: &Shared,
    ramp_secs: f64,
    duration_secs: f64,
    own: Option<(Duration, Option<(u64, u64)>)>,
) -> Summary {
    let c = &shared.counters;
    let config = &shared.config;
    let errors = ErrorCounts {
        connect_failed: c.connect_failed.load(Relaxed),
        closed_by_server: lock(&shared.closed_by_server).clone(),
        timeouts: c.timeouts.load(Relaxed),
        unexpected_pongs: c.unexpected_pongs.load(Relaxed),
        server_errors: c.server_errors.load(Relaxed),
        server_error_codes: lock(&shared.server_error_codes).clone(),
    };
    let pings = c.pings.load(Relaxed);
    Summary {
        target: shared.urls.join(" "),
        page: config.page,
        protocol: config.protocol.number(),
        rate_per_client: config.rate,
        idle: config.idle,
        send_delay: config.send_delay,
        clients_requested: u64::from(config.clients),
        clients_connected: c.connected.load(Relaxed),
        ramp_secs,
        duration_secs,
        pings_sent: c.pings_sent.load(Relaxed),
        pings,
        pings_per_sec: per_second(pings, duration_secs),
        rtt_us: LatencyStats::from_histogram(&lock(&shared.rtt)),
        errors_total: errors.total(),
        errors,
        broadcast: config.measure_broadcast.then(|| BroadcastStats {
            renames_sent: c.renames_sent.load(Relaxed),
            latency_us: LatencyStats::from_histogram(&lock(&shared.broadcast)),
            same_target_us: LatencyStats::from_histogram(&lock(&shared.broadcast_same)),
            other_target_us: LatencyStats::from_histogram(&lock(&shared.broadcast_other)),
        }),
        delays: config.measure_delays.then(|| DelayStats {
            observers: u64::from(config.clients.min(DELAY_OBSERVERS)),
            latency_us: LatencyStats::from_histogram(&lock(&shared.delays)),
        }),
        frames_by_command: lock(&shared.frames).clone(),
        delays_bytes: c.delays_bytes.load(Relaxed),
        bytes_received: c.bytes_received.load(Relaxed),
        churn: (config.churn > 0.0 || config.renames > 0.0).then(|| ChurnStats {
            closed: c.churn_closed.load(Relaxed),
            reconnected: c.churn_connected.load(Relaxed),
            reconnect_failed: c.churn_failed.load(Relaxed),
            renames: c.renames.load(Relaxed),
        }),
        loadgen: own.map(|(cpu, memory)| {
            SelfUsage::new(cpu, duration_secs, c.connected.load(Relaxed), memory)
        }),
    }
}
