//! Ways a user on the host, or an agent, could turn agentd's own privileges against it:
//! each is shown to fail and to leave nothing behind.

use std::{
    ffi::OsStr,
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    process::Command,
};

use agentd_tests::{TempDir, TestDaemon, act_bin};

const OPEN: &str = "name = \"open\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\n";

/// A daemon configuration in `dir` whose agents' tmp base is `tmp_dir`.
fn config(dir: &TempDir, tmp_dir: &std::path::Path) -> std::path::PathBuf {
    let cgroup = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    dir.write(
        "agentd.toml",
        &format!(
            "[daemon]\nsocket = \"{0}/s.sock\"\nlaunch_socket = \"{0}/l.sock\"\ncgroup_root = \"/sys/fs/cgroup/{cgroup}\"\nbpffs = \"/sys/fs/bpf/{cgroup}\"\n\
             [agents]\nprofiles_dir = \"{0}\"\ntmp_dir = \"{1}\"\n",
            dir.path().display(),
            tmp_dir.display()
        ),
    )
}

/// The daemon creates and chowns each agent's tmp as root: a tmp base another user can
/// write to, or swap for a link, would let that user aim the chown at any file.
#[test]
fn the_daemon_refuses_a_tmp_base_another_user_could_swap() {
    let dir = TempDir::new("tmp-base");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let owned = dir.path().join("owned");
    std::fs::create_dir(&owned).unwrap();
    std::os::unix::fs::chown(&owned, Some(65534), Some(65534)).unwrap();
    for (base, why) in [
        (link.clone(), "a symlink"),
        (open.join("tmp"), "mode 777"),
        (owned.join("tmp"), "owner uid 65534"),
    ] {
        let cfg = config(&dir, &base);
        let out = Command::new(agentd_tests::agentd_bin())
            .arg("--config")
            .arg(&cfg)
            .arg("daemon")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "the daemon started with tmp_dir {}",
            base.display()
        );
        assert!(
            err.contains("agents.tmp_dir") && err.contains(why),
            "{}: {err}",
            base.display()
        );
        assert!(!dir.path().join("s.sock").exists(), "no socket was created");
        let cgroup = format!(
            "/sys/fs/cgroup/{}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        assert!(
            !std::path::Path::new(&cgroup).exists(),
            "no cgroup was created"
        );
    }
    assert!(
        !open.join("tmp").exists() && !owned.join("tmp").exists(),
        "nothing was created under an unsafe directory"
    );
}

/// The launcher enters the working directory as the agent's user: a directory that user
/// may not enter is not opened for it by root.
#[test]
fn the_working_directory_is_entered_as_the_agents_user() {
    let d = TestDaemon::start(&[("open", OPEN)]);
    let dir = TempDir::new("closed-workdir");
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let act = act_bin!().display().to_string();
    let run = || {
        d.run(&[
            "--profile",
            "open",
            "--user",
            "nobody",
            "--workdir",
            closed.to_str().unwrap(),
            "--",
            &act,
            "exit",
            "0",
        ])
    };
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the agent ran in a directory its user cannot enter"
    );
    assert!(
        err.contains("entering the working directory") && err.contains("Permission denied"),
        "{err}"
    );
    assert!(d.agent_cgroups().is_empty(), "nothing is left behind");
    // The same directory opened to its user works.
    std::os::unix::fs::chown(&closed, Some(65534), Some(65534)).unwrap();
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A path that is not UTF-8 is refused with a message, and the daemon keeps serving.
#[test]
fn a_non_utf8_working_directory_is_refused_and_the_daemon_survives() {
    let d = TestDaemon::start(&[("open", OPEN)]);
    let dir = TempDir::new("non-utf8");
    let odd = dir.path().join(OsStr::from_bytes(b"odd-\xff"));
    std::fs::create_dir(&odd).unwrap();
    let act = act_bin!().display().to_string();
    let out = d
        .agentd()
        .args(["run", "--profile", "open", "--", &act, "exit", "0"])
        .current_dir(&odd)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not valid UTF-8"), "{err}");
    assert!(d.agent_cgroups().is_empty());
    let out = d.run(&["--profile", "open", "--", &act, "exit", "0"]);
    assert!(
        out.status.success(),
        "the daemon still serves: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An agent may make a symlink inside an area it can read, pointing at a path it is
/// denied, and launch a child that asks to read the link: the child's request is judged
/// on the real path, so the child gets nothing its parent does not have.
#[test]
fn a_symlink_cannot_carry_a_childs_allow_past_its_parents_deny() {
    let parent = "name = \"parent\"\nversion = \"1.0.0\"\n[files]\ndefault = \"allow\"\ndeny = [\"{workdir}/secret\"]\n";
    let child = "name = \"child\"\nversion = \"1.0.0\"\n[files]\ndefault = \"deny\"\n\
                 read = [\"/usr\", \"/bin\", \"/lib\", \"/lib64\", \"/etc\", \"/proc\", \"/dev\", \"{workdir}/sub/link\"]\n\
                 write = [\"/dev/null\"]\nexec = [\"/usr\", \"/bin\", \"/lib\", \"/lib64\"]\n";
    let d = TestDaemon::start(&[("parent", parent), ("child", child)]);
    let dir = TempDir::new("link-widen");
    let w = dir.path().join("work");
    std::fs::create_dir_all(w.join("secret")).unwrap();
    std::fs::write(w.join("secret/key"), "PRIVATE\n").unwrap();
    for p in [dir.path().to_path_buf(), w.clone(), w.join("secret")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Landlock cannot let the parent create entries next to its denied path (see
    // files/landlock.rs), so the link goes one level down.
    std::fs::create_dir(w.join("sub")).unwrap();
    std::os::unix::fs::chown(w.join("sub"), Some(65534), Some(65534)).unwrap();
    let script = r#"
        W="$1"; AGENTD="$2"; CONFIG="$3"
        cat "$W/secret/key" >/dev/null 2>&1; echo "parent-secret rc=$?"
        ln -s "$W/secret" "$W/sub/link"; echo "link rc=$?"
        "$AGENTD" --config "$CONFIG" run --profile child --workdir "$W" -- /bin/sh -c '
            cat "$1/sub/link/key"; echo "child-link rc=$?"
            cat "$1/secret/key"; echo "child-secret rc=$?"
            cat /etc/passwd >/dev/null 2>&1; echo "child-etc rc=$?"' sh "$W"
        echo "nested rc=$?"
    "#;
    let agentd = agentd_tests::agentd_bin().display().to_string();
    let out = d.run(&[
        "--profile",
        "parent",
        "--user",
        "nobody",
        "--workdir",
        w.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        script,
        "sh",
        w.to_str().unwrap(),
        &agentd,
        d.config.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    for (line, want) in [
        ("parent-secret", 1),
        ("link", 0),
        ("child-link", 1),
        ("child-secret", 1),
        ("child-etc", 0),
        ("nested", 0),
    ] {
        assert!(
            text.contains(&format!("{line} rc={want}\n")),
            "{line} should be rc={want}:\n{text}\n{err}"
        );
    }
    // Outside any agent the key is readable: only agentd refused it.
    assert_eq!(
        std::fs::read_to_string(w.join("sub/link/key")).unwrap(),
        "PRIVATE\n"
    );
}

/// Under a profile that allows every file, an agent running as root without capabilities
/// still cannot read the /proc files of a process outside it that has no more
/// capabilities than it (which file permissions and the kernel's capability check would
/// allow), nor signal it.
#[test]
fn an_agent_allowed_every_file_still_cannot_reach_other_processes() {
    let d = TestDaemon::start(&[("open", OPEN)]);
    let other = crate::files::Bystander::start();
    let pid = other.pid().to_string();
    let script = r#"
        cat "/proc/$1/environ" >/dev/null; echo "environ rc=$?"
        cat "/proc/$1/maps" >/dev/null; echo "maps rc=$?"
        kill -0 "$1"; echo "signal rc=$?"
        cat /proc/self/environ >/dev/null; echo "own rc=$?"
    "#;
    // A root agent needs --degraded-ok on a host without BPF LSM (chmod/chown).
    let out = d.run(&[
        "--profile",
        "open",
        "--user",
        "root",
        "--degraded-ok",
        "--",
        "/bin/sh",
        "-c",
        script,
        "sh",
        &pid,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    for (line, want) in [("environ", 1), ("maps", 1), ("signal", 1), ("own", 0)] {
        assert!(
            text.contains(&format!("{line} rc={want}\n")),
            "{line} should be rc={want}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Outside any agent, the same reads work (as root).
    assert!(std::fs::read(format!("/proc/{pid}/environ")).is_ok());
}
