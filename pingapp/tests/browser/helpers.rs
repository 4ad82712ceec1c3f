//! Test helpers: the real `pingapp` binary on a random (or a given) port,
//! chromedriver on a free port, and headless Chromium sessions driven
//! through it with fantoccini.
//!
//! Chromium and chromedriver come from Debian (`apt-get install chromium
//! chromium-driver`); when either is missing the tests fail and say so:
//! they never pass by skipping.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long any single expectation may wait.
pub const WAIT: Duration = Duration::from_secs(10);

// ---- the pingapp server ---------------------------------------------------

#[path = "../common/server.rs"]
mod server;

pub use server::Server;

impl Server {
    /// Starts `pingapp` listening on `listen`, with the database in `dir`.
    pub fn start_at(listen: &str, dir: tempfile::TempDir, extra: &[&str]) -> Server {
        Self::launch(listen, dir, extra, &[])
    }

    /// The page's origin, `http://ADDR`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends SIGTERM and waits for a clean exit; returns the database
    /// folder, for a server started again in its place.
    ///
    /// # Panics
    /// It did not exit within 20 s, or exited unsuccessfully.
    pub async fn terminate_keeping_dir(mut self) -> tempfile::TempDir {
        let status = self.terminate().await;
        assert!(status.success(), "pingapp exited with {status} on SIGTERM");
        self.into_dir()
    }
}

// ---- chromedriver and Chromium --------------------------------------------

const INSTALL: &str = "install them with `apt-get install chromium chromium-driver` (as root)";

/// `name` in `/usr/bin` or on `PATH`.
fn find_tool(name: &str) -> PathBuf {
    let usr_bin = Path::new("/usr/bin").join(name);
    if usr_bin.is_file() {
        return usr_bin;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("`{name}` not found: the browser tests need Chromium and chromedriver; {INSTALL}");
}

/// A chromedriver process on a free port, in its own process group; on drop
/// the whole group (chromedriver and every Chromium it started) is killed.
pub struct Driver {
    child: Child,
    port: u16,
    chromium: PathBuf,
}

impl Driver {
    /// Starts chromedriver and waits until it accepts connections.
    pub fn start() -> Driver {
        let chromium = find_tool("chromium");
        let chromedriver = find_tool("chromedriver");
        let port = testkit::free_port();
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL}", chromedriver.display()));
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Driver {
            child,
            port,
            chromium,
        }
    }

    /// A new browser (its own Chromium with a fresh profile) at 1280x900.
    pub async fn browser(&self) -> Browser {
        self.browser_with(false).await
    }

    /// A new browser; `perf_log` also records the DevTools network events
    /// (chromedriver's "performance" log).
    pub async fn browser_with(&self, perf_log: bool) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut logging = json!({"browser": "ALL"});
        if perf_log {
            logging["performance"] = json!("ALL");
        }
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": self.chromium.display().to_string(),
                "args": args,
            },
            "goog:loggingPrefs": logging,
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}/", self.port))
            .await
            .unwrap_or_else(|e| panic!("cannot start a Chromium session: {e}"));
        Browser {
            client,
            _profile: profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group id is chromedriver's pid (process_group(0)).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A chromedriver command outside the W3C set: POST `session/{id}/{path}`.
#[derive(Debug)]
struct VendorCommand {
    path: &'static str,
    body: Value,
}

impl WebDriverCompatibleCommand for VendorCommand {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/{}",
            session_id.unwrap_or_default(),
            self.path
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(self.body.to_string()))
    }
}

/// One Chromium session.
pub struct Browser {
    /// The WebDriver client.
    pub client: Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Navigates to `url` and waits for the load event.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and
    /// returns its result.
    pub async fn js_args(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script` (a function body) and returns its result.
    pub async fn js(&self, script: &str) -> Value {
        self.js_args(script, vec![]).await
    }

    /// Runs an asynchronous script: its last argument is the callback.
    pub async fn js_async(&self, script: &str) -> Value {
        self.client
            .execute_async(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("async script failed: {e}\n{script}"))
    }

    /// Polls `expr` (a JavaScript expression) every 50 ms until it is
    /// truthy, for at most `within`; returns its value. Panics naming
    /// `what` and the last value otherwise.
    pub async fn wait_for_within(&self, what: &str, expr: &str, within: Duration) -> Value {
        let script = format!("return ({expr});");
        let deadline = Instant::now() + within;
        loop {
            let v = self.js(&script).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                panic!("timed out after {within:?} waiting for {what}; last value: {v}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Browser::wait_for_within`] with the default 10 s.
    pub async fn wait_for(&self, what: &str, expr: &str) -> Value {
        self.wait_for_within(what, expr, WAIT).await
    }

    /// Waits until the page's status says `open`; returns this client's id.
    pub async fn wait_open(&self) -> String {
        self.wait_for(
            "the connection status to be open",
            "document.getElementById('status').dataset.state === 'open' && \
             document.getElementById('self-id').textContent !== '–' && \
             document.getElementById('self-id').textContent",
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
    }

    /// The rows of the public roster table.
    pub async fn roster(&self) -> Vec<Row> {
        let v = self.js(ROSTER_JS).await;
        serde_json::from_value::<Vec<Value>>(v)
            .unwrap()
            .into_iter()
            .map(|r| Row {
                id: r["id"].as_str().unwrap_or_default().to_owned(),
                name: r["name"].as_str().unwrap_or_default().to_owned(),
                gateway: r["gateway"].as_str().unwrap_or_default().to_owned(),
                last: r["last"].as_str().unwrap_or_default().to_owned(),
                median: r["median"].as_str().unwrap_or_default().to_owned(),
                jitter: r["jitter"].as_str().unwrap_or_default().to_owned(),
                own: r["own"].as_bool().unwrap_or_default(),
            })
            .collect()
    }

    /// Types `name` into the rename form and presses Change Name.
    pub async fn rename(&self, name: &str) {
        let input = self.client.find(Locator::Id("name")).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(name).await.unwrap();
        self.client
            .find(Locator::Id("change-name"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// A chromedriver vendor command.
    async fn vendor(&self, path: &'static str, body: Value) -> Value {
        self.client
            .issue_cmd(VendorCommand { path, body })
            .await
            .unwrap_or_else(|e| panic!("chromedriver {path}: {e}"))
    }

    /// Takes (and clears) a chromedriver log: `browser` (console messages,
    /// uncaught exceptions, failed loads, CSP violations) or `performance`.
    pub async fn log(&self, kind: &str) -> Vec<Value> {
        let v = self.vendor("se/log", json!({"type": kind})).await;
        serde_json::from_value(v).unwrap_or_default()
    }

    /// The browser log entries at level SEVERE or WARNING.
    pub async fn problems(&self) -> Vec<Value> {
        self.log("browser")
            .await
            .into_iter()
            .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
            .collect()
    }

    /// A Chrome DevTools Protocol command.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.vendor("goog/cdp/execute", json!({"cmd": cmd, "params": params}))
            .await
    }

    /// Ends the session (Chromium exits).
    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// One row of the roster table as the page shows it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub name: String,
    pub gateway: String,
    pub last: String,
    pub median: String,
    pub jitter: String,
    pub own: bool,
}

const ROSTER_JS: &str = r#"
return [...document.querySelectorAll('#roster tbody tr')].map((tr) => {
  const cell = (f) => tr.querySelector(`td[data-field="${f}"]`)?.textContent ?? '';
  return {
    id: tr.dataset.id,
    name: tr.querySelector('.name-text')?.textContent ?? '',
    gateway: tr.querySelector('td.gateway')?.textContent ?? '',
    last: cell('delay_time'),
    median: cell('median'),
    jitter: cell('jitter'),
    own: tr.dataset.self === 'true' && tr.classList.contains('self'),
  };
});
"#;

/// True when `text` is a number as the table shows delays (not "–").
pub fn is_ms(text: &str) -> bool {
    text.parse::<f64>().is_ok_and(|v| v.is_finite() && v >= 0.0)
}

// ---- plain WebSocket clients (other people on the public page) -----------

/// A v2 public client over a plain WebSocket (the test kit's client):
/// named, with a few delay samples, reading and discarding everything; it
/// leaves when dropped.
pub struct WsClient {
    /// Its id.
    pub id: String,
    sender: testkit::ws::Sender,
}

impl WsClient {
    /// Connects to `/ws/public/?v=2`, renames to `name` (if any) and sends
    /// `delays` as samples.
    pub async fn public(server: &Server, name: Option<&str>, delays: &[f64]) -> WsClient {
        let mut c = testkit::ws::Client::connect(server.addr, "/ws/public/?v=2").await;
        let welcome = c.recv().await;
        assert_eq!(welcome["command"], "welcome", "{welcome}");
        let id = welcome["channel_name"].as_str().unwrap().to_owned();
        if let Some(name) = name {
            c.rename(name).await;
        }
        for (i, d) in delays.iter().enumerate() {
            c.sample(*d, i as u64 + 1).await;
        }
        WsClient {
            id,
            sender: c.into_sender(),
        }
    }

    /// Sends one JSON message.
    pub async fn send(&mut self, v: Value) {
        self.sender.send(v).await;
    }

    /// Sends a ping and a sample of `ms` for it: the gateway handles a
    /// connection's frames in order, so the pong the sample needs
    /// (docs/security.md, "Samples") is sent before the sample arrives.
    pub async fn sample(&mut self, ms: f64, seq: u64) {
        self.send(serde_json::json!({"command": "ping", "seq": seq}))
            .await;
        self.send(serde_json::json!({"command": "delay_time", "delay_time": ms, "seq": seq}))
            .await;
    }
}

// ---- a crowd: thousands of cheap public clients ------------------------------

/// `n` public v2 clients over plain WebSockets, each on its own task:
/// client `i` is named by `name(i)` and reports one sample of `delay(i)`
/// ms; each asks for an empty view (`limit` 0, docs/protocol.md) so that
/// the room's frames to the crowd stay small, and discards everything it
/// gets. [`Crowd::send`] makes client `i` send more; all leave when the
/// crowd is dropped.
pub struct Crowd {
    /// Every client's id, by index.
    pub ids: Vec<String>,
    /// The clients whose connection the server ended (not [`Crowd::leave`]).
    gone: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<usize>>>,
    controls: Vec<tokio::sync::mpsc::UnboundedSender<Value>>,
    tasks: tokio::task::JoinSet<()>,
}

/// What [`Crowd::send`] asks a client to do.
pub enum Act {
    /// Ping and report a sample of this many ms for it.
    Sample(f64),
    /// Rename.
    Rename(String),
}

impl Crowd {
    /// Connects the crowd, 64 handshakes at a time; panics naming the
    /// first failure (e.g. `ulimit -n` too low: it needs one descriptor
    /// per client in this process and in the server).
    pub async fn join(
        server: &Server,
        n: usize,
        name: impl Fn(usize) -> String,
        delay: impl Fn(usize) -> f64,
    ) -> Crowd {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};

        let url = format!("ws://{}/ws/public/?v=2", server.addr);
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let gone = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let mut tasks = tokio::task::JoinSet::new();
        let mut pending = Vec::with_capacity(n);
        let mut controls = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
            let (id_tx, id_rx) = tokio::sync::oneshot::channel::<String>();
            controls.push(tx);
            pending.push(id_rx);
            let (url, gate, gone) = (url.clone(), gate.clone(), gone.clone());
            let (name, delay) = (name(i), delay(i));
            tasks.spawn(async move {
                let permit = gate.acquire_owned().await.unwrap();
                let (mut ws, _) =
                    tokio_tungstenite::connect_async_with_config(&url, Some(config), true)
                        .await
                        .unwrap_or_else(|e| {
                            panic!("crowd client {i}: {e} (per-IP caps not off, or ulimit -n too low?)")
                        });
                let welcome = loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => break t,
                        Some(Ok(_)) => continue,
                        other => panic!("crowd client {i}: no welcome: {other:?}"),
                    }
                };
                let welcome: Value = serde_json::from_str(welcome.as_str()).unwrap();
                let id = welcome["channel_name"].as_str().unwrap().to_owned();
                let mut seq = 1;
                for v in [
                    json!({"command": "view", "limit": 0}),
                    json!({"command": "change_name", "name": name}),
                    json!({"command": "ping", "seq": seq}),
                    json!({"command": "delay_time", "delay_time": delay, "seq": seq}),
                ] {
                    ws.send(Message::text(v.to_string())).await.unwrap();
                }
                drop(permit);
                let _ = id_tx.send(id);
                loop {
                    tokio::select! {
                        frame = ws.next() => match frame {
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                                gone.lock().unwrap().insert(i);
                                return;
                            }
                            Some(Ok(_)) => {}
                        },
                        act = rx.recv() => match act {
                            Some(v) => {
                                let mut frames = vec![v.clone()];
                                if v["command"] == "delay_time" {
                                    seq += 1;
                                    frames = vec![
                                        json!({"command": "ping", "seq": seq}),
                                        json!({"command": "delay_time", "delay_time": v["delay_time"], "seq": seq}),
                                    ];
                                }
                                for f in frames {
                                    if ws.send(Message::text(f.to_string())).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            None => {
                                let _ = ws.close(None).await;
                                return;
                            }
                        },
                    }
                }
            });
        }
        let mut ids = Vec::with_capacity(n);
        for (i, rx) in pending.into_iter().enumerate() {
            match rx.await {
                Ok(id) => ids.push(id),
                Err(_) => {
                    // The task panicked: surface its message.
                    while let Some(done) = tasks.join_next().await {
                        if let Err(e) = done
                            && e.is_panic()
                        {
                            std::panic::resume_unwind(e.into_panic());
                        }
                    }
                    panic!("crowd client {i} ended before its welcome");
                }
            }
        }
        Crowd {
            ids,
            gone,
            controls,
            tasks,
        }
    }

    /// The clients the server disconnected so far (a slow reader closed
    /// with 1013, say): they left the room without [`Crowd::leave`].
    pub fn gone(&self) -> std::collections::BTreeSet<usize> {
        self.gone.lock().unwrap().clone()
    }

    /// Makes client `i` act; false when it is gone.
    pub fn send(&self, i: usize, act: Act) -> bool {
        let v = match act {
            Act::Sample(ms) => json!({"command": "delay_time", "delay_time": ms}),
            Act::Rename(name) => json!({"command": "change_name", "name": name}),
        };
        self.controls[i].send(v).is_ok()
    }

    /// Client `i` leaves (closes its connection).
    pub fn leave(&mut self, i: usize) {
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        self.controls[i] = tx;
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}
