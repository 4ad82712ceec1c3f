-- Packed samples (docs/architecture.md, "Sample storage"): a small integer
-- per client, recent samples one row each in `sample_staging`, older ones
-- packed per client and 10-minute block in `sample_blocks`. SQLite has one
-- writer at a time, so it needs no fence table.

-- Every client with samples, by an integer id. Samples older than
-- `packed_before_us` are in sample_blocks, the others in sample_staging.
-- `public` decides access only for a client without a `clients` row.
CREATE TABLE channels (
    id               INTEGER PRIMARY KEY,
    channel_name     TEXT    NOT NULL UNIQUE,
    public           BOOLEAN NOT NULL,
    packed_before_us INTEGER NOT NULL DEFAULT -9223372036854775808
);

-- Samples not packed yet. (channel_id, n) makes a redelivered batch
-- insert nothing.
CREATE TABLE sample_staging (
    channel_id INTEGER NOT NULL,
    n          INTEGER NOT NULL,
    seq        INTEGER,
    at_us      INTEGER NOT NULL,
    delay_ms   REAL    NOT NULL,
    PRIMARY KEY (channel_id, n)
) WITHOUT ROWID;
CREATE INDEX sample_staging_channel_at ON sample_staging (channel_id, at_us);

-- One client's samples of one 10-minute block, packed
-- (recorder/src/store/block.rs).
CREATE TABLE sample_blocks (
    channel_id     INTEGER NOT NULL,
    block_start_us INTEGER NOT NULL,
    samples        INTEGER NOT NULL,
    data           BLOB    NOT NULL,
    PRIMARY KEY (channel_id, block_start_us)
);
CREATE INDEX sample_blocks_start ON sample_blocks (block_start_us);

INSERT INTO channels (channel_name, public)
    SELECT channel_name, min(public) FROM samples GROUP BY channel_name ORDER BY channel_name;
INSERT INTO sample_staging (channel_id, n, seq, at_us, delay_ms)
    SELECT c.id, s.n, s.seq, s.at_us, s.delay_ms FROM samples s JOIN channels c USING (channel_name);
DROP TABLE samples;
