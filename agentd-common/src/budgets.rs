//! Rate budgets: token buckets per agent and class, kept and charged in the kernel
//! (kernel: agentd-ebpf/src/budgets.rs, userspace: agentd/src/budgets.rs).
//!
//! A class is a set of system calls. `syscalls` is every system call; the others are
//! listed per agent in `BUDGET_CLASSES` by x86-64 system call number, so a profile can
//! define a class without new kernel code.
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
/// Most classes one agent can have budgets for (class ids `0..MAX_CLASSES`).
pub const MAX_CLASSES: u32 = 16;

/// `Bucket::action`: only report (at most one event per second per bucket).
pub const ACTION_LOG: u32 = 1;
/// `Bucket::action`: report; the daemon freezes the agent until the bucket has refilled.
pub const ACTION_THROTTLE: u32 = 2;
/// `Bucket::action`: SIGKILL to the process at once; the daemon then kills the agent.
pub const ACTION_KILL: u32 = 3;

/// Nanoseconds between two events of one `log` bucket (kill always reports).
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
