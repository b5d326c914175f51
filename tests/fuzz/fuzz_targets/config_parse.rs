//! libFuzzer target `config_parse`: the config parser on a config file's bytes; the checks are
//! `checks::config_parse` (`tests/fuzz/checks.rs`), which `cargo test` also runs
//! on the committed seeds.

#![no_main]

#[allow(dead_code, reason = "each target uses one of the checks")]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config_parse(data));
