//! `GET /api/stats` against the one row budget (services::limits,
//! docs/protocol.md "HTTP API"): an over-budget window and bucket is
//! answered 400 by the gateway, naming a bucket it would accept, and never
//! reaches the recorder; an allowed one is asked of the recorder (here the
//! test, answering on the bus).

use futures_util::StreamExt as _;
use gateway::GatewayArgs;
use services::messages::{StatsQuery, StatsReply};

use crate::helpers::TestGateway;
use crate::room::get_json;

#[tokio::test]
async fn an_over_budget_statistics_query_is_refused_with_an_accepted_bucket() {
    let gw = TestGateway::start(GatewayArgs {
        max_api_requests_per_ip_per_second: 1000,
        ..Default::default()
    })
    .await;
    // The test stands in for the recorder: it answers every query it
    // gets with no buckets, and counts them.
    let mut queries = gw
        .subjects
        .query_stats()
        .serve(&*gw.bus, "recorder")
        .await
        .unwrap();
    let bus = gw.bus.clone();
    let recorder = tokio::spawn(async move {
        let mut asked: Vec<StatsQuery> = Vec::new();
        while let Some(q) = queries.next().await {
            let reply = StatsReply::Ok {
                buckets: Vec::new(),
            };
            q.reply(&*bus, &reply).await.unwrap();
            asked.push(q.message.unwrap());
            if asked.len() == 3 {
                break;
            }
        }
        asked
    });
    for (query, accepted) in [
        ("window=31d&bucket=10m", "bucket=1h"),
        ("window=31d&bucket=601s", "bucket=1h"),
        ("window=2d&bucket=1m", "bucket=10m"),
        ("window=1h&bucket=30s", "bucket=1m"),
    ] {
        let (status, body) = get_json(&gw, &format!("/api/stats?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "bad_request", "{query}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(accepted), "{query}: {detail}");
    }
    for query in [
        "window=31d&bucket=1h",
        "window=7d&bucket=10m",
        "window=15m&bucket=10s",
    ] {
        let (status, body) = get_json(&gw, &format!("/api/stats?{query}")).await;
        assert_eq!(status, 200, "{query}: {body}");
    }
    // Only the three allowed queries reached the recorder.
    let asked = recorder.await.unwrap();
    let shapes: Vec<(u64, u64)> = asked.iter().map(|q| (q.window_ms, q.bucket_ms)).collect();
    assert_eq!(
        shapes,
        [
            (31 * 86_400_000, 3_600_000),
            (7 * 86_400_000, 600_000),
            (900_000, 10_000)
        ]
    );
}
