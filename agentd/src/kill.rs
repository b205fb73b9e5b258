//! The kill switch: stop agents by their cgroups, through the daemon or without it.
//!
//! Everything here acts on cgroup v2 files only (`cgroup.kill`, `cgroup.freeze`,
//! `cgroup.events`), so it needs nothing from the agents and, on the `--direct` path,
//! nothing from the daemon: root writes `cgroup.kill` and the kernel sends SIGKILL to every
//! task of the cgroup and its descendants, including those forking at that moment (a fork
//! into a cgroup being killed fails). The daemon's path also sets the agent's kill flag in
//! the kernel's `AGENTS` map first (every connect, datagram and packet of the agent is
//! refused from then on, and `sys_enter`, where attached, kills any task of it that makes
//! a system call), and then forgets the agent.
//!
//! The daemon writes the path of its agent root to `<socket dir>/agent-root` when it
//! starts, so that `--direct` finds the agents however the root was chosen.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{cgroup::CgroupDir, config::Config};

/// What to do with an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Kill every process and remove the agent.
    Kill,
    /// Freeze every process (cgroup.freeze) for inspection.
    Freeze,
    /// Let a frozen agent run again.
    Thaw,
}

impl Action {
    /// As in the audit log and the metrics' labels.
    pub fn name(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Freeze => "freeze",
            Action::Thaw => "thaw",
        }
    }

    pub fn past(self) -> &'static str {
        match self {
            Action::Kill => "killed",
            Action::Freeze => "frozen",
            Action::Thaw => "thawed",
        }
    }
}

/// What happened to one agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub agent: String,
    pub action: Action,
    /// Processes in the agent when it was acted on.
    pub processes: usize,
    /// From the start (before the kill flag was set) until the cgroup was empty (kill) or
    /// frozen/thawed.
    pub millis: f64,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Outcome {
    /// Adds `note` to the outcome's error (the action may have worked: it says what did not).
    pub fn note(&mut self, note: &str) {
        self.error = Some(match self.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note.to_string(),
        });
    }
}

/// How long a kill or freeze may take before it is reported as failed.
pub const TIMEOUT: Duration = Duration::from_secs(30);

fn events_have(cgroup: &Path, line: &str) -> Result<bool> {
    let events = cgroup.join("cgroup.events");
    let text =
        fs::read_to_string(&events).with_context(|| format!("reading {}", events.display()))?;
    Ok(text.lines().any(|l| l.trim() == line))
}

/// Writes `value` to `cgroup/file` and waits until `cgroup.events` has `done`.
fn write_and_wait(cgroup: &Path, file: &str, value: &str, done: &str) -> Result<()> {
    let start = Instant::now();
    let path = cgroup.join(file);
    if let Err(e) = fs::write(&path, value) {
        if done == "populated 0" && !cgroup.exists() {
            // Gone already: nothing left to kill.
            return Ok(());
        }
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    loop {
        match events_have(cgroup, done) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // Killed and already removed (the daemon tears an agent down once its first
            // process is gone): empty.
            Err(_) if done == "populated 0" && !cgroup.exists() => return Ok(()),
            Err(e) => return Err(e),
        }
        if start.elapsed() > TIMEOUT {
            bail!(
                "{} has no `{done}` {TIMEOUT:?} after writing {file}",
                cgroup.display()
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Processes in the agent cgroup `dir` and below it.
pub fn count(dir: &Path) -> usize {
    CgroupDir::adopt(dir)
        .and_then(|d| {
            let n = d.all_processes();
            d.release();
            n
        })
        .map(|p| p.len())
        .unwrap_or(0)
}

/// Acts on the agent cgroup `dir` (named `agent`, holding `processes` when the action
/// began at `start`): kill (and wait until it is empty), freeze or thaw (and wait until
/// it is). Never removes anything.
pub fn act(agent: &str, dir: &Path, action: Action, processes: usize, start: Instant) -> Outcome {
    let done = match action {
        Action::Kill => write_and_wait(dir, "cgroup.kill", "1", "populated 0"),
        Action::Freeze => write_and_wait(dir, "cgroup.freeze", "1", "frozen 1"),
        Action::Thaw => write_and_wait(dir, "cgroup.freeze", "0", "frozen 0"),
    };
    Outcome {
        agent: agent.to_string(),
        action,
        processes,
        millis: start.elapsed().as_secs_f64() * 1000.0,
        error: done.err().map(|e| format!("{e:#}")),
    }
}

/// Where the daemon records its agent root (next to its control socket).
pub fn root_record(config: &Config) -> PathBuf {
    config
        .socket
        .parent()
        .unwrap_or(Path::new("/run/agentd"))
        .join("agent-root")
}

/// The agent root a `--direct` kill acts on: what the daemon recorded, else the configured
/// one, else the automatic ones (outside and inside systemd).
pub fn find_root(config: &Config) -> Result<PathBuf> {
    if let Ok(text) = fs::read_to_string(root_record(config)) {
        let p = PathBuf::from(text.trim());
        if p.is_dir() {
            return Ok(p);
        }
    }
    if let Some(p) = &config.cgroup_root {
        return Ok(p.clone());
    }
    let mount = crate::cgroup::cgroup2_mount()?;
    let candidates = [
        mount.mount_point.join("agentd"),
        mount.mount_point.join("system.slice/agentd.service/agents"),
    ];
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .with_context(|| {
            format!(
                "no agent root found ({} not written by a daemon; none of {} exists)",
                root_record(config).display(),
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The kill switch without the daemon: acts on the agent cgroups below `root` (the named
/// ones, or all), and removes those it killed. Unknown names are reported as errors.
pub fn direct(root: &Path, names: &[String], all: bool, action: Action) -> Result<Vec<Outcome>> {
    let dir = CgroupDir::adopt(root)?;
    let present = dir.children();
    dir.release();
    let present = present?;
    let wanted: Vec<String> = if all { present.clone() } else { names.to_vec() };
    let mut out = Vec::new();
    for name in wanted {
        if !present.contains(&name) || !crate::profile::valid_name(&name) {
            out.push(Outcome {
                agent: name.clone(),
                action,
                processes: 0,
                millis: 0.0,
                error: Some(format!("no agent cgroup {}/{name}", root.display())),
            });
            continue;
        }
        let path = root.join(&name);
        let mut o = act(&name, &path, action, count(&path), Instant::now());
        if action == Action::Kill && o.error.is_none() {
            // Empty now: remove it (and any sub-cgroups the agent made), so that a daemon
            // started later does not find leftovers.
            // (A running daemon may have removed it first: then it is gone, as wanted.)
            if let Err(e) = CgroupDir::adopt(&path).and_then(CgroupDir::remove)
                && path.exists()
            {
                o.error = Some(format!("killed, but removing {}: {e:#}", path.display()));
            }
        }
        out.push(o);
    }
    Ok(out)
}

/// Writes what `--direct` did to the audit log, synced, before the command reports it; a
/// failure to write is added to the outcome's error. (The log's lock keeps the chain whole
/// when a daemon writes too.)
pub fn audit_direct(config: &Config, outcomes: &mut [Outcome]) {
    let mut log = match crate::audit::AuditLog::open(
        &config.audit_path,
        config.audit_max_bytes,
        config.audit_keep,
    ) {
        Ok(l) => Some(l),
        Err(e) => {
            let note = format!(
                "not written to the audit log {}: {e:#}",
                config.audit_path.display()
            );
            for o in outcomes.iter_mut() {
                o.note(&note);
            }
            None
        }
    };
    let Some(log) = log.as_mut() else {
        return;
    };
    for o in outcomes.iter_mut() {
        let subject = crate::daemon::adopt::recorded_subject(config, &o.agent);
        let mut details = serde_json::to_value(&*o).unwrap_or_default();
        details["direct"] = serde_json::Value::Bool(true);
        match log.append_or_leave(&subject, o.action.name(), details) {
            Ok(false) => {}
            Ok(true) => eprintln!(
                "agentd: the audit log is locked by another writer (a stopped daemon?): the record of {} \
                 is on disk in {} and joins the chain with the next record written",
                o.agent,
                log.pending_path().display()
            ),
            Err(e) => {
                let note = format!("not written to the audit log: {e:#}");
                o.note(&note);
            }
        }
    }
}

/// One line per outcome, for people.
pub fn describe(o: &Outcome) -> String {
    match &o.error {
        None => format!(
            "{} {}: {} process{} in {:.1} ms",
            o.action.past(),
            o.agent,
            o.processes,
            if o.processes == 1 { "" } else { "es" },
            o.millis
        ),
        Some(e) => format!("{}: not {}: {e}", o.agent, o.action.past()),
    }
}
