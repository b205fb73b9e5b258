//! Processes across agent boundaries. Kernel twin: agentd-ebpf/src/process.rs.
//!
//! Where BPF LSM works, `ptrace_access_check` and `task_kill` keep an agent from tracing,
//! reading the /proc files of, or signalling any process outside its own agent (the
//! daemon included). Elsewhere Landlock's scoping does the same for agents it restricts
//! (ptrace always, signals from Landlock ABI 6).

use anyhow::Result;
use aya::{Btf, Ebpf};

/// The BPF LSM programs of this area (program name = hook).
pub const LSM_PROGRAMS: &[&str] = &["ptrace_access_check", "task_kill"];

/// Loads and attaches the programs; returns what was loaded.
pub fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    pins: Option<&crate::ebpf::Pins>,
) -> Result<Vec<crate::ebpf::LoadedProgram>> {
    crate::ebpf::attach_lsm(ebpf, btf, LSM_PROGRAMS, pins)
}
