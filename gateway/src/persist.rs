//! Accepted records on their way to the durable stream: batched (by count
//! or time), published asynchronously with a bounded number of
//! acknowledgements in flight, retried until stored. While the bus is down
//! batches wait in memory, so pings keep being answered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use services::bus::SharedBus;
use services::messages::{ClientRecord, RecordBatch, SampleRecord, encode};
use tokio::sync::mpsc;
use tokio::time::Instant;
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
    pub subject: String,
    /// This gateway's id.
    pub gateway_id: String,
    /// Metric families.
    pub metrics: GatewayMetrics,
    /// How long to keep retrying after the channel closed (the drain).
    pub drain_timeout: Duration,
}

impl Batcher {
    /// Runs until the channel is closed and everything is stored (or the
    /// drain timeout passed, which is logged with the count left behind).
    pub async fn run(self, mut rx: mpsc::Receiver<RecordItem>) {
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
    let payload = encode(&batch);
    let n = batch.samples.len() as i64;
    let mut backoff = Duration::from_millis(50);
    loop {
        match this
            .bus
            .persist(&this.subject, payload.clone(), headers.clone(), &msg_id)
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
        if deadline.is_some_and(|d| Instant::now() + backoff > d) {
            tracing::error!(samples = n, batch = %msg_id, "drain timeout: sample batch not stored");
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
