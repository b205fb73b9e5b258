//! Agents in the daemon: preparing a launch, keeping the kernel in step with each agent's
//! policy, changing it while the agent runs, tearing an agent down.
//!
//! Order of a launch, so that no instruction of the agent runs unconfined and nothing is
//! left behind on failure: validate everything (profile, flags, user, name, workdir) →
//! create the agent's cgroup, private tmp and resolver sockets → write its rules under a
//! fresh policy id and register it in the kernel maps → spawn (the child joins the cgroup
//! before anything else) → report `started`. Teardown reverses it: kill whatever is left
//! in the cgroup, wait until it is empty, remove the kernel entries, remove the cgroup and
//! the tmp directory.
//!
//! A policy change (`agentd update`) writes the new rules under a fresh policy id, then
//! switches the agent's `AGENTS` entry to it in one map update, then removes the old
//! rules: a program sees the whole old policy or the whole new one. Agents launched from
//! inside the changed agent are narrowed again by its new policy.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr},
    os::{
        fd::OwnedFd,
        unix::fs::{DirBuilderExt as _, MetadataExt as _, chown},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agentd_common::{
    agent::{AGENT_FLAG_AUDIT, AGENT_FLAG_BUDGETS, AGENT_FLAG_KILLED, AgentEntry},
    files::ACCESS_WRITE,
};
use anyhow::Result;
use ipnet::IpNet;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, BufReader},
    net::UnixStream,
};

use super::{Daemon, Locked as _, dns, peer::Peer, send};
use crate::{
    agent,
    cgroup::CgroupDir,
    files,
    launcher::{self, Identity, Plan},
    network::{self, Allowlist},
    policy::{Adjustments, Policy},
    profile::{self, Mode, NetRule, Placeholders, Ports, valid_name},
    protocol::{
        AgentInfo, EXIT_AGENTD, EXIT_POLICY, ProfileSpec, Reply, RunControl, RunRequest,
        UpdateRequest,
    },
    seccomp,
};

/// An address learned from a DNS answer, allowed until `expires`.
#[derive(Debug, Clone)]
pub struct LearnedAddr {
    pub ports: BTreeSet<Ports>,
    pub expires: Instant,
}

/// The part of an agent that changes while it runs.
pub struct Live {
    /// How its profile was named (to read it again on update).
    pub spec: ProfileSpec,
    pub adjustments: Adjustments,
    pub placeholders: Placeholders,
    /// The policy asked for, before intersection with the parent's.
    pub requested: Policy,
    /// The policy in force.
    pub policy: Policy,
    /// Key prefix of its rules in the kernel maps.
    pub policy_id: u64,
    /// Addresses its resolver answered with.
    pub learned: BTreeMap<IpAddr, LearnedAddr>,
}

/// A running agent.
pub struct AgentState {
    pub name: String,
    pub id: u64,
    pub identity: Identity,
    /// The agent it was launched from: name (for display) and cgroup id (what links them:
    /// names are reused, cgroup ids are not).
    pub parent: Option<String>,
    pub parent_id: Option<u64>,
    pub workdir: PathBuf,
    pub tmp: PathBuf,
    pub started: u64,
    pub pid: Mutex<u32>,
    /// The agent's own resolver address (127.53.x.y).
    pub dns_addr: Ipv4Addr,
    pub live: Mutex<Live>,
    /// Taken by teardown.
    pub(super) cgroup: Mutex<Option<CgroupDir>>,
    pub(super) cgroup_path: PathBuf,
    /// A throttle (freeze until a budget refills) is under way.
    pub(super) throttled: std::sync::atomic::AtomicBool,
    /// Held for the whole of a teardown: a second caller returns only once it is done.
    pub(super) teardown_lock: Mutex<()>,
    /// The kill switch was thrown: the kernel entry carries AGENT_FLAG_KILLED.
    pub(super) killed: std::sync::atomic::AtomicBool,
    /// Frozen by the kill switch (`--freeze`): a throttle's thaw leaves it frozen.
    pub(super) held: std::sync::atomic::AtomicBool,
    /// Budget exhaustion events so far (for the breaker's `exhaustions`).
    pub(super) exhaustions: std::sync::atomic::AtomicU64,
    /// The supervisor of its process notifier (`processes` budget with `deny` where BPF
    /// LSM does not work), and the bucket it answers from (`None`: every creation passes).
    pub(super) notifier: Mutex<Option<crate::budgets::Notifier>>,
    pub(super) process_gate: Mutex<Option<crate::budgets::UserBucket>>,
    /// Resolver tasks, stopped by teardown.
    pub(super) resolver: Mutex<Option<dns::AgentResolver>>,
    /// Adopted from an earlier daemon (its process notifier, if it had one, is gone).
    pub(super) adopted: bool,
    /// Restricted by a Landlock ruleset at launch (which nothing can lift or widen later).
    pub(super) landlocked: bool,
    /// What killed it, if agentd did: `kill switch`, `budget CLASS`, `breaker`.
    pub(super) killed_by: Mutex<Option<String>>,
    /// What was denied to it, by kind (`agentd run --explain`).
    pub(super) explained: Mutex<super::feed::Explained>,
}

impl AgentState {
    pub fn processes(&self) -> Vec<u32> {
        self.cgroup
            .locked()
            .as_ref()
            .and_then(|c| c.all_processes().ok())
            .unwrap_or_default()
    }

    pub fn info(&self, daemon: &Daemon) -> AgentInfo {
        let live = self.live.locked();
        AgentInfo {
            name: self.name.clone(),
            id: self.id,
            cgroup: self.cgroup_path.clone(),
            pid: *self.pid.locked(),
            user: self.identity.user.clone(),
            uid: self.identity.uid,
            profile: live.policy.profile.clone(),
            version: live.policy.version.to_string(),
            mode: match live.policy.mode {
                Mode::Enforce => "enforce".into(),
                Mode::Audit => "audit".into(),
            },
            parent: self.parent.clone(),
            started: self.started,
            processes: self.processes().len(),
            enforcement: daemon.enforcement.clone(),
            workdir: self.workdir.clone(),
            tmp: self.tmp.clone(),
            dns: format!("{}:{}", self.dns_addr, daemon.config.dns_port),
            learned: live.learned.keys().map(ToString::to_string).collect(),
        }
    }
}

/// A refusal: message and the exit status the client should use.
pub type Refusal = (String, i32);

pub fn refuse(message: impl Into<String>) -> Refusal {
    (message.into(), EXIT_POLICY)
}

fn internal(message: impl Into<String>) -> Refusal {
    (message.into(), EXIT_AGENTD)
}

impl Daemon {
    /// The agent root relative to the cgroup2 mount root (as /proc/PID/cgroup shows it).
    pub fn root_rel(&self) -> PathBuf {
        let under_mount = self
            .root_path
            .strip_prefix(&self.mount.mount_point)
            .unwrap_or(Path::new(""));
        self.mount
            .root
            .strip_prefix("/")
            .unwrap_or(Path::new(""))
            .join(under_mount)
    }

    pub fn agent(&self, name: &str) -> Option<Arc<AgentState>> {
        self.agents.locked().get(name).cloned()
    }

    /// The running agent whose cgroup id is `id`.
    pub fn agent_by_id(&self, id: u64) -> Option<Arc<AgentState>> {
        self.agents.locked().values().find(|a| a.id == id).cloned()
    }

    fn next_policy_id(&self) -> u64 {
        self.policy_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Random hex for generated agent names.
fn random_suffix() -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom fills the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn lookup_user(spec: &str) -> Result<nix::unistd::User, String> {
    let found = match spec.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(spec),
    };
    found
        .ok()
        .flatten()
        .ok_or_else(|| format!("--user {spec}: no such user"))
}

fn identity_of(u: nix::unistd::User) -> Identity {
    Identity {
        user: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        groups: Vec::new(),
        home: u.dir,
    }
}

/// The account a top-level agent runs as.
fn resolve_user(daemon: &Daemon, req: &RunRequest) -> Result<Identity, Refusal> {
    if let Some(spec) = &req.user {
        return lookup_user(spec).map(identity_of).map_err(refuse);
    }
    if let Some(uid) = req.sudo_uid.filter(|u| *u != 0) {
        return lookup_user(&uid.to_string())
            .map(identity_of)
            .map_err(|e| refuse(format!("SUDO_UID={uid}: {e}")));
    }
    let name = &daemon.settings.locked().agent_user.clone();
    let user = nix::unistd::User::from_name(name).ok().flatten().ok_or_else(|| {
        refuse(format!(
            "no --user given, SUDO_UID is not set, and the account `{name}` (agents.user) does not exist: \
             pass --user USER, or create the account: useradd --system --no-create-home {name}"
        ))
    })?;
    if user.uid.is_root() {
        return Err(refuse(format!(
            "agents.user `{name}` is root: running an agent as root needs an explicit --user root"
        )));
    }
    Ok(identity_of(user))
}

fn load_profile(daemon: &Daemon, spec: &ProfileSpec) -> Result<profile::Profile, Refusal> {
    let dir = &daemon.config.profiles_dir;
    match spec {
        ProfileSpec::Default => {
            let name = daemon.settings.locked().default_profile.clone();
            profile::load_named(dir, &name)
        }
        ProfileSpec::Named(n) => profile::load_named(dir, n),
        ProfileSpec::Inline { source, text } => profile::parse(text, source),
    }
    .map_err(|e| refuse(e.to_string()))
}

/// The allowlist of an agent: its policy's rules, loopback if allowed, and the addresses
/// its resolver answered with.
pub fn allowlist_of(live: &Live) -> Result<Allowlist> {
    let mut rules = live.policy.network.allow.clone();
    if live.policy.network.loopback {
        for net in ["127.0.0.0/8", "::1/128"] {
            rules.push(NetRule {
                net: net.parse().expect("valid"),
                ports: Ports::ANY,
            });
        }
    }
    for (addr, learned) in &live.learned {
        for ports in &learned.ports {
            rules.push(NetRule {
                net: IpNet::from(*addr),
                ports: *ports,
            });
        }
    }
    Allowlist::compile(&rules)
}

/// The budgets the kernel keeps for a policy (see [`crate::budgets::kernel_budgets`]).
pub fn kernel_budgets(policy: &Policy) -> BTreeMap<String, crate::budgets::Budget> {
    crate::budgets::kernel_budgets(
        &policy.budgets,
        policy.breaker.as_ref(),
        policy.mode == Mode::Audit,
    )
}

/// Whether the daemon answers the agent's process creations (a `processes` budget with
/// `deny` where no BPF LSM `task_alloc` can refuse them).
fn gates_processes(daemon: &Daemon, policy: &Policy) -> bool {
    !daemon.file_enforcers.lsm && crate::budgets::denies_processes(&kernel_budgets(policy))
}

fn entry_of(daemon: &Daemon, agent: &AgentState, live: &Live) -> AgentEntry {
    AgentEntry {
        flags: if live.policy.mode == Mode::Audit {
            AGENT_FLAG_AUDIT
        } else {
            0
        } | if crate::budgets::needs_sys_enter(&kernel_budgets(&live.policy)) {
            AGENT_FLAG_BUDGETS
        } else {
            0
        } | if agent.killed.load(std::sync::atomic::Ordering::SeqCst) {
            AGENT_FLAG_KILLED
        } else {
            0
        },
        file_default_allow: live.policy.files.default_allow,
        policy_id: live.policy_id,
        dns_addr: agent.dns_addr.octets(),
        dns_port: daemon.config.dns_port,
        _pad: 0,
    }
}

/// Makes the kernel match `live`. With `swap`, the rules are written under a fresh policy
/// id and the agent's entry is switched to it in one update; without, the rules of the
/// current id are updated in place (for learned addresses: only additions and expiries).
pub fn sync_kernel(daemon: &Daemon, agent: &AgentState, live: &mut Live, swap: bool) -> Result<()> {
    let allowlist = allowlist_of(live)?;
    let mut kernel = daemon.kernel.locked();
    // An agent being torn down is not written again: its entries would outlive it. (Teardown
    // takes the cgroup before it takes the kernel maps to remove the entries.)
    if agent.cgroup.locked().is_none() {
        return Ok(());
    }
    if !swap {
        return network::apply(&mut kernel, live.policy_id, &allowlist);
    }
    let gate = gates_processes(daemon, &live.policy);
    if gate && *agent.pid.locked() != 0 && agent.notifier.locked().is_none() && !agent.adopted {
        anyhow::bail!(
            "a `processes` budget with `deny` needs BPF LSM or a notifier installed at launch, \
             which agent {} does not have: start it again with that budget",
            agent.name
        );
    }
    let lsm = daemon.file_enforcers.lsm;
    let new_id = daemon.next_policy_id();
    let written = network::apply(&mut kernel, new_id, &allowlist)
        .and_then(|()| {
            if lsm {
                files::apply(
                    &mut kernel,
                    new_id,
                    &files::InodeRules::of(&live.policy.files),
                )
            } else {
                Ok(())
            }
        })
        // Budgets are keyed by agent: written (refilled) before the entry switches to them.
        .and_then(|()| crate::budgets::apply(&mut kernel, agent.id, &kernel_budgets(&live.policy)));
    if let Err(e) = written {
        let _ = network::clear(&mut kernel, new_id);
        let _ = files::clear(&mut kernel, new_id);
        return Err(e);
    }
    // The daemon's bucket refills with the kernel's (a policy change starts them full).
    *agent.process_gate.locked() = gate
        .then(|| {
            kernel_budgets(&live.policy)
                .get("processes")
                .map(crate::budgets::UserBucket::new)
        })
        .flatten();
    let old_id = live.policy_id;
    live.policy_id = new_id;
    if let Err(e) = agent::register(&mut kernel, agent.id, entry_of(daemon, agent, live)) {
        live.policy_id = old_id;
        let _ = network::clear(&mut kernel, new_id);
        let _ = files::clear(&mut kernel, new_id);
        return Err(e);
    }
    // The agent runs under the new rules now: a failure to remove the old ones leaks map
    // entries but changes nothing for the agent, so it is reported, not returned.
    if old_id != 0 {
        let cleared = network::clear(&mut kernel, old_id).and_then(|()| {
            if lsm {
                files::clear(&mut kernel, old_id)
            } else {
                Ok(())
            }
        });
        if let Err(e) = cleared {
            eprintln!(
                "agentd: agent {}: removing the rules of its previous policy {old_id}: {e:#}",
                agent.name
            );
        }
    }
    super::adopt::save(daemon, agent, live);
    Ok(())
}

/// Adds addresses the agent's resolver answered with; they stay allowed for their TTL.
pub fn learn(
    daemon: &Daemon,
    agent: &AgentState,
    learned: &[network::resolver::Learned],
    ports: &[Ports],
) -> Result<()> {
    let mut live = agent.live.locked();
    let now = Instant::now();
    for l in learned {
        let e = live.learned.entry(l.addr).or_insert_with(|| LearnedAddr {
            ports: BTreeSet::new(),
            expires: now,
        });
        e.ports.extend(ports.iter().copied());
        e.expires = e.expires.max(now + Duration::from_secs(u64::from(l.ttl)));
    }
    sync_kernel(daemon, agent, &mut live, false)
}

/// Drops learned addresses whose TTL ran out.
pub fn expire(daemon: &Daemon) {
    let all: Vec<Arc<AgentState>> = daemon.agents.locked().values().cloned().collect();
    let now = Instant::now();
    for a in all {
        let mut live = a.live.locked();
        let before = live.learned.len();
        live.learned.retain(|_, l| l.expires > now);
        if live.learned.len() != before
            && let Err(e) = sync_kernel(daemon, &a, &mut live, false)
        {
            eprintln!(
                "agentd: agent {}: removing expired DNS addresses: {e:#}",
                a.name
            );
        }
    }
}

/// Everything decided and created for a launch, before the spawn.
struct Prepared {
    state: Arc<AgentState>,
    plan: Plan,
    /// Environment names the filter removed (reported to the client).
    removed_env: Vec<String>,
    /// What of its policy this host does not enforce (started with --degraded-ok).
    degraded: Vec<String>,
    /// The parent's policy id when this agent's policy was computed from it.
    parent_policy_id: Option<u64>,
}

/// The policy an agent gets: profile, adjustments, then the parent's limits.
fn effective(
    daemon: &Daemon,
    agent: &str,
    requested: &Policy,
    parent: Option<&AgentState>,
) -> Policy {
    match parent {
        Some(p) => {
            let parent_policy = p.live.locked().policy.clone();
            effective_under(daemon, agent, requested, Some((&parent_policy, &p.name)))
        }
        None => effective_under(daemon, agent, requested, None),
    }
}

/// [`effective`] with the parent's policy (and name) given.
pub(super) fn effective_under(
    daemon: &Daemon,
    agent: &str,
    requested: &Policy,
    parent: Option<(&Policy, &str)>,
) -> Policy {
    // File rules are compared on real paths (see FilePolicy::resolved).
    let mut requested = requested.clone();
    requested.files = requested.files.resolved();
    let mut policy = match parent {
        Some((p, name)) => requested.intersect(p, name),
        None => requested,
    };
    // An agent can only keep capabilities the daemon itself has.
    let available = crate::caps::permitted();
    policy.capabilities.retain(|c| available & (1 << c) != 0);
    protect(daemon, agent, &mut policy);
    policy
}

/// What no profile can allow: agentd's own files, bpffs and the cgroup file systems are
/// never writable; the audit log, the agents' records and the other agents' denial feeds
/// are not readable either. What every agent may: read its own denial feed.
pub(super) fn protect(daemon: &Daemon, agent: &str, policy: &mut Policy) {
    policy.files.add(
        &crate::policy::real_path(&super::feed::path(daemon, agent)),
        agentd_common::files::ACCESS_READ,
        0,
    );
    for p in &daemon.protected {
        policy
            .files
            .add(&crate::policy::real_path(p), 0, ACCESS_WRITE);
    }
    for p in &daemon.hidden {
        policy.files.add(
            &crate::policy::real_path(p),
            0,
            agentd_common::files::ACCESS_ALL,
        );
    }
}

fn prepare(
    daemon: &Arc<Daemon>,
    req: RunRequest,
    peer: &Peer,
    fds: Vec<OwnedFd>,
) -> Result<Prepared, Refusal> {
    if req.argv.is_empty() {
        return Err(refuse(
            "no command given: agentd run [OPTIONS] -- CMD [ARGS...]",
        ));
    }
    let stdio: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| internal("the client did not pass stdin, stdout and stderr"))?;
    let profile = load_profile(daemon, &req.profile)?;
    let parent = match &peer.agent {
        Some(name) => Some(
            daemon
                .agent(name)
                .ok_or_else(|| refuse(format!("agent `{name}` is not running")))?,
        ),
        None => None,
    };
    let identity = match &parent {
        Some(p) => {
            if let Some(spec) = &req.user {
                let wanted = lookup_user(spec).map_err(refuse)?;
                if wanted.uid.as_raw() != p.identity.uid {
                    return Err(refuse(format!(
                        "--user {spec}: an agent launched from inside agent `{}` runs as its user `{}` and cannot change it",
                        p.name, p.identity.user
                    )));
                }
            }
            if req.home.as_ref().is_some_and(|h| *h != p.identity.home) {
                return Err(refuse(format!(
                    "--home: an agent launched from inside agent `{}` keeps its home {}",
                    p.name,
                    p.identity.home.display()
                )));
            }
            p.identity.clone()
        }
        None => {
            let mut identity = resolve_user(daemon, &req)?;
            if let Some(home) = &req.home {
                let home = fs::canonicalize(home)
                    .ok()
                    .filter(|h| h.is_dir())
                    .ok_or_else(|| {
                        refuse(format!(
                            "--home {}: not an existing directory",
                            home.display()
                        ))
                    })?;
                identity.home = home;
            }
            identity
        }
    };
    let name = match &req.name {
        Some(n) if !valid_name(n) => {
            return Err(refuse(format!(
                "--name {n}: agent names are letters, digits, `.`, `_`, `-` (at most 64, starting with a letter or digit)"
            )));
        }
        Some(n) => n.clone(),
        None => format!("agent-{}", random_suffix()),
    };
    if daemon.agent(&name).is_some() || daemon.root_path.join(&name).exists() {
        return Err(refuse(format!(
            "--name {name}: an agent with that name is already running"
        )));
    }
    let workdir = req.workdir.clone().unwrap_or_else(|| req.cwd.clone());
    if !workdir.is_absolute() {
        return Err(refuse(format!(
            "--workdir {}: not an absolute path",
            workdir.display()
        )));
    }
    let workdir = fs::canonicalize(&workdir)
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| {
            refuse(format!(
                "--workdir {}: not an existing directory",
                workdir.display()
            ))
        })?;
    // Replies carry these paths as JSON strings.
    for (what, p) in [
        ("--workdir", &workdir),
        ("the home directory", &identity.home),
    ] {
        if p.to_str().is_none() {
            return Err(refuse(format!("{what} {}: not valid UTF-8", p.display())));
        }
    }
    let tmp = daemon.config.tmp_dir.join(&name);
    let placeholders = Placeholders {
        workdir: workdir.clone(),
        home: identity.home.clone(),
        tmp: tmp.clone(),
    };
    let mut requested = Policy::from_profile(&profile, &placeholders);
    requested.adjust(&req.adjustments).map_err(refuse)?;
    // Read before the parent's policy is: a change in between is caught after the agent
    // is registered (see `run`).
    let parent_policy_id = parent.as_ref().map(|p| p.live.locked().policy_id);
    let policy = effective(daemon, &name, &requested, parent.as_deref());
    // What this host cannot enforce of the file rules: refused unless --degraded-ok.
    let mut degraded = if policy.mode == Mode::Enforce {
        let owns_home = fs::metadata(&identity.home)
            .ok()
            .filter(|m| m.uid() == identity.uid)
            .map(|_| identity.home.clone());
        files::guarantees(
            &policy.files,
            &daemon.file_enforcers,
            identity.uid == 0,
            owns_home.as_deref(),
        )
    } else {
        Vec::new()
    };
    if let (true, Some(why)) = (
        crate::budgets::needs_sys_enter(&kernel_budgets(&policy)),
        &daemon.budgets_unusable,
    ) {
        degraded.push(format!("rate budgets ({why})"));
    }
    if !degraded.is_empty() && !req.degraded_ok {
        return Err(refuse(format!(
            "this host cannot enforce all of the profile's rules:\n  - {}\nstart it anyway with --degraded-ok",
            degraded.join("\n  - ")
        )));
    }

    let mut rlimits = Vec::new();
    for (k, v) in &policy.rlimits {
        rlimits.push((
            launcher::rlimit_resource(k)
                .ok_or_else(|| internal(format!("unknown resource limit {k}")))?,
            *v,
        ));
    }
    let deny: Vec<String> = policy.seccomp_deny.iter().cloned().collect();
    let filter = seccomp::build(&deny, policy.mode == Mode::Audit)
        .map_err(|e| refuse(format!("seccomp: {e:#}")))?;
    let notifier = if gates_processes(daemon, &policy) {
        Some(seccomp::process_notifier().map_err(|e| refuse(format!("seccomp: {e:#}")))?)
    } else {
        None
    };
    let keep_caps = policy.capabilities.iter().fold(0u64, |m, c| m | (1 << c));

    let (mut env, removed_env) = policy.filter_env(&req.env);
    let overrides: BTreeMap<&str, String> = BTreeMap::from([
        ("HOME", identity.home.display().to_string()),
        ("USER", identity.user.clone()),
        ("LOGNAME", identity.user.clone()),
        ("TMPDIR", tmp.display().to_string()),
        ("PWD", workdir.display().to_string()),
        ("AGENTD_AGENT", name.clone()),
        (
            "AGENTD_DENIALS",
            super::feed::path(daemon, &name).display().to_string(),
        ),
        (
            "AGENTD_LAUNCH_SOCKET",
            daemon.config.launch_socket.display().to_string(),
        ),
    ]);
    env.retain(|(k, _)| !overrides.contains_key(k.as_str()));
    env.extend(overrides.into_iter().map(|(k, v)| (k.to_string(), v)));

    let mut live = Live {
        spec: req.profile.clone(),
        adjustments: req.adjustments.clone(),
        placeholders,
        requested,
        policy,
        policy_id: 0,
        learned: BTreeMap::new(),
    };
    // Checked before anything is created: a policy the maps cannot hold is refused.
    allowlist_of(&live).map_err(|e| refuse(format!("network.allow: {e:#}")))?;

    // From here on, things are created: each is undone if a later step fails.
    let dns_slot = dns::Slot::take(daemon).map_err(|e| internal(format!("{e:#}")))?;
    let dns_addr = dns_slot.addr();
    let resolver_sockets =
        dns::bind(dns_addr, daemon.config.dns_port).map_err(|e| internal(format!("{e:#}")))?;
    let cgroup =
        CgroupDir::create(&daemon.root_path, &name).map_err(|e| internal(format!("{e:#}")))?;
    let feed = super::feed::path(daemon, &name);
    let cleanup_tmp = |e: String| {
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::remove_file(&feed);
        internal(e)
    };
    // tmp_dir was checked at start: root's, writable by no one else (secure_tmp_base).
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| internal(format!("creating the private tmp {}: {e}", tmp.display())))?;
    chown(&tmp, Some(identity.uid), Some(identity.gid))
        .map_err(|e| cleanup_tmp(format!("chown {}: {e}", tmp.display())))?;
    // Its denial feed, before Landlock's rules are built (they name it).
    super::feed::create(daemon, &name).map_err(|e| cleanup_tmp(format!("{e:#}")))?;
    // Landlock, where the kernel has it: built once the private tmp exists (a rule on a
    // path that does not exist grants nothing), applied by the child before exec. Always,
    // even for a profile that allows every file: the domain also keeps the agent from
    // tracing, reading /proc/<pid>/mem of, or signalling processes outside it.
    //
    // In audit mode nothing the profile says is denied, but agentd's own paths still are
    // (an agent running as root could otherwise write its cgroup's files, or the pins, or
    // kill the daemon): the domain then allows everything else, and the agent's tmp and
    // workdir.
    let shield = (live.policy.mode == Mode::Audit).then(|| {
        let mut shield = Policy::empty();
        shield.files.default_allow = agentd_common::files::ACCESS_ALL;
        protect(daemon, &name, &mut shield);
        for p in [&tmp, &workdir] {
            shield.files.add(p, agentd_common::files::ACCESS_ALL, 0);
        }
        shield.files
    });
    let landlock = match daemon.file_enforcers.landlock {
        Some(abi) => {
            let plan = files::landlock::compile(shield.as_ref().unwrap_or(&live.policy.files))
                .map_err(|e| cleanup_tmp(format!("file rules: {e:#}")))?;
            Some(
                files::landlock::ruleset(&plan, abi as i32)
                    .map_err(|e| cleanup_tmp(format!("{e:#}")))?,
            )
        }
        None => None,
    };
    let cgroup_procs = launcher::open_cgroup_procs(cgroup.path())
        .map_err(|e| cleanup_tmp(format!("opening cgroup.procs: {e}")))?;
    let id = cgroup.id();
    let cgroup_path = cgroup.path().to_path_buf();
    let state = AgentState {
        name,
        id,
        identity: identity.clone(),
        parent: parent.as_ref().map(|p| p.name.clone()),
        parent_id: parent.as_ref().map(|p| p.id),
        workdir: workdir.clone(),
        tmp: tmp.clone(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        pid: Mutex::new(0),
        dns_addr,
        live: Mutex::new(Live { ..empty_live() }),
        cgroup: Mutex::new(Some(cgroup)),
        cgroup_path,
        resolver: Mutex::new(None),
        throttled: std::sync::atomic::AtomicBool::new(false),
        exhaustions: std::sync::atomic::AtomicU64::new(0),
        teardown_lock: Mutex::new(()),
        killed: std::sync::atomic::AtomicBool::new(false),
        held: std::sync::atomic::AtomicBool::new(false),
        notifier: Mutex::new(None),
        process_gate: Mutex::new(None),
        adopted: false,
        // Its profile's file rules, not only agentd's own paths (audit mode).
        landlocked: landlock.is_some() && shield.is_none(),
        killed_by: Mutex::new(None),
        explained: Mutex::new(Default::default()),
    };
    if let Err(e) = sync_kernel(daemon, &state, &mut live, true) {
        let mut kernel = daemon.kernel.locked();
        let _ = network::clear(&mut kernel, live.policy_id);
        if daemon.file_enforcers.lsm {
            let _ = files::clear(&mut kernel, live.policy_id);
        }
        let _ = crate::budgets::clear(&mut kernel, id);
        let _ = agent::unregister(&mut kernel, id);
        return Err(cleanup_tmp(format!("{e:#}")));
    }
    *state.live.locked() = live;
    // Which calls its filter refuses, for the reporter's events (reporting only: a failure
    // is said, and the launch goes on; teardown removes them).
    if let Err(e) = crate::process::refuse_syscalls(
        &mut daemon.kernel.locked(),
        id,
        &seccomp::refused_sets(&deny),
    ) {
        eprintln!(
            "agentd: agent {}: its refused system calls will not be reported: {e:#}",
            state.name
        );
    }
    let state = Arc::new(state);
    *state.resolver.locked() = Some(dns::start(
        daemon.clone(),
        state.clone(),
        resolver_sockets,
        dns_slot,
    ));
    let plan = Plan {
        argv: req.argv,
        env,
        cwd: workdir,
        cgroup_procs,
        identity,
        keep_caps,
        rlimits,
        seccomp: filter,
        notifier,
        landlock,
        stdio,
    };
    Ok(Prepared {
        parent_policy_id,
        state,
        degraded,
        plan,
        removed_env,
    })
}

pub(super) fn empty_live() -> Live {
    Live {
        spec: ProfileSpec::Default,
        adjustments: Adjustments::default(),
        placeholders: Placeholders {
            workdir: PathBuf::new(),
            home: PathBuf::new(),
            tmp: PathBuf::new(),
        },
        requested: Policy::empty(),
        policy: Policy::empty(),
        policy_id: 0,
        learned: BTreeMap::new(),
    }
}

/// `agentd update`: a new policy for a running agent (and, narrowed by it, for the agents it
/// launched), in force at once for everything the kernel decides per operation.
pub fn update(daemon: &Daemon, req: &UpdateRequest) -> Result<Reply, Refusal> {
    let _one = daemon.policy_change.locked();
    let agent = daemon
        .agent(&req.agent)
        .ok_or_else(|| (format!("no agent named `{}` is running", req.agent), 1))?;
    let (spec, adjustments, placeholders) = {
        let live = agent.live.locked();
        let mut adjustments = live.adjustments.clone();
        adjustments.extend(&req.adjustments);
        if let Some(mode) = req.mode {
            adjustments.audit = mode == Mode::Audit;
        }
        (
            req.profile.clone().unwrap_or_else(|| live.spec.clone()),
            adjustments,
            live.placeholders.clone(),
        )
    };
    let profile = load_profile(daemon, &spec)?;
    let mut requested = Policy::from_profile(&profile, &placeholders);
    requested.adjust(&adjustments).map_err(refuse)?;
    let mut policy = policy_for(daemon, &agent, &requested);
    launch_files(daemon, &agent, &mut policy);
    can_take(daemon, &agent, &policy).map_err(refuse)?;
    let from = Version::of(&agent.live.locked().policy);
    switch(
        daemon,
        &agent,
        Live {
            spec,
            adjustments,
            requested,
            policy,
            ..empty_live()
        },
    )
    .map_err(internal)?;
    narrow_children(daemon, &agent);
    budget_hook(daemon);
    changed(daemon, &agent, &from, "update");
    let policy = agent.live.locked().policy.clone();
    Ok(Reply::Updated {
        agent: Box::new(agent.info(daemon)),
        policy: Box::new(policy),
    })
}

/// A policy's profile, version and mode, as the audit log and `agentd reload` name them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Version {
    pub profile: String,
    pub version: String,
    pub mode: Mode,
}

impl Version {
    pub fn of(p: &Policy) -> Version {
        Version {
            profile: p.profile.clone(),
            version: p.version.to_string(),
            mode: p.mode,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.profile, self.version)?;
        if self.mode == Mode::Audit {
            write!(f, " (audit)")?;
        }
        Ok(())
    }
}

/// The policy `agent` gets from `requested`: intersected with its parent's and, if its
/// parent has ended, with what it has now (what it had then is the most it can ever have).
pub(super) fn policy_for(daemon: &Daemon, agent: &AgentState, requested: &Policy) -> Policy {
    let parent = agent.parent_id.and_then(|id| daemon.agent_by_id(id));
    let policy = effective(daemon, &agent.name, requested, parent.as_deref());
    if agent.parent_id.is_some() && parent.is_none() {
        let current = agent.live.locked().policy.clone();
        return policy.intersect(&current, &agent.name);
    }
    policy
}

/// Without BPF LSM, an agent restricted by Landlock keeps the file rules it was started
/// with, whatever its policy says later (nothing can change a running process's Landlock
/// rules): puts them back into `policy`, so that `inspect` shows the rules that hold.
/// Returns whether the new file rules differed from them.
pub(super) fn launch_files(daemon: &Daemon, agent: &AgentState, policy: &mut Policy) -> bool {
    if daemon.file_enforcers.lsm || !agent.landlocked {
        return false;
    }
    let current = agent.live.locked().policy.files.clone();
    let differ = policy.files != current;
    policy.files = current;
    differ
}

/// Whether `agent` can be held to `policy` by this host's enforcers. An agent started in
/// audit mode where Landlock enforces the file rules (no BPF LSM) has no Landlock domain,
/// and none can be given to a running process: enforcing its file rules needs a new start.
pub(super) fn can_take(daemon: &Daemon, agent: &AgentState, policy: &Policy) -> Result<(), String> {
    if policy.mode == Mode::Enforce
        && !daemon.file_enforcers.lsm
        && daemon.file_enforcers.landlock.is_some()
        && !agent.landlocked
    {
        return Err(format!(
            "agent {} was started in audit mode on a host where Landlock enforces file rules (no BPF LSM), \
             and Landlock cannot be applied to a running agent: its file rules could not be enforced. \
             Keep it in audit mode, or start it again in enforce mode",
            agent.name
        ));
    }
    Ok(())
}

/// Puts `next`'s spec, adjustments, requested and effective policy in force for `agent`:
/// the kernel first (one map update switches the agent to the new rules), then its state;
/// on failure nothing changes.
pub(super) fn switch(daemon: &Daemon, agent: &AgentState, next: Live) -> Result<(), String> {
    let mut live = agent.live.locked();
    let old = (
        std::mem::replace(&mut live.spec, next.spec),
        std::mem::replace(&mut live.adjustments, next.adjustments),
        std::mem::replace(&mut live.requested, next.requested),
        std::mem::replace(&mut live.policy, next.policy),
    );
    if let Err(e) = sync_kernel(daemon, agent, &mut live, true) {
        (live.spec, live.adjustments, live.requested, live.policy) = old;
        return Err(format!("the kernel kept the old policy: {e:#}"));
    }
    Ok(())
}

/// Records a policy change of `agent` (from `from` to what it has now).
pub(super) fn changed(daemon: &Daemon, agent: &AgentState, from: &Version, cause: &str) {
    let to = Version::of(&agent.live.locked().policy);
    daemon.metrics.policy_updates.inc();
    daemon.audit_agent(
        agent,
        "policy_updated",
        serde_json::json!({
            "cause": cause,
            "from": from,
            "to": to,
        }),
    );
}

/// Re-intersects the agents launched from inside `p` with its current policy.
pub(super) fn narrow_children(daemon: &Daemon, p: &AgentState) {
    let parent = &p.name;
    let children: Vec<Arc<AgentState>> = daemon
        .agents
        .locked()
        .values()
        .filter(|a| a.parent_id == Some(p.id))
        .cloned()
        .collect();
    for child in children {
        {
            let requested = child.live.locked().requested.clone();
            let policy = effective(daemon, &child.name, &requested, Some(p));
            let mut live = child.live.locked();
            live.policy = policy;
            if let Err(e) = sync_kernel(daemon, &child, &mut live, true) {
                // It would keep more than its parent now has: fail closed.
                eprintln!(
                    "agentd: agent {}: narrowing after a change of {parent} failed, killing it: {e:#}",
                    child.name
                );
                if let Some(c) = child.cgroup.locked().as_ref() {
                    let _ = fs::write(c.path().join("cgroup.kill"), "1");
                }
            }
        }
        narrow_children(daemon, &child);
    }
}

/// Kills what is left of an agent, removes its kernel entries, cgroup and tmp, and
/// forgets it. Safe to call twice.
pub fn teardown(daemon: &Daemon, a: &AgentState) {
    let _whole = a.teardown_lock.locked();
    let cgroup = a.cgroup.locked().take();
    if let Some(cgroup) = cgroup {
        if let Err(e) = cgroup.kill_all(Duration::from_secs(10)) {
            eprintln!("agentd: agent {}: {e:#}", a.name);
        }
        // Entries are removed only once the cgroup is empty: until then a survivor would
        // be unregistered, and so denied everything (fail closed) rather than freed.
        {
            let policy_id = a.live.locked().policy_id;
            let mut kernel = daemon.kernel.locked();
            let _ = agent::unregister(&mut kernel, a.id);
            let _ = network::clear(&mut kernel, policy_id);
            let _ = crate::budgets::clear(&mut kernel, a.id);
            let _ = crate::process::clear_syscalls(&mut kernel, Some(a.id), &[]);
            drop(a.notifier.locked().take());
            if daemon.file_enforcers.lsm {
                let _ = files::clear(&mut kernel, policy_id);
            }
        }
        if let Err(e) = cgroup.remove() {
            eprintln!("agentd: agent {}: {e:#}", a.name);
        }
        daemon.ended(a);
        daemon.audit_agent(a, "agent_ended", {
            let by = a.killed_by.locked().clone();
            serde_json::json!({"pid": *a.pid.locked(), "killed": by.is_some(), "killed_by": by})
        });
    }
    // Stops the resolver tasks and frees the address.
    drop(a.resolver.locked().take());
    let _ = fs::remove_dir_all(&a.tmp);
    super::feed::remove(daemon, &a.name);
    super::adopt::remove(daemon, &a.name);
    daemon.agents.locked().remove(&a.name);
    budget_hook(daemon);
    reporter(daemon);
    daemon.counters.locked().remove(&a.id);
    daemon.denials.locked().remove(&a.id);
}

/// Lets go of a running agent without undoing anything (a stop with `on_stop = "keep"`):
/// its cgroup is not killed or removed when the daemon's state is dropped.
pub(super) fn leave_running(a: &AgentState) {
    if let Some(c) = a.cgroup.locked().take() {
        let _ = c.release();
    }
}

/// Keeps the `sys_exit` reporter attached while agents run: it reports the file denials
/// no BPF LSM hook sees (Landlock's, which come first in the kernel's order) and every
/// call an agent's seccomp filter refuses. It runs on every system call exit of the host,
/// so it is attached only while agents run.
pub(super) fn reporter(daemon: &Daemon) {
    keep_attached(
        daemon,
        &daemon.reporter,
        "sys_exit",
        "file denials under Landlock and seccomp refusals will not be reported",
        |agents| !agents.is_empty(),
    );
}

/// Attaches or detaches the raw tracepoint program `name` so that it is attached exactly
/// when `wanted` says so of the running agents. Decided while holding the link: a launch
/// and a teardown cannot act on views of the agents taken in the other order. Lock order:
/// the link, agents, live, kernel; no caller holds any of them. Returns whether it is
/// attached.
fn keep_attached(
    daemon: &Daemon,
    link: &Mutex<Option<aya::programs::raw_trace_point::RawTracePointLinkId>>,
    name: &str,
    if_fails: &str,
    wanted: impl FnOnce(&[Arc<AgentState>]) -> bool,
) -> bool {
    let mut link = link.locked();
    let all: Vec<Arc<AgentState>> = daemon.agents.locked().values().cloned().collect();
    let wanted = wanted(&all);
    let mut kernel = daemon.kernel.locked();
    match (wanted, link.take()) {
        (true, None) => match crate::ebpf::raw_tp::attach(&mut kernel, name) {
            Ok(l) => *link = Some(l),
            Err(e) => eprintln!("agentd: {if_fails}: {e:#}"),
        },
        (false, Some(l)) => {
            if let Err(e) = crate::ebpf::raw_tp::detach(&mut kernel, name, l) {
                eprintln!("agentd: {e:#}");
            }
        }
        (_, kept) => *link = kept,
    }
    link.is_some()
}

/// Longest message a `run` client may send while its agent runs (a signal to forward).
const MAX_CONTROL_LINE: u64 = 4096;

/// The next message of a `run` client: `None` at the end of the stream, on an error, or
/// on a line longer than [`MAX_CONTROL_LINE`] (then the client counts as gone, and its
/// agent goes with it). Never buffers more than that.
async fn control_line(r: &mut (impl AsyncBufRead + Unpin)) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    r.take(MAX_CONTROL_LINE)
        .read_until(b'\n', &mut line)
        .await
        .ok()?;
    line.pop_if(|b| *b == b'\n').map(|_| line)
}

/// Keeps the `sys_enter` budget program attached while some agent has budgets (it runs
/// on every system call of the host). Returns whether it is attached.
pub(super) fn budget_hook(daemon: &Daemon) -> bool {
    let usable = daemon.budgets_unusable.is_none();
    keep_attached(
        daemon,
        &daemon.budget_hook,
        "sys_enter",
        "rate budgets are not enforced",
        |agents| {
            usable
                && agents.iter().any(|a| {
                    a.killed.load(std::sync::atomic::Ordering::SeqCst)
                        || crate::budgets::needs_sys_enter(&kernel_budgets(&a.live.locked().policy))
                })
        },
    )
}

/// Answers the agent's notified process creations from its `processes` bucket; a
/// refusal is an event like the kernel's.
fn process_gate(
    daemon: &Arc<Daemon>,
    agent: &Arc<AgentState>,
) -> impl FnMut(u32) -> bool + Send + 'static {
    use agentd_common::{budgets::*, events::*};
    let (d, weak) = (daemon.clone(), Arc::downgrade(agent));
    move |pid| {
        let Some(a) = weak.upgrade() else {
            return false;
        };
        let refused = match a.process_gate.locked().as_mut() {
            None => return true,
            Some(b) => match b.take(Instant::now()) {
                Ok(()) => return true,
                Err(report) => report.then_some((b.budget.rate, b.budget.burst, b.exhausted)),
            },
        };
        if let Some((rate, burst, exhausted)) = refused {
            let comm = fs::read(format!("/proc/{pid}/comm")).unwrap_or_default();
            let mut header = EventHeader {
                kind: EVENT_BUDGET,
                hook: HOOK_SECCOMP_NOTIFY,
                agent: a.id,
                ktime_ns: crate::budgets::monotonic_ns(),
                pid,
                tid: pid,
                verdict: VERDICT_DENY,
                ..Default::default()
            };
            for (dst, src) in header
                .comm
                .iter_mut()
                .zip(comm.iter().take(15).filter(|b| **b != b'\n'))
            {
                *dst = *src;
            }
            let e = BudgetEvent {
                header,
                class: CLASS_PROCESSES,
                action: ACTION_DENY,
                rate,
                burst,
                deficit: 1,
                exhausted,
                syscall: 0,
                host: 0,
            };
            super::record(&d, &crate::events::Event::Budget(e));
        }
        false
    }
}

/// Acts on a budget found empty: kill the agent, freeze it until the budget has refilled
/// (throttle) or for good (breaker), or only report (log, deny: the operation was already
/// refused). The breaker's `exhaustions` is counted here. Returns the event's text with
/// the class by name, or `None` if the agent is gone.
pub fn on_budget(daemon: &Arc<Daemon>, e: &agentd_common::events::BudgetEvent) -> Option<String> {
    use crate::budgets::Action;
    use std::sync::atomic::Ordering::SeqCst;
    let agent = daemon.agent_by_id(e.header.agent)?;
    let host_budgets = daemon.settings.locked().host_budgets.clone();
    let (class, breaker) = {
        let live = agent.live.locked();
        let budgets = if e.host != 0 {
            &host_budgets
        } else {
            &live.policy.budgets
        };
        // Audit mode acts on nothing; a host-wide budget that all agents share is not
        // held against the one that found it empty.
        let counts = live.policy.mode == Mode::Enforce && e.host == 0;
        (
            crate::budgets::class_name(budgets, e.class).unwrap_or_else(|| e.class.to_string()),
            live.policy.breaker.clone().filter(|_| counts),
        )
    };
    let mut action = Action::from_code(e.action)?;
    let mut tripped = e.class == agentd_common::budgets::CLASS_DENIALS;
    if !tripped
        && let Some(b) = &breaker
        && let Some(k) = b.exhaustions
        && agent.exhaustions.fetch_add(1, SeqCst) + 1 >= k
        && action < b.action
    {
        tripped = true;
        action = b.action;
    }
    let cgroup = agent.cgroup_path.clone();
    let done = match action {
        Action::Log => "reported".to_string(),
        Action::Deny => "refused".to_string(),
        Action::Kill => {
            agent.killed_by.locked().get_or_insert_with(|| {
                if tripped {
                    "breaker".to_string()
                } else {
                    format!("budget {class}")
                }
            });
            let _ = fs::write(cgroup.join("cgroup.kill"), "1");
            "agent killed".to_string()
        }
        Action::Freeze => {
            let _ = fs::write(cgroup.join("cgroup.freeze"), "1");
            "agent frozen (it stays frozen: thaw it by writing 0 to its cgroup.freeze, or kill it)"
                .to_string()
        }
        Action::Throttle => {
            if !agent.throttled.swap(true, SeqCst) {
                let _ = fs::write(cgroup.join("cgroup.freeze"), "1");
                let key = agentd_common::budgets::BudgetKey {
                    agent: agent.id,
                    class: e.class,
                    _pad: 0,
                };
                let (d, a) = (daemon.clone(), agent.clone());
                tokio::spawn(async move {
                    // Thawed once the bucket is full again: the calls made before the
                    // freeze took hold were charged too, so the average holds.
                    loop {
                        let wait = crate::budgets::time_to_full(&d.kernel.locked(), key)
                            .unwrap_or_default();
                        if wait.is_zero() {
                            break;
                        }
                        tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
                    }
                    // Through the agent's own cgroup, and only while it has one: never a
                    // later agent that got the same name. Not if the kill switch froze it.
                    if let Some(c) = a.cgroup.locked().as_ref()
                        && !a.held.load(SeqCst)
                        && let Err(e) = fs::write(c.path().join("cgroup.freeze"), "0")
                    {
                        eprintln!("agentd: agent {}: thawing: {e}", a.name);
                    }
                    a.throttled.store(false, SeqCst);
                });
            }
            "agent frozen until the budget refills".to_string()
        }
    };
    let h = &e.header;
    let what = if e.class == agentd_common::budgets::CLASS_DENIALS {
        format!(
            "circuit breaker tripped: more denials than {} in a burst at {}/s",
            e.burst / agentd_common::budgets::DENIAL_TOKENS,
            e.rate as f64 / agentd_common::budgets::DENIAL_TOKENS as f64
        )
    } else {
        let scope = if e.host != 0 { "host-wide " } else { "" };
        let at = if h.hook == agentd_common::events::HOOK_SYS_ENTER {
            format!(" at system call {}", e.syscall)
        } else {
            String::new()
        };
        let trip = if tripped {
            "; circuit breaker tripped (exhaustions)"
        } else {
            ""
        };
        format!(
            "{scope}budget {class} exhausted ({}/s, burst {}; {} times){at}{trip}",
            e.rate, e.burst, e.exhausted
        )
    };
    let text = format!(
        "{what}: {done} (agent {}, pid {}, comm {}, hook {})",
        agent.name,
        h.pid,
        crate::events::comm(h),
        crate::events::hook(h.hook)
    );
    // What the daemon did is logged (at most one event per budget and second, except kills).
    eprintln!("agentd: {text}");
    Some(text)
}

/// The kill switch: kills (and then forgets), freezes or thaws the named agents, or all
/// of them, each in a thread of its own. A kill first sets the agent's kill flag in the
/// kernel, then writes cgroup.kill and waits until the cgroup is empty.
pub fn kill_switch(
    daemon: &Daemon,
    names: &[String],
    all: bool,
    action: crate::kill::Action,
) -> Vec<crate::kill::Outcome> {
    use crate::kill::{Action as K, Outcome};
    use std::sync::atomic::Ordering::SeqCst;
    let mut missing = Vec::new();
    let targets: Vec<Arc<AgentState>> = if all {
        daemon.agents.locked().values().cloned().collect()
    } else {
        names
            .iter()
            .filter_map(|n| {
                let a = daemon.agent(n);
                if a.is_none() {
                    missing.push(n.clone());
                }
                a
            })
            .collect()
    };
    // Counted before the kill flag, which already ends tasks that make a system call.
    let start = std::time::Instant::now();
    let counts: Vec<usize> = targets
        .iter()
        .map(|a| crate::kill::count(&a.cgroup_path))
        .collect();
    if action == K::Kill {
        for a in &targets {
            a.killed.store(true, SeqCst);
            a.killed_by
                .locked()
                .get_or_insert_with(|| "kill switch".to_string());
            let entry = entry_of(daemon, a, &a.live.locked());
            // Only while it has its cgroup (teardown may be under way).
            if a.cgroup.locked().is_some() {
                let _ = agent::register(&mut daemon.kernel.locked(), a.id, entry);
                super::adopt::save(daemon, a, &a.live.locked());
            }
        }
    }
    let mut outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .zip(counts)
            .map(|(a, processes)| {
                s.spawn(move || {
                    if action == K::Freeze {
                        a.held.store(true, SeqCst);
                    }
                    let o = crate::kill::act(&a.name, &a.cgroup_path, action, processes, start);
                    if action == K::Thaw && o.error.is_none() {
                        a.held.store(false, SeqCst);
                    }
                    if action != K::Kill && a.cgroup.locked().is_some() {
                        super::adopt::save(daemon, a, &a.live.locked());
                    }
                    if action == K::Kill {
                        teardown(daemon, a);
                    }
                    o
                })
            })
            .collect();
        if action == K::Kill {
            // While cgroup.kill is written: sys_enter kills any task of a killed agent
            // that makes a system call.
            budget_hook(daemon);
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("a kill switch thread panicked"))
            .collect()
    });
    for (o, a) in outcomes.iter_mut().zip(&targets) {
        eprintln!("agentd: kill switch: {}", crate::kill::describe(o));
        let name = action.name();
        daemon.metrics.kills.with_label_values(&[name]).inc();
        if action == K::Kill && o.error.is_none() {
            daemon.metrics.kill_duration.observe(o.millis / 1000.0);
        }
        // On disk before the command reports it.
        let details = serde_json::to_value(&*o).unwrap_or_default();
        if let Err(e) = daemon.audit(&super::trail::subject(a), name, details, true) {
            o.note(&format!("not written to the audit log: {e:#}"));
        }
    }
    outcomes.extend(missing.into_iter().map(|agent| Outcome {
        agent: agent.clone(),
        action,
        processes: 0,
        millis: 0.0,
        error: Some(format!("no agent named `{agent}` is running")),
    }));
    if action == K::Kill {
        budget_hook(daemon);
    }
    outcomes
}

/// Signals a `run` client may forward to its agent.
const FORWARDED: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

pub async fn run(
    daemon: Arc<Daemon>,
    mut stream: UnixStream,
    peer: Peer,
    req: RunRequest,
    fds: Vec<OwnedFd>,
) {
    let d = daemon.clone();
    let explain = req.explain;
    let prepared = match tokio::task::spawn_blocking(move || prepare(&d, req, &peer, fds)).await {
        Ok(Ok(p)) => p,
        Ok(Err((message, exit_code))) => {
            let _ = send(&mut stream, &Reply::Error { message, exit_code }).await;
            return;
        }
        Err(e) => {
            let _ = send(
                &mut stream,
                &Reply::Error {
                    message: format!("launch failed: {e}"),
                    exit_code: EXIT_AGENTD,
                },
            )
            .await;
            return;
        }
    };
    let state = prepared.state;
    let max_agents = daemon.settings.locked().max_agents;
    let admitted = {
        let mut agents = daemon.agents.locked();
        let room = agents.len() < max_agents;
        if room {
            agents.insert(state.name.clone(), state.clone());
        }
        room
    };
    if !admitted {
        let (d, s) = (daemon.clone(), state.clone());
        let _ = tokio::task::spawn_blocking(move || teardown(&d, &s)).await;
        let message = format!(
            "{} agents are running, the most this host allows (agents.max in {})",
            max_agents,
            daemon
                .config
                .path
                .as_ref()
                .map_or("the configuration".to_string(), |p| p.display().to_string())
        );
        let _ = send(
            &mut stream,
            &Reply::Error {
                message,
                exit_code: 1,
            },
        )
        .await;
        return;
    }
    // The parent's policy may have changed while this one was computed from it, before
    // this agent was registered where a change would find it: narrow it again.
    if let Some(parent) = state.parent_id.and_then(|id| daemon.agent_by_id(id))
        && Some(parent.live.locked().policy_id) != prepared.parent_policy_id
    {
        let d = daemon.clone();
        let _ = tokio::task::spawn_blocking(move || narrow_children(&d, &parent)).await;
    }
    reporter(&daemon);
    // Before the agent's first instruction: its budgets are charged from the start.
    if !budget_hook(&daemon)
        && crate::budgets::needs_sys_enter(&kernel_budgets(&state.live.locked().policy))
    {
        let (d, s) = (daemon.clone(), state.clone());
        let _ = tokio::task::spawn_blocking(move || teardown(&d, &s)).await;
        let message =
            "the rate budget program could not be attached (see the daemon's log)".to_string();
        let _ = send(
            &mut stream,
            &Reply::Error {
                message,
                exit_code: EXIT_AGENTD,
            },
        )
        .await;
        return;
    }
    let mut child = match launcher::spawn(prepared.plan) {
        Ok(launcher::Spawned { child, listener }) => {
            if let Some(listener) = listener {
                match crate::budgets::supervise(
                    listener,
                    &state.name,
                    process_gate(&daemon, &state),
                ) {
                    Ok(n) => *state.notifier.locked() = Some(n),
                    Err(e) => {
                        // Unanswered, its process creations fail: kill it rather than
                        // leave it half working.
                        eprintln!("agentd: agent {}: starting its notifier: {e}", state.name);
                        if let Some(c) = state.cgroup.locked().as_ref() {
                            let _ = fs::write(c.path().join("cgroup.kill"), "1");
                        }
                    }
                }
            }
            child
        }
        Err(e) => {
            let (d, s) = (daemon.clone(), state.clone());
            let _ = tokio::task::spawn_blocking(move || teardown(&d, &s)).await;
            let _ = send(
                &mut stream,
                &Reply::Error {
                    message: e.to_string(),
                    exit_code: e.exit_code(),
                },
            )
            .await;
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    *state.pid.locked() = pid;
    super::adopt::save(&daemon, &state, &state.live.locked());
    daemon.metrics.agents_started.inc();
    daemon.audit_agent(
        &state,
        "agent_started",
        serde_json::json!({
            "pid": pid,
            "user": state.identity.user,
            "uid": state.identity.uid,
            "parent": state.parent,
            "workdir": state.workdir,
            "mode": state.info(&daemon).mode,
            "degraded": prepared.degraded,
        }),
    );
    let (read, mut write) = stream.into_split();
    let info = state.info(&daemon);
    let _ = send(
        &mut write,
        &Reply::Started {
            agent: Box::new(info),
            removed_env: prepared.removed_env,
            degraded: prepared.degraded,
        },
    )
    .await;
    let mut control = BufReader::new(read);
    let mut client_gone = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            line = control_line(&mut control), if !client_gone => match line {
                Some(l) => {
                    if let Ok(RunControl::Signal { signal }) = serde_json::from_slice(&l)
                        && FORWARDED.contains(&signal)
                    {
                        // SAFETY: pid is our unreaped child, so it cannot have been reused.
                        unsafe { libc::kill(pid as i32, signal) };
                    }
                }
                _ => {
                    // The client went away: the agent goes with it.
                    client_gone = true;
                    if let Some(c) = state.cgroup.locked().as_ref() {
                        let _ = std::fs::write(c.path().join("cgroup.kill"), "1");
                    }
                }
            },
        }
    };
    // What it was denied (the events of its last moments may still be on their way: waited
    // for only when the client asked, since every launch would pay it).
    if explain {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let denials = state.explained.locked().lines(&state.name);
    // The agent ends with its first process: kill what it left running.
    let (d, s) = (daemon.clone(), state.clone());
    let _ = tokio::task::spawn_blocking(move || teardown(&d, &s)).await;
    let (code, signal) = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt as _;
            match (s.code(), s.signal()) {
                (Some(c), _) => (c, None),
                (None, Some(sig)) => (128 + sig, Some(sig)),
                _ => (EXIT_AGENTD, None),
            }
        }
        Err(_) => (EXIT_AGENTD, None),
    };
    if !client_gone {
        let _ = send(
            &mut write,
            &Reply::Exited {
                status: code,
                signal,
                denials,
            },
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_client_cannot_make_the_daemon_buffer_without_bound() {
        let mut ok = &b"{\"signal\":2}\nrest"[..];
        assert_eq!(
            control_line(&mut ok).await.as_deref(),
            Some(&b"{\"signal\":2}"[..])
        );
        // 10 MiB without a newline: refused after reading MAX_CONTROL_LINE bytes.
        let flood = vec![b'x'; 10 << 20];
        let mut r = &flood[..];
        assert_eq!(control_line(&mut r).await, None);
        assert_eq!(
            flood.len() - r.len(),
            MAX_CONTROL_LINE as usize,
            "read no more than the limit"
        );
        let mut unterminated = &b"{\"signal\":2}"[..];
        assert_eq!(control_line(&mut unterminated).await, None);
    }
}
