//! The public room (docs/protocol.md, "Public room: the view", "Connection
//! caps", "`GET /api/roster`"): what a v2 page sees of a room larger than
//! its screen, one frame per tick; the caps; the paged roster.

use std::collections::BTreeMap;
use std::time::Duration;

use gateway::GatewayArgs;
use serde_json::{Value, json};
use services::messages::{Broadcast, RosterClient};
use services::stats::DelayStats;
use testkit::ws::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::helpers::TestGateway;

fn stats(ms: f64) -> DelayStats {
    DelayStats {
        delay_time: ms,
        median: ms,
        jitter: 0.0,
    }
}

/// `n` clients of another gateway, `{prefix}{i:03}`, with delays `i` ms
/// (none for every seventh).
fn crowd(prefix: &str, n: usize) -> Vec<RosterClient> {
    (0..n)
        .map(|i| RosterClient {
            channel_name: format!("{prefix}-id-{i:03}"),
            name: format!("{prefix}{i:03}"),
            gateway: "gw2".into(),
            connected_at_ms: 1,
            stats: (i % 7 != 0).then(|| stats(i as f64)),
        })
        .collect()
}

/// A v2 public page, its welcome read; returns it and its id.
async fn page(gw: &TestGateway) -> (Client, String) {
    let mut c = gw.ws("/ws/public/?v=2").await;
    let welcome = c.recv().await;
    assert_eq!(welcome["command"], "welcome");
    let id = welcome["channel_name"].as_str().unwrap().to_owned();
    c.id.clone_from(&id);
    (c, id)
}

fn names(rows: &Value) -> Vec<String> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect()
}

fn ids(rows: &Value) -> Vec<String> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["channel_name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_page_that_asks_nothing_gets_the_default_view_the_count_and_its_own_row() {
    let gw = TestGateway::start(GatewayArgs::default()).await;
    gw.broadcast(Broadcast::Snapshot {
        clients: crowd("n", 120),
    })
    .await;
    // The snapshot is applied before the page joins once a v1 page sees it.
    let mut v1 = gw.ws("/ws/public/").await;
    v1.send(json!({"command": "ping"})).await;
    v1.recv_until("pong", |_| true).await;
    v1.send(json!({"command": "delay_time", "delay_time": 1}))
        .await;
    let all = v1.recv_until("delay_times", |_| true).await;
    assert_eq!(all["delay_times"].as_object().unwrap().len(), 121);

    let (mut c, id) = page(&gw).await;
    let view = c.recv().await;
    assert_eq!(view["command"], "view", "{view}");
    for (k, v) in [
        ("sort", json!("name")),
        ("order", json!("asc")),
        ("filter", json!("")),
        ("offset", json!(0)),
        ("limit", json!(50)),
        ("total", json!(122)),
        ("matched", json!(122)),
    ] {
        assert_eq!(view[k], v, "{k}");
    }
    let rows = &view["rows"];
    assert_eq!(rows.as_array().unwrap().len(), 50, "the first 50 rows");
    let got = names(rows);
    let mut sorted = got.clone();
    sorted.sort_by_key(|n| n.to_lowercase());
    assert_eq!(got, sorted, "by name");
    assert_eq!(view["me"]["channel_name"], id.as_str());
    assert_eq!(view["me"]["delay_time"], Value::Null);
    let n001 = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "n001")
        .expect("n001 in the first rows");
    assert_eq!(
        *n001,
        json!({"channel_name": "n-id-001", "name": "n001", "gateway": "gw2",
               "delay_time": 1.0, "median": 1.0, "jitter": 0.0})
    );
}

#[tokio::test]
async fn views_sort_filter_and_page_and_a_bad_view_keeps_the_last() {
    let gw = TestGateway::start(GatewayArgs::default()).await;
    gw.broadcast(Broadcast::Snapshot {
        clients: crowd("n", 60),
    })
    .await;
    let (mut c, id) = page(&gw).await;
    c.view_until(|v| v.total == 61).await;

    // By delay: the smallest first, and clients without a sample last in
    // both orders.
    let v = c
        .set_view(json!({"sort": "delay", "order": "asc", "limit": 3}))
        .await;
    assert_eq!(names(&v["rows"]), ["n001", "n002", "n003"]);
    let v = c
        .set_view(json!({"sort": "delay", "order": "desc", "limit": 2}))
        .await;
    assert_eq!(names(&v["rows"]), ["n059", "n058"]);
    // Past the sampled clients: the unsampled ones (n000, n007, …, and
    // this page itself), in id order.
    let sampled = 60 - 60usize.div_ceil(7);
    let v = c
        .set_view(json!({"sort": "delay", "order": "desc", "offset": sampled, "limit": 200}))
        .await;
    assert_eq!(v["rows"].as_array().unwrap().len(), 61 - sampled);
    assert!(ids(&v["rows"]).contains(&id));
    assert!(
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["delay_time"].is_null())
    );

    // A filter ignores case; offset and limit count within its matches.
    let v = c
        .set_view(json!({"filter": "N02", "offset": 2, "limit": 5}))
        .await;
    assert_eq!(v["filter"], "n02");
    assert_eq!(v["matched"], 10);
    assert_eq!(v["total"], 61);
    assert_eq!(names(&v["rows"]), ["n022", "n023", "n024", "n025", "n026"]);
    let v = c
        .set_view(json!({"sort": "name", "order": "desc", "offset": 59, "limit": 5}))
        .await;
    assert_eq!(
        v["rows"].as_array().unwrap().len(),
        2,
        "the end of the list"
    );

    // Bad views: an error frame each, and the connection and the last view
    // stay.
    for bad in [
        json!({"command": "view", "sort": "age"}),
        json!({"command": "view", "limit": 201}),
        json!({"command": "view", "offset": -1}),
        json!({"command": "view", "filter": 7}),
    ] {
        c.send(bad.clone()).await;
        let e = c.recv_until("error", |_| true).await;
        assert_eq!(e["code"], "bad_view", "{bad}");
    }
    // The window (the two smallest names, descending) follows a rename.
    gw.broadcast(Broadcast::Rename {
        channel_name: "n-id-000".into(),
        name: "n000x".into(),
    })
    .await;
    let v = c
        .view_until(|v| v.row("n-id-000").is_some_and(|r| r["name"] == "n000x"))
        .await;
    assert_eq!(
        v.last_full.unwrap()["offset"],
        59,
        "still the last good view"
    );

    // A v1 page has no view: accepted and ignored.
    let mut v1 = gw.ws("/ws/public/").await;
    v1.send(json!({"command": "view", "limit": 5})).await;
    v1.send(json!({"command": "ping"})).await;
    assert_eq!(
        v1.recv_until("pong", |_| true).await,
        json!({"command": "pong"})
    );
}

#[tokio::test]
async fn a_tick_brings_every_change_in_one_frame_holding_only_the_window() {
    let tick = Duration::from_millis(1000);
    let gw = TestGateway::start(GatewayArgs {
        roster_tick_ms: tick.as_millis() as u64,
        ..Default::default()
    })
    .await;
    gw.broadcast(Broadcast::Snapshot {
        clients: crowd("p", 300),
    })
    .await;
    let (mut c, id) = page(&gw).await;
    let first = c.recv().await;
    assert_eq!(first["command"], "view");
    // Right after a tick (the first one brings the snapshot's count or
    // this page's own row), a burst of changes lands within one tick.
    c.view_until(|v| v.frames >= 2 && v.total == 301).await;

    // Names that sort first ('!' is below digits and letters).
    for (i, name) in ["!a0", "!a1", "!a2"].iter().enumerate() {
        gw.broadcast(Broadcast::Connect {
            client: RosterClient {
                channel_name: format!("new-{i}"),
                name: (*name).into(),
                gateway: "gw2".into(),
                connected_at_ms: 2,
                stats: None,
            },
        })
        .await;
    }
    for i in 1..=5 {
        gw.broadcast(Broadcast::Disconnect {
            channel_name: format!("p-id-{i:03}"),
        })
        .await;
    }
    gw.broadcast(Broadcast::Rename {
        channel_name: "p-id-010".into(),
        name: "!a3".into(),
    })
    .await;
    // Every client's delay changes: 300 entries, of which the page's
    // window shows at most 50.
    let delays: BTreeMap<String, DelayStats> = crowd("p", 300)
        .into_iter()
        .map(|c| (c.channel_name, stats(500.0)))
        .collect();
    gw.broadcast(Broadcast::Delays { delays }).await;

    let frames_before = c.view.frames;
    let frame = next_view_frame(&mut c).await;
    assert_eq!(c.view.frames, frames_before + 1, "{frame}");
    assert_eq!(frame["command"], "view", "the window moved: {frame}");
    let v = c.view.clone();
    assert_eq!(v.total, 301 + 3 - 5, "joins and leaves in the count");
    assert_eq!(v.rows.len(), 50);
    assert_eq!(
        v.ids()[..4],
        ["new-0", "new-1", "new-2", "p-id-010"],
        "joins and the rename in place"
    );
    assert!(v.row("p-id-001").is_none(), "a leaver is gone");
    assert_eq!(v.row("p-id-020").unwrap()["delay_time"], 500.0);
    assert!(
        frame.to_string().len() < 50 * 200,
        "O(view) bytes: {}",
        frame.to_string().len()
    );

    // Nothing changes: nothing is sent.
    let quiet = c.collect_for(tick + tick / 2).await;
    assert!(
        quiet.iter().all(|f| f["command"] == "server_rtt"),
        "{quiet:?}"
    );

    // Delays only: the same window, so an update with the rows in view
    // that changed, never the others.
    let delays: BTreeMap<String, DelayStats> = crowd("p", 300)
        .into_iter()
        .map(|c| (c.channel_name, stats(7.0)))
        .collect();
    gw.broadcast(Broadcast::Delays { delays }).await;
    let update = c.recv_until("view_update", |_| true).await;
    let changed = update["rows"].as_object().unwrap();
    let window = c.view.ids();
    assert!(!changed.is_empty() && changed.len() <= 50);
    assert!(changed.keys().all(|k| window.contains(k)), "{update}");
    assert_eq!(update["total"], 299);
    assert!(update.get("me").is_none(), "its own row did not change");

    // Its own sample: no `me` (the page has its own statistics), so its
    // frames stay the view's shared frame.
    c.sample(2.5, 1).await;
    let delays: BTreeMap<String, DelayStats> = crowd("p", 300)
        .into_iter()
        .map(|c| (c.channel_name, stats(8.0)))
        .collect();
    gw.broadcast(Broadcast::Delays { delays }).await;
    let update = c.recv_until("view_update", |_| true).await;
    assert!(
        update.get("me").is_none(),
        "a sample is not a rename: {update}"
    );

    // Its own rename (presence's broadcast of it; the test stands in for
    // presence): `me` with the new name in the next tick's frame.
    gw.broadcast(Broadcast::Rename {
        channel_name: id.clone(),
        name: "Zed".into(),
    })
    .await;
    let mine = c
        .view_until(|v| v.me.as_ref().is_some_and(|m| m["name"] == "Zed"))
        .await;
    assert_eq!(mine.me.unwrap()["channel_name"], id.as_str());
}

/// The WebSocket write threshold (`--ws-write-buffer-bytes`) changes when
/// bytes reach the socket, never what arrives: at 0 (each frame written
/// as it is sent) and at its largest, several pages get the same full
/// ~6 KB views of a 120-client room, whole and in order.
#[tokio::test]
async fn full_views_arrive_whole_at_any_write_threshold() {
    for threshold in [0, 1 << 19] {
        let gw = TestGateway::start(GatewayArgs {
            ws_write_buffer_bytes: threshold,
            ..Default::default()
        })
        .await;
        gw.broadcast(Broadcast::Snapshot {
            clients: crowd("w", 120),
        })
        .await;
        let mut pages = Vec::new();
        for _ in 0..3 {
            pages.push(page(&gw).await.0);
        }
        for c in &mut pages {
            let view = next_view_frame(c).await;
            assert_eq!(view["command"], "view", "{view}");
            let rows = names(&view["rows"]);
            assert_eq!(rows.len(), 50, "threshold {threshold}: {view}");
            assert!(view.to_string().len() > 4096, "a full view is several KB");
            let mut sorted = rows.clone();
            sorted.sort_by_key(|n| n.to_lowercase());
            assert_eq!(rows, sorted, "threshold {threshold}");
        }
    }
}

/// A tick's frames are queued a slice of pages at a time over
/// `--view-fanout-spread-ms` (docs/architecture.md, "The tick's fan-out"):
/// every page gets the tick's frame, once; a page that moves to another
/// view while the slices go out never gets the old view's frame after its
/// new one, and a page seated meanwhile starts from the new window.
#[tokio::test]
async fn a_paced_tick_reaches_every_page_once_and_never_after_a_newer_view() {
    let gw = TestGateway::start(GatewayArgs {
        roster_tick_ms: 2000,
        view_fanout_spread_ms: 500,
        view_fanout_slice: 2,
        ..Default::default()
    })
    .await;
    gw.broadcast(Broadcast::Snapshot {
        clients: crowd("p", 300),
    })
    .await;
    let mut pages = Vec::new();
    for _ in 0..12 {
        pages.push(page(&gw).await.0);
    }
    for c in &mut pages {
        c.view_until(|v| v.total == 312).await;
    }
    // Every row's delay changes: one frame per page (6 slices, 100 ms
    // apart).
    let delays: BTreeMap<String, DelayStats> = crowd("p", 300)
        .into_iter()
        .map(|c| (c.channel_name, stats(500.0)))
        .collect();
    let shown =
        |v: &testkit::ws::ViewState| v.row("p-id-001").is_some_and(|r| r["delay_time"] == 500.0);
    let frames: Vec<usize> = pages.iter().map(|c| c.view.frames).collect();
    gw.broadcast(Broadcast::Delays { delays }).await;
    pages[0].view_until(shown).await;
    // While the other slices go out, one page moves to a view that
    // matches nobody (a frame of the old window after its new `view`
    // would name rows it does not have, and `ViewState::apply` panics),
    // and a new page is seated.
    let mut mover = pages.pop().expect("pages");
    let moved = mover.set_view(json!({"filter": "nobody"})).await;
    assert_eq!(moved["rows"], json!([]), "{moved}");
    let (mut late, _) = page(&gw).await;
    for (c, before) in pages.iter_mut().zip(frames) {
        let v = c.view_until(shown).await;
        assert_eq!(v.frames, before + 1, "one frame for the tick");
    }
    late.view_until(shown).await;
    // The next tick brings the late page's join; nothing stale comes.
    let after = mover.collect_for(Duration::from_millis(2500)).await;
    assert!(mover.view.rows.is_empty(), "{after:?}");
    assert_eq!(mover.view.total, 313, "{after:?}");
}

/// The next `view` or `view_update` frame (keepalive reports skipped).
async fn next_view_frame(c: &mut Client) -> Value {
    loop {
        let f = c.recv().await;
        if f["command"] != "server_rtt" {
            return f;
        }
    }
}

/// The status, `Retry-After` and body of a WebSocket handshake refused
/// before the upgrade (`None` when it was upgraded; the socket is kept
/// open in `keep`).
async fn refused(
    gw: &TestGateway,
    path: &str,
    keep: &mut Vec<testkit::ws::Socket>,
) -> Option<(StatusCode, String, String)> {
    let req = testkit::ws::handshake_request(gw.addr, path, &[]);
    match tokio_tungstenite::connect_async(req).await {
        Ok((socket, _)) => {
            keep.push(socket);
            None
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            Some((resp.status(), retry, body))
        }
        Err(e) => panic!("handshake {path}: {e}"),
    }
}

#[tokio::test]
async fn connection_caps_refuse_with_503_before_the_upgrade_and_free_their_places() {
    let gw = TestGateway::start(GatewayArgs {
        max_connections: 4,
        max_public_clients: 3,
        max_v1_public_clients: 1,
        ..Default::default()
    })
    .await;
    let mut open = Vec::new();
    let mut v1 = gw.ws("/ws/public/").await;
    v1.send(json!({"command": "ping"})).await;
    v1.recv_until("pong", |_| true).await;
    let (status, retry, body) = refused(&gw, "/ws/public/", &mut open)
        .await
        .expect("a second v1 public page is over its cap");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry, "5");
    assert!(
        body.contains("at_capacity") && body.contains("--max-v1-public-clients"),
        "{body}"
    );

    let (a, _) = page(&gw).await;
    let (b, _) = page(&gw).await;
    let (status, _, body) = refused(&gw, "/ws/public/?v=2", &mut open)
        .await
        .expect("a fourth public page is over its cap");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("--max-public-clients"), "{body}");

    let mut private = gw.ws("/ws/private/?v=2").await;
    assert_eq!(private.recv().await["command"], "welcome");
    let (status, _, body) = refused(&gw, "/ws/private/?v=2", &mut open)
        .await
        .expect("a fifth connection is over the gateway's cap");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("--max-connections"), "{body}");
    for reason in [
        "max_v1_public_clients",
        "max_public_clients",
        "max_connections",
    ] {
        assert_eq!(
            gw.metric("pingapp_gateway_refused_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        gw.metric("pingapp_gateway_connection_cap", &[("kind", "public")]),
        3.0
    );

    // A place comes back when its connection ends.
    a.close().await;
    let mut upgraded = false;
    for _ in 0..50 {
        if refused(&gw, "/ws/public/?v=2", &mut open).await.is_none() {
            upgraded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(upgraded, "the freed place is taken again");
    drop((b, v1, private));
}

/// `GET path` on its own connection: the status and the JSON body.
/// `GET path` of the gateway: the status and the JSON body (`null` when
/// the body is not JSON).
pub(crate) async fn get_json(gw: &TestGateway, path: &str) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_roster_api_pages_with_the_views_order_and_filter() {
    let gw = TestGateway::start(GatewayArgs {
        max_api_requests_per_ip_per_second: 1000,
        ..Default::default()
    })
    .await;
    gw.broadcast(Broadcast::Snapshot {
        clients: crowd("r", 250),
    })
    .await;
    let mut total = 0;
    for _ in 0..50 {
        let (_, first) = get_json(&gw, "/api/roster").await;
        total = first["total"].as_u64().unwrap();
        if total == 250 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(total, 250);

    // Every client once, in name order, a page at a time.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = get_json(&gw, &format!("/api/roster?limit=100&cursor={cursor}")).await;
        assert_eq!(status, 200, "{page}");
        assert!(page["clients"].as_array().unwrap().len() <= 100);
        seen.extend(names(&page["clients"]));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let expected: Vec<String> = (0..250).map(|i| format!("r{i:03}")).collect();
    assert_eq!(seen, expected);

    let (_, page) = get_json(&gw, "/api/roster?sort=delay&order=desc&limit=2").await;
    assert_eq!(names(&page["clients"]), ["r249", "r248"]);
    let c = &page["clients"][0];
    assert_eq!(c["delay_time"], 249.0);
    assert_eq!(c["gateway"], "gw2");
    assert!(
        c["connected_at"]
            .as_str()
            .unwrap()
            .starts_with("1970-01-01T00:00:00.001")
    );
    let (_, page) = get_json(&gw, "/api/roster?filter=R10&limit=3").await;
    assert_eq!(page["matched"], 10);
    assert_eq!(names(&page["clients"]), ["r100", "r101", "r102"]);
    assert_eq!(page["next_cursor"], "3");

    for bad in [
        "/api/roster?limit=0",
        "/api/roster?limit=1001",
        "/api/roster?cursor=abc",
        "/api/roster?sort=age",
        "/api/roster?order=up",
    ] {
        let (status, body) = get_json(&gw, bad).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"], "bad_request", "{bad}");
    }
}
