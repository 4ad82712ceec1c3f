//! Dev-only test kit: real components on random ports, so tests prove what
//! runs in production instead of what a mock promises.
//!
//! - [`NatsServer`]: a `nats-server` with JetStream file storage in a temp
//!   dir, restartable on the same port and store.
//! - [`PgCluster`]: a throwaway PostgreSQL cluster that can be stopped and
//!   started again; [`fresh_database`]: a new database on the machine's
//!   server, for tests that never restart Postgres.
//! - [`Service`]: one of the workspace binaries (`gateway`, `presence`,
//!   `recorder`, `pingapp`, `echo-server`) as a child process with its log
//!   in a file, killed on drop and printed when the test fails; a binary
//!   that is missing or older than its sources is built first (`cargo
//!   build --workspace --bins`, once, under a lock).
//! - [`ws::Client`]: the one WebSocket client, speaking to a gateway like a
//!   page does.
//! - [`free_port`], [`unique_prefix`], [`eventually`]: what keeps parallel
//!   tests from sharing anything; [`block_on_own_thread`]: async clean-up
//!   from `Drop`.
//!
//! Nothing here skips: a missing `nats-server` or PostgreSQL, or a service
//! binary that does not build, panics with what to install or run.

mod nats;
mod otlp;
mod postgres;
mod service;
pub mod ws;

use std::collections::HashSet;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub use nats::NatsServer;
pub use otlp::{OtlpSink, ReceivedSpan};
pub use postgres::{Database, PgCluster, fresh_database};
pub use service::{Service, ServiceBuilder, http_status};

/// A free TCP port on 127.0.0.1, never handed out twice by this process.
///
/// Ports come from 20000..32768, below Linux's ephemeral range, so an
/// outgoing connection of a concurrent test cannot take the port between
/// this check and the server's bind (as it could a port from binding
/// `:0`), and a server restarted on the same port finds it free.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        let port = rand::random_range(20_000..32_768u16);
        if handed.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 between 20000 and 32767");
}

/// `127.0.0.1:`[`free_port`], for `--listen` and `--admin-listen`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A subject prefix (and stream name stem) no other test uses: `t` and 16
/// random hex digits.
pub fn unique_prefix() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

/// Polls `check` every 20 ms until it holds.
///
/// # Panics
/// It did not hold within `within`; the message names `what`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the future `work` makes to completion on a thread of its own, with
/// a current-thread runtime of its own, and waits for it; a panic there is
/// ignored. For async clean-up in `Drop`, which cannot await and may run on
/// the test's runtime, blocked in the drop: `work` runs on the new thread,
/// so connections it opens belong to the new runtime.
pub fn block_on_own_thread<F, Fut>(work: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(work());
    })
    .join();
}

/// Whether this process runs as root (then PostgreSQL must run as the
/// `postgres` user): `/proc/self` belongs to the effective user.
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `name` found in one of `dirs`, as an executable file.
pub(crate) fn find_in(dirs: impl IntoIterator<Item = PathBuf>, name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether failures should be explained loudly: the test is panicking, or
/// `TEST_LOG` is set.
pub(crate) fn show_logs() -> bool {
    std::thread::panicking() || std::env::var_os("TEST_LOG").is_some()
}
