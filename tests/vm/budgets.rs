//! `deny` budgets where BPF LSM works: a fork loop is refused in the kernel by
//! `task_alloc` (no notifier, no round trip to the daemon), and stays within
//! burst + rate × time.

use agentd_tests::{TestDaemon, act_bin, last_json};

use crate::require_vm;

#[test]
fn task_alloc_bounds_a_fork_loop_under_a_deny_budget() {
    require_vm();
    let p = "name = \"forks\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n\
             [budgets.processes]\nrate = 20\nburst = 10\naction = \"deny\"\n";
    let d = TestDaemon::start(&[("forks", p)]);
    let act = act_bin!().display().to_string();
    let out = d.run(&["--profile", "forks", "--", &act, "fork-loop", "2"]);
    let v = last_json(&out);
    assert_eq!(
        v["op"],
        "fork-loop",
        "{v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created = v["detail"]["created"].as_u64().unwrap();
    let secs = v["detail"]["secs"].as_f64().unwrap();
    let eagain = v["detail"]["failed"]["11"].as_u64().unwrap_or(0);
    // burst + rate × time (+1: two CPUs may both take the last token).
    let bound = 10.0 + 20.0 * secs + 1.0;
    eprintln!("fork loop (task_alloc): {created} created, {eagain} EAGAIN in {secs:.2} s");
    assert!(
        (created as f64) <= bound && created >= 20,
        "{created} processes created in {secs:.2} s; bound {bound:.0}"
    );
    assert!(eagain > 0, "refused with EAGAIN: {v}");
    assert!(
        d.log().contains("budget processes exhausted") && d.log().contains("hook task_alloc"),
        "the refusal is an event from task_alloc:\n{}",
        d.log()
    );
}

#[test]
fn the_task_cap_holds_for_all_agents_together() {
    require_vm();
    let p = "name = \"plain\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n";
    let d = TestDaemon::with(agentd_tests::DaemonSetup {
        profiles: &[("plain", p)],
        agents_config: "max_tasks = 30",
        ..Default::default()
    });
    agentd_tests::assert_tasks_capped(&d, &act_bin!().display().to_string(), 30);
}
