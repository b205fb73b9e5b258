//! Rate budgets: token buckets per agent and class, kept and charged in the kernel
//! (kernel: agentd-ebpf/src/budgets.rs, userspace: agentd/src/budgets.rs).
//!
//! A class is a set of system calls. `syscalls` is every system call; the others are
//! listed per agent in `BUDGET_CLASSES` by x86-64 system call number, so a profile can
//! define a class without new kernel code. Two classes are not system calls:
//! `egress_bytes` (bytes of the agent's outgoing packets, charged by `skb_egress`) and
//! `denials` (the circuit breaker: every refusal of the agent, in milli-tokens).
//!
//! Who charges a bucket depends on its action: `deny` buckets are charged by the hooks
//! that can refuse the operation (`task_alloc` for `processes` where BPF LSM works,
//! `connect*`/`sendmsg*` for `connects`, `skb_egress` for `egress_bytes`); a refused
//! operation gives its tokens back. Every other action is charged on system call entry
//! (`sys_enter`), except `egress_bytes` and `denials`, charged where they happen.
//!
//! Host-wide budgets use the agent id [`HOST`]: every agent's operation is charged to its
//! own bucket and then to the host's.
//!
//! The bucket is lock-free (tracing programs may not take BPF spin locks): `consumed`
//! only grows, by atomic adds; the tokens available are `burst + rate × (now − base) −
//! consumed`, at most `burst`. When the bucket is full again, `base` and `consumed` are
//! reset together (`consumed` first, then `base_ns`; read in the other order, so a reader
//! never pairs the new base with the old count). Two CPUs that charge the last token at
//! once may both pass: the bound holds within one operation per CPU. The call that finds
//! the bucket empty still runs (the hook cannot refuse it); `kill` stops the process
//! right after, `throttle` freezes the agent when the daemon has the event.

use crate::pod;

/// Map `BUDGETS`: key = [`BudgetKey`], value = [`Bucket`].
pub const BUDGETS_MAP: &str = "BUDGETS";
/// Capacity of `BUDGETS`.
pub const MAX_BUDGETS: u32 = 4096;
/// Map `BUDGET_CLASSES`: key = [`ClassKey`], value = `u32` bit set of class ids.
pub const BUDGET_CLASSES_MAP: &str = "BUDGET_CLASSES";
/// Capacity of `BUDGET_CLASSES`.
pub const MAX_CLASS_ENTRIES: u32 = 65536;

/// Class id of `syscalls`: every system call (not listed in `BUDGET_CLASSES`).
pub const CLASS_SYSCALLS: u32 = 0;
/// Class id of `processes` (fork, vfork, clone, clone3, execve, execveat).
pub const CLASS_PROCESSES: u32 = 1;
/// Class id of `opens` (open, openat, openat2, creat).
pub const CLASS_OPENS: u32 = 2;
/// Class id of `connects` (connect, sendto, sendmsg, sendmmsg; under `deny`: connects and
/// datagrams sent with an address, as the socket hooks see them).
pub const CLASS_CONNECTS: u32 = 3;
/// Class id of `egress_bytes`: bytes of IP packets sent (not a system call class).
pub const CLASS_EGRESS_BYTES: u32 = 4;
/// Class id of the circuit breaker's denial count (not a system call class): each refusal
/// takes [`DENIAL_TOKENS`].
pub const CLASS_DENIALS: u32 = 5;
/// First class id of a profile's own classes.
pub const CLASS_FIRST_CUSTOM: u32 = 6;
/// Class ids are `0..MAX_CLASSES`.
pub const MAX_CLASSES: u32 = 16;
/// Tokens one denial takes from the breaker's bucket: a breaker of N denials in T
/// seconds is a bucket of burst `N × DENIAL_TOKENS` and rate `N × DENIAL_TOKENS / T`,
/// which keeps the rate an integer for any T up to N × 1000 seconds.
pub const DENIAL_TOKENS: u64 = 1000;

/// Agent id of the host-wide buckets (no cgroup has this id).
pub const HOST: u64 = u64::MAX;

/// `Bucket::action`: only report (at most one event per second per bucket).
pub const ACTION_LOG: u32 = 1;
/// `Bucket::action`: report; the daemon freezes the agent until the bucket has refilled.
pub const ACTION_THROTTLE: u32 = 2;
/// `Bucket::action`: SIGKILL to the process at once (from `sys_enter`); the daemon then
/// kills the agent.
pub const ACTION_KILL: u32 = 3;
/// `Bucket::action`: the operation fails with EAGAIN (a packet is dropped).
pub const ACTION_DENY: u32 = 4;
/// `Bucket::action` (circuit breakers): the daemon freezes the agent and leaves it frozen.
pub const ACTION_FREEZE: u32 = 5;

/// Nanoseconds between two events of one `log` or `deny` bucket (kill always reports).
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;
/// Nanoseconds between two events of one `throttle` bucket: each event may be the one that
/// freezes the agent again after a thaw, so they cannot be a second apart.
pub const THROTTLE_EVENT_INTERVAL_NS: u64 = 10_000_000;
/// Highest rate a budget may have (per second): keeps `rate × µs elapsed` within `u64`.
/// The elapsed time is counted up to 10^12 µs (277 hours): a bucket in debt for longer
/// than that stops refilling (its agent stays throttled or is killed on its next call).
pub const MAX_RATE: u64 = 10_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BudgetKey {
    /// Agent id (cgroup id).
    pub agent: u64,
    pub class: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens per second.
    pub rate: u64,
    /// Most tokens the bucket holds.
    pub burst: u64,
    /// `bpf_ktime_get_ns()` when the bucket was last full.
    pub base_ns: u64,
    /// Tokens taken since `base_ns` (atomic adds).
    pub consumed: u64,
    /// Times an operation found the bucket empty (atomic adds).
    pub exhausted: u64,
    /// When the last event of this bucket was sent.
    pub last_event_ns: u64,
    /// `ACTION_*`.
    pub action: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassKey {
    /// Agent id (cgroup id).
    pub agent: u64,
    /// x86-64 system call number.
    pub nr: u32,
    pub _pad: u32,
}

pod!(BudgetKey, Bucket, ClassKey);
