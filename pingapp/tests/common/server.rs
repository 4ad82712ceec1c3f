//! The real `pingapp` binary as a child process, shared by the standalone
//! and browser test binaries (each includes it with
//! `#[path = "../common/server.rs"] mod server;` and adds what only it
//! needs in an `impl Server` of its own).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// A running `pingapp` process, killed on drop.
pub struct Server {
    child: Option<Child>,
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
    /// environment `env`.
    pub fn launch(
        listen: &str,
        dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let db = format!("sqlite://{}/pingapp.db", dir.path().display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_pingapp"))
            .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .args(["--database-url", &db])
            .args(["--roster-tick-ms", "50", "--heartbeat-interval-ms", "200"])
            .args(extra)
            .env_remove("NATS_URL")
            .env_remove("DATABASE_URL")
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(if std::env::var("TEST_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start the pingapp binary");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
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
            child: Some(child),
            addr,
            admin,
            dir,
        }
    }

    /// The HTTP URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits (up to 15 s) for the exit status.
    ///
    /// # Panics
    /// It is not running, or did not exit in time (then it is killed).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        for _ in 0..300 {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("pingapp did not exit within 15 s of SIGTERM");
    }

    /// Takes the database folder (after [`Server::terminate`]), for a
    /// server started again in its place.
    pub fn into_dir(mut self) -> tempfile::TempDir {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
