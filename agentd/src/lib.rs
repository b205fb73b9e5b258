//! agentd: a containment runtime for AI agents on Linux.
//!
//! The daemon loads eBPF programs that enforce, per agent and in the kernel, an egress
//! allowlist, file access rules and resource budgets. Modules are named after the
//! enforcement area they serve, like their kernel twins in agentd-ebpf/src:
//!
//! - [`agent`]: agent registration (kernel: `agent.rs`)
//! - [`network`]: egress allowlist (kernel: `network.rs`)
//! - [`files`]: file access rules (kernel: `files.rs`)
//! - [`process`]: ptrace and signals across agent boundaries (kernel: `process.rs`)
//! - [`events`]: records from the kernel (kernel: `events.rs`)
//! - [`audit`]: the hash-chained audit log of every decision and control action
//! - [`metrics`]: Prometheus metrics on /metrics
//! - [`kill`]: the kill switch, through the daemon or directly on the cgroups
//! - [`doctor`]: what this host can enforce (kernel: `probe.rs`)
//! - [`install`]: `agentd install` and `agentd uninstall` (binary, systemd unit, configuration)
//!
//! and the plumbing they share: [`ebpf`] (the embedded object and its loader), [`btf`]
//! (kernel struct offsets), [`cgroup`] (cgroup v2 directories).

pub mod agent;
pub mod audit;
pub mod btf;
pub mod budgets;
pub mod caps;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod ebpf;
pub mod events;
pub mod files;
pub mod install;
pub mod kill;
pub mod launcher;
pub mod metrics;
pub mod network;
pub mod policy;
pub mod process;
pub mod profile;
pub mod protocol;
pub mod seccomp;
