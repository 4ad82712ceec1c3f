//! The one WebSocket client of every test: talks to a gateway (or the
//! standalone binary) like a browser's page does, with a bounded wait on
//! every expectation so a missing frame fails the test instead of hanging
//! it.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expectation may wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// The client's socket.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client.
pub struct Client {
    ws: Socket,
    /// Its id, once the test learnt it (from its welcome or own connect).
    pub id: String,
    /// Its token (v2 only), once the test learnt it.
    pub token: String,
    /// Its view of the public room, as the `view` and `view_update`
    /// frames received so far built it (v2 public pages).
    pub view: ViewState,
}

/// The row of client `id` in a `view` frame (an array of rows) or a
/// `view_update` (rows by id), if the frame has one.
pub fn row_in<'a>(frame: &'a Value, id: &str) -> Option<&'a Value> {
    match &frame["rows"] {
        Value::Array(rows) => rows.iter().find(|r| r["channel_name"] == id),
        Value::Object(rows) => rows.get(id),
        _ => None,
    }
}

/// A v2 page's view of the public room (docs/protocol.md, "Public room:
/// the view"), kept as a page keeps it.
#[derive(Debug, Default, Clone)]
pub struct ViewState {
    /// Public clients in the room.
    pub total: u64,
    /// Of them, those the filter keeps.
    pub matched: u64,
    /// The window's rows, in order.
    pub rows: Vec<Value>,
    /// The own row.
    pub me: Option<Value>,
    /// The `view` frame last received (the view it answers).
    pub last_full: Option<Value>,
    /// How many `view` and `view_update` frames were received.
    pub frames: usize,
}

impl ViewState {
    /// Applies a frame; false if it is not a view frame.
    ///
    /// # Panics
    /// A `view_update` names a row that is not in the window.
    pub fn apply(&mut self, v: &Value) -> bool {
        match v["command"].as_str() {
            Some("view") => {
                self.rows = v["rows"].as_array().cloned().unwrap_or_default();
                self.last_full = Some(v.clone());
            }
            Some("view_update") => {
                if let Some(changed) = v["rows"].as_object() {
                    for (id, row) in changed {
                        let at = self
                            .rows
                            .iter()
                            .position(|r| r["channel_name"] == id.as_str())
                            .unwrap_or_else(|| panic!("view_update for {id}, not in the window"));
                        self.rows[at] = row.clone();
                    }
                }
            }
            _ => return false,
        }
        self.total = v["total"].as_u64().expect("total");
        self.matched = v["matched"].as_u64().expect("matched");
        if v.get("me").is_some() {
            self.me = Some(v["me"].clone());
        }
        self.frames += 1;
        true
    }

    /// The window's row of client `id`.
    pub fn row(&self, id: &str) -> Option<&Value> {
        self.rows.iter().find(|r| r["channel_name"] == id)
    }

    /// The ids of the window, in order.
    pub fn ids(&self) -> Vec<String> {
        self.rows
            .iter()
            .map(|r| r["channel_name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The connection ended without a close frame.
    Abrupt,
}

/// Whether frame `v` is `command` about client `id`.
pub fn is(v: &Value, command: &str, id: &str) -> bool {
    v["command"] == command && v["channel_name"] == id
}

/// A WebSocket handshake request for `path` on `addr` with `headers`
/// added.
///
/// # Panics
/// A header name or value is not valid.
pub fn handshake_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("a valid URL");
    for (name, value) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    req
}

impl Client {
    /// Connects to `path` (e.g. `/ws/public/?v=2`) on `addr`.
    ///
    /// # Panics
    /// The handshake failed or took longer than [`WAIT`].
    pub async fn connect(addr: SocketAddr, path: &str) -> Client {
        Client::connect_with(addr, path, &[]).await
    }

    /// Connects to `path` on `addr` with `headers` added to the handshake
    /// (an `Origin`, an `X-Forwarded-For`).
    ///
    /// # Panics
    /// The handshake failed or took longer than [`WAIT`].
    pub async fn connect_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Client {
        let req = handshake_request(addr, path, headers);
        // No Nagle: a test that writes twice before it reads (a sample, then
        // a ping) would otherwise wait for a delayed ACK, 40 ms each time.
        let connect = tokio_tungstenite::connect_async_with_config(req, None, true);
        let (ws, _) = tokio::time::timeout(WAIT, connect)
            .await
            .unwrap_or_else(|_| panic!("connect {path}: timed out"))
            .unwrap_or_else(|e| panic!("connect {path}: {e}"));
        Client::from_socket(ws)
    }

    /// Connects to `path` on `addr` over a socket with a `bytes` receive
    /// buffer, for a client that will stop reading.
    ///
    /// # Panics
    /// The connection or handshake failed.
    pub async fn connect_small_buffer(addr: SocketAddr, path: &str, bytes: u32) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("receive buffer");
        let stream = socket.connect(addr).await.expect("connect");
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .unwrap_or_else(|e| panic!("connect {path}: {e}"));
        Client::from_socket(ws)
    }

    fn from_socket(ws: Socket) -> Client {
        Client {
            ws,
            id: String::new(),
            token: String::new(),
            view: ViewState::default(),
        }
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
    ///
    /// # Panics
    /// None came within [`WAIT`], or the connection ended.
    pub async fn recv(&mut self) -> Value {
        match self.recv_within(WAIT).await {
            Some(v) => v,
            None => panic!("no frame within {WAIT:?}"),
        }
    }

    /// The next text frame, or `None` if none came within `within`.
    ///
    /// # Panics
    /// The connection ended.
    pub async fn recv_within(&mut self, within: Duration) -> Option<Value> {
        let fut = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap();
                        self.view.apply(&v);
                        return v;
                    }
                    Some(Ok(Message::Close(c))) => {
                        panic!("closed while waiting for a frame: {c:?}")
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("error while waiting for a frame: {e}"),
                    None => panic!("connection ended while waiting for a frame"),
                }
            }
        };
        tokio::time::timeout(within, fut).await.ok()
    }

    /// Frames until one with `command` satisfying `pred`; returns it.
    ///
    /// # Panics
    /// None came within [`WAIT`].
    pub async fn recv_until(&mut self, command: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Some(v) if v["command"] == command && pred(&v) => return v,
                Some(_) => {}
                None => panic!("no {command} frame as expected within {WAIT:?}"),
            }
        }
    }

    /// Every frame until one satisfies `pred` (included), within `within`.
    ///
    /// # Panics
    /// It did not come within `within`; the message lists what came.
    pub async fn collect_until(
        &mut self,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Some(v) => {
                    let done = pred(&v);
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
                None => panic!("the awaited frame did not come within {within:?}; saw {seen:?}"),
            }
        }
    }

    /// Every frame that arrives within `within` (for asserting that
    /// something does *not* come: the period is the subject).
    pub async fn collect_for(&mut self, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return seen;
            }
            match self.recv_within(left).await {
                Some(v) => seen.push(v),
                None => return seen,
            }
        }
    }

    /// Reads until the connection closes; returns how.
    ///
    /// # Panics
    /// It was still open after [`WAIT`].
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

    /// Reads frames until its view satisfies `pred`; returns the view.
    ///
    /// # Panics
    /// It did not within [`WAIT`].
    pub async fn view_until(&mut self, pred: impl Fn(&ViewState) -> bool) -> ViewState {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !pred(&self.view) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self.recv_within(left).await.is_none() {
                panic!(
                    "the view did not become as expected within {WAIT:?}: {:?}",
                    self.view
                );
            }
        }
        self.view.clone()
    }

    /// Sends a `view` command and waits for the `view` frame answering it.
    pub async fn set_view(&mut self, view: Value) -> Value {
        let mut cmd = view;
        cmd["command"] = json!("view");
        self.send(cmd.clone()).await;
        self.recv_until("view", |v| {
            ["sort", "order", "offset", "limit"]
                .iter()
                .all(|k| cmd.get(*k).is_none() || cmd[*k] == v[*k])
        })
        .await
    }

    /// Waits for the broadcast of its own connect (the echo presence sends
    /// every page, the new one too).
    pub async fn own_connect(&mut self) {
        let id = self.id.clone();
        self.recv_until("connect", |v| is(v, "connect", &id)).await;
    }

    /// Sends a v2 ping and returns the pong.
    ///
    /// # Panics
    /// No pong within [`WAIT`].
    pub async fn ping(&mut self, seq: u64) -> Value {
        self.send(json!({"command":"ping","seq":seq})).await;
        self.recv_until("pong", |v| v["seq"] == seq).await
    }

    /// Sends a v2 ping and waits (up to `within`) for its pong.
    pub async fn ping_within(&mut self, seq: u64, within: Duration) -> Option<Value> {
        self.send(json!({"command":"ping","seq":seq})).await;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Some(v) if v["command"] == "pong" && v["seq"] == seq => return Some(v),
                Some(_) => {}
                None => return None,
            }
        }
    }

    /// Pings with `seq`, waits for the pong, then reports `ms` for it: a
    /// sample the gateway records (it records only samples answering a
    /// pong it sent, docs/security.md). Frames before the pong are
    /// skipped.
    ///
    /// # Panics
    /// No pong within [`WAIT`].
    pub async fn sample(&mut self, ms: f64, seq: u64) {
        self.ping(seq).await;
        self.delay(ms, seq).await;
    }

    /// Sends a delay sample.
    pub async fn delay(&mut self, ms: f64, seq: u64) {
        self.send(json!({"command":"delay_time","delay_time":ms,"seq":seq}))
            .await;
    }

    /// Renames the client.
    pub async fn rename(&mut self, name: &str) {
        self.send(json!({"command":"change_name","name":name}))
            .await;
    }

    /// Closes normally and waits (up to 2 s) for the server's side.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
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
    pub fn inner(&mut self) -> &mut Socket {
        &mut self.ws
    }

    /// Splits off a [`Sender`]; everything received is read and discarded
    /// by a background task (a client that sends a lot must still read, or
    /// it stalls itself).
    pub fn into_sender(self) -> Sender {
        let (sink, mut stream) = self.ws.split();
        let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        Sender {
            id: self.id,
            sink,
            reader,
        }
    }
}

/// The sending half of a [`Client`] whose incoming frames are discarded;
/// the connection ends when it is dropped.
pub struct Sender {
    /// The client's id, as the test knew it.
    pub id: String,
    sink: SplitSink<Socket, Message>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Sender {
    /// Sends a JSON value as a text frame.
    pub async fn send(&mut self, v: Value) {
        self.sink.send(Message::text(v.to_string())).await.unwrap();
    }

    /// Sends a normal close frame (after everything sent before it).
    pub async fn close(&mut self) {
        let _ = self
            .sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = self.sink.close().await;
    }
}
