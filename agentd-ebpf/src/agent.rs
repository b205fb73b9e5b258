//! Who is an agent. Userspace twin: agentd/src/agent.rs (registration in `AGENTS`).

use agentd_common::agent::{AgentEntry, MAX_AGENTS};
use aya_ebpf::{
    helpers::generated::bpf_get_current_ancestor_cgroup_id, macros::map, maps::HashMap,
};

/// Map `AGENTS`.
/// - key: agent id = cgroup id of the agent's cgroup (`u64`)
/// - value: [`AgentEntry`] (flags, file defaults, policy generation)
/// - size: [`MAX_AGENTS`] entries
/// - owner: the daemon writes (on agent start, policy change, kill) and deletes (on agent
///   exit); programs only read.
#[map]
static AGENTS: HashMap<u64, AgentEntry> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// Id of agentd's agent root cgroup; set by the loader (read-only once loaded).
#[unsafe(no_mangle)]
static AGENT_ROOT_ID: u64 = 0;

/// Level of the agent root cgroup below the cgroup2 root (which is level 0).
#[unsafe(no_mangle)]
static AGENT_ROOT_LEVEL: u32 = 0;

/// What the current task is, as far as agentd is concerned.
pub enum Subject {
    /// Not below agentd's agent root: never affected.
    Outside,
    /// Below the root, in agent `id` whose policy entry is `entry`.
    Agent { id: u64, entry: AgentEntry },
    /// Below the root but with no policy entry (or in the root itself, `id == 0`): every
    /// operation is denied.
    Unregistered { id: u64 },
}

/// Classifies the current task by its cgroup.
#[inline(always)]
pub fn current() -> Subject {
    // SAFETY: reading the loader-set globals; volatile so the compiler keeps the load.
    let root = unsafe { core::ptr::read_volatile(&AGENT_ROOT_ID) };
    let level = unsafe { core::ptr::read_volatile(&AGENT_ROOT_LEVEL) } as i32;
    // SAFETY: the helper only reads the current task's cgroup.
    if root == 0 || unsafe { bpf_get_current_ancestor_cgroup_id(level) } != root {
        return Subject::Outside;
    }
    // 0 when the task sits in the root itself (agentd never puts a task there).
    let id = unsafe { bpf_get_current_ancestor_cgroup_id(level + 1) };
    // SAFETY: the entry is copied out at once; the map is not BPF_F_NO_PREALLOC-sensitive
    // for a Copy read.
    match unsafe { AGENTS.get(id) } {
        Some(entry) => Subject::Agent { id, entry: *entry },
        None => Subject::Unregistered { id },
    }
}
