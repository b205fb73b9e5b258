//! Processes: the system calls an agent's seccomp filter refuses (kernel:
//! agentd-ebpf/src/process.rs, userspace: agentd/src/process.rs).
//!
//! The launcher's seccomp filter refuses calls with EPERM, which the kernel does not report
//! to anyone (only its rate-limited log). So that each refusal is an event too, the daemon
//! writes the calls an agent's filter refuses into `SYSCALLS_DENIED`, and the `sys_exit`
//! reporter turns a call of that agent that failed with EPERM into a [`SyscallEvent`]
//! (`crate::events`).

/// Map `SYSCALLS_DENIED`: hash, key [`SyscallKey`] (agent, table), value [`SyscallSet`],
/// up to [`MAX_SYSCALLS_DENIED`] entries (two per agent). Owner: the daemon, which writes an
/// agent's entries when it starts it (its filter is fixed from then on) and removes them
/// when it ends. Read by `sys_exit`. Pinned (a restarted daemon's reporter goes on
/// reporting for adopted agents).
pub const SYSCALLS_DENIED_MAP: &str = "SYSCALLS_DENIED";
/// Two tables for each of 4,096 agents (more than `agents.max` allows by default).
pub const MAX_SYSCALLS_DENIED: u32 = 8192;

/// `SyscallKey::arch`: the x86-64 system call table.
pub const ARCH_X86_64: u32 = 0;
/// `SyscallKey::arch`: the i386 table (`int 0x80`, a compat system call).
pub const ARCH_I386: u32 = 1;

/// `thread_info.status` bit of x86 set while a task is in a compat (i386) system call.
pub const TS_COMPAT: u32 = 0x0002;

/// Calls numbered below this fit a [`SyscallSet`] (both tables end below 512).
pub const SYSCALL_SET_CALLS: u32 = 512;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SyscallKey {
    /// The agent (its cgroup id).
    pub agent: u64,
    /// `ARCH_X86_64` or `ARCH_I386`.
    pub arch: u32,
    pub _pad: u32,
}

/// A set of system call numbers of one table: bit `nr % 64` of word `nr / 64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallSet {
    pub bits: [u64; (SYSCALL_SET_CALLS / 64) as usize],
}

impl SyscallSet {
    /// Adds `nr` (ignored if it is beyond the set).
    pub fn insert(&mut self, nr: u32) {
        if nr < SYSCALL_SET_CALLS {
            self.bits[(nr / 64) as usize] |= 1 << (nr % 64);
        }
    }

    pub fn contains(&self, nr: u32) -> bool {
        match self.bits.get((nr / 64) as usize) {
            Some(word) => word & (1 << (nr % 64)) != 0,
            None => false,
        }
    }
}

crate::pod!(SyscallKey, SyscallSet);
