-- The public room's samples per minute (docs/architecture.md, "Rollups"):
-- count, extremes and a mergeable quantile sketch of the delays
-- (recorder/src/store/sketch.rs), for the packed samples; added to when
-- samples are packed, so each sample counts once.
CREATE TABLE room_minutes (
    minute_us BIGINT           PRIMARY KEY,
    samples   BIGINT           NOT NULL,
    min_ms    REAL             NOT NULL,
    max_ms    REAL             NOT NULL,
    sketch    BLOB             NOT NULL
);
