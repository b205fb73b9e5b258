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

mod agents;
mod dns;
mod peer;
mod serve;

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
    /// Where agents' resolvers forward allowed queries.
    pub upstream: Vec<std::net::SocketAddr>,
}

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

/// Creates the agent root, or adopts it if it exists and holds no agent.
fn prepare_root(path: &Path) -> Result<CgroupDir> {
    if path.exists() {
        let dir = CgroupDir::adopt(path)?;
        let leftovers = dir.children()?;
        if !leftovers.is_empty() {
            let _ = dir.release();
            bail!(
                "the agent root {} still holds agents from an earlier run ({}); remove them (they are killed by \
                 `echo 1 > {}/cgroup.kill`) before starting the daemon",
                path.display(),
                leftovers.join(", "),
                path.display()
            );
        }
        return Ok(dir);
    }
    let parent = path
        .parent()
        .context("the agent root has no parent directory")?;
    let name = path
        .file_name()
        .context("the agent root has no name")?
        .to_string_lossy();
    CgroupDir::create(parent, &name)
        .with_context(|| format!("creating the agent root {}", path.display()))
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
    let mount = cgroup::cgroup2_mount()?;
    let root_path = agent_root_path(&config, &mount);
    let root_dir = prepare_root(&root_path)?;
    let root = AgentRoot {
        id: root_dir.id(),
        level: cgroup::cgroup_level(&mount, &root_path)?,
    };
    let offsets = Btf::from_kernel()
        .and_then(|b| b.kernel_offsets())
        .unwrap_or_default();
    let mut kernel = ebpf::load(&LoadConfig { root, offsets })?;
    let root_file = fs::File::open(&root_path)?;
    crate::network::attach(&mut kernel, &root_file).context("attaching the egress programs")?;
    let reader = EventReader::take(&mut kernel)?;
    let enforcement = vec![
        "process: seccomp filter (x86-64, i386, x32), no_new_privs, capabilities dropped"
            .to_string(),
        "network: cgroup connect4/6 and sendmsg4/6 (allowlist), sock_create (no raw sockets), \
         skb egress (backstop); DNS through agentd's resolver"
            .to_string(),
        "files: not enforced yet by this version".to_string(),
    ];
    let upstream = match &config.dns_upstream {
        Some(list) => list.clone(),
        None => crate::network::resolver::upstream_from_resolv_conf(
            &fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        ),
    };
    if upstream.is_empty() {
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

    let control = claim_socket(&config.socket).await?;
    fs::set_permissions(&config.socket, fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = admin_gid {
        chown(&config.socket, Some(0), Some(gid))?;
    }
    let launch = claim_socket(&config.launch_socket).await?;
    fs::set_permissions(&config.launch_socket, fs::Permissions::from_mode(0o666))?;

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
        upstream,
    });
    let events_task = tokio::spawn(pump_events(daemon.clone(), reader));
    let expiry_task = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let d = daemon.clone();
                let _ = tokio::task::spawn_blocking(move || agents::expire(&d)).await;
            }
        })
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    eprintln!(
        "agentd: ready: agent root {}, control socket {}, launch socket {}",
        root_path.display(),
        daemon.config.socket.display(),
        daemon.config.launch_socket.display()
    );
    notify_ready();
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
            _ = hup.recv() => eprintln!("agentd: SIGHUP: reloading is not supported by this version; nothing changed"),
        }
    }
    eprintln!("agentd: stopping: killing every agent");
    events_task.abort();
    expiry_task.abort();
    let all: Vec<Arc<AgentState>> = daemon
        .agents
        .lock()
        .expect("not poisoned")
        .values()
        .cloned()
        .collect();
    for a in all {
        agents::teardown(&daemon, &a);
    }
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
        let mut counters = daemon.counters.lock().expect("not poisoned");
        for e in events {
            let c = counters.entry(e.header().agent).or_default();
            match (&e, e.header().verdict) {
                (_, agentd_common::events::VERDICT_AUDIT) => c.would_deny += 1,
                (Event::Net(_), _) => c.net_denied += 1,
                (Event::File(_), _) => c.file_denied += 1,
            }
        }
    }
}

/// Writes one reply line.
pub(crate) async fn send(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    reply: &Reply,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("serializable");
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
