//! Hot reload (`agentd reload`, SIGHUP) and audit mode: a running agent moves to its
//! profile's new version without a restart; a broken file, a restart-only key or rules
//! changed under the same version change nothing; a profile in audit mode reports what it
//! would deny and denies nothing.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use agentd_tests::{Probe, TestDaemon, act_bin, wait_until};
use serde_json::Value;

/// A loopback listener that never blocks on accept.
fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    l.set_nonblocking(true).expect("nonblocking");
    let addr = l.local_addr().expect("local addr");
    (l, addr)
}

/// Accepts the connections waiting; returns how many there were.
fn accepted(l: &TcpListener) -> usize {
    let mut n = 0;
    loop {
        match l.accept() {
            Ok(_) => n += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A profile named `name` at `version` allowing TCP to `allow` on loopback, files open.
fn profile(name: &str, version: &str, mode: &str, allow: &[SocketAddr]) -> String {
    let allow: Vec<String> = allow
        .iter()
        .map(|a| format!("\"127.0.0.1/32:{}/tcp\"", a.port()))
        .collect();
    format!(
        "name = \"{name}\"\nversion = \"{version}\"\nmode = \"{mode}\"\n\
         [network]\nallow = [{}]\n[files]\ndefault = \"allow\"\n",
        allow.join(", ")
    )
}

fn write_profile(d: &TestDaemon, name: &str, text: &str) {
    std::fs::write(d.dir.path().join(format!("profiles/{name}.toml")), text).unwrap();
}

/// `(ok, errno)` of a connect from the agent.
fn connect(agent: &mut Probe, to: SocketAddr) -> (bool, Option<i64>) {
    let v = agent.ask(&format!("connect {to}"));
    (v["ok"] == true, v["errno"].as_i64())
}

const DENIED: (bool, Option<i64>) = (false, Some(libc::EPERM as i64));
const ALLOWED: (bool, Option<i64>) = (true, None);

/// The agent's entry in `agentd ps --json`.
fn ps(d: &TestDaemon, agent: &str) -> Value {
    let out = cli(d, &["ps", "--json"]);
    assert!(out.status.success(), "ps: {out:?}");
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == agent))
        .cloned()
        .unwrap_or_else(|| panic!("agent {agent} not in ps: {all}"))
}

/// `agentd ARGS` against the test daemon, to completion.
fn cli(d: &TestDaemon, args: &[&str]) -> std::process::Output {
    d.agentd()
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run agentd")
}

fn records(d: &TestDaemon, kind: &str) -> Vec<Value> {
    d.audit_records()
        .into_iter()
        .filter(|r| r["kind"] == kind)
        .collect()
}

#[test]
fn a_running_agent_moves_to_a_new_profile_version_without_restart() {
    let (a, a_addr) = listener();
    let (b, b_addr) = listener();
    let act = act_bin!();
    let d = TestDaemon::start(&[
        ("p", &profile("p", "1.0.0", "enforce", &[a_addr])),
        ("q", &profile("q", "1.0.0", "enforce", &[a_addr])),
    ]);
    let mut agent = Probe::start(&d, &act, "p", "mover", &[]);
    let mut other = Probe::start(&d, &act, "q", "bystander", &[]);
    let pid = ps(&d, "mover")["pid"].clone();
    assert_eq!(connect(&mut agent, a_addr), ALLOWED);
    assert_eq!(connect(&mut agent, b_addr), DENIED);

    // Version 2 allows b and no longer a, and denies a file.
    write_profile(
        &d,
        "p",
        &format!(
            "{}deny = [\"/etc/hostname\"]\n",
            profile("p", "2.0.0", "enforce", &[b_addr])
        ),
    );
    let out = cli(&d, &["reload", "--json"]);
    assert!(out.status.success(), "reload: {out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let moved = |name: &str| {
        report["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["agent"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in the report: {report}"))
    };
    assert_eq!(
        (
            &moved("mover")["changed"],
            &moved("mover")["from"]["version"],
            &moved("mover")["to"]["version"]
        ),
        (
            &Value::Bool(true),
            &Value::from("1.0.0"),
            &Value::from("2.0.0")
        ),
        "{report}"
    );
    assert_eq!(moved("bystander")["changed"], false, "{report}");
    // Where Landlock enforces the file rules (no BPF LSM: this build host), they are those
    // of the agent's start, and the reload says so; `inspect` shows the rules that hold.
    let landlock_only = d.log().contains("BPF LSM is not usable here");
    let note = moved("mover")["note"].as_str().unwrap_or("").to_string();
    assert_eq!(
        note.contains("file rules stay as they were at its start"),
        landlock_only,
        "{report}"
    );
    let inspect = cli(&d, &["inspect", "mover", "--json"]);
    let inspect: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        inspect["policy"]["files"]["rules"]
            .as_object()
            .unwrap()
            .contains_key("/etc/hostname"),
        !landlock_only,
        "the file rules that hold"
    );
    // The same process, under the new rules.
    accepted(&b); // drained
    assert_eq!(connect(&mut agent, b_addr), ALLOWED);
    assert_eq!(connect(&mut agent, a_addr), DENIED);
    assert_eq!(
        accepted(&b),
        1,
        "the new version's destination got the connect"
    );
    assert_eq!(ps(&d, "mover")["pid"], pid, "not restarted");
    assert_eq!(ps(&d, "mover")["version"], "2.0.0");
    // The other agent's profile did not change: nor did its rules.
    assert_eq!(connect(&mut other, a_addr), ALLOWED);
    assert_eq!(connect(&mut other, b_addr), DENIED);
    let updates = records(&d, "policy_updated");
    assert_eq!(updates.len(), 1, "one agent moved: {updates:?}");
    let u = &updates[0];
    assert_eq!(
        (
            &u["agent"],
            &u["details"]["cause"],
            &u["details"]["from"]["version"],
            &u["details"]["to"]["version"],
            &u["version"]
        ),
        (
            &Value::from("mover"),
            &Value::from("reload"),
            &Value::from("1.0.0"),
            &Value::from("2.0.0"),
            &Value::from("2.0.0")
        ),
        "{u}"
    );
    assert_eq!(records(&d, "config_reloaded").len(), 1);

    // SIGHUP does the same: version 3 allows a again.
    write_profile(&d, "p", &profile("p", "3.0.0", "enforce", &[a_addr]));
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) }, 0);
    assert!(
        wait_until(Duration::from_secs(5), || ps(&d, "mover")["version"]
            == "3.0.0"),
        "SIGHUP moved the agent; log:\n{}",
        d.log()
    );
    assert_eq!(connect(&mut agent, a_addr), ALLOWED);
    assert_eq!(connect(&mut agent, b_addr), DENIED);
    assert_eq!(ps(&d, "mover")["pid"], pid);
    assert!(d.log().contains("SIGHUP: reloaded"), "{}", d.log());
    drop(a);
}

#[test]
fn a_reload_with_a_broken_profile_or_configuration_changes_nothing() {
    let (a, a_addr) = listener();
    let (b, b_addr) = listener();
    let act = act_bin!();
    let d = TestDaemon::start(&[
        ("p", &profile("p", "1.0.0", "enforce", &[a_addr])),
        ("q", &profile("q", "1.0.0", "enforce", &[a_addr])),
    ]);
    let mut agent = Probe::start(&d, &act, "p", "steady", &[]);
    let holds = |agent: &mut Probe, when: &str| {
        assert_eq!(connect(agent, a_addr), ALLOWED, "{when}");
        assert_eq!(connect(agent, b_addr), DENIED, "{when}");
        assert_eq!(ps(&d, "steady")["version"], "1.0.0", "{when}");
    };
    holds(&mut agent, "at start");
    let good_v2 = profile("p", "2.0.0", "enforce", &[a_addr, b_addr]);
    let config = std::fs::read_to_string(&d.config).unwrap();
    let refused = |what: &str, expect: &[&str]| {
        let out = cli(&d, &["reload"]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
        assert!(
            stderr.contains("reload refused, nothing was changed"),
            "{what}: {stderr}"
        );
        for e in expect {
            assert!(stderr.contains(e), "{what}: `{e}` not in: {stderr}");
        }
    };

    // 1. The agent's own profile: version 2 would allow b, but line 5 has a bad CIDR.
    let broken = good_v2.replace(
        "[network]\nallow = [",
        "[network]\nallow = [\"10.0.0.300/8\", ",
    );
    write_profile(&d, "p", &broken);
    refused(
        "a bad CIDR",
        &["p.toml:5:", "network.allow", "10.0.0.300/8"],
    );
    holds(&mut agent, "after a profile with a bad CIDR");
    // 2. Its profile is fine, but another profile in the directory is not.
    write_profile(&d, "p", &good_v2);
    write_profile(
        &d,
        "q",
        "name = \"q\"\nversion = \"1.0.0\"\nmode = \"enforce\"\nbogus = 1\n",
    );
    refused("another profile broken", &["q.toml:4:", "bogus"]);
    holds(&mut agent, "after another profile was broken");
    write_profile(&d, "q", &profile("q", "1.0.0", "enforce", &[a_addr]));
    // 3. Rules changed under the same version.
    write_profile(
        &d,
        "p",
        &profile("p", "1.0.0", "enforce", &[a_addr, b_addr]),
    );
    refused("same version", &["p.toml: version:", "new version"]);
    holds(&mut agent, "after rules changed under the same version");
    // 4. A key only a restart can change, next to a valid new profile version.
    write_profile(&d, "p", &good_v2);
    let port = dns_port(&config);
    std::fs::write(
        &d.config,
        config.replace(
            &format!("port = {port}\n"),
            &format!("port = {}\n", port + 1),
        ),
    )
    .unwrap();
    refused("dns.port", &["dns.port", "restart"]);
    holds(&mut agent, "after a restart-only key changed");
    // 5. A configuration that does not parse.
    std::fs::write(
        &d.config,
        config.replace("[agents]\n", "[agents]\nmax = \"many\"\n"),
    )
    .unwrap();
    // (The CLI reads the configuration first, to find the socket: it refuses it itself.)
    let out = cli(&d, &["reload"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("agentd.toml:9:7: agents.max:"), "{stderr}");
    // (Neither can `agentd ps`: the version is checked once the configuration is back.)
    assert_eq!(connect(&mut agent, b_addr), DENIED);
    // SIGHUP with the same broken configuration: refused, the daemon runs on.
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) }, 0);
    assert!(
        wait_until(Duration::from_secs(5), || d
            .log()
            .contains("SIGHUP: reload refused")),
        "{}",
        d.log()
    );
    assert!(!d.exited());
    assert_eq!(connect(&mut agent, a_addr), ALLOWED);
    assert_eq!(connect(&mut agent, b_addr), DENIED);
    assert_eq!(accepted(&b), 0, "the denied listener received nothing");
    assert!(records(&d, "policy_updated").is_empty());
    assert_eq!(records(&d, "reload_refused").len(), 5);

    // With the configuration put back, the same version 2 goes through.
    std::fs::write(&d.config, &config).unwrap();
    assert_eq!(ps(&d, "steady")["version"], "1.0.0");
    let out = cli(&d, &["reload"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("steady: p 1.0.0 -> p 2.0.0"), "{text}");
    assert_eq!(connect(&mut agent, b_addr), ALLOWED);
    drop(a);
}

/// The `[dns]` port the test daemon's configuration sets.
fn dns_port(config: &str) -> u16 {
    config
        .lines()
        .find_map(|l| l.strip_prefix("port = "))
        .and_then(|p| p.trim().parse().ok())
        .expect("the test configuration sets dns.port")
}

/// A profile in audit mode: what it would deny is logged as would-deny, and nothing is
/// denied. A new version tried that way on a live agent then enforces after a reload.
#[test]
fn audit_mode_logs_would_deny_and_denies_nothing() {
    let (a, a_addr) = listener();
    let (b, b_addr) = listener();
    let act = act_bin!();
    let d = TestDaemon::start(&[
        ("shadow", &profile("shadow", "1.0.0", "audit", &[a_addr])),
        ("p", &profile("p", "1.0.0", "enforce", &[a_addr, b_addr])),
    ]);
    // Started in audit mode: the connect to b goes through, and is logged as would-deny.
    let mut shadow = Probe::start(&d, &act, "shadow", "shadow", &[]);
    assert_eq!(connect(&mut shadow, b_addr), ALLOWED);
    assert_eq!(accepted(&b), 1, "the connect reached the listener");
    let would = |d: &TestDaemon, agent: &str, to: SocketAddr| {
        records(d, "would_deny").into_iter().any(|r| {
            r["agent"] == agent
                && r["details"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(&to.to_string()))
        })
    };
    assert!(
        wait_until(Duration::from_secs(3), || would(&d, "shadow", b_addr)),
        "no would_deny record: {:?}",
        d.audit_records()
    );
    assert!(records(&d, "net_denied").is_empty(), "nothing was denied");
    // On this host (Landlock, no BPF LSM) it cannot be moved to enforce while it runs: it
    // has no Landlock domain, and its file rules could not be enforced. Refused, unchanged.
    write_profile(
        &d,
        "shadow",
        &profile("shadow", "1.1.0", "enforce", &[a_addr]),
    );
    let out = cli(&d, &["reload"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("started in audit mode"),
        "{out:?}"
    );
    assert_eq!(connect(&mut shadow, b_addr), ALLOWED);
    write_profile(
        &d,
        "shadow",
        &profile("shadow", "1.0.0", "audit", &[a_addr]),
    );

    // An enforcing agent tries version 2 (narrower: a only) in audit mode ...
    let mut live = Probe::start(&d, &act, "p", "live", &[]);
    write_profile(&d, "p", &profile("p", "2.0.0", "audit", &[a_addr]));
    let out = cli(&d, &["reload"]);
    assert!(out.status.success(), "{out:?}");
    accepted(&b); // drained
    assert_eq!(
        connect(&mut live, b_addr),
        ALLOWED,
        "audit mode denies nothing"
    );
    assert_eq!(accepted(&b), 1);
    assert!(
        wait_until(Duration::from_secs(3), || would(&d, "live", b_addr)),
        "no would_deny record for the trial version"
    );
    // ... then enforces it.
    write_profile(&d, "p", &profile("p", "2.0.1", "enforce", &[a_addr]));
    let out = cli(&d, &["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(connect(&mut live, b_addr), DENIED);
    assert_eq!(connect(&mut live, a_addr), ALLOWED);
    assert_eq!(accepted(&b), 0, "the denied connect did not arrive");
    assert!(
        wait_until(Duration::from_secs(3), || records(&d, "net_denied")
            .iter()
            .any(|r| r["agent"] == "live" && r["version"] == "2.0.1")),
        "the denial names the enforcing version"
    );
    assert_eq!(ps(&d, "live")["mode"], "enforce");
    drop(a);
}
