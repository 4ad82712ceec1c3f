-- Partial minute rollups of the public room (docs/architecture.md,
-- "Rollups"): the transaction that stages samples (or merges late ones)
-- appends, per minute, the count, extremes and sketch of exactly the
-- public samples it stored for the first time, one row per minute it
-- touched. Rows of different transactions never collide (an identity key,
-- no upsert), so concurrent inserts do not contend. The recorder's
-- maintenance folds them into `room_minutes` and the coarser tiers and
-- deletes them, in one transaction under the packing fence, so a sample
-- counts once. Statistics read the tiers plus these rows, never the
-- staged samples. From this migration on packing no longer adds to the
-- room's tiers (the devices' rollups are still added to when packing).
CREATE TABLE room_minute_parts (
    id        BIGINT           GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    minute_us BIGINT           NOT NULL,
    samples   BIGINT           NOT NULL,
    min_ms    DOUBLE PRECISION NOT NULL,
    max_ms    DOUBLE PRECISION NOT NULL,
    sketch    BYTEA            NOT NULL
);
-- Statistics read the rows of a window.
CREATE INDEX room_minute_parts_minute ON room_minute_parts (minute_us);

-- The public samples staged before this migration: packing would have
-- added them to the room's tiers, and from now on it does not, so their
-- parts are computed once by the recorder (sketches are built in Rust,
-- recorder/src/store/tier.rs), which deletes these rows in the same
-- transaction. The fence keeps recorders of the previous version from
-- staging or packing while the rows are copied.
LOCK TABLE sample_pack_fence IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE room_parts_backfill AS
    SELECT s.at_us, s.delay_ms FROM sample_staging s JOIN channels c ON c.id = s.channel_id
    WHERE c.public;
