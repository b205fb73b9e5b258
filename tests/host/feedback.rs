//! Denials that explain themselves: `agentd run --explain` says on stderr what was denied
//! and why, one line per kind; the agent reads its own denials as JSON lines at
//! $AGENTD_DENIALS while it runs, and not another agent's.

use std::{net::TcpListener, time::Duration};

use agentd_tests::{Probe, TestDaemon, act_bin, wait_until};
use serde_json::Value;

#[test]
fn an_agent_reads_its_own_denials_and_run_explain_says_why() {
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    denied.set_nonblocking(true).unwrap();
    let (a, b) = (allowed.local_addr().unwrap(), denied.local_addr().unwrap());
    let profile = format!(
        "name = \"p\"\nversion = \"1.2.3\"\n[network]\nallow = [\"127.0.0.1/32:{}/tcp\"]\n\
         [files]\ndefault = \"allow\"\n",
        a.port()
    );
    let d = TestDaemon::start(&[("p", &profile)]);
    let act = act_bin!().display().to_string();
    // Another agent, denied something of its own first.
    let mut other = Probe::start(&d, &act_bin!(), "p", "other", &[]);
    let v = other.ask(&format!("connect {b}"));
    assert_eq!(v["errno"], libc::EPERM, "{v}");
    let feeds = d.dir.path().join("denials");
    let other_feed = feeds.join("other.jsonl");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(
            &other_feed
        )
        .is_ok_and(|t| t.contains("denied"))),
        "the other agent's feed has its denial"
    );
    // The agent: a denied connect, then its feed (polled: events arrive within
    // milliseconds), the other agent's feed, and a write to its own.
    let script = format!(
        "'{act}' connect {b}; i=0; while [ $i -lt 50 ] && ! grep -q net_denied \"$AGENTD_DENIALS\"; do sleep 0.1; i=$((i+1)); done; \
         echo \"feed=$AGENTD_DENIALS\"; cat \"$AGENTD_DENIALS\"; \
         cat '{other}' > /dev/null; echo \"other rc=$?\"; \
         echo forged >> \"$AGENTD_DENIALS\"; echo \"write rc=$?\"",
        other = other_feed.display()
    );
    let out = d.run(&[
        "--profile",
        "p",
        "--name",
        "self",
        "--explain",
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        text.contains(&format!("feed={}", feeds.join("self.jsonl").display())),
        "{text}"
    );
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "net_denied")
        .collect();
    let what = format!("connect {b}/tcp denied");
    // (Its file lines are the dynamic loader's probes of paths the test environment names,
    // which fail for its user: under Landlock every failed file call is reported.)
    assert_eq!(
        lines.len(),
        1,
        "its own connect, not the other agent's: {text}"
    );
    assert_eq!(lines[0]["kind"], "net_denied", "{}", lines[0]);
    assert_eq!(lines[0]["what"], what.as_str(), "{}", lines[0]);
    assert_eq!(
        lines[0]["why"], "not in the allowlist of profile p 1.2.3",
        "{}",
        lines[0]
    );
    assert!(
        text.contains("other rc=1"),
        "another agent's feed is not readable: {text}"
    );
    assert!(
        !text.contains("write rc=0"),
        "its feed is not writable: {text}"
    );
    assert!(
        stderr.contains("what was denied to agent self, and why:")
            && stderr.contains(&format!(
                "  {what}: not in the allowlist of profile p 1.2.3"
            )),
        "{stderr}"
    );
    assert!(
        !feeds.join("self.jsonl").exists(),
        "the feed goes with the agent"
    );
    // Nothing denied: said so. (Without the test environment's LD_LIBRARY_PATH, whose
    // directories the loader would probe and be refused.)
    let out = d
        .agentd()
        .env_remove("LD_LIBRARY_PATH")
        .args(["run", "--profile", "p", "--explain", "--", &act, "connect"])
        .arg(a.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was denied to agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
