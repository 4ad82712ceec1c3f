//! This gateway's copy of the public roster, kept from presence's
//! broadcasts. It answers v1 `delay_times`, the v2 `roster` snapshot and
//! `/api/roster` without a round trip to presence.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::extract::ws::Utf8Bytes;
use services::messages::RosterClient;
use services::protocol::{ServerMessage, V1Delay, V1RosterEntry, V2RosterEntry};
use services::stats::DelayStats;

/// The roster copy.
#[derive(Default)]
pub struct Mirror {
    clients: HashMap<String, RosterClient>,
    /// This gateway's own clients, added when they connected, whose
    /// `connect` broadcast has not come yet. Presence drops the events it
    /// receives while no replica is active (at start, during a failover, or
    /// while it is down); its next snapshot lists such a client, and only
    /// then do the pages of this gateway, the client's own included, learn
    /// of it.
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

    /// Adds or replaces a client (a `connect` broadcast announced it).
    pub fn upsert(&mut self, client: RosterClient) {
        self.v1_cache = None;
        self.unannounced.remove(&client.channel_name);
        self.clients.insert(client.channel_name.clone(), client);
    }

    /// Adds a client of this gateway that just connected, before presence
    /// announces it.
    pub fn upsert_local(&mut self, client: RosterClient) {
        self.unannounced.insert(client.channel_name.clone());
        self.v1_cache = None;
        self.clients.insert(client.channel_name.clone(), client);
    }

    /// Removes a client; whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        self.v1_cache = None;
        self.unannounced.remove(id);
        self.clients.remove(id).is_some()
    }

    /// Renames a client if known.
    pub fn rename(&mut self, id: &str, name: &str) {
        if let Some(c) = self.clients.get_mut(id) {
            self.v1_cache = None;
            c.name = name.to_owned();
        }
    }

    /// Sets a client's statistics if known.
    pub fn set_stats(&mut self, id: &str, stats: DelayStats) {
        if let Some(c) = self.clients.get_mut(id) {
            self.v1_cache = None;
            c.stats = Some(stats);
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

    /// Replaces the roster with `snapshot`, except that clients for which
    /// `keep` is true (this gateway's own live clients) stay. Returns the
    /// frames that tell pages about the difference, and a `connect` for
    /// each own client the snapshot lists that was never announced.
    pub fn reconcile(
        &mut self,
        snapshot: Vec<RosterClient>,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<ServerMessage> {
        let mut frames = Vec::new();
        let mut next: HashMap<String, RosterClient> = HashMap::with_capacity(snapshot.len());
        for c in snapshot {
            let unannounced = self.unannounced.remove(&c.channel_name);
            match self.clients.get(&c.channel_name) {
                None => frames.push(ServerMessage::Connect {
                    channel_name: c.channel_name.clone(),
                    name: c.name.clone(),
                    gateway: c.gateway.clone(),
                }),
                Some(_) if unannounced => frames.push(ServerMessage::Connect {
                    channel_name: c.channel_name.clone(),
                    name: c.name.clone(),
                    gateway: c.gateway.clone(),
                }),
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
            if keep(&id) {
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

/// A roster client as the v2 protocol shows it.
pub fn v2_entry(c: &RosterClient) -> V2RosterEntry {
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

    #[test]
    fn v1_frame_shows_dash_before_first_sample_and_is_cached() {
        let mut m = Mirror::default();
        m.upsert(client("a", "a"));
        let f1 = m.v1_frame();
        assert_eq!(
            f1.as_str(),
            r#"{"command":"delay_times","delay_times":{"a":{"name":"a","delay_time":"-"}}}"#
        );
        assert_eq!(m.v1_frame().as_str(), f1.as_str());
        m.set_stats(
            "a",
            DelayStats {
                delay_time: 12.0,
                median: 12.0,
                jitter: 0.0,
            },
        );
        assert!(m.v1_frame().as_str().contains(r#""delay_time":12}"#));
    }

    #[test]
    fn reconcile_announces_own_clients_whose_connect_never_came() {
        let mut m = Mirror::default();
        m.upsert_local(client("announced", "a"));
        m.upsert(client("announced", "a"));
        m.upsert_local(client("missed", "m"));
        m.upsert_local(client("too_new", "n"));
        // Presence knows "missed" but never broadcast its connect;
        // "too_new" reached presence after the snapshot was taken.
        let snapshot = vec![client("announced", "a"), client("missed", "m")];
        let frames = m.reconcile(snapshot.clone(), |id| id != "gone");
        assert_eq!(
            frames,
            vec![ServerMessage::Connect {
                channel_name: "missed".into(),
                name: "m".into(),
                gateway: "g".into(),
            }]
        );
        assert_eq!(m.len(), 3, "own clients stay");
        assert!(m.reconcile(snapshot, |_| true).is_empty(), "announced once");
        // Its broadcast comes later: announced by the event, not again.
        m.upsert(client("too_new", "n"));
        let all = vec![
            client("announced", "a"),
            client("missed", "m"),
            client("too_new", "n"),
        ];
        assert!(m.reconcile(all, |_| true).is_empty());
    }

    #[test]
    fn reconcile_reports_the_difference_and_keeps_own_clients() {
        let mut m = Mirror::default();
        m.upsert(client("gone", "x"));
        m.upsert(client("renamed", "old"));
        m.upsert(client("mine", "me"));
        let frames = m.reconcile(vec![client("renamed", "new"), client("added", "n")], |id| {
            id == "mine"
        });
        assert_eq!(frames.len(), 3);
        assert!(frames.contains(&ServerMessage::Disconnect {
            channel_name: "gone".into()
        }));
        assert!(frames.contains(&ServerMessage::ChangeName {
            channel_name: "renamed".into(),
            name: "new".into()
        }));
        assert_eq!(m.len(), 3);
        let ids: Vec<String> = m.list().into_iter().map(|c| c.channel_name).collect();
        assert!(ids.contains(&"mine".to_owned()));
        assert!(!ids.contains(&"gone".to_owned()));
    }
}
