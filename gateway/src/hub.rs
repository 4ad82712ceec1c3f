//! The gateway's local fan-out: bounded outbound queues of public
//! connections, and the groups of v2 pages that share a view.
//!
//! A frame is serialized once and the same bytes are handed to every
//! queue; a queue that is full means a client that stopped reading, and
//! that client is dropped (its `kick` cancelled), never waited for.

use std::collections::HashMap;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A public connection's queue.
pub struct Outbox {
    /// Its bounded queue.
    pub tx: mpsc::Sender<Utf8Bytes>,
    /// Cancelled when the queue overflows: the connection ends (1013).
    pub kick: CancellationToken,
}

impl Outbox {
    /// Queues `frame`; false when the queue is full (the client is slow),
    /// and then the client is kicked.
    pub fn offer(&self, frame: Utf8Bytes) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kick.cancel();
                false
            }
            // Closed: the connection is ending and unregisters itself.
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        }
    }
}

/// A set of connections by key; each key is given once.
#[derive(Default)]
pub struct Outboxes {
    next: u64,
    slots: HashMap<u64, Outbox>,
}

impl Outboxes {
    /// Adds a connection's queue; returns its key.
    pub fn add(&mut self, outbox: Outbox) -> u64 {
        let key = self.next;
        self.next += 1;
        self.slots.insert(key, outbox);
        key
    }

    /// Removes a connection's queue.
    pub fn remove(&mut self, key: u64) -> Option<Outbox> {
        self.slots.remove(&key)
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Queues `frame` for every connection; the slow ones are kicked and
    /// removed. Returns how many.
    pub fn fanout(&mut self, frame: &Utf8Bytes) -> usize {
        let before = self.slots.len();
        self.slots.retain(|_, slot| slot.offer(frame.clone()));
        before - self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queues_are_kicked_not_waited_for() {
        let mut boxes = Outboxes::default();
        let (fast_tx, mut fast_rx) = mpsc::channel(4);
        let (slow_tx, _slow_rx) = mpsc::channel(1);
        let slow_kick = CancellationToken::new();
        boxes.add(Outbox {
            tx: fast_tx,
            kick: CancellationToken::new(),
        });
        boxes.add(Outbox {
            tx: slow_tx,
            kick: slow_kick.clone(),
        });
        let frame = Utf8Bytes::from_static("x");
        assert_eq!(boxes.fanout(&frame), 0);
        assert_eq!(boxes.fanout(&frame), 1);
        assert!(slow_kick.is_cancelled());
        assert_eq!(boxes.len(), 1);
        assert!(fast_rx.try_recv().is_ok());
        assert!(fast_rx.try_recv().is_ok());
    }
}
