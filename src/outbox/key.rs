//! The store's encryption key: where it comes from and how it is kept.
//!
//! The store is an SQLCipher database ([`super::cipher`]). Its key is 32
//! random bytes, kept as 64 hex digits and a newline, and handed to
//! SQLCipher as a raw key (`PRAGMA key = "x'…'"`): no key derivation at
//! every open. It is looked for in this order, the first that exists wins
//! ([`Encryption::from_config`]):
//! 1. `store.key_file`, when set: a file of the operator's, owned by the
//!    service user, mode 0600 (a key that group or others can read is
//!    refused);
//! 2. the systemd credential `hearth-store-key` in `$CREDENTIALS_DIRECTORY`:
//!    the package seals the key with `systemd-creds encrypt` into
//!    `/etc/hearth/store-key.cred` and the unit hands it over
//!    (`LoadCredentialEncrypted=`);
//! 3. `store-key.cred` beside the configuration file: that same sealed key,
//!    outside the service. Only root can unseal it (`systemd-creds
//!    decrypt`), so `sudo hearth readings list` works and the service user
//!    alone cannot;
//! 4. `{store.path}.key`, beside the store. `hearth run` writes it, mode
//!    0600 and owned by the user it runs as, when it creates a store or
//!    encrypts a plain one; it is never made for a store that exists and is
//!    encrypted (that is an error: a new key would lock the data out).
//!
//! What a key kept beside the store protects against: a copy of the
//! database (and its `-wal`) alone, such as a backup or a support bundle
//! that leaves the key out, and anyone without read access to the key file.
//! What it does not protect against: anyone who can read the key file too
//! (the service user, root, someone holding the disk or the SD card).
//! A sealed key protects against the disk as well: it unseals only on this
//! machine (with its TPM2 if it has one, else with the host's key in
//! `/var/lib/systemd/credential.secret`, which root can read). Neither
//! protects against root on a running gateway.
//!
//! A key is changed ([`super::Store::rekey`]) by writing the new one beside
//! the old first (`NAME.new`, durably), then re-encrypting the store, then
//! renaming `NAME.new` over `NAME`. An open that fails with `NAME` tries
//! `NAME.new` ([`Loaded::pending`]), so a crash anywhere in between leaves
//! the store readable.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rusqlite::Connection;

use crate::config::StoreConfig;

/// The systemd credential's name (the unit's `LoadCredentialEncrypted=`).
pub const CREDENTIAL: &str = "hearth-store-key";
/// The sealed key's file name, beside the configuration file.
pub const SEALED_FILE: &str = "store-key.cred";
/// Bytes in a key.
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the store key `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the store key `{0}` is not 64 hex digits: write a new one with `openssl rand -hex 32`, or restore the right one"
    )]
    Malformed(PathBuf),
    #[error(
        "the store key `{path}` can be read by group or others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("cannot unseal the store key `{path}` with `systemd-creds decrypt`: {why}")]
    Unseal { path: PathBuf, why: String },
    #[error("cannot seal the new store key into `{path}` with `systemd-creds encrypt`: {why}")]
    Seal { path: PathBuf, why: String },
    #[error("cannot write the store key `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a store key: the system's random source failed")]
    Random,
    #[error(
        "the store key comes from systemd's credential `{CREDENTIAL}`, which only the service sees: change it outside the service (the sealed `{SEALED_FILE}`, as root)"
    )]
    NotHere,
}

/// A store key. Zeroed when dropped; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites `bytes` with zeros in a way the optimiser keeps.
fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

/// Bytes holding key material (hex, SQL, a file's content), zeroed when
/// dropped.
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl Secret {
    fn read(path: &Path) -> Result<Secret, KeyError> {
        std::fs::read(path)
            .map(Secret)
            .map_err(|source| KeyError::Read {
                path: path.to_owned(),
                source,
            })
    }

    /// The key in it, or why not.
    fn key(&self, path: &Path) -> Result<Key, KeyError> {
        Key::parse(&self.0).ok_or_else(|| KeyError::Malformed(path.to_owned()))
    }
}

impl Key {
    /// 32 bytes from the system's random source.
    pub fn generate() -> Result<Key, KeyError> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Random)?;
        Ok(Key(bytes))
    }

    /// 64 hex digits, then optionally white space (a newline).
    pub fn parse(text: &[u8]) -> Option<Key> {
        let digits = text.trim_ascii_end();
        if digits.len() != 2 * KEY_LEN {
            return None;
        }
        let mut bytes = [0u8; KEY_LEN];
        for (i, pair) in digits.chunks(2).enumerate() {
            let hex = |c: u8| (c as char).to_digit(16);
            bytes[i] = (hex(pair[0])? * 16 + hex(pair[1])?) as u8;
        }
        Some(Key(bytes))
    }

    /// Reads a key file as [`Source::KeyFile`] or [`Source::Beside`] do,
    /// refusing one that group or others can read.
    pub fn read_file(path: &Path) -> Result<Key, KeyError> {
        let read = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
        Secret::read(path)?.key(path)
    }

    /// 64 hex digits and a newline, as a key file holds them.
    fn hex_line(&self) -> Secret {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = Vec::with_capacity(2 * KEY_LEN + 1);
        for b in self.0 {
            s.push(DIGITS[usize::from(b >> 4)]);
            s.push(DIGITS[usize::from(b & 15)]);
        }
        s.push(b'\n');
        Secret(s)
    }

    /// SQL with `{key}` replaced by the raw key literal `x'<64 hex>'`.
    fn sql(&self, template: &str) -> Secret {
        let hex = self.hex_line();
        let literal = format!("x'{}'", String::from_utf8_lossy(&hex.0[..2 * KEY_LEN]));
        let literal = Secret(literal.into_bytes());
        Secret(
            template
                .replace("{key}", &String::from_utf8_lossy(&literal.0))
                .into_bytes(),
        )
    }

    /// Runs `template` (SQL) with `{key}` replaced by this key's literal.
    pub(crate) fn execute(&self, conn: &Connection, template: &str) -> rusqlite::Result<()> {
        let sql = self.sql(template);
        conn.execute_batch(&String::from_utf8_lossy(&sql.0))
    }

    /// Keys `conn`: must come before anything else reads the database.
    /// Also silences SQLCipher's own log (a wrong key would print three
    /// lines on stderr; hearth reports it itself) and pins the SQLCipher 4
    /// format, so that a later SQLCipher keeps reading this store.
    pub fn apply(&self, conn: &Connection) -> rusqlite::Result<()> {
        self.execute(
            conn,
            "PRAGMA key = \"{key}\"; PRAGMA cipher_log_level = NONE; PRAGMA cipher_compatibility = 4;",
        )
    }
}

/// Where the store's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `store.key_file`.
    KeyFile(PathBuf),
    /// systemd's credential `hearth-store-key` (inside the service).
    Credential(PathBuf),
    /// The sealed key beside the configuration (`systemd-creds`, root).
    Sealed(PathBuf),
    /// `{store.path}.key`.
    Beside(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::KeyFile(p) => write!(f, "key file `{}` (store.key_file)", p.display()),
            Source::Credential(_) => write!(f, "systemd credential `{CREDENTIAL}`"),
            Source::Sealed(p) => write!(f, "sealed key `{}`", p.display()),
            Source::Beside(p) => write!(f, "key file `{}`", p.display()),
        }
    }
}

impl Source {
    /// The file the key is read from.
    pub fn path(&self) -> &Path {
        match self {
            Source::KeyFile(p) | Source::Credential(p) | Source::Sealed(p) | Source::Beside(p) => p,
        }
    }

    /// Where a key being switched to waits (`NAME.new`); none for the
    /// credential, which the service gets as it is.
    fn pending_path(&self) -> Option<PathBuf> {
        match self {
            Source::Credential(_) => None,
            _ => Some(with_suffix(self.path(), ".new")),
        }
    }

    fn read(&self, path: &Path) -> Result<Key, KeyError> {
        match self {
            Source::KeyFile(_) | Source::Beside(_) => Key::read_file(path),
            // systemd makes it 0400 for the service user.
            Source::Credential(_) => Secret::read(path)?.key(path),
            Source::Sealed(_) => unseal(path),
        }
    }
}

/// How the store is kept: encrypted with a key from [`Keyring`], or (only
/// with `store.encrypt = false`) in plaintext.
#[derive(Debug, Clone)]
pub enum Encryption {
    Off,
    On(Keyring),
}

impl Encryption {
    /// From `store.encrypt` and `store.key_file`, the environment (a
    /// systemd credential) and the files present, in the order the module
    /// documentation gives. `config_path` is the configuration file.
    pub fn from_config(store: &StoreConfig, config_path: &Path) -> Encryption {
        if !store.encrypt {
            return Encryption::Off;
        }
        if let Some(file) = &store.key_file {
            return Encryption::On(Keyring::new(Source::KeyFile(file.clone())));
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let credential = Path::new(&dir).join(CREDENTIAL);
            if credential.exists() {
                return Encryption::On(Keyring::new(Source::Credential(credential)));
            }
        }
        let sealed = config_path
            .parent()
            .map(|d| d.join(SEALED_FILE))
            .filter(|p| p.exists());
        if let Some(sealed) = sealed {
            return Encryption::On(Keyring::new(Source::Sealed(sealed)));
        }
        Encryption::beside(&store.path)
    }

    /// The key file beside the store, `{db}.key`.
    pub fn beside(db: &Path) -> Encryption {
        Encryption::On(Keyring::new(Source::Beside(with_suffix(db, ".key"))))
    }
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The key of one source, and what may be done with it.
#[derive(Debug, Clone)]
pub struct Keyring {
    source: Source,
}

/// A key as loaded, with the key an interrupted change was switching to.
#[derive(Debug)]
pub struct Loaded {
    pub key: Key,
    /// `NAME.new`, present only after a key change that did not finish:
    /// the store holds either key.
    pub pending: Option<Key>,
}

impl Keyring {
    pub fn new(source: Source) -> Keyring {
        Keyring { source }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Whether [`Keyring::create`] may make this key: only the key file
    /// beside the store is hearth's to make.
    pub fn can_create(&self) -> bool {
        matches!(self.source, Source::Beside(_))
    }

    /// The key, or `None` when its file does not exist. A configured key
    /// file that does not exist is an error.
    pub fn load(&self) -> Result<Option<Loaded>, KeyError> {
        let path = self.source.path();
        if !path.exists() {
            if self.can_create() {
                return Ok(None);
            }
            return Err(KeyError::Read {
                path: path.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let key = self.source.read(path)?;
        let pending = match self.source.pending_path() {
            Some(p) if p.exists() => Some(self.source.read(&p)?),
            _ => None,
        };
        Ok(Some(Loaded { key, pending }))
    }

    /// Generates a key and writes it durably (file, then folder, synced),
    /// mode 0600, before any store uses it.
    pub fn create(&self) -> Result<Key, KeyError> {
        debug_assert!(self.can_create());
        let key = Key::generate()?;
        write_durably(self.source.path(), &key.hex_line().0, None)?;
        Ok(key)
    }

    /// Writes `key` durably as `NAME.new`, sealed if the key is, owned
    /// like `NAME`: the first step of a key change.
    pub fn write_pending(&self, key: &Key) -> Result<(), KeyError> {
        let pending = self.source.pending_path().ok_or(KeyError::NotHere)?;
        let text = key.hex_line();
        match &self.source {
            Source::Sealed(_) => {
                let sealed = seal(&pending, &text.0)?;
                write_durably(&pending, &sealed, Some(self.source.path()))?;
                // Proof that it unseals to the same key before the store
                // depends on it.
                if unseal(&pending)? != *key {
                    return Err(KeyError::Seal {
                        path: pending,
                        why: "it unseals to a different key".into(),
                    });
                }
                Ok(())
            }
            _ => write_durably(&pending, &text.0, Some(self.source.path())),
        }
    }

    /// Renames `NAME.new` over `NAME` (durably): the store now holds that
    /// key.
    pub fn promote_pending(&self) -> Result<(), KeyError> {
        let Some(pending) = self.source.pending_path() else {
            return Ok(());
        };
        let path = self.source.path();
        std::fs::rename(&pending, path)
            .and_then(|()| sync_dir(path))
            .map_err(|source| KeyError::Write {
                path: path.to_owned(),
                source,
            })
    }

    /// Deletes `NAME.new`: the store still holds `NAME`.
    pub fn discard_pending(&self) -> Result<(), KeyError> {
        let Some(pending) = self.source.pending_path() else {
            return Ok(());
        };
        match std::fs::remove_file(&pending) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(KeyError::Write {
                path: pending,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// Writes `key` to `path` as a key file (64 hex digits and a newline),
/// durably, mode 0600, owned like `like` when given.
pub fn write_key_file(path: &Path, key: &Key, like: Option<&Path>) -> Result<(), KeyError> {
    write_durably(path, &key.hex_line().0, like)
}

/// Writes `bytes` to `path` through `path.tmp`: written, synced, renamed,
/// folder synced; mode 0600, owned like `like` when given (a root CLI
/// replacing the service user's key must leave it the service user's).
fn write_durably(path: &Path, bytes: &[u8], like: Option<&Path>) -> Result<(), KeyError> {
    let tmp = with_suffix(path, ".tmp");
    let write = || -> std::io::Result<()> {
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Some(like) = like {
            let owner = std::fs::metadata(like)?;
            std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        KeyError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

/// Syncs the folder holding `path`, so that a rename in it is durable.
pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Runs `systemd-creds ARGS` with `input` on stdin; its stdout, or why not.
fn systemd_creds(args: &[&std::ffi::OsStr], input: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new("systemd-creds")
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "`systemd-creds` is not installed (systemd 250 or later)".to_owned()
            }
            _ => e.to_string(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no message");
    let mut why = format!("{said} ({})", out.status);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        why.push_str(": only root can unseal or seal the key outside the service: run this command as root (e.g. `sudo hearth …`)");
    }
    Err(why)
}

fn unseal(path: &Path) -> Result<Key, KeyError> {
    let name = format!("--name={CREDENTIAL}");
    let out = systemd_creds(
        &[
            "decrypt".as_ref(),
            name.as_ref(),
            path.as_os_str(),
            "-".as_ref(),
        ],
        b"",
    )
    .map_err(|why| KeyError::Unseal {
        path: path.to_owned(),
        why,
    })?;
    Secret(out).key(path)
}

fn seal(path: &Path, text: &[u8]) -> Result<Vec<u8>, KeyError> {
    let name = format!("--name={CREDENTIAL}");
    systemd_creds(
        &[
            "encrypt".as_ref(),
            name.as_ref(),
            // No PCR binding: a firmware update must not lock the store.
            "--tpm2-pcrs=".as_ref(),
            "-".as_ref(),
            "-".as_ref(),
        ],
        text,
    )
    .map_err(|why| KeyError::Seal {
        path: path.to_owned(),
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_64_hex_digits_and_an_optional_newline() {
        let hex = "00ff".repeat(16);
        assert!(Key::parse(hex.as_bytes()).is_some());
        assert!(Key::parse(format!("{hex}\n").as_bytes()).is_some());
        assert!(Key::parse(format!("{}\n", hex.to_uppercase()).as_bytes()).is_some());
        assert!(Key::parse(&hex.as_bytes()[2..]).is_none());
        assert!(Key::parse(format!("{hex}00").as_bytes()).is_none());
        assert!(Key::parse(hex.replace('f', "g").as_bytes()).is_none());
        let key = Key::generate().unwrap();
        assert_eq!(Key::parse(&key.hex_line().0), Some(key.clone()));
        assert_eq!(format!("{key:?}"), "Key(..)");
    }

    #[test]
    fn a_created_key_is_private_and_a_shared_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::new(Source::Beside(dir.path().join("s.db.key")));
        assert!(ring.load().unwrap().is_none());
        let key = ring.create().unwrap();
        let mode = std::fs::metadata(ring.source().path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ring.load().unwrap().unwrap().key, key);
        std::fs::set_permissions(ring.source().path(), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let err = ring.load().unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_pending_key_is_seen_until_promoted_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::new(Source::Beside(dir.path().join("s.db.key")));
        let old = ring.create().unwrap();
        let new = Key::generate().unwrap();
        ring.write_pending(&new).unwrap();
        let loaded = ring.load().unwrap().unwrap();
        assert_eq!(
            (loaded.key, loaded.pending),
            (old.clone(), Some(new.clone()))
        );
        ring.discard_pending().unwrap();
        assert!(ring.load().unwrap().unwrap().pending.is_none());
        ring.write_pending(&new).unwrap();
        ring.promote_pending().unwrap();
        let loaded = ring.load().unwrap().unwrap();
        assert_eq!((loaded.key, loaded.pending), (new, None));
    }

    #[test]
    fn a_configured_key_file_must_exist() {
        let ring = Keyring::new(Source::KeyFile("/nonexistent/hearth.key".into()));
        let err = ring.load().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/hearth.key"), "{err}");
    }
}
