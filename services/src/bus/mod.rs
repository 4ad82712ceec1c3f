//! The bus: the one seam between the services. Core publish/subscribe with
//! NATS subject semantics (`*` and `>` wildcards, queue groups,
//! request/reply), a durable stream for samples that must never be lost,
//! and a lease for electing one active presence replica.
//!
//! [`memory::MemoryBus`] serves the standalone binary and unit tests;
//! [`nats::NatsBus`] the distributed services. One contract test
//! (`services/tests/bus_contract.rs`) runs against both.

pub mod memory;
pub mod nats;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

/// Message headers: name and value pairs (W3C trace context travels here).
pub type Headers = Vec<(String, String)>;

/// How long the durable stream remembers a message id given to
/// [`Bus::persist`]: a retry within this window is stored only once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

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
/// delivered again.
pub type Deliveries = Pin<Box<dyn Stream<Item = Result<Delivery, BusError>> + Send>>;

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Nobody subscribes to the subject of a request.
    #[error("no responders on {0}")]
    NoResponders(String),
    /// A request got no answer in time.
    #[error("request on {0} timed out")]
    Timeout(String),
    /// Anything else: connection lost, stream missing, server error.
    #[error("{0}")]
    Other(String),
}

impl BusError {
    /// Wraps any error as [`BusError::Other`].
    pub fn other(e: impl std::fmt::Display) -> Self {
        BusError::Other(e.to_string())
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

/// A message of the durable stream.
pub struct Delivery {
    /// Its payload.
    pub payload: Bytes,
    /// How often it was delivered before (0 the first time).
    pub redeliveries: u64,
    /// Its headers (empty when it had none).
    pub headers: Headers,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery acknowledged through `acker`.
    pub fn new(payload: Bytes, redeliveries: u64, acker: Box<dyn Acker>) -> Self {
        Self {
            payload,
            redeliveries,
            headers: Headers::new(),
            acker,
        }
    }

    /// The same delivery with `headers`.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
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
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Stream name.
    pub name: String,
    /// Subjects it captures (wildcards allowed).
    pub subjects: String,
    /// Messages older than this are dropped (0: kept until consumed and
    /// limits are hit).
    pub max_age: Duration,
}

/// The bus every service talks through.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes a message to every subscriber (and one per queue group).
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError>;

    /// Subscribes to `subject`, which may hold wildcards.
    async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError>;

    /// Subscribes as a member of `queue`: each message reaches one member.
    async fn queue_subscribe(&self, subject: &str, queue: &str) -> Result<Subscription, BusError>;

    /// Sends a request and waits for the first reply.
    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BusError>;

    /// Creates the durable stream if it does not exist yet.
    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError>;

    /// Stores a message in the durable stream and returns once it is
    /// stored. `msg_id` deduplicates retries of the same message.
    async fn persist(&self, subject: &str, payload: Bytes, msg_id: &str) -> Result<(), BusError>;

    /// Consumes the durable stream through the shared durable consumer
    /// `durable`: replicas that consume with the same name share the work.
    async fn consume(&self, stream: &str, durable: &str) -> Result<Deliveries, BusError>;

    /// Takes or renews the lease `name` for `holder`. True while `holder`
    /// holds it; the lease lapses `ttl` after the last renewal.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BusError>;

    /// Gives up the lease `name` if `holder` holds it, so that another
    /// replica can take it at once instead of waiting for it to lapse.
    /// Nothing happens when another holder has it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BusError>;

    /// Like [`Bus::publish`], with headers.
    async fn publish_with_headers(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
    ) -> Result<(), BusError>;

    /// Like [`Bus::request`], with headers on the request.
    async fn request_with_headers(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        timeout: Duration,
    ) -> Result<Bytes, BusError>;

    /// Like [`Bus::persist`], with headers stored along.
    async fn persist_with_headers(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        msg_id: &str,
    ) -> Result<(), BusError>;

    /// Whether the connection to the bus is up.
    fn is_connected(&self) -> bool;

    /// Waits until the server has processed everything sent so far:
    /// publications are routed, and subscriptions made before are in place
    /// (messages published afterwards, on any connection, reach them).
    async fn flush(&self) -> Result<(), BusError>;
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
