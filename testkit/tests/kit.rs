//! Tests of the test kit itself: what every other test leans on must fail
//! when it should and hold when it should.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use testkit::ws::{Client, Closed};
use testkit::{NatsServer, Service, eventually, free_port};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn free_ports_are_free_and_never_handed_out_twice() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "a port handed out twice");
    for port in ports {
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }
}

#[tokio::test]
async fn eventually_returns_once_the_check_holds() {
    tokio::time::pause();
    let mut calls = 0;
    eventually(Duration::from_secs(1), "the third call", || {
        calls += 1;
        std::future::ready(calls == 3)
    })
    .await;
    assert_eq!(calls, 3);
}

#[tokio::test]
#[should_panic(expected = "timed out after 1s waiting for: never")]
async fn eventually_fails_when_the_check_never_holds() {
    // Simulated time: the second passes at once.
    tokio::time::pause();
    eventually(Duration::from_secs(1), "never", || {
        std::future::ready(false)
    })
    .await;
}

#[tokio::test]
async fn a_service_announces_itself_and_reports_its_exit_status() {
    let (mut service, line) = Service::command_at("/bin/sh")
        .args([
            "-c",
            "echo listening on 127.0.0.1:1; echo more; exec sleep 60",
        ])
        .spawn_announced();
    assert_eq!(line, "listening on 127.0.0.1:1");
    assert!(service.is_running());
    eventually(
        Duration::from_secs(10),
        "the rest of stdout in the log",
        || std::future::ready(service.log().contains("more")),
    )
    .await;
    let status = service.terminate().await;
    assert!(!status.success(), "sleep killed by SIGTERM: {status}");
    assert!(!service.is_running());
}

#[test]
#[should_panic(expected = "exited without announcing itself")]
fn a_service_that_exits_silently_fails_the_test() {
    let _ = Service::command_at("/bin/sh")
        .args(["-c", "exit 3"])
        .spawn_announced();
}

#[tokio::test]
async fn the_client_reads_frames_and_the_close_code() {
    // A WebSocket server that answers one text frame, then closes with 1012.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                let reply = format!(r#"{{"command":"echo","got":{t}}}"#);
                ws.send(Message::text(reply)).await.unwrap();
                let close = CloseFrame {
                    code: CloseCode::Restart,
                    reason: "".into(),
                };
                let _ = ws.close(Some(close)).await;
            }
        }
    });

    let mut c = Client::connect(addr, "/").await;
    c.send_text(r#"{"command":"ping","seq":1}"#).await;
    let v = c.recv_until("echo", |v| v["got"]["seq"] == 1).await;
    assert_eq!(v["got"]["command"], "ping");
    assert_eq!(c.closed().await, Closed::Code(1012));
}

#[tokio::test]
async fn a_nats_server_comes_back_on_its_port() {
    let mut nats = NatsServer::start().await;
    let port = nats.port();
    assert!(nats.is_running());
    nats.restart().await;
    assert_eq!(nats.port(), port);
    assert!(nats.is_running());
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("it accepts clients again");
}
