//! The workspace's service binaries as child processes.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::nats::wait_exit;
use crate::{show_logs, tail};

/// How long [`Service::wait_ready`] waits.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// What to start: a binary of the workspace, its arguments and environment.
#[derive(Debug, Clone)]
pub struct ServiceBuilder {
    binary: String,
    /// A binary given by path (`env!("CARGO_BIN_EXE_..")`), else found by
    /// [`Service::binary`].
    path: Option<PathBuf>,
    label: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl ServiceBuilder {
    /// Adds one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Names it in logs and messages (default: the binary's name), e.g.
    /// `gateway gw-a`.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Starts the process.
    ///
    /// # Panics
    /// The binary is not built (the message says how to build it), or it
    /// cannot be run.
    pub fn spawn(self) -> Service {
        let mut service = self.prepare();
        service.spawn_child(false);
        service
    }

    /// Starts the process and waits for the first line it prints on
    /// stdout (a binary announcing the addresses it bound, e.g. `pingapp
    /// listening on http://..`); returns it with the service. The rest of
    /// stdout goes to the log like stderr.
    ///
    /// # Panics
    /// It cannot be run, or exited without printing a line (its log is in
    /// the message).
    pub fn spawn_announced(self) -> (Service, String) {
        let mut service = self.prepare();
        let stdout = service.spawn_child(true);
        let mut stdout = std::io::BufReader::new(stdout.expect("piped stdout"));
        let mut line = String::new();
        let read = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap_or(0);
        if read == 0 {
            service.kill();
            panic!(
                "{} exited without announcing itself; its log:\n{}",
                service.spec.label,
                tail(&service.log, 60)
            );
        }
        let log = service.log.clone();
        std::thread::spawn(move || {
            if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(log) {
                let _ = std::io::copy(&mut stdout, &mut file);
            }
        });
        (service, line.trim_end().to_owned())
    }

    fn prepare(self) -> Service {
        let bin = match &self.path {
            Some(path) => path.clone(),
            None => Service::binary(&self.binary),
        };
        let dir = tempfile::Builder::new()
            .prefix("testkit-svc")
            .tempdir()
            .expect("temp dir for the service log");
        let log = dir.path().join(format!("{}.log", self.binary));
        Service {
            spec: self,
            bin,
            child: None,
            log,
            _dir: dir,
        }
    }
}

/// A running service binary, killed on drop. Its stdout and stderr go to a
/// log file, printed (its last lines) when the test fails or `TEST_LOG` is
/// set.
pub struct Service {
    spec: ServiceBuilder,
    bin: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl Service {
    /// Prepares to start the workspace binary `name` (`gateway`,
    /// `presence`, `recorder`, `pingapp`, ...).
    ///
    /// The environment is the test's minus the services' own settings
    /// (`NATS_URL`, `DATABASE_URL`, `PINGAPP_*`), so only what the test
    /// passes counts; `RUST_LOG` is `TEST_LOG`'s value or `info`.
    pub fn command(name: &str) -> ServiceBuilder {
        ServiceBuilder {
            binary: name.to_owned(),
            path: None,
            label: name.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// Like [`Service::command`], for the binary at `path`: a binary of the
    /// test's own package, `env!("CARGO_BIN_EXE_<name>")`, which cargo
    /// builds before the test.
    pub fn command_at(path: impl Into<PathBuf>) -> ServiceBuilder {
        let path = path.into();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "service".to_owned());
        ServiceBuilder {
            path: Some(path),
            ..Service::command(&name)
        }
    }

    /// The path of the workspace binary `name`: next to the running test
    /// executable's folder (`target/<profile>/deps/..`), or in
    /// `PINGAPP_BIN_DIR`.
    ///
    /// At the first call, when any workspace binary is missing or older
    /// than one of its sources (cargo's dep-info file `<name>.d` lists
    /// them), the kit runs `cargo build --workspace --bins` once for the
    /// whole test process, in the same target folder and profile, under a
    /// file lock so concurrent test binaries build once between them.
    /// Every binary is checked before the first one starts, so no test's
    /// service runs (or waits for readiness) during that build. Testing a
    /// stale binary would prove nothing about the code.
    ///
    /// # Panics
    /// It is still missing or stale after that build (or, with
    /// `PINGAPP_BIN_DIR`, at all); the message says what to run.
    pub fn binary(name: &str) -> PathBuf {
        let dir = bin_dir();
        if std::env::var_os("PINGAPP_BIN_DIR").is_none() {
            ensure_built(&dir);
        }
        let bin = dir.join(name);
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build --workspace --bins`",
            bin.display()
        );
        if let Some(newer) = newer_source(&bin) {
            panic!(
                "{} is older than {}: run `cargo build --workspace --bins`",
                bin.display(),
                newer.display()
            );
        }
        bin
    }

    /// Its label.
    pub fn label(&self) -> &str {
        &self.spec.label
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.note("killed with SIGKILL");
        }
    }

    /// Sends SIGTERM and waits (up to 20 s) for the exit status.
    ///
    /// # Panics
    /// It is not running, or did not exit in time (then it is killed).
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.spec.label));
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {} failed", child.id());
        match wait_exit(&mut child, Duration::from_secs(20)).await {
            Some(status) => {
                self.note(&format!("exited after SIGTERM: {status}"));
                status
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within 20 s of SIGTERM; its log:\n{}",
                    self.spec.label,
                    tail(&self.log, 60)
                );
            }
        }
    }

    /// Starts it again with the same arguments and environment (after
    /// [`Service::kill`] or [`Service::terminate`]).
    ///
    /// # Panics
    /// It is still running.
    pub fn start_again(&mut self) {
        assert!(!self.is_running(), "{} is still running", self.spec.label);
        self.child = None;
        self.spawn_child(false);
    }

    /// Polls `http://{admin}/readyz` until it answers 200.
    ///
    /// # Panics
    /// The process exited, or it was not ready within 20 s; the message
    /// holds its log.
    pub async fn wait_ready(&mut self, admin: SocketAddr) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "{} exited ({status}) before it was ready; its log:\n{}",
                    self.spec.label,
                    tail(&self.log, 60)
                );
            }
            if http_status(admin, "/readyz").await == Some(200) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{} was not ready within {READY_TIMEOUT:?} at http://{admin}/readyz; its \
                     log:\n{}",
                    self.spec.label,
                    tail(&self.log, 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Spawns the process; its stdout piped (and returned) if `pipe_stdout`,
    /// else into the log.
    fn spawn_child(&mut self, pipe_stdout: bool) -> Option<std::process::ChildStdout> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("service log file");
        let _ = writeln!(log, "----- testkit: starting {} -----", self.spec.label);
        let mut cmd = Command::new(&self.bin);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k == "NATS_URL" || k == "DATABASE_URL" || k.starts_with("PINGAPP_") {
                cmd.env_remove(&key);
            }
        }
        let rust_log = std::env::var("TEST_LOG")
            .ok()
            .filter(|v| !v.is_empty() && v != "1")
            .unwrap_or_else(|| "info".to_owned());
        cmd.env("RUST_LOG", rust_log)
            .env("RUST_BACKTRACE", "1")
            .envs(self.spec.envs.iter().map(|(k, v)| (k, v)))
            .args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(if pipe_stdout {
                Stdio::piped()
            } else {
                Stdio::from(log.try_clone().expect("log file"))
            })
            .stderr(log);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let stdout = child.stdout.take();
        self.child = Some(child);
        stdout
    }

    /// Appends a line of the test's own to the log.
    fn note(&self, what: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "----- testkit: {} {what} -----", self.spec.label);
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        if show_logs() {
            eprintln!(
                "----- {} (last lines of its log) -----\n{}",
                self.spec.label,
                tail(&self.log, 80)
            );
        }
    }
}

/// Where the workspace binaries are: `PINGAPP_BIN_DIR`, else the folder
/// above the running test executable's `deps` folder.
fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PINGAPP_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The binaries of the workspace that tests start by name.
const WORKSPACE_BINS: &[&str] = &[
    "gateway",
    "presence",
    "recorder",
    "pingapp",
    "loadgen",
    "echo-server",
];

/// Once per test process: builds the workspace's binaries in `dir` if any
/// is missing or stale. Callers wait for the first check (and build).
fn ensure_built(dir: &Path) {
    static CHECKED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if *checked {
        return;
    }
    let stale = WORKSPACE_BINS
        .iter()
        .map(|name| dir.join(name))
        .any(|bin| !bin.is_file() || newer_source(&bin).is_some());
    if stale {
        build_workspace_bins(dir);
    }
    *checked = true;
}

/// Runs `cargo build --workspace --bins` for the profile whose output
/// folder is `dir` (`target/debug`, `target/release`, `target/<profile>`);
/// concurrent test processes wait for each other on a lock file in `dir`
/// (cargo then finds everything fresh). A failed build
/// panics with its status; cargo's own output went to the test's stderr.
fn build_workspace_bins(dir: &Path) {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".testkit-build.lock"))
        .unwrap_or_else(|e| panic!("lock file in {}: {e}", dir.display()));
    lock.lock().expect("lock the testkit build lock file");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--workspace", "--bins"]);
    match dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    if let Some(target) = dir.parent() {
        cmd.arg("--target-dir").arg(target);
    }
    eprintln!("testkit: a service binary is missing or stale: running {cmd:?}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo ({e}): run `cargo build --workspace --bins`"));
    assert!(
        status.success(),
        "`cargo build --workspace --bins` failed ({status}): fix the build, then run the tests again"
    );
    // The lock file is unlocked when `lock` is dropped here.
}

/// A source file of `bin` modified after it was built, according to
/// cargo's dep-info file next to it (none if that file is missing).
fn newer_source(bin: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(bin).ok()?.modified().ok()?;
    let dep_info = std::fs::read_to_string(bin.with_extension("d")).ok()?;
    // "TARGET: DEP DEP ...", spaces inside paths escaped as "\ ".
    let (_, deps) = dep_info.split_once(": ")?;
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|n| n.is_whitespace()) => {
                current.push(chars.next().unwrap_or(' '));
            }
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    paths.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(PathBuf::from(current));
    }
    paths.into_iter().find(|p| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified > built)
    })
}

/// The status of `GET http://{addr}{path}`, or `None` if nothing answered
/// within 2 s. A bare HTTP/1.1 client, enough for probes.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = Vec::with_capacity(64);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        // "HTTP/1.1 200 OK"
        let line = String::from_utf8_lossy(&head);
        line.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}
