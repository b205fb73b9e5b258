//! Rate budgets, charged on every system call entry of an agent that has budgets.
//! Userspace twin: agentd/src/budgets.rs. The bucket arithmetic is explained in
//! agentd-common/src/budgets.rs.
//!
//! `sys_enter` is attached only while some agent has a budget; for any other task it
//! returns after one cgroup-ancestor comparison (the first thing `agent::current` does).

use agentd_common::{
    agent::AGENT_FLAG_BUDGETS,
    budgets::{
        ACTION_KILL, ACTION_THROTTLE, Bucket, BudgetKey, CLASS_SYSCALLS, ClassKey,
        EVENT_INTERVAL_NS, MAX_BUDGETS, MAX_CLASS_ENTRIES, MAX_CLASSES, THROTTLE_EVENT_INTERVAL_NS,
    },
    events::{BudgetEvent, EVENT_BUDGET, HOOK_SYS_ENTER, VERDICT_DENY},
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::{bpf_ktime_get_ns, bpf_send_signal},
    macros::{map, raw_tracepoint},
    maps::HashMap,
    programs::RawTracePointContext,
};

use crate::{agent, events};

const SIGKILL: u32 = 9;

/// Map `BUDGETS`.
/// - key: [`BudgetKey`] (agent id, class id); value: [`Bucket`] (rate, burst, state)
/// - size: [`MAX_BUDGETS`] buckets over all agents
/// - owner: the daemon creates and removes buckets (agent start, policy change, exit);
///   `sys_enter` charges them in place.
///
/// Not preallocated: an element the daemon replaces (a policy change) is freed only after
/// the programs that may hold it have finished, never reused for another key under them.
#[map]
static BUDGETS: HashMap<BudgetKey, Bucket> =
    HashMap::with_max_entries(MAX_BUDGETS, BPF_F_NO_PREALLOC);

/// Map `BUDGET_CLASSES`.
/// - key: [`ClassKey`] (agent id, x86-64 system call number); value: `u32` bit set of the
///   agent's class ids that contain the call (class 0, every call, is never listed)
/// - size: [`MAX_CLASS_ENTRIES`] entries over all agents
/// - owner: the daemon writes (agent start, policy change) and removes (exit); programs read.
#[map]
static BUDGET_CLASSES: HashMap<ClassKey, u32> = HashMap::with_max_entries(MAX_CLASS_ENTRIES, 0);

/// Adds 1 atomically (a BPF atomic add: `lock *(u64 *)` in the verifier's listing).
/// core's atomic types have no read-modify-write for the BPF target, hence the intrinsic.
#[inline(always)]
unsafe fn add(counter: *mut u64) {
    // SAFETY: the caller passes a valid, aligned pointer into a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, 1,
        );
    }
}

/// Takes one token of `class` for agent `id`. Returns `false` when the bucket is empty.
#[inline(always)]
fn charge(id: u64, class: u32, nr: u32, now: u64) -> bool {
    let key = BudgetKey {
        agent: id,
        class,
        _pad: 0,
    };
    let Some(b) = BUDGETS.get_ptr_mut(key) else {
        return true;
    };
    // SAFETY: the element stays valid while the program runs (the map is not preallocated:
    // a replaced element is freed only after an RCU grace period); fields are plain words,
    // and the two counters are only changed with atomic adds or the reset below.
    unsafe {
        // base_ns before consumed (volatile: in this order), the reverse of the reset's
        // writes, so that the new base is never paired with the old count.
        let base = core::ptr::read_volatile(&raw const (*b).base_ns);
        let consumed = core::ptr::read_volatile(&raw const (*b).consumed);
        // At most 10^12 µs (277 hours): × MAX_RATE stays within u64.
        let elapsed_us = (now.saturating_sub(base) / 1000).min(1_000_000_000_000);
        let refill = elapsed_us * (*b).rate / 1_000_000;
        if refill > consumed {
            // Full again: start over from now (a racing add may be lost: one token).
            core::ptr::write_volatile(&raw mut (*b).consumed, 1);
            core::ptr::write_volatile(&raw mut (*b).base_ns, now);
            return true;
        }
        // Every call is charged, also past the allowance: the debt is what a throttled
        // agent waits for (the daemon reads it when it freezes the agent).
        add(&raw mut (*b).consumed);
        let allowance = (*b).burst + refill;
        if consumed < allowance {
            return true;
        }
        add(&raw mut (*b).exhausted);
        let action = (*b).action;
        let interval = if action == ACTION_THROTTLE {
            THROTTLE_EVENT_INTERVAL_NS
        } else {
            EVENT_INTERVAL_NS
        };
        if action == ACTION_KILL || now.saturating_sub((*b).last_event_ns) >= interval {
            (*b).last_event_ns = now;
            report(id, &*b, class, nr, consumed + 1 - allowance);
        }
        if action == ACTION_KILL {
            bpf_send_signal(SIGKILL);
        }
        // ACTION_THROTTLE: the daemon freezes the agent when the event arrives.
    }
    false
}

#[inline(always)]
fn report(id: u64, b: &Bucket, class: u32, nr: u32, deficit: u64) {
    let ev = BudgetEvent {
        header: events::header(EVENT_BUDGET, HOOK_SYS_ENTER, id, VERDICT_DENY),
        class,
        action: b.action,
        rate: b.rate,
        burst: b.burst,
        deficit,
        exhausted: b.exhausted,
        syscall: nr,
        _pad: 0,
    };
    events::emit(&ev);
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    // sys_enter(struct pt_regs *regs, long id)
    let agent::Subject::Agent { id, entry } = agent::current() else {
        return 0;
    };
    if entry.flags & AGENT_FLAG_BUDGETS == 0 {
        return 0;
    }
    let nr: u64 = ctx.arg(1);
    let nr = nr as u32;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    charge(id, CLASS_SYSCALLS, nr, now);
    // SAFETY: the value is copied at once.
    let classes = unsafe {
        BUDGET_CLASSES.get(ClassKey {
            agent: id,
            nr,
            _pad: 0,
        })
    }
    .copied()
    .unwrap_or(0);
    let mut class = 1;
    while class < MAX_CLASSES {
        if classes & (1 << class) != 0 {
            charge(id, class, nr, now);
        }
        class += 1;
    }
    0
}
