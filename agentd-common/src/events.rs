//! Event records sent by the kernel programs to the daemon (kernel:
//! agentd-ebpf/src/events.rs, userspace: agentd/src/events.rs).
//!
//! Every record starts with an [`EventHeader`]; its `kind` says which record follows.
//! Records travel on the `EVENTS` ring buffer. A record that does not fit is counted in
//! `EVENTS_LOST`, so a loss is never silent.

use crate::pod;

/// Map `EVENTS`: ring buffer of records that start with [`EventHeader`].
pub const EVENTS_MAP: &str = "EVENTS";
/// Size of `EVENTS` in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Map `EVENTS_LOST`: per-CPU array of one `u64`, records dropped because `EVENTS` was full.
pub const EVENTS_LOST_MAP: &str = "EVENTS_LOST";
/// Map `DEBUG_LOG`: array of one `u32`, 1 while the programs' debug log (aya-log) is on
/// (`agentd debug-log on`).
pub const DEBUG_LOG_MAP: &str = "DEBUG_LOG";

/// `EventHeader::kind`: a [`NetEvent`] follows.
pub const EVENT_NET: u32 = 1;
/// `EventHeader::kind`: a [`FileEvent`] follows.
pub const EVENT_FILE: u32 = 2;
/// `EventHeader::kind`: a [`ProcEvent`] follows.
pub const EVENT_PROC: u32 = 3;
/// `EventHeader::kind`: a [`BudgetEvent`] follows.
pub const EVENT_BUDGET: u32 = 4;
/// `EventHeader::kind`: a [`SyscallEvent`] follows.
pub const EVENT_SYSCALL: u32 = 5;

/// `EventHeader::hook`: the kernel hook that decided.
pub const HOOK_CONNECT4: u32 = 1;
pub const HOOK_FILE_OPEN: u32 = 2;
pub const HOOK_CONNECT6: u32 = 3;
pub const HOOK_SENDMSG4: u32 = 4;
pub const HOOK_SENDMSG6: u32 = 5;
pub const HOOK_SOCK_CREATE: u32 = 6;
pub const HOOK_SKB_EGRESS: u32 = 7;
pub const HOOK_BPRM_CHECK: u32 = 8;
pub const HOOK_PATH_UNLINK: u32 = 9;
pub const HOOK_PATH_MKDIR: u32 = 10;
pub const HOOK_PATH_RMDIR: u32 = 11;
pub const HOOK_PATH_MKNOD: u32 = 12;
pub const HOOK_PATH_TRUNCATE: u32 = 13;
pub const HOOK_PATH_SYMLINK: u32 = 14;
pub const HOOK_PATH_LINK: u32 = 15;
pub const HOOK_PATH_RENAME: u32 = 16;
pub const HOOK_PATH_CHMOD: u32 = 17;
pub const HOOK_PATH_CHOWN: u32 = 18;
/// A file system call of an agent that failed with EACCES or EPERM (the Landlock path,
/// where the kernel gives no hook of its own: see `FileEvent::syscall`).
pub const HOOK_SYSCALL_EXIT: u32 = 19;
pub const HOOK_PTRACE: u32 = 20;
pub const HOOK_TASK_KILL: u32 = 21;
/// A rate budget was found empty on system call entry (`budgets`).
pub const HOOK_SYS_ENTER: u32 = 22;
/// A process creation (BPF LSM `task_alloc`, `budgets`).
pub const HOOK_TASK_ALLOC: u32 = 23;
/// A process creation answered by the daemon (seccomp user notification, `budgets`).
pub const HOOK_SECCOMP_NOTIFY: u32 = 24;
/// cgroup `bind4`/`bind6`: an agent binding agentd's resolver addresses or metrics port.
pub const HOOK_BIND4: u32 = 25;
pub const HOOK_BIND6: u32 = 26;
/// A system call the agent's seccomp filter refused (seen at `sys_exit`: see
/// `crate::process`).
pub const HOOK_SECCOMP: u32 = 27;
/// BPF LSM `bpf`, `bpf_map`, `bpf_prog`: an agent reaching for BPF (a `bpf()` command, or a
/// descriptor of a map or program, such as agentd's pinned ones). Recorded as a
/// [`ProcEvent`] whose `signal_or_mode` is the `bpf()` command (`u32::MAX` for a map or
/// program descriptor) and `target_pid` 0.
pub const HOOK_BPF: u32 = 28;

/// `EventHeader::verdict`: the operation was refused.
pub const VERDICT_DENY: u32 = 1;
/// `EventHeader::verdict`: the operation would have been refused, but the agent is in
/// audit mode.
pub const VERDICT_AUDIT: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub hook: u32,
    /// Agent id (its cgroup id); 0 for a task directly in the agent root.
    pub agent: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the decision was taken.
    pub ktime_ns: u64,
    /// Thread group id (the process id userspace sees).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub comm: [u8; 16],
    pub verdict: u32,
    pub _pad: u32,
}

/// A network decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetEvent {
    pub header: EventHeader,
    /// AF_INET or AF_INET6 (for HOOK_SOCK_CREATE: the family of the refused socket).
    pub family: u16,
    /// Destination port, host byte order (0 for HOOK_SOCK_CREATE).
    pub port: u16,
    /// `network::PROTO_*` bit (0 when neither TCP nor UDP).
    pub protocol: u8,
    pub _pad: u8,
    /// Socket type (SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, ...) where known.
    pub sock_type: u16,
    /// Destination address, network byte order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
}

/// `FileEvent::path_kind`: `path` holds up to `EVENT_PATH_COMPONENTS` names of
/// `EVENT_COMPONENT_LEN` bytes (NUL-padded), the file's own name first, then its parents
/// up to the root of the mount tree, one slot per step up; `depth` of them are valid. The
/// slot of a step across a mount point is empty (a mount's root takes the name of the
/// directory it is mounted on).
pub const PATH_COMPONENTS: u32 = 1;
/// `FileEvent::path_kind`: `path` holds the path the agent passed to the system call,
/// NUL-terminated (relative paths are relative to its working directory).
pub const PATH_AS_GIVEN: u32 = 2;

/// A file access decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileEvent {
    pub header: EventHeader,
    /// `files::ACCESS_*` bits that were refused.
    pub access: u32,
    /// Kernel device number and inode of the file whose rules decided (for a creation:
    /// its directory's, as the new entry has no inode yet); 0 when unknown.
    pub dev: u32,
    pub ino: u64,
    /// `PATH_COMPONENTS` or `PATH_AS_GIVEN`.
    pub path_kind: u32,
    /// Valid components (`PATH_COMPONENTS`); 1 + the number of levels above them when the
    /// walk did not reach the root within the components carried is `complete == 0`.
    pub depth: u32,
    /// 1 if `path` reaches the root (nothing was cut off).
    pub complete: u32,
    /// For `HOOK_SYSCALL_EXIT`: the x86-64 system call number, and the errno it returned.
    pub syscall: u32,
    pub errno: u32,
    pub _pad: u32,
    pub path: [u8; crate::files::EVENT_PATH_BYTES],
}

impl Default for FileEvent {
    fn default() -> Self {
        FileEvent {
            header: EventHeader::default(),
            access: 0,
            dev: 0,
            ino: 0,
            path_kind: 0,
            depth: 0,
            complete: 0,
            syscall: 0,
            errno: 0,
            _pad: 0,
            path: [0; crate::files::EVENT_PATH_BYTES],
        }
    }
}

/// An agent reaching for a process outside itself: ptrace (also reading another process's
/// /proc files such as environ or mem) or a signal.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    pub header: EventHeader,
    /// The target process (thread group id).
    pub target_pid: u32,
    /// HOOK_TASK_KILL: the signal; HOOK_PTRACE: the ptrace access mode bits.
    pub signal_or_mode: u32,
    /// The target's agent id, 0 if it is not in an agent.
    pub target_agent: u64,
}

/// A rate budget found empty (verdict: `VERDICT_DENY`, whatever the action). The header's
/// hook is where it was charged (`HOOK_SYS_ENTER`, `HOOK_TASK_ALLOC`, a socket hook, or
/// `HOOK_SKB_EGRESS` for `egress_bytes`); the breaker's bucket reports the hook of the
/// denial that tripped it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetEvent {
    pub header: EventHeader,
    /// `budgets` class id and `budgets::ACTION_*`.
    pub class: u32,
    pub action: u32,
    /// The bucket's rate (per second) and burst.
    pub rate: u64,
    pub burst: u64,
    /// Tokens missing for the next operation: 1 + what was taken beyond the allowance.
    pub deficit: u64,
    /// Times the bucket was found empty so far.
    pub exhausted: u64,
    /// x86-64 system call number that found it empty (`HOOK_SYS_ENTER` only).
    pub syscall: u32,
    /// 1 when the bucket is the host-wide one (`budgets::HOST`), 0 for the agent's own.
    pub host: u32,
}

/// A system call refused by the agent's seccomp filter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallEvent {
    pub header: EventHeader,
    /// The call's number in `arch`'s table (`process::ARCH_*`).
    pub nr: u32,
    pub arch: u32,
}

pod!(
    EventHeader,
    NetEvent,
    FileEvent,
    ProcEvent,
    BudgetEvent,
    SyscallEvent
);
