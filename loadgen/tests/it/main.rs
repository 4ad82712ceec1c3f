//! Integration tests of the loadgen package: the real `echo-server` binary,
//! loadgen driven through its library entry point and as a binary.

mod helpers;

use std::process::Command;

use futures_util::StreamExt;
use helpers::{
    EMPTY_DELAYS, EchoProcess, PingApp, Watches, config, start_fake_public, start_fake_public_full,
    start_fake_public_recording,
};
use loadgen::Summary;
use serde_json::Value;
use testkit::ws::{Client, Closed};
use tokio_tungstenite::tungstenite::Message;

/// The shutdown future for library runs that should last their full duration.
fn never() -> std::future::Pending<()> {
    std::future::pending()
}

fn assert_sane_rtt(summary: &Summary) {
    let rtt = &summary.rtt_us;
    assert!(summary.pings > 0, "no pings counted: {summary:#?}");
    assert_eq!(rtt.samples, summary.pings);
    let (min, p50, p90, p99, p999, max) = (
        rtt.min.unwrap(),
        rtt.p50.unwrap(),
        rtt.p90.unwrap(),
        rtt.p99.unwrap(),
        rtt.p999.unwrap(),
        rtt.max.unwrap(),
    );
    assert!(0 < min && min <= p50, "{rtt:?}");
    assert!(
        p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
        "{rtt:?}"
    );
    assert!(max < 5_000_000, "a loopback RTT over 5 s: {rtt:?}");
}

#[tokio::test]
async fn echo_server_answers_like_pingapp_on_any_path() {
    let echo = EchoProcess::start();
    let mut ws = Client::connect(echo.addr, "/any/path/?v=2").await;

    // delay_time gets no reply: the first frame back is the pong.
    ws.send_text(r#"{"command":"delay_time","delay_time":1.5,"seq":6}"#)
        .await;
    ws.send_text(r#"{"command":"ping","seq":7}"#).await;
    let pong = ws.recv().await;
    assert_eq!(pong["command"], "pong");
    assert_eq!(pong["seq"], 7);
    assert!(pong["server_time"].as_u64().unwrap() > 1_600_000_000_000);

    ws.send_text(r#"{"command":"ping"}"#).await;
    let Some(Ok(Message::Text(reply))) = ws.inner().next().await else {
        panic!("no pong")
    };
    assert_eq!(reply.as_str(), r#"{"command":"pong"}"#);
}

#[tokio::test]
async fn echo_server_closes_with_1012_and_exits_zero_on_sigterm() {
    let mut echo = EchoProcess::start();
    let mut ws = Client::connect(echo.addr, "/").await;
    ws.send_text(r#"{"command":"ping"}"#).await;
    assert_eq!(ws.recv().await["command"], "pong");

    let status = echo.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(ws.closed().await, Closed::Code(1012));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_v2_at_a_fixed_rate() {
    let echo = EchoProcess::start();
    let summary = loadgen::run(
        config(
            &echo.url(),
            &["--clients", "3", "--duration", "1s", "--rate", "20"],
        ),
        never(),
    )
    .await;

    assert_eq!(summary.target, format!("{}/ws/private/?v=2", echo.url()));
    assert_eq!(
        (summary.clients_requested, summary.clients_connected),
        (3, 3)
    );
    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    assert_sane_rtt(&summary);
    assert_eq!(summary.pings, summary.pings_sent);
    // 3 clients × 20/s × 1 s; generous below, as a busy machine lags.
    assert!(
        (30..=66).contains(&summary.pings),
        "pings {}",
        summary.pings
    );
    assert!(
        (summary.duration_secs - 1.0).abs() < 0.5,
        "{}",
        summary.duration_secs
    );
    assert!(summary.frames_by_command["pong"] >= summary.pings);
    assert!(summary.broadcast.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_v1_closed_loop_with_delay_reports() {
    let echo = EchoProcess::start();
    let summary = loadgen::run(
        config(
            &echo.url(),
            &[
                "--clients",
                "2",
                "--duration",
                "1s",
                "--rate",
                "0",
                "--page",
                "public",
                "--protocol",
                "1",
            ],
        ),
        never(),
    )
    .await;

    assert_eq!(summary.target, format!("{}/ws/public/", echo.url()));
    assert!(
        summary.send_delay,
        "public page sends delay_time by default"
    );
    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    assert_sane_rtt(&summary);
    assert!(
        summary.pings > 100,
        "closed loop should far exceed 1/s: {}",
        summary.pings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_hold_connections_without_pinging() {
    let echo = EchoProcess::start();
    let summary = loadgen::run(
        config(
            &echo.url(),
            &["--clients", "3", "--duration", "500ms", "--idle"],
        ),
        never(),
    )
    .await;

    assert_eq!(summary.clients_connected, 3);
    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    assert_eq!(
        (summary.pings_sent, summary.pings, summary.rtt_us.samples),
        (0, 0, 0)
    );
    assert_eq!(summary.rtt_us.p50, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_broadcast_delivery_on_the_public_page() {
    let addr = start_fake_public(None).await;
    let summary = loadgen::run(
        config(
            &format!("ws://{addr}"),
            &[
                "--clients",
                "4",
                "--duration",
                "2500ms",
                "--rate",
                "5",
                "--page",
                "public",
                "--measure-broadcast",
            ],
        ),
        never(),
    )
    .await;

    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    assert_sane_rtt(&summary);
    let broadcast = summary.broadcast.as_ref().expect("broadcast stats");
    assert!(broadcast.renames_sent >= 2, "{broadcast:?}");
    let samples = broadcast.latency_us.samples;
    // Every client gets every rename, except perhaps the last one, which
    // may land after a client already closed.
    assert!(samples <= broadcast.renames_sent * 4, "{broadcast:?}");
    assert!(samples >= (broadcast.renames_sent - 1) * 4, "{broadcast:?}");
    let latency = &broadcast.latency_us;
    assert!(
        latency.p50.unwrap() <= latency.p99.unwrap()
            && latency.p99.unwrap() <= latency.max.unwrap()
    );
    let frames = &summary.frames_by_command;
    assert_eq!(frames["welcome"], 4);
    assert_eq!(frames["_ws_ping"], 4);
    assert!(frames["connect"] >= 4, "{frames:?}");
    assert!(frames["change_name"] >= samples, "{frames:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_clients_over_several_urls_and_splits_broadcast_latency() {
    // Two independent fake servers: a rename on the first reaches only the
    // clients connected to the first (clients 0 and 2 of 4).
    let first = start_fake_public(None).await;
    let second = start_fake_public(None).await;
    let mut flags = vec![format!("ws://{second}")];
    flags.extend(
        [
            "--clients",
            "4",
            "--duration",
            "2500ms",
            "--rate",
            "5",
            "--page",
            "public",
            "--measure-broadcast",
        ]
        .map(str::to_owned),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let summary = loadgen::run(config(&format!("ws://{first}"), &flags), never()).await;

    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    assert_eq!(
        summary.target,
        format!("ws://{first}/ws/public/?v=2 ws://{second}/ws/public/?v=2")
    );
    let broadcast = summary.broadcast.as_ref().expect("broadcast stats");
    assert!(broadcast.renames_sent >= 2, "{broadcast:?}");
    assert_eq!(broadcast.other_target_us.samples, 0, "{broadcast:?}");
    let same = broadcast.same_target_us.samples;
    assert_eq!(same, broadcast.latency_us.samples, "{broadcast:?}");
    assert!(same <= broadcast.renames_sent * 2, "{broadcast:?}");
    assert!(same >= (broadcast.renames_sent - 1) * 2, "{broadcast:?}");
    assert_eq!(summary.frames_by_command["welcome"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_each_client_a_run_of_other_clients() {
    let watches = Watches::default();
    let addr = start_fake_public_recording(None, watches.clone()).await;
    let summary = loadgen::run(
        config(
            &format!("ws://{addr}"),
            &[
                "--clients",
                "6",
                "--duration",
                "1500ms",
                "--rate",
                "5",
                "--page",
                "public",
                "--watch",
                "3",
            ],
        ),
        never(),
    )
    .await;

    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    let watches = watches.lock().unwrap().clone();
    assert_eq!(watches.len(), 6, "one watch per client: {watches:?}");
    let all: std::collections::BTreeSet<String> = (1..=6).map(|i| format!("c{i}")).collect();
    let mut watchers = std::collections::BTreeSet::new();
    for (id, ids) in &watches {
        assert!(watchers.insert(id.clone()), "{id} watched twice");
        assert_eq!(ids.len(), 3, "{id} watches 3: {ids:?}");
        assert!(!ids.contains(id), "{id} does not watch itself");
        assert!(
            ids.iter().all(|w| all.contains(w)),
            "only real ids: {ids:?}"
        );
    }
    // The fake answers every delay_time with an empty delays frame; those
    // of the window are counted (the rest came during ramp and drain).
    let delays = summary.frames_by_command["delays"];
    assert!(summary.delays_bytes > 0, "{summary:?}");
    assert_eq!(summary.delays_bytes % EMPTY_DELAYS.len() as u64, 0);
    assert!(summary.delays_bytes <= delays * EMPTY_DELAYS.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_recycles_clients_and_renames_go_round_robin() {
    let events = Watches::default();
    let addr = start_fake_public_full(None, Watches::default(), events.clone()).await;
    let summary = loadgen::run(
        config(
            &format!("ws://{addr}"),
            &[
                "--clients",
                "40",
                "--duration",
                "2s",
                "--page",
                "public",
                "--churn",
                "10",
                "--renames",
                "5",
            ],
        ),
        never(),
    )
    .await;

    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    let churn = summary.churn.as_ref().expect("churn stats");
    // 10/s and 5/s over 2 s: one event at the window's start, then one per
    // period (the last may fall on the window's end).
    assert!((19..=21).contains(&churn.closed), "{churn:?}");
    // A recycle whose close the run's end overtook is closed, not replaced.
    assert!(
        churn.reconnected <= churn.closed && churn.closed - churn.reconnected <= 1,
        "{churn:?}"
    );
    assert_eq!(churn.reconnect_failed, 0);
    assert!((9..=11).contains(&churn.renames), "{churn:?}");
    let events = events.lock().unwrap().clone();
    let count = |prefix: &str| {
        events
            .iter()
            .filter(|(_, what)| what[0].starts_with(prefix))
            .collect::<Vec<_>>()
    };
    // The server saw each recycled connection close with 1000 and every
    // rename, each by another client, none of the first 16 (observers)
    // recycled.
    let churned = count("close 1000 loadgen churn");
    assert_eq!(churned.len() as u64, churn.closed, "{events:?}");
    let renames = count("rename lg");
    assert_eq!(renames.len() as u64, churn.renames, "{events:?}");
    let renamers: std::collections::BTreeSet<_> = renames.iter().map(|(id, _)| id).collect();
    assert_eq!(renamers.len(), renames.len(), "round robin: {renames:?}");
    // Every client still connected at the end closes as done: all 40 but
    // a recycled one whose replacement the end overtook.
    assert_eq!(
        count("close 1000 loadgen done").len() as u64,
        40 - (churn.closed - churn.reconnected),
        "{events:?}"
    );
    // A replacement whose handshake the run's end overtook may have been
    // upgraded by the server just before loadgen dropped it: the server
    // sees it go without a close. Only such a one (not counted as
    // reconnected) may; every counted client closes with 1000.
    assert!(
        count("gone").len() as u64 <= churn.closed - churn.reconnected,
        "{churn:?} {events:?}"
    );
    // 40 first welcomes and one per replacement.
    assert_eq!(
        summary.frames_by_command["welcome"],
        40 + churn.reconnected,
        "{summary:?}"
    );
    let own = summary
        .loadgen
        .as_ref()
        .expect("loadgen's own usage on Linux");
    assert!(
        own.rss_kib.unwrap() > 0 && own.cpu_percent >= 0.0,
        "{own:?}"
    );
    assert!(summary.bytes_received > 0);
}

/// `--device`: every connection presents its client's secret first, and a
/// client recycled by `--churn` presents the same one again, as a page
/// does after a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_secrets_come_first_and_survive_churn() {
    let events = Watches::default();
    let addr = start_fake_public_full(None, Watches::default(), events.clone()).await;
    let summary = loadgen::run(
        config(
            &format!("ws://{addr}"),
            &[
                "--clients",
                "20",
                "--duration",
                "1500ms",
                "--page",
                "private",
                "--rate",
                "5",
                "--churn",
                "10",
                "--device",
            ],
        ),
        never(),
    )
    .await;
    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    let churn = summary.churn.as_ref().expect("churn stats");
    assert!(churn.reconnected >= 5, "{churn:?}");
    let events = events.lock().unwrap().clone();
    let devices: Vec<&str> = events
        .iter()
        .filter_map(|(_, what)| what[0].strip_prefix("device "))
        .collect();
    assert!(
        !events
            .iter()
            .any(|(_, what)| what[0].starts_with("late device")),
        "{events:?}"
    );
    // One per connection: the first 20 and every replacement.
    assert_eq!(devices.len() as u64, 20 + churn.reconnected, "{events:?}");
    let distinct: std::collections::BTreeSet<&str> = devices.iter().copied().collect();
    assert_eq!(distinct.len(), 20, "one secret per client: {devices:?}");
    for secret in distinct {
        assert!(
            services::ids::valid_device_secret(secret),
            "a well-formed secret: {secret}"
        );
    }
}

#[tokio::test]
async fn device_needs_protocol_2() {
    let err =
        <loadgen::Args as clap::Parser>::try_parse_from(["loadgen", "--device", "--protocol", "1"])
            .expect("flags parse")
            .into_config()
            .unwrap_err();
    assert_eq!(err, loadgen::ConfigError::DeviceNeedsV2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_latency_counts_each_update_a_view_carries_once() {
    let addr = start_fake_public(None).await;
    let summary = loadgen::run(
        config(
            &format!("ws://{addr}"),
            &[
                "--clients",
                "3",
                "--duration",
                "3s",
                "--rate",
                "4",
                "--page",
                "public",
                "--measure-delays",
            ],
        ),
        never(),
    )
    .await;

    assert_eq!(summary.errors_total, 0, "{:?}", summary.errors);
    let delays = summary.delays.as_ref().expect("delay stats");
    assert_eq!(delays.observers, 3);
    // Each client reports 4 times a second; every report but the first one
    // an observer sees of a client is a changed value: 3 observers x 2
    // others x about 12 reports in the window.
    let samples = delays.latency_us.samples;
    assert!((40..=80).contains(&samples), "{delays:?}");
    // The fake relays at once: loopback latency, far below a second.
    assert!(delays.latency_us.p99.unwrap() < 500_000, "{delays:?}");
    assert!(summary.frames_by_command["view_update"] > samples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_connections_closed_by_the_server() {
    let addr = start_fake_public(Some(1008)).await;
    let summary = loadgen::run(
        config(
            &format!("ws://{addr}"),
            &[
                "--clients",
                "2",
                "--duration",
                "500ms",
                "--rate",
                "10",
                "--page",
                "public",
            ],
        ),
        never(),
    )
    .await;

    assert_eq!(summary.clients_connected, 2);
    assert_eq!(
        summary.errors.closed_by_server.get(&1008),
        Some(&2),
        "{:?}",
        summary.errors
    );
    assert_eq!(summary.errors_total, 2);
}

/// Error frames are counted by their `code`, against the real gateway:
/// two clients renaming 10 times a second between them go over the
/// gateway's rename budget (docs/protocol.md, "Limits": a burst of 3, then
/// 10 a minute) and get `too_many_renames`, and the gateway's own count of
/// the error frames it sent agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_error_frames_by_code_from_the_gateway() {
    let server = PingApp::start(&[]);
    let summary = loadgen::run(
        config(
            &format!("ws://{}", server.addr),
            &[
                "--clients",
                "2",
                "--duration",
                "3s",
                "--page",
                "public",
                "--renames",
                "10",
            ],
        ),
        never(),
    )
    .await;

    let errors = &summary.errors;
    let refused = errors.server_errors;
    let renames = summary.churn.as_ref().expect("renames counted").renames;
    // 30 renames; each client has 3 at once and a sixth a second more.
    assert!(renames >= 28, "{summary:?}");
    assert!(refused >= renames - 8, "{renames} renames: {errors:?}");
    assert_eq!(
        errors.server_error_codes,
        std::collections::BTreeMap::from([("too_many_renames".to_owned(), refused)]),
        "{errors:?}"
    );
    assert_eq!(summary.frames_by_command["error"], refused);
    assert_eq!(summary.errors_total, refused, "{errors:?}");
    let text = summary.to_string();
    assert!(
        text.contains(&format!(
            "{refused} server errors: {refused}×too_many_renames,"
        )),
        "{text}"
    );
    // The gateway sent every one loadgen counted; at most one more per
    // client, answering a rename sent as the run stopped, may have come
    // after that client's close.
    let sent = server
        .metric(r#"pingapp_gateway_errors_total{code="too_many_renames"}"#)
        .await as u64;
    assert!(
        (refused..=refused + 2).contains(&sent),
        "the gateway sent {sent}, loadgen counted {refused}"
    );
    let json = serde_json::to_value(&summary).unwrap();
    assert_eq!(
        json["errors"]["server_error_codes"]["too_many_renames"],
        refused
    );
}

#[test]
fn binary_prints_one_json_summary() {
    let echo = EchoProcess::start();
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            &echo.url(),
            "--clients",
            "3",
            "--duration",
            "1s",
            "--rate",
            "10",
            "--json",
        ])
        .output()
        .expect("loadgen runs");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let json: Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(json["clients_connected"], 3);
    assert_eq!(json["errors_total"], 0);
    assert!(json["pings"].as_u64().unwrap() > 0);
    assert!(json["pings_per_sec"].as_f64().unwrap() > 0.0);
    let rtt = &json["rtt_us"];
    let p = |key: &str| {
        rtt[key]
            .as_u64()
            .unwrap_or_else(|| panic!("rtt_us.{key} in {rtt}"))
    };
    assert!(
        0 < p("p50")
            && p("p50") <= p("p90")
            && p("p90") <= p("p99")
            && p("p99") <= p("p999")
            && p("p999") <= p("max")
    );
    assert!(json["broadcast"].is_null());
    assert!(json["frames_by_command"]["pong"].as_u64().unwrap() > 0);
}

#[test]
fn binary_exits_1_when_no_client_connects() {
    // Nobody listens on a port the kit hands out.
    let port = testkit::free_port();
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            &format!("ws://127.0.0.1:{port}"),
            "--clients",
            "2",
            "--duration",
            "1s",
            "--json",
        ])
        .output()
        .expect("loadgen runs");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let json: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(json["clients_connected"], 0);
    assert_eq!(json["errors"]["connect_failed"], 2);
}

#[test]
fn binary_exits_2_on_a_bad_setting() {
    for bad in [
        &["--duration", "10x"][..],
        &["--page", "public", "--rate=-1"],
        &["https://example.invalid"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(bad)
            .output()
            .expect("loadgen runs");
        assert_eq!(output.status.code(), Some(2), "{bad:?}: {output:?}");
        assert!(output.stdout.is_empty());
    }
}
