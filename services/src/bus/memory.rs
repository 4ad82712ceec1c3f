//! The in-memory bus of the standalone binary: same semantics as NATS within
//! one process. Subscriptions are unbounded queues (the standalone process
//! has no slow network consumer to protect against). The durable stream is
//! a work queue, as the NATS bus's JetStream stream is: it drops a message
//! id seen within the last [`DUPLICATE_WINDOW`], delivers a message again
//! after a `nak`, or when it was neither acknowledged nor refused within
//! the ack wait, forgets a message once it is acknowledged, and refuses
//! new messages ([`BusError::StreamFull`]) while it holds
//! [`StreamSpec::max_bytes`]. It counts a message's bytes as its subject,
//! header and payload lengths (JetStream adds a small per-message
//! overhead).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    Acker, Bus, BusError, DEFAULT_ACK_WAIT, DUPLICATE_WINDOW, Deliveries, Delivery, Headers,
    LeaseKey, Message, StreamSpec, StreamState, Subscription, subject_matches,
};

/// An in-process bus. Clones share the same bus; each handle has its own
/// ack wait ([`MemoryBus::with_ack_wait`]).
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
    ack_wait: Duration,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            ack_wait: DEFAULT_ACK_WAIT,
        }
    }
}

#[derive(Default)]
struct Inner {
    subs: RwLock<Vec<Sub>>,
    next_id: AtomicU64,
    round_robin: AtomicUsize,
    streams: Mutex<HashMap<String, Arc<MemStream>>>,
    leases: Mutex<HashMap<LeaseKey, (String, Instant)>>,
}

struct Sub {
    pattern: String,
    queue: Option<String>,
    tx: mpsc::UnboundedSender<Message>,
}

/// A stored message waiting for (re)delivery.
struct Queued {
    subject: String,
    payload: Bytes,
    headers: Headers,
    /// Times delivered before.
    redeliveries: u64,
    /// Its size as the stream counts it.
    size: u64,
}

struct MemStream {
    subjects: String,
    queue: Mutex<VecDeque<Queued>>,
    notify: Notify,
    /// Also held while a message is checked against the cap and stored, so
    /// that concurrent persists cannot overshoot it.
    recent_ids: Mutex<RecentIds>,
    /// Messages stored and not yet acknowledged (queued or out for
    /// delivery), and their bytes.
    messages: AtomicU64,
    bytes: AtomicU64,
    /// The byte cap (0: none); [`Bus::ensure_stream`] may change it.
    max_bytes: AtomicU64,
}

impl MemStream {
    /// Forgets an acknowledged message.
    fn remove(&self, item: &Queued) {
        self.messages.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(item.size, Ordering::Relaxed);
    }

    /// Puts a message back at the head of the queue, counting one more
    /// delivery.
    fn redeliver(&self, mut item: Queued) {
        item.redeliveries += 1;
        self.queue.lock().expect("bus lock").push_front(item);
        self.notify.notify_one();
    }
}

/// Message ids persisted within the [`DUPLICATE_WINDOW`].
#[derive(Default)]
struct RecentIds {
    ids: HashSet<String>,
    by_age: VecDeque<(Instant, String)>,
}

impl RecentIds {
    /// Whether `id` was seen within the window.
    fn seen(&mut self, id: &str, now: Instant) -> bool {
        while let Some((at, _)) = self.by_age.front() {
            if now.duration_since(*at) < DUPLICATE_WINDOW {
                break;
            }
            if let Some((_, old)) = self.by_age.pop_front() {
                self.ids.remove(&old);
            }
        }
        self.ids.contains(id)
    }

    /// Remembers `id` as seen `now`.
    fn insert(&mut self, id: &str, now: Instant) {
        if self.ids.insert(id.to_owned()) {
            self.by_age.push_back((now, id.to_owned()));
        }
    }
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same bus, whose consumers deliver a message again `ack_wait`
    /// after it went out neither acknowledged nor refused (e.g. the
    /// consumer dropped it mid-batch): the meaning of NATS's ack wait.
    /// Applies to the consumers this handle (and its clones) create.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    fn add_sub(&self, subject: &str, queue: Option<&str>) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.subs.write().expect("bus lock").push(Sub {
            pattern: subject.to_owned(),
            queue: queue.map(str::to_owned),
            tx,
        });
        Box::pin(UnboundedReceiverStream::new(rx))
    }

    fn deliver(&self, msg: Message) -> bool {
        let mut delivered = false;
        let mut stale = false;
        {
            let subs = self.inner.subs.read().expect("bus lock");
            let mut groups: HashMap<&str, Vec<&Sub>> = HashMap::new();
            for sub in subs.iter() {
                if sub.tx.is_closed() {
                    stale = true;
                    continue;
                }
                if !subject_matches(&sub.pattern, &msg.subject) {
                    continue;
                }
                match &sub.queue {
                    Some(q) => groups.entry(q.as_str()).or_default().push(sub),
                    None => delivered |= sub.tx.send(msg.clone()).is_ok(),
                }
            }
            for members in groups.values() {
                let i = self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % members.len();
                delivered |= members[i].tx.send(msg.clone()).is_ok();
            }
        }
        if stale {
            self.inner
                .subs
                .write()
                .expect("bus lock")
                .retain(|s| !s.tx.is_closed());
        }
        delivered
    }

    fn stream(&self, name: &str) -> Option<Arc<MemStream>> {
        self.inner
            .streams
            .lock()
            .expect("bus lock")
            .get(name)
            .cloned()
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
    ) -> Result<(), BusError> {
        self.deliver(Message {
            subject: subject.to_owned(),
            payload,
            reply: None,
            headers,
        });
        Ok(())
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue: Option<&str>,
    ) -> Result<Subscription, BusError> {
        Ok(self.add_sub(subject, queue))
    }

    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        let inbox = format!(
            "_INBOX.mem.{}",
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut replies = self.add_sub(&inbox, None);
        let delivered = self.deliver(Message {
            subject: subject.to_owned(),
            payload,
            reply: Some(inbox),
            headers,
        });
        if !delivered {
            return Err(BusError::NoResponders(subject.to_owned()));
        }
        match tokio::time::timeout(timeout, replies.next()).await {
            Ok(Some(m)) => Ok(m.payload),
            Ok(None) => Err(BusError::disconnected(
                "receive a reply",
                "the reply subscription ended",
            )),
            Err(_) => Err(BusError::Timeout(subject.to_owned())),
        }
    }

    async fn requester_gone(&self, reply: &str) {
        // The request's own inbox: one plain subscription on that subject.
        let waiting = self
            .inner
            .subs
            .read()
            .expect("bus lock")
            .iter()
            .find(|s| s.queue.is_none() && s.pattern == reply)
            .map(|s| s.tx.clone());
        if let Some(tx) = waiting {
            tx.closed().await;
        }
    }

    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), BusError> {
        self.inner
            .streams
            .lock()
            .expect("bus lock")
            .entry(spec.name.clone())
            .or_insert_with(|| {
                Arc::new(MemStream {
                    subjects: spec.subjects.clone(),
                    queue: Mutex::new(VecDeque::new()),
                    notify: Notify::new(),
                    recent_ids: Mutex::new(RecentIds::default()),
                    messages: AtomicU64::new(0),
                    bytes: AtomicU64::new(0),
                    max_bytes: AtomicU64::new(spec.max_bytes),
                })
            })
            .max_bytes
            .store(spec.max_bytes, Ordering::Relaxed);
        Ok(())
    }

    async fn stream_state(&self, stream: &str) -> Result<StreamState, BusError> {
        let s = self
            .stream(stream)
            .ok_or_else(|| BusError::NoStream(stream.to_owned()))?;
        Ok(StreamState {
            messages: s.messages.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            max_bytes: s.max_bytes.load(Ordering::Relaxed),
        })
    }

    async fn persist(
        &self,
        subject: &str,
        payload: Bytes,
        headers: Headers,
        msg_id: &str,
    ) -> Result<(), BusError> {
        let stream = self
            .inner
            .streams
            .lock()
            .expect("bus lock")
            .values()
            .find(|s| subject_matches(&s.subjects, subject))
            .cloned()
            .ok_or_else(|| BusError::NoStream(subject.to_owned()))?;
        let size = (subject.len()
            + payload.len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()) as u64;
        let now = Instant::now();
        let mut recent = stream.recent_ids.lock().expect("bus lock");
        if recent.seen(msg_id, now) {
            // A retry of a stored message: stored, as far as the caller
            // is concerned.
            return Ok(());
        }
        let max = stream.max_bytes.load(Ordering::Relaxed);
        if max > 0 && stream.bytes.load(Ordering::Relaxed) + size > max {
            // Discard new: the id is not remembered, so a retry once there
            // is room is stored.
            return Err(BusError::StreamFull(subject.to_owned()));
        }
        recent.insert(msg_id, now);
        stream.messages.fetch_add(1, Ordering::Relaxed);
        stream.bytes.fetch_add(size, Ordering::Relaxed);
        drop(recent);
        stream.queue.lock().expect("bus lock").push_back(Queued {
            subject: subject.to_owned(),
            payload,
            headers,
            redeliveries: 0,
            size,
        });
        stream.notify.notify_one();
        Ok(())
    }

    async fn consume(&self, stream: &str, _durable: &str) -> Result<Deliveries, BusError> {
        let stream = self
            .stream(stream)
            .ok_or_else(|| BusError::NoStream(stream.to_owned()))?;
        let ack_wait = self.ack_wait;
        Ok(Box::pin(futures_util::stream::unfold(
            stream,
            move |stream| async move {
                loop {
                    let next = stream.queue.lock().expect("bus lock").pop_front();
                    if let Some(item) = next {
                        let d = MemAcker::deliver(&stream, item, ack_wait);
                        return Some((Ok(d), stream));
                    }
                    stream.notify.notified().await;
                }
            },
        )))
    }

    async fn try_lease(
        &self,
        lease: &LeaseKey,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        let mut leases = self.inner.leases.lock().expect("bus lock");
        let now = Instant::now();
        match leases.get(lease) {
            Some((h, until)) if h != holder && *until > now => Ok(false),
            _ => {
                leases.insert(lease.clone(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release_lease(&self, lease: &LeaseKey, holder: &str) -> Result<(), BusError> {
        let mut leases = self.inner.leases.lock().expect("bus lock");
        if leases.get(lease).is_some_and(|(h, _)| h == holder) {
            leases.remove(lease);
        }
        Ok(())
    }

    fn is_connected(&self) -> bool {
        true
    }

    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }
}

/// One delivery out of a [`MemStream`]: holds the message until the first
/// of ack, nak or the ack wait decides its fate.
struct MemAcker {
    stream: Arc<MemStream>,
    /// The message while its fate is open; taken by whoever decides it.
    pending: Arc<Mutex<Option<Queued>>>,
}

impl MemAcker {
    /// Hands `item` out as a delivery, and puts it back in the queue if
    /// neither ack nor nak came within `ack_wait`.
    fn deliver(stream: &Arc<MemStream>, item: Queued, ack_wait: Duration) -> Delivery {
        let (subject, payload, headers, redeliveries) = (
            item.subject.clone(),
            item.payload.clone(),
            item.headers.clone(),
            item.redeliveries,
        );
        let pending = Arc::new(Mutex::new(Some(item)));
        // The timer holds the message too, so a delivery dropped undecided
        // (a consumer that died mid-batch) still comes again.
        let (s, p) = (stream.clone(), pending.clone());
        tokio::spawn(async move {
            tokio::time::sleep(ack_wait).await;
            let expired = p.lock().expect("bus lock").take();
            if let Some(item) = expired {
                s.redeliver(item);
            }
        });
        let acker = MemAcker {
            stream: stream.clone(),
            pending,
        };
        Delivery::new(subject, payload, redeliveries, headers, Box::new(acker))
    }

    fn take(&self) -> Option<Queued> {
        self.pending.lock().expect("bus lock").take()
    }
}

#[async_trait]
impl Acker for MemAcker {
    async fn ack(&self) -> Result<(), BusError> {
        // Acknowledging after the ack wait passed is accepted, as JetStream
        // does; the copy delivered again still comes (and stays stored
        // until it is acknowledged).
        if let Some(item) = self.take() {
            self.stream.remove(&item);
        }
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        if let Some(item) = self.take() {
            let stream = self.stream.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                stream.redeliver(item);
            });
        }
        Ok(())
    }
}
