//! agentd's kernel programs.
//!
//! One module per enforcement area, each the twin of the userspace module of the same name
//! in agentd/src: [`agent`] (who is an agent), [`network`] (egress allowlist), [`files`]
//! (file access rules), [`process`] (ptrace and signals across agent boundaries),
//! [`events`] (records for the daemon), [`kernel`] (reading kernel structs at BTF
//! offsets), and [`probe`] (tiny programs that `agentd doctor` loads to find out what this
//! kernel allows).
//!
//! Rules every program here follows:
//! - A task that is not below agentd's agent root is never affected: the first check is a
//!   cgroup ancestor comparison, and it returns "allow" at once.
//! - A task below the root whose agent has no entry in `AGENTS` is denied everything
//!   (fail closed): a missing or evicted entry must never widen what an agent can do.
//! - Every denial emits an event; a full ring buffer is counted, never silent.

#![no_std]
#![no_main]
// Atomic adds on map values (budgets): core's atomics have no RMW for the BPF target.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod agent;
mod budgets;
mod events;
mod files;
mod kernel;
mod network;
mod probe;
mod process;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// LSM programs and `bpf_probe_read_kernel` need a GPL-compatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
