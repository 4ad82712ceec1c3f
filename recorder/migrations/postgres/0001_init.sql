-- PingApp recorder schema (Postgres). Times are Unix microseconds.

-- One row per client that ever sent a sample: whether its history is public
-- and, for private clients, the SHA-256 hex of the token that unlocks it.
CREATE TABLE clients (
    channel_name    text    PRIMARY KEY,
    public          boolean NOT NULL,
    token_digest    text,
    gateway         text    NOT NULL,
    connected_at_us bigint  NOT NULL
);

-- Every accepted delay sample. (channel_name, n) is the gateway's own
-- counter, so a redelivered batch inserts nothing new.
CREATE TABLE samples (
    channel_name text             NOT NULL,
    n            bigint           NOT NULL,
    seq          bigint,
    at_us        bigint           NOT NULL,
    delay_ms     double precision NOT NULL,
    public       boolean          NOT NULL,
    PRIMARY KEY (channel_name, n)
);

-- Statistics over public samples in a time window, and pruning by age.
CREATE INDEX samples_public_at ON samples (public, at_us);
-- One client's history, oldest first.
CREATE INDEX samples_channel_at ON samples (channel_name, at_us);
-- Pruning clients that connected before the retention horizon.
CREATE INDEX clients_connected_at ON clients (connected_at_us);
