//! The bus contract: one set of test functions, run against the in-memory
//! bus of the standalone binary and against the NATS bus connected to a
//! real `nats-server` (the test kit's, one per test on a port of its own),
//! so the two implementations cannot drift apart.
//!
//! Every contract function takes a [`Harness`], which hands out connections
//! to one bus: clones of the same [`MemoryBus`], or separate NATS
//! connections (a second replica is a second connection).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use services::bus::memory::MemoryBus;
use services::bus::nats::NatsBus;
use services::bus::{Bus, DurableStream, Service, Topic};
use services::bus::{
    BusError, Deliveries, Delivery, Headers, LeaseKey, SharedBus, StreamSpec, Subscription,
};
use services::messages::{Broadcast, RecordBatch, ReplyErrorKind, StatsQuery, StatsReply};
use testkit::NatsServer;
use tokio::time::timeout;

/// How long an expected message may take.
const WAIT: Duration = Duration::from_secs(5);
/// How long we listen to be sure nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(300);
/// The ack wait of every consumer in these tests: a delivery neither
/// acknowledged nor refused comes again this long after it went out.
const ACK_WAIT: Duration = Duration::from_secs(2);

/// Connections to one bus.
struct Harness {
    memory: Option<MemoryBus>,
    nats: Option<NatsServer>,
    /// Subjects of this test start with it.
    prefix: String,
}

impl Harness {
    async fn memory() -> Harness {
        Harness {
            memory: Some(MemoryBus::new()),
            nats: None,
            prefix: testkit::unique_prefix(),
        }
    }

    async fn nats() -> Harness {
        Harness {
            memory: None,
            nats: Some(NatsServer::start().await),
            prefix: testkit::unique_prefix(),
        }
    }

    /// A new connection to the bus.
    async fn connect(&self) -> SharedBus {
        if let Some(m) = &self.memory {
            return Arc::new(m.clone().with_ack_wait(ACK_WAIT));
        }
        let url = self.nats.as_ref().expect("a bus").url();
        let bus = timeout(WAIT, NatsBus::connect(&url, "bus-contract"))
            .await
            .expect("connect in time")
            .expect("connect to nats-server")
            .with_ack_wait(ACK_WAIT);
        let bus: SharedBus = Arc::new(bus);
        testkit::eventually(WAIT, "the NATS connection is up", || {
            let b = bus.clone();
            async move { b.is_connected() }
        })
        .await;
        bus
    }

    fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    /// The lease `key` in this test's bucket.
    fn lease(&self, key: &str) -> LeaseKey {
        LeaseKey::new(format!("{}_leases", self.prefix), key)
    }

    fn stream_spec(&self) -> StreamSpec {
        StreamSpec {
            name: format!("{}_S", self.prefix.to_uppercase()),
            subjects: self.subject("durable.>"),
            max_age: Duration::from_secs(600),
            max_bytes: 1 << 20,
        }
    }
}

/// Runs each contract function once per bus.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Harness::memory().await).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Harness::nats().await).await;
                }
            )*
        }
    };
}

contract!(
    publish_reaches_every_subscriber_in_order,
    wildcards_match_one_token_or_the_rest,
    queue_groups_share_and_plain_subscribers_see_all,
    request_reply_and_its_errors,
    durable_stream_delivers_until_acknowledged,
    nak_brings_a_message_back,
    unacknowledged_deliveries_come_again_after_the_ack_wait,
    consumers_of_one_durable_share_the_work,
    persist_deduplicates_by_message_id,
    lease_has_one_holder_until_it_lapses,
    a_released_lease_is_free_at_once,
    messages_larger_than_the_server_takes_arrive_whole,
    a_new_connection_is_connected,
    typed_topics_carry_their_message_types,
    an_acknowledged_message_leaves_the_stream,
    a_full_stream_refuses_new_messages_until_there_is_room,
);

// ---------------------------------------------------------------- helpers

async fn next(sub: &mut Subscription) -> services::bus::Message {
    timeout(WAIT, sub.next())
        .await
        .expect("a message in time")
        .expect("the subscription is open")
}

async fn assert_quiet(sub: &mut Subscription, what: &str) {
    if let Ok(Some(m)) = timeout(QUIET, sub.next()).await {
        panic!(
            "{what}: unexpected message on {}: {:?}",
            m.subject, m.payload
        );
    }
}

async fn next_delivery(d: &mut Deliveries) -> Delivery {
    timeout(WAIT, d.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer is open")
        .expect("a delivery, not an error")
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------- contract

async fn publish_reaches_every_subscriber_in_order(h: Harness) {
    let publisher = h.connect().await;
    let other = h.connect().await;
    let subject = h.subject("news");
    let mut a = publisher.subscribe(&subject, None).await.unwrap();
    let mut b = other.subscribe(&subject, None).await.unwrap();
    other.flush().await.unwrap();
    publisher.flush().await.unwrap();

    for i in 0..20 {
        publisher
            .publish(&subject, Bytes::from(format!("m{i}")), Headers::new())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    for sub in [&mut a, &mut b] {
        for i in 0..20 {
            let m = next(sub).await;
            assert_eq!(m.subject, subject);
            assert_eq!(text(&m.payload), format!("m{i}"), "publication order");
            assert_eq!(m.reply, None);
        }
    }
    publisher
        .publish(
            &h.subject("elsewhere"),
            Bytes::from_static(b"x"),
            Headers::new(),
        )
        .await
        .unwrap();
    assert_quiet(&mut a, "another subject").await;

    // Dropping a subscription unsubscribes; the others keep receiving.
    drop(a);
    publisher
        .publish(&subject, Bytes::from_static(b"after"), Headers::new())
        .await
        .unwrap();
    assert_eq!(text(&next(&mut b).await.payload), "after");
}

async fn wildcards_match_one_token_or_the_rest(h: Harness) {
    let bus = h.connect().await;
    let mut star = bus.subscribe(&h.subject("a.*.c"), None).await.unwrap();
    let mut rest = bus.subscribe(&h.subject("a.>"), None).await.unwrap();
    bus.flush().await.unwrap();

    for s in ["a.b.c", "a.x.c", "a.b", "a.b.c.d", "b.b.c"] {
        bus.publish(&h.subject(s), Bytes::from(s), Headers::new())
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    let got_star: Vec<String> = vec![
        text(&next(&mut star).await.payload),
        text(&next(&mut star).await.payload),
    ];
    assert_eq!(got_star, ["a.b.c", "a.x.c"]);
    assert_quiet(&mut star, "`*` is exactly one token").await;
    let mut got_rest = Vec::new();
    for _ in 0..4 {
        let m = next(&mut rest).await;
        assert_eq!(m.subject, h.subject(&text(&m.payload)), "the real subject");
        got_rest.push(text(&m.payload));
    }
    assert_eq!(got_rest, ["a.b.c", "a.x.c", "a.b", "a.b.c.d"]);
    assert_quiet(&mut rest, "`>` needs at least one token and the prefix").await;

    // `>` does not match the bare prefix.
    bus.publish(&h.subject("a"), Bytes::from_static(b"bare"), Headers::new())
        .await
        .unwrap();
    assert_quiet(&mut rest, "`a.>` against `a`").await;
}

async fn queue_groups_share_and_plain_subscribers_see_all(h: Harness) {
    let publisher = h.connect().await;
    let subject = h.subject("work");
    let mut members = Vec::new();
    for _ in 0..3 {
        let conn = h.connect().await;
        members.push(conn.subscribe(&subject, Some("workers")).await.unwrap());
        conn.flush().await.unwrap();
    }
    let other_group_conn = h.connect().await;
    let mut other_group = other_group_conn
        .subscribe(&subject, Some("auditors"))
        .await
        .unwrap();
    other_group_conn.flush().await.unwrap();
    let mut plain = publisher.subscribe(&subject, None).await.unwrap();
    publisher.flush().await.unwrap();

    const N: usize = 60;
    for i in 0..N {
        publisher
            .publish(&subject, Bytes::from(i.to_string()), Headers::new())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();

    for i in 0..N {
        assert_eq!(text(&next(&mut plain).await.payload), i.to_string());
        assert_eq!(text(&next(&mut other_group).await.payload), i.to_string());
    }
    // Collect what the members got: every message exactly once among them.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_member = Vec::new();
    for m in &mut members {
        let mut count = 0;
        while let Ok(Some(msg)) = timeout(QUIET, m.next()).await {
            *seen.entry(text(&msg.payload)).or_default() += 1;
            count += 1;
        }
        per_member.push(count);
    }
    assert_eq!(
        seen.len(),
        N,
        "every message reached the group: {per_member:?}"
    );
    assert!(
        seen.values().all(|&n| n == 1),
        "each message reached exactly one member: {seen:?}"
    );
    assert!(
        per_member.iter().filter(|&&c| c > 0).count() >= 2,
        "the group shares the work: {per_member:?}"
    );
}

async fn request_reply_and_its_errors(h: Harness) {
    let client = h.connect().await;
    let server = h.connect().await;
    let subject = h.subject("echo");

    // No subscriber at all: NoResponders, at once.
    let started = std::time::Instant::now();
    match client
        .request(
            &subject,
            Bytes::from_static(b"hi"),
            Headers::new(),
            Duration::from_secs(3),
        )
        .await
    {
        Err(BusError::NoResponders(s)) => assert_eq!(s, subject),
        other => panic!("expected NoResponders, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "NoResponders does not wait for the timeout"
    );

    // A responder in a queue group answers.
    let mut requests = server.subscribe(&subject, Some("echo")).await.unwrap();
    server.flush().await.unwrap();
    let responder = {
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                let reply = m.reply.expect("a request carries its reply subject");
                let mut answer = b"echo:".to_vec();
                answer.extend_from_slice(&m.payload);
                server
                    .publish(&reply, Bytes::from(answer), Headers::new())
                    .await
                    .unwrap();
            }
        })
    };
    for i in 0..5 {
        let answer = client
            .request(&subject, Bytes::from(format!("q{i}")), Headers::new(), WAIT)
            .await
            .expect("an answer");
        assert_eq!(text(&answer), format!("echo:q{i}"));
    }
    responder.abort();

    // A subscriber that never answers: Timeout after the given time.
    let silent_subject = h.subject("silent");
    let _silent = server.subscribe(&silent_subject, None).await.unwrap();
    server.flush().await.unwrap();
    let started = std::time::Instant::now();
    match client
        .request(
            &silent_subject,
            Bytes::from_static(b"?"),
            Headers::new(),
            Duration::from_millis(300),
        )
        .await
    {
        Err(BusError::Timeout(s)) => assert_eq!(s, silent_subject),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
}

async fn durable_stream_delivers_until_acknowledged(h: Harness) {
    let bus = h.connect().await;
    let spec = h.stream_spec();
    bus.ensure_stream(&spec).await.unwrap();
    bus.ensure_stream(&spec)
        .await
        .expect("ensure_stream is idempotent");

    // Stored before anyone consumes: nothing is lost for lack of a reader.
    for i in 0..10 {
        bus.persist(
            &h.subject(&format!("durable.gw{}", i % 2)),
            Bytes::from(format!("s{i}")),
            Headers::new(),
            &format!("id-{i}"),
        )
        .await
        .unwrap();
    }
    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        let delivery = next_delivery(&mut d).await;
        assert_eq!(delivery.redeliveries, 0, "first delivery");
        let i = got.len();
        assert_eq!(
            delivery.subject,
            h.subject(&format!("durable.gw{}", i % 2)),
            "a delivery names the subject it was published on"
        );
        got.push(text(&delivery.payload));
        delivery.ack().await.unwrap();
    }
    let expected: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    assert_eq!(got, expected, "stream order");

    // Acknowledged messages never come again, also not to a new consumer
    // of the same durable; new ones do.
    drop(d);
    let other = h.connect().await;
    let mut d = other.consume(&spec.name, "recorder").await.unwrap();
    other
        .persist(
            &h.subject("durable.gw0"),
            Bytes::from_static(b"later"),
            Headers::new(),
            "id-later",
        )
        .await
        .unwrap();
    let delivery = next_delivery(&mut d).await;
    assert_eq!(text(&delivery.payload), "later");
    delivery.ack().await.unwrap();
    assert!(
        timeout(QUIET, d.next()).await.is_err(),
        "nothing acknowledged comes again"
    );

    // A subject outside the stream is refused, not silently dropped.
    let outside = h.subject("nowhere");
    match bus
        .persist(&outside, Bytes::from_static(b"x"), Headers::new(), "id-x")
        .await
    {
        Err(BusError::NoStream(s)) => assert_eq!(s, outside),
        other => panic!("persisting outside every stream: expected NoStream, got {other:?}"),
    }
    match bus.consume("NO_SUCH_STREAM", "recorder").await {
        Err(BusError::NoStream(s)) => assert_eq!(s, "NO_SUCH_STREAM"),
        Err(e) => panic!("consuming a missing stream: expected NoStream, got {e:?}"),
        Ok(_) => panic!("consuming a missing stream: expected NoStream, got deliveries"),
    }
}

async fn nak_brings_a_message_back(h: Harness) {
    let bus = h.connect().await;
    let spec = h.stream_spec();
    bus.ensure_stream(&spec).await.unwrap();
    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    bus.persist(
        &h.subject("durable.gw"),
        Bytes::from_static(b"retry me"),
        Headers::new(),
        "n1",
    )
    .await
    .unwrap();

    let first = next_delivery(&mut d).await;
    assert_eq!(first.redeliveries, 0);
    let naked_at = std::time::Instant::now();
    first.nak(Duration::from_millis(200)).await.unwrap();

    let again = next_delivery(&mut d).await;
    assert_eq!(text(&again.payload), "retry me");
    assert!(again.redeliveries > 0, "a redelivery says so");
    assert!(
        naked_at.elapsed() >= Duration::from_millis(150),
        "nak waits for its delay: {:?}",
        naked_at.elapsed()
    );
    again.nak(Duration::ZERO).await.unwrap();
    let third = next_delivery(&mut d).await;
    assert!(third.redeliveries >= 2, "counts every redelivery");
    third.ack().await.unwrap();
    assert!(timeout(QUIET, d.next()).await.is_err(), "acked for good");
}

async fn unacknowledged_deliveries_come_again_after_the_ack_wait(h: Harness) {
    let bus = h.connect().await;
    let spec = h.stream_spec();
    bus.ensure_stream(&spec).await.unwrap();
    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    for (payload, id) in [("acked", "r1"), ("forgotten", "r2")] {
        bus.persist(
            &h.subject("durable.gw"),
            Bytes::from(payload),
            Headers::new(),
            id,
        )
        .await
        .unwrap();
    }
    let acked = next_delivery(&mut d).await;
    let forgotten = next_delivery(&mut d).await;
    let delivered_at = std::time::Instant::now();
    assert_eq!(text(&acked.payload), "acked");
    assert_eq!(text(&forgotten.payload), "forgotten");
    assert_eq!((acked.redeliveries, forgotten.redeliveries), (0, 0));
    acked.ack().await.unwrap();

    // Neither acknowledged nor refused: held for a while, then dropped, as
    // by a consumer that died mid-batch. Not delivered again before the
    // ack wait is over...
    assert!(
        timeout(ACK_WAIT / 2, d.next()).await.is_err(),
        "nothing comes again within the ack wait"
    );
    drop(forgotten);
    // ... and delivered again after it, saying so.
    let again = timeout(ACK_WAIT + WAIT, d.next())
        .await
        .expect("the unacknowledged delivery comes again after the ack wait")
        .expect("the consumer is open")
        .expect("a delivery, not an error");
    assert_eq!(text(&again.payload), "forgotten");
    assert_eq!(again.redeliveries, 1, "one redelivery");
    assert!(
        delivered_at.elapsed() >= ACK_WAIT - Duration::from_millis(200),
        "redelivered only after the ack wait: {:?}",
        delivered_at.elapsed()
    );
    again.ack().await.unwrap();

    // Acknowledged deliveries never come again, not even after another
    // ack wait.
    if let Ok(Some(extra)) = timeout(ACK_WAIT + QUIET, d.next()).await {
        let extra = extra.expect("a delivery");
        panic!(
            "an acknowledged message came again: {} ({} redeliveries)",
            text(&extra.payload),
            extra.redeliveries
        );
    }
}

async fn consumers_of_one_durable_share_the_work(h: Harness) {
    let a = h.connect().await;
    let b = h.connect().await;
    let spec = h.stream_spec();
    a.ensure_stream(&spec).await.unwrap();
    let mut da = a.consume(&spec.name, "recorder").await.unwrap();
    let mut db = b.consume(&spec.name, "recorder").await.unwrap();

    const N: usize = 200;
    for i in 0..N {
        a.persist(
            &h.subject("durable.gw"),
            Bytes::from(i.to_string()),
            Headers::new(),
            &format!("w{i}"),
        )
        .await
        .unwrap();
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let (mut from_a, mut from_b) = (0, 0);
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while seen.len() < N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {N} messages arrived",
            seen.len()
        );
        let (delivery, from) = tokio::select! {
            Some(d) = da.next() => (d, &mut from_a),
            Some(d) = db.next() => (d, &mut from_b),
            _ = tokio::time::sleep(QUIET) => continue,
        };
        let delivery = delivery.expect("a delivery");
        *seen.entry(text(&delivery.payload)).or_default() += 1;
        *from += 1;
        delivery.ack().await.unwrap();
    }
    // Nothing arrives twice.
    let extra = tokio::select! {
        Some(d) = da.next() => Some(d),
        Some(d) = db.next() => Some(d),
        _ = tokio::time::sleep(QUIET) => None,
    };
    if let Some(Ok(d)) = extra {
        panic!("delivered twice: {}", text(&d.payload));
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "each message went to one consumer"
    );
    assert_eq!(from_a + from_b, N);
}

async fn persist_deduplicates_by_message_id(h: Harness) {
    let bus = h.connect().await;
    let spec = h.stream_spec();
    bus.ensure_stream(&spec).await.unwrap();
    // A publisher retrying after a lost acknowledgement sends the same id.
    for _ in 0..3 {
        bus.persist(
            &h.subject("durable.gw"),
            Bytes::from_static(b"once"),
            Headers::new(),
            "same",
        )
        .await
        .unwrap();
    }
    bus.persist(
        &h.subject("durable.gw"),
        Bytes::from_static(b"next"),
        Headers::new(),
        "other",
    )
    .await
    .unwrap();
    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    let got: Vec<String> = {
        let mut v = Vec::new();
        while let Ok(Some(Ok(delivery))) = timeout(QUIET * 2, d.next()).await {
            v.push(text(&delivery.payload));
            delivery.ack().await.unwrap();
        }
        v
    };
    assert_eq!(got, ["once", "next"], "a retried id is stored once");
}

async fn lease_has_one_holder_until_it_lapses(h: Harness) {
    let a = h.connect().await;
    let b = h.connect().await;
    let lease = h.lease("presence");
    let ttl = Duration::from_secs(1);

    assert!(
        a.try_lease(&lease, "a", ttl).await.unwrap(),
        "a free lease is taken"
    );
    assert!(
        !b.try_lease(&lease, "b", ttl).await.unwrap(),
        "one holder at a time"
    );
    // The holder renews it, for longer than one ttl in all.
    for _ in 0..4 {
        tokio::time::sleep(ttl / 3).await;
        assert!(
            a.try_lease(&lease, "a", ttl).await.unwrap(),
            "renewed by its holder"
        );
        assert!(
            !b.try_lease(&lease, "b", ttl).await.unwrap(),
            "still held by a"
        );
    }
    // a stops renewing: b takes over once the ttl has passed, not before.
    let last_renewal = std::time::Instant::now();
    let mut taken = false;
    while last_renewal.elapsed() < ttl * 4 {
        if b.try_lease(&lease, "b", ttl).await.unwrap() {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(taken, "b took over the lapsed lease");
    assert!(
        last_renewal.elapsed() >= ttl - Duration::from_millis(100),
        "taken over only after the ttl: {:?}",
        last_renewal.elapsed()
    );
    assert!(!a.try_lease(&lease, "a", ttl).await.unwrap(), "a lost it");
    assert!(b.try_lease(&lease, "b", ttl).await.unwrap());

    // Leases of other names are independent.
    let other = h.lease("other");
    assert!(a.try_lease(&other, "a", ttl).await.unwrap());
}

async fn a_released_lease_is_free_at_once(h: Harness) {
    let a = h.connect().await;
    let b = h.connect().await;
    let lease = h.lease("presence");
    let ttl = Duration::from_secs(30);

    assert!(a.try_lease(&lease, "a", ttl).await.unwrap());
    // Only the holder can release it.
    b.release_lease(&lease, "b").await.unwrap();
    assert!(
        !b.try_lease(&lease, "b", ttl).await.unwrap(),
        "b's release did not free a's lease"
    );
    a.release_lease(&lease, "a").await.unwrap();
    // Long before the 30 s ttl.
    assert!(
        b.try_lease(&lease, "b", ttl).await.unwrap(),
        "a released lease is taken at once"
    );
    assert!(
        !a.try_lease(&lease, "a", ttl).await.unwrap(),
        "b holds it now"
    );
    // Releasing a lease one does not hold (or that does not exist) is fine.
    a.release_lease(&lease, "a").await.unwrap();
    assert!(b.try_lease(&lease, "b", ttl).await.unwrap(), "still b's");
    a.release_lease(&h.lease("none"), "a").await.unwrap();
}

/// A payload of `n` bytes that differs everywhere: a part put in the
/// wrong place or lost shows.
fn large(n: usize, seed: u8) -> Bytes {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[0] ^ seed)
        .collect::<Vec<u8>>()
        .into()
}

async fn messages_larger_than_the_server_takes_arrive_whole(h: Harness) {
    // 3.5 MiB: more than NATS's default max_payload of 1 MiB.
    const SIZE: usize = 3_500_000;
    let a = h.connect().await;
    let b = h.connect().await;
    let subject = h.subject("large");
    let mut sub = b.subscribe(&subject, None).await.unwrap();
    b.flush().await.unwrap();

    let first = large(SIZE, 1);
    a.publish(&subject, first.clone(), Headers::new())
        .await
        .unwrap();
    a.publish(&subject, Bytes::from_static(b"small"), Headers::new())
        .await
        .unwrap();
    let second = large(SIZE + 17, 2);
    let headers = vec![("traceparent".to_owned(), "00-abc-def-01".to_owned())];
    a.publish(&subject, second.clone(), headers.clone())
        .await
        .unwrap();
    let m = next(&mut sub).await;
    assert_eq!(m.payload.len(), SIZE);
    assert!(m.payload == first, "the first large message, whole");
    assert_eq!(text(&next(&mut sub).await.payload), "small", "in order");
    let m = next(&mut sub).await;
    assert!(m.payload == second, "the second large message, whole");
    assert_eq!(m.headers, headers, "its headers, and only ours");

    // A large reply to a request.
    let service = h.subject("large-reply");
    let mut requests = b.subscribe(&service, None).await.unwrap();
    b.flush().await.unwrap();
    let answer = large(SIZE, 3);
    let responder = {
        let (b, answer) = (b.clone(), answer.clone());
        tokio::spawn(async move {
            let m = requests.next().await.expect("a request");
            b.publish(&m.reply.expect("a reply subject"), answer, Headers::new())
                .await
                .unwrap();
        })
    };
    let got = a
        .request(
            &service,
            Bytes::from_static(b"all of it"),
            Headers::new(),
            WAIT,
        )
        .await
        .expect("the reply");
    assert!(got == answer, "the large reply, whole");
    responder.await.unwrap();
}

async fn a_new_connection_is_connected(h: Harness) {
    let bus = h.connect().await;
    assert!(bus.is_connected());
    bus.flush().await.unwrap();
}

// ---------------------------------------------------------------- NATS only

/// The NATS bus notices an outage and recovers by itself; the durable
/// stream (file storage) survives a server restart.
#[tokio::test]
async fn nats_reconnects_after_a_server_restart_and_keeps_the_stream() {
    let mut h = Harness::nats().await;
    let bus = h.connect().await;
    let spec = h.stream_spec();
    bus.ensure_stream(&spec).await.unwrap();
    bus.persist(
        &h.subject("durable.gw"),
        Bytes::from_static(b"before"),
        Headers::new(),
        "b1",
    )
    .await
    .unwrap();
    let subject = h.subject("live");
    let mut sub = bus.subscribe(&subject, None).await.unwrap();
    bus.flush().await.unwrap();

    let server = h.nats.as_mut().unwrap();
    server.stop().await;
    testkit::eventually(WAIT, "the bus notices the outage", || {
        let b = bus.clone();
        async move { !b.is_connected() }
    })
    .await;
    server.start_again().await;
    testkit::eventually(WAIT * 2, "the bus reconnects", || {
        let b = bus.clone();
        async move { b.is_connected() }
    })
    .await;

    // Subscriptions are restored; the stream kept its message.
    bus.flush().await.unwrap();
    bus.publish(&subject, Bytes::from_static(b"again"), Headers::new())
        .await
        .unwrap();
    assert_eq!(text(&next(&mut sub).await.payload), "again");
    bus.persist(
        &h.subject("durable.gw"),
        Bytes::from_static(b"after"),
        Headers::new(),
        "a1",
    )
    .await
    .unwrap();
    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    let mut got = BTreeSet::new();
    for _ in 0..2 {
        let delivery = next_delivery(&mut d).await;
        got.insert(text(&delivery.payload));
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        got,
        BTreeSet::from(["before".to_owned(), "after".to_owned()])
    );
}

/// The stream is a work queue: it holds a message until it is
/// acknowledged (also while it is out for delivery), and not after.
async fn an_acknowledged_message_leaves_the_stream(h: Harness) {
    let bus = h.connect().await;
    let spec = h.stream_spec();
    bus.ensure_stream(&spec).await.unwrap();
    for i in 0..5 {
        bus.persist(
            &h.subject("durable.gw"),
            Bytes::from(vec![b'x'; 100]),
            Headers::new(),
            &format!("leave-{i}"),
        )
        .await
        .unwrap();
    }
    let full = bus.stream_state(&spec.name).await.unwrap();
    assert_eq!(full.messages, 5);
    assert!(full.bytes >= 500, "{full:?}");
    assert_eq!(full.max_bytes, spec.max_bytes);

    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(next_delivery(&mut d).await);
    }
    // Delivered but not acknowledged: still held.
    assert_eq!(bus.stream_state(&spec.name).await.unwrap().messages, 5);
    for delivery in open.drain(..3) {
        delivery.ack().await.unwrap();
    }
    stream_holds(&bus, &spec.name, 2).await;
    for delivery in open {
        delivery.ack().await.unwrap();
    }
    stream_holds(&bus, &spec.name, 0).await;
    assert_eq!(bus.stream_state(&spec.name).await.unwrap().bytes, 0);
    match bus.stream_state("NO_SUCH_STREAM").await {
        Err(BusError::NoStream(s)) => assert_eq!(s, "NO_SUCH_STREAM"),
        other => panic!("state of a missing stream: expected NoStream, got {other:?}"),
    }
}

/// Waits until the stream holds `n` messages.
async fn stream_holds(bus: &SharedBus, stream: &str, n: u64) {
    testkit::eventually(WAIT, &format!("the stream holds {n} messages"), || {
        let (b, s) = (bus.clone(), stream.to_owned());
        async move { b.stream_state(&s).await.unwrap().messages == n }
    })
    .await;
}

/// At its byte cap the stream refuses new messages (discard new) and
/// keeps every message it holds; a refused message is not remembered as
/// stored, so its retry is stored once an acknowledgement made room, and a
/// larger cap given to `ensure_stream` applies to the existing stream.
async fn a_full_stream_refuses_new_messages_until_there_is_room(h: Harness) {
    let bus = h.connect().await;
    let spec = StreamSpec {
        max_bytes: 4096,
        ..h.stream_spec()
    };
    bus.ensure_stream(&spec).await.unwrap();
    let subject = h.subject("durable.gw");
    let mut stored = Vec::new();
    let refused = loop {
        let id = format!("full-{}", stored.len());
        match bus
            .persist(&subject, Bytes::from(vec![b'x'; 1000]), Headers::new(), &id)
            .await
        {
            Ok(()) => stored.push(id),
            Err(BusError::StreamFull(s)) => {
                assert_eq!(s, subject);
                break id;
            }
            Err(e) => panic!("expected StreamFull at the cap, got {e:?}"),
        }
        assert!(stored.len() <= 4, "4096 bytes cannot hold 5 such messages");
    };
    assert!(stored.len() >= 2, "stored {stored:?} before refusing");
    let state = bus.stream_state(&spec.name).await.unwrap();
    assert_eq!(state.messages, stored.len() as u64);
    assert!(state.bytes <= spec.max_bytes, "{state:?}");
    // Still full: the retry is refused too.
    assert!(matches!(
        bus.persist(
            &subject,
            Bytes::from(vec![b'x'; 1000]),
            Headers::new(),
            &refused
        )
        .await,
        Err(BusError::StreamFull(_))
    ));

    // One acknowledgement makes room: the retry is stored, once.
    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    next_delivery(&mut d).await.ack().await.unwrap();
    stream_holds(&bus, &spec.name, stored.len() as u64 - 1).await;
    bus.persist(
        &subject,
        Bytes::from(vec![b'y'; 1000]),
        Headers::new(),
        &refused,
    )
    .await
    .expect("room after an acknowledgement");
    let mut rest = Vec::new();
    while let Ok(Some(Ok(delivery))) = timeout(QUIET * 2, d.next()).await {
        rest.push(delivery.payload[0]);
        delivery.ack().await.unwrap();
    }
    let mut expected = vec![b'x'; stored.len() - 1];
    expected.push(b'y');
    assert_eq!(rest, expected, "every stored message once, then the retry");

    // A larger cap applies to the existing stream.
    let larger = StreamSpec {
        max_bytes: 1 << 20,
        ..spec.clone()
    };
    bus.ensure_stream(&larger).await.unwrap();
    assert_eq!(
        bus.stream_state(&spec.name).await.unwrap().max_bytes,
        1 << 20
    );
    for i in 0..10 {
        bus.persist(
            &subject,
            Bytes::from(vec![b'z'; 1000]),
            Headers::new(),
            &format!("larger-{i}"),
        )
        .await
        .expect("room under the larger cap");
    }
}

/// A stream an older version made with limits retention (acknowledged
/// messages stay) becomes a work queue only once its consumers have
/// acknowledged everything in it; before, `ensure_stream` refuses and
/// leaves it working as it was.
#[tokio::test]
async fn nats_replaces_a_drained_limits_stream_by_a_work_queue() {
    use async_nats::jetstream::stream;
    let h = Harness::nats().await;
    let bus = h.connect().await;
    let spec = h.stream_spec();
    let client = async_nats::connect(h.nats.as_ref().unwrap().url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(stream::Config {
        name: spec.name.clone(),
        subjects: vec![spec.subjects.clone()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let subject = h.subject("durable.gw");
    for i in 0..3 {
        bus.persist(
            &subject,
            Bytes::from(format!("old-{i}")),
            Headers::new(),
            &format!("old-{i}"),
        )
        .await
        .unwrap();
    }
    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    let first = next_delivery(&mut d).await;
    first.ack().await.unwrap();

    // Two not yet acknowledged: refused, and the old stream still works.
    match bus.ensure_stream(&spec).await {
        Err(BusError::Rejected { source, .. }) => {
            assert!(source.to_string().contains("2 messages"), "{source}")
        }
        other => panic!("migrating an undrained stream: expected Rejected, got {other:?}"),
    }
    let retention = |js: async_nats::jetstream::Context, name: String| async move {
        js.get_stream(&name)
            .await
            .unwrap()
            .cached_info()
            .config
            .retention
    };
    assert_eq!(
        retention(js.clone(), spec.name.clone()).await,
        stream::RetentionPolicy::Limits
    );
    bus.persist(
        &subject,
        Bytes::from_static(b"old-3"),
        Headers::new(),
        "old-3",
    )
    .await
    .expect("the old stream takes messages again after a refused migration");
    // The recorder catches up (the refused attempt took longer than the
    // ack wait, so some come twice).
    let mut seen = BTreeSet::new();
    while let Ok(Some(Ok(delivery))) = timeout(QUIET * 2, d.next()).await {
        seen.insert(text(&delivery.payload));
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        seen,
        BTreeSet::from(["old-1", "old-2", "old-3"].map(String::from))
    );
    drop(d);

    // Drained: replaced by a capped work queue, which then works as one.
    bus.ensure_stream(&spec)
        .await
        .expect("the drained stream is migrated");
    assert_eq!(
        retention(js.clone(), spec.name.clone()).await,
        stream::RetentionPolicy::WorkQueue
    );
    let state = bus.stream_state(&spec.name).await.unwrap();
    assert_eq!((state.messages, state.max_bytes), (0, spec.max_bytes));
    bus.persist(&subject, Bytes::from_static(b"new"), Headers::new(), "new")
        .await
        .unwrap();
    let mut d = bus.consume(&spec.name, "recorder").await.unwrap();
    let delivery = next_delivery(&mut d).await;
    assert_eq!(text(&delivery.payload), "new");
    delivery.ack().await.unwrap();
    stream_holds(&bus, &spec.name, 0).await;
}

/// The typed layer over either bus: each subject carries its message type,
/// encoded and decoded once; a payload that is not that type arrives as
/// [`BusError::Decode`] and the subscription goes on.
async fn typed_topics_carry_their_message_types(h: Harness) {
    let a = h.connect().await;
    let b = h.connect().await;
    let headers = vec![("traceparent".to_owned(), "00-abc-def-01".to_owned())];

    // Publish/subscribe.
    let topic: Topic<Broadcast> = Topic::new(h.subject("typed.broadcast"));
    let mut inbox = topic.subscribe(&*b).await.unwrap();
    b.flush().await.unwrap();
    let msg = Broadcast::Disconnect {
        channel_name: "x".into(),
    };
    topic
        .publish(&*a, &msg)
        .headers(headers.clone())
        .await
        .unwrap();
    a.publish(
        topic.subject(),
        Bytes::from_static(b"{nope"),
        Headers::new(),
    )
    .await
    .unwrap();
    topic.publish(&*a, &msg).await.unwrap();
    let first = timeout(WAIT, inbox.next()).await.unwrap().unwrap();
    assert_eq!(first.message.unwrap(), msg);
    assert_eq!(first.headers, headers, "headers travel along");
    let bad = timeout(WAIT, inbox.next()).await.unwrap().unwrap();
    match bad.message {
        Err(BusError::Decode { subject, .. }) => assert_eq!(subject, topic.subject()),
        other => panic!("expected a decode error, got {other:?}"),
    }
    let third = timeout(WAIT, inbox.next()).await.unwrap().unwrap();
    assert_eq!(third.message.unwrap(), msg, "the subscription goes on");
    assert!(third.headers.is_empty());

    // Request/reply, a bad request answered too.
    let service: Service<StatsQuery, StatsReply> = Service::new(h.subject("typed.stats"));
    let mut requests = service.serve(&*b, "typed").await.unwrap();
    b.flush().await.unwrap();
    let responder = {
        let b = b.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                let req = requests.next().await.expect("a request");
                assert!(req.wants_reply());
                let message = match &req.message {
                    Ok(q) => format!("{}/{}", q.window_ms, q.bucket_ms),
                    Err(BusError::Decode { .. }) => "bad".to_owned(),
                    Err(e) => panic!("unexpected {e:?}"),
                };
                let kind = ReplyErrorKind::BadRequest;
                req.reply(&*b, &StatsReply::Error { kind, message })
                    .await
                    .unwrap();
            }
        })
    };
    let query = StatsQuery {
        window_ms: 60_000,
        bucket_ms: 10_000,
        deadline_unix_ms: None,
    };
    let reply = service
        .request(&*a, &query, WAIT)
        .headers(headers.clone())
        .await
        .unwrap();
    assert_eq!(
        reply,
        StatsReply::Error {
            kind: ReplyErrorKind::BadRequest,
            message: "60000/10000".into()
        }
    );
    let raw = a
        .request(
            service.subject(),
            Bytes::from_static(b"\xff"),
            Headers::new(),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(
        services::messages::decode::<StatsReply>(&raw).unwrap(),
        StatsReply::Error {
            kind: ReplyErrorKind::BadRequest,
            message: "bad".into()
        }
    );
    responder.await.unwrap();

    // A reply that is not the reply type: a decode error for the asker.
    let liar_subject = h.subject("typed.liar");
    let mut liar = b.subscribe(&liar_subject, None).await.unwrap();
    b.flush().await.unwrap();
    let liar_task = {
        let b = b.clone();
        tokio::spawn(async move {
            let m = liar.next().await.expect("a request");
            b.publish(
                &m.reply.expect("a reply subject"),
                Bytes::from_static(b"[]"),
                Headers::new(),
            )
            .await
            .unwrap();
        })
    };
    let liar_service: Service<StatsQuery, StatsReply> = Service::new(liar_subject.clone());
    match liar_service.request(&*a, &query, WAIT).await {
        Err(BusError::Decode { subject, .. }) => assert_eq!(subject, liar_subject),
        other => panic!("expected a decode error, got {other:?}"),
    }
    liar_task.await.unwrap();

    // A request without a reply subject cannot be answered.
    let mut silent = service.serve(&*b, "typed-2").await.unwrap();
    b.flush().await.unwrap();
    a.publish(
        service.subject(),
        services::messages::encode(&query),
        Headers::new(),
    )
    .await
    .unwrap();
    let req = timeout(WAIT, silent.next()).await.unwrap().unwrap();
    assert!(!req.wants_reply());
    let answer = StatsReply::Error {
        kind: ReplyErrorKind::Unavailable,
        message: "nobody".into(),
    };
    match req.reply(&*b, &answer).await {
        Err(BusError::NoReplySubject(s)) => assert_eq!(s, service.subject()),
        other => panic!("expected NoReplySubject, got {other:?}"),
    }

    // The durable stream, typed.
    let spec = h.stream_spec();
    let stream: DurableStream<RecordBatch> = DurableStream::new(&spec.name, &spec.subjects);
    stream
        .ensure(&*a, spec.max_age, spec.max_bytes)
        .await
        .unwrap();
    let samples: Topic<RecordBatch> = Topic::new(h.subject("durable.gw"));
    let batch = RecordBatch {
        gateway: "gw".into(),
        ..Default::default()
    };
    samples
        .persist(&*a, &batch, "t1")
        .headers(headers.clone())
        .await
        .unwrap();
    a.persist(
        samples.subject(),
        Bytes::from_static(b"garbage"),
        Headers::new(),
        "t2",
    )
    .await
    .unwrap();
    let mut consumed = stream.consume(&*a, "recorder").await.unwrap();
    let d1 = timeout(WAIT, consumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d1.message.unwrap(), batch);
    assert_eq!(d1.delivery.headers, headers);
    d1.delivery.ack().await.unwrap();
    let d2 = timeout(WAIT, consumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(d2.message, Err(BusError::Decode { .. })),
        "garbage in the stream is a decode error"
    );
    d2.delivery.ack().await.unwrap();
}

/// A hostile publisher sends many incomplete messages in parts (the
/// `Pingapp-Chunk` header, never the last part): the subscriber holds at
/// most its byte bound, drops every one of them by its timer, whether or
/// not more parts come, and still puts an honest large message together.
#[tokio::test]
async fn nats_incomplete_chunked_messages_are_bounded_and_expire() {
    const BOUND: usize = 4 << 20;
    const PART: usize = 64 * 1024;
    let h = Harness::nats().await;
    let url = h.nats.as_ref().unwrap().url();
    let options = services::bus::nats::NatsOptions {
        chunks: services::bus::nats::ChunkLimits {
            max_bytes: BOUND,
            timeout: Duration::from_millis(1500),
        },
        ..Default::default()
    };
    let victim = NatsBus::connect_with(&url, "victim", &options)
        .await
        .expect("connect");
    let subject = h.subject("chunked");
    let mut sub = victim.subscribe(&subject, None).await.unwrap();
    victim.flush().await.unwrap();
    // The subscriber's loop, as every service runs one.
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let _ = tx.send(m);
        }
    });

    let attacker = async_nats::connect(&url).await.expect("raw connection");
    let part = Bytes::from(vec![b'x'; PART]);
    let mut most = 0;
    // 200 sets of 10 parts, 9 of each sent: 112 MiB if all were kept.
    for set in 0..200 {
        for index in 0..9 {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Pingapp-Chunk", format!("evil{set} {index} 10").as_str());
            attacker
                .publish_with_headers(subject.clone(), headers, part.clone())
                .await
                .unwrap();
        }
        if set % 20 == 19 {
            attacker.flush().await.unwrap();
            victim.flush().await.unwrap();
            most = most.max(victim.chunk_bytes_held());
        }
    }
    attacker.flush().await.unwrap();
    testkit::eventually(WAIT, "the victim has read every part", || {
        let v = victim.clone();
        async move {
            v.chunk_sets_dropped("over_bytes") + v.chunk_sets_dropped("over_sets") > 150
                && v.chunk_bytes_held() > 0
        }
    })
    .await;
    most = most.max(victim.chunk_bytes_held());
    assert!(most > 0, "the parts were held for a while");
    assert!(
        most <= BOUND as u64,
        "held {most} bytes, more than the bound {BOUND}"
    );
    // No part comes any more: only the timer can free what is held.
    testkit::eventually(WAIT, "incomplete messages expire by the timer", || {
        let v = victim.clone();
        async move { v.chunk_bytes_held() == 0 }
    })
    .await;
    assert!(victim.chunk_sets_dropped("expired") > 0);
    assert!(received.try_recv().is_err(), "no forged part got through");

    // An honest 3 MB message (three parts) is still put together, by the
    // victim and by a fresh subscriber.
    let honest = NatsBus::connect(&url, "honest").await.unwrap();
    let big_sub = NatsBus::connect_with(&url, "victim-2", &options)
        .await
        .unwrap();
    let mut whole = big_sub.subscribe(&subject, None).await.unwrap();
    big_sub.flush().await.unwrap();
    let payload = large(3_000_000, 7);
    honest
        .publish(&subject, payload.clone(), Headers::new())
        .await
        .unwrap();
    assert!(next(&mut whole).await.payload == payload);
    let m = timeout(WAIT, received.recv()).await.unwrap().unwrap();
    assert!(m.payload == payload, "the first victim got it too");
    reader.abort();
}
