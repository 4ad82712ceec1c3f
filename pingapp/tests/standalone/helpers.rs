//! Test helpers: the real `pingapp` binary on random ports, and WebSocket
//! and HTTP clients that talk to it like browsers do.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expectation may wait.
pub const WAIT: Duration = Duration::from_secs(10);

#[path = "../common/server.rs"]
mod server;

pub use server::Server;

impl Server {
    /// Starts `pingapp` with the database in `dir`.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        Self::start_with_env(dir, extra, &[])
    }

    /// Starts `pingapp` with the database in `dir` and extra environment.
    pub fn start_with_env(dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::launch("127.0.0.1:0", dir, extra, env)
    }

    /// The admin base URL.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Connects a WebSocket client to `path` (e.g. `/ws/public/?v=2`).
    pub async fn ws(&self, path: &str) -> Client {
        Client::connect(self.addr, path).await
    }

    /// GET a JSON document; returns status and body.
    pub async fn get_json(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().get(self.url(path));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// The value of one metric sample line starting with `prefix`, summed.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A WebSocket client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended.
#[derive(Debug, PartialEq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The connection ended without a close frame.
    Abrupt,
}

impl Client {
    /// Connects to `path` on `addr`.
    pub async fn connect(addr: SocketAddr, path: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
            .await
            .unwrap_or_else(|e| panic!("connect {path}: {e}"));
        Client { ws }
    }

    /// Sends a JSON value as a text frame.
    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_owned())).await.unwrap();
    }

    /// Sends a raw frame.
    pub async fn send_msg(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next text frame as JSON (control frames skipped).
    pub async fn recv(&mut self) -> Value {
        let fut = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                    Some(Ok(Message::Close(c))) => {
                        panic!("closed while waiting for a frame: {c:?}")
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("error while waiting for a frame: {e}"),
                    None => panic!("connection ended while waiting for a frame"),
                }
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .expect("no frame within 10 s")
    }

    /// Frames until one with `command` satisfying `pred`; returns it.
    pub async fn recv_until(&mut self, command: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let v = self.recv().await;
            if v["command"] == command && pred(&v) {
                return v;
            }
        }
    }

    /// Frames with `command` until `pred`, returning everything seen.
    pub async fn collect_until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.recv().await;
            let done = pred(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
    }

    /// Every text frame that arrives within `period`.
    pub async fn collect_for(&mut self, period: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + period;
        let mut seen = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await;
            match next {
                Err(_) | Ok(None) => return seen,
                Ok(Some(Ok(Message::Text(t)))) => {
                    seen.push(serde_json::from_str(t.as_str()).unwrap())
                }
                Ok(Some(Ok(Message::Close(c)))) => panic!("closed while collecting: {c:?}"),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => panic!("error while collecting: {e}"),
            }
        }
    }

    /// Reads until the connection closes; returns how.
    pub async fn closed(&mut self) -> Closed {
        let fut = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(Some(f)))) => return Closed::Code(u16::from(f.code)),
                    Some(Ok(Message::Close(None))) => return Closed::Code(1005),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Closed::Abrupt,
                }
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .expect("not closed within 10 s")
    }

    /// Sends a v2 ping and returns the pong.
    pub async fn ping(&mut self, seq: u64) -> Value {
        self.send(serde_json::json!({"command":"ping","seq":seq}))
            .await;
        self.recv_until("pong", |v| v["seq"] == seq).await
    }

    /// Closes normally.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// The underlying stream, for tests that misbehave on purpose.
    pub fn inner(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }
}

/// A v2 public client past its welcome and roster; returns (client, id, token).
pub async fn public_v2(server: &Server) -> (Client, String, String) {
    let mut c = server.ws("/ws/public/?v=2").await;
    let welcome = c.recv().await;
    assert_eq!(welcome["command"], "welcome", "{welcome}");
    let id = welcome["channel_name"].as_str().unwrap().to_owned();
    let token = welcome["token"].as_str().unwrap().to_owned();
    let roster = c.recv().await;
    assert_eq!(roster["command"], "roster", "{roster}");
    (c, id, token)
}

/// Like [`public_v2`], but over a socket with a 4 KiB receive buffer, for
/// a client that will stop reading.
pub async fn public_v2_small_buffer(server: &Server) -> (Client, String, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let url = format!("ws://{}/ws/public/?v=2", server.addr);
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    let mut c = Client { ws };
    let welcome = c.recv().await;
    let id = welcome["channel_name"].as_str().unwrap().to_owned();
    let token = welcome["token"].as_str().unwrap().to_owned();
    c.recv().await;
    (c, id, token)
}

/// The sending half of a client whose incoming frames are read and
/// discarded by a background task (a client that sends a lot must still
/// read, or it stalls itself).
pub struct Sender {
    sink: futures_util::stream::SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>,
}

impl Sender {
    /// Sends a JSON value as a text frame.
    pub async fn send(&mut self, v: Value) {
        self.sink.send(Message::text(v.to_string())).await.unwrap();
    }
}

impl Client {
    /// Splits off a [`Sender`]; everything received is discarded.
    pub fn into_sender(self) -> Sender {
        let (sink, mut stream) = self.ws.split();
        tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        Sender { sink }
    }
}
