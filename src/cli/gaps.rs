//! `hearth readings gaps` (in progress).

use clap::Args;

use super::ConfigArg;

#[derive(Debug, Args)]
pub struct GapsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(_args: GapsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hearth readings gaps` is not built yet")
}
