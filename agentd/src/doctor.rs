//! `agentd doctor`: what this host can enforce, found by trying.
//!
//! Each check loads (and where attaching is the question, attaches and detaches) a real
//! program, creates a real map, or makes the real system call; nothing is inferred from
//! kernel version numbers. Doctor creates one temporary cgroup of its own to attach cgroup
//! programs to, and removes it; it leaves no program, map or cgroup behind.

use std::{
    ffi::CString,
    fs::{self, File},
    path::Path,
    process,
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, Lsm, RawTracePoint},
};
use serde::Serialize;

use crate::{
    btf::{self, Btf},
    cgroup::{self, CgroupDir},
    ebpf::{self, AgentRoot, LoadConfig},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Works on this host.
    Ok,
    /// Present in the kernel, but the kernel refuses to let agentd use it.
    Refused,
    /// Not available on this host.
    Missing,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier for scripts.
    pub id: &'static str,
    /// Short human name.
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

/// Which mechanism enforces each area on this host.
#[derive(Debug, Clone, Serialize)]
pub struct Enforcement {
    pub area: &'static str,
    /// Empty when nothing on this host can enforce the area.
    pub enforcers: Vec<String>,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kernel: String,
    pub checks: Vec<Check>,
    pub enforcement: Vec<Enforcement>,
    /// False when agentd cannot contain agents on this host at all.
    pub usable: bool,
}

impl Report {
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    fn ok(&self, id: &str) -> bool {
        self.check(id).is_some_and(|c| c.status == Status::Ok)
    }
}

fn check(id: &'static str, name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        id,
        name,
        status,
        detail: detail.into(),
    }
}

fn errno_of(err: &anyhow::Error) -> Option<i32> {
    err.chain().find_map(|e| {
        e.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .or_else(|| {
                // aya wraps syscall errors; their Display ends with the OS error text.
                let s = e.to_string();
                if s.contains("Operation not permitted") {
                    Some(libc::EPERM)
                } else {
                    None
                }
            })
    })
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs every check.
pub fn run() -> Report {
    let mut checks = Vec::new();

    // cgroup v2, and the cgroup doctor attaches its probes to.
    let mount = cgroup::cgroup2_mount();
    let probe_cgroup = match &mount {
        Ok(m) => {
            checks.push(check(
                "cgroup2",
                "cgroup v2",
                Status::Ok,
                format!("mounted at {}", m.mount_point.display()),
            ));
            match CgroupDir::create(&m.mount_point, &format!("agentd-doctor-{}", process::id())) {
                Ok(dir) => {
                    for (id, name, file) in [
                        ("cgroup_kill", "cgroup.kill", "cgroup.kill"),
                        ("cgroup_freeze", "cgroup.freeze", "cgroup.freeze"),
                    ] {
                        let present = dir.path().join(file).exists();
                        checks.push(check(
                            id,
                            name,
                            if present { Status::Ok } else { Status::Missing },
                            if present {
                                format!("{file} present in a child cgroup")
                            } else {
                                format!("{file} missing in a child cgroup (kernel too old)")
                            },
                        ));
                    }
                    Some(dir)
                }
                Err(e) => {
                    checks.push(check(
                        "cgroup_kill",
                        "cgroup.kill",
                        Status::Missing,
                        format!("could not create a test cgroup: {e:#}"),
                    ));
                    None
                }
            }
        }
        Err(e) => {
            checks.push(check(
                "cgroup2",
                "cgroup v2",
                Status::Missing,
                format!("{e:#}"),
            ));
            None
        }
    };

    // BTF and the struct offsets the file programs need.
    let btf = match Btf::from_kernel() {
        Ok(b) => Some(b),
        Err(e) => {
            checks.push(check("btf", "kernel BTF", Status::Missing, format!("{e}")));
            None
        }
    };
    let offsets = btf.as_ref().map(|b| b.kernel_offsets());
    match &offsets {
        Some(Ok(_)) => checks.push(check(
            "btf",
            "kernel BTF",
            Status::Ok,
            format!("{}; field offsets resolved", btf::VMLINUX),
        )),
        Some(Err(e)) => checks.push(check("btf", "kernel BTF", Status::Missing, format!("{e}"))),
        None => {}
    }

    // The BPF object: maps, including the ring buffer, are created here.
    let root = match (&mount, &probe_cgroup) {
        (Ok(m), Some(dir)) => cgroup::cgroup_level(m, dir.path())
            .ok()
            .map(|level| AgentRoot {
                id: dir.id(),
                level,
            }),
        _ => None,
    };
    let cfg = LoadConfig {
        root: root.unwrap_or(AgentRoot {
            id: u64::MAX,
            level: 0,
        }),
        offsets: offsets.and_then(Result::ok).unwrap_or_default(),
        metrics_port: 0,
    };
    let mut loaded = match ebpf::load(&cfg) {
        Ok(e) => {
            checks.push(check(
                "bpf",
                "bpf() system call",
                Status::Ok,
                "maps and programs can be created",
            ));
            checks.push(check(
                "ring_buffer",
                "BPF ring buffer",
                Status::Ok,
                "created the EVENTS ring buffer",
            ));
            Some(e)
        }
        Err(e) => {
            let status = if errno_of(&e) == Some(libc::EPERM) {
                Status::Refused
            } else {
                Status::Missing
            };
            checks.push(check("bpf", "bpf() system call", status, format!("{e:#}")));
            checks.push(check(
                "ring_buffer",
                "BPF ring buffer",
                Status::Missing,
                "could not create agentd's maps",
            ));
            None
        }
    };

    if let Some(ebpf_obj) = loaded.as_mut() {
        let cgroup_file = probe_cgroup
            .as_ref()
            .and_then(|d| File::open(d.path()).ok());
        let cg = cgroup_file.as_ref();
        let sock_addr = crate::network::SOCK_ADDR_PROGRAMS;
        checks.push(try_programs(
            ebpf_obj,
            cg,
            ("cgroup_sock_addr", "cgroup sock_addr"),
            CgroupKind::SockAddr,
            sock_addr,
        ));
        checks.push(try_programs(
            ebpf_obj,
            cg,
            ("cgroup_sock", "cgroup sock (socket create)"),
            CgroupKind::Sock,
            &["sock_create"],
        ));
        checks.push(try_programs(
            ebpf_obj,
            cg,
            ("cgroup_skb", "cgroup_skb egress"),
            CgroupKind::SkbEgress,
            &["skb_egress"],
        ));
        checks.push(probe_raw_tp(ebpf_obj));
        checks.push(probe_send_signal(ebpf_obj));
        checks.push(probe_lsm(ebpf_obj, btf.as_ref()));
    }
    drop(loaded);
    if let Some(dir) = probe_cgroup
        && let Err(e) = dir.remove()
    {
        eprintln!("agentd doctor: {e:#}");
    }

    checks.push(probe_landlock());
    checks.push(probe_seccomp());
    checks.push(probe_bpffs());

    let mut report = Report {
        kernel: kernel_release(),
        checks,
        enforcement: Vec::new(),
        usable: false,
    };
    report.enforcement = plan(&report);
    report.usable = report.ok("cgroup2")
        && report.ok("bpf")
        && report.ok("cgroup_sock_addr")
        && report.ok("cgroup_kill")
        && (report.ok("bpf_lsm") || report.ok("landlock"));
    report
}

/// Kinds of cgroup program doctor attaches.
#[derive(Clone, Copy)]
enum CgroupKind {
    SockAddr,
    Sock,
    SkbEgress,
}

/// Loads one of agentd's programs, attaches it to the doctor's cgroup and detaches it.
fn attach_detach(ebpf: &mut Ebpf, name: &str, kind: CgroupKind, cgroup: &File) -> Result<()> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("no {name} program"))?;
    match kind {
        CgroupKind::SockAddr => {
            let p: &mut aya::programs::CgroupSockAddr = prog.try_into()?;
            p.load()?;
            let link = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.detach(link)?;
        }
        CgroupKind::Sock => {
            let p: &mut CgroupSock = prog.try_into()?;
            p.load()?;
            let link = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.detach(link)?;
        }
        CgroupKind::SkbEgress => {
            let p: &mut CgroupSkb = prog.try_into()?;
            p.load()?;
            let link = p.attach(
                cgroup,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )?;
            p.detach(link)?;
        }
    }
    Ok(())
}

/// Tries agentd's own programs of one kind: a verifier that rejects one on this kernel
/// shows up here, before any agent depends on it.
fn try_programs(
    ebpf: &mut Ebpf,
    cgroup: Option<&File>,
    (id, name): (&'static str, &'static str),
    kind: CgroupKind,
    programs: &[&str],
) -> Check {
    let Some(cgroup) = cgroup else {
        return check(id, name, Status::Missing, "no cgroup to attach to");
    };
    for p in programs {
        if let Err(e) = attach_detach(ebpf, p, kind, cgroup) {
            return check(id, name, Status::Missing, format!("{p}: {e:#}"));
        }
    }
    check(
        id,
        name,
        Status::Ok,
        format!("{} loaded and attached to a cgroup", programs.join(", ")),
    )
}

fn probe_raw_tp(ebpf: &mut Ebpf) -> Check {
    let name = "raw tracepoint sys_enter";
    let result = (|| -> Result<()> {
        let prog: &mut RawTracePoint = ebpf
            .program_mut("probe_raw_tp")
            .context("no probe_raw_tp")?
            .try_into()?;
        prog.load()?;
        let link = prog.attach("sys_enter")?;
        prog.detach(link)?;
        Ok(())
    })();
    match result {
        Ok(()) => check(
            "raw_tracepoint",
            name,
            Status::Ok,
            "loaded and attached to sys_enter",
        ),
        Err(e) => check("raw_tracepoint", name, Status::Missing, format!("{e:#}")),
    }
}

fn probe_send_signal(ebpf: &mut Ebpf) -> Check {
    let name = "bpf_send_signal helper";
    let result = (|| -> Result<()> {
        let prog: &mut RawTracePoint = ebpf
            .program_mut("probe_send_signal")
            .context("no probe_send_signal")?
            .try_into()?;
        prog.load()?;
        Ok(())
    })();
    match result {
        Ok(()) => check(
            "send_signal",
            name,
            Status::Ok,
            "a program calling it passed the verifier",
        ),
        Err(e) => check("send_signal", name, Status::Missing, format!("{e:#}")),
    }
}

fn active_lsms() -> Option<String> {
    fs::read_to_string("/sys/kernel/security/lsm")
        .ok()
        .map(|s| s.trim().to_string())
}

/// True if a BPF LSM program loads and attaches on this host (tried, then removed).
pub fn bpf_lsm_usable() -> bool {
    let Ok(btf) = aya::Btf::from_sys_fs() else {
        return false;
    };
    let cfg = LoadConfig {
        root: AgentRoot {
            id: u64::MAX,
            level: 0,
        },
        offsets: Default::default(),
        metrics_port: 0,
    };
    let Ok(mut obj) = ebpf::load(&cfg) else {
        return false;
    };
    let prog: Option<&mut Lsm> = obj.program_mut("probe_lsm").and_then(|p| p.try_into().ok());
    prog.is_some_and(|p| p.load("file_open", &btf).is_ok() && p.attach().is_ok())
}

fn probe_lsm(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Check {
    let name = "BPF LSM";
    let compiled_in = btf.is_some_and(|b| b.has_function("bpf_lsm_file_open"));
    if !compiled_in {
        return check(
            "bpf_lsm",
            name,
            Status::Missing,
            "not compiled in (no bpf_lsm_file_open in kernel BTF; CONFIG_BPF_LSM is off)",
        );
    }
    let lsms = active_lsms();
    let listed = match &lsms {
        Some(list) if list.split(',').any(|l| l == "bpf") => {
            format!("compiled in, 'bpf' in the active LSM list ({list})")
        }
        Some(list) => format!("compiled in, but 'bpf' is not in the active LSM list ({list})"),
        None => "compiled in (active LSM list unknown: securityfs is not mounted)".to_string(),
    };
    let aya_btf = match aya::Btf::from_sys_fs() {
        Ok(b) => b,
        Err(e) => {
            return check(
                "bpf_lsm",
                name,
                Status::Missing,
                format!("{listed}; kernel BTF unreadable: {e}"),
            );
        }
    };
    let prog: &mut Lsm = match ebpf.program_mut("probe_lsm").map(TryInto::try_into) {
        Some(Ok(p)) => p,
        _ => {
            return check(
                "bpf_lsm",
                name,
                Status::Missing,
                "no probe_lsm program in the object",
            );
        }
    };
    if let Err(e) = prog.load("file_open", &aya_btf) {
        let e = anyhow::Error::from(e);
        let why = if errno_of(&e) == Some(libc::EPERM) {
            "the kernel refuses to load BPF LSM programs (EPERM before the verifier runs)"
                .to_string()
        } else {
            format!("loading a BPF LSM program failed: {e:#}")
        };
        return check(
            "bpf_lsm",
            name,
            Status::Refused,
            format!("{listed}; but {why}"),
        );
    }
    match prog.attach() {
        Ok(link) => {
            let _ = prog.detach(link);
        }
        Err(e) => {
            return check(
                "bpf_lsm",
                name,
                Status::Refused,
                format!("{listed}; programs load but attaching fails: {e}"),
            );
        }
    }
    // The real file_open program must pass the verifier with this kernel's offsets too.
    if let Some(b) = btf
        && let Err(e) = b.kernel_offsets()
    {
        return check("bpf_lsm", name, Status::Missing, format!("{listed}; {e}"));
    }
    let real: Result<()> = (|| {
        let prog: &mut Lsm = ebpf
            .program_mut("file_open")
            .context("no file_open")?
            .try_into()?;
        prog.load("file_open", &aya_btf)?;
        Ok(())
    })();
    match real {
        Ok(()) => check(
            "bpf_lsm",
            name,
            Status::Ok,
            format!("{listed}; agentd's file_open program loads"),
        ),
        Err(e) => check(
            "bpf_lsm",
            name,
            Status::Missing,
            format!("{listed}; agentd's file_open program was rejected: {e:#}"),
        ),
    }
}

/// The Landlock ABI version, or the errno of landlock_create_ruleset.
pub fn landlock_abi() -> Result<i64, i32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_ulong = 1;
    // SAFETY: with a null attribute pointer and size 0 this only queries the ABI version.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

fn probe_landlock() -> Check {
    match landlock_abi() {
        Ok(abi) => check(
            "landlock",
            "Landlock",
            Status::Ok,
            format!("ABI version {abi}"),
        ),
        Err(libc::EOPNOTSUPP) => check(
            "landlock",
            "Landlock",
            Status::Refused,
            "compiled in but disabled at boot (not in lsm=)",
        ),
        Err(libc::ENOSYS) => check(
            "landlock",
            "Landlock",
            Status::Missing,
            "not compiled in (CONFIG_SECURITY_LANDLOCK)",
        ),
        Err(e) => check(
            "landlock",
            "Landlock",
            Status::Missing,
            format!("landlock_create_ruleset failed: errno {e}"),
        ),
    }
}

fn probe_seccomp() -> Check {
    const SECCOMP_GET_ACTION_AVAIL: libc::c_uint = 2;
    let action: u32 = libc::SECCOMP_RET_ERRNO;
    // SAFETY: queries whether an action is supported; the pointer is valid for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0u32,
            &action as *const u32,
        )
    };
    if r == 0 {
        check(
            "seccomp",
            "seccomp filters",
            Status::Ok,
            "SECCOMP_RET_ERRNO available",
        )
    } else {
        check(
            "seccomp",
            "seccomp filters",
            Status::Missing,
            format!("seccomp() failed: {}", std::io::Error::last_os_error()),
        )
    }
}

fn probe_bpffs() -> Check {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let path = CString::new("/sys/fs/bpf").expect("no NUL");
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    if r == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        check("bpffs", "bpffs", Status::Ok, "mounted at /sys/fs/bpf")
    } else if Path::new("/sys/fs/bpf").is_dir() {
        check(
            "bpffs",
            "bpffs",
            Status::Missing,
            "not mounted at /sys/fs/bpf; the daemon mounts it (mount -t bpf bpf /sys/fs/bpf)",
        )
    } else {
        check(
            "bpffs",
            "bpffs",
            Status::Missing,
            "/sys/fs/bpf does not exist",
        )
    }
}

fn plan(r: &Report) -> Vec<Enforcement> {
    let lsm = r.ok("bpf_lsm");
    let landlock = r
        .check("landlock")
        .filter(|c| c.status == Status::Ok)
        .map(|c| c.detail.clone());
    let lsm_note = match r.check("bpf_lsm") {
        Some(c) if c.status == Status::Refused => "BPF LSM is compiled in but refused on this host",
        Some(c) if c.status == Status::Missing => "BPF LSM is not usable on this host",
        _ => "",
    };
    let mut files = Vec::new();
    if lsm {
        files.push("BPF LSM".to_string());
    }
    if let Some(abi) = &landlock {
        files.push(format!("Landlock ({abi})"));
    }
    let files_note = if lsm && landlock.is_some() {
        "BPF LSM judges every access and reports every denial; Landlock, applied at launch, also covers paths created later"
            .to_string()
    } else if lsm {
        "paths judged in the kernel per access; events for every denial; rules on paths that do not exist yet are not enforced"
            .to_string()
    } else if landlock.is_some() {
        format!(
            "{lsm_note}: the launcher applies the file rules with Landlock before exec instead; chmod and chown are not checked \
             (agents that need it are refused unless --degraded-ok)"
        )
    } else {
        "no file enforcer: agents cannot be confined to their file rules".to_string()
    };
    let net_ok = r.ok("cgroup_sock_addr");
    let mut network = Vec::new();
    if net_ok {
        network.push("cgroup sock_addr".to_string());
    }
    if r.ok("cgroup_sock") {
        network.push("cgroup sock".to_string());
    }
    if r.ok("cgroup_skb") {
        network.push("cgroup_skb egress".to_string());
    }
    let mut budgets = Vec::new();
    if r.ok("raw_tracepoint") {
        budgets.push("raw tracepoint sys_enter".to_string());
    }
    if r.ok("send_signal") {
        budgets.push("bpf_send_signal".to_string());
    }
    if r.ok("cgroup_freeze") {
        budgets.push("cgroup.freeze".to_string());
    }
    let budgets_note = if lsm {
        "deny: processes at LSM task_alloc, connects at the socket hooks, egress_bytes in skb egress; kill, throttle and log everywhere".to_string()
    } else {
        format!(
            "{lsm_note}: processes deny through a seccomp notifier the daemon answers; connects and egress_bytes deny in the kernel; kill, throttle and log everywhere"
        )
    };
    // Other processes (ptrace, /proc files, signals): BPF LSM hooks, or Landlock's scopes.
    let abi: Option<u32> = landlock
        .as_deref()
        .and_then(|d| d.rsplit(' ').next())
        .and_then(|n| n.parse().ok());
    let (processes, processes_note) = if lsm {
        (
            vec!["BPF LSM ptrace_access_check + task_kill".to_string()],
            "no tracing, reading the /proc files of, or signals to processes outside the agent; a record for each".to_string(),
        )
    } else {
        match abi {
            Some(abi) if abi >= 6 => (
                vec![format!("Landlock scopes (ABI version {abi})")],
                "no tracing, /proc files or signals outside the agent; a refused signal has no record (Landlock gives agentd no hook), ptrace and /proc reads do".to_string(),
            ),
            Some(abi) => (
                vec![format!("Landlock (ABI version {abi})")],
                "no tracing or /proc files outside the agent; signals to processes outside it are NOT refused \
                 (needs Landlock ABI 6 or BPF LSM): only its unprivileged uid keeps it from signalling others"
                    .to_string(),
            ),
            None => (
                Vec::new(),
                "nothing keeps an agent from processes outside it but its unprivileged uid and no capabilities".to_string(),
            ),
        }
    };
    let syscalls = if r.ok("seccomp") {
        vec!["seccomp filter".to_string()]
    } else {
        Vec::new()
    };
    let syscalls_note = if r.ok("raw_tracepoint") {
        "refused calls fail with EPERM (x86-64, i386, x32); each refusal is recorded through the raw tracepoint sys_exit \
         (x32 refusals are not)"
    } else {
        "refused calls fail with EPERM; without raw tracepoints the refusals are not recorded"
    };
    let kill = if r.ok("cgroup_kill") {
        vec!["cgroup.kill".to_string()]
    } else {
        Vec::new()
    };
    vec![
        Enforcement {
            area: "files",
            enforcers: files,
            note: files_note,
        },
        Enforcement {
            area: "network",
            note: if net_ok {
                "egress allowlist decided per connect and datagram".into()
            } else {
                "no egress enforcement".into()
            },
            enforcers: network,
        },
        Enforcement {
            area: "budgets",
            enforcers: budgets,
            note: budgets_note,
        },
        Enforcement {
            area: "processes",
            enforcers: processes,
            note: processes_note,
        },
        Enforcement {
            area: "syscalls",
            enforcers: syscalls,
            note: syscalls_note.to_string(),
        },
        Enforcement {
            area: "kill",
            note: if kill.is_empty() {
                "no cgroup.kill: the kill switch cannot be atomic".into()
            } else {
                "whole agent cgroup killed at once".into()
            },
            enforcers: kill,
        },
    ]
}

/// The human table.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "agentd doctor: what this host can enforce (kernel {})\n\n",
        r.kernel
    );
    let width = r
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(10)
        .max(10);
    out.push_str(&format!(
        "{:<width$}  {:<8}  {}\n",
        "CHECK", "STATUS", "DETAIL"
    ));
    for c in &r.checks {
        let status = match c.status {
            Status::Ok => "ok",
            Status::Refused => "REFUSED",
            Status::Missing => "MISSING",
        };
        out.push_str(&format!(
            "{:<width$}  {:<8}  {}\n",
            c.name, status, c.detail
        ));
    }
    out.push_str("\nEnforcement on this host:\n");
    for e in &r.enforcement {
        let by = if e.enforcers.is_empty() {
            "NONE".to_string()
        } else {
            e.enforcers.join(" + ")
        };
        out.push_str(&format!("  {:<9} {by}\n  {:<9} ({})\n", e.area, "", e.note));
    }
    out.push_str(if r.usable {
        "\nagentd can contain agents on this host.\n"
    } else {
        "\nagentd CANNOT contain agents on this host: see the checks marked MISSING or REFUSED.\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(lsm: Status, landlock: Option<u32>) -> Report {
        let mut checks = vec![
            check("bpf_lsm", "BPF LSM", lsm, ""),
            check("seccomp", "seccomp filters", Status::Ok, ""),
            check("raw_tracepoint", "raw tracepoint sys_enter", Status::Ok, ""),
        ];
        if let Some(abi) = landlock {
            checks.push(check(
                "landlock",
                "Landlock",
                Status::Ok,
                format!("ABI version {abi}"),
            ));
        }
        Report {
            kernel: "test".into(),
            checks,
            enforcement: Vec::new(),
            usable: true,
        }
    }

    fn processes(r: &Report) -> Enforcement {
        plan(r).into_iter().find(|e| e.area == "processes").unwrap()
    }

    #[test]
    fn what_keeps_agents_from_other_processes_is_said_per_kernel() {
        let p = processes(&report(Status::Ok, Some(7)));
        assert_eq!(p.enforcers, ["BPF LSM ptrace_access_check + task_kill"]);
        let p = processes(&report(Status::Refused, Some(7)));
        assert_eq!(p.enforcers, ["Landlock scopes (ABI version 7)"]);
        // Before ABI 6 Landlock does not scope signals: said, not left out.
        let p = processes(&report(Status::Refused, Some(5)));
        assert!(
            p.note
                .contains("signals to processes outside it are NOT refused"),
            "{}",
            p.note
        );
        let p = processes(&report(Status::Refused, None));
        assert!(p.enforcers.is_empty());
    }
}
