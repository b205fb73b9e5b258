//! Agent identity.
//!
//! An agent is a cgroup v2 directory directly below agentd's agent root. Kernel programs
//! find the agent of the current task as its ancestor cgroup one level below the root, so
//! sub-cgroups an agent makes still count as that agent. The agent's id in every map is
//! that cgroup's id (the cgroup directory's inode number).

use crate::pod;

/// Map `AGENTS`: key = agent cgroup id (`u64`), value = [`AgentEntry`].
pub const AGENTS_MAP: &str = "AGENTS";
/// Capacity of `AGENTS`: the most agents that can run at once.
pub const MAX_AGENTS: u32 = 4096;

/// The agent is in audit mode: would-be denials are reported and allowed.
pub const AGENT_FLAG_AUDIT: u32 = 1 << 0;
/// The kill switch was thrown for this agent: everything it tries is refused.
pub const AGENT_FLAG_KILLED: u32 = 1 << 1;
/// The agent has rate budgets: the `sys_enter` budget program charges it.
pub const AGENT_FLAG_BUDGETS: u32 = 1 << 2;

/// Per-agent state the kernel programs consult before any rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentEntry {
    /// `AGENT_FLAG_*` bits.
    pub flags: u32,
    /// File accesses (`files::ACCESS_*` bits) allowed when no path rule mentions them.
    pub file_default_allow: u32,
    /// Key prefix of this agent's rules in `NET_ALLOW4`, `NET_ALLOW6` and `FILE_RULES`.
    /// A policy change writes the new rules under a fresh id and then changes this one
    /// field, so a program sees either the whole old policy or the whole new one.
    pub policy_id: u64,
    /// The agent's own DNS resolver address (IPv4, network byte order): every DNS query
    /// of the agent (port 53, any address) is sent there instead.
    pub dns_addr: [u8; 4],
    /// That resolver's port, host byte order.
    pub dns_port: u16,
    pub _pad: u16,
}

pod!(AgentEntry);

/// Names of the read-only globals the loader sets before the programs are verified.
pub mod globals {
    /// `u64`: id of agentd's agent root cgroup.
    pub const AGENT_ROOT_ID: &str = "AGENT_ROOT_ID";
    /// `u32`: level of the agent root cgroup (the cgroup2 root is level 0).
    pub const AGENT_ROOT_LEVEL: &str = "AGENT_ROOT_LEVEL";
    /// `u16`: the port of the daemon's metrics listener (0: none), which no agent may bind.
    pub const METRICS_PORT: &str = "METRICS_PORT";
}
