//! Test servers: the real `echo-server` binary on a random port, and a
//! small in-process stand-in for PingApp's public page that broadcasts.

use std::net::SocketAddr;
use std::process::ExitStatus;

use futures_util::{SinkExt, StreamExt};
use loadgen::{Args, Config};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::accept_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Run settings from loadgen flags, with the progress line off.
pub fn config(url: &str, flags: &[&str]) -> Config {
    let mut argv = vec!["loadgen", url];
    argv.extend_from_slice(flags);
    let mut config = <Args as clap::Parser>::try_parse_from(argv)
        .expect("flags parse")
        .into_config()
        .expect("flags are valid");
    config.progress = false;
    config
}

/// The real `pingapp` binary (standalone: gateway, presence and recorder
/// in one, SQLite in a temporary folder) on random ports, with `extra`
/// flags; killed on drop.
pub struct PingApp {
    _service: testkit::Service,
    /// Public listener.
    pub addr: SocketAddr,
    /// Admin listener (`/metrics`).
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl PingApp {
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let db = format!("sqlite://{}/pingapp.db", dir.path().display());
        let (service, line) = testkit::Service::command("pingapp")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--database-url", &db])
            .args(extra)
            .spawn_announced();
        // "pingapp listening on http://ADDR (admin http://ADDR)"
        let addrs: Vec<SocketAddr> = line
            .split("http://")
            .skip(1)
            .filter_map(|s| s.split([' ', ')']).next()?.parse().ok())
            .collect();
        let [addr, admin] = addrs[..] else {
            panic!("no addresses in {line:?}");
        };
        Self {
            _service: service,
            addr,
            admin,
            _dir: dir,
        }
    }

    /// The value of the sample `series` (name and labels, exactly as
    /// exported) in `/metrics`; 0 when it is not there.
    pub async fn metric(&self, series: &str) -> f64 {
        let mut stream = tokio::net::TcpStream::connect(self.admin)
            .await
            .expect("admin listener");
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        );
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("response");
        response
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// The `echo-server` binary (the test kit's [`testkit::Service`]),
/// listening on a random loopback port; killed on drop.
pub struct EchoProcess {
    service: testkit::Service,
    pub addr: SocketAddr,
}

impl EchoProcess {
    pub fn start() -> Self {
        let (service, line) = testkit::Service::command_at(env!("CARGO_BIN_EXE_echo-server"))
            .args(["--listen", "127.0.0.1:0"])
            .spawn_announced();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("a socket address");
        Self { service, addr }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.service.terminate().await
    }
}

/// A stand-in for PingApp's public page, enough for loadgen: sends
/// `welcome` and a WebSocket Ping, broadcasts `connect` and `change_name`
/// to everyone, answers pings. With `close_with`, it closes each
/// connection with that code at its first ping instead.
pub async fn start_fake_public(close_with: Option<u16>) -> SocketAddr {
    start_fake_public_recording(close_with, Watches::default()).await
}

/// What the fake server answers to every `delay_time`.
pub const EMPTY_DELAYS: &str = r#"{"command":"delays","delay_times":{}}"#;

/// Every `watch` a fake server received: the watching client's id and the
/// ids it named.
pub type Watches = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<String>)>>>;

/// [`start_fake_public`] that also records every `watch` in `watches`.
pub async fn start_fake_public_recording(close_with: Option<u16>, watches: Watches) -> SocketAddr {
    start_fake_public_full(close_with, watches, Watches::default()).await
}

/// [`start_fake_public_recording`] that also records, per connection, the
/// names it was renamed to and, as `"close CODE REASON"`, how it ended
/// (`"gone"` without a close frame), in `events`, and every `device` as
/// `"device SECRET"` (`"late device SECRET"` when another command came
/// first on that connection). Every `delay_time` is
/// also sent to everyone as a `view_update` row, as the gateway's view
/// does for the rows in a window.
pub async fn start_fake_public_full(
    close_with: Option<u16>,
    watches: Watches,
    events: Watches,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (broadcasts, _) = broadcast::channel::<String>(1024);
    tokio::spawn(async move {
        let mut next_id = 0_u32;
        while let Ok((stream, _)) = listener.accept().await {
            next_id += 1;
            let id = format!("c{next_id}");
            let broadcasts = broadcasts.clone();
            let watches = watches.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = accept_async(stream).await else {
                    return;
                };
                let mut inbox = broadcasts.subscribe();
                let welcome = json!({"command": "welcome", "channel_name": id, "name": id,
                    "gateway": "fake", "ping_interval_ms": 1000, "token": "t"});
                let _ = ws.send(Message::text(welcome.to_string())).await;
                let _ = ws.send(Message::Ping(b"keepalive".to_vec().into())).await;
                let _ = broadcasts.send(
                    json!({"command": "connect", "channel_name": id, "name": id}).to_string(),
                );
                let event = |what: String| events.lock().unwrap().push((id.clone(), vec![what]));
                let mut first = true;
                loop {
                    tokio::select! {
                        message = ws.next() => {
                            let message = match message {
                                Some(Ok(Message::Close(frame))) => {
                                    event(frame.map_or("close".into(), |f| format!("close {} {}", u16::from(f.code), f.reason)));
                                    return;
                                }
                                Some(Ok(message)) => message,
                                _ => {
                                    event("gone".into());
                                    return;
                                }
                            };
                            let Message::Text(text) = message else { continue };
                            let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                            let was_first = std::mem::replace(&mut first, false);
                            match frame["command"].as_str() {
                                Some("device") => {
                                    let late = if was_first { "" } else { "late " };
                                    event(format!("{late}device {}", frame["secret"].as_str().unwrap_or("?")));
                                }
                                Some("ping") => {
                                    if let Some(code) = close_with {
                                        let close = CloseFrame { code: CloseCode::from(code), reason: "test".into() };
                                        let _ = ws.close(Some(close)).await;
                                        continue;
                                    }
                                    let pong = json!({"command": "pong", "seq": frame["seq"], "server_time": 0});
                                    let _ = ws.send(Message::text(pong.to_string())).await;
                                }
                                Some("delay_time") => {
                                    let _ = ws.send(Message::text(EMPTY_DELAYS)).await;
                                    let row = json!({"channel_name": id, "name": id, "delay_time": frame["delay_time"]});
                                    let update = json!({"command": "view_update", "total": 1, "matched": 1, "rows": {id.clone(): row}});
                                    let _ = broadcasts.send(update.to_string());
                                }
                                Some("watch") => {
                                    let ids = frame["channel_names"].as_array().into_iter().flatten()
                                        .filter_map(|v| v.as_str().map(str::to_owned)).collect();
                                    watches.lock().unwrap().push((id.clone(), ids));
                                }
                                Some("change_name") => {
                                    event(format!("rename {}", frame["name"].as_str().unwrap_or("?")));
                                    let renamed = json!({"command": "change_name", "channel_name": id, "name": frame["name"]});
                                    let _ = broadcasts.send(renamed.to_string());
                                }
                                _ => {}
                            }
                        }
                        Ok(text) = inbox.recv() => {
                            let _ = ws.send(Message::text(text)).await;
                        }
                    }
                }
            });
        }
    });
    addr
}
