//! The client side of the `agentd` commands that talk to the daemon: `run`, `ps`,
//! `inspect`.

use std::{
    io::{BufReader, IoSlice, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use crate::{
    config::Config,
    policy::Adjustments,
    profile::{self, Mode},
    protocol::{
        AgentInfo, EXIT_AGENTD, EXIT_POLICY, ProfileSpec, Reply, Request, RunControl, RunRequest,
        UpdateRequest,
    },
};

/// Options of `agentd run`.
#[derive(Debug, Clone, Default)]
pub struct RunArgs {
    pub profile: Option<String>,
    pub name: Option<String>,
    pub user: Option<String>,
    pub workdir: Option<PathBuf>,
    pub home: Option<PathBuf>,
    pub degraded_ok: bool,
    pub adjustments: Adjustments,
    pub verbose: bool,
    /// Say what was denied when the agent ends.
    pub explain: bool,
    pub argv: Vec<String>,
}

/// The socket this process should talk to: inside an agent, the launch socket it was
/// given; elsewhere the control socket.
/// True in a process of an agent that was told where its launch socket is.
pub fn inside_agent() -> bool {
    std::env::var_os("AGENTD_AGENT").is_some() && std::env::var_os("AGENTD_LAUNCH_SOCKET").is_some()
}

pub fn socket_path(config: &Config) -> PathBuf {
    if std::env::var_os("AGENTD_AGENT").is_some() {
        if let Some(p) = std::env::var_os("AGENTD_LAUNCH_SOCKET") {
            return PathBuf::from(p);
        }
        return config.launch_socket.clone();
    }
    config.socket.clone()
}

fn connect(path: &Path) -> Result<UnixStream, i32> {
    UnixStream::connect(path).map_err(|e| {
        eprintln!(
            "agentd: cannot reach the agentd daemon at {} ({e}); start it with `systemctl start agentd` or `sudo agentd daemon`",
            path.display()
        );
        EXIT_AGENTD
    })
}

fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    }
}

/// Sends one request line, with `fds` attached.
fn send_request(stream: &UnixStream, request: &Request, fds: &[i32]) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut sent = 0;
    while sent < line.len() {
        let iov = [IoSlice::new(&line[sent..])];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &cmsg
        } else {
            &[]
        };
        sent += sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

fn read_reply(reader: &mut impl std::io::BufRead) -> Option<Reply> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => serde_json::from_str(&line).ok(),
    }
}

/// Blocks the signals `run` forwards, in this thread and every thread it starts.
fn forwarded_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal::*};
    let mut set = SigSet::empty();
    for s in [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH] {
        set.add(s);
    }
    set
}

/// The profile as the daemon should get it: a name, or the text of a file this process
/// reads (with its own permissions).
fn profile_spec(cwd: &Path, profile: Option<&str>) -> Result<ProfileSpec, String> {
    match profile {
        None => Ok(ProfileSpec::Default),
        Some(p) if profile::is_path(p) => {
            let path = absolute(cwd, Path::new(p));
            std::fs::read_to_string(&path)
                .map(|text| ProfileSpec::Inline {
                    source: path.display().to_string(),
                    text,
                })
                .map_err(|e| format!("--profile {}: cannot read: {e}", path.display()))
        }
        Some(name) => Ok(ProfileSpec::Named(name.to_string())),
    }
}

/// Makes the paths of command-line changes absolute.
fn absolute_paths(cwd: &Path, adjustments: &Adjustments) -> Adjustments {
    let mut a = adjustments.clone();
    for list in [&mut a.allow_read, &mut a.allow_write, &mut a.deny_path] {
        for p in list.iter_mut() {
            *p = absolute(cwd, p);
        }
    }
    a
}

/// `agentd run`: returns the exit status to use.
pub fn run(config: &Config, args: RunArgs) -> i32 {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let profile = match profile_spec(&cwd, args.profile.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentd run: {e}");
            return EXIT_POLICY;
        }
    };
    let adjustments = absolute_paths(&cwd, &args.adjustments);
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let request = Request::Run(Box::new(RunRequest {
        argv: args.argv.clone(),
        env,
        cwd: cwd.clone(),
        profile,
        name: args.name.clone(),
        user: args.user.clone(),
        sudo_uid: std::env::var("SUDO_UID").ok().and_then(|s| s.parse().ok()),
        workdir: args.workdir.as_ref().map(|w| absolute(&cwd, w)),
        home: args.home.as_ref().map(|h| absolute(&cwd, h)),
        degraded_ok: args.degraded_ok,
        adjustments,
        explain: args.explain,
    }));

    // JSON carries paths as UTF-8 strings.
    if serde_json::to_vec(&request).is_err() {
        eprintln!(
            "agentd run: a path is not valid UTF-8 (the current directory {}, --workdir, --home or --profile)",
            cwd.display()
        );
        return EXIT_POLICY;
    }
    let path = socket_path(config);
    let stream = match connect(&path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // Block the forwarded signals before any other thread exists, so that only the
    // forwarding thread receives them.
    let signals = forwarded_signals();
    let _ = signals.thread_block();
    if let Err(e) = send_request(&stream, &request, &[0, 1, 2]) {
        eprintln!("agentd run: sending the request to {}: {e}", path.display());
        return EXIT_AGENTD;
    }
    let mut reader = BufReader::new(stream.try_clone().expect("clone the socket"));
    let mut forward = stream.try_clone().expect("clone the socket");
    std::thread::spawn(move || {
        while let Ok(sig) = signals.wait() {
            let mut line = serde_json::to_vec(&RunControl::Signal { signal: sig as i32 })
                .expect("serializable");
            line.push(b'\n');
            if forward.write_all(&line).is_err() {
                return;
            }
        }
    });
    let mut started: Option<AgentInfo> = None;
    loop {
        match read_reply(&mut reader) {
            Some(Reply::Started {
                agent,
                removed_env,
                degraded,
            }) => {
                // Always said, --verbose or not: the agent is less confined than its profile.
                for d in &degraded {
                    eprintln!("agentd: degraded: not enforced on this host: {d}");
                }
                if args.verbose {
                    eprintln!(
                        "agentd: agent {} started: pid {}, user {}, profile {} {} ({}), cgroup {}",
                        agent.name,
                        agent.pid,
                        agent.user,
                        agent.profile,
                        agent.version,
                        agent.mode,
                        agent.cgroup.display()
                    );
                    if !removed_env.is_empty() {
                        eprintln!(
                            "agentd: removed from its environment: {}",
                            removed_env.join(" ")
                        );
                    }
                }
                started = Some(*agent);
            }
            Some(Reply::Exited {
                status,
                signal,
                denials,
            }) => {
                if args.explain {
                    let name = started.as_ref().map_or("?", |a| a.name.as_str());
                    if denials.is_empty() {
                        eprintln!("agentd: nothing was denied to agent {name}");
                    } else {
                        eprintln!("agentd: what was denied to agent {name}, and why:");
                        for d in &denials {
                            eprintln!("  {d}");
                        }
                    }
                }
                if args.verbose {
                    let name = started.as_ref().map_or("?", |a| a.name.as_str());
                    match signal {
                        Some(s) => eprintln!(
                            "agentd: agent {name} was killed by signal {s} (status {status})"
                        ),
                        None => eprintln!("agentd: agent {name} exited with status {status}"),
                    }
                }
                return status;
            }
            Some(Reply::Error { message, exit_code }) => {
                eprintln!("agentd run: {message}");
                return exit_code;
            }
            Some(_) => {}
            None => {
                eprintln!(
                    "agentd run: the daemon closed the connection{}",
                    if started.is_some() {
                        " while the agent was running"
                    } else {
                        ""
                    }
                );
                return EXIT_AGENTD;
            }
        }
    }
}

/// Sends a request and reads one reply; prints errors. `Err` carries the exit status.
fn call(config: &Config, request: &Request) -> Result<Reply, i32> {
    let path = socket_path(config);
    let stream = connect(&path)?;
    send_request(&stream, request, &[]).map_err(|e| {
        eprintln!("agentd: sending the request to {}: {e}", path.display());
        EXIT_AGENTD
    })?;
    let mut reader = BufReader::new(stream);
    match read_reply(&mut reader) {
        Some(Reply::Error { message, exit_code }) => {
            eprintln!("agentd: {message}");
            Err(exit_code)
        }
        Some(r) => Ok(r),
        None => {
            eprintln!("agentd: the daemon closed the connection without answering");
            Err(EXIT_AGENTD)
        }
    }
}

fn uptime(started: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let s = now.saturating_sub(started);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// `agentd ps`.
pub fn ps(config: &Config, json: bool) -> i32 {
    let agents = match call(config, &Request::Ps) {
        Ok(Reply::Agents { agents }) => agents,
        Ok(_) => return EXIT_AGENTD,
        Err(code) => return code,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&agents).expect("serializable")
        );
        return 0;
    }
    if agents.is_empty() {
        println!("no agents are running");
        return 0;
    }
    println!(
        "{:<24} {:>8} {:<12} {:<20} {:<8} {:>5} {:>8}  PARENT",
        "NAME", "PID", "USER", "PROFILE", "MODE", "PROCS", "UPTIME"
    );
    for a in agents {
        println!(
            "{:<24} {:>8} {:<12} {:<20} {:<8} {:>5} {:>8}  {}",
            a.name,
            a.pid,
            a.user,
            format!("{} {}", a.profile, a.version),
            a.mode,
            a.processes,
            uptime(a.started),
            a.parent.as_deref().unwrap_or("-")
        );
    }
    0
}

/// `agentd update AGENT`.
pub fn update(
    config: &Config,
    agent: &str,
    profile: Option<&str>,
    adjustments: &Adjustments,
    mode: Option<Mode>,
    json: bool,
) -> i32 {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let profile = match profile {
        None => None,
        Some(p) => match profile_spec(&cwd, Some(p)) {
            Ok(spec) => Some(spec),
            Err(e) => {
                eprintln!("agentd update: {e}");
                return EXIT_POLICY;
            }
        },
    };
    let request = Request::Update(Box::new(UpdateRequest {
        agent: agent.to_string(),
        profile,
        adjustments: absolute_paths(&cwd, adjustments),
        mode,
    }));
    let Ok(Reply::Updated { agent, policy }) = call(config, &request) else {
        return EXIT_POLICY;
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"agent": agent, "policy": policy}))
                .expect("serializable")
        );
        return 0;
    }
    println!(
        "agent {} now runs under profile {} {} ({})",
        agent.name, agent.profile, agent.version, agent.mode
    );
    println!(
        "in force now: network egress and DNS names, audit/enforce mode; for agents it launches later: everything"
    );
    println!(
        "unchanged until the agent restarts: its user, capabilities, seccomp filter, limits and environment"
    );
    0
}

/// `agentd inspect AGENT`.
pub fn inspect(config: &Config, name: &str, json: bool) -> i32 {
    let reply = match call(
        config,
        &Request::Inspect {
            agent: name.to_string(),
        },
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let Reply::Inspect {
        agent,
        policy,
        processes,
        counters,
        denials,
    } = reply
    else {
        return EXIT_AGENTD;
    };
    if json {
        let v = serde_json::json!({
            "agent": agent, "policy": policy, "processes": processes, "counters": counters, "denials": denials,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
        return 0;
    }
    println!("agent     {} (cgroup id {})", agent.name, agent.id);
    println!("cgroup    {}", agent.cgroup.display());
    println!("user      {} (uid {})", agent.user, agent.uid);
    println!(
        "started   {} ago, first process {}",
        uptime(agent.started),
        agent.pid
    );
    println!("workdir   {}", agent.workdir.display());
    println!("tmp       {}", agent.tmp.display());
    println!(
        "resolver  {}{}",
        agent.dns,
        if agent.learned.is_empty() {
            String::new()
        } else {
            format!(" (answered: {})", agent.learned.join(", "))
        }
    );
    if let Some(p) = &agent.parent {
        println!("parent    {p}");
    }
    print!("{}", policy.describe());
    for e in &agent.enforcement {
        println!("enforced  {e}");
    }
    println!(
        "counters  {} network operations denied, {} file accesses denied, {} would-be denials (audit), \
         {} DNS queries answered, {} refused",
        counters.net_denied,
        counters.file_denied,
        counters.would_deny,
        counters.dns_answered,
        counters.dns_refused
    );
    if !denials.is_empty() {
        println!("denials   (most recent last)");
        for d in &denials {
            match &d.resolved {
                Some(r) if d.path.as_deref() != Some(r) => {
                    println!("          {} [resolved: {r}]", d.text)
                }
                _ => println!("          {}", d.text),
            }
        }
    }
    println!("processes {}", processes.len());
    for p in processes {
        println!("          {:>8} {:<16} uid {}", p.pid, p.comm, p.uid);
    }
    0
}

/// `agentd kill` / `agentd thaw`: through the daemon, or (with `direct`, or when the daemon
/// does not answer within `DAEMON_TIMEOUT`) directly on the agent cgroups, as root.
pub fn kill(
    config: &Config,
    agents: &[String],
    all: bool,
    action: crate::kill::Action,
    direct: bool,
    json: bool,
) -> i32 {
    if agents.is_empty() && !all {
        eprintln!("agentd: name the agents, or give --all");
        return EXIT_POLICY;
    }
    let outcomes = if direct {
        None
    } else {
        match call_with_timeout(
            config,
            &Request::Kill {
                agents: agents.to_vec(),
                all,
                action,
            },
        ) {
            Ok(Reply::Killed { outcomes }) => Some(outcomes),
            Ok(Reply::Error { message, exit_code }) => {
                eprintln!("agentd: {message}");
                return exit_code;
            }
            Ok(_) => {
                eprintln!("agentd: unexpected reply from the daemon");
                return EXIT_AGENTD;
            }
            Err(why) => {
                eprintln!("agentd: {why}: acting on the agent cgroups directly");
                None
            }
        }
    };
    let outcomes = match outcomes {
        Some(o) => o,
        None => {
            // SAFETY: no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("agentd: acting on agent cgroups directly needs root");
                return EXIT_AGENTD;
            }
            match crate::kill::find_root(config)
                .and_then(|root| crate::kill::direct(&root, agents, all, action))
            {
                Ok(mut o) => {
                    crate::kill::audit_direct(config, &mut o);
                    o
                }
                Err(e) => {
                    eprintln!("agentd: {e:#}");
                    return EXIT_AGENTD;
                }
            }
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "outcomes": outcomes, "direct": direct })
        );
    } else {
        if outcomes.is_empty() {
            println!("no agents are running");
        }
        for o in &outcomes {
            println!("{}", crate::kill::describe(o));
        }
    }
    if outcomes.iter().any(|o| o.error.is_some()) {
        1
    } else {
        0
    }
}

/// How long `agentd kill` waits for the daemon before acting directly.
pub const DAEMON_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A kill switch request: the daemon must accept it within [`DAEMON_TIMEOUT`] (a wedged
/// or stopped daemon does not), then answer when the work is done. `Err` says why the
/// daemon could not be used.
fn call_with_timeout(config: &Config, request: &Request) -> Result<Reply, String> {
    let path = socket_path(config);
    let stream = UnixStream::connect(&path)
        .map_err(|e| format!("the daemon at {} cannot be reached ({e})", path.display()))?;
    let timeouts = stream
        .set_write_timeout(Some(DAEMON_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(DAEMON_TIMEOUT)));
    timeouts.map_err(|e| e.to_string())?;
    send_request(&stream, request, &[])
        .map_err(|e| format!("the daemon did not take the request ({e})"))?;
    let mut reader = BufReader::new(stream);
    match read_reply(&mut reader) {
        Some(Reply::Accepted) => {}
        Some(other) => return Ok(other),
        None => {
            return Err(format!(
                "the daemon did not accept the request within {DAEMON_TIMEOUT:?}"
            ));
        }
    }
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(crate::kill::TIMEOUT + DAEMON_TIMEOUT));
    read_reply(&mut reader).ok_or_else(|| "the daemon stopped answering".to_string())
}

/// One audit record as a line for people.
pub fn describe_record(r: &serde_json::Value) -> String {
    let details = &r["details"];
    let text = details["text"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| details.to_string());
    let who = match (
        r["agent"].as_str(),
        r["profile"].as_str(),
        r["version"].as_str(),
    ) {
        (Some(a), Some(p), Some(v)) => format!("{a} ({p} {v})"),
        (Some(a), _, _) => a.to_string(),
        _ => "agentd".to_string(),
    };
    // Paths, process and DNS names come from agents: no control character reaches the
    // terminal.
    let clean = |t: &str| -> String {
        t.chars()
            .flat_map(|c| {
                if c.is_control() {
                    c.escape_default().collect::<Vec<_>>()
                } else {
                    vec![c]
                }
            })
            .collect()
    };
    format!(
        "{} #{:<6} {:<16} {}: {}",
        r["time"].as_str().unwrap_or("-"),
        r["seq"],
        clean(r["kind"].as_str().unwrap_or("?")),
        clean(&who),
        clean(&text),
    )
}

/// `agentd events`.
pub fn events(
    config: &Config,
    follow: bool,
    agent: Option<String>,
    last: usize,
    json: bool,
) -> i32 {
    let path = socket_path(config);
    let stream = match connect(&path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let request = Request::Events {
        follow,
        agent,
        last,
    };
    if let Err(e) = send_request(&stream, &request, &[]) {
        eprintln!("agentd: sending the request to {}: {e}", path.display());
        return EXIT_AGENTD;
    }
    let mut reader = BufReader::new(stream);
    let mut out = std::io::stdout().lock();
    loop {
        match read_reply(&mut reader) {
            Some(Reply::Event { record }) => {
                let line = if json {
                    record.to_string()
                } else {
                    describe_record(&record)
                };
                // Flushed per record: a pipe reader sees each as it comes.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return 0;
                }
            }
            Some(Reply::EventsEnd) => return 0,
            Some(Reply::Error { message, exit_code }) => {
                eprintln!("agentd: {message}");
                return exit_code;
            }
            Some(_) | None => {
                eprintln!("agentd: the daemon ended the stream of events");
                return EXIT_AGENTD;
            }
        }
    }
}

/// `agentd audit verify [FILES...]`.
pub fn audit_verify(config: &Config, files: Vec<PathBuf>, json: bool) -> i32 {
    // The live log is opened as it stands, without a rotation in the middle.
    let verdict = if files.is_empty() {
        match crate::audit::open_log(&config.audit_path) {
            Ok(files) if files.is_empty() => {
                eprintln!(
                    "agentd: no audit log at {} (audit.path)",
                    config.audit_path.display()
                );
                return 1;
            }
            Ok(files) => crate::audit::verify_open(files),
            Err(e) => Err(e),
        }
    } else {
        crate::audit::verify(&files)
    };
    let verdict = match verdict {
        Ok(v) => v,
        Err(e) => {
            eprintln!("agentd: {e:#}");
            return 1;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&verdict).expect("serializable")
        );
    } else if let Some(p) = &verdict.problem {
        println!(
            "audit: FAILED at {}:{}: {} (after {} good records)",
            p.file.display(),
            p.line,
            p.message,
            verdict.records
        );
    } else {
        println!(
            "audit: ok: {} records (seq {} to {}) in {} file{}",
            verdict.records,
            verdict.first_seq.unwrap_or(0),
            verdict.last_seq.unwrap_or(0),
            verdict.files.len(),
            if verdict.files.len() == 1 { "" } else { "s" }
        );
    }
    if verdict.ok { 0 } else { 1 }
}

/// `agentd reload`: the daemon reads its configuration and profiles again.
pub fn reload(config: &Config, json: bool) -> i32 {
    let report = match call(config, &Request::Reload) {
        Ok(Reply::Reloaded { report }) => report,
        Ok(_) => return EXIT_AGENTD,
        Err(code) => return code,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
        return 0;
    }
    println!("{}", report.summary());
    for m in &report.agents {
        if m.changed {
            println!("  {}: {} -> {}", m.agent, m.from, m.to);
        } else {
            println!("  {}: {} (unchanged)", m.agent, m.to);
        }
        if let Some(note) = &m.note {
            println!("    note: {note}");
        }
    }
    0
}

/// `agentd debug-log on|off`.
pub fn debug_log(config: &Config, on: bool) -> i32 {
    match call(config, &Request::DebugLog { on }) {
        Ok(Reply::DebugLog { on }) => {
            println!(
                "the kernel programs' debug log is {} (in the daemon's log)",
                if on { "on" } else { "off" }
            );
            0
        }
        Ok(_) => EXIT_AGENTD,
        Err(code) => code,
    }
}
