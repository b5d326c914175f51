//! `hearth readings tail` (in progress).

use clap::Args;

use super::ConfigArg;

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(_args: TailArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hearth readings tail` is not built yet")
}
