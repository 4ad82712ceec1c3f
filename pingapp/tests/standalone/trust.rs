//! The internet side of the trust boundary against the real binary
//! (docs/security.md): a hostile page's Origin, floods of control frames,
//! forged samples, names, per-IP caps and slow request headers.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::helpers::{Closed, Server, WAIT, public_v2};

/// The status of a handshake to `path` with `headers` (101: upgraded).
async fn handshake(server: &Server, path: &str, headers: &[(&str, &str)]) -> StatusCode {
    let req = testkit::ws::handshake_request(server.addr, path, headers);
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => resp.status(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status(),
        Err(e) => panic!("handshake {path}: {e}"),
    }
}

#[tokio::test]
async fn a_hostile_client_or_page_is_refused_closed_or_ignored() {
    let server = Server::start(&[
        "--max-connections-per-ip",
        "4",
        "--header-timeout-ms",
        "500",
    ]);
    let path = "/ws/public/?v=2";
    // Per IP: four connections from 127.0.0.1 fit, a fifth is 429.
    let (mut c, _, _) = public_v2(&server).await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(public_v2(&server).await.0);
    }
    assert_eq!(
        handshake(&server, path, &[]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    for o in others {
        o.close().await;
    }

    // A foreign page's Origin: 403 before any welcome or token; our own
    // pages' origin is upgraded (once the others' slots are free).
    assert_eq!(
        handshake(&server, path, &[("origin", "http://evil.example")]).await,
        StatusCode::FORBIDDEN
    );
    let own = format!("http://{}", server.addr);
    testkit::eventually(WAIT, "the same origin is upgraded", || async {
        handshake(&server, path, &[("origin", &own)]).await == StatusCode::SWITCHING_PROTOCOLS
    })
    .await;

    // Forged samples: no ping, or a 60 s delay for a pong just sent.
    c.delay(60_000.0, 1).await;
    assert_eq!(c.recv_until("error", |_| true).await["code"], "bad_sample");
    c.ping(2).await;
    c.delay(60_000.0, 2).await;
    assert_eq!(c.recv_until("error", |_| true).await["code"], "bad_sample");
    // A name hiding behind a bidi override.
    c.rename("\u{202E}nimda").await;
    assert_eq!(c.recv_until("error", |_| true).await["code"], "bad_name");

    // A flood of WebSocket Ping frames is closed like any flood.
    let (mut flood, _, _) = public_v2(&server).await;
    for _ in 0..500 {
        if flood
            .inner()
            .send(Message::Ping(Vec::new().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(flood.closed().await, Closed::Code(1008));

    // A slowloris trickling its headers is cut at the deadline.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 256];
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        for b in b"GET /ws/public/ HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if slow.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::ZERO, slow.read(&mut buf)).await {
                return;
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "still trickling after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(500));
}
