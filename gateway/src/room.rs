//! The public room as one gateway sees it: the roster copy ([`Mirror`]),
//! the local public connections (v1 pages' queues, v2 pages grouped by
//! view) and the way to presence ([`ReporterHandle`]), behind one narrow
//! interface.
//!
//! Connections join, rename, note delays, choose their view and leave
//! through it; the roster feed hands it presence's broadcasts; a tick task
//! ([`Room::run_ticks`]) sends every v2 page what changed in its view, at
//! most one frame per tick (docs/protocol.md, "Public room: the view").
//!
//! Each lock (the mirror's, the v1 queues', the views') is held alone,
//! never across an await; frames are serialized once per distinct view.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use services::messages::{Broadcast, RosterClient};
use services::protocol::ViewSpec;
use services::stats::DelayStats;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::hub::{Outbox, Outboxes};
use crate::metrics::GatewayMetrics;
use crate::mirror::Mirror;
use crate::reporter::{Membership, ReporterHandle};
use crate::view::{self, Window};

/// Most cached `/api/roster` pages per tick; more distinct requests in one
/// tick are built each time (bounded by the API's per-address budget).
const API_CACHE_ENTRIES: usize = 256;

/// A public connection's place in the room, from [`Room::join`].
#[derive(Debug)]
pub struct Seat {
    key: u64,
    channel_name: String,
    v2: bool,
}

/// A v2 page in a view group.
struct Member {
    outbox: Outbox,
    channel_name: String,
}

/// How a tick's frames are queued: `slice` pages at a time, the slices
/// spread evenly over `spread` (`--view-fanout-spread-ms`,
/// `--view-fanout-slice`; docs/architecture.md, "The tick's fan-out").
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    /// The time over which one tick's slices are queued; zero queues them
    /// all at once.
    pub spread: Duration,
    /// Pages per slice.
    pub slice: usize,
}

/// One view's frame of a tick.
struct TickFrame {
    spec: ViewSpec,
    /// The frame; `None` when only some pages' `me` changed.
    frame: Option<Utf8Bytes>,
    total: usize,
    matched: usize,
}

/// A tick's frames and the pages they go to, queued slice by slice.
struct TickPlan {
    frames: Vec<TickFrame>,
    /// Each page's key and the index of its frame in `frames`.
    sends: Vec<(u64, usize)>,
    /// Own rows that joined or were renamed, as JSON, by id.
    mine: HashMap<String, String>,
}

/// The v2 pages that share one view, and what they were last sent.
struct Group {
    members: HashMap<u64, Member>,
    /// The window every member has (the base of the next tick's diff).
    last: Window,
    /// `last` as a `view` frame, serialized when first needed.
    full: Option<Utf8Bytes>,
}

/// The v2 pages by view.
#[derive(Default)]
struct Views {
    groups: HashMap<ViewSpec, Group>,
    /// Each seated v2 page's view.
    of: HashMap<u64, ViewSpec>,
    next: u64,
    /// The roster version of the last tick.
    ticked: Option<u64>,
}

/// The `/api/roster` pages built in the current tick.
#[derive(Default)]
struct ApiCache {
    tick: u64,
    pages: HashMap<ViewSpec, Bytes>,
}

/// The public room of this gateway.
pub struct Room {
    mirror: Mutex<Mirror>,
    v1: Mutex<Outboxes>,
    views: Mutex<Views>,
    api: Mutex<ApiCache>,
    ticks: AtomicU64,
    /// Woken by a `Delays` broadcast: presence closed a tick.
    delays_came: Notify,
    reporter: ReporterHandle,
    metrics: GatewayMetrics,
}

impl Room {
    /// A room reporting to presence through `reporter`.
    pub fn new(reporter: ReporterHandle, metrics: GatewayMetrics) -> Self {
        Self {
            mirror: Mutex::new(Mirror::default()),
            v1: Mutex::new(Outboxes::default()),
            views: Mutex::new(Views::default()),
            api: Mutex::new(ApiCache::default()),
            ticks: AtomicU64::new(0),
            delays_came: Notify::new(),
            reporter,
            metrics,
        }
    }

    /// Seats a public connection: the local roster copy lists it at once,
    /// presence is told, and its queue gets, for v1, every event from now
    /// on, for v2, the default view: its first `view` frame at once, then
    /// one frame per tick (`kick` is cancelled if the queue overflows).
    pub async fn join(
        &self,
        client: RosterClient,
        v2: bool,
        queue: mpsc::Sender<Utf8Bytes>,
        kick: CancellationToken,
    ) -> Seat {
        let channel_name = client.channel_name.clone();
        self.mirror().add_local(client.clone());
        let outbox = Outbox { tx: queue, kick };
        let key = if v2 {
            let me = self.me_json(&channel_name);
            let mut views = self.views();
            views.next += 1;
            let key = views.next;
            self.enter(
                &mut views,
                key,
                ViewSpec::default(),
                outbox,
                &channel_name,
                me,
            );
            key
        } else {
            self.v1.lock().expect("v1 lock").add(outbox)
        };
        self.reporter.send(Membership::Join(client)).await;
        Seat {
            key,
            channel_name,
            v2,
        }
    }

    /// Renames a seated client (pages learn it from presence's broadcast).
    pub async fn rename(&self, seat: &Seat, name: String) {
        self.reporter
            .send(Membership::Rename {
                channel_name: seat.channel_name.clone(),
                name,
            })
            .await;
    }

    /// Notes a seated client's new delay: in the roster copy at once (its
    /// v1 reply and its next view frame show it), to presence at the next
    /// roster tick.
    pub fn note_delay(&self, seat: &Seat, stats: DelayStats) {
        self.mirror().set_stats(&seat.channel_name, stats);
        self.reporter.note_delay(&seat.channel_name, stats);
    }

    /// Gives a v2 page the view `spec` from now on: the `view` frame
    /// answering it is queued after whatever the old view queued, so the
    /// page never applies an old view's update to the new window. A no-op
    /// for a v1 page.
    pub fn set_view(&self, seat: &Seat, spec: ViewSpec) {
        if !seat.v2 {
            return;
        }
        let me = self.me_json(&seat.channel_name);
        let mut views = self.views();
        let Some(member) = views.remove(seat.key) else {
            return; // kicked: the connection is ending
        };
        self.enter(
            &mut views,
            seat.key,
            spec,
            member.outbox,
            &seat.channel_name,
            me,
        );
    }

    /// Unseats a connection and tells presence it left.
    pub async fn leave(&self, seat: Seat) {
        if seat.v2 {
            self.views().remove(seat.key);
        } else {
            self.v1.lock().expect("v1 lock").remove(seat.key);
        }
        self.mirror().remove_local(&seat.channel_name);
        self.reporter
            .send(Membership::Leave {
                channel_name: seat.channel_name,
            })
            .await;
    }

    /// The v1 `delay_times` frame (the whole roster) for `seat`: shared
    /// bytes, with its own latest entry.
    pub fn v1_frame(&self, seat: &Seat) -> Utf8Bytes {
        self.mirror().v1_frame(Some(&seat.channel_name))
    }

    /// A page of the roster for the HTTP API, built by `build` from the
    /// roster copy once per tick for each distinct `spec` and then shared.
    pub fn api_page(&self, spec: &ViewSpec, build: impl FnOnce(&Mirror) -> Bytes) -> Bytes {
        let tick = self.ticks.load(Ordering::Relaxed);
        {
            let mut cache = self.api.lock().expect("api cache lock");
            if cache.tick != tick {
                cache.tick = tick;
                cache.pages.clear();
            }
            if let Some(page) = cache.pages.get(spec) {
                return page.clone();
            }
        }
        let page = build(&self.mirror());
        let mut cache = self.api.lock().expect("api cache lock");
        if cache.tick == tick && cache.pages.len() < API_CACHE_ENTRIES {
            cache.pages.insert(spec.clone(), page.clone());
        }
        page
    }

    /// Whether the roster copy agrees with presence's count and digest
    /// ([`Mirror::agrees_with`]).
    pub fn roster_agrees(&self, count: u64, digest: u64) -> bool {
        self.mirror().agrees_with(count, digest)
    }

    /// Applies one of presence's broadcasts to the roster copy and queues
    /// the resulting v1 frames, each serialized once, for every local v1
    /// page. v2 pages see the change at the next tick; a `Delays`
    /// broadcast (presence closed a tick) starts that tick at once.
    pub fn apply(&self, broadcast: Broadcast) {
        let started = Instant::now();
        let delays = matches!(broadcast, Broadcast::Delays { .. });
        let fanout = {
            let mut mirror = self.mirror();
            let fanout = mirror.apply(broadcast);
            self.metrics
                .roster_size
                .with_label_values(&[] as &[&str])
                .set(mirror.len() as i64);
            fanout
        };
        let mut dropped = 0;
        if !fanout.events.is_empty() {
            let mut v1 = self.v1.lock().expect("v1 lock");
            if !v1.is_empty() {
                for msg in fanout.events {
                    dropped += v1.fanout(&Utf8Bytes::from(msg.to_json()));
                }
            }
        }
        self.count_drops(dropped);
        if delays {
            self.delays_came.notify_one();
        }
        self.metrics
            .broadcast_fanout
            .with_label_values(&[] as &[&str])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Runs a tick ([`Room::tick`]) when presence's `Delays` broadcast of
    /// a tick arrives, or one `period` after the last tick if none comes
    /// (no delay changed anywhere), until `stop`. Ticks are at least half
    /// a period apart, so a page gets at most one frame per tick. Each
    /// tick's frames are queued over `spread` (at most a quarter of the
    /// period) in slices of `slice` pages ([`Room::tick`]).
    pub async fn run_ticks(&self, period: Duration, pacing: Pacing, stop: CancellationToken) {
        let pacing = Pacing {
            spread: pacing.spread.min(period / 4),
            slice: pacing.slice.max(1),
        };
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.delays_came.notified() => {
                    let earliest = last + period / 2;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep_until(earliest) => {}
                    }
                }
                _ = tokio::time::sleep_until(last + period) => {}
            }
            last = tokio::time::Instant::now();
            self.tick(pacing).await;
        }
    }

    /// One tick: every view whose window changed gets one frame, computed
    /// and serialized once for all its pages (the whole window if its rows
    /// moved, else the changed rows and the counts); a page whose own row
    /// joined or was renamed gets it as `me` in the same frame. O(view) per
    /// distinct view, O(1) per page: the room's delays never make a page's
    /// frame its own copy.
    ///
    /// The frames are queued `pacing.slice` pages at a time, the slices
    /// spread evenly over `pacing.spread` (docs/architecture.md, "The
    /// tick's fan-out"): the same shared bytes handed to every page at
    /// once wake every connection task in one burst. A page that left or
    /// moved to another view meanwhile is skipped; one seated in the view
    /// meanwhile already has the new window, and the tick's frame brings
    /// it nothing new.
    pub async fn tick(&self, pacing: Pacing) {
        let started = Instant::now();
        let Some(plan) = self.plan_tick() else {
            return;
        };
        self.metrics
            .view_tick
            .with_label_values(&[] as &[&str])
            .observe(started.elapsed().as_secs_f64());
        let slices = plan.sends.len().div_ceil(pacing.slice);
        let begun = tokio::time::Instant::now();
        for (i, slice) in plan.sends.chunks(pacing.slice).enumerate() {
            if i > 0 && !pacing.spread.is_zero() {
                let at = begun + pacing.spread.mul_f64(i as f64 / slices as f64);
                tokio::time::sleep_until(at).await;
            }
            self.offer_slice(&plan, slice);
        }
        self.metrics
            .view_fanout
            .with_label_values(&[] as &[&str])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Computes a tick's frames (one per view whose window changed) and
    /// the pages to send them to, and moves every group to its new window.
    /// `None` when the roster did not change since the last tick.
    fn plan_tick(&self) -> Option<TickPlan> {
        self.ticks.fetch_add(1, Ordering::Relaxed);
        let (specs, ticked) = {
            let views = self.views();
            (
                views.groups.keys().cloned().collect::<Vec<_>>(),
                views.ticked,
            )
        };
        let v1_pages = !self.v1.lock().expect("v1 lock").is_empty();
        let (version, windows, mine) = {
            let mut mirror = self.mirror();
            if v1_pages {
                mirror.refresh_v1();
            }
            let version = mirror.version();
            if ticked == Some(version) {
                return None;
            }
            let renamed = mirror.take_renamed();
            let windows: Vec<(ViewSpec, Window)> = specs
                .into_iter()
                .map(|s| {
                    let w = mirror.window(&s);
                    (s, w)
                })
                .collect();
            // Own rows that joined or were renamed (only this gateway's
            // pages have one): their pages get `me` with the name.
            let mine: HashMap<String, String> = renamed
                .into_iter()
                .filter_map(|id| {
                    let row = mirror.row(&id)?;
                    Some((id, row.to_json()))
                })
                .collect();
            (version, windows, mine)
        };
        let mut plan = TickPlan {
            frames: Vec::new(),
            sends: Vec::new(),
            mine,
        };
        let mut views = self.views();
        views.ticked = Some(version);
        for (spec, w) in windows {
            let Some(group) = views.groups.get_mut(&spec) else {
                continue;
            };
            if group.last.version > w.version {
                // Seated after this tick's windows were taken: it
                // already has a newer one.
                continue;
            }
            let frame = view::diff_frame(&spec, &group.last, &w).map(Utf8Bytes::from);
            if frame
                .as_ref()
                .is_some_and(|f| f.as_str().starts_with(r#"{"command":"view","#))
            {
                group.full = frame.clone();
            } else if frame.is_some() {
                group.full = None;
            }
            let (total, matched) = (w.total, w.matched);
            group.last = w;
            let index = plan.frames.len();
            let before = plan.sends.len();
            plan.sends.extend(
                group
                    .members
                    .iter()
                    .filter(|(_, m)| frame.is_some() || plan.mine.contains_key(&m.channel_name))
                    .map(|(key, _)| (*key, index)),
            );
            if plan.sends.len() > before {
                plan.frames.push(TickFrame {
                    spec,
                    frame,
                    total,
                    matched,
                });
            }
        }
        Some(plan)
    }

    /// Queues a tick's frame for the pages of `slice` that are still in
    /// the view the frame was computed for, with
    /// `me` for those whose own row joined or was renamed (a `view_update`
    /// of the counts and `me` alone when the view has no frame this tick).
    /// Slow pages are kicked and removed.
    fn offer_slice(&self, plan: &TickPlan, slice: &[(u64, usize)]) {
        let mut kicked = Vec::new();
        let mut views = self.views();
        for &(key, index) in slice {
            let f = &plan.frames[index];
            let Some(group) = views.groups.get(&f.spec) else {
                continue;
            };
            let Some(m) = group.members.get(&key) else {
                continue;
            };
            let me = plan.mine.get(&m.channel_name);
            let out = match (&f.frame, me) {
                (None, None) => continue,
                (Some(frame), None) => frame.clone(),
                (Some(frame), Some(me)) => Utf8Bytes::from(view::with_me(frame.as_str(), me)),
                (None, Some(me)) => Utf8Bytes::from(view::with_me(
                    &view::update_frame(f.total, f.matched, &[]),
                    me,
                )),
            };
            if !m.outbox.offer(out) {
                kicked.push(key);
            }
        }
        for k in &kicked {
            views.remove(*k);
        }
        if !kicked.is_empty() {
            self.metrics
                .views
                .with_label_values(&[] as &[&str])
                .set(views.groups.len() as i64);
        }
        drop(views);
        self.count_drops(kicked.len());
    }

    /// Puts a v2 page in the group of `spec` (creating it with the current
    /// window) and queues the group's `view` frame with the page's own row
    /// for it. Under the views lock, so no tick's frame can come before it.
    fn enter(
        &self,
        views: &mut Views,
        key: u64,
        spec: ViewSpec,
        outbox: Outbox,
        channel_name: &str,
        me: Option<String>,
    ) {
        views.of.insert(key, spec.clone());
        let group = views.groups.entry(spec.clone()).or_insert_with(|| Group {
            members: HashMap::new(),
            // Lock order: views, then mirror (nothing takes them the other
            // way round).
            last: self.mirror().window(&spec),
            full: None,
        });
        let frame = group_frame(&spec, group, me.as_deref());
        if outbox.offer(frame) {
            group.members.insert(
                key,
                Member {
                    outbox,
                    channel_name: channel_name.to_owned(),
                },
            );
        } else {
            views.remove(key);
            self.count_drops(1);
        }
        self.metrics
            .views
            .with_label_values(&[] as &[&str])
            .set(views.groups.len() as i64);
    }

    fn me_json(&self, channel_name: &str) -> Option<String> {
        self.mirror().row(channel_name).map(|r| r.to_json())
    }

    fn count_drops(&self, dropped: usize) {
        if dropped > 0 {
            self.metrics
                .outbound_drops
                .with_label_values(&[] as &[&str])
                .inc_by(dropped as u64);
        }
    }

    fn mirror(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.mirror.lock().expect("mirror lock")
    }

    fn views(&self) -> std::sync::MutexGuard<'_, Views> {
        self.views.lock().expect("views lock")
    }
}

impl Views {
    /// Takes a page out of its group (the group goes when empty).
    fn remove(&mut self, key: u64) -> Option<Member> {
        let spec = self.of.remove(&key)?;
        let group = self.groups.get_mut(&spec)?;
        let member = group.members.remove(&key);
        if group.members.is_empty() {
            self.groups.remove(&spec);
        }
        member
    }
}

/// The group's `view` frame (serialized once, kept), with `me` added.
fn group_frame(spec: &ViewSpec, group: &mut Group, me: Option<&str>) -> Utf8Bytes {
    let full = group
        .full
        .get_or_insert_with(|| Utf8Bytes::from(view::full_frame(spec, &group.last)));
    match me {
        Some(me) => Utf8Bytes::from(view::with_me(full.as_str(), me)),
        None => full.clone(),
    }
}
