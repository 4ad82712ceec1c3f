//! End-to-end tests of the distributed services: the real `gateway`,
//! `presence` and `recorder` binaries as processes, over a real
//! `nats-server` (JetStream, file storage) and PostgreSQL, with clients
//! speaking WebSocket and HTTP like browsers do. Each test owns its NATS
//! server, database and subject prefix, so tests run in parallel.
//!
//! Run with `cargo test -p pingapp-systest --test distributed` (the test
//! kit builds the service binaries first when they are missing or stale).

mod helpers;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use helpers::{
    Deployment, HEARTBEAT_MS, Senders, WAIT, assert_stored_exactly_once, eventually, is,
    private_v2, public_v1, public_v2,
};
use serde_json::json;
use services::messages::Broadcast;
use testkit::PgCluster;

/// Clients send a sample (a ping, then its `delay_time`) this often: 20
/// samples and 40 messages a second, within the default limit of 50
/// messages a second.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

#[tokio::test]
async fn v1_and_v2_clients_on_two_gateways_see_each_other() {
    let d = Deployment::new().await;
    let _presence = d.presence().await;
    let (gw_a, gw_b) = tokio::join!(d.gateway("gw-a"), d.gateway("gw-b"));

    // v2 on gateway A, v2 on gateway B.
    let (mut a, _) = public_v2(&gw_a).await;
    eventually(WAIT, "gateway B learned of A through presence", || async {
        gw_b.roster_ids().await.contains(&a.id)
    })
    .await;
    let (mut b, view) = public_v2(&gw_b).await;
    let row_a = view["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["channel_name"] == a.id.as_str())
        .unwrap_or_else(|| panic!("B's first view holds A of the other gateway: {view}"));
    assert_eq!(row_a["gateway"], "gw-a");
    let v = a.view_until(|v| v.row(&b.id).is_some()).await;
    assert_eq!(v.row(&b.id).unwrap()["gateway"], "gw-b");
    assert_eq!(v.row(&b.id).unwrap()["name"], b.id.as_str());

    // Rename and delays cross gateways.
    b.rename("Bob").await;
    a.view_until(|v| v.row(&b.id).is_some_and(|r| r["name"] == "Bob"))
        .await;
    b.sample(12.5, 1).await;
    a.view_until(|v| v.row(&b.id).is_some_and(|r| r["delay_time"] == 12.5))
        .await;

    // v1 on gateway A: its delay_times reply lists the clients of both.
    let mut c = public_v1(&gw_a).await;
    b.view_until(|v| v.row(&c.id).is_some()).await;
    c.send(json!({"command":"ping"})).await;
    c.recv_until("pong", |_| true).await;
    c.send(json!({"command":"delay_time","delay_time":7})).await;
    let times = c.recv_until("delay_times", |_| true).await;
    let t = &times["delay_times"];
    assert_eq!(t[&c.id], json!({"name": c.id, "delay_time": 7}));
    assert_eq!(t[&b.id], json!({"name": "Bob", "delay_time": 12.5}));
    assert_eq!(t[&a.id], json!({"name": a.id, "delay_time": "-"}));

    // v1 on gateway B, renamed: the v1 client on A sees the original frames.
    let mut e = public_v1(&gw_b).await;
    let connect = c.recv_until("connect", |v| is(v, "connect", &e.id)).await;
    assert_eq!(connect["name"], e.id.as_str());
    e.send(json!({"command":"change_name","name":"Eve"})).await;
    let rename = c
        .recv_until("change_name", |v| is(v, "change_name", &e.id))
        .await;
    assert_eq!(
        rename,
        json!({"command":"change_name","channel_name":e.id,"name":"Eve"})
    );

    // Both gateways' HTTP rosters agree.
    let all: std::collections::BTreeSet<String> =
        [&a.id, &b.id, &c.id, &e.id].into_iter().cloned().collect();
    for gw in [&gw_a, &gw_b] {
        eventually(WAIT, "the roster holds all four clients", || async {
            gw.roster_ids().await == all
        })
        .await;
    }

    // Disconnects cross gateways too.
    let (b_id, e_id) = (b.id.clone(), e.id.clone());
    b.close().await;
    a.view_until(|v| v.row(&b_id).is_none()).await;
    c.recv_until("disconnect", |v| is(v, "disconnect", &b_id))
        .await;
    e.close().await;
    let gone = c
        .recv_until("disconnect", |v| is(v, "disconnect", &e_id))
        .await;
    assert_eq!(gone, json!({"command":"disconnect","channel_name":e_id}));
    a.view_until(|v| v.row(&e_id).is_none() && v.total == 2)
        .await;
    for gw in [&gw_a, &gw_b] {
        eventually(WAIT, "the roster lost B and E", || async {
            let ids = gw.roster_ids().await;
            !ids.contains(&b_id) && !ids.contains(&e_id) && ids.len() == 2
        })
        .await;
    }
}

#[tokio::test]
async fn private_history_is_readable_through_either_gateway_with_its_token_only() {
    let d = Deployment::new().await;
    let (_presence, _recorder, gw_a, gw_b) = tokio::join!(
        d.presence(),
        d.recorder(),
        d.gateway("gw-a"),
        d.gateway("gw-b")
    );

    let mut p = private_v2(&gw_a).await;
    for (i, ms) in [5.0, 7.5, 6.25].into_iter().enumerate() {
        p.sample(ms, i as u64).await;
    }
    let (mut q, _) = public_v2(&gw_b).await;
    q.sample(3.0, 1).await;

    let path = format!("/api/clients/{}/samples", p.id);
    for gw in [&gw_b, &gw_a] {
        eventually(WAIT, "the private history, with its token", || async {
            let (status, body) = gw.get_json(&path, Some(&p.token)).await;
            status == 200 && body["samples"].as_array().is_some_and(|s| s.len() == 3)
        })
        .await;
        let (_, body) = gw.get_json(&path, Some(&p.token)).await;
        assert_eq!(body["channel_name"], p.id.as_str());
        assert_eq!(helpers::delays(&body), [5.0, 7.5, 6.25], "oldest first");
        assert_eq!(body["samples"][2]["seq"], 2);
    }

    // Without the token, or with a wrong one: exactly like an unknown id.
    let (unknown_status, unknown_body) = gw_b
        .get_json("/api/clients/nobody-at-all/samples", None)
        .await;
    assert_eq!(unknown_status, 404);
    for gw in [&gw_a, &gw_b] {
        for bearer in [None, Some("wrong-token"), Some(q.token.as_str())] {
            let (status, body) = gw.get_json(&path, bearer).await;
            assert_eq!(status, 404, "bearer {bearer:?}: {body}");
            assert_eq!(body, unknown_body, "indistinguishable from an unknown id");
        }
    }

    // A public client's history is readable by anyone, on either gateway.
    let public_path = format!("/api/clients/{}/samples", q.id);
    for gw in [&gw_a, &gw_b] {
        eventually(WAIT, "the public history, without a token", || async {
            let (status, body) = gw.get_json(&public_path, None).await;
            status == 200 && body["samples"].as_array().is_some_and(|s| s.len() == 1)
        })
        .await;
    }
    // The private client is in no roster.
    for gw in [&gw_a, &gw_b] {
        assert!(!gw.roster_ids().await.contains(&p.id));
    }
}

/// A browser's own history (docs/protocol.md, "Your history"): two
/// connections presenting the same device secret, on two gateways and both
/// pages, count as one history; another secret, none, or a malformed one
/// get the same 404; bounds are a 400; forgetting deletes it all, once.
#[tokio::test]
async fn a_browsers_history_spans_its_connections_and_only_its_secret_reads_or_forgets_it() {
    const SECRET: &str = "c3lzdGVzdC1kZXZpY2Utc2VjcmV0LTAxMjM0NTY3ODk";
    const OTHER: &str = "b3RoZXItZGV2aWNlLXNlY3JldC0wMTIzNDU2Nzg5YWI";
    let d = Deployment::new().await;
    let (_presence, _recorder, gw_a, gw_b) = tokio::join!(
        d.presence(),
        d.recorder(),
        d.gateway("gw-a"),
        d.gateway("gw-b")
    );

    let mut p = private_v2(&gw_a).await;
    p.send(json!({"command": "device", "secret": SECRET})).await;
    for (i, ms) in [5.0, 7.0, 9.0].into_iter().enumerate() {
        p.sample(ms, i as u64 + 1).await;
    }
    let (mut q, _) = public_v2(&gw_b).await;
    q.send(json!({"command": "device", "secret": SECRET})).await;
    q.sample(11.0, 1).await;
    // A third connection of another browser: not in this history.
    let mut r = private_v2(&gw_a).await;
    r.send(json!({"command": "device", "secret": OTHER})).await;
    r.sample(500.0, 1).await;
    assert_ne!(p.id, q.id);

    let history = "/api/device/history?window=1h";
    let total = |body: &serde_json::Value| -> u64 {
        body["buckets"]
            .as_array()
            .map(|b| b.iter().filter_map(|b| b["count"].as_u64()).sum())
            .unwrap_or(0)
    };
    for gw in [&gw_b, &gw_a] {
        eventually(WAIT, "both connections' samples in the history", || async {
            let (status, body) = gw.get_json(history, Some(SECRET)).await;
            status == 200 && total(&body) == 4
        })
        .await;
    }
    let (_, body) = gw_a.get_json(history, Some(SECRET)).await;
    assert_eq!(body["window_ms"], 3_600_000, "{body}");
    assert_eq!(
        body["bucket_ms"], 60_000,
        "the default bucket of 1h: {body}"
    );
    let buckets = body["buckets"].as_array().unwrap();
    let min = buckets.iter().map(|b| b["min"].as_f64().unwrap());
    let max = buckets.iter().map(|b| b["max"].as_f64().unwrap());
    assert_eq!(min.fold(f64::INFINITY, f64::min), 5.0, "{body}");
    assert_eq!(max.fold(0.0, f64::max), 11.0, "{body}");
    for b in buckets {
        let start = b["start"].as_str().unwrap();
        // RFC 3339 in UTC with microseconds, as every time of the API.
        assert!(
            start.len() == 27 && start.ends_with('Z') && start.as_bytes()[10] == b'T',
            "{start}"
        );
        for key in ["mean", "p50", "p95", "p99"] {
            let v = b[key].as_f64().unwrap();
            assert!((5.0..=11.0).contains(&v), "{key} {v}: {body}");
        }
    }
    // A longer window with its own default bucket.
    let (status, week) = gw_b
        .get_json("/api/device/history?window=7d", Some(SECRET))
        .await;
    assert_eq!(status, 200, "{week}");
    assert_eq!(week["bucket_ms"], 3_600_000, "{week}");
    assert_eq!(total(&week), 4, "{week}");

    // One 404 for everyone else: no header, a malformed secret, another
    // browser's secret with a history of its own, a secret nobody used.
    let (status, none) = gw_a.get_json(history, None).await;
    assert_eq!(status, 404, "{none}");
    assert_eq!(none["error"], "not_found");
    let (status, other) = gw_a.get_json(history, Some(OTHER)).await;
    assert_eq!(status, 200, "the other browser reads its own: {other}");
    assert_eq!(total(&other), 1, "{other}");
    for bearer in [
        "short",
        "not base64url at all, with spaces and ==",
        &"u".repeat(43),
    ] {
        let (status, body) = gw_b.get_json(history, Some(bearer)).await;
        assert_eq!(status, 404, "{bearer}: {body}");
        assert_eq!(body, none, "{bearer}: the same answer");
    }

    // Bounds: 400, before anything travels.
    for query in [
        "window=soon",
        "window=30s",
        "window=32d",
        "window=1h&bucket=90s",
        "window=31d&bucket=1m",
    ] {
        let (status, body) = gw_a
            .get_json(&format!("/api/device/history?{query}"), Some(SECRET))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "bad_request", "{query}: {body}");
    }

    // Forgetting: only with the secret; everything of both connections
    // goes, the other browser's stays.
    let delete = reqwest::Method::DELETE;
    let (status, body) = gw_a.call_json(delete.clone(), "/api/device", None).await;
    assert_eq!((status, &body), (404, &none));
    let (status, body) = gw_b
        .call_json(delete.clone(), "/api/device", Some(SECRET))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"forgotten": true, "channels": 2}));
    for gw in [&gw_a, &gw_b] {
        let (status, body) = gw.get_json(history, Some(SECRET)).await;
        assert_eq!((status, &body), (404, &none), "forgotten");
    }
    let (status, body) = gw_a.call_json(delete, "/api/device", Some(SECRET)).await;
    assert_eq!((status, &body), (404, &none), "forgotten once");
    let (status, other) = gw_b.get_json(history, Some(OTHER)).await;
    assert_eq!((status, total(&other)), (200, 1), "{other}");
}

/// One set of statistics bounds for gateway and recorder, and refusals that
/// keep whose fault they are: 5,001 to 10,000 buckets passed the gateway
/// and came back from the recorder as a 503; now they are a 400, the
/// boundary of 5,000 is answered by the real recorder, and a recorder that
/// is gone is a 503.
#[tokio::test]
async fn statistics_beyond_the_shared_bounds_are_a_bad_request_not_unavailable() {
    let d = Deployment::new().await;
    let (_presence, mut recorder, gw) = tokio::join!(d.presence(), d.recorder(), d.gateway("gw"));
    let (mut c, _) = public_v2(&gw).await;
    c.sample(4.0, 1).await;
    eventually(WAIT, "the sample counted in /api/stats", || async {
        let (status, body) = gw.get_json("/api/stats?window=1h&bucket=1m", None).await;
        status == 200
            && body["buckets"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["count"] == 1))
    })
    .await;

    for query in [
        "window=5001s&bucket=1s",
        "window=6000s&bucket=1s",
        "window=10000s&bucket=1s",
        "window=1h&bucket=500ms",
        "window=5000s&bucket=1s",
        "window=31d&bucket=10m",
    ] {
        let (status, body) = gw.get_json(&format!("/api/stats?{query}"), None).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "bad_request", "{query}: {body}");
    }
    // Within the bounds, in any unit of the duration grammar: the recorder
    // answers.
    for query in [
        "window=15m&bucket=180ms",
        "window=2s&bucket=500ms",
        "window=1h30m&bucket=120",
        "window=31d&bucket=1h",
    ] {
        let (status, body) = gw.get_json(&format!("/api/stats?{query}"), None).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert!(body["buckets"].is_array(), "{query}: {body}");
    }

    recorder.svc.kill();
    let (status, body) = gw.get_json("/api/stats?window=1h&bucket=1m", None).await;
    assert_eq!(status, 503, "no recorder: {body}");
    assert_eq!(body["error"], "unavailable", "{body}");
    let (status, _) = gw.get_json("/api/stats?window=6000s&bucket=1s", None).await;
    assert_eq!(status, 400, "refused before it travels");
}

#[tokio::test]
async fn a_recorder_killed_mid_stream_loses_and_duplicates_nothing() {
    let d = Deployment::new().await;
    // Deliveries are gathered for a second before each insert, so the
    // recorder nearly always holds some it has not acknowledged yet.
    let (mut recorder, gw_a, gw_b) = tokio::join!(
        d.recorder_with_batch_wait(1000),
        d.gateway("gw-a"),
        d.gateway("gw-b")
    );
    let mut clients = Vec::new();
    for gw in [&gw_a, &gw_b, &gw_a, &gw_b] {
        clients.push(private_v2(gw).await);
    }
    let senders = Senders::start(clients, SAMPLE_EVERY);

    // Kill it while it is busy writing and holds unacknowledged deliveries.
    eventually(WAIT, "samples are being stored", || async {
        d.count().await > 50
    })
    .await;
    eventually(WAIT, "the recorder holds deliveries", || async {
        recorder.metric("pingapp_recorder_consumer_pending").await > 0.0
    })
    .await;
    recorder.svc.kill();
    let at_kill = senders.sent();
    eventually(WAIT, "50 samples sent while no recorder runs", || {
        std::future::ready(senders.sent() > at_kill + 50)
    })
    .await;
    recorder.start_again().await;
    let at_restart = senders.sent();
    eventually(WAIT, "50 samples sent to the new recorder", || {
        std::future::ready(senders.sent() > at_restart + 50)
    })
    .await;
    let sent = senders.stop().await;

    // Batches the killed process held come again after the ack wait (2 s).
    assert_stored_exactly_once(&d, &sent, Duration::from_secs(20)).await;
    let redelivered = recorder.metric("pingapp_recorder_redeliveries_total").await;
    assert!(
        redelivered > 0.0,
        "what the killed recorder held came again: {redelivered} redeliveries, {} duplicates",
        recorder.metric("pingapp_recorder_duplicates_total").await
    );
}

#[tokio::test]
async fn a_postgres_restart_loses_nothing() {
    let mut pg = PgCluster::start().await;
    let d = Deployment::with_database(pg.create_database().await).await;
    let (recorder, gw_a, gw_b) = tokio::join!(d.recorder(), d.gateway("gw-a"), d.gateway("gw-b"));
    let clients = vec![private_v2(&gw_a).await, private_v2(&gw_b).await];
    let senders = Senders::start(clients, SAMPLE_EVERY);

    eventually(WAIT, "samples are being stored", || async {
        d.count().await > 20
    })
    .await;
    // Postgres stays down until inserts fail (the recorder's pool waits 3 s
    // for a connection) and are retried.
    pg.stop().await;
    let at_stop = senders.sent();
    eventually(
        Duration::from_secs(20),
        "the recorder met the outage",
        || async {
            recorder
                .metric("pingapp_recorder_database_errors_total")
                .await
                > 0.0
        },
    )
    .await;
    // The recorder can meet the outage within milliseconds (its read
    // pool connects in the background), so wait for a send while
    // Postgres is still down rather than expect one already.
    eventually(
        WAIT,
        "clients kept sending while Postgres was down",
        || async { senders.sent() > at_stop },
    )
    .await;
    pg.start_again().await;
    let at_restart = senders.sent();
    eventually(WAIT, "20 samples sent after the restart", || {
        std::future::ready(senders.sent() > at_restart + 20)
    })
    .await;
    let sent = senders.stop().await;

    assert_stored_exactly_once(&d, &sent, Duration::from_secs(20)).await;
}

/// One round of a pinger: a ping and its pong (within a second), then a
/// sample.
async fn ping_and_sample(
    phase: &str,
    seq: u64,
    pingers: &mut [helpers::Client],
    sent: &mut BTreeMap<String, u64>,
) {
    for c in pingers.iter_mut() {
        let pong = c.ping_within(seq, Duration::from_secs(1)).await;
        assert!(
            pong.is_some(),
            "{phase}: ping {seq} of {} got no pong",
            c.id
        );
        c.delay(1.0 + seq as f64, seq).await;
        *sent.get_mut(&c.id).expect("a pinger") += 1;
    }
    // The pace of the pingers (about 20 rounds a second), not a wait for
    // anything: time is the subject here.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_nats_restart_loses_nothing_and_pings_keep_their_pongs() {
    let mut d = Deployment::new().await;
    let (_presence, _recorder, gw_a, gw_b) = tokio::join!(
        d.presence(),
        d.recorder(),
        d.gateway("gw-a"),
        d.gateway("gw-b")
    );
    let (mut watcher, _) = public_v2(&gw_a).await;
    let mut pingers = vec![private_v2(&gw_a).await, private_v2(&gw_b).await];
    let mut sent: BTreeMap<String, u64> = pingers.iter().map(|c| (c.id.clone(), 0)).collect();

    let mut seq = 0;
    for _ in 0..10 {
        ping_and_sample("before the outage", seq, &mut pingers, &mut sent).await;
        seq += 1;
    }
    // NATS stays down until the gateways' stores fail (a JetStream publish
    // waits 5 s for its acknowledgement) and are retried; the pingers ping
    // and sample all along.
    d.nats.stop().await;
    let outage = Instant::now();
    loop {
        ping_and_sample("during the outage", seq, &mut pingers, &mut sent).await;
        seq += 1;
        let failed = gw_a.metric("pingapp_gateway_persist_errors_total").await
            + gw_b.metric("pingapp_gateway_persist_errors_total").await;
        if failed > 0.0 {
            break;
        }
        assert!(
            outage.elapsed() < Duration::from_secs(30),
            "no gateway met the outage within 30 s"
        );
    }
    d.nats.start_again().await;
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(1) {
        ping_and_sample("after the outage", seq, &mut pingers, &mut sent).await;
        seq += 1;
    }

    assert_stored_exactly_once(&d, &sent, Duration::from_secs(30)).await;

    // Presence answers again: a newcomer on B reaches the watcher on A.
    let (newcomer, _) = public_v2(&gw_b).await;
    watcher.view_until(|v| v.row(&newcomer.id).is_some()).await;
}

#[tokio::test]
async fn a_killed_gateways_clients_leave_every_roster_within_ten_seconds() {
    let d = Deployment::new().await;
    let (_presence, mut gw_a, gw_b) =
        tokio::join!(d.presence(), d.gateway("gw-a"), d.gateway("gw-b"));
    // The watcher is a v1 page: it gets every disconnect as it happens.
    let mut watcher = public_v1(&gw_b).await;
    let (x, _) = public_v2(&gw_a).await;
    watcher
        .recv_until("connect", |v| is(v, "connect", &x.id))
        .await;
    let y = public_v1(&gw_a).await;
    watcher
        .recv_until("connect", |v| is(v, "connect", &y.id))
        .await;
    eventually(WAIT, "gateway B's roster has A's clients", || async {
        gw_b.roster_ids().await.len() == 3
    })
    .await;

    gw_a.svc.kill();
    let killed = Instant::now();
    let limit = Duration::from_secs(10);
    let mut gone: BTreeSet<String> = BTreeSet::new();
    while !(gone.contains(&x.id) && gone.contains(&y.id)) {
        let left = limit.saturating_sub(killed.elapsed());
        match watcher.recv_within(left).await {
            Some(v) if v["command"] == "disconnect" => {
                let id = v["channel_name"].as_str().unwrap().to_owned();
                assert!(id == x.id || id == y.id, "disconnect of a live client: {v}");
                gone.insert(id);
            }
            Some(_) => {}
            None => panic!("only {gone:?} were disconnected within {limit:?} of the kill"),
        }
    }
    let left = limit.saturating_sub(killed.elapsed());
    eventually(left, "gateway B's /api/roster lost A's clients", || async {
        gw_b.roster_ids().await == BTreeSet::from([watcher.id.clone()])
    })
    .await;
    println!(
        "clients of the killed gateway gone after {:?}",
        killed.elapsed()
    );
}

/// Whether any of `frames` is a disconnect.
fn disconnects(frames: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    frames
        .iter()
        .filter(|v| v["command"] == "disconnect")
        .collect()
}

#[tokio::test]
async fn a_presence_restart_causes_no_spurious_disconnect() {
    let d = Deployment::new().await;
    let (mut presence, gw_a, gw_b) =
        tokio::join!(d.presence(), d.gateway("gw-a"), d.gateway("gw-b"));
    // v1 pages: they get every connect and disconnect as presence
    // broadcasts it (v2 pages see only their view).
    let mut w = public_v1(&gw_b).await;
    let mut a = public_v1(&gw_a).await;
    w.recv_until("connect", |v| is(v, "connect", &a.id)).await;
    let mut everyone = BTreeSet::from([w.id.clone(), a.id.clone()]);
    let mut newcomers = Vec::new();

    for how in ["SIGKILL", "SIGTERM"] {
        if how == "SIGKILL" {
            presence.svc.kill();
        } else {
            let status = presence.svc.terminate().await;
            assert!(
                status.success(),
                "presence exits cleanly on SIGTERM: {status}"
            );
        }
        // A client joins gateway A while presence is down; its id from
        // gateway A's own roster.
        let mut n = gw_a.ws("/ws/public/").await;
        let started = Instant::now();
        let ids = loop {
            let ids = gw_a.roster_ids().await;
            if ids.len() == everyone.len() + 1 {
                break ids;
            }
            assert!(
                started.elapsed() < WAIT,
                "gateway A does not list the newcomer"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        n.id = ids.difference(&everyone).next().unwrap().clone();
        // Presence stays down across two gateway heartbeats (time is the
        // subject: heartbeats nobody hears).
        tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS * 2)).await;
        presence.start_again().await;

        // Every page learns of it, its own too, and nobody saw a
        // disconnect.
        let mut seen = w.collect_until(WAIT, |v| is(v, "connect", &n.id)).await;
        seen.extend(w.collect_for(Duration::from_millis(HEARTBEAT_MS * 4)).await);
        assert!(disconnects(&seen).is_empty(), "after {how}, W saw {seen:?}");
        let seen_a = a.collect_until(WAIT, |v| is(v, "connect", &n.id)).await;
        assert!(
            disconnects(&seen_a).is_empty(),
            "after {how}, A saw {seen_a:?}"
        );
        n.own_connect().await;
        everyone.insert(n.id.clone());
        for gw in [&gw_a, &gw_b] {
            assert_eq!(
                gw.roster_ids().await,
                everyone,
                "the roster is whole after {how}"
            );
        }
        // Events flow again.
        a.rename(how).await;
        let rename = w
            .recv_until("change_name", |v| is(v, "change_name", &a.id))
            .await;
        assert_eq!(rename["name"], how);
        newcomers.push(n);
    }
}

#[tokio::test]
async fn two_presence_replicas_broadcast_once_and_fail_over() {
    let d = Deployment::new().await;
    let (p1, p2, gw_a, gw_b) = tokio::join!(
        d.presence(),
        d.presence(),
        d.gateway("gw-a"),
        d.gateway("gw-b")
    );
    let mut replicas = [p1, p2];
    let active = "pingapp_presence_active";
    eventually(WAIT, "exactly one replica is active", || async {
        replicas[0].metric(active).await + replicas[1].metric(active).await == 1.0
    })
    .await;

    // Presence's broadcasts as they leave it, and a v1 page (which gets
    // each event as a frame of its own).
    let bus = services::bus::nats::NatsBus::connect(&d.nats.url(), "test-listener")
        .await
        .unwrap();
    let subjects = services::subjects::Subjects::new(&d.prefix);
    let mut broadcasts = subjects.broadcast().subscribe(&bus).await.unwrap();
    let mut w = public_v1(&gw_b).await;
    let (mut x, _) = public_v2(&gw_a).await;
    x.rename("Xavier").await;
    x.sample(42.0, 1).await;
    let mut heard = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut quiet_until = None;
    loop {
        let now = Instant::now();
        let until = quiet_until.unwrap_or(deadline);
        if now >= until {
            assert!(quiet_until.is_some(), "no delay broadcast for X: {heard:?}");
            break;
        }
        let Ok(Some(m)) =
            tokio::time::timeout(until - now, futures_util::StreamExt::next(&mut broadcasts)).await
        else {
            continue;
        };
        let b = m.message.expect("a broadcast");
        if matches!(&b, Broadcast::Delays { delays } if delays.contains_key(&x.id))
            && quiet_until.is_none()
        {
            quiet_until = Some(Instant::now() + Duration::from_secs(1));
        }
        heard.push(b);
    }
    let about_x = |f: fn(&Broadcast, &str) -> bool| heard.iter().filter(|b| f(b, &x.id)).count();
    assert_eq!(
        about_x(|b, id| matches!(b, Broadcast::Connect { client } if client.channel_name == id)),
        1,
        "one connect broadcast: {heard:?}"
    );
    assert_eq!(
        about_x(|b, id| matches!(b, Broadcast::Rename { channel_name, .. } if channel_name == id)),
        1,
        "one rename broadcast: {heard:?}"
    );
    assert_eq!(
        about_x(|b, id| matches!(b, Broadcast::Delays { delays } if delays.contains_key(id))),
        1,
        "one delay update: {heard:?}"
    );
    // The v1 page got each event once.
    let seen = w.collect_for(Duration::from_millis(300)).await;
    let count = |command: &str| {
        seen.iter()
            .filter(|v| v["command"] == command && v["channel_name"] == x.id.as_str())
            .count()
    };
    assert_eq!(count("connect"), 1, "one connect frame: {seen:?}");
    assert_eq!(count("change_name"), 1, "one rename frame: {seen:?}");

    // Kill the active replica: the other takes over.
    let leader = if replicas[0].metric(active).await == 1.0 {
        0
    } else {
        1
    };
    replicas[leader].svc.kill();
    let killed = Instant::now();
    let survivor = &replicas[1 - leader];
    // A v1 page learns its id from its own connect, broadcast by the
    // survivor.
    let mut y = public_v1(&gw_a).await;
    w.recv_until("connect", |v| is(v, "connect", &y.id)).await;
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "events flow again {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(survivor.metric(active).await, 1.0, "the survivor is active");
    y.rename("Yolanda").await;
    let mut seen = w.collect_until(WAIT, |v| is(v, "change_name", &y.id)).await;
    seen.extend(w.collect_for(Duration::from_millis(500)).await);
    let renames = seen.iter().filter(|v| is(v, "change_name", &y.id)).count();
    assert_eq!(
        renames, 1,
        "one rename broadcast after the failover: {seen:?}"
    );
    assert!(disconnects(&seen).is_empty(), "no disconnect: {seen:?}");
    x.rename("Xavier II").await;
}

#[tokio::test]
async fn a_presence_replica_stopped_with_sigterm_hands_over_its_lease() {
    // A 60 s lease: without the release, the standby would wait for it to
    // lapse.
    let d = Deployment::new().await;
    let (p1, p2, gw) = tokio::join!(
        d.presence_with_lease_ttl(60_000),
        d.presence_with_lease_ttl(60_000),
        d.gateway("gw-a")
    );
    let mut replicas = [p1, p2];
    let active = "pingapp_presence_active";
    eventually(WAIT, "exactly one replica is active", || async {
        replicas[0].metric(active).await + replicas[1].metric(active).await == 1.0
    })
    .await;
    let mut w = public_v1(&gw).await;

    let leader = usize::from(replicas[0].metric(active).await != 1.0);
    let status = replicas[leader].svc.terminate().await;
    assert!(status.success(), "presence drains and exits 0: {status:?}");
    assert!(
        replicas[leader]
            .svc
            .log()
            .contains("released the presence lease"),
        "the leader says it released the lease:\n{}",
        replicas[leader].svc.log()
    );
    let survivor = &replicas[1 - leader];
    // The standby tries every second; a released lease is free at its next
    // attempt, far sooner than the 60 s ttl.
    eventually(
        Duration::from_secs(10),
        "the standby took over the released lease",
        || async { survivor.metric(active).await == 1.0 },
    )
    .await;
    let mut y = public_v1(&gw).await;
    w.recv_until("connect", |v| is(v, "connect", &y.id)).await;
    y.rename("Yolanda").await;
    let mut seen = w.collect_until(WAIT, |v| is(v, "change_name", &y.id)).await;
    seen.extend(w.collect_for(Duration::from_millis(500)).await);
    assert_eq!(
        seen.iter().filter(|v| is(v, "change_name", &y.id)).count(),
        1,
        "one rename broadcast after the hand-over: {seen:?}"
    );
    assert!(disconnects(&seen).is_empty(), "no disconnect: {seen:?}");
}

#[tokio::test]
async fn a_roster_larger_than_one_nats_message_reaches_every_page() {
    use services::bus::Bus as _;
    use services::messages::{GatewayReport, GatewayUpdate, RosterClient, encode};

    const FAKE: usize = 9_000;
    let d = Deployment::new().await;
    let (presence, gw_a) = tokio::join!(d.presence(), d.gateway("gw-a"));
    eventually(WAIT, "presence is active", || async {
        presence.metric("pingapp_presence_active").await == 1.0
    })
    .await;
    // A gateway with 9,000 public clients (64-character names) heartbeats
    // as an older gateway does, listing them all: about 1.3 MB, more than
    // NATS takes in one message (1 MiB).
    let bus = services::bus::nats::NatsBus::connect(&d.nats.url(), "fake-gateway")
        .await
        .unwrap();
    let clients: Vec<RosterClient> = (0..FAKE)
        .map(|i| RosterClient {
            channel_name: format!("{i:016x}"),
            name: format!("{i:-<64}"),
            gateway: "gw-fake".into(),
            connected_at_ms: 0,
            stats: None,
        })
        .collect();
    let heartbeat = encode(&GatewayReport {
        gateway: "gw-fake".into(),
        seq: 1,
        update: GatewayUpdate::Heartbeat {
            clients,
            interval_ms: 60_000,
            count: None,
            digest: None,
        },
    });
    assert!(heartbeat.len() > 1 << 20, "{} bytes", heartbeat.len());
    let subjects = services::subjects::Subjects::new(&d.prefix);
    bus.publish(
        subjects.gateway_reports("gw-fake").subject(),
        heartbeat,
        Vec::new(),
    )
    .await
    .unwrap();
    eventually(WAIT, "gw-a learned every fake client", || async {
        gw_a.roster_ids().await.len() == FAKE
    })
    .await;

    // A gateway started now fetches the whole roster from presence, in
    // pages of 1,000 clients.
    let gw_b = d.gateway("gw-b").await;
    eventually(WAIT, "gw-b fetched the whole roster", || async {
        gw_b.roster_ids().await.len() == FAKE
    })
    .await;

    // A new v2 page gets its view of it: the count, and its first rows
    // only (the frame does not grow with the room) ...
    let (page, view) = public_v2(&gw_b).await;
    assert!(
        view["total"].as_u64().unwrap() > FAKE as u64,
        "{} clients in the room",
        view["total"]
    );
    assert_eq!(view["rows"].as_array().unwrap().len(), 50);
    assert!(
        view.to_string().len() < 20_000,
        "{} bytes",
        view.to_string().len()
    );
    assert_eq!(view["me"]["channel_name"], page.id.as_str());
    // ... and v1's delay_times.
    let mut v1 = public_v1(&gw_a).await;
    v1.send(json!({"command":"ping"})).await;
    v1.recv_until("pong", |_| true).await;
    v1.send(json!({"command":"delay_time","delay_time":7}))
        .await;
    let table = v1.recv_until("delay_times", |_| true).await;
    let table = table["delay_times"].as_object().unwrap();
    assert!(table.len() > FAKE, "{} clients in delay_times", table.len());
    assert_eq!(table[&v1.id]["delay_time"], 7);
}

#[tokio::test]
async fn services_drain_within_their_grace_period_while_nats_is_down() {
    let mut d = Deployment::new().await;
    let (mut presence, mut recorder, mut gw) =
        tokio::join!(d.presence(), d.recorder(), d.gateway("gw-a"));
    let mut c = private_v2(&gw).await;
    c.sample(5.0, 0).await;
    d.nats.stop().await;
    for node in [&gw, &presence, &recorder] {
        eventually(WAIT, "every service sees NATS down", || async {
            testkit::http_status(node.admin, "/readyz").await == Some(503)
        })
        .await;
    }

    // The gateway's bound: its connections' drain (3 s), its batches'
    // retries (3 s more), the final flush (2 s).
    for node in [&mut gw, &mut presence, &mut recorder] {
        let started = Instant::now();
        let status = node.svc.terminate().await;
        let took = started.elapsed();
        println!(
            "{} exited ({status}) {took:?} after SIGTERM",
            node.svc.label()
        );
        assert!(status.success(), "{}: {status}", node.svc.label());
        assert!(
            took < Duration::from_secs(10),
            "{} took {took:?} to drain",
            node.svc.label()
        );
    }
}

/// The metric families `docs/metrics.md` documents for `service`.
fn documented_families(service: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .expect("docs/metrics.md");
    let prefix = format!("| `pingapp_{service}_");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| format!("| `{name}").starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_service_exposes_its_metrics_and_traces_cross_the_bus() {
    let sink = testkit::OtlpSink::start().await;
    let endpoint = sink.endpoint();
    let d = Deployment::new()
        .await
        .with_env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .with_env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .with_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let presence = d.presence().await;
    let recorder = d.recorder().await;
    let gw = d.gateway("gw-a").await;

    // Traffic through every service: pings, samples, a rename, an error,
    // history and statistics queries.
    let (mut c, _) = public_v2(&gw).await;
    c.ping_within(1, WAIT).await.expect("pong");
    c.sample(3.5, 1).await;
    c.rename("metrics").await;
    c.send(json!({"command":"dance"})).await;
    c.recv_until("error", |_| true).await;
    let path = format!("/api/clients/{}/samples", c.id);
    eventually(WAIT, "the sample is stored", || async {
        let (status, body) = gw.get_json(&path, None).await;
        status == 200 && body["samples"].as_array().is_some_and(|s| !s.is_empty())
    })
    .await;
    assert_eq!(
        gw.get_json("/api/stats?window=1h&bucket=1m", None).await.0,
        200
    );

    for (node, service) in [
        (&gw, "gateway"),
        (&presence, "presence"),
        (&recorder, "recorder"),
    ] {
        let mut families = documented_families(service);
        assert!(families.len() >= 10, "{service}: {families:?}");
        // Every service's NATS connection has the bus's own families.
        families.extend(documented_families("bus"));
        let text = reqwest::get(format!("http://{}/metrics", node.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for f in families {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("# TYPE {f} "))),
                "{service} does not expose the documented {f}"
            );
        }
    }

    // One trace from the gateway's span into the recorder's, through NATS
    // headers, for a sample batch and for a history query.
    eventually(WAIT, "traces joining gateway and recorder", || {
        std::future::ready(
            sink.share_trace(
                "gateway",
                "gateway.persist_batch",
                "recorder",
                "recorder.record_batch",
            ) && sink.share_trace(
                "gateway",
                "gateway.api.samples",
                "recorder",
                "recorder.query",
            ),
        )
    })
    .await;
}
