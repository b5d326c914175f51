//! `hearth run --log-format json`: one JSON object a line on stderr, and no
//! patient data (implant serials, values) above DEBUG. The journald side is
//! checked under a real systemd in tests/system/.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{GatewayOpts, Rig, Sim};
use crate::support::{self, hearth_bin};

#[test]
fn json_log_lines_carry_level_target_and_fields_but_no_patient_data() {
    let rig = Rig::new("gw-json");
    let serial = "SN-JSONLOG-4711";
    let sim = Sim::start(&[
        "--count",
        "30",
        "--interval-ms",
        "10",
        "--device-id",
        serial,
    ]);
    let config = rig.config(&GatewayOpts::new("gw-json"), &sim.pty);
    // The level the package ships (the harness's default adds debug).
    let text = std::fs::read_to_string(&config).unwrap().replace(
        r#"log_level = "info,hearth=debug""#,
        r#"log_level = "info""#,
    );
    std::fs::write(&config, text).unwrap();
    let log = rig.dir.join("json.log");
    let mut child = Command::new(hearth_bin())
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn hearth run");
    sim.finish(Duration::from_secs(60));
    // Every reading was ACKed, so stored; wait for the broker link too.
    support::wait_for(Duration::from_secs(20), "the broker link logged", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("Connected to broker.")
            .then_some(())
    });
    support::sigterm(child.id());
    assert!(child.wait().unwrap().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "too few lines:\n{text}");
    for line in &lines {
        let level = line["level"].as_str().unwrap_or_default();
        assert!(
            ["ERROR", "WARN", "INFO"].contains(&level),
            "level `{level}` at log_level info: {line}"
        );
        assert!(line["target"].is_string(), "no target: {line}");
        assert!(line["fields"]["message"].is_string(), "no message: {line}");
        assert!(line["timestamp"].is_string(), "no timestamp: {line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "Gateway running."),
        "{text}"
    );
    assert!(
        !text.contains(serial),
        "the implant's serial appears above DEBUG:\n{text}"
    );
}
