//! The gateway's local fan-out: every public connection's bounded outbound
//! queue. A broadcast is serialized once and the same bytes are handed to
//! every queue; a queue that is full means a client that stopped reading,
//! and that client is dropped, never waited for.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::Utf8Bytes;
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
        self.slots
            .write()
            .expect("hub lock")
            .insert(key, Slot { tx, v2, kick });
        key
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
                match slot.tx.try_send(frame.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => overflowed.push(*key),
                    // Closed: the connection is ending and unregisters itself.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        if !overflowed.is_empty() {
            let mut slots = self.slots.write().expect("hub lock");
            for key in &overflowed {
                if let Some(slot) = slots.remove(key) {
                    slot.kick.cancel();
                }
            }
        }
        overflowed.len()
    }
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
}
