//! This gateway's copy of the public roster, kept from presence's
//! broadcasts. It answers v1 `delay_times`, the v2 `roster` snapshot and
//! `/api/roster` without a round trip to presence.
//!
//! The mirror is pure: no lock, no bus, no clock. [`Mirror::apply`] turns
//! one [`Broadcast`] (an event or a whole snapshot) into the frames the
//! local pages must see; the caller serializes and fans them out.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use axum::extract::ws::Utf8Bytes;
use services::messages::{Broadcast, RosterClient, client_digest};
use services::protocol::{Order, ServerMessage, Sort, V1Delay, V1RosterEntry, ViewSpec};
use services::stats::DelayStats;

use crate::index::SortedIndex;
use crate::view::{Row, Window};

/// What one broadcast means for the local v1 pages.
#[derive(Debug, Default, PartialEq)]
pub struct Fanout {
    /// Frames for every public v1 page (connect, change_name,
    /// disconnect), in order. v2 pages see the change in their view at
    /// the next tick.
    pub events: Vec<ServerMessage>,
}

/// A delay as the delay index orders it: clients with a sample first, by
/// delay; then those without.
#[derive(Debug, Clone, Copy)]
struct DelayKey(Option<f64>);

impl PartialEq for DelayKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for DelayKey {}
impl PartialOrd for DelayKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for DelayKey {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.0, other.0) {
            (Some(a), Some(b)) => a.total_cmp(&b),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        }
    }
}

/// A client and its lower-cased name (the name order and the filter).
struct Entry {
    client: RosterClient,
    lower: String,
}

impl Entry {
    fn name_key(&self) -> (String, String) {
        (self.lower.clone(), self.client.channel_name.clone())
    }
    fn delay_key(&self) -> (DelayKey, String) {
        (
            DelayKey(self.client.stats.map(|s| s.delay_time)),
            self.client.channel_name.clone(),
        )
    }
}

/// The cached v1 `delay_times` frame and where each client's entry is in
/// it, so that a reply can show the asking client's own latest delay
/// without serializing the roster again.
struct V1Frame {
    frame: Utf8Bytes,
    spans: HashMap<String, (usize, usize)>,
}

/// The roster copy.
#[derive(Default)]
pub struct Mirror {
    clients: HashMap<String, Entry>,
    by_name: SortedIndex<(String, String)>,
    by_delay: SortedIndex<(DelayKey, String)>,
    /// Clients with a sample (the first ones of `by_delay`).
    sampled: usize,
    /// This gateway's own live public clients: a snapshot never removes
    /// them (presence may not know them yet).
    local: HashSet<String>,
    /// Own clients whose `connect` broadcast has not come yet. Presence
    /// drops the events it receives while no replica is active (at start,
    /// during a failover, or while it is down); its next snapshot lists
    /// such a client, and only then do the v1 pages of this gateway, the
    /// client's own included, learn of it.
    unannounced: HashSet<String>,
    /// This gateway's own clients whose row was added or renamed since the
    /// last [`Mirror::take_renamed`]: their pages get `me` at the next tick.
    /// A delay alone never puts a client here (a page keeps its own row's
    /// statistics from its own samples, docs/protocol.md "Public room: the
    /// view"), so a tick does no per-client work for the room's delays.
    renamed: HashSet<String>,
    /// Counts every change of the roster.
    version: u64,
    /// The v1 frame; `None` after a membership or name change.
    v1: Option<V1Frame>,
    /// Whether a delay changed since the v1 frame was built.
    v1_delays_stale: bool,
    /// XOR of [`client_digest`] over every client.
    digest: u64,
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

    /// Counts every change: equal versions, equal rosters.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether the copy holds what presence's [`Broadcast::Digest`] says
    /// the roster holds: the same count and digest once this gateway's own
    /// clients that presence has not announced yet are left out (presence
    /// may not know them yet). O(those clients).
    pub fn agrees_with(&self, count: u64, digest: u64) -> bool {
        let mut n = self.clients.len() as u64;
        let mut d = self.digest;
        for id in &self.unannounced {
            if let Some(e) = self.clients.get(id) {
                n -= 1;
                d ^= client_digest(id, &e.client.name);
            }
        }
        n == count && d == digest
    }

    /// Adds a client of this gateway that just connected, before presence
    /// announces it: its own page sees it at once.
    pub fn add_local(&mut self, client: RosterClient) {
        self.local.insert(client.channel_name.clone());
        self.unannounced.insert(client.channel_name.clone());
        self.upsert(client);
    }

    /// A client of this gateway left. It stays in the roster until presence
    /// broadcasts its `disconnect` (or a snapshot no longer lists it).
    pub fn remove_local(&mut self, id: &str) {
        self.local.remove(id);
    }

    /// Sets a client's statistics if known.
    pub fn set_stats(&mut self, id: &str, stats: DelayStats) {
        let Some(e) = self.clients.get(id) else {
            return;
        };
        if e.client.stats == Some(stats) {
            return;
        }
        let old = e.delay_key();
        let had = e.client.stats.is_some();
        self.by_delay.remove(&old);
        let e = self.clients.get_mut(id).expect("present");
        e.client.stats = Some(stats);
        self.by_delay.insert(e.delay_key());
        if !had {
            self.sampled += 1;
        }
        self.version += 1;
        self.v1_delays_stale = true;
    }

    /// Adds or replaces a client, keeping the indexes.
    fn upsert(&mut self, client: RosterClient) {
        let id = client.channel_name.clone();
        let lower = client.name.to_lowercase();
        let old_stats = self.clients.get(&id).and_then(|e| e.client.stats);
        // A connect or snapshot entry may carry no statistics yet while the
        // copy has them: keep the newer knowledge.
        let mut client = client;
        if client.stats.is_none() {
            client.stats = old_stats;
        }
        if let Some(old) = self.clients.get(&id) {
            if old.client == client {
                return;
            }
            self.remove(&id);
        }
        let e = Entry { client, lower };
        self.digest ^= client_digest(&id, &e.client.name);
        self.by_name.insert(e.name_key());
        self.by_delay.insert(e.delay_key());
        if e.client.stats.is_some() {
            self.sampled += 1;
        }
        self.clients.insert(id.clone(), e);
        self.v1 = None;
        self.version += 1;
        if self.local.contains(&id) {
            self.renamed.insert(id);
        }
    }

    /// Removes a client from the copy and its indexes.
    fn remove(&mut self, id: &str) -> bool {
        let Some(e) = self.clients.remove(id) else {
            return false;
        };
        self.digest ^= client_digest(id, &e.client.name);
        self.by_name.remove(&e.name_key());
        self.by_delay.remove(&e.delay_key());
        if e.client.stats.is_some() {
            self.sampled -= 1;
        }
        self.renamed.remove(id);
        self.v1 = None;
        self.version += 1;
        true
    }

    fn rename(&mut self, id: &str, name: &str) {
        if let Some(e) = self.clients.get(id)
            && e.client.name != name
        {
            let mut c = e.client.clone();
            c.name = name.to_owned();
            self.upsert(c);
        }
    }

    /// Applies one broadcast; returns what the local v1 pages must be sent.
    pub fn apply(&mut self, broadcast: Broadcast) -> Fanout {
        match broadcast {
            Broadcast::Connect { client } => {
                let frame = connect_frame(&client);
                self.unannounced.remove(&client.channel_name);
                self.upsert(client);
                events(vec![frame])
            }
            Broadcast::Rename { channel_name, name } => {
                self.rename(&channel_name, &name);
                events(vec![ServerMessage::ChangeName { channel_name, name }])
            }
            Broadcast::Disconnect { channel_name } => {
                if self.local.contains(&channel_name) {
                    // Presence lost track of a live local client (e.g. our
                    // heartbeats were cut off); the next heartbeat restores it.
                    tracing::debug!(%channel_name, "presence dropped a live local client");
                }
                self.unannounced.remove(&channel_name);
                self.remove(&channel_name);
                events(vec![ServerMessage::Disconnect { channel_name }])
            }
            Broadcast::Delays { delays } => {
                for (id, stats) in &delays {
                    self.set_stats(id, *stats);
                }
                Fanout::default()
            }
            Broadcast::Snapshot { clients } => events(self.reconcile(clients)),
            // Compared by the feed (Mirror::agrees_with), which fetches the
            // roster when it differs.
            Broadcast::Digest { .. } => Fanout::default(),
        }
    }

    /// Every client, oldest connection first.
    pub fn list(&self) -> Vec<RosterClient> {
        let mut v: Vec<RosterClient> = self.clients.values().map(|e| e.client.clone()).collect();
        v.sort_by(|a, b| {
            (a.connected_at_ms, &a.channel_name).cmp(&(b.connected_at_ms, &b.channel_name))
        });
        v
    }

    /// Whether `id` is a live public client of this gateway.
    pub fn is_local(&self, id: &str) -> bool {
        self.local.contains(id)
    }

    /// A client's row, if it is in the roster.
    pub fn row(&self, id: &str) -> Option<Row> {
        self.clients.get(id).map(|e| Row::of(&e.client))
    }

    /// This gateway's own clients that joined or were renamed since the
    /// last call (statistics alone do not count).
    pub fn take_renamed(&mut self) -> HashSet<String> {
        std::mem::take(&mut self.renamed)
    }

    /// The ids in the order of `sort`/`order`, from the first.
    fn ordered(&self, sort: Sort, order: Order) -> Box<dyn Iterator<Item = &String> + '_> {
        self.ordered_from(sort, order, 0)
    }

    /// The ids in the order of `sort`/`order`, from position `pos`:
    /// O(room / block) to find it, then O(1) per id.
    fn ordered_from(
        &self,
        sort: Sort,
        order: Order,
        pos: usize,
    ) -> Box<dyn Iterator<Item = &String> + '_> {
        match (sort, order) {
            (Sort::Name, Order::Asc) => Box::new(self.by_name.iter_from(pos).map(|(_, id)| id)),
            (Sort::Name, Order::Desc) => {
                Box::new(self.by_name.iter_back_from(pos).map(|(_, id)| id))
            }
            (Sort::Delay, Order::Asc) => Box::new(self.by_delay.iter_from(pos).map(|(_, id)| id)),
            (Sort::Delay, Order::Desc) => {
                // Sampled clients from the largest delay down, then the
                // unsampled ones in their (id) order: last either way.
                let n = self.by_delay.len();
                let sampled = self.sampled;
                let unsampled_from = pos.max(sampled);
                let back = (pos < sampled).then(|| {
                    self.by_delay
                        .iter_back_from(n - sampled + pos)
                        .take(sampled - pos)
                });
                Box::new(
                    back.into_iter()
                        .flatten()
                        .chain(self.by_delay.iter_from(unsampled_from))
                        .map(|(_, id)| id),
                )
            }
        }
    }

    /// The window of `spec`: the counts and at most `spec.limit` rows from
    /// `spec.offset` on. Without a filter O(room / block + limit); with one,
    /// a walk over every name.
    pub fn window(&self, spec: &ViewSpec) -> Window {
        let limit = spec.limit as usize;
        let offset = usize::try_from(spec.offset).unwrap_or(usize::MAX);
        let row = |id: &String| Row::of(&self.clients[id].client);
        let (matched, rows) = if spec.filter.is_empty() {
            let rows = if offset >= self.len() {
                Vec::new()
            } else {
                self.ordered_from(spec.sort, spec.order, offset)
                    .take(limit)
                    .map(row)
                    .collect()
            };
            (self.len(), rows)
        } else {
            let mut matched = 0;
            let mut rows = Vec::new();
            for id in self.ordered(spec.sort, spec.order) {
                if self.clients[id].lower.contains(&spec.filter) {
                    if matched >= offset && rows.len() < limit {
                        rows.push(row(id));
                    }
                    matched += 1;
                }
            }
            (matched, rows)
        };
        Window {
            version: self.version,
            total: self.len(),
            matched,
            rows,
        }
    }

    /// The clients of `window`'s rows with their connection time, for the
    /// HTTP API.
    pub fn connected_at_ms(&self, id: &str) -> Option<i64> {
        self.clients.get(id).map(|e| e.client.connected_at_ms)
    }

    /// The v1 `delay_times` frame as the client `own` must see it: the
    /// shared frame, built once per membership or name change and at most
    /// once per tick for delays ([`Mirror::refresh_v1`]), with the own
    /// entry brought up to date (a copy only when it differs).
    pub fn v1_frame(&mut self, own: Option<&str>) -> Utf8Bytes {
        if self.v1.is_none() {
            self.build_v1();
        }
        let v1 = self.v1.as_ref().expect("built");
        let Some((id, e)) = own.and_then(|id| Some((id, self.clients.get(id)?))) else {
            return v1.frame.clone();
        };
        let entry = v1_entry_json(&e.client);
        match v1.spans.get(id) {
            Some(&(a, b)) if v1.frame.as_str()[a..b] == entry => v1.frame.clone(),
            Some(&(a, b)) => {
                let f = v1.frame.as_str();
                let mut out = String::with_capacity(f.len() + entry.len());
                out.push_str(&f[..a]);
                out.push_str(&entry);
                out.push_str(&f[b..]);
                Utf8Bytes::from(out)
            }
            None => v1.frame.clone(),
        }
    }

    /// Rebuilds the v1 frame if a delay changed since it was built (the
    /// room calls it once per tick while v1 pages are connected).
    pub fn refresh_v1(&mut self) {
        if self.v1_delays_stale && self.v1.is_some() {
            self.build_v1();
        }
    }

    fn build_v1(&mut self) {
        let mut out = String::with_capacity(64 + self.clients.len() * 64);
        let mut spans = HashMap::with_capacity(self.clients.len());
        out.push_str(r#"{"command":"delay_times","delay_times":{"#);
        for (i, (id, e)) in self.clients.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(id).expect("ids serialize"));
            out.push(':');
            let start = out.len();
            out.push_str(&v1_entry_json(&e.client));
            spans.insert(id.clone(), (start, out.len()));
        }
        out.push_str("}}");
        self.v1 = Some(V1Frame {
            frame: Utf8Bytes::from(out),
            spans,
        });
        self.v1_delays_stale = false;
    }

    /// Replaces the roster with `snapshot`, except that this gateway's own
    /// live clients stay. Returns the frames that tell v1 pages about the
    /// difference, and a `connect` for each own client the snapshot lists
    /// that was never announced.
    fn reconcile(&mut self, snapshot: Vec<RosterClient>) -> Vec<ServerMessage> {
        let mut frames = Vec::new();
        let mut listed: HashSet<String> = HashSet::with_capacity(snapshot.len());
        for c in snapshot {
            let unannounced = self.unannounced.remove(&c.channel_name);
            match self.clients.get(&c.channel_name) {
                None => frames.push(connect_frame(&c)),
                Some(_) if unannounced => frames.push(connect_frame(&c)),
                Some(old) if old.client.name != c.name => {
                    frames.push(ServerMessage::ChangeName {
                        channel_name: c.channel_name.clone(),
                        name: c.name.clone(),
                    });
                }
                Some(_) => {}
            }
            listed.insert(c.channel_name.clone());
            self.upsert(c);
        }
        let gone: Vec<String> = self
            .clients
            .keys()
            .filter(|id| !listed.contains(*id) && !self.local.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
            frames.push(ServerMessage::Disconnect { channel_name: id });
        }
        let clients = &self.clients;
        self.unannounced.retain(|id| clients.contains_key(id));
        frames
    }
}

fn v1_entry_json(c: &RosterClient) -> String {
    serde_json::to_string(&V1RosterEntry {
        name: c.name.clone(),
        delay_time: V1Delay(c.stats.map(|s| s.delay_time)),
    })
    .expect("v1 entries serialize")
}

fn events(events: Vec<ServerMessage>) -> Fanout {
    Fanout { events }
}

fn connect_frame(c: &RosterClient) -> ServerMessage {
    ServerMessage::Connect {
        channel_name: c.channel_name.clone(),
        name: c.name.clone(),
        gateway: c.gateway.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
    fn delays_update_the_copy_and_send_no_v1_frame() {
        let mut m = Mirror::default();
        m.apply(connect("a", "a"));
        let delays: BTreeMap<String, DelayStats> = [
            ("a".to_owned(), stats(7.0)),
            ("unknown".to_owned(), stats(1.0)),
        ]
        .into();
        let f = m.apply(Broadcast::Delays { delays });
        assert!(f.events.is_empty(), "no v1 frame for a delay tick");
        assert_eq!(m.list()[0].stats, Some(stats(7.0)));
        assert_eq!(m.len(), 1, "an unknown id is not added");
    }

    #[test]
    fn v1_frame_is_shared_until_a_change_and_shows_the_own_delay_at_once() {
        let mut m = Mirror::default();
        m.apply(connect("a", "a"));
        m.apply(connect("b", "b"));
        let f1 = m.v1_frame(None);
        let v: serde_json::Value = serde_json::from_str(f1.as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"command":"delay_times","delay_times":{
                "a":{"name":"a","delay_time":"-"},"b":{"name":"b","delay_time":"-"}}})
        );
        assert_eq!(
            m.v1_frame(Some("a")).as_str().as_ptr(),
            f1.as_str().as_ptr(),
            "the same bytes, not a copy"
        );
        // A delay: the asking client sees its own at once, others at the
        // next refresh (once per tick).
        m.set_stats("a", stats(12.0));
        assert!(
            m.v1_frame(Some("a"))
                .as_str()
                .contains(r#""a":{"name":"a","delay_time":12}"#)
        );
        assert!(
            m.v1_frame(Some("b"))
                .as_str()
                .contains(r#""a":{"name":"a","delay_time":"-"}"#)
        );
        m.refresh_v1();
        assert!(
            m.v1_frame(Some("b"))
                .as_str()
                .contains(r#""a":{"name":"a","delay_time":12}"#)
        );
        // A rename rebuilds it at once.
        m.apply(Broadcast::Rename {
            channel_name: "b".into(),
            name: "Bee".into(),
        });
        assert!(
            m.v1_frame(None)
                .as_str()
                .contains(r#""b":{"name":"Bee","delay_time":"-"}"#)
        );
    }

    fn spec(sort: Sort, order: Order, filter: &str, offset: u64, limit: u32) -> ViewSpec {
        ViewSpec {
            sort,
            order,
            filter: filter.into(),
            offset,
            limit,
        }
    }

    fn window_ids(m: &Mirror, s: &ViewSpec) -> Vec<String> {
        m.window(s)
            .rows
            .into_iter()
            .map(|r| r.channel_name)
            .collect()
    }

    #[test]
    fn windows_sort_filter_and_page() {
        let mut m = Mirror::default();
        for (id, name, delay) in [
            ("1", "dora", Some(4.0)),
            ("2", "Bob", None),
            ("3", "ann", Some(9.0)),
            ("4", "carl", Some(1.0)),
            ("5", "bea", None),
        ] {
            m.apply(connect(id, name));
            if let Some(d) = delay {
                m.set_stats(id, stats(d));
            }
        }
        let ids = |m: &Mirror, s| window_ids(m, &s);
        assert_eq!(
            ids(&m, spec(Sort::Name, Order::Asc, "", 0, 50)),
            ["3", "5", "2", "4", "1"]
        );
        assert_eq!(
            ids(&m, spec(Sort::Name, Order::Desc, "", 0, 50)),
            ["1", "4", "2", "5", "3"]
        );
        assert_eq!(ids(&m, spec(Sort::Name, Order::Asc, "", 1, 2)), ["5", "2"]);
        assert_eq!(ids(&m, spec(Sort::Name, Order::Desc, "", 3, 9)), ["5", "3"]);
        assert!(ids(&m, spec(Sort::Name, Order::Asc, "", 5, 9)).is_empty());
        // By delay, clients without a sample last in both orders.
        assert_eq!(
            ids(&m, spec(Sort::Delay, Order::Asc, "", 0, 50)),
            ["4", "1", "3", "2", "5"]
        );
        assert_eq!(
            ids(&m, spec(Sort::Delay, Order::Desc, "", 0, 50)),
            ["3", "1", "4", "2", "5"]
        );
        assert_eq!(
            ids(&m, spec(Sort::Delay, Order::Desc, "", 2, 2)),
            ["4", "2"]
        );
        assert_eq!(ids(&m, spec(Sort::Delay, Order::Desc, "", 4, 2)), ["5"]);
        // A filter ignores case and counts its matches.
        let w = m.window(&spec(Sort::Name, Order::Asc, "b", 0, 1));
        assert_eq!((w.total, w.matched), (5, 2));
        assert_eq!(w.rows[0].channel_name, "5");
        assert_eq!(ids(&m, spec(Sort::Name, Order::Asc, "b", 1, 5)), ["2"]);
        // Changes move rows.
        m.set_stats("2", stats(0.5));
        assert_eq!(ids(&m, spec(Sort::Delay, Order::Asc, "", 0, 1)), ["2"]);
        m.apply(Broadcast::Rename {
            channel_name: "1".into(),
            name: "Aaron".into(),
        });
        assert_eq!(ids(&m, spec(Sort::Name, Order::Asc, "", 0, 1)), ["1"]);
        m.apply(Broadcast::Disconnect {
            channel_name: "1".into(),
        });
        let w = m.window(&ViewSpec::default());
        assert_eq!(w.total, 4);
        assert_eq!(w.rows[0].channel_name, "3");
        // Only own clients' joins and renames are reported, never delays.
        assert!(m.take_renamed().is_empty(), "no local client");
        m.add_local(client("6", "dora"));
        m.take_renamed();
        m.set_stats("6", stats(3.0));
        assert!(m.take_renamed().is_empty(), "a delay is not a rename");
        m.apply(Broadcast::Rename {
            channel_name: "6".into(),
            name: "Dorothy".into(),
        });
        m.apply(Broadcast::Rename {
            channel_name: "2".into(),
            name: "Bert".into(),
        });
        assert_eq!(m.take_renamed(), HashSet::from(["6".to_owned()]));
        assert!(m.take_renamed().is_empty());
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

    #[test]
    fn the_digest_follows_the_copy_and_leaves_out_unannounced_own_clients() {
        let d = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .fold(0, |d, (id, name)| d ^ client_digest(id, name))
        };
        let mut m = Mirror::default();
        assert!(m.agrees_with(0, 0));
        m.apply(connect("a", "a"));
        m.apply(connect("b", "b"));
        m.apply(Broadcast::Rename {
            channel_name: "b".into(),
            name: "Bea".into(),
        });
        assert!(m.agrees_with(2, d(&[("a", "a"), ("b", "Bea")])));
        assert!(
            !m.agrees_with(2, d(&[("a", "a"), ("b", "b")])),
            "names count"
        );
        m.set_stats("a", stats(3.0));
        assert!(
            m.agrees_with(2, d(&[("a", "a"), ("b", "Bea")])),
            "delays do not"
        );
        // An own client presence has not announced: left out until it is.
        m.add_local(client("mine", "me"));
        assert!(m.agrees_with(2, d(&[("a", "a"), ("b", "Bea")])));
        m.apply(connect("mine", "me"));
        assert!(m.agrees_with(3, d(&[("a", "a"), ("b", "Bea"), ("mine", "me")])));
        m.apply(Broadcast::Disconnect {
            channel_name: "a".into(),
        });
        assert!(m.agrees_with(2, d(&[("b", "Bea"), ("mine", "me")])));
        // A snapshot brings it to presence's roster.
        m.apply(snapshot(&[("b", "Bea"), ("c", "c"), ("mine", "me")]));
        assert!(m.agrees_with(3, d(&[("b", "Bea"), ("c", "c"), ("mine", "me")])));
    }
}
