-- Schema 4: the audit trail of security events (src/audit.rs).
-- Append-only from hearth's side: the triggers refuse an UPDATE or a DELETE
-- through SQLite, and each row carries the SHA-256 of its content and of the
-- row before it, so an edit, an insertion or a deletion made around SQLite
-- breaks the chain (`hearth audit verify`). Never pruned with the readings.
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY,
    at     INTEGER NOT NULL,   -- ms since the Unix epoch
    kind   TEXT    NOT NULL,   -- e.g. tls-failure, certificate-expiring
    actor  TEXT    NOT NULL,   -- `hearth run`, or the CLI's user and command
    detail TEXT    NOT NULL,   -- a JSON object; never patient values
    prev   TEXT    NOT NULL,   -- the previous row's hash (hex), zeros for the first
    hash   TEXT    NOT NULL    -- SHA-256 (hex) of prev, id, at, kind, actor, detail
);
CREATE INDEX audit_at ON audit (at);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
