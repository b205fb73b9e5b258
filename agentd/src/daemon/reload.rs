//! `agentd reload` and SIGHUP: read the configuration and every profile again, check all of
//! it, then move each running agent to its profile's new version.
//!
//! Everything is read and checked before anything changes: a configuration or profile that
//! does not parse, a key that only a restart can change, a profile a running agent uses that
//! is gone, rules changed under an unchanged version, or an agent that its new version
//! would ask more of than this host can give it (see [`agents::can_take`]) refuses the whole
//! reload, and nothing changes. Then each agent whose policy differs is switched (one map
//! update each, parents before the agents they launched, which are narrowed again); if the
//! kernel refuses one, the agents already switched go back to what they had.
//!
//! Each agent that moves gets a `policy_updated` record naming its old and new profile,
//! version and mode; the reload itself a `config_reloaded` record (or `reload_refused`).

use std::{collections::BTreeMap, fs, net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{
    Daemon, Locked as _,
    agents::{self, AgentState, Live, Refusal, Version, refuse},
};
use crate::{
    config::Config,
    policy::Policy,
    profile::{self, Mode, Profile},
    protocol::{EXIT_AGENTD, ProfileSpec},
};

/// The configuration keys a reload changes (every other key needs a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub default_profile: String,
    pub agent_user: String,
    pub max_agents: usize,
    pub host_budgets: BTreeMap<String, crate::budgets::Budget>,
    /// Where agents' resolvers forward allowed queries (`dns.upstream`, or the nameservers
    /// of /etc/resolv.conf, read again on each reload).
    pub upstream: Vec<SocketAddr>,
}

impl Settings {
    pub fn of(config: &Config) -> Settings {
        Settings {
            default_profile: config.default_profile.clone(),
            agent_user: config.agent_user.clone(),
            max_agents: config.max_agents,
            host_budgets: config.host_budgets.clone(),
            upstream: match &config.dns_upstream {
                Some(list) => list.clone(),
                None => crate::network::resolver::upstream_from_resolv_conf(
                    &fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
                ),
            },
        }
    }

    /// The keys whose values differ.
    fn changed(&self, other: &Settings) -> Vec<&'static str> {
        [
            (
                "agents.default_profile",
                self.default_profile != other.default_profile,
            ),
            ("agents.user", self.agent_user != other.agent_user),
            ("agents.max", self.max_agents != other.max_agents),
            ("host_budgets", self.host_budgets != other.host_budgets),
            ("dns.upstream", self.upstream != other.upstream),
        ]
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect()
    }
}

/// The keys that only take effect when the daemon starts, which differ between `old` and
/// `new`.
pub fn restart_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("daemon.socket", old.socket != new.socket),
        (
            "daemon.launch_socket",
            old.launch_socket != new.launch_socket,
        ),
        ("daemon.admin_group", old.admin_group != new.admin_group),
        ("daemon.cgroup_root", old.cgroup_root != new.cgroup_root),
        ("daemon.bpffs", old.bpffs != new.bpffs),
        ("daemon.on_stop", old.on_stop != new.on_stop),
        ("agents.profiles_dir", old.profiles_dir != new.profiles_dir),
        ("agents.tmp_dir", old.tmp_dir != new.tmp_dir),
        ("agents.max_tasks", old.max_tasks != new.max_tasks),
        ("dns.port", old.dns_port != new.dns_port),
        (
            "files.enforcers",
            (old.use_lsm, old.use_landlock) != (new.use_lsm, new.use_landlock),
        ),
        ("audit.path", old.audit_path != new.audit_path),
        (
            "audit.max_bytes",
            old.audit_max_bytes != new.audit_max_bytes,
        ),
        ("audit.keep", old.audit_keep != new.audit_keep),
        (
            "audit.aggregate_seconds",
            old.audit_aggregate_secs != new.audit_aggregate_secs,
        ),
        ("metrics.listen", old.metrics_listen != new.metrics_listen),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect()
}

/// What a reload did to one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub agent: String,
    pub from: Version,
    pub to: Version,
    /// False when its policy was already what its profile says.
    pub changed: bool,
    /// What the move could not change (Landlock's file rules are fixed at launch), or why
    /// its profile was not read again.
    pub note: Option<String>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The configuration file read, if there is one.
    pub config: Option<String>,
    /// Profiles read and checked (every file of the profiles directory).
    pub profiles: usize,
    /// Configuration keys changed.
    pub settings: Vec<String>,
    pub agents: Vec<Moved>,
}

impl Report {
    pub fn summary(&self) -> String {
        let moved = self.agents.iter().filter(|m| m.changed).count();
        let mut s = format!(
            "reloaded {} and {} profiles: {} of {} agents moved to a new policy",
            self.config
                .as_deref()
                .unwrap_or("the built-in configuration"),
            self.profiles,
            moved,
            self.agents.len()
        );
        if !self.settings.is_empty() {
            s.push_str(&format!("; changed: {}", self.settings.join(", ")));
        }
        s
    }
}

/// One agent's next state, decided before anything changes.
struct Step {
    agent: Arc<AgentState>,
    from: Version,
    /// Its new requested and effective policy; `None`: its policy stays as it is.
    next: Option<(Policy, Policy)>,
    note: Option<String>,
}

/// Reads and checks everything, then moves every running agent to its profile's current
/// version. `Err` changes nothing.
pub fn reload(daemon: &Arc<Daemon>) -> Result<Report, Refusal> {
    let _one = daemon.policy_change.locked();
    let result = plan_and_apply(daemon);
    match &result {
        Ok(report) => {
            let _ = daemon.audit(
                &crate::audit::Subject::daemon(),
                "config_reloaded",
                serde_json::json!({
                    "config": report.config,
                    "profiles": report.profiles,
                    "settings": report.settings,
                    "agents": report.agents,
                }),
                false,
            );
        }
        Err((message, _)) => {
            let _ = daemon.audit(
                &crate::audit::Subject::daemon(),
                "reload_refused",
                serde_json::json!({"reason": message}),
                false,
            );
        }
    }
    result
}

fn plan_and_apply(daemon: &Arc<Daemon>) -> Result<Report, Refusal> {
    let config = Config::load(daemon.config.path.as_deref()).map_err(|e| refuse(e.to_string()))?;
    let source = config.path.as_ref().map(|p| p.display().to_string());
    let restart = restart_keys(&daemon.config, &config);
    if !restart.is_empty() {
        return Err(refuse(format!(
            "{}: {} changed, which takes effect only when the daemon starts again (systemctl restart agentd); \
             undo the change to reload the rest",
            source.as_deref().unwrap_or("the configuration"),
            restart.join(", ")
        )));
    }
    let settings = Settings::of(&config);
    let profiles = read_profiles(&config)?;
    // A new default must exist (the daemon starts without one: `run` names what is missing).
    if settings.default_profile != daemon.settings.locked().default_profile
        && !profiles.contains_key(&settings.default_profile)
    {
        return Err(refuse(format!(
            "{}: agents.default_profile: no profile `{}` in {}",
            source.as_deref().unwrap_or("the configuration"),
            settings.default_profile,
            config.profiles_dir.display()
        )));
    }
    let steps = plan(daemon, &settings, &profiles)?;
    let changed_settings = daemon.settings.locked().changed(&settings);
    apply(daemon, &settings, &steps)?;
    let changed_settings = changed_settings.iter().map(ToString::to_string).collect();
    *daemon.settings.locked() = settings;
    Ok(Report {
        config: source,
        profiles: profiles.len(),
        settings: changed_settings,
        agents: steps
            .iter()
            .map(|s| Moved {
                agent: s.agent.name.clone(),
                from: s.from.clone(),
                to: Version::of(&s.agent.live.locked().policy),
                changed: s.next.is_some(),
                note: s.note.clone(),
            })
            .collect(),
    })
}

/// Every profile of the profiles directory, parsed (and named as its file is); any error
/// refuses the reload, naming each file, line and key.
fn read_profiles(config: &Config) -> Result<BTreeMap<String, Profile>, Refusal> {
    let list = profile::list(&config.profiles_dir)
        .map_err(|e| refuse(format!("{}: {e}", config.profiles_dir.display())))?;
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, _) in list {
        match profile::load_named(&config.profiles_dir, &name) {
            Ok(p) => {
                out.insert(name, p);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        return Err(refuse(errors.join("\n")));
    }
    Ok(out)
}

/// Decides each agent's next policy, parents before the agents they launched.
fn plan(
    daemon: &Daemon,
    settings: &Settings,
    profiles: &BTreeMap<String, Profile>,
) -> Result<Vec<Step>, Refusal> {
    let mut all: Vec<Arc<AgentState>> = daemon.agents.locked().values().cloned().collect();
    let parents: BTreeMap<u64, Option<u64>> = all.iter().map(|a| (a.id, a.parent_id)).collect();
    let depth = |a: &AgentState| {
        let mut n = 0;
        let mut at = a.parent_id;
        while let Some(id) = at.filter(|_| n < parents.len()) {
            n += 1;
            at = parents.get(&id).copied().flatten();
        }
        n
    };
    all.sort_by_cached_key(|a| (depth(a), a.name.clone()));
    let mut steps = Vec::new();
    // Each agent's next policy (new or kept), for the intersections of its children.
    let mut planned: BTreeMap<u64, (Policy, String)> = BTreeMap::new();
    for agent in all {
        let (spec, adjustments, placeholders, requested_now, current) = {
            let live = agent.live.locked();
            (
                live.spec.clone(),
                live.adjustments.clone(),
                live.placeholders.clone(),
                live.requested.clone(),
                live.policy.clone(),
            )
        };
        let from = Version::of(&current);
        let name = match &spec {
            ProfileSpec::Default => settings.default_profile.clone(),
            ProfileSpec::Named(n) => n.clone(),
            ProfileSpec::Inline { source, .. } => {
                // Narrowed again if its parent's policy changes (agents it launched too).
                let parent = agent.parent_id.and_then(|id| planned.get(&id));
                let mut policy = match parent {
                    Some((p, n)) => {
                        agents::effective_under(daemon, &agent.name, &requested_now, Some((p, n)))
                    }
                    None => current.clone(),
                };
                agents::launch_files(daemon, &agent, &mut policy);
                if policy != current {
                    agents::can_take(daemon, &agent, &policy).map_err(refuse)?;
                }
                planned.insert(agent.id, (policy.clone(), agent.name.clone()));
                steps.push(Step {
                    from,
                    next: (policy != current).then(|| (requested_now.clone(), policy)),
                    note: Some(format!(
                        "its profile was given as a file ({source}) when it started, and is not read again \
                         (`agentd update {} --profile {source}` reads it)",
                        agent.name
                    )),
                    agent,
                });
                continue;
            }
        };
        let profile = profiles.get(&name).ok_or_else(|| {
            refuse(format!(
                "agent {} runs profile `{name}`, which is no longer in the profiles directory: \
                 put it back, or move the agent to another profile first (agentd update {} --profile NAME)",
                agent.name, agent.name
            ))
        })?;
        let mut requested = Policy::from_profile(profile, &placeholders);
        requested.adjust(&adjustments).map_err(refuse)?;
        if requested.profile == requested_now.profile
            && requested.version == requested_now.version
            && requested != requested_now
        {
            return Err(refuse(format!(
                "{}: version: the rules of profile {} changed but its version ({}) did not (agent {} \
                 runs that version): give the new rules a new version, so that agents, the audit \
                 log and `agentd ps` tell them apart",
                profile.source, profile.name, profile.version, agent.name
            )));
        }
        let parent = agent.parent_id.and_then(|id| planned.get(&id));
        let mut policy = agents::effective_under(
            daemon,
            &agent.name,
            &requested,
            parent.map(|(p, n)| (p, n.as_str())),
        );
        if agent.parent_id.is_some() && parent.is_none() {
            // Its parent has ended: what it has now is the most it can ever have.
            policy = policy.intersect(&current, &agent.name);
        }
        let mut notes = Vec::new();
        if agents::launch_files(daemon, &agent, &mut policy) {
            notes.push(
                "its file rules stay as they were at its start (Landlock is fixed at launch, and BPF LSM \
                 is not usable here): the new file rules apply to agents started from now on",
            );
        }
        planned.insert(agent.id, (policy.clone(), agent.name.clone()));
        if policy == current {
            steps.push(Step {
                agent,
                from,
                next: None,
                note: (!notes.is_empty()).then(|| notes.join("; ")),
            });
            continue;
        }
        agents::can_take(daemon, &agent, &policy).map_err(refuse)?;
        let lsm = daemon.file_enforcers.lsm;
        if policy.mode == Mode::Audit && current.mode == Mode::Enforce {
            notes.push(if !lsm && agent.landlocked {
                "audit mode covers egress, DNS names and budgets from now on; its seccomp filter and \
                 Landlock file rules, fixed at its start, still deny"
            } else {
                "audit mode covers egress, DNS names, files and budgets from now on; its seccomp \
                 filter, fixed at its start, still denies"
            });
        }
        let note = (!notes.is_empty()).then(|| notes.join("; "));
        steps.push(Step {
            agent,
            from,
            next: Some((requested, policy)),
            note,
        });
    }
    Ok(steps)
}

/// Puts the host-wide budgets and every agent's next policy in force, or, if the kernel
/// refuses one, puts back what was there.
fn apply(daemon: &Daemon, settings: &Settings, steps: &[Step]) -> Result<(), Refusal> {
    let old_host = daemon.settings.locked().host_budgets.clone();
    let host = |budgets: &BTreeMap<String, crate::budgets::Budget>| {
        crate::budgets::apply(
            &mut daemon.kernel.locked(),
            agentd_common::budgets::HOST,
            budgets,
        )
    };
    if old_host != settings.host_budgets {
        host(&settings.host_budgets).map_err(|e| {
            let _ = host(&old_host);
            (
                format!("host_budgets: the kernel refused them: {e:#}"),
                EXIT_AGENTD,
            )
        })?;
    }
    let mut done: Vec<(&Step, Live)> = Vec::new();
    for step in steps {
        let Some((requested, policy)) = &step.next else {
            continue;
        };
        let old = {
            let live = step.agent.live.locked();
            Live {
                spec: live.spec.clone(),
                adjustments: live.adjustments.clone(),
                requested: live.requested.clone(),
                policy: live.policy.clone(),
                ..agents::empty_live()
            }
        };
        let next = Live {
            spec: old.spec.clone(),
            adjustments: old.adjustments.clone(),
            requested: requested.clone(),
            policy: policy.clone(),
            ..agents::empty_live()
        };
        if let Err(e) = agents::switch(daemon, &step.agent, next) {
            for (step, old) in done.into_iter().rev() {
                if let Err(e) = agents::switch(daemon, &step.agent, old) {
                    // It keeps the new policy: it is consistent, only not what was asked.
                    eprintln!(
                        "agentd: reload: agent {}: putting back its policy: {e}",
                        step.agent.name
                    );
                }
            }
            if old_host != settings.host_budgets {
                let _ = host(&old_host);
            }
            return Err((
                format!(
                    "agent {}: {e}; every agent keeps its policy",
                    step.agent.name
                ),
                EXIT_AGENTD,
            ));
        }
        done.push((step, old));
    }
    agents::budget_hook(daemon);
    for (step, _) in &done {
        agents::changed(daemon, &step.agent, &step.from, "reload");
    }
    Ok(())
}
