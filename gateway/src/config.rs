//! The gateway's settings: [`GatewayArgs`], the limits and timings the
//! `gateway` and `pingapp` binaries share as flags, and [`GatewayCli`], the
//! whole command line of the `gateway` binary, which gives the plain
//! [`GatewayConfig`] that [`crate::Gateway::build`] takes.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser};
use services::bus::DEFAULT_STREAM_MAX_BYTES;
use services::config::{LogArgs, parse_nats_url, parse_subject_prefix};
use services::subjects::Subjects;

use crate::GatewayConfig;

/// The flags of the `gateway` binary; every one also reads its environment
/// variable (README, "Binaries and flags").
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about = "PingApp WebSocket gateway")]
pub struct GatewayCli {
    /// Where browsers connect.
    #[arg(long, env = "PINGAPP_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// The admin listener (/metrics, /livez, /readyz).
    #[arg(long, env = "PINGAPP_ADMIN_LISTEN", default_value = "0.0.0.0:9000")]
    pub admin_listen: SocketAddr,
    /// NATS server(s).
    #[arg(long, env = "NATS_URL", value_parser = parse_nats_url)]
    pub nats_url: String,
    /// NATS identity, TLS and reassembly bounds.
    #[command(flatten)]
    pub nats: services::config::NatsArgs,
    /// This gateway's id (default: the host name).
    #[arg(long, env = "PINGAPP_GATEWAY_ID")]
    pub gateway_id: Option<String>,
    /// Prefix of every NATS subject.
    #[arg(long, env = "PINGAPP_SUBJECT_PREFIX", default_value = "pingapp", value_parser = parse_subject_prefix)]
    pub subject_prefix: String,
    /// Limits and timings.
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

impl GatewayCli {
    /// The gateway's configuration these flags give (the id defaults to
    /// the host name).
    pub fn config(&self) -> GatewayConfig {
        GatewayConfig {
            args: self.gateway.clone(),
            gateway_id: self
                .gateway_id
                .clone()
                .unwrap_or_else(services::config::host_name),
            subjects: Subjects::new(&self.subject_prefix),
            listen: self.listen,
        }
    }
}

/// Protocol limits and timings (`docs/protocol.md`; README, "Binaries and
/// flags"). Every flag also reads a `PINGAPP_*` environment
/// variable.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Largest accepted client frame, in bytes; a larger one closes the
    /// connection with 1009.
    #[arg(long, env = "PINGAPP_MAX_FRAME_BYTES", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub max_frame_bytes: u32,

    /// Sustained client frames per second (every frame, control frames
    /// included), with a burst of as many: a token bucket; over it the
    /// connection is closed with 1008.
    #[arg(long, env = "PINGAPP_MAX_MESSAGES_PER_SECOND", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_messages_per_second: u32,

    /// Sustained client bytes per second (frame payloads), with a burst of
    /// as many (at least one largest frame); over it the connection is
    /// closed with 1008.
    #[arg(long, env = "PINGAPP_MAX_BYTES_PER_SECOND", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(64..=1_073_741_824))]
    pub max_bytes_per_second: u32,

    /// Sustained renames per minute per connection, with a burst of 3 (or
    /// a tenth of the rate when that is more); a rename over it gets a
    /// `too_many_renames` error frame and is not applied.
    #[arg(long, env = "PINGAPP_MAX_RENAMES_PER_MINUTE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_renames_per_minute: u32,

    /// How often pages should ping, announced in the v2 welcome.
    #[arg(long, env = "PINGAPP_PING_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub ping_interval_ms: u64,

    /// How often coalesced delay updates go out.
    #[arg(long, env = "PINGAPP_ROSTER_TICK_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub roster_tick_ms: u64,

    /// Time over which one roster tick's view frames are queued, in slices
    /// of `--view-fanout-slice` pages (at most a quarter of the roster
    /// tick; 0 queues them all at once). Handing the same frame to every
    /// page at once wakes every connection in one burst
    /// (docs/architecture.md, "The tick's fan-out").
    #[arg(long, env = "PINGAPP_VIEW_FANOUT_SPREAD_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=15_000))]
    pub view_fanout_spread_ms: u64,

    /// Pages given a tick's frame per slice of the fan-out.
    #[arg(long, env = "PINGAPP_VIEW_FANOUT_SLICE", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub view_fanout_slice: u32,

    /// How often the gateway sends WebSocket Ping frames.
    #[arg(long, env = "PINGAPP_KEEPALIVE_INTERVAL_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub keepalive_interval_ms: u64,

    /// A client silent this long is closed.
    #[arg(long, env = "PINGAPP_IDLE_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    pub idle_timeout_ms: u64,

    /// Frames queued for one client before it counts as too slow and is
    /// dropped.
    #[arg(long, env = "PINGAPP_OUTBOUND_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(4..=1_000_000))]
    pub outbound_queue: u32,

    /// Bytes of outgoing frames the WebSocket library gathers before it
    /// writes them to the socket (v1 public pages: 16 KiB, always). Its
    /// buffer keeps the largest capacity it ever reached, per connection,
    /// so 0 (each frame written as it is sent) keeps it at the size of the
    /// largest single frame; larger values save write calls when frames
    /// queue up, at up to twice that value in every connection's memory
    /// (docs/benchmarks.md, "Memory per public connection"). At most
    /// 512 KiB (below the 1 MiB write buffer cap).
    #[arg(long, env = "PINGAPP_WS_WRITE_BUFFER_BYTES", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=(1 << 19)))]
    pub ws_write_buffer_bytes: u32,

    /// How often the gateway tells presence the count and digest of its
    /// public clients (a heartbeat).
    #[arg(long, env = "PINGAPP_HEARTBEAT_INTERVAL_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub heartbeat_interval_ms: u64,

    /// The most clients in one piece of the full list sent when presence
    /// asks for it, and in one roster page asked of presence
    /// (docs/architecture.md, "Bounds").
    #[arg(long, env = "PINGAPP_PRESENCE_PIECE_CLIENTS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub presence_piece_clients: u32,

    /// How long a drain may take before the process exits anyway.
    #[arg(long, env = "PINGAPP_DRAIN_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub drain_timeout_ms: u64,

    /// How much a client's `delay_time` may exceed the time the gateway saw
    /// pass since that sample's ping arrived; a longer claim is refused.
    #[arg(long, env = "PINGAPP_MAX_DELAY_EXCESS_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub max_delay_excess_ms: u64,

    /// Most concurrent WebSocket connections from one client address; more
    /// get 429 before the upgrade. 0: no cap.
    #[arg(long, env = "PINGAPP_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: u32,

    /// Most concurrent WebSocket connections of this gateway, private and
    /// public; more get 503 with `Retry-After` before the upgrade
    /// (docs/protocol.md, "Connection caps").
    #[arg(long, env = "PINGAPP_MAX_CONNECTIONS", default_value_t = 50_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most concurrent public connections (v1 and v2) of this gateway;
    /// more get 503 with `Retry-After` before the upgrade.
    #[arg(long, env = "PINGAPP_MAX_PUBLIC_CLIENTS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_public_clients: u32,

    /// Most concurrent public v1 connections of this gateway (each costs
    /// O(room): every event, and the whole roster per sample); more get
    /// 503 with `Retry-After` before the upgrade.
    #[arg(long, env = "PINGAPP_MAX_V1_PUBLIC_CLIENTS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_v1_public_clients: u32,

    /// Most new WebSocket connections per second from one client address
    /// (sustained; a burst of twice as many); more get 429 before the
    /// upgrade. 0: no cap.
    #[arg(
        long,
        env = "PINGAPP_MAX_CONNECTS_PER_IP_PER_SECOND",
        default_value_t = 20
    )]
    pub max_connects_per_ip_per_second: u32,

    /// API requests (`/api/*`) per second from one client address
    /// (sustained; a burst of twice as many); more get 429 with
    /// `Retry-After`. 0: no budget.
    #[arg(
        long,
        env = "PINGAPP_MAX_API_REQUESTS_PER_IP_PER_SECOND",
        default_value_t = 20
    )]
    pub max_api_requests_per_ip_per_second: u32,

    /// Proxies (IP addresses or ranges such as `10.0.0.0/8`,
    /// comma-separated) whose `X-Forwarded-For` names the client address
    /// for the per-IP caps; from anyone else the header is ignored.
    #[arg(long, env = "PINGAPP_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::guard::IpNet>,

    /// How long a client may take to send a request's headers (the
    /// WebSocket upgrade included) before the connection is closed.
    #[arg(long, env = "PINGAPP_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub header_timeout_ms: u64,

    /// Browser origins allowed to open WebSockets besides the request's
    /// own host, comma-separated (`https://ping.example.com`); `*` allows
    /// any. Requests without an `Origin` header are always allowed.
    #[arg(long, env = "PINGAPP_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Byte cap of the durable sample stream (samples not yet stored by
    /// the recorder); a full stream refuses new batches, which wait in the
    /// gateway (docs/architecture.md, "Bounds"). Give recorders the same.
    #[arg(long, env = "PINGAPP_STREAM_MAX_BYTES", default_value_t = DEFAULT_STREAM_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(1_048_576..=(1 << 50)))]
    pub stream_max_bytes: u64,

    /// Most bytes of accepted samples the gateway holds while the bus or
    /// the stream refuses them; at the bound new samples are refused with
    /// the error frame `busy` (docs/architecture.md, "Bounds").
    #[arg(long, env = "PINGAPP_PERSIST_BUFFER_BYTES", default_value_t = crate::persist::DEFAULT_BUFFER_BYTES,
          value_parser = clap::value_parser!(u64).range(65_536..=(1 << 40)))]
    pub persist_buffer_bytes: u64,
}

impl Default for GatewayArgs {
    fn default() -> Self {
        Self {
            max_frame_bytes: 4096,
            max_messages_per_second: 50,
            max_bytes_per_second: 65_536,
            max_renames_per_minute: 10,
            ping_interval_ms: 1000,
            roster_tick_ms: 500,
            view_fanout_spread_ms: 50,
            view_fanout_slice: 64,
            keepalive_interval_ms: 5000,
            idle_timeout_ms: 30_000,
            outbound_queue: 1024,
            ws_write_buffer_bytes: 0,
            heartbeat_interval_ms: 2000,
            presence_piece_clients: 1000,
            drain_timeout_ms: 10_000,
            max_delay_excess_ms: 500,
            max_connections_per_ip: 256,
            max_connections: 50_000,
            max_public_clients: 20_000,
            max_v1_public_clients: 1_000,
            max_connects_per_ip_per_second: 20,
            max_api_requests_per_ip_per_second: 20,
            trusted_proxies: Vec::new(),
            header_timeout_ms: 10_000,
            allowed_origins: Vec::new(),
            stream_max_bytes: DEFAULT_STREAM_MAX_BYTES,
            persist_buffer_bytes: crate::persist::DEFAULT_BUFFER_BYTES,
        }
    }
}

impl GatewayArgs {
    /// Keepalive interval.
    pub fn keepalive_interval(&self) -> Duration {
        Duration::from_millis(self.keepalive_interval_ms)
    }

    /// Idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// Roster tick.
    pub fn roster_tick(&self) -> Duration {
        Duration::from_millis(self.roster_tick_ms)
    }

    /// How a roster tick's view frames are queued.
    pub fn view_fanout(&self) -> crate::room::Pacing {
        crate::room::Pacing {
            spread: Duration::from_millis(self.view_fanout_spread_ms),
            slice: self.view_fanout_slice as usize,
        }
    }

    /// Heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// Header read timeout.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// Drain timeout.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// A new connection's rename budget.
    pub(crate) fn rename_budget(&self) -> crate::connection::TokenBucket {
        let per_minute = f64::from(self.max_renames_per_minute);
        let burst = per_minute.min(3.0).max(per_minute / 10.0);
        crate::connection::TokenBucket::new(per_minute / 60.0, burst)
    }

    /// After how long without a pong a page counts a ping as lost.
    pub fn ping_timeout_ms(&self) -> u64 {
        (self.ping_interval_ms * 3).max(1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_give_the_config() {
        let cli = GatewayCli::try_parse_from([
            "gateway",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--gateway-id",
            "g7",
            "--ping-interval-ms",
            "250",
        ])
        .expect("valid flags");
        let cfg = cli.config();
        assert_eq!(cfg.gateway_id, "g7");
        assert_eq!(cfg.args.ping_interval_ms, 250);
        assert_eq!(cfg.args.stream_max_bytes, 1 << 30);
        assert_eq!(cfg.args.persist_buffer_bytes, 64 << 20);
        assert_eq!(cfg.listen, "0.0.0.0:8000".parse().unwrap());
        assert!(
            GatewayCli::try_parse_from(["gateway"]).is_err(),
            "NATS is required"
        );
        let nats = ["gateway", "--nats-url", "nats://127.0.0.1:4222"];
        let proxies = |list: &str| {
            GatewayCli::try_parse_from(nats.iter().copied().chain(["--trusted-proxies", list]))
                .map(|cli| cli.gateway.trusted_proxies.len())
        };
        assert_eq!(proxies("10.0.0.0/8,192.0.2.7").unwrap(), 2);
        assert!(proxies("ingress").is_err(), "not an address");
        // The write threshold: 0 by default, and never up to the write
        // buffer's cap (the WebSocket library would panic on it).
        assert_eq!(cfg.args.ws_write_buffer_bytes, 0);
        let threshold = |v: &str| {
            GatewayCli::try_parse_from(nats.iter().copied().chain(["--ws-write-buffer-bytes", v]))
                .map(|cli| cli.gateway.ws_write_buffer_bytes)
        };
        assert_eq!(threshold("16384").unwrap(), 16_384);
        assert!(threshold("1048576").is_err(), "over 512 KiB");
    }
}
