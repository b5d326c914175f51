-- hearth outbox, schema version 5: each reading's journey to the broker,
-- for `hearth readings show` and `hearth readings tail`. Recorded in the
-- transactions the gateway commits anyway (no extra fsync).

-- When the reading's row was written, in the transaction whose commit comes
-- before its ACK to the device (NULL for readings stored before schema 5).
ALTER TABLE readings ADD COLUMN stored_at INTEGER;
-- The journeys (MQTT exchanges) it went out in, oldest first: ids of
-- `journeys`, comma-separated (NULL until it is first published); the
-- oldest are dropped past about 200 characters.
ALTER TABLE readings ADD COLUMN journeys TEXT;

-- One row per MQTT exchange begun (its id is the exchange's id), kept until
-- it is pruned with its readings.
CREATE TABLE journeys (
    id         INTEGER PRIMARY KEY,
    pkid       INTEGER NOT NULL,
    topic      TEXT    NOT NULL,
    qos        INTEGER NOT NULL,
    -- The payload's encoding: 'json' or 'cbor' (docs/compact-encoding.md).
    encoding   TEXT    NOT NULL,
    -- The reading ids of its payload, in payload order: ranges such as
    -- `7-12,15`. The payload is rebuilt from them, byte for byte.
    readings   TEXT    NOT NULL,
    -- The payload's size and the first 8 bytes of its SHA-256 (hex), so
    -- that `readings show` can tell whether its rebuilt payload is the one
    -- that went out.
    bytes      INTEGER,
    digest     TEXT,
    -- Committed before its PUBLISH was written.
    began_at   INTEGER NOT NULL,
    -- Each PUBLISH (P) or re-sent PUBREL (R), recorded just before it is
    -- written, with the connection it goes on (the store's session counter)
    -- and when (ms): `12P@1764...,13P@1764...`; about the first 40.
    sends      TEXT    NOT NULL,
    -- The broker's PUBREC (QoS 2) was recorded then.
    pubrec_at  INTEGER,
    -- How it ended, and when: 'delivered' (PUBCOMP), 'acknowledged' (PUBACK,
    -- QoS 1 or a broker that downgraded), 'refused' (an MQTT 5 reason code;
    -- its readings queued again), 'requeued' (the broker lost the session
    -- or the PUBREL; its readings queued again).
    ended_at   INTEGER,
    outcome    TEXT CHECK (outcome IN ('delivered', 'acknowledged', 'refused', 'requeued'))
);
-- Journeys are diagnostics: near the store's size cap (past the intake
-- limit) they are not written, so that the room kept for draining goes to
-- the exchanges themselves. They are deleted with their readings.
