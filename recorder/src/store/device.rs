//! A browser's own history across reloads (docs/architecture.md,
//! "Devices"): per-device minute rollups and the history read over them.
//!
//! A device is a browser identity ([`services::ids::device_digest`]); every
//! connection (channel) that presented it links to its `devices` row. A
//! `device_minutes` row holds, for one device and one minute, the packed
//! samples of all its connections: count, sum (for the mean), min, max, a
//! [`super::sketch::Sketch`] of the delays, and the jitter as a sum of
//! absolute differences and a count of pairs.
//!
//! **Jitter pairs.** Jitter is the mean absolute difference of consecutive
//! samples of one connection (docs/protocol.md, "Statistics"). A pair is two
//! consecutive samples, in `(at_us, n)` order, of one connection *within one
//! 10-minute block* ([`super::block::BLOCK_US`]); it belongs to the minute
//! (and so the bucket) of its later sample. The pair across a block
//! boundary is not counted (one pair in 600 at one sample a second): that
//! keeps every block's pairs a function of that block alone, so a late
//! sample merged into a block changes exactly that block's pairs, and the
//! rollups are updated by the difference (the pairs of the block after
//! the merge minus those before). Samples of different connections of the
//! same browser never form a pair.
//!
//! **Hours.** `device_hours` holds the same per device and hour, added to
//! in the same transaction from the same changes, so a history read in
//! buckets of whole hours (the page's day, week and month) reads one row
//! an hour for the window's whole hours and minute rows only for the
//! partial hours at its start and end: at most 744 + 118 rows for 31 days
//! instead of 44,640.
//!
//! Connections without a device get no per-device rollup; their history
//! stays the raw samples read by channel.

use std::collections::{BTreeMap, HashMap};

use services::messages::HistoryBucket;

use super::block::{self, Sample};
pub(crate) use super::tier::Tier;
use super::{MINUTE_US, Rollup, StoreError, bucket_start};

/// A `device_minutes` row: `(device_id, minute_us, samples, sum_ms,
/// min_ms, max_ms, jitter_sum_ms, jitter_pairs, sketch)`.
pub(crate) type DeviceMinuteRow = (i32, i64, i64, f64, f64, f64, f64, i64, Vec<u8>);

/// A device's id by its digest (`$1`). Both backends take this SQL, and
/// [`DEVICE_STAGED`].
pub(crate) const DEVICE_ID: &str = "SELECT id FROM devices WHERE digest = $1";

/// A device's history read inside the read transaction `$tx` of either
/// backend (the SQL is the same; sqlx's executor types are not, hence a
/// macro rather than a generic function): the device's id, its rollup rows
/// of every tier range of the window, its staged samples, then the
/// buckets ([`history`]). Commits `$tx`; `Ok(None)` for an unknown digest.
macro_rules! read_device_history {
    ($tx:expr, $device:expr, $width:expr, $first:expr, $end:expr) => {{
        let mut tx = $tx;
        let (width, first, end): (i64, i64, i64) = ($width, $first, $end);
        let id: Option<i32> = sqlx::query_scalar($crate::store::device::DEVICE_ID)
            .bind($device)
            .fetch_optional(&mut *tx)
            .await?;
        match id {
            None => {
                tx.commit().await?;
                Ok(None)
            }
            Some(id) => {
                let mut rows: Vec<$crate::store::device::DeviceMinuteRow> = Vec::new();
                for (tier, from, to) in
                    $crate::store::tier::ranges(&$crate::store::device::TIERS, width, first, end)
                {
                    rows.extend(
                        sqlx::query_as::<_, $crate::store::device::DeviceMinuteRow>(
                            sqlx::AssertSqlSafe(tier.range_sql()),
                        )
                        .bind(id)
                        .bind(from)
                        .bind(to)
                        .fetch_all(&mut *tx)
                        .await?,
                    );
                }
                let staged: Vec<$crate::store::device::StagedDeviceRow> =
                    sqlx::query_as($crate::store::device::DEVICE_STAGED)
                        .bind(id)
                        .bind($crate::store::device::staged_from(first))
                        .bind(end)
                        .fetch_all(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok(Some($crate::store::device::history(
                    width, first, rows, staged,
                )?))
            }
        }
    }};
}
pub(crate) use read_device_history;

/// Width of an hour row.
pub(crate) const HOUR_US: i64 = 60 * MINUTE_US;

/// A device's tiers, coarsest first.
pub(crate) const TIERS: [Tier; 2] = [HOURS, MINUTES];

/// Per device and minute.
pub(crate) const MINUTES: Tier = Tier {
    table: "device_minutes",
    column: "minute_us",
    width: MINUTE_US,
    appended: false,
};

/// Per device and hour.
pub(crate) const HOURS: Tier = Tier {
    table: "device_hours",
    column: "hour_us",
    width: HOUR_US,
    appended: false,
};

impl Tier {
    /// Its columns in [`DeviceMinuteRow`] order.
    pub(crate) fn columns(&self) -> String {
        format!(
            "device_id, {}, samples, sum_ms, min_ms, max_ms, jitter_sum_ms, jitter_pairs, sketch",
            self.column
        )
    }

    /// A device's rows of a history read: `$1` the device, `$2` the first
    /// row, `$3` the end; a range of the primary key. Both backends take
    /// this SQL.
    pub(crate) fn range_sql(&self) -> String {
        format!(
            "SELECT {} FROM {} WHERE device_id = $1 AND {c} >= $2 AND {c} < $3 ORDER BY {c}",
            self.columns(),
            self.table,
            c = self.column
        )
    }

    /// Deletes a device's rows (`$1`).
    pub(crate) fn forget_sql(&self) -> String {
        format!("DELETE FROM {} WHERE device_id = $1", self.table)
    }

    /// `ON CONFLICT` of an upsert: the new totals replace the row.
    pub(crate) fn on_conflict(&self) -> String {
        format!(
            " ON CONFLICT (device_id, {}) DO UPDATE SET samples = excluded.samples, \
             sum_ms = excluded.sum_ms, min_ms = excluded.min_ms, max_ms = excluded.max_ms, \
             jitter_sum_ms = excluded.jitter_sum_ms, jitter_pairs = excluded.jitter_pairs, \
             sketch = excluded.sketch",
            self.column
        )
    }
}

/// The per-device hour changes of the minute changes `minutes`.
pub(crate) fn hour_deltas(
    minutes: &BTreeMap<(i32, i64), DeviceMinute>,
) -> BTreeMap<(i32, i64), DeviceMinute> {
    let mut hours: BTreeMap<(i32, i64), DeviceMinute> = BTreeMap::new();
    for ((device, minute), m) in minutes {
        hours
            .entry((*device, bucket_start(*minute, HOUR_US)))
            .or_default()
            .merge(m);
    }
    hours
}

/// A device's staged samples of a history read: `$1` the device, `$2`
/// [`staged_from`] the first minute, `$3` the end; the device's channels by
/// their index, then a range of each one's staged samples.
pub(crate) const DEVICE_STAGED: &str = "\
    SELECT s.channel_id, s.n, s.at_us, s.delay_ms \
    FROM channels c JOIN sample_staging s ON s.channel_id = c.id \
    WHERE c.device_id = $1 AND s.at_us >= $2 AND s.at_us < $3 \
    ORDER BY s.channel_id, s.at_us, s.n";

/// The change a commit makes to one block's jitter pairs:
/// `(channel_id, minute_us, sum delta, pairs delta)`.
pub(crate) type PairDelta = (i32, i64, f64, i64);

/// A staged sample of a device, as the history read takes it:
/// `(channel_id, n, at_us, delay_ms)`, ordered by channel, time, counter.
pub(crate) type StagedDeviceRow = (i32, i64, i64, f64);

/// One device's samples of a minute, or of a history bucket.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeviceMinute {
    rollup: Rollup,
    sum: f64,
    jitter_sum: f64,
    jitter_pairs: i64,
}

impl DeviceMinute {
    fn add(&mut self, v: f64) {
        self.rollup.add(v);
        self.sum += v;
    }

    fn merge(&mut self, other: &DeviceMinute) {
        self.rollup.merge(&other.rollup);
        self.sum += other.sum;
        self.jitter_sum += other.jitter_sum;
        self.jitter_pairs += other.jitter_pairs;
    }

    fn from_row(row: DeviceMinuteRow) -> Result<((i32, i64), Self), StoreError> {
        let (device, minute, count, sum, min, max, jitter_sum, jitter_pairs, sketch) = row;
        Ok((
            (device, minute),
            Self {
                rollup: Rollup::from_row((minute, count, min, max, sketch))?,
                sum,
                jitter_sum,
                jitter_pairs,
            },
        ))
    }

    fn to_row(&self, device: i32, minute: i64) -> DeviceMinuteRow {
        (
            device,
            minute,
            i64::try_from(self.rollup.count).unwrap_or(i64::MAX),
            self.sum,
            self.rollup.min,
            self.rollup.max,
            self.jitter_sum,
            self.jitter_pairs,
            self.rollup.sketch.encode(),
        )
    }
}

/// Adds `sign` times the jitter pairs of `samples` (one connection's
/// samples of one block, sorted by `(at_us, n)`) to `out`, per minute of
/// each pair's later sample.
fn add_pairs(samples: &[Sample], sign: i64, out: &mut BTreeMap<i64, (f64, i64)>) {
    for w in samples.windows(2) {
        let e = out
            .entry(bucket_start(w[1].at_us, MINUTE_US))
            .or_insert((0.0, 0));
        e.0 += sign as f64 * (w[1].delay_ms - w[0].delay_ms).abs();
        e.1 += sign;
    }
}

/// How the jitter pairs of one connection's block change when it goes from
/// `old` to `all` (both sorted by `(at_us, n)`): per minute, the sum and
/// pair-count differences; minutes without change are left out.
pub(crate) fn pair_deltas(old: &[Sample], all: &[Sample]) -> BTreeMap<i64, (f64, i64)> {
    let mut out = BTreeMap::new();
    add_pairs(old, -1, &mut out);
    add_pairs(all, 1, &mut out);
    out.retain(|_, (sum, pairs)| *pairs != 0 || *sum != 0.0);
    out
}

/// The per-device minute changes of a commit: the new samples `added` and
/// the jitter pair changes `pairs` of the connections in `devices`
/// (channel id → device id); other connections are left out.
pub(crate) fn device_deltas(
    added: &[(i32, Sample)],
    pairs: &[PairDelta],
    devices: &HashMap<i32, i32>,
) -> BTreeMap<(i32, i64), DeviceMinute> {
    let mut out: BTreeMap<(i32, i64), DeviceMinute> = BTreeMap::new();
    for (c, s) in added {
        if let Some(d) = devices.get(c) {
            out.entry((*d, bucket_start(s.at_us, MINUTE_US)))
                .or_default()
                .add(s.delay_ms);
        }
    }
    for (c, minute, sum, n) in pairs {
        if let Some(d) = devices.get(c) {
            let m = out.entry((*d, *minute)).or_default();
            m.jitter_sum += sum;
            m.jitter_pairs += n;
        }
    }
    out
}

/// The rows of a tier to write: `stored` rows (of the same keys)
/// with `new` added. A key with no stored row and no new sample (a pair
/// change in a minute whose row retention already deleted) is skipped.
///
/// # Errors
/// A stored sketch does not decode.
pub(crate) fn merge_device_minutes(
    stored: Vec<DeviceMinuteRow>,
    new: BTreeMap<(i32, i64), DeviceMinute>,
) -> Result<Vec<DeviceMinuteRow>, StoreError> {
    let mut stored: BTreeMap<(i32, i64), DeviceMinute> = stored
        .into_iter()
        .map(DeviceMinute::from_row)
        .collect::<Result<_, _>>()?;
    Ok(new
        .into_iter()
        .filter_map(|((device, minute), delta)| {
            let total = stored.entry((device, minute)).or_default();
            total.merge(&delta);
            (total.rollup.count > 0).then(|| total.to_row(device, minute))
        })
        .collect())
}

/// The range a history read covers: `(width, first minute, end)` for
/// buckets of `bucket` over `window` before `now_us`: whole minutes from
/// the one holding `now_us - window` to the one holding `now_us`
/// (exclusive end after it). Staged samples are read from
/// [`staged_from`]`(first)` on.
///
/// # Errors
/// A bucket that is not a positive whole number of minutes.
pub(crate) fn window(
    now_us: i64,
    window: std::time::Duration,
    bucket: std::time::Duration,
) -> Result<(i64, i64, i64), StoreError> {
    let width = super::bucket_width(bucket)?;
    if width % MINUTE_US != 0 {
        return Err(StoreError::InvalidQuery(
            "bucket must be whole minutes".into(),
        ));
    }
    let first = bucket_start(super::window_start(now_us, window), MINUTE_US);
    let end = bucket_start(now_us, MINUTE_US).saturating_add(MINUTE_US);
    Ok((width, first, end))
}

/// Where the staged samples of a history read from `first` start: the
/// start of the block holding `first`, so that a pair whose later sample is
/// in the window has its earlier one.
pub(crate) fn staged_from(first: i64) -> i64 {
    block::block_of(first)
}

/// A device's history from `first` on in buckets of `width` µs (a
/// multiple of [`MINUTE_US`], buckets at multiples of the width): its
/// minute and hour `rows` (packed samples, from `first` on, [`ranges`]) and its `staged` samples
/// (not packed yet, ordered by channel, time and counter, from the start of
/// the block holding `first` on: those before `first` only complete the
/// pairs of later ones). Count, min, max and mean are exact; the
/// percentiles are exact for a bucket of staged samples only, else the
/// sketch's (within its bound); jitter from the pair sums, the staged
/// samples' pairs formed by the same rule (within one block of one
/// connection). Only buckets with samples, oldest first.
///
/// # Errors
/// A stored sketch does not decode.
pub(crate) fn history(
    width: i64,
    first: i64,
    rows: Vec<DeviceMinuteRow>,
    staged: Vec<StagedDeviceRow>,
) -> Result<Vec<HistoryBucket>, StoreError> {
    let mut buckets: BTreeMap<i64, (DeviceMinute, Vec<f64>)> = BTreeMap::new();
    for row in rows {
        let ((_, minute), m) = DeviceMinute::from_row(row)?;
        buckets
            .entry(bucket_start(minute, width))
            .or_default()
            .0
            .merge(&m);
    }
    let mut raw: BTreeMap<i64, DeviceMinute> = BTreeMap::new();
    let mut prev: Option<StagedDeviceRow> = None;
    for row in staged {
        let (c, _, at, v) = row;
        if at < first {
            prev = Some(row);
            continue;
        }
        let b = bucket_start(at, width);
        let m = raw.entry(b).or_default();
        m.add(v);
        if let Some((pc, _, pat, pv)) = prev
            && pc == c
            && block::block_of(pat) == block::block_of(at)
        {
            m.jitter_sum += (v - pv).abs();
            m.jitter_pairs += 1;
        }
        buckets.entry(b).or_default().1.push(v);
        prev = Some(row);
    }
    Ok(buckets
        .into_iter()
        .map(|(start, (mut packed, mut values))| {
            let staged = raw.remove(&start).unwrap_or_default();
            values.sort_by(f64::total_cmp);
            let exact = packed.rollup.count == 0;
            packed.merge(&staged);
            let total = packed;
            let (p50, p95, p99) = if exact {
                let p = |q| services::stats::percentile_sorted(&values, q).unwrap_or(0.0);
                (p(50.0), p(95.0), p(99.0))
            } else {
                let q = |q| total.rollup.sketch.quantile(q).unwrap_or(0.0);
                (q(0.5), q(0.95), q(0.99))
            };
            let count = total.rollup.count;
            HistoryBucket {
                start_us: start,
                count,
                min: total.rollup.min,
                mean: if count == 0 {
                    0.0
                } else {
                    total.sum / count as f64
                },
                p50,
                p95,
                p99,
                max: total.rollup.max,
                jitter: (total.jitter_pairs > 0)
                    .then(|| total.jitter_sum.max(0.0) / total.jitter_pairs as f64),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_us: i64, n: i64, delay_ms: f64) -> Sample {
        Sample {
            at_us,
            n,
            seq: None,
            delay_ms,
        }
    }

    #[test]
    fn a_late_sample_replaces_the_pair_it_splits() {
        let old = [s(0, 0, 10.0), s(70_000_000, 2, 20.0)];
        let all = [
            s(0, 0, 10.0),
            s(30_000_000, 1, 13.0),
            s(70_000_000, 2, 20.0),
        ];
        let d = pair_deltas(&old, &all);
        // Minute 0 gains |13 - 10|; minute 1 trades |20 - 10| for |20 - 13|.
        assert_eq!(d.get(&0), Some(&(3.0, 1)));
        assert_eq!(d.get(&MINUTE_US), Some(&(-3.0, 0)));
        assert!(pair_deltas(&all, &all).is_empty(), "nothing new, no change");
    }

    #[test]
    fn whole_hour_buckets_read_hours_between_minute_edges() {
        use super::super::tier::ranges;
        let h = HOUR_US;
        let (first, end) = (10 * h + 7 * MINUTE_US, 13 * h + 21 * MINUTE_US);
        let got: Vec<(&str, i64, i64)> = ranges(&TIERS, 2 * h, first, end)
            .into_iter()
            .map(|(t, a, b)| (t.table, a, b))
            .collect();
        assert_eq!(
            got,
            [
                ("device_minutes", first, 11 * h),
                ("device_hours", 11 * h, 13 * h),
                ("device_minutes", 13 * h, end),
            ]
        );
        assert_eq!(
            ranges(&TIERS, 10 * MINUTE_US, first, end).len(),
            1,
            "minutes only"
        );
        assert_eq!(
            ranges(&TIERS, h, first, first + h).len(),
            1,
            "no whole hour"
        );
    }

    #[test]
    fn staged_pairs_stay_within_a_block_and_a_connection() {
        let b = block::BLOCK_US;
        let staged = vec![
            (1, 0, b - 1, 10.0),
            (1, 1, b, 30.0), // next block: no pair with the previous one
            (1, 2, b + 1, 31.0),
            (2, 0, b + 2, 100.0), // another connection: no pair
        ];
        let h = history(b, 0, Vec::new(), staged).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].count, h[0].jitter), (1, None));
        assert_eq!((h[1].count, h[1].jitter), (3, Some(1.0)));
        assert_eq!((h[1].min, h[1].max, h[1].mean), (30.0, 100.0, 161.0 / 3.0));
    }
}
