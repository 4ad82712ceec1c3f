//! The consume loop: deliveries of the durable sample stream become store
//! inserts, and are acknowledged only once their insert has committed.
//!
//! # Batching and commits
//! Deliveries (`Delivered<RecordBatch>`) are gathered until `batch_max_samples` samples or
//! `batch_wait` after the first one, then inserted in one store call while
//! the next batch is gathered; at most [`INSERTS_IN_FLIGHT`] batches commit
//! at once. Each batch's deliveries are acknowledged after its own commit
//! (JetStream acknowledges messages one by one, so commits may finish in any
//! order).
//!
//! # When the database is down
//! A failing batch is retried in this process with exponential backoff and
//! full jitter ([`services::retry`]: 100 ms, the cap doubling to 5 s), so
//! replicas do not retry in lockstep; its deliveries unacknowledged; once
//! [`INSERTS_IN_FLIGHT`] batches are failing no new delivery is taken. We
//! chose this over `nak` with a delay because it pulls nothing more into
//! memory and does not churn every message of the stream through
//! deliver-fail-nak cycles during an outage. If the outage outlasts the
//! consumer's ack wait (30 s by default, `--ack-wait-ms`), JetStream hands
//! the same messages out again (to this or another replica); the inserts
//! are idempotent, so that only shows up in `duplicates_total`. On shutdown during an outage the held
//! deliveries are `nak`ed so another replica takes them at once. Nothing is
//! lost either way: a delivery leaves the stream only through an ack after
//! its commit.
//!
//! # Poison messages
//! A payload that is not a record batch is logged, counted and acknowledged
//! at once. A batch that the database refuses for its data (a permanent
//! error, [`crate::store::StoreError::is_permanent`]) is retried alone, one
//! delivery at a time, so only the offending delivery is dropped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use services::bus::{BusError, Consumed, Delivered, Delivery, DurableStream, SharedBus};
use services::messages::RecordBatch;
use services::retry::Backoff;
use services::subjects::Subjects;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::DbHealth;
use crate::metrics::Metrics;
use crate::store::{InsertOutcome, Store, StoreError};

/// First retry delay of a failed insert.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Batches committing at once. Two keep the database busy while the next
/// batch is gathered and hide a round trip's network stalls (sqlx 0.9.0
/// does not set `TCP_NODELAY`, so a large insert can wait 40 ms on a delayed
/// ACK).
const INSERTS_IN_FLIGHT: usize = 2;
/// Consecutive stream errors after which the consumer is opened again.
const MAX_STREAM_ERRORS: u32 = 10;

/// Consumes the durable stream into the store.
pub(crate) struct Consumer {
    pub bus: SharedBus,
    /// Where each gateway publishes its batches.
    pub subjects: Subjects,
    pub stream: DurableStream<RecordBatch>,
    pub durable: String,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<DbHealth>,
    pub batch_max_samples: usize,
    pub batch_wait: Duration,
}

/// Consumed<RecordBatch> gathered for one insert, with their decoded batches.
#[derive(Default)]
struct Gathered {
    deliveries: Vec<Delivery>,
    batches: Vec<RecordBatch>,
    samples: usize,
    /// One span per delivery, child of the gateway's span that persisted it
    /// (trace context from the message headers); ends after the ack.
    spans: Vec<tracing::Span>,
}

enum Commit {
    Done(InsertOutcome),
    Rejected(StoreError),
    Shutdown,
}

impl Consumer {
    /// Runs until `shutdown`; then finishes the batches in hand and
    /// returns. Up to [`INSERTS_IN_FLIGHT`] batches commit at once while the
    /// next one is gathered.
    pub async fn run(
        self: Arc<Self>,
        mut deliveries: Consumed<RecordBatch>,
        shutdown: CancellationToken,
    ) {
        let mut in_flight = JoinSet::new();
        let mut stream_errors = 0u32;
        loop {
            let (batch, stopping) = self
                .gather(&mut deliveries, &shutdown, &mut stream_errors)
                .await;
            if !batch.deliveries.is_empty() {
                let (this, shutdown) = (self.clone(), shutdown.clone());
                in_flight.spawn(async move { this.commit(batch, &shutdown).await });
            }
            if stopping || shutdown.is_cancelled() {
                break;
            }
            while let Some(done) = in_flight.try_join_next() {
                log_panic(done);
            }
            while in_flight.len() >= INSERTS_IN_FLIGHT {
                if let Some(done) = in_flight.join_next().await {
                    log_panic(done);
                }
            }
        }
        while let Some(done) = in_flight.join_next().await {
            log_panic(done);
        }
        tracing::info!("sample consumer stopped");
    }

    /// Gathers deliveries until the batch holds `batch_max_samples` samples,
    /// `batch_wait` has passed since its first delivery, or shutdown starts
    /// (then the flag is true).
    async fn gather(
        &self,
        deliveries: &mut Consumed<RecordBatch>,
        shutdown: &CancellationToken,
        stream_errors: &mut u32,
    ) -> (Gathered, bool) {
        let mut batch = Gathered::default();
        let mut deadline: Option<Instant> = None;
        while batch.samples < self.batch_max_samples.max(1) {
            let wait = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => return (batch, true),
                () = wait => break,
                next = deliveries.next() => next,
            };
            match next {
                Some(Ok(d)) => {
                    *stream_errors = 0;
                    self.accept(d, &mut batch).await;
                    if !batch.deliveries.is_empty() && deadline.is_none() {
                        deadline = Some(Instant::now() + self.batch_wait);
                    }
                }
                Some(Err(e)) => {
                    *stream_errors += 1;
                    tracing::warn!(error = %e, "error on the sample stream");
                    if *stream_errors < MAX_STREAM_ERRORS {
                        tokio::time::sleep(INITIAL_BACKOFF).await;
                        continue;
                    }
                    *stream_errors = 0;
                    match self.reconsume(shutdown).await {
                        Some(d) => *deliveries = d,
                        None => return (batch, true),
                    }
                }
                None => {
                    tracing::warn!("the sample stream ended; consuming again");
                    match self.reconsume(shutdown).await {
                        Some(d) => *deliveries = d,
                        None => return (batch, true),
                    }
                }
            }
        }
        (batch, false)
    }

    /// Takes one delivery into the batch, or drops it if it is not a batch.
    async fn accept(&self, delivered: Delivered<RecordBatch>, batch: &mut Gathered) {
        let Delivered {
            message,
            delivery: d,
        } = delivered;
        self.metrics.consumer_pending.inc();
        if d.redeliveries > 0 {
            self.metrics.redeliveries.inc();
        }
        match message {
            Ok(b) if d.subject != self.subjects.samples(&b.gateway).subject() => {
                // NATS lets a gateway publish on its own samples subject
                // only: a batch naming another gateway is forged.
                tracing::warn!(
                    subject = %d.subject,
                    gateway = %b.gateway,
                    samples = b.samples.len(),
                    "dropping a record batch that names another gateway than its subject"
                );
                self.metrics
                    .foreign
                    .with_label_values(&["batch"])
                    .inc_by(b.samples.len() as u64);
                self.ack(std::slice::from_ref(&d)).await;
            }
            Ok(b) => {
                let span = tracing::info_span!(
                    "recorder.record_batch",
                    gateway = %b.gateway,
                    samples = b.samples.len()
                );
                services::telemetry::set_parent_from(&span, &d.headers);
                batch.spans.push(span);
                batch.samples += b.samples.len();
                batch.batches.push(b);
                batch.deliveries.push(d);
            }
            Err(e) => {
                tracing::warn!(error = %e, bytes = d.payload.len(), "dropping an undecodable stream message");
                self.metrics.undecodable.inc();
                self.ack(std::slice::from_ref(&d)).await;
            }
        }
    }

    /// Inserts the batch and acknowledges its deliveries after the commit.
    async fn commit(&self, batch: Gathered, shutdown: &CancellationToken) {
        let span = tracing::info_span!(
            parent: batch.spans.first().and_then(|s| s.id()),
            "recorder.insert",
            batches = batch.batches.len(),
            samples = batch.samples
        );
        for other in batch.spans.iter().skip(1) {
            span.follows_from(other);
        }
        self.commit_traced(batch, shutdown).instrument(span).await;
    }

    async fn commit_traced(&self, batch: Gathered, shutdown: &CancellationToken) {
        match self.insert_retrying(&batch.batches, shutdown).await {
            Commit::Done(outcome) => {
                self.record(outcome, batch.batches.len(), batch.samples);
                self.ack(&batch.deliveries).await;
            }
            Commit::Shutdown => self.nak(&batch.deliveries).await,
            Commit::Rejected(e) if batch.batches.len() == 1 => {
                self.reject(&e, &batch.deliveries[0]).await;
            }
            Commit::Rejected(e) => {
                tracing::warn!(error = %e, "the database refused a batch; inserting its messages one by one");
                let mut items = batch.deliveries.iter().zip(&batch.batches);
                while let Some((d, b)) = items.next() {
                    match self
                        .insert_retrying(std::slice::from_ref(b), shutdown)
                        .await
                    {
                        Commit::Done(outcome) => {
                            self.record(outcome, 1, b.samples.len());
                            self.ack(std::slice::from_ref(d)).await;
                        }
                        Commit::Rejected(e) => self.reject(&e, d).await,
                        Commit::Shutdown => {
                            let rest: Vec<&Delivery> =
                                std::iter::once(d).chain(items.map(|(d, _)| d)).collect();
                            join_all(rest.iter().map(|d| d.nak(Duration::ZERO))).await;
                            self.metrics.consumer_pending.sub(rest.len() as i64);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Inserts, retrying transient failures with backoff until they pass or
    /// shutdown starts.
    async fn insert_retrying(
        &self,
        batches: &[RecordBatch],
        shutdown: &CancellationToken,
    ) -> Commit {
        let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
        loop {
            let started = Instant::now();
            match self.store.insert(batches).await {
                Ok(outcome) => {
                    self.metrics
                        .insert_duration
                        .observe(started.elapsed().as_secs_f64());
                    self.health.set_inserts_failing(false);
                    return Commit::Done(outcome);
                }
                Err(e) if e.is_permanent() => {
                    self.metrics.database_errors.inc();
                    return Commit::Rejected(e);
                }
                Err(e) => {
                    self.metrics.database_errors.inc();
                    self.health.set_inserts_failing(true);
                    tracing::warn!(error = %e, "insert failed; retrying the same batch");
                    if !backoff.wait(shutdown).await {
                        return Commit::Shutdown;
                    }
                }
            }
        }
    }

    fn record(&self, outcome: InsertOutcome, batches: usize, samples: usize) {
        let m = &self.metrics;
        m.samples_persisted.inc_by(outcome.inserted);
        m.duplicates.inc_by(outcome.duplicates);
        if outcome.foreign_samples + outcome.foreign_clients > 0 {
            tracing::warn!(
                samples = outcome.foreign_samples,
                clients = outcome.foreign_clients,
                "refused records that speak for another gateway's clients"
            );
            m.foreign
                .with_label_values(&["sample"])
                .inc_by(outcome.foreign_samples);
            m.foreign
                .with_label_values(&["client"])
                .inc_by(outcome.foreign_clients);
        }
        m.batches.inc_by(batches as u64);
        m.batch_size.observe(samples as f64);
    }

    async fn reject(&self, e: &StoreError, d: &Delivery) {
        tracing::error!(error = %e, bytes = d.payload.len(), "the database refused a record batch; dropping it");
        self.metrics.rejected.inc();
        self.ack(std::slice::from_ref(d)).await;
    }

    async fn ack(&self, deliveries: &[Delivery]) {
        let results = join_all(deliveries.iter().map(Delivery::ack)).await;
        self.metrics.consumer_pending.sub(deliveries.len() as i64);
        let failed = results.iter().filter(|r| r.is_err()).count();
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            // The messages come again and are counted as duplicates.
            tracing::warn!(error = %e, failed, "acknowledgements failed");
        }
    }

    async fn nak(&self, deliveries: &[Delivery]) {
        join_all(deliveries.iter().map(|d| d.nak(Duration::ZERO))).await;
        self.metrics.consumer_pending.sub(deliveries.len() as i64);
        tracing::info!(
            count = deliveries.len(),
            "handed uncommitted deliveries back to the stream"
        );
    }

    /// Opens the consumer again, retrying until it works or shutdown starts.
    async fn reconsume(&self, shutdown: &CancellationToken) -> Option<Consumed<RecordBatch>> {
        let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
        loop {
            match self.stream.consume(&*self.bus, &self.durable).await {
                Ok(d) => return Some(d),
                Err(e) => {
                    log_bus_error(&e);
                    if !backoff.wait(shutdown).await {
                        return None;
                    }
                }
            }
        }
    }
}

/// A commit that panicked leaves its deliveries unacknowledged: they come
/// again after the ack wait.
fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "a batch commit failed unexpectedly; its messages will be redelivered");
    }
}

fn log_bus_error(e: &BusError) {
    tracing::warn!(error = %e, "could not consume the sample stream; retrying");
}
