//! agentd protects itself where BPF LSM works: an agent can get no descriptor of its maps,
//! programs or links (LSM `bpf`, `bpf_map`, `bpf_prog`), and can neither trace nor signal
//! the daemon (`ptrace_access_check`, `task_kill`). The launcher's seccomp filter refuses
//! `bpf()` and `ptrace()` to agents first; the first test shows the LSM hooks hold on their
//! own (a process of an agent's cgroup without that filter), the second the whole of it.

use std::time::Duration;

use agentd::{agent, ebpf, events::EventReader};
use agentd_common::agent::AgentEntry;
use agentd_tests::{TestDaemon, TestRoot, act_bin, act_in, wait_until};
use serde_json::Value;

use crate::require_vm;

#[test]
fn the_lsm_hooks_refuse_agents_bpf_and_tracing_without_the_filter() {
    require_vm();
    let root = TestRoot::new("protect");
    let agent_cg = root.child("agent");
    let act = act_bin!();
    let mut kernel = ebpf::load(&root.load_config()).expect("load agentd's object");
    agent::register(
        &mut kernel,
        agent_cg.id(),
        AgentEntry {
            policy_id: 9,
            ..Default::default()
        },
    )
    .unwrap();
    let mut reader = EventReader::take(&mut kernel).unwrap();
    let btf = aya::Btf::from_sys_fs().unwrap();
    agentd::process::attach(&mut kernel, &btf, None).expect("attach the process hooks");
    let mut other = std::process::Command::new("/bin/sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = other.id().to_string();
    // Outside: the lookup runs (no such pin); inside: refused before it.
    let missing = "/sys/fs/bpf/agentd-protect-no-such-pin";
    act_in(&act, None, &["bpf-obj-get", missing]).assert_errno(libc::ENOENT);
    act_in(&act, Some(&agent_cg), &["bpf-obj-get", missing]).assert_errno(libc::EPERM);
    let traced = act_in(&act, Some(&agent_cg), &["ptrace", &pid]);
    assert!(!traced.ok(), "ptrace of a process outside the agent");
    act_in(&act, None, &["ptrace", &pid]).assert_ok();
    let _ = other.kill();
    let _ = other.wait();
    let mut events = Vec::new();
    assert!(
        wait_until(Duration::from_secs(3), || {
            events.extend(reader.drain());
            let texts: Vec<String> = events.iter().map(ToString::to_string).collect();
            texts.iter().any(|t| t.contains("bpf() command 7 denied"))
                && texts
                    .iter()
                    .any(|t| t.contains(&format!("ptrace attach to pid {pid}")))
        }),
        "events for both: {events:?}"
    );
}

#[test]
fn an_agent_cannot_open_agentds_pinned_maps_or_trace_the_daemon() {
    require_vm();
    let d = TestDaemon::start(&[(
        "plain",
        "name = \"plain\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n",
    )]);
    let act = act_bin!().display().to_string();
    let map = d.bpffs.join("maps/AGENTS");
    assert!(map.exists(), "the daemon pinned its maps");
    let out = d.run(&[
        "--profile",
        "plain",
        "--user",
        "root",
        "--degraded-ok",
        "--name",
        "reacher",
        "--",
        "/bin/sh",
        "-c",
        &format!(
            "'{act}' bpf-obj-get '{}'; '{act}' ptrace {}; kill -STOP {}; echo \"stop rc=$?\"",
            map.display(),
            d.pid(),
            d.pid()
        ),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let reports: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(reports.len(), 2, "{text}");
    assert_eq!(
        reports[0]["errno"],
        libc::EPERM,
        "the pinned map: {}",
        reports[0]
    );
    assert_eq!(
        reports[1]["ok"], false,
        "ptrace of the daemon: {}",
        reports[1]
    );
    assert!(text.contains("stop rc=1"), "SIGSTOP to the daemon: {text}");
    assert!(!d.exited(), "the daemon runs on");
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert!(status.lines().any(|l| l == "TracerPid:\t0"), "not traced");
    assert!(
        !status.lines().any(|l| l.starts_with("State:\tT")),
        "not stopped"
    );
    let recorded = |what: &str| {
        wait_until(Duration::from_secs(5), || {
            d.audit_records().iter().any(|r| {
                r["agent"] == "reacher"
                    && r["details"]["text"]
                        .as_str()
                        .is_some_and(|t| t.contains(what))
            })
        })
    };
    assert!(
        recorded("system call bpf (x86-64)"),
        "the bpf() refusal is on record"
    );
    assert!(
        recorded("system call ptrace (x86-64)"),
        "the ptrace refusal is on record"
    );
    // The signal: where Landlock scopes signals (ABI 6, the 6.12 kernel) it refuses it
    // before BPF LSM's task_kill runs, and Landlock gives no record; before, task_kill
    // refuses it and records it (the 6.1 kernel).
    let abi = agentd::doctor::landlock_abi().unwrap_or(0);
    if abi < 6 {
        assert!(
            recorded(&format!("signal 19 to pid {}", d.pid())),
            "the SIGSTOP refusal is on record (task_kill; Landlock ABI {abi})"
        );
    }
}
