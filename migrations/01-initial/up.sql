-- hearth outbox, schema version 1.
-- Times are integer milliseconds since the Unix epoch, UTC.

-- Every reading a device sent and the gateway ACKed. A row is unique on
-- (device, seq): a resent frame is ACKed again but stored once.
-- state moves queued -> inflight -> delivered; delivered only on PUBCOMP.
CREATE TABLE readings (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    device       TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    value        REAL    NOT NULL,
    unit         TEXT    NOT NULL,
    priority     TEXT    NOT NULL CHECK (priority IN ('alert', 'routine')),
    detail       TEXT,
    device_time  INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    state        TEXT    NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'inflight', 'delivered')),
    -- The open exchange carrying this reading (NULL unless inflight).
    exchange_id  INTEGER REFERENCES exchanges (id),
    -- The packet id it was last published with, kept for the CLI.
    pkid         INTEGER,
    -- How many times it was put in flight (more than 1 after a lost session).
    attempts     INTEGER NOT NULL DEFAULT 0,
    inflight_at  INTEGER,
    delivered_at INTEGER,
    UNIQUE (device, seq)
);
-- The publisher takes the next batch from here: alerts first, then by arrival.
CREATE INDEX readings_queue ON readings (state, priority, id);
CREATE INDEX readings_received ON readings (received_at);
-- Resuming an exchange reads its readings.
CREATE INDEX readings_exchange ON readings (exchange_id) WHERE exchange_id IS NOT NULL;

-- One open MQTT QoS 2 exchange: committed before its PUBLISH is written,
-- moved to stage 'release' before its PUBREL is written, deleted with the
-- commit that marks its readings delivered. Its packet id is never reused
-- while the row exists. Its payload is not stored: it is rebuilt, byte for
-- byte, from its readings (readings.exchange_id), which keeps the row small
-- enough to fit in the headroom of a full store.
CREATE TABLE exchanges (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pkid        INTEGER NOT NULL UNIQUE CHECK (pkid BETWEEN 1 AND 65535),
    topic       TEXT    NOT NULL,
    stage       TEXT    NOT NULL CHECK (stage IN ('publish', 'release')),
    created_at  INTEGER NOT NULL,
    sent_count  INTEGER NOT NULL DEFAULT 0
);

-- Every frame the decoder refused: nothing a device sent disappears silently.
CREATE TABLE rejected_frames (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    port        TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    detail      TEXT    NOT NULL,
    raw         BLOB    NOT NULL
);
CREATE INDEX rejected_received ON rejected_frames (received_at);

-- Per device: every seq up to `frontier` is stored (or was declared skipped
-- after a gap that stayed open). Never pruned, so a seq reused after its
-- reading was deleted is still caught. Routine readings past a gap wait for
-- the missing one; alerts never wait, so they may be stored ahead of it.
CREATE TABLE devices (
    device   TEXT PRIMARY KEY,
    frontier INTEGER NOT NULL
) WITHOUT ROWID;

-- Small facts the running gateway records for `hearth status`
-- (session counter, broker state, last delivery, ...).
CREATE TABLE gateway_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
