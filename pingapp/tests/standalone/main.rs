//! End-to-end tests of the standalone product: the real `pingapp` binary
//! on random ports, spoken to over real WebSockets and HTTP.

mod helpers;
mod trust;

use std::time::Duration;

use futures_util::SinkExt;
use helpers::{Closed, Server, WAIT, public_v2};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn v2_public_clients_see_each_others_join_rename_delay_and_leave_in_their_view() {
    let server = Server::start(&[]);
    let (mut a, a_id, _) = public_v2(&server).await;
    assert_eq!(a.view.me.as_ref().unwrap()["channel_name"], a_id.as_str());

    let (mut b, b_id, _) = public_v2(&server).await;
    let v = a
        .view_until(|v| v.row(&b_id).is_some() && v.total == 2)
        .await;
    let row = v.row(&b_id).unwrap();
    assert_eq!(row["name"], b_id.as_str(), "a new client's name is its id");
    assert_eq!(row["gateway"], "standalone");

    b.send(json!({"command":"change_name","name":"  Bob  "}))
        .await;
    a.view_until(|v| v.row(&b_id).is_some_and(|r| r["name"] == "Bob"))
        .await;
    // Its own page learns it through its own row.
    b.view_until(|v| v.me.as_ref().is_some_and(|m| m["name"] == "Bob"))
        .await;

    b.sample(12.5, 1).await;
    let v = a
        .view_until(|v| v.row(&b_id).is_some_and(|r| r["delay_time"] == 12.5))
        .await;
    let d = v.row(&b_id).unwrap();
    assert_eq!(d["median"], 12.5);
    assert_eq!(d["jitter"], 0.0);

    // A newcomer's first view holds both, with B's name and delay, and
    // itself.
    let (c, c_id, _) = public_v2(&server).await;
    let first = c.view.last_full.clone().unwrap();
    let rows = first["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["channel_name"] == a_id.as_str()));
    let bob = rows
        .iter()
        .find(|r| r["channel_name"] == b_id.as_str())
        .unwrap();
    assert_eq!(bob["name"], "Bob");
    assert_eq!(bob["delay_time"], 12.5);
    assert_eq!(bob["gateway"], "standalone");
    assert_eq!(first["me"]["channel_name"], c_id.as_str(), "its own row");

    b.close().await;
    a.view_until(|v| v.row(&b_id).is_none() && v.total == 2)
        .await;
    drop(c);
}

#[tokio::test]
async fn a_page_gets_only_the_rows_of_its_view() {
    let server = Server::start(&[]);
    let (mut w, _, _) = public_v2(&server).await;
    let (mut b, b_id, _) = public_v2(&server).await;
    let (mut c, c_id, _) = public_v2(&server).await;
    w.view_until(|v| v.total == 3).await;

    // W views B alone (its name, still its id, as a filter); `watch` is
    // accepted and changes nothing.
    w.send(json!({"command":"watch","channel_names":[c_id]}))
        .await;
    let v = w.set_view(json!({"filter": b_id, "limit": 10})).await;
    assert_eq!(v["matched"], 1);
    assert_eq!(v["total"], 3);
    b.sample(2.5, 1).await;
    c.sample(3.5, 1).await;
    let seen = w
        .collect_until(WAIT, |v| {
            testkit::ws::row_in(v, &b_id).is_some_and(|r| r["delay_time"] == 2.5)
        })
        .await;
    // Only C changes: W gets nothing about it (its count is unchanged).
    c.sample(4.5, 2).await;
    let mut all = seen;
    all.extend(w.collect_for(Duration::from_millis(1500)).await);
    for v in &all {
        assert!(!v.to_string().contains(&c_id), "C is not in W's view: {v}");
        assert_ne!(v["command"], "error", "{v}");
    }

    // Back to everyone: C is there with its latest delay.
    w.set_view(json!({})).await;
    assert_eq!(w.view.row(&c_id).unwrap()["delay_time"], 4.5);
}

#[tokio::test]
async fn v1_clients_speak_exactly_the_original_protocol() {
    let server = Server::start(&[]);
    // The original page: no ?v=2, no seq.
    let mut a = server.ws("/ws/public/").await;
    let own = a.recv().await;
    assert_eq!(
        own["command"], "connect",
        "the new client gets its own connect: {own}"
    );
    let a_id = own["channel_name"].as_str().unwrap().to_owned();
    assert_eq!(own["name"], a_id.as_str());

    a.send_text(r#"{"command":"ping"}"#).await;
    let pong = a.recv_until("pong", |_| true).await;
    assert_eq!(
        pong,
        json!({"command":"pong"}),
        "v1 pong is exactly the original"
    );

    let mut b = server.ws("/ws/public").await;
    let b_own = b.recv().await;
    let b_id = b_own["channel_name"].as_str().unwrap().to_owned();
    a.recv_until("connect", |v| v["channel_name"] == b_id.as_str())
        .await;

    // B has no sample yet: "-" in A's delay_times.
    a.send_text(r#"{"command":"ping"}"#).await;
    a.recv_until("pong", |_| true).await;
    a.send_text(r#"{"command":"delay_time","delay_time":12}"#)
        .await;
    let times = a.recv_until("delay_times", |_| true).await;
    assert_eq!(
        times["delay_times"][&a_id],
        json!({"name": a_id, "delay_time": 12}),
        "integers stay integers, as the original echoed them"
    );
    assert_eq!(
        times["delay_times"][&b_id],
        json!({"name": b_id, "delay_time": "-"})
    );

    b.send_text(r#"{"command":"change_name","name":"Bee"}"#)
        .await;
    let rename = a
        .recv_until("change_name", |v| v["channel_name"] == b_id.as_str())
        .await;
    assert_eq!(
        rename,
        json!({"command":"change_name","channel_name":b_id,"name":"Bee"})
    );

    // seq is echoed in v1 too, without server_time.
    a.send_text(r#"{"command":"ping","seq":9}"#).await;
    let pong = a.recv_until("pong", |_| true).await;
    assert_eq!(pong, json!({"command":"pong","seq":9}));

    b.close().await;
    let gone = a
        .recv_until("disconnect", |v| v["channel_name"] == b_id.as_str())
        .await;
    assert_eq!(gone, json!({"command":"disconnect","channel_name":b_id}));

    // Private v1: ping/pong only, no broadcasts.
    let mut p = server.ws("/ws/private/").await;
    p.send_text(r#"{"command":"ping"}"#).await;
    assert_eq!(p.recv().await, json!({"command":"pong"}));
}

#[tokio::test]
async fn v2_pong_echoes_seq_with_server_time() {
    let server = Server::start(&[]);
    let mut c = server.ws("/ws/private/?v=2").await;
    let welcome = c.recv().await;
    assert_eq!(welcome["command"], "welcome");
    assert_eq!(welcome["page"], "private");
    assert_eq!(welcome["ping_interval_ms"], 1000);
    assert_eq!(welcome["token"].as_str().unwrap().len(), 32);
    let before = chrono_ms();
    let pong = c.ping(41).await;
    assert_eq!(pong["seq"], 41);
    let t = pong["server_time"].as_i64().unwrap();
    assert!(
        t >= before - 1000 && t <= chrono_ms() + 1000,
        "server_time is Unix ms: {t}"
    );
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn private_clients_stay_private() {
    let server = Server::start(&[]);
    let (mut watcher, _, _) = public_v2(&server).await;
    let mut v1_watcher = server.ws("/ws/public/").await;

    let mut p = server.ws("/ws/private/?v=2").await;
    let welcome = p.recv().await;
    let p_id = welcome["channel_name"].as_str().unwrap().to_owned();
    let token = welcome["token"].as_str().unwrap().to_owned();
    for (i, d) in [5.0, 7.5, 6.25].iter().enumerate() {
        p.sample(*d, i as u64).await;
    }
    // Private clients may not rename: there is no roster to show a name in.
    p.send(json!({"command":"change_name","name":"secret"}))
        .await;
    let err = p.recv_until("error", |_| true).await;
    assert_eq!(err["code"], "unknown_command");

    // A public sample after the private ones, so we know they were processed.
    let (mut q, q_id, _) = public_v2(&server).await;
    q.sample(3.0, 1).await;
    let seen = watcher
        .collect_until(WAIT, |v| {
            testkit::ws::row_in(v, &q_id).is_some_and(|r| r["delay_time"] == 3.0)
        })
        .await;
    for v in &seen {
        assert!(
            !v.to_string().contains(&p_id),
            "private id in a broadcast: {v}"
        );
    }
    v1_watcher.send_text(r#"{"command":"ping"}"#).await;
    v1_watcher.recv_until("pong", |_| true).await;
    v1_watcher
        .send_text(r#"{"command":"delay_time","delay_time":1}"#)
        .await;
    let times = v1_watcher.recv_until("delay_times", |_| true).await;
    assert!(times["delay_times"].get(&p_id).is_none());
    assert!(times["delay_times"].get(&q_id).is_some());

    let (status, roster) = server.get_json("/api/roster", None).await;
    assert_eq!(status, 200);
    assert!(!roster.to_string().contains(&p_id));
    assert!(roster.to_string().contains(&q_id));

    // The samples reach the recorder; then only the token opens them.
    let path = format!("/api/clients/{p_id}/samples");
    let samples = wait_for_samples(&server, &path, Some(&token), 3).await;
    let values: Vec<f64> = samples
        .iter()
        .map(|s| s["delay_time"].as_f64().unwrap())
        .collect();
    assert_eq!(values, vec![5.0, 7.5, 6.25], "oldest first");
    assert_eq!(samples[0]["seq"], 0);
    assert!(samples[0]["at"].as_str().unwrap().ends_with('Z'));
    let unknown = server
        .get_json("/api/clients/ffffffffffffffff/samples", None)
        .await;
    assert_eq!(unknown.0, 404);
    assert_eq!(
        server.get_json(&path, None).await,
        unknown,
        "no token: same as unknown"
    );
    assert_eq!(
        server.get_json(&path, Some("wrong")).await,
        unknown,
        "wrong token: same as unknown"
    );
    // The scheme is case-insensitive (RFC 9110): `bearer` opens it too.
    let lower = reqwest::Client::new()
        .get(server.url(&path))
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200, "lower-case bearer");

    // Stats count public samples only (q's 3.0 and the v1 watcher's 1),
    // never p's 5, 7.5 and 6.25.
    wait_for_samples(&server, &format!("/api/clients/{q_id}/samples"), None, 1).await;
    let public_count = |stats: &Value| {
        stats["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    testkit::eventually(WAIT, "/api/stats counts 2 public samples", || async {
        let (status, body) = server
            .get_json("/api/stats?window=1h&bucket=1h", None)
            .await;
        assert_eq!(status, 200, "{body}");
        public_count(&body) >= 2
    })
    .await;
    let (_, stats) = server
        .get_json("/api/stats?window=1h&bucket=1h", None)
        .await;
    assert_eq!(public_count(&stats), 2, "{stats}");
    let buckets = stats["buckets"].as_array().unwrap();
    let max = buckets
        .iter()
        .map(|b| b["max"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(max, 3.0, "{stats}");
}

async fn wait_for_samples(
    server: &Server,
    path: &str,
    token: Option<&str>,
    n: usize,
) -> Vec<Value> {
    let has_n = |status: u16, body: &Value| {
        status == 200 && body["samples"].as_array().is_some_and(|s| s.len() >= n)
    };
    testkit::eventually(WAIT, &format!("{path} has {n} samples"), || async {
        let (status, body) = server.get_json(path, token).await;
        has_n(status, &body)
    })
    .await;
    let (status, body) = server.get_json(path, token).await;
    assert!(has_n(status, &body), "{path}: {status} {body}");
    body["samples"].as_array().unwrap().clone()
}

#[tokio::test]
async fn public_samples_are_readable_by_anyone_and_the_api_rejects_bad_parameters() {
    let server = Server::start(&[]);
    let (mut c, id, _) = public_v2(&server).await;
    c.sample(1.5, 1).await;
    c.sample(2.5, 2).await;
    let path = format!("/api/clients/{id}/samples");
    let samples = wait_for_samples(&server, &path, None, 2).await;
    assert_eq!(samples.len(), 2);
    let (_, one) = server.get_json(&format!("{path}?limit=1"), None).await;
    assert_eq!(one["samples"].as_array().unwrap().len(), 1);
    assert_eq!(one["channel_name"], id.as_str());
    let future = server
        .get_json(&format!("{path}?since=2999-01-01T00:00:00Z"), None)
        .await;
    assert_eq!(future.0, 200);
    assert_eq!(future.1["samples"], json!([]));

    for bad in [
        format!("{path}?limit=0"),
        format!("{path}?limit=abc"),
        format!("{path}?since=yesterday"),
        "/api/stats?window=1w".to_owned(),
        "/api/stats?window=1h&bucket=2h".to_owned(),
        "/api/stats?window=30d&bucket=1s".to_owned(),
    ] {
        let (status, body) = server.get_json(&bad, None).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request");
    }

    let (status, roster) = server.get_json("/api/roster", None).await;
    assert_eq!(status, 200);
    let me = roster["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel_name"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(me["gateway"], "standalone");
    assert_eq!(me["delay_time"], 2.5);
    assert!(me["connected_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn every_bad_input_is_answered_and_the_connection_lives_on() {
    let server = Server::start(&[]);
    for path in [
        "/ws/public/?v=2",
        "/ws/private/?v=2",
        "/ws/public/",
        "/ws/private/",
    ] {
        let mut c = server.ws(path).await;
        let cases: Vec<(Message, &str)> = vec![
            (Message::text("not json"), "bad_json"),
            (Message::text("[1,2]"), "bad_json"),
            (Message::text(r#"{"no":"command"}"#), "bad_json"),
            (
                Message::binary(b"{\"command\":\"ping\"}".to_vec()),
                "bad_json",
            ),
            (Message::text(r#"{"command":"dance"}"#), "unknown_command"),
            (
                Message::text(r#"{"command":"delay_time","delay_time":"fast"}"#),
                "bad_delay",
            ),
            (
                Message::text(r#"{"command":"delay_time","delay_time":-1}"#),
                "bad_delay",
            ),
            (
                Message::text(r#"{"command":"delay_time","delay_time":60001}"#),
                "bad_delay",
            ),
            (Message::text(r#"{"command":"delay_time"}"#), "bad_delay"),
            (
                Message::text(r#"{"command":"watch","channel_names":"all"}"#),
                "bad_watch",
            ),
        ];
        let mut cases = cases;
        if path.starts_with("/ws/public") {
            cases.push((
                Message::text(r#"{"command":"change_name","name":"   "}"#),
                "bad_name",
            ));
            cases.push((
                Message::text(json!({"command":"change_name","name":"x".repeat(65)}).to_string()),
                "bad_name",
            ));
            cases.push((
                Message::text(r#"{"command":"change_name","name":"a\u0000b"}"#),
                "bad_name",
            ));
            cases.push((Message::text(r#"{"command":"change_name"}"#), "bad_name"));
        }
        for (msg, code) in cases {
            let shown = format!("{msg:?}");
            c.send_msg(msg).await;
            let err = c.recv_until("error", |_| true).await;
            assert_eq!(err["code"], code, "{path} {shown}: {err}");
            assert!(!err["detail"].as_str().unwrap().is_empty());
        }
        c.send_text(r#"{"command":"ping","seq":1}"#).await;
        let pong = c.recv_until("pong", |_| true).await;
        assert_eq!(pong["seq"], 1, "{path}: the connection lives on");
    }
    let errors = server.metric("pingapp_gateway_errors_total").await;
    assert!(errors >= 40.0, "errors are counted: {errors}");
}

#[tokio::test]
async fn oversize_frames_close_with_1009_and_floods_with_1008() {
    let server = Server::start(&["--max-messages-per-second", "20"]);
    let mut big = server.ws("/ws/public/?v=2").await;
    big.recv().await;
    big.send_text(&format!(
        r#"{{"command":"ping","pad":"{}"}}"#,
        "x".repeat(5000)
    ))
    .await;
    assert_eq!(big.closed().await, Closed::Code(1009));

    let mut huge = server.ws("/ws/private/").await;
    let _ = huge
        .inner()
        .send(Message::text(format!(
            r#"{{"command":"ping","pad":"{}"}}"#,
            "x".repeat(200_000)
        )))
        .await;
    assert_eq!(huge.closed().await, Closed::Code(1009));

    let mut flood = server.ws("/ws/private/?v=2").await;
    flood.recv().await;
    for i in 0..40 {
        if flood
            .inner()
            .send(Message::text(json!({"command":"ping","seq":i}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(flood.closed().await, Closed::Code(1008));

    // A well-behaved client on the same gateway is unaffected.
    let mut ok = server.ws("/ws/private/?v=2").await;
    ok.recv().await;
    assert_eq!(ok.ping(1).await["seq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_slow_the_others() {
    let server = Server::start(&[
        "--max-messages-per-second",
        "100000",
        "--max-bytes-per-second",
        "1073741824",
        "--max-renames-per-minute",
        "1000000",
    ]);
    // The stalled client: a small receive buffer, and it never reads again.
    // v1 pages get every event (a v2 page gets at most one frame a tick,
    // which no rename storm can pile up).
    let stalled = helpers::Client::connect_small_buffer(server.addr, "/ws/public/", 4096).await;
    let mut reader = server.ws("/ws/public/").await;
    let (driver, driver_id, _) = public_v2(&server).await;
    let mut driver = driver.into_sender();

    // Enough broadcast volume (about 8 MB) to fill the stalled client's
    // socket buffers and then its outbound queue, in rounds the reading
    // client keeps up with.
    let long = "n".repeat(58); // + 6 digits: the longest name allowed
    let (rounds, per_round) = (120, 500);
    let mut seen = 0;
    for round in 0..rounds {
        for i in 0..per_round {
            driver
                .send(json!({"command":"change_name","name":format!("{long}{round:03}{i:03}")}))
                .await;
        }
        let last = format!("{long}{round:03}{:03}", per_round - 1);
        loop {
            let v = reader.recv().await;
            if v["command"] == "change_name" && v["channel_name"] == driver_id.as_str() {
                seen += 1;
                if v["name"] == last.as_str() {
                    break;
                }
            }
        }
    }
    assert_eq!(
        seen,
        rounds * per_round,
        "the reading client got every broadcast"
    );
    assert_eq!(reader.ping(7).await["seq"], 7, "and its pings are answered");
    let drops = server.metric("pingapp_gateway_outbound_drops_total").await;
    assert!(
        drops >= 1.0,
        "the stalled client was dropped, not waited for"
    );
    drop(stalled);
}

#[tokio::test]
async fn keepalive_measures_server_rtt_and_silent_clients_are_closed() {
    let server = Server::start(&[
        "--keepalive-interval-ms",
        "200",
        "--idle-timeout-ms",
        "1000",
    ]);
    // A reading client answers Ping frames (tungstenite does) and gets server_rtt.
    let connected = std::time::Instant::now();
    let mut c = server.ws("/ws/private/?v=2").await;
    c.recv().await;
    let rtt = c.recv_until("server_rtt", |_| true).await;
    let rtt_ms = rtt["rtt_ms"].as_f64().expect("rtt_ms is a number");
    // A measured round trip: more than nothing, and no longer than this
    // client has existed (not seconds or microseconds mislabelled as ms).
    let lifetime_ms = connected.elapsed().as_secs_f64() * 1000.0;
    assert!(
        rtt_ms > 0.0 && rtt_ms <= lifetime_ms,
        "rtt_ms {rtt_ms}, client connected {lifetime_ms} ms ago"
    );

    // A client that stops reading also stops answering Pings: closed after
    // 1 s without a pong.
    let mut silent = server.ws("/ws/private/?v=2").await;
    silent.recv().await;
    let silent_closed = r#"pingapp_gateway_disconnects_total{code="1001"}"#;
    testkit::eventually(WAIT, "the silent client is closed with 1001", || async {
        server.metric(silent_closed).await >= 1.0
    })
    .await;
    // The close frame may be lost with the reset of a socket that was
    // never read, but the connection is over either way.
    let how = silent.closed().await;
    assert!(
        matches!(how, Closed::Code(1001) | Closed::Abrupt),
        "the silent client ended with {how:?}"
    );
    assert!(
        server
            .metric("pingapp_gateway_server_rtt_seconds_count")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn sigterm_drains_clients_with_1012_and_keeps_every_sample() {
    // A ping and a sample each, faster than the default 50 messages/s.
    let mut server = Server::start(&["--max-messages-per-second", "1000"]);
    let mut c = server.ws("/ws/private/?v=2").await;
    let welcome = c.recv().await;
    let id = welcome["channel_name"].as_str().unwrap().to_owned();
    let token = welcome["token"].as_str().unwrap().to_owned();
    let n = 40;
    for i in 0..n {
        c.sample(i as f64 + 0.5, i as u64).await;
    }
    c.ping(1000).await; // everything before it was processed
    let status = server.terminate().await;
    assert_eq!(c.closed().await, Closed::Code(1012));
    assert!(status.success(), "exit status {status:?}");

    // Restart on the same database: every accepted sample is there.
    let dir = server.into_dir();
    let server = Server::start_in(dir, &[]);
    let samples = wait_for_samples(
        &server,
        &format!("/api/clients/{id}/samples"),
        Some(&token),
        n,
    )
    .await;
    assert_eq!(samples.len(), n);
}

#[tokio::test]
async fn readiness_is_503_while_the_bus_is_down_and_200_again_after() {
    // Arrange: the standalone binary on a real NATS server instead of its
    // in-memory bus, so the bus can go away under it.
    let mut nats = testkit::NatsServer::start().await;
    let prefix = testkit::unique_prefix();
    let server = Server::start(&["--nats-url", &nats.url(), "--subject-prefix", &prefix]);
    testkit::eventually(WAIT, "/readyz answers 200", || async {
        server.admin_status("/readyz").await == 200
    })
    .await;

    // Act: the NATS server stops.
    nats.stop().await;

    // Assert: not ready while it is gone, ready again once it is back.
    testkit::eventually(WAIT, "/readyz answers 503 with NATS down", || async {
        server.admin_status("/readyz").await == 503
    })
    .await;
    nats.start_again().await;
    testkit::eventually(WAIT, "/readyz answers 200 with NATS back", || async {
        server.admin_status("/readyz").await == 200
    })
    .await;
}

#[tokio::test]
async fn readiness_metrics_and_pages() {
    let server = Server::start(&[]);
    // Ready once every part is up (the 503 side: the next test).
    testkit::eventually(WAIT, "/readyz answers 200", || async {
        server.admin_status("/readyz").await == 200
    })
    .await;
    assert_eq!(
        reqwest::get(server.admin_url("/livez"))
            .await
            .unwrap()
            .status(),
        200
    );
    let mut c = server.ws("/ws/public/?v=2").await;
    c.recv().await;
    c.ping(1).await;
    let metrics = reqwest::get(server.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in [
        "pingapp_gateway_connections",
        "pingapp_gateway_pings_total",
        "pingapp_gateway_ping_duration_seconds_bucket",
        "pingapp_gateway_messages_in_total",
        "pingapp_gateway_messages_out_total",
    ] {
        assert!(metrics.contains(family), "missing {family}");
    }
    for (path, content_type) in [
        ("/", "text/html"),
        ("/private/", "text/html"),
        ("/public/", "text/html"),
        ("/static/pingapp.js", "text/javascript"),
        ("/static/app.css", "text/css"),
    ] {
        let resp = reqwest::get(server.url(path)).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers();
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with(content_type),
            "{path}"
        );
        assert_eq!(h["cross-origin-opener-policy"], "same-origin");
        assert_eq!(h["cross-origin-embedder-policy"], "require-corp");
        assert!(h.contains_key("content-security-policy"));
    }
    assert_eq!(
        reqwest::get(server.url("/static/nope.js"))
            .await
            .unwrap()
            .status(),
        404
    );
}

#[test]
fn bad_settings_stop_with_one_line_and_status_2() {
    for args in [
        vec!["--listen", "not-an-address"],
        vec!["--database-url", "mysql://x"],
        vec!["--max-frame-bytes", "0"],
        vec!["--nats-url", "nats://h:port"],
        vec!["--retention", "forever"],
        vec!["--trusted-proxies", "10.0.0.0/99"],
        vec!["--max-connections-per-ip", "many"],
        vec!["--header-timeout-ms", "5"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pingapp"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        let flag = args[0];
        assert!(
            stderr.contains(flag),
            "{args:?}: the line names the setting: {stderr}"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pingapp"))
        .env("PINGAPP_MAX_MESSAGES_PER_SECOND", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn documented_metric_families_are_exposed() {
    let server = Server::start(&[]);
    // Traffic that touches every family: pings, samples, a rename, an error.
    let (mut c, id, _) = public_v2(&server).await;
    c.ping(1).await;
    c.sample(4.0, 1).await;
    c.send(json!({"command":"change_name","name":"m"})).await;
    c.send_text("nope").await;
    c.recv_until("error", |_| true).await;
    wait_for_samples(&server, &format!("/api/clients/{id}/samples"), None, 1).await;
    server
        .get_json("/api/stats?window=1h&bucket=1h", None)
        .await;

    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    let families: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `pingapp_"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert!(families.len() > 30, "docs/metrics.md lists the families");
    let text = reqwest::get(server.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for f in families {
        let name = format!("pingapp_{f}");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "{name} is documented but not exposed"
        );
    }
}

#[tokio::test]
async fn traces_run_from_the_gateway_into_the_recorder() {
    let sink = testkit::OtlpSink::start().await;
    let endpoint = sink.endpoint();
    let server = Server::start_with_env(
        tempfile::tempdir().unwrap(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("RUST_LOG", "info"),
        ],
    );
    let (mut c, id, _) = public_v2(&server).await;
    c.sample(2.0, 1).await;
    wait_for_samples(&server, &format!("/api/clients/{id}/samples"), None, 1).await;

    // One process: gateway and recorder share the service name.
    testkit::eventually(WAIT, "traces shared by gateway and recorder", || {
        std::future::ready(
            sink.share_trace(
                "pingapp",
                "gateway.persist_batch",
                "pingapp",
                "recorder.record_batch",
            ) && sink.share_trace(
                "pingapp",
                "gateway.api.samples",
                "pingapp",
                "recorder.query",
            ),
        )
    })
    .await;
}
