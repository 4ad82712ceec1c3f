//! The flags of the `presence` binary ([`PresenceCli`]), which give the
//! plain [`PresenceConfig`] that [`crate::Presence::build`] takes.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use services::config::{LogArgs, parse_nats_url, parse_subject_prefix};
use services::subjects::Subjects;

use crate::service::{PresenceConfig, default_replica_id};

/// PingApp presence: the public roster across all gateways. Every flag also
/// reads its environment variable.
#[derive(Debug, Parser)]
#[command(name = "presence", version, about)]
pub struct PresenceCli {
    /// Admin listener: /metrics, /livez, /readyz.
    #[arg(long, env = "PINGAPP_ADMIN_LISTEN", default_value = "0.0.0.0:9000")]
    pub admin_listen: SocketAddr,
    /// NATS server(s), comma-separated.
    #[arg(long, env = "NATS_URL", value_parser = parse_nats_url)]
    pub nats_url: String,
    /// NATS identity, TLS and reassembly bounds.
    #[command(flatten)]
    pub nats: services::config::NatsArgs,
    /// First token of every subject.
    #[arg(long, env = "PINGAPP_SUBJECT_PREFIX", default_value = "pingapp", value_parser = parse_subject_prefix)]
    pub subject_prefix: String,
    /// How often coalesced delay updates are published, ms.
    #[arg(long, env = "PINGAPP_ROSTER_TICK_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub roster_tick_ms: u64,
    /// This replica's name in the leader lease (default: host name and pid).
    #[arg(long, env = "PINGAPP_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// The leader lease lapses this long after its last renewal, ms.
    #[arg(long, env = "PINGAPP_LEASE_TTL_MS", default_value_t = 6000, value_parser = clap::value_parser!(u64).range(300..))]
    pub lease_ttl_ms: u64,
    /// After start, clients learned from heartbeats are added silently for
    /// this long (the pages still have them), ms. Set it a little above the
    /// gateways' heartbeat interval.
    #[arg(long, env = "PINGAPP_WARMUP_MS", default_value_t = 2500, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub warmup_ms: u64,
    /// The most public clients one gateway may hold in the roster; a
    /// heartbeat listing more, or a connect beyond it, is refused.
    #[arg(long, env = "PINGAPP_MAX_CLIENTS_PER_GATEWAY", default_value_t = crate::roster::DEFAULT_MAX_CLIENTS_PER_GATEWAY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_clients_per_gateway: usize,
    /// The most clients in one reply to a gateway's roster request (a page;
    /// the gateway asks for the next until it has them all).
    #[arg(long, env = "PINGAPP_MAX_ROSTER_PAGE", default_value_t = crate::service::DEFAULT_MAX_ROSTER_PAGE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub max_roster_page: usize,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

impl PresenceCli {
    /// The presence configuration these flags give.
    pub fn config(&self) -> PresenceConfig {
        let mut cfg = PresenceConfig::new(Subjects::new(&self.subject_prefix));
        cfg.replica_id = self.replica_id.clone().unwrap_or_else(default_replica_id);
        cfg.roster_tick = Duration::from_millis(self.roster_tick_ms);
        cfg.lease_ttl = Duration::from_millis(self.lease_ttl_ms);
        cfg.warmup = Duration::from_millis(self.warmup_ms);
        cfg.max_clients_per_gateway = self.max_clients_per_gateway;
        cfg.max_roster_page = self.max_roster_page;
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_give_the_config() {
        let cli = PresenceCli::try_parse_from([
            "presence",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--replica-id",
            "p1",
            "--warmup-ms",
            "0",
        ])
        .expect("valid flags");
        let cfg = cli.config();
        assert_eq!(cfg.replica_id, "p1");
        assert_eq!(cfg.warmup, Duration::ZERO);
        assert_eq!(cfg.roster_tick, Duration::from_millis(500));
        assert_eq!(cfg.lease_ttl, Duration::from_secs(6));
        assert_eq!(cfg.max_clients_per_gateway, 50_000);
        assert_eq!(cfg.max_roster_page, 1000);
        let bad = PresenceCli::try_parse_from(["presence", "--nats-url", "nats://h:x"]);
        assert!(bad.is_err(), "a bad NATS port is refused");
    }
}
