-- hearth outbox, schema version 2: protocol v1.1 identities, and readings
-- are never refused (see src/outbox/ingest.rs for the rules).
--
-- A reading's identity is (device, epoch, run, seq, variant):
--   epoch   the device's boot epoch (protocol v1.1), 0 for a v1 device;
--   run     raised by the gateway when a v1 device is seen to count again
--           (a restart it did not announce), 0 otherwise;
--   variant 0, or 1, 2, ... for a second reading under a used
--           (device, epoch, run, seq) with other content (a conflict).
-- hash is a content hash of the reading (Reading::content_hash): a resend is
-- a frame whose key and hash match a stored or pruned reading.

CREATE TABLE readings_v2 (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    device       TEXT    NOT NULL,
    epoch        INTEGER NOT NULL DEFAULT 0,
    run          INTEGER NOT NULL DEFAULT 0,
    seq          INTEGER NOT NULL,
    variant      INTEGER NOT NULL DEFAULT 0,
    hash         INTEGER,
    -- A higher seq of the same device run and priority was stored before
    -- this one: it leaves after it.
    late         INTEGER NOT NULL DEFAULT 0,
    -- This reading began a run the gateway detected (a v1 device restarted).
    restart      INTEGER NOT NULL DEFAULT 0,
    kind         TEXT    NOT NULL,
    value        REAL    NOT NULL,
    unit         TEXT    NOT NULL,
    priority     TEXT    NOT NULL CHECK (priority IN ('alert', 'routine')),
    detail       TEXT,
    device_time  INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    state        TEXT    NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'inflight', 'delivered')),
    exchange_id  INTEGER REFERENCES exchanges (id),
    pkid         INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    inflight_at  INTEGER,
    delivered_at INTEGER
);
INSERT INTO readings_v2 (id, device, seq, kind, value, unit, priority, detail,
    device_time, received_at, state, exchange_id, pkid, attempts, inflight_at, delivered_at)
    SELECT id, device, seq, kind, value, unit, priority, detail,
    device_time, received_at, state, exchange_id, pkid, attempts, inflight_at, delivered_at
    FROM readings;
-- Keeps AUTOINCREMENT's high-water mark: an id is never handed out twice.
UPDATE sqlite_sequence SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence
    WHERE name = 'readings'), 0)) WHERE name = 'readings_v2';
DROP TABLE readings;
ALTER TABLE readings_v2 RENAME TO readings;

-- Resends are found by (device, epoch, seq); the rest of the key follows.
CREATE UNIQUE INDEX readings_key ON readings (device, epoch, seq, run, variant);
CREATE INDEX readings_queue ON readings (state, priority, id);
CREATE INDEX readings_received ON readings (received_at);
CREATE INDEX readings_exchange ON readings (exchange_id) WHERE exchange_id IS NOT NULL;

-- What is left of a reading deleted after delivery: enough to ACK its
-- resend (same key and hash) instead of storing it again.
CREATE TABLE pruned (
    device    TEXT    NOT NULL,
    epoch     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    run       INTEGER NOT NULL,
    variant   INTEGER NOT NULL,
    hash      INTEGER,
    pruned_at INTEGER NOT NULL,
    PRIMARY KEY (device, epoch, seq, run, variant)
) WITHOUT ROWID;
CREATE INDEX pruned_at ON pruned (pruned_at);

-- One row per device and epoch: where its current run stands. Kept up to
-- date in the transaction that stores each reading, so the heartbeat and
-- `hearth devices` never scan the readings.
CREATE TABLE device_runs (
    device         TEXT    NOT NULL,
    epoch          INTEGER NOT NULL,
    run            INTEGER NOT NULL DEFAULT 0,
    -- Every seq of the current run up to `frontier` is stored, or was given
    -- up after a gap wait; `high` is the highest seq stored in it, over both
    -- priorities and per priority (alerts may be stored ahead of a gap).
    -- NULL: none yet, e.g. right after an operator reset.
    frontier       INTEGER,
    -- The first seq of the current run: a seq below it was never used in
    -- the run (a late reading), one from it up to the frontier was, unless
    -- it lies in a range in `given_up`.
    start          INTEGER,
    -- The device time (ms) of the run's first reading: a v1 device's reading
    -- made before it is from the run before, sent late.
    start_time     INTEGER,
    high           INTEGER,
    high_alert     INTEGER,
    high_routine   INTEGER,
    -- A routine reading is held (NAK `gap`) while gap_missing, the seq after
    -- `frontier`, has not come; from gap_since for at most the gap wait.
    gap_missing    INTEGER,
    gap_since      INTEGER,
    last_heard     INTEGER,
    stored         INTEGER NOT NULL DEFAULT 0,
    late           INTEGER NOT NULL DEFAULT 0,
    restarts       INTEGER NOT NULL DEFAULT 0,
    conflicts      INTEGER NOT NULL DEFAULT 0,
    -- The device-restart / seq-conflict alarm holds until then.
    attention      TEXT,
    attention_until INTEGER,
    PRIMARY KEY (device, epoch)
) WITHOUT ROWID;
-- Schema 1 took every seq up to the frontier as used, from 0 on.
INSERT INTO device_runs (device, epoch, run, frontier, start, high, high_alert, high_routine,
    last_heard, stored)
    SELECT d.device, 0, 0, d.frontier, 0,
        max(d.frontier, coalesce((SELECT max(seq) FROM readings r WHERE r.device = d.device), 0)),
        (SELECT max(seq) FROM readings r WHERE r.device = d.device AND r.priority = 'alert'),
        (SELECT max(seq) FROM readings r WHERE r.device = d.device AND r.priority = 'routine'),
        (SELECT max(received_at) FROM readings r WHERE r.device = d.device),
        (SELECT count(*) FROM readings r WHERE r.device = d.device)
    FROM devices d;
DROP TABLE devices;

-- Seqs a run gave up waiting for (a routine gap held for the gap wait): a
-- reading that comes for one later is late, not a reused number.
CREATE TABLE given_up (
    device   TEXT    NOT NULL,
    epoch    INTEGER NOT NULL,
    run      INTEGER NOT NULL,
    from_seq INTEGER NOT NULL,
    to_seq   INTEGER NOT NULL,
    PRIMARY KEY (device, epoch, run, from_seq)
) WITHOUT ROWID;

-- What an operator did (`hearth devices reset`), for the record.
CREATE TABLE operator_actions (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    action TEXT    NOT NULL,
    device TEXT,
    detail TEXT    NOT NULL
);
