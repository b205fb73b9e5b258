//! `agentd daemon` and `agentd run` on the host: identity, process tree, seccomp, nested
//! launches, refusals, ps and inspect.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use agentd_tests::{TempDir, TestDaemon, act_bin, last_json, process_gone, wait_until};
use serde_json::Value;

/// Test profile: loopback reachable, files unrestricted (file rules are another suite's).
const OPEN: &str = "name = \"open\"\nversion = \"1.0.0\"\ndescription = \"test\"\n[network]\nloopback = true\n[files]\ndefault = \"allow\"\n";
/// Keeps every capability: lets the seccomp test tell the filter's EPERM from a missing
/// capability's.
const ALLCAPS: &str = "name = \"allcaps\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n[process]\ncapabilities = [\"ALL\"]\n";
/// ALLCAPS with `clone` denied outright.
const NOCLONE: &str = "name = \"noclone\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n[process]\ncapabilities = [\"ALL\"]\n[seccomp]\ndeny = [\"clone\"]\n";

fn act() -> String {
    act_bin!().display().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_agent_runs_as_its_user_with_no_capabilities_in_its_own_session() {
    let d = TestDaemon::start(&[("open", OPEN)]);
    for (user_args, uid) in [
        (vec!["--user", "nobody"], 65534),
        // A root agent needs --degraded-ok on a host without BPF LSM (Landlock does not
        // check chmod/chown of root's own files); agentd says so each time.
        (vec!["--user", "root", "--degraded-ok"], 0),
        (vec![], 65534),
    ] {
        let mut args = vec!["--profile", "open"];
        args.extend(&user_args);
        let a = act();
        args.extend(["--", &a, "ids"]);
        let out = d.run(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let ids = &last_json(&out)["detail"];
        assert_eq!(ids["uid"], uid, "{args:?}: {ids}");
        if uid == 0 && !agentd::files::Enforcers::of_host().lsm {
            assert!(
                stderr(&out)
                    .contains("agentd: degraded: not enforced on this host: chmod and chown"),
                "{}",
                stderr(&out)
            );
        }
        if uid == 0 && !agentd::files::Enforcers::of_host().lsm {
            assert!(
                stderr(&out)
                    .contains("agentd: degraded: not enforced on this host: chmod and chown"),
                "{}",
                stderr(&out)
            );
        }
        assert_eq!(ids["euid"], uid);
        assert_eq!(ids["groups"], "", "no supplementary groups: {ids}");
        for set in ["cap_eff", "cap_prm", "cap_inh", "cap_bnd", "cap_amb"] {
            assert_eq!(ids[set], "0000000000000000", "{args:?}: {set} {ids}");
        }
        assert_eq!(ids["no_new_privs"], "1");
        assert_eq!(ids["seccomp"], "2", "a seccomp filter is installed");
        assert_eq!(
            ids["session_leader"], true,
            "the agent has its own session (no controlling terminal)"
        );
    }
}

#[test]
fn the_whole_process_tree_stays_in_the_agent_cgroup_and_dies_with_it() {
    let d = TestDaemon::start(&[("open", OPEN)]);
    let mut client = d
        .agentd()
        .args([
            "run",
            "--profile",
            "open",
            "--name",
            "tree",
            "--",
            &act(),
            "tree",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let expected = d.agent_cgroup_path("tree");
    assert_eq!(report["detail"]["self"]["cgroup"], expected.as_str());
    let children = report["detail"]["children"].as_object().unwrap();
    assert_eq!(
        children.len(),
        3,
        "child, orphaned grandchild, new session: {report}"
    );
    let mut pids = BTreeSet::new();
    for (pid, cgroup) in children {
        assert_eq!(cgroup, expected.as_str(), "process {pid} reported {cgroup}");
        let pid: u32 = pid.parse().unwrap();
        let now = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            now.contains(&format!("0::{expected}\n")),
            "process {pid} is now in {now}"
        );
        pids.insert(pid);
    }
    pids.insert(report["detail"]["self"]["pid"].as_u64().unwrap() as u32);

    // ps and inspect see the agent and every process.
    let ps = d.agentd().args(["ps", "--json"]).output().unwrap();
    let agents: Value = serde_json::from_slice(&ps.stdout).unwrap();
    let tree = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "tree")
        .expect("ps lists the agent");
    assert_eq!(tree["processes"], 4);
    let inspect = d
        .agentd()
        .args(["inspect", "tree", "--json"])
        .output()
        .unwrap();
    let inspect: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let listed: BTreeSet<u32> = inspect["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(listed, pids, "inspect lists exactly the agent's processes");

    // SIGTERM to `agentd run` reaches the agent; when its first process ends, everything
    // the agent started is killed and its cgroup removed.
    // SAFETY: signals our own child.
    unsafe { libc::kill(client.id() as i32, libc::SIGTERM) };
    let status = client.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "exit status of a SIGTERM-killed agent"
    );
    assert!(
        wait_until(Duration::from_secs(5), || pids
            .iter()
            .all(|p| process_gone(*p))),
        "survivors: {pids:?}"
    );
    assert!(d.agent_cgroups().is_empty(), "the agent cgroup was removed");
}

#[test]
fn denied_syscalls_fail_with_eperm_natively_and_through_int_0x80() {
    const DENIED: &[&str] = &[
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "mount",
        "umount2",
        "pivot_root",
        "fsopen",
        "fsmount",
        "move_mount",
        "unshare(CLONE_NEWUSER)",
        "unshare(CLONE_NEWNET)",
        "unshare(CLONE_NEWNS)",
        "setns",
        "keyctl",
        "add_key",
        "request_key",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "iopl",
        "ioperm",
        "open_by_handle_at",
        "swapon",
        "swapoff",
        "reboot",
        "clock_settime",
        "settimeofday",
        "adjtimex",
        "acct",
        "quotactl",
        "clone(CLONE_NEWUSER)",
        "clone(CLONE_NEWPID)",
        "pidfd_getfd",
        "kcmp",
        "process_madvise",
        "move_pages",
        "migrate_pages",
        "quotactl_fd",
        "syslog",
        "lookup_dcookie",
        "modify_ldt",
        "uselib",
        "name_to_handle_at",
        "socketpair(AF_INET)",
        "socketpair(AF_PACKET)",
        "personality(ADDR_NO_RANDOMIZE)",
        "ioctl(TIOCSTI)",
        "ioctl(TIOCSTI with high bits)",
        "ioctl(TIOCLINUX)",
    ];
    /// Calls the filter leaves alone (with the arguments agentd-act uses).
    const ALLOWED: &[&str] = &[
        "getpid",
        "unshare(CLONE_FILES)",
        "socketpair(AF_UNIX)",
        "personality(query)",
        "ioctl(TIOCGWINSZ)",
        "fork",
        "vfork",
    ];
    let d = TestDaemon::start(&[("allcaps", ALLCAPS)]);
    let act = act();
    // The agent is root with every capability kept, so nothing but the filter can answer
    // EPERM: the same calls made outside any agent (as root) must fail otherwise.
    let ids = last_json(&d.run(&[
        "--profile",
        "allcaps",
        "--user",
        "root",
        "--degraded-ok",
        "--",
        &act,
        "ids",
    ]));
    assert_ne!(
        ids["detail"]["cap_eff"], "0000000000000000",
        "the test agent keeps its capabilities"
    );
    for op in ["syscalls", "syscalls32"] {
        let baseline = last_json(&Command::new(&act).arg(op).output().unwrap());
        let out = d.run(&[
            "--profile",
            "allcaps",
            "--user",
            "root",
            "--degraded-ok",
            "--",
            &act,
            op,
        ]);
        assert!(out.status.success(), "{op}: {}", stderr(&out));
        let agent = last_json(&out);
        let entry = if op == "syscalls" {
            "native"
        } else {
            "int 0x80"
        };
        for name in DENIED {
            if op == "syscalls32" && *name == "kexec_file_load" {
                continue; // not in the i386 table
            }
            let b = &baseline["detail"][name];
            assert_ne!(
                b["errno"],
                libc::EPERM,
                "{entry} {name}: outside an agent it already fails with EPERM ({b}), so the test cannot tell"
            );
            assert_eq!(
                agent["detail"][name]["errno"],
                libc::EPERM,
                "{entry} {name} in the agent: {}",
                agent["detail"][name]
            );
        }
        assert_eq!(
            agent["detail"]["clone3"]["errno"],
            libc::ENOSYS,
            "{entry} clone3 makes libc fall back to clone"
        );
        for name in ALLOWED {
            assert!(
                agent["detail"][name]["ok"].is_u64(),
                "{entry} {name} still works in the agent: {}",
                agent["detail"][name]
            );
        }
    }
    // Each refusal is an event too (the `sys_exit` reporter), named by its table.
    let reported = |text: &str| {
        d.audit_records().iter().any(|r| {
            r["kind"] == "syscall_denied"
                && r["details"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(text))
        })
    };
    for name in DENIED {
        let base = name.split('(').next().unwrap();
        for table in ["x86-64", "i386"] {
            if table == "i386" && *name == "kexec_file_load" {
                continue;
            }
            let text = format!("system call {base} ({table}) denied by the seccomp filter");
            assert!(
                wait_until(Duration::from_secs(5), || reported(&text)),
                "no syscall_denied record: {text}"
            );
        }
    }
}

#[test]
fn a_profile_denying_clone_keeps_unshare_namespace_rules_and_denies_every_fork() {
    const DENIED: &[&str] = &[
        "unshare(CLONE_NEWUSER)",
        "unshare(CLONE_NEWNET)",
        "unshare(CLONE_NEWNS)",
        "clone(CLONE_NEWUSER)",
        "fork",
        "vfork",
        "clone3",
    ];
    let d = TestDaemon::start(&[("noclone", NOCLONE)]);
    let act = act();
    // As in the test above: root with every capability, so only the filter says EPERM.
    // The agent cannot fork, so agentd-act makes the calls in its own process.
    for (op, here) in [
        ("syscalls", "syscalls-here"),
        ("syscalls32", "syscalls32-here"),
    ] {
        let baseline = last_json(&Command::new(&act).arg(op).output().unwrap());
        let mut args = vec![
            "--profile",
            "noclone",
            "--user",
            "root",
            "--degraded-ok",
            "--",
            &act,
            here,
        ];
        args.extend(DENIED);
        args.extend(["unshare(CLONE_FILES)", "getpid"]);
        let out = d.run(&args);
        assert!(out.status.success(), "{here}: {}", stderr(&out));
        let agent = last_json(&out);
        for name in DENIED {
            let b = &baseline["detail"][name];
            assert_ne!(b["errno"], libc::EPERM, "{op} {name}: {b}");
            assert_eq!(
                agent["detail"][name]["errno"],
                libc::EPERM,
                "{here} {name} with seccomp.deny = [\"clone\"]: {}",
                agent["detail"][name]
            );
        }
        assert_eq!(agent["detail"]["unshare(CLONE_FILES)"]["ok"], 0, "{here}");
        assert!(agent["detail"]["getpid"]["ok"].is_u64(), "{here}");
    }
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn accepted(l: &TcpListener) -> usize {
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

/// On an installed host an agent may not read /etc/agentd: `agentd run` inside an agent
/// needs only its launch socket, which its environment names.
#[test]
fn a_nested_run_does_not_read_the_configuration() {
    let (allowed, allowed_addr) = listener();
    let narrow = format!(
        "name = \"narrow\"\nversion = \"1.0.0\"\n[network]\nallow = [\"127.0.0.1:{}/tcp\"]\n[files]\ndefault = \"allow\"\n",
        allowed_addr.port()
    );
    let d = TestDaemon::start(&[("narrow", &narrow)]);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agentd = agentd_tests::agentd_bin().display().to_string();
    let target = allowed_addr.to_string();
    let out = d
        .agentd()
        .env("AGENTD_CONFIG", &d.config)
        .args([
            "run",
            "--profile",
            "narrow",
            "--",
            &agentd,
            "run",
            "--profile",
            "narrow",
        ])
        .args(["--", &act(), "connect", &target])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(last_json(&out)["ok"], true, "{}", stderr(&out));
    assert_eq!(accepted(&allowed), 1);
}

#[test]
fn a_nested_run_cannot_widen_anything() {
    let (allowed, allowed_addr) = listener();
    let (other, other_addr) = listener();
    let narrow = format!(
        "name = \"narrow\"\nversion = \"1.0.0\"\n[network]\nallow = [\"127.0.0.1:{}/tcp\"]\n[files]\ndefault = \"allow\"\n[rlimits]\nnofile = 256\n",
        allowed_addr.port()
    );
    let wide = "name = \"wide\"\nversion = \"2.0.0\"\n[network]\nallow = [\"0.0.0.0/0\"]\nloopback = true\n[files]\ndefault = \"allow\"\n[rlimits]\nnofile = 4096\n";
    let d = TestDaemon::start(&[("narrow", &narrow), ("wide", wide)]);
    let agentd = agentd_tests::agentd_bin().display().to_string();
    let config = d.config.display().to_string();
    let act = act();
    // Inside agent `parent` (profile narrow), start `agentd run` asking for more.
    let nested = |inner: &[&str]| {
        let mut args = vec![
            "--profile",
            "narrow",
            "--name",
            "parent",
            "--",
            &agentd,
            "--config",
            &config,
            "run",
        ];
        args.extend_from_slice(inner);
        d.run(&args)
    };

    let other_target = other_addr.to_string();
    let out = nested(&[
        "--profile",
        "wide",
        "--allow-net",
        &other_target,
        "--",
        &act,
        "connect",
        &other_target,
    ]);
    assert_eq!(
        last_json(&out)["errno"],
        libc::EPERM,
        "widened egress: {}",
        stderr(&out)
    );
    assert_eq!(accepted(&other), 0, "the listener saw nothing");

    let allowed_target = allowed_addr.to_string();
    let out = nested(&["--profile", "wide", "--", &act, "connect", &allowed_target]);
    assert_eq!(
        last_json(&out)["ok"],
        true,
        "what the parent allows still works: {}",
        stderr(&out)
    );
    assert_eq!(accepted(&allowed), 1);

    let out = nested(&[
        "--profile",
        "wide",
        "--audit",
        "--",
        &act,
        "connect",
        &other_target,
    ]);
    assert_eq!(
        last_json(&out)["errno"],
        libc::EPERM,
        "--audit cannot switch enforcement off from inside"
    );

    let out = nested(&["--profile", "wide", "--user", "root", "--", &act, "ids"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "--user root: an agent launched from inside agent `parent` runs as its user `nobody`"
        ),
        "{}",
        stderr(&out)
    );

    // Limits only shrink: the child asked for nofile 4096, the parent has 256.
    let out = nested(&["--profile", "wide", "--", "/bin/sh", "-c", "ulimit -n"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "256",
        "{}",
        stderr(&out)
    );

    // The control socket is out of reach from inside an agent, whichever way it is tried.
    let out = nested(&[
        "--profile",
        "wide",
        "--",
        &agentd,
        "--config",
        &config,
        "ps",
    ]);
    assert_ne!(out.status.code(), Some(0));
    let out = d.run(&[
        "--profile",
        "narrow",
        "--",
        "/usr/bin/env",
        "-u",
        "AGENTD_AGENT",
        &agentd,
        "--config",
        &config,
        "ps",
    ]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "ps through the control socket from inside an agent: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).contains("cannot reach") || stderr(&out).contains("may not use"),
        "{}",
        stderr(&out)
    );
    assert!(d.agent_cgroups().is_empty());
}

#[test]
fn bad_profiles_and_flags_are_refused_and_start_nothing() {
    let d = TestDaemon::start(&[
        ("open", OPEN),
        (
            "broken",
            "name = \"broken\"\nversion = \"1.0.0\"\n[network]\nallow = [\"10.0.0.0/8\"]\nalow = [\"1.2.3.4\"]\n",
        ),
    ]);
    let dir = TempDir::new("refusals");
    let bad = dir.write(
        "bad.toml",
        "name = \"bad\"\nversion = \"1.0.0\"\n\n[network]\nallow = [\"10.0.0.300/8\"]\n",
    );
    let marker = dir.path().join("marker");
    let marker_s = marker.display().to_string();
    let bad_s = bad.display().to_string();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--profile", &bad_s],
            format!("{bad_s}:5:10: network.allow: `10.0.0.300/8` is not an IP address or CIDR"),
        ),
        (
            vec!["--profile", "broken"],
            "broken.toml:5:1: unknown field `alow`".to_string(),
        ),
        (
            vec!["--profile", "missing"],
            "no profile named `missing`".to_string(),
        ),
        (
            vec!["--profile", "open", "--allow-net", "10.0.0.300"],
            "--allow-net 10.0.0.300:".to_string(),
        ),
        (
            vec!["--profile", "open", "--allow-net", "10.0.0.0/8:0"],
            "--allow-net 10.0.0.0/8:0: `0` is not a port".to_string(),
        ),
        (
            vec!["--profile", "open", "--allow-host", "bad host"],
            "--allow-host bad host:".to_string(),
        ),
        (
            vec!["--profile", "open", "--user", "no-such-user-agentd"],
            "--user no-such-user-agentd: no such user".to_string(),
        ),
        (
            vec!["--profile", "open", "--name", "bad/name"],
            "--name bad/name: agent names are".to_string(),
        ),
        (
            vec!["--profile", "open", "--workdir", "/nonexistent/agentd"],
            "--workdir /nonexistent/agentd: not an existing directory".to_string(),
        ),
        (
            vec!["--profile", "open", "--allow-nett", "1.2.3.4"],
            "unexpected argument '--allow-nett'".to_string(),
        ),
    ];
    for (flags, message) in cases {
        let mut args = flags.clone();
        args.extend(["--", "/usr/bin/touch", &marker_s]);
        let out = d.run(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&message),
            "{flags:?}:\n got: {}\nwant: {message}",
            stderr(&out)
        );
        assert!(!marker.exists(), "{flags:?}: the command ran");
        assert!(d.agent_cgroups().is_empty(), "{flags:?}: a cgroup was left");
        let tmp = std::fs::read_dir(d.dir.path().join("tmp"))
            .map(|r| r.count())
            .unwrap_or(0);
        assert_eq!(tmp, 0, "{flags:?}: a private tmp was left");
    }
    let out = d.run(&["--profile", "open"]);
    assert_eq!(out.status.code(), Some(2), "no command: {}", stderr(&out));
    // A command that cannot be found: 127, and nothing left either.
    let out = d.run(&["--profile", "open", "--", "/nonexistent/agent-binary"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot run `/nonexistent/agent-binary`"),
        "{}",
        stderr(&out)
    );
    assert!(d.agent_cgroups().is_empty());
}

#[test]
fn ps_and_inspect_show_what_is_running() {
    let d = TestDaemon::start(&[("open", OPEN)]);
    let mut client = d
        .agentd()
        .args([
            "run",
            "--profile",
            "open",
            "--name",
            "sleeper",
            "--allow-net",
            "192.0.2.1:443",
            "--",
            &act(),
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();

    let ps = d.agentd().args(["ps", "--json"]).output().unwrap();
    let agents: Value = serde_json::from_slice(&ps.stdout).unwrap();
    let a = &agents[0];
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    assert_eq!(a["name"], "sleeper");
    assert_eq!(a["user"], "nobody");
    assert_eq!(a["profile"], "open");
    assert_eq!(a["version"], "1.0.0");
    assert_eq!(a["mode"], "enforce");
    assert_eq!(a["processes"], 1);
    let pid = a["pid"].as_u64().unwrap();
    let human = String::from_utf8(d.agentd().arg("ps").output().unwrap().stdout).unwrap();
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("sleeper") && l.contains("open 1.0.0") && l.contains("nobody")),
        "{human}"
    );

    let inspect: Value = serde_json::from_slice(
        &d.agentd()
            .args(["inspect", "sleeper", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(inspect["policy"]["profile"], "open");
    assert_eq!(
        inspect["policy"]["adjustments"][0],
        "--allow-net 192.0.2.1:443"
    );
    assert_eq!(inspect["processes"][0]["pid"], pid);
    assert_eq!(inspect["processes"][0]["comm"], "agentd-act");
    assert_eq!(inspect["processes"][0]["uid"], 65534);
    let human = String::from_utf8(
        d.agentd()
            .args(["inspect", "sleeper"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for needle in [
        "agent     sleeper",
        "profile   open 1.0.0",
        "network   allow 192.0.2.1/32:443",
        "enforced  process: seccomp",
    ] {
        assert!(human.contains(needle), "inspect lacks {needle:?}:\n{human}");
    }
    let missing = d
        .agentd()
        .args(["inspect", "nobody-here"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("no agent named `nobody-here` is running")
    );

    // SAFETY: signals our own child.
    unsafe { libc::kill(client.id() as i32, libc::SIGINT) };
    assert_eq!(client.wait().unwrap().code(), Some(128 + libc::SIGINT));
    let ps = d.agentd().args(["ps", "--json"]).output().unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&ps.stdout).unwrap(),
        serde_json::json!([])
    );
}

#[test]
fn secrets_leave_the_environment_and_no_descriptor_is_inherited() {
    let d = TestDaemon::start(&[("open", OPEN)]);
    let out = d
        .agentd()
        .args([
            "run",
            "--profile",
            "open",
            "--name",
            "envcheck",
            "--",
            &act(),
            "env",
        ])
        .env("GITHUB_TOKEN", "ghp_secret")
        .env("AWS_SECRET_ACCESS_KEY", "aws_secret")
        .env("OPENAI_API_KEY", "sk-secret")
        .env("KEEP_ME", "visible")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let env = &last_json(&out)["detail"];
    for secret in ["GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY"] {
        assert!(env.get(secret).is_none(), "{secret} reached the agent");
    }
    assert_eq!(env["KEEP_ME"], "visible");
    assert_eq!(env["USER"], "nobody");
    assert_eq!(env["AGENTD_AGENT"], "envcheck");
    assert_eq!(
        env["TMPDIR"],
        d.dir.path().join("tmp/envcheck").display().to_string()
    );

    // A descriptor the client holds (not close-on-exec) must not reach the agent.
    let leak = std::fs::File::open("/etc/hostname").unwrap();
    use std::os::fd::AsRawFd as _;
    let fd = leak.as_raw_fd();
    let mut cmd = d.agentd();
    cmd.args(["run", "--profile", "open", "--", &act(), "fds"])
        .stdin(Stdio::null());
    // SAFETY: dup2 between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let fds: Vec<String> = serde_json::from_value(last_json(&out)["detail"].clone()).unwrap();
    // 0-2, plus the one agentd-act opens to list /proc/self/fd.
    assert_eq!(fds, vec!["0", "1", "2", "3"], "descriptors in the agent");
}

#[test]
fn exit_status_is_passed_through_and_an_unreachable_daemon_is_named() {
    let d = TestDaemon::start(&[("open", OPEN)]);
    let out = d.run(&["--profile", "open", "--", &act(), "exit", "7"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "agentd run prints nothing on success"
    );
    let out = d.run(&["--profile", "open", "--verbose", "--", &act(), "exit", "0"]);
    assert!(
        stderr(&out).contains("agentd: agent agent-"),
        "{}",
        stderr(&out)
    );

    let dir = TempDir::new("unreachable");
    let config = dir.write(
        "agentd.toml",
        &format!(
            "[daemon]\nsocket = \"{}/none.sock\"\n",
            dir.path().display()
        ),
    );
    let out = Command::new(agentd_tests::agentd_bin())
        .arg("--config")
        .arg(&config)
        .args(["run", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("cannot reach the agentd daemon at") && err.contains("systemctl start agentd"),
        "{err}"
    );
}
