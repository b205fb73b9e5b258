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

/// `EventHeader::kind`: a [`NetEvent`] follows.
pub const EVENT_NET: u32 = 1;
/// `EventHeader::kind`: a [`FileEvent`] follows.
pub const EVENT_FILE: u32 = 2;

/// `EventHeader::hook`: the kernel hook that decided.
pub const HOOK_CONNECT4: u32 = 1;
pub const HOOK_FILE_OPEN: u32 = 2;
pub const HOOK_CONNECT6: u32 = 3;
pub const HOOK_SENDMSG4: u32 = 4;
pub const HOOK_SENDMSG6: u32 = 5;
pub const HOOK_SOCK_CREATE: u32 = 6;
pub const HOOK_SKB_EGRESS: u32 = 7;

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

/// A file access decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileEvent {
    pub header: EventHeader,
    /// `files::ACCESS_*` bits that were requested.
    pub access: u32,
    /// Kernel device number of the file (`s_dev`).
    pub dev: u32,
    pub ino: u64,
}

pod!(EventHeader, NetEvent, FileEvent);
