//! The typed bus, implemented once over any [`Bus`]: each subject comes
//! with its message type, so encoding and decoding happen here and nowhere
//! else, and a reader goes from a publisher to its subscribers by following
//! the [`crate::subjects::Subjects`] method both call.
//!
//! - [`Topic<M>`]: publish/subscribe of `M`, and [`Topic::persist`] into
//!   the durable stream.
//! - [`Service<Q, R>`]: request/reply, `Q` in and `R` back.
//! - [`DurableStream<M>`]: the durable stream holding `M`, consumed as
//!   [`Delivered<M>`].
//!
//! Sending returns a builder ([`Outgoing`], [`Asking`]) that is awaited
//! as is, or after [`Outgoing::headers`] added headers: one publish per
//! kind, headers optional.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use super::{Bus, BusError, Deliveries, Delivery, Headers, StreamSpec, Subscription};

/// A message type that travels on the bus: how it becomes bytes and back.
/// The implementations live next to the types, in [`crate::messages`].
pub trait Payload: Sized + Send + 'static {
    /// The bytes sent.
    fn encode(&self) -> Bytes;

    /// The message of received bytes.
    ///
    /// # Errors
    /// The bytes are not a valid message of this type.
    fn decode(payload: &[u8]) -> Result<Self, serde_json::Error>;
}

/// The reply type of a subscription that is not a request service: nothing
/// can be sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReply {}

fn decode<M: Payload>(subject: &str, payload: &[u8]) -> Result<M, BusError> {
    M::decode(payload).map_err(|source| BusError::Decode {
        subject: subject.to_owned(),
        type_name: std::any::type_name::<M>(),
        source,
    })
}

/// A subject and the message type `M` that travels on it.
pub struct Topic<M> {
    subject: String,
    _message: PhantomData<fn() -> M>,
}

impl<M> Clone for Topic<M> {
    fn clone(&self) -> Self {
        Self::new(self.subject.clone())
    }
}

impl<M> std::fmt::Debug for Topic<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Topic<{}>({})", std::any::type_name::<M>(), self.subject)
    }
}

impl<M> Topic<M> {
    /// `M` on `subject` (which may hold wildcards for subscribing). The
    /// services get their topics from [`crate::subjects::Subjects`].
    pub fn new(subject: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            _message: PhantomData,
        }
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

impl<M: Payload> Topic<M> {
    /// Publishes `msg` to every subscriber (and one per queue group).
    pub fn publish<'a>(&'a self, bus: &'a dyn Bus, msg: &M) -> Outgoing<'a> {
        Outgoing::new(bus, &self.subject, msg.encode(), Kind::Publish)
    }

    /// Stores `msg` in the durable stream that captures this subject;
    /// `msg_id` deduplicates retries of the same message.
    pub fn persist<'a>(&'a self, bus: &'a dyn Bus, msg: &M, msg_id: &'a str) -> Outgoing<'a> {
        Outgoing::new(bus, &self.subject, msg.encode(), Kind::Persist(msg_id))
    }

    /// Subscribes: every message on the subject.
    ///
    /// # Errors
    /// The subscription could not be made.
    pub async fn subscribe(&self, bus: &dyn Bus) -> Result<Inbox<M>, BusError> {
        Ok(Inbox::new(bus.subscribe(&self.subject, None).await?))
    }

    /// Subscribes as a member of `queue`: each message reaches one member.
    ///
    /// # Errors
    /// The subscription could not be made.
    pub async fn queue_subscribe(&self, bus: &dyn Bus, queue: &str) -> Result<Inbox<M>, BusError> {
        Ok(Inbox::new(bus.subscribe(&self.subject, Some(queue)).await?))
    }
}

/// A request subject, its request type `Q` and its reply type `R`.
pub struct Service<Q, R> {
    subject: String,
    _types: PhantomData<fn() -> (Q, R)>,
}

impl<Q, R> Clone for Service<Q, R> {
    fn clone(&self) -> Self {
        Self::new(self.subject.clone())
    }
}

impl<Q, R> std::fmt::Debug for Service<Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Service<{}, {}>({})",
            std::any::type_name::<Q>(),
            std::any::type_name::<R>(),
            self.subject
        )
    }
}

impl<Q, R> Service<Q, R> {
    /// Requests `Q` on `subject`, answered with `R`.
    pub fn new(subject: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            _types: PhantomData,
        }
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

impl<Q: Payload, R: Payload> Service<Q, R> {
    /// Sends `query` and waits up to `timeout` for the reply.
    pub fn request<'a>(&'a self, bus: &'a dyn Bus, query: &Q, timeout: Duration) -> Asking<'a, R> {
        Asking {
            bus,
            subject: &self.subject,
            payload: query.encode(),
            headers: Headers::new(),
            timeout,
            _reply: PhantomData,
        }
    }

    /// Takes requests as a member of `queue` (each request reaches one
    /// member); answer each with [`Incoming::reply`].
    ///
    /// # Errors
    /// The subscription could not be made.
    pub async fn serve(&self, bus: &dyn Bus, queue: &str) -> Result<Inbox<Q, R>, BusError> {
        Ok(Inbox::new(bus.subscribe(&self.subject, Some(queue)).await?))
    }
}

/// What an [`Outgoing`] does.
enum Kind<'a> {
    Publish,
    Persist(&'a str),
    /// Answer a request that named no reply subject (the subject is the
    /// request's): fails.
    Unanswerable,
}

/// A message about to be published or persisted: await it, after adding
/// headers with [`Outgoing::headers`] if it carries any.
#[must_use = "nothing is sent until it is awaited"]
pub struct Outgoing<'a> {
    bus: &'a dyn Bus,
    subject: &'a str,
    payload: Bytes,
    headers: Headers,
    kind: Kind<'a>,
}

impl<'a> Outgoing<'a> {
    fn new(bus: &'a dyn Bus, subject: &'a str, payload: Bytes, kind: Kind<'a>) -> Self {
        Self {
            bus,
            subject,
            payload,
            headers: Headers::new(),
            kind,
        }
    }

    /// Sends `headers` along (e.g. trace context).
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }
}

impl<'a> IntoFuture for Outgoing<'a> {
    type Output = Result<(), BusError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let subject = self.subject;
            match self.kind {
                Kind::Publish => self.bus.publish(subject, self.payload, self.headers).await,
                Kind::Persist(msg_id) => {
                    self.bus
                        .persist(subject, self.payload, self.headers, msg_id)
                        .await
                }
                Kind::Unanswerable => Err(BusError::NoReplySubject(subject.to_owned())),
            }
        })
    }
}

/// A request about to be sent: await it for the decoded reply, after
/// adding headers with [`Asking::headers`] if it carries any.
#[must_use = "nothing is sent until it is awaited"]
pub struct Asking<'a, R> {
    bus: &'a dyn Bus,
    subject: &'a str,
    payload: Bytes,
    headers: Headers,
    timeout: Duration,
    _reply: PhantomData<fn() -> R>,
}

impl<R> Asking<'_, R> {
    /// Sends `headers` along (e.g. trace context).
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }
}

impl<'a, R: Payload> IntoFuture for Asking<'a, R> {
    type Output = Result<R, BusError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let reply = self
                .bus
                .request(self.subject, self.payload, self.headers, self.timeout)
                .await?;
            decode(self.subject, &reply)
        })
    }
}

/// A message received on a [`Topic`] or a request to a [`Service`] (then
/// `R` is its reply type).
#[derive(Debug)]
pub struct Incoming<M, R = NoReply> {
    /// The subject it came on.
    pub subject: String,
    /// Its headers (empty when it had none).
    pub headers: Headers,
    /// The message, or why its payload is not one
    /// ([`BusError::Decode`]): a subscriber decides what a bad message
    /// deserves (a request still gets an answer).
    pub message: Result<M, BusError>,
    /// Where the answer goes, for a request.
    reply: Option<String>,
    _reply: PhantomData<fn() -> R>,
}

impl<M: Payload, R> Incoming<M, R> {
    fn from_raw(m: super::Message) -> Self {
        Self {
            message: decode(&m.subject, &m.payload),
            subject: m.subject,
            headers: m.headers,
            reply: m.reply,
            _reply: PhantomData,
        }
    }
}

impl<M, R: Payload> Incoming<M, R> {
    /// Whether the sender waits for an answer (a request without a reply
    /// subject cannot be answered).
    pub fn wants_reply(&self) -> bool {
        self.reply.is_some()
    }

    /// Returns once the sender no longer waits for the answer, when the
    /// bus can tell ([`Bus::requester_gone`]: the in-memory bus); never
    /// for a message that is not a request, nor on NATS.
    pub async fn requester_gone(&self, bus: &dyn Bus) {
        match &self.reply {
            Some(to) => bus.requester_gone(to).await,
            None => std::future::pending().await,
        }
    }

    /// Answers the request with `answer`; fails with
    /// [`BusError::NoReplySubject`] when it named no reply subject.
    pub fn reply<'a>(&'a self, bus: &'a dyn Bus, answer: &R) -> Outgoing<'a> {
        match &self.reply {
            Some(to) => Outgoing::new(bus, to, answer.encode(), Kind::Publish),
            None => Outgoing::new(bus, &self.subject, Bytes::new(), Kind::Unanswerable),
        }
    }
}

/// The messages of a typed subscription, decoded. Dropping it unsubscribes.
pub struct Inbox<M, R = NoReply> {
    raw: Subscription,
    _types: PhantomData<fn() -> (M, R)>,
}

impl<M, R> Inbox<M, R> {
    fn new(raw: Subscription) -> Self {
        Self {
            raw,
            _types: PhantomData,
        }
    }
}

impl<M: Payload, R> Stream for Inbox<M, R> {
    type Item = Incoming<M, R>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.raw
            .as_mut()
            .poll_next(cx)
            .map(|m| m.map(Incoming::from_raw))
    }
}

/// A durable stream and the message type `M` it stores (persisted through
/// a [`Topic<M>`] whose subject it captures).
pub struct DurableStream<M> {
    name: String,
    subjects: String,
    _message: PhantomData<fn() -> M>,
}

impl<M> Clone for DurableStream<M> {
    fn clone(&self) -> Self {
        Self::new(self.name.clone(), self.subjects.clone())
    }
}

impl<M> std::fmt::Debug for DurableStream<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DurableStream<{}>({} on {})",
            std::any::type_name::<M>(),
            self.name,
            self.subjects
        )
    }
}

impl<M> DurableStream<M> {
    /// The stream `name`, capturing `subjects` (wildcards allowed).
    pub fn new(name: impl Into<String>, subjects: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            subjects: subjects.into(),
            _message: PhantomData,
        }
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subjects it captures.
    pub fn subjects(&self) -> &str {
        &self.subjects
    }

    /// Its settings, keeping messages up to `max_age` and `max_bytes`.
    pub fn spec(&self, max_age: Duration, max_bytes: u64) -> StreamSpec {
        StreamSpec {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            max_age,
            max_bytes,
        }
    }
}

impl<M: Payload> DurableStream<M> {
    /// Creates the stream if it does not exist yet, or brings an existing
    /// one to these limits, keeping messages up to `max_age` and
    /// `max_bytes` ([`Bus::ensure_stream`]).
    ///
    /// # Errors
    /// The server refused, or the bus is down.
    pub async fn ensure(
        &self,
        bus: &dyn Bus,
        max_age: Duration,
        max_bytes: u64,
    ) -> Result<(), BusError> {
        bus.ensure_stream(&self.spec(max_age, max_bytes)).await
    }

    /// What the stream holds now.
    ///
    /// # Errors
    /// The stream does not exist, or the bus is down.
    pub async fn state(&self, bus: &dyn Bus) -> Result<super::StreamState, BusError> {
        bus.stream_state(&self.name).await
    }

    /// Consumes it through the shared durable consumer `durable`.
    ///
    /// # Errors
    /// The stream does not exist, or the consumer could not be made.
    pub async fn consume(&self, bus: &dyn Bus, durable: &str) -> Result<Consumed<M>, BusError> {
        Ok(Consumed {
            raw: bus.consume(&self.name, durable).await?,
            subject: self.subjects.clone(),
            _message: PhantomData,
        })
    }
}

/// A delivery of a [`DurableStream<M>`], decoded.
pub struct Delivered<M> {
    /// The message, or why its payload is not one ([`BusError::Decode`]).
    pub message: Result<M, BusError>,
    /// The delivery itself: payload, redelivery count, headers, and its
    /// `ack` / `nak`.
    pub delivery: Delivery,
}

/// The deliveries of a typed durable consumer.
pub struct Consumed<M> {
    raw: Deliveries,
    /// The stream's subjects, naming where a bad message came from.
    subject: String,
    _message: PhantomData<fn() -> M>,
}

impl<M: Payload> Stream for Consumed<M> {
    type Item = Result<Delivered<M>, BusError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let subject = &this.subject;
        this.raw.as_mut().poll_next(cx).map(|d| {
            d.map(|d| {
                d.map(|delivery| Delivered {
                    message: decode(subject, &delivery.payload),
                    delivery,
                })
            })
        })
    }
}
