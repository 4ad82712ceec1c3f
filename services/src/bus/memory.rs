//! The in-memory bus of the standalone binary: same semantics as NATS within
//! one process. Subscriptions are unbounded queues (the standalone process
//! has no slow network consumer to protect against), the durable stream is
//! a queue with redelivery on `nak` that drops a message id seen within the
//! last [`DUPLICATE_WINDOW`], as JetStream does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio_stream_shim::UnboundedReceiverStream;

use super::{
    Acker, Bus, BusError, DUPLICATE_WINDOW, Deliveries, Delivery, Headers, Message, StreamSpec,
    Subscription, subject_matches,
};

/// An in-process bus. Clones share the same bus.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    subs: RwLock<Vec<Sub>>,
    next_id: AtomicU64,
    round_robin: AtomicUsize,
    streams: Mutex<HashMap<String, Arc<MemStream>>>,
    leases: Mutex<HashMap<String, (String, Instant)>>,
}

struct Sub {
    pattern: String,
    queue: Option<String>,
    tx: mpsc::UnboundedSender<Message>,
}

/// A stored message: payload, headers, times delivered before.
type Queued = (Bytes, Headers, u64);

struct MemStream {
    subjects: String,
    queue: Mutex<VecDeque<Queued>>,
    notify: Notify,
    recent_ids: Mutex<RecentIds>,
}

/// Message ids persisted within the [`DUPLICATE_WINDOW`].
#[derive(Default)]
struct RecentIds {
    ids: HashSet<String>,
    by_age: VecDeque<(Instant, String)>,
}

impl RecentIds {
    /// Remembers `id`; false if it was seen within the window.
    fn insert(&mut self, id: &str, now: Instant) -> bool {
        while let Some((at, _)) = self.by_age.front() {
            if now.duration_since(*at) < DUPLICATE_WINDOW {
                break;
            }
            if let Some((_, old)) = self.by_age.pop_front() {
                self.ids.remove(&old);
            }
        }
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.by_age.push_back((now, id.to_owned()));
        true
    }
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
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
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        self.publish_with_headers(subject, payload, Headers::new())
            .await
    }

    async fn publish_with_headers(
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

    async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        Ok(self.add_sub(subject, None))
    }

    async fn queue_subscribe(&self, subject: &str, queue: &str) -> Result<Subscription, BusError> {
        Ok(self.add_sub(subject, Some(queue)))
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
            Ok(None) => Err(BusError::Other("bus closed".into())),
            Err(_) => Err(BusError::Timeout(subject.to_owned())),
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
                })
            });
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
        let stream = self
            .inner
            .streams
            .lock()
            .expect("bus lock")
            .values()
            .find(|s| subject_matches(&s.subjects, subject))
            .cloned()
            .ok_or_else(|| BusError::Other(format!("no stream captures {subject}")))?;
        let fresh = stream
            .recent_ids
            .lock()
            .expect("bus lock")
            .insert(msg_id, Instant::now());
        if !fresh {
            // A retry of a stored message: stored, as far as the caller
            // is concerned.
            return Ok(());
        }
        stream
            .queue
            .lock()
            .expect("bus lock")
            .push_back((payload, headers, 0));
        stream.notify.notify_one();
        Ok(())
    }

    async fn consume(&self, stream: &str, _durable: &str) -> Result<Deliveries, BusError> {
        let stream = self
            .inner
            .streams
            .lock()
            .expect("bus lock")
            .get(stream)
            .cloned()
            .ok_or_else(|| BusError::Other(format!("no stream {stream}")))?;
        Ok(Box::pin(futures_util::stream::unfold(
            stream,
            |stream| async move {
                loop {
                    let next = stream.queue.lock().expect("bus lock").pop_front();
                    if let Some((payload, headers, redeliveries)) = next {
                        let acker = MemAcker {
                            stream: stream.clone(),
                            payload: payload.clone(),
                            headers: headers.clone(),
                            redeliveries,
                        };
                        let d = Delivery::new(payload, redeliveries, Box::new(acker))
                            .with_headers(headers);
                        return Some((Ok(d), stream));
                    }
                    stream.notify.notified().await;
                }
            },
        )))
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BusError> {
        let mut leases = self.inner.leases.lock().expect("bus lock");
        let now = Instant::now();
        match leases.get(name) {
            Some((h, until)) if h != holder && *until > now => Ok(false),
            _ => {
                leases.insert(name.to_owned(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BusError> {
        let mut leases = self.inner.leases.lock().expect("bus lock");
        if leases.get(name).is_some_and(|(h, _)| h == holder) {
            leases.remove(name);
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

struct MemAcker {
    stream: Arc<MemStream>,
    payload: Bytes,
    headers: Headers,
    redeliveries: u64,
}

#[async_trait]
impl Acker for MemAcker {
    async fn ack(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        let stream = self.stream.clone();
        let item = (
            self.payload.clone(),
            self.headers.clone(),
            self.redeliveries + 1,
        );
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            stream.queue.lock().expect("bus lock").push_front(item);
            stream.notify.notify_one();
        });
        Ok(())
    }
}

/// A tiny adapter from an unbounded receiver to a `Stream`, so the kit does
/// not need `tokio-stream` for one type.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_util::Stream;
    use tokio::sync::mpsc::UnboundedReceiver;

    pub struct UnboundedReceiverStream<T>(UnboundedReceiver<T>);

    impl<T> UnboundedReceiverStream<T> {
        pub fn new(rx: UnboundedReceiver<T>) -> Self {
            Self(rx)
        }
    }

    impl<T> Stream for UnboundedReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}
