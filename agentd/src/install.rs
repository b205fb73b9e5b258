//! `agentd install` and `agentd uninstall`: put agentd on a host (binary, systemd unit,
//! default configuration, shipped profiles, the admin group and the agent user, log and
//! run directories) and take it off again.
//!
//! `--prefix DIR` is the root of the file system the files go to, as DESTDIR is for
//! `make install`: the files themselves name the target's paths (the unit runs
//! /usr/local/bin/agentd), so a tree installed under a prefix can be copied or packed as
//! it is. Only with the prefix `/` are the host's accounts created and systemd told; with
//! another prefix the accounts that would be created are printed and nothing else is
//! touched.
//!
//! Both commands are idempotent and print one line per step: what was done, what was
//! already there, what was kept. A step that fails stops the command, which then says
//! what was done and what was not.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::config::{self, Config};

/// The systemd unit, as shipped in packaging/agentd.service.
pub const UNIT: &str = include_str!("../../packaging/agentd.service");
/// Where the unit goes (on the target), and its name.
pub const UNIT_FILE: &str = "/etc/systemd/system/agentd.service";
pub const UNIT_NAME: &str = "agentd.service";
/// Where the binary goes: /usr/local is the administrator's, not the distribution's
/// package manager's, and /usr/local/bin is on every PATH. The unit's ExecStart= names it.
pub const BINARY: &str = "/usr/local/bin/agentd";
/// The configuration directory (agentd.toml and profiles/).
pub const CONFIG_DIR: &str = "/etc/agentd";
/// The audit log's directory: root only (group root may read; the files are 0640).
pub const LOG_DIR: &str = "/var/log/agentd";
pub const LOG_DIR_MODE: u32 = 0o750;
/// Sockets, agent records and the agents' tmp directories: agents (other users) must
/// reach the launch socket and their own tmp by name; no one else may list it.
pub const RUN_DIR: &str = "/run/agentd";
pub const RUN_DIR_MODE: u32 = 0o711;
/// Where the agents' user gets its home and shell: none, and no login.
const AGENT_HOME: &str = "/nonexistent";

/// The shipped profiles (profiles/*.toml), by name.
pub const PROFILES: &[(&str, &str)] = &[
    (
        "coding-agent",
        include_str!("../../profiles/coding-agent.toml"),
    ),
    ("default", include_str!("../../profiles/default.toml")),
    ("offline", include_str!("../../profiles/offline.toml")),
    (
        "research-agent",
        include_str!("../../profiles/research-agent.toml"),
    ),
];

/// The configuration `agentd install` writes: every key, at its default, commented out
/// (`#key = value`), so that later versions' defaults apply to whatever is not changed.
pub const DEFAULT_CONFIG: &str = r#"# agentd's configuration (agentd install wrote it; it never overwrites it).
#
# Every key is shown at its default and commented out: uncomment a line and change it to
# override that default; keys left commented follow agentd's defaults, also in later
# versions. After a change: `systemctl reload agentd` (or `agentd reload`); a key only a
# restart can change makes the reload fail and says so. An unknown key is an error that
# names the line.

[daemon]
# Control socket, mode 0660: every command, for root and the admin group.
#socket = "/run/agentd/agentd.sock"
# Launch socket: `agentd run` from inside agents only (a child agent can only narrow).
#launch_socket = "/run/agentd/launch.sock"
# Group allowed on the control socket (agentd install creates it).
#admin_group = "agentd"
# Where agent cgroups go. "auto": agents/ in the service's own cgroup under systemd
# (Delegate=yes), else <cgroup2 mount>/agentd.
#cgroup_root = "auto"
# Pinned maps and links (bpffs): agents stay contained if the daemon dies, and the next
# daemon adopts them.
#bpffs = "/sys/fs/bpf/agentd"
# What a stop (SIGTERM, systemctl stop) does to the agents: "kill" every agent, or
# "keep" them running, contained by the pins, until the next daemon adopts them (an
# upgrade). With "keep", also change the unit: see KillMode= in agentd.service.
#on_stop = "kill"

[agents]
# Profiles by name (agentd run --profile NAME).
#profiles_dir = "/etc/agentd/profiles"
#default_profile = "default"
# The account agents run as when there is no --user and no SUDO_UID (agentd install
# creates it: a system user with no home and no login).
#user = "agentd-agent"
# Per-agent private tmp directories (<tmp_dir>/<agent>, mode 0700). Every component of
# the path must be a root-owned directory no one else can write (or sticky).
#tmp_dir = "/run/agentd/tmp"
# Most agents running at once; a launch beyond is refused.
#max = 1024
# None by default: most processes and threads of all agents together (pids.max of the
# agent root; a fork beyond fails with EAGAIN). Needs the pids controller delegated.
# max_tasks = 10000

[dns]
# Where agents' resolvers forward the names their policy allows: "auto" (the nameservers
# of /etc/resolv.conf when the daemon starts) or a list like ["192.0.2.53:53"].
#upstream = "auto"
# Port of each agent's resolver (127.53.x.y:<port>).
#port = 10053

[files]
# Which file enforcers may be used, each only where the kernel allows it.
#enforcers = ["lsm", "landlock"]

[audit]
# The hash-chained audit log: one JSON record per line (agentd audit verify checks it).
#path = "/var/log/agentd/audit.jsonl"
# Rotate beyond this size (audit.jsonl.1, .2, ...), keeping this many rotated files.
#max_bytes = 104857600
#keep = 10
# Allowed DNS answers: one record per agent and name per interval.
#aggregate_seconds = 10

[metrics]
# Prometheus /metrics; "off" for none.
#listen = "127.0.0.1:9464"

# Budgets shared by all agents together; none by default. For example:
# [host_budgets.connects]         # connects and addressed datagrams per second
# rate = 1000
# burst = 2000
# action = "deny"                 # "deny" (EAGAIN, dropped packet) or "log"
#
# [host_budgets.egress_bytes]     # bytes per second of all agents' outgoing packets
# rate = 10000000
"#;

/// What became of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Something was created, changed or removed.
    Done,
    /// It was already as it should be.
    Unchanged,
    /// An existing file or account was left as it is (an edited configuration or profile,
    /// the audit log without --purge).
    Kept,
    /// Not for this host or prefix (systemd is not PID 1, the prefix is not /); the
    /// detail says what would have been done.
    Skipped,
    Failed,
    /// Not attempted: an earlier step failed.
    NotDone,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Unchanged => "unchanged",
            Status::Kept => "kept",
            Status::Skipped => "skipped",
            Status::Failed => "FAILED",
            Status::NotDone => "not done",
        }
    }
}

/// One step of an install or uninstall.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: String,
    /// The file or directory it is about, under the prefix.
    pub path: Option<PathBuf>,
    pub status: Status,
    pub detail: String,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub command: &'static str,
    pub prefix: PathBuf,
    /// True when every step worked.
    pub ok: bool,
    pub steps: Vec<Step>,
}

type Action<'a> = Box<dyn FnOnce() -> Result<(Status, String)> + 'a>;

/// The steps of a command, run in order until one fails.
struct Plan<'a> {
    command: &'static str,
    prefix: PathBuf,
    steps: Vec<(String, Option<PathBuf>, Action<'a>)>,
}

impl<'a> Plan<'a> {
    fn new(command: &'static str, prefix: &Path) -> Self {
        Plan {
            command,
            prefix: prefix.to_path_buf(),
            steps: Vec::new(),
        }
    }

    fn add(
        &mut self,
        step: impl Into<String>,
        path: Option<PathBuf>,
        action: impl FnOnce() -> Result<(Status, String)> + 'a,
    ) {
        self.steps.push((step.into(), path, Box::new(action)));
    }

    /// Runs the steps; prints one line per step (on stderr with `json`, which then prints
    /// the report on stdout). Exit status 0 if every step worked, else 1.
    fn run(self, json: bool) -> i32 {
        let mut report = Report {
            command: self.command,
            prefix: self.prefix,
            ok: true,
            steps: Vec::new(),
        };
        let line = |s: &Step| {
            let text = format!(
                "{}: {:<22} {:<9} {}",
                self.command,
                s.step,
                s.status.word(),
                s.detail
            );
            if json {
                eprintln!("{text}");
            } else {
                println!("{text}");
            }
        };
        let mut steps = self.steps.into_iter();
        for (step, path, action) in steps.by_ref() {
            let (status, detail) = match action() {
                Ok(r) => r,
                Err(e) => (Status::Failed, format!("{e:#}")),
            };
            let s = Step {
                step,
                path,
                status,
                detail,
            };
            line(&s);
            report.steps.push(s);
            if status == Status::Failed {
                report.ok = false;
                break;
            }
        }
        for (step, path, _) in steps {
            let s = Step {
                step,
                path,
                status: Status::NotDone,
                detail: "not attempted: an earlier step failed".into(),
            };
            report.steps.push(s);
        }
        if !report.ok {
            let names = |want: &dyn Fn(Status) -> bool| {
                let v: Vec<&str> = report
                    .steps
                    .iter()
                    .filter(|s| want(s.status))
                    .map(|s| s.step.as_str())
                    .collect();
                if v.is_empty() {
                    "nothing".to_string()
                } else {
                    v.join(", ")
                }
            };
            let failed = report
                .steps
                .iter()
                .find(|s| s.status == Status::Failed)
                .map_or("", |s| s.step.as_str());
            eprintln!(
                "agentd {}: stopped at `{failed}`. Done or already there: {}. Not done: {}.",
                self.command,
                names(&|s| matches!(
                    s,
                    Status::Done | Status::Unchanged | Status::Kept | Status::Skipped
                )),
                names(&|s| matches!(s, Status::Failed | Status::NotDone)),
            );
        }
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("serializable")
            );
        }
        i32::from(!report.ok)
    }
}

/// `path` (absolute, on the target) below `prefix`.
pub fn under(prefix: &Path, path: impl AsRef<Path>) -> PathBuf {
    let p = path.as_ref();
    prefix.join(p.strip_prefix("/").unwrap_or(p))
}

/// True when systemd is the init system here (as sd_booted(3) decides).
pub fn systemd_is_init() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The prefix as an absolute path (`/` for the host itself).
fn absolute_prefix(prefix: &Path) -> Result<PathBuf> {
    let p = if prefix.is_absolute() {
        prefix.to_path_buf()
    } else {
        std::env::current_dir()
            .context("the current directory")?
            .join(prefix)
    };
    // `/`, `//` and `/.` are the host.
    let normal: PathBuf = p.components().collect();
    Ok(normal)
}

/// Checks that whoever runs the command may do it: the host itself needs root.
fn check_caller(command: &str, prefix: &Path) -> Result<(), String> {
    if prefix == Path::new("/") && !is_root() {
        return Err(format!(
            "agentd {command}: run it as root (it writes /usr/local/bin, /etc and /var/log, and \
             manages system accounts), or give --prefix DIR to {command} into a directory tree"
        ));
    }
    Ok(())
}

fn mode_str(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

/// Runs a command; its stderr is the error if it fails.
fn run_cmd(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `dir` a directory with `mode`, owned by root (when we are root). Refuses a
/// symlink or a file in its place.
fn ensure_dir(dir: &Path, mode: u32) -> Result<(Status, String)> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            fs::DirBuilder::new()
                .mode(mode)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            // Whatever the umask.
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", dir.display()))?;
            if is_root() {
                std::os::unix::fs::chown(dir, Some(0), Some(0))
                    .with_context(|| format!("chown {}", dir.display()))?;
            }
            Ok((
                Status::Done,
                format!("created {} (mode {})", dir.display(), mode_str(mode)),
            ))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => bail!(
            "{} exists and is not a directory{}; move it away and install again",
            dir.display(),
            if m.file_type().is_symlink() {
                " (a symlink)"
            } else {
                ""
            }
        ),
        Ok(m) => {
            let mut changes = Vec::new();
            if m.mode() & 0o7777 != mode {
                fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                    .with_context(|| format!("chmod {}", dir.display()))?;
                changes.push(format!("mode {} -> {}", mode_str(m.mode()), mode_str(mode)));
            }
            if is_root() && (m.uid() != 0 || m.gid() != 0) {
                std::os::unix::fs::chown(dir, Some(0), Some(0))
                    .with_context(|| format!("chown {}", dir.display()))?;
                changes.push(format!("owner {}:{} -> root:root", m.uid(), m.gid()));
            }
            if changes.is_empty() {
                Ok((
                    Status::Unchanged,
                    format!("{} (mode {})", dir.display(), mode_str(mode)),
                ))
            } else {
                Ok((
                    Status::Done,
                    format!("{}: {}", dir.display(), changes.join(", ")),
                ))
            }
        }
    }
}

/// True if the file at `path` holds exactly what `source` reads.
fn same_contents(mut source: impl io::Read, path: &Path) -> io::Result<bool> {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let (mut a, mut b) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut source, &mut a)?;
        let m = read_full(&mut file, &mut b)?;
        if n != m || a[..n] != b[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Installs the contents of `open()` at `path` with `mode`, unless it is there already:
/// written next to it and renamed over it (a running binary is replaced, not changed).
fn install_file(
    path: &Path,
    mode: u32,
    open: impl Fn() -> io::Result<Box<dyn io::Read>>,
    what: &str,
) -> Result<(Status, String)> {
    let existing = fs::symlink_metadata(path).ok();
    if let Some(m) = &existing {
        if !m.is_file() {
            bail!(
                "{} exists and is not a regular file; move it away and install again",
                path.display()
            );
        }
        let src = open().with_context(|| format!("reading {what}"))?;
        if same_contents(src, path).with_context(|| format!("reading {}", path.display()))? {
            if m.mode() & 0o7777 != mode {
                fs::set_permissions(path, fs::Permissions::from_mode(mode))
                    .with_context(|| format!("chmod {}", path.display()))?;
                return Ok((
                    Status::Done,
                    format!(
                        "{}: mode {} -> {}",
                        path.display(),
                        mode_str(m.mode()),
                        mode_str(mode)
                    ),
                ));
            }
            return Ok((
                Status::Unchanged,
                format!("{} is this version", path.display()),
            ));
        }
    }
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.agentd-install-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> Result<()> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut src = open().with_context(|| format!("reading {what}"))?;
        io::copy(&mut src, &mut out).with_context(|| format!("writing {}", tmp.display()))?;
        out.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", tmp.display()))?;
        out.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((
        Status::Done,
        format!(
            "{} {} ({what})",
            if existing.is_some() {
                "replaced"
            } else {
                "installed"
            },
            path.display()
        ),
    ))
}

/// Writes `text` to `path` only if nothing is there: an existing file is the
/// administrator's, and is kept whatever it says.
fn write_if_absent(path: &Path, text: &str, shipped: &str) -> Result<(Status, String)> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(text.as_bytes())
                .and_then(|()| f.set_permissions(fs::Permissions::from_mode(0o644)))
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok((Status::Done, format!("wrote {}", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let current = fs::read_to_string(path).unwrap_or_default();
            if current == text {
                Ok((
                    Status::Unchanged,
                    format!("{} is the shipped version", path.display()),
                ))
            } else {
                Ok((
                    Status::Kept,
                    format!(
                        "{} differs from the shipped {shipped} (edited): not overwritten; \
                         remove it and install again to get the shipped one",
                        path.display()
                    ),
                ))
            }
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// The shell for system accounts that must not log in.
fn nologin() -> &'static str {
    ["/usr/sbin/nologin", "/sbin/nologin"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/bin/false")
}

fn ensure_group(name: &str) -> Result<(Status, String)> {
    let lookup =
        || nix::unistd::Group::from_name(name).with_context(|| format!("looking up group {name}"));
    if let Some(g) = lookup()? {
        return Ok((
            Status::Unchanged,
            format!("group {name} exists (gid {})", g.gid),
        ));
    }
    run_cmd(Command::new("groupadd").args(["--system", name]))?;
    let g = lookup()?.with_context(|| format!("groupadd ran, but group {name} is not there"))?;
    Ok((
        Status::Done,
        format!(
            "created the system group {name} (gid {}): its members may use the control socket",
            g.gid
        ),
    ))
}

fn ensure_user(name: &str) -> Result<(Status, String)> {
    let lookup =
        || nix::unistd::User::from_name(name).with_context(|| format!("looking up user {name}"));
    if let Some(u) = lookup()? {
        return Ok((
            Status::Unchanged,
            format!("user {name} exists (uid {})", u.uid),
        ));
    }
    let mut cmd = Command::new("useradd");
    cmd.args(["--system", "--no-create-home", "--home-dir", AGENT_HOME])
        .args(["--shell", nologin(), "--comment", "agentd agents"]);
    // Its own group: files an agent makes are nobody else's.
    if nix::unistd::Group::from_name(name)?.is_some() {
        cmd.args(["--gid", name]);
    } else {
        cmd.arg("--user-group");
    }
    run_cmd(cmd.arg(name))?;
    let u = lookup()?.with_context(|| format!("useradd ran, but user {name} is not there"))?;
    Ok((
        Status::Done,
        format!(
            "created the system user {name} (uid {}, no home, no login): agents run as it by default",
            u.uid
        ),
    ))
}

/// `agentd install`.
pub fn install(prefix: &Path, json: bool) -> i32 {
    let prefix = match absolute_prefix(prefix) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentd install: --prefix: {e:#}");
            return 2;
        }
    };
    if let Err(e) = check_caller("install", &prefix) {
        eprintln!("{e}");
        return 1;
    }
    let host = prefix == Path::new("/");
    let defaults = Config::default();
    let mut plan = Plan::new("install", &prefix);

    let binary = under(&prefix, BINARY);
    plan.add("binary", Some(binary.clone()), {
        let binary = binary.clone();
        move || {
            let from = fs::read_link("/proc/self/exe")
                .map_or_else(|_| "this agentd".to_string(), |p| p.display().to_string());
            let (status, mut detail) = install_file(
                &binary,
                0o755,
                || Ok(Box::new(fs::File::open("/proc/self/exe")?)),
                &format!("from {from}"),
            )?;
            if detail.starts_with("replaced") {
                detail.push_str(
                    "; a running daemon goes on with the old one until restarted \
                     (systemctl restart agentd)",
                );
            }
            Ok((status, detail))
        }
    });
    let unit = under(&prefix, UNIT_FILE);
    plan.add("systemd unit", Some(unit.clone()), {
        let unit = unit.clone();
        move || {
            install_file(
                &unit,
                0o644,
                || Ok(Box::new(io::Cursor::new(UNIT.as_bytes()))),
                "change it with drop-ins: systemctl edit agentd",
            )
        }
    });
    let config_dir = under(&prefix, CONFIG_DIR);
    plan.add("config directory", Some(config_dir.clone()), {
        let d = config_dir.clone();
        move || ensure_dir(&d, 0o755)
    });
    let config_file = under(&prefix, config::DEFAULT_PATH);
    plan.add("config", Some(config_file.clone()), {
        let f = config_file.clone();
        move || {
            let (status, detail) = write_if_absent(&f, DEFAULT_CONFIG, "default configuration")?;
            if status == Status::Kept {
                // Kept whatever it says; a broken one is worth a word now rather than at start.
                let text = fs::read_to_string(&f).unwrap_or_default();
                if let Err(e) = Config::parse(&text, &f.display().to_string()) {
                    return Ok((
                        Status::Kept,
                        format!(
                            "{} exists, not overwritten; NOTE: it does not parse: {e}",
                            f.display()
                        ),
                    ));
                }
                return Ok((
                    Status::Kept,
                    format!(
                        "{} exists (the administrator's): not overwritten",
                        f.display()
                    ),
                ));
            }
            Ok((status, detail))
        }
    });
    let profiles_dir = under(&prefix, &defaults.profiles_dir);
    plan.add("profiles directory", Some(profiles_dir.clone()), {
        let d = profiles_dir.clone();
        move || ensure_dir(&d, 0o755)
    });
    for (name, text) in PROFILES {
        let path = profiles_dir.join(format!("{name}.toml"));
        plan.add(format!("profile {name}"), Some(path.clone()), move || {
            write_if_absent(&path, text, &format!("profile {name}"))
        });
    }
    let group = defaults.admin_group.clone();
    let user = defaults.agent_user.clone();
    if host {
        plan.add(format!("group {group}"), None, move || ensure_group(&group));
        plan.add(format!("user {user}"), None, move || ensure_user(&user));
    } else {
        plan.add(format!("group {group}"), None, move || {
            Ok((
                Status::Skipped,
                format!(
                    "would create the system group {group} (groupadd --system {group}); the prefix is \
                     not /, so the host's accounts are left alone"
                ),
            ))
        });
        plan.add(format!("user {user}"), None, move || {
            Ok((
                Status::Skipped,
                format!(
                    "would create the system user {user} (useradd --system --user-group --no-create-home \
                     --home-dir {AGENT_HOME} --shell {} {user}); the prefix is not /, so the host's \
                     accounts are left alone",
                    nologin()
                ),
            ))
        });
    }
    let log_dir = under(&prefix, LOG_DIR);
    plan.add("log directory", Some(log_dir.clone()), {
        let d = log_dir.clone();
        move || ensure_dir(&d, LOG_DIR_MODE)
    });
    let run_dir = under(&prefix, RUN_DIR);
    plan.add("run directory", Some(run_dir.clone()), {
        let d = run_dir.clone();
        move || ensure_dir(&d, RUN_DIR_MODE)
    });
    plan.add("systemd", None, move || {
        if !host {
            return Ok((
                Status::Skipped,
                "the prefix is not /: systemd is not told (systemctl daemon-reload on the target)"
                    .into(),
            ));
        }
        if !systemd_is_init() {
            return Ok((
                Status::Skipped,
                "systemd is not PID 1 here: start the daemon with `agentd daemon`".into(),
            ));
        }
        run_cmd(Command::new("systemctl").arg("daemon-reload"))?;
        Ok((
            Status::Done,
            "systemctl daemon-reload; start it with: systemctl enable --now agentd".into(),
        ))
    });
    plan.run(json)
}

/// The configuration whose daemon `uninstall` asks to kill the agents: the one named
/// (`--config`, `AGENTD_CONFIG`), else, on the host itself, the installed one. With
/// another prefix and none named, there is no daemon to ask.
fn uninstall_config(prefix: &Path, explicit: Option<&Path>) -> Result<Option<Config>, String> {
    let named = explicit.is_some() || std::env::var_os("AGENTD_CONFIG").is_some();
    if !named && prefix != Path::new("/") {
        return Ok(None);
    }
    Config::load(explicit)
        .map(Some)
        .map_err(|e| format!("agentd uninstall: {e}"))
}

/// True while something accepts connections on `socket`.
fn answers(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// Kills every agent: asks the daemon (`agentd kill --all`, which acts on the cgroups
/// itself if the daemon does not accept within 3 s).
fn kill_agents(config: &Config) -> Result<(Status, String)> {
    if !answers(&config.socket) && !crate::kill::find_root(config).is_ok_and(|r| r.is_dir()) {
        return Ok((
            Status::Unchanged,
            format!(
                "no daemon answers on {} and there is no agent root: no agents",
                config.socket.display()
            ),
        ));
    }
    let mut cmd = Command::new("/proc/self/exe");
    if let Some(p) = &config.path {
        cmd.arg("--config").arg(p);
    }
    cmd.args(["kill", "--all", "--json"])
        .stdin(std::process::Stdio::null());
    let out = cmd.output().context("running agentd kill --all")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        anyhow::anyhow!(
            "agentd kill --all failed ({}): {}; nothing was removed",
            out.status,
            stderr.trim()
        )
    })?;
    let outcomes = v["outcomes"].as_array().cloned().unwrap_or_default();
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o["error"].is_null())
        .map(|o| format!("{}: {}", o["agent"].as_str().unwrap_or("?"), o["error"]))
        .collect();
    if !failed.is_empty() {
        bail!(
            "not every agent was killed ({}); nothing was removed",
            failed.join("; ")
        );
    }
    if !out.status.success() {
        bail!(
            "agentd kill --all failed ({}): {}; nothing was removed",
            out.status,
            stderr.trim()
        );
    }
    let how = if stderr.contains("directly") {
        "directly on the cgroups: the daemon did not answer"
    } else {
        "through the daemon"
    };
    if outcomes.is_empty() {
        return Ok((Status::Unchanged, "no agents were running".into()));
    }
    let names: Vec<&str> = outcomes
        .iter()
        .map(|o| o["agent"].as_str().unwrap_or("?"))
        .collect();
    Ok((
        Status::Done,
        format!(
            "killed {} agent{} ({how}): {}",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        ),
    ))
}

/// Stops a daemon that still answers after systemd was told (one started by hand): the
/// process behind the control socket gets SIGTERM, and its stop removes its agent root
/// and pins.
fn stop_daemon(config: &Config) -> Result<(Status, String)> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let socket = &config.socket;
    let Ok(stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return Ok((
            Status::Unchanged,
            format!("no daemon answers on {}", socket.display()),
        ));
    };
    let pid = getsockopt(&stream, PeerCredentials)
        .with_context(|| format!("who listens on {}", socket.display()))?
        .pid();
    drop(stream);
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "agentd" {
        bail!(
            "{} is answered by pid {pid} ({}), not an agentd daemon: stop it yourself",
            socket.display(),
            comm.trim()
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("SIGTERM to the daemon (pid {pid})"))?;
    let gone = || {
        fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(") ")
                .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
        })
    };
    let start = Instant::now();
    while !gone() {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the daemon (pid {pid}) did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((
        Status::Done,
        format!("stopped the daemon (pid {pid}, not run by systemd) with SIGTERM"),
    ))
}

/// Removes what a daemon that did not stop cleanly (killed) left: its pins and its empty
/// agent root. Only once no daemon answers.
fn remove_leftovers(config: &Config) -> Result<(Status, String)> {
    if answers(&config.socket) {
        bail!(
            "a daemon still answers on {}: its pins and agent root stay",
            config.socket.display()
        );
    }
    // A daemon holds this lock for its whole life, also while it is not answering.
    let lock = crate::daemon::adopt::records_dir(config).join("daemon.lock");
    if let Ok(f) = fs::File::open(&lock) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor we own; released when `f` is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "a daemon still holds {}: its pins and agent root stay",
                lock.display()
            );
        }
    }
    let mut done = Vec::new();
    if config.bpffs.is_dir() {
        fs::remove_dir_all(&config.bpffs)
            .with_context(|| format!("removing the pins in {}", config.bpffs.display()))?;
        done.push(format!("removed the pins in {}", config.bpffs.display()));
    }
    if let Ok(root) = crate::kill::find_root(config)
        && root.is_dir()
    {
        // Empty once every agent was killed; rmdir refuses otherwise.
        fs::remove_dir(&root)
            .with_context(|| format!("removing the agent root {}", root.display()))?;
        done.push(format!("removed the agent root {}", root.display()));
    }
    if done.is_empty() {
        Ok((
            Status::Unchanged,
            "no pins or agent root left behind".into(),
        ))
    } else {
        Ok((Status::Done, done.join("; ")))
    }
}

fn remove_file(path: &Path) -> Result<(Status, String)> {
    match fs::remove_file(path) {
        Ok(()) => Ok((Status::Done, format!("removed {}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((
            Status::Unchanged,
            format!("{} is not there", path.display()),
        )),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

fn remove_tree(path: &Path) -> Result<(Status, String)> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((
            Status::Unchanged,
            format!("{} is not there", path.display()),
        )),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(m) if m.file_type().is_symlink() => {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
            Ok((
                Status::Done,
                format!("removed the symlink {}", path.display()),
            ))
        }
        Ok(_) => {
            fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
            Ok((Status::Done, format!("removed {}", path.display())))
        }
    }
}

/// `agentd uninstall`.
pub fn uninstall(prefix: &Path, purge: bool, json: bool, explicit_config: Option<&Path>) -> i32 {
    let prefix = match absolute_prefix(prefix) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentd uninstall: --prefix: {e:#}");
            return 2;
        }
    };
    if let Err(e) = check_caller("uninstall", &prefix) {
        eprintln!("{e}");
        return 1;
    }
    let config = match uninstall_config(&prefix, explicit_config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let host = prefix == Path::new("/");
    let systemd = host && systemd_is_init();
    let mut plan = Plan::new("uninstall", &prefix);

    // First the agents: nothing is removed while one runs (agentd kill --direct needs
    // the binary).
    match &config {
        Some(c) => plan.add("agents", None, move || kill_agents(c)),
        None => plan.add("agents", None, || {
            Ok((
                Status::Skipped,
                "the prefix is not / and no --config names a daemon: no agents to ask about".into(),
            ))
        }),
    }
    plan.add("service", None, {
        let prefix = prefix.clone();
        move || {
            if systemd {
                let active = Command::new("systemctl")
                    .args(["is-active", "--quiet", UNIT_NAME])
                    .status()
                    .is_ok_and(|s| s.success());
                let enabled = Command::new("systemctl")
                    .args(["is-enabled", "--quiet", UNIT_NAME])
                    .status()
                    .is_ok_and(|s| s.success());
                let mut done = Vec::new();
                if active {
                    run_cmd(Command::new("systemctl").args(["stop", UNIT_NAME]))?;
                    done.push("stopped");
                }
                if enabled {
                    run_cmd(Command::new("systemctl").args(["disable", UNIT_NAME]))?;
                    done.push("disabled");
                }
                return Ok(if done.is_empty() {
                    (
                        Status::Unchanged,
                        format!("{UNIT_NAME} is neither running nor enabled"),
                    )
                } else {
                    (Status::Done, format!("{UNIT_NAME} {}", done.join(" and ")))
                });
            }
            // No systemd to ask: remove what `systemctl enable` would have linked.
            let dir = under(&prefix, "/etc/systemd/system");
            let mut removed = Vec::new();
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let link = entry.path().join(UNIT_NAME);
                if entry.file_name().to_string_lossy().ends_with(".wants")
                    && fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink())
                {
                    fs::remove_file(&link)
                        .with_context(|| format!("removing {}", link.display()))?;
                    removed.push(link.display().to_string());
                }
            }
            let why = if host {
                "systemd is not PID 1 here"
            } else {
                "the prefix is not /"
            };
            Ok(if removed.is_empty() {
                (
                    Status::Skipped,
                    format!("{why}: no service to stop, not enabled"),
                )
            } else {
                (
                    Status::Done,
                    format!("{why}: removed the enable links {}", removed.join(", ")),
                )
            })
        }
    });
    if let Some(c) = &config {
        plan.add("daemon", None, move || stop_daemon(c));
        plan.add("leftovers", None, move || remove_leftovers(c));
    }
    let binary = under(&prefix, BINARY);
    plan.add("binary", Some(binary.clone()), move || remove_file(&binary));
    let unit = under(&prefix, UNIT_FILE);
    plan.add("systemd unit", Some(unit.clone()), move || {
        remove_file(&unit)
    });
    if systemd {
        plan.add("systemd", None, || {
            run_cmd(Command::new("systemctl").arg("daemon-reload"))?;
            Ok((Status::Done, "systemctl daemon-reload".into()))
        });
    }
    let dropins = under(&prefix, format!("{UNIT_FILE}.d"));
    plan.add("unit drop-ins", Some(dropins.clone()), move || {
        if !dropins.exists() {
            return Ok((Status::Unchanged, "none".into()));
        }
        if purge {
            remove_tree(&dropins)
        } else {
            Ok((
                Status::Kept,
                format!("kept {} (yours; --purge removes it)", dropins.display()),
            ))
        }
    });
    let config_dir = under(&prefix, CONFIG_DIR);
    plan.add("config", Some(config_dir.clone()), move || {
        if purge {
            remove_tree(&config_dir)
        } else if config_dir.exists() {
            Ok((
                Status::Kept,
                format!(
                    "kept {}: the configuration and profiles (--purge removes them)",
                    config_dir.display()
                ),
            ))
        } else {
            Ok((
                Status::Unchanged,
                format!("{} is not there", config_dir.display()),
            ))
        }
    });
    let log_dir = under(&prefix, LOG_DIR);
    // An audit log configured elsewhere is never removed: that directory may hold more.
    let elsewhere = config
        .as_ref()
        .and_then(|c| c.audit_path.parent().map(Path::to_path_buf))
        .filter(|d| host && d != Path::new(LOG_DIR));
    plan.add("audit log", Some(log_dir.clone()), move || {
        let (status, mut detail) = if purge {
            remove_tree(&log_dir)?
        } else if log_dir.exists() {
            (
                Status::Kept,
                format!(
                    "kept {}: the audit log (--purge removes it)",
                    log_dir.display()
                ),
            )
        } else {
            (
                Status::Unchanged,
                format!("{} is not there", log_dir.display()),
            )
        };
        if let Some(d) = elsewhere {
            detail.push_str(&format!(
                "; kept the audit log configured in {} (audit.path): remove it yourself",
                d.display()
            ));
        }
        Ok((status, detail))
    });
    let run_dir = under(&prefix, RUN_DIR);
    plan.add("run directory", Some(run_dir.clone()), move || {
        if host && answers(&Config::default().socket) {
            bail!(
                "a daemon still answers on {}: {} stays",
                Config::default().socket.display(),
                run_dir.display()
            );
        }
        remove_tree(&run_dir)
    });
    let defaults = Config::default();
    plan.add("accounts", None, move || {
        let (group, user) = (&defaults.admin_group, &defaults.agent_user);
        Ok(if host {
            (
                Status::Kept,
                format!(
                    "kept group {group} and user {user}: files agents made stay theirs \
                     (userdel {user}; groupdel {group} to remove them)"
                ),
            )
        } else {
            (
                Status::Skipped,
                format!(
                    "the prefix is not /: the host's accounts ({group}, {user}) are left alone"
                ),
            )
        })
    });
    plan.run(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the unit's `key=` lines.
    fn unit_values(key: &str) -> Vec<&'static str> {
        UNIT.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    }

    #[test]
    fn the_unit_runs_the_installed_binary_and_makes_the_default_directories() {
        let start = unit_values("ExecStart");
        assert_eq!(start, [format!("{BINARY} daemon").as_str()]);
        let d = Config::default();
        assert_eq!(d.profiles_dir, Path::new(CONFIG_DIR).join("profiles"));
        assert_eq!(
            Path::new(config::DEFAULT_PATH).parent(),
            Some(Path::new(CONFIG_DIR))
        );
        assert_eq!(d.audit_path.parent(), Some(Path::new(LOG_DIR)));
        for p in [&d.socket, &d.launch_socket, &d.tmp_dir] {
            assert!(p.starts_with(RUN_DIR), "{}", p.display());
        }
        assert_eq!(unit_values("RuntimeDirectory"), [&RUN_DIR["/run/".len()..]]);
        assert_eq!(
            unit_values("RuntimeDirectoryMode"),
            [mode_str(RUN_DIR_MODE).as_str()]
        );
        assert_eq!(
            unit_values("LogsDirectory"),
            [&LOG_DIR["/var/log/".len()..]]
        );
        assert_eq!(
            unit_values("LogsDirectoryMode"),
            [mode_str(LOG_DIR_MODE).as_str()]
        );
        assert_eq!(unit_values("Type"), ["notify"]);
        assert_eq!(unit_values("Delegate"), ["yes"]);
        assert_eq!(unit_values("KillMode"), ["mixed"]);
        // A `systemctl kill` default and a find_root candidate name the unit.
        assert!(UNIT_FILE.ends_with(UNIT_NAME));
    }

    #[test]
    fn every_shipped_profile_is_embedded_and_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".toml")
                    .map(str::to_string)
            })
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = PROFILES.iter().map(|(n, _)| *n).collect();
        assert_eq!(embedded, on_disk, "add new profiles to install::PROFILES");
        for (name, text) in PROFILES {
            let p = crate::profile::parse(text, name)
                .unwrap_or_else(|e| panic!("shipped profile {name}: {e}"));
            assert_eq!(p.name, *name);
        }
    }

    #[test]
    fn the_default_config_has_every_key_at_its_default() {
        // As written: nothing set, so the defaults.
        let c = Config::parse(DEFAULT_CONFIG, "agentd.toml").unwrap();
        assert_eq!(Config { path: None, ..c }, Config::default());
        // Every `#key = value` line uncommented: still exactly the defaults.
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&uncommented, "agentd.toml").unwrap();
        assert_eq!(Config { path: None, ..c }, Config::default());
        // And every key config.rs documents is there.
        let doc = include_str!("config.rs");
        let block = doc
            .split("//! ```toml")
            .nth(1)
            .and_then(|b| b.split("//! ```").next())
            .expect("config.rs documents its keys in a toml block");
        let mut section = String::new();
        for line in block.lines() {
            let line = line.trim_start_matches("//!").trim();
            if let Some(s) = line.strip_prefix('[').and_then(|s| s.split(']').next()) {
                section = s.to_string();
                continue;
            }
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if section.starts_with("host_budgets") {
                continue;
            }
            let shown = uncommented
                .split(&format!("[{section}]\n"))
                .nth(1)
                .map(|rest| rest.split("\n[").next().unwrap_or(""))
                .is_some_and(|s| {
                    s.lines().any(|l| {
                        l.trim_start_matches(['#', ' '])
                            .starts_with(&format!("{key} = "))
                    })
                });
            assert!(shown, "{section}.{key} is not in DEFAULT_CONFIG");
        }
    }

    #[test]
    fn paths_go_under_the_prefix() {
        assert_eq!(
            under(Path::new("/tmp/p"), BINARY),
            Path::new("/tmp/p/usr/local/bin/agentd")
        );
        assert_eq!(under(Path::new("/"), BINARY), Path::new(BINARY));
        assert_eq!(absolute_prefix(Path::new("//")).unwrap(), Path::new("/"));
    }

    #[test]
    fn an_existing_file_is_kept_and_an_equal_one_is_unchanged() {
        let dir = std::env::temp_dir().join(format!("agentd-install-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let f = dir.join("a/b.toml");
        assert_eq!(write_if_absent(&f, "x = 1\n", "t").unwrap().0, Status::Done);
        assert_eq!(
            write_if_absent(&f, "x = 1\n", "t").unwrap().0,
            Status::Unchanged
        );
        fs::write(&f, "x = 2\n").unwrap();
        assert_eq!(write_if_absent(&f, "x = 1\n", "t").unwrap().0, Status::Kept);
        assert_eq!(fs::read_to_string(&f).unwrap(), "x = 2\n");
        let bin = dir.join("bin/tool");
        let src =
            || -> io::Result<Box<dyn io::Read>> { Ok(Box::new(io::Cursor::new(b"abc".to_vec()))) };
        assert_eq!(install_file(&bin, 0o755, src, "t").unwrap().0, Status::Done);
        assert_eq!(
            install_file(&bin, 0o755, src, "t").unwrap().0,
            Status::Unchanged
        );
        assert_eq!(fs::metadata(&bin).unwrap().mode() & 0o7777, 0o755);
        fs::write(&bin, "abd").unwrap();
        assert_eq!(install_file(&bin, 0o755, src, "t").unwrap().0, Status::Done);
        assert_eq!(fs::read(&bin).unwrap(), b"abc");
        fs::remove_dir_all(&dir).unwrap();
    }
}
