//! This gateway's copy of the public roster, kept from presence's
//! broadcasts. It answers v1 `delay_times`, the v2 `roster` snapshot and
//! `/api/roster` without a round trip to presence.
//!
//! The mirror is pure: no lock, no bus, no clock. [`Mirror::apply`] turns
//! one [`Broadcast`] (an event or a whole snapshot) into the frames the
//! local pages must see; the caller serializes and fans them out.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::extract::ws::Utf8Bytes;
use services::messages::{Broadcast, RosterClient};
use services::protocol::{ServerMessage, V1Delay, V1RosterEntry, V2RosterEntry};
use services::stats::DelayStats;

/// What one broadcast means for the local pages.
#[derive(Debug, Default, PartialEq)]
pub struct Fanout {
    /// Frames for every public page, v1 and v2 (connect, change_name,
    /// disconnect), in order.
    pub events: Vec<ServerMessage>,
    /// One tick's delay updates, for v2 pages (each filtered by its watch).
    pub delays: Option<BTreeMap<String, DelayStats>>,
}

/// The roster copy.
#[derive(Default)]
pub struct Mirror {
    clients: HashMap<String, RosterClient>,
    /// This gateway's own live public clients: a snapshot never removes
    /// them (presence may not know them yet).
    local: HashSet<String>,
    /// Own clients whose `connect` broadcast has not come yet. Presence
    /// drops the events it receives while no replica is active (at start,
    /// during a failover, or while it is down); its next snapshot lists
    /// such a client, and only then do the pages of this gateway, the
    /// client's own included, learn of it.
    unannounced: HashSet<String>,
    v1_cache: Option<Utf8Bytes>,
}

impl Mirror {
    /// Number of clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether the roster is empty.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Adds a client of this gateway that just connected, before presence
    /// announces it: its own page sees it in its first roster.
    pub fn add_local(&mut self, client: RosterClient) {
        self.local.insert(client.channel_name.clone());
        self.unannounced.insert(client.channel_name.clone());
        self.v1_cache = None;
        self.clients.insert(client.channel_name.clone(), client);
    }

    /// A client of this gateway left. It stays in the roster until presence
    /// broadcasts its `disconnect` (or a snapshot no longer lists it).
    pub fn remove_local(&mut self, id: &str) {
        self.local.remove(id);
    }

    /// Sets a client's statistics if known.
    pub fn set_stats(&mut self, id: &str, stats: DelayStats) {
        if let Some(c) = self.clients.get_mut(id) {
            self.v1_cache = None;
            c.stats = Some(stats);
        }
    }

    /// Applies one broadcast; returns what the local pages must be sent.
    pub fn apply(&mut self, broadcast: Broadcast) -> Fanout {
        match broadcast {
            Broadcast::Connect { client } => {
                let frame = ServerMessage::Connect {
                    channel_name: client.channel_name.clone(),
                    name: client.name.clone(),
                    gateway: client.gateway.clone(),
                };
                self.v1_cache = None;
                self.unannounced.remove(&client.channel_name);
                self.clients.insert(client.channel_name.clone(), client);
                events(vec![frame])
            }
            Broadcast::Rename { channel_name, name } => {
                if let Some(c) = self.clients.get_mut(&channel_name) {
                    self.v1_cache = None;
                    c.name.clone_from(&name);
                }
                events(vec![ServerMessage::ChangeName { channel_name, name }])
            }
            Broadcast::Disconnect { channel_name } => {
                if self.local.contains(&channel_name) {
                    // Presence lost track of a live local client (e.g. our
                    // heartbeats were cut off); the next heartbeat restores it.
                    tracing::debug!(%channel_name, "presence dropped a live local client");
                }
                self.v1_cache = None;
                self.unannounced.remove(&channel_name);
                self.clients.remove(&channel_name);
                events(vec![ServerMessage::Disconnect { channel_name }])
            }
            Broadcast::Delays { delays } => {
                for (id, stats) in &delays {
                    self.set_stats(id, *stats);
                }
                Fanout {
                    events: Vec::new(),
                    delays: Some(delays),
                }
            }
            Broadcast::Snapshot { clients } => events(self.reconcile(clients)),
        }
    }

    /// Every client, oldest connection first.
    pub fn list(&self) -> Vec<RosterClient> {
        let mut v: Vec<RosterClient> = self.clients.values().cloned().collect();
        v.sort_by(|a, b| {
            (a.connected_at_ms, &a.channel_name).cmp(&(b.connected_at_ms, &b.channel_name))
        });
        v
    }

    /// The v1 `delay_times` frame, serialized once per roster change.
    pub fn v1_frame(&mut self) -> Utf8Bytes {
        if let Some(f) = &self.v1_cache {
            return f.clone();
        }
        let delay_times: BTreeMap<String, V1RosterEntry> = self
            .clients
            .values()
            .map(|c| {
                (
                    c.channel_name.clone(),
                    V1RosterEntry {
                        name: c.name.clone(),
                        delay_time: V1Delay(c.stats.map(|s| s.delay_time)),
                    },
                )
            })
            .collect();
        let frame = Utf8Bytes::from(ServerMessage::DelayTimes { delay_times }.to_json());
        self.v1_cache = Some(frame.clone());
        frame
    }

    /// The v2 `roster` frame.
    pub fn v2_frame(&self) -> Utf8Bytes {
        let clients: BTreeMap<String, V2RosterEntry> = self
            .clients
            .values()
            .map(|c| (c.channel_name.clone(), v2_entry(c)))
            .collect();
        Utf8Bytes::from(ServerMessage::Roster { clients }.to_json())
    }

    /// Replaces the roster with `snapshot`, except that this gateway's own
    /// live clients stay. Returns the frames that tell pages about the
    /// difference, and a `connect` for each own client the snapshot lists
    /// that was never announced.
    fn reconcile(&mut self, snapshot: Vec<RosterClient>) -> Vec<ServerMessage> {
        let mut frames = Vec::new();
        let mut next: HashMap<String, RosterClient> = HashMap::with_capacity(snapshot.len());
        for c in snapshot {
            let unannounced = self.unannounced.remove(&c.channel_name);
            match self.clients.get(&c.channel_name) {
                None => frames.push(connect_frame(&c)),
                Some(_) if unannounced => frames.push(connect_frame(&c)),
                Some(old) if old.name != c.name => frames.push(ServerMessage::ChangeName {
                    channel_name: c.channel_name.clone(),
                    name: c.name.clone(),
                }),
                Some(_) => {}
            }
            next.insert(c.channel_name.clone(), c);
        }
        for (id, old) in self.clients.drain() {
            if next.contains_key(&id) {
                continue;
            }
            if self.local.contains(&id) {
                next.insert(id, old);
            } else {
                frames.push(ServerMessage::Disconnect { channel_name: id });
            }
        }
        self.unannounced.retain(|id| next.contains_key(id));
        self.clients = next;
        self.v1_cache = None;
        frames
    }
}

fn events(events: Vec<ServerMessage>) -> Fanout {
    Fanout {
        events,
        delays: None,
    }
}

fn connect_frame(c: &RosterClient) -> ServerMessage {
    ServerMessage::Connect {
        channel_name: c.channel_name.clone(),
        name: c.name.clone(),
        gateway: c.gateway.clone(),
    }
}

/// A roster client as the v2 protocol shows it.
fn v2_entry(c: &RosterClient) -> V2RosterEntry {
    V2RosterEntry {
        name: c.name.clone(),
        gateway: c.gateway.clone(),
        delay_time: c.stats.map(|s| s.delay_time),
        median: c.stats.map(|s| s.median),
        jitter: c.stats.map(|s| s.jitter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, name: &str) -> RosterClient {
        RosterClient {
            channel_name: id.into(),
            name: name.into(),
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

    fn connect(id: &str, name: &str) -> Broadcast {
        Broadcast::Connect {
            client: client(id, name),
        }
    }

    fn snapshot(clients: &[(&str, &str)]) -> Broadcast {
        Broadcast::Snapshot {
            clients: clients.iter().map(|(id, n)| client(id, n)).collect(),
        }
    }

    fn ids(m: &Mirror) -> Vec<String> {
        m.list().into_iter().map(|c| c.channel_name).collect()
    }

    #[test]
    fn events_become_the_v1_frames_in_order() {
        let mut m = Mirror::default();
        let f = m.apply(connect("a", "a"));
        assert_eq!(
            f.events,
            vec![ServerMessage::Connect {
                channel_name: "a".into(),
                name: "a".into(),
                gateway: "g".into()
            }]
        );
        assert_eq!(f.delays, None);
        let f = m.apply(Broadcast::Rename {
            channel_name: "a".into(),
            name: "Ann".into(),
        });
        assert_eq!(
            f.events,
            vec![ServerMessage::ChangeName {
                channel_name: "a".into(),
                name: "Ann".into()
            }]
        );
        assert_eq!(m.list()[0].name, "Ann");
        let f = m.apply(Broadcast::Disconnect {
            channel_name: "a".into(),
        });
        assert_eq!(
            f.events,
            vec![ServerMessage::Disconnect {
                channel_name: "a".into()
            }]
        );
        assert!(m.is_empty());
    }

    #[test]
    fn delays_update_the_copy_and_go_to_v2_only() {
        let mut m = Mirror::default();
        m.apply(connect("a", "a"));
        let delays: BTreeMap<String, DelayStats> = [
            ("a".to_owned(), stats(7.0)),
            ("unknown".to_owned(), stats(1.0)),
        ]
        .into();
        let f = m.apply(Broadcast::Delays {
            delays: delays.clone(),
        });
        assert!(f.events.is_empty(), "no v1 frame for a delay tick");
        assert_eq!(f.delays, Some(delays));
        assert_eq!(m.list()[0].stats, Some(stats(7.0)));
        assert_eq!(m.len(), 1, "an unknown id is not added");
    }

    #[test]
    fn v1_frame_shows_dash_before_first_sample_and_is_cached() {
        let mut m = Mirror::default();
        m.apply(connect("a", "a"));
        let f1 = m.v1_frame();
        assert_eq!(
            f1.as_str(),
            r#"{"command":"delay_times","delay_times":{"a":{"name":"a","delay_time":"-"}}}"#
        );
        assert_eq!(m.v1_frame().as_str(), f1.as_str());
        m.set_stats("a", stats(12.0));
        assert!(m.v1_frame().as_str().contains(r#""delay_time":12}"#));
    }

    #[test]
    fn v2_frame_lists_every_client_with_its_gateway() {
        let mut m = Mirror::default();
        m.apply(connect("a", "A"));
        m.set_stats("a", stats(3.5));
        assert_eq!(
            m.v2_frame().as_str(),
            r#"{"command":"roster","clients":{"a":{"name":"A","gateway":"g","delay_time":3.5,"median":3.5,"jitter":0.0}}}"#
        );
    }

    #[test]
    fn snapshot_announces_own_clients_whose_connect_never_came() {
        let mut m = Mirror::default();
        m.add_local(client("announced", "a"));
        m.apply(connect("announced", "a"));
        m.add_local(client("missed", "m"));
        m.add_local(client("too_new", "n"));
        // Presence knows "missed" but never broadcast its connect;
        // "too_new" reached presence after the snapshot was taken.
        let snap = [("announced", "a"), ("missed", "m")];
        let f = m.apply(snapshot(&snap));
        assert_eq!(
            f.events,
            vec![ServerMessage::Connect {
                channel_name: "missed".into(),
                name: "m".into(),
                gateway: "g".into(),
            }]
        );
        assert_eq!(m.len(), 3, "own clients stay");
        assert!(m.apply(snapshot(&snap)).events.is_empty(), "announced once");
        // Its broadcast comes later: announced by the event, not again.
        m.apply(connect("too_new", "n"));
        let all = [("announced", "a"), ("missed", "m"), ("too_new", "n")];
        assert!(m.apply(snapshot(&all)).events.is_empty());
    }

    #[test]
    fn snapshot_reports_the_difference_and_keeps_live_own_clients() {
        let mut m = Mirror::default();
        m.apply(connect("gone", "x"));
        m.apply(connect("renamed", "old"));
        m.add_local(client("mine", "me"));
        m.apply(connect("mine", "me"));
        m.add_local(client("left", "l"));
        m.apply(connect("left", "l"));
        m.remove_local("left");
        let f = m.apply(snapshot(&[("renamed", "new"), ("added", "n")]));
        assert_eq!(f.events.len(), 4, "{:?}", f.events);
        for gone in ["gone", "left"] {
            assert!(f.events.contains(&ServerMessage::Disconnect {
                channel_name: gone.into()
            }));
        }
        assert!(f.events.contains(&ServerMessage::ChangeName {
            channel_name: "renamed".into(),
            name: "new".into()
        }));
        let mut ids = ids(&m);
        ids.sort();
        assert_eq!(ids, ["added", "mine", "renamed"]);
    }
}
