//! libFuzzer target `frame_decoder`: the serial frame decoder on a device's byte stream; the checks are
//! `checks::frame_decoder` (`tests/fuzz/checks.rs`), which `cargo test` also runs
//! on the committed seeds.

#![no_main]

#[allow(dead_code, reason = "each target uses one of the checks")]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::frame_decoder(data));
