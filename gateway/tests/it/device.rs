//! The `device` command (docs/protocol.md, "Your history"): a v2 page
//! presents its browser's secret once, before its first recorded sample;
//! the record that travels with that sample carries only the secret's
//! digest. Anything else is a `bad_device` error frame, and the
//! connection goes on.

use std::time::Duration;

use futures_util::StreamExt;
use gateway::GatewayArgs;
use serde_json::{Value, json};
use services::ids::device_digest;
use services::messages::{ClientRecord, RecordBatch};
use testkit::ws::Client;

use crate::helpers::TestGateway;

const SECRET: &str = "Zm9yLXRoZS1kZXZpY2UtdGVzdC0wMTIzNDU2Nzg5YWJj";

fn device(secret: &str) -> Value {
    json!({"command": "device", "secret": secret})
}

/// The next frame, which must be a `bad_device` error frame.
async fn bad_device(c: &mut Client, what: &str) -> String {
    let e = c.recv().await;
    assert_eq!(e["command"], "error", "{what}: {e}");
    assert_eq!(e["code"], "bad_device", "{what}: {e}");
    e["detail"].as_str().unwrap_or_default().to_owned()
}

/// Accepted: no answer at all, so the next frame is the pong of a ping
/// sent after it.
async fn accepted(c: &mut Client, seq: u64, what: &str) {
    c.send(json!({"command": "ping", "seq": seq})).await;
    let next = c.recv().await;
    assert_eq!(next["command"], "pong", "{what}: {next}");
    assert_eq!(next["seq"], seq, "{what}: {next}");
}

/// The client records on the stream within half a second of quiet.
async fn records(gw: &TestGateway) -> Vec<ClientRecord> {
    let mut deliveries = gw.consume_samples().await;
    let mut out = Vec::new();
    while let Ok(Some(d)) =
        tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await
    {
        let d = d.unwrap();
        let batch: RecordBatch = d.message.unwrap();
        out.extend(batch.clients);
        d.delivery.ack().await.unwrap();
    }
    out
}

#[tokio::test]
async fn a_device_is_taken_once_before_the_first_sample_on_v2_only() {
    let gw = TestGateway::start(GatewayArgs::default()).await;

    // Private v2: taken (no answer), then a second one is refused.
    let mut private = gw.ws("/ws/private/?v=2").await;
    let welcome = private.recv_until("welcome", |_| true).await;
    let private_id = welcome["channel_name"].as_str().unwrap().to_owned();
    private.send(device(SECRET)).await;
    accepted(&mut private, 1, "first device").await;
    private.send(device(SECRET)).await;
    let detail = bad_device(&mut private, "a second device").await;
    assert!(detail.contains("already"), "{detail}");
    private.sample(4.0, 2).await;

    // Public v2 presents the same identity; its first frame after the
    // welcome is its view.
    let mut public = gw.ws("/ws/public/?v=2").await;
    let welcome = public.recv_until("welcome", |_| true).await;
    let public_id = welcome["channel_name"].as_str().unwrap().to_owned();
    public.recv_until("view", |_| true).await;
    public.send(device(SECRET)).await;
    accepted(&mut public, 1, "public device").await;
    public.sample(5.0, 2).await;

    // After the first recorded sample: refused, the connection stays its
    // own.
    let mut late = gw.ws("/ws/private/?v=2").await;
    let welcome = late.recv_until("welcome", |_| true).await;
    let late_id = welcome["channel_name"].as_str().unwrap().to_owned();
    late.sample(6.0, 1).await;
    late.send(device(SECRET)).await;
    let detail = bad_device(&mut late, "after a sample").await;
    assert!(detail.contains("first recorded sample"), "{detail}");
    late.sample(6.5, 2).await;

    // Malformed secrets, then a good one on the same connection: taken.
    let mut malformed = gw.ws("/ws/private/?v=2").await;
    malformed.recv_until("welcome", |_| true).await;
    for bad in [
        json!({"command": "device"}),
        json!({"command": "device", "secret": 7}),
        json!({"command": "device", "secret": "short"}),
        json!({"command": "device", "secret": format!("{}=", "a".repeat(40))}),
        json!({"command": "device", "secret": "x".repeat(129)}),
    ] {
        malformed.send(bad.clone()).await;
        bad_device(&mut malformed, &bad.to_string()).await;
    }
    malformed.send(device(&"b".repeat(22))).await;
    accepted(&mut malformed, 1, "a good secret after bad ones").await;

    // v1 has no device.
    let mut v1 = gw.ws("/ws/private/").await;
    v1.send(device(SECRET)).await;
    let detail = bad_device(&mut v1, "v1").await;
    assert!(detail.contains("v=2"), "{detail}");
    v1.send(json!({"command": "ping", "seq": 1})).await;
    assert_eq!(v1.recv().await, json!({"command": "pong", "seq": 1}));

    assert_eq!(
        gw.metric("pingapp_gateway_errors_total", &[("code", "bad_device")]),
        8.0
    );

    // What travelled: the digest, never the secret; none for the late one.
    let records = records(&gw).await;
    let device_of = |id: &str| {
        records
            .iter()
            .find(|r| r.channel_name == id)
            .unwrap_or_else(|| panic!("no record of {id}: {records:?}"))
            .device
            .clone()
    };
    let digest = device_digest(SECRET);
    assert_eq!(device_of(&private_id), Some(digest.clone()));
    assert_eq!(device_of(&public_id), Some(digest));
    assert_eq!(device_of(&late_id), None);
    let wire = serde_json::to_string(&records).unwrap();
    assert!(!wire.contains(SECRET), "the secret never travels: {wire}");
}
