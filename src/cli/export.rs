//! `hearth readings export` (in progress).

use clap::Args;

use super::ConfigArg;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(_args: ExportArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hearth readings export` is not built yet")
}
