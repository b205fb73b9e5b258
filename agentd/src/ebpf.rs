//! The kernel object agentd carries inside its binary, and how it is loaded.
//!
//! Loading creates every map; each enforcement module then loads and attaches its own
//! programs ([`crate::network::attach`], [`crate::files::attach`]). Three read-only
//! globals are fixed at load time: the agent root cgroup's id and level, and the kernel
//! struct offsets taken from BTF.

use agentd_common::{
    agent::globals::{AGENT_ROOT_ID, AGENT_ROOT_LEVEL},
    files::{KERNEL_OFFSETS_GLOBAL, KernelOffsets},
};
use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, EbpfLoader};

/// The compiled agentd-ebpf object (built by build.rs).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentd-ebpf"));

/// The cgroup below which every task is an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentRoot {
    /// cgroup id of the agent root.
    pub id: u64,
    /// Its level in the cgroup2 hierarchy (the cgroup2 root is 0).
    pub level: u32,
}

/// What the programs are told at load time.
#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    pub root: AgentRoot,
    pub offsets: KernelOffsets,
}

/// Creates agentd's maps and readies its programs for loading.
pub fn load(cfg: &LoadConfig) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!(
            "this agentd binary carries no kernel programs (it was built with AYA_BUILD_SKIP=1); \
             rebuild it with `cargo xtask build`"
        );
    }
    EbpfLoader::new()
        .override_global(AGENT_ROOT_ID, &cfg.root.id, true)
        .override_global(AGENT_ROOT_LEVEL, &cfg.root.level, true)
        .override_global(KERNEL_OFFSETS_GLOBAL, &cfg.offsets, true)
        .load(OBJECT)
        .context("creating agentd's BPF maps (needs root: CAP_BPF and CAP_SYS_ADMIN)")
}

/// The kernel's id of a loaded program.
pub fn program_id(ebpf: &Ebpf, name: &str) -> Result<u32> {
    let prog = ebpf
        .program(name)
        .with_context(|| format!("no program {name} in the object"))?;
    Ok(prog
        .info()
        .with_context(|| format!("querying program {name}"))?
        .id())
}

/// True while a program with this id is loaded in the kernel.
pub fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs()
        .flatten()
        .any(|p| p.id() == id)
}

/// One BPF LSM program as loaded: what the daemon logs at start.
#[derive(Debug, Clone)]
pub struct LoadedProgram {
    pub hook: &'static str,
    /// The kernel's program id.
    pub id: u32,
    /// Instructions the verifier walked (kernels >= 5.16 report it).
    pub verified_insns: Option<u32>,
    /// Time spent in the verifier and attaching.
    pub took: std::time::Duration,
}

/// Loads and attaches BPF LSM programs named after their hooks.
pub fn attach_lsm(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    hooks: &[&'static str],
) -> Result<Vec<LoadedProgram>> {
    let mut out = Vec::new();
    for hook in hooks {
        let prog: &mut aya::programs::Lsm = ebpf
            .program_mut(hook)
            .with_context(|| format!("the object has no {hook} program"))?
            .try_into()?;
        let start = std::time::Instant::now();
        prog.load(hook, btf)
            .with_context(|| format!("loading the {hook} BPF LSM program"))?;
        prog.attach()
            .with_context(|| format!("attaching the {hook} BPF LSM program"))?;
        let verified_insns = prog
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count());
        out.push(LoadedProgram {
            hook,
            id: program_id(ebpf, hook)?,
            verified_insns,
            took: start.elapsed(),
        });
    }
    Ok(out)
}

/// One line for the daemon's log: how many programs, how long, the verifier's largest walk.
pub fn describe_loaded(programs: &[LoadedProgram]) -> String {
    let took: std::time::Duration = programs.iter().map(|p| p.took).sum();
    let mut line = format!(
        "{} BPF LSM programs loaded and attached in {} ms",
        programs.len(),
        took.as_millis()
    );
    if let Some(p) = programs
        .iter()
        .filter(|p| p.verified_insns.is_some())
        .max_by_key(|p| p.verified_insns)
    {
        line.push_str(&format!(
            " (largest: {}, {} verified instructions)",
            p.hook,
            p.verified_insns.unwrap_or(0)
        ));
    }
    line
}

/// The raw tracepoint program named after its tracepoint (`sys_enter`, `sys_exit`).
pub mod raw_tp {
    use anyhow::{Context as _, Result};
    use aya::{
        Ebpf,
        programs::{RawTracePoint, raw_trace_point::RawTracePointLinkId},
    };

    fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut RawTracePoint> {
        Ok(ebpf
            .program_mut(name)
            .with_context(|| format!("the object has no {name} program"))?
            .try_into()?)
    }

    /// Loads it (the verifier runs now), without attaching it.
    pub fn load(ebpf: &mut Ebpf, name: &str) -> Result<()> {
        program(ebpf, name)?
            .load()
            .with_context(|| format!("loading the {name} program"))
    }

    pub fn attach(ebpf: &mut Ebpf, name: &str) -> Result<RawTracePointLinkId> {
        program(ebpf, name)?
            .attach(name)
            .with_context(|| format!("attaching the {name} program"))
    }

    pub fn detach(ebpf: &mut Ebpf, name: &str, link: RawTracePointLinkId) -> Result<()> {
        program(ebpf, name)?
            .detach(link)
            .with_context(|| format!("detaching the {name} program"))
    }
}
