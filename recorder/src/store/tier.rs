//! Rollup tiers (docs/architecture.md, "Rollups"): tables of the same
//! rollups at different widths, and which rows of which tier a read over a
//! time range takes.
//!
//! The public room has three tiers, [`ROOM`]: `room_minutes`,
//! `room_ten_minutes` and `room_hours` (widths from
//! [`services::limits::ROLLUP_TIERS`], the API's row budget), fed by the
//! partial minute rows inserts append ([`PARTS`]): every tier is added to
//! in the transaction that folds them ([`fold_page`]), from the same
//! parts. A device has two, [`super::device::TIERS`]: `device_minutes`
//! and `device_hours`, both added to in the transaction that packs
//! samples or merges late ones, from the same new samples. So a coarse
//! row is always the exact sum of its finer rows (sketches merge by
//! adding counts, [`super::sketch`]). A read in buckets of width `w` takes the coarsest
//! tier whose width divides `w` for the whole rows of that tier in its
//! range, and finer tiers for the partial rows at the range's ends
//! ([`ranges`]), so its row count is bounded by the window's length over
//! the tier's width, whatever the table holds.

use std::collections::BTreeMap;

use super::{MINUTE_US, Rollup, RollupRow, StoreError, bucket_start};

/// A table of rollups: its name, its time column (a row's start, Unix
/// µs) and a row's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tier {
    /// The table.
    pub table: &'static str,
    /// Its time column.
    pub column: &'static str,
    /// A row's width, µs.
    pub width: i64,
    /// Whether rows are appended (several per start, no key to upsert on)
    /// rather than upserted by their start.
    pub appended: bool,
}

/// A width of [`services::limits::ROLLUP_TIERS`] in µs.
const fn tier_width(i: usize) -> i64 {
    services::limits::ROLLUP_TIERS[i].as_micros() as i64
}

/// The public room's tiers, coarsest first.
pub(crate) const ROOM: [Tier; 3] = [
    Tier {
        table: "room_hours",
        column: "hour_us",
        width: tier_width(0),
        appended: false,
    },
    Tier {
        table: "room_ten_minutes",
        column: "ten_minute_us",
        width: tier_width(1),
        appended: false,
    },
    Tier {
        table: "room_minutes",
        column: "minute_us",
        width: tier_width(2),
        appended: false,
    },
];

const _: () = assert!(ROOM[2].width == MINUTE_US);

/// The public room's partial minute rollups (migration 0008): one row per
/// insert transaction and minute of the public samples it stored for the
/// first time, appended (never upserted: concurrent inserts do not
/// contend), folded into [`ROOM`] by [`fold_parts`].
pub(crate) const PARTS: Tier = Tier {
    table: "room_minute_parts",
    column: "minute_us",
    width: MINUTE_US,
    appended: true,
};

/// Parts folded per transaction, at most.
pub(crate) const FOLD_PAGE: i64 = 10_000;

/// The oldest parts (by id), at most `$1`, deleted and returned as rollup
/// rows: a page of [`fold_parts`]. Both backends take this SQL.
pub(crate) const TAKE_PARTS: &str = "\
    DELETE FROM room_minute_parts WHERE id IN \
        (SELECT id FROM room_minute_parts ORDER BY id LIMIT $1) \
    RETURNING minute_us, samples, min_ms, max_ms, sketch";

/// The parts of a statistics window from the minute `$1` on, oldest
/// first: a range of their minute index.
pub(crate) const PARTS_FROM: &str = "\
    SELECT minute_us, samples, min_ms, max_ms, sketch FROM room_minute_parts \
    WHERE minute_us >= $1 ORDER BY minute_us";

/// Whether public samples staged before migration 0008 still wait for
/// their parts (read before taking the fence).
pub(crate) const PARTS_BACKFILL_PENDING: &str = "SELECT EXISTS (SELECT 1 FROM room_parts_backfill)";

/// Those samples, deleted and returned `(at_us, delay_ms)`: whoever deletes
/// them writes their parts in the same transaction.
pub(crate) const TAKE_PARTS_BACKFILL: &str =
    "DELETE FROM room_parts_backfill RETURNING at_us, delay_ms";

impl Tier {
    /// Deletes the rows that ended by `$1` (a range of the time index).
    pub(crate) fn prune_sql(&self) -> String {
        format!(
            "DELETE FROM {} WHERE {} < $1 - {}",
            self.table,
            self.column,
            self.width - 1
        )
    }

    /// A room tier's columns in [`RollupRow`] order.
    pub(crate) fn room_columns(&self) -> String {
        format!("{}, samples, min_ms, max_ms, sketch", self.column)
    }

    /// A room tier's rows from `$1` to `$2` (exclusive), oldest first: a
    /// range of the primary key. Both backends take this SQL.
    pub(crate) fn room_range_sql(&self) -> String {
        format!(
            "SELECT {} FROM {} WHERE {c} >= $1 AND {c} < $2 ORDER BY {c}",
            self.room_columns(),
            self.table,
            c = self.column
        )
    }

    /// `ON CONFLICT` of a room tier's upsert: the new totals replace the
    /// row. None for an appended tier ([`PARTS`]).
    pub(crate) fn room_on_conflict(&self) -> String {
        if self.appended {
            return String::new();
        }
        format!(
            " ON CONFLICT ({}) DO UPDATE SET samples = excluded.samples, \
             min_ms = excluded.min_ms, max_ms = excluded.max_ms, sketch = excluded.sketch",
            self.column
        )
    }
}

/// What a read of `tiers` (coarsest first, the last one the finest) from
/// `first` to `end` (exclusive; `i64::MAX`: no end) in buckets of `width`
/// takes: `(tier, from, to)` ranges in time order. The coarsest tier whose
/// width divides `width` gives its whole rows within the range; the
/// partial ones at either end come from the next finer tier, and so on
/// down to the finest, which takes whatever is left.
pub(crate) fn ranges(tiers: &[Tier], width: i64, first: i64, end: i64) -> Vec<(Tier, i64, i64)> {
    let start = tiers
        .iter()
        .position(|t| width % t.width == 0)
        .unwrap_or(tiers.len().saturating_sub(1));
    let mut out = Vec::new();
    split(&tiers[start..], first, end, &mut out);
    out
}

fn split(tiers: &[Tier], from: i64, to: i64, out: &mut Vec<(Tier, i64, i64)>) {
    let Some((tier, finer)) = tiers.split_first() else {
        return;
    };
    if from >= to {
        return;
    }
    if finer.is_empty() {
        out.push((*tier, from, to));
        return;
    }
    let whole_from = bucket_start(from.saturating_add(tier.width - 1), tier.width);
    let whole_to = if to == i64::MAX {
        to
    } else {
        bucket_start(to, tier.width)
    };
    if whole_from >= whole_to {
        split(finer, from, to, out);
        return;
    }
    split(finer, from, whole_from, out);
    out.push((*tier, whole_from, whole_to));
    split(finer, whole_to, to, out);
}

/// The rows of a tier of width `width` that `minutes` (minute rollups)
/// add to.
pub(crate) fn coarsen(minutes: &BTreeMap<i64, Rollup>, width: i64) -> BTreeMap<i64, Rollup> {
    let mut out: BTreeMap<i64, Rollup> = BTreeMap::new();
    for (minute, r) in minutes {
        out.entry(bucket_start(*minute, width))
            .or_default()
            .merge(r);
    }
    out
}

/// The room's rollup rows of a statistics read from `$first` (a whole
/// minute) on, in buckets of `$width`, inside the read transaction `$tx`
/// of either backend (the SQL is the same; the executor types are not,
/// hence a macro): the ranges of [`ranges`] over [`ROOM`], oldest first,
/// then the [`PARTS`] of the window not folded yet.
macro_rules! read_room_rollups {
    ($tx:expr, $width:expr, $first:expr) => {{
        let mut rows: Vec<$crate::store::RollupRow> = Vec::new();
        for (tier, from, to) in
            $crate::store::tier::ranges(&$crate::store::tier::ROOM, $width, $first, i64::MAX)
        {
            rows.extend(
                sqlx::query_as::<_, $crate::store::RollupRow>(sqlx::AssertSqlSafe(
                    tier.room_range_sql(),
                ))
                .bind(from)
                .bind(to)
                .fetch_all(&mut *$tx)
                .await?,
            );
        }
        rows.extend(
            sqlx::query_as::<_, $crate::store::RollupRow>($crate::store::tier::PARTS_FROM)
                .bind($first)
                .fetch_all(&mut *$tx)
                .await?,
        );
        rows
    }};
}
pub(crate) use read_room_rollups;

/// One page of [`fold_parts`] inside the write transaction `$tx` of either
/// backend, which holds the packing fence: takes the oldest
/// [`FOLD_PAGE`] parts and adds them to every tier of [`ROOM`] through the
/// backend's `$update(conn, tier, rollups)` (adds to the stored rows of
/// the same keys). Evaluates to the number of parts folded.
macro_rules! fold_page {
    ($tx:expr, $update:path) => {{
        let rows: Vec<$crate::store::RollupRow> = sqlx::query_as($crate::store::tier::TAKE_PARTS)
            .bind($crate::store::tier::FOLD_PAGE)
            .fetch_all(&mut *$tx)
            .await?;
        let folded = rows.len() as u64;
        let minutes = $crate::store::tier::merge_parts(rows)?;
        for t in $crate::store::tier::ROOM {
            $update(&mut $tx, t, $crate::store::tier::coarsen(&minutes, t.width)).await?;
        }
        folded
    }};
}
pub(crate) use fold_page;

/// The parts' rows summed per minute.
///
/// # Errors
/// A stored sketch does not decode.
pub(crate) fn merge_parts(rows: Vec<RollupRow>) -> Result<BTreeMap<i64, Rollup>, StoreError> {
    let mut minutes: BTreeMap<i64, Rollup> = BTreeMap::new();
    for row in rows {
        let minute = row.0;
        minutes
            .entry(minute)
            .or_default()
            .merge(&Rollup::from_row(row)?);
    }
    Ok(minutes)
}

/// The parts of the public samples staged before migration 0008, inside
/// the write transaction `$tx` of either backend (holding the fence):
/// takes every row of `room_parts_backfill`, streamed (memory stays at one
/// rollup a minute), and appends their minute rollups as parts through
/// `$append(conn, PARTS, rows)`. A no-op once done.
macro_rules! backfill_parts {
    ($tx:expr, $append:path) => {{
        use futures_util::TryStreamExt as _;
        let mut minutes: std::collections::BTreeMap<i64, $crate::store::Rollup> =
            std::collections::BTreeMap::new();
        {
            let mut rows =
                sqlx::query_as::<_, (i64, f64)>($crate::store::tier::TAKE_PARTS_BACKFILL)
                    .fetch(&mut *$tx);
            while let Some((at_us, delay_ms)) = rows.try_next().await? {
                minutes
                    .entry($crate::store::bucket_start(at_us, $crate::store::MINUTE_US))
                    .or_default()
                    .add(delay_ms);
            }
        }
        let rows: Vec<$crate::store::RollupRow> =
            minutes.iter().map(|(m, r)| r.to_row(*m)).collect();
        $append(&mut $tx, $crate::store::tier::PARTS, rows).await?;
    }};
}
pub(crate) use backfill_parts;

/// The backfill marker of migration 0007: a row while the coarse room
/// tiers are still to be computed from the stored minutes. Deleting it
/// claims the backfill (the caller holds the packing fence).
pub(crate) const CLAIM_BACKFILL: &str = "DELETE FROM room_tiers_backfill";

/// Whether the backfill is still to do (read before taking the fence).
pub(crate) const BACKFILL_PENDING: &str = "SELECT count(*) FROM room_tiers_backfill";

/// Minute rows read per page of the backfill.
pub(crate) const BACKFILL_PAGE: i64 = 10_000;

/// A page of the backfill: the minute rows after `$1`, oldest first, at
/// most `$2`. Both backends take this SQL.
pub(crate) const BACKFILL_MINUTES: &str = "\
    SELECT minute_us, samples, min_ms, max_ms, sketch FROM room_minutes \
    WHERE minute_us > $1 ORDER BY minute_us LIMIT $2";

/// The backfill's pages inside the write transaction `$tx` (holding the
/// fence, the marker claimed) of either backend: every minute row through
/// [`Backfill`], the complete coarse rows written by the backend's
/// `$upsert(conn, tier, rows)` as they come (a macro for the same reason
/// as [`read_room_rollups`]).
macro_rules! backfill_pages {
    ($tx:expr, $upsert:path) => {{
        let mut backfill = $crate::store::tier::Backfill::default();
        let mut after = i64::MIN;
        loop {
            let rows: Vec<$crate::store::RollupRow> =
                sqlx::query_as($crate::store::tier::BACKFILL_MINUTES)
                    .bind(after)
                    .bind($crate::store::tier::BACKFILL_PAGE)
                    .fetch_all(&mut *$tx)
                    .await?;
            let Some(last) = rows.last().map(|r| r.0) else {
                break;
            };
            for row in rows {
                backfill.add(row)?;
            }
            for (t, rows) in backfill.take_complete(last) {
                $upsert(&mut $tx, t, rows).await?;
            }
            after = last;
        }
        for (t, rows) in backfill.take_complete(i64::MAX) {
            $upsert(&mut $tx, t, rows).await?;
        }
    }};
}
pub(crate) use backfill_pages;

/// The coarse room tiers recomputed from the minute rows, read a page at a
/// time oldest first: a coarse row is handed out once no later minute can
/// add to it, so memory stays at a page and an hour.
#[derive(Default)]
pub(crate) struct Backfill {
    open: BTreeMap<(usize, i64), Rollup>,
}

impl Backfill {
    /// Adds a minute row (rows come oldest first).
    ///
    /// # Errors
    /// Its sketch does not decode.
    pub(crate) fn add(&mut self, row: RollupRow) -> Result<(), StoreError> {
        let minute = row.0;
        let r = Rollup::from_row(row)?;
        for (i, tier) in ROOM[..ROOM.len() - 1].iter().enumerate() {
            self.open
                .entry((i, bucket_start(minute, tier.width)))
                .or_default()
                .merge(&r);
        }
        Ok(())
    }

    /// The complete rows, by tier, once every minute before `before` was
    /// added (all of them when `before` is `i64::MAX`).
    pub(crate) fn take_complete(&mut self, before: i64) -> Vec<(Tier, Vec<RollupRow>)> {
        let mut out: Vec<(Tier, Vec<RollupRow>)> = ROOM[..ROOM.len() - 1]
            .iter()
            .map(|t| (*t, Vec::new()))
            .collect();
        self.open.retain(|(i, start), r| {
            if before != i64::MAX && start.saturating_add(ROOM[*i].width) > before {
                return true;
            }
            out[*i].1.push(r.to_row(*start));
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 60 * MINUTE_US;
    const T: i64 = 10 * MINUTE_US;

    fn tables(r: Vec<(Tier, i64, i64)>) -> Vec<(&'static str, i64, i64)> {
        r.into_iter().map(|(t, a, b)| (t.table, a, b)).collect()
    }

    #[test]
    fn hour_buckets_read_hours_between_finer_edges() {
        let first = 10 * H + 17 * MINUTE_US;
        assert_eq!(
            tables(ranges(&ROOM, 2 * H, first, i64::MAX)),
            [
                ("room_minutes", first, 10 * H + 2 * T),
                ("room_ten_minutes", 10 * H + 2 * T, 11 * H),
                ("room_hours", 11 * H, i64::MAX),
            ]
        );
        let end = 13 * H + 21 * MINUTE_US;
        assert_eq!(
            tables(ranges(&ROOM, H, first, end)),
            [
                ("room_minutes", first, 10 * H + 2 * T),
                ("room_ten_minutes", 10 * H + 2 * T, 11 * H),
                ("room_hours", 11 * H, 13 * H),
                ("room_ten_minutes", 13 * H, 13 * H + 2 * T),
                ("room_minutes", 13 * H + 2 * T, end),
            ]
        );
        assert_eq!(
            tables(ranges(&ROOM, 2 * T, first, i64::MAX)),
            [
                ("room_minutes", first, 10 * H + 2 * T),
                ("room_ten_minutes", 10 * H + 2 * T, i64::MAX),
            ]
        );
        assert_eq!(
            tables(ranges(&ROOM, 3 * MINUTE_US, first, i64::MAX)),
            [("room_minutes", first, i64::MAX)]
        );
        assert_eq!(
            tables(ranges(&ROOM, H, 10 * H, i64::MAX)),
            [("room_hours", 10 * H, i64::MAX)],
            "an aligned start reads no finer row"
        );
        assert!(ranges(&ROOM, H, 5, 5).is_empty());
    }

    #[test]
    fn backfill_hands_out_rows_once_complete() {
        let mut b = Backfill::default();
        let row = |minute: i64, v: f64| {
            let mut r = Rollup::default();
            r.add(v);
            r.to_row(minute)
        };
        b.add(row(0, 1.0)).unwrap();
        b.add(row(11 * MINUTE_US, 3.0)).unwrap();
        b.add(row(H, 2.0)).unwrap();
        let done = b.take_complete(H + MINUTE_US);
        assert_eq!(done[0].0, ROOM[0]);
        assert_eq!(done[0].1.len(), 1, "hour 0 is complete, hour 1 not");
        assert_eq!(done[0].1[0].1, 2, "two samples in hour 0");
        assert_eq!(done[1].1.len(), 2, "two ten-minute rows complete");
        let rest = b.take_complete(i64::MAX);
        assert_eq!((rest[0].1.len(), rest[1].1.len()), (1, 1));
        assert!(b.take_complete(i64::MAX).iter().all(|(_, r)| r.is_empty()));
    }
}
