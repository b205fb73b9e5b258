//! Capability probes for `agentd doctor` (agentd/src/doctor.rs).
//!
//! Each program does nothing and allows everything. Doctor loads (and where attaching is
//! the question, briefly attaches) each one to learn, by trying, what this kernel lets
//! agentd use. None of them is attached by the daemon. For the cgroup hooks doctor tries
//! agentd's real programs instead (network.rs), so a verifier that rejects one shows up.

use aya_ebpf::{
    helpers::generated::bpf_send_signal,
    macros::{lsm, raw_tracepoint},
    programs::{LsmContext, RawTracePointContext},
};

/// Is BPF LSM usable: loads only where the kernel accepts BPF_PROG_TYPE_LSM, attaches only
/// where `bpf` is in the active LSM list.
#[lsm(hook = "file_open")]
pub fn probe_lsm(_ctx: LsmContext) -> i32 {
    0
}

/// Raw tracepoint on sys_enter (the hook syscall budgets need).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn probe_raw_tp(_ctx: RawTracePointContext) -> i32 {
    0
}

/// Is the bpf_send_signal helper available (the `kill` budget action needs it). Loaded,
/// never attached; the verifier refuses the load if the helper is unknown.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn probe_send_signal(_ctx: RawTracePointContext) -> i32 {
    // A signal number no process handles: 0 is "check only" for kill(2); the helper
    // rejects it without sending anything.
    // SAFETY: the helper takes a plain integer.
    let _ = unsafe { bpf_send_signal(0) };
    0
}
