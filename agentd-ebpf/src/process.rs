//! Processes across agent boundaries (BPF LSM). Userspace twin: agentd/src/process.rs.
//!
//! An agent may ptrace, read the /proc files of (environ, mem, maps: the kernel checks
//! those as ptrace access), or signal only processes of its own agent: not the daemon,
//! not the host's processes, not other agents. Where BPF LSM is refused, Landlock's
//! scoping (ptrace, and signals from ABI 6) applies the same rule. These are agentd's own
//! invariants, not a profile's rules: they hold in audit mode too (an agent in audit mode
//! could otherwise kill the daemon or trace it).

use agentd_common::{
    agent::AGENT_FLAG_KILLED,
    events::{EVENT_PROC, HOOK_PTRACE, HOOK_TASK_KILL, ProcEvent, VERDICT_DENY},
};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::{
    agent, events,
    kernel::{offsets, read},
};

const EACCES: i32 = 13;
const EPERM: i32 = 1;

/// Allowed if `target` is in the current task's agent; otherwise reported and refused.
#[inline(always)]
fn judge(hook: u32, target: *const u8, signal_or_mode: u32, errno: i32) -> i32 {
    let (id, entry) = match agent::current() {
        agent::Subject::Outside => return 0,
        agent::Subject::Unregistered { id } => (id, None),
        agent::Subject::Agent { id, entry } => (id, Some(entry)),
    };
    let target_agent = agent::agent_of_task(target);
    let killed = entry.is_some_and(|e| e.flags & AGENT_FLAG_KILLED != 0);
    if entry.is_some() && !killed && target_agent == Some(id) {
        return 0;
    }
    let event = ProcEvent {
        header: events::header(EVENT_PROC, hook, id, VERDICT_DENY),
        target_pid: read::<u32>(target, offsets().task_tgid).unwrap_or(0),
        signal_or_mode,
        target_agent: target_agent.unwrap_or(0),
    };
    events::emit(&event);
    crate::budgets::denied(id, hook);
    -errno
}

#[lsm(hook = "ptrace_access_check")]
pub fn ptrace_access_check(ctx: LsmContext) -> i32 {
    // ptrace_access_check(struct task_struct *child, unsigned int mode)
    let child: *const u8 = ctx.arg(0);
    let mode: u32 = ctx.arg(1);
    judge(HOOK_PTRACE, child, mode, EACCES)
}

#[lsm(hook = "task_kill")]
pub fn task_kill(ctx: LsmContext) -> i32 {
    // task_kill(struct task_struct *p, struct kernel_siginfo *info, int sig, const struct cred *cred)
    let target: *const u8 = ctx.arg(0);
    let sig: i32 = ctx.arg(2);
    if sig == 0 {
        // kill(pid, 0) only asks whether a process exists.
        return 0;
    }
    judge(HOOK_TASK_KILL, target, sig as u32, EPERM)
}
