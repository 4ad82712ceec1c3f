//! The gateway in process: built on port 0 over the in-memory bus, with the
//! test standing in for presence. These tests check the gateway's own
//! contract (docs/protocol.md with browsers, docs/architecture.md with
//! presence and the recorder); the standalone and distributed suites run
//! the real binaries.

mod device;
mod fuzz;
mod helpers;
mod room;
mod stats;
mod trust;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use gateway::GatewayArgs;
use helpers::TestGateway;
use serde_json::json;
use services::messages::{Broadcast, GatewayUpdate, RecordBatch, RosterClient};
use services::stats::DelayStats;
use testkit::ws::{Closed, WAIT as WITHIN};
use tokio_tungstenite::tungstenite::Message;

fn other(id: &str, name: &str) -> RosterClient {
    RosterClient {
        channel_name: id.into(),
        name: name.into(),
        gateway: "gw2".into(),
        connected_at_ms: 1,
        stats: None,
    }
}

#[tokio::test]
async fn a_public_client_is_reported_joining_renaming_and_leaving_in_sequence() {
    let mut gw = TestGateway::start(GatewayArgs::default()).await;
    let mut c = gw.ws("/ws/public/?v=2").await;
    let welcome = c.recv().await;
    assert_eq!(welcome["command"], "welcome");
    let id = welcome["channel_name"].as_str().unwrap().to_owned();
    let view = c.recv().await;
    assert_eq!(view["command"], "view");
    assert_eq!(view["me"]["name"], id, "its own row at once");
    assert_eq!(view["me"]["channel_name"], id);

    let joined = gw.event().await;
    assert!(
        matches!(&joined.update, GatewayUpdate::Connect { client } if client.channel_name == id),
        "{joined:?}"
    );
    c.send(json!({"command": "change_name", "name": "Ada"}))
        .await;
    let renamed = gw.event().await;
    assert_eq!(
        renamed.update,
        GatewayUpdate::Rename {
            channel_name: id.clone(),
            name: "Ada".into()
        }
    );
    // A list asked after the rename has the new name: it never overtakes
    // the event.
    let pieces = gw.list_now().await;
    let clients = TestGateway::listed(&pieces);
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].name, "Ada");
    let hb = pieces.last().unwrap();
    assert!(hb.seq > renamed.seq && renamed.seq > joined.seq);

    drop(c);
    let left = gw.event().await;
    assert_eq!(left.update, GatewayUpdate::Disconnect { channel_name: id });
    assert!(left.seq > hb.seq);
}

#[tokio::test]
async fn delays_reach_presence_with_the_next_tick_and_in_heartbeats() {
    let args = GatewayArgs {
        roster_tick_ms: 100,
        ..Default::default()
    };
    let mut gw = TestGateway::start(args).await;
    let mut c = gw.ws("/ws/public/?v=2").await;
    let id = c.recv().await["channel_name"].as_str().unwrap().to_owned();
    // Every sample answers a pong (docs/security.md).
    c.ping(1).await;
    c.delay(5.0, 1).await;
    c.ping(2).await;
    c.delay(7.0, 2).await;
    let tick = gw
        .report(|r| match &r.update {
            GatewayUpdate::Delays { delays, .. } => {
                delays.get(&id).is_some_and(|s| s.delay_time == 7.0)
            }
            _ => false,
        })
        .await;
    match tick.update {
        GatewayUpdate::Delays { tick_ms, .. } => {
            let tick_ms = tick_ms.expect("a tick names its boundary");
            assert_eq!(tick_ms % 100, 0, "on a wall-clock boundary");
        }
        _ => unreachable!(),
    }
    let clients = TestGateway::listed(&gw.list_now().await);
    assert_eq!(clients[0].stats.map(|s| s.delay_time), Some(7.0));
}

#[tokio::test]
async fn heartbeats_carry_a_count_and_digest_not_the_clients() {
    let args = GatewayArgs {
        heartbeat_interval_ms: 100,
        presence_piece_clients: 2,
        ..Default::default()
    };
    let mut gw = TestGateway::start(args).await;
    let mut sizes = Vec::new();
    let mut pages = Vec::new();
    for n in [1_u64, 5] {
        while pages.len() < n as usize {
            let mut c = gw.ws("/ws/public/?v=2").await;
            c.recv().await;
            pages.push(c);
        }
        let hb = gw
            .report(
                |r| matches!(r.update, GatewayUpdate::Heartbeat { count: Some(c), .. } if c == n),
            )
            .await;
        let bytes = services::bus::Payload::encode(&hb).len();
        let GatewayUpdate::Heartbeat {
            clients, digest, ..
        } = hb.update
        else {
            unreachable!()
        };
        assert!(clients.is_empty(), "no client list in a heartbeat");
        sizes.push(bytes);
        // The digest is that of the full list, which comes in pieces of
        // two when asked for.
        let pieces = gw.list_now().await;
        assert_eq!(pieces.len(), (n as usize).div_ceil(2));
        let listed = TestGateway::listed(&pieces);
        assert_eq!(listed.len() as u64, n);
        let expected = listed.iter().fold(0, |d, c| {
            d ^ services::messages::client_digest(&c.channel_name, &c.name)
        });
        assert_eq!(digest, Some(expected));
    }
    // Bytes per heartbeat do not grow with the clients (the count and the
    // digest may take a few more digits).
    assert!(
        sizes.iter().all(|&b| b < 160),
        "heartbeat sizes {sizes:?} for 1 and 5 clients"
    );
}

#[tokio::test]
async fn a_copy_that_missed_a_broadcast_heals_with_the_periodic_digest() {
    let args = GatewayArgs {
        presence_piece_clients: 1,
        roster_tick_ms: 100,
        ..Default::default()
    };
    let gw = TestGateway::start(args).await;
    let roster = gw.subjects.roster_request();
    let mut requests = roster.serve(&*gw.bus, "presence").await.unwrap();
    let empty = services::messages::RosterReply {
        clients: vec![],
        next: None,
    };
    let first = tokio::time::timeout(WITHIN, requests.next())
        .await
        .expect("the start-up roster request")
        .unwrap();
    first.reply(&*gw.bus, &empty).await.unwrap();
    gw.broadcast(Broadcast::Connect {
        client: other("a", "Ann"),
    })
    .await;
    let mut c = gw.ws("/ws/public/?v=2").await;
    c.view_until(|v| v.row("a").is_some()).await;

    // Act: the connect of b never reached this gateway; the periodic
    // digest says the roster holds a and b.
    let digest = [("a", "Ann"), ("b", "Bea")]
        .iter()
        .fold(0, |d, (id, name)| {
            d ^ services::messages::client_digest(id, name)
        });
    gw.broadcast(Broadcast::Digest { count: 2, digest }).await;

    // Assert: the gateway fetches the roster in pages of one client, and
    // the page sees b.
    let pages = [
        (None, vec![other("a", "Ann")], Some("a")),
        (Some("a"), vec![other("b", "Bea")], None),
    ];
    for (after, clients, next) in pages {
        let req = tokio::time::timeout(WITHIN, requests.next())
            .await
            .expect("a roster page request")
            .unwrap();
        let asked = req.message.as_ref().expect("a page request").clone();
        assert_eq!(asked.after.as_deref(), after);
        assert_eq!(asked.limit, Some(1), "pages of --presence-piece-clients");
        let reply = services::messages::RosterReply {
            clients,
            next: next.map(str::to_owned),
        };
        req.reply(&*gw.bus, &reply).await.unwrap();
    }
    c.view_until(|v| v.row("b").is_some_and(|r| r["name"] == "Bea"))
        .await;
}

#[tokio::test]
async fn broadcasts_become_v1_frames_at_once_and_view_frames_for_v2() {
    let gw = TestGateway::start(GatewayArgs {
        roster_tick_ms: 100,
        ..Default::default()
    })
    .await;
    let mut v2 = gw.ws("/ws/public/?v=2").await;
    v2.recv_until("view", |_| true).await;
    let mut v1 = gw.ws("/ws/public/").await;
    // A v1 page has no welcome: a ping answered means it is seated.
    v1.send(json!({"command": "ping"})).await;
    assert_eq!(
        v1.recv_until("pong", |_| true).await,
        json!({"command": "pong"})
    );

    gw.broadcast(Broadcast::Connect {
        client: other("x", "Xena"),
    })
    .await;
    let f = v1.recv_until("connect", |_| true).await;
    assert_eq!(f["channel_name"], "x");
    assert_eq!(f["name"], "Xena");
    // The v2 page sees it in its view (and never a connect frame).
    v2.view_until(|v| v.row("x").is_some_and(|r| r["name"] == "Xena"))
        .await;
    let stats = DelayStats {
        delay_time: 3.0,
        median: 3.0,
        jitter: 0.5,
    };
    gw.broadcast(Broadcast::Delays {
        delays: BTreeMap::from([("x".to_owned(), stats)]),
    })
    .await;
    gw.broadcast(Broadcast::Rename {
        channel_name: "x".into(),
        name: "X".into(),
    })
    .await;
    let view = v2
        .view_until(|v| {
            v.row("x")
                .is_some_and(|r| r["name"] == "X" && r["delay_time"] == 3.0)
        })
        .await;
    assert_eq!(view.row("x").unwrap()["jitter"], 0.5);
    // The v1 page's next frame is the rename: it got no delays.
    assert_eq!(
        v1.recv().await,
        json!({"command": "change_name", "channel_name": "x", "name": "X"})
    );
    // Its copy of the roster has the delay.
    v1.send(json!({"command": "ping"})).await;
    v1.recv_until("pong", |_| true).await;
    v1.send(json!({"command": "delay_time", "delay_time": 9}))
        .await;
    let all = v1.recv_until("delay_times", |_| true).await;
    assert_eq!(
        all["delay_times"]["x"],
        json!({"name": "X", "delay_time": 3})
    );
    // The v2 page got no per-event frame at all.
    let quiet = v2.collect_for(Duration::from_millis(300)).await;
    assert!(
        quiet.iter().all(
            |f| ["view", "view_update", "server_rtt"].contains(&f["command"].as_str().unwrap())
        ),
        "{quiet:?}"
    );
}

#[tokio::test]
async fn the_roster_is_fetched_from_presence_at_start() {
    let gw = TestGateway::start(GatewayArgs::default()).await;
    let roster = gw.subjects.roster_request();
    let mut requests = roster.serve(&*gw.bus, "presence").await.unwrap();
    // The gateway asks until presence answers (it retries with backoff).
    let req = tokio::time::timeout(WITHIN, requests.next())
        .await
        .expect("a roster request")
        .unwrap();
    let reply = services::messages::RosterReply {
        clients: vec![other("early", "Early")],
        next: None,
    };
    req.reply(&*gw.bus, &reply).await.unwrap();
    let mut c = gw.ws("/ws/public/?v=2").await;
    // The snapshot is applied as a whole: the page sees the client in its
    // first view, or in a later one if it connected before the reply.
    c.view_until(|v| v.row("early").is_some_and(|r| r["name"] == "Early"))
        .await;
}

#[tokio::test]
async fn every_command_gets_its_answer_and_bad_input_an_error_frame() {
    let gw = TestGateway::start(GatewayArgs::default()).await;
    let mut private = gw.ws("/ws/private/?v=2").await;
    assert_eq!(private.recv().await["command"], "welcome");
    private.send(json!({"command": "ping", "seq": 4})).await;
    let pong = private.recv().await;
    assert_eq!(pong["seq"], 4);
    assert!(pong["server_time"].as_i64().unwrap() > 0);
    for (frame, code) in [
        ("{", "bad_json"),
        (r#"{"command":"dance"}"#, "unknown_command"),
        (r#"{"command":"delay_time","delay_time":-1}"#, "bad_delay"),
        (r#"{"command":"change_name","name":"x"}"#, "unknown_command"),
    ] {
        private.send_msg(Message::text(frame)).await;
        let e = private.recv().await;
        assert_eq!(e["command"], "error", "{frame}");
        assert_eq!(e["code"], code, "{frame}");
    }
    private.send_msg(Message::binary(vec![1, 2])).await;
    assert_eq!(private.recv().await["code"], "bad_json");
    // Still open, still answering.
    private.send(json!({"command": "ping"})).await;
    assert_eq!(private.recv().await["command"], "pong");

    let mut v1 = gw.ws("/ws/public").await;
    v1.send(json!({"command": "ping", "seq": 1})).await;
    assert_eq!(v1.recv().await, json!({"command": "pong", "seq": 1}));
    v1.send(json!({"command": "change_name", "name": " "}))
        .await;
    assert_eq!(v1.recv().await["code"], "bad_name");
}

#[tokio::test]
async fn limits_close_with_their_codes() {
    let args = GatewayArgs {
        max_frame_bytes: 64,
        max_messages_per_second: 5,
        ..Default::default()
    };
    let gw = TestGateway::start(args).await;
    let mut big = gw.ws("/ws/private/").await;
    big.send_msg(Message::text("x".repeat(65))).await;
    assert_eq!(big.closed().await, Closed::Code(1009));

    let mut huge = gw.ws("/ws/private/").await;
    // Over the WebSocket library's own limit (4 x the frame limit or
    // 64 KiB): typed as a capacity error, still 1009.
    huge.send_msg(Message::text("x".repeat(70_000))).await;
    assert_eq!(huge.closed().await, Closed::Code(1009));

    let mut fast = gw.ws("/ws/private/").await;
    for _ in 0..6 {
        fast.send(json!({"command": "ping"})).await;
    }
    assert_eq!(fast.closed().await, Closed::Code(1008));
}

#[tokio::test]
async fn the_drain_closes_with_1012_says_goodbye_and_stores_every_sample() {
    let mut gw = TestGateway::start(GatewayArgs::default()).await;
    let mut deliveries = gw.consume_samples().await;
    let mut public = gw.ws("/ws/public/?v=2").await;
    public.recv_until("view", |_| true).await;
    let mut private = gw.ws("/ws/private/?v=2").await;
    private.recv_until("welcome", |_| true).await;
    for i in 0..20 {
        private.ping(i + 1).await;
        private
            .send(json!({"command": "delay_time", "delay_time": i, "seq": i + 1}))
            .await;
    }
    // A ping answered after the samples means they were all accepted.
    private.send(json!({"command": "ping"})).await;
    private.recv_until("pong", |_| true).await;
    gw.event().await; // the public client's connect

    let (mut reports, result) = {
        let closing = tokio::spawn(async move { (public.closed().await, private.closed().await) });
        let stopped = gw.stop().await;
        assert_eq!(
            closing.await.unwrap(),
            (Closed::Code(1012), Closed::Code(1012))
        );
        stopped
    };
    result.expect("run returns Ok after the drain");
    let mut last = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), reports.next()).await {
        last.push(m.message.unwrap().update);
    }
    let events: Vec<&GatewayUpdate> = last
        .iter()
        .filter(|u| matches!(u, GatewayUpdate::Disconnect { .. } | GatewayUpdate::Goodbye))
        .collect();
    assert!(
        matches!(
            events.as_slice(),
            [GatewayUpdate::Disconnect { .. }, GatewayUpdate::Goodbye]
        ),
        "the public client leaves, then goodbye: {last:?}"
    );
    assert_eq!(
        last.last(),
        Some(&GatewayUpdate::Goodbye),
        "goodbye is last"
    );

    let mut samples = Vec::new();
    while samples.len() < 20 {
        let d = tokio::time::timeout(WITHIN, deliveries.next())
            .await
            .expect("every sample reaches the stream")
            .unwrap()
            .unwrap();
        let batch: RecordBatch = d.message.unwrap();
        samples.extend(batch.samples.into_iter().map(|s| s.delay_ms));
        d.delivery.ack().await.unwrap();
    }
    assert_eq!(samples, (0..20).map(f64::from).collect::<Vec<_>>());
}

/// Sends `n` samples with seqs from `*seq` on, each answering a pong of its
/// own (docs/security.md), then a last ping, and reads up to its pong;
/// returns how many samples were refused with `busy`.
async fn samples_then_ping(c: &mut testkit::ws::Client, seq: &mut u64, n: u64) -> u64 {
    let mut refused = 0;
    for _ in 0..n {
        refused += ping_counting_busy(c, *seq).await;
        c.delay(1.0, *seq).await;
        *seq += 1;
    }
    // Answered after every sample above was taken or refused.
    refused += ping_counting_busy(c, u64::MAX - *seq).await;
    refused
}

/// Pings with `seq` and reads up to its pong; returns how many `busy`
/// error frames came before it.
async fn ping_counting_busy(c: &mut testkit::ws::Client, seq: u64) -> u64 {
    c.send(json!({"command": "ping", "seq": seq})).await;
    let mut refused = 0;
    loop {
        let f = c.recv().await;
        match f["command"].as_str() {
            Some("pong") if f["seq"] == seq => return refused,
            // The keepalive's measurement may come at any time.
            Some("server_rtt") => {}
            Some("error") => {
                assert_eq!(f["code"], "busy", "{f}");
                refused += 1;
            }
            other => panic!("unexpected frame {other:?}: {f}"),
        }
    }
}

/// The persist buffer's overflow policy (docs/architecture.md, "Bounds"):
/// while the stream is full and nobody stores, the gateway holds accepted
/// samples up to `--persist-buffer-bytes`, then refuses new ones with the
/// error frame `busy`, still answering pings; once the stream has room
/// again every accepted sample reaches it, once, and new ones are taken.
#[tokio::test]
async fn at_the_buffer_bound_samples_are_refused_pings_answered_and_nothing_accepted_is_lost() {
    const BUFFER: u64 = 32 * 1024;
    let args = GatewayArgs {
        stream_max_bytes: 150_000,
        persist_buffer_bytes: BUFFER,
        max_messages_per_second: 100_000,
        max_bytes_per_second: 1 << 30,
        ..Default::default()
    };
    let gw = TestGateway::start(args).await;
    let mut c = gw.ws("/ws/private/?v=2").await;
    c.recv_until("welcome", |_| true).await;

    // Nobody consumes: the stream fills, then the buffer. The first
    // refusals can come while the stream still has room (the buffer fills
    // between two publishes), so go on until the stream has refused a
    // batch and a whole round of samples was refused.
    let (mut seq, mut refused) = (0u64, 0u64);
    loop {
        assert!(seq < 20_000, "the stream and buffer not full after {seq}");
        let round = samples_then_ping(&mut c, &mut seq, 20).await;
        refused += round;
        if round == 20 && gw.metric("pingapp_gateway_persist_errors_total", &[]) > 0.0 {
            break;
        }
    }
    // Full: every new sample is refused, and every ping answered.
    assert_eq!(samples_then_ping(&mut c, &mut seq, 20).await, 20);
    refused += 20;
    assert_eq!(
        gw.metric(
            "pingapp_gateway_samples_refused_total",
            &[("reason", "buffer_full")]
        ),
        refused as f64
    );
    let held = gw.metric("pingapp_gateway_persist_buffer_bytes", &[]);
    assert!(
        held > BUFFER as f64 / 2.0 && held <= BUFFER as f64 + 1024.0,
        "the buffer holds {held} bytes"
    );
    assert_eq!(
        gw.metric("pingapp_gateway_persist_buffer_max_bytes", &[]),
        BUFFER as f64
    );

    // The stream drains: every accepted sample arrives once, the buffer
    // empties, and samples are accepted again.
    let accepted = seq - refused;
    let mut deliveries = gw.consume_samples().await;
    let mut ns = std::collections::BTreeSet::new();
    let mut got = 0u64;
    while got < accepted + 1 {
        if got == accepted {
            testkit::eventually(WITHIN, "the buffer is empty", || async {
                gw.metric("pingapp_gateway_persist_buffer_bytes", &[]) == 0.0
            })
            .await;
            assert_eq!(samples_then_ping(&mut c, &mut seq, 1).await, 0);
        }
        let d = tokio::time::timeout(WITHIN, deliveries.next())
            .await
            .unwrap_or_else(|_| panic!("{got} of {} samples arrived", accepted + 1))
            .unwrap()
            .unwrap();
        let batch: RecordBatch = d.message.unwrap();
        for sample in &batch.samples {
            assert!(ns.insert(sample.n), "sample {} twice", sample.n);
        }
        got += batch.samples.len() as u64;
        d.delivery.ack().await.unwrap();
    }
    assert_eq!(got, accepted + 1);
}

/// Nothing is written for a connection that never sends a sample: a
/// client's record reaches the stream with its first sample, before it,
/// and only once.
#[tokio::test]
async fn a_client_record_travels_with_the_first_sample_only() {
    let gw = TestGateway::start(GatewayArgs::default()).await;
    let mut deliveries = gw.consume_samples().await;
    let mut silent = gw.ws("/ws/private/?v=2").await;
    silent.recv_until("welcome", |_| true).await;
    silent.ping(1).await;
    let mut talker = gw.ws("/ws/private/?v=2").await;
    let welcome = talker.recv_until("welcome", |_| true).await;
    let id = welcome["channel_name"].as_str().unwrap().to_owned();
    for seq in 0..3 {
        talker.sample(3.0, seq).await;
    }
    talker.ping(9).await;

    let mut order = Vec::new();
    while let Ok(Some(d)) =
        tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await
    {
        let d = d.unwrap();
        let batch: RecordBatch = d.message.unwrap();
        order.extend(
            batch
                .clients
                .iter()
                .map(|c| format!("client {}", c.channel_name)),
        );
        order.extend(
            batch
                .samples
                .iter()
                .map(|s| format!("sample {} {}", s.channel_name, s.n)),
        );
        d.delivery.ack().await.unwrap();
    }
    assert_eq!(
        order,
        [
            format!("client {id}"),
            format!("sample {id} 1"),
            format!("sample {id} 2"),
            format!("sample {id} 3"),
        ],
        "only the client that sent samples, its record first"
    );
}

/// A gateway starting next to a stream an older version made with limits
/// retention, still holding batches no recorder stored, leaves it as it is
/// (the recorder migrates it once drained) and starts, storing into it.
#[tokio::test]
async fn a_gateway_starts_on_an_undrained_old_limits_stream() {
    use async_nats::jetstream::stream;
    let nats = testkit::NatsServer::start().await;
    let subjects = services::subjects::Subjects::new("old");
    let spec = subjects.samples_stream();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(stream::Config {
        name: spec.name().to_owned(),
        subjects: vec![spec.subjects().to_owned()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("old.samples.gw0", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let bus = services::bus::nats::NatsBus::connect(&nats.url(), "gw")
        .await
        .unwrap();
    let cfg = gateway::GatewayConfig {
        args: GatewayArgs::default(),
        gateway_id: "gw".into(),
        subjects: subjects.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
    };
    let built = gateway::Gateway::build(
        cfg,
        std::sync::Arc::new(bus),
        &prometheus::Registry::new(),
        services::admin::Readiness::new(),
    )
    .await;
    assert!(built.is_ok(), "{:?}", built.err());
    let info = js
        .get_stream(spec.name())
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.retention, stream::RetentionPolicy::Limits);
    assert_eq!(info.state.messages, 1, "nothing unstored was dropped");
}
