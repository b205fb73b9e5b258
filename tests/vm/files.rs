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
    let prog_id = files::attach(&mut kernel, &btf).expect("attach file_open");

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
                == 5
        }),
        "expected 5 denial events for the secret's inode, got {events:?}"
    );

    drop(reader);
    drop(kernel);
    assert!(
        wait_until(Duration::from_secs(5), || !ebpf::program_loaded(prog_id)),
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
    files::attach(&mut kernel, &btf).unwrap();
    // Even exec of the helper is refused: the kernel opens the binary for the task, which
    // is already in the unregistered cgroup.
    let err = try_act_in(&act, Some(&stray), &["open", f.to_str().unwrap(), "read"])
        .expect_err("a process in an unregistered cgroup below the root ran a program");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    act_in(&act, None, &["open", f.to_str().unwrap(), "read"]).assert_ok();
}
