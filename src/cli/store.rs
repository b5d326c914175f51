//! `hearth store rekey`: changes the store's encryption key.
//!
//! The gateway must be stopped: the store is held exclusively for the
//! change, and a gateway keyed with the old key would be locked out of it
//! mid-run (a running one makes this fail and say so). The key is changed
//! where it is kept (`store.key_file`, the sealed `store-key.cred`, or the
//! key file beside the store) and the change is recorded in the audit
//! trail. [`crate::outbox::Store::rekey`] gives the steps and why a crash
//! between them loses nothing.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{ConfigArg, UsageError};
use crate::config::{Config, ConfigError};
use crate::outbox::key::{self, Key, Keyring};
use crate::outbox::{Encryption, Store};

#[derive(Debug, Args)]
pub struct RekeyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Take the new key from this file (64 hex digits, e.g. made with
    /// `openssl rand -hex 32`; mode 0600) instead of generating one. It is
    /// copied to where the store's key is kept.
    #[arg(long, value_name = "PATH")]
    pub new_key_file: Option<PathBuf>,
}

pub fn rekey(args: RekeyArgs) -> anyhow::Result<()> {
    super::init_logging("info");
    let config = load(&args.config.config)?;
    let path = &config.store.path;
    let Encryption::On(ring) = Encryption::from_config(&config.store, &config.source) else {
        return Err(UsageError(format!(
            "config `{}`: `store.encrypt = false`: the store is not encrypted, so it has no key to change",
            config.source.display()
        ))
        .into());
    };
    let new = match &args.new_key_file {
        Some(file) => Key::read_file(file)?,
        None => Key::generate()?,
    };
    keep_key_of_moved_aside(path, &ring)?;
    let detail = serde_json::json!({
        "key": ring.source().to_string(),
        "new_key": match &args.new_key_file {
            Some(file) => format!("from `{}`", file.display()),
            None => "generated".into(),
        },
    });
    Store::rekey(path, &ring, &new, &actor(), &detail)?;
    tracing::info!(key = %ring.source(), "Store key changed by an operator (recorded in the audit trail).");
    println!(
        "store `{}` rekeyed: its new key is in {}; the old key no longer opens it",
        path.display(),
        ring.source()
    );
    Ok(())
}

/// The configuration without its file checks, as the other store commands
/// read it: a key change needs only the store's part.
fn load(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut config = Config::parse(&text, path)?;
    config.source = path.to_owned();
    Ok(config)
}

/// Who changed the key, for the audit trail.
fn actor() -> String {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    match std::env::var("SUDO_USER") {
        Ok(user) => format!("hearth store rekey (uid {uid}, sudo by `{user}`)"),
        Err(_) => format!("hearth store rekey (uid {uid})"),
    }
}

/// A damaged store moved aside (`NAME.corrupt-TIME`) opens only with the
/// key it had: before that key goes, it is written beside each one that
/// has none yet (`NAME.corrupt-TIME.key`, mode 0600), so that the
/// operator can still read it.
fn keep_key_of_moved_aside(path: &Path, ring: &Keyring) -> anyhow::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.corrupt-", name.to_string_lossy());
    let mut aside: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with(&prefix)
                && !n.ends_with("-wal")
                && !n.ends_with("-shm")
                && !n.ends_with(".key")
        })
        .filter(|p| !key::with_suffix(p, ".key").exists())
        .collect();
    if aside.is_empty() {
        return Ok(());
    }
    aside.sort();
    let Some(loaded) = ring.load()? else {
        return Ok(());
    };
    for store in &aside {
        let kept = key::with_suffix(store, ".key");
        key::write_key_file(&kept, &loaded.key, Some(store))?;
        println!(
            "moved-aside store `{}` keeps the old key: written to `{}`",
            store.display(),
            kept.display()
        );
    }
    Ok(())
}
