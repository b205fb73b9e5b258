//! The kill switch: `agentd kill` ends a fork bomb that double-forks and calls setsid,
//! `--all` takes 20 agents, `--freeze`/`thaw` stop and resume an agent, `--direct` works
//! with the daemon stopped or dead, SIGUSR1 to the daemon kills every agent, and an agent
//! can neither signal the daemon nor write its own cgroup's files.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use agentd_tests::{TestDaemon, act_bin, wait_until};
use serde_json::Value;

fn act() -> String {
    act_bin!().display().to_string()
}

const PLAIN: &str = "name = \"plain\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n";

/// Starts `agentd run --name NAME -- ARGS...` and waits for its first line of output.
fn start(d: &TestDaemon, name: &str, args: &[&str]) -> (Child, String) {
    let mut child = d
        .agentd()
        .args(["run", "--profile", "plain", "--name", name, "--"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

fn kill_json(d: &TestDaemon, args: &[&str]) -> (std::process::Output, Value) {
    let out = d
        .agentd()
        .arg("kill")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, v)
}

/// Processes whose command line holds `marker`, anywhere on the host.
fn survivors(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == marker.as_bytes()))
        })
        .collect()
}

#[test]
fn a_fork_bomb_that_double_forks_and_calls_setsid_is_fully_dead_after_kill() {
    let d = TestDaemon::start(&[("plain", PLAIN)]);
    // The marker is the agent's name, also its program's last argument (kept by forks).
    let marker = format!("bomb-{}", std::process::id());
    let (mut client, line) = start(&d, &marker, &[&act(), "fork-bomb", "1000"]);
    let created: Value = serde_json::from_str(&line).unwrap();
    assert!(
        created["detail"]["created"].as_u64().unwrap() >= 1000,
        "{created}"
    );
    // Children fork their grandchildren on their own time: wait until 1,000 are there
    // (and more, still forking).
    let procs = d.root.join(&marker).join("cgroup.procs");
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&procs).is_ok_and(|t| t.lines().count() >= 1000)
        }),
        "the bomb reached 1,000 processes"
    );
    let start = Instant::now();
    let (out, v) = kill_json(&d, &[&marker]);
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = &v["outcomes"][0];
    assert_eq!(o["agent"], marker.as_str());
    assert!(o["error"].is_null(), "{o}");
    assert!(o["processes"].as_u64().unwrap() >= 1000, "{o}");
    eprintln!(
        "kill of {} processes: {} ms in the daemon, {took:?} for `agentd kill`",
        o["processes"], o["millis"]
    );
    assert!(!d.root.join(&marker).exists(), "the agent's cgroup is gone");
    assert!(
        wait_until(Duration::from_secs(5), || survivors(&marker).is_empty()),
        "no survivors in /proc: {:?}",
        survivors(&marker)
    );
    let status = client.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGKILL),
        "the run client reports the kill"
    );
    assert!(d.log().contains("kill switch: killed"), "{}", d.log());
    let ended: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["agent"] == marker.as_str() && r["kind"] == "agent_ended")
        .collect();
    assert_eq!(ended.len(), 1);
    assert_eq!(
        (
            &ended[0]["details"]["killed"],
            &ended[0]["details"]["killed_by"]
        ),
        (&Value::Bool(true), &Value::from("kill switch")),
        "{}",
        ended[0]
    );
}

#[test]
fn kill_all_takes_all_of_20_agents() {
    let d = TestDaemon::start(&[("plain", PLAIN)]);
    let act = act();
    let clients: Vec<Child> = (0..20)
        .map(|i| start(&d, &format!("a{i}"), &[&act, "spawn-hold", "2", "60"]).0)
        .collect();
    assert_eq!(d.agent_cgroups().len(), 20);
    let (out, v) = kill_json(&d, &["--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcomes = v["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 20, "{v}");
    assert!(
        outcomes
            .iter()
            .all(|o| o["error"].is_null() && o["processes"] == 3),
        "{v}"
    );
    assert!(d.agent_cgroups().is_empty(), "{:?}", d.agent_cgroups());
    for mut c in clients {
        assert_eq!(c.wait().unwrap().code(), Some(128 + libc::SIGKILL));
    }
}

#[test]
fn freeze_holds_an_agent_until_thaw() {
    let d = TestDaemon::start(&[("plain", PLAIN)]);
    let (mut client, _) = start(&d, "ice", &[&act(), "spawn-hold", "1", "60"]);
    let events = d.root.join("ice/cgroup.events");
    let frozen = || {
        std::fs::read_to_string(&events)
            .unwrap()
            .contains("frozen 1")
    };
    let (out, v) = kill_json(&d, &["--freeze", "ice"]);
    assert!(
        out.status.success() && v["outcomes"][0]["action"] == "freeze",
        "{v}"
    );
    assert!(frozen(), "frozen, and it is still there");
    let out = d.agentd().args(["thaw", "ice"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("thawed ice: 2 processes"));
    assert!(!frozen());
    let (_, v) = kill_json(&d, &["ice"]);
    assert_eq!(v["outcomes"][0]["action"], "kill", "{v}");
    let _ = client.wait();
    // An unknown agent is an error that names it.
    let (out, v) = kill_json(&d, &["nobody-here"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        v["outcomes"][0]["error"]
            .as_str()
            .unwrap()
            .contains("nobody-here"),
        "{v}"
    );
}

#[test]
fn the_direct_path_works_with_the_daemon_stopped_and_with_it_killed() {
    let d = TestDaemon::start(&[("plain", PLAIN)]);
    let pid = d.pid() as i32;
    let (mut first, _) = start(&d, "first", &[&act(), "spawn-hold", "3", "60"]);
    // Stopped: the daemon takes no request; after its timeout the CLI acts itself.
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let start_t = Instant::now();
    let (out, v) = kill_json(&d, &["first"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(out.status.success(), "{stderr}{v}");
    assert!(
        stderr.contains("acting on the agent cgroups directly"),
        "{stderr}"
    );
    assert_eq!(v["outcomes"][0]["processes"], 4, "{v}");
    assert!(!d.root.join("first").exists());
    eprintln!(
        "direct kill with the daemon stopped: {:?} (timeout included)",
        start_t.elapsed()
    );
    assert_eq!(first.wait().unwrap().code(), Some(128 + libc::SIGKILL));
    // The daemon, resumed, forgets the agent and goes on.
    assert!(wait_until(Duration::from_secs(5), || {
        let out = d.agentd().args(["ps", "--json"]).output().unwrap();
        !String::from_utf8_lossy(&out.stdout).contains("\"first\"")
    }));
    // Killed: --direct needs nothing from it.
    let (_second, _) = start(&d, "second", &[&act(), "spawn-hold", "2", "60"]);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(5), || d.exited()));
    let (out, v) = kill_json(&d, &["--all", "--direct"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["outcomes"][0]["agent"], "second", "{v}");
    assert_eq!(v["outcomes"][0]["processes"], 3, "{v}");
    assert!(d.agent_cgroups().is_empty());
    // Both direct kills are in the audit log, in the same chain as the daemon's records
    // (checked when `d` ends), with the agent's profile from the daemon's record of it.
    let records = d.audit_records();
    for agent in ["first", "second"] {
        let kills: Vec<&Value> = records
            .iter()
            .filter(|r| r["agent"] == agent && r["kind"] == "kill")
            .collect();
        assert_eq!(kills.len(), 1, "{agent}");
        assert_eq!(kills[0]["details"]["direct"], true, "{}", kills[0]);
        assert_eq!(kills[0]["profile"], "plain", "{}", kills[0]);
    }
}

#[test]
fn sigusr1_to_the_daemon_kills_every_agent() {
    let d = TestDaemon::start(&[("plain", PLAIN)]);
    let act = act();
    let clients: Vec<Child> = (0..3)
        .map(|i| start(&d, &format!("u{i}"), &[&act, "spawn-hold", "1", "60"]).0)
        .collect();
    // SAFETY: signals our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGUSR1) };
    assert!(wait_until(Duration::from_secs(10), || d
        .agent_cgroups()
        .is_empty()));
    for mut c in clients {
        assert_eq!(c.wait().unwrap().code(), Some(128 + libc::SIGKILL));
    }
    assert!(!d.exited(), "the daemon goes on");
    assert!(d.log().contains("SIGUSR1"), "{}", d.log());
}

/// An agent (root, the strongest there is, on this host without BPF LSM) cannot kill,
/// stop or ptrace the daemon, write its own cgroup's files, remove or rename agentd's pins
/// and records, or read the records and the audit log (nor so take the log's lock).
#[test]
fn an_agent_cannot_signal_or_trace_the_daemon_or_undo_its_containment() {
    hostile_agent_is_held(&[]);
}

/// The same in audit mode, where nothing its profile says is denied: agentd's own paths
/// and processes still are.
#[test]
fn an_agent_in_audit_mode_cannot_undo_its_containment_either() {
    hostile_agent_is_held(&["--audit"]);
}

fn hostile_agent_is_held(flags: &[&str]) {
    let d = TestDaemon::start(&[("plain", PLAIN)]);
    let cg = d.root.join("hostile");
    let links = d.bpffs.join("links");
    let script = format!(
        "kill -9 {pid}; echo \"kill rc=$?\"; kill -STOP {pid}; echo \"stop rc=$?\"; \
         {act} ptrace {pid}; \
         echo 1 > {cg}/cgroup.kill; echo \"cgroup.kill rc=$?\"; \
         echo $$ > {root}/cgroup.procs; echo \"move rc=$?\"; \
         echo 1 > {cg}/cgroup.freeze; echo \"freeze rc=$?\"; \
         rm {links}/connect4; echo \"unpin rc=$?\"; \
         mv {links}/skb_egress {links}/gone; echo \"rename pin rc=$?\"; \
         rm {bpffs}/maps/AGENTS; echo \"unpin map rc=$?\"; \
         rm {records}/hostile.json; echo \"record rc=$?\"; \
         ls {records}; echo \"list records rc=$?\"; \
         cat {audit}; echo \"read audit rc=$?\"; \
         cat {audit}.lock; echo \"open audit lock rc=$?\"",
        pid = d.pid(),
        act = act(),
        cg = cg.display(),
        root = d.root.display(),
        links = links.display(),
        bpffs = d.bpffs.display(),
        records = d.dir.path().join("agents").display(),
        audit = d.audit_path().display(),
    );
    let out = d.run(
        &[
            "--profile",
            "plain",
            "--name",
            "hostile",
            "--user",
            "root",
            "--degraded-ok",
        ]
        .iter()
        .chain(flags)
        .chain(&["--", "/bin/sh", "-c", &script])
        .copied()
        .collect::<Vec<_>>(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for what in [
        "kill",
        "stop",
        "cgroup.kill",
        "move",
        "freeze",
        "unpin",
        "rename pin",
        "unpin map",
        // (The record exists while the agent runs: it is written before the spawn.)
        "record",
        "list records",
        "read audit",
        "open audit lock",
    ] {
        assert!(
            text.contains(&format!("{what} rc=1")) || text.contains(&format!("{what} rc=2")),
            "{what} must fail:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ptrace: Value = text
        .lines()
        .find(|l| l.contains("\"op\":\"ptrace\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("the ptrace attempt reported:\n{text}"));
    assert_eq!(ptrace["ok"], false, "ptrace must fail: {ptrace}");
    for pin in [
        links.join("connect4"),
        links.join("skb_egress"),
        d.bpffs.join("maps/AGENTS"),
    ] {
        assert!(pin.exists(), "{} is still pinned", pin.display());
    }
    assert!(!d.exited(), "the daemon is alive");
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert!(
        status.lines().any(|l| l == "TracerPid:\t0"),
        "and not traced: {status}"
    );
    let out = d.agentd().args(["ps"]).output().unwrap();
    assert!(out.status.success(), "and answers");
}

/// Fails closed: with the daemon killed (SIGKILL), its pinned links keep the agent's egress
/// allowlist in force, and Landlock its file rules. A restarted daemon without the agent's
/// record refuses to start; with it, it adopts the agent (same policy, new programs in the
/// same links), lists it and kills it.
#[test]
fn a_running_agent_stays_contained_after_the_daemon_is_killed_and_a_new_daemon_adopts_it() {
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    denied.set_nonblocking(true).unwrap();
    let files = agentd_tests::TempDir::new("failclosed");
    let secret = files.write("secret", "s3cret");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let profile = format!(
        "name = \"plain\"\nversion = \"1.0.0\"\n[network]\nallow = [\"127.0.0.1/32:{}\"]\n\
         [files]\ndefault = \"allow\"\ndeny = [\"{}\"]\n",
        allowed.local_addr().unwrap().port(),
        secret.display()
    );
    let mut d = TestDaemon::start(&[("plain", &profile)]);
    let mut agent = agentd_tests::Probe::start(&d, &act_bin!(), "plain", "probe", &[]);
    let (allowed_addr, denied_addr) = (allowed.local_addr().unwrap(), denied.local_addr().unwrap());
    let probe = |agent: &mut agentd_tests::Probe, when: &str| {
        let v = agent.ask(&format!("connect {allowed_addr}"));
        assert_eq!(v["ok"], true, "{when}: the allowed connect: {v}");
        let v = agent.ask(&format!("connect {denied_addr}"));
        assert_eq!(
            (&v["ok"], &v["errno"]),
            (&Value::Bool(false), &Value::from(libc::EPERM)),
            "{when}: {v}"
        );
        let v = agent.ask(&format!("open {}", secret.display()));
        assert_eq!(
            (&v["ok"], &v["errno"]),
            (&Value::Bool(false), &Value::from(libc::EACCES)),
            "{when}: {v}"
        );
    };
    probe(&mut agent, "with the daemon");
    // SAFETY: signals our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(5), || d.exited()));
    // Links whose last holder is gone are released a moment later: look again after it.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        probe(&mut agent, "after the daemon was killed");
    }
    assert!(
        matches!(denied.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the denied listener received nothing"
    );

    // A daemon without the agent's record refuses to start and changes nothing.
    let record = d.dir.path().join("agents/probe.json");
    let away = d.dir.path().join("probe.json.away");
    std::fs::rename(&record, &away).expect("the daemon keeps a record of the agent");
    let log = d
        .restart()
        .expect_err("no record: the daemon must refuse to start");
    assert!(log.contains("no record of (probe)"), "{log}");
    assert!(
        d.root.join("probe").exists(),
        "the agent's cgroup is left as it was"
    );
    probe(&mut agent, "after a refused start");

    // With it, the restarted daemon adopts the agent: the pinned cgroup links get the new
    // build's programs in place (same link, new program), and the policy goes on.
    std::fs::rename(&away, &record).unwrap();
    let links = d.bpffs.join("links");
    let link = |name: &str| {
        let l = aya::programs::links::FdLink::from(
            aya::programs::links::PinnedLink::from_pin(links.join(name)).unwrap(),
        );
        let info = l.info().unwrap();
        (info.id(), info.program_id())
    };
    let before = link("connect4");
    d.restart().expect("the daemon adopts the agent");
    let after = link("connect4");
    assert_eq!(before.0, after.0, "the same link");
    assert_ne!(before.1, after.1, "runs the new program");
    let log = d.log();
    assert!(log.contains("adopted agent probe"), "{log}");
    assert!(log.contains("BPF_LINK_UPDATE"), "{log}");
    let ps = d.agentd().args(["ps", "--json"]).output().unwrap();
    let agents: Value = serde_json::from_slice(&ps.stdout).unwrap();
    let listed = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "probe")
        .unwrap_or_else(|| panic!("ps lists the adopted agent: {agents}"));
    assert_eq!(listed["processes"], 1, "{listed}");
    probe(&mut agent, "after the restart");
    assert!(
        matches!(denied.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the denied listener received nothing"
    );

    // And kills it.
    let (out, v) = kill_json(&d, &["probe"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = &v["outcomes"][0];
    assert_eq!(
        (&o["agent"], &o["processes"]),
        (&Value::from("probe"), &Value::from(1)),
        "{v}"
    );
    assert!(o["error"].is_null(), "{o}");
    assert!(!d.root.join("probe").exists(), "the agent's cgroup is gone");
    assert!(!record.exists(), "its record is gone");
    let _ = agent.child.wait();
}

/// `daemon.on_stop = "keep"`: a stop leaves the agents running, contained by the pins, and
/// the next daemon (an upgrade) adopts them; with no agent left, a stop cleans up as ever.
#[test]
fn a_stop_with_on_stop_keep_leaves_agents_to_the_next_daemon() {
    let mut d = TestDaemon::with(agentd_tests::DaemonSetup {
        profiles: &[("plain", PLAIN)],
        daemon_config: "on_stop = \"keep\"",
        ..Default::default()
    });
    let (mut client, _) = start(&d, "kept", &[&act(), "sleep", "600"]);
    // SAFETY: signals our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
    assert!(wait_until(Duration::from_secs(10), || d.exited()));
    assert!(d.log().contains("1 agents run on"), "{}", d.log());
    let procs = std::fs::read_to_string(d.root.join("kept/cgroup.procs")).unwrap();
    assert_eq!(procs.lines().count(), 1, "the agent runs on: {procs}");
    assert!(d.bpffs.join("links/connect4").exists(), "its pins stay");
    d.restart().expect("the next daemon adopts the agent");
    assert!(d.log().contains("adopted agent kept"), "{}", d.log());
    let (out, v) = kill_json(&d, &["kept"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["outcomes"][0]["processes"], 1, "{v}");
    assert!(!d.root.join("kept").exists());
    let _ = client.wait();
    // No agent left: a stop removes the agent root and the pins.
    // SAFETY: signals our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
    assert!(wait_until(Duration::from_secs(10), || d.exited()));
    assert!(!d.root.exists(), "the agent root is removed");
    assert!(!d.bpffs.exists(), "the pins are removed");
}

/// A second daemon on the same configuration refuses to start before it touches anything:
/// the running daemon's pins, agents and records stay as they are.
#[test]
fn a_second_daemon_leaves_the_running_one_alone() {
    let d = TestDaemon::start(&[("plain", PLAIN)]);
    let link = d.bpffs.join("links/connect4");
    let id =
        |p: &std::path::Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let second = || {
        let out = d.agentd().arg("daemon").output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("another agentd daemon is running"), "{err}");
    };
    // Without agents, and with one.
    let before = id(&link).unwrap();
    second();
    assert_eq!(id(&link).ok(), Some(before), "the pin is the same");
    let (mut client, _) = start(&d, "first", &[&act(), "sleep", "600"]);
    second();
    assert_eq!(id(&link).ok(), Some(before), "the pin is the same");
    assert!(
        d.dir.path().join("agents/first.json").exists(),
        "the record stays"
    );
    let procs = std::fs::read_to_string(d.root.join("first/cgroup.procs")).unwrap();
    assert_eq!(procs.lines().count(), 1, "the agent runs on");
    let (out, v) = kill_json(&d, &["first"]);
    assert!(out.status.success(), "{v}");
    let _ = client.wait();
}

/// An agent frozen with `--direct` (which the daemon's record does not know of) stays
/// frozen when a restarted daemon adopts it, until `agentd thaw`.
#[test]
fn an_adopted_frozen_agent_stays_frozen_until_thawed() {
    let mut d = TestDaemon::start(&[("plain", PLAIN)]);
    let (mut client, _) = start(&d, "iced", &[&act(), "sleep", "600"]);
    let (out, v) = kill_json(&d, &["iced", "--freeze", "--direct"]);
    assert!(out.status.success(), "{v}");
    // SAFETY: signals our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    d.restart().expect("the daemon adopts the frozen agent");
    let frozen = || {
        std::fs::read_to_string(d.root.join("iced/cgroup.events"))
            .unwrap()
            .contains("frozen 1")
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(frozen(), "still frozen after the adoption:\n{}", d.log());
    assert!(d.log().contains("agent iced is frozen"), "{}", d.log());
    let out = d
        .agentd()
        .args(["thaw", "iced", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_until(Duration::from_secs(5), || !frozen()));
    let (out, v) = kill_json(&d, &["iced"]);
    assert!(out.status.success(), "{v}");
    let _ = client.wait();
}
