//! Who is an agent. Userspace twin: agentd/src/agent.rs (registration in `AGENTS`).

use agentd_common::agent::{AgentEntry, MAX_AGENTS};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_skb_ancestor_cgroup_id},
    macros::map,
    maps::HashMap,
    programs::SkBuffContext,
};

/// Map `AGENTS`.
/// - key: agent id = cgroup id of the agent's cgroup (`u64`)
/// - value: [`AgentEntry`] (flags, file defaults, policy id, DNS resolver address)
/// - size: [`MAX_AGENTS`] entries
/// - owner: the daemon writes (on agent start, policy change, kill) and deletes (on agent
///   exit); programs only read.
///
/// Not preallocated: an update then swaps in a new element, so a program reads either the
/// old entry or the new one, never a mix (a policy change is one update of this map).
#[map]
static AGENTS: HashMap<u64, AgentEntry> = HashMap::with_max_entries(MAX_AGENTS, BPF_F_NO_PREALLOC);

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

/// The loader-set root id and level.
#[inline(always)]
fn root() -> (u64, i32) {
    // SAFETY: reading the loader-set globals; volatile so the compiler keeps the load.
    unsafe {
        (
            core::ptr::read_volatile(&AGENT_ROOT_ID),
            core::ptr::read_volatile(&AGENT_ROOT_LEVEL) as i32,
        )
    }
}

#[inline(always)]
fn subject(id: u64) -> Subject {
    // SAFETY: the entry is copied out at once; the map is not preallocated, so the element
    // read is never reused while we copy it.
    match unsafe { AGENTS.get(id) } {
        Some(entry) => Subject::Agent { id, entry: *entry },
        None => Subject::Unregistered { id },
    }
}

/// Classifies the current task by its cgroup.
#[inline(always)]
pub fn current() -> Subject {
    let (root, level) = root();
    // SAFETY: the helper only reads the current task's cgroup.
    if root == 0 || unsafe { bpf_get_current_ancestor_cgroup_id(level) } != root {
        return Subject::Outside;
    }
    // 0 when the task sits in the root itself (agentd never puts a task there).
    subject(unsafe { bpf_get_current_ancestor_cgroup_id(level + 1) })
}

/// Classifies the socket that sends a packet, by the cgroup it was created in.
#[inline(always)]
pub fn of_skb(ctx: &SkBuffContext) -> Subject {
    let (root, level) = root();
    // SAFETY: the helper reads the cgroup of the packet's socket.
    if root == 0 || unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), level) } != root {
        return Subject::Outside;
    }
    subject(unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), level + 1) })
}

/// Deepest cgroup nesting [`agent_of_task`] climbs.
const MAX_CGROUP_DEPTH: u32 = 32;

/// The agent a task belongs to: `Some(id)` (its cgroup id), `Some(0)` for a task in the
/// agent root itself, `None` for a task outside the root. A read fault gives `Some(0)`
/// (treated as "not the same agent": fail closed).
#[inline(always)]
pub fn agent_of_task(task: *const u8) -> Option<u64> {
    use crate::kernel::{offsets, read};
    let off = offsets();
    let (root, level) = root();
    let Some(css_set) = read::<*const u8>(task, off.task_cgroups) else {
        return Some(0);
    };
    let Some(mut cg) = read::<*const u8>(css_set, off.css_set_dfl_cgrp) else {
        return Some(0);
    };
    let Some(mut lvl) = read::<i32>(cg, off.cgroup_level) else {
        return Some(0);
    };
    if lvl <= level {
        return None;
    }
    // Climb to the agent's level, one below the root.
    let parent_of = |cg: *const u8| -> Option<*const u8> {
        // SAFETY: the css is embedded in the cgroup at cgroup_self.
        let css = unsafe { cg.add(off.cgroup_self as usize) };
        let parent: *const u8 = read(css, off.css_parent)?;
        read(parent, off.css_cgroup)
    };
    let mut i = 0u32;
    while i < MAX_CGROUP_DEPTH && lvl > level + 1 {
        let Some(p) = parent_of(cg) else {
            return Some(0);
        };
        cg = p;
        lvl -= 1;
        i += 1;
    }
    if lvl != level + 1 {
        return Some(0);
    }
    let id_of = |cg: *const u8| -> Option<u64> {
        read::<u64>(read::<*const u8>(cg, off.cgroup_kn)?, off.kernfs_node_id)
    };
    let (Some(id), Some(parent)) = (id_of(cg), parent_of(cg)) else {
        return Some(0);
    };
    match id_of(parent) {
        Some(p) if p == root => Some(id),
        _ => None,
    }
}
