//! Records from the kernel programs. Kernel twin: agentd-ebpf/src/events.rs.
//!
//! Every record says what was tried, by whom, and what was decided, in words a person can
//! read without the source: `connect 203.0.113.7:443/tcp denied (agent a1, pid 7, comm
//! curl, hook connect4)`.

use std::{
    fmt,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use agentd_common::{
    events::*,
    files::{ACCESS_EXEC, ACCESS_READ, ACCESS_WRITE, EVENT_COMPONENT_LEN},
    network::{PROTO_TCP, PROTO_UDP},
};
use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};

/// A decoded kernel record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Net(NetEvent),
    File(Box<FileEvent>),
    Proc(ProcEvent),
    Budget(BudgetEvent),
    Syscall(SyscallEvent),
}

impl Event {
    pub fn header(&self) -> &EventHeader {
        match self {
            Event::Net(e) => &e.header,
            Event::File(e) => &e.header,
            Event::Proc(e) => &e.header,
            Event::Budget(e) => &e.header,
            Event::Syscall(e) => &e.header,
        }
    }
}

/// Reads a `T` from the start of `bytes` if it is long enough.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is a repr(C) plain-old-data record; unaligned read.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring buffer record; `None` for a record of unknown kind or short length.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let header: EventHeader = read(bytes)?;
    match header.kind {
        EVENT_NET => read(bytes).map(Event::Net),
        EVENT_FILE => read(bytes).map(|f| Event::File(Box::new(f))),
        EVENT_PROC => read(bytes).map(Event::Proc),
        EVENT_BUDGET => read(bytes).map(Event::Budget),
        EVENT_SYSCALL => read(bytes).map(Event::Syscall),
        _ => None,
    }
}

fn cstr(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

pub fn comm(h: &EventHeader) -> String {
    cstr(&h.comm)
}

pub fn verdict(v: u32) -> &'static str {
    match v {
        VERDICT_DENY => "denied",
        VERDICT_AUDIT => "would be denied (audit)",
        _ => "decided",
    }
}

pub fn hook(h: u32) -> &'static str {
    match h {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_SOCK_CREATE => "sock_create",
        HOOK_SKB_EGRESS => "skb_egress",
        HOOK_FILE_OPEN => "file_open",
        HOOK_BPRM_CHECK => "bprm_check_security",
        HOOK_PATH_UNLINK => "path_unlink",
        HOOK_PATH_MKDIR => "path_mkdir",
        HOOK_PATH_RMDIR => "path_rmdir",
        HOOK_PATH_MKNOD => "path_mknod",
        HOOK_PATH_TRUNCATE => "path_truncate",
        HOOK_PATH_SYMLINK => "path_symlink",
        HOOK_PATH_LINK => "path_link",
        HOOK_PATH_RENAME => "path_rename",
        HOOK_PATH_CHMOD => "path_chmod",
        HOOK_PATH_CHOWN => "path_chown",
        HOOK_SYSCALL_EXIT => "sys_exit",
        HOOK_PTRACE => "ptrace_access_check",
        HOOK_TASK_KILL => "task_kill",
        HOOK_SYS_ENTER => "sys_enter",
        HOOK_TASK_ALLOC => "task_alloc",
        HOOK_SECCOMP_NOTIFY => "seccomp_notify",
        HOOK_BIND4 => "bind4",
        HOOK_BIND6 => "bind6",
        HOOK_SECCOMP => "seccomp",
        HOOK_BPF => "bpf",
        _ => "unknown hook",
    }
}

pub fn access_names(access: u32) -> String {
    let mut names = Vec::new();
    for (bit, name) in [
        (ACCESS_READ, "read"),
        (ACCESS_WRITE, "write"),
        (ACCESS_EXEC, "exec"),
    ] {
        if access & bit != 0 {
            names.push(name);
        }
    }
    names.join("+")
}

/// The destination of a network record.
pub fn net_addr(e: &NetEvent) -> IpAddr {
    if e.family == 10 {
        IpAddr::V6(Ipv6Addr::from(e.addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]))
    }
}

/// The path of a file record: rebuilt from the names the kernel walked (LSM hooks), or as
/// the agent gave it to the system call (the Landlock path's `sys_exit` reports).
pub fn file_path(e: &FileEvent) -> String {
    match e.path_kind {
        PATH_COMPONENTS => {
            let names: Vec<String> = e
                .path
                .chunks(EVENT_COMPONENT_LEN)
                .take(e.depth as usize)
                .map(cstr)
                // The slot of a mount's root stays empty: its name is the mount point's.
                .filter(|name| !name.is_empty())
                .collect();
            let mut parts: Vec<&str> = names.iter().rev().map(String::as_str).collect();
            if e.complete == 0 {
                parts.insert(0, "…");
            }
            format!("/{}", parts.join("/"))
        }
        PATH_AS_GIVEN => cstr(&e.path),
        _ => String::new(),
    }
}

/// Resolves a path given to a system call by process `pid` the way the kernel did, as far
/// as the process can still be seen: relative to its working directory, with
/// `/proc/self` meaning that process. `None` if it cannot be resolved any more.
pub fn resolve_given(pid: u32, given: &str) -> Option<PathBuf> {
    // Agents share the host's root (they cannot chroot), so a path through a process's
    // root directory needs no live process.
    if let Some(rest) = strip_proc_root(given) {
        return resolve_given(pid, &format!("/{rest}"));
    }
    let base = if given.starts_with('/') {
        PathBuf::from(given.replacen("/proc/self/", &format!("/proc/{pid}/"), 1))
    } else {
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()?
            .join(given)
    };
    std::fs::canonicalize(&base).ok().or_else(|| {
        // A file that does not exist (a denied create): resolve its directory.
        let parent = std::fs::canonicalize(base.parent()?).ok()?;
        Some(parent.join(base.file_name()?))
    })
}

/// `rest` of `/proc/self/root/rest` or `/proc/<pid>/root/rest`.
fn strip_proc_root(given: &str) -> Option<&str> {
    let after = given.strip_prefix("/proc/")?;
    let (who, rest) = after.split_once('/')?;
    if who != "self" && !who.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rest = rest.strip_prefix("root")?;
    if rest.is_empty() {
        return Some("");
    }
    rest.strip_prefix('/')
}

fn syscall_name(nr: u32) -> &'static str {
    match nr {
        2 => "open",
        85 => "creat",
        59 => "execve",
        87 => "unlink",
        82 => "rename",
        86 => "link",
        83 => "mkdir",
        84 => "rmdir",
        76 => "truncate",
        90 => "chmod",
        92 => "chown",
        94 => "lchown",
        88 => "symlink",
        257 => "openat",
        437 => "openat2",
        322 => "execveat",
        263 => "unlinkat",
        264 => "renameat",
        316 => "renameat2",
        265 => "linkat",
        258 => "mkdirat",
        268 => "fchmodat",
        452 => "fchmodat2",
        260 => "fchownat",
        266 => "symlinkat",
        _ => "syscall",
    }
}

fn file_verb(e: &FileEvent) -> String {
    match e.header.hook {
        HOOK_FILE_OPEN => format!("open for {}", access_names(e.access)),
        HOOK_BPRM_CHECK => "exec".into(),
        HOOK_PATH_UNLINK => "unlink".into(),
        HOOK_PATH_RMDIR => "rmdir".into(),
        HOOK_PATH_MKDIR => "mkdir in".into(),
        HOOK_PATH_MKNOD => "create in".into(),
        HOOK_PATH_SYMLINK => "symlink in".into(),
        HOOK_PATH_TRUNCATE => "truncate".into(),
        HOOK_PATH_CHMOD => "chmod".into(),
        HOOK_PATH_CHOWN => "chown".into(),
        HOOK_PATH_LINK => "hard-link".into(),
        HOOK_PATH_RENAME => "rename".into(),
        HOOK_SYSCALL_EXIT => syscall_name(e.syscall).into(),
        _ => "access".into(),
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.header();
        match self {
            Event::Net(e) if h.hook == HOOK_SOCK_CREATE => {
                write!(
                    f,
                    "socket(family {}, type {}, protocol {}) {}",
                    e.family,
                    e.sock_type,
                    e.port,
                    verdict(h.verdict)
                )?;
            }
            Event::Net(e) => {
                let proto = match e.protocol {
                    PROTO_TCP => "tcp",
                    PROTO_UDP => "udp",
                    _ => "ip",
                };
                let verb = match h.hook {
                    HOOK_SENDMSG4 | HOOK_SENDMSG6 => "send",
                    HOOK_SKB_EGRESS => "packet",
                    HOOK_BIND4 | HOOK_BIND6 => "bind",
                    _ => "connect",
                };
                let dest = match net_addr(e) {
                    IpAddr::V4(a) => format!("{a}:{}", e.port),
                    IpAddr::V6(a) => format!("[{a}]:{}", e.port),
                };
                write!(f, "{verb} {dest}/{proto} {}", verdict(h.verdict))?;
            }
            Event::File(e) if h.hook == HOOK_SYSCALL_EXIT => {
                write!(
                    f,
                    "{} {} failed with errno {}",
                    file_verb(e),
                    file_path(e),
                    e.errno
                )?;
            }
            Event::File(e) => {
                write!(
                    f,
                    "{} {} {}",
                    file_verb(e),
                    file_path(e),
                    verdict(h.verdict)
                )?;
            }
            Event::Proc(e) => {
                let whose = if e.target_agent == 0 {
                    "outside any agent".to_string()
                } else {
                    format!("of agent {}", e.target_agent)
                };
                if h.hook == HOOK_BPF {
                    if e.signal_or_mode == u32::MAX {
                        write!(
                            f,
                            "a descriptor of a BPF map or program {}",
                            verdict(h.verdict)
                        )?;
                    } else {
                        write!(
                            f,
                            "bpf() command {} {}",
                            e.signal_or_mode,
                            verdict(h.verdict)
                        )?;
                    }
                } else if h.hook == HOOK_TASK_KILL {
                    write!(
                        f,
                        "signal {} to pid {} ({whose}) {}",
                        e.signal_or_mode,
                        e.target_pid,
                        verdict(h.verdict)
                    )?;
                } else {
                    // PTRACE_MODE_READ 0x01, PTRACE_MODE_ATTACH 0x02
                    let what = if e.signal_or_mode & 0x02 != 0 {
                        "ptrace attach to"
                    } else {
                        "read the process files of"
                    };
                    write!(
                        f,
                        "{what} pid {} ({whose}) {}",
                        e.target_pid,
                        verdict(h.verdict)
                    )?;
                }
            }
            Event::Budget(e) => {
                let action = crate::budgets::Action::from_code(e.action).map_or("?", |a| a.name());
                let scope = if e.host != 0 { "host-wide " } else { "" };
                write!(
                    f,
                    "{scope}budget class {} exhausted ({}/s, burst {}; {} times so far)",
                    e.class, e.rate, e.burst, e.exhausted
                )?;
                if h.hook == HOOK_SYS_ENTER {
                    write!(f, " at system call {}", e.syscall)?;
                }
                write!(f, ": {action}")?;
            }
            Event::Syscall(e) => {
                write!(
                    f,
                    "system call {} {} by the seccomp filter",
                    crate::seccomp::describe(e.arch, e.nr),
                    verdict(h.verdict)
                )?;
            }
        }
        write!(
            f,
            " (agent {}, pid {}, comm {}, hook {})",
            h.agent,
            h.pid,
            comm(h),
            hook(h.hook)
        )
    }
}

/// Consumes the `EVENTS` ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    /// Takes the ring buffer out of `ebpf` (only one reader can exist).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf
            .take_map(EVENTS_MAP)
            .context("the EVENTS ring buffer was already taken")?;
        Ok(Self {
            ring: RingBuf::try_from(map)?,
        })
    }

    /// Every record available now, decoded; records of unknown kind are skipped.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(e) = decode(&item) {
                out.push(e);
            }
        }
        out
    }
}

impl std::os::fd::AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// Records the programs dropped because the ring buffer was full, summed over CPUs.
pub fn lost(ebpf: &Ebpf) -> Result<u64> {
    let map = ebpf
        .map(EVENTS_LOST_MAP)
        .context("the object has no EVENTS_LOST map")?;
    let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
    Ok(counts.get(&0, 0)?.iter().sum())
}

/// Turns the programs' debug log (aya-log records) on or off (`agentd debug-log`).
pub fn set_debug_log(ebpf: &mut Ebpf, on: bool) -> Result<()> {
    let map = ebpf
        .map_mut(agentd_common::events::DEBUG_LOG_MAP)
        .context("the object has no DEBUG_LOG map")?;
    let mut flag: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map)?;
    flag.set(0, u32::from(on), 0).context("setting DEBUG_LOG")?;
    Ok(())
}

/// Writes the programs' debug log records to the daemon's log, one line each.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        eprintln!(
            "agentd: kernel {}: {}",
            record.level().as_str().to_lowercase(),
            record.args()
        );
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn header(kind: u32, hook: u32) -> EventHeader {
        let mut comm = [0u8; 16];
        comm[..3].copy_from_slice(b"act");
        EventHeader {
            kind,
            hook,
            agent: 42,
            pid: 7,
            tid: 7,
            comm,
            verdict: VERDICT_DENY,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_and_describes_network_records() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let e = NetEvent {
            header: header(EVENT_NET, HOOK_CONNECT4),
            family: 2,
            port: 4444,
            protocol: PROTO_TCP,
            addr,
            ..Default::default()
        };
        let decoded = decode(&bytes_of(&e)).unwrap();
        assert_eq!(decoded, Event::Net(e));
        assert_eq!(
            decoded.to_string(),
            "connect 127.0.0.1:4444/tcp denied (agent 42, pid 7, comm act, hook connect4)"
        );
        let v6 = NetEvent {
            header: header(EVENT_NET, HOOK_SENDMSG6),
            family: 10,
            port: 53,
            protocol: PROTO_UDP,
            addr: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
            ..Default::default()
        };
        assert!(
            Event::Net(v6)
                .to_string()
                .starts_with("send [2001:db8::1]:53/udp denied")
        );
    }

    #[test]
    fn file_paths_are_rebuilt_from_components() {
        let mut e = FileEvent {
            header: header(EVENT_FILE, HOOK_FILE_OPEN),
            access: ACCESS_READ,
            path_kind: PATH_COMPONENTS,
            ..Default::default()
        };
        // "home" is a mount of its own here: the slot of the mount's root stays empty.
        for (i, name) in ["id_ed25519", ".ssh", "u", "", "home"].iter().enumerate() {
            e.path[i * EVENT_COMPONENT_LEN..i * EVENT_COMPONENT_LEN + name.len()]
                .copy_from_slice(name.as_bytes());
        }
        e.depth = 5;
        e.complete = 1;
        let text = decode(&bytes_of(&e)).unwrap().to_string();
        assert_eq!(
            text,
            "open for read /home/u/.ssh/id_ed25519 denied (agent 42, pid 7, comm act, hook file_open)"
        );
        e.complete = 0;
        assert_eq!(file_path(&e), "/…/home/u/.ssh/id_ed25519");
        let mut given = FileEvent {
            header: header(EVENT_FILE, HOOK_SYSCALL_EXIT),
            path_kind: PATH_AS_GIVEN,
            syscall: 257,
            errno: 13,
            ..Default::default()
        };
        given.path[..11].copy_from_slice(b"/etc/shadow");
        assert!(
            Event::File(Box::new(given))
                .to_string()
                .starts_with("openat /etc/shadow failed with errno 13")
        );
    }

    #[test]
    fn short_or_unknown_records_are_skipped() {
        let e = FileEvent {
            header: EventHeader {
                kind: EVENT_FILE,
                ..Default::default()
            },
            ..Default::default()
        };
        let b = bytes_of(&e);
        assert!(decode(&b[..b.len() - 1]).is_none());
        let unknown = EventHeader {
            kind: 99,
            ..Default::default()
        };
        assert!(decode(&bytes_of(&unknown)).is_none());
        assert!(matches!(decode(&b), Some(Event::File(_))));
    }

    #[test]
    fn given_paths_resolve_like_the_process_saw_them() {
        let me = std::process::id();
        assert_eq!(
            resolve_given(me, "/proc/self/root/etc/hostname"),
            Some(PathBuf::from("/etc/hostname"))
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            resolve_given(me, "Cargo.toml"),
            Some(std::fs::canonicalize(cwd.join("Cargo.toml")).unwrap())
        );
        assert_eq!(resolve_given(me, "/nonexistent-dir/x"), None);
        assert_eq!(
            resolve_given(4_000_000, "/proc/4000000/root/etc/hostname"),
            Some(PathBuf::from("/etc/hostname"))
        );
        assert_eq!(strip_proc_root("/proc/self/rootx/a"), None);
    }
}
