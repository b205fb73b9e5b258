//! Harness for agentd's integration tests.
//!
//! Tests run against the real kernel: they create cgroups of their own (always below a
//! directory named `agentd-test-<pid>-...` that they created), load agentd's real programs,
//! and run the `agentd-act` helper inside those cgroups to attempt operations the way an
//! agent would. Everything a test creates is removed when its guard drops, also when the
//! test fails.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use agentd::{
    btf::Btf,
    cgroup::{self, Cgroup2Mount, CgroupDir},
    ebpf::{AgentRoot, LoadConfig},
};
use serde_json::Value;

/// Path of the `agentd-act` helper: `AGENTD_ACT` (set in the VM) or the one cargo built.
#[macro_export]
macro_rules! act_bin {
    () => {
        std::env::var_os("AGENTD_ACT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_agentd-act")))
    };
}

/// Fails the test at once, with the reason, unless it runs as root.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads BPF programs and creates cgroups: run it as root"
    );
}

/// The `agentd` binary under test: `AGENTD_BIN`, or target/<profile>/agentd next to the
/// test executable.
pub fn agentd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/host-xxxx -> target/<profile>/agentd
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("agentd"));
    match candidate {
        Some(p) if p.is_file() => p,
        _ => panic!(
            "the agentd binary was not found next to {}; build it (cargo build -p agentd) or set AGENTD_BIN",
            exe.display()
        ),
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A cgroup tree of the test's own, used as the agent root.
pub struct TestRoot {
    // Dropped last: children are removed first (see Drop of the children's owners).
    dir: CgroupDir,
    mount: Cgroup2Mount,
}

impl TestRoot {
    pub fn new(tag: &str) -> Self {
        require_root();
        let mount = cgroup::cgroup2_mount().expect("cgroup2 is mounted");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("agentd-test-{}-{tag}-{n}", std::process::id());
        let dir =
            CgroupDir::create(&mount.mount_point, &name).expect("create the test root cgroup");
        Self { dir, mount }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn agent_root(&self) -> AgentRoot {
        AgentRoot {
            id: self.dir.id(),
            level: cgroup::cgroup_level(&self.mount, self.dir.path())
                .expect("level of the test root"),
        }
    }

    /// An open handle on the root directory, to attach cgroup programs to.
    pub fn open(&self) -> File {
        File::open(self.dir.path()).expect("open the test root cgroup")
    }

    /// A child cgroup (an agent's cgroup).
    pub fn child(&self, name: &str) -> CgroupDir {
        CgroupDir::create(self.dir.path(), name).expect("create a child cgroup")
    }

    /// The load configuration for this root on the running kernel.
    pub fn load_config(&self) -> LoadConfig {
        let offsets = Btf::from_kernel()
            .and_then(|b| b.kernel_offsets())
            .expect("kernel offsets from BTF");
        LoadConfig {
            root: self.agent_root(),
            offsets,
            metrics_port: 0,
        }
    }
}

/// What `agentd-act` reported.
#[derive(Debug, Clone)]
pub struct Act {
    pub json: Value,
}

impl Act {
    pub fn ok(&self) -> bool {
        self.json["ok"] == Value::Bool(true)
    }

    pub fn errno(&self) -> Option<i32> {
        self.json["errno"].as_i64().map(|e| e as i32)
    }

    /// Asserts the operation failed with `errno`.
    #[track_caller]
    pub fn assert_errno(&self, errno: i32) {
        assert_eq!(
            self.errno(),
            Some(errno),
            "expected errno {errno}, agentd-act said {}",
            self.json
        );
    }

    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.ok(), "expected success, agentd-act said {}", self.json);
    }
}

/// Runs `agentd-act ARGS` inside `cgroup` (or where the test runs, with `None`), moved
/// there before it execs, and returns its report.
pub fn act_in(act: &Path, cgroup: Option<&CgroupDir>, args: &[&str]) -> Act {
    try_act_in(act, cgroup, args).unwrap_or_else(|e| panic!("running {}: {e}", act.display()))
}

/// Like [`act_in`], but returns the error if the helper could not even be started (for
/// example when exec itself is refused inside the cgroup).
pub fn try_act_in(act: &Path, cgroup: Option<&CgroupDir>, args: &[&str]) -> std::io::Result<Act> {
    let mut cmd = Command::new(act);
    cmd.args(args);
    let procs = cgroup.map(|c| {
        OpenOptions::new()
            .write(true)
            .open(c.path().join("cgroup.procs"))
            .expect("open cgroup.procs")
    });
    if let Some(procs) = &procs {
        let fd = procs.as_raw_fd();
        // SAFETY: between fork and exec only write(2) on an fd opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output()?;
    drop(procs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let json: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "agentd-act {args:?} printed no JSON ({e}); status {}, stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Ok(Act { json })
}

/// Polls `f` every 10 ms until it is true or `timeout` passes; returns its last value.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("agentd-test-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes a file below the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        let mut f = File::create(&p).expect("create file");
        f.write_all(contents.as_bytes()).expect("write file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon of the test's own: its own config, sockets, profiles directory, agent root
/// cgroup and tmp directory. Stopped (SIGTERM, then SIGKILL) and cleaned up on drop; its
/// log is printed if the test failed.
pub struct TestDaemon {
    child: std::process::Child,
    pub dir: TempDir,
    pub config: PathBuf,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub launch_socket: PathBuf,
    /// Where its links are pinned (removed by the daemon on a clean stop, else by drop).
    pub bpffs: PathBuf,
    /// The resolv.conf its private mount namespace shows, if it has one.
    resolv: Option<PathBuf>,
    /// The command the daemon runs under (see [`DaemonSetup::wrapper`]).
    wrapper: Vec<String>,
}

/// Starts `[WRAPPER...] agentd --config CONFIG daemon` (in a private mount namespace with
/// `resolv` as /etc/resolv.conf, if given), its output appended to `log`.
fn spawn_daemon(
    config: &Path,
    resolv: Option<&Path>,
    wrapper: &[String],
    log: &Path,
) -> std::process::Child {
    let log = File::options().create(true).append(true).open(log).unwrap();
    let mut argv: Vec<std::ffi::OsString> = wrapper.iter().map(Into::into).collect();
    argv.extend([
        agentd_bin().into(),
        "--config".into(),
        config.into(),
        "daemon".into(),
    ]);
    let mut cmd = match resolv {
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        Some(resolv) => {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
                .arg("mount --bind \"$1\" /etc/resolv.conf && shift && exec \"$@\"")
                .arg("sh")
                .arg(resolv)
                .args(&argv);
            c
        }
    };
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // If the test process dies without dropping this guard (killed by a timeout), the
    // daemon still gets SIGTERM and removes its agents and cgroups.
    // SAFETY: prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("start agentd daemon")
}

/// How a [`TestDaemon`] is set up.
#[derive(Default)]
pub struct DaemonSetup<'a> {
    /// Profiles (name, TOML text) in its profiles directory.
    pub profiles: &'a [(&'a str, &'a str)],
    /// Extra configuration appended to the generated file (e.g. a `[dns]` section).
    pub extra_config: &'a str,
    /// Extra lines of the generated file's `[agents]` section (e.g. `max = 3`).
    pub agents_config: &'a str,
    /// Extra lines of the generated file's `[daemon]` section (e.g. `on_stop = "keep"`).
    pub daemon_config: &'a str,
    /// Extra lines of the generated file's `[audit]` section (e.g. `max_bytes = 4096`).
    pub audit_config: &'a str,
    /// If set, the daemon (and so every agent) runs in a private mount namespace where
    /// /etc/resolv.conf has this text: agents' name lookups then never depend on, or
    /// reach, the host's resolver.
    pub resolv_conf: Option<&'a str>,
    /// A command the daemon runs under, its arguments before agentd's own: `setpriv
    /// --bounding-set=-all,+bpf,... --` runs it (and so every agent) with only those
    /// capabilities, as a systemd unit's CapabilityBoundingSet= does.
    pub wrapper: &'a [&'a str],
}

impl TestDaemon {
    /// Starts a daemon whose profiles directory holds `profiles` (name, TOML text).
    pub fn start(profiles: &[(&str, &str)]) -> Self {
        Self::with(DaemonSetup {
            profiles,
            ..Default::default()
        })
    }

    pub fn with(setup: DaemonSetup<'_>) -> Self {
        Self::try_with(setup)
            .unwrap_or_else(|(log, _)| panic!("the daemon did not start; its log:\n{log}"))
    }

    /// Starts a daemon; if it exits instead, returns its log and whether it left its agent
    /// root cgroup behind (then removes its files and that cgroup).
    pub fn try_with(setup: DaemonSetup<'_>) -> Result<Self, (String, bool)> {
        require_root();
        let dir = TempDir::new("daemon");
        let mount = cgroup::cgroup2_mount().expect("cgroup2 is mounted");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let root = mount
            .mount_point
            .join(format!("agentd-test-{}-daemon-{n}", std::process::id()));
        let profiles_dir = dir.path().join("profiles");
        std::fs::create_dir_all(&profiles_dir).unwrap();
        for (name, text) in setup.profiles {
            std::fs::write(profiles_dir.join(format!("{name}.toml")), text).unwrap();
        }
        let socket = dir.path().join("agentd.sock");
        let launch_socket = dir.path().join("launch.sock");
        let bpffs = PathBuf::from(format!(
            "/sys/fs/bpf/agentd-test-{}-daemon-{n}",
            std::process::id()
        ));
        let config = dir.path().join("agentd.toml");
        // A resolver port of its own, so that test daemons never share one.
        let dns_port = 20000 + (std::process::id() * 7 + n) % 40000;
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{}\"\nlaunch_socket = \"{}\"\nadmin_group = \"root\"\ncgroup_root = \"{}\"\nbpffs = \"{}\"\n{}\n\
                 [agents]\nprofiles_dir = \"{}\"\ndefault_profile = \"default\"\nuser = \"nobody\"\ntmp_dir = \"{}\"\n{}\n\
                 [audit]\npath = \"{}\"\n{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
                 [dns]\nport = {dns_port}\n{}",
                socket.display(),
                launch_socket.display(),
                root.display(),
                bpffs.display(),
                setup.daemon_config,
                profiles_dir.display(),
                dir.path().join("tmp").display(),
                setup.agents_config,
                dir.path().join("audit/audit.jsonl").display(),
                setup.audit_config,
                if setup.extra_config.contains("[dns]") { setup.extra_config.replace("[dns]\n", "") } else { setup.extra_config.to_string() },
            ),
        )
        .unwrap();
        // Readable by agents (they run as nobody) that call agentd themselves.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let resolv = setup.resolv_conf.map(|text| {
            let resolv = dir.path().join("resolv.conf");
            std::fs::write(&resolv, text).unwrap();
            resolv
        });
        let wrapper: Vec<String> = setup.wrapper.iter().map(|s| s.to_string()).collect();
        let child = spawn_daemon(
            &config,
            resolv.as_deref(),
            &wrapper,
            &dir.path().join("daemon.log"),
        );
        let mut d = TestDaemon {
            child,
            dir,
            config,
            root,
            socket,
            launch_socket,
            bpffs,
            resolv,
            wrapper,
        };
        if d.wait_ready() {
            Ok(d)
        } else {
            Err((d.log(), d.root.exists()))
        }
    }

    /// Waits until the daemon answers on its socket (true) or exits (false).
    fn wait_ready(&mut self) -> bool {
        // (A minute: in the VMs, under software emulation, BPF LSM programs take seconds to
        // verify, more on a loaded machine.)
        let ready = wait_until(Duration::from_secs(60), || {
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                || !matches!(self.child.try_wait(), Ok(None))
        });
        if ready && matches!(self.child.try_wait(), Ok(None)) {
            return true;
        }
        let _ = wait_until(Duration::from_secs(10), || {
            !matches!(self.child.try_wait(), Ok(None))
        });
        false
    }

    /// Starts the daemon again with the same configuration, once the running one has
    /// exited (a test kills it first). Its log goes on in the same file. `Err` holds the
    /// log if the new daemon exited instead of answering.
    pub fn restart(&mut self) -> Result<(), String> {
        assert!(
            wait_until(Duration::from_secs(15), || self.exited()),
            "restart: the daemon is still running"
        );
        let _ = self.child.wait();
        let log = self.dir.path().join("daemon.log");
        let readies = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("agentd: ready:")
                .count()
        };
        let before = readies();
        self.child = spawn_daemon(
            &self.config,
            self.resolv.as_deref(),
            &self.wrapper,
            &self.dir.path().join("daemon.log"),
        );
        // The socket accepts before the daemon is done starting (adopting): wait for the
        // line it logs when it is.
        if self.wait_ready()
            && wait_until(Duration::from_secs(20), || {
                readies() > before || !matches!(self.child.try_wait(), Ok(None))
            })
            && readies() > before
        {
            Ok(())
        } else {
            Err(self.log())
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True once the daemon has exited (it stays a zombie until dropped: read /proc).
    pub fn exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .map(|s| {
                s.rsplit_once(") ")
                    .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
            })
            .unwrap_or(true)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// `agentd --config <this daemon's config>`.
    pub fn agentd(&self) -> Command {
        let mut c = Command::new(agentd_bin());
        c.arg("--config").arg(&self.config);
        c
    }

    /// `agentd run ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.agentd()
            .arg("run")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run agentd run")
    }

    /// The daemon's audit log.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit/audit.jsonl")
    }

    /// Every record of the audit log, rotated files first.
    pub fn audit_records(&self) -> Vec<Value> {
        agentd::audit::files_of(&self.audit_path())
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("an audit record is JSON"))
                    .collect::<Vec<Value>>()
            })
            .collect()
    }

    /// The address of its /metrics listener (from its log).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        let find = || {
            self.log()
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("agentd: metrics: http://"))
                .and_then(|rest| rest.strip_suffix("/metrics"))
                .and_then(|a| a.parse().ok())
        };
        // Logged once the daemon is done starting, a moment after its socket answers.
        wait_until(Duration::from_secs(10), || find().is_some());
        find().unwrap_or_else(|| panic!("the daemon logs its metrics address:\n{}", self.log()))
    }

    /// GET /metrics: the text.
    pub fn metrics(&self) -> String {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(self.metrics_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        body.to_string()
    }

    /// Agent cgroups currently below the root.
    pub fn agent_cgroups(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cgroup path an agent's processes report in /proc/PID/cgroup.
    pub fn agent_cgroup_path(&self, agent: &str) -> String {
        let mount = cgroup::cgroup2_mount().unwrap();
        format!(
            "/{}/{agent}",
            self.root
                .strip_prefix(&mount.mount_point)
                .unwrap()
                .display()
        )
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let stopped = wait_until(Duration::from_secs(15), || {
            !matches!(self.child.try_wait(), Ok(None))
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- agentd daemon log ----\n{}---- end of log ----",
                self.log()
            );
        } else {
            // Every test daemon's audit log holds its chain, whatever the test did.
            let files = agentd::audit::files_of(&self.audit_path());
            if !files.is_empty() {
                let v = agentd::audit::verify(&files).expect("the audit log can be read");
                assert!(v.ok, "the audit log's chain is broken: {:?}", v.problem);
            }
        }
        if self.root.exists()
            && let Ok(dir) = CgroupDir::adopt(&self.root)
        {
            let _ = dir.remove();
        }
        // Left by a daemon that was killed: its links detach with the pins.
        if self.bpffs.exists() {
            let _ = std::fs::remove_dir_all(&self.bpffs);
        }
    }
}

/// An agent running `agentd-act probe`: each [`Probe::ask`] sends it one line (`connect
/// ADDR:PORT` or `open PATH`) and returns its report. It outlives its daemon (tests kill and
/// restart the daemon under it).
pub struct Probe {
    pub child: std::process::Child,
    input: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Probe {
    /// `agentd run --profile PROFILE --name NAME [FLAGS...] -- ACT probe` (`act`: the
    /// agentd-act binary, `act_bin!()`), once it reports ready.
    pub fn start(d: &TestDaemon, act: &Path, profile: &str, name: &str, flags: &[&str]) -> Probe {
        use std::io::BufRead as _;
        let mut child = d
            .agentd()
            .args(["run", "--profile", profile, "--name", name])
            .args(flags)
            .arg("--")
            .arg(act)
            .arg("probe")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start agentd run");
        let input = child.stdin.take().unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut probe = Probe {
            child,
            input,
            lines,
        };
        assert_eq!(probe.next()["detail"], "ready");
        probe
    }

    fn next(&mut self) -> Value {
        serde_json::from_str(&self.lines.next().expect("a report").unwrap()).unwrap()
    }

    pub fn ask(&mut self, line: &str) -> Value {
        use std::io::Write as _;
        writeln!(self.input, "{line}").unwrap();
        self.input.flush().unwrap();
        self.next()
    }
}

/// The last line of a command's stdout, as JSON.
pub fn last_json(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "expected JSON on stdout ({e}); status {}, stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// True once /proc/PID is gone or a zombie.
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
    }
}

/// A DNS server on loopback that answers A queries from a fixed table (NXDOMAIN for other
/// names) and records every name it was asked for. Stops when dropped.
pub struct FakeDns {
    pub addr: std::net::SocketAddr,
    pub queries: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeDns {
    pub fn start(answers: &[(&str, std::net::Ipv4Addr)]) -> Self {
        use hickory_proto::{
            op::{Message, OpCode, ResponseCode},
            rr::{RData, Record, rdata::A},
        };
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the fake DNS server");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let answers: Vec<(String, std::net::Ipv4Addr)> =
            answers.iter().map(|(n, a)| (n.to_string(), *a)).collect();
        let queries = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (q, st) = (queries.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(query) = req.queries.first().cloned() else {
                    continue;
                };
                let name = query
                    .name()
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                q.lock().unwrap().push(name.clone());
                let mut r = Message::response(req.metadata.id, OpCode::Query);
                r.metadata.recursion_available = true;
                r.add_query(query.clone());
                match answers.iter().find(|(n, _)| *n == name) {
                    Some((_, a)) => r.answers.push(Record::from_rdata(
                        query.name().clone(),
                        30,
                        RData::A(A(*a)),
                    )),
                    None => r.metadata.response_code = ResponseCode::NXDomain,
                }
                let _ = sock.send_to(&r.to_vec().unwrap(), from);
            }
        });
        FakeDns {
            addr,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    /// Names asked so far.
    pub fn asked(&self) -> Vec<String> {
        self.queries.lock().unwrap().clone()
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// With `max_tasks` = `cap` and a profile `plain`: one agent holds 10 processes, and a
/// second one can start only what is left (its fork then fails with EAGAIN). `act` is
/// the agentd-act binary.
pub fn assert_tasks_capped(d: &TestDaemon, act: &str, cap: u64) {
    let holder = d
        .agentd()
        .args([
            "run",
            "--profile",
            "plain",
            "--",
            act,
            "spawn-hold",
            "10",
            "4",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || {
            std::fs::read_to_string(d.root.join("pids.current"))
                .is_ok_and(|n| n.trim().parse::<u64>().unwrap_or(0) >= 11)
        }),
        "the first agent holds its 10 children"
    );
    let out = d.run(&["--profile", "plain", "--", act, "spawn-hold", "50", "0"]);
    let v = last_json(&out);
    let started = v["detail"]["started"].as_u64().unwrap();
    eprintln!("task cap {cap}: the second agent started {started} of 50: {v}");
    // The cap, less the holder's 11 tasks and the second agent's own.
    assert!(started + 12 <= cap, "{v}");
    assert_eq!(v["detail"]["errno"], libc::EAGAIN, "{v}");
    let _ = holder.wait_with_output();
}
