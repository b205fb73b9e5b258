//! Records for the daemon. Userspace twin: agentd/src/events.rs.

use agentd_common::events::{EVENTS_BYTES, EventHeader};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_ktime_get_ns},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
};

/// Map `EVENTS`.
/// - records: `agentd_common::events::*Event`, each starting with an [`EventHeader`]
/// - size: [`EVENTS_BYTES`] bytes
/// - owner: programs write; the daemon reads and consumes.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Map `EVENTS_LOST`.
/// - key: index 0 only; value: `u64` count of records dropped because `EVENTS` was full
/// - size: 1 entry per CPU
/// - owner: programs increment; the daemon reads (sums over CPUs) and reports.
#[map]
static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Map `DEBUG_LOG`.
/// - key: index 0 only; value: `u32`, 1 while the debug log is on, else 0
/// - size: 1 entry
/// - owner: the daemon writes (`agentd debug-log on|off`); programs read. Off by default:
///   a program then pays one array lookup at the points where it could log.
#[map]
static DEBUG_LOG: Array<u32> = Array::with_max_entries(1, 0);

/// True while `agentd debug-log on`: the programs then write aya-log records.
#[inline(always)]
pub fn debug_log_on() -> bool {
    DEBUG_LOG.get(0).is_some_and(|v| *v != 0)
}

/// A header for the current task.
#[inline(always)]
pub fn header(kind: u32, hook: u32, agent: u64, verdict: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind,
        hook,
        agent,
        // SAFETY: no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
        verdict,
        _pad: 0,
    }
}

/// Writes a header in place (into a reserved record), without a copy on the stack. For a
/// decision taken on a packet (`packet`: cgroup_skb), where the current task is not the
/// packet's sender and kernels before 6.18 give no task helpers, pid, tid and comm stay
/// zero; the agent comes from the packet's socket.
///
/// # Safety
/// `h` must point at writable memory for an [`EventHeader`].
#[inline(always)]
pub unsafe fn write_header(
    h: *mut EventHeader,
    kind: u32,
    hook: u32,
    agent: u64,
    verdict: u32,
    packet: bool,
) {
    // SAFETY: the caller's promise; helpers with no preconditions.
    unsafe {
        (*h).kind = kind;
        (*h).hook = hook;
        (*h).agent = agent;
        (*h).ktime_ns = bpf_ktime_get_ns();
        (*h).verdict = verdict;
        (*h)._pad = 0;
        (*h).comm = [0; 16];
        if packet {
            (*h).pid = 0;
            (*h).tid = 0;
        } else {
            let pid_tgid = bpf_get_current_pid_tgid();
            (*h).pid = (pid_tgid >> 32) as u32;
            (*h).tid = pid_tgid as u32;
            aya_ebpf::helpers::generated::bpf_get_current_comm((&raw mut (*h).comm).cast(), 16);
        }
    }
}

/// Counts a record that did not fit.
#[inline(always)]
fn lost() {
    if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *lost += 1 };
    }
}

/// Reserves room for a record to be filled in place (records too big for the stack), or
/// counts it as lost.
#[inline(always)]
pub fn reserve<T: 'static>() -> Option<RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        lost();
    }
    entry
}

/// Sends `record` to the daemon, or counts it as lost.
#[inline(always)]
pub fn emit<T>(record: &T) {
    if EVENTS.output::<T>(record, 0).is_err() {
        lost();
    }
}
