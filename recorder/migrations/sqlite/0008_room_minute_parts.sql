-- Partial minute rollups of the public room: the same layout as the
-- Postgres migration 0008 (one row per insert and minute of its new
-- public samples, folded into the tiers by maintenance), and the public
-- samples staged before it, whose parts the store computes once at start.
CREATE TABLE room_minute_parts (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    minute_us INTEGER NOT NULL,
    samples   INTEGER NOT NULL,
    min_ms    REAL    NOT NULL,
    max_ms    REAL    NOT NULL,
    sketch    BLOB    NOT NULL
);
CREATE INDEX room_minute_parts_minute ON room_minute_parts (minute_us);

CREATE TABLE room_parts_backfill AS
    SELECT s.at_us, s.delay_ms FROM sample_staging s JOIN channels c ON c.id = s.channel_id
    WHERE c.public;
