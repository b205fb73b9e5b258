//! Rate budgets and circuit breakers. Userspace twin: agentd/src/budgets.rs. The bucket
//! arithmetic, and which hook charges which bucket, is explained in
//! agentd-common/src/budgets.rs.
//!
//! - `sys_enter` charges every bucket whose action is not `deny`, by system call number,
//!   and kills (SIGKILL) any task of an agent whose kill switch was thrown. It is attached
//!   only while some agent has such a budget or was killed; for any other task it returns
//!   after one cgroup-ancestor comparison (the first thing `agent::current` does).
//! - `task_alloc` (BPF LSM) refuses a process creation with EAGAIN when the agent's
//!   `processes` budget is `deny` and empty.
//! - The socket hooks (network.rs) charge `connects` and `egress_bytes` through [`take`],
//!   and every hook that refuses something charges the breaker through [`denied`].

use agentd_common::{
    agent::{AGENT_FLAG_BUDGETS, AGENT_FLAG_KILLED},
    budgets::{
        ACTION_DENY, ACTION_KILL, ACTION_THROTTLE, Bucket, BudgetKey, CLASS_DENIALS,
        CLASS_PROCESSES, CLASS_SYSCALLS, ClassKey, DENIAL_TOKENS, EVENT_INTERVAL_NS, HOST,
        MAX_BUDGETS, MAX_CLASS_ENTRIES, MAX_CLASSES, THROTTLE_EVENT_INTERVAL_NS,
    },
    events::{
        BudgetEvent, EVENT_BUDGET, HOOK_SKB_EGRESS, HOOK_SYS_ENTER, HOOK_TASK_ALLOC, VERDICT_DENY,
    },
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::{bpf_ktime_get_ns, bpf_send_signal},
    macros::{lsm, map, raw_tracepoint},
    maps::HashMap,
    programs::{LsmContext, RawTracePointContext},
};

use crate::{agent, events};

const SIGKILL: u32 = 9;
const EAGAIN: i32 = 11;
const CLONE_THREAD: u64 = 0x10000;

/// Map `BUDGETS`.
/// - key: [`BudgetKey`] (agent id or [`HOST`], class id); value: [`Bucket`] (rate, burst,
///   state)
/// - size: [`MAX_BUDGETS`] buckets over all agents and the host
/// - owner: the daemon creates and removes buckets (agent start, policy change, exit,
///   daemon start); programs charge them in place.
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

/// Adds `n` atomically (a BPF atomic add: `lock *(u64 *)` in the verifier's listing).
/// core's atomic types have no read-modify-write for the BPF target, hence the intrinsic.
#[inline(always)]
unsafe fn add(counter: *mut u64, n: u64) {
    // SAFETY: the caller passes a valid, aligned pointer into a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        );
    }
}

/// Which buckets a hook charges.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Role {
    /// System call entry: cannot refuse, so every action but `deny`.
    Counting,
    /// A hook that can refuse the operation: `deny` buckets only.
    Refusing,
    /// The only place the class is charged (`egress_bytes`, `denials`): any action.
    Only,
}

/// One charge: `amount` tokens from bucket `key` at time `now`, by a hook of `role`.
#[derive(Clone, Copy)]
pub struct Charge {
    pub key: BudgetKey,
    pub amount: u64,
    pub now: u64,
    pub role: Role,
    /// Out: tokens missing for the operation (when the bucket was empty).
    pub deficit: u64,
}

/// Bit of [`charge`]'s result: the caller sends the bucket's event (built where the hook
/// is known, so that a packet hook never contains a task helper call).
const REPORT: u32 = 0x100;

/// Takes the tokens of `c`. Returns the bucket's action when it was empty;
/// `None` when the operation may go on (or there is no such bucket, or `role` does not
/// charge it). A `deny` bucket gets the tokens of a refused operation back.
#[inline(always)]
pub fn take(
    key: BudgetKey,
    who: u64,
    amount: u64,
    role: Role,
    hook: u32,
    nr: u32,
    now: u64,
) -> Option<u32> {
    let mut c = Charge {
        key,
        amount,
        now,
        role,
        deficit: 0,
    };
    let r = charge(&mut c);
    if r == 0 {
        return None;
    }
    if r & REPORT != 0 {
        report(key, who, hook, nr, c.deficit);
    }
    Some(r & !REPORT)
}

/// [`take`] as a BPF subprogram (one copy of the bucket code, verified per call site):
/// 0, or the action of an empty bucket (with [`REPORT`] when its event is due).
#[inline(never)]
fn charge(c: &mut Charge) -> u32 {
    let Charge {
        key,
        amount,
        now,
        role,
        ..
    } = *c;
    let Some(b) = BUDGETS.get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: the element stays valid while the program runs (the map is not preallocated:
    // a replaced element is freed only after an RCU grace period); fields are plain words,
    // and the two counters are only changed with atomic adds or the reset below.
    unsafe {
        let action = (*b).action;
        let mine = match role {
            Role::Counting => action != ACTION_DENY,
            Role::Refusing => action == ACTION_DENY,
            Role::Only => true,
        };
        if !mine {
            return 0;
        }
        // base_ns before consumed (volatile: in this order), the reverse of the reset's
        // writes, so that the new base is never paired with the old count.
        let base = core::ptr::read_volatile(&raw const (*b).base_ns);
        let consumed = core::ptr::read_volatile(&raw const (*b).consumed);
        // At most 10^12 µs (277 hours): × MAX_RATE stays within u64.
        let elapsed_us = (now.saturating_sub(base) / 1000).min(1_000_000_000_000);
        let refill = elapsed_us * (*b).rate / 1_000_000;
        // Above 2^62: a refund (see `take_both`) raced a reset and wrapped below zero;
        // start over rather than refuse for good.
        if refill > consumed || consumed > 1 << 62 {
            // Full again: start over from now (a racing add may be lost: one operation).
            core::ptr::write_volatile(&raw mut (*b).consumed, amount);
            core::ptr::write_volatile(&raw mut (*b).base_ns, now);
            return 0;
        }
        // An operation that finds one token left goes through whatever its size (one
        // packet over). Past the allowance, a `deny` operation is refused and takes
        // nothing; any other is charged all the same: the debt is what a throttled agent
        // waits for (the daemon reads it when it freezes the agent).
        let allowance = (*b).burst + refill;
        if consumed < allowance {
            add(&raw mut (*b).consumed, amount);
            return 0;
        }
        if action != ACTION_DENY {
            add(&raw mut (*b).consumed, amount);
        }
        add(&raw mut (*b).exhausted, 1);
        let interval = if action == ACTION_THROTTLE {
            THROTTLE_EVENT_INTERVAL_NS
        } else {
            EVENT_INTERVAL_NS
        };
        if action == ACTION_KILL || now.saturating_sub((*b).last_event_ns) >= interval {
            (*b).last_event_ns = now;
            c.deficit = consumed + amount - allowance;
            return action | REPORT;
        }
        action
    }
}

/// Who refused an operation in [`take_both`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    No,
    /// The agent's own budget: a refusal of the agent (counts for its breaker).
    Own,
    /// The host-wide budget, which all agents share: not held against this agent.
    Host,
}

/// Takes `amount` from the agent's bucket of `class`, then (unless the agent's refused
/// it) from the host's; when the host's refuses, the agent's tokens are given back.
#[inline(always)]
pub fn take_both(who: u64, class: u32, amount: u64, role: Role, hook: u32, now: u64) -> Refused {
    let own = BudgetKey {
        agent: who,
        class,
        _pad: 0,
    };
    let mine = take(own, who, amount, role, hook, 0, now);
    if mine == Some(ACTION_DENY) {
        return Refused::Own;
    }
    let host = BudgetKey {
        agent: HOST,
        class,
        _pad: 0,
    };
    if take(host, who, amount, Role::Only, hook, 0, now) != Some(ACTION_DENY) {
        return Refused::No;
    }
    if mine.is_none()
        && let Some(b) = BUDGETS.get_ptr_mut(own)
    {
        // SAFETY: as in charge(). Only a `deny` bucket admitted it (others are charged
        // whatever happens), and a reset racing this refund is healed by charge().
        unsafe {
            if (*b).action == ACTION_DENY {
                add(&raw mut (*b).consumed, amount.wrapping_neg());
            }
        }
    }
    Refused::Host
}

/// Counts one refusal of agent `id` at `hook` against its circuit breaker, if it has one.
/// The daemon acts on the breaker's event (kill or freeze).
#[inline(always)]
pub fn denied(id: u64, hook: u32) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = BudgetKey {
        agent: id,
        class: CLASS_DENIALS,
        _pad: 0,
    };
    take(key, id, DENIAL_TOKENS, Role::Only, hook, 0, now);
}

/// Sends the bucket's event, built in place in the ring buffer (the caller's stack is
/// shared with the hook that called [`charge`]: at most 512 bytes together).
#[inline(always)]
fn report(key: BudgetKey, who: u64, hook: u32, nr: u32, deficit: u64) {
    // SAFETY: copied at once (the element stays valid while the program runs).
    let Some(b) = (unsafe { BUDGETS.get(key) }).copied() else {
        return;
    };
    let Some(mut entry) = events::reserve::<BudgetEvent>() else {
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: a reserved record; every field is written before it is submitted.
    unsafe {
        events::write_header(
            &raw mut (*ev).header,
            EVENT_BUDGET,
            hook,
            who,
            VERDICT_DENY,
            hook == HOOK_SKB_EGRESS,
        );
        (*ev).class = key.class;
        (*ev).action = b.action;
        (*ev).rate = b.rate;
        (*ev).burst = b.burst;
        (*ev).deficit = deficit;
        (*ev).exhausted = b.exhausted;
        (*ev).syscall = nr;
        (*ev).host = (key.agent == HOST) as u32;
    }
    entry.submit(0);
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    // sys_enter(struct pt_regs *regs, long id)
    let agent::Subject::Agent { id, entry } = agent::current() else {
        return 0;
    };
    if entry.flags & AGENT_FLAG_KILLED != 0 {
        // The kill switch was thrown: no system call of this agent runs any more.
        // SAFETY: signals the current task.
        unsafe { bpf_send_signal(SIGKILL) };
        return 0;
    }
    if entry.flags & AGENT_FLAG_BUDGETS == 0 {
        return 0;
    }
    let nr: u64 = ctx.arg(1);
    let nr = nr as u32;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = |class: u32| BudgetKey {
        agent: id,
        class,
        _pad: 0,
    };
    let mut kill = take(
        key(CLASS_SYSCALLS),
        id,
        1,
        Role::Counting,
        HOOK_SYS_ENTER,
        nr,
        now,
    ) == Some(ACTION_KILL);
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
        if classes & (1 << class) != 0
            && take(key(class), id, 1, Role::Counting, HOOK_SYS_ENTER, nr, now) == Some(ACTION_KILL)
        {
            kill = true;
        }
        class += 1;
    }
    if kill {
        // SAFETY: signals the current task; the daemon then kills the whole agent.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    // ACTION_THROTTLE: the daemon freezes the agent when the event arrives.
    0
}

#[lsm(hook = "task_alloc")]
pub fn task_alloc(ctx: LsmContext) -> i32 {
    // task_alloc(struct task_struct *task, unsigned long clone_flags); current is the parent.
    let clone_flags: u64 = ctx.arg(1);
    if clone_flags & CLONE_THREAD != 0 {
        // A thread is not a process.
        return 0;
    }
    let agent::Subject::Agent { id, .. } = agent::current() else {
        // Outside: not ours. Unregistered: its creations are refused elsewhere (every
        // program fails closed for it), and a process here cannot run an exec anyway.
        return 0;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match take_both(id, CLASS_PROCESSES, 1, Role::Refusing, HOOK_TASK_ALLOC, now) {
        Refused::No => 0,
        Refused::Own => {
            denied(id, HOOK_TASK_ALLOC);
            -EAGAIN
        }
        Refused::Host => -EAGAIN,
    }
}
