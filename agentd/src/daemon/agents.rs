//! Agents in the daemon: serving requests, preparing a launch, tearing an agent down.
//!
//! Order of a launch, so that no instruction of the agent runs unconfined and nothing is
//! left behind on failure: validate everything (profile, flags, user, name, workdir) →
//! create the agent's cgroup and private tmp → register the agent and its allowlist in the
//! kernel maps → spawn (the child joins the cgroup before anything else) → report
//! `started`. Teardown reverses it: kill whatever is left in the cgroup, wait until it is
//! empty, remove the kernel entries, remove the cgroup and the tmp directory.

use std::{
    collections::BTreeMap,
    fs,
    io::IoSliceMut,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::{DirBuilderExt as _, chown},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agentd_common::{
    agent::{AGENT_FLAG_AUDIT, AgentEntry},
    network::{PROTO_TCP, PROTO_UDP},
};
use ipnet::IpNet;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader, Interest},
    net::UnixStream,
};

use super::{
    Daemon,
    peer::{self, Peer, Socket},
    send,
};
use crate::{
    agent,
    cgroup::CgroupDir,
    launcher::{self, Identity, Plan},
    network::{self, Allowlist, Rule4},
    policy::Policy,
    profile::{self, Mode, Placeholders, valid_name},
    protocol::{
        AgentInfo, EXIT_AGENTD, EXIT_POLICY, ProcessInfo, ProfileSpec, Reply, Request, RunControl,
        RunRequest,
    },
    seccomp,
};

/// A running agent.
pub struct AgentState {
    pub name: String,
    pub id: u64,
    pub policy: Policy,
    pub identity: Identity,
    pub parent: Option<String>,
    pub workdir: PathBuf,
    pub tmp: PathBuf,
    pub started: u64,
    pub pid: Mutex<u32>,
    /// Taken by teardown.
    cgroup: Mutex<Option<CgroupDir>>,
    cgroup_path: PathBuf,
}

impl AgentState {
    fn processes(&self) -> Vec<u32> {
        self.cgroup
            .lock()
            .expect("not poisoned")
            .as_ref()
            .and_then(|c| c.all_processes().ok())
            .unwrap_or_default()
    }

    fn info(&self, enforcement: &[String]) -> AgentInfo {
        AgentInfo {
            name: self.name.clone(),
            id: self.id,
            cgroup: self.cgroup_path.clone(),
            pid: *self.pid.lock().expect("not poisoned"),
            user: self.identity.user.clone(),
            uid: self.identity.uid,
            profile: self.policy.profile.clone(),
            version: self.policy.version.to_string(),
            mode: match self.policy.mode {
                Mode::Enforce => "enforce".into(),
                Mode::Audit => "audit".into(),
            },
            parent: self.parent.clone(),
            started: self.started,
            processes: self.processes().len(),
            enforcement: enforcement.to_vec(),
            workdir: self.workdir.clone(),
            tmp: self.tmp.clone(),
        }
    }
}

/// A refusal: message and the exit status the client should use.
type Refusal = (String, i32);

fn refuse(message: impl Into<String>) -> Refusal {
    (message.into(), EXIT_POLICY)
}

fn internal(message: impl Into<String>) -> Refusal {
    (message.into(), EXIT_AGENTD)
}

impl Daemon {
    /// The agent root relative to the cgroup2 mount root (as /proc/PID/cgroup shows it).
    fn root_rel(&self) -> PathBuf {
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

    fn agent(&self, name: &str) -> Option<Arc<AgentState>> {
        self.agents.lock().expect("not poisoned").get(name).cloned()
    }
}

/// Reads the first request line, with any descriptors sent alongside it.
async fn read_request(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    loop {
        stream.readable().await?;
        let got = stream.try_io(Interest::READABLE, || {
            let mut buf = [0u8; 16 * 1024];
            let mut space = nix::cmsg_space!([RawFd; 3]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut new_fds = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(rights) = c {
                    // SAFETY: the kernel just installed these descriptors for us.
                    new_fds.extend(
                        rights
                            .into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let n = msg.bytes;
            Ok((buf[..n].to_vec(), new_fds))
        });
        match got {
            Ok((bytes, new_fds)) => {
                fds.extend(new_fds);
                if bytes.is_empty() {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                data.extend_from_slice(&bytes);
                if let Some(pos) = data.iter().position(|&b| b == b'\n') {
                    data.truncate(pos);
                    return Ok((data, fds));
                }
                if data.len() > crate::protocol::MAX_MESSAGE {
                    return Err(std::io::Error::other("request too large"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Serves one connection.
pub async fn serve(daemon: Arc<Daemon>, mut stream: UnixStream, socket: Socket) {
    let peer = match peer::identify(&stream, &daemon.root_rel()) {
        Ok(p) => p,
        Err(e) => {
            let _ = send(
                &mut stream,
                &Reply::Error {
                    message: format!("cannot identify the peer: {e}"),
                    exit_code: EXIT_AGENTD,
                },
            )
            .await;
            return;
        }
    };
    if let Err((message, exit_code)) = authorize(&daemon, &peer, socket) {
        let _ = send(&mut stream, &Reply::Error { message, exit_code }).await;
        return;
    }
    let (line, fds) = match read_request(&stream).await {
        Ok(x) => x,
        Err(_) => return,
    };
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(
                &mut stream,
                &Reply::Error {
                    message: format!("malformed request: {e}"),
                    exit_code: EXIT_AGENTD,
                },
            )
            .await;
            return;
        }
    };
    match (request, socket) {
        (Request::Run(req), _) => run(daemon, stream, peer, *req, fds).await,
        (Request::Ps, Socket::Control) => {
            let agents = daemon
                .agents
                .lock()
                .expect("not poisoned")
                .values()
                .map(|a| a.info(&daemon.enforcement))
                .collect();
            let _ = send(&mut stream, &Reply::Agents { agents }).await;
        }
        (Request::Inspect { agent }, Socket::Control) => {
            let reply = match daemon.agent(&agent) {
                Some(a) => Reply::Inspect {
                    agent: Box::new(a.info(&daemon.enforcement)),
                    policy: Box::new(a.policy.clone()),
                    processes: a.processes().into_iter().map(process_info).collect(),
                    counters: daemon
                        .counters
                        .lock()
                        .expect("not poisoned")
                        .get(&a.id)
                        .cloned()
                        .unwrap_or_default(),
                },
                None => Reply::Error {
                    message: format!("no agent named `{agent}` is running"),
                    exit_code: 1,
                },
            };
            let _ = send(&mut stream, &reply).await;
        }
        (_, Socket::Launch) => {
            let _ = send(
                &mut stream,
                &Reply::Error {
                    message: "only `run` is served on the launch socket".into(),
                    exit_code: EXIT_POLICY,
                },
            )
            .await;
        }
    }
}

fn process_info(pid: u32) -> ProcessInfo {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let uid = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(u32::MAX);
    ProcessInfo { pid, comm, uid }
}

/// Who may use which socket.
fn authorize(daemon: &Daemon, peer: &Peer, socket: Socket) -> Result<(), Refusal> {
    match (socket, &peer.agent) {
        (Socket::Control, Some(_)) => Err(refuse(
            "processes inside an agent may not use agentd's control socket",
        )),
        (Socket::Control, None) => {
            let admin = peer.uid == 0
                || daemon
                    .admin_gid
                    .is_some_and(|g| peer.gid == g || peer.groups.contains(&g));
            if admin {
                Ok(())
            } else {
                Err(refuse(format!(
                    "permission denied: only root and members of group `{}` may use agentd",
                    daemon.config.admin_group
                )))
            }
        }
        (Socket::Launch, Some(name)) if !name.is_empty() && daemon.agent(name).is_some() => Ok(()),
        (Socket::Launch, _) => Err(refuse(format!(
            "the launch socket serves processes inside agents; use the control socket {}",
            daemon.config.socket.display()
        ))),
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
    let name = &daemon.config.agent_user;
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
        ProfileSpec::Default => profile::load_named(dir, &daemon.config.default_profile),
        ProfileSpec::Named(n) => profile::load_named(dir, n),
        ProfileSpec::Inline { source, text } => profile::parse(text, source),
    }
    .map_err(|e| refuse(e.to_string()))
}

/// IPv4 allowlist entries of a policy (loopback included when allowed).
fn ipv4_rules(policy: &Policy) -> Vec<Rule4> {
    let mut rules: Vec<Rule4> = policy
        .network
        .allow
        .iter()
        .filter_map(|r| match r.net {
            IpNet::V4(net) => Some(Rule4 {
                net,
                first_port: r.ports.first,
                last_port: r.ports.last,
                protocols: r.ports.protocols,
            }),
            IpNet::V6(_) => None,
        })
        .collect();
    if policy.network.loopback {
        rules.push(Rule4 {
            net: "127.0.0.0/8".parse().expect("valid"),
            first_port: 0,
            last_port: u16::MAX,
            protocols: PROTO_TCP | PROTO_UDP,
        });
    }
    rules
}

/// Everything decided and created for a launch, before the spawn.
struct Prepared {
    state: Arc<AgentState>,
    plan: Plan,
    /// Environment names the filter removed (reported to the client).
    removed_env: Vec<String>,
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
            p.identity.clone()
        }
        None => resolve_user(daemon, &req)?,
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
    let tmp = daemon.config.tmp_dir.join(&name);
    let ph = Placeholders {
        workdir: workdir.clone(),
        home: identity.home.clone(),
        tmp: tmp.clone(),
    };
    let mut policy = Policy::from_profile(&profile, &ph);
    policy.adjust(&req.adjustments).map_err(refuse)?;
    if let Some(p) = &parent {
        policy = policy.intersect(&p.policy, &p.name);
    }
    // An agent can only keep capabilities the daemon itself has.
    let available = crate::caps::permitted();
    policy.capabilities.retain(|c| available & (1 << c) != 0);
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
    let allowlist = Allowlist::compile(&ipv4_rules(&policy))
        .map_err(|e| refuse(format!("network.allow: {e:#}")))?;
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
            "AGENTD_LAUNCH_SOCKET",
            daemon.config.launch_socket.display().to_string(),
        ),
    ]);
    env.retain(|(k, _)| !overrides.contains_key(k.as_str()));
    env.extend(overrides.into_iter().map(|(k, v)| (k.to_string(), v)));

    // From here on, things are created: undo them on failure.
    let cgroup =
        CgroupDir::create(&daemon.root_path, &name).map_err(|e| internal(format!("{e:#}")))?;
    let cleanup_tmp = |e: String| {
        let _ = fs::remove_dir_all(&tmp);
        internal(e)
    };
    fs::create_dir_all(&daemon.config.tmp_dir)
        .map_err(|e| internal(format!("creating {}: {e}", daemon.config.tmp_dir.display())))?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| internal(format!("creating the private tmp {}: {e}", tmp.display())))?;
    chown(&tmp, Some(identity.uid), Some(identity.gid))
        .map_err(|e| cleanup_tmp(format!("chown {}: {e}", tmp.display())))?;
    let cgroup_procs = launcher::open_cgroup_procs(cgroup.path())
        .map_err(|e| cleanup_tmp(format!("opening cgroup.procs: {e}")))?;
    let id = cgroup.id();
    {
        let mut kernel = daemon.kernel.lock().expect("not poisoned");
        let entry = AgentEntry {
            flags: if policy.mode == Mode::Audit {
                AGENT_FLAG_AUDIT
            } else {
                0
            },
            file_default_allow: policy.files.default_allow,
            policy_generation: 1,
        };
        let registered = agent::register(&mut kernel, id, entry)
            .and_then(|()| network::apply(&mut kernel, id, &allowlist));
        if let Err(e) = registered {
            let _ = network::apply(&mut kernel, id, &Allowlist::default());
            let _ = agent::unregister(&mut kernel, id);
            return Err(cleanup_tmp(format!("{e:#}")));
        }
    }
    let cgroup_path = cgroup.path().to_path_buf();
    let state = Arc::new(AgentState {
        name,
        id,
        policy,
        identity: identity.clone(),
        parent: parent.map(|p| p.name.clone()),
        workdir: workdir.clone(),
        tmp,
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        pid: Mutex::new(0),
        cgroup: Mutex::new(Some(cgroup)),
        cgroup_path,
    });
    let plan = Plan {
        argv: req.argv,
        env,
        cwd: workdir,
        cgroup_procs,
        identity,
        keep_caps,
        rlimits,
        seccomp: filter,
        stdio,
    };
    Ok(Prepared {
        state,
        plan,
        removed_env,
    })
}

/// Kills what is left of an agent, removes its kernel entries, cgroup and tmp, and
/// forgets it. Safe to call twice.
pub fn teardown(daemon: &Daemon, a: &AgentState) {
    let cgroup = a.cgroup.lock().expect("not poisoned").take();
    if let Some(cgroup) = cgroup {
        if let Err(e) = cgroup.kill_all(Duration::from_secs(10)) {
            eprintln!("agentd: agent {}: {e:#}", a.name);
        }
        // Entries are removed only once the cgroup is empty: until then a survivor would
        // be unregistered, and so denied everything (fail closed) rather than freed.
        {
            let mut kernel = daemon.kernel.lock().expect("not poisoned");
            let _ = network::apply(&mut kernel, a.id, &Allowlist::default());
            let _ = agent::unregister(&mut kernel, a.id);
        }
        if let Err(e) = cgroup.remove() {
            eprintln!("agentd: agent {}: {e:#}", a.name);
        }
    }
    let _ = fs::remove_dir_all(&a.tmp);
    daemon.agents.lock().expect("not poisoned").remove(&a.name);
    daemon.counters.lock().expect("not poisoned").remove(&a.id);
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

async fn run(
    daemon: Arc<Daemon>,
    mut stream: UnixStream,
    peer: Peer,
    req: RunRequest,
    fds: Vec<OwnedFd>,
) {
    let prepared = match prepare(&daemon, req, &peer, fds) {
        Ok(p) => p,
        Err((message, exit_code)) => {
            let _ = send(&mut stream, &Reply::Error { message, exit_code }).await;
            return;
        }
    };
    let state = prepared.state;
    daemon
        .agents
        .lock()
        .expect("not poisoned")
        .insert(state.name.clone(), state.clone());
    let removed_env = prepared.removed_env;
    let mut child = match launcher::spawn(prepared.plan) {
        Ok(c) => c,
        Err(e) => {
            teardown(&daemon, &state);
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
    *state.pid.lock().expect("not poisoned") = pid;
    let (read, mut write) = stream.into_split();
    let _ = send(
        &mut write,
        &Reply::Started {
            agent: Box::new(state.info(&daemon.enforcement)),
            removed_env,
        },
    )
    .await;
    let mut lines = BufReader::new(read).lines();
    let mut client_gone = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            line = lines.next_line(), if !client_gone => match line {
                Ok(Some(l)) => {
                    if let Ok(RunControl::Signal { signal }) = serde_json::from_str(&l)
                        && FORWARDED.contains(&signal)
                    {
                        // SAFETY: pid is our unreaped child, so it cannot have been reused.
                        unsafe { libc::kill(pid as i32, signal) };
                    }
                }
                _ => {
                    // The client went away: the agent goes with it.
                    client_gone = true;
                    if let Some(c) = state.cgroup.lock().expect("not poisoned").as_ref() {
                        let _ = std::fs::write(c.path().join("cgroup.kill"), "1");
                    }
                }
            },
        }
    };
    // The agent ends with its first process: kill what it left running.
    let teardown_daemon = daemon.clone();
    let teardown_state = state.clone();
    let _ = tokio::task::spawn_blocking(move || teardown(&teardown_daemon, &teardown_state)).await;
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
            },
        )
        .await;
    }
}
