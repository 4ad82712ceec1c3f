//! Command-line flags of `loadgen` ([`Args`]) and the validated run settings
//! ([`Config`]) the runner takes. Every flag also reads a `PINGAPP_*`
//! environment variable; booleans accept true/false, yes/no, on/off, 1/0.

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};
use serde::Serialize;
use url::Url;

use services::config::parse_duration;

/// Longest run accepted, so a typo cannot start a load test that never ends.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Highest per-client ping rate accepted (pings per second).
const MAX_RATE: f64 = 10_000.0;
/// Slowest connect ramp accepted (connections per second).
const MIN_RAMP: f64 = 0.01;
/// Highest `--churn` and `--renames` rate accepted (events per second).
const MAX_EVENTS: f64 = 10_000.0;

/// Which PingApp page the simulated clients open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Page {
    /// `/ws/private/`: each client sees only its own delay.
    Private,
    /// `/ws/public/`: clients join the shared roster and get its broadcasts.
    Public,
}

impl Page {
    /// The page name as it appears in the endpoint path.
    pub fn as_str(self) -> &'static str {
        match self {
            Page::Private => "private",
            Page::Public => "public",
        }
    }
}

/// WebSocket protocol version the clients speak (`docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// The original app's messages; pongs are matched to pings by order.
    #[value(name = "1")]
    V1,
    /// `?v=2`: a `welcome` frame first, pings carry `seq` and pongs echo it.
    #[value(name = "2")]
    V2,
}

impl Protocol {
    /// The version number, `1` or `2`.
    pub fn number(self) -> u8 {
        match self {
            Protocol::V1 => 1,
            Protocol::V2 => 2,
        }
    }
}

/// Simulated PingApp clients: connect, ping, and report RTT percentiles,
/// throughput, errors and broadcast delivery latency.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version, about, long_about = None)]
pub struct Args {
    /// Target base URLs; take precedence over --url. With several, client i
    /// connects to URL number i mod count (round robin), e.g. one per gateway
    #[arg(value_name = "URL")]
    pub targets: Vec<String>,

    /// Target base URL; clients connect to {url}/ws/{page}/ (ws:// or http://)
    #[arg(long, env = "PINGAPP_URL", default_value = "ws://127.0.0.1:8000")]
    pub url: String,

    /// Number of simulated clients
    #[arg(long, env = "PINGAPP_CLIENTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clients: u32,

    /// Page the clients open
    #[arg(long, env = "PINGAPP_PAGE", value_enum, default_value_t = Page::Private)]
    pub page: Page,

    /// Protocol version (2 adds ?v=2 and ping sequence numbers)
    #[arg(long, env = "PINGAPP_PROTOCOL", value_enum, default_value_t = Protocol::V2)]
    pub protocol: Protocol,

    /// Length of the measurement window, after all clients connected (500ms, 10s, 2m, 1m30s)
    #[arg(long, env = "PINGAPP_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Pings per second per client; 0 = closed loop (next ping as soon as the pong arrives)
    #[arg(long, env = "PINGAPP_RATE", default_value_t = 1.0)]
    pub rate: f64,

    /// New connections per second while connecting
    #[arg(long, env = "PINGAPP_RAMP", default_value_t = 500.0)]
    pub ramp: f64,

    /// Only connect and hold the connections (no pings), e.g. to measure memory
    #[arg(long, env = "PINGAPP_IDLE", value_parser = BoolishValueParser::new())]
    pub idle: bool,

    /// Print one JSON summary object on stdout instead of the human summary
    #[arg(long, env = "PINGAPP_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,

    /// Send a delay_time frame after each pong, like the pages do [default: true for --page public]
    #[arg(long, env = "PINGAPP_SEND_DELAY", value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub send_delay: Option<bool>,

    /// Public page: one client renames itself every second and every client
    /// records how long the change_name broadcast took to arrive
    #[arg(long, env = "PINGAPP_MEASURE_BROADCAST", value_parser = BoolishValueParser::new())]
    pub measure_broadcast: bool,

    /// Public page, v2: every client reports its send time (Unix ms modulo
    /// 60 s) as its delay_time, and a few observer clients record how long
    /// each value took to show up in a `delays` frame
    #[arg(long, env = "PINGAPP_MEASURE_DELAYS", value_parser = BoolishValueParser::new())]
    pub measure_delays: bool,

    /// Public page, v2: once the window opens, every client sends a `watch`
    /// for N other simulated clients (a run of N consecutive ones, as a
    /// page shows N rows of its table), so it gets only their delays
    #[arg(long, env = "PINGAPP_WATCH", value_name = "N")]
    pub watch: Option<u32>,

    /// Churn: N clients a second close (1000) and connect again as new
    /// clients, taken round robin, while the window is open (0 = none)
    #[arg(long, env = "PINGAPP_CHURN", value_name = "N", default_value_t = 0.0)]
    pub churn: f64,

    /// Public page: N renames a second, by clients taken round robin, while
    /// the window is open (0 = none)
    #[arg(long, env = "PINGAPP_RENAMES", value_name = "N", default_value_t = 0.0)]
    pub renames: f64,

    /// v2: every client presents a random device secret of its own (the
    /// `device` command, docs/protocol.md "Your history") right after
    /// connecting, and the same one again when `--churn` reconnects it,
    /// as a page does after a reload
    #[arg(long, env = "PINGAPP_DEVICE", value_parser = BoolishValueParser::new())]
    pub device: bool,

    /// Runtime worker threads; 1 runs every client on one thread (the
    /// cheapest, and it leaves the other cores to the server under test);
    /// 0 = one per CPU
    #[arg(long, env = "PINGAPP_THREADS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub threads: u16,
}

/// A setting that parses but makes no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The target URL is unusable.
    #[error("--url {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--rate` is negative, not finite or too high.
    #[error("--rate must be a number from 0 to {MAX_RATE}, got {0}")]
    Rate(f64),
    /// `--ramp` is not a positive finite number.
    #[error("--ramp must be a number from {MIN_RAMP} up, got {0}")]
    Ramp(f64),
    /// `--duration` is zero or longer than a week.
    #[error("--duration must be more than 0 and at most 7 days")]
    Duration,
    /// `--measure-broadcast` was asked for on the private page.
    #[error("--measure-broadcast needs --page public (private clients get no broadcasts)")]
    BroadcastNeedsPublic,
    /// `--measure-delays` was asked for without public v2 clients that send
    /// `delay_time`.
    #[error("--measure-delays needs --page public, --protocol 2 and --send-delay")]
    DelaysNeedPublicV2,
    /// `--watch` without public v2 clients, or outside 1..=200.
    #[error("--watch needs --page public and --protocol 2, and a count from 1 to 200")]
    Watch,
    /// `--churn` is negative, not finite, or above the connect ramp limit.
    #[error("--churn must be a number from 0 to {MAX_EVENTS}, got {0}")]
    Churn(f64),
    /// `--device` without protocol v2.
    #[error("--device needs --protocol 2 (v1 has no device command)")]
    DeviceNeedsV2,
    /// `--renames` is negative, not finite, too high, or not on the public page.
    #[error("--renames needs --page public and a number from 0 to {MAX_EVENTS}, got {0}")]
    Renames(f64),
}

/// Validated settings of one run; see [`Args`] for what each one means.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Base URLs without a trailing slash, e.g. `ws://127.0.0.1:8000`; at
    /// least one. Client `i` uses number `i % base_urls.len()`.
    pub base_urls: Vec<String>,
    /// Number of simulated clients.
    pub clients: u32,
    /// Page the clients open.
    pub page: Page,
    /// Protocol version.
    pub protocol: Protocol,
    /// Length of the measurement window.
    pub duration: Duration,
    /// Pings per second per client; 0 means closed loop.
    pub rate: f64,
    /// Connections opened per second.
    pub ramp: f64,
    /// Hold connections without pinging.
    pub idle: bool,
    /// Print the summary as JSON.
    pub json: bool,
    /// Send `delay_time` after each pong.
    pub send_delay: bool,
    /// Measure `change_name` broadcast delivery latency.
    pub measure_broadcast: bool,
    /// Measure how late `delay_time` values show up in `delays` frames.
    pub measure_delays: bool,
    /// Watch this many other clients' delays (v2 `watch`).
    pub watch: Option<u32>,
    /// Clients recycled (closed and connected again) per second in the window.
    pub churn: f64,
    /// Renames per second in the window, round robin over the clients.
    pub renames: f64,
    /// Present a device secret per client (v2 `device`).
    pub device: bool,
    /// Runtime worker threads, 0 = one per CPU (used by the binary).
    pub threads: u16,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

impl Args {
    /// Checks the flags and resolves defaults that depend on other flags.
    ///
    /// # Errors
    ///
    /// Returns the first [`ConfigError`] found.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let urls = if self.targets.is_empty() {
            vec![self.url]
        } else {
            self.targets
        };
        let base_urls = urls
            .iter()
            .map(|url| normalize_base_url(url))
            .collect::<Result<Vec<_>, _>>()?;
        if !(self.rate.is_finite() && (0.0..=MAX_RATE).contains(&self.rate)) {
            return Err(ConfigError::Rate(self.rate));
        }
        if !(self.ramp.is_finite() && self.ramp >= MIN_RAMP) {
            return Err(ConfigError::Ramp(self.ramp));
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return Err(ConfigError::Duration);
        }
        if self.measure_broadcast && self.page != Page::Public {
            return Err(ConfigError::BroadcastNeedsPublic);
        }
        let send_delay = self.send_delay.unwrap_or(self.page == Page::Public);
        if self.measure_delays
            && (self.page != Page::Public || self.protocol != Protocol::V2 || !send_delay)
        {
            return Err(ConfigError::DelaysNeedPublicV2);
        }
        if let Some(n) = self.watch
            && (self.page != Page::Public
                || self.protocol != Protocol::V2
                || !(1..=200).contains(&n))
        {
            return Err(ConfigError::Watch);
        }
        if !(self.churn.is_finite() && (0.0..=MAX_EVENTS).contains(&self.churn)) {
            return Err(ConfigError::Churn(self.churn));
        }
        if !(self.renames.is_finite() && (0.0..=MAX_EVENTS).contains(&self.renames))
            || (self.renames > 0.0 && self.page != Page::Public)
        {
            return Err(ConfigError::Renames(self.renames));
        }
        if self.device && self.protocol != Protocol::V2 {
            return Err(ConfigError::DeviceNeedsV2);
        }
        Ok(Config {
            base_urls,
            clients: self.clients,
            page: self.page,
            protocol: self.protocol,
            duration: self.duration,
            rate: self.rate,
            ramp: self.ramp,
            idle: self.idle,
            json: self.json,
            send_delay,
            measure_broadcast: self.measure_broadcast,
            measure_delays: self.measure_delays,
            watch: self.watch,
            churn: self.churn,
            renames: self.renames,
            device: self.device,
            threads: self.threads,
            progress: true,
        })
    }
}

impl Config {
    /// The endpoint of the first base URL: `{base}/ws/{page}/`, plus
    /// `?v=2` for protocol 2.
    pub fn ws_url(&self) -> String {
        self.ws_urls().swap_remove(0)
    }

    /// The endpoints of every base URL, in order (see [`Config::ws_url`]).
    pub fn ws_urls(&self) -> Vec<String> {
        let query = match self.protocol {
            Protocol::V1 => "",
            Protocol::V2 => "?v=2",
        };
        self.base_urls
            .iter()
            .map(|base| format!("{base}/ws/{}/{query}", self.page.as_str()))
            .collect()
    }
}

/// Accepts `ws://` (and `http://`, mapped to `ws://`) base URLs, possibly
/// with a path prefix, and returns them without a trailing slash.
fn normalize_base_url(input: &str) -> Result<String, ConfigError> {
    let error = |reason: &str| ConfigError::Url {
        url: input.to_owned(),
        reason: reason.to_owned(),
    };
    let mut url = Url::parse(input).map_err(|e| error(&e.to_string()))?;
    match url.scheme() {
        "ws" => {}
        "http" => url
            .set_scheme("ws")
            .map_err(|()| error("cannot map http:// to ws://"))?,
        "wss" | "https" => return Err(error("TLS is not supported; use ws://")),
        _ => return Err(error("the scheme must be ws://")),
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(error("the base URL must not have a query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv)
            .expect("flags parse")
            .into_config()
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.ws_url(), "ws://127.0.0.1:8000/ws/private/?v=2");
        assert_eq!(config.clients, 10);
        assert_eq!(config.duration, Duration::from_secs(10));
        assert!((config.rate - 1.0).abs() < f64::EPSILON);
        assert!((config.ramp - 500.0).abs() < f64::EPSILON);
        assert!(!config.send_delay);
        assert!(!config.idle && !config.json && !config.measure_broadcast);
        assert!(!config.measure_delays);
    }

    #[test]
    fn builds_endpoint_urls() {
        let config = parse(&[
            "http://example:9/prefix/",
            "--page",
            "public",
            "--protocol",
            "1",
        ])
        .unwrap();
        assert_eq!(config.ws_url(), "ws://example:9/prefix/ws/public/");
        assert!(config.send_delay, "public page sends delay_time by default");
        let config = parse(&[
            "--url",
            "ws://h:1",
            "--page",
            "public",
            "--send-delay=false",
        ])
        .unwrap();
        assert_eq!(config.ws_url(), "ws://h:1/ws/public/?v=2");
        assert!(!config.send_delay);
        assert!(parse(&["--send-delay"]).unwrap().send_delay);
    }

    #[test]
    fn watch_needs_public_v2_and_a_sane_count() {
        assert_eq!(
            parse(&["--page", "public", "--watch", "50"]).unwrap().watch,
            Some(50)
        );
        assert_eq!(parse(&["--page", "public"]).unwrap().watch, None);
        for bad in [
            &["--watch", "50"][..],
            &["--page", "public", "--protocol", "1", "--watch", "50"],
            &["--page", "public", "--watch", "0"],
            &["--page", "public", "--watch", "201"],
        ] {
            assert_eq!(parse(bad), Err(ConfigError::Watch), "{bad:?}");
        }
    }

    #[test]
    fn several_targets_in_order() {
        let config = parse(&["ws://a:1", "http://b:2/", "--page", "public"]).unwrap();
        assert_eq!(
            config.ws_urls(),
            ["ws://a:1/ws/public/?v=2", "ws://b:2/ws/public/?v=2"]
        );
        assert_eq!(config.ws_url(), "ws://a:1/ws/public/?v=2");
        assert!(matches!(
            parse(&["ws://a:1", "wss://b:2"]),
            Err(ConfigError::Url { .. })
        ));
        assert!(
            parse(&["--page", "public", "--measure-delays"])
                .unwrap()
                .measure_delays
        );
        assert_eq!(
            parse(&["--measure-delays"]),
            Err(ConfigError::DelaysNeedPublicV2)
        );
        assert_eq!(
            parse(&["--page", "public", "--protocol", "1", "--measure-delays"]),
            Err(ConfigError::DelaysNeedPublicV2)
        );
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(matches!(parse(&["wss://h"]), Err(ConfigError::Url { .. })));
        assert!(matches!(
            parse(&["ws://h/?x=1"]),
            Err(ConfigError::Url { .. })
        ));
        assert!(matches!(
            parse(&["not a url"]),
            Err(ConfigError::Url { .. })
        ));
        assert_eq!(parse(&["--rate=-1"]), Err(ConfigError::Rate(-1.0)));
        assert!(matches!(
            parse(&["--rate", "NaN"]),
            Err(ConfigError::Rate(_))
        ));
        assert_eq!(parse(&["--ramp", "0"]), Err(ConfigError::Ramp(0.0)));
        assert_eq!(parse(&["--churn=-1"]), Err(ConfigError::Churn(-1.0)));
        assert_eq!(parse(&["--renames", "5"]), Err(ConfigError::Renames(5.0)));
        assert_eq!(
            parse(&["--page", "public", "--renames", "1e9"]),
            Err(ConfigError::Renames(1e9))
        );
        let config = parse(&["--page", "public", "--churn", "20", "--renames", "10"]).unwrap();
        assert_eq!((config.churn, config.renames), (20.0, 10.0));
        assert_eq!(parse(&["--duration", "0s"]), Err(ConfigError::Duration));
        assert_eq!(
            parse(&["--measure-broadcast"]),
            Err(ConfigError::BroadcastNeedsPublic)
        );
        assert!(Args::try_parse_from(["loadgen", "--clients", "0"]).is_err());
        assert!(Args::try_parse_from(["loadgen", "--protocol", "3"]).is_err());
        assert!(Args::try_parse_from(["loadgen", "--duration", "10x"]).is_err());
        // The shared duration grammar: sums, and bare numbers as seconds.
        assert_eq!(
            parse(&["--duration", "1m30s"]).map(|c| c.duration),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(
            parse(&["--duration", "10"]).map(|c| c.duration),
            Ok(Duration::from_secs(10))
        );
    }
}
