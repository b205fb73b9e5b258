//! `agentd daemon`: loads the kernel programs once for the agent root, starts agents on
//! request, and keeps their policy in the kernel maps.
//!
//! Two sockets:
//! - the control socket (`daemon.socket`, mode 0660, group `daemon.admin_group`): every
//!   command, for root and the admin group, never for a process inside an agent;
//! - the launch socket (`daemon.launch_socket`, mode 0666): only `run`, only from inside
//!   an agent, and the new agent's policy is the intersection of what it asks for and its
//!   parent's policy (delegation only narrows).
//!
//! Peers are identified by SO_PEERCRED and by their cgroup: a process below the agent root
//! is that agent, whatever its uid or groups.

pub(crate) mod adopt;
mod agents;
mod dns;
pub(crate) mod feed;
mod peer;
pub(crate) mod reload;
mod serve;
mod trail;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::unix::fs::{PermissionsExt as _, chown},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use tokio::{
    io::{AsyncWriteExt as _, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::{
    btf::Btf,
    cgroup::{self, Cgroup2Mount, CgroupDir},
    config::Config,
    ebpf::{self, AgentRoot, LoadConfig},
    events::{Event, EventReader},
    protocol::{Counters, Reply},
};

pub use agents::AgentState;

/// The running daemon's shared state.
pub struct Daemon {
    pub config: Config,
    pub mount: Cgroup2Mount,
    pub root: AgentRoot,
    pub root_path: PathBuf,
    /// Loaded programs and maps. Held briefly by each operation.
    pub kernel: Mutex<Ebpf>,
    /// Running agents by name.
    pub agents: Mutex<BTreeMap<String, Arc<AgentState>>>,
    /// Denials counted from kernel events, by agent id.
    pub counters: Mutex<HashMap<u64, Counters>>,
    /// What enforces each area on this host, for every agent.
    pub enforcement: Vec<String>,
    pub admin_gid: Option<u32>,
    /// Next policy id to hand out (ids are never reused).
    pub policy_ids: std::sync::atomic::AtomicU64,
    /// Resolver addresses in use (see [`dns::Slot`]).
    pub dns_slots: Mutex<std::collections::BTreeSet<u16>>,
    /// What `agentd reload` (SIGHUP) can change: the configuration's keys that take effect
    /// without a restart.
    pub settings: Mutex<reload::Settings>,
    /// Held for a whole reload or `agentd update`: a reload never applies a plan made
    /// before an update it did not see, and two reloads never interleave.
    pub policy_change: Mutex<()>,
    /// What enforces file rules on this host.
    pub file_enforcers: crate::files::Enforcers,
    /// Paths no agent may write, whatever its profile says (agentd's own files, bpffs,
    /// the cgroup file system).
    pub protected: Vec<PathBuf>,
    /// Paths no agent may read or write: the audit log's directory (its lock file) and the
    /// agents' records.
    pub hidden: Vec<PathBuf>,
    /// The Landlock path's denial reporter, attached while agents run.
    pub reporter: Mutex<Option<aya::programs::raw_trace_point::RawTracePointLinkId>>,
    /// Why rate budgets cannot be enforced here, if they cannot (the `sys_enter` program
    /// did not load).
    pub budgets_unusable: Option<String>,
    /// The `sys_enter` budget program's link, attached while some agent has budgets.
    pub budget_hook: Mutex<Option<aya::programs::raw_trace_point::RawTracePointLinkId>>,
    /// Recent denials by agent id, newest last (bounded: see [`RECENT_DENIALS`]).
    pub denials: Mutex<HashMap<u64, std::collections::VecDeque<crate::protocol::Denial>>>,
    /// Last BPF LSM file denial per thread (to drop the same denial's system call report).
    pub last_file_hook: Mutex<HashMap<u32, u64>>,
    /// The audit log, its live feed and recent records.
    pub trail: trail::Trail,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Denials kept per agent for `agentd inspect`.
pub const RECENT_DENIALS: usize = 100;

/// Picks the agent root cgroup: the configured one; under systemd (a service with
/// `Delegate=yes`) `agents/` inside the service's own cgroup; else `<cgroup2>/agentd`.
fn agent_root_path(config: &Config, mount: &Cgroup2Mount) -> PathBuf {
    if let Some(p) = &config.cgroup_root {
        return p.clone();
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    auto_root(mount, std::env::var_os("INVOCATION_ID").is_some(), &own)
}

/// The automatic agent root, given whether systemd started us and our /proc/self/cgroup.
pub fn auto_root(mount: &Cgroup2Mount, under_systemd: bool, proc_self_cgroup: &str) -> PathBuf {
    let own = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    if under_systemd && own != "/" {
        return mount
            .mount_point
            .join(own.trim_start_matches('/'))
            .join("agents");
    }
    mount.mount_point.join("agentd")
}

/// Creates the agent root, or takes the existing one; returns it with the agents an
/// earlier daemon left in it (adopted, see [`adopt`]).
fn prepare_root(path: &Path) -> Result<(CgroupDir, Vec<String>)> {
    if path.exists() {
        let dir = CgroupDir::adopt(path)?;
        let leftovers = match dir.children() {
            Ok(l) => l,
            Err(e) => {
                let _ = dir.release();
                return Err(e);
            }
        };
        return Ok((dir, leftovers));
    }
    let parent = path
        .parent()
        .context("the agent root has no parent directory")?;
    let name = path
        .file_name()
        .context("the agent root has no name")?
        .to_string_lossy();
    let dir = CgroupDir::create(parent, &name)
        .with_context(|| format!("creating the agent root {}", path.display()))?;
    Ok((dir, Vec::new()))
}

/// Checks, and creates where missing (mode 0711), the directory that holds the agents'
/// private tmp directories. The daemon creates and chowns an agent's tmp in it as root, so
/// no other user may be able to put anything there: every component of the path must be a
/// real directory (not a symlink) owned by root, and writable by no one else unless sticky
/// (as /tmp is, so a root-owned entry in it cannot be renamed or removed by others).
/// Components are checked before anything is created below them.
pub fn secure_tmp_base(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let what = || format!("agents.tmp_dir {}", path.display());
    if !path.is_absolute() {
        bail!("{}: not an absolute path", what());
    }
    let mut at = PathBuf::new();
    for c in path.components() {
        at.push(c);
        let m = match fs::symlink_metadata(&at) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o711)
                    .create(&at)
                    .with_context(|| format!("{}: creating {}", what(), at.display()))?;
                fs::symlink_metadata(&at)
            }
            m => m,
        }
        .with_context(|| format!("{}: {}", what(), at.display()))?;
        let last = at == path;
        let shared = m.mode() & 0o022 != 0 && (last || m.mode() & 0o1000 == 0);
        if m.file_type().is_symlink() || !m.is_dir() || m.uid() != 0 || shared {
            bail!(
                "{}: {} must be a directory owned by root and writable by no one else{} \
                 (it is {}, owner uid {}, mode {:o}); another user could otherwise swap an agent's tmp",
                what(),
                at.display(),
                if last { "" } else { " (or sticky)" },
                if m.file_type().is_symlink() {
                    "a symlink"
                } else if m.is_dir() {
                    "a directory"
                } else {
                    "not a directory"
                },
                m.uid(),
                m.mode() & 0o7777,
            );
        }
    }
    Ok(())
}

/// `Mutex::lock` for the daemon's shared state: a panic on another thread while it held
/// the lock does not make the state unusable (the kill switch and teardown must go on).
pub(crate) trait Locked<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a stale socket file, refusing if a daemon still answers on it.
async fn claim_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!("another agentd daemon is listening on {}", path.display());
        }
        fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
}

/// Takes `<socket dir>/agents/daemon.lock` (flock, released when the process ends), or
/// says that another daemon holds it. It lives with the records, where agents cannot
/// reach it (they could otherwise take it while no daemon runs).
fn hold_daemon_lock(config: &Config) -> Result<fs::File> {
    use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
    let path = adopt::prepare_dir(config)?.join("daemon.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another agentd daemon is running (it holds {}); stop it first",
            path.display()
        );
    }
    Ok(file)
}

/// Tells systemd (Type=notify) that the daemon is ready, if it runs under systemd.
fn notify_ready() {
    let Some(sock) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(s) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let sock = PathBuf::from(sock);
    let _ = s.send_to(b"READY=1", &sock);
}

/// Runs the daemon until SIGTERM or SIGINT; then kills every agent and cleans up.
pub async fn run(config: Config) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the daemon loads BPF programs and manages cgroups: run it as root");
    }
    // Before anything is touched: a second daemon must not adopt, sweep or unpin what
    // the running one holds. The lock is held for the daemon's whole life (two started at
    // the same moment cannot both pass), and a daemon that answers on the sockets is
    // another one even if it runs without this lock (an older build).
    let _running = hold_daemon_lock(&config)?;
    for path in [&config.socket, &config.launch_socket] {
        if UnixStream::connect(path).await.is_ok() {
            bail!("another agentd daemon is listening on {}", path.display());
        }
    }
    // Descriptors for many agents (cgroups, resolvers, pidfds) and connections; agents
    // could raise their soft limit to the hard one themselves, so nothing is given away.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    secure_tmp_base(&config.tmp_dir)?;
    let mount = cgroup::cgroup2_mount()?;
    let root_path = agent_root_path(&config, &mount);
    let (root_dir, leftovers) = prepare_root(&root_path)?;
    // With agents to adopt, a failed start must leave them as they are (contained by the
    // pins): the root is not ours to remove until the start is done.
    let adopting = !leftovers.is_empty();
    let records = match adopt::plan(&config, &root_path, &leftovers) {
        Ok(r) => r,
        Err(e) => {
            let _ = root_dir.release();
            return Err(e);
        }
    };
    let root_dir = if adopting {
        let _ = root_dir.release();
        None
    } else {
        Some(root_dir)
    };
    adopt::prepare_dir(&config)?;
    feed::prepare(&config)?;
    match config.max_tasks {
        Some(max) => cgroup::limit_tasks(&root_path, max).context("agents.max_tasks")?,
        // An adopted root may carry the cap of an earlier configuration.
        None if root_path.join("pids.max").exists() => {
            fs::write(root_path.join("pids.max"), "max").context("clearing pids.max")?
        }
        None => {}
    }
    let root = AgentRoot {
        id: cgroup::cgroup_id(&root_path)?,
        level: cgroup::cgroup_level(&mount, &root_path)?,
    };
    let offsets = Btf::from_kernel()
        .and_then(|b| b.kernel_offsets())
        .unwrap_or_default();
    // Not fatal: any local process could hold the port, and containment does not depend
    // on metrics. Bound before the programs are loaded: they refuse agents that port.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => match crate::metrics::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("agentd: {e:#}: no metrics");
                None
            }
        },
        None => None,
    };
    let metrics_port = metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or(0, |a| a.port());
    // Without agents to adopt, stale pins contain nothing and go; with them, the pins
    // stay whatever happens until the start is done.
    let mut pins = crate::ebpf::Pins::open(&config.bpffs, adopting)?;
    pins.remove_on_drop = !adopting;
    let mut kernel = ebpf::load_with(
        &LoadConfig {
            root,
            offsets,
            metrics_port,
        },
        Some(&pins),
    )?;
    let root_file = fs::File::open(&root_path)?;
    crate::network::attach(&mut kernel, &root_file, Some(&pins))
        .context("attaching the egress programs")?;
    let reader = EventReader::take(&mut kernel)?;
    // The programs' debug log (aya-log): read always, written by the programs only while
    // `agentd debug-log on`.
    let kernel_log =
        match aya_log::EbpfLogger::init_with_logger(&mut kernel, crate::events::KernelLog) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("agentd: the kernel programs' debug log is not available: {e}");
                None
            }
        };
    let file_enforcers = file_enforcers(&mut kernel, &config, &pins);
    if adopting && !file_enforcers.lsm && pins.link_path("file_open").exists() {
        // The running agents' file rules are enforced by the pinned BPF LSM programs,
        // which read rules this daemon would not write: their deny rules would be lost.
        bail!(
            "the running agents' file rules are enforced with BPF LSM, which this daemon does not \
             use ({}); start it with BPF LSM (files.enforcers) to adopt them, or end them with \
             `agentd kill --all --direct` first",
            file_enforcers.describe()
        );
    }
    let budgets_unusable = crate::budgets::load(&mut kernel)
        .err()
        .map(|e| format!("{e:#}"));
    if let Some(e) = &budgets_unusable {
        eprintln!("agentd: rate budgets cannot be enforced: {e}");
    }
    crate::budgets::apply(
        &mut kernel,
        agentd_common::budgets::HOST,
        &config.host_budgets,
    )
    .context("storing the host-wide budgets")?;
    let enforcement = vec![
        "process: seccomp filter (x86-64, i386, x32), no_new_privs, capabilities dropped"
            .to_string(),
        "network: cgroup connect4/6 and sendmsg4/6 (allowlist), sock_create (no raw sockets), \
         skb egress (backstop); DNS through agentd's resolver"
            .to_string(),
        file_enforcers.describe(),
        match &budgets_unusable {
            None => format!(
                "budgets: raw tracepoint sys_enter (token buckets per agent and class; log, throttle, kill); \
                 deny: {}, socket hooks (connects), skb egress (egress_bytes); breakers",
                if file_enforcers.lsm {
                    "BPF LSM task_alloc (processes)"
                } else {
                    "seccomp notifier answered by the daemon (processes)"
                }
            ),
            Some(_) => "budgets: NOT ENFORCED (the sys_enter program did not load); deny of connects and egress_bytes and breakers still apply".to_string(),
        },
    ];
    let protected = protected_paths(&config, &mount);
    let hidden: Vec<PathBuf> = config
        .audit_path
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .chain([adopt::records_dir(&config), feed::dir(&config)])
        .collect();
    let settings = reload::Settings::of(&config);
    if settings.upstream.is_empty() {
        eprintln!(
            "agentd: no upstream DNS resolver (dns.upstream, /etc/resolv.conf): agents' allowed names will not resolve"
        );
    }
    let admin_gid = nix::unistd::Group::from_name(&config.admin_group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    if admin_gid.is_none() {
        eprintln!(
            "agentd: group `{}` does not exist: only root can use the control socket",
            config.admin_group
        );
    }

    let audit_log = crate::audit::AuditLog::open(
        &config.audit_path,
        config.audit_max_bytes,
        config.audit_keep,
    )
    .with_context(|| format!("audit.path {}", config.audit_path.display()))?;
    let metrics = Arc::new(crate::metrics::Metrics::new()?);
    let control = claim_socket(&config.socket).await?;
    fs::set_permissions(&config.socket, fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = admin_gid {
        chown(&config.socket, Some(0), Some(gid))?;
    }
    let launch = claim_socket(&config.launch_socket).await?;
    fs::set_permissions(&config.launch_socket, fs::Permissions::from_mode(0o666))?;

    let config_aggregate_secs = config.audit_aggregate_secs;
    let daemon = Arc::new(Daemon {
        config,
        mount,
        root,
        root_path: root_path.clone(),
        kernel: Mutex::new(kernel),
        agents: Mutex::new(BTreeMap::new()),
        counters: Mutex::new(HashMap::new()),
        enforcement,
        admin_gid,
        policy_ids: std::sync::atomic::AtomicU64::new(1),
        dns_slots: Mutex::new(std::collections::BTreeSet::new()),
        settings: Mutex::new(settings),
        policy_change: Mutex::new(()),
        file_enforcers,
        protected,
        hidden,
        reporter: Mutex::new(None),
        budgets_unusable,
        budget_hook: Mutex::new(None),
        denials: Mutex::new(HashMap::new()),
        last_file_hook: Mutex::new(HashMap::new()),
        trail: trail::Trail::new(
            audit_log,
            std::time::Duration::from_secs(config_aggregate_secs),
        ),
        metrics,
    });
    for (area, enforcer) in active_enforcers(&daemon) {
        daemon
            .metrics
            .enforcers
            .with_label_values(&[area, enforcer])
            .set(1);
    }
    let adopted: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    if adopting {
        adopt::sweep(&daemon, &records).context("removing the kernel entries of ended agents")?;
        let d = daemon.clone();
        // Blocking work (map updates, cgroup files) off the async threads.
        tokio::task::block_in_place(move || adopt::adopt(&d, records));
    }
    let root_dir = match root_dir {
        Some(d) => d,
        None => CgroupDir::adopt(&root_path)?,
    };
    let events_task = tokio::spawn(pump_events(daemon.clone(), reader));
    let log_task = kernel_log.map(|logger| {
        tokio::spawn(async move {
            // SAFETY: the logger owns its ring buffer's descriptor for as long as the AsyncFd
            // owns the logger.
            let Ok(mut fd) =
                (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
            else {
                return;
            };
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        })
    });
    let expiry_task = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let d = daemon.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    agents::expire(&d);
                    d.flush_aggregated(false);
                    d.note_lost();
                })
                .await;
            }
        })
    };
    let metrics_task = metrics_listener.map(|listener| {
        let addr = listener.local_addr().ok();
        if let Some(addr) = addr {
            eprintln!("agentd: metrics: http://{addr}/metrics");
        }
        let weak = Arc::downgrade(&daemon);
        let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Some(d) = weak.upgrade() {
                d.metrics.agents_running.set(d.agents.locked().len() as i64);
                if let Ok(lost) = crate::events::lost(&d.kernel.locked()) {
                    d.metrics.events_lost.set(lost as i64);
                }
            }
        });
        tokio::spawn(crate::metrics::serve(
            listener,
            daemon.metrics.clone(),
            refresh,
        ))
    });
    let _ = daemon.audit(
        &crate::audit::Subject::daemon(),
        "daemon_started",
        serde_json::json!({
            "pid": std::process::id(),
            "agent_root": root_path,
            "enforcement": daemon.enforcement,
            "adopted": adopted,
        }),
        true,
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // `systemctl kill -s SIGUSR1 agentd`: the kill switch for every agent.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    // Where `agentd kill --direct` finds the agents without asking the daemon.
    let record = crate::kill::root_record(&daemon.config);
    if let Err(e) = fs::write(&record, format!("{}\n", root_path.display())) {
        eprintln!(
            "agentd: writing {}: {e} (agentd kill --direct will look for the root itself)",
            record.display()
        );
    }
    eprintln!(
        "agentd: ready: agent root {}, control socket {}, launch socket {}",
        root_path.display(),
        daemon.config.socket.display(),
        daemon.config.launch_socket.display()
    );
    notify_ready();
    // Started: from now on a clean stop kills the agents and removes the root and pins.
    pins.remove_on_drop = true;
    loop {
        tokio::select! {
            conn = control.accept() => {
                if let Ok((stream, _)) = conn {
                    tokio::spawn(serve::serve(daemon.clone(), stream, peer::Socket::Control));
                }
            }
            conn = launch.accept() => {
                if let Ok((stream, _)) = conn {
                    tokio::spawn(serve::serve(daemon.clone(), stream, peer::Socket::Launch));
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let d = daemon.clone();
                tokio::task::spawn_blocking(move || match reload::reload(&d) {
                    Ok(report) => eprintln!("agentd: SIGHUP: {}", report.summary()),
                    Err((message, _)) => eprintln!("agentd: SIGHUP: reload refused, nothing changed: {message}"),
                });
            }
            _ = usr1.recv() => {
                eprintln!("agentd: SIGUSR1: the kill switch for every agent");
                let d = daemon.clone();
                tokio::task::spawn_blocking(move || {
                    agents::kill_switch(&d, &[], true, crate::kill::Action::Kill)
                });
            }
        }
    }
    events_task.abort();
    expiry_task.abort();
    for t in [metrics_task, log_task].into_iter().flatten() {
        t.abort();
    }
    let all: Vec<Arc<AgentState>> = daemon.agents.locked().values().cloned().collect();
    daemon.flush_aggregated(true);
    let _ = daemon.audit(
        &crate::audit::Subject::daemon(),
        "daemon_stopping",
        serde_json::json!({
            "on_stop": daemon.config.on_stop,
            "agents": all.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
        }),
        true,
    );
    if daemon.config.on_stop == crate::config::OnStop::Keep && !all.is_empty() {
        // Nothing of theirs is undone: their cgroups, kernel entries, records and the pins
        // stay, and so does the agent root record that `agentd kill --direct` reads.
        for a in &all {
            agents::leave_running(a);
        }
        pins.remove_on_drop = false;
        let _ = root_dir.release();
        let _ = fs::remove_file(&daemon.config.socket);
        let _ = fs::remove_file(&daemon.config.launch_socket);
        eprintln!(
            "agentd: stopping (daemon.on_stop = \"keep\"): {} agents run on, contained by the pins in {}; \
             the next daemon adopts them",
            all.len(),
            daemon.config.bpffs.display()
        );
        return Ok(());
    }
    eprintln!("agentd: stopping: killing every agent");
    for a in all {
        agents::teardown(&daemon, &a);
    }
    let _ = fs::remove_file(&record);
    let _ = fs::remove_file(&daemon.config.socket);
    let _ = fs::remove_file(&daemon.config.launch_socket);
    drop(control);
    drop(launch);
    root_dir.remove().context("removing the agent root")?;
    Ok(())
}

/// Counts kernel events per agent.
async fn pump_events(daemon: Arc<Daemon>, reader: EventReader) {
    // SAFETY: the reader owns the ring buffer's descriptor for as long as the AsyncFd
    // owns the reader, and always returns that same descriptor.
    let Ok(mut fd) =
        (unsafe { AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE) })
    else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let events = guard.get_inner_mut().drain();
        guard.clear_ready();
        for e in events {
            record(&daemon, &e);
        }
    }
}

/// Counts an event and keeps it among the agent's recent denials.
pub(crate) fn record(daemon: &Arc<Daemon>, e: &Event) {
    use agentd_common::events::{HOOK_SYSCALL_EXIT, VERDICT_AUDIT};
    let h = e.header();
    // Without Landlock every file refusal is a BPF LSM hook's, which reports it: a failed
    // file call seen at `sys_exit` (attached for seccomp refusals) is then that same
    // refusal again, or one the kernel's own checks made (a ptrace check on /proc files,
    // file permissions).
    if matches!(e, Event::File(_))
        && h.hook == HOOK_SYSCALL_EXIT
        && daemon.file_enforcers.landlock.is_none()
    {
        return;
    }
    // One denial, two reports: a BPF LSM hook refused a file access and the system call
    // then failed, which the Landlock path's reporter also sees. Keep the hook's.
    if let Event::File(_) = e {
        let mut last = daemon.last_file_hook.locked();
        if h.hook == HOOK_SYSCALL_EXIT {
            if last
                .get(&h.tid)
                .is_some_and(|t| h.ktime_ns.saturating_sub(*t) < 50_000_000)
            {
                last.remove(&h.tid);
                return;
            }
        } else {
            if last.len() > 4096 {
                last.clear();
            }
            last.insert(h.tid, h.ktime_ns);
        }
    }
    let kind = match (e, h.verdict) {
        (_, VERDICT_AUDIT) => "would_deny",
        (Event::Net(_), _) => "net_denied",
        (Event::File(_), _) => "file_denied",
        (Event::Proc(_), _) => "process_denied",
        (Event::Budget(_), _) => "budget_exhausted",
        (Event::Syscall(_), _) => "syscall_denied",
    };
    let metric_kind = match e {
        Event::Net(_) => "net",
        Event::File(_) => "file",
        Event::Proc(_) => "process",
        Event::Budget(_) => "budget",
        Event::Syscall(_) => "syscall",
    };
    let verdict = if h.verdict == VERDICT_AUDIT {
        "would_deny"
    } else {
        "deny"
    };
    daemon
        .metrics
        .decisions
        .with_label_values(&[metric_kind, verdict])
        .inc();
    if let Event::Budget(b) = e {
        daemon
            .metrics
            .budget_exhaustions
            .with_label_values(&[crate::budgets::Action::from_code(b.action)
                .map_or("unknown", crate::budgets::Action::name)])
            .inc();
    }
    // Events of an agent torn down a moment ago (or of a stray cgroup) are recorded, not
    // counted: counters of gone agents would never be removed.
    let agent = daemon.agent_by_id(h.agent);
    if agent.is_some() {
        let mut counters = daemon.counters.locked();
        let c = counters.entry(h.agent).or_default();
        match (e, h.verdict) {
            (_, VERDICT_AUDIT) => c.would_deny += 1,
            (Event::Net(_), _) => c.net_denied += 1,
            (Event::File(_), _) => c.file_denied += 1,
            (Event::Proc(_) | Event::Syscall(_), _) => c.process_denied += 1,
            (Event::Budget(_), _) => c.budget_exhausted += 1,
        }
    }
    let text = match (e, &agent) {
        // The class by its name, and what was done about it.
        (Event::Budget(b), Some(_)) => {
            agents::on_budget(daemon, b).unwrap_or_else(|| e.to_string())
        }
        _ => e.to_string(),
    };
    let denial = denial_of(e, text, feed::why(e, agent.as_deref()));
    let subject = match &agent {
        Some(a) => trail::subject(a),
        None => daemon.subject_of_id(h.agent),
    };
    let _ = daemon.audit(
        &subject,
        kind,
        serde_json::to_value(&denial).unwrap_or_default(),
        false,
    );
    let Some(agent) = agent else {
        return;
    };
    feed::append(daemon, &agent, kind, &denial);
    agent.explained.locked().add(&denial);
    let mut all = daemon.denials.locked();
    let list = all.entry(h.agent).or_default();
    if list.len() == RECENT_DENIALS {
        list.pop_front();
    }
    list.push_back(denial);
}

/// What a kernel event says, for `inspect` and the audit log.
fn denial_of(e: &Event, text: String, why: String) -> crate::protocol::Denial {
    use agentd_common::events::HOOK_SYSCALL_EXIT;
    let h = e.header();
    let (path, resolved) = match e {
        Event::File(f) => {
            let path = crate::events::file_path(f);
            let resolved = (h.hook == HOOK_SYSCALL_EXIT)
                .then(|| crate::events::resolve_given(h.pid, &path))
                .flatten()
                .map(|p| p.display().to_string());
            (Some(path), resolved)
        }
        Event::Net(_) | Event::Proc(_) | Event::Budget(_) | Event::Syscall(_) => (None, None),
    };
    crate::protocol::Denial {
        hook: crate::events::hook(h.hook).to_string(),
        verdict: crate::events::verdict(h.verdict).to_string(),
        what: text
            .split_once(" (agent ")
            .map_or(text.as_str(), |(what, _)| what)
            .to_string(),
        why,
        text,
        path,
        resolved,
        pid: h.pid,
        comm: crate::events::comm(h),
    }
}

/// The enforcers in use, as (area, enforcer) labels of `agentd_enforcer_active`.
fn active_enforcers(d: &Daemon) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        ("process", "seccomp"),
        ("network", "cgroup_bpf"),
        ("kill", "cgroup_kill"),
    ];
    if d.file_enforcers.lsm {
        out.push(("files", "bpf_lsm"));
    }
    if d.file_enforcers.landlock.is_some() {
        out.push(("files", "landlock"));
    }
    if d.budgets_unusable.is_none() {
        out.push(("budgets", "sys_enter"));
    }
    out
}

/// Attaches the BPF LSM file programs if the kernel allows it; otherwise readies the
/// Landlock path's denial reporter. Landlock is used wherever the kernel has it.
fn file_enforcers(
    kernel: &mut Ebpf,
    config: &Config,
    pins: &crate::ebpf::Pins,
) -> crate::files::Enforcers {
    let landlock = crate::doctor::landlock_abi()
        .ok()
        .map(|abi| abi as u32)
        .filter(|_| config.use_landlock);
    let btf = if config.use_lsm {
        aya::Btf::from_sys_fs().map_err(|e| e.to_string())
    } else {
        Err("off in files.enforcers".into())
    };
    let lsm = match btf {
        Ok(btf) => match crate::files::attach(kernel, &btf, Some(pins)).and_then(|mut f| {
            f.extend(crate::process::attach(kernel, &btf, Some(pins))?);
            f.extend(crate::budgets::attach_lsm(kernel, &btf, Some(pins))?);
            Ok(f)
        }) {
            Ok(loaded) => {
                eprintln!("agentd: {}", crate::ebpf::describe_loaded(&loaded));
                true
            }
            Err(e) => {
                // Leave nothing half attached.
                for name in crate::files::LSM_PROGRAMS
                    .iter()
                    .chain(crate::process::LSM_PROGRAMS)
                    .chain(crate::budgets::LSM_PROGRAMS)
                {
                    let lsm: Option<&mut aya::programs::Lsm> =
                        kernel.program_mut(name).and_then(|p| p.try_into().ok());
                    if let Some(p) = lsm {
                        let _ = p.unload();
                    }
                }
                eprintln!(
                    "agentd: BPF LSM is not usable here ({e:#}); file rules are applied with Landlock"
                );
                false
            }
        },
        Err(e) => {
            eprintln!("agentd: BPF LSM is not used: {e}");
            false
        }
    };
    if let Err(e) = crate::files::load_reporter(kernel) {
        eprintln!(
            "agentd: file denials under Landlock and seccomp refusals will not be reported: {e:#}"
        );
    }
    crate::files::Enforcers { lsm, landlock }
}

/// Paths no agent may write: agentd's configuration, profiles and sockets, bpffs and the
/// cgroup file systems.
fn protected_paths(config: &Config, mount: &Cgroup2Mount) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = vec![
        PathBuf::from("/etc/agentd"),
        config.profiles_dir.clone(),
        PathBuf::from("/sys/fs/bpf"),
        config.bpffs.clone(),
        PathBuf::from("/sys/fs/cgroup"),
        mount.mount_point.clone(),
    ];
    for p in [&config.socket, &config.launch_socket] {
        if let Some(dir) = p.parent() {
            out.push(dir.to_path_buf());
        }
    }
    if let Some(dir) = config.path.as_ref().and_then(|p| p.parent()) {
        out.push(dir.to_path_buf());
    }
    if let Some(dir) = config.audit_path.parent() {
        out.push(dir.to_path_buf());
    }
    out.sort();
    out.dedup();
    out
}

/// Writes one reply line.
pub(crate) async fn send(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    reply: &Reply,
) -> std::io::Result<()> {
    // Fails (rather than panics) on what JSON cannot carry, such as a non-UTF-8 path.
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_automatic_root_follows_systemd_delegation() {
        let mount = Cgroup2Mount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/".into(),
        };
        let service = "0::/system.slice/agentd.service\n";
        assert_eq!(
            auto_root(&mount, true, service),
            Path::new("/sys/fs/cgroup/system.slice/agentd.service/agents")
        );
        assert_eq!(
            auto_root(&mount, false, service),
            Path::new("/sys/fs/cgroup/agentd")
        );
        assert_eq!(
            auto_root(&mount, true, "0::/\n"),
            Path::new("/sys/fs/cgroup/agentd")
        );
    }
}
