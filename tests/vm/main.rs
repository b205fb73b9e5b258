//! VM integration tests: run inside a Debian kernel whose BPF LSM works, booted by
//! `cargo xtask test --stage vm`. Anywhere else every test fails at once and says so.

mod budgets;
mod doctor;
mod files;
mod protect;
// The file rules through the daemon: the same scenario as on the host, here with both
// BPF LSM and Landlock.
#[path = "../host/files.rs"]
mod host_files;
// The egress pipeline runs on the VM kernels too: same programs, other kernels.
#[path = "../host/network.rs"]
mod network;

/// Fails the test unless it runs inside the xtask VM.
pub fn require_vm() {
    agentd_tests::require_root();
    assert!(
        std::env::var_os("AGENTD_IN_VM").is_some(),
        "this is a VM test: it needs a kernel with a working BPF LSM; run `cargo xtask test --stage vm`"
    );
}
