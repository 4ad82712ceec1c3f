//! Accepted records on their way to the durable stream: batched (by count
//! or time), published asynchronously with a bounded number of
//! acknowledgements in flight, retried until stored. While the bus is down
//! batches wait in memory, so pings keep being answered.
//!
//! [`Batcher::spawn`] returns the sending side for connections and a
//! [`BatcherHandle`]; [`BatcherHandle::close`] stops new records, stores
//! what was accepted, and waits for it (the drain).

use std::collections::VecDeque;
use std::sync::Arc;
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

/// One accepted record.
#[derive(Debug)]
pub enum RecordItem {
    /// A new client (its token digest makes its history readable anywhere).
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
    /// Starts the batcher; connections send their records on the returned
    /// sender (bounded: a sender waits while [`CHANNEL_CAPACITY`] records
    /// are queued).
    pub fn spawn(self) -> (mpsc::Sender<RecordItem>, BatcherHandle) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let close = CancellationToken::new();
        let drain_timeout = self.drain_timeout;
        let metrics = self.metrics.clone();
        let task = tokio::spawn(self.run(rx, close.clone()));
        let handle = BatcherHandle {
            close,
            task,
            drain_timeout,
            metrics,
        };
        (tx, handle)
    }

    /// Runs until closed (or every sender is gone) and everything is
    /// stored, or the drain timeout passed.
    async fn run(self, mut rx: mpsc::Receiver<RecordItem>, close: CancellationToken) {
        let this = Arc::new(self);
        let boot = services::ids::new_client_id();
        let mut counter: u64 = 0;
        let mut current = RecordBatch {
            gateway: this.gateway_id.clone(),
            ..Default::default()
        };
        let mut queue: VecDeque<(String, RecordBatch)> = VecDeque::new();
        let mut in_flight = FuturesUnordered::new();
        let mut deadline: Option<Instant> = None;
        let mut tick = tokio::time::interval(BATCH_WAIT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        loop {
            tokio::select! {
                // Closing the receiver refuses new records; those already
                // queued still come out below.
                _ = close.cancelled(), if open && !rx.is_closed() => rx.close(),
                item = rx.recv(), if open => match item {
                    Some(RecordItem::Client(c)) => current.clients.push(c),
                    Some(RecordItem::Sample(s)) => {
                        current.samples.push(s);
                        this.metrics.samples_pending.with_label_values(&[] as &[&str]).inc();
                        if current.samples.len() >= BATCH_MAX_SAMPLES {
                            seal(&mut current, &mut queue, &boot, &mut counter);
                        }
                    }
                    None => {
                        open = false;
                        seal(&mut current, &mut queue, &boot, &mut counter);
                        deadline = Some(Instant::now() + this.drain_timeout);
                    }
                },
                _ = tick.tick() => seal(&mut current, &mut queue, &boot, &mut counter),
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
            while in_flight.len() < MAX_IN_FLIGHT {
                let Some((id, batch)) = queue.pop_front() else {
                    break;
                };
                in_flight.push(persist(this.clone(), id, batch, deadline));
            }
            if !open && queue.is_empty() && in_flight.is_empty() {
                return;
            }
        }
    }
}

fn seal(
    current: &mut RecordBatch,
    queue: &mut VecDeque<(String, RecordBatch)>,
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
    queue.push_back((id, batch));
}

async fn persist(
    this: Arc<Batcher>,
    msg_id: String,
    batch: RecordBatch,
    deadline: Option<Instant>,
) {
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
    deadline: Option<Instant>,
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
        if deadline.is_some_and(|d| Instant::now() + delay > d) {
            tracing::error!(samples = n, batch = %msg_id, "drain timeout: sample batch not stored");
            return;
        }
        tokio::time::sleep(delay).await;
    }
}
