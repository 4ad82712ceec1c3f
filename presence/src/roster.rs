//! The roster as a pure state machine: gateway reports and the passing of
//! time go in, the broadcasts to publish come out. No bus, no clock of its
//! own (every method takes `now`), so every rule is unit-testable.
//!
//! Rules, in short:
//! - Events (connect, rename, disconnect, delays, goodbye) always apply;
//!   connect, rename and disconnect are always broadcast, because the page
//!   that caused them waits for their echo.
//! - A heartbeat carries the count and digest of a gateway's public
//!   clients ([`services::messages::client_digest`]); when they differ from
//!   what the roster holds for that gateway (a lost event, a restart of
//!   either side, a gateway not known yet), presence asks that gateway for
//!   its full list ([`Roster::take_sync_requests`]), at most once per two
//!   of its heartbeat intervals while the answer is awaited. The list comes
//!   in pieces; the last one reconciles the roster with their union. An
//!   older gateway's heartbeat is itself the full list and reconciles at
//!   once. A heartbeat older than an event already applied (lower `seq`)
//!   is stale and ignored.
//! - During warm-up (after presence starts) clients learned from heartbeats
//!   are added silently: the pages already have them.
//! - A gateway silent for [`MISSED_HEARTBEATS`] heartbeat intervals is
//!   expired with all its clients.
//! - Delay updates are coalesced and leave as one broadcast per tick.
//! - A gateway speaks only for its own clients (docs/security.md, "The
//!   bus"): a connect, rename or disconnect of a client that another
//!   gateway holds is refused, and so are the entries of such clients in
//!   its heartbeats, pieces and delay reports. A heartbeat (by its count or
//!   its list), a list of pieces or a connect that would give one gateway
//!   more than its cap of clients is refused.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use services::messages::{Broadcast, GatewayReport, GatewayUpdate, RosterClient, client_digest};
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
    /// The pieces of its full list received so far.
    assembly: Option<Assembly>,
    /// When its full list was last asked for and not yet received.
    sync_asked: Option<Instant>,
}

/// A gateway's full list being put together from its pieces.
#[derive(Debug, Clone)]
struct Assembly {
    /// The piece expected next.
    next_part: u32,
    /// The `seq` of the last piece (pieces come in consecutive reports).
    last_seq: u64,
    /// The clients so far.
    clients: Vec<RosterClient>,
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
            assembly: None,
            sync_asked: None,
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
    /// The digest of each gateway's clients, kept with `clients`.
    digests: HashMap<String, u64>,
    /// The digest of the whole roster.
    digest: u64,
    /// Gateways whose full list is to be asked for.
    wanted_syncs: Vec<String>,
    /// Piece sequences broken (a piece missing or out of order) since the
    /// last [`Roster::take_broken_pieces`].
    broken_pieces: u64,
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
            digests: HashMap::new(),
            digest: 0,
            wanted_syncs: Vec::new(),
            broken_pieces: 0,
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

    /// The gateways whose full list must be asked for now (their heartbeat
    /// disagreed with the roster), since the last call.
    pub fn take_sync_requests(&mut self) -> Vec<String> {
        std::mem::take(&mut self.wanted_syncs)
    }

    /// Piece sequences dropped because a piece was missing or out of
    /// order, since the last call (the gateway is asked again).
    pub fn take_broken_pieces(&mut self) -> u64 {
        std::mem::take(&mut self.broken_pieces)
    }

    /// The count and digest of the whole roster, as the periodic
    /// [`Broadcast::Digest`] carries them.
    pub fn digest(&self) -> Broadcast {
        Broadcast::Digest {
            count: self.clients.len() as u64,
            digest: self.digest,
        }
    }

    /// One page of the roster in id order: at most `limit` clients after
    /// `after`, and the cursor of the next page if there is one.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<RosterClient>, Option<String>) {
        use std::ops::Bound;
        let from = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Unbounded,
        };
        let mut range = self.clients.range((from, Bound::Unbounded));
        let page: Vec<RosterClient> = range.by_ref().take(limit).map(|(_, c)| c.clone()).collect();
        let next = match (range.next(), page.last()) {
            (Some(_), Some(last)) => Some(last.channel_name.clone()),
            _ => None,
        };
        (page, next)
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
            GatewayUpdate::Heartbeat { clients, count, .. } => (clients.len()
                > self.max_per_gateway
                || count.is_some_and(|n| n > self.max_per_gateway as u64))
            .then_some(Refusal::TooManyClients),
            GatewayUpdate::Clients { clients, part, .. } => {
                let so_far = match self.gateways.get(gateway).and_then(|g| g.assembly.as_ref()) {
                    Some(a) if *part > 0 => a.clients.len(),
                    _ => 0,
                };
                (so_far + clients.len() > self.max_per_gateway).then_some(Refusal::TooManyClients)
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
            if let Some(state) = self.gateways.get_mut(&gateway)
                && matches!(update, GatewayUpdate::Clients { .. })
            {
                state.assembly = None;
            }
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
                self.rename(&channel_name, &name);
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
            GatewayUpdate::Heartbeat {
                count: Some(count),
                digest,
                ..
            } => {
                let held = self.held.get(&gateway).copied().unwrap_or(0) as u64;
                let ours = self.digests.get(&gateway).copied().unwrap_or(0);
                if held != count || digest.is_some_and(|d| d != ours) {
                    self.want_sync(&gateway, now);
                }
                Vec::new()
            }
            GatewayUpdate::Heartbeat { clients, .. } => self.reconcile(&gateway, clients, now),
            GatewayUpdate::Clients {
                part,
                last,
                clients,
            } => self.piece(&gateway, seq, part, last, clients, now),
            GatewayUpdate::Goodbye => {
                self.gateways.remove(&gateway);
                self.remove_gateway_clients(&gateway)
            }
        };
        Outcome::Applied(broadcasts)
    }

    /// Asks for `gateway`'s full list unless it was asked for less than two
    /// heartbeat intervals ago and has not come yet.
    fn want_sync(&mut self, gateway: &str, now: Instant) {
        let Some(state) = self.gateways.get_mut(gateway) else {
            return;
        };
        if state
            .sync_asked
            .is_some_and(|at| now.saturating_duration_since(at) < state.interval * 2)
        {
            return;
        }
        state.sync_asked = Some(now);
        self.wanted_syncs.push(gateway.to_owned());
    }

    /// Adds one piece of `gateway`'s full list; the last one reconciles.
    fn piece(
        &mut self,
        gateway: &str,
        seq: u64,
        part: u32,
        last: bool,
        clients: Vec<RosterClient>,
        now: Instant,
    ) -> Vec<Broadcast> {
        let state = self.gateways.get_mut(gateway).expect("inserted by apply");
        let assembly = if part == 0 {
            state.assembly.insert(Assembly {
                next_part: 0,
                last_seq: seq.wrapping_sub(1),
                clients: Vec::new(),
            })
        } else {
            match state.assembly.as_mut() {
                Some(a) if a.next_part == part && a.last_seq.wrapping_add(1) == seq => a,
                _ => {
                    // A piece is missing: this list cannot be trusted whole.
                    state.assembly = None;
                    state.sync_asked = None;
                    self.broken_pieces += 1;
                    self.want_sync(gateway, now);
                    return Vec::new();
                }
            }
        };
        assembly.next_part = part + 1;
        assembly.last_seq = seq;
        assembly.clients.extend(clients);
        if !last {
            return Vec::new();
        }
        let all = state.assembly.take().expect("assembling").clients;
        state.sync_asked = None;
        self.reconcile(gateway, all, now)
    }

    /// Makes the clients of `gateway` exactly those of its full list (a
    /// legacy heartbeat, or the union of its pieces).
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
            let renamed = self
                .clients
                .get(&client.channel_name)
                .is_some_and(|known| known.name != client.name);
            if renamed {
                self.rename(&client.channel_name, &client.name);
            }
            match self.clients.get_mut(&client.channel_name) {
                Some(known) => {
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
    /// per-gateway counts and digests.
    fn insert(&mut self, client: RosterClient) {
        let gateway = client.gateway.clone();
        let d = client_digest(&client.channel_name, &client.name);
        if let Some(old) = self.clients.insert(client.channel_name.clone(), client) {
            self.uncount(&old);
        }
        *self.held.entry(gateway.clone()).or_default() += 1;
        *self.digests.entry(gateway).or_default() ^= d;
        self.digest ^= d;
    }

    /// Takes `old` out of its gateway's count and digest.
    fn uncount(&mut self, old: &RosterClient) {
        let d = client_digest(&old.channel_name, &old.name);
        self.digest ^= d;
        if let Some(n) = self.held.get_mut(&old.gateway) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&old.gateway);
                self.digests.remove(&old.gateway);
            } else if let Some(g) = self.digests.get_mut(&old.gateway) {
                *g ^= d;
            }
        }
    }

    /// Renames a known client, keeping the digests.
    fn rename(&mut self, channel_name: &str, name: &str) {
        let Some(c) = self.clients.get_mut(channel_name) else {
            return;
        };
        let d = client_digest(channel_name, &c.name) ^ client_digest(channel_name, name);
        c.name = name.to_owned();
        let gateway = c.gateway.clone();
        self.digest ^= d;
        *self.digests.entry(gateway).or_default() ^= d;
    }

    fn remove(&mut self, channel_name: &str) -> Option<RosterClient> {
        self.pending.remove(channel_name);
        let gone = self.clients.remove(channel_name)?;
        self.uncount(&gone);
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
                count: None,
                digest: None,
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

    fn digest_of(clients: &[RosterClient]) -> u64 {
        clients
            .iter()
            .fold(0, |d, c| d ^ client_digest(&c.channel_name, &c.name))
    }

    fn digest_heartbeat(gw: &str, seq: u64, clients: &[RosterClient]) -> GatewayReport {
        report(
            gw,
            seq,
            GatewayUpdate::Heartbeat {
                clients: vec![],
                interval_ms: 1000,
                count: Some(clients.len() as u64),
                digest: Some(digest_of(clients)),
            },
        )
    }

    fn piece(gw: &str, seq: u64, part: u32, last: bool, clients: &[RosterClient]) -> GatewayReport {
        report(
            gw,
            seq,
            GatewayUpdate::Clients {
                part,
                last,
                clients: clients.to_vec(),
            },
        )
    }

    #[test]
    fn a_matching_digest_heartbeat_asks_nothing_a_differing_one_asks_once() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 1, "a"), t0));
        applied(r.apply(
            report(
                "g",
                2,
                GatewayUpdate::Rename {
                    channel_name: "a".into(),
                    name: "Ann".into(),
                },
            ),
            t0,
        ));
        let a = client("a", "Ann", "g");
        assert!(
            applied(r.apply(digest_heartbeat("g", 3, std::slice::from_ref(&a)), t0)).is_empty()
        );
        assert!(r.take_sync_requests().is_empty(), "in agreement");
        // Presence missed the connect of b.
        let b = client("b", "b", "g");
        let both = [a.clone(), b.clone()];
        applied(r.apply(digest_heartbeat("g", 5, &both), t0));
        assert_eq!(r.take_sync_requests(), ["g"]);
        applied(r.apply(digest_heartbeat("g", 6, &both), t0 + ms(1000)));
        assert!(r.take_sync_requests().is_empty(), "asked already");
        // The answer, in two pieces: b is announced when the last arrives.
        assert!(
            applied(r.apply(
                piece("g", 7, 0, false, std::slice::from_ref(&a)),
                t0 + ms(1100)
            ))
            .is_empty()
        );
        let out = applied(r.apply(
            piece("g", 8, 1, true, std::slice::from_ref(&b)),
            t0 + ms(1100),
        ));
        assert_eq!(out, vec![Broadcast::Connect { client: b }]);
        applied(r.apply(digest_heartbeat("g", 9, &both), t0 + ms(1200)));
        assert!(r.take_sync_requests().is_empty(), "in agreement again");
        assert_eq!(
            r.digest(),
            Broadcast::Digest {
                count: 2,
                digest: digest_of(&both)
            }
        );
        // Still differing two intervals after asking: asked again.
        let lone = [client("z", "z", "g")];
        applied(r.apply(digest_heartbeat("g", 10, &lone), t0 + ms(1300)));
        assert_eq!(r.take_sync_requests(), ["g"]);
        applied(r.apply(digest_heartbeat("g", 11, &lone), t0 + ms(3400)));
        assert_eq!(r.take_sync_requests(), ["g"]);
    }

    #[test]
    fn a_missing_piece_drops_the_list_and_asks_again() {
        let (mut r, t0) = warm();
        applied(r.apply(connect("g", 1, "a"), t0));
        applied(r.apply(piece("g", 2, 0, false, &[client("x", "x", "g")]), t0));
        // Piece 1 was lost.
        assert!(applied(r.apply(piece("g", 4, 2, true, &[client("y", "y", "g")]), t0)).is_empty());
        assert_eq!(r.take_broken_pieces(), 1);
        assert_eq!(r.take_sync_requests(), ["g"]);
        assert!(
            r.get("x").is_none() && r.get("a").is_some(),
            "nothing changed"
        );
    }

    #[test]
    fn the_cap_applies_to_the_count_and_to_the_pieces() {
        let (mut r, t0) = warm();
        let mut r2 = r.clone().with_max_clients_per_gateway(2);
        let three: Vec<RosterClient> = ["a", "b", "c"]
            .iter()
            .map(|id| client(id, id, "g"))
            .collect();
        assert_eq!(
            r2.apply(digest_heartbeat("g", 1, &three), t0),
            Outcome::Refused(Refusal::TooManyClients)
        );
        applied(r2.apply(piece("g", 2, 0, false, &three[..2]), t0));
        assert_eq!(
            r2.apply(piece("g", 3, 1, true, &three[2..]), t0),
            Outcome::Refused(Refusal::TooManyClients)
        );
        assert!(r2.is_empty(), "nothing of a refused list is applied");
        // Another gateway's client in a piece is skipped.
        applied(r.apply(connect("h", 1, "b"), t0));
        applied(r.apply(piece("g", 1, 0, true, &three), t0));
        assert_eq!(r.take_refused_entries(), 1);
        assert_eq!(r.get("b").unwrap().gateway, "h");
    }

    #[test]
    fn pages_walk_the_roster_in_id_order() {
        let (mut r, t0) = warm();
        for (i, id) in ["c", "a", "d", "b", "e"].into_iter().enumerate() {
            applied(r.apply(connect("g", i as u64 + 1, id), t0));
        }
        let (p, next) = r.page(None, 2);
        assert_eq!(
            p.iter()
                .map(|c| c.channel_name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(next.as_deref(), Some("b"));
        let (p, next) = r.page(next.as_deref(), 2);
        assert_eq!(
            p.iter()
                .map(|c| c.channel_name.as_str())
                .collect::<Vec<_>>(),
            ["c", "d"]
        );
        let (p, next) = r.page(next.as_deref(), 2);
        assert_eq!(p.len(), 1);
        assert_eq!(next, None, "the last page says so");
    }
}
