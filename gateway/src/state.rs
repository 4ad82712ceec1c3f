//! What every part of one gateway shares.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use services::bus::SharedBus;
use services::messages::{GatewayReport, GatewayUpdate, RosterClient};
use services::stats::DelayStats;
use services::subjects::Subjects;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::GatewayArgs;
use crate::hub::Hub;
use crate::metrics::GatewayMetrics;
use crate::mirror::Mirror;
use crate::persist::RecordItem;

/// State shared by the connections, the API and the background tasks.
pub struct Shared {
    /// Limits and timings.
    pub args: GatewayArgs,
    /// This gateway's id.
    pub gateway_id: String,
    /// Subject names.
    pub subjects: Subjects,
    /// The bus.
    pub bus: SharedBus,
    /// Metric families.
    pub metrics: GatewayMetrics,
    /// Public connections, for fan-out.
    pub hub: Hub,
    /// Copy of the whole public roster.
    pub mirror: Mutex<Mirror>,
    /// This gateway's own public clients: the truth its heartbeats tell.
    /// Reports take their sequence number under this lock, so a heartbeat
    /// never overtakes the event that changed what it lists.
    pub local: Mutex<LocalClients>,
    /// Accepted records on their way to the durable stream.
    pub records: mpsc::Sender<RecordItem>,
    /// Cancelled when the gateway starts draining.
    pub shutdown: CancellationToken,
    /// Every connection task, so the drain can wait for them.
    pub tracker: TaskTracker,
    /// Asks the heartbeat task for a heartbeat now.
    pub heartbeat_now: Notify,
    seq: AtomicU64,
    /// Held from taking a report's sequence number until it is published,
    /// so reports leave in sequence order and presence never sees a
    /// heartbeat before an older event.
    report_order: tokio::sync::Mutex<()>,
}

/// This gateway's public clients and which of them have new delays.
#[derive(Default)]
pub struct LocalClients {
    /// By id.
    pub clients: HashMap<String, RosterClient>,
    /// Ids whose delay changed since the last roster tick.
    pub dirty: HashSet<String>,
}

impl Shared {
    /// Assembles the shared state.
    pub fn new(
        args: GatewayArgs,
        gateway_id: String,
        subjects: Subjects,
        bus: SharedBus,
        metrics: GatewayMetrics,
        records: mpsc::Sender<RecordItem>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            args,
            gateway_id,
            subjects,
            bus,
            metrics,
            hub: Hub::default(),
            mirror: Mutex::new(Mirror::default()),
            local: Mutex::new(LocalClients::default()),
            records,
            shutdown,
            tracker: TaskTracker::new(),
            heartbeat_now: Notify::new(),
            seq: AtomicU64::new(1),
            report_order: tokio::sync::Mutex::new(()),
        })
    }

    /// Changes the local clients and reports the change to presence, with a
    /// sequence number taken under the same lock, published in order.
    pub async fn report(&self, change: impl FnOnce(&mut LocalClients) -> Option<GatewayUpdate>) {
        let _order = self.report_order.lock().await;
        let report = {
            let mut local = self.local.lock().expect("local lock");
            let Some(update) = change(&mut local) else {
                return;
            };
            GatewayReport {
                gateway: self.gateway_id.clone(),
                seq: self.seq.fetch_add(1, Ordering::SeqCst),
                update,
            }
        };
        let subject = self.subjects.gateway_reports(&self.gateway_id);
        if let Err(e) = subject.publish(&*self.bus, &report).await {
            // Heartbeats repair what a lost report leaves out.
            tracing::warn!(error = %e, "could not report to presence");
        }
    }

    /// Records a public client's new delay for the next roster tick, and in
    /// the roster copy at once (v1 replies show the own delay immediately).
    pub fn note_delay(&self, id: &str, stats: DelayStats) {
        {
            let mut local = self.local.lock().expect("local lock");
            if let Some(c) = local.clients.get_mut(id) {
                c.stats = Some(stats);
                local.dirty.insert(id.to_owned());
            }
        }
        self.mirror
            .lock()
            .expect("mirror lock")
            .set_stats(id, stats);
    }

    /// Whether `id` is a live public client of this gateway.
    pub fn is_local(&self, id: &str) -> bool {
        self.local
            .lock()
            .expect("local lock")
            .clients
            .contains_key(id)
    }
}
