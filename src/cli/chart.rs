//! `hearth readings chart` (in progress).

use clap::Args;

use super::ConfigArg;

#[derive(Debug, Args)]
pub struct ChartArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(_args: ChartArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hearth readings chart` is not built yet")
}
