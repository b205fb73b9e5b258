//! `cargo xtask demo`: what agentd does, as a short story a newcomer can follow.
//!
//! It runs `cargo xtask setup`'s work (idempotent) and the release build, then starts a
//! daemon of its own with agentd's built-in defaults, moved only where it must be to live
//! in a temporary root: its sockets, audit log and agents' tmp in
//! `$TMPDIR/agentd-demo-<pid>`, its agent cgroups below `<cgroup2>/agentd-demo-<pid>`, its
//! pins in `/sys/fs/bpf/agentd-demo-<pid>`, a free resolver port, no metrics listener,
//! agents as `nobody`, this checkout's profiles. Then:
//!
//! 1. an agent under the `default` profile, allowed one loopback port (the demo's own web
//!    server), downloads a file from it, tries a port it is not allowed, reads a secret the
//!    demo planted in its home, shows up in `agentd ps`, and runs a fork loop past its
//!    processes budget;
//! 2. `agentd events` and `agentd audit verify` show what agentd recorded;
//! 3. the kill switch ends a second agent and its children;
//! 4. the daemon stops and everything the demo created is removed, also when a step fails
//!    or on Ctrl-C (a guard that cleans up on drop; SIGINT, SIGTERM and SIGHUP only set a
//!    flag that the demo's waits check).
//!
//! Each step checks what the kernel did: the demo exits non-zero if any step did not
//! behave as its line says. `cargo xtask test` runs it (stage `demo`) and then checks that
//! nothing is left behind.

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    os::unix::{
        fs::{DirBuilderExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    host::{
        cgroup2_mount, check_interrupted, free_port, install_signal_handlers, proc_pids,
        remove_cgroup_tree, tail, wait_for, wait_until,
    },
    util::{is_root, workspace_root},
};

#[derive(clap::Args)]
pub struct Options {
    /// Use this agentd binary and skip setup and the release build (the test command's
    /// `demo` stage passes the binary it built).
    #[arg(long, value_name = "PATH")]
    pub agentd: Option<PathBuf>,
}

/// Every cgroup, pin directory and temporary directory a demo creates is named
/// `agentd-demo-<pid of the demo>`.
pub const NAME_PREFIX: &str = "agentd-demo-";

const AGENT: &str = "demo-agent";
const SLEEPER: &str = "demo-sleeper";
/// What the agent downloads: 64 KiB of text.
const REPORT_BYTES: usize = 64 * 1024;
/// The fork loop stops by itself after this many processes if nothing stops it first.
const FORK_LIMIT: u64 = 50_000;

/// The demo agent: one step per line of JSON on stdout. After the secret it waits for a
/// line on stdin (the demo shows `agentd ps` meanwhile), then runs the fork loop.
const AGENT_SCRIPT: &str = r#"
import json, os, socket, sys, time, urllib.request
url, port, secret, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def say(**kw):
    print(json.dumps(kw), flush=True)
def failed(step, e):
    errno = getattr(e, "errno", None)
    say(step=step, ok=False, errno=errno, error=os.strerror(errno) if errno else repr(e))
try:
    body = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10).read()
    say(step="download", ok=True, bytes=len(body))
except Exception as e:
    failed("download", e)
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(("127.0.0.1", port))
    say(step="connect", ok=True)
except OSError as e:
    failed("connect", e)
s.close()
try:
    with open(secret, "rb") as f:
        say(step="secret", ok=True, bytes=len(f.read()))
except OSError as e:
    failed("secret", e)
say(step="waiting")
sys.stdin.readline()
start, n = time.monotonic(), 0
while n < limit:
    if os.fork() == 0:
        os._exit(0)
    n += 1
    if n % 10 == 0:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
    if n % 100 == 0:
        say(step="fork", n=n, secs=time.monotonic() - start)
say(step="fork-done", n=n)
"#;

/// The second agent: five loops of `sleep 1`, each in a subshell of its own.
const SLEEPER_SCRIPT: &str = "for i in 1 2 3 4 5; do (while true; do sleep 1; done) & done; wait";

pub fn run(opts: Options) -> Result<()> {
    if !is_root() {
        bail!(
            "the demo runs agentd's daemon, which loads BPF programs and creates cgroups: \
             run `sudo cargo xtask demo` (or as root)"
        );
    }
    let agentd = match opts.agentd {
        Some(p) => fs::canonicalize(&p).with_context(|| format!("--agentd {}", p.display()))?,
        None => {
            crate::setup::run(crate::setup::Options {})?;
            crate::build::run(crate::build::Options {})?;
            workspace_root().join("target/release/agentd")
        }
    };
    let python = PathBuf::from("/usr/bin/python3");
    if !python.is_file() {
        bail!("the demo agent runs /usr/bin/python3, which is missing: run `cargo xtask setup`");
    }
    install_signal_handlers();
    println!();
    let mut demo = Demo::create(agentd, python)?;
    let outcome = story(&mut demo);
    // Stop and clean up in every case; say what was done only if the story got through.
    let left = demo.finish();
    match (&outcome, left.is_empty()) {
        (Ok(()), true) => {
            say("4. Stop: the daemon stopped (SIGTERM) and removed its cgroups and pins;");
            say(format!(
                "   the demo stopped its web server and removed {}. Nothing is left.",
                demo.dir.display()
            ));
        }
        (_, false) => {
            for l in &left {
                demo.unexpected(l);
            }
        }
        (Err(_), true) => say(
            "demo: stopped early; the daemon, its agents and everything the demo created were \
             removed",
        ),
    }
    outcome?;
    if !demo.failures.is_empty() {
        bail!(
            "{} step(s) did not behave as described:\n  {}",
            demo.failures.len(),
            demo.failures.join("\n  ")
        );
    }
    say("demo: every step behaved as described.");
    Ok(())
}

fn say(line: impl std::fmt::Display) {
    println!("{line}");
}

/// The story; checks that fail are collected in `demo.failures` (and said at once), errors
/// stop it.
fn story(demo: &mut Demo) -> Result<()> {
    say(
        "agentd demo: a daemon of its own and two agents; everything it creates is removed at the end.",
    );
    let pid = demo.start_daemon()?;
    say(format!(
        "The daemon (pid {pid}) runs with agentd's built-in defaults; only where it keeps things is changed:"
    ));
    say(format!(
        "  files in {}; agent cgroups (the kernel's group of each agent's processes)",
        demo.dir.display()
    ));
    say(format!(
        "  in {}; pins (kernel state that keeps agents contained",
        demo.cgroup.display()
    ));
    say(format!(
        "  if the daemon dies) in {}. Agents run as user nobody.",
        demo.bpffs.display()
    ));
    first_agent(demo)?;
    records(demo)?;
    kill_switch(demo)?;
    Ok(())
}

fn first_agent(demo: &mut Demo) -> Result<()> {
    let web = WebServer::start(report())?;
    let web_port = web.addr.port();
    let url = format!("http://127.0.0.1:{web_port}/report.txt");
    demo.web = Some(web);
    // A port the agent is not allowed: a listener of the demo's, to see whether anything
    // reached it.
    let closed = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    closed.set_nonblocking(true)?;
    let closed_port = closed.local_addr()?.port();
    let secret = demo.plant_secret()?;

    say("");
    say(format!(
        "1. Agent \"{AGENT}\" starts under the `default` profile (no network; secrets in its home"
    ));
    say(format!(
        "   denied), plus `--allow-net 127.0.0.1:{web_port}`: the demo's web server, and only it."
    ));
    let started = Instant::now();
    let mut agent = demo.start_agent(
        AGENT,
        &[
            "--home",
            &demo.dir.join("home").display().to_string(),
            "--allow-net",
            &format!("127.0.0.1:{web_port}"),
        ],
        &[
            demo.python.display().to_string().as_str(),
            "-c",
            AGENT_SCRIPT,
            &url,
            &closed_port.to_string(),
            &secret.display().to_string(),
            &FORK_LIMIT.to_string(),
        ],
    )?;

    // Download: allowed.
    let v = agent.step("download")?;
    let served = demo.web.as_ref().map_or(0, |w| w.served());
    if v["ok"] == true && v["bytes"] == REPORT_BYTES && served == 1 {
        say(format!("   It downloads {url}:"));
        say(format!(
            "     allowed: {} bytes received (--allow-net opened that address and port).",
            thousands(REPORT_BYTES as u64)
        ));
    } else {
        demo.unexpected(format!(
            "the allowed download did not arrive whole: the agent said {v}, the server served {served} request(s)"
        ));
    }

    // Connect to a port not allowed: EPERM, and nothing reaches the listener.
    let v = agent.step("connect")?;
    let reached = match closed.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => return Err(e).context("checking the demo's listener"),
    };
    if v["ok"] == false && v["errno"] == libc::EPERM && !reached {
        say(format!(
            "   It connects to 127.0.0.1:{closed_port}, where the demo listens too (no rule allows it):"
        ));
        say(
            "     denied: EPERM (\"Operation not permitted\") from agentd's program in the kernel;\n     \
             the demo's listener received nothing.",
        );
    } else {
        demo.unexpected(format!(
            "the connect to 127.0.0.1:{closed_port} was not refused with EPERM: the agent said {v}, \
             the listener {}",
            if reached { "received a connection" } else { "received nothing" }
        ));
    }
    drop(closed);

    // The planted secret: readable by nobody outside agentd, denied inside.
    let v = agent.step("secret")?;
    let outside = read_as_nobody(&secret);
    if v["ok"] == false && v["errno"] == libc::EACCES && outside.is_ok() {
        say(
            "   It reads ~/.ssh/id_ed25519, a key the demo planted (user nobody can read it outside agentd):",
        );
        say(
            "     denied: EACCES (\"Permission denied\"): the profile denies {home}/.ssh, whatever the file's mode.",
        );
    } else {
        demo.unexpected(format!(
            "reading the planted key: the agent said {v}; outside agentd, as nobody: {}",
            match &outside {
                Ok(()) => "read".to_string(),
                Err(e) => format!("{e:#}"),
            }
        ));
    }

    // While it waits: agentd ps, and its budget.
    agent.step("waiting")?;
    let ps = demo.agentd(&["ps"])?;
    say("   `agentd ps` (the running agents) while it waits:");
    for line in String::from_utf8_lossy(&ps.stdout).lines() {
        say(format!("     {line}"));
    }
    if !String::from_utf8_lossy(&ps.stdout)
        .lines()
        .any(|l| l.starts_with(AGENT))
    {
        demo.unexpected(format!("`agentd ps` does not list {AGENT}"));
    }
    let inspect: Value =
        serde_json::from_slice(&demo.agentd(&["inspect", AGENT, "--json"])?.stdout)
            .context("reading `agentd inspect --json`")?;
    let budget = &inspect["policy"]["budgets"]["processes"];
    let (Some(rate), Some(burst), Some(action)) = (
        budget["rate"].as_u64(),
        budget["burst"].as_u64(),
        budget["action"].as_str(),
    ) else {
        bail!("the default profile has no processes budget (agentd inspect says {budget})");
    };

    // The fork loop: killed by the kernel past the budget.
    agent.go()?;
    let mut last = (0u64, 0f64);
    let mut done = None;
    while let Some(v) = agent.next(Duration::from_secs(60))? {
        match v["step"].as_str() {
            Some("fork") => {
                last = (
                    v["n"].as_u64().unwrap_or(0),
                    v["secs"].as_f64().unwrap_or(0.0),
                )
            }
            Some("fork-done") => done = v["n"].as_u64(),
            _ => {}
        }
    }
    let status = agent.wait(Duration::from_secs(20))?;
    let lived = started.elapsed().as_secs_f64();
    let allowance = burst as f64 + rate as f64 * lived;
    let events = demo.events_until(AGENT, &["agent_ended"], Duration::from_secs(10))?;
    let exhausted = events
        .iter()
        .any(|e| e["kind"] == "budget_exhausted" && text_of(e).contains("budget processes"));
    let killed = status == 128 + libc::SIGKILL;
    if killed && done.is_none() && exhausted && last.0 >= burst && last.0 as f64 <= allowance {
        say(format!(
            "   It starts new processes in a loop (a fork loop), past its budget of {} at once, then {rate} a second:",
            thousands(burst)
        ));
        say(format!(
            "     killed by the kernel (SIGKILL, the budget's action \"{action}\") after {} processes in {:.1} s.",
            thousands(last.0),
            last.1,
        ));
    } else {
        demo.unexpected(format!(
            "the fork loop was not stopped by the budget ({burst} at once, {rate}/s, {action}): \
             `agentd run` exited {status}, {} processes reported{}, budget event {}",
            last.0,
            if done.is_some() {
                ", the loop ran to its end"
            } else {
                ""
            },
            if exhausted { "recorded" } else { "missing" }
        ));
    }
    if let Some(web) = demo.web.take() {
        web.stop();
    }
    Ok(())
}

fn records(demo: &mut Demo) -> Result<()> {
    say("");
    say(format!(
        "2. What agentd recorded, `agentd events --agent {AGENT}` (each line a record of its audit log):"
    ));
    let out = demo.agentd(&["events", "--agent", AGENT, "-n", "50"])?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        say(format!("     {}", shorten(line, 140)));
    }
    let events = demo.events_until(AGENT, &["agent_ended"], Duration::from_secs(5))?;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    for want in [
        "agent_started",
        "net_denied",
        "file_denied",
        "budget_exhausted",
        "agent_ended",
    ] {
        if !kinds.contains(&want) {
            demo.unexpected(format!(
                "no `{want}` record for {AGENT} (records: {kinds:?})"
            ));
        }
    }
    let verify = demo.agentd_status(&["audit", "verify"])?;
    let text = String::from_utf8_lossy(&verify.stdout).trim().to_string();
    if verify.status.success() {
        say(format!("   `agentd audit verify`: {text}"));
        say(
            "     (each record holds the hash of the one before: a changed, removed or reordered record shows)",
        );
    } else {
        demo.unexpected(format!(
            "`agentd audit verify` failed on the demo's log: {text}"
        ));
    }
    // A copy of the log in which the denied connect was made to read "allowed": verify
    // names the line.
    let copy = demo.dir.join("audit-copy.jsonl");
    let text = fs::read_to_string(&demo.audit).context("reading the audit log")?;
    let mut changed = None;
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if changed.is_none()
                && l.contains("\"kind\":\"net_denied\"")
                && l.contains("/tcp denied")
            {
                changed = Some(i + 1);
                l.replacen("/tcp denied", "/tcp allowed", 1)
            } else {
                l.to_string()
            }
        })
        .collect();
    fs::write(&copy, lines.join("\n") + "\n")?;
    let tampered = demo.agentd_status(&["audit", "verify", &copy.display().to_string()])?;
    let said = String::from_utf8_lossy(&tampered.stdout).trim().to_string();
    let said = said.replace(&copy.display().to_string(), "audit-copy.jsonl");
    match changed {
        Some(line) if !tampered.status.success() && said.contains(&format!(":{line}:")) => {
            say("   The same check on a copy of the log in which the denied connect was edited to read \"allowed\":");
            say(format!("     {}", shorten(&said, 130)));
        }
        _ => demo.unexpected(format!(
            "`agentd audit verify` did not find the changed record (line {changed:?}) of a copy ({:?}): {said}",
            tampered.status.code()
        )),
    }
    Ok(())
}

fn kill_switch(demo: &mut Demo) -> Result<()> {
    say("");
    say(format!(
        "3. The kill switch: agent \"{SLEEPER}\" runs five loops of `sleep 1`, each in a process of its own."
    ));
    let mut agent = demo.start_agent(SLEEPER, &[], &["/bin/sh", "-c", SLEEPER_SCRIPT])?;
    let procs = demo.cgroup.join(SLEEPER).join("cgroup.procs");
    let count = || {
        fs::read_to_string(&procs)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    if !wait_until(Duration::from_secs(15), || count() >= 11)? {
        demo.unexpected(format!(
            "{SLEEPER} did not reach its 11 processes ({} now)",
            count()
        ));
    }
    let out = demo.agentd_status(&["kill", SLEEPER])?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let status = agent.wait(Duration::from_secs(10))?;
    let gone = wait_until(Duration::from_secs(5), || !procs.exists())?;
    let survivors = processes_in(&format!("{}/{SLEEPER}", demo.cgroup_rel()));
    if out.status.success()
        && text.starts_with(&format!("killed {SLEEPER}:"))
        && status == 128 + libc::SIGKILL
        && gone
        && survivors.is_empty()
    {
        say(format!(
            "   `agentd kill {SLEEPER}` (every process of the agent, at once):"
        ));
        say(format!(
            "     {text}; its cgroup is gone and no process of it is left."
        ));
    } else {
        demo.unexpected(format!(
            "`agentd kill {SLEEPER}` said {text:?} ({:?}); its `agentd run` exited {status}; \
             cgroup {}; processes left: {survivors:?}",
            out.status.code(),
            if gone { "gone" } else { "still there" }
        ));
    }
    say("");
    Ok(())
}

/// The demo's own daemon, agents and files; removed on drop.
pub struct Demo {
    agentd: PathBuf,
    python: PathBuf,
    /// `$TMPDIR/agentd-demo-<pid>`: configuration, sockets, audit log, agents' home and tmp.
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    audit: PathBuf,
    log: PathBuf,
    /// The daemon's agent root and pins.
    cgroup: PathBuf,
    mount: PathBuf,
    bpffs: PathBuf,
    daemon: Option<Child>,
    /// `agentd run` clients still to be reaped.
    clients: Vec<Child>,
    web: Option<WebServer>,
    failures: Vec<String>,
    finished: bool,
}

impl Demo {
    fn create(agentd: PathBuf, python: PathBuf) -> Result<Demo> {
        let name = format!("{NAME_PREFIX}{}", std::process::id());
        let mount = cgroup2_mount()?;
        let dir = std::env::temp_dir().join(&name);
        let cgroup = mount.join(&name);
        let bpffs = PathBuf::from("/sys/fs/bpf").join(&name);
        for p in [&dir, &cgroup, &bpffs] {
            if p.exists() {
                bail!(
                    "{} exists (left by an earlier demo with the same process id?): remove it first",
                    p.display()
                );
            }
        }
        // From here on the guard removes what was created, whatever happens.
        let demo = Demo {
            agentd,
            python,
            config: dir.join("agentd.toml"),
            socket: dir.join("agentd.sock"),
            audit: dir.join("audit/audit.jsonl"),
            log: dir.join("daemon.log"),
            cgroup,
            mount,
            bpffs,
            dir,
            daemon: None,
            clients: Vec::new(),
            web: None,
            failures: Vec::new(),
            finished: false,
        };
        // Agents run as nobody: the directory must be enterable; the daemon wants the base
        // of the agents' tmp root-owned and writable by no one else.
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&demo.dir)
            .with_context(|| format!("creating {}", demo.dir.display()))?;
        fs::set_permissions(&demo.dir, fs::Permissions::from_mode(0o755))?;
        for sub in ["work", "home"] {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(demo.dir.join(sub))?;
        }
        fs::write(
            &demo.config,
            format!(
                "# Written by `cargo xtask demo`: agentd's built-in defaults, except what must\n\
                 # live in the demo's temporary root.\n\
                 [daemon]\nsocket = \"{}\"\nlaunch_socket = \"{}\"\n\
                 cgroup_root = \"{}\"\nbpffs = \"{}\"\n\
                 [agents]\nprofiles_dir = \"{}\"\nuser = \"nobody\"\ntmp_dir = \"{}\"\n\
                 [dns]\nport = {}\n\
                 [audit]\npath = \"{}\"\n\
                 [metrics]\nlisten = \"off\"\n",
                demo.socket.display(),
                demo.dir.join("launch.sock").display(),
                demo.cgroup.display(),
                demo.bpffs.display(),
                workspace_root().join("profiles").display(),
                demo.dir.join("tmp").display(),
                free_port()?,
                demo.audit.display(),
            ),
        )?;
        Ok(demo)
    }

    /// The agent root relative to the cgroup2 mount, as /proc/PID/cgroup shows it.
    fn cgroup_rel(&self) -> String {
        format!(
            "/{}",
            self.cgroup
                .strip_prefix(&self.mount)
                .unwrap_or(&self.cgroup)
                .display()
        )
    }

    fn unexpected(&mut self, what: impl Into<String>) {
        let what = what.into();
        say(format!("   UNEXPECTED: {what}"));
        self.failures.push(what);
    }

    fn start_daemon(&mut self) -> Result<u32> {
        let log = File::create(&self.log)?;
        let mut cmd = Command::new(&self.agentd);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("daemon")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        detach(&mut cmd);
        let child = cmd.spawn().context("starting agentd daemon")?;
        let pid = child.id();
        self.daemon = Some(child);
        let ready = wait_until(Duration::from_secs(60), || {
            fs::read_to_string(&self.log).is_ok_and(|l| l.contains("agentd: ready:"))
                || self.daemon_exited()
        })?;
        if !ready || self.daemon_exited() {
            bail!(
                "the daemon did not start; its log:\n{}",
                tail(&self.log, 20)
            );
        }
        Ok(pid)
    }

    fn daemon_exited(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.agentd);
        c.arg("--config").arg(&self.config);
        // Agents get the client's environment (less what looks secret): give them a plain
        // one, without proxies or the caller's SUDO_UID.
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8");
        c
    }

    /// `agentd ARGS`, which must succeed.
    fn agentd(&self, args: &[&str]) -> Result<Output> {
        let out = self.agentd_status(args)?;
        if !out.status.success() {
            bail!(
                "`agentd {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// `agentd ARGS`, whatever its status.
    fn agentd_status(&self, args: &[&str]) -> Result<Output> {
        check_interrupted()?;
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running agentd {}", args.join(" ")))
    }

    /// `agentd run --name NAME FLAGS -- CMD`, its stdin and stdout piped to the demo.
    fn start_agent(&mut self, name: &str, flags: &[&str], cmd: &[&str]) -> Result<Agent> {
        let err = self.dir.join(format!("{name}.stderr"));
        let mut c = self.command();
        c.args(["run", "--name", name, "--workdir"])
            .arg(self.dir.join("work"))
            .args(flags)
            .arg("--")
            .args(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&err)?);
        detach(&mut c);
        let mut child = c.spawn().context("starting agentd run")?;
        let input = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        self.clients.push(child);
        Ok(Agent {
            name: name.to_string(),
            pid,
            input,
            lines,
            err,
        })
    }

    fn plant_secret(&self) -> Result<PathBuf> {
        let ssh = self.dir.join("home/.ssh");
        fs::DirBuilder::new().mode(0o755).create(&ssh)?;
        let key = ssh.join("id_ed25519");
        fs::write(
            &key,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nplanted by cargo xtask demo: not a real key\n\
             -----END OPENSSH PRIVATE KEY-----\n",
        )?;
        // Readable by everyone: only agentd can keep the agent from it.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644))?;
        Ok(key)
    }

    /// The agent's audit records once one of each of `kinds` is among them (or the timeout
    /// passed).
    fn events_until(&self, agent: &str, kinds: &[&str], timeout: Duration) -> Result<Vec<Value>> {
        let read = || -> Result<Vec<Value>> {
            let out = self.agentd(&["events", "--agent", agent, "--json", "-n", "1000"])?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect())
        };
        let mut events = read()?;
        let deadline = Instant::now() + timeout;
        while !kinds.iter().all(|k| events.iter().any(|e| e["kind"] == *k))
            && Instant::now() < deadline
        {
            check_interrupted()?;
            thread::sleep(Duration::from_millis(50));
            events = read()?;
        }
        Ok(events)
    }

    /// Stops the daemon, reaps the clients, stops the web server, removes what the daemon
    /// did not and the demo's directory. Returns what was not as it should be.
    fn finish(&mut self) -> Vec<String> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        let mut problems = Vec::new();
        if let Some(web) = self.web.take() {
            web.stop();
        }
        if let Some(mut daemon) = self.daemon.take() {
            if matches!(daemon.try_wait(), Ok(None)) {
                // SAFETY: signals our own child.
                unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
                if !wait_for(Duration::from_secs(20), || {
                    !matches!(daemon.try_wait(), Ok(None))
                }) {
                    problems.push("the daemon did not stop within 20 s of SIGTERM".to_string());
                    let _ = daemon.kill();
                }
            }
            let _ = daemon.wait();
        }
        for mut c in self.clients.drain(..) {
            if !wait_for(Duration::from_secs(5), || !matches!(c.try_wait(), Ok(None))) {
                problems.push(format!(
                    "an `agentd run` client (pid {}) was still running",
                    c.id()
                ));
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        // The daemon removes its agent root and pins when it stops; whatever is left is
        // ours to remove.
        if self.cgroup.exists() {
            problems.push(format!(
                "the daemon left its cgroup {}",
                self.cgroup.display()
            ));
            if let Err(e) = remove_cgroup_tree(&self.cgroup) {
                problems.push(format!("removing {}: {e:#}", self.cgroup.display()));
            }
        }
        if self.bpffs.exists() {
            problems.push(format!(
                "the daemon left its pins in {}",
                self.bpffs.display()
            ));
            let _ = fs::remove_dir_all(&self.bpffs);
        }
        if !problems.is_empty() && self.log.exists() {
            problems.push(format!("the daemon's log ends:\n{}", tail(&self.log, 15)));
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            problems.push(format!("removing {}: {e}", self.dir.display()));
        }
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Children of the fork loop that were not reaped when it was killed are zombies
        // until the host's init reaps them: give it a moment.
        let mut left = leftovers(&name, false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !left.is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            left = leftovers(&name, false);
        }
        problems.extend(left);
        problems
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for p in self.finish() {
            eprintln!("demo: cleanup: {p}");
        }
    }
}

/// A demo agent's `agentd run` client and its output lines.
struct Agent {
    name: String,
    pid: u32,
    input: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    err: PathBuf,
}

impl Agent {
    /// The next JSON line, `None` at the end of its output.
    fn next(&mut self, timeout: Duration) -> Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str(&line) {
                        return Ok(Some(v));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(None),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    bail!(
                        "agent {} said nothing for {timeout:?}; its stderr: {}",
                        self.name,
                        fs::read_to_string(&self.err).unwrap_or_default().trim()
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// The line of step `step`.
    fn step(&mut self, step: &str) -> Result<Value> {
        match self.next(Duration::from_secs(30))? {
            Some(v) if v["step"] == step => Ok(v),
            Some(v) => bail!("agent {}: expected step {step}, got {v}", self.name),
            None => bail!(
                "agent {} ended before step {step}; its stderr: {}",
                self.name,
                fs::read_to_string(&self.err).unwrap_or_default().trim()
            ),
        }
    }

    /// Lets a waiting agent go on.
    fn go(&mut self) -> Result<()> {
        let mut input = self.input.take().context("the agent's stdin")?;
        writeln!(input, "go")?;
        Ok(())
    }

    /// The exit code of its `agentd run` (128+N when killed by signal N), once it exits.
    fn wait(&mut self, timeout: Duration) -> Result<i32> {
        self.input = None;
        let mut status = None;
        wait_until(timeout, || {
            status = exit_code(self.pid);
            status.is_some()
        })?;
        status.with_context(|| format!("`agentd run` of {} did not exit", self.name))
    }
}

/// The exit status of a child that has exited, without reaping it (the guard does): from
/// waitid with WNOWAIT.
fn exit_code(pid: u32) -> Option<i32> {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with a valid siginfo_t.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid and si_status are valid for the SIGCHLD-style info waitid fills in.
    let (who, code) = unsafe { (info.si_pid(), info.si_status()) };
    if r != 0 || who == 0 {
        return None;
    }
    Some(match info.si_code {
        libc::CLD_EXITED => code,
        _ => 128 + code,
    })
}

/// The demo's web server on loopback: answers every request with the report.
struct WebServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU32>,
    thread: Option<thread::JoinHandle<()>>,
}

impl WebServer {
    fn start(body: Vec<u8>) -> Result<WebServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the web server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU32::new(0));
        let (st, sv) = (stop.clone(), served.clone());
        let thread = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let head = format!(
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                             Connection: close\r\n\r\n",
                            body.len()
                        );
                        if s.write_all(head.as_bytes()).is_ok() && s.write_all(&body).is_ok() {
                            sv.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(WebServer {
            addr,
            stop,
            served,
            thread: Some(thread),
        })
    }

    fn served(&self) -> u32 {
        self.served.load(Ordering::Relaxed)
    }

    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The file the agent downloads.
fn report() -> Vec<u8> {
    let mut text = String::new();
    let mut n = 1;
    while text.len() < REPORT_BYTES {
        text.push_str(&format!(
            "line {n}: a report the agent is allowed to download\n"
        ));
        n += 1;
    }
    text.truncate(REPORT_BYTES);
    text.into_bytes()
}

/// Reads `path` as user nobody, outside agentd.
fn read_as_nobody(path: &Path) -> Result<()> {
    let (uid, gid) = user_ids("nobody")?;
    let out = Command::new("/bin/cat")
        .arg(path)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn user_ids(name: &str) -> Result<(u32, u32)> {
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        bail!("no user {name}");
    }
    // SAFETY: non-null result of getpwnam.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A child of the demo that Ctrl-C in the terminal does not reach (the demo stops it in
/// order), and that gets SIGTERM if the demo dies without its guard.
fn detach(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn text_of(e: &Value) -> String {
    e["details"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn shorten(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        line.to_string()
    } else {
        let cut: String = line.chars().take(width - 1).collect();
        format!("{cut}…")
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Processes whose cgroup (in /proc/PID/cgroup) is `cgroup` or below it.
fn processes_in(cgroup: &str) -> Vec<u32> {
    proc_pids()
        .into_iter()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|t| {
                t.lines().any(|l| {
                    l.starts_with("0::")
                        && (l[3..] == *cgroup || l[3..].starts_with(&format!("{cgroup}/")))
                })
            })
        })
        .collect()
}

/// True if `name` occurs in `hay`; unless `prefix`, only where no digit follows it (so
/// that `agentd-demo-12` does not match `agentd-demo-123`).
fn mentions(hay: &[u8], name: &str, prefix: bool) -> bool {
    let n = name.as_bytes();
    hay.windows(n.len()).enumerate().any(|(i, w)| {
        w == n && (prefix || !hay.get(i + n.len()).is_some_and(|b| b.is_ascii_digit()))
    })
}

/// What a demo could leave behind: cgroups (at the top of the cgroup2 mount), bpffs
/// directories and temporary directories named `name` (or starting with it, if `prefix`),
/// and processes whose command line, environment or cgroup mentions that name. Each as a
/// line that says what it is.
pub fn leftovers(name: &str, prefix: bool) -> Vec<String> {
    let mut out = Vec::new();
    let places = [
        ("cgroup", cgroup2_mount().ok()),
        ("pin directory", Some(PathBuf::from("/sys/fs/bpf"))),
        ("temporary directory", Some(std::env::temp_dir())),
    ];
    for (what, dir) in places {
        let Some(dir) = dir else { continue };
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file = e.file_name();
            let file = file.to_string_lossy();
            if (prefix && file.starts_with(name)) || (!prefix && file == name) {
                out.push(format!("{what} {} left behind", e.path().display()));
            }
        }
    }
    let me = std::process::id();
    for p in proc_pids() {
        if p == me {
            continue;
        }
        let found = ["cmdline", "environ", "cgroup"].iter().any(|f| {
            mentions(
                &fs::read(format!("/proc/{p}/{f}")).unwrap_or_default(),
                name,
                prefix,
            )
        });
        if found {
            let cmdline = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let mut fields = stat.rsplit_once(") ").map_or("", |(_, r)| r).split(' ');
            let (state, parent) = (fields.next().unwrap_or("?"), fields.next().unwrap_or("?"));
            out.push(if state == "Z" {
                format!(
                    "process {p} left behind, a zombie its parent (pid {parent}) has not reaped"
                )
            } else {
                format!(
                    "process {p} ({}) left behind",
                    shorten(
                        String::from_utf8_lossy(&cmdline).replace('\0', " ").trim(),
                        80
                    )
                )
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_whole_process_ids() {
        assert!(mentions(
            b"x /tmp/agentd-demo-12/a",
            "agentd-demo-12",
            false
        ));
        assert!(mentions(b"0::/agentd-demo-12", "agentd-demo-12", false));
        assert!(!mentions(
            b"/tmp/agentd-demo-123/a",
            "agentd-demo-12",
            false
        ));
        assert!(mentions(b"/tmp/agentd-demo-123/a", "agentd-demo-", true));
        assert_eq!(thousands(6100), "6,100");
        assert_eq!(thousands(65536), "65,536");
        assert_eq!(thousands(999), "999");
        assert_eq!(report().len(), REPORT_BYTES);
    }
}
