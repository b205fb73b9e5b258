//! `cargo xtask bench`: what agentd costs the processes of a host, and how fast its kill
//! switch is. Not part of `cargo xtask test`: figures are measured, never asserted.
//!
//! It builds the release binaries (`agentd`, and the test helper `agentd-act`), runs each
//! case several times after a warm-up, and writes `bench/RESULTS.md` and
//! `bench/results.json`: the median of each figure with its spread (minimum and maximum
//! over the rounds), and ratios against a baseline. Cases are numbered as in the issue
//! that asked for them; the ones not implemented yet are listed as "not yet measured".
//!
//! - Case 1: system call cost of a process that is NOT an agent (`getpid`, and `openat` +
//!   `close` of /dev/null), with agentd absent, loaded without agents, with an agent
//!   running (the Landlock reporter on `sys_exit` is attached while any agent runs on a
//!   host without BPF LSM), and with an agent that has a `syscalls` budget (`sys_enter`
//!   is attached too). The conditions alternate in rounds (absent, loaded, agent, budget,
//!   absent, ...), so that drift of the machine touches all of them alike.
//! - Case 2: the same `getpid` loop inside an agent (seccomp filter; a budget so large
//!   that it never runs out, action `log`) against the loop outside any agent.
//! - Case 6: kill switch latency for agents of 1, 100, 1,000 and 5,000 processes, through
//!   the daemon and with `--direct`, against the kernel's own cost (writing `cgroup.kill`
//!   of a plain cgroup holding the same processes).
//!
//! The loops run in a child process, the current xtask binary with the hidden subcommand
//! `bench-loop` (the same binary outside and inside agents). Everything the bench creates
//! has names of its own (`agentd-bench-<pid>`: cgroups, bpffs pins, and
//! `target/xtask/bench-<pid>/` for the daemon's configuration, sockets and logs); guards
//! stop the daemon and remove those on every exit path, also on an error, a panic or
//! Ctrl-C (and the daemon gets SIGTERM from the kernel should this process die).

use std::{
    collections::BTreeMap,
    ffi::{CString, OsStr, OsString},
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{DirBuilderExt as _, FileExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::util::{Timer, is_root, run_inherit, workspace_root, xtask_target_dir};

#[derive(clap::Args)]
pub struct Options {
    /// Fewer rounds and repetitions: a smoke check (under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Run only this case (repeatable): 1 (system calls outside agents), 2 (getpid inside
    /// an agent) or 6 (kill switch). The others are reported as not measured in this run.
    #[arg(long, value_name = "CASE")]
    only: Vec<u32>,
}

/// `cargo xtask bench-loop OP N`: the measured loop, in a process of its own (hidden).
#[derive(clap::Args)]
pub struct LoopOptions {
    /// `getpid` (the raw system call, not the C library's) or `open` (openat + close of
    /// /dev/null).
    op: String,
    /// Calls per batch.
    n: u64,
    /// Batches after one warm-up batch; the fastest is the measurement (other work on the
    /// machine only ever adds time), the median is reported too.
    #[arg(long, default_value_t = 15)]
    batches: u32,
}

// ---------------------------------------------------------------------------------------
// The cases

/// How the cases are grouped for measuring: cases 1 and 2 share their rounds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    Syscalls,
    Kill,
}

struct CaseDef {
    id: u32,
    title: &'static str,
    /// None: not implemented yet.
    group: Option<Group>,
}

/// Every case of the issue, in its numbering. To add one: give it a group (a function
/// that measures and returns its `CaseReport`) in `run_group`.
const CASES: &[CaseDef] = &[
    CaseDef {
        id: 1,
        title: "System call cost of a process that is not an agent",
        group: Some(Group::Syscalls),
    },
    CaseDef {
        id: 2,
        title: "getpid inside an agent with a rate budget",
        group: Some(Group::Syscalls),
    },
    CaseDef {
        id: 3,
        title: "connect() and sendto() with 0, 100 and 10,000 CIDR rules",
        group: None,
    },
    CaseDef {
        id: 4,
        title: "open() with 0, 100 and 1,000 path rules (Landlock on the host, BPF LSM in the VM)",
        group: None,
    },
    CaseDef {
        id: 5,
        title: "`agentd run -- /bin/true` against /bin/true, bubblewrap and systemd-run",
        group: None,
    },
    CaseDef {
        id: 6,
        title: "Kill switch latency",
        group: Some(Group::Kill),
    },
    CaseDef {
        id: 7,
        title: "1,000 concurrent agents: time, memory, one policy update",
        group: None,
    },
    CaseDef {
        id: 8,
        title: "Denials per second that reach the audit log, and where losses start",
        group: None,
    },
];

/// How much to measure.
struct Plan {
    quick: bool,
    /// Rounds of cases 1 and 2 (each: absent, loaded, agent, budget).
    rounds: usize,
    /// getpid calls per batch, and openat + close pairs per batch.
    getpid_n: u64,
    open_n: u64,
    batches: u32,
    /// Kills per size and path (case 6), after one warm-up kill per path.
    kill_reps: usize,
    kill_sizes: Vec<usize>,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        Plan {
            quick,
            rounds: if quick { 3 } else { 15 },
            getpid_n: 100_000,
            open_n: 10_000,
            batches: if quick { 5 } else { 15 },
            kill_reps: if quick { 2 } else { 9 },
            kill_sizes: vec![1, 100, 1000, 5000],
        }
    }

    fn json(&self) -> Value {
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "getpid_calls_per_batch": self.getpid_n,
            "open_pairs_per_batch": self.open_n,
            "batches_per_measurement": self.batches,
            "kill_repetitions": self.kill_reps,
            "kill_sizes": self.kill_sizes,
        })
    }
}

/// What a case reports: text and tables for RESULTS.md, and its figures for results.json.
struct CaseReport {
    id: u32,
    title: String,
    /// One line for the summary table.
    headline: String,
    /// Markdown: how it was measured.
    method: String,
    tables: Vec<Table>,
    notes: Vec<String>,
    json: Value,
}

struct Table {
    caption: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn markdown(&self, out: &mut String) {
        if !self.caption.is_empty() {
            let _ = writeln!(out, "{}\n", self.caption);
        }
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            self.header.iter().map(|_| "---|").collect::<String>()
        );
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out.push('\n');
    }
}

pub fn run(opts: Options) -> Result<()> {
    if !is_root() {
        bail!(
            "the bench loads BPF programs and creates cgroups: run `sudo cargo xtask bench` (or as root)"
        );
    }
    for id in &opts.only {
        match CASES.iter().find(|c| c.id == *id) {
            None => bail!("there is no case {id} (cases are numbered 1 to 8)"),
            Some(c) if c.group.is_none() => bail!("case {id} is not measured yet"),
            Some(_) => {}
        }
    }
    let selected: Vec<&CaseDef> = CASES
        .iter()
        .filter(|c| c.group.is_some() && (opts.only.is_empty() || opts.only.contains(&c.id)))
        .collect();
    let plan = Plan::new(opts.quick);
    let timer = Timer::start();
    install_signal_handlers();

    say("building release binaries (agentd with its eBPF object, agentd-act)");
    let ws = workspace_root();
    run_inherit(Command::new("cargo").current_dir(&ws).args([
        "build",
        "--release",
        "-p",
        "agentd",
    ]))?;
    run_inherit(Command::new("cargo").current_dir(&ws).args([
        "build",
        "--release",
        "-p",
        "agentd-tests",
        "--bin",
        "agentd-act",
    ]))?;

    let mut env = Env::create(&ws)?;
    let bench_dir = env.dir.clone();
    let machine = machine_info(&env);
    say(format!(
        "machine: {}, {} cores, kernel {}; files enforced by {}",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["enforcement"]["files"].as_str().unwrap_or("?"),
    ));

    let mut reports: Vec<CaseReport> = Vec::new();
    let mut groups: Vec<Group> = Vec::new();
    for c in &selected {
        let g = c.group.expect("selected cases have a group");
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let ids: Vec<u32> = selected.iter().map(|c| c.id).collect();
    for g in groups {
        let mine: Vec<u32> = selected
            .iter()
            .filter(|c| c.group == Some(g))
            .map(|c| c.id)
            .collect();
        let label = mine
            .iter()
            .map(|id| {
                let pos = ids.iter().position(|i| i == id).unwrap_or(0) + 1;
                format!("{pos}/{}", ids.len())
            })
            .collect::<Vec<_>>()
            .join(" + ");
        let progress = Progress {
            label: format!(
                "case {label} ({})",
                mine.iter()
                    .map(|id| format!("#{id}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let out = run_group(g, &env, &plan, &progress)?;
        reports.extend(out.into_iter().filter(|r| mine.contains(&r.id)));
    }
    reports.sort_by_key(|r| r.id);

    let took = timer.secs();
    let mut machine = machine;
    machine["load_at_end"] = json!(loadavg());
    write_results(&ws.join("bench"), &plan, &machine, &reports, took)?;
    env.succeeded = true;
    drop(env);
    say(format!(
        "wrote {} and {} ({:.0} s)",
        ws.join("bench/RESULTS.md").display(),
        ws.join("bench/results.json").display(),
        took
    ));
    let left = leftovers(&bench_dir);
    if !left.is_empty() {
        bail!("left behind: {}", left.join(", "));
    }
    Ok(())
}

fn run_group(g: Group, env: &Env, plan: &Plan, progress: &Progress) -> Result<Vec<CaseReport>> {
    match g {
        Group::Syscalls => syscall_cases(env, plan, progress),
        Group::Kill => kill_case(env, plan, progress).map(|r| vec![r]),
    }
}

struct Progress {
    label: String,
}

impl Progress {
    fn say(&self, msg: impl std::fmt::Display) {
        say(format!("{}: {msg}", self.label));
    }
}

fn say(msg: impl std::fmt::Display) {
    println!("bench: {msg}");
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------------------------------
// The measured loop (hidden subcommand), run outside and inside agents

pub fn run_loop(opts: LoopOptions) -> Result<()> {
    let work: fn(u64) = match opts.op.as_str() {
        "getpid" => getpid_loop,
        "open" => open_loop,
        other => bail!("unknown loop `{other}` (getpid, open)"),
    };
    let n = opts.n.max(1);
    let batch = || {
        let t = Instant::now();
        work(n);
        t.elapsed().as_nanos() as f64 / n as f64
    };
    batch(); // warm-up
    let per_batch: Vec<f64> = (0..opts.batches.max(1)).map(|_| batch()).collect();
    let s = Stats::of(&per_batch);
    println!(
        "{}",
        json!({"op": opts.op, "calls_per_batch": n, "ns_per_call": s.min,
               "median_batch_ns_per_call": s.median, "batches": per_batch})
    );
    Ok(())
}

fn getpid_loop(n: u64) {
    for _ in 0..n {
        // SAFETY: no arguments; the raw call, as the C library may cache its pid.
        unsafe { libc::syscall(libc::SYS_getpid) };
    }
}

fn open_loop(n: u64) {
    let path = c"/dev/null";
    for _ in 0..n {
        // SAFETY: a valid NUL-terminated path; the descriptor is closed at once.
        unsafe {
            let fd = libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::syscall(libc::SYS_close, fd);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and formatting

#[derive(Clone, Copy, Debug, PartialEq)]
struct Stats {
    n: usize,
    median: f64,
    min: f64,
    max: f64,
    q1: f64,
    q3: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Stats {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let pos = p * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Stats {
            n: v.len(),
            median: q(0.5),
            min: q(0.0),
            max: q(1.0),
            q1: q(0.25),
            q3: q(0.75),
        }
    }

    fn json(&self) -> Value {
        json!({"n": self.n, "median": self.median, "min": self.min, "max": self.max,
               "q1": self.q1, "q3": self.q3})
    }

    /// `median (min–max)`.
    fn show(&self) -> String {
        if self.n == 0 {
            return "—".to_string();
        }
        if self.n == 1 {
            return num(self.median);
        }
        format!("{} ({}–{})", num(self.median), num(self.min), num(self.max))
    }

    /// `1.03× (0.98–1.10)`.
    fn show_ratio(&self) -> String {
        if self.n == 0 {
            return "—".to_string();
        }
        if self.n == 1 {
            return format!("{}×", ratio(self.median));
        }
        format!(
            "{}× ({}–{})",
            ratio(self.median),
            ratio(self.min),
            ratio(self.max)
        )
    }
}

/// Three significant figures or so.
fn num(x: f64) -> String {
    if !x.is_finite() {
        "—".to_string()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn ratio(x: f64) -> String {
    if !x.is_finite() {
        "—".to_string()
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// Ratios of paired samples (the same round), then their statistics.
fn paired_ratio(values: &[f64], base: &[f64]) -> Stats {
    let r: Vec<f64> = values
        .iter()
        .zip(base)
        .filter(|(_, b)| **b > 0.0)
        .map(|(v, b)| v / b)
        .collect();
    Stats::of(&r)
}

// ---------------------------------------------------------------------------------------
// The bench's own directory, names and cleanup

/// Paths of this run, and the guard that removes them.
struct Env {
    agentd: PathBuf,
    act: PathBuf,
    xtask: PathBuf,
    /// target/xtask/bench-<pid>: configuration, profiles, sockets, tmp, logs.
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    /// The daemon's agent root (cgroup), its bpffs pins, and the parent of the plain
    /// cgroups of the kernel baseline (case 6).
    root: PathBuf,
    bpffs: PathBuf,
    plain: PathBuf,
    doctor: Value,
    /// Keep `dir` (logs) unless the run succeeded.
    succeeded: bool,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

const PLAIN_PROFILE: &str = "name = \"plain\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n";
/// A budget that sys_enter charges on every call and that never runs out: 10 million calls
/// a second (the most a profile may say) and a burst of 10^12.
const BUDGET_PROFILE: &str = "name = \"budget\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n\
     [budgets.syscalls]\nrate = 10000000\nburst = 1000000000000\naction = \"log\"\n";

impl Env {
    fn create(ws: &Path) -> Result<Env> {
        let pid = std::process::id();
        let mount = cgroup2_mount()?;
        let dir = xtask_target_dir().join(format!("bench-{pid}"));
        let root = mount.join(format!("agentd-bench-{pid}"));
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/agentd-bench-{pid}"));
        let plain = mount.join(format!("agentd-bench-{pid}-kernel"));
        for p in [&dir, &root, &bpffs, &plain] {
            if p.exists() {
                bail!(
                    "{} exists (left by an earlier run with the same process id?): remove it first",
                    p.display()
                );
            }
        }
        let mut env = Env {
            agentd: ws.join("target/release/agentd"),
            act: ws.join("target/release/agentd-act"),
            xtask: std::env::current_exe().context("finding the xtask binary")?,
            config: dir.join("agentd.toml"),
            socket: dir.join("agentd.sock"),
            dir,
            root,
            bpffs,
            plain,
            doctor: Value::Null,
            succeeded: false,
        };
        // Agents run as nobody: the directory (their working directory) must be
        // enterable; the daemon wants its tmp base root-owned and not writable by others.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(env.dir.join("profiles"))
            .with_context(|| format!("creating {}", env.dir.display()))?;
        for d in [env.dir.clone(), env.dir.join("profiles")] {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        }
        fs::write(env.dir.join("profiles/plain.toml"), PLAIN_PROFILE)?;
        fs::write(env.dir.join("profiles/budget.toml"), BUDGET_PROFILE)?;
        fs::write(
            &env.config,
            format!(
                "# Written by `cargo xtask bench`.\n[daemon]\nsocket = \"{}\"\nlaunch_socket = \"{}\"\n\
                 admin_group = \"root\"\ncgroup_root = \"{}\"\nbpffs = \"{}\"\non_stop = \"kill\"\n\
                 [agents]\nprofiles_dir = \"{}\"\ndefault_profile = \"plain\"\nuser = \"nobody\"\ntmp_dir = \"{}\"\n\
                 [audit]\npath = \"{}\"\n[metrics]\nlisten = \"off\"\n[dns]\nport = {}\n",
                env.socket.display(),
                env.dir.join("launch.sock").display(),
                env.root.display(),
                env.bpffs.display(),
                env.dir.join("profiles").display(),
                env.dir.join("tmp").display(),
                env.dir.join("audit.jsonl").display(),
                free_port()?,
            ),
        )?;
        for bin in [&env.agentd, &env.act] {
            if !bin.is_file() {
                bail!("{} is missing after the build", bin.display());
            }
        }
        env.doctor = Command::new(&env.agentd)
            .args(["doctor", "--json"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or(Value::Null);
        Ok(env)
    }

    /// A fresh file name in the bench directory.
    fn scratch(&self, what: &str) -> PathBuf {
        self.dir
            .join(format!("{what}-{}", SEQ.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Only what this run named: the daemon's root and pins (if a daemon guard could
        // not remove them), and the baseline's cgroups.
        for cg in [&self.plain, &self.root] {
            if cg.exists()
                && let Err(e) = remove_cgroup_tree(cg)
            {
                eprintln!("bench: removing {}: {e:#}", cg.display());
            }
        }
        if self.bpffs.exists()
            && let Err(e) = fs::remove_dir_all(&self.bpffs)
        {
            eprintln!("bench: removing {}: {e:#}", self.bpffs.display());
        }
        if self.succeeded {
            let _ = fs::remove_dir_all(&self.dir);
        } else if self.dir.exists() {
            eprintln!("bench: logs kept in {}", self.dir.display());
        }
    }
}

/// A UDP and TCP port free on loopback for the daemon's resolvers.
fn free_port() -> Result<u16> {
    for _ in 0..20 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port for the daemon's resolvers")
}

/// The cgroup2 mount point, from /proc/self/mountinfo (as agentd's cgroup.rs finds it).
fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4))
                .flatten()
                .map(|p| PathBuf::from(p.replace("\\040", " ")))
        })
        .context("no cgroup2 file system is mounted (see /proc/self/mountinfo)")
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C, SIGTERM and SIGHUP end the bench through its guards (which stop the daemon
/// and remove what the bench created) instead of killing it on the spot.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Polls `done` every `step` until it holds (true) or `timeout` passes (false); stops with
/// an error when the bench is interrupted.
fn wait_until(
    timeout: Duration,
    step: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<bool> {
    let start = Instant::now();
    loop {
        if done()? {
            return Ok(true);
        }
        check_interrupted()?;
        if start.elapsed() > timeout {
            return Ok(false);
        }
        std::thread::sleep(step);
    }
}

/// The same for cleanup, which must go on after an interruption.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn count_lines(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// `populated` of a cgroup's cgroup.events; None if it cannot be read.
fn populated(cg: &Path) -> Option<bool> {
    let text = fs::read_to_string(cg.join("cgroup.events")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
}

/// Kills every process of a cgroup tree that this bench named, and removes the tree.
fn remove_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    wait_for(Duration::from_secs(10), || populated(path) != Some(true));
    rmdir_tree(path)
}

fn rmdir_tree(path: &Path) -> Result<()> {
    for entry in fs::read_dir(path)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            rmdir_tree(&entry.path())?;
        }
    }
    let mut last = None;
    let gone = wait_for(Duration::from_secs(5), || match fs::remove_dir(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            last = Some(e);
            false
        }
    });
    if !gone {
        bail!("rmdir {}: {:?}", path.display(), last);
    }
    Ok(())
}

/// What this run could have left behind: cgroups and pins named agentd-bench-<pid>*, and
/// processes started with the bench's configuration (daemons, run clients). Agents'
/// processes cannot outlive the cgroups that held them.
fn leftovers(bench_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let pid = std::process::id();
    let mine = format!("agentd-bench-{pid}");
    for dir in cgroup2_mount()
        .into_iter()
        .chain([PathBuf::from("/sys/fs/bpf")])
    {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&mine) {
                out.push(e.path().display().to_string());
            }
        }
    }
    let marker = bench_dir.as_os_str().as_bytes();
    for p in proc_pids() {
        if p == pid {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if cmdline.windows(marker.len()).any(|w| w == marker) {
            out.push(format!(
                "process {p} ({})",
                String::from_utf8_lossy(&cmdline).replace('\0', " ").trim()
            ));
        }
    }
    out
}

fn proc_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Raw tracepoint links: which of the host's system call hooks are attached

/// Raw tracepoint links on `sys_enter` and `sys_exit`.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Links {
    sys_enter: u32,
    sys_exit: u32,
}

impl Links {
    fn add(&mut self, o: Links) {
        self.sys_enter += o.sys_enter;
        self.sys_exit += o.sys_exit;
    }

    fn any(&self) -> bool {
        self.sys_enter + self.sys_exit > 0
    }

    fn describe(&self) -> String {
        match (self.sys_enter, self.sys_exit) {
            (0, 0) => "none".to_string(),
            (e, 0) => format!("sys_enter{}", times(e)),
            (0, x) => format!("sys_exit{}", times(x)),
            (e, x) => format!("sys_enter{} + sys_exit{}", times(e), times(x)),
        }
    }

    fn json(&self) -> Value {
        json!({"sys_enter": self.sys_enter, "sys_exit": self.sys_exit})
    }
}

fn times(n: u32) -> String {
    if n == 1 {
        String::new()
    } else {
        format!(" ×{n}")
    }
}

/// The raw tracepoint links that process `pid` holds (from /proc/PID/fdinfo).
fn links_of(pid: u32) -> Links {
    let mut l = Links::default();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        if !text
            .lines()
            .any(|x| x.split_whitespace().eq(["link_type:", "raw_tracepoint"]))
        {
            continue;
        }
        let tp = text
            .lines()
            .find_map(|x| x.strip_prefix("tp_name:"))
            .map(str::trim);
        match tp {
            Some("sys_enter") => l.sys_enter += 1,
            Some("sys_exit") => l.sys_exit += 1,
            _ => {}
        }
    }
    l
}

/// The links held by every process of the host except `except` (our daemon) and this one:
/// other daemons (tests running at the same time) whose hooks would slow every system
/// call of the host, ours included.
fn others_links(except: Option<u32>) -> Links {
    let me = std::process::id();
    let mut l = Links::default();
    for p in proc_pids() {
        if p != me && Some(p) != except {
            l.add(links_of(p));
        }
    }
    l
}

// ---------------------------------------------------------------------------------------
// Running commands

/// Runs `cmd` to completion with stdout and stderr in files of the bench directory; kills
/// it after `timeout`. Returns its status, stdout and stderr.
fn run_timed(
    env: &Env,
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(ExitStatus, String, String)> {
    let (out_path, err_path) = (env.scratch("out"), env.scratch("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let mut status = None;
    let finished = wait_until(timeout, Duration::from_millis(5), || {
        status = child.try_wait()?;
        Ok(status.is_some())
    });
    let status = match (finished, status) {
        (Ok(true), Some(s)) => s,
        (finished, _) => {
            let _ = child.kill();
            let _ = child.wait();
            finished?;
            bail!(
                "`{}` did not finish within {timeout:?}",
                crate::util::show(cmd)
            );
        }
    };
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    let err = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    Ok((status, out, err))
}

/// The ns per call that a `bench-loop` run printed (its last line).
fn loop_result(status: ExitStatus, out: &str, err: &str, what: &str) -> Result<f64> {
    let v: Value = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    match v["ns_per_call"].as_f64() {
        Some(ns) if status.success() => Ok(ns),
        _ => bail!("{what} failed ({status}): stdout {out:?}, stderr {err:?}"),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// The daemon under test

/// A running `agentd daemon` of this bench, and the `agentd run` clients of its agents.
/// Dropping it stops the daemon (SIGTERM: it kills its agents and removes its cgroup root
/// and pins) and removes whatever it did not.
struct Daemon<'e> {
    env: &'e Env,
    child: Child,
    log: PathBuf,
    clients: Vec<(String, Child)>,
    stopped: bool,
}

impl<'e> Daemon<'e> {
    fn start(env: &'e Env) -> Result<Daemon<'e>> {
        for p in [&env.root, &env.socket] {
            if p.exists() {
                bail!("{} is still there from the previous daemon", p.display());
            }
        }
        let log = env.scratch("daemon.log");
        let file = File::create(&log)?;
        let mut cmd = Command::new(&env.agentd);
        cmd.arg("--config")
            .arg(&env.config)
            .arg("daemon")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        // If the bench dies without running its guards, the daemon still gets SIGTERM and
        // removes its agents, cgroup root and pins.
        // SAFETY: prctl between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting agentd daemon")?;
        let mut d = Daemon {
            env,
            child,
            log,
            clients: Vec::new(),
            stopped: false,
        };
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(10), || {
            Ok(std::os::unix::net::UnixStream::connect(&env.socket).is_ok()
                || d.child.try_wait()?.is_some())
        })?;
        if !ready || d.child.try_wait()?.is_some() {
            bail!("the daemon did not start; its log:\n{}", tail(&d.log, 30));
        }
        Ok(d)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn agentd(&self) -> Command {
        let mut c = Command::new(&self.env.agentd);
        c.arg("--config").arg(&self.env.config);
        c
    }

    /// `agentd run --profile P --name N -- ARGS...`, staying attached (its client is kept);
    /// returns once the agent's cgroup holds a process.
    fn start_agent(&mut self, profile: &str, name: &str, args: &[&OsStr]) -> Result<()> {
        let err = self.env.scratch(&format!("agent-{name}.err"));
        let child = self
            .agentd()
            .args([
                "run",
                "--profile",
                profile,
                "--name",
                name,
                "--user",
                "nobody",
            ])
            .arg("--workdir")
            .arg(&self.env.dir)
            .arg("--")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&err)?)
            .spawn()
            .context("starting agentd run")?;
        self.clients.push((name.to_string(), child));
        let procs = self.env.root.join(name).join("cgroup.procs");
        let client = &mut self.clients.last_mut().expect("just pushed").1;
        let started = wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
            Ok(count_lines(&procs) >= 1 || client.try_wait()?.is_some())
        })?;
        if !started || client.try_wait()?.is_some() {
            bail!(
                "agent {name} did not start: {}\ndaemon log:\n{}",
                fs::read_to_string(&err).unwrap_or_default().trim(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Waits until the `run` client of agent `name` has exited (after a kill).
    fn wait_client(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.clients.iter().position(|(n, _)| n == name) else {
            return Ok(());
        };
        let (_, mut c) = self.clients.swap_remove(i);
        let done = wait_until(Duration::from_secs(15), Duration::from_millis(5), || {
            Ok(c.try_wait()?.is_some())
        });
        if !matches!(done, Ok(true)) {
            let _ = c.kill();
            let _ = c.wait();
            done?;
            bail!("the run client of agent {name} did not exit after the kill");
        }
        Ok(())
    }

    /// Runs `ARGS...` as agent `name` to completion; returns its status, stdout, stderr.
    fn run_agent(
        &self,
        profile: &str,
        name: &str,
        args: &[&OsStr],
    ) -> Result<(ExitStatus, String, String)> {
        let mut cmd = self.agentd();
        cmd.args([
            "run",
            "--profile",
            profile,
            "--name",
            name,
            "--user",
            "nobody",
        ])
        .arg("--workdir")
        .arg(&self.env.dir)
        .arg("--")
        .args(args);
        run_timed(self.env, &mut cmd, Duration::from_secs(120))
    }

    fn links(&self) -> Links {
        links_of(self.pid())
    }

    /// The enforcement lines the daemon reports for agent `name` (agentd inspect).
    fn enforcement(&self, name: &str) -> Vec<String> {
        let out = self
            .agentd()
            .args(["inspect", name, "--json"])
            .stdin(Stdio::null())
            .output();
        let v: Value = out
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or(Value::Null);
        find_key(&v, "enforcement")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops the daemon and checks that it removed its cgroup root and pins itself.
    fn stop(mut self) -> Result<()> {
        let left = self.shutdown();
        if !left.is_empty() {
            bail!(
                "the daemon left {} behind (removed by the bench); its log:\n{}",
                left.join(", "),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// SIGTERM, wait, SIGKILL if it must; reaps the run clients; removes the daemon's
    /// root and pins if they are still there. Returns what had to be removed.
    fn shutdown(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signals our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            if !wait_for(Duration::from_secs(20), || {
                !matches!(self.child.try_wait(), Ok(None))
            }) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for (_, c) in &mut self.clients {
            if !wait_for(Duration::from_secs(5), || !matches!(c.try_wait(), Ok(None))) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.clients.clear();
        let mut left = Vec::new();
        // The daemon has exited: a root still there is only ours to remove.
        if self.env.root.exists() {
            left.push(self.env.root.display().to_string());
            if let Err(e) = remove_cgroup_tree(&self.env.root) {
                eprintln!("bench: removing {}: {e:#}", self.env.root.display());
            }
        }
        if self.env.bpffs.exists() {
            left.push(self.env.bpffs.display().to_string());
            let _ = fs::remove_dir_all(&self.env.bpffs);
        }
        left
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        let left = self.shutdown();
        if !left.is_empty() && std::thread::panicking() {
            eprintln!("bench: daemon log:\n{}", tail(&self.log, 30));
        }
    }
}

fn find_key<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    match v {
        Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Cases 1 and 2: system call cost

/// Outside agents: the condition, its label.
const OUTSIDE: [(&str, &str); 4] = [
    ("absent", "agentd absent (no daemon)"),
    ("loaded", "daemon loaded, no agent"),
    (
        "agent",
        "daemon + 1 agent without budgets (Landlock reporter: `sys_exit`)",
    ),
    (
        "budget",
        "daemon + 1 agent with a `syscalls` budget (`sys_enter` too)",
    ),
];

/// Inside agents (getpid only): the condition, its label, its profile.
const INSIDE: [(&str, &str, &str); 3] = [
    (
        "in-plain",
        "in an agent without budgets (seccomp; `sys_exit` attached)",
        "plain",
    ),
    (
        "in-plain-hooked",
        "in an agent without budgets, `sys_enter` attached for another agent",
        "plain",
    ),
    (
        "in-budget",
        "in an agent with a `syscalls` budget (charged on every call)",
        "budget",
    ),
];

#[derive(Clone, Debug)]
struct Sample {
    ns: f64,
    /// Our daemon's hooks, and other processes' (tests running at the same time).
    ours: Links,
    others: Links,
}

/// Samples per "condition/op", one per round.
type Series = BTreeMap<String, Vec<Sample>>;

/// How long to wait, before a measurement, for other processes' syscall hooks to go away.
const QUIET_WAIT: Duration = Duration::from_secs(3);

fn measure_outside(
    env: &Env,
    plan: &Plan,
    daemon: Option<&Daemon>,
    cond: &str,
    series: &mut Series,
) -> Result<String> {
    let mut line = String::new();
    for (op, n) in [("getpid", plan.getpid_n), ("open", plan.open_n)] {
        let except = daemon.map(Daemon::pid);
        // Another test daemon's hooks slow every process of the host: give them a moment
        // to go, and record them if they stay.
        wait_until(QUIET_WAIT, Duration::from_millis(50), || {
            Ok(!others_links(except).any())
        })?;
        let others = others_links(except);
        let ours = daemon.map(Daemon::links).unwrap_or_default();
        let (status, out, err) = run_timed(
            env,
            Command::new(&env.xtask).args([
                OsStr::new("bench-loop"),
                OsStr::new(op),
                OsString::from(n.to_string()).as_os_str(),
                OsStr::new("--batches"),
                OsString::from(plan.batches.to_string()).as_os_str(),
            ]),
            Duration::from_secs(120),
        )?;
        let ns = loop_result(status, &out, &err, &format!("the {op} loop ({cond})"))?;
        let others = {
            let mut o = others;
            o.add(others_links(except));
            o
        };
        series
            .entry(format!("{cond}/{op}"))
            .or_default()
            .push(Sample { ns, ours, others });
        let _ = write!(line, "{op} {} ns ", num(ns));
    }
    Ok(format!("{cond}: {}", line.trim_end()))
}

fn measure_inside(
    env: &Env,
    plan: &Plan,
    d: &Daemon,
    cond: &str,
    profile: &str,
    round: usize,
    series: &mut Series,
) -> Result<String> {
    let others = others_links(Some(d.pid()));
    let ours = d.links();
    let name = format!("loop-{cond}-{round}");
    let n = plan.getpid_n.to_string();
    let batches = plan.batches.to_string();
    let (status, out, err) = d.run_agent(
        profile,
        &name,
        &[
            env.xtask.as_os_str(),
            OsStr::new("bench-loop"),
            OsStr::new("getpid"),
            OsStr::new(&n),
            OsStr::new("--batches"),
            OsStr::new(&batches),
        ],
    )?;
    let ns = loop_result(
        status,
        &out,
        &err,
        &format!("the getpid loop in agent {name}"),
    )?;
    series
        .entry(format!("{cond}/getpid"))
        .or_default()
        .push(Sample { ns, ours, others });
    Ok(format!("{cond}: getpid {} ns", num(ns)))
}

/// One round: absent, loaded, agent, budget (and the loops inside agents).
fn syscall_round(
    env: &Env,
    plan: &Plan,
    round: usize,
    series: &mut Series,
    enforcement: &mut Vec<String>,
) -> Result<Vec<String>> {
    let act = env.act.as_os_str();
    let hold = [act, OsStr::new("sleep"), OsStr::new("600")];
    let mut lines = vec![measure_outside(env, plan, None, "absent", series)?];
    let mut d = Daemon::start(env)?;
    if d.links().any() {
        bail!(
            "the daemon has system call hooks attached without agents: {}",
            d.links().describe()
        );
    }
    lines.push(measure_outside(env, plan, Some(&d), "loaded", series)?);
    d.start_agent("plain", "idle", &hold)?;
    // The reporter is attached when an agent starts (where Landlock enforces files).
    wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        Ok(d.links().sys_exit > 0)
    })?;
    lines.push(measure_outside(env, plan, Some(&d), "agent", series)?);
    lines.push(measure_inside(
        env,
        plan,
        &d,
        INSIDE[0].0,
        INSIDE[0].2,
        round,
        series,
    )?);
    d.start_agent("budget", "hold", &hold)?;
    if !wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        Ok(d.links().sys_enter > 0)
    })? {
        bail!(
            "sys_enter was not attached for an agent with a syscalls budget; daemon log:\n{}",
            tail(&d.log, 20)
        );
    }
    lines.push(measure_outside(env, plan, Some(&d), "budget", series)?);
    // Alternate which of the two loops inside agents comes first.
    let order = if round.is_multiple_of(2) {
        [&INSIDE[2], &INSIDE[1]]
    } else {
        [&INSIDE[1], &INSIDE[2]]
    };
    for (cond, _, profile) in order {
        lines.push(measure_inside(env, plan, &d, cond, profile, round, series)?);
    }
    if enforcement.is_empty() {
        *enforcement = d.enforcement("hold");
    }
    d.stop()?;
    Ok(lines)
}

fn syscall_cases(env: &Env, plan: &Plan, progress: &Progress) -> Result<Vec<CaseReport>> {
    let mut series = Series::new();
    let mut enforcement = Vec::new();
    let timer = Timer::start();
    for round in 0..plan.rounds {
        check_interrupted()?;
        let lines = syscall_round(env, plan, round, &mut series, &mut enforcement)?;
        progress.say(format!(
            "round {}/{} ({:.0} s): {}",
            round + 1,
            plan.rounds,
            timer.secs(),
            lines.join("; ")
        ));
    }
    let get = |key: &str| -> Vec<f64> {
        series
            .get(key)
            .map(|v| v.iter().map(|s| s.ns).collect())
            .unwrap_or_default()
    };
    let contaminated = |key: &str| -> usize {
        series
            .get(key)
            .map(|v| v.iter().filter(|s| s.others.any()).count())
            .unwrap_or(0)
    };
    let hooks = |key: &str| -> String {
        let seen: std::collections::BTreeSet<String> = series
            .get(key)
            .into_iter()
            .flatten()
            .map(|s| s.ours.describe())
            .collect();
        seen.into_iter().collect::<Vec<_>>().join(", ")
    };
    let samples_json = |key: &str| -> Value {
        json!(series.get(key).into_iter().flatten().map(|s| json!({
            "ns_per_call": s.ns, "daemon_hooks": s.ours.json(), "other_processes_hooks": s.others.json()
        })).collect::<Vec<_>>())
    };
    let mut notes_common = Vec::new();
    let dirty: usize = series.keys().map(|k| contaminated(k)).sum();
    let total: usize = series.values().map(Vec::len).sum();
    if dirty > 0 {
        notes_common.push(format!(
            "{dirty} of {total} measurements ran while another process of the host (tests running \
             at the same time) had a `sys_enter` or `sys_exit` hook attached, which slows every \
             process; see `other_processes_hooks` in results.json."
        ));
    }

    // Case 1.
    let absent_getpid = get("absent/getpid");
    let absent_open = get("absent/open");
    let mut rows = Vec::new();
    let mut j1 = serde_json::Map::new();
    for (cond, label) in OUTSIDE {
        let g = get(&format!("{cond}/getpid"));
        let o = get(&format!("{cond}/open"));
        let (gs, os) = (Stats::of(&g), Stats::of(&o));
        let (gr, or) = (
            paired_ratio(&g, &absent_getpid),
            paired_ratio(&o, &absent_open),
        );
        rows.push(vec![
            label.to_string(),
            hooks(&format!("{cond}/getpid")),
            gs.show(),
            gr.show_ratio(),
            os.show(),
            or.show_ratio(),
        ]);
        j1.insert(
            cond.to_string(),
            json!({
                "label": label,
                "getpid_ns": gs.json(), "getpid_ratio_to_absent": gr.json(),
                "open_close_ns": os.json(), "open_close_ratio_to_absent": or.json(),
                "getpid_samples": samples_json(&format!("{cond}/getpid")),
                "open_close_samples": samples_json(&format!("{cond}/open")),
            }),
        );
    }
    let c1_attached = paired_ratio(&get("budget/getpid"), &absent_getpid);
    let c1_attached_open = paired_ratio(&get("budget/open"), &absent_open);
    let c1_reporter = paired_ratio(&get("agent/getpid"), &absent_getpid);
    let c1_reporter_open = paired_ratio(&get("agent/open"), &absent_open);
    let c1_loaded = paired_ratio(&get("loaded/getpid"), &absent_getpid);
    let case1 = CaseReport {
        id: 1,
        title: CASES[0].title.to_string(),
        headline: format!(
            "getpid (openat+close) against agentd absent: {}× with the daemon loaded, {}× ({}×) \
             while any agent runs (`sys_exit` reporter), {}× ({}×) with a budget's `sys_enter` too",
            ratio(c1_loaded.median),
            ratio(c1_reporter.median),
            ratio(c1_reporter_open.median),
            ratio(c1_attached.median),
            ratio(c1_attached_open.median),
        ),
        method: format!(
            "A process that is not an agent (a child of the bench, the xtask binary's hidden \
             `bench-loop`) makes {getpid} raw `getpid` system calls per batch \
             (`syscall(SYS_getpid)`, the C library would cache it), and {open} `openat` + \
             `close` pairs of /dev/null per batch; one warm-up batch, then {b} batches, of \
             which the fastest is the measurement (the machine is shared: other work only \
             ever adds time; results.json also has each run's median batch). Each round measures four conditions in \
             turn: agentd absent; the daemon started with no agent (its cgroup programs sit \
             on its own agent root); one agent running `sleep 600` without budgets (on this \
             host files are enforced with Landlock, so the daemon attaches its Landlock \
             reporter to the raw tracepoint `sys_exit` while any agent runs); a second agent \
             with a `[budgets.syscalls]` budget (rate 10,000,000, action log), for which \
             `sys_enter` is attached. The daemon is stopped at the end of the round, so the \
             next round starts absent again. {r} rounds; figures are the median over rounds \
             (min–max); ratios are to the absent measurement of the same round. The hooks \
             column is read from the daemon's /proc/PID/fdinfo (raw tracepoint links).",
            getpid = plan.getpid_n,
            open = plan.open_n,
            b = plan.batches,
            r = plan.rounds,
        ),
        tables: vec![Table {
            caption: String::new(),
            header: [
                "condition",
                "hooks attached",
                "getpid ns/call",
                "ratio to absent",
                "openat+close ns/pair",
                "ratio to absent",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        }],
        notes: {
            let mut n = vec![
                "The daemon alone costs nothing measurable: its cgroup programs are attached to \
                 its own agent root. An attached `sys_enter` or `sys_exit` raw tracepoint makes every task of the host \
                 take the traced system call path (the kernel sets SYSCALL_WORK_SYSCALL_TRACEPOINT \
                 on all tasks), and runs the program on each call; for a process outside agents \
                 the program returns after finding its cgroup outside agentd's root. That is why \
                 the cost is not zero for processes that are not agents while any agent runs \
                 (the reporter) or has a budget (`sys_enter`)."
                    .to_string(),
            ];
            n.extend(notes_common.iter().cloned());
            n
        },
        json: json!({"conditions": j1, "daemon_enforcement": enforcement}),
    };

    // Case 2.
    let outside = get("budget/getpid");
    let mut rows = Vec::new();
    let mut j2 = serde_json::Map::new();
    let mut add = |key: &str, label: &str, rows: &mut Vec<Vec<String>>| {
        let v = get(key);
        let s = Stats::of(&v);
        let (ro, ra) = (paired_ratio(&v, &outside), paired_ratio(&v, &absent_getpid));
        rows.push(vec![
            label.to_string(),
            hooks(key),
            s.show(),
            ro.show_ratio(),
            ra.show_ratio(),
        ]);
        j2.insert(
            key.to_string(),
            json!({"label": label, "ns": s.json(), "ratio_to_outside_hooked": ro.json(),
                   "ratio_to_absent": ra.json(), "samples": samples_json(key)}),
        );
    };
    add(
        "absent/getpid",
        "outside any agent, agentd absent",
        &mut rows,
    );
    add(
        "budget/getpid",
        "outside any agent, `sys_enter` attached (case 1's last row)",
        &mut rows,
    );
    for (cond, label, _) in INSIDE {
        add(&format!("{cond}/getpid"), label, &mut rows);
    }
    let diff = |a: &str, b: &str| -> f64 {
        let d: Vec<f64> = get(a).iter().zip(get(b)).map(|(x, y)| x - y).collect();
        Stats::of(&d).median
    };
    let in_budget = paired_ratio(&get("in-budget/getpid"), &outside);
    let in_budget_abs = paired_ratio(&get("in-budget/getpid"), &absent_getpid);
    let case2 = CaseReport {
        id: 2,
        title: CASES[1].title.to_string(),
        headline: format!(
            "getpid in an agent with a budget: {}× the same loop outside agents (hooks attached), {}× with agentd absent",
            ratio(in_budget.median),
            ratio(in_budget_abs.median)
        ),
        method: format!(
            "The same getpid loop ({n} calls per batch, fastest of {b} batches after a warm-up) \
             run as an agent: `agentd run --profile P -- xtask bench-loop getpid N`, the \
             profile allowing every file (`[files] default = \"allow\"`). Profile `budget` has \
             `[budgets.syscalls]` rate 10,000,000, burst 10^12, action log: `sys_enter` charges \
             every call and the bucket never runs out. Measured in the same rounds as case 1 \
             (agents started as the round's conditions allow: the plain agent while only the \
             reporter is attached, then both orders of the two others while `sys_enter` is \
             attached). An agent's calls also pass its seccomp filter (agentd's list of \
             denied calls), which the loop outside does not. Ratios are to the loop outside \
             agents in the same round: with the hooks attached (the fair comparison for the \
             budget's own cost) and with agentd absent (the whole cost of running as an \
             agent).",
            n = plan.getpid_n,
            b = plan.batches
        ),
        tables: vec![Table {
            caption: String::new(),
            header: [
                "loop",
                "daemon hooks",
                "getpid ns/call",
                "ratio to outside (hooks attached)",
                "ratio to agentd absent",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        }],
        notes: {
            let mut n = vec![
                "Inside an agent, `sys_enter` finds the agent's cgroup one level below agentd's \
                 root, looks up its bucket and adds to it atomically on every call; the seccomp \
                 filter and the reporter's `sys_exit` (which looks at failed calls of agents) run \
                 on every call too."
                    .to_string(),
                format!(
                    "Where the time goes (medians of per-round differences, ns per call): seccomp \
                     filter and the reporter's agent path {} (in an agent without budgets − \
                     outside with `sys_exit` only); `sys_enter` for an agent without budgets {} \
                     (in an agent without budgets with `sys_enter` attached − the same without \
                     it); charging the budget {} (in an agent with a budget − in one without, \
                     both with `sys_enter` attached).",
                    num(diff("in-plain/getpid", "agent/getpid")),
                    num(diff("in-plain-hooked/getpid", "in-plain/getpid")),
                    num(diff("in-budget/getpid", "in-plain-hooked/getpid")),
                ),
            ];
            n.extend(notes_common);
            n
        },
        json: json!({"loops": j2, "daemon_enforcement": enforcement}),
    };
    Ok(vec![case1, case2])
}

// ---------------------------------------------------------------------------------------
// Case 6: kill switch latency

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum KillPath {
    /// A plain cgroup of the bench's own, `cgroup.kill` written by the bench: the kernel.
    Kernel,
    /// `agentd kill NAME --json`.
    Daemon,
    /// `agentd kill NAME --direct --json`.
    Direct,
}

impl KillPath {
    const ALL: [KillPath; 3] = [KillPath::Kernel, KillPath::Daemon, KillPath::Direct];

    fn key(self) -> &'static str {
        match self {
            KillPath::Kernel => "kernel",
            KillPath::Daemon => "daemon",
            KillPath::Direct => "direct",
        }
    }

    fn label(self) -> &'static str {
        match self {
            KillPath::Kernel => {
                "the bench writes cgroup.kill of a plain cgroup and waits for `populated 0`"
            }
            KillPath::Daemon => "`agentd kill NAME --json` (through the daemon)",
            KillPath::Direct => "`agentd kill NAME --direct --json` (the CLI itself)",
        }
    }
}

#[derive(Clone, Debug)]
struct KillSample {
    size: usize,
    path: KillPath,
    /// Processes when the kill began.
    processes: u64,
    /// The daemon's (or the CLI's) own figure; for the kernel path, the bench's.
    millis: f64,
    /// The whole `agentd kill` command, as a user waits for it.
    wall_ms: f64,
    /// `--direct` only: the daemon removed the agent's cgroup before the CLI did, and the
    /// CLI reported that as an error (exit status 1) after a successful kill.
    lost_race: bool,
}

/// The program that holds `size` processes: one sleeping process, or a fork bomb.
fn holder_args(env: &Env, size: usize) -> Vec<OsString> {
    let act = env.act.clone().into_os_string();
    if size <= 1 {
        vec![act, "sleep".into(), "600".into()]
    } else {
        vec![act, "fork-bomb".into(), size.to_string().into()]
    }
}

fn wait_for_processes(procs: &Path, size: usize, what: &str) -> Result<()> {
    // 5,000 processes on 2 busy cores take a few seconds.
    if !wait_until(Duration::from_secs(120), Duration::from_millis(20), || {
        Ok(count_lines(procs) >= size)
    })? {
        bail!(
            "{what} did not reach {size} processes ({} after 120 s)",
            count_lines(procs)
        );
    }
    Ok(())
}

fn kill_agent(d: &mut Daemon, size: usize, path: KillPath, name: &str) -> Result<KillSample> {
    let args = holder_args(d.env, size);
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    d.start_agent("plain", name, &args)?;
    let cg = d.env.root.join(name);
    wait_for_processes(&cg.join("cgroup.procs"), size, &format!("agent {name}"))?;
    let mut cmd = d.agentd();
    cmd.args(["kill", name, "--json"]);
    if path == KillPath::Direct {
        cmd.arg("--direct");
    }
    let start = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running agentd kill")?;
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let o = &v["outcomes"][0];
    // With the daemon running, `--direct` races with the daemon's teardown of the agent
    // (its first process has died): when the daemon removes the cgroup first, the CLI
    // reports the kill with an error and exits 1, though every process is dead.
    let lost_race = path == KillPath::Direct
        && o["error"].as_str().is_some_and(|e| {
            e.starts_with("killed, but removing") && e.contains("No such file or directory")
        });
    let ok = lost_race || (out.status.success() && o["error"].is_null());
    if !ok || o["agent"] != name {
        bail!(
            "agentd kill {name} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if populated(&cg) == Some(true) {
        bail!("agent {name}'s cgroup still has processes after agentd kill returned");
    }
    d.wait_client(name)?;
    // The daemon tears the agent down (or the CLI removed its cgroup): let it finish
    // before the next measurement.
    if !wait_until(Duration::from_secs(15), Duration::from_millis(5), || {
        Ok(!cg.exists())
    })? {
        bail!("{} is still there after the kill", cg.display());
    }
    Ok(KillSample {
        size,
        path,
        processes: o["processes"].as_u64().unwrap_or(0),
        millis: o["millis"].as_f64().unwrap_or(f64::NAN),
        wall_ms,
        lost_race,
    })
}

/// The kernel's own cost: the same processes in a plain cgroup of the bench's, killed by
/// writing its cgroup.kill; timed until cgroup.events says `populated 0` (read every
/// 50 µs).
fn kill_plain(env: &Env, size: usize, tag: &str) -> Result<KillSample> {
    let cg = env.plain.join(tag);
    fs::create_dir(&cg).with_context(|| format!("creating {}", cg.display()))?;
    let result: Result<KillSample> = (|| {
        let procs_file = cg.join("cgroup.procs");
        let procs_c = CString::new(procs_file.as_os_str().as_bytes())?;
        let args = holder_args(env, size);
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec; the path was
        // allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if !ok {
                    return Err(err);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting agentd-act")?;
        let filled = wait_for_processes(&procs_file, size, "the plain cgroup");
        if let Err(e) = filled {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        // Reaped as it dies (the others are reparented and reaped by init).
        let reaper = std::thread::spawn(move || child.wait());
        let processes = count_lines(&procs_file) as u64;
        let events = File::open(cg.join("cgroup.events"))?;
        let start = Instant::now();
        fs::write(cg.join("cgroup.kill"), "1")?;
        let mut buf = [0u8; 256];
        loop {
            let n = events.read_at(&mut buf, 0)?;
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l.trim() == "populated 0")
            {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("{} still populated 30 s after cgroup.kill", cg.display());
            }
            // Polling the file for the kernel's notification is no finer: cgroup
            // notifications are rate-limited (one per 10 ms). A short sleep keeps the CPU
            // free for the dying tasks.
            std::thread::sleep(Duration::from_micros(50));
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let _ = reaper.join();
        Ok(KillSample {
            size,
            path: KillPath::Kernel,
            processes,
            millis: ms,
            wall_ms: ms,
            lost_race: false,
        })
    })();
    let removed = remove_cgroup_tree(&cg);
    let sample = result?;
    removed?;
    Ok(sample)
}

fn kill_once(
    env: &Env,
    d: &mut Daemon,
    size: usize,
    path: KillPath,
    tag: &str,
) -> Result<KillSample> {
    check_interrupted()?;
    settle()?;
    let name = format!("k{size}-{}-{tag}", path.key());
    match path {
        KillPath::Kernel => kill_plain(env, size, &name),
        _ => kill_agent(d, size, path, &name),
    }
}

/// Killed processes that were reparented stay zombies until init reaps them, which on
/// this host takes seconds for thousands; they hold process ids, and a fork bomb started
/// meanwhile runs out of them. Waits until fewer than 200 zombies are left (at most 60 s).
fn settle() -> Result<()> {
    wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        Ok(zombies() < 200)
    })?;
    Ok(())
}

fn zombies() -> usize {
    proc_pids()
        .into_iter()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z'))
            })
        })
        .count()
}

fn kill_case(env: &Env, plan: &Plan, progress: &Progress) -> Result<CaseReport> {
    fs::create_dir(&env.plain).with_context(|| format!("creating {}", env.plain.display()))?;
    let mut d = Daemon::start(env)?;
    let timer = Timer::start();
    // Warm-up: one kill per path, not counted.
    for path in KillPath::ALL {
        let s = kill_once(env, &mut d, 100, path, "warm")?;
        progress.say(format!(
            "warm-up: {} processes, {}: {} ms",
            s.processes,
            path.key(),
            num(s.millis)
        ));
    }
    let mut samples: Vec<KillSample> = Vec::new();
    for &size in &plan.kill_sizes {
        for rep in 0..plan.kill_reps {
            // Rotate the order of the paths from one repetition to the next.
            let mut paths = KillPath::ALL;
            paths.rotate_left(rep % KillPath::ALL.len());
            let mut line = Vec::new();
            for path in paths {
                let s = kill_once(env, &mut d, size, path, &rep.to_string())?;
                line.push(match path {
                    KillPath::Kernel => format!("kernel {} ms", num(s.millis)),
                    _ => format!(
                        "{} {} ms (wall {} ms)",
                        path.key(),
                        num(s.millis),
                        num(s.wall_ms)
                    ),
                });
                samples.push(s);
            }
            progress.say(format!(
                "{size} process{} ({}/{}, {:.0} s): {}",
                if size == 1 { "" } else { "es" },
                rep + 1,
                plan.kill_reps,
                timer.secs(),
                line.join(", ")
            ));
        }
    }
    d.stop()?;
    settle()?;
    fs::remove_dir(&env.plain).with_context(|| format!("removing {}", env.plain.display()))?;

    let pick = |size: usize, path: KillPath, wall: bool| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.size == size && s.path == path)
            .map(|s| if wall { s.wall_ms } else { s.millis })
            .collect()
    };
    let smallest = plan.kill_sizes.first().copied().unwrap_or(1);
    let mut rows = Vec::new();
    let mut cells = Vec::new();
    for &size in &plan.kill_sizes {
        let kernel = Stats::of(&pick(size, KillPath::Kernel, false));
        for path in KillPath::ALL {
            let own = Stats::of(&pick(size, path, false));
            let wall = Stats::of(&pick(size, path, true));
            let one = Stats::of(&pick(smallest, path, false));
            let procs = Stats::of(
                &samples
                    .iter()
                    .filter(|s| s.size == size && s.path == path)
                    .map(|s| s.processes as f64)
                    .collect::<Vec<_>>(),
            );
            let to_kernel = own.median / kernel.median;
            let wall_to_kernel = wall.median / kernel.median;
            let to_one = own.median / one.median;
            rows.push(vec![
                format!("{size}"),
                format!("{:.0}", procs.median),
                path.key().to_string(),
                own.show(),
                if path == KillPath::Kernel {
                    "—".to_string()
                } else {
                    wall.show()
                },
                format!("{}×", ratio(to_kernel)),
                if path == KillPath::Kernel {
                    "—".to_string()
                } else {
                    format!("{}×", ratio(wall_to_kernel))
                },
                format!("{}×", ratio(to_one)),
            ]);
            cells.push(json!({
                "size": size, "path": path.key(), "processes": procs.json(),
                "own_ms": own.json(), "wall_ms": wall.json(),
                "own_ratio_to_kernel": to_kernel, "wall_ratio_to_kernel": wall_to_kernel,
                "own_ratio_to_1_process": to_one,
                "samples": samples.iter().filter(|s| s.size == size && s.path == path)
                    .map(|s| json!({"processes": s.processes, "own_ms": s.millis, "wall_ms": s.wall_ms,
                                    "direct_lost_race_to_daemon": s.lost_race}))
                    .collect::<Vec<_>>(),
            }));
        }
    }
    let direct: Vec<&KillSample> = samples
        .iter()
        .filter(|s| s.path == KillPath::Direct)
        .collect();
    let races = direct.iter().filter(|s| s.lost_race).count();
    let mut notes_extra = Vec::new();
    if races > 0 {
        notes_extra.push(format!(
            "**{races} of {} `--direct` kills exited with status 1** although every process was \
             dead: with the daemon running, the daemon tears the agent down as soon as its first \
             process dies and removed the cgroup before the CLI could (`killed, but removing \
             ...: No such file or directory`); the daemon logs the same race from its side. \
             Their figures are kept. By size: {}.",
            direct.len(),
            plan.kill_sizes
                .iter()
                .map(|&n| {
                    let of = direct.iter().filter(|s| s.size == n);
                    format!(
                        "{n}: {} of {}",
                        of.clone().filter(|s| s.lost_race).count(),
                        of.count()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let biggest = plan.kill_sizes.last().copied().unwrap_or(1);
    let big_daemon = Stats::of(&pick(biggest, KillPath::Daemon, false));
    let big_wall = Stats::of(&pick(biggest, KillPath::Daemon, true));
    let big_kernel = Stats::of(&pick(biggest, KillPath::Kernel, false));
    Ok(CaseReport {
        id: 6,
        title: CASES[5].title.to_string(),
        headline: format!(
            "{biggest} processes: {} ms in the daemon ({} ms for the whole `agentd kill`), kernel alone {} ms",
            num(big_daemon.median),
            num(big_wall.median),
            num(big_kernel.median)
        ),
        method: format!(
            "An agent (profile allowing every file) runs `agentd-act sleep 600` (1 process) or \
             `agentd-act fork-bomb N` (N processes that double-fork and call setsid, while the \
             first keeps forking short-lived children); once its cgroup.procs lists N \
             processes, `agentd kill NAME --json` is run (or with `--direct`, which writes the \
             cgroup files from the CLI itself). The own figure is `outcomes[0].millis`: for \
             the daemon from before it counts the processes and sets the kill flag until \
             cgroup.events says `populated 0` (it polls every 0.5 ms); for `--direct` from \
             after the count. The wall time is the whole `agentd kill` command (start of the \
             CLI, request, kill, the daemon's teardown of the agent, exit). The kernel's own \
             cost is measured on a plain cgroup of the bench's holding the same program and \
             processes (as root, no agentd involved): from writing cgroup.kill until \
             `populated 0` (cgroup.events read every 50 µs). One warm-up kill per path, then {r} \
             repetitions per size, the order of the three paths rotated each time. Ratios are \
             of medians: to the kernel's at the same size, and to the same path's with one \
             process.",
            r = plan.kill_reps
        ),
        tables: vec![Table {
            caption: String::new(),
            header: [
                "N",
                "processes at kill",
                "path",
                "own figure ms",
                "wall ms",
                "own / kernel",
                "wall / kernel",
                "own / 1 process",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        }],
        notes: vec![
            "Paths: ".to_string()
                + &KillPath::ALL
                    .iter()
                    .map(|p| format!("{}: {}", p.key(), p.label()))
                    .collect::<Vec<_>>()
                    .join("; ")
                + ".",
            "Resolution: agentd reads cgroup.events right after writing cgroup.kill and then \
             every 0.5 ms, the bench every 50 µs, so figures below a millisecond are coarse. \
             The wall time adds what a user waits for besides the kill: the CLI's start, the \
             request and (through the daemon) its teardown of the agent."
                .to_string(),
        ]
        .into_iter()
        .chain(notes_extra)
        .collect(),
        json: json!({"cells": cells, "direct_kills_that_lost_the_race_to_the_daemon": races}),
    })
}

// ---------------------------------------------------------------------------------------
// The machine, and the output files

fn machine_info(env: &Env) -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let git = |args: &[&str]| -> String {
        Command::new("git")
            .current_dir(workspace_root())
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    // Changes to what is measured (not to this bench).
    let dirty = !git(&[
        "status",
        "--porcelain",
        "--",
        "agentd",
        "agentd-ebpf",
        "agentd-common",
    ])
    .is_empty();
    let mut enforcement = serde_json::Map::new();
    for e in env.doctor["enforcement"].as_array().into_iter().flatten() {
        let area = e["area"].as_str().unwrap_or("?").to_string();
        let by = e["enforcers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" + ")
            })
            .unwrap_or_default();
        enforcement.insert(area, json!(by));
    }
    let others = proc_pids()
        .into_iter()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "agentd")
        })
        .count();
    json!({
        "cpu": cpu,
        "cores": cores,
        "kernel": kernel,
        "date": utc_now(),
        "commit": commit,
        "uncommitted_changes": dirty,
        "enforcement": enforcement,
        "load_at_start": loadavg(),
        "agentd_processes_at_start": others,
    })
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `YYYY-MM-DDTHH:MM:SSZ` now (coreutils' date: no calendar code of our own here).
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn write_results(
    dir: &Path,
    plan: &Plan,
    machine: &Value,
    reports: &[CaseReport],
    took: f64,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut md = String::new();
    let _ = writeln!(md, "# agentd benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench{}` on {} in {:.0} s{}; do not edit, run it again. \
         Figures are medians over rounds with (min–max); results.json beside this file has every \
         sample.\n",
        if plan.quick { " --quick" } else { "" },
        machine["date"].as_str().unwrap_or("?"),
        took,
        if plan.quick {
            " (a smoke check with few rounds: figures are rough)"
        } else {
            ""
        },
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let s = |k: &str| machine[k].as_str().unwrap_or("?").to_string();
    let _ = writeln!(md, "| CPU | {} |", s("cpu"));
    let _ = writeln!(md, "| cores | {} |", machine["cores"]);
    let _ = writeln!(md, "| kernel | {} |", s("kernel"));
    let _ = writeln!(md, "| date | {} |", s("date"));
    let _ = writeln!(
        md,
        "| agentd | commit {}{} |",
        s("commit"),
        if machine["uncommitted_changes"] == true {
            " with uncommitted changes to agentd"
        } else {
            ""
        }
    );
    let enforcement = machine["enforcement"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    let _ = writeln!(md, "| enforcers (`agentd doctor`) | {enforcement} |");
    if let Some(lines) = reports
        .iter()
        .find_map(|r| r.json["daemon_enforcement"].as_array())
        .filter(|a| !a.is_empty())
    {
        let lines: Vec<&str> = lines.iter().filter_map(Value::as_str).collect();
        let _ = writeln!(
            md,
            "| the daemon (`agentd inspect`) | {} |",
            lines.join("<br>")
        );
    }
    let _ = writeln!(
        md,
        "| load average (1, 5, 15 min) | {} at the start, {} at the end |",
        s("load_at_start"),
        s("load_at_end")
    );
    let _ = writeln!(
        md,
        "| other agentd processes at the start | {} (tests running at the same time share the 2 cores: figures are noisy) |\n",
        machine["agentd_processes_at_start"]
    );
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(md, "| case | what | result |\n|---|---|---|");
    for c in CASES {
        let result = match (reports.iter().find(|r| r.id == c.id), c.group) {
            (Some(r), _) => r.headline.clone(),
            (None, Some(_)) => "not measured in this run (`--only`)".to_string(),
            (None, None) => "**not yet measured**".to_string(),
        };
        let _ = writeln!(md, "| {} | {} | {} |", c.id, c.title, result);
    }
    md.push('\n');
    for r in reports {
        let _ = writeln!(md, "## Case {}: {}\n", r.id, r.title);
        let _ = writeln!(md, "{}\n", r.method);
        for t in &r.tables {
            t.markdown(&mut md);
        }
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
        if !r.notes.is_empty() {
            md.push('\n');
        }
    }
    let json = json!({
        "generated_by": "cargo xtask bench",
        "seconds": took,
        "plan": plan.json(),
        "machine": machine,
        "cases": CASES.iter().map(|c| {
            match reports.iter().find(|r| r.id == c.id) {
                Some(r) => json!({"id": c.id, "title": c.title, "status": "measured",
                                  "headline": r.headline, "results": r.json}),
                None => json!({"id": c.id, "title": c.title, "status": if c.group.is_some() {
                    "not measured in this run" } else { "not yet measured" }}),
            }
        }).collect::<Vec<_>>(),
    });
    fs::write(dir.join("RESULTS.md"), md)?;
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_median_and_the_quartiles() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.n, s.median, s.min, s.max), (5, 3.0, 1.0, 5.0));
        assert_eq!((s.q1, s.q3), (2.0, 4.0));
        assert_eq!(Stats::of(&[1.0, 2.0]).median, 1.5);
        assert_eq!(Stats::of(&[]).n, 0);
    }

    #[test]
    fn paired_ratios_divide_round_by_round() {
        let r = paired_ratio(&[2.0, 3.0, 8.0], &[1.0, 3.0, 4.0]);
        assert_eq!((r.median, r.min, r.max), (2.0, 1.0, 2.0));
    }
}
