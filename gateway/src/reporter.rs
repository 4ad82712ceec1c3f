//! The presence reporter: the one task that tells presence about this
//! gateway's public clients.
//!
//! It alone owns the list of local public clients and the reports'
//! sequence numbers, and publishes every report itself, one after the
//! other, so reports leave in sequence order and a heartbeat never
//! overtakes the event that changed what it lists (presence relies on
//! both; see docs/architecture.md). Connections talk to it through a
//! [`ReporterHandle`]:
//!
//! - membership changes (join, rename, leave) go through a bounded channel;
//!   a connection waits while it is full (back-pressure, nothing dropped);
//! - delays are noted in a mailbox holding the latest statistics per client
//!   (bounded by the number of local clients) and leave with the next
//!   roster tick, coalesced.
//!
//! Every wall-clock roster tick closes with a `Delays` report, empty or
//! not. A heartbeat each interval carries the count and the digest
//! ([`services::messages::client_digest`], kept incrementally) of the
//! clients: O(1) bytes whatever their number. When presence asks (after it
//! restarts, or because a heartbeat disagreed with its roster) the full
//! list leaves in consecutive `Clients` pieces of at most
//! `--presence-piece-clients` clients. [`ReporterHandle::goodbye`] sends
//! the last report and ends the task.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use services::bus::SharedBus;
use services::bus::topic::{Inbox, Topic};
use services::messages::{
    GatewayReport, GatewayUpdate, HeartbeatRequest, RosterClient, client_digest,
};
use services::stats::DelayStats;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Membership changes waiting for the reporter; a connection that finds
/// the channel full waits.
pub const CHANNEL_CAPACITY: usize = 1024;

/// A change to this gateway's public clients.
#[derive(Debug, Clone, PartialEq)]
pub enum Membership {
    /// A public client joined.
    Join(RosterClient),
    /// A public client renamed itself.
    Rename {
        /// Its id.
        channel_name: String,
        /// The new name.
        name: String,
    },
    /// A public client left.
    Leave {
        /// Its id.
        channel_name: String,
    },
}

enum Command {
    Change(Membership),
    Goodbye(oneshot::Sender<()>),
}

/// Latest delay statistics per client, not yet reported.
type Mailbox = Arc<Mutex<HashMap<String, DelayStats>>>;

/// How connections reach the reporter. Cheap to clone.
#[derive(Clone)]
pub struct ReporterHandle {
    tx: mpsc::Sender<Command>,
    mailbox: Mailbox,
}

impl ReporterHandle {
    /// Reports a membership change; waits while the channel is full. After
    /// [`ReporterHandle::goodbye`] the change is dropped (the gateway has
    /// told presence that all its clients are gone).
    pub async fn send(&self, change: Membership) {
        let _ = self.tx.send(Command::Change(change)).await;
    }

    /// Notes a client's latest delay statistics for the next roster tick.
    /// Never waits: a newer note replaces an older one.
    pub fn note_delay(&self, channel_name: &str, stats: DelayStats) {
        let mut mailbox = self.mailbox.lock().expect("reporter mailbox");
        match mailbox.get_mut(channel_name) {
            Some(s) => *s = stats,
            None => {
                mailbox.insert(channel_name.to_owned(), stats);
            }
        }
    }

    /// Reports every change sent before, then `Goodbye` (all this gateway's
    /// clients are gone), and ends the reporter.
    pub async fn goodbye(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Command::Goodbye(done_tx)).await.is_ok() {
            let _ = done_rx.await;
        }
    }
}

/// The reporter's settings.
pub struct ReporterConfig {
    /// This gateway's id.
    pub gateway_id: String,
    /// Where this gateway's reports go.
    pub topic: Topic<GatewayReport>,
    /// Roster tick (wall-clock aligned).
    pub roster_tick: Duration,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// The most clients in one piece of the full list.
    pub piece_clients: usize,
    /// Counts the full lists sent (`lists`) and their pieces (`pieces`).
    pub lists: prometheus::IntCounterVec,
}

/// The reporter task's state.
pub struct Reporter {
    cfg: ReporterConfig,
    bus: SharedBus,
    clients: HashMap<String, RosterClient>,
    /// XOR of [`client_digest`] over `clients`.
    digest: u64,
    /// Clients whose delay changed since the last tick.
    dirty: BTreeMap<String, DelayStats>,
    seq: u64,
    mailbox: Mailbox,
    /// A goodbye request, answered once the report at hand is out.
    goodbye: Option<oneshot::Sender<()>>,
}

impl Reporter {
    /// Starts the reporter; `sync_requests` carries presence's requests
    /// for an immediate heartbeat.
    pub fn spawn(
        cfg: ReporterConfig,
        bus: SharedBus,
        sync_requests: Inbox<HeartbeatRequest>,
    ) -> (ReporterHandle, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let mailbox = Mailbox::default();
        let reporter = Reporter {
            cfg,
            bus,
            clients: HashMap::new(),
            digest: 0,
            dirty: BTreeMap::new(),
            seq: 1,
            mailbox: mailbox.clone(),
            goodbye: None,
        };
        let task = tokio::spawn(reporter.run(rx, sync_requests));
        (ReporterHandle { tx, mailbox }, task)
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut sync_requests: Inbox<HeartbeatRequest>,
    ) {
        let mut ticks = services::WallClockTicks::new(self.cfg.roster_tick, Duration::ZERO);
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut syncing = true;
        loop {
            tokio::select! {
                command = rx.recv() => match command {
                    Some(Command::Change(change)) => self.change(change).await,
                    Some(Command::Goodbye(done)) => self.goodbye = Some(done),
                    // Every handle is gone: the gateway is gone.
                    None => return,
                },
                tick_ms = ticks.tick() => self.close_tick(&mut rx, tick_ms).await,
                _ = heartbeat.tick() => self.heartbeat(&mut rx).await,
                request = sync_requests.next(), if syncing => match request {
                    Some(m) => match m.message {
                        Ok(r) if r.asks(&self.cfg.gateway_id) => self.send_list(&mut rx).await,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "undecodable sync request"),
                    },
                    None => syncing = false,
                },
            }
            if let Some(done) = self.goodbye.take() {
                self.publish(GatewayUpdate::Goodbye).await;
                let _ = done.send(());
                return;
            }
        }
    }

    /// Applies a membership change and reports it.
    async fn change(&mut self, change: Membership) {
        let update = match change {
            Membership::Join(client) => {
                self.digest ^= client_digest(&client.channel_name, &client.name);
                if let Some(old) = self
                    .clients
                    .insert(client.channel_name.clone(), client.clone())
                {
                    self.digest ^= client_digest(&old.channel_name, &old.name);
                }
                GatewayUpdate::Connect { client }
            }
            Membership::Rename { channel_name, name } => {
                if let Some(c) = self.clients.get_mut(&channel_name) {
                    self.digest ^=
                        client_digest(&channel_name, &c.name) ^ client_digest(&channel_name, &name);
                    c.name.clone_from(&name);
                }
                GatewayUpdate::Rename { channel_name, name }
            }
            Membership::Leave { channel_name } => {
                if let Some(old) = self.clients.remove(&channel_name) {
                    self.digest ^= client_digest(&old.channel_name, &old.name);
                }
                self.dirty.remove(&channel_name);
                GatewayUpdate::Disconnect { channel_name }
            }
        };
        self.publish(update).await;
    }

    /// Takes every change already queued, then the mailbox, so a report
    /// lists the clients and delays known up to now. A goodbye found on the
    /// way is kept for the run loop, after this report.
    async fn catch_up(&mut self, rx: &mut mpsc::Receiver<Command>) {
        while self.goodbye.is_none() {
            match rx.try_recv() {
                Ok(Command::Change(change)) => self.change(change).await,
                Ok(Command::Goodbye(done)) => self.goodbye = Some(done),
                Err(_) => break,
            }
        }
        self.fold_mailbox();
    }

    fn fold_mailbox(&mut self) {
        let noted = std::mem::take(&mut *self.mailbox.lock().expect("reporter mailbox"));
        for (id, stats) in noted {
            if let Some(c) = self.clients.get_mut(&id) {
                c.stats = Some(stats);
                self.dirty.insert(id, stats);
            }
        }
    }

    async fn close_tick(&mut self, rx: &mut mpsc::Receiver<Command>, tick_ms: i64) {
        self.catch_up(rx).await;
        let delays = std::mem::take(&mut self.dirty);
        self.publish(GatewayUpdate::Delays {
            delays,
            tick_ms: Some(tick_ms),
        })
        .await;
    }

    /// The count and digest of the clients: O(1), whatever their number.
    async fn heartbeat(&mut self, rx: &mut mpsc::Receiver<Command>) {
        self.catch_up(rx).await;
        let update = GatewayUpdate::Heartbeat {
            clients: Vec::new(),
            interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            count: Some(self.clients.len() as u64),
            digest: Some(self.digest),
        };
        self.publish(update).await;
    }

    /// The full list, in consecutive pieces (one, empty, if there is no
    /// client): nothing else is reported between them, so presence sees
    /// the list as of one moment.
    async fn send_list(&mut self, rx: &mut mpsc::Receiver<Command>) {
        self.catch_up(rx).await;
        let all: Vec<RosterClient> = self.clients.values().cloned().collect();
        let piece = self.cfg.piece_clients.max(1);
        let pieces = all.len().div_ceil(piece).max(1);
        let mut rest = all.into_iter();
        for part in 0..pieces {
            let clients: Vec<RosterClient> = rest.by_ref().take(piece).collect();
            self.publish(GatewayUpdate::Clients {
                part: part as u32,
                last: part + 1 == pieces,
                clients,
            })
            .await;
        }
        self.cfg.lists.with_label_values(&["lists"]).inc();
        self.cfg
            .lists
            .with_label_values(&["pieces"])
            .inc_by(pieces as u64);
    }

    async fn publish(&mut self, update: GatewayUpdate) {
        let report = GatewayReport {
            gateway: self.cfg.gateway_id.clone(),
            seq: self.seq,
            update,
        };
        self.seq += 1;
        if let Err(e) = self.cfg.topic.publish(&*self.bus, &report).await {
            // Heartbeats repair what a lost report leaves out.
            tracing::warn!(error = %e, "could not report to presence");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use services::bus::memory::MemoryBus;

    use super::*;

    fn client(id: &str) -> RosterClient {
        RosterClient {
            channel_name: id.into(),
            name: id.into(),
            gateway: "g".into(),
            connected_at_ms: 0,
            stats: None,
        }
    }

    fn stats(ms: f64) -> DelayStats {
        DelayStats {
            delay_time: ms,
            median: ms,
            jitter: 0.0,
        }
    }

    /// A reporter whose ticks and heartbeats are far apart: only what the
    /// test does produces reports (after the first, immediate heartbeat).
    async fn start() -> (
        ReporterHandle,
        JoinHandle<()>,
        Inbox<GatewayReport>,
        MemoryBus,
    ) {
        let bus = MemoryBus::new();
        let reports = reports_topic().subscribe(&bus).await.unwrap();
        let syncs = sync_topic().subscribe(&bus).await.unwrap();
        let cfg = ReporterConfig {
            gateway_id: "g".into(),
            topic: reports_topic(),
            roster_tick: Duration::from_secs(3600),
            heartbeat_interval: Duration::from_secs(3600),
            piece_clients: 2,
            lists: lists_metric(),
        };
        let (handle, task) = Reporter::spawn(cfg, Arc::new(bus.clone()), syncs);
        (handle, task, reports, bus)
    }

    fn lists_metric() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("lists", "lists"), &["kind"]).unwrap()
    }

    fn reports_topic() -> Topic<GatewayReport> {
        Topic::new("r")
    }

    fn sync_topic() -> Topic<HeartbeatRequest> {
        Topic::new("sync")
    }

    async fn next(reports: &mut Inbox<GatewayReport>) -> GatewayReport {
        let m = tokio::time::timeout(Duration::from_secs(5), reports.next())
            .await
            .expect("a report")
            .expect("open");
        m.message.expect("a report")
    }

    #[tokio::test]
    async fn reports_leave_in_sequence_and_heartbeats_see_every_earlier_change() {
        let (handle, task, mut reports, bus) = start().await;
        let first = next(&mut reports).await;
        assert!(matches!(
            first.update,
            GatewayUpdate::Heartbeat { ref clients, count: Some(0), digest: Some(0), .. }
                if clients.is_empty()
        ));
        handle.send(Membership::Join(client("a"))).await;
        handle.send(Membership::Join(client("b"))).await;
        handle.note_delay("a", stats(1.0));
        handle.note_delay("a", stats(2.0));
        handle
            .send(Membership::Leave {
                channel_name: "b".into(),
            })
            .await;
        // Another gateway's list is asked for: not ours to answer.
        let other = HeartbeatRequest {
            gateway: Some("h".into()),
        };
        sync_topic().publish(&bus, &other).await.unwrap();
        // Presence asks for our list: it comes after every change above,
        // and carries a's latest delay.
        let ours = HeartbeatRequest {
            gateway: Some("g".into()),
        };
        sync_topic().publish(&bus, &ours).await.unwrap();
        let mut seen = Vec::new();
        loop {
            let r = next(&mut reports).await;
            seen.push(r.seq);
            if let GatewayUpdate::Clients {
                part,
                last,
                clients,
            } = r.update
            {
                assert_eq!((part, last), (0, true));
                assert_eq!(clients.len(), 1, "b left before the list");
                assert_eq!(clients[0].channel_name, "a");
                assert_eq!(clients[0].stats, Some(stats(2.0)));
                break;
            }
        }
        assert_eq!(seen.len(), 4, "join, join, leave, list: {seen:?}");
        assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
        assert!(seen[0] == first.seq + 1);

        handle.goodbye().await;
        let last = next(&mut reports).await;
        assert_eq!(last.update, GatewayUpdate::Goodbye);
        task.await.unwrap();
        // After goodbye nothing more is reported.
        handle.send(Membership::Join(client("c"))).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), reports.next())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_tick_carries_the_latest_delay_of_present_clients_only() {
        let bus = MemoryBus::new();
        let mut reports = reports_topic().subscribe(&bus).await.unwrap();
        let syncs = sync_topic().subscribe(&bus).await.unwrap();
        let cfg = ReporterConfig {
            gateway_id: "g".into(),
            topic: reports_topic(),
            roster_tick: Duration::from_millis(50),
            heartbeat_interval: Duration::from_secs(3600),
            piece_clients: 1000,
            lists: lists_metric(),
        };
        let (handle, _task) = Reporter::spawn(cfg, Arc::new(bus.clone()), syncs);
        handle.send(Membership::Join(client("a"))).await;
        handle.send(Membership::Join(client("gone"))).await;
        handle.note_delay("gone", stats(9.0));
        handle
            .send(Membership::Leave {
                channel_name: "gone".into(),
            })
            .await;
        handle.note_delay("a", stats(1.0));
        handle.note_delay("a", stats(4.0));
        handle.note_delay("never-joined", stats(5.0));
        loop {
            let r = next(&mut reports).await;
            if let GatewayUpdate::Delays { delays, .. } = r.update
                && !delays.is_empty()
            {
                assert_eq!(delays, BTreeMap::from([("a".to_owned(), stats(4.0))]));
                break;
            }
        }
    }

    #[tokio::test]
    async fn heartbeats_carry_a_count_and_digest_and_lists_go_in_pieces() {
        let (handle, _task, mut reports, bus) = start().await;
        next(&mut reports).await;
        for id in ["a", "b", "c", "d", "e"] {
            handle.send(Membership::Join(client(id))).await;
        }
        handle
            .send(Membership::Rename {
                channel_name: "c".into(),
                name: "Cee".into(),
            })
            .await;
        handle
            .send(Membership::Leave {
                channel_name: "e".into(),
            })
            .await;
        let expected = [("a", "a"), ("b", "b"), ("c", "Cee"), ("d", "d")]
            .iter()
            .fold(0, |d, (id, name)| d ^ client_digest(id, name));
        // Every sync request is answered with the list: four clients in
        // pieces of two, numbered, consecutive, the last marked.
        sync_topic()
            .publish(&bus, &HeartbeatRequest::default())
            .await
            .unwrap();
        let mut pieces = Vec::new();
        while pieces.len() < 2 {
            let r = next(&mut reports).await;
            if let GatewayUpdate::Clients { .. } = r.update {
                pieces.push(r);
            }
        }
        assert_eq!(pieces[1].seq, pieces[0].seq + 1);
        let mut listed = 0;
        let mut digest = 0;
        for (i, p) in pieces.iter().enumerate() {
            let GatewayUpdate::Clients {
                part,
                last,
                clients,
            } = &p.update
            else {
                unreachable!()
            };
            assert_eq!((*part as usize, *last), (i, i == 1));
            listed += clients.len();
            digest = clients
                .iter()
                .fold(digest, |d, c| d ^ client_digest(&c.channel_name, &c.name));
        }
        assert_eq!((listed, digest), (4, expected));
        handle.goodbye().await;
    }
}
