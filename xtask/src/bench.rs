//! `cargo xtask bench`: what agentd costs the processes of a host, how fast its kill
//! switch is, how it holds many agents and how many denials it logs. Not part of `cargo
//! xtask test`: figures are measured, never asserted.
//!
//! It builds the release binaries (`agentd`, and the test helper `agentd-act`), runs each
//! case several times after a warm-up, and writes `bench/RESULTS.md` and
//! `bench/results.json`: the median of each figure with its spread (minimum and maximum
//! over the rounds), and ratios against a baseline. Cases are numbered as in the issue
//! that asked for them (`CASES`); each belongs to a group (`Group`, `run_group`) whose
//! function measures and returns its `CaseReport`; how much each measures is in `Plan`
//! (`--quick`: a smoke check of about 3 minutes; the full run takes about 20).
//!
//! - Case 1: system call cost of a process that is NOT an agent (`getpid`, and `openat` +
//!   `close` of /dev/null), with agentd absent, loaded without agents, with an agent
//!   running (the Landlock reporter on `sys_exit` is attached while any agent runs on a
//!   host without BPF LSM), and with an agent that has a `syscalls` budget (`sys_enter`
//!   is attached too). The conditions alternate in rounds (absent, loaded, agent, budget,
//!   absent, ...), so that drift of the machine touches all of them alike.
//! - Case 2: the same `getpid` loop inside an agent (seccomp filter; a budget so large
//!   that it never runs out, action `log`) against the loop outside any agent.
//! - Case 3: `connect` (socket, connect, close) to a loopback listener of the bench, and
//!   `sendto` of a datagram to it, outside agents and in agents whose profiles allow the
//!   listener plus 0, 100 or 10,000 other CIDR rules.
//! - Case 4: `openat` + `close` of a file 6 levels below the bench directory, outside
//!   agents and in agents with 0, 100 or 1,000 path rules: on the host (Landlock), and in
//!   a VM the bench boots with a Debian kernel whose BPF LSM works (`bench-vm`, hidden, runs
//!   the same rounds there with `files.enforcers = ["lsm"]` and the kernel's run-time
//!   statistics of file_open); if the VM cannot run, RESULTS.md says why.
//! - Case 5: `agentd run -- /bin/true` against `/bin/true`, bubblewrap (as nobody, every
//!   namespace) and systemd-run (which needs systemd as PID 1; where it cannot run, the
//!   table says why), with the daemon's CPU time per launch.
//! - Case 6: kill switch latency for agents of 1, 100, 1,000 and 5,000 processes, through
//!   the daemon and with `--direct`, against the kernel's own cost (writing `cgroup.kill`
//!   of a plain cgroup holding the same processes).
//! - Case 7: 1,000 agents with distinct policies launched one after another: time, the
//!   daemon's memory (VmRSS, BPF map `memlock:`), and `agentd update` of one agent with 1
//!   and with 1,000 running; then `agentd kill --all`.
//! - Case 8: agents flooding denied connects at rising rates: the `net_denied` records in
//!   the audit log against the denials, and the kernel's count of lost records.
//!
//! The loops run in a child process, the xtask binary with the hidden subcommand
//! `bench-loop` (the same binary outside and inside agents). The binaries measured are
//! copied into the bench's directory at the start (another build of the checkout may
//! replace target/ files while the bench runs). Everything the bench creates has names
//! of its own (`agentd-bench-<pid>`: cgroups, bpffs pins, and `target/xtask/bench-<pid>/`
//! for the binaries, the daemon's configuration, sockets, audit log and logs, the VM image,
//! the cases' files); guards stop the daemon, qemu and the agents and remove those on
//! every exit path, also on an error, a panic or Ctrl-C (and the daemon and qemu get a
//! signal from the kernel should this process die); `leftovers` checks at the end.

use crate::host::{
    check_interrupted, install_signal_handlers, populated, proc_pids, rmdir_tree, tail,
};
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

use crate::util::{Timer, is_root, run_inherit, which, workspace_root, xtask_target_dir};

#[derive(clap::Args)]
pub struct Options {
    /// Fewer rounds and repetitions: a smoke check (under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Run only this case (repeatable), 1 to 8 (1 and 2 are measured together). The others
    /// are reported as not measured in this run.
    #[arg(long, value_name = "CASE")]
    only: Vec<u32>,
}

/// `cargo xtask bench-loop OP N`: the measured loop, in a process of its own (hidden).
#[derive(clap::Args)]
pub struct LoopOptions {
    /// `getpid` (the raw system call, not the C library's), `open` (openat + close of
    /// /dev/null), `open-path` (openat + close of `--target`), `connect` (socket, connect
    /// to `--target` ADDR:PORT, close with a reset), `sendto` (one datagram to `--target`
    /// from an unconnected UDP socket), or `flood` (connects to `--target` that agentd
    /// denies, `--rate` a second for `--secs`; N is ignored).
    op: String,
    /// Calls per batch.
    n: u64,
    /// Batches after one warm-up batch; the fastest is the measurement (other work on the
    /// machine only ever adds time), the median is reported too.
    #[arg(long, default_value_t = 15)]
    batches: u32,
    /// What `open-path`, `connect`, `sendto` and `flood` work on.
    #[arg(long)]
    target: Option<String>,
    /// `flood`: attempts a second (0: as fast as it can).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// `flood`: for how long, in seconds.
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
}
// ---------------------------------------------------------------------------------------
// The cases

/// How the cases are grouped for measuring: cases 1 and 2 share their rounds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    Syscalls,
    Network,
    Files,
    Launch,
    Kill,
    Scale,
    Events,
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
        group: Some(Group::Network),
    },
    CaseDef {
        id: 4,
        title: "open() with 0, 100 and 1,000 path rules (Landlock on the host, BPF LSM in the VM)",
        group: Some(Group::Files),
    },
    CaseDef {
        id: 5,
        title: "`agentd run -- /bin/true` against /bin/true, bubblewrap and systemd-run",
        group: Some(Group::Launch),
    },
    CaseDef {
        id: 6,
        title: "Kill switch latency",
        group: Some(Group::Kill),
    },
    CaseDef {
        id: 7,
        title: "1,000 concurrent agents: time, memory, one policy update",
        group: Some(Group::Scale),
    },
    CaseDef {
        id: 8,
        title: "Denials per second that reach the audit log, and where losses start",
        group: Some(Group::Events),
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
    /// Case 3: rounds; connections and datagrams per batch.
    net_rounds: usize,
    connect_n: u64,
    sendto_n: u64,
    /// Case 4: rounds and opens per batch on the host; in the VM (software emulation).
    files_rounds: usize,
    open_path_n: u64,
    vm_rounds: usize,
    vm_open_n: u64,
    vm_batches: u32,
    /// Case 5: rounds, and launches per launcher per round.
    launch_rounds: usize,
    launches: usize,
    /// Case 7: rounds, agents, `agentd update` repetitions per condition.
    scale_rounds: usize,
    scale_agents: usize,
    update_reps: usize,
    /// Case 8: rounds of the rising levels, offered rates (0: as fast as it goes), and
    /// seconds per level.
    flood_rounds: usize,
    flood_rates: Vec<u64>,
    flood_secs: f64,
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
            net_rounds: if quick { 2 } else { 9 },
            connect_n: 2000,
            sendto_n: 20_000,
            files_rounds: if quick { 2 } else { 9 },
            open_path_n: 10_000,
            vm_rounds: if quick { 1 } else { 7 },
            vm_open_n: if quick { 2000 } else { 5000 },
            vm_batches: if quick { 5 } else { 9 },
            launch_rounds: if quick { 3 } else { 9 },
            launches: if quick { 10 } else { 20 },
            scale_rounds: if quick { 1 } else { 3 },
            scale_agents: 1000,
            update_reps: if quick { 3 } else { 9 },
            flood_rounds: if quick { 1 } else { 3 },
            flood_rates: if quick {
                vec![5_000, 20_000, 50_000, 100_000, 0]
            } else {
                vec![
                    2_000, 5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 100_000, 0,
                ]
            },
            flood_secs: if quick { 1.0 } else { 2.0 },
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
            "net_rounds": self.net_rounds,
            "connects_per_batch": self.connect_n,
            "sendtos_per_batch": self.sendto_n,
            "files_rounds": self.files_rounds,
            "opens_per_batch": self.open_path_n,
            "vm_rounds": self.vm_rounds,
            "vm_opens_per_batch": self.vm_open_n,
            "vm_batches": self.vm_batches,
            "launch_rounds": self.launch_rounds,
            "launches_per_round": self.launches,
            "scale_rounds": self.scale_rounds,
            "scale_agents": self.scale_agents,
            "update_repetitions": self.update_reps,
            "flood_rounds": self.flood_rounds,
            "flood_rates": self.flood_rates,
            "flood_seconds": self.flood_secs,
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
        // Each group's daemons start a fresh audit log: what a command reads of the log
        // (`agentd kill --direct` finds the chain's last record in it) then does not
        // depend on what the groups before wrote.
        for f in [
            env.audit_log(),
            env.audit_log().with_extension("jsonl.pending"),
        ] {
            if let Err(e) = fs::remove_file(&f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                bail!("removing {}: {e}", f.display());
            }
        }
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
        Group::Network => net_case(env, plan, progress).map(|r| vec![r]),
        Group::Files => files_case(env, plan, progress).map(|r| vec![r]),
        Group::Launch => launch_case(env, plan, progress).map(|r| vec![r]),
        Group::Kill => kill_case(env, plan, progress).map(|r| vec![r]),
        Group::Scale => scale_case(env, plan, progress).map(|r| vec![r]),
        Group::Events => events_case(env, plan, progress).map(|r| vec![r]),
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
    if opts.op == "flood" {
        return flood(&opts);
    }
    let target = || opts.target.as_deref().context("this loop needs --target");
    let mut work: Box<dyn FnMut(u64) -> Result<()>> = match opts.op.as_str() {
        "getpid" => Box::new(|n| {
            getpid_loop(n);
            Ok(())
        }),
        "open" => Box::new(|n| {
            open_loop(n);
            Ok(())
        }),
        "open-path" => {
            let path = CString::new(target()?)?;
            Box::new(move |n| open_path_loop(&path, n))
        }
        "connect" => {
            let addr = sockaddr(target()?)?;
            Box::new(move |n| connect_loop(&addr, n))
        }
        "sendto" => {
            let addr = sockaddr(target()?)?;
            let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
            Box::new(move |n| sendto_loop(&sock, &addr, n))
        }
        other => {
            bail!("unknown loop `{other}` (getpid, open, open-path, connect, sendto, flood)")
        }
    };
    let n = opts.n.max(1);
    let mut batch = || -> Result<f64> {
        let t = Instant::now();
        work(n)?;
        Ok(t.elapsed().as_nanos() as f64 / n as f64)
    };
    batch()?; // warm-up
    let per_batch: Vec<f64> = (0..opts.batches.max(1))
        .map(|_| batch())
        .collect::<Result<_>>()?;
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

/// openat + close of `path`, every one checked (a refused open would measure the refusal).
fn open_path_loop(path: &std::ffi::CStr, n: u64) -> Result<()> {
    for _ in 0..n {
        // SAFETY: a valid NUL-terminated path; the descriptor is closed at once.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            bail!(
                "open {}: {}",
                path.to_string_lossy(),
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: our descriptor.
        unsafe { libc::syscall(libc::SYS_close, fd) };
    }
    Ok(())
}

/// An IPv4 `ADDR:PORT` as the kernel takes it.
fn sockaddr(text: &str) -> Result<libc::sockaddr_in> {
    let a: std::net::SocketAddrV4 = text
        .parse()
        .with_context(|| format!("`{text}` is not an IPv4 ADDR:PORT"))?;
    Ok(libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    })
}

const SOCKADDR_IN_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

/// A TCP socket, a connect (the handshake with a listener on loopback), and a close with a
/// reset (SO_LINGER 0: no TIME_WAIT left behind, so that 10^5 connects do not run out of
/// ports), `n` times; every connect checked.
fn connect_loop(addr: &libc::sockaddr_in, n: u64) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    for _ in 0..n {
        // SAFETY: plain socket calls on a descriptor of our own, closed in every case.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let r = libc::connect(
                fd,
                (addr as *const libc::sockaddr_in).cast(),
                SOCKADDR_IN_LEN,
            );
            if r != 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                bail!("connect: {e}");
            }
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::close(fd);
        }
    }
    Ok(())
}

/// One byte to `addr` from an unconnected UDP socket (sendto with an address, the call
/// agentd's `sendmsg4` judges), `n` times.
fn sendto_loop(sock: &std::net::UdpSocket, addr: &libc::sockaddr_in, n: u64) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = sock.as_raw_fd();
    for _ in 0..n {
        // SAFETY: a valid buffer and address.
        let r = unsafe {
            libc::sendto(
                fd,
                b"x".as_ptr().cast(),
                1,
                0,
                (addr as *const libc::sockaddr_in).cast(),
                SOCKADDR_IN_LEN,
            )
        };
        if r != 1 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Connects that agentd denies (EPERM from its `connect4` program, which writes a record
/// for the daemon), paced at `--rate` a second for `--secs`; one TCP socket, reused (a
/// refused connect leaves it unconnected). Prints the attempts and their outcomes.
fn flood(opts: &LoopOptions) -> Result<()> {
    let addr = sockaddr(opts.target.as_deref().context("flood needs --target")?)?;
    let open = || -> Result<i32> {
        // SAFETY: a plain socket call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    };
    let mut fd = open()?;
    let limit = Duration::from_secs_f64(opts.secs.max(0.001));
    let (mut attempts, mut denied) = (0u64, 0u64);
    let mut other: BTreeMap<i32, u64> = BTreeMap::new();
    let start = Instant::now();
    loop {
        let now = start.elapsed();
        if now >= limit {
            break;
        }
        if opts.rate > 0 {
            // On schedule, not spinning: the CPU stays free for the daemon (a sleep that
            // overshoots is made up by the attempts then due).
            let due = Duration::from_secs_f64(attempts as f64 / opts.rate as f64);
            if due > now {
                std::thread::sleep(due - now);
                continue;
            }
        }
        // SAFETY: our socket and a valid address.
        let r = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_in).cast(),
                SOCKADDR_IN_LEN,
            )
        };
        attempts += 1;
        let errno = if r == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        };
        if errno == libc::EPERM {
            denied += 1;
            continue;
        }
        *other.entry(errno).or_default() += 1;
        // Connected or refused otherwise: the socket is spent.
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        fd = open()?;
    }
    let secs = start.elapsed().as_secs_f64();
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    println!(
        "{}",
        json!({"op": "flood", "attempts": attempts, "denied": denied,
               "other_errno": other.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
               "secs": secs, "rate": opts.rate})
    );
    Ok(())
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
    /// target/xtask/bench-<pid>: the binaries measured (`bin/`), the daemon's
    /// configuration, profiles, sockets, audit log and tmp (`daemon/`), logs, case files.
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    /// The port of the daemon's resolvers (each agent's at 127.53.x.y).
    dns_port: u16,
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

/// What a case changes in the daemon's configuration (the rest is [`Env::config_text`]).
#[derive(Clone, Debug, Default)]
struct DaemonSettings {
    /// Metrics on 127.0.0.1, a port the kernel picks (the daemon's log says which).
    metrics: bool,
    /// `agents.max`.
    agents_max: Option<u32>,
    /// `files.enforcers`, as TOML (`["lsm"]`).
    files_enforcers: Option<&'static str>,
    /// `audit.max_bytes`.
    audit_max_bytes: Option<u64>,
}

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
            agentd: dir.join("bin/agentd"),
            act: dir.join("bin/agentd-act"),
            xtask: dir.join("bin/xtask"),
            config: dir.join("daemon/agentd.toml"),
            socket: dir.join("daemon/agentd.sock"),
            dns_port: free_port()?,
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
            .create(env.daemon_dir().join("profiles"))
            .with_context(|| format!("creating {}", env.dir.display()))?;
        for d in [
            env.dir.clone(),
            env.daemon_dir(),
            env.daemon_dir().join("profiles"),
        ] {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        }
        fs::write(env.daemon_dir().join("profiles/plain.toml"), PLAIN_PROFILE)?;
        fs::write(
            env.daemon_dir().join("profiles/budget.toml"),
            BUDGET_PROFILE,
        )?;
        fs::write(&env.config, env.config_text(&DaemonSettings::default()))?;
        // The binaries measured, copied: another build of this checkout (tests running at
        // the same time) may replace target/ files while the bench runs. This process's
        // own binary is read through /proc/self/exe, which holds even if it was replaced.
        let bin = env.dir.join("bin");
        fs::DirBuilder::new().mode(0o755).create(&bin)?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
        for (src, dest) in [
            (ws.join("target/release/agentd"), &env.agentd),
            (ws.join("target/release/agentd-act"), &env.act),
            (PathBuf::from("/proc/self/exe"), &env.xtask),
        ] {
            if !src.is_file() {
                bail!("{} is missing after the build", src.display());
            }
            fs::copy(&src, dest)
                .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
            fs::set_permissions(dest, fs::Permissions::from_mode(0o755))?;
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

    /// The daemon's configuration: everything in the bench directory, the agent root and
    /// pins named after this run, agents as nobody; `s` changes what a case needs.
    fn config_text(&self, s: &DaemonSettings) -> String {
        let mut agents = String::new();
        if let Some(max) = s.agents_max {
            let _ = writeln!(agents, "max = {max}");
        }
        let mut audit = String::new();
        if let Some(bytes) = s.audit_max_bytes {
            let _ = writeln!(audit, "max_bytes = {bytes}");
        }
        let files = match s.files_enforcers {
            Some(e) => format!("[files]\nenforcers = {e}\n"),
            None => String::new(),
        };
        format!(
            "# Written by `cargo xtask bench`.\n[daemon]\nsocket = \"{}\"\nlaunch_socket = \"{}\"\n\
             admin_group = \"root\"\ncgroup_root = \"{}\"\nbpffs = \"{}\"\non_stop = \"kill\"\n\
             [agents]\nprofiles_dir = \"{}\"\ndefault_profile = \"plain\"\nuser = \"nobody\"\ntmp_dir = \"{}\"\n{agents}\
             [audit]\npath = \"{}\"\n{audit}[metrics]\nlisten = \"{}\"\n[dns]\nport = {}\n{files}",
            self.socket.display(),
            self.daemon_dir().join("launch.sock").display(),
            self.root.display(),
            self.bpffs.display(),
            self.daemon_dir().join("profiles").display(),
            self.daemon_dir().join("tmp").display(),
            self.audit_log().display(),
            if s.metrics { "127.0.0.1:0" } else { "off" },
            self.dns_port,
        )
    }

    /// What enforces files on this host, as `agentd doctor` says.
    fn doctor_files(&self) -> String {
        self.doctor["enforcement"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["area"] == "files")
            .and_then(|e| e["enforcers"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" + ")
            })
            .unwrap_or_else(|| "?".to_string())
    }

    /// The daemon's own directory (configuration, sockets, profiles, audit log, agents'
    /// tmp): agentd keeps agents out of it, so what agents use is elsewhere in `dir`.
    fn daemon_dir(&self) -> PathBuf {
        self.dir.join("daemon")
    }

    fn audit_log(&self) -> PathBuf {
        self.daemon_dir().join("audit.jsonl")
    }

    /// Writes a profile into the daemon's profiles directory (the file named after it).
    fn write_profile(&self, name: &str, body: &str) -> Result<()> {
        fs::write(
            self.daemon_dir()
                .join("profiles")
                .join(format!("{name}.toml")),
            format!("name = \"{name}\"\nversion = \"1.0.0\"\n{body}"),
        )
        .with_context(|| format!("writing profile {name}"))
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

/// Kills every process of a cgroup tree that this bench named, and removes the tree.
fn remove_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    wait_for(Duration::from_secs(10), || populated(path) != Some(true));
    rmdir_tree(path)
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

// ---------------------------------------------------------------------------------------
// The daemon under test

/// A running `agentd daemon` of this bench, and the `agentd run` clients of its agents.
/// Dropping it stops the daemon (SIGTERM: it kills its agents and removes its cgroup root
/// and pins) and removes whatever it did not.
struct Daemon<'e> {
    env: &'e Env,
    child: Child,
    log: PathBuf,
    config: PathBuf,
    clients: Vec<(String, Child)>,
    /// Flags given to every `agentd run` (`--degraded-ok` where only BPF LSM enforces).
    run_flags: Vec<String>,
    settings: DaemonSettings,
    stopped: bool,
}

impl<'e> Daemon<'e> {
    fn start(env: &'e Env) -> Result<Daemon<'e>> {
        Daemon::start_config(env, env.config.clone(), DaemonSettings::default())
    }

    /// A daemon with a configuration of its own (written in the bench directory).
    fn start_with(env: &'e Env, settings: &DaemonSettings) -> Result<Daemon<'e>> {
        let config = env.daemon_dir().join(format!(
            "agentd-{}.toml",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&config, env.config_text(settings))?;
        Daemon::start_config(env, config, settings.clone())
    }

    fn start_config(env: &'e Env, config: PathBuf, settings: DaemonSettings) -> Result<Daemon<'e>> {
        for p in [&env.root, &env.socket] {
            if p.exists() {
                bail!("{} is still there from the previous daemon", p.display());
            }
        }
        let log = env.scratch("daemon.log");
        let file = File::create(&log)?;
        let mut cmd = Command::new(&env.agentd);
        cmd.arg("--config")
            .arg(&config)
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
            config,
            clients: Vec::new(),
            run_flags: Vec::new(),
            settings,
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
        c.arg("--config").arg(&self.config);
        c
    }

    /// `agentd run --profile P --name N --user nobody --workdir DIR [FLAGS] -- ARGS...`.
    fn run_command(&self, profile: &str, name: &str, flags: &[String], args: &[&OsStr]) -> Command {
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
        .args(&self.run_flags)
        .args(flags)
        .arg("--")
        .args(args);
        cmd
    }

    /// `agentd run --profile P --name N -- ARGS...`, staying attached (its client is kept);
    /// returns once the agent's cgroup holds a process.
    fn start_agent(&mut self, profile: &str, name: &str, args: &[&OsStr]) -> Result<()> {
        self.start_agent_with(profile, name, &[], args, Duration::from_millis(5))
            .map(drop)
    }

    /// The same with more `run` flags, polling every `step`; returns the time from the
    /// start of `agentd run` until the agent's cgroup held a process.
    fn start_agent_with(
        &mut self,
        profile: &str,
        name: &str,
        flags: &[String],
        args: &[&OsStr],
        step: Duration,
    ) -> Result<Duration> {
        let err = self.env.scratch(&format!("agent-{name}.err"));
        let mut cmd = self.run_command(profile, name, flags, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&err)?);
        let start = Instant::now();
        let child = cmd.spawn().context("starting agentd run")?;
        self.clients.push((name.to_string(), child));
        let procs = self.env.root.join(name).join("cgroup.procs");
        let client = &mut self.clients.last_mut().expect("just pushed").1;
        let started = wait_until(Duration::from_secs(60), step, || {
            Ok(count_lines(&procs) >= 1 || client.try_wait()?.is_some())
        })?;
        let took = start.elapsed();
        if !started || client.try_wait()?.is_some() {
            bail!(
                "agent {name} did not start: {}\ndaemon log:\n{}",
                fs::read_to_string(&err).unwrap_or_default().trim(),
                tail(&self.log, 20)
            );
        }
        let _ = fs::remove_file(&err);
        Ok(took)
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
        let mut cmd = self.run_command(profile, name, &[], args);
        run_timed(self.env, &mut cmd, Duration::from_secs(120))
    }

    fn links(&self) -> Links {
        links_of(self.pid())
    }

    /// Whether the daemon attaches the Landlock reporter (`sys_exit`) while agents run:
    /// where Landlock enforces files and BPF LSM does not.
    fn reporter_expected(&self) -> bool {
        self.settings.files_enforcers != Some(LSM_ONLY)
            && !self.env.doctor_files().contains("BPF LSM")
    }

    /// `127.0.0.1:PORT` of the daemon's metrics, from its log.
    /// The daemon says it once its control socket already answers: waits for the line
    /// (until the daemon says it is ready, or 30 s).
    fn metrics_addr(&self) -> Result<Option<String>> {
        let find = || -> (Option<String>, bool) {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let addr = log
                .lines()
                .find_map(|l| l.strip_prefix("agentd: metrics: http://"))
                .and_then(|r| r.strip_suffix("/metrics"))
                .map(str::to_string);
            (addr, log.contains("agentd: ready"))
        };
        wait_until(Duration::from_secs(30), Duration::from_millis(10), || {
            let (addr, ready) = find();
            Ok(addr.is_some() || ready)
        })?;
        Ok(find().0)
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
// Shared by cases 3 to 8: loops run outside and inside agents, and tables of ratios

/// Figures per "condition/op", one per round (paired by index: every condition is
/// measured in every round).
type Samples = BTreeMap<String, Vec<f64>>;

/// The command line of a `bench-loop` run.
fn loop_args(env: &Env, op: &str, n: u64, batches: u32, target: Option<&str>) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        env.xtask.clone().into_os_string(),
        "bench-loop".into(),
        op.into(),
        n.to_string().into(),
        "--batches".into(),
        batches.to_string().into(),
    ];
    if let Some(t) = target {
        v.push("--target".into());
        v.push(t.into());
    }
    v
}

/// A loop outside any agent: ns per call.
fn loop_outside(env: &Env, args: &[OsString], what: &str) -> Result<f64> {
    let (status, out, err) = run_timed(
        env,
        Command::new(&args[0]).args(&args[1..]),
        Duration::from_secs(120),
    )?;
    loop_result(status, &out, &err, what)
}

/// A loop as agent `name` under `profile`: ns per call.
fn loop_agent(d: &Daemon, profile: &str, name: &str, args: &[OsString]) -> Result<f64> {
    let a: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let (status, out, err) = d.run_agent(profile, name, &a)?;
    loop_result(status, &out, &err, &format!("the loop in agent {name}"))
}

/// The holder agent of a round (`sleep 600`), and the reporter it brings where Landlock
/// enforces files (`sys_exit`, attached while any agent runs).
fn start_holder(d: &mut Daemon, name: &str) -> Result<()> {
    let act = d.env.act.clone();
    d.start_agent(
        "plain",
        name,
        &[act.as_os_str(), OsStr::new("sleep"), OsStr::new("600")],
    )?;
    if d.reporter_expected() {
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            Ok(d.links().sys_exit > 0)
        })?;
    }
    Ok(())
}

/// One column group of a ratio table: the op's key in the samples and its header.
struct OpCol<'a> {
    op: &'a str,
    header: &'a str,
}

/// A table of conditions (rows) × ops: each figure (median over rounds, min–max) and its
/// ratios, paired by round, to each baseline condition. Also its JSON.
fn ratio_table(
    samples: &Samples,
    conds: &[(String, String)],
    ops: &[OpCol],
    bases: &[(&str, &str)],
) -> (Table, Value) {
    let get = |k: &str| samples.get(k).cloned().unwrap_or_default();
    let mut header = vec!["condition".to_string()];
    for op in ops {
        header.push(op.header.to_string());
        for (_, label) in bases {
            header.push(format!("ratio to {label}"));
        }
    }
    let mut rows = Vec::new();
    let mut j = serde_json::Map::new();
    for (cond, label) in conds {
        let mut row = vec![label.clone()];
        let mut jc = serde_json::Map::new();
        jc.insert("label".into(), json!(label));
        for op in ops {
            let v = get(&format!("{cond}/{}", op.op));
            let s = Stats::of(&v);
            row.push(s.show());
            let mut jr = serde_json::Map::new();
            for (base, _) in bases {
                let r = paired_ratio(&v, &get(&format!("{base}/{}", op.op)));
                row.push(r.show_ratio());
                jr.insert(format!("ratio_to_{base}"), r.json());
            }
            jc.insert(
                op.op.to_string(),
                json!({"ns": s.json(), "samples": v, "ratios": jr}),
            );
        }
        rows.push(row);
        j.insert(cond.clone(), Value::Object(jc));
    }
    (
        Table {
            caption: String::new(),
            header,
            rows,
        },
        Value::Object(j),
    )
}

/// The median of per-round differences `a − b` (ns).
fn median_diff(samples: &Samples, a: &str, b: &str) -> f64 {
    let (x, y) = (
        samples.get(a).cloned().unwrap_or_default(),
        samples.get(b).cloned().unwrap_or_default(),
    );
    Stats::of(&x.iter().zip(&y).map(|(p, q)| p - q).collect::<Vec<_>>()).median
}

fn median_ratio(samples: &Samples, a: &str, b: &str) -> f64 {
    paired_ratio(
        &samples.get(a).cloned().unwrap_or_default(),
        &samples.get(b).cloned().unwrap_or_default(),
    )
    .median
}

fn push_sample(samples: &mut Samples, key: String, v: f64) {
    samples.entry(key).or_default().push(v);
}

// ---------------------------------------------------------------------------------------
// Case 3: connect() and sendto() with 0, 100 and 10,000 CIDR rules

/// Rules besides the listener's own, per profile.
const NET_RULES: [usize; 3] = [0, 100, 10_000];

/// A TCP listener and a UDP socket on the same loopback port, in the bench (outside
/// agentd). A thread accepts and closes each connection; datagrams are not read (once the
/// socket's buffer is full the kernel drops them, which costs the sender the same in
/// every condition).
struct Listener {
    port: u16,
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _udp: std::net::UdpSocket,
}

impl Listener {
    fn start() -> Result<Listener> {
        use std::os::fd::AsRawFd as _;
        for _ in 0..20 {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
            let port = tcp.local_addr()?.port();
            let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) else {
                continue;
            };
            // A long accept queue: the loop connects faster than one accept at a time
            // could ever fall behind, but a full queue would drop handshakes (a 1 s retry).
            // SAFETY: our listening socket.
            unsafe { libc::listen(tcp.as_raw_fd(), 4096) };
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                for conn in tcp.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    drop(conn);
                }
            });
            return Ok(Listener {
                port,
                stop,
                thread: Some(thread),
                _udp: udp,
            });
        }
        bail!("no loopback port free for both TCP and UDP")
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `[network] allow`: `n` distinct /24s in 10.0.0.0/8 (port 443, TCP), plus the
/// listener's `127.0.0.1/32:PORT`.
fn net_profile_body(n: usize, port: u16) -> String {
    let mut allow: Vec<String> = (0..n)
        .map(|i| format!("\"10.{}.{}.0/24:443/tcp\"", (i >> 8) & 255, i & 255))
        .collect();
    allow.push(format!("\"127.0.0.1/32:{port}\""));
    format!(
        "[files]\ndefault = \"allow\"\n[network]\nallow = [{}]\n",
        allow.join(", ")
    )
}

const NET_OPS: [OpCol; 2] = [
    OpCol {
        op: "connect",
        header: "connect ns (socket+connect+close)",
    },
    OpCol {
        op: "sendto",
        header: "sendto ns",
    },
];

fn net_case(env: &Env, plan: &Plan, progress: &Progress) -> Result<CaseReport> {
    let listener = Listener::start()?;
    let target = format!("127.0.0.1:{}", listener.port);
    for n in NET_RULES {
        env.write_profile(&format!("net-{n}"), &net_profile_body(n, listener.port))?;
    }
    let args = |op: &str| {
        let n = if op == "connect" {
            plan.connect_n
        } else {
            plan.sendto_n
        };
        loop_args(env, op, n, plan.batches, Some(&target))
    };
    let mut s = Samples::new();
    let timer = Timer::start();
    for round in 0..plan.net_rounds {
        check_interrupted()?;
        let mut line = Vec::new();
        for op in ["connect", "sendto"] {
            let v = loop_outside(env, &args(op), &format!("the {op} loop (absent)"))?;
            push_sample(&mut s, format!("absent/{op}"), v);
            line.push(format!("absent {op} {}", num(v)));
        }
        let mut d = Daemon::start(env)?;
        start_holder(&mut d, "hold")?;
        for op in ["connect", "sendto"] {
            let v = loop_outside(env, &args(op), &format!("the {op} loop (outside, hooked)"))?;
            push_sample(&mut s, format!("outside/{op}"), v);
            line.push(format!("outside {op} {}", num(v)));
        }
        let mut order = NET_RULES;
        order.rotate_left(round % NET_RULES.len());
        for n in order {
            for op in ["connect", "sendto"] {
                let name = format!("net{n}-{op}-{round}");
                let v = loop_agent(&d, &format!("net-{n}"), &name, &args(op))?;
                push_sample(&mut s, format!("rules-{n}/{op}"), v);
                line.push(format!("{n} rules {op} {}", num(v)));
            }
        }
        d.stop()?;
        progress.say(format!(
            "round {}/{} ({:.0} s): {}",
            round + 1,
            plan.net_rounds,
            timer.secs(),
            line.join(", ")
        ));
    }
    drop(listener);
    let mut conds = vec![
        (
            "absent".to_string(),
            "outside any agent, agentd absent".to_string(),
        ),
        (
            "outside".to_string(),
            "outside any agent, daemon + 1 agent running".to_string(),
        ),
    ];
    for n in NET_RULES {
        conds.push((
            format!("rules-{n}"),
            format!(
                "in an agent, {} rules + the listener's",
                thousands(n as u64)
            ),
        ));
    }
    let (table, j) = ratio_table(
        &s,
        &conds,
        &NET_OPS,
        &[("absent", "agentd absent"), ("rules-0", "0 rules")],
    );
    let last = NET_RULES[NET_RULES.len() - 1];
    let big = format!("rules-{last}");
    let headline = format!(
        "in an agent with {} CIDR rules: connect {}× (sendto {}×) agentd absent, {}× ({}×) the agent with 0 rules",
        thousands(last as u64),
        ratio(median_ratio(
            &s,
            &format!("{big}/connect"),
            "absent/connect"
        )),
        ratio(median_ratio(&s, &format!("{big}/sendto"), "absent/sendto")),
        ratio(median_ratio(
            &s,
            &format!("{big}/connect"),
            "rules-0/connect"
        )),
        ratio(median_ratio(&s, &format!("{big}/sendto"), "rules-0/sendto")),
    );
    let diff = |a: &str, b: &str, op: &str| {
        num(median_diff(&s, &format!("{a}/{op}"), &format!("{b}/{op}")))
    };
    Ok(CaseReport {
        id: 3,
        title: CASES[2].title.to_string(),
        headline,
        method: format!(
            "The bench listens on 127.0.0.1:PORT (TCP, with a thread that accepts and closes \
             each connection, and UDP, not read). The loop (`bench-loop connect`) makes \
             {cn} TCP connections per batch: `socket`, `connect` (the handshake with the \
             listener), `close` with SO_LINGER 0 (a reset: no TIME_WAIT, so ports never run \
             out); `bench-loop sendto` sends {sn} one-byte datagrams per batch from one \
             unconnected UDP socket (`sendto` with the address: what agentd's `sendmsg4` \
             judges). Fastest of {b} batches after a warm-up. Each round: the loops with \
             agentd absent; then a daemon, a holder agent (`sleep`), the loops outside \
             agents; then the loops as agents (`agentd run`) whose profiles allow \
             `127.0.0.1/32:PORT` plus 0, 100 or 10,000 other rules (distinct /24s in \
             10.0.0.0/8, port 443/tcp), the order of the three rotated from round to round; \
             the daemon is stopped at the end of the round. {r} rounds; ratios are paired \
             by round.",
            cn = plan.connect_n,
            sn = plan.sendto_n,
            b = plan.batches,
            r = plan.net_rounds,
        ),
        tables: vec![table],
        notes: vec![
            format!(
                "Where the time goes (medians of per-round differences, ns): the hooks every \
                 process pays while an agent runs (outside − absent): connect {}, sendto {}; \
                 an agent's own enforcement with 0 rules (in the agent − outside: its seccomp \
                 filter and the reporter's agent path on each of the loop's system calls, the \
                 cgroup `sock_create`, `connect4`/`sendmsg4` lookups and `skb_egress` on each \
                 packet: SYN, ACK and reset for a connection, one per datagram): connect {}, \
                 sendto {}; 10,000 rules instead of 0: connect {}, sendto {}.",
                diff("outside", "absent", "connect"),
                diff("outside", "absent", "sendto"),
                diff("rules-0", "outside", "connect"),
                diff("rules-0", "outside", "sendto"),
                diff(&big, "rules-0", "connect"),
                diff(&big, "rules-0", "sendto"),
            ) + " Differences smaller than the spread of the rows they come from are noise (a \
                 loopback connect varies by microseconds with the scheduling of the bench's \
                 accepting thread on 2 cores).",
            "The rules of all policies are in one LPM trie per address family, keyed by policy \
             id and then address, and each prefix carries its ports and those of every \
             shorter prefix: one lookup decides, and it walks at most the key's bits (32 + \
             32 for IPv4), not the rules. A loopback connect is itself a few microseconds of \
             kernel work (two sockets, a handshake through the loopback device), which is \
             what the ratio to agentd absent divides by."
                .to_string(),
        ],
        json: json!({"conditions": j, "rules": NET_RULES}),
    })
}

/// `10,000`.
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

// ---------------------------------------------------------------------------------------
// Case 4: open() with 0, 100 and 1,000 path rules

/// Path rules besides those every agent of case 4 needs to run, per profile.
const FILE_RULES: [usize; 3] = [0, 100, 1000];

/// The BPF program type of BPF LSM programs (`BPF_PROG_TYPE_LSM`).
const BPF_PROG_TYPE_LSM: u32 = 29;

/// Case 4's conditions: key, label, the profile of the agent running the loop (None:
/// outside agents).
fn files_conditions() -> Vec<(String, String, Option<String>)> {
    let mut v = vec![
        (
            "absent".to_string(),
            "outside any agent, agentd absent".to_string(),
            None,
        ),
        (
            "outside".to_string(),
            "outside any agent, daemon + 1 agent running".to_string(),
            None,
        ),
        (
            "plain".to_string(),
            "in an agent, `[files] default = \"allow\"` (no rules)".to_string(),
            Some("plain".to_string()),
        ),
    ];
    for n in FILE_RULES {
        v.push((
            format!("rules-{n}"),
            format!(
                "in an agent, default deny, the base rules + {} rules",
                thousands(n as u64)
            ),
            Some(format!("files-{n}")),
        ));
    }
    v
}

/// The file the loop opens (depth 6 below the bench directory, as in the VM test), the
/// files the rules name, and the profiles `files-N`: default deny; read and exec where the
/// loop's program and its libraries are (the base rules), read on the target's tree, and
/// read on `N` other files.
fn files_setup(env: &Env) -> Result<PathBuf> {
    let target = mkdirs(&env.dir, "files/a/b/c/d/e")?.join("target.txt");
    mkdirs(&env.dir, "rules")?;
    fs::write(&target, "x")?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644))?;
    let last = FILE_RULES[FILE_RULES.len() - 1];
    for i in 0..last {
        let f = env.dir.join(format!("rules/r{i}"));
        fs::write(&f, "")?;
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644))?;
    }
    let existing = |paths: &[&str]| -> Vec<String> {
        paths
            .iter()
            .filter(|p| Path::new(p).exists())
            .map(|p| format!("\"{p}\""))
            .collect()
    };
    let xtask = format!("\"{}\"", env.xtask.display());
    for n in FILE_RULES {
        let mut read = existing(&[
            "/usr",
            "/bin",
            "/sbin",
            "/lib",
            "/lib64",
            "/etc",
            "/proc",
            "/dev/null",
            "/dev/urandom",
        ]);
        read.push(xtask.clone());
        read.push(format!("\"{}\"", env.dir.join("files").display()));
        read.extend(
            (0..n).map(|i| format!("\"{}\"", env.dir.join(format!("rules/r{i}")).display())),
        );
        let mut exec = existing(&["/usr", "/bin", "/sbin", "/lib", "/lib64"]);
        exec.push(xtask.clone());
        env.write_profile(
            &format!("files-{n}"),
            &format!(
                "[files]\ndefault = \"deny\"\nread = [{}]\nexec = [{}]\n",
                read.join(", "),
                exec.join(", ")
            ),
        )?;
    }
    Ok(target)
}

/// Creates the directories of `rel` below `base`, each mode 0755 (agents run as nobody).
fn mkdirs(base: &Path, rel: &str) -> Result<PathBuf> {
    let mut p = base.to_path_buf();
    for c in rel.split('/') {
        p.push(c);
        if !p.exists() {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&p)
                .with_context(|| format!("creating {}", p.display()))?;
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
    }
    Ok(p)
}

/// Run time and run count of each BPF program a process holds (from /proc/PID/fdinfo,
/// kernel.bpf_stats_enabled on): program id → (type, ns, runs).
fn prog_stats(pid: u32) -> BTreeMap<u32, (u32, u64, u64)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |k: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(t), Some(id), Some(ns), Some(runs)) = (
            field("prog_type:"),
            field("prog_id:"),
            field("run_time_ns:"),
            field("run_cnt:"),
        ) {
            out.insert(id as u32, (t as u32, ns, runs));
        }
    }
    out
}

/// ns per run of the BPF LSM program that ran most between two readings (file_open, in an
/// open loop), and its runs; None if no LSM program ran.
fn lsm_ns_per_run(
    before: &BTreeMap<u32, (u32, u64, u64)>,
    after: &BTreeMap<u32, (u32, u64, u64)>,
) -> Option<(f64, u64)> {
    after
        .iter()
        .filter(|(_, (t, _, _))| *t == BPF_PROG_TYPE_LSM)
        .filter_map(|(id, (_, ns, runs))| {
            let (_, ns0, runs0) = before.get(id).copied().unwrap_or_default();
            let d = runs.checked_sub(runs0)?;
            (d > 0).then(|| ((ns - ns0) as f64 / d as f64, d))
        })
        .max_by_key(|(_, d)| *d)
}

/// Case 4's rounds with the daemon configured by `settings`: the open loop outside agents
/// (agentd absent; daemon and a holder agent running) and as agents of each condition's
/// profile. Returns the loop's ns per open, and (where BPF LSM programs run) the in-kernel
/// ns per run of the LSM program that ran most (file_open), per condition.
fn files_rounds(
    env: &Env,
    settings: &DaemonSettings,
    run_flags: &[String],
    rounds: usize,
    n: u64,
    batches: u32,
    say: &dyn Fn(String),
) -> Result<(Samples, Samples)> {
    let target = files_setup(env)?;
    let args = loop_args(
        env,
        "open-path",
        n,
        batches,
        Some(&target.to_string_lossy()),
    );
    let (mut s, mut bpf) = (Samples::new(), Samples::new());
    let conds = files_conditions();
    let timer = Timer::start();
    for round in 0..rounds {
        check_interrupted()?;
        let mut line = Vec::new();
        let v = loop_outside(env, &args, "the open loop (absent)")?;
        push_sample(&mut s, "absent/open".into(), v);
        line.push(format!("absent {}", num(v)));
        let mut d = Daemon::start_with(env, settings)?;
        d.run_flags = run_flags.to_vec();
        start_holder(&mut d, "hold")?;
        let mut measured: Vec<&(String, String, Option<String>)> = conds[1..].iter().collect();
        // The outside loop first, then the agents in an order rotated from round to round.
        let agents = measured.len() - 1;
        measured[1..].rotate_left(round % agents);
        for (key, _, profile) in measured {
            let before = prog_stats(d.pid());
            let v = match profile {
                None => loop_outside(env, &args, "the open loop (outside, hooked)")?,
                Some(p) => loop_agent(&d, p, &format!("{key}-{round}"), &args)?,
            };
            let after = prog_stats(d.pid());
            push_sample(&mut s, format!("{key}/open"), v);
            let mut item = format!("{key} {}", num(v));
            if let Some((ns, _)) = lsm_ns_per_run(&before, &after) {
                push_sample(&mut bpf, format!("{key}/open"), ns);
                let _ = write!(item, " (file_open {})", num(ns));
            }
            line.push(item);
        }
        d.stop()?;
        say(format!(
            "round {}/{rounds} ({:.0} s): {}",
            round + 1,
            timer.secs(),
            line.join(", ")
        ));
    }
    Ok((s, bpf))
}

const OPEN_OPS: [OpCol; 1] = [OpCol {
    op: "open",
    header: "openat+close ns",
}];

fn files_case(env: &Env, plan: &Plan, progress: &Progress) -> Result<CaseReport> {
    let say = |m: String| progress.say(format!("host (Landlock): {m}"));
    let (s, _) = files_rounds(
        env,
        &DaemonSettings::default(),
        &[],
        plan.files_rounds,
        plan.open_path_n,
        plan.batches,
        &say,
    )?;
    let conds: Vec<(String, String)> = files_conditions()
        .into_iter()
        .map(|(k, l, _)| (k, l))
        .collect();
    let bases = [("absent", "agentd absent"), ("rules-0", "0 rules")];
    let (mut host_table, host_json) = ratio_table(&s, &conds, &OPEN_OPS, &bases);
    host_table.caption = format!("**Host, Landlock** (this machine: {}).", env.doctor_files());
    let last = FILE_RULES[FILE_RULES.len() - 1];
    let big = format!("rules-{last}/open");

    progress.say("VM (BPF LSM): building the VM image and booting it (software emulation)");
    let vm = vm_files(env, plan, progress);
    let mut tables = vec![host_table];
    let mut notes = vec![
        format!(
            "Host, where the time goes (medians of per-round differences, ns per open): the \
             reporter every process pays while an agent runs (outside − absent) {}; an agent \
             with no rules against one outside (`default = \"allow\"` − outside) {}; the base \
             rules (0 rules − `default = \"allow\"`) {}; {} rules more {}.",
            num(median_diff(&s, "outside/open", "absent/open")),
            num(median_diff(&s, "plain/open", "outside/open")),
            num(median_diff(&s, "rules-0/open", "plain/open")),
            thousands(last as u64),
            num(median_diff(&s, &big, "rules-0/open")),
        ),
        "Landlock checks an open by walking the path from the file up to the root and, at \
         each directory that has a rule object, looking the domain's rule up in a red-black \
         tree (logarithmic in the rules); inodes no rule names have no object and cost one \
         pointer test. The base rules are what any agent needs to run a program: read on \
         /usr, /bin, /sbin, /lib, /lib64, /etc, /proc, /dev/null, /dev/urandom, read and \
         exec on the loop's binary, read on the target's tree (`files/` in the bench \
         directory); the N rules are read rules on N other files (`rules/rI`). Every agent \
         also pays its seccomp filter and the reporter on `openat` and `close`."
            .to_string(),
    ];
    let mut vm_headline = String::new();
    let vm_json = match vm {
        Ok(v) => {
            let vs: Samples = serde_json::from_value(v["samples"].clone()).unwrap_or_default();
            let vb: Samples = serde_json::from_value(v["bpf"].clone()).unwrap_or_default();
            let vm_conds: Vec<(String, String)> = conds
                .iter()
                .map(|(k, l)| {
                    let l = if k == "outside" {
                        "outside any agent, daemon + 1 agent running (file_open attached)"
                            .to_string()
                    } else {
                        l.clone()
                    };
                    (k.clone(), l)
                })
                .collect();
            let (mut t, j) = ratio_table(&vs, &vm_conds, &OPEN_OPS, &bases);
            // The in-kernel time of file_open per run, from the kernel's program stats.
            t.header.push("file_open ns/run (in-kernel)".to_string());
            t.header.push("ratio to 0 rules".to_string());
            for (row, (k, _)) in t.rows.iter_mut().zip(&vm_conds) {
                let key = format!("{k}/open");
                let b = vb.get(&key).cloned().unwrap_or_default();
                row.push(Stats::of(&b).show());
                row.push(
                    paired_ratio(&b, &vb.get("rules-0/open").cloned().unwrap_or_default())
                        .show_ratio(),
                );
            }
            t.caption = format!(
                "**VM, BPF LSM only** (`files.enforcers = [\"lsm\"]`; kernel {}, qemu with \
                 software emulation (TCG), 2 virtual CPUs on this host's 2 cores: absolute \
                 times are meaningless here, only ratios within the VM run mean anything).",
                v["kernel"].as_str().unwrap_or("?")
            );
            tables.push(t);
            vm_headline = format!(
                "; BPF LSM (VM): {}× with {} rules against 0 (file_open in-kernel {}×)",
                ratio(median_ratio(&vs, &big, "rules-0/open")),
                thousands(last as u64),
                ratio(median_ratio(&vb, &big, "rules-0/open")),
            );
            notes.push(format!(
                "VM, where the time goes (medians of per-round differences in emulated ns per \
                 open): file_open for a process outside agents (outside − absent) {}; an agent \
                 with no rules (`default = \"allow\"` − outside) {}; {} rules more than 0 {}. \
                 BPF LSM looks rules up by inode, one hash lookup per path component (a \
                 `bpf_loop` up to the root), so the number of rules should not change the \
                 cost; the in-kernel column is the kernel's own run-time statistics of the \
                 LSM program that ran most during the loop (file_open; kernel.bpf_stats_enabled \
                 on), which leave out the system call around it.",
                num(median_diff(&vs, "outside/open", "absent/open")),
                num(median_diff(&vs, "plain/open", "outside/open")),
                thousands(last as u64),
                num(median_diff(&vs, &big, "rules-0/open")),
            ));
            json!({"kernel": v["kernel"], "conditions": j, "file_open_ns_per_run": vb,
                   "rounds": v["rounds"], "opens_per_batch": v["n"], "seconds": v["seconds"]})
        }
        Err(e) => {
            progress.say(format!("VM (BPF LSM): not measured: {e:#}"));
            notes.push(format!(
                "**The BPF LSM path was not measured in this run**: {e:#}. The VM test \
                 `file_open_cost_does_not_grow_with_the_rule_count` (tests/vm/files.rs, \
                 `cargo xtask test --stage vm -- file_open_cost`) measures file_open's \
                 in-kernel time with 1 rule against 1,000 (README: ratio 0.97 to 1.08)."
            ));
            json!({"error": format!("{e:#}")})
        }
    };
    Ok(CaseReport {
        id: 4,
        title: CASES[3].title.to_string(),
        headline: format!(
            "Landlock (host): open in an agent with {} path rules {}× agentd absent, {}× the agent with 0 rules{vm_headline}",
            thousands(last as u64),
            ratio(median_ratio(&s, &big, "absent/open")),
            ratio(median_ratio(&s, &big, "rules-0/open")),
        ),
        method: format!(
            "The loop (`bench-loop open-path`) opens and closes one file, \
             `files/a/b/c/d/e/target.txt` in the bench directory ({n} `openat` + `close` \
             per batch, fastest of {b} batches after a warm-up), outside agents (agentd \
             absent; a daemon with a holder agent running) and as agents whose profiles are \
             `default = \"allow\"` (no rules) or `default = \"deny\"` with the base rules \
             and 0, 100 or 1,000 more, the order of the agents rotated from round to round. \
             On this host Landlock enforces the rules (BPF LSM is refused); the BPF LSM path \
             is measured the same way in a VM booted by the bench (the kernel of `cargo \
             xtask test --stage vm`, the daemon with `files.enforcers = [\"lsm\"]` so that \
             only BPF LSM judges files, agents started with `--degraded-ok`), {vr} rounds of \
             {vn} opens per batch there, with the kernel's run-time statistics of the BPF \
             programs. Host: {r} rounds; ratios are paired by round.",
            n = plan.open_path_n,
            b = plan.batches,
            r = plan.files_rounds,
            vr = plan.vm_rounds,
            vn = plan.vm_open_n,
        ),
        tables,
        notes,
        json: json!({"host": host_json, "vm": vm_json, "rules": FILE_RULES}),
    })
}

// ---------------------------------------------------------------------------------------
// Case 4 in a VM: the BPF LSM path (this host refuses BPF LSM)

/// `files.enforcers` for the VM part: BPF LSM alone judges files.
const LSM_ONLY: &str = "[\"lsm\"]";

/// `cargo xtask bench-vm`: case 4's rounds inside the bench's VM (hidden; its init runs it).
#[derive(clap::Args)]
pub struct VmOptions {
    #[arg(long)]
    rounds: usize,
    /// Opens per batch.
    #[arg(long)]
    n: u64,
    #[arg(long)]
    batches: u32,
}

/// Where the VM image holds this xtask binary.
const VM_XTASK: &str = "/agentd/xtask";

/// Marks the lines of the VM's console that carry the result (or why there is none).
const VM_RESULT: &str = "agentd-bench-vm-result: ";
const VM_ERROR: &str = "agentd-bench-vm-error: ";
const VM_SAY: &str = "bench-vm: ";

pub fn run_vm(opts: VmOptions) -> Result<()> {
    if std::env::var_os("AGENTD_BENCH_VM").is_none() {
        bail!("bench-vm runs inside the VM that `cargo xtask bench` boots, nowhere else");
    }
    let timer = Timer::start();
    let result = (|| -> Result<Value> {
        // The kernel's run-time statistics of BPF programs (run_time_ns in fdinfo).
        fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
            .context("enabling kernel.bpf_stats_enabled")?;
        let mut env = Env::create(&workspace_root())?;
        let settings = DaemonSettings {
            files_enforcers: Some(LSM_ONLY),
            ..Default::default()
        };
        let say = |m: String| println!("{VM_SAY}{m}");
        say(format!("files enforced by {}", env.doctor_files()));
        let (s, bpf) = files_rounds(
            &env,
            &settings,
            &["--degraded-ok".to_string()],
            opts.rounds,
            opts.n,
            opts.batches,
            &say,
        )?;
        env.succeeded = true;
        Ok(json!({
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "samples": s, "bpf": bpf, "rounds": opts.rounds, "n": opts.n,
            "seconds": timer.secs(),
        }))
    })();
    match result {
        Ok(v) => println!("{VM_RESULT}{v}"),
        Err(e) => println!("{VM_ERROR}{}", format!("{e:#}").replace('\n', " | ")),
    }
    Ok(())
}

/// The VM's init: what `cargo xtask vm` mounts, the program statistics on, then case 4's
/// rounds; powers off.
fn vm_init(plan: &Plan) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t securityfs none /sys/kernel/security
mount -t cgroup2 none /sys/fs/cgroup
echo +pids > /sys/fs/cgroup/cgroup.subtree_control
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
echo "{VM_SAY}kernel $(uname -r); LSMs $(cat /sys/kernel/security/lsm)"
export AGENTD_BENCH_VM=1 HOME=/root TMPDIR=/tmp
{VM_XTASK} bench-vm --rounds {r} --n {n} --batches {b}
poweroff -f
"#,
        r = plan.vm_rounds,
        n = plan.vm_open_n,
        b = plan.vm_batches,
    )
}

/// The initramfs: busybox, agentd and agentd-act where the bench finds them after a build
/// (so that the bench's own paths hold in the VM), this xtask binary, their libraries,
/// users.
fn vm_image(env: &Env, plan: &Plan) -> Result<PathBuf> {
    use crate::vm::{install_copy, install_stripped, shared_libraries};
    let dir = env.dir.join("vm");
    let root = dir.join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp", "root", "etc"] {
        fs::create_dir_all(root.join(d))?;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox is missing; run `cargo xtask setup` (Debian package busybox-static)");
    }
    install_copy(busybox, &root, busybox)?;
    // Where the bench in the VM copies them from, as on the host.
    let ws = workspace_root();
    let mut libs = std::collections::BTreeSet::new();
    for (bin, at) in [
        (&env.agentd, ws.join("target/release/agentd")),
        (&env.act, ws.join("target/release/agentd-act")),
        (&env.xtask, PathBuf::from(VM_XTASK)),
    ] {
        install_stripped(bin, &root, &at.to_string_lossy())?;
        libs.extend(shared_libraries(bin)?);
    }
    for lib in &libs {
        install_copy(lib, &root, lib)?;
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let init = root.join("init");
    fs::write(&init, vm_init(plan))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let image = dir.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . -print0 | cpio --null -o -H newc --quiet > '{}'",
            root.display(),
            image.display()
        ))
        .status()
        .context("packing the initramfs (cpio)")?;
    if !status.success() {
        bail!("packing the initramfs failed ({status})");
    }
    fs::remove_dir_all(&root)?;
    Ok(image)
}

/// qemu, killed when dropped (and by the kernel if the bench dies).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Boots the newest VM kernel setup installed with the bench's image and returns what
/// `bench-vm` printed as its result.
fn vm_files(env: &Env, plan: &Plan, progress: &Progress) -> Result<Value> {
    let series = crate::setup::VM_KERNELS
        .iter()
        .rev()
        .map(|k| k.series)
        .find(|s| crate::setup::installed_kernel(s).is_some())
        .context("no VM kernel is installed (`cargo xtask setup` installs them)")?;
    let kernel = crate::vm::kernel_dir(series)?;
    let image = vm_image(env, plan)?;
    let mut cmd = crate::vm::qemu(&kernel, &image)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(env.dir.join("vm/qemu.err"))?);
    // SAFETY: prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut qemu = Qemu(cmd.spawn().context("starting qemu-system-x86_64")?);
    let stdout = qemu.0.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            if tx
                .send(crate::vm::clean(&String::from_utf8_lossy(&line)))
                .is_err()
            {
                break;
            }
        }
    });
    let limit = Duration::from_secs(if plan.quick { 600 } else { 1500 });
    let start = Instant::now();
    let mut last: Vec<String> = Vec::new();
    let mut result = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(v) = line.strip_prefix(VM_RESULT) {
                    result = Some(serde_json::from_str::<Value>(v).map_err(anyhow::Error::from));
                } else if let Some(e) = line.strip_prefix(VM_ERROR) {
                    result = Some(Err(anyhow::anyhow!("in the VM: {e}")));
                } else if let Some(m) = line.strip_prefix(VM_SAY) {
                    progress.say(format!("VM (BPF LSM): {m}"));
                }
                last.push(line);
                if last.len() > 20 {
                    last.remove(0);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        check_interrupted()?;
        if start.elapsed() > limit {
            bail!(
                "the VM did not finish within {} s; its console ended with:\n{}",
                limit.as_secs(),
                last.join("\n")
            );
        }
    }
    drop(qemu);
    let _ = reader.join();
    let _ = fs::remove_file(&image);
    match result {
        Some(r) => r.map(|mut v| {
            v["series"] = json!(series);
            v
        }),
        None => bail!(
            "the VM ended without a result; its console ended with:\n{}{}",
            last.join("\n"),
            fs::read_to_string(env.dir.join("vm/qemu.err"))
                .map(|e| format!("\nqemu: {}", e.trim()))
                .unwrap_or_default()
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Case 5: `agentd run -- /bin/true` against /bin/true, bubblewrap and systemd-run

/// One way to start `/bin/true`.
struct Launcher {
    key: &'static str,
    label: String,
    /// What it sets up around the program, for the table.
    sandbox: String,
    cmd: Box<dyn Fn() -> Command>,
    /// Measured while another agent runs (agentd only): the hooks that come and go with
    /// the agents (the Landlock reporter) then stay attached.
    holder: bool,
}

/// bubblewrap as close to an agent as it goes: as nobody (setpriv), so no capabilities
/// and no_new_privs (bwrap sets it), a new session, every namespace (mount, pid, net, ipc,
/// uts, cgroup, user), the whole file system read-only, dying with its parent.
fn bwrap_args() -> Vec<&'static str> {
    vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--",
        "/bin/true",
    ]
}

/// systemd-run with what agentd gives an agent, as far as unit properties say it.
const SYSTEMD_RUN_ARGS: &[&str] = &[
    "--quiet",
    "--wait",
    "--collect",
    "--property=User=nobody",
    "--property=NoNewPrivileges=yes",
    "--property=CapabilityBoundingSet=",
    "--property=ProtectSystem=strict",
    "--property=PrivateTmp=yes",
    "--property=PrivateNetwork=yes",
    "--property=SystemCallFilter=@system-service",
    "/bin/true",
];

/// Runs `cmd` once; Ok if it exits 0, else why not (its status and first line of stderr).
fn try_once(cmd: &mut Command) -> std::result::Result<(), String> {
    match cmd.stdin(Stdio::null()).stdout(Stdio::null()).output() {
        Err(e) => Err(format!("cannot run `{}`: {e}", crate::util::show(cmd))),
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`{}` exits with {}: {}",
            crate::util::show(cmd),
            o.status,
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        )),
    }
}

/// utime + stime of a process and its reaped children, in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return f64::NAN;
    };
    // After the command: state is field 3; utime, stime, cutime, cstime are 14 to 17.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = (11..15)
        .filter_map(|i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

/// utime and stime of a process itself, in ms.
fn cpu_split_ms(pid: u32) -> (f64, f64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<f64> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    match f[..] {
        [u, s] => (u * 1000.0 / hz, s * 1000.0 / hz),
        _ => (f64::NAN, f64::NAN),
    }
}

fn launch_case(env: &Env, plan: &Plan, progress: &Progress) -> Result<CaseReport> {
    let shipped = fs::read_to_string(workspace_root().join("profiles/default.toml"))
        .context("reading profiles/default.toml")?;
    fs::write(env.daemon_dir().join("profiles/default.toml"), shipped)?;
    let mut d = Daemon::start(env)?;
    let dir = env.dir.clone();
    let mut launchers: Vec<Launcher> = vec![Launcher {
        key: "true",
        label: "`/bin/true` directly (fork + exec by the bench)".into(),
        sandbox: "none (root, the bench's own process)".into(),
        cmd: Box::new(|| Command::new("/bin/true")),
        holder: false,
    }];
    let mut unavailable: Vec<(String, String)> = Vec::new();
    match which("bwrap") {
        None => unavailable.push((
            "bubblewrap".into(),
            "`bwrap` is not installed (`cargo xtask setup` installs Debian's bubblewrap)".into(),
        )),
        Some(_) => {
            let mk = || {
                let mut c = Command::new("setpriv");
                c.args(bwrap_args());
                c
            };
            match try_once(&mut mk()) {
                Ok(()) => launchers.push(Launcher {
                    key: "bwrap",
                    label: "`setpriv --reuid=nobody ... bwrap --unshare-all ... /bin/true`".into(),
                    sandbox: "user nobody, no capabilities, no_new_privs, new session, every namespace \
                              (no network at all), / read-only, private /tmp, dies with its parent; \
                              no seccomp filter, no cgroup, no kill switch, no audit"
                        .into(),
                    cmd: Box::new(mk),
                    holder: false,
                }),
                Err(e) => unavailable.push(("bubblewrap".into(), e)),
            }
        }
    }
    let sd = || {
        let mut c = Command::new("systemd-run");
        c.args(SYSTEMD_RUN_ARGS);
        c
    };
    match which("systemd-run").map(|_| try_once(&mut sd())) {
        None => unavailable.push((
            "systemd-run".into(),
            "`systemd-run` is not installed".into(),
        )),
        Some(Err(e)) => unavailable.push((
            "systemd-run".into(),
            format!(
                "{e} (systemd is not PID 1 on this host: PID 1 is `{}`, so there is no system \
                 manager for systemd-run to ask)",
                fs::read_to_string("/proc/1/comm")
                    .unwrap_or_default()
                    .trim()
            ),
        )),
        Some(Ok(())) => launchers.push(Launcher {
            key: "systemd-run",
            label: format!("`systemd-run {}`", SYSTEMD_RUN_ARGS.join(" ")),
            sandbox: "a transient unit: user nobody, no capabilities, no_new_privs, read-only \
                      system, private /tmp and network, a system call filter"
                .into(),
            cmd: Box::new(sd),
            holder: false,
        }),
    }
    for (key, profile, holder, label, sandbox) in [
        (
            "agentd-plain",
            "plain",
            false,
            "`agentd run --profile plain -- /bin/true` (files: allow all)",
            "user nobody, no capabilities, no_new_privs, new session, seccomp filter, a \
             cgroup with the egress programs (no network), Landlock (hiding agentd's files), \
             private tmp, DNS resolver, kill switch, audit records",
        ),
        (
            "agentd-plain-held",
            "plain",
            true,
            "the same while another agent runs",
            "the same; the Landlock reporter (`sys_exit`) stays attached for the other agent \
             instead of coming and going with this one",
        ),
        (
            "agentd-default",
            "default",
            false,
            "`agentd run --profile default -- /bin/true` (the shipped default profile)",
            "the same, with the default profile's file rules and its process budget \
             (`sys_enter` attached while the agent runs)",
        ),
    ] {
        let agentd = env.agentd.clone();
        let config = d.config.clone();
        let dir = dir.clone();
        launchers.push(Launcher {
            key,
            label: label.into(),
            sandbox: sandbox.into(),
            cmd: Box::new(move || {
                let mut c = Command::new(&agentd);
                c.arg("--config")
                    .arg(&config)
                    .args(["run", "--profile", profile, "--user", "nobody", "--workdir"])
                    .arg(&dir)
                    // It prints a line when the daemon says the agent started (read by
                    // `once` below; a few bytes to stderr cost nothing measurable).
                    .args(["--verbose", "--", "/bin/true"]);
                c
            }),
            holder,
        });
    }
    {
        let agentd = env.agentd.clone();
        let config = d.config.clone();
        launchers.push(Launcher {
            key: "ps",
            label: "`agentd ps --json` (no launch: the CLI's start and one request to the daemon)"
                .into(),
            sandbox: "—".into(),
            cmd: Box::new(move || {
                let mut c = Command::new(&agentd);
                c.arg("--config").arg(&config).args(["ps", "--json"]);
                c
            }),
            holder: false,
        });
    }
    // ms of the whole launch, and for `agentd run --verbose` also until the client had the
    // daemon's `started` reply (the agent's program had been executed).
    let once = |l: &Launcher| -> Result<(f64, Option<f64>)> {
        use std::io::BufRead as _;
        let mut c = (l.cmd)();
        let verbose = l.key.starts_with("agentd-");
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if verbose {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let t = Instant::now();
        let mut child = c.spawn().with_context(|| format!("running {}", l.key))?;
        let mut started = None;
        if let Some(err) = child.stderr.take() {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if started.is_none() && line.contains(" started: pid ") {
                    started = Some(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        let status = child.wait()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !status.success() {
            let e = try_once(&mut (l.cmd)()).err().unwrap_or_default();
            bail!("{} failed ({status}): {e}", l.key);
        }
        Ok((ms, started))
    };
    // Warm-up: a few of each.
    for l in &launchers {
        for _ in 0..3 {
            once(l)?;
        }
    }
    let mut s = Samples::new();
    let mut cpu = Samples::new();
    let timer = Timer::start();
    for round in 0..plan.launch_rounds {
        check_interrupted()?;
        let mut order: Vec<&Launcher> = launchers.iter().collect();
        let len = order.len();
        order.rotate_left(round % len);
        let mut line = Vec::new();
        for l in order {
            let hold = format!("hold-{round}");
            if l.holder {
                start_holder(&mut d, &hold)?;
            }
            let cpu0 = cpu_ms(d.pid());
            let (mut v, mut st) = (Vec::new(), Vec::new());
            for _ in 0..plan.launches {
                let (ms, started) = once(l)?;
                v.push(ms);
                st.extend(started);
            }
            let daemon_cpu = (cpu_ms(d.pid()) - cpu0) / plan.launches as f64;
            if l.holder {
                let out = d
                    .agentd()
                    .args(["kill", &hold])
                    .stdin(Stdio::null())
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "agentd kill {hold}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                d.wait_client(&hold)?;
            }
            let m = Stats::of(&v).median;
            push_sample(&mut s, format!("{}/launch", l.key), m);
            if !st.is_empty() {
                push_sample(&mut s, format!("{}/started", l.key), Stats::of(&st).median);
            }
            push_sample(&mut cpu, format!("{}/launch", l.key), daemon_cpu);
            line.push(format!("{} {} ms", l.key, num(m)));
        }
        progress.say(format!(
            "round {}/{} ({:.0} s): {}",
            round + 1,
            plan.launch_rounds,
            timer.secs(),
            line.join(", ")
        ));
    }
    d.stop()?;
    let get = |k: &str| s.get(&format!("{k}/launch")).cloned().unwrap_or_default();
    let has_bwrap = launchers.iter().any(|l| l.key == "bwrap");
    let mut header = vec![
        "launcher".to_string(),
        "what it sets up".to_string(),
        "ms per launch".to_string(),
        "ratio to /bin/true".to_string(),
    ];
    if has_bwrap {
        header.push("ratio to bwrap".to_string());
    }
    header.push("daemon CPU ms per launch".to_string());
    let mut rows = Vec::new();
    let mut j = serde_json::Map::new();
    for l in &launchers {
        let v = get(l.key);
        let st = Stats::of(&v);
        let rt = paired_ratio(&v, &get("true"));
        let mut row = vec![
            l.label.clone(),
            l.sandbox.clone(),
            st.show(),
            rt.show_ratio(),
        ];
        let rb = paired_ratio(&v, &get("bwrap"));
        if has_bwrap {
            row.push(rb.show_ratio());
        }
        let c = Stats::of(cpu.get(&format!("{}/launch", l.key)).map_or(&[][..], |v| v));
        row.push(if l.key.starts_with("agentd") || l.key == "ps" {
            num(c.median)
        } else {
            "—".to_string()
        });
        rows.push(row);
        j.insert(
            l.key.to_string(),
            json!({"label": l.label, "sandbox": l.sandbox, "ms": st.json(), "samples": v,
                   "until_started_ms": s.get(&format!("{}/started", l.key)),
                   "ratio_to_true": rt.json(), "ratio_to_bwrap": rb.json(),
                   "daemon_cpu_ms_per_launch": c.json()}),
        );
    }
    for (what, why) in &unavailable {
        let mut row = vec![
            what.clone(),
            "—".into(),
            format!("not measured: {why}"),
            "—".into(),
        ];
        if has_bwrap {
            row.push("—".into());
        }
        row.push("—".into());
        rows.push(row);
        j.insert(what.clone(), json!({"not_measured": why}));
    }
    let plain = median_ratio(&s, "agentd-plain/launch", "true/launch");
    let headline = format!(
        "`agentd run -- /bin/true` {} ms: {}× /bin/true{}{}",
        num(Stats::of(&get("agentd-plain")).median),
        ratio(plain),
        if has_bwrap {
            format!(
                ", {}× bubblewrap ({} ms)",
                ratio(median_ratio(&s, "agentd-plain/launch", "bwrap/launch")),
                num(Stats::of(&get("bwrap")).median)
            )
        } else {
            String::new()
        },
        if unavailable.iter().any(|(w, _)| w == "systemd-run") {
            "; systemd-run cannot run here (systemd is not PID 1)"
        } else {
            ""
        }
    );
    Ok(CaseReport {
        id: 5,
        title: CASES[4].title.to_string(),
        headline,
        method: format!(
            "Each launcher starts `/bin/true` and is waited for, {k} times in a row per round \
             (the round's figure is their median), after 3 warm-up launches each; the order \
             of the launchers rotates from round to round; {r} rounds. The agentd launches go \
             through one daemon of the bench's (no other agent running), as nobody, and the \
             time is the whole `agentd run` command: the CLI's start, the request, the \
             daemon's launch (cgroup, policy maps, resolver, the launcher's fork, seccomp, \
             Landlock, exec), `/bin/true`, the exit status and the daemon's teardown of the \
             agent. The daemon's CPU time per launch is its utime + stime (and its reaped \
             children's) over the round's launches, in clock ticks of {tick} ms. \
             `agentd ps` measures the CLI's start and one request alone.",
            k = plan.launches,
            r = plan.launch_rounds,
            // SAFETY: no preconditions.
            tick = num(1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64),
        ),
        tables: vec![Table {
            caption: String::new(),
            header,
            rows,
        }],
        notes: vec![
            format!(
                "Sandbox strength: bubblewrap runs `/bin/true` as nobody with no capabilities, \
                 no_new_privs and a new session, like an agent, and isolates more in one \
                 respect (its own mount, pid, network, ipc, uts and cgroup namespaces, / read-only: \
                 agentd leaves the host's view and rules it); it has no seccomp filter (bwrap \
                 takes a compiled filter on a descriptor; Debian ships none), no egress \
                 allowlist (no network at all instead), no cgroup (so no kill switch for a \
                 process tree that escapes its session, no budgets) and no audit record. The \
                 agent's enforcement is that of the machine table (`agentd inspect`)."
            ),
            format!(
                "Where the time goes (`agentd run --verbose`, the client's `started` line): of \
                 the {total} ms of `agentd run --profile plain`, {started} ms pass until the \
                 agent's program runs (the CLI's start and a request, {ps} ms as `agentd ps` \
                 shows; then the daemon's launch: cgroup, policy maps, resolver sockets, the \
                 launcher's fork, Landlock, seccomp, exec) and {after} ms from there to the \
                 exit status, for a program that runs for about a millisecond: the daemon \
                 sees the agent's first process exit, tears the agent down (cgroup.kill, \
                 removal of the cgroup, its map entries and resolver, the reporter detached \
                 when the last agent ends) and sends the status (with `agentd run --explain`, \
                 not used here, it first waits 20 ms for the records of the agent's last \
                 denials). The daemon used {cpu} ms of CPU per launch. While another agent \
                 runs the same launch \
                 takes {held} ms ({hstarted} ms until it runs, {hafter} ms after): the \
                 difference is the Landlock reporter (`sys_exit`), attached when the only \
                 agent starts and detached when it ends. Its program is loaded once, at the \
                 daemon's start; what a launch waits for is the kernel's raw tracepoint \
                 attach (it patches the tracepoint's call sites on every CPU and marks every \
                 task of the host for the traced system call path). \
                 With the default profile the Landlock rules of its file policy are built \
                 from the file system at each launch ({dstarted} ms until it runs), and its \
                 process budget attaches `sys_enter`.",
                held = num(Stats::of(&get("agentd-plain-held")).median),
                hafter = num(median_diff(
                    &s,
                    "agentd-plain-held/launch",
                    "agentd-plain-held/started"
                )),
                hstarted = num(Stats::of(
                    &s.get("agentd-plain-held/started")
                        .cloned()
                        .unwrap_or_default()
                )
                .median),
                total = num(Stats::of(&get("agentd-plain")).median),
                started = num(Stats::of(
                    &s.get("agentd-plain/started").cloned().unwrap_or_default()
                )
                .median),
                dstarted = num(Stats::of(
                    &s.get("agentd-default/started").cloned().unwrap_or_default()
                )
                .median),
                ps = num(Stats::of(&get("ps")).median),
                after = num(median_diff(
                    &s,
                    "agentd-plain/launch",
                    "agentd-plain/started"
                )),
                cpu = num(Stats::of(cpu.get("agentd-plain/launch").map_or(&[][..], |v| v)).median),
            ),
        ],
        json: json!({"launchers": j, "launches_per_round": plan.launches}),
    })
}

// ---------------------------------------------------------------------------------------
// Case 7: 1,000 concurrent agents

/// What the daemon holds at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct DaemonMem {
    /// VmRSS and VmHWM, KiB.
    rss_kib: f64,
    hwm_kib: f64,
    /// `memlock:` of its BPF map descriptors, bytes (the kernel's estimate of each map's
    /// memory), and how many maps.
    map_bytes: f64,
    maps: usize,
    fds: usize,
    threads: f64,
}

impl DaemonMem {
    fn of(pid: u32) -> DaemonMem {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |k: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let mut m = DaemonMem {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
            threads: field("Threads:"),
            ..Default::default()
        };
        for e in fs::read_dir(format!("/proc/{pid}/fdinfo"))
            .into_iter()
            .flatten()
            .flatten()
        {
            m.fds += 1;
            let Ok(text) = fs::read_to_string(e.path()) else {
                continue;
            };
            if !text.lines().any(|l| l.starts_with("map_type:")) {
                continue;
            }
            m.maps += 1;
            m.map_bytes += text
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
        }
        m
    }

    fn json(&self) -> Value {
        json!({"vm_rss_kib": self.rss_kib, "vm_hwm_kib": self.hwm_kib, "map_memlock_bytes": self.map_bytes,
               "maps": self.maps, "fds": self.fds, "threads": self.threads})
    }
}

/// Proportional set size of a process (its share of the pages it maps), KiB.
fn pss_kib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

/// A distinct egress rule for agent `i` (its policy differs from every other agent's).
fn scale_net(i: usize) -> String {
    format!("10.{}.{}.1/32:443", 100 + (i >> 8), i & 255)
}

/// `agentd update NAME --allow-net ...` (a new rule each time): ms of the whole command.
fn timed_update(d: &Daemon, name: &str, k: usize) -> Result<f64> {
    let mut cmd = d.agentd();
    cmd.args(["update", name, "--allow-net"])
        .arg(format!("10.250.{}.{}/32:443", (k >> 8) & 255, k & 255))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let t = Instant::now();
    let out = cmd.output().context("running agentd update")?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "agentd update {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

#[derive(Default)]
struct ScaleRound {
    reached: usize,
    stopped_by: Option<String>,
    launch_ms: Vec<f64>,
    all_secs: f64,
    before: DaemonMem,
    one: DaemonMem,
    after: DaemonMem,
    clients_pss_kib: f64,
    agents_pss_kib: f64,
    update_1: Vec<f64>,
    update_n: Vec<f64>,
    kill_all_ms: f64,
    kill_all_processes: u64,
    /// Daemon CPU ms for the first 100 launches and the last 100 (update excluded).
    cpu_first_100: f64,
    cpu_last_100: f64,
}

fn scale_round(env: &Env, plan: &Plan, round: usize, progress: &Progress) -> Result<ScaleRound> {
    let mut r = ScaleRound::default();
    let mut d = Daemon::start(env)?;
    std::thread::sleep(Duration::from_millis(300));
    r.before = DaemonMem::of(d.pid());
    let sleep = [OsStr::new("/bin/sleep"), OsStr::new("3600")];
    let step = Duration::from_millis(1);
    let cpu0 = cpu_ms(d.pid());
    let mut cpu_last = f64::NAN;
    let start = Instant::now();
    let t = d.start_agent_with(
        "plain",
        "s0",
        &["--allow-net".into(), scale_net(0)],
        &sleep,
        step,
    )?;
    r.launch_ms.push(t.as_secs_f64() * 1000.0);
    r.reached = 1;
    std::thread::sleep(Duration::from_millis(300));
    r.one = DaemonMem::of(d.pid());
    timed_update(&d, "s0", 0)?; // warm-up
    for k in 0..plan.update_reps {
        r.update_1.push(timed_update(&d, "s0", 1 + k)?);
    }
    for i in 1..plan.scale_agents {
        check_interrupted()?;
        match d.start_agent_with(
            "plain",
            &format!("s{i}"),
            &["--allow-net".into(), scale_net(i)],
            &sleep,
            step,
        ) {
            Ok(t) => {
                r.launch_ms.push(t.as_secs_f64() * 1000.0);
                r.reached += 1;
            }
            Err(e) => {
                r.stopped_by = Some(
                    format!("{e:#}")
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
                break;
            }
        }
        if i + 1 == 100 {
            r.cpu_first_100 = cpu_ms(d.pid()) - cpu0;
        }
        if i + 100 == plan.scale_agents {
            cpu_last = cpu_ms(d.pid());
        }
        if (i + 1) % 250 == 0 {
            progress.say(format!(
                "round {}: {} agents running ({:.0} s; the last launch {} ms)",
                round + 1,
                i + 1,
                start.elapsed().as_secs_f64(),
                num(r.launch_ms.last().copied().unwrap_or(f64::NAN))
            ));
        }
    }
    r.all_secs = start.elapsed().as_secs_f64();
    if r.reached == plan.scale_agents {
        r.cpu_last_100 = cpu_ms(d.pid()) - cpu_last;
    }
    std::thread::sleep(Duration::from_millis(500));
    r.after = DaemonMem::of(d.pid());
    r.clients_pss_kib = d.clients.iter().map(|(_, c)| pss_kib(c.id())).sum();
    r.agents_pss_kib = (0..r.reached)
        .flat_map(|i| {
            fs::read_to_string(env.root.join(format!("s{i}/cgroup.procs")))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .map(pss_kib)
        .sum();
    let base = 1 + plan.update_reps;
    timed_update(&d, "s0", base)?;
    for k in 0..plan.update_reps {
        r.update_n.push(timed_update(&d, "s0", base + 1 + k)?);
    }
    // Everything ends: the kill switch for all of them at once (timed), then the daemon.
    let t = Instant::now();
    let out = d
        .agentd()
        .args(["kill", "--all", "--json"])
        .stdin(Stdio::null())
        .output()
        .context("running agentd kill --all")?;
    r.kill_all_ms = t.elapsed().as_secs_f64() * 1000.0;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    r.kill_all_processes = v["outcomes"]
        .as_array()
        .map(|a| a.iter().filter_map(|o| o["processes"].as_u64()).sum())
        .unwrap_or(0);
    if !out.status.success() {
        bail!(
            "agentd kill --all failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let names: Vec<String> = d.clients.iter().map(|(n, _)| n.clone()).collect();
    for n in names {
        d.wait_client(&n)?;
    }
    d.stop()?;
    Ok(r)
}

fn scale_case(env: &Env, plan: &Plan, progress: &Progress) -> Result<CaseReport> {
    let mut rounds = Vec::new();
    for round in 0..plan.scale_rounds {
        check_interrupted()?;
        settle()?;
        let r = scale_round(env, plan, round, progress)?;
        progress.say(format!(
            "round {}/{}: {} agents in {:.1} s; daemon RSS {} → {} MiB, maps {} → {} MiB; update {} ms (1 agent) → {} ms ({} agents); kill --all {} ms",
            round + 1,
            plan.scale_rounds,
            r.reached,
            r.all_secs,
            num(r.before.rss_kib / 1024.0),
            num(r.after.rss_kib / 1024.0),
            num(r.before.map_bytes / 1048576.0),
            num(r.after.map_bytes / 1048576.0),
            num(Stats::of(&r.update_1).median),
            num(Stats::of(&r.update_n).median),
            r.reached,
            num(r.kill_all_ms),
        ));
        rounds.push(r);
    }
    let per = |f: &dyn Fn(&ScaleRound) -> f64| -> Stats {
        Stats::of(&rounds.iter().map(f).collect::<Vec<_>>())
    };
    let reached = rounds.iter().map(|r| r.reached).min().unwrap_or(0);
    let n = plan.scale_agents;
    let all_secs = per(&|r| r.all_secs);
    let first_ms = per(&|r| Stats::of(&r.launch_ms[..r.launch_ms.len().min(100)]).median);
    let last_ms = per(&|r| Stats::of(&r.launch_ms[r.launch_ms.len().saturating_sub(100)..]).median);
    let cpu_first = per(&|r| r.cpu_first_100 / 100.0);
    let cpu_last = per(&|r| r.cpu_last_100 / 100.0);
    let launch_ratio = per(&|r| {
        Stats::of(&r.launch_ms[r.launch_ms.len().saturating_sub(100)..]).median
            / Stats::of(&r.launch_ms[..r.launch_ms.len().min(100)]).median
    });
    let rss0 = per(&|r| r.before.rss_kib / 1024.0);
    let rss1 = per(&|r| r.one.rss_kib / 1024.0);
    let rss_n = per(&|r| r.after.rss_kib / 1024.0);
    let rss_per = per(&|r| (r.after.rss_kib - r.before.rss_kib) / r.reached as f64);
    let map0 = per(&|r| r.before.map_bytes / 1048576.0);
    let map_n = per(&|r| r.after.map_bytes / 1048576.0);
    let map_per = per(&|r| (r.after.map_bytes - r.before.map_bytes) / 1024.0 / r.reached as f64);
    let fds = per(&|r| r.after.fds as f64);
    let fds0 = per(&|r| r.before.fds as f64);
    let threads = per(&|r| r.after.threads);
    let clients = per(&|r| r.clients_pss_kib / 1024.0);
    let agents = per(&|r| r.agents_pss_kib / 1024.0);
    let upd1: Vec<f64> = rounds.iter().flat_map(|r| r.update_1.clone()).collect();
    let upd_n: Vec<f64> = rounds.iter().flat_map(|r| r.update_n.clone()).collect();
    let (u1, un) = (Stats::of(&upd1), Stats::of(&upd_n));
    let upd_ratio = per(&|r| Stats::of(&r.update_n).median / Stats::of(&r.update_1).median);
    let kill = per(&|r| r.kill_all_ms);
    let stopped: Vec<String> = rounds.iter().filter_map(|r| r.stopped_by.clone()).collect();
    let row = |what: &str, v: String, r: String| vec![what.to_string(), v, r];
    let rows = vec![
        row(
            "agents running at once (distinct policies)",
            format!("{reached} of {n}"),
            "—".into(),
        ),
        row(
            "time to launch them all, one after another (s)",
            all_secs.show(),
            format!(
                "{} ms per agent",
                num(all_secs.median * 1000.0 / reached.max(1) as f64)
            ),
        ),
        row(
            "one launch, the first 100 agents (ms; daemon CPU ms per launch)",
            format!("{} ({} CPU)", first_ms.show(), num(cpu_first.median)),
            "1.00×".into(),
        ),
        row(
            "one launch, the last 100 agents (ms; daemon CPU ms per launch)",
            format!("{} ({} CPU)", last_ms.show(), num(cpu_last.median)),
            format!("{} the first 100", launch_ratio.show_ratio()),
        ),
        row(
            "daemon VmRSS, no agents → 1 agent → all (MiB)",
            format!("{} → {} → {}", rss0.show(), num(rss1.median), rss_n.show()),
            format!("{} KiB per agent", num(rss_per.median)),
        ),
        row(
            "BPF maps (`memlock:` of the daemon's map descriptors), no agents → all (MiB)",
            format!("{} → {}", map0.show(), map_n.show()),
            format!("{} KiB per agent", num(map_per.median)),
        ),
        row(
            "daemon descriptors and threads with all agents",
            format!(
                "{:.0} descriptors (from {:.0}), {:.0} threads",
                fds.median, fds0.median, threads.median
            ),
            format!(
                "{} descriptors per agent",
                num((fds.median - fds0.median) / reached.max(1) as f64)
            ),
        ),
        row(
            "the agents' processes (`sleep`), PSS (MiB)",
            agents.show(),
            format!(
                "{} KiB per agent",
                num(agents.median * 1024.0 / reached.max(1) as f64)
            ),
        ),
        row(
            "the `agentd run` clients (one per agent, waiting), PSS (MiB)",
            clients.show(),
            format!(
                "{} KiB per agent",
                num(clients.median * 1024.0 / reached.max(1) as f64)
            ),
        ),
        row(
            "`agentd update` of one agent, 1 agent running (ms)",
            u1.show(),
            "1.00×".into(),
        ),
        row(
            &format!("`agentd update` of one agent, {reached} agents running (ms)"),
            un.show(),
            format!("{} with 1 agent", upd_ratio.show_ratio()),
        ),
        row(
            &format!("`agentd kill --all` of {reached} agents (ms, the whole command)"),
            kill.show(),
            format!("{} ms per agent", num(kill.median / reached.max(1) as f64)),
        ),
    ];
    let mut notes = vec![
        format!(
            "Limits on the way to {n}: `agents.max` (default 1024, kept); every agent runs as \
             nobody, and RLIMIT_NPROC counts nobody's processes ({} here, the daemon's limit); \
             each agent takes a resolver address in 127.53.0.0/16 (65,534) with a UDP and a \
             TCP socket, and the daemon raises its descriptor limit to the hard limit ({} \
             here); pid_max is {}.",
            rlimit_text(libc::RLIMIT_NPROC),
            rlimit_text(libc::RLIMIT_NOFILE),
            fs::read_to_string("/proc/sys/kernel/pid_max")
                .unwrap_or_default()
                .trim(),
        ),
        "What an agent costs the daemon: its state and audit subject, a control connection \
         to its `agentd run` client, a pidfd, its cgroup, its resolver's two sockets, and in \
         the kernel its agent entry, its policy's rules in the LPM tries and its event and \
         budget entries (maps without preallocation grow with their entries, which the \
         `memlock:` figure follows). An update writes the agent's new rules under a new \
         policy id and switches the agent's entry in one map update; it does not change the \
         other agents' entries, but to find stale entries of the policy it writes, the \
         daemon walks every key of the shared maps (the LPM tries in \
         agentd/src/network/mod.rs `apply`, FILE_RULES in files/mod.rs, the budget maps), \
         one `bpf` system call per key: that walk grows with all agents' rules, and a \
         launch does it too."
            .to_string(),
    ];
    if !stopped.is_empty() {
        notes.insert(
            0,
            format!(
                "**Not every round reached {n} agents**: the launch that failed said: {}",
                stopped.join(" / ")
            ),
        );
    }
    Ok(CaseReport {
        id: 7,
        title: CASES[6].title.to_string(),
        headline: format!(
            "{reached} agents launched in {} s ({} ms each, the last 100 {}× the first 100); \
             daemon RSS +{} KiB and maps +{} KiB per agent; an update with {reached} running {} ms, {}× with 1",
            num(all_secs.median),
            num(all_secs.median * 1000.0 / reached.max(1) as f64),
            ratio(launch_ratio.median),
            num(rss_per.median),
            num(map_per.median),
            num(un.median),
            ratio(upd_ratio.median),
        ),
        method: format!(
            "A fresh daemon (`agents.max` 1024, the default) launches {n} agents one after \
             another, each `agentd run --profile plain --allow-net 10.X.Y.1/32:443 -- \
             /bin/sleep 3600` as nobody (the `--allow-net` rule differs for each, so every \
             agent has a policy of its own), each launch timed from the start of `agentd run` \
             until its cgroup holds the process (polled every ms); the clients stay attached \
             as a user's would. The daemon's memory is read from /proc/PID/status (VmRSS) and \
             the `memlock:` lines of its map descriptors in /proc/PID/fdinfo: before the \
             first agent, with one, and with all. `agentd update s0 --allow-net \
             10.250.X.Y/32:443` (a new rule each time: a real policy change) is timed {u} \
             times after a warm-up while 1 agent runs and again while all run. Then `agentd \
             kill --all` ends them. {r} round(s); the update figures pool the repetitions of \
             all rounds.",
            u = plan.update_reps,
            r = plan.scale_rounds,
        ),
        tables: vec![Table {
            caption: String::new(),
            header: ["what", "figure", "ratio / per agent"]
                .map(String::from)
                .to_vec(),
            rows,
        }],
        notes,
        json: json!({
            "agents": n, "reached": reached, "stopped_by": stopped,
            "launch_all_secs": all_secs.json(), "launch_first_100_ms": first_ms.json(),
            "launch_last_100_ms": last_ms.json(), "launch_last_to_first": launch_ratio.json(),
            "daemon_cpu_ms_per_launch_first_100": cpu_first.json(),
            "daemon_cpu_ms_per_launch_last_100": cpu_last.json(),
            "daemon_before": rounds.iter().map(|r| r.before.json()).collect::<Vec<_>>(),
            "daemon_one": rounds.iter().map(|r| r.one.json()).collect::<Vec<_>>(),
            "daemon_after": rounds.iter().map(|r| r.after.json()).collect::<Vec<_>>(),
            "rss_kib_per_agent": rss_per.json(), "map_kib_per_agent": map_per.json(),
            "clients_pss_mib": clients.json(), "agents_pss_mib": agents.json(),
            "update_1_ms": u1.json(), "update_n_ms": un.json(), "update_ratio": upd_ratio.json(),
            "update_1_samples": upd1, "update_n_samples": upd_n,
            "kill_all_ms": kill.json(),
            "kill_all_processes": rounds.iter().map(|r| r.kill_all_processes).collect::<Vec<_>>(),
            "launch_ms": rounds.iter().map(|r| r.launch_ms.clone()).collect::<Vec<_>>(),
        }),
    })
}

/// `soft/hard` of a resource limit of this process (the daemon inherits it).
fn rlimit_text(resource: libc::__rlimit_resource_t) -> String {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return "?".into();
    }
    let show = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            thousands(v)
        }
    };
    format!("{}/{}", show(r.rlim_cur), show(r.rlim_max))
}

// ---------------------------------------------------------------------------------------
// Case 8: denials per second that reach the audit log

/// Counts the audit log's records as it grows: `net_denied` per agent, and `events_lost`.
struct AuditCounter {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    denied: BTreeMap<String, u64>,
    lost_records: u64,
}

impl AuditCounter {
    fn new(path: PathBuf) -> AuditCounter {
        AuditCounter {
            path,
            offset: 0,
            partial: Vec::new(),
            denied: BTreeMap::new(),
            lost_records: 0,
        }
    }

    /// Reads what was appended since the last call.
    fn read(&mut self) -> Result<()> {
        let Ok(f) = File::open(&self.path) else {
            return Ok(());
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read_at(&mut buf, self.offset)?;
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            self.partial.extend_from_slice(&buf[..n]);
            let end = match self.partial.iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                None => continue,
            };
            let chunk: Vec<u8> = self.partial.drain(..end).collect();
            for line in chunk.split(|b| *b == b'\n') {
                let line = String::from_utf8_lossy(line);
                // Records are written with sorted keys and no spaces.
                if line.contains("\"kind\":\"net_denied\"") {
                    if let Some(agent) = line
                        .strip_prefix("{\"agent\":\"")
                        .and_then(|r| r.split_once('"'))
                        .map(|(a, _)| a.to_string())
                    {
                        *self.denied.entry(agent).or_default() += 1;
                    }
                } else if line.contains("\"kind\":\"events_lost\"") {
                    self.lost_records += 1;
                }
            }
        }
        Ok(())
    }

    fn count(&self, names: &[String]) -> u64 {
        names.iter().filter_map(|n| self.denied.get(n)).sum()
    }
}

/// `agentd_events_lost_total` from the daemon's metrics.
fn events_lost_metric(addr: &str) -> Result<u64> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr)
        .with_context(|| format!("connecting to the metrics at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    text.lines()
        .find_map(|l| l.strip_prefix("agentd_events_lost_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no agentd_events_lost_total in the metrics")
}

/// The log "kept pace" with a level if its last record was written within this many
/// seconds of the loops' end.
const KEPT_PACE_SECS: f64 = 0.25;

#[derive(Clone, Debug)]
struct FloodLevel {
    round: usize,
    /// Offered rate, all agents together (0: as fast as they can).
    rate: u64,
    agents: usize,
    attempts: u64,
    denied: u64,
    /// Achieved: attempts over the loops' own time.
    achieved: f64,
    records: u64,
    lost_metric: u64,
    /// Seconds from the loops' start until the last record was in the log, and the loops'
    /// own seconds.
    drain_secs: f64,
    loop_secs: f64,
    /// The daemon's CPU time over the level (its launches of the agents included).
    cpu_user_ms: f64,
    cpu_sys_ms: f64,
}

impl FloodLevel {
    fn lossless(&self) -> bool {
        self.records >= self.denied && self.lost_metric == 0
    }

    /// Seconds the log was behind when the loops ended (the records the ring buffer still
    /// held).
    fn behind(&self) -> f64 {
        (self.drain_secs - self.loop_secs).max(0.0)
    }

    /// Lossless, and the daemon kept pace: sustainable for longer than the level.
    fn sustained(&self) -> bool {
        self.lossless() && self.behind() <= KEPT_PACE_SECS
    }

    fn json(&self) -> Value {
        json!({"round": self.round, "offered_per_s": self.rate, "agents": self.agents,
               "attempts": self.attempts, "denied": self.denied, "achieved_per_s": self.achieved,
               "records": self.records, "lost_metric": self.lost_metric,
               "seconds_until_logged": self.drain_secs,
               "records_per_s": self.records as f64 / self.drain_secs,
               "loop_seconds": self.loop_secs, "log_behind_seconds": self.behind(),
               "daemon_cpu_user_ms": self.cpu_user_ms, "daemon_cpu_system_ms": self.cpu_sys_ms})
    }
}

/// One level: `agents` agents deny-flooding together at `rate` a second for `secs`.
fn flood_level(
    d: &Daemon,
    counter: &mut AuditCounter,
    metrics: &str,
    round: usize,
    rate: u64,
    agents: usize,
    secs: f64,
) -> Result<FloodLevel> {
    let lost0 = events_lost_metric(metrics)?;
    counter.read()?;
    let cpu0 = cpu_split_ms(d.pid());
    let names: Vec<String> = (0..agents)
        .map(|k| {
            format!(
                "flood-{round}-{}-{k}",
                if rate == 0 {
                    "max".to_string()
                } else {
                    rate.to_string()
                }
            )
        })
        .collect();
    let per_agent = rate / agents as u64;
    let start = Instant::now();
    let outs: Vec<Result<Value>> = std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                scope.spawn(move || -> Result<Value> {
                    let args: Vec<OsString> = vec![
                        d.env.xtask.clone().into_os_string(),
                        "bench-loop".into(),
                        "flood".into(),
                        "0".into(),
                        "--target".into(),
                        "127.0.0.1:9".into(),
                        "--rate".into(),
                        per_agent.to_string().into(),
                        "--secs".into(),
                        secs.to_string().into(),
                    ];
                    let a: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
                    let (status, out, err) = d.run_agent("plain", name, &a)?;
                    let v: Value = out
                        .lines()
                        .last()
                        .and_then(|l| serde_json::from_str(l).ok())
                        .unwrap_or(Value::Null);
                    if !status.success() || v["attempts"].as_u64().is_none() {
                        bail!("the flood in agent {name} failed ({status}): {out} {err}");
                    }
                    Ok(v)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a flood thread panicked")))
            })
            .collect()
    });
    let joined = start.elapsed().as_secs_f64();
    let outs: Vec<Value> = outs.into_iter().collect::<Result<_>>()?;
    let attempts: u64 = outs.iter().filter_map(|v| v["attempts"].as_u64()).sum();
    let denied: u64 = outs.iter().filter_map(|v| v["denied"].as_u64()).sum();
    let loop_secs = outs
        .iter()
        .filter_map(|v| v["secs"].as_f64())
        .fold(0.0, f64::max);
    // The daemon writes what the ring buffer holds after the loops end: wait until the
    // count has not moved for a second (or every denial is there).
    let mut last = (counter.count(&names), Instant::now());
    let mut logged_at = start.elapsed();
    wait_until(Duration::from_secs(120), Duration::from_millis(50), || {
        counter.read()?;
        let c = counter.count(&names);
        if c != last.0 {
            last = (c, Instant::now());
            logged_at = start.elapsed();
        }
        Ok(c >= denied || last.1.elapsed() > Duration::from_secs(1))
    })?;
    let lost1 = events_lost_metric(metrics)?;
    let cpu1 = cpu_split_ms(d.pid());
    // The loops began after their agents' launch: from then until the last record.
    let loops_began = (joined - loop_secs).max(0.0);
    let drain = (logged_at.as_secs_f64() - loops_began).max(loop_secs);
    Ok(FloodLevel {
        round,
        rate,
        agents,
        attempts,
        denied,
        achieved: attempts as f64 / loop_secs.max(1e-9),
        records: counter.count(&names),
        lost_metric: lost1.saturating_sub(lost0),
        drain_secs: drain,
        loop_secs,
        cpu_user_ms: cpu1.0 - cpu0.0,
        cpu_sys_ms: cpu1.1 - cpu0.1,
    })
}

fn events_case(env: &Env, plan: &Plan, progress: &Progress) -> Result<CaseReport> {
    let settings = DaemonSettings {
        metrics: true,
        // Every record stays in one file (no rotation drops any while they are counted).
        audit_max_bytes: Some(1 << 40),
        ..Default::default()
    };
    let d = Daemon::start_with(env, &settings)?;
    let metrics = d
        .metrics_addr()?
        .context("the daemon serves no metrics (its log names no address)")?;
    let mut counter = AuditCounter::new(env.audit_log());
    // Warm-up.
    flood_level(&d, &mut counter, &metrics, 0, 1000, 1, 0.5)?;
    let mut levels: Vec<FloodLevel> = Vec::new();
    let timer = Timer::start();
    for round in 1..=plan.flood_rounds {
        let mut lossy = 0;
        for &rate in &plan.flood_rates {
            check_interrupted()?;
            let agents = if rate == 0 || rate > 50_000 { 2 } else { 1 };
            let l = flood_level(
                &d,
                &mut counter,
                &metrics,
                round,
                rate,
                agents,
                plan.flood_secs,
            )?;
            progress.say(format!(
                "round {round}/{} ({:.0} s): offered {} /s ({} agent{}): {} attempts at {} /s, {} records ({} lost by the kernel's count) in {:.1} s",
                plan.flood_rounds,
                timer.secs(),
                if rate == 0 { "max".to_string() } else { thousands(rate) },
                agents,
                if agents == 1 { "" } else { "s" },
                l.attempts,
                num(l.achieved),
                l.records,
                l.lost_metric,
                l.drain_secs,
            ));
            let lost = !l.lossless();
            levels.push(l);
            if lost {
                lossy += 1;
                if lossy >= 2 {
                    break;
                }
            }
        }
    }
    counter.read()?;
    let lost_records = counter.lost_records;
    d.stop()?;

    // Per round: the highest offered rate with no loss, the lowest with loss, and the
    // records per second the daemon wrote at the lossy levels (its drain rate).
    // Per round: the highest achieved rate (levels in rising order) with no loss and the
    // log keeping pace, the highest with no loss, the lowest with loss, and the records
    // per second the daemon wrote at the lossy levels (its drain rate).
    let (mut sustained, mut best, mut first_loss, mut drain) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=plan.flood_rounds {
        let of: Vec<&FloodLevel> = levels.iter().filter(|l| l.round == round).collect();
        let highest = |ok: &dyn Fn(&FloodLevel) -> bool| {
            of.iter()
                .take_while(|l| ok(l))
                .map(|l| l.achieved)
                .fold(0.0, f64::max)
        };
        sustained.push(highest(&FloodLevel::sustained));
        best.push(highest(&FloodLevel::lossless));
        if let Some(l) = of.iter().find(|l| !l.lossless()) {
            first_loss.push(l.achieved);
        }
        drain.extend(
            of.iter()
                .filter(|l| !l.lossless())
                .map(|l| l.records as f64 / l.drain_secs),
        );
    }
    let cpu_per_record = Stats::of(
        &levels
            .iter()
            .filter(|l| !l.lossless())
            .map(|l| (l.cpu_user_ms + l.cpu_sys_ms) * 1000.0 / l.records.max(1) as f64)
            .collect::<Vec<_>>(),
    );
    let (sustained, best, first_loss, drain) = (
        Stats::of(&sustained),
        Stats::of(&best),
        Stats::of(&first_loss),
        Stats::of(&drain),
    );
    let mut rows = Vec::new();
    for &rate in &plan.flood_rates {
        let of: Vec<&FloodLevel> = levels.iter().filter(|l| l.rate == rate).collect();
        if of.is_empty() {
            continue;
        }
        let st = |f: &dyn Fn(&FloodLevel) -> f64| {
            Stats::of(&of.iter().map(|l| f(l)).collect::<Vec<_>>())
        };
        let achieved = st(&|l| l.achieved);
        let share = st(&|l| l.records as f64 / l.denied.max(1) as f64 * 100.0);
        let lost = st(&|l| l.lost_metric as f64);
        let per_s = st(&|l| l.records as f64 / l.drain_secs);
        let cpu = st(&|l| (l.cpu_user_ms + l.cpu_sys_ms) * 1000.0 / l.records.max(1) as f64);
        let sys = st(&|l| l.cpu_sys_ms / (l.cpu_user_ms + l.cpu_sys_ms) * 100.0);
        rows.push(vec![
            if rate == 0 {
                "as fast as they can".to_string()
            } else {
                thousands(rate)
            },
            of[0].agents.to_string(),
            achieved.show(),
            share.show(),
            lost.show(),
            per_s.show(),
            st(&FloodLevel::behind).show(),
            format!("{} ({:.0}% system)", cpu.show(), sys.median),
            format!(
                "{} / {} of {}",
                of.iter().filter(|l| l.lossless()).count(),
                of.iter().filter(|l| l.sustained()).count(),
                of.len()
            ),
        ]);
    }
    Ok(CaseReport {
        id: 8,
        title: CASES[7].title.to_string(),
        headline: format!(
            "{} denials/s logged without loss, the log keeping pace; {}-s bursts of {} /s without loss (the ring buffer takes the excess); losses from {} /s; saturated, the daemon logs {} records/s",
            num(sustained.median),
            plan.flood_secs,
            num(best.median),
            num(first_loss.median),
            num(drain.median),
        ),
        method: format!(
            "Agents (profile `plain`: no network) run `bench-loop flood`: connects to \
             127.0.0.1:9 from one TCP socket, each refused with EPERM by agentd's `connect4` \
             program, which puts a record on the ring buffer (1 MiB) for the daemon; the \
             daemon writes each as a `net_denied` record of the hash-chained audit log. The \
             loop paces its attempts to an offered rate for {secs} s (1 agent up to 50,000/s, \
             2 agents sharing the rate above, and 2 agents as fast as they can); the levels \
             rise ({rates}) until two of them lose records. After each level the bench waits \
             until every denial is in the log or the count has not moved for a second, then \
             counts the level's `net_denied` records (by agent name) against the denials the \
             loops saw, and reads `agentd_events_lost_total` from the daemon's metrics before \
             and after. A level is lossless when every denial has its record, and the log \
             kept pace when its last record was written within {pace} s of the loops' end \
             (else the ring buffer was holding a backlog, which a longer level would have \
             overflowed). Figures per level are medians over rounds; the headline's rates are \
             medians over rounds of the highest level that qualified. {r} round(s) after a \
             warm-up level; the daemon's log does not rotate during the case.",
            pace = KEPT_PACE_SECS,
            secs = plan.flood_secs,
            rates = plan
                .flood_rates
                .iter()
                .map(|r| if *r == 0 {
                    "max".to_string()
                } else {
                    thousands(*r)
                })
                .collect::<Vec<_>>()
                .join(", "),
            r = plan.flood_rounds,
        ),
        tables: vec![Table {
            caption: String::new(),
            header: [
                "offered /s",
                "agents",
                "achieved denials /s",
                "records / denials %",
                "lost (kernel's count)",
                "records written /s",
                "log behind at the loops' end (s)",
                "daemon CPU µs per record",
                "rounds lossless / also keeping pace",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        }],
        notes: vec![
            format!(
                "Zero loss holds while the daemon keeps up, and a little longer: a burst's \
                 records wait in the ring buffer (1 MiB, about 12,000 records of a denied \
                 connect: 80 bytes each plus the ring buffer's 8) and in the batch the daemon \
                 has already taken out of it (it drains all it finds, then writes them one by \
                 one); once the ring buffer is full the kernel drops records and counts them \
                 (`agentd_events_lost_total`; the daemon also wrote {lost_records} \
                 `events_lost` records). The kernel's side is cheap (the loops reach the \
                 offered rates; two agents as fast as they can make millions of denied \
                 connects a second); the bound is the daemon, one thread writing record after \
                 record: at the lossy levels it wrote {} records/s (median), using {} µs of CPU \
                 per record. Per record it decodes the event, \
                 builds the record as a JSON tree, hashes it into the chain (SHA-256) and \
                 writes the line, each record under the log's flock with a check that no other \
                 writer rotated the file or left a pending record (stat calls) in between.",
                num(drain.median),
                num(cpu_per_record.median),
            ),
            format!(
                "At low rates each record costs the daemon more CPU ({} µs at the lowest \
                 level, against {} µs when saturated): it wakes up for a few records at a time, \
                 and the wake-up is paid per batch.",
                num(Stats::of(
                    &levels
                        .iter()
                        .filter(|l| l.rate == plan.flood_rates[0])
                        .map(|l| {
                            (l.cpu_user_ms + l.cpu_sys_ms) * 1000.0 / l.records.max(1) as f64
                        })
                        .collect::<Vec<_>>()
                )
                .median),
                num(cpu_per_record.median),
            ),
            "The records written per second is the level's records over the time from the \
             loops' start until the last record was in the log (so it includes the drain \
             after the loops ended). Achieved rates below the offered ones are what the loops \
             could do on the 2 cores next to the daemon."
                .to_string(),
        ],
        json: json!({
            "levels": levels.iter().map(FloodLevel::json).collect::<Vec<_>>(),
            "highest_lossless_per_s": best.json(), "first_lossy_per_s": first_loss.json(),
            "highest_sustained_per_s": sustained.json(),
            "records_per_s_when_saturated": drain.json(), "events_lost_records": lost_records,
            "daemon_cpu_us_per_record_when_saturated": cpu_per_record.json(),
        }),
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
