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
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_nats::ServerAddr;
use async_nats::jetstream::{self, AckKind, consumer::pull, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
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
/// An incomplete message older than this is dropped.
const PARTIAL_TTL: Duration = Duration::from_secs(30);

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

/// A bus over one NATS connection, which reconnects by itself.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    ack_wait: Duration,
}

impl NatsBus {
    /// Connects to `url` (a comma-separated list of servers works, see
    /// [`server_addrs`]), waiting for the first connection and retrying for
    /// ever afterwards.
    ///
    /// # Errors
    /// The URL is malformed or the first connection failed.
    pub async fn connect(url: &str, name: &str) -> Result<Self, BusError> {
        let addrs = server_addrs(url)?;
        let client = async_nats::ConnectOptions::new()
            .name(name)
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
        })
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

    fn map_sub(sub: async_nats::Subscriber) -> Subscription {
        let mut parts = Reassembler::default();
        Box::pin(sub.filter_map(move |m| parts.push(m)))
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
        Ok(Self::map_sub(sub))
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
        let mut parts = Reassembler::default();
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

/// Puts messages sent in parts together again.
#[derive(Default)]
struct Reassembler {
    partial: HashMap<String, Partial>,
}

/// The parts of one message received so far.
struct Partial {
    first_seen: Instant,
    parts: Vec<Option<Bytes>>,
    received: usize,
    /// Subject, reply and headers come from part 0.
    head: Option<async_nats::Message>,
}

impl Reassembler {
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
            tracing::debug!(subject = %m.subject, chunk, "malformed chunk header; dropped");
            return None;
        };
        let now = Instant::now();
        self.partial
            .retain(|_, p| now.duration_since(p.first_seen) < PARTIAL_TTL);
        if !self.partial.contains_key(id) && self.partial.len() >= MAX_PARTIAL {
            let oldest = self
                .partial
                .iter()
                .min_by_key(|(_, p)| p.first_seen)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                tracing::debug!(id = %oldest, "incomplete message dropped");
                self.partial.remove(&oldest);
            }
        }
        let partial = self
            .partial
            .entry(id.to_owned())
            .or_insert_with(|| Partial {
                first_seen: now,
                parts: vec![None; count],
                received: 0,
                head: None,
            });
        if partial.parts.len() != count || partial.parts[index].is_some() {
            tracing::debug!(id, index, count, "inconsistent chunk; dropped");
            return None;
        }
        partial.parts[index] = Some(m.payload.clone());
        partial.received += 1;
        if index == 0 {
            partial.head = Some(m);
        }
        if partial.received < count {
            return None;
        }
        let partial = self.partial.remove(id)?;
        let mut whole = bytes::BytesMut::new();
        for part in partial.parts.into_iter().flatten() {
            whole.extend_from_slice(&part);
        }
        partial
            .head
            .map(|head| to_message(head, Some(whole.freeze())))
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
