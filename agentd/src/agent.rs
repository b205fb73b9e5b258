//! Agent registration in the kernel. Kernel twin: agentd-ebpf/src/agent.rs.
//!
//! A task below the agent root whose agent has no entry is denied everything, so an agent
//! must be registered before its first process runs and unregistered only after its
//! cgroup is empty.

use agentd_common::agent::{AGENTS_MAP, AgentEntry};
use anyhow::{Context as _, Result};
use aya::{Ebpf, maps::HashMap};

fn agents(ebpf: &mut Ebpf) -> Result<HashMap<&mut aya::maps::MapData, u64, AgentEntry>> {
    let map = ebpf
        .map_mut(AGENTS_MAP)
        .context("the object has no AGENTS map")?;
    Ok(HashMap::try_from(map)?)
}

/// Sets (or replaces) the entry of agent `id` (its cgroup id).
pub fn register(ebpf: &mut Ebpf, id: u64, entry: AgentEntry) -> Result<()> {
    agents(ebpf)?
        .insert(id, entry, 0)
        .with_context(|| format!("registering agent cgroup {id} in AGENTS"))
}

/// Removes the entry of agent `id`; from then on its tasks, if any remain, are denied.
pub fn unregister(ebpf: &mut Ebpf, id: u64) -> Result<()> {
    agents(ebpf)?
        .remove(&id)
        .with_context(|| format!("removing agent cgroup {id} from AGENTS"))
}

/// The entry of agent `id`, if registered.
pub fn entry(ebpf: &mut Ebpf, id: u64) -> Result<Option<AgentEntry>> {
    match agents(ebpf)?.get(&id, 0) {
        Ok(e) => Ok(Some(e)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every registered agent and its entry.
pub fn all(ebpf: &mut Ebpf) -> Result<Vec<(u64, AgentEntry)>> {
    agents(ebpf)?
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .context("reading AGENTS")
}
