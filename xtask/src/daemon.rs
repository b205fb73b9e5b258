//! `cargo xtask daemon`: the release agentd daemon in the foreground, with the profiles of
//! this checkout and a development configuration under target/xtask/dev/, so that a fresh
//! machine can run agents without installing anything.

use std::{fs, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::util::{is_root, workspace_root, xtask_target_dir};

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_opts: Options) -> Result<()> {
    if !is_root() {
        bail!(
            "the daemon loads BPF programs and manages cgroups: run `sudo cargo xtask daemon` (or as root)"
        );
    }
    crate::build::run(crate::build::Options {})?;
    let dir = xtask_target_dir().join("dev");
    fs::create_dir_all(&dir)?;
    let config = dir.join("agentd.toml");
    let root = workspace_root();
    fs::write(
        &config,
        format!(
            "# Written by `cargo xtask daemon`.\n[daemon]\nsocket = \"/run/agentd-dev/agentd.sock\"\n\
             launch_socket = \"/run/agentd-dev/launch.sock\"\nadmin_group = \"root\"\n\
             [agents]\nprofiles_dir = \"{}\"\nuser = \"nobody\"\ntmp_dir = \"/tmp/agentd-dev\"\n\
             [audit]\npath = \"{}\"\n",
            root.join("profiles").display(),
            dir.join("audit.jsonl").display()
        ),
    )?;
    let agentd = root.join("target/release/agentd");
    println!(
        "daemon: starting {} with {}",
        agentd.display(),
        config.display()
    );
    println!("daemon: in another terminal, as root:");
    println!(
        "daemon:   {} --config {} run --verbose -- /bin/sh -c 'id; grep -E \"^(Cap|Seccomp|NoNewPrivs)\" /proc/self/status'",
        agentd.display(),
        config.display()
    );
    println!(
        "daemon:   {} --config {} ps",
        agentd.display(),
        config.display()
    );
    println!("daemon: stop it with Ctrl-C (every agent is killed)");
    let err = Command::new(&agentd)
        .arg("--config")
        .arg(&config)
        .arg("daemon")
        .exec();
    Err(err).context("starting the daemon")
}
