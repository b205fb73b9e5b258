//! The control protocol between the `agentd` commands and the daemon.
//!
//! Newline-delimited JSON over a Unix stream socket. The client sends one [`Request`]; for
//! `run` the same message carries the client's stdin, stdout and stderr as SCM_RIGHTS
//! descriptors, which become the agent's. The daemon answers with [`Reply`] lines: for
//! `run`, `started` and later `exited`; meanwhile the client may send [`RunControl`]
//! lines (signals to forward). If the client goes away, its agent is killed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::policy::{Adjustments, Policy};

/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Run(Box<RunRequest>),
    Ps,
    Inspect {
        agent: String,
    },
    Update(Box<UpdateRequest>),
    /// The kill switch: kill, freeze or thaw the named agents, or all of them.
    Kill {
        agents: Vec<String>,
        all: bool,
        action: crate::kill::Action,
    },
    /// Turns the kernel programs' debug log on or off.
    DebugLog {
        on: bool,
    },
    /// Reads the configuration and profiles again and moves agents to their new versions.
    Reload,
    /// Audit records: up to `last` recent ones, then (with `follow`) each new one as it is
    /// written; only those of `agent` if given.
    Events {
        follow: bool,
        agent: Option<String>,
        last: usize,
    },
}

/// `agentd update`: a new policy for a running agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpdateRequest {
    pub agent: String,
    /// A new profile; `None` reads the agent's profile again.
    pub profile: Option<ProfileSpec>,
    /// Added to the agent's command-line changes.
    pub adjustments: Adjustments,
    /// Switch to audit or back to enforce.
    pub mode: Option<crate::profile::Mode>,
}

/// Which profile: a name in the daemon's profiles directory, or a file the client read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProfileSpec {
    Default,
    Named(String),
    Inline { source: String, text: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The client's working directory (the default workdir).
    pub cwd: PathBuf,
    pub profile: ProfileSpec,
    pub name: Option<String>,
    pub user: Option<String>,
    /// SUDO_UID of the client, if set (the default user).
    pub sudo_uid: Option<u32>,
    pub workdir: Option<PathBuf>,
    /// The agent's home ({home} in profiles, HOME) instead of its user's.
    pub home: Option<PathBuf>,
    /// Start even if this host cannot enforce all of the policy (and say what is not).
    pub degraded_ok: bool,
    pub adjustments: Adjustments,
    /// The client prints what was denied when the agent ends (`--explain`): the daemon then
    /// gives the events of the agent's last moments a little time to arrive.
    #[serde(default)]
    pub explain: bool,
}

/// Messages the client may send on a `run` connection after `started`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RunControl {
    Signal { signal: i32 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentInfo {
    pub name: String,
    /// cgroup id (the id in kernel events).
    pub id: u64,
    pub cgroup: PathBuf,
    /// The agent's first process.
    pub pid: u32,
    pub user: String,
    pub uid: u32,
    pub profile: String,
    pub version: String,
    pub mode: String,
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub processes: usize,
    /// What enforces each area for this agent, e.g. "network: cgroup connect4".
    pub enforcement: Vec<String>,
    pub workdir: PathBuf,
    pub tmp: PathBuf,
    /// The agent's own resolver, where its DNS queries go.
    pub dns: String,
    /// Addresses its resolver answered with, allowed for their TTL.
    pub learned: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
}

/// A recent denial (or would-be denial) of an agent, as `inspect` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Denial {
    pub hook: String,
    pub verdict: String,
    /// The whole event in words.
    pub text: String,
    /// What was refused, in words (the text without the agent, process and hook).
    #[serde(default)]
    pub what: String,
    /// Why agentd refused it.
    #[serde(default)]
    pub why: String,
    /// For file events: the path (from the kernel's walk, or as the agent gave it).
    pub path: Option<String>,
    /// For a path as given: resolved as the agent's process saw it, if it still could be.
    pub resolved: Option<String>,
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub net_denied: u64,
    pub file_denied: u64,
    /// ptrace and signals to processes outside the agent.
    pub process_denied: u64,
    pub would_deny: u64,
    /// DNS queries answered by forwarding (allowed names).
    pub dns_answered: u64,
    /// DNS queries refused (names the policy does not allow).
    pub dns_refused: u64,
    /// Times a rate budget was found empty (reported at most once a second per budget).
    #[serde(default)]
    pub budget_exhausted: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Started {
        agent: Box<AgentInfo>,
        removed_env: Vec<String>,
        /// Parts of the policy this host does not enforce (started with --degraded-ok).
        degraded: Vec<String>,
    },
    /// `status` is what a shell reports: the exit code, or 128 + signal.
    Exited {
        status: i32,
        signal: Option<i32>,
        /// What was denied to the agent, one line per kind with its reason (`agentd run
        /// --explain` prints them).
        #[serde(default)]
        denials: Vec<String>,
    },
    Error {
        message: String,
        exit_code: i32,
    },
    Agents {
        agents: Vec<AgentInfo>,
    },
    Inspect {
        agent: Box<AgentInfo>,
        policy: Box<Policy>,
        processes: Vec<ProcessInfo>,
        counters: Counters,
        /// Recent denials, oldest first.
        denials: Vec<Denial>,
    },
    Updated {
        agent: Box<AgentInfo>,
        policy: Box<Policy>,
    },
    /// The kill switch request was taken; `Killed` follows when it is done.
    Accepted,
    /// What the kill switch did, per agent.
    Killed {
        outcomes: Vec<crate::kill::Outcome>,
    },
    /// One audit record (`agentd events`).
    Event {
        record: serde_json::Value,
    },
    /// The recent records were all sent (`agentd events` without `--follow`).
    EventsEnd,
    /// The kernel programs' debug log is now on or off.
    DebugLog {
        on: bool,
    },
    /// What a reload did.
    Reloaded {
        report: crate::daemon::reload::Report,
    },
}

/// Exit status for a request refused for its policy, profile or flags.
pub const EXIT_POLICY: i32 = 2;
/// Exit status for a failure of agentd itself (daemon unreachable, launch step failed).
pub const EXIT_AGENTD: i32 = 125;
