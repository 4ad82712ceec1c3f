//! The bounds of the HTTP API's history and statistics queries, defined
//! once: the gateway checks every request against them before it asks the
//! recorder, and the recorder checks the queries it gets against the same
//! numbers, so the two can never disagree (`docs/protocol.md`, "HTTP API").

use std::time::Duration;

use crate::config::parse_duration;

/// Samples one history request returns when it names no `limit`.
pub const DEFAULT_SAMPLES: u32 = 1_000;

/// The most samples one history request may ask for.
pub const MAX_SAMPLES: u32 = 10_000;

/// The longest client id a history request may name; a longer one cannot
/// exist and is answered like an unknown id.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// The statistics window when the request names none (`window=1h`).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);

/// The statistics bucket width when the request names none (`bucket=1m`).
pub const DEFAULT_BUCKET: Duration = Duration::from_secs(60);

/// The longest statistics window: 31 days.
pub const MAX_WINDOW: Duration = Duration::from_secs(31 * 86_400);

/// The most buckets one statistics answer holds: keeps the recorder's reply
/// well under NATS's default 1 MiB payload limit.
pub const MAX_BUCKETS: u64 = 5_000;

/// A request outside the bounds: the text says which parameter and why,
/// for the caller to show (the HTTP API answers 400 with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// Parses the `since` parameter of a history request: absent or empty is
/// no bound, else an RFC 3339 time, returned as Unix µs.
///
/// # Errors
/// Not an RFC 3339 time.
pub fn parse_since(since: Option<&str>) -> Result<Option<i64>, BadRequest> {
    match since {
        None | Some("") => Ok(None),
        Some(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.timestamp_micros()))
            .map_err(|_| BadRequest("since must be an RFC 3339 time".into())),
    }
}

/// Parses the `limit` parameter of a history request: absent or empty is
/// [`DEFAULT_SAMPLES`], else an integer from 1 to [`MAX_SAMPLES`].
///
/// # Errors
/// Not an integer in range.
pub fn parse_limit(limit: Option<&str>) -> Result<u32, BadRequest> {
    match limit {
        None | Some("") => Ok(DEFAULT_SAMPLES),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=MAX_SAMPLES).contains(&n) => Ok(n),
            _ => Err(BadRequest(format!(
                "limit must be an integer from 1 to {MAX_SAMPLES}"
            ))),
        },
    }
}

/// Parses the `window` and `bucket` parameters of a statistics request
/// (the one duration grammar, [`parse_duration`]: `90s`, `15m`, `1h30m`,
/// `7d`, `500ms`, or bare seconds) and checks them with [`check_stats`].
/// Absent parameters take [`DEFAULT_WINDOW`] and [`DEFAULT_BUCKET`].
///
/// # Errors
/// A parameter that does not parse, or bounds that [`check_stats`] refuses.
pub fn parse_stats(
    window: Option<&str>,
    bucket: Option<&str>,
) -> Result<(Duration, Duration), BadRequest> {
    let span = |value: Option<&str>, default, example: &str| match value {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|_| BadRequest(example.to_owned())),
    };
    let window = span(
        window,
        DEFAULT_WINDOW,
        "window must be like 90s, 15m, 1h or 7d",
    )?;
    let bucket = span(
        bucket,
        DEFAULT_BUCKET,
        "bucket must be like 500ms, 10s, 1m or 1h",
    )?;
    check_stats(window, bucket)?;
    Ok((window, bucket))
}

/// The public room's rollup tiers, coarsest first: hours, ten minutes,
/// minutes (`room_hours`, `room_ten_minutes`, `room_minutes`;
/// docs/architecture.md, "Rollups"). Each width divides the one before.
/// Statistics in buckets of whole minutes read the coarsest tier whose
/// width divides the bucket, and the finer tiers only for the partial
/// rows at the window's start.
pub const ROLLUP_TIERS: [Duration; 3] = [
    Duration::from_secs(3600),
    Duration::from_secs(600),
    Duration::from_secs(60),
];

/// The most rollup rows one statistics request may read
/// ([`stats_rollup_rows`]): 31 days need hourly buckets (759 rows),
/// 7 days 10-minute ones (1,018), a day fits minute buckets (1,441).
/// Measured in docs/benchmarks.md ("Rollup tiers").
pub const MAX_STATS_ROWS: u64 = 1_500;

/// The longest statistics window whose buckets may be other than whole
/// minutes: those are summed from the raw packed blocks of the window (and
/// the staged samples), whose cost is the room's samples in it, so only
/// short windows may read them.
pub const MAX_RAW_WINDOW: Duration = Duration::from_secs(15 * 60);

/// At most how many rollup rows statistics over `window` in buckets of
/// `bucket` read, up to the present: the rows of the coarsest tier of
/// [`ROLLUP_TIERS`] whose width divides the bucket over the window (one
/// more for the partial row at each end), and the finer rows of the
/// window's start up to the first whole row of that tier. `None` when the
/// bucket is not whole minutes (those read raw blocks).
pub fn stats_rollup_rows(window: Duration, bucket: Duration) -> Option<u64> {
    let b = bucket.as_micros();
    if b == 0 {
        return None;
    }
    let tier = ROLLUP_TIERS
        .iter()
        .position(|t| b.is_multiple_of(t.as_micros()))?;
    let width = ROLLUP_TIERS[tier].as_micros();
    let edges: u128 = ROLLUP_TIERS[tier..]
        .windows(2)
        .map(|w| w[0].as_micros() / w[1].as_micros() - 1)
        .sum();
    let rows = window.as_micros().div_ceil(width) + 1 + edges;
    Some(u64::try_from(rows).unwrap_or(u64::MAX))
}

/// Checks a statistics window and bucket width: a window from 1 ms to
/// [`MAX_WINDOW`], a bucket from 1 ms to the window, at most
/// [`MAX_BUCKETS`] buckets, at most [`MAX_STATS_ROWS`] rollup rows
/// ([`stats_rollup_rows`]), and a bucket of whole minutes unless the
/// window is at most [`MAX_RAW_WINDOW`]. A request over the row budget is
/// told a bucket that is accepted for its window.
///
/// # Errors
/// Which bound the request breaks.
pub fn check_stats(window: Duration, bucket: Duration) -> Result<(), BadRequest> {
    check_stats_shape(window, bucket)?;
    let over = match stats_rollup_rows(window, bucket) {
        None if window <= MAX_RAW_WINDOW => return Ok(()),
        None => format!(
            "a bucket that is not whole minutes is only allowed for windows up to {}",
            format_duration(MAX_RAW_WINDOW)
        ),
        Some(rows) if rows <= MAX_STATS_ROWS => return Ok(()),
        Some(rows) => format!(
            "this window in buckets of {} reads up to {rows} rollup rows, more than {MAX_STATS_ROWS}",
            format_duration(bucket)
        ),
    };
    let accepted = ROLLUP_TIERS
        .iter()
        .rev()
        .copied()
        .find(|b| {
            check_stats_shape(window, *b).is_ok()
                && stats_rollup_rows(window, *b).is_some_and(|r| r <= MAX_STATS_ROWS)
        })
        .map_or_else(
            || "a shorter window".to_owned(),
            |b| format!("bucket={}", format_duration(b)),
        );
    Err(BadRequest(format!("{over}: ask for {accepted}")))
}

/// The bounds of [`check_stats`] that do not depend on the storage.
fn check_stats_shape(window: Duration, bucket: Duration) -> Result<(), BadRequest> {
    let (window_ms, bucket_ms) = (window.as_millis(), bucket.as_millis());
    if window_ms == 0 || window > MAX_WINDOW {
        return Err(BadRequest("window must be between 1ms and 31d".into()));
    }
    if bucket_ms == 0 || bucket > window {
        return Err(BadRequest(
            "bucket must be between 1ms and the window".into(),
        ));
    }
    if window_ms.div_ceil(bucket_ms) > u128::from(MAX_BUCKETS) {
        return Err(BadRequest(format!(
            "at most {MAX_BUCKETS} buckets per request"
        )));
    }
    Ok(())
}

/// A duration in the API's grammar: whole days, hours, minutes or seconds
/// as `7d`, `1h`, `10m`, `90s`, else milliseconds (`500ms`).
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, name) in [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ] {
        if ms >= unit && ms.is_multiple_of(unit) {
            return format!("{}{name}", ms / unit);
        }
    }
    format!("{ms}ms")
}

/// The longest window of a browser's own history (docs/protocol.md, "Your
/// history"): 31 days, the same as statistics.
pub const MAX_DEVICE_WINDOW: Duration = MAX_WINDOW;

/// The most buckets one history answer holds.
pub const MAX_DEVICE_BUCKETS: u64 = 1_000;

/// The bucket width of a browser's history window when the request names
/// none: about 60 to 180 buckets for the page's four windows (1h: 1 min,
/// 1d: 10 min, 7d: 1 h, 31d: 4 h).
pub fn default_device_bucket(window: Duration) -> Duration {
    const MIN: u64 = 60;
    let w = window.as_secs();
    Duration::from_secs(if w <= 3 * 3600 {
        MIN
    } else if w <= 2 * 86_400 {
        10 * MIN
    } else if w <= 8 * 86_400 {
        60 * MIN
    } else {
        240 * MIN
    })
}

/// Checks a browser history window and bucket: a window from one minute
/// to [`MAX_DEVICE_WINDOW`], a bucket of whole minutes (history is read
/// from per-minute rollups), at most [`MAX_DEVICE_BUCKETS`] buckets.
///
/// # Errors
/// Which bound the request breaks.
pub fn check_device_history(window: Duration, bucket: Duration) -> Result<(), BadRequest> {
    if window < Duration::from_secs(60) || window > MAX_DEVICE_WINDOW {
        return Err(BadRequest("window must be between 1m and 31d".into()));
    }
    if bucket.as_millis() == 0 || !bucket.as_millis().is_multiple_of(60_000) || bucket > window {
        return Err(BadRequest(
            "bucket must be whole minutes, at most the window".into(),
        ));
    }
    if window.as_millis().div_ceil(bucket.as_millis()) > u128::from(MAX_DEVICE_BUCKETS) {
        return Err(BadRequest(format!(
            "at most {MAX_DEVICE_BUCKETS} buckets per request"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn history_parameters() {
        assert_eq!(parse_since(None), Ok(None));
        assert_eq!(parse_since(Some("")), Ok(None));
        assert_eq!(
            parse_since(Some("1970-01-01T00:00:01.5Z")),
            Ok(Some(1_500_000))
        );
        assert!(parse_since(Some("yesterday")).is_err());
        assert_eq!(parse_limit(None), Ok(DEFAULT_SAMPLES));
        assert_eq!(parse_limit(Some("1")), Ok(1));
        assert_eq!(parse_limit(Some("10000")), Ok(MAX_SAMPLES));
        for bad in ["0", "10001", "-1", "abc", "1.5"] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn statistics_parameters() {
        assert_eq!(parse_stats(None, None), Ok((S(3600), S(60))));
        assert_eq!(parse_stats(Some("90"), Some("1m30s")), Ok((S(90), S(90))));
        assert_eq!(
            parse_stats(Some("2s"), Some("500ms")),
            Ok((S(2), Duration::from_millis(500)))
        );
        assert_eq!(
            parse_stats(Some("7d"), Some("1h")),
            Ok((S(604_800), S(3600)))
        );
        for (window, bucket) in [("1w2", "1m"), ("h", "1m"), ("1h", "soon"), ("0", "1m")] {
            assert!(
                parse_stats(Some(window), Some(bucket)).is_err(),
                "{window} {bucket}"
            );
        }
    }

    #[test]
    fn statistics_bounds() {
        assert!(check_stats(S(900), Duration::from_millis(180)).is_ok());
        assert!(
            check_stats(S(900), Duration::from_millis(179)).is_err(),
            "5,028 buckets"
        );
        assert!(check_stats(S(10_000), S(1)).is_err(), "10,000 buckets");
        assert!(check_stats(MAX_WINDOW, MAX_WINDOW).is_ok());
        assert!(check_stats(MAX_WINDOW + S(1), S(86_400)).is_err());
        assert!(
            check_stats(S(5_000 * 60), S(60)).is_err(),
            "5,001 minute rows"
        );
        assert!(check_stats(S(60), S(61)).is_err());
        assert!(check_stats(S(60), Duration::ZERO).is_err());
        assert!(check_stats(Duration::from_micros(999), Duration::from_micros(999)).is_err());
    }

    #[test]
    fn statistics_row_budget() {
        let (h, d) = (3600, 86_400);
        assert_eq!(stats_rollup_rows(S(31 * d), S(h)), Some(744 + 1 + 5 + 9));
        assert_eq!(stats_rollup_rows(S(31 * d), S(600)), Some(4_464 + 1 + 9));
        assert_eq!(stats_rollup_rows(S(7 * d), S(600)), Some(1_008 + 1 + 9));
        assert_eq!(stats_rollup_rows(S(d), S(60)), Some(1_441));
        assert_eq!(stats_rollup_rows(S(31 * d), S(4 * h)), Some(759));
        assert_eq!(stats_rollup_rows(S(31 * d), S(61 * 60)), Some(44_641));
        assert_eq!(stats_rollup_rows(S(600), S(601)), None);
        assert_eq!(stats_rollup_rows(S(600), Duration::from_millis(500)), None);
        // The widest window needs hourly buckets; 7 days 10-minute ones.
        assert!(check_stats(MAX_WINDOW, S(h)).is_ok());
        assert!(check_stats(S(7 * d), S(600)).is_ok());
        assert!(check_stats(S(d), S(60)).is_ok());
        assert!(check_stats(S(d + 3600), S(60)).is_err());
        let refused = check_stats(MAX_WINDOW, S(600)).unwrap_err().0;
        assert!(refused.contains("bucket=1h"), "{refused}");
        let refused = check_stats(S(2 * d), S(60)).unwrap_err().0;
        assert!(refused.contains("bucket=10m"), "{refused}");
        // Raw blocks only for short windows.
        assert!(check_stats(MAX_RAW_WINDOW, S(1)).is_ok());
        assert!(
            check_stats(S(600), S(601)).is_err(),
            "bucket over the window"
        );
        let refused = check_stats(MAX_WINDOW, S(601)).unwrap_err().0;
        assert!(refused.contains("bucket=1h"), "{refused}");
        let refused = check_stats(S(3600), S(30)).unwrap_err().0;
        assert!(refused.contains("bucket=1m"), "{refused}");
        // Every window from the shortest to the widest has an accepted
        // whole-minute bucket once it is over the raw bound.
        for w in (15..=31 * 24 * 60).step_by(7) {
            let w = S(w * 60);
            assert!(
                ROLLUP_TIERS.iter().any(|b| check_stats(w, *b).is_ok()),
                "{w:?}"
            );
        }
    }

    #[test]
    fn device_history_bounds() {
        for w in [3600, 86_400, 7 * 86_400, 31 * 86_400] {
            let b = default_device_bucket(S(w));
            assert!(check_device_history(S(w), b).is_ok(), "{w}");
            assert!(S(w).as_secs() / b.as_secs() <= 200, "{w}");
        }
        assert!(check_device_history(S(30), S(30)).is_err());
        assert!(check_device_history(S(32 * 86_400), S(86_400)).is_err());
        assert!(check_device_history(S(3600), S(90)).is_err());
        assert!(check_device_history(S(31 * 86_400), S(60)).is_err());
    }
}
