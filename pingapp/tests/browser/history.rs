//! "Your history" in a real browser (docs/protocol.md, "Your history"):
//! the private page's panel shows this browser's delay across reloads,
//! a fresh browser sees none of it, the public page presents its identity
//! too, and "Forget this browser" empties it
//! and leaves the old secret answering 404. Run against the standalone
//! binary (SQLite) and against the distributed services (real
//! `nats-server`, PostgreSQL, `gateway`, `presence` and `recorder`
//! binaries).

use std::time::Duration;

use testkit::{NatsServer, Service, free_addr, unique_prefix};

use crate::FAST;
use crate::helpers::{Browser, Driver, Server};

/// JavaScript: the panel's sample count.
const COUNT: &str = "Number(document.getElementById('device-summary').dataset.count)";
/// JavaScript: the samples this page measured itself.
const OWN: &str = "Number(document.getElementById('stat-count').dataset.value)";
/// JavaScript: the browser's secret.
const SECRET: &str = "return localStorage.getItem('pingapp.device')";

/// Samples of the first visit before the reload: at 5 pings a second, the
/// reloaded page needs 3 s to measure as many itself, so a count this high
/// right after the reload can only be the earlier connection's.
const FIRST_VISIT: u64 = 15;

/// How long the panel may take: the first fetch goes 2 s after the first
/// sample, and the recorder stores in batches.
const PANEL_WAIT: Duration = Duration::from_secs(20);

async fn count(b: &Browser) -> u64 {
    b.js(&format!("return {COUNT}")).await.as_u64().unwrap()
}

async fn secret(b: &Browser) -> String {
    let s = b.js(SECRET).await;
    let s = s.as_str().expect("a secret in localStorage").to_owned();
    assert!(
        s.len() == 43
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
        "32 bytes, base64url: {s}"
    );
    s
}

/// GET `/api/device/history` with `bearer`: status and body.
async fn history(origin: &str, bearer: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .get(format!("{origin}/api/device/history?window=1h"))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("history request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// Polls the history of `key` over HTTP until its sample count meets
/// `enough`; returns that count.
async fn stored_until(origin: &str, key: &str, what: &str, enough: impl Fn(u64) -> bool) -> u64 {
    let deadline = tokio::time::Instant::now() + PANEL_WAIT;
    loop {
        let (status, body) = history(origin, key).await;
        let stored: u64 = body["buckets"]
            .as_array()
            .map(|b| b.iter().filter_map(|b| b["count"].as_u64()).sum())
            .unwrap_or(0);
        if status == 200 && enough(stored) {
            return stored;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} were not stored in time: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The whole flow against the pages served at `origin`.
async fn history_across_reloads(origin: &str) {
    let private = format!("{origin}/private/");
    let driver = Driver::start();
    let a = driver.browser().await;
    a.goto(&private).await;
    let first_id = a.wait_open().await;
    let first = a
        .wait_for_within(
            "the panel to show this browser's samples",
            &format!(
                "document.getElementById('device-status').dataset.state === 'ok' && \
                 Number(document.getElementById('device-chart').dataset.points) > 0 && \
                 {COUNT} > 0 && {COUNT}"
            ),
            PANEL_WAIT,
        )
        .await;
    assert!(first.as_u64().unwrap() > 0);
    let chart = a
        .js("const c = document.getElementById('device-chart'); \
             return { points: Number(c.dataset.points), samples: Number(c.dataset.samples) };")
        .await;
    assert!(chart["points"].as_u64().unwrap() >= 1, "{chart}");
    assert!(chart["samples"].as_u64().unwrap() >= 1, "{chart}");
    let summary = a
        .js("return document.getElementById('device-summary').textContent")
        .await;
    for part in ["samples", "mean", "p50", "p99", "jitter"] {
        assert!(summary.as_str().unwrap().contains(part), "{summary}");
    }
    let key = secret(&a).await;
    // Enough earlier samples stored to tell them from the next visit's.
    let before = stored_until(origin, &key, "the first visit's samples", |n| {
        n >= FIRST_VISIT
    })
    .await;

    // Reload: a new connection (new id), the same identity; the panel
    // shows the earlier samples before this page could have measured as
    // many, then grows.
    a.goto(&private).await;
    let second_id = a.wait_open().await;
    assert_ne!(first_id, second_id, "a reload is a new connection");
    assert_eq!(secret(&a).await, key, "the identity survives the reload");
    let shown = a
        .wait_for_within(
            "the earlier samples on the reloaded page",
            &format!("{COUNT} >= {before} && {OWN} < {before} && {COUNT}"),
            PANEL_WAIT,
        )
        .await
        .as_u64()
        .unwrap();
    a.wait_for(
        "a few samples of the new connection",
        &format!("{OWN} >= 5"),
    )
    .await;
    // Once the new connection's samples are stored, another window (the
    // buttons fetch at once) shows them too.
    stored_until(origin, &key, "the new connection's samples", |n| n > shown).await;
    a.js("document.querySelector('#device-windows button[data-window=\"1d\"]').click()")
        .await;
    a.wait_for_within(
        "the history to grow with the new connection's samples",
        &format!(
            "document.getElementById('device-summary').dataset.window === '1d' && \
             {COUNT} > {shown}"
        ),
        PANEL_WAIT,
    )
    .await;
    let pressed = a
        .js("return [...document.querySelectorAll('#device-windows button')]\
             .filter((b) => b.getAttribute('aria-pressed') === 'true').map((b) => b.dataset.window)")
        .await;
    assert_eq!(pressed, serde_json::json!(["1d"]));
    let a_total = count(&a).await;

    // A second browser (a fresh profile): its own identity, none of A's
    // samples.
    let b = driver.browser().await;
    b.goto(&private).await;
    b.wait_open().await;
    let b_key = secret(&b).await;
    assert_ne!(b_key, key);
    let b_count = b
        .wait_for_within(
            "the second browser's own history",
            &format!("{COUNT} > 0 && {COUNT}"),
            PANEL_WAIT,
        )
        .await
        .as_u64()
        .unwrap();
    let b_own = b.js(&format!("return {OWN}")).await.as_u64().unwrap();
    assert!(
        b_count <= b_own && b_count < a_total,
        "B shows {b_count} samples, measured {b_own} itself; A has {a_total}"
    );
    b.close().await;

    // The public page presents the identity too (it shows no panel): a
    // browser that only ever opened it has a history under its secret.
    let c = driver.browser().await;
    c.goto(&format!("{origin}/public/")).await;
    c.wait_open().await;
    let c_key = secret(&c).await;
    assert!(c_key != key && c_key != b_key);
    c.wait_for("a few public samples", &format!("{OWN} >= 3"))
        .await;
    stored_until(origin, &c_key, "the public page's samples", |n| n > 0).await;
    c.close().await;

    // Forget: the panel empties, a new secret, and the old one unlocks
    // nothing any more.
    a.js("document.getElementById('device-forget').click()")
        .await;
    a.wait_for_within(
        "the panel to empty after forgetting",
        &format!(
            "document.getElementById('messages').dataset.code === 'forgotten' && {COUNT} === 0"
        ),
        PANEL_WAIT,
    )
    .await;
    let new_key = secret(&a).await;
    assert_ne!(new_key, key, "a new identity after forgetting");
    let (status, body) = history(origin, &key).await;
    assert_eq!(status, 404, "the old secret after forgetting: {body}");
    assert_eq!(body["error"], "not_found", "{body}");
    // The page goes on under its new identity, from zero.
    a.wait_open().await;
    let again = a
        .wait_for_within(
            "the new identity's own history",
            &format!("{COUNT} > 0 && {COUNT}"),
            PANEL_WAIT,
        )
        .await
        .as_u64()
        .unwrap();
    let own = count_own(&a).await;
    assert!(again <= own, "{again} samples shown, {own} measured");
    a.close().await;
}

async fn count_own(b: &Browser) -> u64 {
    b.js(&format!("return {OWN}")).await.as_u64().unwrap()
}

#[tokio::test]
async fn your_history_survives_reloads_and_can_be_forgotten_standalone() {
    let server = Server::start(FAST);
    history_across_reloads(&server.origin()).await;
}

#[tokio::test]
async fn your_history_survives_reloads_and_can_be_forgotten_distributed() {
    let (nats, db) = tokio::join!(NatsServer::start(), testkit::fresh_database());
    let prefix = unique_prefix();
    let nats_url = nats.url();
    let common = |name: &str, admin: std::net::SocketAddr| {
        Service::command(name)
            .args(["--admin-listen", &admin.to_string()])
            .args(["--nats-url", &nats_url])
            .args(["--subject-prefix", &prefix])
    };
    let (p_admin, r_admin, g_admin, listen) = (free_addr(), free_addr(), free_addr(), free_addr());
    let mut presence = common("presence", p_admin)
        .args(["--roster-tick-ms", "100"])
        .spawn();
    let mut recorder = common("recorder", r_admin)
        .args(["--database-url", &db.url])
        .args(["--batch-wait-ms", "20"])
        .spawn();
    let mut gateway = common("gateway", g_admin)
        .args(["--listen", &listen.to_string()])
        .args(["--gateway-id", "gw-browser"])
        .args(["--heartbeat-interval-ms", "400"])
        .args(["--roster-tick-ms", "100"])
        // The test reads the API from one address while it waits.
        .args(["--max-api-requests-per-ip-per-second", "0"])
        .args(FAST)
        .spawn();
    presence.wait_ready(p_admin).await;
    recorder.wait_ready(r_admin).await;
    gateway.wait_ready(g_admin).await;
    history_across_reloads(&format!("http://{listen}")).await;
}
