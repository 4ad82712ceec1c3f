//! The real `pingapp` binary as a child process (the test kit's
//! [`testkit::Service`]), shared by the standalone and browser test
//! binaries (each includes it with `#[path = "../common/server.rs"] mod
//! server;` and adds what only it needs in an `impl Server` of its own).

use std::net::SocketAddr;
use std::process::ExitStatus;

use testkit::Service;

/// A running `pingapp` process, killed on drop (its log printed when the
/// test fails or `TEST_LOG` is set).
pub struct Server {
    service: Service,
    /// Public listener.
    pub addr: SocketAddr,
    /// Admin listener.
    #[allow(dead_code, reason = "the browser tests do not read it")]
    pub admin: SocketAddr,
    /// Keeps the database folder alive.
    pub dir: tempfile::TempDir,
}

impl Server {
    /// Starts `pingapp` on a random port with a fresh SQLite database and
    /// `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        Self::launch("127.0.0.1:0", tempfile::tempdir().unwrap(), extra, &[])
    }

    /// Starts `pingapp` listening on `listen` (its admin listener on a
    /// random port), with the database in `dir`, `extra` flags and extra
    /// environment `env`, and waits for the line announcing its addresses.
    pub fn launch(
        listen: &str,
        dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let db = format!("sqlite://{}/pingapp.db", dir.path().display());
        // Fast roster ticks and heartbeats, unless the test sets its own
        // (a test with thousands of clients keeps the defaults).
        let fast: &[&str] = if extra.contains(&"--roster-tick-ms") {
            &[]
        } else {
            &["--roster-tick-ms", "50", "--heartbeat-interval-ms", "200"]
        };
        let mut builder = Service::command_at(env!("CARGO_BIN_EXE_pingapp"))
            .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .args(["--database-url", &db])
            .args(fast)
            // Tests poll the API every 20 ms from one address while they
            // wait for the recorder: no per-IP API budget
            // (docs/security.md).
            .args(["--max-api-requests-per-ip-per-second", "0"])
            .args(extra);
        for (key, value) in env {
            builder = builder.env(key, value);
        }
        let (service, line) = builder.spawn_announced();
        // "pingapp listening on http://ADDR (admin http://ADDR)"
        let mut addrs = line.split("http://").skip(1).map(|s| {
            s.trim_end_matches([')', '\n', ' '])
                .split(' ')
                .next()
                .and_then(|a| a.parse().ok())
        });
        let addr = addrs
            .next()
            .flatten()
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        let admin = addrs
            .next()
            .flatten()
            .unwrap_or_else(|| panic!("no admin address in {line:?}"));
        Server {
            service,
            addr,
            admin,
            dir,
        }
    }

    /// The HTTP URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits (up to 20 s) for the exit status.
    ///
    /// # Panics
    /// It is not running, or did not exit in time (then it is killed).
    pub async fn terminate(&mut self) -> ExitStatus {
        self.service.terminate().await
    }

    /// Takes the database folder (after [`Server::terminate`]), for a
    /// server started again in its place.
    pub fn into_dir(mut self) -> tempfile::TempDir {
        self.service.kill();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}
