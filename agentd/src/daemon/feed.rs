//! Denials that explain themselves, to the agent and to whoever ran it.
//!
//! - Each agent can read its own denials as JSON lines at the path in its
//!   `AGENTD_DENIALS` environment variable (`<socket dir>/denials/<agent>.jsonl`, written by
//!   the daemon, root's, mode 0644): every agent's file rules allow reading its own feed
//!   and deny the rest of that directory (see `agents::protect`), so an agent sees why a
//!   tool failed instead of guessing from EPERM, and never another agent's denials. A feed
//!   holds at most [`MAX_FEED_BYTES`]; then a last line says it is full (`agentd events`
//!   has the rest).
//! - `agentd run --explain` prints, when the agent ends, one line per kind of denial with
//!   its reason (from the same explanations).

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use agentd_common::events::{
    HOOK_BIND4, HOOK_BIND6, HOOK_SKB_EGRESS, HOOK_SOCK_CREATE, HOOK_SYSCALL_EXIT,
};
use anyhow::{Context as _, Result};
use serde_json::json;

use super::{Daemon, Locked as _, agents::AgentState};
use crate::{config::Config, events::Event, protocol::Denial};

/// Most bytes of one agent's feed.
pub const MAX_FEED_BYTES: u64 = 1 << 20;

/// The directory of the feeds.
pub fn dir(config: &Config) -> PathBuf {
    config
        .socket
        .parent()
        .unwrap_or(Path::new("/run/agentd"))
        .join("denials")
}

/// Agent `agent`'s feed.
pub fn path(daemon: &Daemon, agent: &str) -> PathBuf {
    dir(&daemon.config).join(format!("{agent}.jsonl"))
}

/// Creates the directory (root's, 0755: agents reach their own feed through it; their file
/// rules keep them from the others).
pub fn prepare(config: &Config) -> Result<()> {
    let d = dir(config);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&d)
        .with_context(|| format!("creating {}", d.display()))
}

/// Creates agent `agent`'s empty feed; returns its path.
pub fn create(daemon: &Daemon, agent: &str) -> Result<PathBuf> {
    let p = path(daemon, agent);
    fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(&p)
        .with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}

pub fn remove(daemon: &Daemon, agent: &str) {
    let _ = fs::remove_file(path(daemon, agent));
}

/// Appends one denial to the agent's feed (while it has room).
pub fn append(daemon: &Daemon, agent: &AgentState, kind: &str, d: &Denial) {
    let p = path(daemon, &agent.name);
    let Ok(mut f) = fs::OpenOptions::new().append(true).open(&p) else {
        return;
    };
    let size = f.metadata().map_or(0, |m| m.len());
    if size >= MAX_FEED_BYTES {
        return;
    }
    let mut line = json!({
        "time": crate::audit::rfc3339(std::time::SystemTime::now()),
        "kind": kind,
        "verdict": d.verdict,
        "what": d.what,
        "why": d.why,
        "path": d.resolved.as_ref().or(d.path.as_ref()),
        "pid": d.pid,
        "comm": d.comm,
    })
    .to_string();
    line.push('\n');
    if size + line.len() as u64 > MAX_FEED_BYTES {
        line = json!({"kind": "feed_full", "why": format!(
            "this feed holds at most {MAX_FEED_BYTES} bytes; `agentd events --agent {}` has every record",
            agent.name
        )})
        .to_string()
            + "\n";
    }
    let _ = f.write_all(line.as_bytes());
}

/// Why agentd refused what `e` says, in words.
pub fn why(e: &Event, agent: Option<&AgentState>) -> String {
    let profile = agent.map(|a| {
        let live = a.live.locked();
        (
            live.policy.profile.clone(),
            live.policy.version.to_string(),
            live.policy.seccomp_deny.clone(),
        )
    });
    let of_profile = match &profile {
        Some((p, v, _)) => format!("profile {p} {v}"),
        None => "its profile".to_string(),
    };
    let h = e.header();
    match e {
        Event::Net(_) => match h.hook {
            HOOK_SOCK_CREATE => "agents may not open raw sockets".to_string(),
            HOOK_BIND4 | HOOK_BIND6 => {
                "the address or port is agentd's own (its resolvers, its metrics)".to_string()
            }
            HOOK_SKB_EGRESS => format!("the destination is not in the allowlist of {of_profile}"),
            _ => format!("not in the allowlist of {of_profile}"),
        },
        Event::File(_) if h.hook == HOOK_SYSCALL_EXIT => format!(
            "not allowed by the file rules of {of_profile} (or by the file's own permissions: \
             a failed call is reported whatever refused it)"
        ),
        Event::File(_) => format!("not allowed by the file rules of {of_profile}"),
        Event::Proc(_) if h.hook == agentd_common::events::HOOK_BPF => {
            "agents may not use BPF (agentd's programs and maps are its own)".to_string()
        }
        Event::Proc(_) => {
            "the process is outside the agent: agents may not trace or signal other processes"
                .to_string()
        }
        Event::Syscall(s) => {
            let name = crate::seccomp::describe(s.arch, s.nr);
            let call = name.split(' ').next().unwrap_or_default().to_string();
            match &profile {
                Some((_, _, deny)) if deny.contains(&call) => {
                    format!("{of_profile} denies it (seccomp.deny)")
                }
                _ => "no agent may make this call (agentd's seccomp filter)".to_string(),
            }
        }
        Event::Budget(_) => format!("a rate budget of {of_profile} ran out"),
    }
}

/// Most kinds of denial an agent's summary keeps.
pub const MAX_KINDS: usize = 200;

/// What was denied to one agent, one line per kind (what and why) with how many times,
/// oldest first: what `agentd run --explain` prints. Kept as the denials come (the recent
/// denials `inspect` shows are a window that a noisy agent slides past).
#[derive(Debug, Default)]
pub struct Explained {
    order: Vec<String>,
    counts: BTreeMap<String, u64>,
    /// Denials of kinds beyond [`MAX_KINDS`].
    more: u64,
}

impl Explained {
    pub fn add(&mut self, d: &Denial) {
        let line = format!("{}: {}", d.what, d.why);
        if let Some(n) = self.counts.get_mut(&line) {
            *n += 1;
        } else if self.order.len() < MAX_KINDS {
            self.counts.insert(line.clone(), 1);
            self.order.push(line);
        } else {
            self.more += 1;
        }
    }

    pub fn lines(&self, agent: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .order
            .iter()
            .map(|l| match self.counts[l] {
                1 => l.clone(),
                n => format!("{l} ({n} times)"),
            })
            .collect();
        if self.more > 0 {
            out.push(format!(
                "and {} more denials of other kinds (`agentd events --agent {agent}` has them all)",
                self.more
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(what: &str) -> Denial {
        Denial {
            hook: "connect4".into(),
            verdict: "denied".into(),
            text: String::new(),
            what: what.into(),
            why: "not in the allowlist of profile p 1.0.0".into(),
            path: None,
            resolved: None,
            pid: 1,
            comm: "x".into(),
        }
    }

    #[test]
    fn one_line_per_kind_with_counts_oldest_first_and_bounded() {
        let mut e = Explained::default();
        for w in ["connect a denied", "connect b denied", "connect a denied"] {
            e.add(&denial(w));
        }
        assert_eq!(
            e.lines("x"),
            [
                "connect a denied: not in the allowlist of profile p 1.0.0 (2 times)",
                "connect b denied: not in the allowlist of profile p 1.0.0",
            ]
        );
        for i in 0..MAX_KINDS + 5 {
            e.add(&denial(&format!("connect {i} denied")));
        }
        let lines = e.lines("x");
        assert_eq!(lines.len(), MAX_KINDS + 1);
        assert!(
            lines[MAX_KINDS].starts_with("and 7 more denials"),
            "{}",
            lines[MAX_KINDS]
        );
    }
}
