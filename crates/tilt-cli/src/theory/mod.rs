//! `tilt theory …`: the exact core, on a finite reference distribution.

use clap::Subcommand;

/// The theory subcommands.
#[derive(Debug, Subcommand)]
pub enum TheoryCommand {}

/// Run one theory subcommand.
pub fn run(cmd: TheoryCommand) -> anyhow::Result<()> {
    match cmd {}
}
