//! `hearth demo` (placeholder until the demo lands).

use std::time::Duration;

pub fn run(_count: u64, _interval: Duration) -> anyhow::Result<()> {
    anyhow::bail!("the demo is not built yet")
}
