//! `hearth readings show` (in progress).

use clap::Args;

use super::ConfigArg;

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(_args: ShowArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hearth readings show` is not built yet")
}
