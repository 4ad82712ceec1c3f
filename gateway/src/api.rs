//! The HTTP API (`docs/protocol.md`, "HTTP API"): roster, a client's
//! samples, statistics. History and statistics come from the recorder over
//! the bus; the gateway never opens the database. Requests are checked
//! against the shared bounds of [`services::limits`] before they travel; a
//! recorder's refusal keeps its kind: bad request is 400, unavailable 503.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use bytes::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use services::bus::{BusError, Payload, Service};
use services::limits::{self, BadRequest};
use services::messages::{
    DeviceHistoryQuery, DeviceHistoryReply, ForgetDeviceQuery, ForgetDeviceReply, ReplyErrorKind,
    SamplesQuery, SamplesReply, StatsQuery, StatsReply,
};
use services::protocol::{ViewSpec, parse_filter, parse_order, parse_sort};

use tracing::Instrument;

use crate::state::Shared;

/// Longest a query waits for the recorder.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// When this gateway stops waiting for a query asked now, Unix ms: sent
/// with the query, so the recorder stops reading then too
/// (docs/architecture.md, "Bounds").
fn query_deadline() -> i64 {
    services::unix_ms().saturating_add(QUERY_TIMEOUT.as_millis() as i64)
}

/// The API routes, each request counted against its client address's
/// budget (`--max-api-requests-per-ip-per-second`, docs/security.md).
pub fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/roster", get(roster))
        .route("/api/clients/{id}/samples", get(samples))
        .route("/api/stats", get(stats))
        .route("/api/device/history", get(device_history))
        .route("/api/device", delete(forget_device))
        .route_layer(middleware::from_fn_with_state(shared, per_ip_budget))
}

/// Answers 429 with `Retry-After` to an address over its API budget.
async fn per_ip_budget(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let ip = shared.ip_limits.client_ip(peer.ip(), req.headers());
    if shared.api_budget.admit(ip) {
        return next.run(req).await;
    }
    shared
        .metrics
        .refused
        .with_label_values(&["api_rate"])
        .inc();
    let mut resp = ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        code: "too_many_requests",
        detail: "too many API requests from this address; retry after a second".into(),
    }
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
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

    /// The one answer for a browser identity that cannot be read: no
    /// secret, a malformed one, or one nobody stored samples under.
    fn no_device() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            detail: "no such device".into(),
        }
    }

    fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            detail: detail.into(),
        }
    }

    /// The recorder's read budget is spent: 429, retry after
    /// [`BUSY_RETRY_AFTER_SECS`].
    fn busy(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "busy",
            detail: detail.into(),
        }
    }
}

/// The `Retry-After` of a 429 (the recorder was busy), in seconds.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        ApiError::bad_request(e.0)
    }
}

impl ApiError {
    /// The answer to a recorder's `Error` reply: its kind decides the
    /// status.
    fn from_reply(kind: ReplyErrorKind, message: String) -> Self {
        match kind {
            ReplyErrorKind::BadRequest => ApiError::bad_request(message),
            ReplyErrorKind::Unavailable => ApiError::unavailable(message),
            ReplyErrorKind::Busy => ApiError::busy(message),
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
        let mut response = (
            self.status,
            Json(json!({"error": self.code, "detail": self.detail})),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(BUSY_RETRY_AFTER_SECS),
            );
        }
        response
    }
}

/// Rows of one `/api/roster` page unless `limit` says otherwise.
pub const ROSTER_DEFAULT_LIMIT: u32 = 100;
/// Most rows of one `/api/roster` page.
pub const ROSTER_MAX_LIMIT: u32 = 1000;

#[derive(Serialize)]
struct RosterEntry<'a> {
    #[serde(flatten)]
    row: &'a crate::view::Row,
    connected_at: String,
}

#[derive(Serialize)]
struct RosterPage<'a> {
    total: usize,
    matched: usize,
    next_cursor: Option<String>,
    clients: Vec<RosterEntry<'a>>,
}

#[derive(Deserialize)]
struct RosterParams {
    sort: Option<String>,
    order: Option<String>,
    filter: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

impl RosterParams {
    /// The page as a view: the same order and filter as the pages'
    /// (docs/protocol.md, "`GET /api/roster`").
    fn spec(&self) -> Result<ViewSpec, ApiError> {
        let limit = match self.limit.as_deref() {
            None => ROSTER_DEFAULT_LIMIT,
            Some(l) => match l.parse::<u32>() {
                Ok(n) if (1..=ROSTER_MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad_request(
                        "limit must be an integer from 1 to 1000",
                    ));
                }
            },
        };
        let offset = match self.cursor.as_deref() {
            None | Some("") => 0,
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| ApiError::bad_request("cursor is not one this API returned"))?,
        };
        Ok(ViewSpec {
            sort: parse_sort(self.sort.as_deref()).map_err(ApiError::bad_request)?,
            order: parse_order(self.order.as_deref()).map_err(ApiError::bad_request)?,
            filter: parse_filter(self.filter.as_deref()).map_err(ApiError::bad_request)?,
            offset,
            limit,
        })
    }
}

/// `GET /api/roster`: one page of the roster, built once per tick for
/// each distinct request and shared ([`crate::room::Room::api_page`]).
async fn roster(
    State(shared): State<Arc<Shared>>,
    Query(p): Query<RosterParams>,
) -> Result<Response, ApiError> {
    let spec = p.spec()?;
    let body = shared.room.api_page(&spec, |mirror| {
        let w = mirror.window(&spec);
        let end = spec.offset + w.rows.len() as u64;
        let page = RosterPage {
            total: w.total,
            matched: w.matched,
            next_cursor: (end < w.matched as u64).then(|| end.to_string()),
            clients: w
                .rows
                .iter()
                .map(|row| RosterEntry {
                    connected_at: rfc3339_us(
                        mirror.connected_at_ms(&row.channel_name).unwrap_or(0) * 1000,
                    ),
                    row,
                })
                .collect(),
        };
        Bytes::from(serde_json::to_vec(&page).expect("roster pages serialize"))
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
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
    let since_us = limits::parse_since(params.since.as_deref())?;
    let limit = limits::parse_limit(params.limit.as_deref())?;
    // Only the token's digest goes to the recorder: no token on the bus.
    let token_digest = bearer_token(&headers).map(|t| services::ids::token_digest(&t));
    if id.len() > limits::MAX_CLIENT_ID_LEN {
        return Err(ApiError::not_found());
    }
    let query = SamplesQuery {
        channel_name: id.clone(),
        token_digest,
        since_us,
        limit,
        deadline_unix_ms: Some(query_deadline()),
    };
    let span = tracing::info_span!("gateway.api.samples", channel_name = %id, limit);
    match ask(&shared, &shared.subjects.query_samples(), &query, span).await? {
        SamplesReply::Found { samples } => {
            let samples: Vec<_> = samples
                .into_iter()
                .map(|s| json!({"at": rfc3339_us(s.at_us), "delay_time": s.delay_ms, "seq": s.seq}))
                .collect();
            Ok(Json(json!({"channel_name": id, "samples": samples})).into_response())
        }
        SamplesReply::NotFound => Err(ApiError::not_found()),
        SamplesReply::Error { kind, message } => Err(ApiError::from_reply(kind, message)),
    }
}

#[derive(Deserialize)]
struct StatsParams {
    window: Option<String>,
    bucket: Option<String>,
}

async fn stats(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<StatsParams>,
) -> Result<Response, ApiError> {
    let (window_d, bucket_d) =
        limits::parse_stats(params.window.as_deref(), params.bucket.as_deref())?;
    let window = params.window.unwrap_or_else(|| "1h".into());
    let bucket = params.bucket.unwrap_or_else(|| "1m".into());
    let (window_ms, bucket_ms) = (millis(window_d), millis(bucket_d));
    let query = StatsQuery {
        window_ms,
        bucket_ms,
        deadline_unix_ms: Some(query_deadline()),
    };
    let span = tracing::info_span!("gateway.api.stats", window_ms, bucket_ms);
    match ask(&shared, &shared.subjects.query_stats(), &query, span).await? {
        StatsReply::Ok { buckets } => {
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
        StatsReply::Error { kind, message } => Err(ApiError::from_reply(kind, message)),
    }
}

#[derive(Deserialize)]
struct DeviceHistoryParams {
    window: Option<String>,
    bucket: Option<String>,
}

/// Parses the `window` (default 1h) and `bucket` (default
/// [`limits::default_device_bucket`] of the window) of a device history
/// request and checks them with [`limits::check_device_history`].
fn device_history_bounds(p: &DeviceHistoryParams) -> Result<(Duration, Duration), ApiError> {
    let window = match p.window.as_deref() {
        None => limits::DEFAULT_WINDOW,
        Some(w) => services::config::parse_duration(w)
            .map_err(|_| ApiError::bad_request("window must be like 1h, 1d, 7d or 31d"))?,
    };
    let bucket = match p.bucket.as_deref() {
        None => limits::default_device_bucket(window),
        Some(b) => services::config::parse_duration(b)
            .map_err(|_| ApiError::bad_request("bucket must be like 1m, 10m or 1h"))?,
    };
    limits::check_device_history(window, bucket)?;
    Ok((window, bucket))
}

/// The digest of the device secret in the `Authorization: Bearer` header,
/// or the one 404 for a missing or malformed secret. The secret itself
/// never leaves the gateway (docs/security.md, "Your history").
fn device_of(headers: &HeaderMap) -> Result<String, ApiError> {
    match bearer_token(headers) {
        Some(secret) if services::ids::valid_device_secret(&secret) => {
            Ok(services::ids::device_digest(&secret))
        }
        _ => Err(ApiError::no_device()),
    }
}

/// `GET /api/device/history?window=1h&bucket=1m` with the browser's
/// secret as bearer: every connection of that browser, bucketed
/// (docs/protocol.md, "Your history").
async fn device_history(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<DeviceHistoryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (window, bucket) = device_history_bounds(&params)?;
    let device = device_of(&headers)?;
    let (window_ms, bucket_ms) = (millis(window), millis(bucket));
    let query = DeviceHistoryQuery {
        device,
        window_ms,
        bucket_ms,
        deadline_unix_ms: Some(query_deadline()),
    };
    let span = tracing::info_span!("gateway.api.device_history", window_ms, bucket_ms);
    match ask(
        &shared,
        &shared.subjects.query_device_history(),
        &query,
        span,
    )
    .await?
    {
        DeviceHistoryReply::Found { buckets } => {
            let buckets: Vec<_> = buckets
                .into_iter()
                .map(|b| {
                    json!({"start": rfc3339_us(b.start_us), "count": b.count, "min": b.min,
                           "mean": b.mean, "p50": b.p50, "p95": b.p95, "p99": b.p99,
                           "max": b.max, "jitter": b.jitter})
                })
                .collect();
            Ok(
                Json(json!({"window_ms": window_ms, "bucket_ms": bucket_ms, "buckets": buckets}))
                    .into_response(),
            )
        }
        DeviceHistoryReply::NotFound => Err(ApiError::no_device()),
        DeviceHistoryReply::Error { kind, message } => Err(ApiError::from_reply(kind, message)),
    }
}

/// `DELETE /api/device` with the browser's secret as bearer: forgets every
/// sample of every connection of that browser.
async fn forget_device(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let device = device_of(&headers)?;
    let span = tracing::info_span!("gateway.api.forget_device");
    let query = ForgetDeviceQuery {
        device,
        deadline_unix_ms: Some(query_deadline()),
    };
    match ask(&shared, &shared.subjects.forget_device(), &query, span).await? {
        ForgetDeviceReply::Forgotten { channels } => {
            Ok(Json(json!({"forgotten": true, "channels": channels})).into_response())
        }
        ForgetDeviceReply::NotFound => Err(ApiError::no_device()),
        ForgetDeviceReply::Error { kind, message } => Err(ApiError::from_reply(kind, message)),
    }
}

/// Asks the recorder on `service` within [`QUERY_TIMEOUT`], traced under
/// `span`: its reply, or 503 when the bus fails or the reply does not
/// decode.
async fn ask<Q: Payload, R: Payload>(
    shared: &Shared,
    service: &Service<Q, R>,
    query: &Q,
    span: tracing::Span,
) -> Result<R, ApiError> {
    let headers = services::telemetry::context_headers(&span);
    let reply = service
        .request(&*shared.bus, query, QUERY_TIMEOUT)
        .headers(headers)
        .into_future()
        .instrument(span)
        .await;
    match reply {
        Ok(r) => Ok(r),
        Err(e @ BusError::Decode { .. }) => Err(ApiError::unavailable(format!(
            "bad reply from recorder: {e}"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The token of an `Authorization: Bearer TOKEN` header; the scheme is
/// case-insensitive (RFC 9110, section 11.1), so `bearer` and `BEARER`
/// work too.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// Whole milliseconds of a duration within the API's bounds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
    fn recorder_refusals_keep_their_kind() {
        let bad = ApiError::from_reply(ReplyErrorKind::BadRequest, "at most 5000 buckets".into());
        assert_eq!(
            (bad.status, bad.code),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
        let down = ApiError::from_reply(ReplyErrorKind::Unavailable, "database unavailable".into());
        assert_eq!(
            (down.status, down.code),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        let limit = ApiError::from(BadRequest("limit".into()));
        assert_eq!(limit.status, StatusCode::BAD_REQUEST);
        let busy = ApiError::from_reply(ReplyErrorKind::Busy, "too many reads".into());
        assert_eq!(
            (busy.status, busy.code),
            (StatusCode::TOO_MANY_REQUESTS, "busy")
        );
        let response = busy.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "1");
        let down = ApiError::unavailable("down").into_response();
        assert!(!down.headers().contains_key("retry-after"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            bearer_token(&h)
        };
        for v in ["Bearer t0k", "bearer t0k", "BEARER  t0k ", "BeArEr\tt0k"] {
            assert_eq!(with(v).as_deref(), Some("t0k"), "{v}");
        }
        for v in ["Basic t0k", "Bearer", "Bearer ", "Bearert0k"] {
            assert_eq!(with(v), None, "{v}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn device_history_bounds_default_and_refuse() {
        let p = |w: Option<&str>, b: Option<&str>| DeviceHistoryParams {
            window: w.map(str::to_owned),
            bucket: b.map(str::to_owned),
        };
        let m = |s: u64| Duration::from_secs(s * 60);
        assert_eq!(
            device_history_bounds(&p(None, None)).unwrap(),
            (m(60), m(1))
        );
        assert_eq!(
            device_history_bounds(&p(Some("1d"), None)).unwrap(),
            (m(1440), m(10))
        );
        assert_eq!(
            device_history_bounds(&p(Some("31d"), None)).unwrap(),
            (m(31 * 1440), m(240))
        );
        for (w, b) in [
            (Some("soon"), None),
            (Some("30s"), None),
            (Some("32d"), None),
            (Some("1h"), Some("90s")),
            (Some("1h"), Some("2h")),
            (Some("31d"), Some("1m")),
            (None, Some("x")),
        ] {
            let e = device_history_bounds(&p(w, b)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{w:?} {b:?}");
        }
    }

    #[test]
    fn a_device_needs_a_well_formed_bearer_secret_and_only_its_digest_travels() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            device_of(&h)
        };
        let secret = "s".repeat(43);
        assert_eq!(
            with(&format!("Bearer {secret}")).unwrap(),
            services::ids::device_digest(&secret)
        );
        for v in [
            "Bearer short",
            "Bearer aaaaaaaaaaaaaaaaaaaaaaaaaaaa=",
            "Basic x",
        ] {
            let e = with(v).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::NOT_FOUND, "not_found"),
                "{v}"
            );
        }
        let e = device_of(&HeaderMap::new()).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339_us(1_500_000), "1970-01-01T00:00:01.500000Z");
    }
}
