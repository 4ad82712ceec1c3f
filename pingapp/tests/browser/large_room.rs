//! A room of 10,000: the public page against 10,000 synthetic public
//! clients (plain WebSockets from this test, [`Crowd`]). The page must keep
//! only the rows near the screen in the DOM and show the right rows after
//! scrolling, sorting and filtering while the room changes. It also
//! records long tasks (`PerformanceObserver` "longtask") and frame times
//! (`requestAnimationFrame` deltas) and prints them: docs/benchmarks.md
//! keeps the figures; the test asserts correctness and the DOM bound, never
//! a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Act, Browser, Crowd, Driver, Server};

const N: usize = 10_000;

fn name(i: usize) -> String {
    format!("user {i:05}")
}

/// Distinct for every client: 0.0 to 999.9 ms.
fn delay(i: usize) -> f64 {
    ((i * 7919) % N) as f64 / 10.0
}

/// What the test knows of the room (the crowd; the page's own client is
/// added where it sorts).
struct Room {
    ids: Vec<String>,
    present: BTreeSet<usize>,
    names: BTreeMap<usize, String>,
    delays: BTreeMap<usize, f64>,
}

impl Room {
    /// The crowd's names in the list's order for `sort` and `order`, with
    /// `filter` (case-insensitive, contained), without the clients in
    /// `gone` (disconnected by the server).
    fn names(&self, gone: &BTreeSet<usize>, sort: &str, order: &str, filter: &str) -> Vec<String> {
        let filter = filter.to_lowercase();
        let mut rows: Vec<usize> = self
            .present
            .iter()
            .copied()
            .filter(|i| !gone.contains(i) && self.names[i].to_lowercase().contains(&filter))
            .collect();
        match sort {
            "name" => rows.sort_by(|a, b| {
                (self.names[a].to_lowercase(), &self.names[a], &self.ids[*a]).cmp(&(
                    self.names[b].to_lowercase(),
                    &self.names[b],
                    &self.ids[*b],
                ))
            }),
            _ => rows.sort_by(|a, b| {
                self.delays[a]
                    .total_cmp(&self.delays[b])
                    .then(self.ids[*a].cmp(&self.ids[*b]))
            }),
        }
        if order == "desc" {
            rows.reverse();
        }
        rows.into_iter().map(|i| self.names[&i].clone()).collect()
    }
}

/// JavaScript: the list's rows on screen (below the sticky header), by
/// position: `{first, matched, rows: [{pos, name, placeholder, self}]}`,
/// a missing row as null.
const VISIBLE_JS: &str = r#"
const s = document.querySelector('.table-wrap');
const tb = document.querySelector('#roster tbody');
const rowH = parseFloat(getComputedStyle(tb).getPropertyValue('--row-h'));
const matched = Number(document.getElementById('client-count').dataset.matched);
const first = Math.floor(s.scrollTop / rowH);
const last = Math.min(matched, Math.ceil((s.scrollTop + s.clientHeight - tb.offsetTop) / rowH));
const byPos = new Map([...tb.children].map((tr) => [Number(tr.getAttribute('aria-rowindex')) - 2, tr]));
const rows = [];
for (let pos = first; pos < last; pos++) {
  const tr = byPos.get(pos);
  rows.push(tr ? {
    pos,
    name: tr.querySelector('.name-text').textContent,
    placeholder: tr.classList.contains('placeholder'),
    self: tr.dataset.self === 'true',
  } : null);
}
return { first, matched, rows };
"#;

/// JavaScript: starts recording long tasks, frame times and the largest
/// DOM seen into `window.__perf`.
const RECORD_JS: &str = r#"
const p = { long: [], frames: [], maxRows: 0, maxNodes: 0, on: true };
window.__perf = p;
p.observer = new PerformanceObserver((list) => {
  for (const e of list.getEntries()) p.long.push(e.duration);
});
p.observer.observe({ type: 'longtask' });
let last = performance.now();
const tick = (t) => {
  p.frames.push(t - last);
  last = t;
  p.maxRows = Math.max(p.maxRows, document.querySelector('#roster tbody').children.length);
  p.maxNodes = Math.max(p.maxNodes, document.getElementsByTagName('*').length);
  if (p.on) requestAnimationFrame(tick);
};
requestAnimationFrame(tick);
"#;

/// JavaScript: stops the recording; returns its figures.
const STOP_JS: &str = r#"
const p = window.__perf;
p.on = false;
p.observer.disconnect();
const f = p.frames.slice(1).sort((a, b) => a - b);
const q = (x) => f.length ? f[Math.min(f.length - 1, Math.floor(x * f.length))] : null;
return {
  long_tasks: p.long.length,
  long_total_ms: p.long.reduce((a, b) => a + b, 0),
  long_max_ms: p.long.length ? Math.max(...p.long) : 0,
  frames: f.length,
  frame_p50_ms: q(0.5), frame_p95_ms: q(0.95), frame_p99_ms: q(0.99),
  frame_max_ms: f.length ? f[f.length - 1] : null,
  frames_over_50ms: f.filter((x) => x > 50).length,
  max_rows: p.maxRows,
  max_nodes: p.maxNodes,
};
"#;

/// JavaScript (async): scrolls the table from top to bottom (or back up)
/// over `frames` animation frames, like a long fling.
fn scroll_js(frames: u32, down: bool) -> String {
    let at = if down { "n" } else { "(FRAMES - n)" };
    format!(
        r#"
const done = arguments[arguments.length - 1];
const s = document.querySelector('.table-wrap');
const FRAMES = {frames};
let n = 0;
const step = () => {{
  n += 1;
  s.scrollTop = (s.scrollHeight - s.clientHeight) * {at} / FRAMES;
  if (n < FRAMES) requestAnimationFrame(step); else done(s.scrollTop);
}};
requestAnimationFrame(step);
"#
    )
}

/// The most rows the page may render: a screen plus the overscan
/// (gateway/assets/view.js).
async fn dom_bound(b: &Browser) -> u64 {
    b.js("const s = document.querySelector('.table-wrap'); \
          const rowH = parseFloat(getComputedStyle(document.querySelector('#roster tbody')).getPropertyValue('--row-h')); \
          return Math.ceil(s.clientHeight / rowH) + 1 + 2 * 6;")
        .await
        .as_u64()
        .unwrap()
}

/// Waits until the rows on screen are exactly the expected ones: the
/// page's own row first when `own_first`, then the crowd's names in the
/// order `expected()` gives (asked again on every poll, as the server may
/// disconnect a client meanwhile).
async fn wait_visible(
    b: &Browser,
    what: &str,
    expected: impl Fn() -> Vec<String>,
    own_first: bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let expected = expected();
        let v = b.js(VISIBLE_JS).await;
        let rows = v["rows"].as_array().unwrap();
        let mut problem = None;
        if rows.is_empty() {
            problem = Some("no rows on screen".to_owned());
        }
        for r in rows {
            if r.is_null() {
                problem = Some(format!("a row on screen is missing: {v}"));
                break;
            }
            if r["placeholder"] == true {
                problem = Some(format!("a placeholder on screen: {r}"));
                break;
            }
            let pos = r["pos"].as_u64().unwrap() as usize;
            let crowd_pos = if own_first {
                pos.checked_sub(1)
            } else {
                Some(pos)
            };
            if own_first && pos == 0 {
                if r["self"] != true {
                    problem = Some(format!("the own row is not first: {r}"));
                    break;
                }
                continue;
            }
            let want = crowd_pos.and_then(|p| expected.get(p));
            if want.map(String::as_str) != r["name"].as_str() {
                problem = Some(format!("row {pos}: {r}, expected {want:?}"));
                break;
            }
        }
        match problem {
            None => return,
            Some(p) if Instant::now() > deadline => panic!("{what}: {p}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Clicks a sort header (`name` or `delay`).
async fn click_sort(b: &Browser, key: &str) {
    b.js(&format!(
        "document.querySelector('#roster th[data-sort=\"{key}\"] button').click()"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_of_10000_scrolls_sorts_and_filters_with_a_bounded_dom() {
    // One address for everyone (no per-IP caps), the crowd's delays
    // reported without waiting for their pongs, and the default roster
    // tick and heartbeat: the fast ones of the other tests would fan the
    // count out to 10,000 clients 20 times a second on a debug build.
    let server = Server::start(&[
        "--roster-tick-ms",
        "500",
        "--max-connections-per-ip",
        "0",
        "--max-connects-per-ip-per-second",
        "0",
        "--max-delay-excess-ms",
        "60000",
    ]);
    let t0 = Instant::now();
    let mut crowd = Crowd::join(&server, N, name, delay).await;
    eprintln!("{N} clients joined in {:?}", t0.elapsed());
    let mut room = Room {
        ids: crowd.ids.clone(),
        present: (0..N).collect(),
        names: (0..N).map(|i| (i, name(i))).collect(),
        delays: (0..N).map(|i| (i, delay(i))).collect(),
    };

    let driver = Driver::start();
    let b = driver.browser().await;
    b.goto(&server.url("/public/")).await;
    b.wait_open().await;
    b.wait_for_within(
        "the room's count",
        &format!(
            "document.getElementById('client-count').dataset.count === '{}'",
            N + 1
        ),
        Duration::from_secs(60),
    )
    .await;
    let bound = dom_bound(&b).await;
    // By name the own id (hexadecimal) comes first, then "user 00000"….
    wait_visible(
        &b,
        "the first rows by name",
        || room.names(&crowd.gone(), "name", "asc", ""),
        true,
    )
    .await;

    // 1. A fling from top to bottom in a quiet room (the baseline), and
    // back up while the room changes: delays (500 a second), renames (20 a
    // second, each keeps its place) and leaves (4 a second).
    b.js(RECORD_JS).await;
    let end = b.js_async(&scroll_js(180, true)).await;
    let quiet = b.js(STOP_JS).await;
    eprintln!("large room, fling to the bottom, the room quiet: {quiet}");
    assert!(end.as_f64().unwrap() > 300_000.0, "scrolled to {end}");
    assert!(
        quiet["max_rows"].as_u64().unwrap() <= bound,
        "at most {bound} rows in the DOM while scrolling: {quiet}"
    );
    wait_visible(
        &b,
        "the last rows by name",
        || room.names(&crowd.gone(), "name", "asc", ""),
        true,
    )
    .await;
    b.js(RECORD_JS).await;
    let changes = async {
        let mut rng = 1u64;
        let mut next = |m: usize| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as usize % m
        };
        for step in 0..60_u32 {
            for _ in 0..25 {
                let i = next(N);
                if room.present.contains(&i) {
                    let d = 1000.0 + delay(i);
                    crowd.send(i, Act::Sample(d));
                    room.delays.insert(i, d);
                }
            }
            let i = next(N);
            if room.present.contains(&i) && !room.names[&i].ends_with(" x") {
                let renamed = format!("{} x", name(i));
                crowd.send(i, Act::Rename(renamed.clone()));
                room.names.insert(i, renamed);
            }
            if step.is_multiple_of(5) {
                let i = next(N);
                if room.present.remove(&i) {
                    crowd.leave(i);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let fling_js = scroll_js(180, false);
    let (end, ()) = tokio::join!(b.js_async(&fling_js), changes);
    let fling = b.js(STOP_JS).await;
    eprintln!("large room, fling back to the top while the room changes: {fling}");
    assert_eq!(end, json!(0), "scrolled back to the top");
    assert!(
        fling["max_rows"].as_u64().unwrap() <= bound,
        "at most {bound} rows in the DOM while scrolling: {fling}"
    );
    assert!(fling["max_nodes"].as_u64().unwrap() < 2000, "{fling}");
    // The count: the crowd without those that left or that the server
    // disconnected, and the page.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let want =
            (room.present.len() - crowd.gone().intersection(&room.present).count() + 1).to_string();
        let count = b
            .js("return document.getElementById('client-count').dataset.count")
            .await;
        if count == want.as_str() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the count after the leaves: {count}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("clients the server disconnected: {}", crowd.gone().len());
    wait_visible(
        &b,
        "the first rows by name",
        || room.names(&crowd.gone(), "name", "asc", ""),
        true,
    )
    .await;
    b.js("const s = document.querySelector('.table-wrap'); s.scrollTop = s.scrollHeight;")
        .await;
    wait_visible(
        &b,
        "the last rows by name",
        || room.names(&crowd.gone(), "name", "asc", ""),
        true,
    )
    .await;

    // 2. The middle of the list.
    b.js("const s = document.querySelector('.table-wrap'); s.scrollTop = s.scrollHeight / 2;")
        .await;
    wait_visible(
        &b,
        "the middle rows by name",
        || room.names(&crowd.gone(), "name", "asc", ""),
        true,
    )
    .await;

    // 3. Sorted by delay, descending (the own delay, a few ms, is far
    // below), while delays keep changing: the window changes every tick.
    b.js(RECORD_JS).await;
    click_sort(&b, "delay").await;
    click_sort(&b, "delay").await;
    let aria = b
        .js("return document.querySelector('#roster th[data-sort=\"delay\"]').getAttribute('aria-sort')")
        .await;
    assert_eq!(aria, "descending");
    for round in 0..20 {
        for k in 0..50 {
            let i = (round * 50 + k) * 7 % N;
            if room.present.contains(&i) {
                let d = 2000.0 + i as f64 / 10.0;
                crowd.send(i, Act::Sample(d));
                room.delays.insert(i, d);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let churn = b.js(STOP_JS).await;
    eprintln!("large room, sorted by delay while 500 delays a second change: {churn}");
    assert!(churn["max_rows"].as_u64().unwrap() <= bound, "{churn}");
    wait_visible(
        &b,
        "the slowest clients first",
        || room.names(&crowd.gone(), "delay", "desc", ""),
        false,
    )
    .await;

    // 4. A filter: the matches, still by delay, and their count.
    b.js(
        "const f = document.getElementById('roster-filter'); f.value = 'USER 0123'; \
          f.dispatchEvent(new Event('input'));",
    )
    .await;
    let matches = room.names(&crowd.gone(), "delay", "desc", "user 0123");
    assert!(!matches.is_empty());
    b.wait_for(
        "the filter's count",
        &format!(
            "document.getElementById('client-count').textContent === '{} of {} clients match'",
            matches.len(),
            fmt_thousands(
                room.present.len() - crowd.gone().intersection(&room.present).count() + 1
            )
        ),
    )
    .await;
    wait_visible(
        &b,
        "the filtered rows by delay",
        || room.names(&crowd.gone(), "delay", "desc", "user 0123"),
        false,
    )
    .await;
    // And by name, ascending.
    click_sort(&b, "name").await;
    wait_visible(
        &b,
        "the filtered rows by name",
        || room.names(&crowd.gone(), "name", "asc", "user 0123"),
        false,
    )
    .await;
    let rows = b
        .js("return document.querySelectorAll('#roster tbody tr').length")
        .await;
    let matches = room.names(&crowd.gone(), "name", "asc", "user 0123");
    assert_eq!(rows, json!(matches.len()), "only the matches are rendered");

    let problems: Vec<Value> = b.problems().await;
    assert!(
        problems.is_empty(),
        "the browser logged problems: {problems:?}"
    );
    b.close().await;
    drop(crowd);
}

/// 10001 -> "10,001", as the page writes counts.
fn fmt_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
