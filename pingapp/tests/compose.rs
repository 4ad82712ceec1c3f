//! System test of the deployment: the real images, the real compose stack.
//!
//! `deploy/local/stack.sh up` builds the base images from Debian packages
//! (kept between runs), the service image from the binaries this test run
//! was built with (the workspace's own target folder, debug profile under
//! `scripts/test`), and starts `docker-compose.yml` under podman: NATS,
//! Postgres, recorder, presence, two gateways behind HAProxy, Prometheus.
//! The test then drives the public and private pages' protocol through
//! HAProxy, checks that samples reach Postgres, that Prometheus scrapes every
//! service and sees every family of docs/metrics.md (and every metric the
//! Grafana dashboard and the alert rules query), stops one gateway and
//! sees its clients reconnect through the other, and brings the stack down
//! with nothing left running.
//!
//! Needs root, podman, docker-compose, mmdebstrap, curl and binutils;
//! `scripts/setup-test-deps.sh` installs them. A missing tool fails the test
//! with what to install: it never passes by skipping.
//!
//! Run with `cargo build --workspace --bins && cargo test -p pingapp --test compose`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long one protocol expectation may wait for a frame.
const FRAME_WAIT: Duration = Duration::from_secs(15);
/// Prometheus scrapes every 15 s (deploy/prometheus.yml): room for a few.
const SCRAPE_WAIT: Duration = Duration::from_secs(120);
/// `stack.sh up` on a new machine builds two base images first (minutes).
const UP_LIMIT: Duration = Duration::from_secs(900);
/// Any other stack step (`down`, a compose command).
const STEP_LIMIT: Duration = Duration::from_secs(120);
/// The services the PingApp images run, each with an admin `/readyz`.
const PINGAPP_SERVICES: [&str; 4] = ["recorder", "presence", "gateway-1", "gateway-2"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository root exists")
}

fn require(tool: &str, install: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not on PATH: install {install} (scripts/setup-test-deps.sh installs every \
         tool this system test needs; see deploy/README.md)"
    );
}

/// The folder holding this run's service binaries (`target/<profile>`):
/// the test binary lives in its `deps/` folder.
fn binaries_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf();
    for bin in ["gateway", "presence", "recorder", "pingapp"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: build the service binaries first (`cargo build --workspace --bins`, \
             as scripts/test does)",
            dir.join(bin).display()
        );
    }
    dir
}

/// One compose project started by `deploy/local/stack.sh up`; `down` (or
/// dropping it, on a failed test) removes everything it started.
struct Stack {
    project: String,
    /// The service image, tagged for this run alone (removed by `down`).
    image: String,
    http_port: u16,
    prometheus_port: u16,
    stats_port: u16,
    down: bool,
}

impl Stack {
    fn up() -> Stack {
        let mut stack = Stack {
            project: format!("pingapp-systest-{}", std::process::id()),
            image: format!("localhost/pingapp:systest-{}", std::process::id()),
            http_port: testkit::free_port(),
            prometheus_port: testkit::free_port(),
            stats_port: testkit::free_port(),
            down: false,
        };
        let bin_dir = binaries_dir();
        let out = stack
            .script(UP_LIMIT, &["up"])
            .env("PINGAPP_BIN_DIR", &bin_dir)
            .output()
            .expect("bash runs deploy/local/stack.sh");
        if !out.status.success() {
            let logs = stack.compose(&["logs", "--no-color", "--tail", "40"]);
            stack.down = true;
            let down = stack.script(STEP_LIMIT, &["down"]).output();
            let _ = podman(&["rmi", &stack.image]);
            panic!(
                "`deploy/local/stack.sh up` failed ({}; 124 is a time-out){}\n{}\n--- compose logs ---\n{}\n--- down ---\n{down:?}",
                out.status,
                if out.status.code() == Some(127) {
                    ": a tool is missing, install what it names"
                } else {
                    ""
                },
                text(&out),
                text(&logs)
            );
        }
        stack
    }

    /// `bash deploy/local/stack.sh ARGS` for this project and its ports,
    /// ended after `limit` (no hung step can hold the test).
    fn script(&self, limit: Duration, args: &[&str]) -> Command {
        let root = repo_root();
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=10")
            .arg(limit.as_secs().to_string())
            .arg("bash")
            .arg(root.join("deploy/local/stack.sh"))
            .args(args)
            .current_dir(&root)
            .env("PINGAPP_STACK_PROJECT", &self.project)
            .env("PINGAPP_IMAGE", &self.image)
            // The pages on loopback only, like the other published ports.
            .env("PINGAPP_HTTP_PORT", format!("127.0.0.1:{}", self.http_port))
            .env("PINGAPP_PROMETHEUS_PORT", self.prometheus_port.to_string())
            .env("PINGAPP_HAPROXY_STATS_PORT", self.stats_port.to_string())
            // The test polls the API every 20 ms from one address, past the
            // default per-address budget (docs/security.md).
            .env("PINGAPP_API_BUDGET", "0");
        cmd
    }

    /// `docker-compose ARGS` on this stack; the output, whatever the status.
    fn compose(&self, args: &[&str]) -> Output {
        let mut all = vec!["compose"];
        all.extend_from_slice(args);
        self.script(STEP_LIMIT, &all)
            .output()
            .expect("bash runs deploy/local/stack.sh")
    }

    /// One statement by psql in the Postgres container as `user` (local
    /// connections are trusted there), stopping at the first error;
    /// unaligned tuples only.
    fn psql(&self, user: &str, sql: &str) -> Output {
        self.compose(&[
            "exec",
            "-T",
            "postgres",
            "psql",
            "-h",
            "/run/postgresql",
            "-U",
            user,
            "-d",
            "pingapp",
            "-v",
            "ON_ERROR_STOP=1",
            "-tAc",
            sql,
        ])
    }

    /// `docker-compose ARGS`, which must succeed; its standard output.
    fn compose_ok(&self, args: &[&str]) -> String {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed: {}\n{}",
            out.status,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn base(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    async fn get(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let mut req = http_client().get(format!("http://{}{path}", self.base()));
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `/api/roster` as client id -> gateway.
    async fn roster(&self) -> BTreeMap<String, String> {
        let (_, roster) = self.get("/api/roster", None).await;
        let field = |x: &Value, k: &str| x[k].as_str().unwrap_or_default().to_owned();
        roster["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| (field(x, "channel_name"), field(x, "gateway")))
            .collect()
    }

    /// Every metric name Prometheus holds series of.
    async fn metric_names(&self) -> BTreeSet<String> {
        let names = self.prometheus("/api/v1/label/__name__/values").await;
        names["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    }

    async fn prometheus(&self, path: &str) -> Value {
        let url = format!("http://127.0.0.1:{}{path}", self.prometheus_port);
        let resp = http_client()
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        resp.json().await.unwrap_or(Value::Null)
    }

    /// Brings the stack down and checks that nothing of it is left.
    fn down(&mut self) {
        self.down = true;
        let out = self
            .script(STEP_LIMIT, &["down"])
            .output()
            .expect("bash runs deploy/local/stack.sh");
        assert!(
            out.status.success(),
            "`deploy/local/stack.sh down` failed: {}\n{}",
            out.status,
            text(&out)
        );
        let rmi = podman(&["rmi", &self.image]);
        assert!(
            rmi.status.success(),
            "podman rmi {}: {}",
            self.image,
            text(&rmi)
        );
        let label = format!("label=com.docker.compose.project={}", self.project);
        for what in [
            vec!["ps", "-aq"],
            vec!["volume", "ls", "-q"],
            vec!["network", "ls", "-q"],
        ] {
            let mut args = what.clone();
            args.extend(["--filter", label.as_str()]);
            let out = podman(&args);
            assert!(out.status.success(), "podman {args:?}: {}", text(&out));
            assert!(
                out.stdout.iter().all(u8::is_ascii_whitespace),
                "after down, podman {args:?} still lists: {}",
                text(&out)
            );
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::thread::panicking() {
            let logs = self.compose(&["logs", "--no-color", "--tail", "60"]);
            eprintln!("--- compose logs ---\n{}", text(&logs));
        }
        let _ = self.script(STEP_LIMIT, &["down"]).output();
        let _ = podman(&["rmi", &self.image]);
    }
}

/// Podman with the project's settings (deploy/local/containers.conf).
fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .env(
            "CONTAINERS_CONF",
            repo_root().join("deploy/local/containers.conf"),
        )
        .output()
        .expect("podman runs")
}

fn text(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client of the pages' protocol, through HAProxy. A task
/// reads its frames all the time, as a browser does, so it answers the
/// gateway's keepalive Pings while the test waits on something else (an
/// unread client would be closed as silent after 30 s).
struct Ws {
    sink: SplitSink<Stream, Message>,
    /// Text frames as JSON, then how the connection ended (an `Err`).
    frames: mpsc::UnboundedReceiver<Result<Value, String>>,
    /// The reading task: aborted on drop, which closes the connection.
    reader: tokio::task::AbortHandle,
}

impl Drop for Ws {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// An HTTP client that gives up on a request after a while.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(FRAME_WAIT)
        .build()
        .expect("an HTTP client")
}

/// Reads `stream` until it ends, handing text frames and the end to `tx`.
async fn read_frames(
    mut stream: SplitStream<Stream>,
    tx: mpsc::UnboundedSender<Result<Value, String>>,
) {
    loop {
        let frame = match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                serde_json::from_str(t.as_str()).map_err(|e| e.to_string())
            }
            Some(Ok(Message::Close(c))) => Err(format!(
                "close {}",
                c.map(|c| u16::from(c.code)).unwrap_or(0)
            )),
            Some(Ok(_)) => continue,
            Some(Err(e)) => Err(format!("error {e}")),
            None => Err("ended".into()),
        };
        let end = frame.is_err();
        if tx.send(frame).is_err() || end {
            return;
        }
    }
}

/// What a v2 client learns from its welcome frame.
struct Welcome {
    id: String,
    gateway: String,
    token: String,
}

impl Ws {
    async fn connect(base: &str, path: &str) -> Result<Ws, String> {
        let connect = tokio_tungstenite::connect_async(format!("ws://{base}{path}"));
        let (stream, _) = tokio::time::timeout(FRAME_WAIT, connect)
            .await
            .map_err(|_| format!("connect {path}: no answer within {FRAME_WAIT:?}"))?
            .map_err(|e| format!("connect {path}: {e}"))?;
        let (sink, stream) = stream.split();
        let (tx, frames) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_frames(stream, tx)).abort_handle();
        Ok(Ws {
            sink,
            frames,
            reader,
        })
    }

    /// Connects a v2 client to `page` and reads its welcome.
    async fn v2(base: &str, page: &str) -> Result<(Ws, Welcome), String> {
        let mut ws = Ws::connect(base, &format!("/ws/{page}/?v=2")).await?;
        let w = ws.next_json().await?;
        if w["command"] != "welcome" {
            return Err(format!("first frame is not a welcome: {w}"));
        }
        let field = |k: &str| w[k].as_str().unwrap_or_default().to_owned();
        let welcome = Welcome {
            id: field("channel_name"),
            gateway: field("gateway"),
            token: field("token"),
        };
        Ok((ws, welcome))
    }

    async fn send(&mut self, v: Value) {
        self.sink
            .send(Message::text(v.to_string()))
            .await
            .expect("send a frame");
    }

    /// The next text frame as JSON, or how the connection ended.
    async fn next_json(&mut self) -> Result<Value, String> {
        match tokio::time::timeout(FRAME_WAIT, self.frames.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => Err("ended".into()),
            Err(_) => Err(format!("no frame within {FRAME_WAIT:?}")),
        }
    }

    /// Reads frames until one has `command` and satisfies `pred`.
    async fn until(&mut self, command: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + 2 * FRAME_WAIT;
        loop {
            let v = self
                .next_json()
                .await
                .unwrap_or_else(|e| panic!("waiting for {command}: {e}"));
            if v["command"] == command && pred(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no matching {command} within {:?} (last frame: {v})",
                2 * FRAME_WAIT
            );
        }
    }

    /// The next frame, whatever it is; `what` names what the caller waits
    /// for, in the panic message.
    async fn until_any(&mut self, what: &str) -> Value {
        self.next_json()
            .await
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
    }

    /// Reads until the server closes; the close code (0 without a frame).
    async fn close_code(&mut self) -> u16 {
        let deadline = tokio::time::Instant::now() + 4 * FRAME_WAIT;
        loop {
            match self.next_json().await {
                Ok(_) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "not closed within {:?}",
                    4 * FRAME_WAIT
                ),
                Err(e) => {
                    return e
                        .strip_prefix("close ")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or_else(|| panic!("connection ended without a close frame: {e}"));
                }
            }
        }
    }
}

/// The families docs/metrics.md documents.
fn documented_families() -> Vec<String> {
    let doc = std::fs::read_to_string(repo_root().join("docs/metrics.md"))
        .expect("docs/metrics.md is readable");
    let families: Vec<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("pingapp_"))
        .map(str::to_owned)
        .collect();
    assert!(families.len() > 30, "docs/metrics.md lists the families");
    families
}

/// Sample ids stored for `id` (public, or private with its token).
async fn stored_seqs(stack: &Stack, id: &str, token: Option<&str>) -> Vec<u64> {
    let (status, body) = stack
        .get(&format!("/api/clients/{id}/samples"), token)
        .await;
    if status != 200 {
        return Vec::new();
    }
    body["samples"]
        .as_array()
        .map(|s| s.iter().filter_map(|x| x["seq"].as_u64()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_serves_scrapes_fails_over_and_comes_down_clean() {
    require("bash", "bash");
    require(
        "podman",
        "podman (apt-get install podman netavark aardvark-dns runc)",
    );
    require(
        "docker-compose",
        "docker-compose (apt-get install docker-compose)",
    );
    require("mmdebstrap", "mmdebstrap (apt-get install mmdebstrap)");
    require("curl", "curl (apt-get install curl)");
    require("objcopy", "binutils (apt-get install binutils)");

    let mut stack = tokio::task::spawn_blocking(Stack::up).await.unwrap();
    let base = stack.base();

    // Every PingApp service answers /readyz on its admin port, asked from
    // inside the stack's network (the Prometheus container has curl).
    for svc in PINGAPP_SERVICES {
        let url = format!("http://{svc}:9000/readyz");
        let mut tries = 0;
        loop {
            tries += 1;
            let out = stack.compose(&["exec", "-T", "prometheus", "curl", "-fsS", "-m", "3", &url]);
            if out.status.success() {
                break;
            }
            // The stack's DNS (aardvark-dns) can lag a just-started
            // container by a moment; a service that is not ready fails here.
            assert!(tries < 15, "{url} did not answer 200: {}", text(&out));
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    // The PingApp containers run as the image's non-root user on a
    // read-only root file system, as the Kubernetes manifests expect.
    for svc in PINGAPP_SERVICES {
        let id = stack.compose_ok(&["ps", "-q", svc]);
        let out = podman(&[
            "inspect",
            "-f",
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}",
            id.trim(),
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "10001:10001 true",
            "{svc}: user and read-only root ({})",
            text(&out)
        );
    }
    let write = stack.compose(&["exec", "-T", "gateway-2", "bash", "-c", "id -u; : > /probe"]);
    assert!(
        // podman's exec through compose may merge stderr into stdout.
        text(&write).contains("--- stdout ---\n10001\n")
            && text(&write).contains("/probe: Read-only file system"),
        "gateway-2 runs as uid 10001 and cannot write its root file system: {}",
        text(&write)
    );

    // Public v2 clients through HAProxy: least-connections spreads them
    // over both gateways.
    let mut public = Vec::new();
    for _ in 0..4 {
        let (mut ws, w) = Ws::v2(&base, "public").await.expect("public v2 client");
        ws.until("view", |_| true).await;
        public.push((ws, w));
    }
    let gateways: BTreeSet<&str> = public.iter().map(|(_, w)| w.gateway.as_str()).collect();
    assert_eq!(
        gateways,
        BTreeSet::from(["gateway-1", "gateway-2"]),
        "HAProxy spreads public clients over both gateways"
    );
    for (ws, w) in &mut public {
        ws.send(json!({"command":"ping","seq":7})).await;
        let pong = ws.until("pong", |_| true).await;
        assert_eq!(pong["seq"], 7, "{}: pong echoes seq", w.id);
        assert!(pong["server_time"].as_u64().is_some(), "v2 pong: {pong}");
        // Every sample answers a pong of its own (docs/security.md).
        for seq in 1..=3u64 {
            ws.send(json!({"command":"ping","seq":seq})).await;
            ws.until("pong", |v| v["seq"] == seq).await;
            ws.send(json!({"command":"delay_time","delay_time":seq as f64 * 1.5,"seq":seq}))
                .await;
        }
    }

    // The roster spans both gateways: a client on one sees the others'.
    testkit::eventually(
        Duration::from_secs(20),
        "/api/roster lists every public client",
        || async {
            let listed = stack.roster().await;
            public
                .iter()
                .all(|(_, w)| listed.get(&w.id) == Some(&w.gateway))
        },
    )
    .await;

    // A rename on one gateway reaches a client on the other.
    let on_1 = public
        .iter()
        .position(|(_, w)| w.gateway == "gateway-1")
        .unwrap();
    let on_2 = public
        .iter()
        .position(|(_, w)| w.gateway == "gateway-2")
        .unwrap();
    let renamed = public[on_1].1.id.clone();
    public[on_1]
        .0
        .send(json!({"command":"change_name","name":"through-haproxy"}))
        .await;
    // It sees it in its view (the room is small: every row is in it).
    let renamed_in_view = |v: &Value| {
        testkit::ws::row_in(v, &renamed).is_some_and(|r| r["name"] == "through-haproxy")
    };
    loop {
        let v = public[on_2].0.until_any("the rename in the view").await;
        if renamed_in_view(&v) {
            break;
        }
    }

    // Bad input is answered, the connection stays open.
    public[on_2].0.send(json!({"command":"frobnicate"})).await;
    let err = public[on_2].0.until("error", |_| true).await;
    assert_eq!(err["code"], "unknown_command");

    // The original (v1) private page: a bare ping gets a bare pong.
    let mut v1 = Ws::connect(&base, "/ws/private/")
        .await
        .expect("private v1 client");
    v1.send(json!({"command":"ping"})).await;
    assert_eq!(v1.until("pong", |_| true).await["command"], "pong");
    // A v2 private client: its samples are readable with its token only,
    // and it never shows up in the roster.
    let (mut private, pw) = Ws::v2(&base, "private").await.expect("private v2 client");
    private.send(json!({"command":"ping","seq":1})).await;
    private.until("pong", |v| v["seq"] == 1).await;
    private
        .send(json!({"command":"delay_time","delay_time":9.25,"seq":1}))
        .await;
    // A client leaving normally (for the disconnect counters).
    let (mut leaving, _) = Ws::v2(&base, "public").await.expect("public v2 client");
    leaving.sink.close().await.expect("close");

    // Samples reach Postgres: the recorder answers from it, and Postgres
    // itself holds them.
    for (_, w) in &public {
        testkit::eventually(
            Duration::from_secs(30),
            "public samples are stored",
            || async { stored_seqs(&stack, &w.id, None).await == [1, 2, 3] },
        )
        .await;
    }
    testkit::eventually(
        Duration::from_secs(30),
        "private samples are stored",
        || async { stored_seqs(&stack, &pw.id, Some(&pw.token)).await == [1] },
    )
    .await;
    let (status, _) = stack
        .get(&format!("/api/clients/{}/samples", pw.id), None)
        .await;
    assert_eq!(status, 404, "a private client's samples need its token");
    let (_, roster) = stack.get("/api/roster", None).await;
    assert!(
        !roster.to_string().contains(&pw.id),
        "private client in the roster: {roster}"
    );
    let (status, _) = stack.get("/api/stats?window=1h&bucket=1m", None).await;
    assert_eq!(status, 200, "/api/stats");
    let rows = stack.psql("pingapp", "SELECT count(*) FROM samples");
    assert!(rows.status.success(), "psql: {}", text(&rows));
    let rows = String::from_utf8_lossy(&rows.stdout).into_owned();
    let stored: u64 = rows
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("psql said {rows:?}"));
    assert!(
        stored >= 13,
        "Postgres holds {stored} samples, expected at least 13"
    );
    // The recorder's role reads and writes but may not change the schema
    // (docs/security.md, "Postgres"): it stored the samples above, and a
    // DROP TABLE as that role is refused (sample_staging: where samples
    // land first; `samples` is a view over the packed layout).
    let refused = stack.psql("pingapp_recorder", "DROP TABLE sample_staging");
    let said = text(&refused);
    assert!(
        !refused.status.success() && said.contains("must be owner"),
        "DROP TABLE as pingapp_recorder: {said}"
    );

    // Prometheus scrapes every service of the stack and sees every
    // documented family. (Grafana, Jaeger and the collector do not run in
    // the registry-less stack: deploy/local/compose.podman.yml.)
    let families = documented_families();
    let expected_up: BTreeSet<String> = [
        "gateway/gateway-1:9000",
        "gateway/gateway-2:9000",
        "presence/presence:9000",
        "recorder/recorder:9000",
        "haproxy/lb:8404",
        "prometheus/localhost:9090",
    ]
    .map(str::to_owned)
    .into();
    let deadline = tokio::time::Instant::now() + SCRAPE_WAIT;
    loop {
        let targets = stack.prometheus("/api/v1/targets?state=active").await;
        let up: BTreeSet<String> = targets["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["health"] == "up")
            .map(|t| {
                format!(
                    "{}/{}",
                    t["labels"]["job"].as_str().unwrap_or(""),
                    t["labels"]["instance"].as_str().unwrap_or("")
                )
            })
            .collect();
        let names = stack.metric_names().await;
        let missing_targets: Vec<&String> = expected_up.difference(&up).collect();
        let missing_families: Vec<&String> = families
            .iter()
            .filter(|f| {
                !["", "_bucket", "_count", "_sum"]
                    .iter()
                    .any(|suffix| names.contains(&format!("{f}{suffix}")))
            })
            .collect();
        if missing_targets.is_empty() && missing_families.is_empty() {
            break;
        }
        let last = format!(
            "targets not up: {missing_targets:?}; families not scraped: {missing_families:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus after {SCRAPE_WAIT:?}: {last}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // The dashboard and the alert rules query only names this Prometheus
    // really has (deploy/check_metrics.py against the scraped names).
    let names: Vec<String> = stack.metric_names().await.into_iter().collect();
    let known = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(known.path(), names.join("\n")).expect("write the scraped names");
    let check = Command::new("python3")
        .arg(repo_root().join("deploy/check_metrics.py"))
        .arg("--known")
        .arg(known.path())
        .output()
        .expect("python3 runs deploy/check_metrics.py");
    assert!(
        check.status.success(),
        "the dashboard or the rules query metrics Prometheus does not have:\n{}",
        text(&check)
    );

    // Stop gateway-1: its clients get close 1012 (service restart) and
    // reconnect through HAProxy to gateway-2; the others see them leave.
    let stopper = {
        let cmd = stack.script(STEP_LIMIT, &["compose", "stop", "gateway-1"]);
        std::thread::spawn(move || {
            let mut cmd = cmd;
            cmd.output().expect("bash runs deploy/local/stack.sh")
        })
    };
    let (moved, stayed): (Vec<_>, Vec<_>) = public
        .into_iter()
        .partition(|(_, w)| w.gateway == "gateway-1");
    let mut old_ids = Vec::new();
    for (mut ws, w) in moved {
        assert_eq!(
            ws.close_code().await,
            1012,
            "{}: drain closes with 1012",
            w.id
        );
        old_ids.push(w.id);
    }
    let stopped = tokio::task::spawn_blocking(move || stopper.join().unwrap())
        .await
        .unwrap();
    assert!(
        stopped.status.success(),
        "compose stop gateway-1: {}",
        text(&stopped)
    );
    let mut reconnected = Vec::new();
    for _ in &old_ids {
        let mut attempt = 0;
        let (mut ws, w) = loop {
            attempt += 1;
            match Ws::v2(&base, "public").await {
                Ok(c) => break c,
                // HAProxy may still try the stopped gateway until its
                // health check marks it down (2 failed checks, 2 s apart).
                Err(e) if attempt < 40 => {
                    eprintln!("reconnect attempt {attempt}: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("no reconnect through HAProxy: {e}"),
            }
        };
        assert_eq!(
            w.gateway, "gateway-2",
            "a reconnect lands on the remaining gateway"
        );
        ws.send(json!({"command":"ping","seq":1})).await;
        ws.until("pong", |v| v["seq"] == 1).await;
        ws.send(json!({"command":"delay_time","delay_time":2.5,"seq":1}))
            .await;
        reconnected.push((ws, w));
    }
    // The clients of the stopped gateway leave every roster (presence's
    // disconnects; a page on gateway-2 sees them go from its view).
    let (mut watcher, _) = stayed.into_iter().next().expect("a client on gateway-2");
    let mut in_view: BTreeSet<String> = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = watcher.until_any("the old ids to leave the view").await;
        if v["command"] == "view" {
            in_view = v["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["channel_name"].as_str().map(str::to_owned))
                .collect();
            if old_ids.iter().all(|id| !in_view.contains(id)) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old ids are still in the view: {in_view:?}"
        );
    }
    testkit::eventually(
        Duration::from_secs(20),
        "the roster holds the reconnected clients, not the old ids",
        || async {
            let listed = stack.roster().await;
            reconnected
                .iter()
                .all(|(_, w)| listed.get(&w.id).map(String::as_str) == Some("gateway-2"))
                && old_ids.iter().all(|id| !listed.contains_key(id))
        },
    )
    .await;
    for (_, w) in &reconnected {
        testkit::eventually(
            Duration::from_secs(30),
            "samples after the failover are stored",
            || async { stored_seqs(&stack, &w.id, None).await == [1] },
        )
        .await;
    }

    drop(reconnected);
    drop(watcher);
    tokio::task::spawn_blocking(move || stack.down())
        .await
        .unwrap();
}
