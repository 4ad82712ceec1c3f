-- A browser's own history across reloads (docs/architecture.md,
-- "Devices"): the same layout as the Postgres migration 0006. Every
-- connection (channel) of one browser links to its `devices` row;
-- `device_minutes` holds per device and minute the packed samples of its
-- connections, added to when samples are packed or merged late.
CREATE TABLE devices (
    id            INTEGER PRIMARY KEY,
    digest        TEXT    NOT NULL UNIQUE,
    created_at_us INTEGER NOT NULL
);

ALTER TABLE channels ADD COLUMN device_id INTEGER;
CREATE INDEX channels_device ON channels (device_id) WHERE device_id IS NOT NULL;

CREATE TABLE device_minutes (
    device_id     INTEGER NOT NULL,
    minute_us     INTEGER NOT NULL,
    samples       INTEGER NOT NULL,
    sum_ms        REAL    NOT NULL,
    min_ms        REAL    NOT NULL,
    max_ms        REAL    NOT NULL,
    jitter_sum_ms REAL    NOT NULL,
    jitter_pairs  INTEGER NOT NULL,
    sketch        BLOB    NOT NULL,
    PRIMARY KEY (device_id, minute_us)
) WITHOUT ROWID;
CREATE INDEX device_minutes_minute ON device_minutes (minute_us);

-- The same per device and hour, added to with the minutes.
CREATE TABLE device_hours (
    device_id     INTEGER NOT NULL,
    hour_us       INTEGER NOT NULL,
    samples       INTEGER NOT NULL,
    sum_ms        REAL    NOT NULL,
    min_ms        REAL    NOT NULL,
    max_ms        REAL    NOT NULL,
    jitter_sum_ms REAL    NOT NULL,
    jitter_pairs  INTEGER NOT NULL,
    sketch        BLOB    NOT NULL,
    PRIMARY KEY (device_id, hour_us)
) WITHOUT ROWID;
CREATE INDEX device_hours_hour ON device_hours (hour_us);
