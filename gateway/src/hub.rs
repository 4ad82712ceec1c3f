//! The gateway's local fan-out: every public connection's bounded outbound
//! queue. A broadcast is serialized once and the same bytes are handed to
//! every queue; a queue that is full means a client that stopped reading,
//! and that client is dropped, never waited for.
//!
//! A v2 client may `watch` a set of clients (the rows its page shows): its
//! `delays` frames then hold only those, serialized for it alone, and none
//! is sent when none of them changed. Everyone else shares one frame.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::Utf8Bytes;
use services::protocol::ServerMessage;
use services::stats::DelayStats;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Which public connections a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// v1 and v2 alike (connect, change_name, disconnect).
    All,
    /// v2 only (`delays`).
    V2,
}

struct Slot {
    tx: mpsc::Sender<Utf8Bytes>,
    v2: bool,
    kick: CancellationToken,
    /// The clients whose delays this connection wants; `None`: all.
    watch: Option<HashSet<String>>,
}

impl Slot {
    /// Queues `frame`; false when the queue is full (the client is slow).
    fn offer(&self, frame: Utf8Bytes) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
            // Closed: the connection is ending and unregisters itself.
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        }
    }
}

/// The public connections of this gateway.
#[derive(Default)]
pub struct Hub {
    next: AtomicU64,
    slots: RwLock<HashMap<u64, Slot>>,
}

impl Hub {
    /// Adds a connection; `kick` is cancelled if it falls behind.
    pub fn register(&self, v2: bool, tx: mpsc::Sender<Utf8Bytes>, kick: CancellationToken) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.slots.write().expect("hub lock").insert(
            key,
            Slot {
                tx,
                v2,
                kick,
                watch: None,
            },
        );
        key
    }

    /// Sets which clients' delays the connection `key` gets (`None`: all).
    pub fn set_watch(&self, key: u64, watch: Option<HashSet<String>>) {
        if let Some(slot) = self.slots.write().expect("hub lock").get_mut(&key) {
            slot.watch = watch;
        }
    }

    /// Removes a connection.
    pub fn unregister(&self, key: u64) {
        self.slots.write().expect("hub lock").remove(&key);
    }

    /// Number of registered connections.
    pub fn len(&self) -> usize {
        self.slots.read().expect("hub lock").len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `frame` for every connection of `audience`. Returns how many
    /// slow connections were dropped.
    pub fn fanout(&self, frame: &Utf8Bytes, audience: Audience) -> usize {
        let mut overflowed = Vec::new();
        {
            let slots = self.slots.read().expect("hub lock");
            for (key, slot) in slots.iter() {
                if audience == Audience::V2 && !slot.v2 {
                    continue;
                }
                if !slot.offer(frame.clone()) {
                    overflowed.push(*key);
                }
            }
        }
        self.kick(&overflowed)
    }

    /// Queues one tick's `delays` for every v2 connection: the whole set,
    /// serialized once, for those that watch everyone; only the watched
    /// clients, and nothing if none of them changed, for the others.
    /// Returns how many slow connections were dropped.
    pub fn fanout_delays(&self, delays: &BTreeMap<String, DelayStats>) -> usize {
        let mut overflowed = Vec::new();
        {
            let slots = self.slots.read().expect("hub lock");
            let mut everything: Option<Utf8Bytes> = None;
            for (key, slot) in slots.iter().filter(|(_, s)| s.v2) {
                let frame = match &slot.watch {
                    None => everything
                        .get_or_insert_with(|| delays_frame(delays.clone()))
                        .clone(),
                    Some(watch) => {
                        let mine = watched(delays, watch);
                        if mine.is_empty() {
                            continue;
                        }
                        delays_frame(mine)
                    }
                };
                if !slot.offer(frame) {
                    overflowed.push(*key);
                }
            }
        }
        self.kick(&overflowed)
    }

    /// Drops the connections whose queues overflowed; returns how many.
    fn kick(&self, overflowed: &[u64]) -> usize {
        if !overflowed.is_empty() {
            let mut slots = self.slots.write().expect("hub lock");
            for key in overflowed {
                if let Some(slot) = slots.remove(key) {
                    slot.kick.cancel();
                }
            }
        }
        overflowed.len()
    }
}

/// The entries of `delays` that `watch` names, walking the smaller side.
fn watched(
    delays: &BTreeMap<String, DelayStats>,
    watch: &HashSet<String>,
) -> BTreeMap<String, DelayStats> {
    if watch.len() < delays.len() {
        watch
            .iter()
            .filter_map(|id| Some((id.clone(), *delays.get(id)?)))
            .collect()
    } else {
        delays
            .iter()
            .filter(|(id, _)| watch.contains(*id))
            .map(|(id, stats)| (id.clone(), *stats))
            .collect()
    }
}

fn delays_frame(delay_times: BTreeMap<String, DelayStats>) -> Utf8Bytes {
    Utf8Bytes::from(ServerMessage::Delays { delay_times }.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queues_are_kicked_not_waited_for() {
        let hub = Hub::default();
        let (fast_tx, mut fast_rx) = mpsc::channel(4);
        let (slow_tx, _slow_rx) = mpsc::channel(2);
        let (v1_tx, mut v1_rx) = mpsc::channel(4);
        let slow_kick = CancellationToken::new();
        hub.register(true, fast_tx, CancellationToken::new());
        hub.register(true, slow_tx, slow_kick.clone());
        hub.register(false, v1_tx, CancellationToken::new());
        let frame = Utf8Bytes::from_static("x");
        assert_eq!(hub.fanout(&frame, Audience::All), 0);
        assert_eq!(hub.fanout(&frame, Audience::V2), 0);
        assert!(fast_rx.try_recv().is_ok());
        assert!(fast_rx.try_recv().is_ok());
        assert_eq!(hub.fanout(&frame, Audience::V2), 1);
        assert!(slow_kick.is_cancelled());
        assert_eq!(hub.len(), 2);
        assert!(v1_rx.try_recv().is_ok());
        assert!(v1_rx.try_recv().is_err(), "v1 gets no v2-only frames");
    }

    fn stats(ms: f64) -> DelayStats {
        DelayStats {
            delay_time: ms,
            median: ms,
            jitter: 0.0,
        }
    }

    fn delays_of(frame: &Utf8Bytes) -> Vec<String> {
        match serde_json::from_str::<ServerMessage>(frame.as_str()).unwrap() {
            ServerMessage::Delays { delay_times } => delay_times.into_keys().collect(),
            other => panic!("not delays: {other:?}"),
        }
    }

    #[test]
    fn watchers_get_only_what_they_watch() {
        let hub = Hub::default();
        let (all_tx, mut all_rx) = mpsc::channel(4);
        let (few_tx, mut few_rx) = mpsc::channel(4);
        let (none_tx, mut none_rx) = mpsc::channel(4);
        let (v1_tx, mut v1_rx) = mpsc::channel(4);
        hub.register(true, all_tx, CancellationToken::new());
        let few = hub.register(true, few_tx, CancellationToken::new());
        let none = hub.register(true, none_tx, CancellationToken::new());
        hub.register(false, v1_tx, CancellationToken::new());
        hub.set_watch(few, Some(["b".into(), "z".into()].into()));
        hub.set_watch(none, Some(["z".into()].into()));
        let delays: BTreeMap<String, DelayStats> = [("a", 1.0), ("b", 2.0), ("c", 3.0)]
            .into_iter()
            .map(|(id, v)| (id.to_owned(), stats(v)))
            .collect();

        assert_eq!(hub.fanout_delays(&delays), 0);
        assert_eq!(delays_of(&all_rx.try_recv().unwrap()), ["a", "b", "c"]);
        assert_eq!(delays_of(&few_rx.try_recv().unwrap()), ["b"]);
        assert!(none_rx.try_recv().is_err(), "nothing it watches changed");
        assert!(v1_rx.try_recv().is_err(), "v1 gets no delays");

        // Back to everyone.
        hub.set_watch(few, None);
        hub.fanout_delays(&delays);
        assert_eq!(delays_of(&few_rx.try_recv().unwrap()), ["a", "b", "c"]);
        // A large watch against a small tick walks the tick.
        let many: HashSet<String> = (0..100)
            .map(|i| format!("{i}"))
            .chain(["c".into()])
            .collect();
        assert_eq!(
            watched(&delays, &many).into_keys().collect::<Vec<_>>(),
            ["c"]
        );
    }
}
