//! The bus: the one seam between the services. Core publish/subscribe with
//! NATS subject semantics (`*` and `>` wildcards, queue groups,
//! request/reply), a durable stream for samples that must never be lost,
//! and leases for electing one active presence replica.
//!
//! Two layers:
//! - [`Bus`], the raw bus of bytes on string subjects, which
//!   [`memory::MemoryBus`] (standalone binary, unit tests) and
//!   [`nats::NatsBus`] (distributed services) implement. One contract test
//!   (`services/tests/bus_contract.rs`) runs against both.
//! - [`topic`], the typed layer every service uses, implemented once on top:
//!   a [`Topic`] pairs a subject with its message type, a [`Service`] a
//!   request subject with its request and reply types, a [`DurableStream`]
//!   a stream with the type it stores. [`crate::subjects::Subjects`] hands
//!   them out, so find-references on one of its methods leads from every
//!   publisher to every subscriber.

pub mod memory;
pub mod nats;
pub mod topic;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

pub use topic::{
    Asking, Consumed, Delivered, DurableStream, Inbox, Incoming, NoReply, Outgoing, Payload,
    Service, Topic,
};

/// Message headers: name and value pairs (W3C trace context travels here).
pub type Headers = Vec<(String, String)>;

/// How long the durable stream remembers a message id given to
/// [`Bus::persist`]: a retry within this window is stored only once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long a durable consumer waits for an acknowledgement before it
/// delivers the message again, unless the bus was built with another ack
/// wait ([`memory::MemoryBus::with_ack_wait`], [`nats::NatsBus::with_ack_wait`]).
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Default byte cap of the durable sample stream (`--stream-max-bytes` of
/// the gateway and the recorder): 1 GiB, half the dev overlay's 2 Gi NATS
/// volume, about ten million samples waiting for the recorder.
pub const DEFAULT_STREAM_MAX_BYTES: u64 = 1 << 30;

/// Any error underneath the bus (the NATS client's, mostly).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A message received on a subscription.
#[derive(Debug, Clone)]
pub struct Message {
    /// The subject it was published on.
    pub subject: String,
    /// Its payload.
    pub payload: Bytes,
    /// Where to send the answer, for a request.
    pub reply: Option<String>,
    /// Its headers (empty when it had none).
    pub headers: Headers,
}

/// The messages of one subscription, in publication order per publisher.
/// Dropping it unsubscribes.
pub type Subscription = Pin<Box<dyn Stream<Item = Message> + Send>>;

/// Messages of a durable consumer. Each must be acknowledged, or it is
/// delivered again after the ack wait.
pub type Deliveries = Pin<Box<dyn Stream<Item = Result<Delivery, BusError>> + Send>>;

/// What can go wrong on the bus. Every kind is its own variant, so callers
/// can tell a missing responder from a lost connection.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Nobody subscribes to the subject of a request.
    #[error("no responders on {0}")]
    NoResponders(String),
    /// A request (or a server round trip) got no answer in time.
    #[error("request on {0} timed out")]
    Timeout(String),
    /// The connection to the server failed or is closed.
    #[error("bus connection failed to {op}: {source}")]
    Disconnected {
        /// What we were doing.
        op: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The server refused an operation (a JetStream or key-value API
    /// error, an invalid subject or name).
    #[error("the server refused to {op}: {source}")]
    Rejected {
        /// What we were doing.
        op: &'static str,
        /// The server's or client's error.
        #[source]
        source: BoxError,
    },
    /// No durable stream captures the subject persisted to, or the stream
    /// consumed from does not exist.
    #[error("no stream for {0}")]
    NoStream(String),
    /// The durable stream is full (its byte cap, [`StreamSpec::max_bytes`],
    /// is reached) and refuses new messages until the recorder has stored
    /// and acknowledged some: retry later, nothing was stored.
    #[error("the stream for {0} is full")]
    StreamFull(String),
    /// A message too large to send, even in parts.
    #[error("a {bytes} byte message on {subject} is too large")]
    TooLarge {
        /// Its subject.
        subject: String,
        /// Its size.
        bytes: usize,
    },
    /// A received payload is not the message type of its subject.
    #[error("a message on {subject} is not a valid {type_name}: {source}")]
    Decode {
        /// Where it came from.
        subject: String,
        /// The expected message type.
        type_name: &'static str,
        /// Why it does not decode.
        #[source]
        source: serde_json::Error,
    },
    /// A request came without a reply subject, so it cannot be answered.
    #[error("a request on {0} has no reply subject")]
    NoReplySubject(String),
    /// A NATS identity file (`--nats-creds`) that cannot be read or is
    /// neither a credentials file nor an nkey seed.
    #[error("cannot use {path:?} as the NATS identity: {reason}")]
    BadIdentity {
        /// The file as given.
        path: std::path::PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A NATS server address that does not parse.
    #[error("{address:?} is not a NATS server address: {reason}")]
    BadAddress {
        /// The address as given.
        address: String,
        /// Why it does not parse.
        reason: String,
    },
}

impl BusError {
    /// A lost or closed connection while doing `op`.
    pub fn disconnected(op: &'static str, source: impl Into<BoxError>) -> Self {
        BusError::Disconnected {
            op,
            source: source.into(),
        }
    }

    /// The server refused `op`.
    pub fn rejected(op: &'static str, source: impl Into<BoxError>) -> Self {
        BusError::Rejected {
            op,
            source: source.into(),
        }
    }
}

/// Acknowledges one [`Delivery`].
#[async_trait]
pub trait Acker: Send + Sync {
    /// Processed: never deliver again.
    async fn ack(&self) -> Result<(), BusError>;
    /// Not processed: deliver again after `delay`.
    async fn nak(&self, delay: Duration) -> Result<(), BusError>;
}

/// A message of the durable stream. Neither acknowledged nor refused (nak)
/// within the ack wait, it is delivered again.
pub struct Delivery {
    /// The subject it was published on (e.g. `{prefix}.samples.{gateway}`:
    /// NATS's permissions decide who may publish there, so it names the
    /// publisher).
    pub subject: String,
    /// Its payload.
    pub payload: Bytes,
    /// How often it was delivered before (0 the first time).
    pub redeliveries: u64,
    /// Its headers (empty when it had none).
    pub headers: Headers,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery of a message published on `subject`, acknowledged
    /// through `acker`.
    pub fn new(
        subject: String,
        payload: Bytes,
        redeliveries: u64,
        headers: Headers,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            subject,
            payload,
            redeliveries,
            headers,
            acker,
        }
    }

    /// Marks it processed.
    ///
    /// # Errors
    /// The acknowledgement could not be sent; the message will come again.
    pub async fn ack(&self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    /// Asks for it again after `delay`.
    ///
    /// # Errors
    /// The request could not be sent; it will come again after the ack wait.
    pub async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.acker.nak(delay).await
    }
}

/// The durable stream's settings.
///
/// The stream is a work queue (docs/architecture.md, "The durable sample
/// stream"): a message leaves it when a consumer acknowledges it, so it
/// holds only what is not yet stored. It is capped at `max_bytes` and
/// discards new messages at the cap: a full stream refuses a
/// [`Bus::persist`] with [`BusError::StreamFull`] instead of growing or
/// dropping what it holds.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Stream name.
    pub name: String,
    /// Subjects it captures (wildcards allowed).
    pub subjects: String,
    /// Messages older than this are dropped even if nobody consumed them
    /// (0: no age limit).
    pub max_age: Duration,
    /// Most bytes the stream holds (messages not yet acknowledged); at the
    /// cap new messages are refused.
    pub max_bytes: u64,
}

/// What the durable stream holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    /// Messages stored and not yet acknowledged.
    pub messages: u64,
    /// Their bytes, as the stream counts them (JetStream adds subject,
    /// headers and a per-message overhead to the payload).
    pub bytes: u64,
    /// The stream's byte cap.
    pub max_bytes: u64,
}

/// A lease's name: the key-value bucket that holds it and its key there.
/// Both parts are given separately; nothing is parsed out of one string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    bucket: String,
    key: String,
}

impl LeaseKey {
    /// The lease `key` in `bucket` (NATS key-value names: letters, digits,
    /// `-` and `_` for the bucket; also `.`, `/` and `=` for the key).
    pub fn new(bucket: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            key: key.into(),
        }
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key within the bucket.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl std::fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in {}", self.key, self.bucket)
    }
}

/// The raw bus of bytes on string subjects that the in-memory and the NATS
/// bus implement. Services use the typed layer ([`Topic`], [`Service`],
/// [`DurableStream`]) on top of it.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes a message to every subscriber (and one per queue group);
    /// `headers` may be empty.
    async fn publish(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
    ) -> Result<(), BusError>;

    /// Subscribes to `subject`, which may hold wildcards; with a `queue`,
    /// as a member of that queue group: each message reaches one member.
    async fn subscribe(&self, subject: &str, queue: Option<&str>)
    -> Result<Subscription, BusError>;

    /// Sends a request (`headers` may be empty) and waits for the first
    /// reply.
    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        timeout: Duration,
    ) -> Result<Bytes, BusError>;

    /// Creates the durable stream if it does not exist yet; an existing
    /// one gets the spec's limits. A NATS stream made by an older version
    /// with limits retention is replaced by a work queue once its
    /// consumers have acknowledged everything in it; until then this
    /// refuses ([`BusError::Rejected`]) and leaves it untouched
    /// (docs/architecture.md, "The durable sample stream").
    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError>;

    /// What the durable stream `stream` holds now.
    async fn stream_state(&self, stream: &str) -> Result<StreamState, BusError>;

    /// Stores a message (with its headers) in the durable stream and
    /// returns once it is stored (a full stream refuses it with
    /// [`BusError::StreamFull`]). `msg_id` deduplicates retries of the same
    /// message.
    async fn persist(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        msg_id: &str,
    ) -> Result<(), BusError>;

    /// Consumes the durable stream through the shared durable consumer
    /// `durable`: replicas that consume with the same name share the work.
    async fn consume(&self, stream: &str, durable: &str) -> Result<Deliveries, BusError>;

    /// Takes or renews `lease` for `holder`. True while `holder` holds it;
    /// the lease lapses `ttl` after the last renewal.
    async fn try_lease(
        &self,
        lease: &LeaseKey,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, BusError>;

    /// Gives up `lease` if `holder` holds it, so that another replica can
    /// take it at once instead of waiting for it to lapse. Nothing happens
    /// when another holder has it.
    async fn release_lease(&self, lease: &LeaseKey, holder: &str) -> Result<(), BusError>;

    /// Whether the connection to the bus is up.
    fn is_connected(&self) -> bool;

    /// Waits until the server has processed everything sent so far:
    /// publications are routed, and subscriptions made before are in place
    /// (messages published afterwards, on any connection, reach them).
    async fn flush(&self) -> Result<(), BusError>;

    /// Returns once nobody waits for replies on `reply` any more (the
    /// requester gave up or was dropped), so a responder can drop work
    /// whose answer nobody would read. The in-memory bus knows (the
    /// request's reply subscription is gone); NATS cannot tell, so by
    /// default this never returns and the request's deadline bounds the
    /// work instead (docs/architecture.md, "Bounds").
    async fn requester_gone(&self, reply: &str) {
        let _ = reply;
        std::future::pending::<()>().await;
    }
}

/// A shared handle to the bus.
pub type SharedBus = Arc<dyn Bus>;

/// Whether `subject` matches `pattern` (NATS semantics: `*` is one token,
/// a final `>` one or more).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn wildcards() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("*.b.>", "x.b.c.d"));
        assert!(!subject_matches("a.b", "a.c"));
    }
}
