//! A restarted daemon adopts the agents of the one before it.
//!
//! While an agent runs, the daemon keeps a record of it (`<socket dir>/agents/<name>.json`,
//! root only): who it runs as, its profile, the policy in force and its id in the kernel
//! maps. The kernel side needs no record: the maps and links are pinned under bpffs
//! ([`crate::ebpf::Pins`]), so when the daemon dies the agents stay contained by the same
//! policy. A daemon that starts and finds agents in its agent root:
//!
//! 1. checks that every one of them has a record for its very cgroup (same name and cgroup
//!    id), else refuses to start and changes nothing (the agents stay contained by the
//!    pins; `agentd kill --all --direct` ends them);
//! 2. loads its programs on the pinned maps (after checking their layout is this build's),
//!    gives each pinned cgroup link the new program in one step and replaces each BPF LSM
//!    link by attaching the new one first (no moment without enforcement);
//! 3. removes kernel entries of agents that are gone, then for each agent: takes its
//!    resolver address again, writes its policy under a fresh policy id (the DNS addresses
//!    it had learned are dropped: it resolves them again), thaws it if a throttle had
//!    frozen it, and watches its first process (a pidfd): when that ends, the agent ends,
//!    as it does under the daemon that started it.
//!
//! What cannot be adopted: a `processes` budget with `deny` answered by the old daemon's
//! seccomp notifier (where BPF LSM does not work): that filter's listener died with it, so
//! the agent's process creations fail (ENOSYS) from then on: it fails closed. The `run`
//! client of an adopted agent has lost its daemon and exits; the agent's output still goes
//! where it went.

use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering::SeqCst},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{
    Daemon, Locked as _,
    agents::{self, AgentState, Live},
    dns,
};
use crate::{
    cgroup::CgroupDir,
    config::Config,
    launcher::Identity,
    policy::{Adjustments, Policy},
    profile::Placeholders,
    protocol::ProfileSpec,
};

/// What a restarted daemon needs to know of a running agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// Its cgroup id.
    pub id: u64,
    pub identity: Identity,
    pub parent: Option<String>,
    pub parent_id: Option<u64>,
    pub workdir: PathBuf,
    pub tmp: PathBuf,
    pub started: u64,
    /// Its first process (0 until it is spawned).
    pub pid: u32,
    pub dns_addr: Ipv4Addr,
    pub spec: ProfileSpec,
    pub adjustments: Adjustments,
    pub placeholders: Placeholders,
    pub requested: Policy,
    pub policy: Policy,
    pub policy_id: u64,
    pub killed: bool,
    pub held: bool,
    /// Its cgroup directory (under the agent root of the daemon that wrote the record).
    #[serde(default)]
    pub cgroup: PathBuf,
    /// Restricted by Landlock at launch.
    #[serde(default)]
    pub landlocked: bool,
}

/// Where the records are kept.
pub fn records_dir(config: &Config) -> PathBuf {
    config
        .socket
        .parent()
        .unwrap_or(Path::new("/run/agentd"))
        .join("agents")
}

fn record_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Creates the records directory (root only).
pub fn prepare_dir(config: &Config) -> Result<PathBuf> {
    let dir = records_dir(config);
    if !dir.is_dir() {
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // Only the records directory itself is root's alone (not the socket directory).
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    Ok(dir)
}

/// Writes (replaces in one rename) the record of `agent`. A failure is logged: the agent
/// runs on, but a daemon restarted after this one would not adopt it.
pub fn save(daemon: &Daemon, agent: &AgentState, live: &Live) {
    let record = Record {
        name: agent.name.clone(),
        id: agent.id,
        identity: agent.identity.clone(),
        parent: agent.parent.clone(),
        parent_id: agent.parent_id,
        workdir: agent.workdir.clone(),
        tmp: agent.tmp.clone(),
        started: agent.started,
        pid: *agent.pid.locked(),
        dns_addr: agent.dns_addr,
        spec: live.spec.clone(),
        adjustments: live.adjustments.clone(),
        placeholders: live.placeholders.clone(),
        requested: live.requested.clone(),
        policy: live.policy.clone(),
        policy_id: live.policy_id,
        killed: agent.killed.load(SeqCst),
        held: agent.held.load(SeqCst),
        cgroup: agent.cgroup_path.clone(),
        landlocked: agent.landlocked,
    };
    let dir = records_dir(&daemon.config);
    let path = record_path(&dir, &agent.name);
    let tmp = dir.join(format!(".{}.json.new", agent.name));
    let written = serde_json::to_vec(&record)
        .map_err(anyhow::Error::from)
        .and_then(|text| fs::write(&tmp, text).map_err(anyhow::Error::from))
        .and_then(|()| fs::rename(&tmp, &path).map_err(anyhow::Error::from));
    if let Err(e) = written {
        eprintln!(
            "agentd: agent {}: writing its record {}: {e:#} (a restarted daemon will not adopt it)",
            agent.name,
            path.display()
        );
    }
}

/// Who the agent named `name` is, from its record (for `agentd kill --direct`, which has
/// no daemon to ask).
pub fn recorded_subject(config: &Config, name: &str) -> crate::audit::Subject {
    let record: Option<Record> = fs::read(record_path(&records_dir(config), name))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok());
    crate::audit::Subject {
        agent: Some(name.to_string()),
        profile: record.as_ref().map(|r| r.policy.profile.clone()),
        version: record.map(|r| r.policy.version.to_string()),
    }
}

/// Forgets the record of an agent that ended.
pub fn remove(daemon: &Daemon, name: &str) {
    let _ = fs::remove_file(record_path(&records_dir(&daemon.config), name));
}

/// The agents a starting daemon will adopt: one record for each cgroup below the agent
/// root (`leftovers`). Refuses, changing nothing, when a cgroup has no record of its own;
/// removes records of agents whose cgroup is gone.
pub fn plan(config: &Config, root: &Path, leftovers: &[String]) -> Result<Vec<Record>> {
    let dir = records_dir(config);
    let mut records = Vec::new();
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let record: Record = serde_json::from_slice(&text).with_context(|| {
                format!(
                    "{}: not a record this agentd can read; move it away, or end the agents with \
                     `agentd kill --all --direct`",
                    path.display()
                )
            })?;
            records.push((path, record));
        }
    }
    let mut unknown = Vec::new();
    let mut adopted = Vec::new();
    for name in leftovers {
        let cgroup = root.join(name);
        let id = crate::cgroup::cgroup_id(&cgroup)?;
        match records
            .iter()
            .position(|(_, r)| r.name == *name && r.id == id)
        {
            Some(i) => adopted.push(records.swap_remove(i).1),
            // Empty and without a record (a daemon died between creating it and recording
            // the agent): nothing runs there, it goes.
            None if !fs::read_to_string(cgroup.join("cgroup.events"))
                .is_ok_and(|t| t.contains("populated 1"))
                && fs::remove_dir(&cgroup).is_ok() =>
            {
                eprintln!(
                    "agentd: removed the empty cgroup {} (no record)",
                    cgroup.display()
                );
            }
            None => unknown.push(name.clone()),
        }
    }
    if !unknown.is_empty() {
        bail!(
            "the agent root {} holds agents this daemon has no record of ({}) in {}; they are still \
             contained by the pinned programs, but cannot be adopted: end them with \
             `agentd kill --all --direct` (or `echo 1 > {}/cgroup.kill` and remove their directories) \
             before starting the daemon",
            root.display(),
            unknown.join(", "),
            dir.display(),
            root.display()
        );
    }
    // A record whose cgroup still exists elsewhere: an earlier daemon ran with another
    // agent root (a changed cgroup_root, or systemd's root after a manual start). Its
    // agents still run, contained by the pins this daemon would otherwise remove.
    let elsewhere: Vec<&Record> = records
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.cgroup.is_dir() && !r.cgroup.starts_with(root))
        .collect();
    if let Some(r) = elsewhere.first() {
        bail!(
            "agent {} of an earlier daemon still runs under another agent root ({}); this daemon's \
             root is {}: start it with that cgroup_root to adopt the agents, or end them with \
             `agentd kill --all --direct` (it finds them by the record {}) first",
            r.name,
            r.cgroup.parent().unwrap_or(Path::new("?")).display(),
            root.display(),
            dir.display()
        );
    }
    for (path, r) in records {
        eprintln!(
            "agentd: agent {} ended while no daemon ran: removing its record",
            r.name
        );
        let _ = fs::remove_file(path);
    }
    Ok(adopted)
}

/// Removes the kernel entries of agents and policies that are not adopted, and makes the
/// policy ids handed out from now on greater than any in the maps.
pub fn sweep(daemon: &Daemon, records: &[Record]) -> Result<()> {
    let keep: BTreeSet<u64> = records.iter().map(|r| r.id).collect();
    let kept_policies: BTreeSet<u64> = records.iter().map(|r| r.policy_id).collect();
    let mut kernel = daemon.kernel.locked();
    for (id, _) in crate::agent::all(&mut kernel)? {
        if !keep.contains(&id) && id != agentd_common::budgets::HOST {
            crate::agent::unregister(&mut kernel, id)?;
            crate::budgets::clear(&mut kernel, id)?;
        }
    }
    let keep_ids: Vec<u64> = keep.iter().copied().collect();
    crate::process::clear_syscalls(&mut kernel, None, &keep_ids)?;
    let mut policies = crate::network::policies(&mut kernel)?;
    policies.extend(crate::files::policies(&mut kernel)?);
    let highest = policies
        .iter()
        .chain(&kept_policies)
        .max()
        .copied()
        .unwrap_or(0);
    daemon.policy_ids.fetch_max(highest + 1, SeqCst);
    for p in policies.difference(&kept_policies) {
        crate::network::clear(&mut kernel, *p)?;
        crate::files::clear(&mut kernel, *p)?;
    }
    Ok(())
}

/// Adopts each agent; one that cannot be adopted is killed (fail closed), with a log line.
pub fn adopt(daemon: &Arc<Daemon>, records: Vec<Record>) {
    for r in records {
        let name = r.name.clone();
        match adopt_one(daemon, r) {
            Ok(state) => {
                daemon.audit_agent(
                    &state,
                    "agent_adopted",
                    serde_json::json!({"pid": *state.pid.locked()}),
                );
                eprintln!(
                    "agentd: adopted agent {name} (cgroup {}, first process {})",
                    state.id,
                    *state.pid.locked()
                );
                watch(daemon.clone(), state);
            }
            Err(e) => {
                eprintln!("agentd: agent {name}: cannot adopt it ({e:#}): killing it");
                if let Some(a) = daemon.agent(&name) {
                    agents::teardown(daemon, &a);
                } else {
                    let path = daemon.root_path.join(&name);
                    if let Ok(c) = CgroupDir::adopt(&path) {
                        let _ = c.kill_all(std::time::Duration::from_secs(10));
                        let _ = c.remove();
                    }
                    remove(daemon, &name);
                }
            }
        }
    }
    agents::budget_hook(daemon);
    agents::reporter(daemon);
}

fn adopt_one(daemon: &Arc<Daemon>, r: Record) -> Result<Arc<AgentState>> {
    let slot = dns::Slot::claim(daemon, r.dns_addr)?;
    let sockets = dns::bind(r.dns_addr, daemon.config.dns_port)?;
    let cgroup = CgroupDir::adopt(&daemon.root_path.join(&r.name))?;
    let frozen =
        fs::read_to_string(cgroup.path().join("cgroup.freeze")).is_ok_and(|t| t.trim() == "1");
    let state = AgentState {
        name: r.name,
        id: r.id,
        identity: r.identity,
        parent: r.parent,
        parent_id: r.parent_id,
        workdir: r.workdir,
        tmp: r.tmp,
        started: r.started,
        pid: Mutex::new(r.pid),
        dns_addr: r.dns_addr,
        live: Mutex::new(agents::empty_live()),
        cgroup_path: cgroup.path().to_path_buf(),
        cgroup: Mutex::new(Some(cgroup)),
        throttled: false.into(),
        teardown_lock: Mutex::new(()),
        killed: r.killed.into(),
        held: r.held.into(),
        exhaustions: 0.into(),
        notifier: Mutex::new(None),
        process_gate: Mutex::new(None),
        resolver: Mutex::new(None),
        adopted: true,
        landlocked: r.landlocked,
        killed_by: Mutex::new(r.killed.then(|| "kill switch".to_string())),
        explained: Mutex::new(Default::default()),
    };
    let mut live = Live {
        spec: r.spec,
        adjustments: r.adjustments,
        placeholders: r.placeholders,
        requested: r.requested,
        policy: r.policy,
        policy_id: r.policy_id,
        learned: Default::default(),
    };
    // What this daemon's configuration protects (its audit log may be elsewhere).
    agents::protect(daemon, &state.name, &mut live.policy);
    // Under a fresh policy id: the rules of the old one, with its learned addresses, go.
    agents::sync_kernel(daemon, &state, &mut live, true)?;
    *state.live.locked() = live;
    let state = Arc::new(state);
    daemon
        .agents
        .locked()
        .insert(state.name.clone(), state.clone());
    *state.resolver.locked() = Some(dns::start(daemon.clone(), state.clone(), sockets, slot));
    if frozen {
        // Frozen by the kill switch (perhaps `--direct`, which the record does not know
        // of) or by a throttle whose thaw died with the old daemon: it stays frozen until
        // an operator says otherwise.
        state.held.store(true, SeqCst);
        eprintln!(
            "agentd: agent {} is frozen; `agentd thaw {}` lets it run, `agentd kill {}` ends it",
            state.name, state.name, state.name
        );
    }
    Ok(state)
}

/// A pidfd for `pid` if it is still a process of the agent whose cgroup is `rel` (as
/// /proc/PID/cgroup shows it): taken before the check, so the check is about the process
/// the pidfd refers to.
fn pidfd_in(pid: u32, rel: &Path) -> Option<OwnedFd> {
    if pid == 0 {
        return None;
    }
    // SAFETY: pidfd_open with no flags; a new descriptor on success.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel returned a new file descriptor that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let own = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    (Path::new(own.trim_start_matches('/')) == rel).then_some(fd)
}

/// Ends an adopted agent when its first process ends (at once if it already has; when
/// its last process ends if the record did not get to name the first).
fn watch(daemon: Arc<Daemon>, state: Arc<AgentState>) {
    let rel = daemon.root_rel().join(&state.name);
    let pidfd = pidfd_in(*state.pid.locked(), &rel);
    if state.killed.load(SeqCst) {
        // The kill switch was thrown for it before the old daemon died: finish the job.
        let names = vec![state.name.clone()];
        tokio::task::spawn_blocking(move || {
            agents::kill_switch(&daemon, &names, false, crate::kill::Action::Kill)
        });
        return;
    }
    let unknown = *state.pid.locked() == 0;
    tokio::spawn(async move {
        if unknown {
            // Killed between its spawn and the record of its first process: it ends when
            // its last process does.
            let events = state.cgroup_path.join("cgroup.events");
            while fs::read_to_string(&events).is_ok_and(|t| t.contains("populated 1")) {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        // SAFETY: the AsyncFd owns the pidfd, which nothing else closes.
        if let Some(fd) = pidfd
            && let Ok(fd) = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
        {
            let _ = fd.readable().await;
        }
        let _ = tokio::task::spawn_blocking(move || agents::teardown(&daemon, &state)).await;
    });
}
