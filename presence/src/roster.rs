//! The roster as a pure state machine: gateway reports and the passing of
//! time go in, the broadcasts to publish come out. No bus, no clock of its
//! own (every method takes `now`), so every rule is unit-testable.
//!
//! Rules, in short:
//! - Events (connect, rename, disconnect, delays, goodbye) always apply;
//!   connect, rename and disconnect are always broadcast, because the page
//!   that caused them waits for their echo.
//! - A heartbeat is the full list of a gateway's public clients and
//!   reconciles the roster with it. A heartbeat older than an event already
//!   applied (lower `seq`) is stale and ignored.
//! - During warm-up (after presence starts) clients learned from heartbeats
//!   are added silently: the pages already have them.
//! - A gateway silent for [`MISSED_HEARTBEATS`] heartbeat intervals is
//!   expired with all its clients.
//! - Delay updates are coalesced and leave as one broadcast per tick.
//! - A gateway speaks only for its own clients (docs/security.md, "The
//!   bus"): a connect, rename or disconnect of a client that another
//!   gateway holds is refused, and so are the entries of such clients in
//!   its heartbeats and delay reports. A heartbeat or connect that would
//!   give one gateway more than its cap of clients is refused.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use services::messages::{Broadcast, GatewayReport, GatewayUpdate, RosterClient};
use services::stats::DelayStats;
use tokio::time::Instant;

/// The heartbeat interval assumed for a gateway before its first heartbeat.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(2000);

/// A gateway silent for this many heartbeat intervals is expired.
pub const MISSED_HEARTBEATS: u32 = 3;

/// Default of the most public clients one gateway may hold in the roster
/// (`presence --max-clients-per-gateway`): five times the 10,000
/// connections a gateway is benchmarked with.
pub const DEFAULT_MAX_CLIENTS_PER_GATEWAY: usize = 50_000;

/// What presence knows about one gateway.
#[derive(Debug, Clone)]
struct GatewayState {
    /// When any report of it last arrived (expiry counts from here).
    last_seen: Instant,
    /// When any heartbeat of it last arrived (missed heartbeats count from
    /// here).
    last_heartbeat: Instant,
    /// When a heartbeat of it was last applied (or when it was first seen).
    last_applied_heartbeat: Instant,
    /// How often it heartbeats.
    interval: Duration,
    /// The highest `seq` applied.
    last_seq: u64,
    /// Missed heartbeats already counted since `last_heartbeat`.
    missed_counted: u64,
    /// The latest roster tick (Unix ms) it closed with a `Delays` report.
    closed_tick: Option<i64>,
}

impl GatewayState {
    fn new(now: Instant, seq: u64) -> Self {
        Self {
            last_seen: now,
            last_heartbeat: now,
            last_applied_heartbeat: now,
            interval: DEFAULT_HEARTBEAT_INTERVAL,
            last_seq: seq,
            missed_counted: 0,
            closed_tick: None,
        }
    }
}

/// What [`Roster::apply`] did with a report.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The report was applied; these broadcasts are due, in order.
    Applied(Vec<Broadcast>),
    /// A heartbeat older than an event already applied: ignored.
    Stale,
    /// The report was refused whole: nothing changed.
    Refused(Refusal),
}

/// Why a report (or an entry of one) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It names a client that another gateway holds.
    ForeignClient,
    /// It would give its gateway more clients than the cap.
    TooManyClients,
}

impl Refusal {
    /// The `reason` label of `pingapp_presence_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ForeignClient => "foreign_client",
            Refusal::TooManyClients => "too_many_clients",
        }
    }
}

/// What [`Roster::expire`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expiry {
    /// The gateways expired (and forgotten).
    pub gateways: Vec<String>,
    /// How many clients they took with them.
    pub clients: usize,
    /// Heartbeat intervals that passed without a heartbeat since the last
    /// call (approximate: an interval counts once half of the next one has
    /// passed too).
    pub missed_heartbeats: u64,
    /// One disconnect per removed client.
    pub broadcasts: Vec<Broadcast>,
}

/// Who is connected to the public page, across all gateways.
#[derive(Debug, Clone)]
pub struct Roster {
    /// Every public client by id.
    clients: BTreeMap<String, RosterClient>,
    /// Every gateway that reported and was not expired or said goodbye.
    gateways: HashMap<String, GatewayState>,
    /// Statistics changed since the last [`Roster::take_delays`].
    pending: BTreeMap<String, DelayStats>,
    /// The latest roster tick whose delay updates were taken.
    flushed_tick: i64,
    /// Until then, clients learned from heartbeats are added silently.
    warm_until: Instant,
    /// Clients per gateway, kept with `clients`.
    held: HashMap<String, usize>,
    /// The most clients one gateway may hold.
    max_per_gateway: usize,
    /// Entries of applied reports that were skipped as another gateway's,
    /// since the last [`Roster::take_refused_entries`].
    refused_entries: u64,
}

impl Roster {
    /// An empty roster that warms up until `warm_until`.
    pub fn new(warm_until: Instant) -> Self {
        Self {
            clients: BTreeMap::new(),
            gateways: HashMap::new(),
            pending: BTreeMap::new(),
            flushed_tick: i64::MIN,
            warm_until,
            held: HashMap::new(),
            max_per_gateway: DEFAULT_MAX_CLIENTS_PER_GATEWAY,
            refused_entries: 0,
        }
    }

    /// The same roster, holding at most `max` clients per gateway.
    pub fn with_max_clients_per_gateway(mut self, max: usize) -> Self {
        self.max_per_gateway = max;
        self
    }

    /// Entries of applied heartbeats and delay reports skipped because they
    /// named another gateway's client, since the last call.
    pub fn take_refused_entries(&mut self) -> u64 {
        std::mem::take(&mut self.refused_entries)
    }

    /// Whether `channel_name` is held by a gateway other than `gateway`.
    fn is_foreign(&self, channel_name: &str, gateway: &str) -> bool {
        self.clients
            .get(channel_name)
            .is_some_and(|c| c.gateway != gateway)
    }

    /// Whether the report would break a rule of ownership or size; checked
    /// before anything changes.
    fn refusal(&self, gateway: &str, update: &GatewayUpdate) -> Option<Refusal> {
        match update {
            GatewayUpdate::Connect { client } => {
                if self.is_foreign(&client.channel_name, gateway) {
                    Some(Refusal::ForeignClient)
                } else if !self.clients.contains_key(&client.channel_name)
                    && self.held.get(gateway).copied().unwrap_or(0) >= self.max_per_gateway
                {
                    Some(Refusal::TooManyClients)
                } else {
                    None
                }
            }
            GatewayUpdate::Rename { channel_name, .. }
            | GatewayUpdate::Disconnect { channel_name } => self
                .is_foreign(channel_name, gateway)
                .then_some(Refusal::ForeignClient),
            GatewayUpdate::Heartbeat { clients, .. } => {
                (clients.len() > self.max_per_gateway).then_some(Refusal::TooManyClients)
            }
            GatewayUpdate::Delays { .. } | GatewayUpdate::Goodbye => None,
        }
    }

    /// Whether the roster is still warming up at `now`.
    pub fn is_warming(&self, now: Instant) -> bool {
        now < self.warm_until
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Number of gateways known.
    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    /// One client by id.
    pub fn get(&self, channel_name: &str) -> Option<&RosterClient> {
        self.clients.get(channel_name)
    }

    /// Every client, ordered by id.
    pub fn clients(&self) -> Vec<RosterClient> {
        self.clients.values().cloned().collect()
    }

    /// The whole roster as a broadcast.
    pub fn snapshot(&self) -> Broadcast {
        Broadcast::Snapshot {
            clients: self.clients(),
        }
    }

    /// Applies one gateway report received at `now`.
    pub fn apply(&mut self, report: GatewayReport, now: Instant) -> Outcome {
        let GatewayReport {
            gateway,
            seq,
            update,
        } = report;
        if let Some(refusal) = self.refusal(&gateway, &update) {
            return Outcome::Refused(refusal);
        }
        let state = self
            .gateways
            .entry(gateway.clone())
            .or_insert_with(|| GatewayState::new(now, seq));
        state.last_seen = now;

        if let GatewayUpdate::Heartbeat { interval_ms, .. } = &update {
            state.last_heartbeat = now;
            state.missed_counted = 0;
            if *interval_ms > 0 {
                state.interval = Duration::from_millis(*interval_ms);
            }
            if seq < state.last_seq {
                // Either a heartbeat that crossed newer events (ignore it), or
                // the gateway restarted and counts from zero again. A restart
                // shows as heartbeats that keep being "stale" for longer than
                // an interval; a crossing one is a one-off.
                let restarted = now.duration_since(state.last_applied_heartbeat)
                    >= state.interval + state.interval / 2;
                if !restarted {
                    return Outcome::Stale;
                }
                state.last_seq = seq;
            }
            state.last_applied_heartbeat = now;
        }
        state.last_seq = state.last_seq.max(seq);
        if let GatewayUpdate::Delays {
            tick_ms: Some(tick),
            ..
        } = &update
        {
            state.closed_tick = Some(state.closed_tick.map_or(*tick, |t| t.max(*tick)));
        }

        let broadcasts = match update {
            GatewayUpdate::Connect { mut client } => {
                client.gateway = gateway;
                self.pending.remove(&client.channel_name);
                self.insert(client.clone());
                vec![Broadcast::Connect { client }]
            }
            GatewayUpdate::Rename { channel_name, name } => {
                if let Some(c) = self.clients.get_mut(&channel_name) {
                    c.name.clone_from(&name);
                }
                vec![Broadcast::Rename { channel_name, name }]
            }
            GatewayUpdate::Disconnect { channel_name } => {
                self.remove(&channel_name);
                vec![Broadcast::Disconnect { channel_name }]
            }
            GatewayUpdate::Delays { delays, .. } => {
                for (id, stats) in delays {
                    if self.is_foreign(&id, &gateway) {
                        self.refused_entries += 1;
                        continue;
                    }
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.stats = Some(stats);
                        self.pending.insert(id, stats);
                    }
                }
                Vec::new()
            }
            GatewayUpdate::Heartbeat { clients, .. } => self.reconcile(&gateway, clients, now),
            GatewayUpdate::Goodbye => {
                self.gateways.remove(&gateway);
                self.remove_gateway_clients(&gateway)
            }
        };
        Outcome::Applied(broadcasts)
    }

    /// Makes the clients of `gateway` exactly those of its heartbeat.
    fn reconcile(
        &mut self,
        gateway: &str,
        clients: Vec<RosterClient>,
        now: Instant,
    ) -> Vec<Broadcast> {
        let silent = self.is_warming(now);
        let mut out = Vec::new();
        let listed: std::collections::HashSet<String> =
            clients.iter().map(|c| c.channel_name.clone()).collect();
        let gone: Vec<String> = self
            .clients
            .values()
            .filter(|c| c.gateway == gateway && !listed.contains(&c.channel_name))
            .map(|c| c.channel_name.clone())
            .collect();
        for id in gone {
            self.remove(&id);
            out.push(Broadcast::Disconnect { channel_name: id });
        }
        for mut client in clients {
            if self.is_foreign(&client.channel_name, gateway) {
                self.refused_entries += 1;
                continue;
            }
            client.gateway = gateway.to_owned();
            match self.clients.get_mut(&client.channel_name) {
                Some(known) => {
                    let renamed = known.name != client.name;
                    known.name.clone_from(&client.name);
                    if client.stats.is_some() {
                        known.stats = client.stats;
                    }
                    if renamed && !silent {
                        out.push(Broadcast::Rename {
                            channel_name: client.channel_name,
                            name: client.name,
                        });
                    }
                }
                None => {
                    self.insert(client.clone());
                    if !silent {
                        out.push(Broadcast::Connect { client });
                    }
                }
            }
        }
        out
    }

    /// Expires every gateway silent for [`MISSED_HEARTBEATS`] intervals.
    pub fn expire(&mut self, now: Instant) -> Expiry {
        let mut expiry = Expiry::default();
        for (id, state) in &mut self.gateways {
            let since_heartbeat = now.saturating_duration_since(state.last_heartbeat);
            // An interval counts as missed once half of the next one passed.
            let missed = since_heartbeat
                .saturating_sub(state.interval / 2)
                .as_nanos()
                .checked_div(state.interval.as_nanos())
                .unwrap_or(0) as u64;
            if missed > state.missed_counted {
                expiry.missed_heartbeats += missed - state.missed_counted;
                state.missed_counted = missed;
            }
            if now.saturating_duration_since(state.last_seen) > state.interval * MISSED_HEARTBEATS {
                expiry.gateways.push(id.clone());
            }
        }
        expiry.gateways.sort();
        for gateway in &expiry.gateways {
            self.gateways.remove(gateway);
            let gone = self.remove_gateway_clients(gateway);
            expiry.clients += gone.len();
            expiry.broadcasts.extend(gone);
        }
        expiry
    }

    /// Treats every gateway as seen at `now`: after presence itself was cut
    /// off from the bus, the silence says nothing about the gateways.
    pub fn touch_all(&mut self, now: Instant) {
        for state in self.gateways.values_mut() {
            state.last_seen = now;
            state.last_heartbeat = now;
            state.missed_counted = 0;
        }
    }

    /// The coalesced delay updates as soon as every known gateway has
    /// closed a roster tick not yet taken: one broadcast per tick, without
    /// waiting for [`Roster::take_due_delays`]. `None` while some gateway
    /// has not closed it (or never sends ticks), and when nothing changed.
    pub fn take_closed_delays(&mut self) -> Option<Broadcast> {
        let closed = self.gateways.values().map(|g| g.closed_tick).min()??;
        if closed <= self.flushed_tick {
            return None;
        }
        self.flushed_tick = closed;
        self.take_delays()
    }

    /// The coalesced delay updates at the deadline of roster tick `tick_ms`
    /// (a little after it), unless that tick was already taken when the last
    /// gateway closed it: covers a gateway that is late, dead but not yet
    /// expired, or too old to close ticks.
    pub fn take_due_delays(&mut self, tick_ms: i64) -> Option<Broadcast> {
        if tick_ms <= self.flushed_tick {
            return None;
        }
        self.flushed_tick = tick_ms;
        self.take_delays()
    }

    /// The coalesced delay updates since the last call, if any.
    pub fn take_delays(&mut self) -> Option<Broadcast> {
        if self.pending.is_empty() {
            return None;
        }
        Some(Broadcast::Delays {
            delays: std::mem::take(&mut self.pending),
        })
    }

    /// Adds or replaces a client of `client.gateway`, keeping the
    /// per-gateway counts.
    fn insert(&mut self, client: RosterClient) {
        let gateway = client.gateway.clone();
        if let Some(old) = self.clients.insert(client.channel_name.clone(), client) {
            self.uncount(&old.gateway);
        }
        *self.held.entry(gateway).or_default() += 1;
    }

    fn uncount(&mut self, gateway: &str) {
        if let Some(n) = self.held.get_mut(gateway) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(gateway);
            }
        }
    }

    fn remove(&mut self, channel_name: &str) -> Option<RosterClient> {
        self.pending.remove(channel_name);
        let gone = self.clients.remove(channel_name)?;
        self.uncount(&gone.gateway);
        Some(gone)
    }

    fn remove_gateway_clients(&mut self, gateway: &str) -> Vec<Broadcast> {
        let gone: Vec<String> = self
            .clients
            .values()
            .filter(|c| c.gateway == gateway)
            .map(|c| c.channel_name.clone())
            .collect();
        gone.into_iter()
            .map(|id| {
                self.remove(&id);
                Broadcast::Disconnect { channel_name: id }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, name: &str, gw: &str) -> RosterClient {
        RosterClient {
            channel_name: id.into(),
            name: name.into(),
            gateway: gw.into(),
            connected_at_ms: 1,
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

    fn report(gw: &str, seq: u64, update: GatewayUpdate) -> GatewayReport {
        GatewayReport {
            gateway: gw.into(),
            seq,
            update,
        }
    }

    fn connect(gw: &str, seq: u64, id: &str) -> GatewayReport {
        report(
            gw,
            seq,
            GatewayUpdate::Connect {
                client: client(id, id, gw),
            },
        )
    }

    fn heartbeat(
        gw: &str,
        seq: u64,
        clients: Vec<RosterClient>,
        interval_ms: u64,
    ) -> GatewayReport {
        report(
            gw,
            seq,
            GatewayUpdate::Heartbeat {
                clients,
                interval_ms,
            },
        )
    }

    fn applied(o: Outcome) -> Vec<Broadcast> {
        match o {
            Outcome::Applied(b) => b,
            Outcome::Stale => panic!("report was ignored as stale"),
            Outcome::Refused(r) => panic!("report was refused: {r:?}"),
        }
    }

    #[test]
    fn a_gateway_cannot_touch_another_gateways_clients() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("a", 1, "x"), t0));
        applied(r.apply(connect("b", 1, "y"), t0));
        let foreign = Outcome::Refused(Refusal::ForeignClient);
        // b renames, disconnects or reconnects a's client: refused.
        let rename = report(
            "b",
            2,
            GatewayUpdate::Rename {
                channel_name: "x".into(),
                name: "SYSTEM".into(),
            },
        );
        assert_eq!(r.apply(rename, t0), foreign);
        let leave = report(
            "b",
            3,
            GatewayUpdate::Disconnect {
                channel_name: "x".into(),
            },
        );
        assert_eq!(r.apply(leave, t0), foreign);
        assert_eq!(r.apply(connect("b", 4, "x"), t0), foreign);
        // Its heartbeat lists a's client (and its own): only its own apply,
        // a's entry is skipped and counted.
        let mut stolen = client("x", "stolen", "b");
        stolen.stats = Some(stats(1.0));
        let hb = heartbeat("b", 5, vec![stolen, client("y", "y", "b")], 1000);
        assert!(applied(r.apply(hb, t0)).is_empty());
        assert_eq!(r.take_refused_entries(), 1);
        // Its delays for a's client are skipped too.
        let delays = report(
            "b",
            6,
            GatewayUpdate::Delays {
                delays: [("x".to_owned(), stats(60_000.0))].into(),
                tick_ms: None,
            },
        );
        applied(r.apply(delays, t0));
        assert_eq!(r.take_refused_entries(), 1);
        assert_eq!(r.take_delays(), None);
        // An empty heartbeat and a goodbye of b leave a's client alone.
        applied(r.apply(heartbeat("b", 7, vec![], 1000), t0));
        applied(r.apply(report("b", 8, GatewayUpdate::Goodbye), t0));
        assert_eq!(r.get("x"), Some(&client("x", "x", "a")));
        assert_eq!(r.len(), 1);
        // a itself still may.
        applied(r.apply(
            report(
                "a",
                2,
                GatewayUpdate::Disconnect {
                    channel_name: "x".into(),
                },
            ),
            t0,
        ));
        assert!(r.is_empty());
    }

    #[test]
    fn a_gateway_holds_at_most_its_cap_of_clients() {
        let t0 = Instant::now();
        let mut r = Roster::new(t0).with_max_clients_per_gateway(2);
        let too_many = Outcome::Refused(Refusal::TooManyClients);
        let three: Vec<_> = ["p", "q", "s"].map(|id| client(id, id, "a")).into();
        assert_eq!(
            r.apply(heartbeat("a", 1, three.clone(), 1000), t0),
            too_many
        );
        assert!(r.is_empty(), "a refused heartbeat changes nothing");
        applied(r.apply(heartbeat("a", 2, three[..2].to_vec(), 1000), t0));
        assert_eq!(r.apply(connect("a", 3, "s"), t0), too_many);
        // A known client may connect again; another gateway has its own cap.
        applied(r.apply(connect("a", 4, "p"), t0));
        applied(r.apply(connect("b", 1, "s"), t0));
        assert_eq!(r.len(), 3);
        // Room again once one leaves.
        applied(r.apply(
            report(
                "a",
                5,
                GatewayUpdate::Disconnect {
                    channel_name: "q".into(),
                },
            ),
            t0,
        ));
        applied(r.apply(connect("a", 6, "t"), t0));
        assert_eq!(r.len(), 3);
    }

    /// A roster whose warm-up is over.
    fn warm() -> (Roster, Instant) {
        let t0 = Instant::now();
        (Roster::new(t0), t0)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn connect_is_broadcast_even_when_known() {
        let (mut r, t0) = warm();
        let b = applied(r.apply(connect("g", 1, "a"), t0));
        assert_eq!(
            b,
            vec![Broadcast::Connect {
                client: client("a", "a", "g")
            }]
        );
        let b = applied(r.apply(connect("g", 2, "a"), t0));
        assert_eq!(b.len(), 1, "a repeated connect is echoed again");
        assert_eq!(r.len(), 1);
        assert_eq!(r.gateway_count(), 1);
    }

    #[test]
    fn rename_updates_known_and_is_always_broadcast() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 1, "a"), t0));
        let rename = |seq, id: &str| {
            report(
                "g",
                seq,
                GatewayUpdate::Rename {
                    channel_name: id.into(),
                    name: "Zed".into(),
                },
            )
        };
        let b = applied(r.apply(rename(2, "a"), t0));
        assert_eq!(
            b,
            vec![Broadcast::Rename {
                channel_name: "a".into(),
                name: "Zed".into()
            }]
        );
        assert_eq!(r.get("a").unwrap().name, "Zed");
        let b = applied(r.apply(rename(3, "ghost"), t0));
        assert_eq!(b.len(), 1);
        assert!(r.get("ghost").is_none());
    }

    #[test]
    fn disconnect_removes_and_is_always_broadcast() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 1, "a"), t0));
        let disconnect = |seq, id: &str| {
            report(
                "g",
                seq,
                GatewayUpdate::Disconnect {
                    channel_name: id.into(),
                },
            )
        };
        let b = applied(r.apply(disconnect(2, "a"), t0));
        assert_eq!(
            b,
            vec![Broadcast::Disconnect {
                channel_name: "a".into()
            }]
        );
        assert!(r.is_empty());
        let b = applied(r.apply(disconnect(3, "a"), t0));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn heartbeat_reconciles_the_gateway() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 1, "stays"), t0));
        applied(r.apply(connect("g", 2, "renamed"), t0));
        applied(r.apply(connect("g", 3, "gone"), t0));
        applied(r.apply(connect("other", 1, "elsewhere"), t0));
        let mut stays = client("stays", "stays", "g");
        stays.stats = Some(stats(7.0));
        let hb = heartbeat(
            "g",
            4,
            vec![
                stays,
                client("renamed", "New", "g"),
                client("new", "new", "g"),
            ],
            1000,
        );
        let b = applied(r.apply(hb, t0));
        assert_eq!(
            b,
            vec![
                Broadcast::Disconnect {
                    channel_name: "gone".into()
                },
                Broadcast::Rename {
                    channel_name: "renamed".into(),
                    name: "New".into()
                },
                Broadcast::Connect {
                    client: client("new", "new", "g")
                },
            ]
        );
        assert_eq!(r.get("stays").unwrap().stats, Some(stats(7.0)));
        assert!(r.get("elsewhere").is_some(), "other gateways are untouched");
        assert_eq!(r.take_delays(), None, "heartbeat stats update silently");
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn stale_heartbeat_is_ignored_but_events_apply() {
        let (mut r, t0) = warm();
        applied(r.apply(heartbeat("g", 1, vec![], 1000), t0));
        applied(r.apply(connect("g", 3, "a"), t0));
        // The heartbeat taken before the connect arrives after it.
        assert_eq!(r.apply(heartbeat("g", 2, vec![], 1000), t0), Outcome::Stale);
        assert!(r.get("a").is_some());
        // Events apply whatever their seq.
        applied(r.apply(connect("g", 2, "b"), t0));
        assert!(r.get("b").is_some());
        // A newer heartbeat applies.
        let b = applied(r.apply(heartbeat("g", 4, vec![client("a", "a", "g")], 1000), t0));
        assert_eq!(
            b,
            vec![Broadcast::Disconnect {
                channel_name: "b".into()
            }]
        );
    }

    #[test]
    fn restarted_gateway_is_accepted_after_an_interval() {
        let (mut r, t0) = warm();
        applied(r.apply(
            heartbeat("g", 100, vec![client("old", "old", "g")], 1000),
            t0,
        ));
        // The process restarts (no goodbye) and counts from 1 again.
        applied(r.apply(connect("g", 1, "new"), t0 + ms(300)));
        let hb = |seq| heartbeat("g", seq, vec![client("new", "new", "g")], 1000);
        assert_eq!(r.apply(hb(2), t0 + ms(1000)), Outcome::Stale);
        let b = applied(r.apply(hb(3), t0 + ms(2000)));
        assert_eq!(
            b,
            vec![Broadcast::Disconnect {
                channel_name: "old".into()
            }]
        );
        // From now on its own sequence rules.
        applied(r.apply(hb(4), t0 + ms(3000)));
    }

    #[test]
    fn warmup_adds_heartbeat_clients_silently() {
        let t0 = Instant::now();
        let mut r = Roster::new(t0 + ms(2500));
        assert!(r.is_warming(t0));
        let b = applied(r.apply(heartbeat("g", 1, vec![client("a", "a", "g")], 2000), t0));
        assert!(b.is_empty());
        let b = applied(r.apply(heartbeat("g", 2, vec![client("a", "A", "g")], 2000), t0));
        assert!(
            b.is_empty(),
            "renames learned from heartbeats are silent too"
        );
        assert_eq!(r.get("a").unwrap().name, "A");
        // Events are real news even during warm-up.
        let b = applied(r.apply(connect("g", 3, "b"), t0));
        assert_eq!(b.len(), 1);
        // After warm-up, a client only a heartbeat knows of is announced.
        let later = t0 + ms(2500);
        assert!(!r.is_warming(later));
        let hb = heartbeat(
            "g",
            4,
            vec![
                client("a", "A", "g"),
                client("b", "b", "g"),
                client("c", "c", "g"),
            ],
            2000,
        );
        let b = applied(r.apply(hb, later));
        assert_eq!(
            b,
            vec![Broadcast::Connect {
                client: client("c", "c", "g")
            }]
        );
        assert_eq!(
            r.snapshot(),
            Broadcast::Snapshot {
                clients: vec![
                    client("a", "A", "g"),
                    client("b", "b", "g"),
                    client("c", "c", "g")
                ]
            }
        );
    }

    #[test]
    fn silent_gateway_expires_after_three_intervals() {
        let (mut r, t0) = warm();
        applied(r.apply(
            heartbeat(
                "g",
                1,
                vec![client("a", "a", "g"), client("b", "b", "g")],
                1000,
            ),
            t0,
        ));
        applied(r.apply(
            heartbeat("live", 1, vec![client("c", "c", "live")], 1000),
            t0,
        ));
        let mut missed = 0;
        for step in 1..=6 {
            let now = t0 + ms(500 * step);
            applied(r.apply(
                heartbeat("live", 1 + step, vec![client("c", "c", "live")], 1000),
                now,
            ));
            let e = r.expire(now);
            missed += e.missed_heartbeats;
            assert!(e.gateways.is_empty(), "expired too early at {step}");
        }
        assert_eq!(missed, 2, "intervals 1 and 2 were missed");
        let e = r.expire(t0 + ms(3001));
        assert_eq!(e.gateways, vec!["g".to_owned()]);
        assert_eq!(e.clients, 2);
        assert_eq!(
            e.broadcasts,
            vec![
                Broadcast::Disconnect {
                    channel_name: "a".into()
                },
                Broadcast::Disconnect {
                    channel_name: "b".into()
                }
            ]
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r.gateway_count(), 1);
    }

    #[test]
    fn default_interval_applies_before_the_first_heartbeat() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 1, "a"), t0));
        assert!(r.expire(t0 + ms(6000)).gateways.is_empty());
        // Any report keeps the gateway alive.
        applied(r.apply(connect("g", 2, "b"), t0 + ms(5000)));
        assert!(r.expire(t0 + ms(11_000)).gateways.is_empty());
        assert_eq!(r.expire(t0 + ms(11_001)).clients, 2);
    }

    #[test]
    fn touch_all_gives_a_fresh_grace() {
        let (mut r, t0) = warm();
        applied(r.apply(heartbeat("g", 1, vec![client("a", "a", "g")], 1000), t0));
        r.touch_all(t0 + ms(2900));
        assert!(r.expire(t0 + ms(5000)).gateways.is_empty());
        assert_eq!(r.expire(t0 + ms(5901)).gateways, vec!["g".to_owned()]);
    }

    #[test]
    fn goodbye_removes_the_gateway_and_its_clients() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 10, "a"), t0));
        applied(r.apply(connect("h", 1, "b"), t0));
        let b = applied(r.apply(report("g", 11, GatewayUpdate::Goodbye), t0));
        assert_eq!(
            b,
            vec![Broadcast::Disconnect {
                channel_name: "a".into()
            }]
        );
        assert_eq!(r.gateway_count(), 1);
        assert_eq!(r.len(), 1);
        // Forgotten: a new process with the same id starts a fresh sequence.
        let b = applied(r.apply(heartbeat("g", 1, vec![client("c", "c", "g")], 1000), t0));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn delays_are_coalesced_per_tick() {
        let (mut r, t0) = warm();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            applied(r.apply(connect("g", i as u64 + 1, id), t0));
        }
        applied(r.apply(connect("h", 1, "d"), t0));
        let delays = |gw: &str, seq, items: &[(&str, f64)]| delay_report(gw, seq, None, items);
        assert!(applied(r.apply(delays("g", 4, &[("a", 1.0), ("b", 2.0)]), t0)).is_empty());
        applied(r.apply(delays("g", 5, &[("a", 3.0), ("unknown", 9.0)]), t0));
        applied(r.apply(delays("h", 2, &[("d", 4.0)]), t0));
        let expected: BTreeMap<String, DelayStats> = [("a", 3.0), ("b", 2.0), ("d", 4.0)]
            .into_iter()
            .map(|(id, v)| (id.to_owned(), stats(v)))
            .collect();
        assert_eq!(
            r.take_delays(),
            Some(Broadcast::Delays { delays: expected })
        );
        assert_eq!(r.take_delays(), None, "nothing changed since");
        assert_eq!(r.get("a").unwrap().stats, Some(stats(3.0)));
        // A client that left takes its pending update with it.
        applied(r.apply(delays("g", 6, &[("c", 5.0)]), t0));
        applied(r.apply(
            report(
                "g",
                7,
                GatewayUpdate::Disconnect {
                    channel_name: "c".into(),
                },
            ),
            t0,
        ));
        assert_eq!(r.take_delays(), None);
    }

    fn delay_report(
        gw: &str,
        seq: u64,
        tick_ms: Option<i64>,
        items: &[(&str, f64)],
    ) -> GatewayReport {
        report(
            gw,
            seq,
            GatewayUpdate::Delays {
                delays: items
                    .iter()
                    .map(|(id, v)| ((*id).to_owned(), stats(*v)))
                    .collect(),
                tick_ms,
            },
        )
    }

    fn tick_report(gw: &str, seq: u64, tick: i64, items: &[(&str, f64)]) -> GatewayReport {
        delay_report(gw, seq, Some(tick), items)
    }

    fn delays_of(b: Option<Broadcast>) -> Vec<String> {
        match b {
            Some(Broadcast::Delays { delays }) => delays.into_keys().collect(),
            other => panic!("expected delays, got {other:?}"),
        }
    }

    #[test]
    fn a_tick_is_broadcast_as_soon_as_every_gateway_closed_it() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 1, "a"), t0));
        applied(r.apply(connect("h", 1, "b"), t0));

        applied(r.apply(tick_report("g", 2, 1000, &[("a", 1.0)]), t0));
        assert_eq!(r.take_closed_delays(), None, "h has not closed 1000 yet");
        applied(r.apply(tick_report("h", 2, 1000, &[("b", 2.0)]), t0));
        assert_eq!(delays_of(r.take_closed_delays()), ["a", "b"]);
        assert_eq!(r.take_closed_delays(), None, "once per tick");
        assert_eq!(r.take_due_delays(1000), None, "the deadline finds it taken");

        // An empty report still closes the tick; nothing to broadcast.
        applied(r.apply(tick_report("g", 3, 1500, &[]), t0));
        applied(r.apply(tick_report("h", 3, 1500, &[]), t0));
        assert_eq!(r.take_closed_delays(), None);

        // h is late for 2000: the deadline broadcasts what is there, and h's
        // late report goes out with the next tick.
        applied(r.apply(tick_report("g", 4, 2000, &[("a", 3.0)]), t0));
        assert_eq!(r.take_closed_delays(), None);
        assert_eq!(delays_of(r.take_due_delays(2000)), ["a"]);
        applied(r.apply(tick_report("h", 4, 2000, &[("b", 4.0)]), t0));
        assert_eq!(r.take_closed_delays(), None, "2000 was taken already");
        applied(r.apply(tick_report("g", 5, 2500, &[]), t0));
        applied(r.apply(tick_report("h", 5, 2500, &[]), t0));
        assert_eq!(delays_of(r.take_closed_delays()), ["b"]);
        assert_eq!(r.get("b").unwrap().stats, Some(stats(4.0)));
    }

    #[test]
    fn a_gateway_that_does_not_close_ticks_leaves_it_to_the_deadline() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 1, "a"), t0));
        applied(r.apply(connect("old", 1, "b"), t0));
        applied(r.apply(tick_report("g", 2, 1000, &[("a", 1.0)]), t0));
        applied(r.apply(delay_report("old", 2, None, &[("b", 2.0)]), t0));
        assert_eq!(r.take_closed_delays(), None);
        assert_eq!(delays_of(r.take_due_delays(1000)), ["a", "b"]);
        // Once the silent gateway is gone, the others close ticks alone.
        applied(r.apply(report("old", 3, GatewayUpdate::Goodbye), t0));
        applied(r.apply(tick_report("g", 3, 1500, &[("a", 5.0)]), t0));
        assert_eq!(delays_of(r.take_closed_delays()), ["a"]);
    }
}
