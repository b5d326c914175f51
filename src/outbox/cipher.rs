//! Encryption at rest: SQLCipher under the store.
//!
//! Every page of the database and of its WAL is encrypted (AES-256, with an
//! HMAC per page); the `-shm` file holds only the WAL's index. The key comes
//! from [`super::key`].
//!
//! Guarantees:
//! - A connection is keyed before anything reads the file, and the key is
//!   proved by reading page 1 ([`unlock`]). A key that does not open an
//!   existing store is an error ([`super::StoreError::WrongKey`]), never a
//!   reason to move the store aside or start a new one.
//! - A plain store (an earlier hearth's, or one made with `store.encrypt =
//!   false`) is encrypted in place by [`encrypt_in_place`], crash-safely:
//!   its WAL is checkpointed into it, it is copied under an exclusive lock
//!   into `NAME.encrypting` (written and synced), the copy is checked and
//!   renamed over it, and the folder is synced. A crash before the rename
//!   leaves the plain store, which the next start encrypts again; after
//!   it, the encrypted one. Its key is durable before the copy starts
//!   (see [`super::key::Keyring::create`]).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::StoreError;
use super::key::{Encryption, Key, Keyring, Loaded, Source, sync_dir, with_suffix};

/// What is at a store's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisk {
    /// Nothing yet (no file, or empty files): a new store may be made.
    Fresh,
    /// A plain SQLite database.
    Plain,
    /// Anything else: an encrypted store, or something hearth must not
    /// overwrite.
    Encrypted,
}

/// Looks at the database file and its WAL: their sizes, then whether
/// SQLite reads the file's header without a key (a plain database starts
/// with "SQLite format 3", an encrypted one with random bytes). The file is
/// read through SQLite, never opened directly: closing a descriptor of a
/// file drops every POSIX lock the process holds on it, SQLite's included,
/// and this may run while the process has the store open (SQLite defers
/// such closes itself).
pub fn on_disk(path: &Path) -> Result<OnDisk, StoreError> {
    let len = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(StoreError::Io {
            path: p.to_owned(),
            source,
        }),
    };
    let main = len(path)?;
    if main == 0 && len(&with_suffix(path, "-wal"))? == 0 {
        return Ok(OnDisk::Fresh);
    }
    if main < 512 {
        // Not even a page: nothing hearth may overwrite either.
        return Ok(OnDisk::Encrypted);
    }
    // `immutable`: page 1 of the file as it is, without locks, WAL or
    // `-shm` (none is created); its first 16 bytes are all that is asked.
    let plain = Connection::open_with_flags(
        immutable_uri(path),
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|conn| conn.query_row("PRAGMA schema_version", [], |_| Ok(())));
    // Without its WAL, the file alone may not read as a database: a plain
    // store left by a process that did not checkpoint (a crash, a stop
    // right after start) has its newest pages, the schema's included, only
    // in the WAL, and reads as "malformed". Such a store is not damaged:
    // ask again with the WAL, read-only.
    let plain = match plain {
        Err(e) if !is_wrong_key(&e) => Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|conn| {
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.query_row("PRAGMA schema_version", [], |_| Ok(()))
        }),
        other => other,
    };
    match plain {
        Ok(()) => Ok(OnDisk::Plain),
        Err(e) if is_wrong_key(&e) => Ok(OnDisk::Encrypted),
        Err(source) => Err(StoreError::Open {
            path: path.to_owned(),
            source,
        }),
    }
}

/// `file:PATH?mode=ro&immutable=1`, the path percent-encoded.
fn immutable_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/._-~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?mode=ro&immutable=1");
    uri
}

/// Keys `conn` with `key` and proves it with a read of page 1; on a wrong
/// key SQLCipher answers `SQLITE_NOTADB` ("file is not a database").
pub fn unlock(conn: &Connection, key: &Key) -> rusqlite::Result<()> {
    key.apply(conn)?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
}

/// Whether `key` reads every page of the store at `path` (`PRAGMA
/// cipher_integrity_check`, which checks each page's HMAC): the proof a key
/// change took. A read-only connection, so a wrong key changes nothing.
pub fn check_key(path: &Path, key: &Key) -> Result<(), String> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| e.to_string())?;
    unlock(&conn, key).map_err(|e| e.to_string())?;
    let problems: Vec<String> = conn
        .prepare("PRAGMA cipher_integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| e.to_string())?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// True for the answer SQLCipher gives to a wrong key.
pub fn is_wrong_key(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase)
}

/// Opens `path` with `flags` and unlocks it with `key`, or else with
/// `pending` (the key of an unfinished change). Returns the connection and
/// whether it was `pending` that opened it. The busy timeout is set first:
/// a store held exclusively (a key change, an encryption in place) makes
/// this wait, then fail as busy, not as a wrong key. For an `existing`
/// store the keys are tried on a read-only connection first: a writable
/// connection that failed would, as it closed, checkpoint the WAL into the
/// file, and a wrong key must leave the files as they were.
pub fn open_keyed(
    path: &Path,
    flags: OpenFlags,
    key: &Key,
    pending: Option<&Key>,
    existing: bool,
) -> Result<(Connection, bool), rusqlite::Error> {
    let open = |key: &Key, flags: OpenFlags| -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        unlock(&conn, key)?;
        Ok(conn)
    };
    let read_only = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let probe = if existing { read_only } else { flags };
    let (conn, used_pending) = match open(key, probe) {
        Ok(conn) => (conn, false),
        Err(e) if is_wrong_key(&e) => match pending {
            Some(pending) => match open(pending, probe) {
                Ok(conn) => (conn, true),
                // The first key's answer is the one to report.
                Err(_) => return Err(e),
            },
            None => return Err(e),
        },
        Err(e) => return Err(e),
    };
    if probe == flags {
        return Ok((conn, used_pending));
    }
    drop(conn);
    let key = match (used_pending, pending) {
        (true, Some(pending)) => pending,
        _ => key,
    };
    Ok((open(key, flags)?, used_pending))
}

/// Encrypts the plain store at `path` with `key`, in place (see the module
/// documentation for the steps and what a crash leaves).
pub fn encrypt_in_place(path: &Path, key: &Key) -> Result<(), StoreError> {
    let copy = with_suffix(path, ".encrypting");
    let result = copy_and_rename(path, &copy, key);
    if result.is_err() {
        // A partial copy only takes room (the next attempt removes it too).
        let _ = std::fs::remove_file(&copy);
        let _ = std::fs::remove_file(with_suffix(&copy, "-journal"));
    }
    result
}

/// [`encrypt_in_place`]'s steps.
fn copy_and_rename(path: &Path, copy: &Path, key: &Key) -> Result<(), StoreError> {
    let copy = copy.to_owned();
    let migrate = |step: &'static str| {
        let path = path.to_owned();
        move |source: rusqlite::Error| StoreError::Encrypt { path, step, source }
    };
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source: std::io::Error| StoreError::Io { path: p, source }
    };
    // What an earlier, interrupted attempt left.
    for leftover in [copy.clone(), with_suffix(&copy, "-journal")] {
        match std::fs::remove_file(&leftover) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&leftover)(e)),
            _ => {}
        }
    }
    let conn = Connection::open(path).map_err(migrate("open the plain store"))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(migrate("open the plain store"))?;
    // Exclusive from the first read on, and out of WAL mode: the WAL is
    // checkpointed into the file and deleted, which fails while any other
    // connection has the store open (a writer could otherwise add a
    // reading to the plain file after the copy was taken).
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(migrate("lock the plain store"))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .map_err(migrate(
            "lock the plain store (is another hearth using it? stop it first)",
        ))?;
    if mode != "delete" {
        return Err(StoreError::EncryptCheck {
            path: path.to_owned(),
            problem: format!("it stayed in journal mode `{mode}` instead of leaving WAL mode"),
        });
    }
    conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;")
        .map_err(migrate("lock the plain store"))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(migrate("read the schema version"))?;
    let copy_str = copy.to_string_lossy();
    // `sqlcipher_export` copies the schema, the rows (and `sqlite_sequence`)
    // but not `user_version`.
    key.execute(
        &conn,
        &format!(
            "ATTACH DATABASE '{}' AS encrypted KEY \"{{key}}\";",
            copy_str.replace('\'', "''")
        ),
    )
    .map_err(migrate("create the encrypted copy"))?;
    conn.query_row("SELECT sqlcipher_export('encrypted')", [], |_| Ok(()))
        .and_then(|()| conn.pragma_update(Some("encrypted"), "user_version", version))
        .map_err(migrate("copy into the encrypted store"))?;
    if let Some(problem) = differing_table(&conn).map_err(migrate("check the encrypted copy"))? {
        return Err(StoreError::EncryptCheck {
            path: path.to_owned(),
            problem: format!("the copy differs from it: {problem}"),
        });
    }
    conn.execute_batch("DETACH DATABASE encrypted")
        .map_err(migrate("close the encrypted copy"))?;
    std::fs::File::open(&copy)
        .and_then(|f| f.sync_all())
        .map_err(io(&copy))?;
    crate::failpoint::hit("encrypt-copied");
    std::fs::rename(&copy, path)
        .and_then(|()| sync_dir(path))
        .map_err(io(path))?;
    crate::failpoint::hit("encrypt-renamed");
    // Closing releases the lock on the old file. It is in DELETE mode, so
    // this touches no `-wal` of the new one; the old file's journal (an
    // empty header: not hot) goes.
    drop(conn);
    Ok(())
}

/// True when `e` from [`encrypt_in_place`] means the disk (or the
/// folder's quota) had no room for the encrypted copy.
pub fn is_full(e: &StoreError) -> bool {
    match e {
        // `sqlcipher_export` passes SQLITE_FULL on as a plain SQLITE_ERROR
        // with SQLite's message.
        StoreError::Encrypt { source, .. } => {
            source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
                || source.to_string().contains("database or disk is full")
        }
        StoreError::Io { source, .. } => {
            matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        }
        _ => false,
    }
}

/// The first table of `main` with a different number of rows in
/// `encrypted`, if any.
fn differing_table(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM main.sqlite_master WHERE type = 'table'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for table in tables {
        let quoted = table.replace('"', "\"\"");
        let count = |db: &str| -> rusqlite::Result<i64> {
            conn.query_row(
                &format!("SELECT count(*) FROM {db}.\"{quoted}\""),
                [],
                |r| r.get(0),
            )
        };
        let (plain, copied) = (count("main")?, count("encrypted")?);
        if plain != copied {
            return Ok(Some(format!(
                "table `{table}` has {plain} rows, its copy {copied}"
            )));
        }
    }
    Ok(None)
}

/// `PRAGMA cipher_integrity_check`: the pages whose HMAC does not hold
/// (damaged storage), `None` when every page checks out.
pub fn damaged_pages(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let lines: Vec<String> = conn
        .prepare("PRAGMA cipher_integrity_check")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok((!lines.is_empty()).then(|| lines.join("; ")))
}

/// How a connection will be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Read and write, creating the file if needed.
    Write,
}

/// What to try after a wrong key, for the sources that have a way out.
fn hint(source: &Source) -> &'static str {
    match source {
        Source::Credential(_) => {
            " (if `hearth store rekey` was interrupted, run it again as root: it finishes the change)"
        }
        _ => "",
    }
}

/// Opens the store at `path` as `encryption` says; the second value is
/// whether the connection is encrypted. A plain store under `encrypt =
/// true` opens as it is (`hearth run` encrypts it, [`encrypt_in_place`]);
/// an encrypted one under `encrypt = false` is refused. Needs the key to
/// exist. A writer settles an unfinished key change: the key that opened
/// the store becomes the key.
pub fn connect(
    path: &Path,
    encryption: &Encryption,
    access: Access,
) -> Result<(Connection, bool), StoreError> {
    connect_found(path, encryption, access, on_disk(path)?)
}

/// [`connect`] to a store known to be `found` (a second connection of a
/// process that has it open already: see [`on_disk`]).
pub fn connect_found(
    path: &Path,
    encryption: &Encryption,
    access: Access,
    found: OnDisk,
) -> Result<(Connection, bool), StoreError> {
    let flags = match access {
        Access::Read => OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        Access::Write => OpenFlags::default(),
    };
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let ring = match (encryption, found) {
        (Encryption::Off, OnDisk::Encrypted) => return Err(StoreError::NotPlain(path.to_owned())),
        (Encryption::Off, _) | (Encryption::On(_), OnDisk::Plain) => {
            return Connection::open_with_flags(path, flags)
                .map(|c| (c, false))
                .map_err(open_err);
        }
        (Encryption::On(ring), _) => ring,
    };
    let loaded = load_key(path, ring)?;
    let existing = found == OnDisk::Encrypted;
    let (conn, used_pending) =
        open_keyed(path, flags, &loaded.key, loaded.pending.as_ref(), existing)
            .map_err(|source| wrong_key_or(path, ring, source))?;
    // Settling an interrupted key change is tidying: the key that opens
    // the store is in use either way, and the next open tries both again.
    // A key kept where the gateway cannot write (say /etc/hearth, under
    // ProtectSystem=strict) is settled by the root CLI instead.
    if access == Access::Write {
        if used_pending {
            match ring.promote_pending() {
                Ok(()) => tracing::info!(
                    key = %ring.source(),
                    "An interrupted key change had re-encrypted the store: its new key is now in place."
                ),
                Err(e) => tracing::warn!(
                    key = %ring.source(),
                    error = %e,
                    "The store opened with the key of an interrupted key change, which cannot be put in place from here: `sudo hearth store rekey` settles it."
                ),
            }
        } else if loaded.pending.is_some()
            && let Err(e) = ring.discard_pending()
        {
            tracing::warn!(
                key = %ring.source(),
                error = %e,
                "An interrupted key change left an unused new key, which cannot be removed from here."
            );
        }
    }
    Ok((conn, true))
}

/// [`StoreError::WrongKey`] for SQLCipher's answer to a wrong key, else
/// [`StoreError::Open`].
fn wrong_key_or(path: &Path, ring: &Keyring, source: rusqlite::Error) -> StoreError {
    if is_wrong_key(&source) {
        StoreError::WrongKey {
            path: path.to_owned(),
            key: ring.source().to_string(),
            source: Box::new(source),
            hint: hint(ring.source()),
        }
    } else {
        StoreError::Open {
            path: path.to_owned(),
            source,
        }
    }
}

/// The key of the store at `path` (and an unfinished change's), or why not.
fn load_key(path: &Path, ring: &Keyring) -> Result<Loaded, StoreError> {
    ring.load()
        .map_err(|source| StoreError::Key {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| StoreError::KeyMissing {
            path: path.to_owned(),
            key: ring.source().path().to_owned(),
        })
}

/// Opens the encrypted store at `path` for a key change: held exclusively
/// from its first read on, so that another connection (a running gateway,
/// which the change would lock out) makes this fail with
/// [`StoreError::InUse`]; an unfinished earlier change is settled first.
pub fn open_for_rekey(path: &Path, ring: &Keyring) -> Result<Connection, StoreError> {
    let key_err = |source| StoreError::Key {
        path: path.to_owned(),
        source,
    };
    let loaded = load_key(path, ring)?;
    // Which key opens it, as `connect` finds it; then the connection that
    // holds the store.
    let (probe, used_pending) = open_keyed(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        &loaded.key,
        loaded.pending.as_ref(),
        true,
    )
    .map_err(|source| wrong_key_or(path, ring, source))?;
    drop(probe);
    let key = match (used_pending, &loaded.pending) {
        (true, Some(pending)) => pending,
        _ => &loaded.key,
    };
    let hold = || -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        key.apply(&conn)?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
        Ok(conn)
    };
    let conn = hold().map_err(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::InUse(path.to_owned())
        }
        _ => wrong_key_or(path, ring, e),
    })?;
    if used_pending {
        ring.promote_pending().map_err(key_err)?;
    } else if loaded.pending.is_some() {
        ring.discard_pending().map_err(key_err)?;
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Store;
    use crate::outbox::key::write_key_file;
    use crate::outbox::store::tests::reading;
    use crate::reading::Priority;

    /// A store at `dir/s.db` with its key beside it, holding 200 readings.
    fn filled(dir: &Path) -> (std::path::PathBuf, Encryption) {
        let path = dir.join("s.db");
        let encryption = Encryption::beside(&path);
        let (mut store, _) = Store::open_checked(&path, &encryption).unwrap();
        let batch: Vec<_> = (1..=200).map(|s| reading(s, Priority::Routine)).collect();
        store
            .commit_serial("p", &batch, &[], chrono::Utc::now())
            .unwrap();
        (path, encryption)
    }

    /// A plain store whose writer never checkpointed (a crash, or a stop
    /// right after start): the file alone may not read as a database, and
    /// it must still be found plain and opened, never moved aside.
    #[test]
    fn a_plain_store_with_its_pages_in_the_wal_is_plain_not_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let (mut store, _) = Store::open_checked(&path, &Encryption::Off).unwrap();
        let batch: Vec<_> = (1..=50).map(|s| reading(s, Priority::Routine)).collect();
        store
            .commit_serial("p", &batch, &[], chrono::Utc::now())
            .unwrap();
        // As a crash in the middle of a checkpoint leaves it: page 1 of the
        // file torn, its good copy still in the WAL (no close, so no
        // checkpoint of it).
        store
            .in_transaction(|s| {
                s.set_state("schema-touch", "1")?;
                Ok(())
            })
            .unwrap();
        let wal_has_page_1 = {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("PRAGMA wal_autocheckpoint = 0; CREATE TABLE touch (x);")
                .unwrap();
            std::mem::forget(conn);
            true
        };
        std::mem::forget(store);
        assert!(wal_has_page_1);
        assert!(with_suffix(&path, "-wal").metadata().unwrap().len() > 0);
        {
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(std::io::SeekFrom::Start(100)).unwrap();
            f.write_all(&[0xFF; 400]).unwrap();
        }
        assert_eq!(on_disk(&path).unwrap(), OnDisk::Plain);
        let (store, moved) = Store::open_checked(&path, &Encryption::Off).unwrap();
        assert_eq!(moved, None);
        assert_eq!(store.list(&Default::default()).unwrap().len(), 50);
    }

    #[test]
    fn a_wrong_key_is_an_error_and_never_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (path, encryption) = filled(dir.path());
        let Encryption::On(ring) = &encryption else {
            unreachable!()
        };
        write_key_file(ring.source().path(), &Key::generate().unwrap(), None).unwrap();
        let err = Store::open_checked(&path, &encryption).err().unwrap();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("corrupt")),
            "moved aside: {names:?}"
        );
    }

    #[test]
    fn damaged_encrypted_pages_are_found_and_the_store_moved_aside_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (path, encryption) = filled(dir.path());
        // Everything into the file, then scribble over pages 2 and 3.
        {
            let store = Store::open(&path, &encryption).unwrap();
            store
                .conn_for_tests()
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 4 * 4096);
        bytes[4096..3 * 4096].fill(0xA5);
        std::fs::write(&path, &bytes).unwrap();
        let (store, aside) = Store::open_checked(&path, &encryption).unwrap();
        let aside = aside.expect("moved aside");
        assert!(store.encrypted());
        // The same key opens what was moved aside: its pages 1 and 4+.
        let Encryption::On(ring) = &encryption else {
            unreachable!()
        };
        let key = ring.load().unwrap().unwrap().key;
        let conn = Connection::open_with_flags(&aside, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        unlock(&conn, &key).unwrap();
        assert!(damaged_pages(&conn).unwrap().is_some());
    }

    #[test]
    fn an_unfinished_rekey_is_settled_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (path, encryption) = filled(dir.path());
        let Encryption::On(ring) = &encryption else {
            unreachable!()
        };
        let new = Key::generate().unwrap();
        // As a key change leaves it between its rekey and its rename.
        {
            let store = Store::open(&path, &encryption).unwrap();
            ring.write_pending(&new).unwrap();
            new.execute(store.conn_for_tests(), "PRAGMA rekey = \"{key}\";")
                .unwrap();
        }
        // A reader finds the pending key and changes nothing.
        let reader = Store::open_read_only(&path, &encryption).unwrap();
        assert_eq!(reader.list(&Default::default()).unwrap().len(), 200);
        drop(reader);
        assert!(ring.load().unwrap().unwrap().pending.is_some());
        // A writer puts it in place.
        drop(Store::open(&path, &encryption).unwrap());
        let loaded = ring.load().unwrap().unwrap();
        assert_eq!((loaded.key, loaded.pending), (new, None));
    }

    #[test]
    fn an_encrypted_store_is_refused_under_encrypt_false() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = filled(dir.path());
        let before = std::fs::read(&path).unwrap();
        let err = Store::open_checked(&path, &Encryption::Off).err().unwrap();
        assert!(matches!(err, StoreError::NotPlain(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_plain_store_keeps_every_row_and_its_counters_when_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        {
            let (mut store, _) = Store::open_checked(&path, &Encryption::Off).unwrap();
            let batch: Vec<_> = (1..=50).map(|s| reading(s, Priority::Routine)).collect();
            store
                .commit_serial("p", &batch, &[], chrono::Utc::now())
                .unwrap();
            store.begin_connect().unwrap();
        }
        assert_eq!(on_disk(&path).unwrap(), OnDisk::Plain);
        let encryption = Encryption::beside(&path);
        let (mut store, _) = Store::open_checked(&path, &encryption).unwrap();
        assert!(store.encrypted());
        assert_eq!(on_disk(&path).unwrap(), OnDisk::Encrypted);
        assert_eq!(store.list(&Default::default()).unwrap().len(), 50);
        // The session counter went on where it was.
        assert_eq!(store.begin_connect().unwrap(), (2, true));
        let next = store
            .commit_serial(
                "p",
                &[reading(51, Priority::Routine)],
                &[],
                chrono::Utc::now(),
            )
            .unwrap();
        assert_eq!(next.len(), 1);
        let max_id: i64 = store
            .conn_for_tests()
            .query_row("SELECT max(id) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(max_id, 51, "ids go on (AUTOINCREMENT's counter was kept)");
    }
}
