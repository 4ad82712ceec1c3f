-- Coarser tiers of the public room's rollups: the same layout as the
-- Postgres migration 0007 (per ten minutes and per hour, added to with
-- the minutes), and the marker of the one backfill from `room_minutes`
-- the store does at start (recorder/src/store/tier.rs).
CREATE TABLE room_ten_minutes (
    ten_minute_us INTEGER PRIMARY KEY,
    samples       INTEGER NOT NULL,
    min_ms        REAL    NOT NULL,
    max_ms        REAL    NOT NULL,
    sketch        BLOB    NOT NULL
);

CREATE TABLE room_hours (
    hour_us INTEGER PRIMARY KEY,
    samples INTEGER NOT NULL,
    min_ms  REAL    NOT NULL,
    max_ms  REAL    NOT NULL,
    sketch  BLOB    NOT NULL
);

CREATE TABLE room_tiers_backfill (pending INTEGER PRIMARY KEY);
INSERT INTO room_tiers_backfill VALUES (1);
