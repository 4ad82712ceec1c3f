//! The bus over NATS: core NATS for publish/subscribe and request/reply,
//! JetStream for the durable sample stream, and a JetStream key-value
//! bucket for leases.
//!
//! A core NATS message larger than the server's `max_payload` (1 MiB by
//! default; a roster snapshot of ~7,000 clients is that big) is sent as
//! consecutive parts, each with a `Pingapp-Chunk: ID INDEX COUNT` header,
//! and put together again by the receiving subscription or request. Parts
//! of one message must reach one subscriber: large messages go to plain
//! subscriptions and reply inboxes, never to a queue group.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_nats::ServerAddr;
use async_nats::jetstream::{self, AckKind, consumer::pull, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio_stream::StreamExt;

use super::{
    Acker, Bus, BusError, DEFAULT_ACK_WAIT, DUPLICATE_WINDOW, Deliveries, Delivery, Headers,
    LeaseKey, Message, StreamSpec, StreamState, Subscription,
};

/// The header that marks one part of a message split for its size.
const CHUNK_HEADER: &str = "Pingapp-Chunk";
/// nats-server's default `max_payload`.
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Room left in every part for its headers.
const CHUNK_HEADROOM: usize = 8 * 1024;
/// Most parts of one message (with the default 1 MiB payload: ~1 GiB).
const MAX_CHUNKS: usize = 1024;
/// Most messages being put together at once per subscription; the oldest
/// incomplete one is dropped beyond that.
const MAX_PARTIAL: usize = 16;
/// Default of [`ChunkLimits::max_bytes`] (`--nats-max-chunk-bytes`):
/// 16 MiB, a roster snapshot of about 100,000 clients.
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 16 << 20;
/// Default of [`ChunkLimits::timeout`] (`--nats-chunk-timeout-ms`). The
/// parts of one message are published back to back, so an honest message
/// is whole within milliseconds.
pub const DEFAULT_CHUNK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stream being replaced by a work queue stays closed to new
/// messages waiting for its consumers to acknowledge the rest.
const MIGRATION_DRAIN_WAIT: Duration = Duration::from_secs(3);

/// How long [`Bus::flush`] waits for the server's round trip.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Parses a comma-separated list of NATS server addresses with the NATS
/// client's own [`ServerAddr`] (`nats://`, `tls://`, `ws://`, `wss://`;
/// scheme and port may be left out: `nats://` and 4222).
///
/// # Errors
/// [`BusError::BadAddress`] naming the first address that does not parse.
pub fn server_addrs(list: &str) -> Result<Vec<ServerAddr>, BusError> {
    list.split(',')
        .map(str::trim)
        .map(|part| {
            let bad = |reason: String| BusError::BadAddress {
                address: part.to_owned(),
                reason,
            };
            if part.is_empty() {
                return Err(bad("empty".to_owned()));
            }
            let addr = ServerAddr::from_str(part).map_err(|e| bad(e.to_string()))?;
            if addr.host().is_empty() {
                return Err(bad("no host".to_owned()));
            }
            Ok(addr)
        })
        .collect()
}

/// Bounds of putting messages sent in parts together again, per
/// subscription (and per request's reply inbox): docs/security.md, "The
/// bus".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Most payload bytes of incomplete messages held at once. A part that
    /// does not fit drops the oldest incomplete messages first, then its
    /// own.
    pub max_bytes: usize,
    /// An incomplete message is dropped this long after its first part
    /// arrived, by a timer (whether or not more parts come).
    pub timeout: Duration,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_CHUNK_BYTES,
            timeout: DEFAULT_CHUNK_TIMEOUT,
        }
    }
}

/// What connects a [`NatsBus`]: its identity, TLS and reassembly bounds.
/// The default is an anonymous, plain connection with the default bounds.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// A NATS credentials file (a user JWT and its nkey seed) or a file
    /// holding just an nkey seed (`SU...`): the connection's identity.
    pub creds: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate; with it
    /// the connection requires TLS and verifies the server.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients
    /// (mutual TLS).
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Bounds of reassembling messages sent in parts.
    pub chunks: ChunkLimits,
}

/// The reassembly's metrics, shared by every subscription of one bus and
/// registered by [`NatsBus::register_metrics`].
#[derive(Clone)]
struct ChunkMetrics {
    /// Bytes of incomplete messages held, all subscriptions together.
    held: IntGauge,
    /// Incomplete messages dropped, by reason.
    dropped: IntCounterVec,
}

/// The `reason`s of `pingapp_bus_chunk_sets_dropped_total`.
const DROP_REASONS: [&str; 4] = ["expired", "over_bytes", "over_sets", "malformed"];

impl ChunkMetrics {
    fn new() -> Self {
        let held = IntGauge::new(
            "pingapp_bus_chunk_bytes",
            "Payload bytes of incomplete messages (sent in parts) held by this process's \
             bus subscriptions.",
        )
        .expect("valid gauge");
        let dropped = IntCounterVec::new(
            Opts::new(
                "pingapp_bus_chunk_sets_dropped_total",
                "Incomplete messages sent in parts that were dropped, by reason: expired \
                 (timer), over_bytes (the per-subscription byte bound), over_sets (too many \
                 at once) or malformed (a bad or inconsistent part header).",
            ),
            &["reason"],
        )
        .expect("valid counter");
        for reason in DROP_REASONS {
            dropped.with_label_values(&[reason]);
        }
        Self { held, dropped }
    }
}

/// A bus over one NATS connection, which reconnects by itself.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    ack_wait: Duration,
    chunks: ChunkLimits,
    chunk_metrics: ChunkMetrics,
}

impl NatsBus {
    /// Connects to `url` (a comma-separated list of servers works, see
    /// [`server_addrs`]) anonymously and without TLS, waiting for the first
    /// connection and retrying for ever afterwards.
    ///
    /// # Errors
    /// The URL is malformed or the first connection failed.
    pub async fn connect(url: &str, name: &str) -> Result<Self, BusError> {
        Self::connect_with(url, name, &NatsOptions::default()).await
    }

    /// [`NatsBus::connect`] with an identity, TLS and reassembly bounds.
    /// `name` also names the connection's reply inbox ([`inbox_prefix`]).
    ///
    /// # Errors
    /// The URL is malformed, a file of `options` cannot be read or is not
    /// what it should be, or the first connection failed.
    pub async fn connect_with(
        url: &str,
        name: &str,
        options: &NatsOptions,
    ) -> Result<Self, BusError> {
        let addrs = server_addrs(url)?;
        let mut connect = async_nats::ConnectOptions::new();
        if let Some(path) = &options.creds {
            connect = with_identity(connect, path).await?;
        }
        if let Some(ca) = &options.tls_ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &options.tls_client {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
        let client = connect
            .name(name)
            // Replies (and JetStream's answers) come to an inbox of this
            // connection's own, so that NATS permissions can let each
            // identity read only its own (docs/security.md, "The bus").
            .custom_inbox_prefix(inbox_prefix(name))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                tracing::info!(%event, "nats connection event");
            })
            .connect(addrs.as_slice())
            .await
            .map_err(|e| BusError::disconnected("connect", e))?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            ack_wait: DEFAULT_ACK_WAIT,
            chunks: options.chunks,
            chunk_metrics: ChunkMetrics::new(),
        })
    }

    /// Registers the bus's own metrics (`pingapp_bus_*`) in `registry`.
    ///
    /// # Errors
    /// They are registered there already.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.chunk_metrics.held.clone()))?;
        registry.register(Box::new(self.chunk_metrics.dropped.clone()))
    }

    /// Payload bytes of incomplete messages (sent in parts) that this
    /// bus's subscriptions hold now (`pingapp_bus_chunk_bytes`).
    pub fn chunk_bytes_held(&self) -> u64 {
        u64::try_from(self.chunk_metrics.held.get()).unwrap_or(0)
    }

    /// Incomplete messages dropped so far for `reason` (`expired`,
    /// `over_bytes`, `over_sets`, `malformed`).
    pub fn chunk_sets_dropped(&self, reason: &str) -> u64 {
        self.chunk_metrics
            .dropped
            .with_label_values(&[reason])
            .get()
    }

    /// The same bus, creating durable consumers that deliver a message
    /// again `ack_wait` after it went to a consumer that neither acked nor
    /// nak'ed it (e.g. one killed mid-batch). Applies when [`Bus::consume`]
    /// creates the consumer; an existing consumer keeps its setting. The
    /// in-memory bus's [`super::memory::MemoryBus::with_ack_wait`] means
    /// the same.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// The underlying NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn reassembler(&self) -> Reassembler {
        Reassembler::new(self.chunks, self.chunk_metrics.clone())
    }

    /// Our subscription of a NATS one: parts put together, and incomplete
    /// messages dropped by a timer while the subscription is polled.
    fn map_sub(&self, sub: async_nats::Subscriber) -> Subscription {
        let parts = self.reassembler();
        Box::pin(futures_util::stream::unfold(
            (sub, parts),
            |(mut sub, mut parts)| async move {
                loop {
                    let expiry = parts.next_expiry();
                    let m = tokio::select! {
                        m = sub.next() => m?,
                        () = sleep_until(expiry) => {
                            parts.expire(tokio::time::Instant::now());
                            continue;
                        }
                    };
                    if let Some(whole) = parts.push(m) {
                        return Some((whole, (sub, parts)));
                    }
                }
            },
        ))
    }

    /// The largest payload sent as one message.
    fn part_size(&self) -> usize {
        // 0 until the server's INFO arrived: assume NATS's default then.
        let max = match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        };
        max.saturating_sub(CHUNK_HEADROOM).max(1024)
    }

    /// Publishes `payload` (with `reply` and `headers`), in parts when it is
    /// larger than the server takes in one message.
    async fn publish_parts(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: Bytes,
        headers: &Headers,
    ) -> Result<(), BusError> {
        let size = self.part_size();
        if payload.len() <= size {
            return self
                .publish_one(subject, reply, payload, headers, None)
                .await;
        }
        let count = payload.len().div_ceil(size);
        if count > MAX_CHUNKS {
            return Err(BusError::TooLarge {
                subject: subject.to_owned(),
                bytes: payload.len(),
            });
        }
        let id = crate::ids::new_client_id();
        for index in 0..count {
            let part = payload.slice(index * size..((index + 1) * size).min(payload.len()));
            let chunk = format!("{id} {index} {count}");
            self.publish_one(subject, reply, part, headers, Some(&chunk))
                .await?;
        }
        Ok(())
    }

    async fn publish_one(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: Bytes,
        headers: &Headers,
        chunk: Option<&str>,
    ) -> Result<(), BusError> {
        let (owned, bytes) = (subject.to_owned(), payload.len());
        let subject = owned.clone();
        let result = if headers.is_empty() && chunk.is_none() {
            match reply {
                Some(r) => {
                    self.client
                        .publish_with_reply(subject, r.to_owned(), payload)
                        .await
                }
                None => self.client.publish(subject, payload).await,
            }
        } else {
            let mut map = to_header_map(headers);
            if let Some(chunk) = chunk {
                map.insert(CHUNK_HEADER, chunk);
            }
            match reply {
                Some(r) => {
                    self.client
                        .publish_with_reply_and_headers(subject, r.to_owned(), map, payload)
                        .await
                }
                None => {
                    self.client
                        .publish_with_headers(subject, map, payload)
                        .await
                }
            }
        };
        result.map_err(|e| {
            use async_nats::client::PublishErrorKind as K;
            match e.kind() {
                K::MaxPayloadExceeded => BusError::TooLarge {
                    subject: owned,
                    bytes,
                },
                K::InvalidSubject => BusError::rejected("publish", e),
                K::Send => BusError::disconnected("publish", e),
            }
        })
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
                    .map_err(|e| BusError::rejected("create the lease bucket", e))?;
                self.js
                    .get_key_value(bucket)
                    .await
                    .map_err(|e| BusError::rejected("open the lease bucket", e))
            }
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
    ) -> Result<(), BusError> {
        self.publish_parts(subject, None, payload, &headers).await
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue: Option<&str>,
    ) -> Result<Subscription, BusError> {
        let sub = match queue {
            None => self.client.subscribe(subject.to_owned()).await,
            Some(q) => {
                self.client
                    .queue_subscribe(subject.to_owned(), q.to_owned())
                    .await
            }
        };
        let sub = sub.map_err(|e| match e.kind() {
            async_nats::SubscribeErrorKind::Other => BusError::disconnected("subscribe", e),
            _ => BusError::rejected("subscribe", e),
        })?;
        Ok(self.map_sub(sub))
    }

    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        // Our own inbox rather than async-nats's request, so that a reply
        // sent in parts is put together.
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BusError::disconnected("subscribe to the reply inbox", e))?;
        self.publish_parts(subject, Some(&inbox), payload, &headers)
            .await?;
        let mut parts = self.reassembler();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = match tokio::time::timeout_at(deadline, replies.next()).await {
                Err(_) => return Err(BusError::Timeout(subject.to_owned())),
                Ok(None) => {
                    return Err(BusError::disconnected(
                        "receive a reply",
                        "the reply subscription ended",
                    ));
                }
                Ok(Some(m)) => m,
            };
            if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(BusError::NoResponders(subject.to_owned()));
            }
            if let Some(reply) = parts.push(m) {
                return Ok(reply.payload);
            }
        }
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError> {
        let wanted = stream_config(spec);
        let mut existing = match self.js.get_stream(&spec.name).await {
            Ok(s) => s,
            Err(e) if stream_not_found(&e) => return self.create_stream(wanted).await,
            Err(e) => return Err(get_stream_error(&spec.name, e)),
        };
        let info = existing
            .info()
            .await
            .map_err(|e| BusError::rejected("read the stream's settings", e))?
            .clone();
        let have = &info.config;
        if have.retention != stream::RetentionPolicy::WorkQueue {
            return self.migrate_to_work_queue(info, wanted).await;
        }
        if have.max_bytes != wanted.max_bytes
            || have.max_age != wanted.max_age
            || have.discard != wanted.discard
        {
            self.js
                .update_stream(wanted)
                .await
                .map_err(|e| BusError::rejected("update the stream's limits", e))?;
        }
        Ok(())
    }

    async fn stream_state(&self, name: &str) -> Result<StreamState, BusError> {
        let info = self.stream_info(name).await?;
        Ok(StreamState {
            messages: info.state.messages,
            bytes: info.state.bytes,
            max_bytes: u64::try_from(info.config.max_bytes).unwrap_or(0),
        })
    }

    async fn persist(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        msg_id: &str,
    ) -> Result<(), BusError> {
        let bytes = payload.len();
        let mut msg = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(msg_id);
        for (k, v) in &headers {
            msg = msg.header(k.as_str(), v.as_str());
        }
        let publish_error = |e: jetstream::context::PublishError| {
            use jetstream::context::PublishErrorKind as K;
            match e.kind() {
                K::StreamNotFound => BusError::NoStream(subject.to_owned()),
                K::TimedOut => BusError::Timeout(subject.to_owned()),
                K::BrokenPipe => BusError::disconnected("persist", e),
                K::MaxPayloadExceeded => BusError::TooLarge {
                    subject: subject.to_owned(),
                    bytes,
                },
                _ if is_stream_full(&e) => BusError::StreamFull(subject.to_owned()),
                _ => BusError::rejected("persist", e),
            }
        };
        let ack = self
            .js
            .send_publish(subject.to_owned(), msg)
            .await
            .map_err(publish_error)?;
        ack.await.map_err(publish_error)?;
        Ok(())
    }

    async fn consume(&self, stream: &str, durable: &str) -> Result<Deliveries, BusError> {
        let name = stream;
        let stream = self
            .js
            .get_stream(name)
            .await
            .map_err(|e| get_stream_error(name, e))?;
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
            .map_err(|e| BusError::rejected("create the durable consumer", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::rejected("consume the stream", e))?;
        Ok(Box::pin(messages.map(|m| {
            let m = m.map_err(|e| BusError::disconnected("receive from the stream", e))?;
            let redeliveries = m.info().map(|i| i.delivered.max(1) as u64 - 1).unwrap_or(0);
            let payload = m.payload.clone();
            let headers = from_header_map(m.headers.as_ref());
            Ok(Delivery::new(
                m.subject.to_string(),
                payload,
                redeliveries,
                headers,
                Box::new(NatsAcker(m)),
            ))
        })))
    }

    async fn try_lease(
        &self,
        lease: &LeaseKey,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        let key = lease.key();
        let kv = self.lease_bucket(lease.bucket(), ttl).await?;
        let value = Bytes::copy_from_slice(holder.as_bytes());
        let entry = kv
            .entry(key)
            .await
            .map_err(|e| BusError::rejected("read the lease", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                if e.value.as_ref() != holder.as_bytes() {
                    return Ok(false);
                }
                Ok(kv.update(key, value, e.revision).await.is_ok())
            }
            _ => Ok(kv.create(key, value).await.is_ok()),
        }
    }

    async fn release_lease(&self, lease: &LeaseKey, holder: &str) -> Result<(), BusError> {
        let key = lease.key();
        let kv = self
            .js
            .get_key_value(lease.bucket())
            .await
            .map_err(|e| BusError::rejected("open the lease bucket", e))?;
        let entry = kv
            .entry(key)
            .await
            .map_err(|e| BusError::rejected("read the lease", e))?;
        match entry {
            // Only our own lease, and only the revision we read: a
            // replica that took it over in between keeps it.
            Some(e)
                if e.operation == kv::Operation::Put && e.value.as_ref() == holder.as_bytes() =>
            {
                kv.delete_expect_revision(key, Some(e.revision))
                    .await
                    .map_err(|e| BusError::rejected("release the lease", e))
            }
            _ => Ok(()),
        }
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn flush(&self) -> Result<(), BusError> {
        let round_trip = async {
            self.client
                .flush()
                .await
                .map_err(|e| BusError::disconnected("flush", e))?;
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
                Err(e) => Err(BusError::disconnected("flush", e)),
            }
        };
        // While disconnected, async-nats holds a flush until it reconnects:
        // a draining service must not wait for that.
        tokio::time::timeout(FLUSH_TIMEOUT, round_trip)
            .await
            .unwrap_or_else(|_| Err(BusError::Timeout("flush".to_owned())))
    }
}

impl NatsBus {
    /// Creates the stream (or finds it made by another replica meanwhile).
    async fn create_stream(&self, config: stream::Config) -> Result<(), BusError> {
        let name = config.name.clone();
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::CreateStreamErrorKind::TimedOut => BusError::Timeout(name),
                _ => BusError::rejected("create the stream", e),
            })?;
        Ok(())
    }

    /// Replaces a stream made with another retention (limits, by versions
    /// before the work queue) by a work queue, when that loses nothing:
    /// JetStream cannot change a stream's retention to or from work queue
    /// in place.
    ///
    /// The old stream is closed to new messages first (its subjects are
    /// moved aside, so publishers get "no stream" and retry). Then, if its
    /// consumers acknowledge everything in it within
    /// [`MIGRATION_DRAIN_WAIT`], it is deleted and the work queue created; otherwise its settings are restored and
    /// this refuses, naming how many messages are not yet stored: the
    /// recorder drains them and a later attempt (the recorder's periodic
    /// stream check, or the next gateway start) migrates.
    async fn migrate_to_work_queue(
        &self,
        old: stream::Info,
        wanted: stream::Config,
    ) -> Result<(), BusError> {
        let name = wanted.name.clone();
        let mut closed = old.config.clone();
        closed.subjects = vec![format!("_pingapp_retiring.{name}")];
        self.js
            .update_stream(closed)
            .await
            .map_err(|e| BusError::rejected("close the old stream to new messages", e))?;
        // Closed, the stream only shrinks: give the recorder a moment to
        // acknowledge the batch in hand.
        let deadline = Instant::now() + MIGRATION_DRAIN_WAIT;
        let unstored = loop {
            match self.unstored(&name).await {
                Ok(n) if n > 0 && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(n) => break n,
                Err(e) => {
                    self.restore(old.config).await;
                    return Err(e);
                }
            }
        };
        if unstored > 0 {
            self.restore(old.config).await;
            tracing::warn!(
                stream = %name,
                unstored,
                "the sample stream still has limits retention and holds messages not yet \
                 stored; it becomes a work queue once the recorder has stored them"
            );
            return Err(BusError::rejected(
                "replace the limits-retention stream by a work queue",
                format!("{unstored} messages of {name} are not yet stored; start the recorder"),
            ));
        }
        // Another replica may have migrated it meanwhile: never delete a
        // work queue.
        let current = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| get_stream_error(&name, e))?;
        if current.cached_info().config.retention == stream::RetentionPolicy::WorkQueue {
            return Ok(());
        }
        self.js
            .delete_stream(&name)
            .await
            .map_err(|e| BusError::rejected("delete the drained old stream", e))?;
        tracing::info!(stream = %name, "replaced the drained limits-retention stream by a work queue");
        self.create_stream(wanted).await
    }

    /// Messages of stream `name` that some consumer has not acknowledged
    /// yet (all of them when it has no consumer).
    async fn unstored(&self, name: &str) -> Result<u64, BusError> {
        let messages = self.stream_info(name).await?.state.messages;
        let stream = self
            .js
            .get_stream(name)
            .await
            .map_err(|e| get_stream_error(name, e))?;
        let mut consumers = stream.consumers();
        let mut any = false;
        let mut unstored = 0u64;
        while let Some(c) = consumers.next().await {
            let c = c.map_err(|e| BusError::rejected("list the stream's consumers", e))?;
            any = true;
            unstored = unstored.max(c.num_pending + c.num_ack_pending as u64);
        }
        Ok(if any { unstored } else { messages })
    }

    /// Stream `name`'s settings and state, fresh from the server.
    async fn stream_info(&self, name: &str) -> Result<stream::Info, BusError> {
        let mut stream = self
            .js
            .get_stream(name)
            .await
            .map_err(|e| get_stream_error(name, e))?;
        Ok(stream
            .info()
            .await
            .map_err(|e| BusError::rejected("read the stream's state", e))?
            .clone())
    }

    /// Puts a stream's settings back after a migration that did not happen.
    async fn restore(&self, config: stream::Config) {
        if let Err(e) = self.js.update_stream(config).await {
            tracing::error!(error = %e, "could not restore the old stream's subjects");
        }
    }
}

/// The JetStream settings of our durable stream: a file-backed work queue
/// capped in bytes, refusing new messages when full.
fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.clone(),
        subjects: vec![spec.subjects.clone()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        max_bytes: i64::try_from(spec.max_bytes)
            .ok()
            .filter(|&b| b > 0)
            .unwrap_or(-1),
        max_age: spec.max_age,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn get_stream_error(name: &str, e: jetstream::context::GetStreamError) -> BusError {
    if stream_not_found(&e) {
        return BusError::NoStream(name.to_owned());
    }
    match e.kind() {
        jetstream::context::GetStreamErrorKind::Request => {
            BusError::disconnected("look up the stream", e)
        }
        _ => BusError::rejected("look up the stream", e),
    }
}

/// Whether a publish was refused by a stream at its limits with discard
/// new (nats-server answers "maximum bytes exceeded" or "maximum messages
/// exceeded"; async-nats has no kind for it).
fn is_stream_full(e: &jetstream::context::PublishError) -> bool {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.contains("maximum bytes exceeded") || text.contains("maximum messages exceeded")
}

fn to_header_map(headers: &Headers) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in headers {
        map.insert(k.as_str(), v.as_str());
    }
    map
}

/// The reply inbox prefix of a connection named `name`:
/// `_INBOX.{name as one subject token}` (`_INBOX.presence`,
/// `_INBOX.gateway-{id}`).
pub fn inbox_prefix(name: &str) -> String {
    format!("_INBOX.{}", crate::subjects::token(name))
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads the identity in `path`: a credentials file (user JWT and seed) or
/// a bare nkey seed.
async fn with_identity(
    connect: async_nats::ConnectOptions,
    path: &Path,
) -> Result<async_nats::ConnectOptions, BusError> {
    let bad = |reason: String| BusError::BadIdentity {
        path: path.to_owned(),
        reason,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| bad(e.to_string()))?;
    match identity_kind(&text).map_err(bad)? {
        IdentityKind::Credentials => connect.credentials(&text).map_err(|e| bad(e.to_string())),
        IdentityKind::Seed => Ok(connect.nkey(text.trim().to_owned())),
    }
}

/// What a `--nats-creds` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// A NATS credentials file: a user JWT and its nkey seed.
    Credentials,
    /// A bare user nkey seed (`SU...`).
    Seed,
}

/// Tells what an identity file's `text` is.
///
/// # Errors
/// It is neither a credentials file nor a valid user nkey seed.
pub fn identity_kind(text: &str) -> Result<IdentityKind, String> {
    if text.contains("BEGIN NATS USER JWT") && text.contains("BEGIN USER NKEY SEED") {
        return Ok(IdentityKind::Credentials);
    }
    let seed = text.trim();
    if seed.starts_with("SU") && nkeys::KeyPair::from_seed(seed).is_ok() {
        return Ok(IdentityKind::Seed);
    }
    Err("neither a NATS credentials file nor a user nkey seed (SU...)".to_owned())
}

/// Puts messages sent in parts together again, within [`ChunkLimits`].
struct Reassembler {
    partial: HashMap<String, Partial>,
    limits: ChunkLimits,
    /// Payload bytes held in `partial`.
    held: usize,
    metrics: ChunkMetrics,
}

/// The parts of one message received so far.
struct Partial {
    first_seen: tokio::time::Instant,
    parts: Vec<Option<Bytes>>,
    received: usize,
    /// Payload bytes of the parts received.
    bytes: usize,
    /// Subject, reply and headers come from part 0.
    head: Option<async_nats::Message>,
}

impl Reassembler {
    fn new(limits: ChunkLimits, metrics: ChunkMetrics) -> Self {
        Self {
            partial: HashMap::new(),
            limits,
            held: 0,
            metrics,
        }
    }

    /// When the oldest incomplete message expires, if there is one.
    fn next_expiry(&self) -> Option<tokio::time::Instant> {
        self.partial
            .values()
            .map(|p| p.first_seen + self.limits.timeout)
            .min()
    }

    /// Drops the incomplete messages that are due at `now`.
    fn expire(&mut self, now: tokio::time::Instant) {
        let timeout = self.limits.timeout;
        let due: Vec<String> = self
            .partial
            .iter()
            .filter(|(_, p)| now.duration_since(p.first_seen) >= timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for id in due {
            self.drop_set(&id, "expired");
        }
    }

    /// Forgets one incomplete message, counting why.
    fn drop_set(&mut self, id: &str, reason: &'static str) {
        if let Some(p) = self.partial.remove(id) {
            self.release(p.bytes);
            self.metrics.dropped.with_label_values(&[reason]).inc();
            tracing::debug!(id, reason, bytes = p.bytes, "incomplete message dropped");
        }
    }

    fn release(&mut self, bytes: usize) {
        self.held -= bytes;
        self.metrics.held.sub(bytes as i64);
    }

    /// The oldest incomplete message other than `except`.
    fn oldest_except(&self, except: &str) -> Option<String> {
        self.partial
            .iter()
            .filter(|(k, _)| k.as_str() != except)
            .min_by_key(|(_, p)| p.first_seen)
            .map(|(k, _)| k.clone())
    }

    /// Takes one received message; returns a whole message when it is one,
    /// or when it completes one sent in parts.
    fn push(&mut self, m: async_nats::Message) -> Option<Message> {
        let Some(chunk) = m
            .headers
            .as_ref()
            .and_then(|h| h.get(CHUNK_HEADER))
            .map(|v| v.as_str().to_owned())
        else {
            return Some(to_message(m, None));
        };
        let Some((id, index, count)) = parse_chunk(&chunk) else {
            self.metrics.dropped.with_label_values(&["malformed"]).inc();
            tracing::debug!(subject = %m.subject, chunk, "malformed chunk header; dropped");
            return None;
        };
        let now = tokio::time::Instant::now();
        self.expire(now);
        if !self.partial.contains_key(id) {
            if self.partial.len() >= MAX_PARTIAL
                && let Some(oldest) = self.oldest_except(id)
            {
                self.drop_set(&oldest, "over_sets");
            }
            self.partial.insert(
                id.to_owned(),
                Partial {
                    first_seen: now,
                    parts: vec![None; count],
                    received: 0,
                    bytes: 0,
                    head: None,
                },
            );
        }
        let partial = &self.partial[id];
        if partial.parts.len() != count || partial.parts[index].is_some() {
            self.metrics.dropped.with_label_values(&["malformed"]).inc();
            tracing::debug!(id, index, count, "inconsistent chunk; dropped");
            return None;
        }
        let size = m.payload.len();
        while self.held + size > self.limits.max_bytes {
            let Some(victim) = self.oldest_except(id) else {
                self.drop_set(id, "over_bytes");
                return None;
            };
            self.drop_set(&victim, "over_bytes");
        }
        self.held += size;
        self.metrics.held.add(size as i64);
        let partial = self.partial.get_mut(id)?;
        partial.parts[index] = Some(m.payload.clone());
        partial.received += 1;
        partial.bytes += size;
        if index == 0 {
            partial.head = Some(m);
        }
        if partial.received < count {
            return None;
        }
        let partial = self.partial.remove(id)?;
        self.release(partial.bytes);
        let mut whole = bytes::BytesMut::with_capacity(partial.bytes);
        for part in partial.parts.into_iter().flatten() {
            whole.extend_from_slice(&part);
        }
        partial
            .head
            .map(|head| to_message(head, Some(whole.freeze())))
    }
}

impl Drop for Reassembler {
    fn drop(&mut self) {
        self.metrics.held.sub(self.held as i64);
    }
}

/// `ID INDEX COUNT` with `INDEX < COUNT <= MAX_CHUNKS`.
fn parse_chunk(value: &str) -> Option<(&str, usize, usize)> {
    let mut it = value.split(' ');
    let id = it.next()?;
    let index: usize = it.next()?.parse().ok()?;
    let count: usize = it.next()?.parse().ok()?;
    (it.next().is_none() && index < count && count <= MAX_CHUNKS).then_some((id, index, count))
}

/// Our message from a NATS one, with `payload` in place of its own.
fn to_message(m: async_nats::Message, payload: Option<Bytes>) -> Message {
    Message {
        subject: m.subject.to_string(),
        payload: payload.unwrap_or(m.payload),
        reply: m.reply.map(|r| r.to_string()),
        headers: from_header_map(m.headers.as_ref()),
    }
}

/// Our headers of a NATS message; NATS's own (`Nats-*`) and the chunk
/// header are left out.
fn from_header_map(map: Option<&async_nats::HeaderMap>) -> Headers {
    let Some(map) = map else {
        return Headers::new();
    };
    map.iter()
        .filter(|(k, _)| {
            let k = k.to_string();
            !k.starts_with("Nats-") && k != CHUNK_HEADER
        })
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
            .map_err(|e| BusError::disconnected("acknowledge", e))
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| BusError::disconnected("refuse (nak)", e))
    }
}
