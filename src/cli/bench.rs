//! `watchfire bench`: figures for the runner's own speed.

use std::process::ExitCode;

use clap::Args;

use super::Global;

#[derive(Args)]
pub struct BenchArgs {}

pub fn bench(_global: &Global, _args: BenchArgs) -> miette::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
