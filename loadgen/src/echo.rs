//! The bare echo server: a plain tokio-tungstenite server that answers pings
//! exactly as PingApp does and nothing else. It is the baseline PingApp's
//! latency, throughput and memory are compared against, so it does the same
//! per-message work (serde_json in and out) with the same small buffers.

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout};
use tokio_tungstenite::accept_async_with_config;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A client must finish the WebSocket handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for each client's close reply.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// PingApp's default frame limit (`--max-frame-bytes`).
const MAX_FRAME_BYTES: usize = 4096;

/// Flags of the `echo-server` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "echo-server",
    version,
    about = "Bare WebSocket ping/pong server: the PingApp benchmark baseline"
)]
pub struct EchoArgs {
    /// Address to listen on; port 0 picks a free port
    #[arg(long, env = "PINGAPP_LISTEN", default_value = "127.0.0.1:8001")]
    pub listen: SocketAddr,
}

/// The WebSocket settings of every echo connection: a 4 KiB read buffer,
/// eager writes and PingApp's 4 KiB message limit, so memory per connection
/// is comparable to PingApp's.
pub fn server_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

#[derive(Deserialize)]
struct Ping<'a> {
    #[serde(borrow)]
    command: Cow<'a, str>,
    seq: Option<u64>,
}

#[derive(Serialize)]
struct Pong {
    command: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_time: Option<u64>,
}

/// The reply PingApp gives to a text frame, if any: `{"command":"pong"}`
/// for a ping, or `{"command":"pong","seq":N,"server_time":UNIX_MS}` when
/// the ping carried `"seq":N`. Everything else (delay_time, bad JSON, ...)
/// gets no reply.
pub fn reply_to(text: &str) -> Option<String> {
    let ping: Ping<'_> = serde_json::from_str(text).ok()?;
    if ping.command != "ping" {
        return None;
    }
    let server_time = ping.seq.map(|_| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    });
    let pong = Pong {
        command: "pong",
        seq: ping.seq,
        server_time,
    };
    serde_json::to_string(&pong).ok()
}

/// A bound echo server; [`EchoServer::run`] serves it.
#[derive(Debug)]
pub struct EchoServer {
    listener: TcpListener,
}

impl EchoServer {
    /// Binds the listening socket (port 0 picks a free port).
    ///
    /// # Errors
    ///
    /// Fails when the address cannot be bound.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
        })
    }

    /// The address actually bound.
    ///
    /// # Errors
    ///
    /// Fails only if the socket cannot report its address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts WebSocket connections on any path until `shutdown`
    /// completes, then sends every client a close frame with 1012 (service
    /// restart), as PingApp does, and waits briefly for them to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        tracker.spawn(serve_connection(stream, stop.clone()));
                    }
                    Err(error) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        eprintln!("echo-server: accept failed: {error}");
                        sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(self.listener);
        stop.cancel();
        tracker.close();
        let _ = timeout(CLOSE_TIMEOUT + Duration::from_secs(1), tracker.wait()).await;
    }
}

async fn serve_connection(stream: TcpStream, stop: CancellationToken) {
    // Replies are single small writes; never let Nagle hold one back.
    let _ = stream.set_nodelay(true);
    let handshake = timeout(
        HANDSHAKE_TIMEOUT,
        accept_async_with_config(stream, Some(server_ws_config())),
    );
    let mut ws = tokio::select! {
        () = stop.cancelled() => return,
        accepted = handshake => match accepted {
            Ok(Ok(ws)) => ws,
            Ok(Err(_)) | Err(_) => return,
        },
    };
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = reply_to(text.as_str())
                        && ws.send(Message::text(reply)).await.is_err()
                    {
                        return;
                    }
                }
                // Pings and close frames are answered by tungstenite; after
                // a close the stream ends on the next read.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
            () = stop.cancelled() => {
                let _ = timeout(CLOSE_TIMEOUT, async {
                    let close = CloseFrame {
                        code: CloseCode::Restart,
                        reason: "server shutting down".into(),
                    };
                    if ws.close(Some(close)).await.is_ok() {
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                })
                .await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_like_pingapp() {
        assert_eq!(
            reply_to(r#"{"command":"ping"}"#).as_deref(),
            Some(r#"{"command":"pong"}"#)
        );
        let reply: serde_json::Value =
            serde_json::from_str(&reply_to(r#"{"seq":42,"command":"ping","x":1}"#).unwrap())
                .unwrap();
        assert_eq!(reply["command"], "pong");
        assert_eq!(reply["seq"], 42);
        assert!(reply["server_time"].as_u64().unwrap() > 1_600_000_000_000);
    }

    #[test]
    fn ignores_everything_else() {
        assert_eq!(
            reply_to(r#"{"command":"delay_time","delay_time":1.5,"seq":1}"#),
            None
        );
        assert_eq!(reply_to(r#"{"command":"change_name","name":"x"}"#), None);
        assert_eq!(reply_to("ping"), None);
        assert_eq!(reply_to(r#"{"command":"ping","seq":"x"}"#), None);
    }
}
