//! The internet side of the trust boundary (docs/security.md): what a
//! hostile client or a hostile web page can try against one gateway.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use gateway::GatewayArgs;
use serde_json::json;
use services::messages::GatewayUpdate;
use testkit::ws::{Client, Closed, WAIT as WITHIN};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::helpers::TestGateway;

/// The status of a WebSocket handshake to `path` with `headers` added:
/// 101 when it was upgraded.
async fn handshake(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> StatusCode {
    handshake_with_retry(addr, path, headers).await.0
}

/// The status of a handshake and its `Retry-After`, if any; an upgraded
/// connection is closed at once.
async fn handshake_with_retry(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>) {
    let req = testkit::ws::handshake_request(addr, path, headers);
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => (resp.status(), None),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            assert!(!body.is_empty(), "a refusal says why ({})", resp.status());
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (resp.status(), retry)
        }
        Err(e) => panic!("handshake {path}: {e}"),
    }
}

#[tokio::test]
async fn foreign_origins_are_refused_before_the_upgrade() {
    let gw = TestGateway::start(GatewayArgs::default()).await;
    let own = format!("http://{}", gw.addr);
    for path in ["/ws/public/?v=2", "/ws/private/"] {
        assert_eq!(
            handshake(gw.addr, path, &[]).await,
            StatusCode::SWITCHING_PROTOCOLS,
            "no Origin: not a browser, allowed"
        );
        assert_eq!(
            handshake(gw.addr, path, &[("origin", &own)]).await,
            StatusCode::SWITCHING_PROTOCOLS,
            "same origin"
        );
        for evil in ["http://evil.example", "null", "http://127.0.0.1:1"] {
            assert_eq!(
                handshake(gw.addr, path, &[("origin", evil)]).await,
                StatusCode::FORBIDDEN,
                "{evil} on {path}"
            );
        }
    }
    assert_eq!(
        gw.metric("pingapp_gateway_refused_total", &[("reason", "origin")]),
        6.0
    );

    let listed = TestGateway::start(GatewayArgs {
        allowed_origins: vec!["https://app.example".into()],
        ..Default::default()
    })
    .await;
    let path = "/ws/public/?v=2";
    let its_own = format!("http://{}", listed.addr);
    for (origin, status) in [
        ("https://app.example", StatusCode::SWITCHING_PROTOCOLS),
        (its_own.as_str(), StatusCode::SWITCHING_PROTOCOLS),
        ("http://app.example", StatusCode::FORBIDDEN),
        ("http://evil.example", StatusCode::FORBIDDEN),
    ] {
        assert_eq!(
            handshake(listed.addr, path, &[("origin", origin)]).await,
            status,
            "{origin}"
        );
    }
}

#[tokio::test]
async fn samples_count_only_against_pongs_sent_once_each_and_in_time() {
    let mut gw = TestGateway::start(GatewayArgs {
        roster_tick_ms: 50,
        ..Default::default()
    })
    .await;
    let mut c = gw.ws("/ws/public/?v=2").await;
    let id = c.recv().await["channel_name"].as_str().unwrap().to_owned();
    c.recv_until("view", |_| true).await;

    // No ping, a seq never pinged, a 60 s delay 0 s after its ping, a pong
    // used twice: each gets bad_sample and none reaches the roster.
    c.delay(60_000.0, 1).await;
    assert_eq!(c.recv_until("error", |_| true).await["code"], "bad_sample");
    c.ping(1).await;
    c.delay(60_000.0, 1).await;
    assert_eq!(c.recv_until("error", |_| true).await["code"], "bad_sample");
    c.delay(4.0, 1).await;
    assert_eq!(
        c.recv_until("error", |_| true).await["code"],
        "bad_sample",
        "the pong was used by the refused sample"
    );
    c.ping(2).await;
    c.delay(6.0, 3).await;
    assert_eq!(c.recv_until("error", |_| true).await["code"], "bad_sample");
    c.delay(6.0, 2).await;
    c.delay(6.0, 2).await;
    assert_eq!(c.recv_until("error", |_| true).await["code"], "bad_sample");

    let tick = gw
        .report(|r| match &r.update {
            GatewayUpdate::Delays { delays, .. } => delays.contains_key(&id),
            _ => false,
        })
        .await;
    let GatewayUpdate::Delays { delays, .. } = tick.update else {
        unreachable!()
    };
    assert_eq!(delays[&id].delay_time, 6.0, "the one honest sample");
    assert_eq!(
        gw.metric(
            "pingapp_gateway_samples_refused_total",
            &[("reason", "no_pong")]
        ),
        4.0
    );
    assert_eq!(
        gw.metric(
            "pingapp_gateway_samples_refused_total",
            &[("reason", "implausible")]
        ),
        1.0
    );

    // v1: at most one sample per pong, the rest dropped without a reply.
    let mut v1 = gw.ws("/ws/public/").await;
    v1.send(json!({"command": "delay_time", "delay_time": 9}))
        .await;
    v1.send(json!({"command": "ping"})).await;
    v1.recv_until("pong", |_| true).await;
    v1.send(json!({"command": "delay_time", "delay_time": 9}))
        .await;
    assert_eq!(
        v1.recv_until("delay_times", |_| true).await["command"],
        "delay_times"
    );
    v1.send(json!({"command": "delay_time", "delay_time": 9}))
        .await;
    let rest = v1.collect_for(Duration::from_millis(300)).await;
    assert!(
        rest.iter()
            .all(|v| v["command"] != "delay_times" && v["command"] != "error"),
        "{rest:?}"
    );
    assert_eq!(
        gw.metric(
            "pingapp_gateway_samples_refused_total",
            &[("reason", "no_pong")]
        ),
        6.0
    );
}

#[tokio::test]
async fn floods_of_any_frame_kind_close_with_1008() {
    let gw = TestGateway::start(GatewayArgs {
        max_messages_per_second: 20,
        max_bytes_per_second: 2048,
        ..Default::default()
    })
    .await;
    // WebSocket Ping frames (answered by the library, counted by us) and
    // unsolicited Pong frames.
    let control = [
        Message::Ping(Vec::new().into()),
        Message::Pong(Vec::new().into()),
    ];
    for frame in control {
        let mut c = gw.ws("/ws/private/").await;
        for _ in 0..100 {
            if c.inner().send(frame.clone()).await.is_err() {
                break;
            }
        }
        assert_eq!(c.closed().await, Closed::Code(1008), "{frame:?}");
    }

    // Few frames but many bytes: 4 x 1 KiB at once, over 2 KiB/s.
    let mut bytes = gw.ws("/ws/private/").await;
    let pad = "x".repeat(1000);
    for _ in 0..4 {
        let _ = bytes
            .inner()
            .send(Message::text(
                json!({"command": "ping", "pad": pad}).to_string(),
            ))
            .await;
    }
    assert_eq!(bytes.closed().await, Closed::Code(1008), "bytes");

    // The sustained rate, under the burst, for longer than a second: fine.
    let mut steady = gw.ws("/ws/private/?v=2").await;
    steady.recv().await;
    for seq in 1..=30 {
        steady.ping(seq).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
}

#[tokio::test]
async fn the_name_policy_and_the_rename_budget_hold() {
    let mut gw = TestGateway::start(GatewayArgs {
        max_renames_per_minute: 2,
        ..Default::default()
    })
    .await;
    let mut c = gw.ws("/ws/public/?v=2").await;
    let id = c.recv().await["channel_name"].as_str().unwrap().to_owned();
    c.recv_until("view", |_| true).await;
    gw.event().await; // its connect
    for bad in [
        "\u{202E}evil".to_owned(),
        "\u{200B}".to_owned(),
        "a\u{2028}b".to_owned(),
        "\u{E000}".to_owned(),
        format!("x{}", "\u{0301}".repeat(20)),
        "0123456789abcdef".to_owned(),
    ] {
        c.send(json!({"command": "change_name", "name": bad})).await;
        let e = c.recv_until("error", |_| true).await;
        assert_eq!(e["code"], "bad_name", "{bad:?}: {e}");
    }
    // Normalized (NFC) before presence (and everyone) sees it.
    let rename = |name: &str| GatewayUpdate::Rename {
        channel_name: id.clone(),
        name: name.into(),
    };
    c.rename("Zoe\u{0308}").await;
    assert_eq!(
        gw.event().await.update,
        rename("Zo\u{00EB}"),
        "the first refusal-free rename"
    );
    // That was the first of a burst of 2; the third is refused and never
    // reported.
    c.rename("two").await;
    assert_eq!(gw.event().await.update, rename("two"));
    c.rename("three").await;
    assert_eq!(
        c.recv_until("error", |_| true).await["code"],
        "too_many_renames"
    );
    drop(c);
    assert_eq!(
        gw.event().await.update,
        GatewayUpdate::Disconnect {
            channel_name: id.clone()
        },
        "no rename between"
    );
}

#[tokio::test]
async fn per_ip_caps_answer_429_before_the_upgrade() {
    let gw = TestGateway::start(GatewayArgs {
        max_connections_per_ip: 3,
        max_connects_per_ip_per_second: 0,
        ..Default::default()
    })
    .await;
    let path = "/ws/private/?v=2";
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = gw.ws(path).await;
        c.recv().await;
        held.push(c);
    }
    let (status, retry) = handshake_with_retry(gw.addr, path, &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "a 4th connection");
    assert!(
        retry.is_some_and(|s| s.parse::<u64>().is_ok()),
        "Retry-After in seconds"
    );
    // A forwarded address from an untrusted peer changes nothing.
    assert_eq!(
        handshake(gw.addr, path, &[("x-forwarded-for", "203.0.113.9")]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // One leaves: room for one more.
    held.pop().unwrap().close().await;
    testkit::eventually(WITHIN, "the slot is freed", || async {
        handshake(gw.addr, path, &[]).await == StatusCode::SWITCHING_PROTOCOLS
    })
    .await;
    assert!(
        gw.metric(
            "pingapp_gateway_refused_total",
            &[("reason", "ip_connections")]
        ) >= 2.0
    );

    // New connections per second: a burst of twice the rate, then 429.
    let rate = TestGateway::start(GatewayArgs {
        max_connects_per_ip_per_second: 2,
        ..Default::default()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(handshake(rate.addr, path, &[]).await);
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::SWITCHING_PROTOCOLS)
            .count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(statuses[5], StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        rate.metric("pingapp_gateway_refused_total", &[("reason", "ip_rate")]),
        2.0
    );
}

#[tokio::test]
async fn a_trusted_proxys_forwarded_address_is_the_client() {
    let gw = TestGateway::start(GatewayArgs {
        max_connections_per_ip: 1,
        max_connects_per_ip_per_second: 0,
        trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    })
    .await;
    let path = "/ws/private/?v=2";
    let via = |client: &'static str| [("x-forwarded-for", client)];
    let mut a = Client::connect_with(gw.addr, path, &via("198.51.100.1")).await;
    a.recv().await;
    assert_eq!(
        handshake(gw.addr, path, &via("198.51.100.1")).await,
        StatusCode::TOO_MANY_REQUESTS,
        "the same client behind the proxy"
    );
    assert_eq!(
        handshake(gw.addr, path, &via("198.51.100.2")).await,
        StatusCode::SWITCHING_PROTOCOLS,
        "another client behind the proxy"
    );
    // What the client wrote itself (further left) is not believed.
    assert_eq!(
        handshake(gw.addr, path, &via("10.9.9.9, 198.51.100.1")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn slow_or_silent_request_headers_are_cut_at_the_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let gw = TestGateway::start(GatewayArgs {
        header_timeout_ms: 300,
        ..Default::default()
    })
    .await;
    // Ends (EOF, a reset, or a 408 then EOF) within `within`, reading
    // whatever the server sends meanwhile.
    async fn cut_within(mut tcp: TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 512];
        tokio::time::timeout(within, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    let silent = TcpStream::connect(gw.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(
        cut_within(silent, Duration::from_secs(3)).await,
        "a silent client is cut"
    );

    // One byte every 50 ms: the whole request would take over 8 s.
    let mut trickle = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /ws/public/ HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr
    );
    let trickled = tokio::time::Instant::now();
    for b in request.bytes() {
        if trickle.write_all(&[b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if trickled.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    assert!(
        trickled.elapsed() < Duration::from_secs(3),
        "the trickling client was not cut (still writing after 3 s)"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not before the deadline"
    );

    // An honest client is unaffected.
    let mut c = gw.ws("/ws/private/?v=2").await;
    assert_eq!(c.recv().await["command"], "welcome");
}

#[tokio::test]
async fn api_requests_have_a_per_ip_budget() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let gw = TestGateway::start(GatewayArgs {
        max_api_requests_per_ip_per_second: 2,
        ..Default::default()
    })
    .await;
    // The response head of one GET, on its own connection.
    let get = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut resp = String::new();
        tcp.read_to_string(&mut resp).await.unwrap();
        resp.to_ascii_lowercase()
    };
    // A burst of twice the rate, then 429 with Retry-After.
    for _ in 0..4 {
        assert!(get("/api/roster").await.starts_with("http/1.1 200"));
    }
    let refused = get("/api/roster").await;
    assert!(refused.starts_with("http/1.1 429"), "{refused}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    assert!(refused.contains("too_many_requests"), "{refused}");
    // Pages are not API requests.
    assert!(get("/").await.starts_with("http/1.1 200"));
    assert_eq!(
        gw.metric("pingapp_gateway_refused_total", &[("reason", "api_rate")]),
        1.0
    );
}
