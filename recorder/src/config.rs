//! The recorder's settings: [`RecorderConfig`], the plain configuration
//! [`crate::Recorder::build`] takes, and [`RecorderCli`], the flags (and
//! environment variables) of the `recorder` binary that produce it.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use services::config::{
    LogArgs, parse_duration, parse_nats_url, parse_postgres_url, parse_subject_prefix,
};
use services::subjects::Subjects;

/// How the recorder works.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// The subjects (and stream and consumer names) of the deployment.
    pub subjects: Subjects,
    /// An insert is made once this many samples are gathered (default 5000)…
    pub batch_max_samples: usize,
    /// …or this long after the first delivery of the batch (default 50 ms).
    pub batch_wait: Duration,
    /// Samples older than this are deleted (default 7 days; zero keeps
    /// them for ever).
    pub retention: Duration,
    /// Minute rollups (the public room's and each device's) older than this
    /// are deleted
    /// (default 400 days; zero keeps them for ever).
    pub rollup_retention: Duration,
    /// How often staged samples are packed and old ones deleted (default
    /// 1 min).
    pub prune_interval: Duration,
    /// The stream drops unconsumed batches older than this (default 7
    /// days): how long the recorders may all be down without loss.
    pub stream_max_age: Duration,
    /// The stream's byte cap (default
    /// [`services::bus::DEFAULT_STREAM_MAX_BYTES`]; the gateways' should
    /// be the same, or each applies its own when it starts).
    pub stream_max_bytes: u64,
    /// History and statistics reads answered at once, all kinds together
    /// (default 3, `--read-concurrency`); more are answered `Busy` (docs/architecture.md,
    /// "Bounds").
    pub read_concurrency: usize,
}

impl RecorderConfig {
    /// The defaults, for the deployment of `subjects`.
    pub fn new(subjects: Subjects) -> Self {
        Self {
            subjects,
            batch_max_samples: 5_000,
            batch_wait: Duration::from_millis(50),
            retention: Duration::from_secs(7 * 86_400),
            prune_interval: Duration::from_secs(60),
            rollup_retention: Duration::from_secs(400 * 86_400),
            stream_max_age: Duration::from_secs(7 * 86_400),
            stream_max_bytes: services::bus::DEFAULT_STREAM_MAX_BYTES,
            read_concurrency: DEFAULT_READ_CONCURRENCY,
        }
    }
}

/// Default of `--read-concurrency`: of the Postgres pool's 6 connections,
/// 2 stay for inserts, one for pruning and the health check's ping.
pub const DEFAULT_READ_CONCURRENCY: usize = 3;

/// The flags of the `recorder` binary; every one also reads its
/// environment variable.
#[derive(Debug, Parser)]
#[command(name = "recorder", version, about)]
pub struct RecorderCli {
    /// Where /metrics, /livez and /readyz are served.
    #[arg(long, env = "PINGAPP_ADMIN_LISTEN", default_value = "0.0.0.0:9000")]
    pub admin_listen: SocketAddr,
    /// NATS server(s), comma-separated (not needed with --migrate-only).
    #[arg(long, env = "NATS_URL", value_parser = parse_nats_url,
          required_unless_present = "migrate_only")]
    pub nats_url: Option<String>,
    /// NATS identity, TLS and reassembly bounds.
    #[command(flatten)]
    pub nats: services::config::NatsArgs,
    /// The Postgres database, as the role the recorder reads and writes
    /// with (SELECT, INSERT, UPDATE, DELETE: no DDL needed once migrated;
    /// day partitions go through the owner's functions).
    #[arg(long, env = "DATABASE_URL", value_parser = parse_postgres_url)]
    pub database_url: String,
    /// The same database as the schema's owner: the migrations are applied
    /// over this URL, the samples read and written over --database-url
    /// only. Without it, --database-url applies pending migrations.
    #[arg(long, env = "PINGAPP_MIGRATE_DATABASE_URL", value_parser = parse_postgres_url)]
    pub migrate_database_url: Option<String>,
    /// Apply the migrations (over --migrate-database-url, else
    /// --database-url) and exit: for an init container or a Job.
    #[arg(long, env = "PINGAPP_MIGRATE_ONLY")]
    pub migrate_only: bool,
    /// First token of every subject (and of the stream name).
    #[arg(long, env = "PINGAPP_SUBJECT_PREFIX", default_value = "pingapp", value_parser = parse_subject_prefix)]
    pub subject_prefix: String,
    /// How long raw samples are kept, e.g. 7d or 12h (0: for ever); the
    /// minute rollups are kept for --rollup-retention.
    #[arg(long, env = "PINGAPP_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,
    /// How long the minute rollups (the public room's, what /api/stats
    /// reads, and each browser's, what its own history reads) are kept,
    /// e.g. 400d (0: for ever).
    #[arg(long, env = "PINGAPP_ROLLUP_RETENTION", default_value = "400d", value_parser = parse_duration)]
    pub rollup_retention: Duration,
    /// Samples per database insert, at most.
    #[arg(long, env = "PINGAPP_BATCH_MAX_SAMPLES", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_max_samples: u32,
    /// How long a batch waits for more samples, ms.
    #[arg(long, env = "PINGAPP_BATCH_WAIT_MS", default_value_t = 50)]
    pub batch_wait_ms: u64,
    /// A sample batch delivered to a replica that neither acknowledged nor
    /// refused it (it was killed) goes to a replica again after this, ms.
    /// Applies when the durable consumer is created.
    #[arg(long, env = "PINGAPP_ACK_WAIT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    pub ack_wait_ms: u64,
    /// Byte cap of the durable sample stream (samples not yet stored); a
    /// full stream refuses new batches, which wait in the gateways. Give
    /// the gateways the same value.
    #[arg(long, env = "PINGAPP_STREAM_MAX_BYTES", default_value_t = services::bus::DEFAULT_STREAM_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(1_048_576..=(1 << 50)))]
    pub stream_max_bytes: u64,
    /// History and statistics reads answered at once; more are answered
    /// busy (HTTP 429 with Retry-After at the gateway).
    #[arg(long, env = "PINGAPP_READ_CONCURRENCY", default_value_t = DEFAULT_READ_CONCURRENCY as u32,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub read_concurrency: u32,
    /// Postgres statement timeout of every history and statistics read, ms.
    #[arg(long, env = "PINGAPP_READ_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub read_timeout_ms: u64,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

impl RecorderCli {
    /// The recorder's configuration these flags give.
    pub fn config(&self) -> RecorderConfig {
        let mut cfg = RecorderConfig::new(Subjects::new(&self.subject_prefix));
        cfg.retention = self.retention;
        cfg.rollup_retention = self.rollup_retention;
        cfg.batch_max_samples = self.batch_max_samples as usize;
        cfg.batch_wait = Duration::from_millis(self.batch_wait_ms);
        cfg.stream_max_bytes = self.stream_max_bytes;
        cfg.read_concurrency = self.read_concurrency as usize;
        cfg
    }

    /// The read budget of the store: a pool of `--read-concurrency`
    /// connections with `--read-timeout-ms` as statement timeout.
    pub fn read_limits(&self) -> crate::store::ReadLimits {
        crate::store::ReadLimits {
            connections: self.read_concurrency,
            statement_timeout: Duration::from_millis(self.read_timeout_ms),
        }
    }

    /// How long a delivery may stay unacknowledged before it is redelivered.
    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_give_the_config() {
        let args = RecorderCli::try_parse_from([
            "recorder",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--database-url",
            "postgres://postgres@127.0.0.1/pingapp",
            "--retention",
            "1h30m",
            "--batch-wait-ms",
            "20",
        ])
        .expect("valid flags");
        let cfg = args.config();
        assert_eq!(cfg.retention, Duration::from_secs(5400));
        let defaults = RecorderCli::try_parse_from([
            "recorder",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--database-url",
            "postgres://postgres@127.0.0.1/pingapp",
        ])
        .expect("valid flags")
        .config();
        assert_eq!(defaults.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(
            RecorderConfig::new(defaults.subjects.clone()).retention,
            defaults.retention
        );
        assert_eq!(cfg.rollup_retention, Duration::from_secs(400 * 86_400));
        assert_eq!(cfg.batch_wait, Duration::from_millis(20));
        assert_eq!(cfg.batch_max_samples, 5000);
        assert_eq!(args.ack_wait(), Duration::from_secs(30));
        assert_eq!(cfg.stream_max_bytes, 1 << 30);
        assert_eq!(cfg.read_concurrency, 3);
        assert_eq!(args.read_limits(), crate::store::ReadLimits::default());
        let bad = RecorderCli::try_parse_from([
            "recorder",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--database-url",
            "sqlite://x.db",
        ]);
        assert!(bad.is_err(), "the recorder needs Postgres");
        assert!(
            RecorderCli::try_parse_from(["recorder", "--database-url", "postgres://h/db"]).is_err(),
            "serving needs NATS"
        );
        let migrate = RecorderCli::try_parse_from([
            "recorder",
            "--migrate-only",
            "--database-url",
            "postgres://owner@h/db",
        ])
        .expect("migrating needs no NATS");
        assert!(migrate.migrate_only);
        assert_eq!(migrate.migrate_database_url, None);
    }
}
