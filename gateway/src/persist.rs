//! Accepted records on their way to the durable stream: batched (by count
//! or time), published asynchronously with a bounded number of
//! acknowledgements in flight, retried until stored. While the bus or the
//! stream refuses (NATS down, stream full) batches wait in memory, so
//! pings keep being answered.
//!
//! That memory is bounded in bytes (`--persist-buffer-bytes`,
//! docs/architecture.md, "Bounds"). The overflow policy is **refuse new
//! samples**: at the bound a connection's sample is not accepted (the
//! client gets the error frame `busy`, counted in
//! `pingapp_gateway_samples_refused_total`), while every record accepted
//! before stays queued until stored. A connection never waits for the
//! buffer, so its pings are answered throughout. A client's record travels
//! with its first sample (nothing is written for a client that never sends
//! one) and is taken with it, so the buffer may pass its bound by at most
//! one small record per connection.
//!
//! [`Batcher::spawn`] returns the sending side for connections
//! ([`Records`]) and a [`BatcherHandle`]; [`BatcherHandle::close`] stops
//! new records, stores what was accepted, and waits for it (the drain).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use services::bus::SharedBus;
use services::bus::topic::Topic;
use services::messages::{ClientRecord, RecordBatch, SampleRecord};
use services::retry::Backoff;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::GatewayMetrics;

/// Most samples in one batch.
pub const BATCH_MAX_SAMPLES: usize = 1000;
/// Longest a record waits for its batch to fill.
pub const BATCH_WAIT: Duration = Duration::from_millis(100);
/// Batches awaiting their acknowledgement at once.
pub const MAX_IN_FLIGHT: usize = 8;
/// Capacity of the channel from the connections to the batcher.
pub const CHANNEL_CAPACITY: usize = 65_536;
/// Default of `--persist-buffer-bytes`: 64 MiB, about 500,000 samples, a
/// minute of a NATS outage at 10,000 clients sending one sample a second.
pub const DEFAULT_BUFFER_BYTES: u64 = 64 << 20;

/// The sending side of the batcher, held by every connection: hands it
/// records within the byte bound, never waiting.
#[derive(Clone)]
pub struct Records {
    tx: mpsc::Sender<RecordItem>,
    buffer: Arc<Buffer>,
    metrics: GatewayMetrics,
}

/// A sample that was not accepted: the buffer of records not yet stored is
/// at its bound (or the gateway is draining).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the buffer of samples not yet stored is full")]
pub struct Refused;

impl Records {
    /// Accepts `sample` if the buffer has room, without waiting; the
    /// client's record, when still in `client` (its first sample), goes
    /// just before it and is taken out.
    ///
    /// # Errors
    /// [`Refused`] at the bound (counted); the sample is not recorded and
    /// `client` is left as it was.
    pub fn offer_sample(
        &self,
        sample: SampleRecord,
        client: &mut Option<ClientRecord>,
    ) -> Result<(), Refused> {
        // Two bounds, told apart in the metric: the bytes of records not
        // yet stored (`buffer_full`), and the channel to the batcher
        // (`queue_full`: the batcher task got too little CPU to keep up).
        let refused = |reason: &str| {
            self.metrics
                .samples_refused
                .with_label_values(&[reason])
                .inc();
            Refused
        };
        let sample = RecordItem::Sample(sample);
        let bytes = item_bytes(&sample);
        if !self.buffer.try_reserve(bytes) {
            return Err(refused("buffer_full"));
        }
        if let Some(record) = client.take() {
            // Always taken once its sample is: one per client.
            let item = RecordItem::Client(record);
            let client_bytes = item_bytes(&item);
            self.buffer.force_reserve(client_bytes);
            if let Err(e) = self.tx.try_send(item) {
                self.buffer.release(client_bytes + bytes);
                if let RecordItem::Client(record) = e.into_inner() {
                    *client = Some(record);
                }
                return Err(refused("queue_full"));
            }
        }
        match self.tx.try_send(sample) {
            Ok(()) => Ok(()),
            Err(_) => {
                // The channel filled between the two sends: the client
                // record went alone, which costs one row and loses nothing.
                self.buffer.release(bytes);
                Err(refused("queue_full"))
            }
        }
    }
}

/// Bytes of accepted records not yet stored, against the bound.
struct Buffer {
    max: u64,
    used: AtomicU64,
    metrics: GatewayMetrics,
}

impl Buffer {
    fn try_reserve(&self, n: u64) -> bool {
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.max).then_some(used + n)
            })
            .is_ok();
        if ok {
            self.show();
        }
        ok
    }

    fn force_reserve(&self, n: u64) {
        self.used.fetch_add(n, Ordering::AcqRel);
        self.show();
    }

    fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.show();
    }

    fn show(&self) {
        let used = self.used.load(Ordering::Acquire);
        self.metrics
            .persist_buffer_bytes
            .with_label_values(&[] as &[&str])
            .set(i64::try_from(used).unwrap_or(i64::MAX));
    }
}

/// What a record costs the buffer: its size in memory, strings included.
fn item_bytes(item: &RecordItem) -> u64 {
    let n = match item {
        RecordItem::Sample(s) => std::mem::size_of::<SampleRecord>() + s.channel_name.len(),
        RecordItem::Client(c) => {
            std::mem::size_of::<ClientRecord>()
                + c.channel_name.len()
                + c.gateway.len()
                + c.token_digest.as_ref().map_or(0, String::len)
        }
    };
    n as u64
}

/// One accepted record.
#[derive(Debug)]
pub enum RecordItem {
    /// A client, sent with its first sample (its token digest makes its
    /// history readable anywhere).
    Client(ClientRecord),
    /// A delay sample.
    Sample(SampleRecord),
}

/// Settings of the batcher.
pub struct Batcher {
    /// The bus.
    pub bus: SharedBus,
    /// Subject of this gateway's batches.
    pub topic: Topic<RecordBatch>,
    /// This gateway's id.
    pub gateway_id: String,
    /// Metric families.
    pub metrics: GatewayMetrics,
    /// How long to keep retrying after the channel closed (the drain).
    pub drain_timeout: Duration,
    /// Most bytes of accepted records not yet stored
    /// (`--persist-buffer-bytes`).
    pub buffer_bytes: u64,
}

/// Closes a running [`Batcher`].
pub struct BatcherHandle {
    close: CancellationToken,
    task: JoinHandle<()>,
    drain_timeout: Duration,
    metrics: GatewayMetrics,
}

impl BatcherHandle {
    /// Refuses new records, stores every record accepted before, and
    /// returns when all are stored or the drain timeout passed (logged with
    /// what was left behind: a store attempt in flight, e.g. waiting for an
    /// acknowledgement while NATS is down, is not waited for beyond it).
    pub async fn close(self) {
        self.close.cancel();
        let mut task = self.task;
        match tokio::time::timeout(self.drain_timeout, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the sample batcher failed"),
            Err(_) => {
                task.abort();
                let left = self
                    .metrics
                    .samples_pending
                    .with_label_values(&[] as &[&str])
                    .get();
                tracing::error!(samples = left, "drain timeout: sample batches not stored");
            }
        }
    }
}

impl Batcher {
    /// Starts the batcher; connections hand it their records through the
    /// returned [`Records`], within [`Batcher::buffer_bytes`].
    pub fn spawn(self) -> (Records, BatcherHandle) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let buffer = Arc::new(Buffer {
            max: self.buffer_bytes,
            used: AtomicU64::new(0),
            metrics: self.metrics.clone(),
        });
        self.metrics
            .persist_buffer_max_bytes
            .with_label_values(&[] as &[&str])
            .set(i64::try_from(self.buffer_bytes).unwrap_or(i64::MAX));
        let records = Records {
            tx,
            buffer: buffer.clone(),
            metrics: self.metrics.clone(),
        };
        let close = CancellationToken::new();
        let drain_timeout = self.drain_timeout;
        let metrics = self.metrics.clone();
        let task = tokio::spawn(self.run(rx, buffer, close.clone()));
        let handle = BatcherHandle {
            close,
            task,
            drain_timeout,
            metrics,
        };
        (records, handle)
    }

    /// Runs until closed (or every sender is gone) and everything is
    /// stored, or the drain timeout passed.
    async fn run(
        self,
        mut rx: mpsc::Receiver<RecordItem>,
        buffer: Arc<Buffer>,
        close: CancellationToken,
    ) {
        let this = Arc::new(self);
        let mut current_bytes = 0u64;
        let boot = services::ids::new_client_id();
        let mut counter: u64 = 0;
        let mut current = RecordBatch {
            gateway: this.gateway_id.clone(),
            ..Default::default()
        };
        let mut queue: VecDeque<Sealed> = VecDeque::new();
        let mut in_flight = FuturesUnordered::new();
        // Set when the drain starts; every batch, also those already in
        // flight, gives up retrying past it.
        let deadline: Drain = Arc::new(std::sync::OnceLock::new());
        let mut tick = tokio::time::interval(BATCH_WAIT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        let mut received = Vec::with_capacity(BATCH_MAX_SAMPLES);
        loop {
            tokio::select! {
                // Closing the receiver refuses new records; those already
                // queued still come out below.
                _ = close.cancelled(), if open && !rx.is_closed() => rx.close(),
                // Everything queued (up to a batch's worth) per wake: one
                // task keeps up with every connection of the gateway.
                n = rx.recv_many(&mut received, BATCH_MAX_SAMPLES), if open => match n {
                    1.. => {
                        let mut samples = 0;
                        for item in received.drain(..) {
                            current_bytes += item_bytes(&item);
                            match item {
                                RecordItem::Client(c) => current.clients.push(c),
                                RecordItem::Sample(s) => {
                                    current.samples.push(s);
                                    samples += 1;
                                }
                            }
                            if current.samples.len() >= BATCH_MAX_SAMPLES {
                                seal(&mut current, &mut current_bytes, &mut queue, &boot, &mut counter);
                            }
                        }
                        this.metrics.samples_pending.with_label_values(&[] as &[&str]).add(samples);
                    }
                    0 => {
                        open = false;
                        seal(&mut current, &mut current_bytes, &mut queue, &boot, &mut counter);
                        let _ = deadline.set(Instant::now() + this.drain_timeout);
                    }
                },
                _ = tick.tick() => seal(&mut current, &mut current_bytes, &mut queue, &boot, &mut counter),
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
            while in_flight.len() < MAX_IN_FLIGHT {
                let Some((id, batch, bytes)) = queue.pop_front() else {
                    break;
                };
                let (this, buffer, deadline) = (this.clone(), buffer.clone(), deadline.clone());
                in_flight.push(async move {
                    persist(this, id, batch, deadline).await;
                    // Stored (or, past the drain timeout, given up).
                    buffer.release(bytes);
                });
            }
            if !open && queue.is_empty() && in_flight.is_empty() {
                return;
            }
        }
    }
}

/// When the drain gives up on unstored batches, once it started.
type Drain = Arc<std::sync::OnceLock<Instant>>;

/// A sealed batch: its message id, the batch, and its bytes in the buffer.
type Sealed = (String, RecordBatch, u64);

fn seal(
    current: &mut RecordBatch,
    current_bytes: &mut u64,
    queue: &mut VecDeque<Sealed>,
    boot: &str,
    counter: &mut u64,
) {
    if current.is_empty() {
        return;
    }
    let batch = RecordBatch {
        gateway: current.gateway.clone(),
        clients: std::mem::take(&mut current.clients),
        samples: std::mem::take(&mut current.samples),
    };
    *counter += 1;
    // The id is stable across retries, so the stream drops duplicates.
    let id = format!("{}-{boot}-{counter}", current.gateway);
    queue.push_back((id, batch, std::mem::take(current_bytes)));
}

async fn persist(this: Arc<Batcher>, msg_id: String, batch: RecordBatch, deadline: Drain) {
    let span = tracing::info_span!(
        "gateway.persist_batch",
        batch = %msg_id,
        samples = batch.samples.len(),
        clients = batch.clients.len()
    );
    let headers = services::telemetry::context_headers(&span);
    persist_traced(this, msg_id, batch, deadline, headers)
        .instrument(span)
        .await;
}

async fn persist_traced(
    this: Arc<Batcher>,
    msg_id: String,
    batch: RecordBatch,
    deadline: Drain,
    headers: services::bus::Headers,
) {
    let n = batch.samples.len() as i64;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        match this
            .topic
            .persist(&*this.bus, &batch, &msg_id)
            .headers(headers.clone())
            .await
        {
            Ok(()) => {
                this.metrics
                    .samples_persisted
                    .with_label_values(&[] as &[&str])
                    .inc_by(n as u64);
                this.metrics
                    .samples_pending
                    .with_label_values(&[] as &[&str])
                    .sub(n);
                return;
            }
            Err(e) => {
                this.metrics
                    .persist_errors
                    .with_label_values(&[] as &[&str])
                    .inc();
                tracing::warn!(error = %e, samples = n, "could not store a sample batch; retrying");
            }
        }
        let delay = backoff.next_delay();
        if deadline.get().is_some_and(|d| Instant::now() + delay > *d) {
            tracing::error!(samples = n, batch = %msg_id, "drain timeout: sample batch not stored");
            return;
        }
        tokio::time::sleep(delay).await;
    }
}
