//! Bad configuration: each missing or invalid setting stops `hearth run`
//! (and `hearth config check`) with one line naming it, and exit code 2.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hearth::certs::DevCerts;

use crate::harness::hearth;
use crate::support::TestDir;

struct Setup {
    dir: TestDir,
    certs: DevCerts,
    serial: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = TestDir::new();
        let certs = DevCerts::generate(&dir.subdir("certs"), "gw-cfg").unwrap();
        // Any existing file stands in for the serial port here.
        let serial = dir.join("ttyFAKE");
        std::fs::write(&serial, "").unwrap();
        Setup { dir, certs, serial }
    }

    fn good(&self) -> String {
        format!(
            r#"gateway_id = "gw-cfg"
[serial]
port = "{serial}"
baud_rate = 115200
[store]
path = "{db}"
[mqtt]
host = "127.0.0.1"
port = 8883
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
topic_prefix = "hearth/v1"
"#,
            serial = self.serial.display(),
            db = self.dir.join("cfg.db").display(),
            ca = self.certs.ca_cert.display(),
            cert = self.certs.gateway_cert.display(),
            key = self.certs.gateway_key.display(),
        )
    }

    fn write(&self, text: &str) -> PathBuf {
        let path = self.dir.join("hearth.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Runs `args` with `--config path` and checks the one-line error.
#[track_caller]
fn rejects(path: &Path, args: &[&str], needles: &[&str]) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", path.to_str().unwrap()]);
    let (code, out, err) = hearth(&all);
    assert_eq!(
        code, 2,
        "`hearth {all:?}` should exit 2; stdout {out:?} stderr {err:?}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    for n in needles {
        assert!(lines[0].contains(n), "`{}` lacks `{n}`", lines[0]);
    }
}

#[test]
fn good_config_passes_the_check() {
    let s = Setup::new();
    let path = s.write(&s.good());
    let (code, out, err) = hearth(&["config", "check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is valid"), "{out}");
}

#[test]
fn each_bad_setting_is_named_in_one_line_with_exit_code_2() {
    let s = Setup::new();
    let good = s.good();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            good.replace(
                "baud_rate = 115200",
                "baud_rate = 115200\nparity = \"none\"",
            ),
            vec!["serial.parity"],
        ),
        (
            good.replace("gateway_id = \"gw-cfg\"\n", ""),
            vec!["gateway_id"],
        ),
        (
            good.replace("\"gw-cfg\"", "\"gw cfg/1\""),
            vec!["gateway_id"],
        ),
        (
            good.replace("port = 8883", "port = \"eighty\""),
            vec!["mqtt.port", "line 9"],
        ),
        (
            good.replace("host = \"127.0.0.1\"", "host = \"\""),
            vec!["mqtt.host"],
        ),
        (
            good.replace("hearth/v1", "hearth/#"),
            vec!["mqtt.topic_prefix"],
        ),
        (
            format!("{good}keep_alive_secs = 1\n"),
            vec!["mqtt.keep_alive_secs"],
        ),
        (
            format!("{good}max_inflight = 1\n"),
            vec!["mqtt.max_inflight"],
        ),
        (
            format!("{good}batch_max_readings = 0\n"),
            vec!["mqtt.batch_max_readings"],
        ),
        (
            good.replace(
                &s.certs.ca_cert.display().to_string(),
                "/nonexistent/ca.crt",
            ),
            vec!["mqtt.ca_file", "/nonexistent/ca.crt"],
        ),
        (
            good.replace(
                &s.certs.ca_cert.display().to_string(),
                &s.serial.display().to_string(),
            ),
            vec!["mqtt.ca_file"],
        ),
        (
            good.replace(
                &s.certs.gateway_cert.display().to_string(),
                &s.certs.hospital_cert.display().to_string(),
            ),
            vec!["mqtt.cert_file"],
        ),
        (
            good.replace(
                &s.dir.join("cfg.db").display().to_string(),
                "/nonexistent/dir/h.db",
            ),
            vec!["store.path"],
        ),
        (
            good.replace("[store]", "[store]\nmax_size_mb = 0.01"),
            vec!["store.max_size_mb"],
        ),
        (
            good.replace("port = \"", "port = \"\"\nx = \""),
            vec!["serial.x"],
        ),
        ("gateway_id = [".to_string(), vec!["gateway_id", "line 1"]),
    ];
    for (text, needles) in cases {
        let path = s.write(&text);
        for cmd in [&["run"][..], &["config", "check"][..]] {
            rejects(&path, cmd, &needles);
        }
    }
}

#[test]
fn a_key_readable_by_others_is_refused() {
    let s = Setup::new();
    std::fs::set_permissions(&s.certs.gateway_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = s.write(&s.good());
    rejects(&path, &["run"], &["mqtt.key_file", "chmod 600"]);
}

#[test]
fn a_missing_config_file_is_named() {
    let s = Setup::new();
    let path = s.dir.join("absent.toml");
    rejects(&path, &["run"], &["absent.toml", "--config"]);
}

#[test]
fn config_check_names_a_missing_serial_port_but_run_waits_for_it() {
    let s = Setup::new();
    let text = s
        .good()
        .replace(&s.serial.display().to_string(), "/dev/ttyNOPE9");
    let path = s.write(&text);
    rejects(
        &path,
        &["config", "check"],
        &["serial.port", "/dev/ttyNOPE9"],
    );
}

#[test]
fn config_default_is_a_valid_commented_template() {
    let (code, out, _) = hearth(&["config", "default"]);
    assert_eq!(code, 0);
    assert!(out.lines().filter(|l| l.starts_with('#')).count() > 20);
    hearth::config::Config::parse(&out, Path::new("default")).expect("default parses");
}
