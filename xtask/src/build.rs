//! `cargo xtask build`: the eBPF object and the agentd binary that embeds it, release.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{Timer, run_inherit, workspace_root};

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_opts: Options) -> Result<()> {
    let timer = Timer::start();
    // agentd/build.rs builds agentd-ebpf for bpfel-unknown-none with the nightly toolchain
    // and bpf-linker (cargo xtask setup installs both).
    run_inherit(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "agentd",
    ]))?;
    let bin = workspace_root().join("target/release/agentd");
    if !bin.is_file() {
        bail!("cargo reported success but {} is missing", bin.display());
    }
    println!("build: {} ({:.0} s)", bin.display(), timer.secs());
    Ok(())
}
