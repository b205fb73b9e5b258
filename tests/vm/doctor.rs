//! In the VM, BPF LSM works, and doctor must say so and plan to use it.

use std::process::Command;

use agentd_tests::agentd_bin;
use serde_json::Value;

use crate::require_vm;

#[test]
fn doctor_finds_bpf_lsm_usable() {
    require_vm();
    let out = Command::new(agentd_bin())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lsm = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "bpf_lsm")
        .unwrap();
    assert_eq!(lsm["status"], "ok", "{lsm}");
    assert!(
        lsm["detail"]
            .as_str()
            .unwrap()
            .contains("'bpf' in the active LSM list"),
        "{lsm}"
    );
    let files = report["enforcement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["area"] == "files")
        .unwrap();
    assert_eq!(files["enforcers"][0], "BPF LSM", "{files}");
    assert_eq!(report["usable"], true);
    assert!(out.status.success());
}
