//! The end-of-run report: latency statistics, throughput and error counts,
//! printable for people ([`std::fmt::Display`]) and as stable JSON
//! ([`serde::Serialize`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::Page;

/// Highest latency a histogram can hold, in microseconds (one minute);
/// larger values are clamped to it.
const HISTOGRAM_MAX_US: u64 = 60_000_000;

/// An empty latency histogram in microseconds: 1 µs to 60 s, three
/// significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("constant bounds are valid")
}

/// Pings (or anything) per second; 0 when no time elapsed.
pub fn per_second(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// A latency distribution in microseconds. Every field but `samples` is
/// `null` when there was no sample. Percentiles are the highest value of
/// their histogram bucket, so `p50 <= p90 <= p99 <= p999 <= max` always holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyStats {
    /// Number of samples.
    pub samples: u64,
    /// Smallest sample.
    pub min: Option<u64>,
    /// Arithmetic mean, rounded to 0.1 µs.
    pub mean: Option<f64>,
    /// Median.
    pub p50: Option<u64>,
    /// 90th percentile.
    pub p90: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// 99.9th percentile.
    pub p999: Option<u64>,
    /// Largest sample.
    pub max: Option<u64>,
}

impl LatencyStats {
    /// Summarizes a histogram of microsecond samples.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self {
                samples: 0,
                min: None,
                mean: None,
                p50: None,
                p90: None,
                p99: None,
                p999: None,
                max: None,
            };
        }
        let quantile = |q| Some(histogram.value_at_quantile(q));
        Self {
            samples: histogram.len(),
            min: Some(histogram.min()),
            mean: Some((histogram.mean() * 10.0).round() / 10.0),
            p50: quantile(0.5),
            p90: quantile(0.9),
            p99: quantile(0.99),
            p999: quantile(0.999),
            max: Some(histogram.max()),
        }
    }
}

/// Errors by kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ErrorCounts {
    /// Clients whose TCP connect or WebSocket handshake failed or took over 10 s.
    pub connect_failed: u64,
    /// Connections the server ended, by close code. `1005` is a close frame
    /// without a code; `1006` is a connection lost without a close frame
    /// (reset, EOF, a write that failed or stalled for 5 s).
    pub closed_by_server: BTreeMap<u16, u64>,
    /// Pings with no pong within 5 s.
    pub timeouts: u64,
    /// Pongs with no ping in flight, or (v2) with the wrong `seq`, e.g. late
    /// pongs of pings that already timed out.
    pub unexpected_pongs: u64,
    /// `{"command":"error"}` frames received.
    pub server_errors: u64,
    /// The same by their `code` (docs/protocol.md, "Errors"): `_none` for
    /// a frame without a string `code`, `_other` for codes beyond the
    /// first 32 distinct ones. Sums to `server_errors`.
    pub server_error_codes: BTreeMap<String, u64>,
}

impl ErrorCounts {
    /// Sum of all kinds.
    pub fn total(&self) -> u64 {
        self.connect_failed
            + self.closed_by_server.values().sum::<u64>()
            + self.timeouts
            + self.unexpected_pongs
            + self.server_errors
    }
}

/// Broadcast delivery latency (`--measure-broadcast`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BroadcastStats {
    /// `change_name` messages the designated client sent in the window.
    pub renames_sent: u64,
    /// From the send time embedded in the name to its arrival, per
    /// receiving client; ideally `renames_sent` × connected clients samples.
    pub latency_us: LatencyStats,
    /// The part of `latency_us` measured at receivers connected to the same
    /// target URL as the renamer (e.g. the same gateway).
    pub same_target_us: LatencyStats,
    /// The part of `latency_us` measured at receivers connected to another
    /// target URL than the renamer (e.g. another gateway); empty with one URL.
    pub other_target_us: LatencyStats,
}

/// Delay update latency (`--measure-delays`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DelayStats {
    /// Clients that parsed every `delays` frame (the first 16).
    pub observers: u64,
    /// From a client's `delay_time` (its send time is the value) to the
    /// moment an observer saw that value in a `delays` frame, per value and
    /// observer; the observer's own values are left out.
    pub latency_us: LatencyStats,
}

/// `--churn` and `--renames`: what the clients did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChurnStats {
    /// Connections closed (1000) to be replaced by a new client.
    pub closed: u64,
    /// Replacement connections that succeeded.
    pub reconnected: u64,
    /// Replacement connections that failed (the client is gone for the run).
    pub reconnect_failed: u64,
    /// Renames sent.
    pub renames: u64,
}

/// loadgen's own cost over the window: what its clients take from the
/// machine the server under test shares.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelfUsage {
    /// CPU time (user + system) over the window, in % of one core.
    pub cpu_percent: f64,
    /// The same, per connected client: µs of CPU per second.
    pub cpu_us_per_client_per_sec: f64,
    /// Resident memory at the end of the window, KiB (`None` off Linux).
    pub rss_kib: Option<u64>,
    /// Peak resident memory of the run, KiB.
    pub peak_rss_kib: Option<u64>,
    /// `rss_kib` per connected client.
    pub rss_kib_per_client: Option<f64>,
}

impl SelfUsage {
    /// From the CPU time used over a window of `secs` seconds with
    /// `clients` connected, and `(VmRSS, VmHWM)` in KiB.
    pub fn new(cpu: Duration, secs: f64, clients: u64, memory: Option<(u64, u64)>) -> Self {
        let cpu_us_per_sec = per_second(u64::try_from(cpu.as_micros()).unwrap_or(u64::MAX), secs);
        let per_client = |x: f64| {
            if clients == 0 {
                0.0
            } else {
                x / clients as f64
            }
        };
        Self {
            cpu_percent: cpu_us_per_sec / 10_000.0,
            cpu_us_per_client_per_sec: per_client(cpu_us_per_sec),
            rss_kib: memory.map(|(rss, _)| rss),
            peak_rss_kib: memory.map(|(_, hwm)| hwm),
            rss_kib_per_client: memory.map(|(rss, _)| per_client(rss as f64)),
        }
    }
}

/// The result of one run.
///
/// JSON keys (stable, snake_case):
///
/// - `target`: the endpoint URLs the clients used, separated by spaces
/// - `page`: `"private"` or `"public"`; `protocol`: `1` or `2`
/// - `rate_per_client`: pings per second per client, `0` = closed loop;
///   `idle`, `send_delay`: the flags in effect
/// - `clients_requested`, `clients_connected`: clients asked for and those
///   whose handshake succeeded
/// - `ramp_secs`: time from start until every client connected or failed
/// - `duration_secs`: actual length of the measurement window
/// - `pings_sent`: pings sent in the window; `pings`: those answered (the
///   samples of `rtt_us`); `pings_per_sec`: `pings / duration_secs`
/// - `rtt_us`: `{samples, min, mean, p50, p90, p99, p999, max}` in µs,
///   `null` values without samples
/// - `errors_total` and `errors`: `{connect_failed, closed_by_server:
///   {CODE: n}, timeouts, unexpected_pongs, server_errors,
///   server_error_codes: {CODE: n}}` (`server_error_codes`: the `error`
///   frames by their `code`, summing to `server_errors`)
/// - `broadcast`: `null`, or with `--measure-broadcast`
///   `{renames_sent, latency_us, same_target_us, other_target_us}`, each
///   latency with the same keys as `rtt_us`
/// - `delays`: `null`, or with `--measure-delays` `{observers, latency_us}`
/// - `frames_by_command`: `{COMMAND: n}` over every frame received,
///   including during ramp and drain; `_binary`, `_unparsed` (not JSON
///   with a string `command`), `_ws_ping` (WebSocket Ping control frames)
///   and `_other` (commands beyond the first 32 unknown ones) are not
///   server commands
/// - `delays_bytes`: the size of every `delays` frame received in the
///   window, summed over all clients
/// - `bytes_received`: the size of every text frame received in the
///   window, summed over all clients
/// - `churn`: `null`, or with `--churn` or `--renames` `{closed,
///   reconnected, reconnect_failed, renames}`
/// - `loadgen`: `null` (no window, or not Linux), or loadgen's own cost
///   over the window: `{cpu_percent, cpu_us_per_client_per_sec, rss_kib,
///   peak_rss_kib, rss_kib_per_client}`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Endpoint URLs, separated by spaces.
    pub target: String,
    /// Page opened.
    pub page: Page,
    /// Protocol version, 1 or 2.
    pub protocol: u8,
    /// Pings per second per client; 0 means closed loop.
    pub rate_per_client: f64,
    /// Whether clients only held their connections.
    pub idle: bool,
    /// Whether clients sent `delay_time` after each pong.
    pub send_delay: bool,
    /// Clients asked for.
    pub clients_requested: u64,
    /// Clients whose handshake succeeded.
    pub clients_connected: u64,
    /// Seconds until every client connected or failed.
    pub ramp_secs: f64,
    /// Actual length of the measurement window in seconds.
    pub duration_secs: f64,
    /// Pings sent in the window.
    pub pings_sent: u64,
    /// Pings sent in the window and answered.
    pub pings: u64,
    /// Answered pings per second over the window.
    pub pings_per_sec: f64,
    /// Round-trip times of the answered pings.
    pub rtt_us: LatencyStats,
    /// `errors.total()`.
    pub errors_total: u64,
    /// Errors by kind.
    pub errors: ErrorCounts,
    /// Broadcast delivery latency, with `--measure-broadcast`.
    pub broadcast: Option<BroadcastStats>,
    /// Delay update latency, with `--measure-delays`.
    pub delays: Option<DelayStats>,
    /// Frames received, by `command`.
    pub frames_by_command: BTreeMap<String, u64>,
    /// Bytes of the `delays` frames received by all clients in the window.
    pub delays_bytes: u64,
    /// Bytes of every text frame received by all clients in the window.
    pub bytes_received: u64,
    /// What `--churn` and `--renames` did.
    pub churn: Option<ChurnStats>,
    /// loadgen's own CPU and memory over the window.
    pub loadgen: Option<SelfUsage>,
}

/// Formats an optional value, `-` for none.
struct Opt<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl fmt::Display for LatencyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (min {}, mean {}, {} samples)",
            Opt(self.p50),
            Opt(self.p90),
            Opt(self.p99),
            Opt(self.p999),
            Opt(self.max),
            Opt(self.min),
            Opt(self.mean),
            self.samples
        )
    }
}

/// `N×KEY` for every entry, separated by spaces.
fn tally<K: fmt::Display>(counts: &BTreeMap<K, u64>) -> String {
    let parts: Vec<String> = counts.iter().map(|(key, n)| format!("{n}×{key}")).collect();
    parts.join(" ")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.idle {
            "idle, no pings".to_owned()
        } else if self.rate_per_client == 0.0 {
            "closed loop".to_owned()
        } else {
            format!("rate {}/s per client", self.rate_per_client)
        };
        let delay = if self.send_delay {
            ", delay_time after each pong"
        } else {
            ""
        };
        writeln!(
            f,
            "target     {} ({} page, protocol v{}, {mode}{delay})",
            self.target,
            self.page.as_str(),
            self.protocol
        )?;
        writeln!(
            f,
            "clients    {} requested, {} connected, {} failed to connect; ramp {:.2} s",
            self.clients_requested,
            self.clients_connected,
            self.errors.connect_failed,
            self.ramp_secs
        )?;
        writeln!(f, "duration   {:.2} s", self.duration_secs)?;
        writeln!(
            f,
            "pings      {} sent, {} answered, {:.1} pings/s",
            self.pings_sent, self.pings, self.pings_per_sec
        )?;
        writeln!(f, "rtt µs     {}", self.rtt_us)?;
        let codes = if self.errors.server_error_codes.is_empty() {
            String::new()
        } else {
            format!(": {}", tally(&self.errors.server_error_codes))
        };
        let closed = if self.errors.closed_by_server.is_empty() {
            "none".to_owned()
        } else {
            tally(&self.errors.closed_by_server)
        };
        writeln!(
            f,
            "errors     {} ({} connect failed, {} timeouts, {} unexpected pongs, {} server errors{codes}, closed by server: {closed})",
            self.errors_total,
            self.errors.connect_failed,
            self.errors.timeouts,
            self.errors.unexpected_pongs,
            self.errors.server_errors
        )?;
        if let Some(broadcast) = &self.broadcast {
            writeln!(
                f,
                "broadcast  {} renames; delivery µs {}",
                broadcast.renames_sent, broadcast.latency_us
            )?;
            writeln!(f, "  same url µs   {}", broadcast.same_target_us)?;
            writeln!(f, "  other url µs  {}", broadcast.other_target_us)?;
        }
        if let Some(delays) = &self.delays {
            writeln!(
                f,
                "delays     {} observers; delay_time to delays frame µs {}",
                delays.observers, delays.latency_us
            )?;
        }
        if let Some(churn) = &self.churn {
            writeln!(
                f,
                "churn      {} closed, {} reconnected, {} failed to reconnect; {} renames",
                churn.closed, churn.reconnected, churn.reconnect_failed, churn.renames
            )?;
        }
        if self.duration_secs > 0.0 {
            writeln!(
                f,
                "received   {:.0} bytes/s per client (text frames)",
                per_second(self.bytes_received, self.duration_secs)
                    / self.clients_connected.max(1) as f64
            )?;
        }
        if let Some(own) = &self.loadgen {
            writeln!(
                f,
                "loadgen    cpu {:.1}% ({:.1} µs/s per client), rss {} KiB ({} KiB per client, peak {} KiB)",
                own.cpu_percent,
                own.cpu_us_per_client_per_sec,
                Opt(own.rss_kib),
                Opt(own.rss_kib_per_client.map(|x| format!("{x:.1}"))),
                Opt(own.peak_rss_kib)
            )?;
        }
        let frames: Vec<String> = self
            .frames_by_command
            .iter()
            .map(|(command, n)| format!("{command} {n}"))
            .collect();
        writeln!(
            f,
            "frames     {}",
            if frames.is_empty() {
                "none".to_owned()
            } else {
                frames.join(", ")
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = new_histogram();
        for v in values {
            h.saturating_record(v);
        }
        h
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let stats = LatencyStats::from_histogram(&histogram(1..=1000));
        assert_eq!(stats.samples, 1000);
        assert_eq!(stats.min, Some(1));
        assert_eq!(stats.p50, Some(500));
        assert_eq!(stats.p90, Some(900));
        assert_eq!(stats.p99, Some(990));
        assert_eq!(stats.p999, Some(999));
        assert_eq!(stats.max, Some(1000));
        assert_eq!(stats.mean, Some(500.5));
    }

    #[test]
    fn percentiles_are_ordered_and_bucketed() {
        // 99 fast samples and one slow outlier, beyond 3-digit precision.
        let stats = LatencyStats::from_histogram(&histogram(
            std::iter::repeat_n(120, 99).chain([1_234_567]),
        ));
        let (p50, p99, p999, max) = (
            stats.p50.unwrap(),
            stats.p99.unwrap(),
            stats.p999.unwrap(),
            stats.max.unwrap(),
        );
        assert_eq!(p50, 120);
        assert_eq!(p99, 120);
        assert!(p99 <= p999 && p999 <= max);
        assert!((1_234_567..1_236_000).contains(&max), "max {max}");
    }

    #[test]
    fn empty_and_clamped_histograms() {
        let stats = LatencyStats::from_histogram(&new_histogram());
        assert_eq!(stats.samples, 0);
        assert_eq!(stats.p50, None);
        let json = serde_json::to_value(&stats).unwrap();
        assert!(json["p99"].is_null());

        let stats = LatencyStats::from_histogram(&histogram([u64::MAX]));
        assert!(stats.max.unwrap() >= HISTOGRAM_MAX_US);
    }

    #[test]
    fn rates_and_totals() {
        assert!((per_second(500, 2.0) - 250.0).abs() < 1e-9);
        assert_eq!(per_second(5, 0.0), 0.0);
        let errors = ErrorCounts {
            connect_failed: 1,
            closed_by_server: BTreeMap::from([(1008, 2), (1006, 3)]),
            timeouts: 4,
            unexpected_pongs: 5,
            server_errors: 6,
            server_error_codes: BTreeMap::from([("busy".into(), 6)]),
        };
        assert_eq!(errors.total(), 21);
        assert_eq!(ErrorCounts::default().total(), 0);
    }

    #[test]
    fn json_keys_and_human_text() {
        let summary = Summary {
            target: "ws://h/ws/public/?v=2".into(),
            page: Page::Public,
            protocol: 2,
            rate_per_client: 0.0,
            idle: false,
            send_delay: true,
            clients_requested: 2,
            clients_connected: 2,
            ramp_secs: 0.01,
            duration_secs: 2.0,
            pings_sent: 10,
            pings: 10,
            pings_per_sec: 5.0,
            rtt_us: LatencyStats::from_histogram(&histogram([100, 200])),
            errors_total: 1,
            errors: ErrorCounts {
                closed_by_server: BTreeMap::from([(1012, 1)]),
                server_errors: 3,
                server_error_codes: BTreeMap::from([("bad_sample".into(), 2), ("busy".into(), 1)]),
                ..ErrorCounts::default()
            },
            broadcast: Some(BroadcastStats {
                renames_sent: 1,
                latency_us: LatencyStats::from_histogram(&histogram([300, 400])),
                same_target_us: LatencyStats::from_histogram(&histogram([300])),
                other_target_us: LatencyStats::from_histogram(&histogram([400])),
            }),
            delays: Some(DelayStats {
                observers: 2,
                latency_us: LatencyStats::from_histogram(&histogram([500])),
            }),
            frames_by_command: BTreeMap::from([("pong".into(), 10)]),
            delays_bytes: 0,
            bytes_received: 1000,
            churn: Some(ChurnStats {
                closed: 3,
                reconnected: 2,
                reconnect_failed: 1,
                renames: 4,
            }),
            loadgen: Some(SelfUsage::new(
                Duration::from_millis(500),
                2.0,
                2,
                Some((1000, 2000)),
            )),
        };
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["page"], "public");
        assert_eq!(json["errors"]["closed_by_server"]["1012"], 1);
        assert_eq!(json["broadcast"]["latency_us"]["max"], 400);
        assert_eq!(json["rtt_us"]["p50"], 100);
        let text = summary.to_string();
        assert!(text.contains("closed loop"), "{text}");
        assert!(text.contains("closed by server: 1×1012"), "{text}");
        assert!(
            text.contains("3 server errors: 2×bad_sample 1×busy,"),
            "{text}"
        );
        assert_eq!(json["errors"]["server_error_codes"]["bad_sample"], 2);
        assert!(text.contains("broadcast  1 renames"), "{text}");
        assert_eq!(json["broadcast"]["other_target_us"]["max"], 400);
        assert_eq!(json["delays"]["latency_us"]["p50"], 500);
        assert!(text.contains("delays     2 observers"), "{text}");
        assert!(text.contains("frames     pong 10"), "{text}");
        assert_eq!(json["churn"]["renames"], 4);
        assert_eq!(json["loadgen"]["cpu_percent"], 25.0);
        assert_eq!(json["loadgen"]["cpu_us_per_client_per_sec"], 125_000.0);
        assert_eq!(json["loadgen"]["rss_kib_per_client"], 500.0);
        assert!(
            text.contains("churn      3 closed, 2 reconnected"),
            "{text}"
        );
        assert!(text.contains("received   250 bytes/s per client"), "{text}");
        assert!(text.contains("loadgen    cpu 25.0%"), "{text}");
    }
}
