//! A minimal OTLP/HTTP trace receiver for tests: services export to it with
//! `OTEL_EXPORTER_OTLP_ENDPOINT=http://ADDR` and
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`, and tests read what arrived.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One received span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The exporting service's `service.name`.
    pub service: String,
    /// Hex trace id.
    pub trace_id: String,
    /// Span name.
    pub name: String,
}

/// The receiver; it runs until the test's runtime ends.
pub struct OtlpSink {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpSink {
    /// Starts a receiver on a random loopback port.
    pub async fn start() -> OtlpSink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP sink");
        let addr = listener.local_addr().expect("bound address");
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let sink = spans.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, sink.clone()));
            }
        });
        OtlpSink { addr, spans }
    }

    /// The endpoint URL for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans lock").clone()
    }

    /// Whether a span `a` of `service_a` and a span `b` of `service_b`
    /// share a trace id.
    pub fn share_trace(&self, service_a: &str, a: &str, service_b: &str, b: &str) -> bool {
        let spans = self.spans();
        spans.iter().any(|x| {
            x.service == service_a
                && x.name == a
                && !x.trace_id.is_empty()
                && spans
                    .iter()
                    .any(|y| y.service == service_b && y.name == b && y.trace_id == x.trace_id)
        })
    }
}

/// Reads HTTP requests (OTLP JSON bodies) from one connection.
async fn serve(mut sock: tokio::net::TcpStream, sink: Arc<Mutex<Vec<ReceivedSpan>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let Ok(n) = sock.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() < end + 4 + len {
            continue;
        }
        if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&buf[end + 4..end + 4 + len])
        {
            sink.lock().expect("spans lock").extend(spans_of(&body));
        }
        let ok =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        if sock.write_all(ok).await.is_err() {
            return;
        }
        buf.drain(..end + 4 + len);
    }
}

fn spans_of(body: &serde_json::Value) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in body["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_owned();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for span in ss["spans"].as_array().into_iter().flatten() {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: span["traceId"].as_str().unwrap_or_default().to_owned(),
                    name: span["name"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
    }
    out
}
