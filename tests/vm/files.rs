//! The BPF LSM file pipeline end to end: file_open denies an agent's open of a protected
//! file by any path that reaches it, spares other files and other processes, lets a more
//! specific rule win, reports the denial, and is gone after.

use std::{os::unix::fs::MetadataExt as _, time::Duration};

use agentd::{
    agent, ebpf,
    events::{Event, EventReader},
    files,
};
use agentd_common::{
    agent::AgentEntry,
    events::VERDICT_DENY,
    files::{ACCESS_ALL, ACCESS_READ, ACCESS_WRITE, FileRule},
};
use agentd_tests::{TempDir, TestRoot, act_bin, act_in, try_act_in, wait_until};

use crate::require_vm;

#[test]
fn file_open_denies_the_agent_by_every_path_and_spares_others() {
    require_vm();
    let root = TestRoot::new("file-open");
    let agent_cg = root.child("agent");
    let dir = TempDir::new("files");
    let secret = dir.write("home/.ssh/id_ed25519", "PRIVATE KEY");
    let readme = dir.write("home/.ssh/README", "public notes");
    let public = dir.write("home/notes.txt", "hello");
    let link = dir.path().join("home/innocent-link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let act = act_bin!();

    let mut kernel = ebpf::load(&root.load_config()).expect("load agentd's object");
    let entry = AgentEntry {
        file_default_allow: ACCESS_ALL,
        policy_id: 7,
        ..Default::default()
    };
    agent::register(&mut kernel, agent_cg.id(), entry).unwrap();
    let ssh = dir.path().join("home/.ssh");
    files::set_rule(
        &mut kernel,
        7,
        &ssh,
        FileRule {
            allow: 0,
            deny: ACCESS_READ | ACCESS_WRITE,
        },
    )
    .unwrap();
    // More specific than the directory's deny: README may be read.
    files::set_rule(
        &mut kernel,
        7,
        &readme,
        FileRule {
            allow: ACCESS_READ,
            deny: 0,
        },
    )
    .unwrap();
    let mut reader = EventReader::take(&mut kernel).unwrap();
    let btf = aya::Btf::from_sys_fs().unwrap();
    let prog_id = files::attach(&mut kernel, &btf, None).expect("attach file_open");

    let s = secret.to_str().unwrap();
    act_in(&act, Some(&agent_cg), &["open", s, "read"]).assert_errno(libc::EACCES);
    act_in(&act, Some(&agent_cg), &["open", s, "write"]).assert_errno(libc::EACCES);
    act_in(
        &act,
        Some(&agent_cg),
        &["open", link.to_str().unwrap(), "read"],
    )
    .assert_errno(libc::EACCES);
    let via_proc = format!("/proc/self/root{s}");
    act_in(&act, Some(&agent_cg), &["open", &via_proc, "read"]).assert_errno(libc::EACCES);
    let via_dotdot = format!("{}/../.ssh/id_ed25519", ssh.display());
    act_in(&act, Some(&agent_cg), &["open", &via_dotdot, "read"]).assert_errno(libc::EACCES);
    // Ways around a path check: an open submitted through io_uring (which agentd's seccomp
    // filter refuses to agents; here there is none), and an O_PATH descriptor (no access
    // check) reopened through /proc/self/fd.
    act_in(&act, Some(&agent_cg), &["uring-open", s]).assert_errno(libc::EACCES);
    act_in(&act, Some(&agent_cg), &["opath-reopen", s]).assert_errno(libc::EACCES);

    act_in(
        &act,
        Some(&agent_cg),
        &["open", public.to_str().unwrap(), "read"],
    )
    .assert_ok();
    act_in(
        &act,
        Some(&agent_cg),
        &["open", readme.to_str().unwrap(), "read"],
    )
    .assert_ok();
    act_in(
        &act,
        Some(&agent_cg),
        &["open", readme.to_str().unwrap(), "write"],
    )
    .assert_errno(libc::EACCES);
    act_in(&act, None, &["open", s, "read"]).assert_ok();

    let ino = std::fs::metadata(&secret).unwrap().ino();
    let mut events = Vec::new();
    assert!(
        wait_until(Duration::from_secs(2), || {
            events.extend(reader.drain());
            events
                .iter()
                .filter(|e| matches!(e, Event::File(f) if f.ino == ino && f.header.agent == agent_cg.id() && f.header.verdict == VERDICT_DENY))
                .count()
                == 7
        }),
        "expected 7 denial events for the secret's inode, got {events:?}"
    );

    drop(reader);
    drop(kernel);
    assert!(
        wait_until(Duration::from_secs(5), || prog_id
            .iter()
            .all(|p| !ebpf::program_loaded(p.id))),
        "file_open still loaded"
    );
    act_in(&act, Some(&agent_cg), &["open", s, "read"]).assert_ok();
}

#[test]
fn an_unregistered_cgroup_below_the_root_opens_nothing() {
    require_vm();
    let root = TestRoot::new("file-open-closed");
    let stray = root.child("stray");
    let dir = TempDir::new("files-closed");
    let f = dir.write("plain.txt", "x");
    let act = act_bin!();
    let mut kernel = ebpf::load(&root.load_config()).unwrap();
    let btf = aya::Btf::from_sys_fs().unwrap();
    files::attach(&mut kernel, &btf, None).unwrap();
    // Even exec of the helper is refused: the kernel opens the binary for the task, which
    // is already in the unregistered cgroup.
    let err = try_act_in(&act, Some(&stray), &["open", f.to_str().unwrap(), "read"])
        .expect_err("a process in an unregistered cgroup below the root ran a program");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    act_in(&act, None, &["open", f.to_str().unwrap(), "read"]).assert_ok();
}

#[test]
fn the_default_profile_on_bpf_lsm_alone_reports_from_the_hooks() {
    require_vm();
    use crate::host_files::{Bystander, check, default_profile, outside, run_scenario};
    use agentd_tests::{DaemonSetup, TestDaemon};
    let d = TestDaemon::with(DaemonSetup {
        profiles: &[("default", &default_profile())],
        extra_config: "[files]\nenforcers = [\"lsm\"]\n",
        ..Default::default()
    });
    let dir = TempDir::new("lsm-files");
    // Inode rules cannot cover paths that do not exist yet (the profile names many, such
    // as ~/.aws): without Landlock beside it, the launch is refused and says which.
    let refused = d.run(&["--profile", "default", "--user", "root", "--", "/bin/true"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(
        err.contains("paths that do not exist yet")
            && err.contains("/.aws")
            && err.contains("--degraded-ok"),
        "{err}"
    );
    assert!(
        d.agent_cgroups().is_empty(),
        "a refused launch leaves nothing behind"
    );
    // The rate budget program (sys_enter) passed this kernel's verifier at daemon start.
    // (The budget tests proper run on the host only: attaching sys_enter under qemu's
    // software emulation with two CPUs once crashed 6.12 with an int3 Oops; see the notes.)
    assert!(
        !d.log().contains("rate budgets cannot be enforced"),
        "{}",
        d.log()
    );
    let other = Bystander::start();
    let (steps, denials) = run_scenario(&d, &dir, "lsm-files", &["--degraded-ok"], &other);
    check(&dir, &steps, &denials, &other);
    outside(&dir, &other);
    let hooks: Vec<&str> = denials
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["hook"].as_str())
        .collect();
    assert!(
        !hooks.contains(&"sys_exit"),
        "with BPF LSM alone every denial comes from an LSM hook: {hooks:?}"
    );
    for hook in [
        "file_open",
        "bprm_check_security",
        "path_mknod",
        "path_link",
        "path_rename",
        "ptrace_access_check",
    ] {
        assert!(hooks.contains(&hook), "no denial from {hook}: {hooks:?}");
    }
}

/// Average in-kernel time of one `file_open` run while the agent opens `target` `n` times.
fn file_open_ns(
    act: &std::path::Path,
    agent: &agentd::cgroup::CgroupDir,
    prog_id: u32,
    target: &str,
    n: u32,
) -> f64 {
    let info = || {
        aya::programs::loaded_programs()
            .flatten()
            .find(|p| p.id() == prog_id)
            .expect("file_open is loaded")
    };
    let before = info();
    act_in(act, Some(agent), &["open-many", target, &n.to_string()]).assert_ok();
    let after = info();
    let runs = after.run_count() - before.run_count();
    assert!(
        runs >= u64::from(n),
        "file_open ran {runs} times for {n} opens: are run-time stats on?"
    );
    (after.run_time() - before.run_time()).as_nanos() as f64 / runs as f64
}

/// Rules are found by hash lookups on the inodes of the opened path's components, so the
/// cost of an open depends on the path's depth, never on how many rules a policy has. The
/// agent switches between a policy with 1 rule and one with 1,000 (the same rule plus 999
/// on other files); the kernel's own per-program run-time stats measure file_open.
/// The bound is loose on purpose: a scan over the rules would cost hundreds of times more.
#[test]
fn file_open_cost_does_not_grow_with_the_rule_count() {
    require_vm();
    let root = TestRoot::new("file-rules-scale");
    let agent_cg = root.child("agent");
    let dir = TempDir::new("files-scale");
    let target = dir.write("a/b/c/d/e/target.txt", "x");
    let act = act_bin!();
    let mut kernel = ebpf::load(&root.load_config()).unwrap();
    let read_only = FileRule {
        allow: ACCESS_READ,
        deny: ACCESS_WRITE,
    };
    files::set_rule(&mut kernel, 1, &dir.path().join("a/b"), read_only).unwrap();
    files::set_rule(&mut kernel, 2, &dir.path().join("a/b"), read_only).unwrap();
    for i in 0..999 {
        let f = dir.write(&format!("many/{i}"), "");
        files::set_rule(
            &mut kernel,
            2,
            &f,
            FileRule {
                allow: 0,
                deny: ACCESS_ALL,
            },
        )
        .unwrap();
    }
    let btf = aya::Btf::from_sys_fs().unwrap();
    let loaded = files::attach(&mut kernel, &btf, None).unwrap();
    let prog_id = loaded.iter().find(|p| p.hook == "file_open").unwrap().id;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let t = target.to_str().unwrap();
    let (mut one, mut thousand) = (Vec::new(), Vec::new());
    // Alternate, so that drift of the machine hits both sides alike.
    for _ in 0..5 {
        for (policy, out) in [(1, &mut one), (2, &mut thousand)] {
            let entry = AgentEntry {
                file_default_allow: ACCESS_READ | agentd_common::files::ACCESS_EXEC,
                policy_id: policy,
                ..Default::default()
            };
            agent::register(&mut kernel, agent_cg.id(), entry).unwrap();
            out.push(file_open_ns(&act, &agent_cg, prog_id, t, 20_000));
        }
    }
    // The rules hold: writing the target is refused under both policies.
    act_in(&act, Some(&agent_cg), &["open", t, "write"]).assert_errno(libc::EACCES);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (one, thousand) = (median(&mut one), median(&mut thousand));
    let ratio = thousand / one;
    eprintln!(
        "file_open, path depth {}: 1 rule {one:.0} ns/run, 1,000 rules {thousand:.0} ns/run, ratio {ratio:.2}",
        target.components().count() - 1
    );
    assert!(
        ratio < 2.0,
        "file_open with 1,000 rules costs {ratio:.2} times as much as with 1"
    );
}

/// A daemon killed with SIGKILL and started again adopts its agent on a BPF LSM kernel:
/// each pinned BPF LSM link is replaced by a new one (attached before the old pin is
/// renamed over, which detaches the old), and the agent's file rule holds throughout.
#[test]
fn a_restarted_daemon_replaces_the_bpf_lsm_links_and_the_rules_hold() {
    use std::os::unix::fs::PermissionsExt as _;
    require_vm();
    let files = TempDir::new("adopt-lsm");
    let secret = files.write("secret", "s3cret");
    let open = files.write("open", "hello");
    for (p, mode) in [(files.path(), 0o755), (&secret, 0o644), (&open, 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let profile = format!(
        "name = \"plain\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\ndeny = [\"{}\"]\n",
        secret.display()
    );
    let mut d = agentd_tests::TestDaemon::with(agentd_tests::DaemonSetup {
        profiles: &[("plain", &profile)],
        extra_config: "[files]\nenforcers = [\"lsm\"]\n",
        ..Default::default()
    });
    let mut agent =
        agentd_tests::Probe::start(&d, &act_bin!(), "plain", "probe", &["--degraded-ok"]);
    let probe = |agent: &mut agentd_tests::Probe, when: &str| {
        for (path, allowed) in [(&secret, false), (&open, true)] {
            let v = agent.ask(&format!("open {}", path.display()));
            assert_eq!(v["ok"], allowed, "{when}: open {}: {v}", path.display());
        }
    };
    probe(&mut agent, "with the daemon");
    let pin = d.bpffs.join("links/file_open");
    let link = || {
        aya::programs::links::FdLink::from(
            aya::programs::links::PinnedLink::from_pin(&pin).unwrap(),
        )
        .info()
        .unwrap()
        .id()
    };
    let before = link();
    // SAFETY: signals our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(5), || d.exited()));
    probe(&mut agent, "after the daemon was killed");
    d.restart().expect("the daemon adopts the agent");
    assert!(d.log().contains("adopted agent probe"), "{}", d.log());
    let after = link();
    assert_ne!(before, after, "a new file_open link is pinned");
    assert!(
        wait_until(Duration::from_secs(5), || !aya::programs::loaded_links()
            .flatten()
            .any(|l| l.id() == before)),
        "the old file_open link is detached"
    );
    probe(&mut agent, "after the restart");
    let out = d
        .agentd()
        .args(["kill", "probe", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.root.join("probe").exists());
    let _ = agent.child.wait();
}

/// Audit mode on BPF LSM: a file access the profile denies is logged as would-deny and
/// goes through; the same rules reloaded in enforce mode deny it, in the same process.
#[test]
fn audit_mode_logs_a_file_would_deny_and_a_reload_enforces_it() {
    use std::os::unix::fs::PermissionsExt as _;
    require_vm();
    let files = TempDir::new("audit-lsm");
    let secret = files.write("secret", "s3cret");
    for (p, mode) in [(files.path(), 0o755), (&secret, 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let profile = |version: &str, mode: &str| {
        format!(
            "name = \"trial\"\nversion = \"{version}\"\nmode = \"{mode}\"\n[files]\ndefault = \"allow\"\ndeny = [\"{}\"]\n",
            secret.display()
        )
    };
    let d = agentd_tests::TestDaemon::with(agentd_tests::DaemonSetup {
        profiles: &[("trial", &profile("1.0.0", "audit"))],
        extra_config: "[files]\nenforcers = [\"lsm\"]\n",
        ..Default::default()
    });
    let mut agent = agentd_tests::Probe::start(&d, &act_bin!(), "trial", "trial", &[]);
    let open = format!("open {}", secret.display());
    let v = agent.ask(&open);
    assert_eq!(v["ok"], true, "audit mode denies nothing: {v}");
    let logged = |kind: &str, version: &str| {
        d.audit_records().iter().any(|r| {
            r["kind"] == kind
                && r["agent"] == "trial"
                && r["version"] == version
                && r["details"]["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/secret"))
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), || logged("would_deny", "1.0.0")),
        "no would_deny record for the secret: {:?}",
        d.audit_records()
    );
    assert!(!logged("file_denied", "1.0.0"), "nothing was denied");
    std::fs::write(
        d.dir.path().join("profiles/trial.toml"),
        profile("1.1.0", "enforce"),
    )
    .unwrap();
    let out = d.agentd().arg("reload").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = agent.ask(&open);
    assert_eq!(
        (&v["ok"], &v["errno"]),
        (
            &serde_json::Value::Bool(false),
            &serde_json::Value::from(libc::EACCES)
        ),
        "enforced after the reload: {v}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || logged("file_denied", "1.1.0")),
        "no file_denied record naming version 1.1.0"
    );
}
