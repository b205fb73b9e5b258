//! `agentd doctor` tells the truth about the host: each verdict is checked against a direct
//! attempt made by the test, and doctor leaves no cgroup or program behind.

use std::{collections::BTreeSet, fs, process::Command};

use agentd::{cgroup, doctor::landlock_abi, ebpf};
use agentd_tests::{TestRoot, agentd_bin, require_root};
use aya::programs::Lsm;
use serde_json::Value;

fn doctor(json: bool) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(agentd_bin());
    cmd.arg("doctor");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run agentd doctor");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("doctor has no check {id}: {report}"))
}

fn doctor_cgroups() -> BTreeSet<String> {
    let mount = cgroup::cgroup2_mount().unwrap();
    fs::read_dir(&mount.mount_point)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("agentd-doctor-"))
        .collect()
}

/// Ids of loaded programs with the names agentd's object uses.
fn agentd_programs() -> BTreeSet<u32> {
    const NAMES: &[&str] = &[
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "recvmsg4",
        "recvmsg6",
        "getpeername4",
        "getpeername6",
        "sock_create",
        "skb_egress",
        "file_open",
        "probe_lsm",
        "probe_raw_tp",
        "probe_send_signal",
    ];
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| NAMES.iter().any(|x| x.starts_with(n) || n.starts_with(x)))
        })
        .map(|p| p.id())
        .collect()
}

/// Loads a BPF LSM program directly; `Err(errno)` if the kernel refuses.
pub fn direct_lsm_attempt() -> Result<(), String> {
    let root = TestRoot::new("lsm-attempt");
    let mut kernel = ebpf::load(&root.load_config()).expect("load agentd's object");
    let btf = aya::Btf::from_sys_fs().expect("kernel BTF");
    let prog: &mut Lsm = kernel.program_mut("probe_lsm").unwrap().try_into().unwrap();
    prog.load("file_open", &btf).map_err(|e| format!("{e:?}"))?;
    let link = prog.attach().map_err(|e| format!("{e:?}"))?;
    prog.detach(link).unwrap();
    Ok(())
}

#[test]
fn doctor_matches_direct_attempts_and_leaves_nothing_behind() {
    require_root();
    let cgroups_before = doctor_cgroups();
    let programs_before = agentd_programs();

    let (status, out) = doctor(true);
    let report: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("doctor --json: {e}: {out}"));

    // cgroup2 is where /proc/self/mountinfo says.
    let mount = cgroup::cgroup2_mount().unwrap();
    assert_eq!(check(&report, "cgroup2")["status"], "ok");
    assert!(
        check(&report, "cgroup2")["detail"]
            .as_str()
            .unwrap()
            .contains(&mount.mount_point.display().to_string())
    );

    // Hooks the build machine is known to allow (ENVIRONMENT.md, and re-checked here by the
    // egress tests that attach connect4 for real).
    for id in [
        "bpf",
        "ring_buffer",
        "cgroup_sock_addr",
        "cgroup_sock",
        "cgroup_skb",
        "raw_tracepoint",
        "send_signal",
        "cgroup_kill",
        "cgroup_freeze",
        "seccomp",
        "btf",
    ] {
        assert_eq!(
            check(&report, id)["status"],
            "ok",
            "{id}: {}",
            check(&report, id)
        );
    }

    // Landlock: the same ABI the test reads itself.
    match landlock_abi() {
        Ok(abi) => {
            assert_eq!(check(&report, "landlock")["status"], "ok");
            assert_eq!(
                check(&report, "landlock")["detail"],
                format!("ABI version {abi}")
            );
        }
        Err(_) => assert_ne!(check(&report, "landlock")["status"], "ok"),
    }

    // BPF LSM: doctor's verdict is what a direct attempt shows.
    let lsm = check(&report, "bpf_lsm");
    let files = report["enforcement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["area"] == "files")
        .unwrap();
    match direct_lsm_attempt() {
        Ok(()) => {
            assert_eq!(lsm["status"], "ok", "{lsm}");
            assert!(
                files["enforcers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e == "BPF LSM")
            );
        }
        Err(e) => {
            assert!(
                e.contains("EPERM") || e.contains("Operation not permitted"),
                "unexpected LSM failure: {e}"
            );
            assert_eq!(lsm["status"], "refused", "{lsm}");
            let detail = lsm["detail"].as_str().unwrap();
            assert!(
                detail.contains("compiled in") && detail.contains("refuses to load"),
                "{detail}"
            );
            assert_eq!(
                files["enforcers"],
                serde_json::json!([format!(
                    "Landlock ({})",
                    check(&report, "landlock")["detail"].as_str().unwrap()
                )])
            );
            assert!(
                files["note"]
                    .as_str()
                    .unwrap()
                    .contains("compiled in but refused"),
                "{files}"
            );
        }
    }

    // Exit status follows `usable`.
    assert_eq!(status.success(), report["usable"] == true);

    // Nothing left behind.
    assert_eq!(doctor_cgroups(), cgroups_before, "doctor left a cgroup");
    assert!(
        agentd_test_wait_programs(&programs_before),
        "doctor left programs loaded: {:?} (before: {programs_before:?})",
        agentd_programs()
    );
}

fn agentd_test_wait_programs(before: &BTreeSet<u32>) -> bool {
    agentd_tests::wait_until(std::time::Duration::from_secs(5), || {
        agentd_programs().is_subset(before)
    })
}

#[test]
fn doctor_human_output_names_each_check_and_the_plan() {
    require_root();
    let (_, out) = doctor(false);
    for needle in [
        "CHECK",
        "STATUS",
        "cgroup sock_addr",
        "BPF LSM",
        "Landlock",
        "Enforcement on this host:",
        "files",
        "network",
        "kill",
    ] {
        assert!(
            out.contains(needle),
            "doctor output lacks {needle:?}:\n{out}"
        );
    }
    if direct_lsm_attempt().is_err() {
        let line = out
            .lines()
            .find(|l| l.starts_with("BPF LSM"))
            .expect("a BPF LSM line");
        assert!(
            line.contains("REFUSED") && line.contains("compiled in"),
            "{line}"
        );
    }
}
