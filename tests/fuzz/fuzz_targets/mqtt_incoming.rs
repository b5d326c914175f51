//! libFuzzer target `mqtt_incoming`: hearth's packet reader and publisher reaction on a broker's byte stream; the checks are
//! `checks::mqtt_incoming` (`tests/fuzz/checks.rs`), which `cargo test` also runs
//! on the committed seeds.

#![no_main]

#[allow(dead_code, reason = "each target uses one of the checks")]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::mqtt_incoming(data));
