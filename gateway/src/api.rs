//! The HTTP API (SPEC section 4): roster, a client's samples, statistics.
//! History and statistics come from the recorder over the bus; the gateway
//! never opens the database.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use services::bus::BusError;
use services::messages::{SamplesQuery, SamplesReply, StatsQuery, StatsReply};

use tracing::Instrument;

use crate::state::Shared;

/// Longest a query waits for the recorder.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most samples one request returns.
pub const MAX_LIMIT: u32 = 10_000;

/// The API routes.
pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/roster", get(roster))
        .route("/api/clients/{id}/samples", get(samples))
        .route("/api/stats", get(stats))
}

/// An API error: a status and a JSON body `{"error": code, "detail": text}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl ApiError {
    fn bad_request(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            detail: detail.into(),
        }
    }

    fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            detail: "no such client".into(),
        }
    }

    fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            detail: detail.into(),
        }
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        ApiError::unavailable(format!("recorder unavailable: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "detail": self.detail})),
        )
            .into_response()
    }
}

#[derive(Serialize)]
struct RosterEntry {
    channel_name: String,
    name: String,
    gateway: String,
    delay_time: Option<f64>,
    median: Option<f64>,
    jitter: Option<f64>,
    connected_at: String,
}

async fn roster(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let clients: Vec<RosterEntry> = shared
        .room
        .list()
        .into_iter()
        .map(|c| RosterEntry {
            connected_at: rfc3339_us(c.connected_at_ms * 1000),
            delay_time: c.stats.map(|s| s.delay_time),
            median: c.stats.map(|s| s.median),
            jitter: c.stats.map(|s| s.jitter),
            channel_name: c.channel_name,
            name: c.name,
            gateway: c.gateway,
        })
        .collect();
    Json(json!({ "clients": clients }))
}

#[derive(Deserialize)]
struct SamplesParams {
    since: Option<String>,
    limit: Option<String>,
}

async fn samples(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(params): Query<SamplesParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let since_us = match params.since.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| ApiError::bad_request("since must be an RFC 3339 time"))?
                .timestamp_micros(),
        ),
    };
    let limit = match params.limit.as_deref() {
        None | Some("") => 1000,
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}"
                )));
            }
        },
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    if id.len() > 128 {
        return Err(ApiError::not_found());
    }
    let query = SamplesQuery {
        channel_name: id.clone(),
        token,
        since_us,
        limit,
    };
    let span = tracing::info_span!("gateway.api.samples", channel_name = %id, limit);
    let headers = services::telemetry::context_headers(&span);
    let reply = shared
        .subjects
        .query_samples()
        .request(&*shared.bus, &query, QUERY_TIMEOUT)
        .headers(headers)
        .into_future()
        .instrument(span)
        .await;
    match reply {
        Ok(SamplesReply::Found { samples }) => {
            let samples: Vec<_> = samples
                .into_iter()
                .map(|s| json!({"at": rfc3339_us(s.at_us), "delay_time": s.delay_ms, "seq": s.seq}))
                .collect();
            Ok(Json(json!({"channel_name": id, "samples": samples})).into_response())
        }
        Ok(SamplesReply::NotFound) => Err(ApiError::not_found()),
        Ok(SamplesReply::Error { message }) => Err(ApiError::unavailable(message)),
        Err(e @ BusError::Decode { .. }) => Err(ApiError::unavailable(format!(
            "bad reply from recorder: {e}"
        ))),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct StatsParams {
    window: Option<String>,
    bucket: Option<String>,
}

/// Longest statistics window.
const MAX_WINDOW_S: u64 = 31 * 86_400;
/// Most buckets one request may ask for.
const MAX_BUCKETS: u64 = 10_000;

async fn stats(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<StatsParams>,
) -> Result<Response, ApiError> {
    let window = params.window.unwrap_or_else(|| "1h".into());
    let bucket = params.bucket.unwrap_or_else(|| "1m".into());
    let window_s = parse_span(&window)
        .ok_or_else(|| ApiError::bad_request("window must be like 90s, 15m, 1h or 7d"))?;
    let bucket_s = parse_span(&bucket)
        .ok_or_else(|| ApiError::bad_request("bucket must be like 10s, 1m or 1h"))?;
    if window_s == 0 || window_s > MAX_WINDOW_S {
        return Err(ApiError::bad_request("window must be between 1s and 31d"));
    }
    if bucket_s == 0 || bucket_s > window_s {
        return Err(ApiError::bad_request(
            "bucket must be between 1s and the window",
        ));
    }
    if window_s / bucket_s > MAX_BUCKETS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_BUCKETS} buckets per request"
        )));
    }
    let query = StatsQuery { window_s, bucket_s };
    let span = tracing::info_span!("gateway.api.stats", window_s, bucket_s);
    let headers = services::telemetry::context_headers(&span);
    let reply = shared
        .subjects
        .query_stats()
        .request(&*shared.bus, &query, QUERY_TIMEOUT)
        .headers(headers)
        .into_future()
        .instrument(span)
        .await;
    match reply {
        Ok(StatsReply::Ok { buckets }) => {
            let buckets: Vec<_> = buckets
                .into_iter()
                .map(|b| {
                    json!({"start": rfc3339_us(b.start_us), "count": b.count, "min": b.min,
                           "p50": b.p50, "p95": b.p95, "p99": b.p99, "max": b.max})
                })
                .collect();
            Ok(
                Json(json!({"window": window, "bucket": bucket, "buckets": buckets}))
                    .into_response(),
            )
        }
        Ok(StatsReply::Error { message }) => Err(ApiError::unavailable(message)),
        Err(e @ BusError::Decode { .. }) => Err(ApiError::unavailable(format!(
            "bad reply from recorder: {e}"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Parses `90s`, `15m`, `1h`, `7d` (or bare seconds) into seconds.
pub fn parse_span(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Unix µs as RFC 3339 with microseconds, UTC.
pub fn rfc3339_us(us: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(parse_span("1h"), Some(3600));
        assert_eq!(parse_span("1m"), Some(60));
        assert_eq!(parse_span("90"), Some(90));
        assert_eq!(parse_span("7d"), Some(604_800));
        assert_eq!(parse_span("1w"), None);
        assert_eq!(parse_span("h"), None);
        assert_eq!(parse_span("99999999999999999999d"), None);
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339_us(1_500_000), "1970-01-01T00:00:01.500000Z");
    }
}
