//! `hearth readings stats` (in progress).

use clap::Args;

use super::ConfigArg;

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(_args: StatsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hearth readings stats` is not built yet")
}
