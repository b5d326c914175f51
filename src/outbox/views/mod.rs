//! Read-only views of the store for the CLI (`hearth readings ...`): each
//! runs on a connection from [`super::Store::open_read_only`], in short
//! reads, so that it never holds the running gateway back. Each query is
//! served by an index; `tests/cli_speed.rs` checks the plans.

pub mod journey;
pub mod series;
pub mod stream;
pub mod summary;
