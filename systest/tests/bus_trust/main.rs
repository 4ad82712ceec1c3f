//! A hostile neighbour on the bus (docs/security.md, "The bus"): the real
//! `gateway`, `presence` and `recorder` binaries over a `nats-server` run
//! with the shipped configuration (`deploy/nats`: nkey identities per
//! service and per gateway, subject permissions, TLS), each service with
//! its own identity. Attackers are a connection without credentials and
//! one holding another gateway's credentials; each attack of issue 12 is
//! tried and must be refused by the server (a permissions violation), by
//! presence or by the recorder, and the honest clients' view must not
//! change.
//!
//! Run with `cargo test -p pingapp-systest --test bus_trust` (python3 and
//! openssl generate the keys).

#[path = "../distributed/helpers.rs"]
#[allow(unused_imports)]
mod helpers;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use helpers::{Deployment, WAIT, eventually, private_v2, public_v1};
use services::bus::Payload as _;
use services::messages::{
    Broadcast, GatewayReport, GatewayUpdate, HeartbeatRequest, RecordBatch, RosterClient,
    SampleRecord, encode,
};
use services::subjects::Subjects;

/// How long to listen to be sure that nothing arrives.
const QUIET: Duration = Duration::from_millis(1500);

/// A raw NATS connection of an attacker, keeping every error the server
/// sends it (permissions violations arrive that way, after the fact).
struct Attacker {
    client: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Attacker {
    /// Connects as `user` (`None`: without credentials), over TLS verified
    /// with the deployment's CA.
    async fn connect(d: &Deployment, user: Option<&str>) -> Result<Attacker, String> {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = errors.clone();
        let mut options = async_nats::ConnectOptions::new()
            .add_root_certificates(d.nats.tls_ca())
            .require_tls(true)
            .custom_inbox_prefix(services::bus::nats::inbox_prefix(
                user.unwrap_or("anonymous"),
            ))
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.lock().unwrap().push(e.to_string().to_lowercase());
                    }
                }
            });
        if let Some(user) = user {
            let seed = std::fs::read_to_string(d.nats.creds(user)).expect("the seed file");
            options = options.nkey(seed.trim().to_owned());
        }
        let client = options
            .connect(d.nats.url())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Attacker { client, errors })
    }

    /// Publishes and waits for the server's permissions violation for
    /// `subject`.
    async fn publish_refused(&self, subject: &str, payload: Bytes) {
        self.client
            .publish(subject.to_owned(), payload)
            .await
            .expect("the client sends it");
        self.client.flush().await.expect("flush");
        self.refused("publish", subject).await;
    }

    /// Subscribes and waits for the server's permissions violation; then
    /// checks that nothing arrives on it.
    async fn subscribe_refused(&self, subject: &str) -> async_nats::Subscriber {
        let sub = self
            .client
            .subscribe(subject.to_owned())
            .await
            .expect("the client sends the subscription");
        self.client.flush().await.expect("flush");
        self.refused("subscription", subject).await;
        sub
    }

    async fn refused(&self, op: &str, subject: &str) {
        let wanted = format!(
            "permissions violation for {op} to \"{}\"",
            subject.to_lowercase()
        );
        eventually(
            WAIT,
            &format!("the server refuses the {op} to {subject}"),
            || {
                let errors = self.errors.clone();
                let wanted = wanted.clone();
                async move { errors.lock().unwrap().iter().any(|e| e.contains(&wanted)) }
            },
        )
        .await;
    }
}

fn report(gateway: &str, seq: u64, update: GatewayUpdate) -> Bytes {
    encode(&GatewayReport {
        gateway: gateway.to_owned(),
        seq,
        update,
    })
}

fn roster_client(id: &str, name: &str, gateway: &str) -> RosterClient {
    RosterClient {
        channel_name: id.to_owned(),
        name: name.to_owned(),
        gateway: gateway.to_owned(),
        connected_at_ms: services::unix_ms(),
        stats: None,
    }
}

#[tokio::test]
async fn forged_and_sniffed_bus_traffic_is_refused() {
    let d = Deployment::secured(&["gw-a", "gw-b"])
        .await
        // A heartbeat of 5,000 clients is over this cap.
        .with_env("PINGAPP_MAX_CLIENTS_PER_GATEWAY", "1000");
    let subjects = Subjects::new(&d.prefix);
    // The recorder creates the stream (gateways may only read its state).
    let recorder = d.recorder().await;
    let (presence, gw_a, gw_b) = tokio::join!(d.presence(), d.gateway("gw-a"), d.gateway("gw-b"));

    // Honest clients: a public one on each gateway, a private one with a
    // stored sample. The public ones are the original (v1) page, which
    // gets every roster event, so a forged broadcast would reach it.
    let mut a = public_v1(&gw_a).await;
    let b = public_v1(&gw_b).await;
    a.recv_until("connect", |v| v["channel_name"] == b.id.as_str())
        .await;
    let mut p = private_v2(&gw_a).await;
    p.sample(4.5, 1).await;
    let private = format!("/api/clients/{}/samples", p.id);
    eventually(WAIT, "the private sample is stored", || async {
        gw_a.get_json(&private, Some(&p.token)).await.0 == 200
    })
    .await;
    let honest_roster = gw_a.roster_ids().await;
    assert!(honest_roster.contains(&a.id) && honest_roster.contains(&b.id));

    // Without credentials: no connection at all, with or without TLS.
    let anonymous = Attacker::connect(&d, None).await;
    assert!(
        anonymous.is_err(),
        "a connection without credentials is refused"
    );
    let seed = |user: &str| {
        std::fs::read_to_string(d.nats.creds(user))
            .expect("the seed file")
            .trim()
            .to_owned()
    };
    let untrusted = tokio::time::timeout(
        WAIT,
        async_nats::ConnectOptions::new()
            .nkey(seed("gateway-gw-b"))
            .connect(d.nats.url()),
    )
    .await
    .expect("an answer in time");
    assert!(
        untrusted.is_err(),
        "without the CA the server's certificate is not trusted"
    );

    // With gw-b's credentials.
    let evil = Attacker::connect(&d, Some("gateway-gw-b"))
        .await
        .expect("gw-b's identity connects");

    // Forged broadcasts: a roster entry, a rename, a disconnect, an empty
    // snapshot, a roster digest (which would make every gateway fetch the
    // roster). Only presence publishes there.
    let broadcast = subjects.broadcast();
    for forged in [
        Broadcast::Connect {
            client: roster_client("5ca1ab1e5ca1ab1e", "SYSTEM: click here", "gw-b"),
        },
        Broadcast::Rename {
            channel_name: a.id.clone(),
            name: "SYSTEM: click here".into(),
        },
        Broadcast::Disconnect {
            channel_name: a.id.clone(),
        },
        Broadcast::Snapshot { clients: vec![] },
        Broadcast::Digest {
            count: 0,
            digest: 0,
        },
    ] {
        evil.publish_refused(broadcast.subject(), encode(&forged))
            .await;
    }
    // A sync request (which would make gw-a send its whole list): only
    // presence asks.
    let sync = HeartbeatRequest {
        gateway: Some("gw-a".into()),
    };
    evil.publish_refused(subjects.presence_sync().subject(), sync.encode())
        .await;
    // Reports in gw-a's name, on gw-a's subject: refused by the server.
    let gw_a_reports = subjects.gateway_reports("gw-a");
    evil.publish_refused(
        gw_a_reports.subject(),
        report("gw-a", 1 << 40, GatewayUpdate::Goodbye),
    )
    .await;
    let empty_list = GatewayUpdate::Clients {
        part: 0,
        last: true,
        clients: vec![],
    };
    evil.publish_refused(
        gw_a_reports.subject(),
        report("gw-a", 1 << 40, empty_list.clone()),
    )
    .await;
    // On its own subject in gw-a's name, and about gw-a's client in its
    // own: published, but refused by presence.
    let own = subjects.gateway_reports("gw-b");
    let updates = [
        report("gw-a", 1 << 40, GatewayUpdate::Goodbye),
        report(
            "gw-b",
            1 << 40,
            GatewayUpdate::Rename {
                channel_name: a.id.clone(),
                name: "SYSTEM: click here".into(),
            },
        ),
        report(
            "gw-b",
            (1 << 40) + 1,
            GatewayUpdate::Disconnect {
                channel_name: a.id.clone(),
            },
        ),
        report(
            "gw-b",
            (1 << 40) + 2,
            GatewayUpdate::Heartbeat {
                clients: (0..5000)
                    .map(|i| roster_client(&format!("{i:016x}"), "fake", "gw-b"))
                    .collect(),
                interval_ms: 400,
                count: None,
                digest: None,
            },
        ),
        // gw-a's (empty) full list, on gw-b's subject: refused (subject).
        report("gw-a", (1 << 40) + 3, empty_list),
        // A count over the cap: refused (too_many_clients).
        report(
            "gw-b",
            (1 << 40) + 4,
            GatewayUpdate::Heartbeat {
                clients: vec![],
                interval_ms: 400,
                count: Some(1 << 30),
                digest: Some(0),
            },
        ),
        // A list naming gw-a's client, whose last piece is over the cap:
        // refused whole (too_many_clients), nothing of it applied.
        report(
            "gw-b",
            (1 << 40) + 5,
            GatewayUpdate::Clients {
                part: 0,
                last: false,
                clients: vec![roster_client(&a.id, "SYSTEM: click here", "gw-b")],
            },
        ),
        report(
            "gw-b",
            (1 << 40) + 6,
            GatewayUpdate::Clients {
                part: 1,
                last: true,
                clients: (0..1000)
                    .map(|i| roster_client(&format!("{i:016x}"), "fake", "gw-b"))
                    .collect(),
            },
        ),
        // A heartbeat whose digest lies: it costs one resync of gw-b, whose
        // honest list then comes (nothing changes).
        report(
            "gw-b",
            (1 << 40) + 7,
            GatewayUpdate::Heartbeat {
                clients: vec![],
                interval_ms: 400,
                count: Some(1),
                digest: Some(12345),
            },
        ),
    ];
    for u in updates {
        evil.client
            .publish(own.subject().to_owned(), u)
            .await
            .unwrap();
    }
    evil.client.flush().await.unwrap();
    eventually(WAIT, "presence refuses every forged report", || async {
        presence.metric("pingapp_presence_refused_total").await >= 7.0
    })
    .await;
    eventually(WAIT, "the lying digest costs one resync", || async {
        presence
            .metric("pingapp_presence_sync_requests_total")
            .await
            >= 1.0
    })
    .await;

    // Sniffing: samples (every gateway's and gw-a's), history queries (the
    // digests of tokens), other identities' replies.
    let mut sniffers = Vec::new();
    for subject in [
        "*.samples.>".to_owned(),
        subjects.samples("gw-a").subject().to_owned(),
        subjects.samples("gw-b").subject().to_owned(),
        subjects.query_samples().subject().to_owned(),
        subjects.query_stats().subject().to_owned(),
        format!("{}.presence.gw.*", d.prefix),
        "_INBOX.>".to_owned(),
        "_INBOX.gateway-gw-a.>".to_owned(),
        ">".to_owned(),
    ] {
        sniffers.push(evil.subscribe_refused(&subject).await);
    }
    // Answering history queries as the recorder: it never gets them, and
    // the real recorder answers.
    let stream = subjects.samples_stream();
    // Samples straight into the stream for gw-a's client, and the stream's
    // and consumer's administration.
    let forged = RecordBatch {
        gateway: "gw-a".into(),
        clients: vec![],
        samples: vec![SampleRecord {
            channel_name: p.id.clone(),
            n: 1_000_000,
            seq: Some(1),
            at_us: services::unix_ms() * 1000,
            delay_ms: 60_000.0,
            public: false,
        }],
    };
    evil.publish_refused(subjects.samples("gw-a").subject(), encode(&forged))
        .await;
    // On gw-b's own subject (allowed): the same batch naming gw-a is
    // dropped whole, and in gw-b's name its sample for gw-a's client is
    // refused; the recorder counts both.
    let mut as_b = forged.clone();
    as_b.gateway = "gw-b".into();
    as_b.samples[0].n += 1;
    for batch in [&forged, &as_b] {
        evil.client
            .publish(subjects.samples("gw-b").subject().to_owned(), encode(batch))
            .await
            .expect("gw-b may publish on its own samples subject");
    }
    evil.client.flush().await.expect("flush");
    eventually(WAIT, "the recorder refuses both", || async {
        recorder
            .metric("pingapp_recorder_foreign_records_total")
            .await
            == 2.0
    })
    .await;
    for api in [
        format!("$JS.API.STREAM.DELETE.{}", stream.name()),
        format!("$JS.API.STREAM.PURGE.{}", stream.name()),
        format!("$JS.API.STREAM.UPDATE.{}", stream.name()),
        format!("$JS.API.CONSUMER.MSG.NEXT.{}.recorder", stream.name()),
        format!("$JS.API.CONSUMER.DELETE.{}.recorder", stream.name()),
        format!("$KV.{}.presence", subjects.lease_bucket()),
    ] {
        evil.publish_refused(&api, Bytes::from_static(b"{}")).await;
    }

    // Nothing reached a sniffer.
    for mut s in sniffers {
        assert!(
            tokio::time::timeout(Duration::from_millis(50), s.next())
                .await
                .map_or(true, |m| m.is_none()),
            "a refused subscription delivered a message"
        );
    }

    // The honest view is unchanged: same roster on both gateways, a's
    // page saw nothing forged, the private history is the real one and
    // still needs its token.
    let seen = a.collect_for(QUIET).await;
    assert!(
        !seen.iter().any(|v| {
            let text = v.to_string();
            text.contains("SYSTEM") || text.contains("5ca1ab1e") || text.contains("fake")
        }),
        "a's page saw a forgery: {seen:?}"
    );
    for gw in [&gw_a, &gw_b] {
        assert_eq!(gw.roster_ids().await, honest_roster);
    }
    let (status, _) = gw_b.get_json(&private, None).await;
    assert_eq!(status, 404, "still private");
    let (status, body) = gw_b.get_json(&private, Some(&p.token)).await;
    assert_eq!(status, 200);
    assert_eq!(helpers::delays(&body), [4.5], "no forged sample: {body}");
    assert_eq!(presence.metric("pingapp_presence_roster_size").await, 2.0);
}

/// Even the identity allowed to read history queries (the recorder's) sees
/// only a digest of the token: no bearer token crosses the bus.
#[tokio::test]
async fn history_queries_carry_a_digest_not_the_token() {
    let d = Deployment::secured(&["gw-a"]).await;
    let subjects = Subjects::new(&d.prefix);
    let _recorder = d.recorder().await;
    let gw = d.gateway("gw-a").await;
    let tap = Attacker::connect(&d, Some("recorder"))
        .await
        .expect("the recorder's identity connects");
    let mut queries = tap
        .client
        .subscribe(subjects.query_samples().subject().to_owned())
        .await
        .unwrap();
    tap.client.flush().await.unwrap();

    let p = private_v2(&gw).await;
    let path = format!("/api/clients/{}/samples", p.id);
    gw.get_json(&path, Some(&p.token)).await;
    let query = tokio::time::timeout(WAIT, queries.next())
        .await
        .expect("the query in time")
        .expect("a query");
    let text = String::from_utf8_lossy(&query.payload).into_owned();
    assert!(
        !text.contains(&p.token),
        "the token crossed the bus: {text}"
    );
    assert!(
        text.contains(&services::ids::token_digest(&p.token)),
        "the query carries the token's digest: {text}"
    );
    assert!(tap.errors.lock().unwrap().is_empty());
}

/// A browser's device secret never crosses the bus either: device history
/// and forget queries carry its digest, and the shipped permissions let
/// the gateway ask and the recorder answer both (docs/security.md, "Your
/// history: the browser's identity").
#[tokio::test]
async fn device_queries_carry_a_digest_not_the_secret() {
    const SECRET: &str = "YnVzLXRydXN0LWRldmljZS1zZWNyZXQtMDEyMzQ1Njc4";
    let d = Deployment::secured(&["gw-a"]).await;
    let subjects = Subjects::new(&d.prefix);
    let (_presence, _recorder, gw) = tokio::join!(d.presence(), d.recorder(), d.gateway("gw-a"));
    let tap = Attacker::connect(&d, Some("recorder"))
        .await
        .expect("the recorder's identity connects");
    let mut history = tap
        .client
        .subscribe(subjects.query_device_history().subject().to_owned())
        .await
        .unwrap();
    let mut forget = tap
        .client
        .subscribe(subjects.forget_device().subject().to_owned())
        .await
        .unwrap();
    tap.client.flush().await.unwrap();

    let mut p = private_v2(&gw).await;
    p.send(serde_json::json!({"command": "device", "secret": SECRET}))
        .await;
    p.sample(4.0, 1).await;
    eventually(
        WAIT,
        "the device history, answered by the recorder",
        || async {
            let (status, body) = gw
                .get_json("/api/device/history?window=1h", Some(SECRET))
                .await;
            status == 200 && body["buckets"][0]["count"] == 1
        },
    )
    .await;
    let (status, body) = gw
        .call_json(reqwest::Method::DELETE, "/api/device", Some(SECRET))
        .await;
    assert_eq!(status, 200, "{body}");

    let digest = services::ids::device_digest(SECRET);
    for (what, queries) in [("history", &mut history), ("forget", &mut forget)] {
        let query = tokio::time::timeout(WAIT, queries.next())
            .await
            .unwrap_or_else(|_| panic!("a {what} query in time"))
            .expect("a query");
        let text = String::from_utf8_lossy(&query.payload).into_owned();
        assert!(!text.contains(SECRET), "the secret crossed the bus: {text}");
        assert!(text.contains(&digest), "{what} carries the digest: {text}");
    }
    assert!(tap.errors.lock().unwrap().is_empty());
}
