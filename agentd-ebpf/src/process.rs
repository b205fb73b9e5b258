//! Processes across agent boundaries (BPF LSM). Userspace twin: agentd/src/process.rs.
//!
//! An agent may ptrace, read the /proc files of (environ, mem, maps: the kernel checks
//! those as ptrace access), or signal only processes of its own agent: not the daemon,
//! not the host's processes, not other agents. Where BPF LSM is refused, Landlock's
//! scoping (ptrace, and signals from ABI 6) applies the same rule. These are agentd's own
//! invariants, not a profile's rules: they hold in audit mode too (an agent in audit mode
//! could otherwise kill the daemon or trace it).
//!
//! Also here: which system calls an agent's seccomp filter refuses (`SYSCALLS_DENIED`), so
//! that the `sys_exit` reporter can report each refusal (see [`seccomp_refused`]).

use agentd_common::{
    agent::AGENT_FLAG_KILLED,
    events::{
        EVENT_PROC, EVENT_SYSCALL, HOOK_BPF, HOOK_PTRACE, HOOK_SECCOMP, HOOK_TASK_KILL, ProcEvent,
        SyscallEvent, VERDICT_DENY,
    },
    process::{ARCH_I386, ARCH_X86_64, MAX_SYSCALLS_DENIED, SyscallKey, SyscallSet, TS_COMPAT},
};
use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{lsm, map},
    maps::HashMap,
    programs::LsmContext,
};

use crate::{
    agent, events,
    kernel::{offsets, read},
};

const EACCES: i32 = 13;
const EPERM: i32 = 1;

/// Map `SYSCALLS_DENIED` (see `agentd_common::process`).
/// - key: [`SyscallKey`] (agent, table); value: [`SyscallSet`], the calls its filter refuses
/// - size: [`MAX_SYSCALLS_DENIED`] entries (two per agent)
/// - owner: the daemon writes an agent's refused calls at its launch and removes them at its
///   end; `sys_exit` reads.
#[map]
static SYSCALLS_DENIED: HashMap<SyscallKey, SyscallSet> =
    HashMap::with_max_entries(MAX_SYSCALLS_DENIED, 0);

/// Reports a system call of agent `id` that returned EPERM if its seccomp filter refuses
/// that call (in the table the task called it through); returns whether it did.
#[inline(always)]
pub fn seccomp_refused(id: u64, nr: u64) -> bool {
    // SAFETY: the helper returns the current task, read below with bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let status = read::<u32>(task, offsets().task_ti_status).unwrap_or(0);
    let arch = if status & TS_COMPAT != 0 {
        ARCH_I386
    } else {
        ARCH_X86_64
    };
    let key = SyscallKey {
        agent: id,
        arch,
        _pad: 0,
    };
    // SAFETY: a plain lookup; the value is read at once.
    let refused = unsafe { SYSCALLS_DENIED.get(key) }.is_some_and(|set| set.contains(nr as u32));
    if !refused {
        return false;
    }
    events::emit(&SyscallEvent {
        header: events::header(EVENT_SYSCALL, HOOK_SECCOMP, id, VERDICT_DENY),
        nr: nr as u32,
        arch,
    });
    true
}

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

/// Refuses an agent (or an unregistered task below the root) anything of BPF: agentd's
/// maps, programs and links are its own. (agentd's seccomp filter already refuses `bpf()`
/// to agents; these hooks hold if a filter did not.) Returns 0 outside agents.
#[inline(always)]
fn no_bpf(what: u32) -> i32 {
    let id = match agent::current() {
        agent::Subject::Outside => return 0,
        agent::Subject::Unregistered { id } => id,
        agent::Subject::Agent { id, .. } => id,
    };
    events::emit(&ProcEvent {
        header: events::header(EVENT_PROC, HOOK_BPF, id, VERDICT_DENY),
        target_pid: 0,
        signal_or_mode: what,
        target_agent: 0,
    });
    crate::budgets::denied(id, HOOK_BPF);
    -EPERM
}

#[lsm(hook = "bpf")]
pub fn bpf(ctx: LsmContext) -> i32 {
    // bpf(int cmd, union bpf_attr *attr, unsigned int size[, bool kernel])
    let cmd: u32 = ctx.arg(0);
    no_bpf(cmd)
}

#[lsm(hook = "bpf_map")]
pub fn bpf_map(_ctx: LsmContext) -> i32 {
    // bpf_map(struct bpf_map *map, fmode_t fmode): a descriptor of a map is made.
    no_bpf(u32::MAX)
}

#[lsm(hook = "bpf_prog")]
pub fn bpf_prog(_ctx: LsmContext) -> i32 {
    // bpf_prog(struct bpf_prog *prog): a descriptor of a program is made.
    no_bpf(u32::MAX)
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
