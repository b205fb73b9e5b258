//! The audit trail: every denial in the audit log once, with its agent; `audit verify` on
//! real logs, tampered three ways; the chain across rotation and a restart; allowed DNS
//! answers aggregated while refusals are kept; /metrics; `events --follow`.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, TcpListener},
    process::Stdio,
    time::{Duration, Instant},
};

use agentd_tests::{DaemonSetup, FakeDns, TempDir, TestDaemon, act_bin, wait_until};
use serde_json::Value;

fn act() -> String {
    act_bin!().display().to_string()
}

/// A profile that allows `port` on 127.0.0.1 and every file but `secret`.
fn profile(port: u16, secret: &std::path::Path) -> String {
    format!(
        "name = \"plain\"\nversion = \"1.2.3\"\n[network]\nallow = [\"127.0.0.1/32:{port}\"]\n\
         [files]\ndefault = \"allow\"\ndeny = [\"{}\"]\n",
        secret.display()
    )
}

/// The value of one metric series in a /metrics text (`name{labels}` as written there).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn of<'a>(records: &'a [Value], agent: &str, kind: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["agent"] == agent && r["kind"] == kind)
        .collect()
}

/// `agentd run --profile PROFILE --name NAME -- /bin/sh -c SCRIPT`, which must succeed.
fn sh(d: &TestDaemon, profile: &str, name: &str, script: &str) {
    let out = d.run(&[
        "--profile",
        profile,
        "--name",
        name,
        "--",
        "/bin/sh",
        "-c",
        script,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn secret_file(dir: &TempDir) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let secret = dir.write("secret", "s3cret");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    secret
}

#[test]
fn every_denial_and_kill_is_in_the_audit_log_once_and_in_the_metrics() {
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, dn) = (allowed.local_addr().unwrap(), denied.local_addr().unwrap());
    let dir = TempDir::new("audit-denials");
    let secret = secret_file(&dir);
    let d = TestDaemon::start(&[("plain", &profile(a.port(), &secret))]);
    let act = act();
    let script = format!(
        "{act} connect {dn}; {act} connect {dn}; {act} open {s} read; {act} connect {a}",
        s = secret.display()
    );
    sh(&d, "plain", "auditee", &script);
    // The agent's end is recorded by its teardown; its denials come from the kernel
    // through the ring buffer: wait for both.
    let secret_path = secret.display().to_string();
    assert!(wait_until(Duration::from_secs(5), || {
        let r = d.audit_records();
        of(&r, "auditee", "agent_ended").len() == 1
            && of(&r, "auditee", "net_denied").len() >= 2
            && of(&r, "auditee", "file_denied")
                .iter()
                .any(|f| f["details"]["path"] == secret_path.as_str())
    }));
    std::thread::sleep(Duration::from_millis(300));
    let records = d.audit_records();
    let net = of(&records, "auditee", "net_denied");
    assert_eq!(net.len(), 2, "each denied connect once");
    for r in &net {
        assert_eq!(
            (&r["profile"], &r["version"]),
            (&Value::from("plain"), &Value::from("1.2.3"))
        );
        let text = r["details"]["text"].as_str().unwrap();
        assert!(text.contains(&dn.to_string()), "{text}");
        assert_eq!(r["details"]["comm"], "agentd-act", "{r}");
    }
    // (The dynamic loader's probes of library paths this test's environment names, which
    // the agent's user may not enter, are file denials too: look at the secret's.)
    let file: Vec<&Value> = of(&records, "auditee", "file_denied")
        .into_iter()
        .filter(|r| r["details"]["path"] == secret_path.as_str())
        .collect();
    assert_eq!(file.len(), 1, "the denied open of the secret, once");
    assert_eq!(file[0]["details"]["comm"], "agentd-act");
    assert!(
        !records.iter().any(|r| r["details"]["text"]
            .as_str()
            .is_some_and(|t| t.contains(&a.to_string()))),
        "the allowed connect is no denial"
    );
    assert_eq!(of(&records, "auditee", "agent_started").len(), 1);

    // A kill is on disk when the command returns.
    let mut sleeper = d
        .agentd()
        .args(["run", "--profile", "plain", "--name", "victim", "--"])
        .args([&act, "sleep", "600"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(sleeper.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let out = d
        .agentd()
        .args(["kill", "victim", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let kills = of(&d.audit_records(), "victim", "kill")
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(kills.len(), 1, "written before `agentd kill` returned");
    assert_eq!(kills[0]["details"]["processes"], 1, "{}", kills[0]);
    let _ = sleeper.wait();

    let m = d.metrics();
    assert!(m.contains("# TYPE agentd_decisions_total counter"), "{m}");
    assert_eq!(
        metric(&m, "agentd_decisions_total{kind=\"net\",verdict=\"deny\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "agentd_decisions_total{kind=\"file\",verdict=\"deny\"}"),
        d.audit_records()
            .iter()
            .filter(|r| r["kind"] == "file_denied")
            .count() as f64,
        "each file denial counted once"
    );
    assert_eq!(metric(&m, "agentd_kill_switch_total{action=\"kill\"}"), 1.0);
    assert_eq!(metric(&m, "agentd_kill_duration_seconds_count"), 1.0);
    assert_eq!(metric(&m, "agentd_agents_started_total"), 2.0);
    assert_eq!(metric(&m, "agentd_agents_running"), 0.0);
    assert_eq!(metric(&m, "agentd_events_lost_total"), 0.0);
    assert_eq!(
        metric(
            &m,
            "agentd_enforcer_active{area=\"files\",enforcer=\"landlock\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "agentd_audit_records_total"),
        d.audit_records().len() as f64
    );
    // No agent names in labels: the series do not grow with agents.
    assert!(!m.contains("auditee") && !m.contains("victim"), "{m}");
}

/// Copies `lines` of a log into a file of its own and runs `agentd audit verify --json`.
fn verify(d: &TestDaemon, dir: &TempDir, name: &str, lines: &[&str]) -> (i32, Value) {
    let path = dir.write(name, &(lines.join("\n") + "\n"));
    let out = d
        .agentd()
        .args(["audit", "verify", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

#[test]
fn audit_verify_passes_a_real_log_and_pinpoints_a_changed_byte_a_deleted_line_and_a_swapped_pair() {
    let dir = TempDir::new("audit-verify");
    let secret = secret_file(&dir);
    let d = TestDaemon::start(&[("plain", &profile(9, &secret))]);
    let script = format!(
        "{a} connect 127.0.0.1:7; {a} open {s} read",
        a = act(),
        s = secret.display()
    );
    for name in ["one", "two", "three"] {
        sh(&d, "plain", name, &script);
    }
    assert!(wait_until(Duration::from_secs(5), || d
        .audit_records()
        .len()
        >= 12));
    let out = d.agentd().args(["audit", "verify"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("audit: ok: "),
        "{text}"
    );

    let log = std::fs::read_to_string(d.audit_path()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 12);
    let (code, v) = verify(&d, &dir, "whole", &lines);
    assert_eq!((code, &v["ok"]), (0, &Value::Bool(true)), "{v}");
    assert_eq!(v["records"], lines.len());

    // One byte changed in record 5: a digit of its time.
    let mut changed: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let at = changed[4].find("\"time\":\"").unwrap() + 9;
    let mut bytes = changed[4].clone().into_bytes();
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    changed[4] = String::from_utf8(bytes).unwrap();
    let refs: Vec<&str> = changed.iter().map(String::as_str).collect();
    let (code, v) = verify(&d, &dir, "changed", &refs);
    assert_eq!(code, 1);
    assert_eq!(
        (&v["problem"]["line"], &v["problem"]["what"]),
        (&Value::from(5), &Value::from("changed")),
        "{v}"
    );
    assert_eq!(v["problem"]["seq"], 5);

    // Line 6 (record 6) deleted.
    let mut deleted = lines.clone();
    deleted.remove(5);
    let (code, v) = verify(&d, &dir, "deleted", &deleted);
    assert_eq!(code, 1);
    assert_eq!(
        (&v["problem"]["line"], &v["problem"]["what"]),
        (&Value::from(6), &Value::from("removed")),
        "{v}"
    );
    assert_eq!(
        v["problem"]["seq"], 7,
        "record 7 now stands where 6 was: {v}"
    );

    // Records 8 and 9 swapped.
    let mut swapped = lines.clone();
    swapped.swap(7, 8);
    let (code, v) = verify(&d, &dir, "swapped", &swapped);
    assert_eq!(code, 1);
    assert_eq!(
        (&v["problem"]["line"], &v["problem"]["what"]),
        (&Value::from(8), &Value::from("reordered")),
        "{v}"
    );

    // The human form names the file and line.
    let out = d
        .agentd()
        .args(["audit", "verify"])
        .arg(dir.path().join("deleted"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAILED at ")
            && text.contains("deleted:6:")
            && text.contains("record 6 was removed"),
        "{text}"
    );
}

#[test]
fn the_chain_survives_rotation_and_a_daemon_restart() {
    let dir = TempDir::new("audit-rotate");
    let secret = secret_file(&dir);
    let mut d = TestDaemon::with(DaemonSetup {
        profiles: &[("plain", &profile(9, &secret))],
        audit_config: "max_bytes = 65536\nkeep = 50",
        ..Default::default()
    });
    let script = format!(
        "for i in 1 2 3 4 5 6 7 8; do {a} connect 127.0.0.1:7; done",
        a = act()
    );
    sh(&d, "plain", "before", &script);
    assert!(wait_until(Duration::from_secs(5), || {
        of(&d.audit_records(), "before", "agent_ended").len() == 1
    }));
    // SAFETY: signals our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
    d.restart().expect("the daemon starts again");
    sh(&d, "plain", "after", &script);
    assert!(wait_until(Duration::from_secs(5), || {
        of(&d.audit_records(), "after", "agent_ended").len() == 1
    }));
    let files = agentd::audit::files_of(&d.audit_path());
    assert!(files.len() >= 3, "rotated by size: {files:?}");
    let out = d
        .agentd()
        .args(["audit", "verify", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{v}");
    assert_eq!(v["first_seq"], 1, "{v}");
    assert_eq!(v["records"], v["last_seq"], "no gap: {v}");
    let all = d.audit_records();
    let kinds: Vec<&str> = all
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .filter(|k| !k.ends_with("denied"))
        .collect();
    assert_eq!(
        all.iter().filter(|r| r["kind"] == "daemon_started").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(of(&all, "before", "net_denied").len(), 8);
    assert_eq!(of(&all, "after", "net_denied").len(), 8);
}

#[test]
fn allowed_dns_answers_are_aggregated_and_every_refusal_is_kept() {
    let upstream = FakeDns::start(&[("allowed.test", Ipv4Addr::new(127, 0, 0, 77))]);
    let config = format!("[dns]\nupstream = [\"{}\"]\n", upstream.addr);
    let profile = "name = \"dns\"\nversion = \"1.0.0\"\n[network]\nhosts = [\"allowed.test:80/tcp\"]\n[files]\ndefault = \"allow\"\n";
    let d = TestDaemon::with(DaemonSetup {
        profiles: &[("dns", profile)],
        extra_config: &config,
        audit_config: "aggregate_seconds = 1",
        resolv_conf: Some("nameserver 127.0.0.1\n"),
        ..Default::default()
    });
    let script = format!(
        "i=0; while [ $i -lt 300 ]; do {a} dns allowed.test 127.0.0.9:53 udp >/dev/null; i=$((i+1)); done; \
         for i in 1 2 3 4 5; do {a} dns nope.test 127.0.0.9:53 udp >/dev/null; done",
        a = act()
    );
    let start = Instant::now();
    sh(&d, "dns", "asker", &script);
    let took = start.elapsed();
    let answered = |records: &[Value]| -> u64 {
        of(records, "asker", "dns_answered")
            .iter()
            .map(|r| r["details"]["count"].as_u64().unwrap())
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(5), || answered(&d.audit_records())
            == 300),
        "every answer is counted: {}",
        answered(&d.audit_records())
    );
    let records = d.audit_records();
    let aggregated = of(&records, "asker", "dns_answered");
    let bound = took.as_secs() + 3;
    assert!(
        aggregated.len() as u64 <= bound,
        "{} records for 300 answers in {took:?}",
        aggregated.len()
    );
    assert!(
        aggregated
            .iter()
            .all(|r| r["details"]["destination"] == "allowed.test")
    );
    assert_eq!(
        of(&records, "asker", "dns_refused").len(),
        5,
        "every refusal is kept"
    );
    let m = d.metrics();
    assert_eq!(metric(&m, "agentd_dns_answers_total"), 300.0);
    assert_eq!(metric(&m, "agentd_dns_refusals_total"), 5.0);
    eprintln!(
        "300 DNS answers in {took:?}: {} aggregated records",
        aggregated.len()
    );
}

#[test]
fn events_follow_shows_a_denial_within_a_second() {
    let d = TestDaemon::start(&[("plain", &profile(9, std::path::Path::new("/nonexistent")))]);
    let mut follower = d
        .agentd()
        .args(["events", "--follow", "--json", "--last", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Value)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx
                .send((Instant::now(), serde_json::from_str(&line).unwrap()))
                .is_err()
            {
                return;
            }
        }
    });
    // The follower is connected once the daemon has it: give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let out = d.run(&[
        "--profile",
        "plain",
        "--name",
        "watched",
        "--",
        &act(),
        "connect",
        "127.0.0.1:7",
    ]);
    assert!(out.status.success());
    let mut seen = None;
    while let Ok((at, r)) = rx.recv_timeout(Duration::from_secs(3)) {
        if r["kind"] == "net_denied" && r["agent"] == "watched" {
            seen = Some(at.duration_since(start));
            break;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let seen = seen.expect("events --follow showed the denial");
    eprintln!("events --follow: the denial showed {seen:?} after the launch began");
    assert!(seen < Duration::from_secs(1), "{seen:?}");
    // Without --follow: the recent records, in the human form.
    let out = d
        .agentd()
        .args(["events", "--agent", "watched"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("net_denied") && text.contains("watched (plain 1.2.3)"),
        "{text}"
    );
    assert!(
        !text.contains("daemon_started"),
        "only the agent's records: {text}"
    );
}

/// The kernel programs' debug log (aya-log) is off at start and switched at run time.
#[test]
fn the_kernel_debug_log_is_off_until_switched_on() {
    let d = TestDaemon::start(&[("plain", &profile(9, std::path::Path::new("/nonexistent")))]);
    let kernel_lines = || {
        d.log()
            .matches("agentd: kernel debug: egress denied")
            .count()
    };
    let denied_connect = |name: &str| {
        d.run(&[
            "--profile",
            "plain",
            "--name",
            name,
            "--",
            &act(),
            "connect",
            "127.0.0.1:7",
        ]);
        assert!(
            wait_until(Duration::from_secs(5), || {
                !of(&d.audit_records(), name, "net_denied").is_empty()
            }),
            "the denial of {name} is recorded"
        );
    };
    denied_connect("quiet");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(kernel_lines(), 0, "off by default:\n{}", d.log());
    let out = d.agentd().args(["debug-log", "on"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    denied_connect("loud");
    assert!(
        wait_until(Duration::from_secs(3), || kernel_lines() == 1),
        "one line for the denied connect:\n{}",
        d.log()
    );
    let out = d.agentd().args(["debug-log", "off"]).output().unwrap();
    assert!(out.status.success());
    denied_connect("quiet-again");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(kernel_lines(), 1, "off again:\n{}", d.log());
    let switches: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "debug_log")
        .map(|r| r["details"]["on"].clone())
        .collect();
    assert_eq!(switches, vec![Value::Bool(true), Value::Bool(false)]);
}
