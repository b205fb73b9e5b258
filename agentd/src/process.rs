//! Processes across agent boundaries. Kernel twin: agentd-ebpf/src/process.rs.
//!
//! Where BPF LSM works, `ptrace_access_check` and `task_kill` keep an agent from tracing,
//! reading the /proc files of, or signalling any process outside its own agent (the
//! daemon included). Elsewhere Landlock's scoping does the same for agents it restricts
//! (ptrace always, signals from Landlock ABI 6).

use agentd_common::process::{SYSCALLS_DENIED_MAP, SyscallKey, SyscallSet};
use anyhow::{Context as _, Result};
use aya::{Btf, Ebpf, maps::HashMap};

/// The BPF LSM programs of this area (program name = hook).
pub const LSM_PROGRAMS: &[&str] = &[
    "ptrace_access_check",
    "task_kill",
    "bpf",
    "bpf_map",
    "bpf_prog",
];

/// Loads and attaches the programs; returns what was loaded.
pub fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    pins: Option<&crate::ebpf::Pins>,
) -> Result<Vec<crate::ebpf::LoadedProgram>> {
    crate::ebpf::attach_lsm(ebpf, btf, LSM_PROGRAMS, pins)
}

fn denied_map(ebpf: &mut Ebpf) -> Result<HashMap<&mut aya::maps::MapData, SyscallKey, SyscallSet>> {
    let map = ebpf
        .map_mut(SYSCALLS_DENIED_MAP)
        .with_context(|| format!("no map {SYSCALLS_DENIED_MAP}"))?;
    Ok(HashMap::try_from(map)?)
}

/// Tells the `sys_exit` reporter which calls agent `agent`'s seccomp filter refuses (per
/// table: see `crate::seccomp::refused_sets`).
pub fn refuse_syscalls(ebpf: &mut Ebpf, agent: u64, sets: &[(u32, SyscallSet)]) -> Result<()> {
    let mut map = denied_map(ebpf)?;
    for (arch, set) in sets {
        let key = SyscallKey {
            agent,
            arch: *arch,
            _pad: 0,
        };
        map.insert(key, set, 0)
            .with_context(|| format!("writing {SYSCALLS_DENIED_MAP}"))?;
    }
    Ok(())
}

/// Forgets agent `agent`'s refused calls (and, with `None`, those of every agent whose id
/// is not in `keep`).
pub fn clear_syscalls(ebpf: &mut Ebpf, agent: Option<u64>, keep: &[u64]) -> Result<()> {
    let mut map = denied_map(ebpf)?;
    let keys: Vec<SyscallKey> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| match agent {
            Some(a) => k.agent == a,
            None => !keep.contains(&k.agent),
        })
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
    Ok(())
}
