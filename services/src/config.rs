//! Command-line and environment configuration shared by every binary.
//!
//! Every flag also reads an environment variable. A missing or malformed
//! setting stops the binary with one line naming it and exit status 2.

use std::fmt::Display;
use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};

/// Exit status for a bad setting.
pub const EXIT_BAD_CONFIG: i32 = 2;

/// Parses the command line (and environment) into `T`, or exits: status 0
/// for `--help` / `--version`, else one line naming the bad setting and
/// status 2.
pub fn parse<T: Parser>() -> T {
    match T::try_parse() {
        Ok(t) => t,
        Err(e) => exit_on_clap_error(e),
    }
}

/// Prints a clap error as one line (or help as is) and exits.
pub fn exit_on_clap_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        std::process::exit(0);
    }
    let rendered = e.render().to_string();
    let line = one_line(&rendered);
    eprintln!("{line}");
    std::process::exit(EXIT_BAD_CONFIG);
}

/// Folds clap's multi-line error into one line, dropping usage hints.
pub fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Stops the binary because `setting` is unusable: one line, status 2.
pub fn fail(setting: &str, why: impl Display) -> ! {
    eprintln!("error: invalid value for {setting}: {why}");
    std::process::exit(EXIT_BAD_CONFIG);
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging flags every binary has.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "PINGAPP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Checks a database URL: `postgres://`, `postgresql://` or `sqlite:`.
///
/// # Errors
/// A one-line explanation, for clap to show.
pub fn parse_database_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") || s.starts_with("sqlite:") {
        Ok(s.to_owned())
    } else {
        Err("expected a postgres://, postgresql:// or sqlite: URL".to_owned())
    }
}

/// Checks a Postgres URL (the recorder needs Postgres).
///
/// # Errors
/// A one-line explanation, for clap to show.
pub fn parse_postgres_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_owned())
    } else {
        Err("expected a postgres:// URL".to_owned())
    }
}

/// Checks a NATS URL list (`nats://host:port`, comma-separated) with the
/// NATS client's own address parsing ([`crate::bus::nats::server_addrs`]),
/// the one [`crate::bus::nats::NatsBus::connect`] uses.
///
/// # Errors
/// A one-line explanation, for clap to show.
pub fn parse_nats_url(s: &str) -> Result<String, String> {
    crate::bus::nats::server_addrs(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// How a service connects to NATS beyond its URL: its identity, TLS, and
/// the bounds of reassembling large messages (docs/security.md, "The
/// bus"). Every binary that talks to NATS flattens these in.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS identity: a credentials file (user JWT and nkey seed) or a file
    /// holding an nkey seed (`SU...`). Without it the connection is
    /// anonymous.
    #[arg(long, env = "PINGAPP_NATS_CREDS", value_parser = parse_nats_creds)]
    pub nats_creds: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS server's certificate: the
    /// connection then requires TLS and verifies the server.
    #[arg(long, env = "PINGAPP_NATS_TLS_CA", value_parser = parse_readable_file)]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a NATS server that verifies clients
    /// (with `--nats-tls-key`).
    #[arg(long, env = "PINGAPP_NATS_TLS_CERT", value_parser = parse_readable_file, requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM key of `--nats-tls-cert`.
    #[arg(long, env = "PINGAPP_NATS_TLS_KEY", value_parser = parse_readable_file, requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Most bytes of incomplete messages (sent in parts) held per
    /// subscription; at the bound the oldest are dropped.
    #[arg(long, env = "PINGAPP_NATS_MAX_CHUNK_BYTES", default_value_t = crate::bus::nats::DEFAULT_MAX_CHUNK_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..))]
    pub nats_max_chunk_bytes: usize,
    /// An incomplete message (sent in parts) is dropped this long after its
    /// first part, ms.
    #[arg(long, env = "PINGAPP_NATS_CHUNK_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub nats_chunk_timeout_ms: u64,
}

impl NatsArgs {
    /// The connection options these flags give.
    pub fn options(&self) -> crate::bus::nats::NatsOptions {
        crate::bus::nats::NatsOptions {
            creds: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
            chunks: crate::bus::nats::ChunkLimits {
                max_bytes: self.nats_max_chunk_bytes,
                timeout: std::time::Duration::from_millis(self.nats_chunk_timeout_ms),
            },
        }
    }
}

/// Checks a NATS identity file: readable, and a credentials file or a user
/// nkey seed ([`crate::bus::nats::identity_kind`]).
///
/// # Errors
/// A one-line explanation, for clap to show.
pub fn parse_nats_creds(s: &str) -> Result<PathBuf, String> {
    let path = parse_readable_file(s)?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read it: {e}"))?;
    crate::bus::nats::identity_kind(&text)?;
    Ok(path)
}

/// Checks that a file can be read now (a secret mounted wrongly is then
/// a clear start-up error rather than a failed connection later).
///
/// # Errors
/// A one-line explanation, for clap to show.
pub fn parse_readable_file(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    match std::fs::File::open(&path).and_then(|mut f| {
        let mut byte = [0u8; 1];
        std::io::Read::read(&mut f, &mut byte)
    }) {
        Ok(0) => Err("the file is empty".to_owned()),
        Ok(_) => Ok(path),
        Err(e) => Err(format!("cannot read it: {e}")),
    }
}

/// Parses a subject prefix: one NATS token of letters, digits, `-` and `_`.
///
/// # Errors
/// A one-line explanation, for clap to show.
pub fn parse_subject_prefix(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(s.to_owned())
    } else {
        Err("expected letters, digits, '-' or '_'".to_owned())
    }
}

/// Parses a duration: the one grammar of every flag and API parameter
/// that takes one. [humantime]'s units (`500ms`, `90s`, `15m`, `12h`, `30d`,
/// combined as `1m30s` or `1h 30m`), or bare seconds (`90`).
///
/// # Errors
/// A one-line explanation, for clap (or the API) to show.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(std::time::Duration::from_secs)
            .map_err(|_| format!("{s:?} is too long a duration"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 500ms, 90s, 15m, 1h30m or 30d ({e})"))
}

/// The machine's host name (`HOSTNAME`, else `/etc/hostname`, else
/// `localhost`): the default id of a gateway or replica.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_fold_to_one_line() {
        let text = "error: invalid value 'x' for '--listen <LISTEN>': invalid socket address syntax\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(text),
            "error: invalid value 'x' for '--listen <LISTEN>': invalid socket address syntax"
        );
        let text = "error: the following required arguments were not provided:\n  --nats-url <NATS_URL>\n\nUsage: gateway --nats-url <NATS_URL>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(text),
            "error: the following required arguments were not provided: --nats-url <NATS_URL>"
        );
    }

    #[test]
    fn urls_and_durations() {
        assert!(parse_database_url("sqlite://pingapp.db").is_ok());
        assert!(parse_database_url("postgres://u@h/db").is_ok());
        assert!(parse_database_url("mysql://h").is_err());
        assert!(parse_postgres_url("sqlite://x").is_err());
        assert!(parse_nats_url("nats://127.0.0.1:4222").is_ok());
        assert!(parse_nats_url("127.0.0.1:4222,nats://b:4223").is_ok());
        assert!(parse_nats_url("nats://h:notaport").is_err());
        assert!(parse_nats_url("").is_err());
        assert!(parse_nats_url("nats://a:4222,").is_err());
        assert!(parse_nats_url("http://h:4222").is_err());
        assert!(parse_nats_url("tls://h:4222, ws://h:8080").is_ok());
        assert_eq!(
            parse_duration("15m"),
            Ok(std::time::Duration::from_secs(900))
        );
        assert_eq!(
            parse_duration("30d"),
            Ok(std::time::Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            parse_duration("250ms"),
            Ok(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            parse_duration("1m 30s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert_eq!(parse_duration("90"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse_duration("0"), Ok(std::time::Duration::ZERO));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999").is_err());
        assert!(parse_subject_prefix("t_1-a").is_ok());
        assert!(parse_subject_prefix("a.b").is_err());
    }

    #[test]
    fn identity_files_must_be_readable() {
        let missing = parse_readable_file("/nonexistent/pingapp.creds").unwrap_err();
        assert!(missing.starts_with("cannot read it: "), "{missing}");
        let dir = std::env::temp_dir().join(format!("pingapp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(
            parse_readable_file(empty.to_str().unwrap()),
            Err("the file is empty".to_owned())
        );
        let seed = dir.join("seed");
        std::fs::write(&seed, b"SU...").unwrap();
        assert_eq!(
            parse_readable_file(seed.to_str().unwrap()),
            Ok(seed.clone())
        );
        assert_eq!(
            parse_nats_creds(seed.to_str().unwrap()),
            Err("neither a NATS credentials file nor a user nkey seed (SU...)".to_owned())
        );
        let real = nkeys::KeyPair::new_user().seed().unwrap();
        std::fs::write(&seed, format!("{real}\n")).unwrap();
        assert_eq!(parse_nats_creds(seed.to_str().unwrap()), Ok(seed));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
