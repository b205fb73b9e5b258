//! `agentd install` and `agentd uninstall`, and the systemd unit they install: the unit
//! passes `systemd-analyze verify` (and the check finds a broken one), a second install
//! changes nothing and keeps edited files, uninstall kills a running agent before it
//! removes anything and keeps the configuration unless --purge, and the unit's
//! CapabilityBoundingSet= is enough for the daemon to contain an agent.
//!
//! Every install goes into a temporary prefix, never /: no system account, /etc,
//! /usr/local or systemd of the host is touched. (systemd-analyze runs in a private mount
//! namespace where the prefix's usr/local/bin is /usr/local/bin.)

use std::{
    collections::BTreeSet,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use agentd_tests::{
    DaemonSetup, Probe, TempDir, TestDaemon, act_bin, agentd_bin, process_gone, wait_until,
};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// `agentd ARGS --json`: its output and the report it printed.
fn agentd_json(args: &[&str]) -> (Output, Value) {
    let out = Command::new(agentd_bin())
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "agentd {args:?} printed no JSON ({e}); {}, stdout {:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

fn install(prefix: &Path) -> Value {
    let (out, v) = agentd_json(&["install", "--prefix", prefix.to_str().unwrap()]);
    assert!(
        out.status.success() && v["ok"] == true,
        "install into {} failed: {}\n{v:#}",
        prefix.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

fn step<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step `{name}` in {report:#}"))
}

/// The capabilities of the unit's CapabilityBoundingSet= (one line, a plain list).
fn bounding_set(unit: &str) -> Vec<String> {
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .collect();
    assert_eq!(lines.len(), 1, "one CapabilityBoundingSet= line: {lines:?}");
    assert!(
        !lines[0].contains('~'),
        "a list of what is kept: {}",
        lines[0]
    );
    lines[0].split_whitespace().map(str::to_string).collect()
}

/// What `systemd-analyze verify` finds wrong with `unit`, run where /usr/local/bin is the
/// prefix's (so that the ExecStart= binary is the installed one): its exit status, every
/// line it prints about agentd, and the settings that matter when systemd does not read
/// them as the file writes them. (systemd drops a capability name it does not know
/// without a word, and a key or value it cannot read with only a warning.)
fn verify_problems(prefix: &Path, unit: &Path) -> Vec<String> {
    let verify = |debug: bool| {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg("mount --bind \"$1\" /usr/local/bin && exec systemd-analyze verify \"$2\"")
            .arg("sh")
            .arg(prefix.join("usr/local/bin"))
            .arg(unit)
            .stdin(Stdio::null());
        if debug {
            // The unit as systemd read it is dumped on stdout.
            c.env("SYSTEMD_LOG_LEVEL", "debug");
        }
        c.output()
            .expect("run systemd-analyze (the systemd package; cargo xtask setup installs it)")
    };
    let mut problems = Vec::new();
    let out = verify(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        problems.push(format!("systemd-analyze verify: {}: {stderr}", out.status));
    }
    problems.extend(
        stderr
            .lines()
            .filter(|l| l.contains("agentd"))
            .map(str::to_string),
    );
    let dump = String::from_utf8_lossy(&verify(true).stdout).into_owned();
    let name = unit.file_name().unwrap().to_string_lossy();
    let Some(block) = dump
        .split(&format!("-> Unit {name}:"))
        .nth(1)
        .and_then(|b| b.split("-> Unit ").next())
    else {
        problems.push(format!("systemd-analyze dumped no unit {name}"));
        return problems;
    };
    let setting = |key: &str| {
        block
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
            .unwrap_or("")
            .to_string()
    };
    let written: BTreeSet<String> = bounding_set(&read(unit))
        .iter()
        .map(|c| c.to_lowercase())
        .collect();
    let understood: BTreeSet<String> = setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if written != understood {
        problems.push(format!(
            "CapabilityBoundingSet: the file says {written:?}, systemd read {understood:?}"
        ));
    }
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("KillMode", "mixed"),
        ("Delegate", "yes"),
        ("RuntimeDirectory", "agentd"),
        ("RuntimeDirectoryMode", "0711"),
        ("LogsDirectory", "agentd"),
        ("LogsDirectoryMode", "0750"),
    ] {
        if setting(key) != want {
            problems.push(format!(
                "{key}: systemd read {:?}, not {want}",
                setting(key)
            ));
        }
    }
    problems
}

#[test]
fn the_installed_unit_passes_systemd_analyze_verify() {
    agentd_tests::require_root();
    let tmp = TempDir::new("install-verify");
    let prefix = tmp.path().join("root");
    let accounts_before = (nix_user_exists("agentd-agent"), nix_group_exists("agentd"));
    let report = install(&prefix);

    // What went where, with which mode.
    let bin = prefix.join("usr/local/bin/agentd");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(agentd_bin()).unwrap(),
        "the running binary was installed"
    );
    let unit = prefix.join("etc/systemd/system/agentd.service");
    assert_eq!(
        read(&unit),
        read(&repo().join("packaging/agentd.service")),
        "the packaged unit"
    );
    assert_eq!(mode(&unit), 0o644);
    let config = prefix.join("etc/agentd/agentd.toml");
    let parsed = agentd::config::Config::parse(&read(&config), "agentd.toml").unwrap();
    assert_eq!(
        agentd::config::Config {
            path: None,
            ..parsed
        },
        agentd::config::Config::default(),
        "the default configuration"
    );
    for name in ["default", "offline", "coding-agent", "research-agent"] {
        let p = prefix.join(format!("etc/agentd/profiles/{name}.toml"));
        assert_eq!(
            read(&p),
            read(&repo().join(format!("profiles/{name}.toml")))
        );
        assert_eq!(mode(&p), 0o644);
    }
    assert_eq!(mode(&prefix.join("var/log/agentd")), 0o750);
    assert_eq!(mode(&prefix.join("run/agentd")), 0o711);
    assert_eq!(mode(&prefix.join("etc/agentd")), 0o755);
    // The host's accounts and systemd are left alone; what would be created is said.
    for name in ["group agentd", "user agentd-agent"] {
        let s = step(&report, name);
        assert_eq!(s["status"], "skipped", "{s}");
        assert!(
            s["detail"].as_str().unwrap().contains("would create"),
            "{s}"
        );
    }
    assert_eq!(step(&report, "systemd")["status"], "skipped");
    assert_eq!(
        (nix_user_exists("agentd-agent"), nix_group_exists("agentd")),
        accounts_before
    );

    let problems = verify_problems(&prefix, &unit);
    assert!(problems.is_empty(), "systemd-analyze verify: {problems:#?}");

    // The check finds a broken unit: each of these changes (to a directive, never a
    // comment) is reported.
    let text = read(&unit);
    for (what, from, to) in [
        (
            "a misspelled key",
            "Restart=on-failure",
            "Restrat=on-failure",
        ),
        (
            "a value systemd cannot read",
            "Type=notify",
            "Type=notified",
        ),
        ("an unknown capability", " CAP_SETPCAP ", " CAP_SETPCAPS "),
        (
            "a binary that is not there",
            "/usr/local/bin/agentd ",
            "/usr/local/bin/agentd-gone ",
        ),
        ("a lost directive", "KillMode=mixed", ""),
    ] {
        let mut changed = false;
        let broken: String = text
            .lines()
            .map(|l| {
                let l = if !changed && !l.starts_with('#') && l.contains(from) {
                    changed = true;
                    l.replacen(from, to, 1)
                } else {
                    l.to_string()
                };
                l + "\n"
            })
            .collect();
        assert!(changed, "{what}: `{from}` is in a directive of the unit");
        let dir = tmp.path().join(what.replace(' ', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agentd.service");
        std::fs::write(&path, broken).unwrap();
        let p = verify_problems(&prefix, &path);
        assert!(!p.is_empty(), "{what}: not found by the check");
        eprintln!("{what}: found: {}", p[0]);
    }
}

fn nix_user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn nix_group_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["group", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Path -> (contents, inode, mtime, mode) of every file below `dir`.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u64, i64, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            // A directory's time changes when an entry is added (a restored profile).
            let (contents, time) = if m.is_file() {
                (
                    std::fs::read(e.path()).unwrap(),
                    m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                )
            } else {
                (Vec::new(), 0)
            };
            out.push((e.path(), contents, m.ino(), time, m.mode()));
        }
    }
    out.sort();
    out
}

#[test]
fn install_twice_changes_nothing_and_keeps_an_edited_config_and_profile() {
    agentd_tests::require_root();
    let tmp = TempDir::new("install-twice");
    let prefix = tmp.path().join("root");
    let first = install(&prefix);
    assert!(
        first["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "done" || s["status"] == "skipped"),
        "a first install does every step: {first:#}"
    );
    // The administrator edits the configuration and a profile, and removes another.
    let config = prefix.join("etc/agentd/agentd.toml");
    let edited_config = read(&config).replace("#listen = \"127.0.0.1:9464\"", "listen = \"off\"");
    assert_ne!(edited_config, read(&config));
    std::fs::write(&config, &edited_config).unwrap();
    let profile = prefix.join("etc/agentd/profiles/default.toml");
    let edited_profile = read(&profile).replace("nofile = 4096", "nofile = 512");
    assert_ne!(edited_profile, read(&profile));
    std::fs::write(&profile, &edited_profile).unwrap();
    let removed = prefix.join("etc/agentd/profiles/offline.toml");
    std::fs::remove_file(&removed).unwrap();
    // And a directory got the wrong mode.
    std::fs::set_permissions(
        prefix.join("var/log/agentd"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let before = snapshot(&prefix);

    let second = install(&prefix);
    for s in second["steps"].as_array().unwrap() {
        let want = match s["step"].as_str().unwrap() {
            "config" | "profile default" => "kept",
            "profile offline" | "log directory" => "done",
            "group agentd" | "user agentd-agent" | "systemd" => "skipped",
            _ => "unchanged",
        };
        assert_eq!(s["status"], want, "{s}");
    }
    assert!(
        step(&second, "profile default")["detail"]
            .as_str()
            .unwrap()
            .contains("edited"),
        "{second:#}"
    );
    assert_eq!(read(&config), edited_config, "the edited config is kept");
    assert_eq!(read(&profile), edited_profile, "the edited profile is kept");
    assert_eq!(read(&removed), read(&repo().join("profiles/offline.toml")));
    assert_eq!(
        mode(&prefix.join("var/log/agentd")),
        0o750,
        "the mode is put right"
    );
    // Nothing else was written again: same contents, same inodes, same times.
    let after: Vec<_> = snapshot(&prefix)
        .into_iter()
        .filter(|(p, ..)| p != &removed && p != &prefix.join("var/log/agentd"))
        .collect();
    let before: Vec<_> = before
        .into_iter()
        .filter(|(p, ..)| p != &prefix.join("var/log/agentd"))
        .collect();
    assert_eq!(after.len(), before.len());
    for (a, b) in after.iter().zip(&before) {
        assert!(a == b, "{} was written again", a.0.display());
    }

    // A third install has nothing left to do.
    let third = install(&prefix);
    for s in third["steps"].as_array().unwrap() {
        assert_ne!(s["status"], "done", "{s}");
    }
}

const PLAIN: &str = "name = \"plain\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n";

#[test]
fn uninstall_kills_a_running_agent_first_and_keeps_the_config_unless_purge() {
    let tmp = TempDir::new("uninstall");
    let prefix = tmp.path().join("root");
    install(&prefix);
    let bin = prefix.join("usr/local/bin/agentd");
    let unit = prefix.join("etc/systemd/system/agentd.service");
    let markers = tmp.path().join("markers");
    std::fs::create_dir(&markers).unwrap();
    std::fs::set_permissions(&markers, std::fs::Permissions::from_mode(0o777)).unwrap();
    let marker = markers.join("removed-while-alive");

    let d = TestDaemon::start(&[("plain", PLAIN)]);
    // The agent watches the installed binary: if the binary went while the agent was
    // still alive, it leaves a marker.
    let script = format!(
        "while [ -e '{}' ]; do sleep 0.02; done; echo alive > '{}'; exec sleep 60",
        bin.display(),
        marker.display()
    );
    let client_log = tmp.path().join("client.log");
    let mut client = d
        .agentd()
        .args([
            "run",
            "--profile",
            "plain",
            "--name",
            "watcher",
            "--workdir",
        ])
        .arg(&markers)
        .args(["--", "/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&client_log).unwrap())
        .spawn()
        .unwrap();
    let procs = d.root.join("watcher/cgroup.procs");
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&procs).is_ok_and(|t| !t.trim().is_empty())
        }),
        "the agent runs; agentd run: {:?} {}",
        client.try_wait(),
        std::fs::read_to_string(&client_log).unwrap_or_default()
    );
    let pids: Vec<u32> = read(&procs).lines().map(|l| l.parse().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "the agent sees the installed binary");

    let (out, v) = agentd_json(&[
        "--config",
        d.config.to_str().unwrap(),
        "uninstall",
        "--prefix",
        prefix.to_str().unwrap(),
    ]);
    assert!(
        out.status.success() && v["ok"] == true,
        "{}\n{v:#}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agents = step(&v, "agents");
    assert_eq!(agents["status"], "done", "{agents}");
    let detail = agents["detail"].as_str().unwrap();
    assert!(
        detail.contains("watcher") && detail.contains("through the daemon"),
        "{agents}"
    );
    assert!(
        !d.root.join("watcher").exists(),
        "the agent's cgroup is gone"
    );
    for pid in &pids {
        assert!(process_gone(*pid), "process {pid} of the agent is gone");
    }
    // Its `agentd run` ends too: 137 (SIGKILL), or 125 if the daemon, stopped right after,
    // went before it told the client.
    let code = client.wait().unwrap().code();
    assert!(matches!(code, Some(137 | 125)), "{code:?}");
    assert!(
        !marker.exists(),
        "the agent was killed before the binary was removed"
    );
    // The daemon was started by hand (not by systemd): uninstall stopped it.
    assert_eq!(step(&v, "daemon")["status"], "done", "{v:#}");
    assert!(wait_until(Duration::from_secs(10), || d.exited()));
    assert!(
        !d.root.exists(),
        "it removed its agent root when it stopped"
    );
    assert!(!d.bpffs.exists(), "and its pins");
    // The kill went through the daemon: it is in the audit log, not as a direct kill.
    let kills: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["agent"] == "watcher" && r["kind"] == "kill")
        .collect();
    assert_eq!(kills.len(), 1, "{kills:?}");
    assert!(kills[0]["details"]["direct"].is_null(), "{}", kills[0]);

    // Binary and unit are gone; configuration, profiles and the audit log are kept.
    assert!(!bin.exists() && !unit.exists());
    assert_eq!(step(&v, "binary")["status"], "done");
    assert_eq!(step(&v, "systemd unit")["status"], "done");
    for (name, path) in [
        ("config", prefix.join("etc/agentd/agentd.toml")),
        ("config", prefix.join("etc/agentd/profiles/default.toml")),
        ("audit log", prefix.join("var/log/agentd")),
    ] {
        assert!(path.exists(), "{} is kept", path.display());
        let s = step(&v, name);
        assert_eq!(s["status"], "kept", "{s}");
        assert!(s["detail"].as_str().unwrap().contains("--purge"), "{s}");
    }
    assert!(!prefix.join("run/agentd").exists(), "runtime state goes");
    assert_eq!(step(&v, "accounts")["status"], "skipped");

    // Again with --purge: nothing left to kill or stop, and the rest goes.
    let (out, v) = agentd_json(&[
        "--config",
        d.config.to_str().unwrap(),
        "uninstall",
        "--prefix",
        prefix.to_str().unwrap(),
        "--purge",
    ]);
    assert!(
        out.status.success() && v["ok"] == true,
        "{}\n{v:#}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["agents", "daemon", "leftovers", "binary", "systemd unit"] {
        assert_eq!(step(&v, name)["status"], "unchanged", "{v:#}");
    }
    for name in ["config", "audit log"] {
        assert_eq!(step(&v, name)["status"], "done", "{v:#}");
    }
    assert!(!prefix.join("etc/agentd").exists());
    assert!(!prefix.join("var/log/agentd").exists());
}

#[test]
fn uninstall_removes_nothing_while_an_agent_cannot_be_killed() {
    agentd_tests::require_root();
    let tmp = TempDir::new("uninstall-fails");
    let prefix = tmp.path().join("root");
    install(&prefix);
    // An agent the kill switch cannot end: no daemon answers, and the agent root the
    // configuration names is a plain directory, not a cgroup, so writing the "agent's"
    // cgroup.kill kills nothing and it never reports empty.
    let root = tmp.path().join("not-a-cgroup");
    std::fs::create_dir_all(root.join("stuck-agent")).unwrap();
    let config = tmp.write(
        "agentd.toml",
        &format!(
            "[daemon]\nsocket = \"{}\"\nlaunch_socket = \"{}\"\ncgroup_root = \"{}\"\n\
             [audit]\npath = \"{}\"\n",
            tmp.path().join("agentd.sock").display(),
            tmp.path().join("launch.sock").display(),
            root.display(),
            tmp.path().join("audit/audit.jsonl").display(),
        ),
    );
    let (out, v) = agentd_json(&[
        "--config",
        config.to_str().unwrap(),
        "uninstall",
        "--prefix",
        prefix.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert_eq!(v["ok"], false);
    let agents = step(&v, "agents");
    assert_eq!(agents["status"], "failed", "{agents}");
    assert!(
        agents["detail"]
            .as_str()
            .unwrap()
            .contains("nothing was removed"),
        "{agents}"
    );
    for name in ["binary", "systemd unit", "config"] {
        assert_eq!(step(&v, name)["status"], "not_done", "{v:#}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stopped at `agents`") && stderr.contains("Not done: agents, service"),
        "{stderr}"
    );
    assert!(prefix.join("usr/local/bin/agentd").exists());
    assert!(prefix.join("etc/systemd/system/agentd.service").exists());
}

fn agent_bin_string() -> String {
    agentd_bin().display().to_string()
}

/// `setpriv` arguments for exactly these capabilities (`CAP_BPF` -> `+bpf`).
fn setpriv_bounding_set(caps: &[String]) -> String {
    let list: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!("--bounding-set=-all,{}", list.join(","))
}

fn status_hex(pid: u32, field: &str) -> u64 {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} in {status}"));
    u64::from_str_radix(v.trim(), 16).unwrap()
}

#[test]
fn the_units_capability_bounding_set_is_enough_to_contain_an_agent() {
    let unit = read(&repo().join("packaging/agentd.service"));
    let caps = bounding_set(&unit);
    let mut mask = 0u64;
    for c in &caps {
        // systemd would drop a name it does not know, silently.
        let n = agentd::caps::parse(c).unwrap_or_else(|e| panic!("{c}: {e}"));
        assert!(c.starts_with("CAP_") && n.len() == 1, "{c}");
        mask |= 1 << n[0];
    }
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    denied.set_nonblocking(true).unwrap();
    let files = TempDir::new("caps");
    let secret = files.write("secret", "s3cret");
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let profile = format!(
        "name = \"plain\"\nversion = \"1.0.0\"\n[network]\nallow = [\"127.0.0.1/32:{}\"]\n\
         [files]\ndefault = \"allow\"\nwrite = [\"{{tmp}}\"]\ndeny = [\"{}\"]\n",
        allowed.local_addr().unwrap().port(),
        secret.display()
    );
    // As systemd starts it: root, with only the unit's bounding set (and so only those
    // capabilities in its permitted and effective sets).
    let set = setpriv_bounding_set(&caps);
    let mut wrapper = vec!["setpriv", set.as_str()];
    // And no_new_privs, as NoNewPrivileges=yes sets it.
    let nnp = unit.lines().any(|l| l == "NoNewPrivileges=yes");
    if nnp {
        wrapper.push("--no-new-privs");
    }
    wrapper.push("--");
    let mut d = TestDaemon::with(DaemonSetup {
        profiles: &[("plain", &profile)],
        wrapper: &wrapper,
        ..Default::default()
    });
    assert_eq!(
        status_hex(d.pid(), "CapBnd:"),
        mask,
        "the daemon's bounding set"
    );
    assert_eq!(status_hex(d.pid(), "CapEff:"), mask, "its effective set");
    assert_eq!(status_hex(d.pid(), "NoNewPrivs:"), u64::from(nnp));

    let workdir = files.path().to_str().unwrap();
    let mut agent = Probe::start(&d, &act_bin!(), "plain", "probe", &["--workdir", workdir]);
    let (allowed_addr, denied_addr) = (allowed.local_addr().unwrap(), denied.local_addr().unwrap());
    let contained = |agent: &mut Probe, when: &str| {
        let v = agent.ask(&format!("connect {allowed_addr}"));
        assert_eq!(v["ok"], true, "{when}: the allowed connect: {v}");
        let v = agent.ask(&format!("connect {denied_addr}"));
        assert_eq!(
            (&v["ok"], &v["errno"]),
            (&Value::Bool(false), &Value::from(libc::EPERM)),
            "{when}: the denied connect: {v}"
        );
        let v = agent.ask(&format!("open {}", secret.display()));
        assert_eq!(
            (&v["ok"], &v["errno"]),
            (&Value::Bool(false), &Value::from(libc::EACCES)),
            "{when}: the denied file: {v}"
        );
    };
    contained(&mut agent, "started under the unit's capabilities");
    // Each capability of the set at work: the agent runs as its user with no capability
    // at all (SETUID, SETGID, SETPCAP), launched from inside another agent (the launch
    // socket's peer check: KILL).
    let act = act_bin!().display().to_string();
    let agentd = agent_bin_string();
    let config = d.config.display().to_string();
    let out = d.run(&[
        "--profile",
        "plain",
        "--",
        &agentd,
        "--config",
        &config,
        "run",
        "--profile",
        "plain",
        "--",
        &act,
        "ids",
    ]);
    let ids = agentd_tests::last_json(&out);
    assert_eq!(ids["detail"]["uid"], 65534, "{ids}");
    assert_eq!(ids["detail"]["groups"], "", "{ids}");
    for set in ["cap_eff", "cap_prm", "cap_bnd", "cap_amb"] {
        assert_eq!(ids["detail"][set], "0000000000000000", "{set}: {ids}");
    }
    let nested = ids["detail"]["cgroup"]
        .as_str()
        .and_then(|c| c.rsplit('/').next())
        .unwrap()
        .to_string();
    assert!(
        d.audit_records()
            .iter()
            .any(|r| r["kind"] == "agent_started"
                && r["agent"] == nested.as_str()
                && r["details"]["parent"].is_string()),
        "{nested} was started by another agent, through the launch socket"
    );
    // Its private tmp is its own (CHOWN) and goes when it ends, files and all
    // (DAC_OVERRIDE: they are its user's, in a directory of mode 0700).
    let out = d.run(&[
        "--profile",
        "plain",
        "--",
        "/bin/sh",
        "-c",
        "echo a > \"$TMPDIR/f\" && mkdir \"$TMPDIR/d\" && echo b > \"$TMPDIR/d/g\" && \
         chmod 500 \"$TMPDIR/d\" && stat -c %u \"$TMPDIR\" && echo \"$TMPDIR\"",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"65534"),
        "the agent owns its tmp: {stdout}"
    );
    let tmp = PathBuf::from(lines[1]);
    assert!(tmp.starts_with(d.dir.path().join("tmp")), "{stdout}");
    assert!(
        wait_until(Duration::from_secs(5), || !tmp.exists()),
        "the agent's tmp {} is removed when it ends",
        tmp.display()
    );
    // A denied relative path is named by its real path in the audit log (the daemon
    // reads the agent's /proc/PID/cwd: SYS_PTRACE).
    let v = agent.ask("open secret");
    assert_eq!(
        (&v["ok"], &v["errno"]),
        (&Value::Bool(false), &Value::from(libc::EACCES)),
        "{v}"
    );
    let named = || {
        d.audit_records().iter().any(|r| {
            r["kind"] == "file_denied"
                && r["details"]["path"] == "secret"
                && r["details"]["resolved"] == secret.display().to_string()
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), named),
        "the denial of `secret` is in the audit log with its real path: {:#?}",
        d.audit_records()
            .into_iter()
            .filter(|r| r["kind"] == "file_denied")
            .collect::<Vec<_>>()
    );

    // A daemon killed and started again (Restart=on-failure with KillMode=process) adopts
    // the agent under the same set: pinned maps, BPF_LINK_UPDATE, the records.
    // SAFETY: signals our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(5), || d.exited()));
    d.restart()
        .expect("the daemon adopts the agent under the unit's capabilities");
    assert_eq!(status_hex(d.pid(), "CapBnd:"), mask);
    assert!(d.log().contains("adopted agent probe"), "{}", d.log());
    contained(&mut agent, "after the restart");

    // And the kill switch works.
    let procs = d.root.join("probe/cgroup.procs");
    let pids: Vec<u32> = read(&procs).lines().map(|l| l.parse().unwrap()).collect();
    assert!(!pids.is_empty());
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
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["outcomes"][0]["error"].is_null(), "{v}");
    assert_eq!(v["outcomes"][0]["processes"], pids.len(), "{v}");
    assert!(!d.root.join("probe").exists(), "the agent's cgroup is gone");
    for pid in pids {
        assert!(process_gone(pid), "process {pid} of the agent is gone");
    }
    // (Its `agentd run` lost its daemon at the restart: it ends, status 125.)
    let _ = agent.child.wait();
    assert!(
        matches!(denied.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the denied listener received nothing"
    );
}
