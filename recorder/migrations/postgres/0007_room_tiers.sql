-- Coarser tiers of the public room's rollups (docs/architecture.md,
-- "Rollups"): per ten minutes and per hour, the same columns as
-- `room_minutes`, added to in the same transaction from the same new
-- samples, so each row is the exact sum of its minutes (the sketches
-- merge by adding counts). Statistics in buckets of whole hours (or ten
-- minutes) read one row an hour (or ten minutes) and the finer rows of
-- the window's start only (services::limits::stats_rollup_rows).
CREATE TABLE room_ten_minutes (
    ten_minute_us BIGINT           PRIMARY KEY,
    samples       BIGINT           NOT NULL,
    min_ms        DOUBLE PRECISION NOT NULL,
    max_ms        DOUBLE PRECISION NOT NULL,
    sketch        BYTEA            NOT NULL
);

CREATE TABLE room_hours (
    hour_us BIGINT           PRIMARY KEY,
    samples BIGINT           NOT NULL,
    min_ms  DOUBLE PRECISION NOT NULL,
    max_ms  DOUBLE PRECISION NOT NULL,
    sketch  BYTEA            NOT NULL
);

-- The backfill of both tiers from the `room_minutes` rows already stored
-- (their sketches merge in Rust, recorder/src/store/tier.rs): a row here
-- means it is still to do. The recorder does it once at start, under the
-- packing fence, recomputing every coarse row from its minutes and
-- deleting this row in the same transaction, so several recorders
-- starting together do it once, and a recorder that stopped half-way
-- leaves it to the next.
CREATE TABLE room_tiers_backfill (pending BOOLEAN PRIMARY KEY);
INSERT INTO room_tiers_backfill VALUES (TRUE);
