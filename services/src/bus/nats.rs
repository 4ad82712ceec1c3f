//! The bus over NATS: core NATS for publish/subscribe and request/reply,
//! JetStream for the durable sample stream, and a JetStream key-value
//! bucket for leases.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{
    Acker, Bus, BusError, DUPLICATE_WINDOW, Deliveries, Delivery, Headers, Message, StreamSpec,
    Subscription,
};

/// How long [`Bus::flush`] waits for the server's round trip.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a durable consumer waits for an acknowledgement before it
/// delivers the message again, unless [`NatsBus::with_ack_wait`] says
/// otherwise.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// A bus over one NATS connection, which reconnects by itself.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    ack_wait: Duration,
}

impl NatsBus {
    /// Connects to `url` (a comma-separated list of servers works), waiting
    /// for the first connection and retrying for ever afterwards.
    ///
    /// # Errors
    /// The URL is malformed or the first connection failed.
    pub async fn connect(url: &str, name: &str) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                tracing::info!(%event, "nats connection event");
            })
            .connect(url)
            .await
            .map_err(BusError::other)?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            ack_wait: DEFAULT_ACK_WAIT,
        })
    }

    /// The same bus, creating durable consumers that deliver a message
    /// again `ack_wait` after it went to a consumer that neither acked nor
    /// nak'ed it (e.g. one killed mid-batch). Applies when [`Bus::consume`]
    /// creates the consumer; an existing consumer keeps its setting.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// The underlying NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn map_sub(sub: async_nats::Subscriber) -> Subscription {
        Box::pin(sub.map(|m| Message {
            subject: m.subject.to_string(),
            payload: m.payload,
            reply: m.reply.map(|r| r.to_string()),
            headers: from_header_map(m.headers.as_ref()),
        }))
    }

    async fn lease_bucket(&self, bucket: &str, ttl: Duration) -> Result<kv::Store, BusError> {
        match self.js.get_key_value(bucket).await {
            Ok(store) => Ok(store),
            Err(_) => {
                // The bucket's stream is created directly, with the settings
                // `create_key_value` would use: that call first reads the
                // account info, which async-nats fails to parse from servers
                // before 2.10.
                self.js
                    .get_or_create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: 1,
                        max_age: ttl,
                        duplicate_window: ttl.min(DUPLICATE_WINDOW),
                        storage: stream::StorageType::File,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        num_replicas: 1,
                        ..Default::default()
                    })
                    .await
                    .map_err(BusError::other)?;
                self.js.get_key_value(bucket).await.map_err(BusError::other)
            }
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        self.client
            .publish(subject.to_owned(), payload)
            .await
            .map_err(BusError::other)
    }

    async fn publish_with_headers(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
    ) -> Result<(), BusError> {
        if headers.is_empty() {
            return self.publish(subject, payload).await;
        }
        self.client
            .publish_with_headers(subject.to_owned(), to_header_map(&headers), payload)
            .await
            .map_err(BusError::other)
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        let sub = self
            .client
            .subscribe(subject.to_owned())
            .await
            .map_err(BusError::other)?;
        Ok(Self::map_sub(sub))
    }

    async fn queue_subscribe(&self, subject: &str, queue: &str) -> Result<Subscription, BusError> {
        let sub = self
            .client
            .queue_subscribe(subject.to_owned(), queue.to_owned())
            .await
            .map_err(BusError::other)?;
        Ok(Self::map_sub(sub))
    }

    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        self.request_with_headers(subject, payload, Headers::new(), timeout)
            .await
    }

    async fn request_with_headers(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        let mut req = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        if !headers.is_empty() {
            req = req.headers(to_header_map(&headers));
        }
        match self.client.send_request(subject.to_owned(), req).await {
            Ok(m) => Ok(m.payload),
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    BusError::NoResponders(subject.to_owned())
                }
                async_nats::RequestErrorKind::TimedOut => BusError::Timeout(subject.to_owned()),
                _ => BusError::other(e),
            }),
        }
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: spec.name.clone(),
                subjects: vec![spec.subjects.clone()],
                storage: stream::StorageType::File,
                max_age: spec.max_age,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(BusError::other)?;
        Ok(())
    }

    async fn persist(&self, subject: &str, payload: Bytes, msg_id: &str) -> Result<(), BusError> {
        self.persist_with_headers(subject, payload, Headers::new(), msg_id)
            .await
    }

    async fn persist_with_headers(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        msg_id: &str,
    ) -> Result<(), BusError> {
        let mut msg = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(msg_id);
        for (k, v) in &headers {
            msg = msg.header(k.as_str(), v.as_str());
        }
        let ack = self
            .js
            .send_publish(subject.to_owned(), msg)
            .await
            .map_err(BusError::other)?;
        ack.await.map_err(BusError::other)?;
        Ok(())
    }

    async fn consume(&self, stream: &str, durable: &str) -> Result<Deliveries, BusError> {
        let stream = self.js.get_stream(stream).await.map_err(BusError::other)?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                durable,
                pull::Config {
                    durable_name: Some(durable.to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(BusError::other)?;
        let messages = consumer.messages().await.map_err(BusError::other)?;
        Ok(Box::pin(messages.map(|m| {
            let m = m.map_err(BusError::other)?;
            let redeliveries = m.info().map(|i| i.delivered.max(1) as u64 - 1).unwrap_or(0);
            let payload = m.payload.clone();
            let headers = from_header_map(m.headers.as_ref());
            Ok(Delivery::new(payload, redeliveries, Box::new(NatsAcker(m))).with_headers(headers))
        })))
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BusError> {
        let (bucket, key) = name.split_once('/').unwrap_or(("pingapp_leases", name));
        let kv = self.lease_bucket(bucket, ttl).await?;
        let value = Bytes::copy_from_slice(holder.as_bytes());
        match kv.entry(key).await.map_err(BusError::other)? {
            Some(e) if e.operation == kv::Operation::Put => {
                if e.value.as_ref() != holder.as_bytes() {
                    return Ok(false);
                }
                Ok(kv.update(key, value, e.revision).await.is_ok())
            }
            _ => Ok(kv.create(key, value).await.is_ok()),
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BusError> {
        let (bucket, key) = name.split_once('/').unwrap_or(("pingapp_leases", name));
        let kv = self
            .js
            .get_key_value(bucket)
            .await
            .map_err(BusError::other)?;
        match kv.entry(key).await.map_err(BusError::other)? {
            // Only our own lease, and only the revision we read: a
            // replica that took it over in between keeps it.
            Some(e)
                if e.operation == kv::Operation::Put && e.value.as_ref() == holder.as_bytes() =>
            {
                kv.delete_expect_revision(key, Some(e.revision))
                    .await
                    .map_err(BusError::other)
            }
            _ => Ok(()),
        }
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn flush(&self) -> Result<(), BusError> {
        let round_trip = async {
            self.client.flush().await.map_err(BusError::other)?;
            // async-nats's flush only writes the buffer to the socket. A
            // request nobody answers comes back (as "no responders") only
            // after the server processed everything sent before it: the
            // round trip nats.go's PING/PONG flush makes.
            let probe = async_nats::Request::new().timeout(Some(FLUSH_TIMEOUT));
            match self
                .client
                .send_request(self.client.new_inbox(), probe)
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
                Err(e) => Err(BusError::other(e)),
            }
        };
        // While disconnected, async-nats holds a flush until it reconnects:
        // a draining service must not wait for that.
        tokio::time::timeout(FLUSH_TIMEOUT, round_trip)
            .await
            .unwrap_or_else(|_| Err(BusError::Timeout("flush".to_owned())))
    }
}

fn to_header_map(headers: &Headers) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in headers {
        map.insert(k.as_str(), v.as_str());
    }
    map
}

/// Our headers of a NATS message; NATS's own (`Nats-*`) are left out.
fn from_header_map(map: Option<&async_nats::HeaderMap>) -> Headers {
    let Some(map) = map else {
        return Headers::new();
    };
    map.iter()
        .filter(|(k, _)| !k.to_string().starts_with("Nats-"))
        .filter_map(|(k, values)| Some((k.to_string(), values.first()?.to_string())))
        .collect()
}

struct NatsAcker(jetstream::Message);

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), BusError> {
        // Double ack waits for the server's confirmation, so an ack lost in
        // a reconnect is reported instead of silently dropped.
        self.0
            .double_ack()
            .await
            .map_err(|e| BusError::Other(e.to_string()))
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| BusError::Other(e.to_string()))
    }
}
