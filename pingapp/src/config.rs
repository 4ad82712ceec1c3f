//! The flags of the `pingapp` binary ([`Args`]); every one also reads its
//! environment variable (README, "Binaries and flags").

use std::net::SocketAddr;

use clap::Parser;
use gateway::GatewayArgs;
use services::config::{
    LogArgs, parse_database_url, parse_duration, parse_nats_url, parse_subject_prefix,
};

/// Command-line flags of the standalone binary.
#[derive(Debug, Parser)]
#[command(
    name = "pingapp",
    version,
    about = "PingApp: WebSocket latency, all in one process"
)]
pub struct Args {
    /// Where browsers connect.
    #[arg(long, env = "PINGAPP_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// The admin listener (/metrics, /livez, /readyz).
    #[arg(long, env = "PINGAPP_ADMIN_LISTEN", default_value = "127.0.0.1:9000")]
    pub admin_listen: SocketAddr,
    /// Where samples are stored: sqlite:PATH or postgres://...
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://pingapp.db", value_parser = parse_database_url)]
    pub database_url: String,
    /// NATS server(s); unset: the in-memory bus.
    #[arg(long, env = "NATS_URL", value_parser = parse_nats_url)]
    pub nats_url: Option<String>,
    /// NATS identity, TLS and reassembly bounds.
    #[command(flatten)]
    pub nats: services::config::NatsArgs,
    /// This gateway's id.
    #[arg(long, env = "PINGAPP_GATEWAY_ID", default_value = "standalone")]
    pub gateway_id: String,
    /// Prefix of every bus subject.
    #[arg(long, env = "PINGAPP_SUBJECT_PREFIX", default_value = "pingapp", value_parser = parse_subject_prefix)]
    pub subject_prefix: String,
    /// Raw samples older than this are deleted (e.g. 7d or 12h; 0: keep for
    /// ever); minute rollups stay 400 days.
    #[arg(long, env = "PINGAPP_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: std::time::Duration,
    /// Gateway limits and timings.
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}
