//! Who runs a CLI command and what they typed, for the audit trail.
//!
//! The user is the process's real uid and its name from the password
//! database; `$SUDO_USER` is added when set, as sudo sets it (it is only the
//! environment's word: a user can set it by hand, which is why the uid
//! comes first). The command line is argv as typed, with every device id
//! given on it replaced by its reference ([`super::pseudonym`]): a serial
//! on a command line is patient data too.

use serde_json::json;

/// The user behind a CLI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub uid: u32,
    /// The uid's name, if the password database has one.
    pub user: Option<String>,
    /// `$SUDO_USER`, when set and not empty.
    pub sudo_user: Option<String>,
}

impl Operator {
    /// The user running this process.
    pub fn current() -> Operator {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        Operator {
            uid,
            user: user_name(uid),
            sudo_user: std::env::var("SUDO_USER").ok().filter(|s| !s.is_empty()),
        }
    }

    /// The entry's actor: `alice (uid 1000)`, `root (uid 0, sudo from
    /// alice)`, or `uid 1234` for a uid without a name.
    pub fn actor(&self) -> String {
        let who = match &self.user {
            Some(name) => format!("{name} (uid {}", self.uid),
            None => format!("uid {} (no name", self.uid),
        };
        match &self.sudo_user {
            Some(by) => format!("{who}, sudo from {by})"),
            None => format!("{who})"),
        }
    }

    /// The facts for an entry's detail: `user`, `uid`, `sudo_user`.
    pub fn detail(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("user".into(), json!(self.user));
        m.insert("uid".into(), json!(self.uid));
        m.insert("sudo_user".into(), json!(self.sudo_user));
        m
    }
}

/// The name of `uid` (getpwuid_r), if it has one.
fn user_name(uid: u32) -> Option<String> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: an all-zero passwd is valid (null pointers, zero ids);
        // getpwuid_r fills it with pointers into `buf`, which outlives
        // every read of them below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, `size` is `buf`'s length.
        let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), size, &mut found) };
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}

/// The command line for the trail: `hearth` and the arguments after it,
/// each argument equal to a device id in `devices` (or `--flag=ID`) given
/// as `<device REF>` instead, arguments with spaces or quotes quoted.
pub fn command_line(args: &[String], devices: &[(&str, &str)]) -> String {
    let hide = |arg: &str| -> String {
        for (device, reference) in devices {
            if device.is_empty() {
                continue;
            }
            if arg == *device {
                return format!("<device {reference}>");
            }
            if let Some((flag, value)) = arg.split_once('=')
                && value == *device
            {
                return format!("{flag}=<device {reference}>");
            }
        }
        arg.to_owned()
    };
    std::iter::once("hearth".to_owned())
        .chain(args.iter().skip(1).map(|a| quote(&hide(a))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `arg` as a shell would need it, for reading back unambiguously.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn a_device_id_on_the_command_line_becomes_its_reference() {
        let line = command_line(
            &args(&[
                "/usr/bin/hearth",
                "readings",
                "list",
                "--device",
                "PM-000001",
                "--config=/etc/hearth/hearth.toml",
            ]),
            &[("PM-000001", "0123456789abcdef")],
        );
        assert_eq!(
            line,
            "hearth readings list --device '<device 0123456789abcdef>' --config=/etc/hearth/hearth.toml"
        );
        let line = command_line(
            &args(&["hearth", "readings", "list", "--device=PM-000001"]),
            &[("PM-000001", "0123456789abcdef")],
        );
        assert!(!line.contains("PM-000001"), "{line}");
        assert!(line.contains("<device 0123456789abcdef>"), "{line}");
    }

    #[test]
    fn arguments_with_spaces_or_quotes_are_quoted() {
        let line = command_line(
            &args(&["hearth", "devices", "reset", "--reason", "it's new", ""]),
            &[],
        );
        assert_eq!(line, r"hearth devices reset --reason 'it'\''s new' ''");
    }

    #[test]
    fn the_actor_names_the_user_and_the_sudo_user() {
        let op = Operator {
            uid: 0,
            user: Some("root".into()),
            sudo_user: Some("alice".into()),
        };
        assert_eq!(op.actor(), "root (uid 0, sudo from alice)");
        let op = Operator {
            uid: 1234,
            user: None,
            sudo_user: None,
        };
        assert_eq!(op.actor(), "uid 1234 (no name)");
    }

    #[test]
    fn this_process_has_a_user_name() {
        // The test runs as a user the password database knows (root in CI).
        let op = Operator::current();
        assert!(op.user.is_some(), "{op:?}");
        // SAFETY: getuid cannot fail.
        assert_eq!(op.uid, unsafe { libc::getuid() });
    }
}
