//! The effective policy of one agent: its profile with placeholders resolved, ad-hoc
//! command-line changes applied, and, for an agent launched from inside another agent,
//! intersected with its parent's policy so that delegation only narrows.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use agentd_common::files::{ACCESS_ALL, ACCESS_EXEC, ACCESS_READ, ACCESS_WRITE};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::profile::{
    EnvRules, HostRule, Mode, NetRule, Placeholders, Profile, env_pattern_matches, normalize,
};

/// Access bits allowed and denied at one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    pub allow: u32,
    pub deny: u32,
}

/// File rules keyed by absolute path. For each access bit, the nearest rule at or above a
/// path that mentions the bit decides it; a bit in both `allow` and `deny` at one path is
/// denied; a bit no rule mentions takes `default_allow`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePolicy {
    pub rules: BTreeMap<PathBuf, Access>,
    pub default_allow: u32,
}

impl FilePolicy {
    pub fn add(&mut self, path: &Path, allow: u32, deny: u32) {
        let a = self.rules.entry(normalize(path)).or_default();
        a.allow |= allow;
        a.deny |= deny;
    }

    /// The access bits allowed at `path` (absolute).
    pub fn allowed(&self, path: &Path) -> u32 {
        let path = normalize(path);
        let mut undecided = ACCESS_ALL;
        let mut allowed = 0;
        for at in path.ancestors() {
            if let Some(r) = self.rules.get(at) {
                let mentioned = (r.allow | r.deny) & undecided;
                allowed |= r.allow & !r.deny & mentioned;
                undecided &= !mentioned;
            }
        }
        allowed | (undecided & self.default_allow)
    }

    /// The same rules on the real paths: every symlink in a rule path is resolved (for a
    /// path that does not exist, in its longest existing ancestor). Rules that land on one
    /// path add up (a bit both allowed and denied there is denied). Policies are compared,
    /// and intersected, only in this form: otherwise a link made by a parent agent inside
    /// an area it may read could carry a child's allow onto a path the parent is denied.
    pub fn resolved(&self) -> FilePolicy {
        let mut out = FilePolicy {
            rules: BTreeMap::new(),
            default_allow: self.default_allow,
        };
        for (p, a) in &self.rules {
            out.add(&real_path(p), a.allow, a.deny);
        }
        out
    }

    /// The rules to enforce now: a rule path that resolves elsewhere than it did when the
    /// policy was resolved (a symlink was planted in it since) keeps its denials but loses
    /// its allows, so that the link cannot move an allow onto its target.
    pub fn without_moved_allows(&self) -> FilePolicy {
        let mut out = self.clone();
        for (p, a) in out.rules.iter_mut() {
            if real_path(p) != *p {
                a.allow = 0;
            }
        }
        out
    }

    /// Allowed by both: every path either policy names gets an explicit rule that allows
    /// exactly what both allow there; below it nothing changes until the next named path.
    pub fn intersect(&self, other: &FilePolicy) -> FilePolicy {
        let paths: BTreeSet<&PathBuf> = self.rules.keys().chain(other.rules.keys()).collect();
        let rules = paths
            .into_iter()
            .map(|p| {
                let a = self.allowed(p) & other.allowed(p);
                (
                    p.clone(),
                    Access {
                        allow: a,
                        deny: ACCESS_ALL & !a,
                    },
                )
            })
            .collect();
        FilePolicy {
            rules,
            default_allow: self.default_allow & other.default_allow,
        }
    }
}

/// `p` with every symlink resolved: the canonical form of its longest existing ancestor,
/// followed by the rest of it.
pub fn real_path(p: &Path) -> PathBuf {
    let p = normalize(p);
    for base in p.ancestors() {
        if let Ok(real) = std::fs::canonicalize(base) {
            let rest = p.strip_prefix(base).unwrap_or(Path::new(""));
            return if rest.as_os_str().is_empty() {
                real
            } else {
                real.join(rest)
            };
        }
    }
    p
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub allow: Vec<NetRule>,
    pub hosts: Vec<HostRule>,
    pub loopback: bool,
}

fn net_intersection(a: &IpNet, b: &IpNet) -> Option<IpNet> {
    if a.contains(b) {
        Some(*b)
    } else if b.contains(a) {
        Some(*a)
    } else {
        None
    }
}

/// The names both patterns admit, if any (`*.d` admits every name strictly below d).
fn host_intersection(a: &str, b: &str) -> Option<String> {
    /// Every name `q` admits, `p` admits too.
    fn covers(p: &str, q: &str) -> bool {
        if p == q {
            return true;
        }
        let Some(domain) = p.strip_prefix("*.") else {
            return false;
        };
        let below = format!(".{domain}");
        match q.strip_prefix("*.") {
            Some(q_domain) => q_domain == domain || q_domain.ends_with(&below),
            None => q.ends_with(&below),
        }
    }
    if covers(a, b) {
        Some(b.to_string())
    } else if covers(b, a) {
        Some(a.to_string())
    } else {
        None
    }
}

impl NetworkPolicy {
    pub fn intersect(&self, other: &NetworkPolicy) -> NetworkPolicy {
        let mut allow = BTreeSet::new();
        for a in &self.allow {
            for b in &other.allow {
                if let (Some(net), Some(ports)) = (
                    net_intersection(&a.net, &b.net),
                    a.ports.intersect(&b.ports),
                ) {
                    allow.insert(NetRule { net, ports });
                }
            }
        }
        let mut hosts = BTreeSet::new();
        for a in &self.hosts {
            for b in &other.hosts {
                if let (Some(pattern), Some(ports)) = (
                    host_intersection(&a.pattern, &b.pattern),
                    a.ports.intersect(&b.ports),
                ) {
                    hosts.insert(HostRule { pattern, ports });
                }
            }
        }
        NetworkPolicy {
            allow: allow.into_iter().collect(),
            hosts: hosts.into_iter().collect(),
            loopback: self.loopback && other.loopback,
        }
    }
}

/// Environment names removed from every agent unless its profile passes them.
pub const SECRET_ENV_PATTERNS: &[&str] = &[
    "*_TOKEN",
    "*_TOKENS",
    "*_KEY",
    "*_KEYS",
    "*_SECRET",
    "*_SECRETS",
    "*_PASSWORD",
    "*_PASSWD",
    "*_CREDENTIALS",
    "*_CREDENTIAL",
    "AWS_*",
    "AZURE_*",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "GPG_AGENT_INFO",
    "KRB5CCNAME",
    "VAULT_*",
    "DOCKER_AUTH_CONFIG",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub profile: String,
    pub version: semver::Version,
    pub source: String,
    pub mode: Mode,
    pub network: NetworkPolicy,
    pub files: FilePolicy,
    /// Capabilities the agent keeps (numbers).
    pub capabilities: BTreeSet<u32>,
    /// System calls denied beyond agentd's own list.
    pub seccomp_deny: BTreeSet<String>,
    pub rlimits: BTreeMap<String, u64>,
    /// Rate budgets by class name.
    #[serde(default)]
    pub budgets: BTreeMap<String, crate::budgets::Budget>,
    /// The circuit breaker.
    #[serde(default)]
    pub breaker: Option<crate::budgets::Breaker>,
    pub environment: EnvRules,
    /// Changes made on the command line, as given (for `inspect`).
    pub adjustments: Vec<String>,
    /// The agent this policy was narrowed by (nested launches).
    pub narrowed_by: Option<String>,
}

/// Changes requested on the command line of `agentd run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjustments {
    pub allow_net: Vec<String>,
    pub allow_host: Vec<String>,
    pub allow_read: Vec<PathBuf>,
    pub allow_write: Vec<PathBuf>,
    pub deny_path: Vec<PathBuf>,
    pub audit: bool,
}

impl Adjustments {
    /// Adds `more` to these changes.
    pub fn extend(&mut self, more: &Adjustments) {
        self.allow_net.extend(more.allow_net.iter().cloned());
        self.allow_host.extend(more.allow_host.iter().cloned());
        self.allow_read.extend(more.allow_read.iter().cloned());
        self.allow_write.extend(more.allow_write.iter().cloned());
        self.deny_path.extend(more.deny_path.iter().cloned());
        self.audit |= more.audit;
    }
}

impl Policy {
    /// A policy that allows nothing (a placeholder before the real one is computed).
    pub fn empty() -> Policy {
        Policy {
            profile: String::new(),
            version: semver::Version::new(0, 0, 0),
            source: String::new(),
            mode: Mode::Enforce,
            network: NetworkPolicy::default(),
            files: FilePolicy::default(),
            capabilities: BTreeSet::new(),
            seccomp_deny: BTreeSet::new(),
            rlimits: BTreeMap::new(),
            budgets: BTreeMap::new(),
            breaker: None,
            environment: EnvRules::default(),
            adjustments: Vec::new(),
            narrowed_by: None,
        }
    }

    /// The policy a profile gives an agent with these placeholder values.
    pub fn from_profile(p: &Profile, ph: &Placeholders) -> Policy {
        let mut files = FilePolicy {
            default_allow: p.files_default_allow,
            ..Default::default()
        };
        for (list, allow, deny) in [
            (&p.files.read, ACCESS_READ, 0),
            (&p.files.write, ACCESS_WRITE, 0),
            (&p.files.exec, ACCESS_EXEC, 0),
            (&p.files.deny, 0, ACCESS_ALL),
        ] {
            for t in list {
                files.add(&t.resolve(ph), allow, deny);
            }
        }
        Policy {
            profile: p.name.clone(),
            version: p.version.clone(),
            source: p.source.clone(),
            mode: p.mode,
            network: NetworkPolicy {
                allow: p.network.allow.clone(),
                hosts: p.network.hosts.clone(),
                loopback: p.network.loopback,
            },
            files,
            capabilities: p.capabilities.iter().copied().collect(),
            seccomp_deny: p.seccomp_deny.iter().cloned().collect(),
            rlimits: p.rlimits.clone(),
            budgets: p.budgets.clone(),
            breaker: p.breaker.clone(),
            environment: p.environment.clone(),
            adjustments: Vec::new(),
            narrowed_by: None,
        }
    }

    /// Applies command-line changes; fails naming the flag and value.
    pub fn adjust(&mut self, adj: &Adjustments) -> Result<(), String> {
        for v in &adj.allow_net {
            let rule =
                crate::profile::parse_net_rule(v).map_err(|e| format!("--allow-net {v}: {e}"))?;
            self.network.allow.push(rule);
            self.adjustments.push(format!("--allow-net {v}"));
        }
        for v in &adj.allow_host {
            let rule =
                crate::profile::parse_host_rule(v).map_err(|e| format!("--allow-host {v}: {e}"))?;
            self.network.hosts.push(rule);
            self.adjustments.push(format!("--allow-host {v}"));
        }
        for (flag, list, allow, deny) in [
            ("--allow-read", &adj.allow_read, ACCESS_READ, 0),
            (
                "--allow-write",
                &adj.allow_write,
                ACCESS_READ | ACCESS_WRITE,
                0,
            ),
            ("--deny-path", &adj.deny_path, 0, ACCESS_ALL),
        ] {
            for p in list {
                if !p.is_absolute() {
                    return Err(format!("{flag} {}: not an absolute path", p.display()));
                }
                if p.components().any(|c| c == std::path::Component::ParentDir) {
                    return Err(format!("{flag} {}: `..` is not allowed", p.display()));
                }
                self.files.add(p, allow, deny);
                self.adjustments.push(format!("{flag} {}", p.display()));
            }
        }
        if adj.audit {
            self.mode = Mode::Audit;
            self.adjustments.push("--audit".into());
        }
        Ok(())
    }

    /// What both policies allow: the policy of an agent launched from inside `parent`.
    pub fn intersect(&self, parent: &Policy, parent_name: &str) -> Policy {
        let mut rlimits = self.rlimits.clone();
        for (k, v) in &parent.rlimits {
            rlimits
                .entry(k.clone())
                .and_modify(|mine| *mine = (*mine).min(*v))
                .or_insert(*v);
        }
        let mut environment = self.environment.clone();
        for r in &parent.environment.remove {
            if !environment.remove.contains(r) {
                environment.remove.push(r.clone());
            }
        }
        // A name the parent removes stays removed: the child may not pass it back.
        environment.pass.retain(|p| {
            !parent
                .environment
                .remove
                .iter()
                .any(|r| env_pattern_matches(r, p))
        });
        Policy {
            profile: self.profile.clone(),
            version: self.version.clone(),
            source: self.source.clone(),
            mode: if self.mode == Mode::Audit && parent.mode == Mode::Audit {
                Mode::Audit
            } else {
                Mode::Enforce
            },
            network: self.network.intersect(&parent.network),
            files: self.files.intersect(&parent.files),
            capabilities: self
                .capabilities
                .intersection(&parent.capabilities)
                .copied()
                .collect(),
            seccomp_deny: self
                .seccomp_deny
                .union(&parent.seccomp_deny)
                .cloned()
                .collect(),
            rlimits,
            budgets: crate::budgets::intersect(&self.budgets, &parent.budgets),
            breaker: crate::budgets::Breaker::intersect(&self.breaker, &parent.breaker),
            environment,
            adjustments: self.adjustments.clone(),
            narrowed_by: Some(parent_name.to_string()),
        }
    }

    /// Filters an environment: drops secret-looking names (agentd's list and the
    /// profile's) unless the profile passes them, then applies the profile's `set`.
    /// Returns the kept variables and the names removed.
    pub fn filter_env(&self, vars: &[(String, String)]) -> (Vec<(String, String)>, Vec<String>) {
        let env = &self.environment;
        let removed_by = |name: &str| {
            SECRET_ENV_PATTERNS
                .iter()
                .copied()
                .chain(env.remove.iter().map(String::as_str))
                .any(|p| env_pattern_matches(p, name))
                && !env.pass.iter().any(|p| env_pattern_matches(p, name))
        };
        let mut kept = Vec::new();
        let mut removed = Vec::new();
        for (k, v) in vars {
            if env.set.contains_key(k) {
                continue;
            }
            if removed_by(k) {
                removed.push(k.clone());
            } else {
                kept.push((k.clone(), v.clone()));
            }
        }
        kept.extend(env.set.iter().map(|(k, v)| (k.clone(), v.clone())));
        (kept, removed)
    }

    /// A short human description, one line per area.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "profile   {} {} ({}){}",
            self.profile,
            self.version,
            self.source,
            match self.mode {
                Mode::Audit => ", AUDIT mode: nothing is denied",
                Mode::Enforce => "",
            }
        );
        if let Some(p) = &self.narrowed_by {
            let _ = writeln!(s, "narrowed  by the policy of agent {p}");
        }
        for a in &self.adjustments {
            let _ = writeln!(s, "flag      {a}");
        }
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let _ = writeln!(
            s,
            "network   allow {}",
            list(self.network.allow.iter().map(ToString::to_string).collect())
        );
        let _ = writeln!(
            s,
            "          hosts {}",
            list(self.network.hosts.iter().map(ToString::to_string).collect())
        );
        let _ = writeln!(
            s,
            "          loopback {}",
            if self.network.loopback {
                "allowed"
            } else {
                "denied"
            }
        );
        let bits = |b: u32| {
            let mut v = Vec::new();
            for (bit, n) in [(ACCESS_READ, "r"), (ACCESS_WRITE, "w"), (ACCESS_EXEC, "x")] {
                v.push(if b & bit != 0 { n } else { "-" });
            }
            v.concat()
        };
        let _ = writeln!(
            s,
            "files     unlisted paths: {}",
            bits(self.files.default_allow)
        );
        for (p, a) in &self.files.rules {
            let _ = writeln!(
                s,
                "          {} {}",
                bits(self.files.allowed(p)),
                p.display()
            );
            let _ = a;
        }
        let _ = writeln!(
            s,
            "process   capabilities {}",
            list(
                self.capabilities
                    .iter()
                    .map(|c| crate::caps::name(*c))
                    .collect()
            )
        );
        let _ = writeln!(
            s,
            "seccomp   extra denied {}",
            list(self.seccomp_deny.iter().cloned().collect())
        );
        let _ = writeln!(
            s,
            "rlimits   {}",
            list(
                self.rlimits
                    .iter()
                    .map(|(k, v)| if *v == u64::MAX {
                        format!("{k}=unlimited")
                    } else {
                        format!("{k}={v}")
                    })
                    .collect()
            )
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{parse, parse_host_rule, parse_net_rule};

    fn ph() -> Placeholders {
        Placeholders {
            workdir: "/work".into(),
            home: "/home/u".into(),
            tmp: "/tmp/agentd/a".into(),
        }
    }

    fn policy(text: &str) -> Policy {
        let p = parse(
            &format!("name = \"t\"\nversion = \"1.0.0\"\n{text}"),
            "t.toml",
        )
        .unwrap();
        Policy::from_profile(&p, &ph())
    }

    #[test]
    fn rules_are_judged_on_real_paths_and_a_planted_link_loses_its_allows() {
        let dir = std::env::temp_dir().join(format!("agentd-unit-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("secret")).unwrap();
        std::fs::create_dir_all(dir.join("plain")).unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), dir.join("link")).unwrap();
        let mut parent = FilePolicy {
            default_allow: ACCESS_ALL,
            ..Default::default()
        };
        parent.add(&dir.join("secret"), 0, ACCESS_ALL);
        let mut child = FilePolicy::default();
        child.add(&dir.join("link/key"), ACCESS_READ, 0);
        child.add(&dir.join("plain"), ACCESS_READ, 0);
        let resolved = child.resolved();
        assert!(
            resolved.rules.contains_key(&dir.join("secret/key")),
            "{resolved:?}"
        );
        assert_eq!(
            resolved.intersect(&parent).allowed(&dir.join("secret/key")),
            0
        );
        // `plain` becomes a link after the policy was resolved: its allow goes, denies stay.
        let mut later = resolved.clone();
        later.add(&dir.join("plain"), 0, ACCESS_WRITE);
        std::fs::remove_dir(dir.join("plain")).unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), dir.join("plain")).unwrap();
        let now = later.without_moved_allows();
        assert_eq!(
            now.rules[&dir.join("plain")],
            Access {
                allow: 0,
                deny: ACCESS_WRITE
            }
        );
        assert_eq!(
            now.rules[&dir.join("secret/key")].allow,
            ACCESS_READ,
            "a real path keeps its rule"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nearest_rule_decides_and_deny_beats_allow_at_one_path() {
        let p = policy(
            "[files]\nread = [\"/\", \"{home}/.ssh/config\"]\nwrite = [\"{workdir}\"]\ndeny = [\"{home}/.ssh\", \"/etc/shadow\"]\n",
        );
        assert_eq!(p.files.allowed(Path::new("/usr/bin/ls")), ACCESS_READ);
        assert_eq!(p.files.allowed(Path::new("/home/u/.ssh/id_ed25519")), 0);
        assert_eq!(
            p.files.allowed(Path::new("/home/u/.ssh/config")),
            ACCESS_READ,
            "deeper allow wins"
        );
        assert_eq!(
            p.files.allowed(Path::new("/home/u/.sshx")),
            ACCESS_READ,
            "whole components only"
        );
        assert_eq!(
            p.files.allowed(Path::new("/work/src/main.rs")),
            ACCESS_READ | ACCESS_WRITE
        );
        assert_eq!(p.files.allowed(Path::new("/etc/shadow")), 0);
        let mut both = FilePolicy::default();
        both.add(Path::new("/x"), ACCESS_READ, ACCESS_READ);
        assert_eq!(
            both.allowed(Path::new("/x/y")),
            0,
            "deny beats allow at the same depth"
        );
    }

    #[test]
    fn intersection_never_allows_more_than_either() {
        let parent = policy(
            "[files]\nread = [\"/usr\", \"/work\"]\nwrite = [\"/work/out\"]\n[network]\nallow = [\"10.0.0.0/8:443/tcp\", \"192.0.2.0/24\"]\nhosts = [\"*.pypi.org:443\"]\n[process]\ncapabilities = [\"CAP_NET_RAW\"]\n[rlimits]\nnofile = 100\n",
        );
        let child = policy(
            "[files]\nread = [\"/\"]\nwrite = [\"/\"]\nexec = [\"/\"]\n[network]\nallow = [\"0.0.0.0/0\", \"10.1.0.0/16:400-500\"]\nhosts = [\"files.pypi.org\", \"evil.com\"]\nloopback = true\n[process]\ncapabilities = [\"ALL\"]\n[rlimits]\nnofile = 5000\nnproc = 10\n",
        );
        let eff = child.intersect(&parent, "parent");
        for path in [
            "/usr/lib/x",
            "/work/a",
            "/work/out/b",
            "/etc/passwd",
            "/",
            "/home",
        ] {
            let p = Path::new(path);
            assert_eq!(
                eff.files.allowed(p),
                child.files.allowed(p) & parent.files.allowed(p),
                "{path}"
            );
        }
        assert_eq!(
            eff.files.allowed(Path::new("/work/out/b")),
            ACCESS_READ | ACCESS_WRITE
        );
        assert_eq!(eff.files.allowed(Path::new("/etc/passwd")), 0);
        let allow: Vec<String> = eff.network.allow.iter().map(ToString::to_string).collect();
        assert_eq!(
            allow,
            vec!["10.0.0.0/8:443/tcp", "10.1.0.0/16:443/tcp", "192.0.2.0/24"]
        );
        assert_eq!(
            eff.network.hosts,
            vec![parse_host_rule("files.pypi.org:443").unwrap()]
        );
        assert!(!eff.network.loopback);
        assert_eq!(eff.capabilities, BTreeSet::from([13]));
        assert_eq!(eff.rlimits["nofile"], 100);
        assert_eq!(eff.rlimits["nproc"], 10);
        assert_eq!(eff.narrowed_by.as_deref(), Some("parent"));
    }

    #[test]
    fn audit_only_when_both_audit() {
        let mut child = policy("");
        child
            .adjust(&Adjustments {
                audit: true,
                ..Default::default()
            })
            .unwrap();
        let parent = policy("");
        assert_eq!(child.intersect(&parent, "p").mode, Mode::Enforce);
        let mut parent_audit = policy("");
        parent_audit.mode = Mode::Audit;
        assert_eq!(child.intersect(&parent_audit, "p").mode, Mode::Audit);
    }

    #[test]
    fn flags_are_validated_and_recorded() {
        let mut p = policy("");
        let err = p
            .adjust(&Adjustments {
                allow_net: vec!["10.0.0.300".into()],
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.starts_with("--allow-net 10.0.0.300:"), "{err}");
        let err = p
            .adjust(&Adjustments {
                allow_read: vec!["rel".into()],
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.contains("not an absolute path"), "{err}");
        p.adjust(&Adjustments {
            allow_net: vec!["127.0.0.1:8080".into()],
            deny_path: vec!["/secret".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            p.network.allow,
            vec![parse_net_rule("127.0.0.1:8080").unwrap()]
        );
        assert_eq!(p.files.allowed(Path::new("/secret/x")), 0);
        assert_eq!(
            p.adjustments,
            vec!["--allow-net 127.0.0.1:8080", "--deny-path /secret"]
        );
    }

    #[test]
    fn environment_drops_secrets_unless_passed() {
        let p = policy(
            "[environment]\npass = [\"GITHUB_TOKEN\"]\nremove = [\"INTERNAL_*\"]\nset = { MODE = \"agent\" }\n",
        );
        let vars: Vec<(String, String)> = [
            ("PATH", "/bin"),
            ("GITHUB_TOKEN", "t"),
            ("NPM_TOKEN", "n"),
            ("AWS_REGION", "r"),
            ("INTERNAL_URL", "u"),
            ("MODE", "user"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (kept, removed) = p.filter_env(&vars);
        let kept: BTreeMap<String, String> = kept.into_iter().collect();
        assert_eq!(
            kept.keys().cloned().collect::<Vec<_>>(),
            vec!["GITHUB_TOKEN", "MODE", "PATH"]
        );
        assert_eq!(kept["MODE"], "agent");
        assert_eq!(removed, vec!["NPM_TOKEN", "AWS_REGION", "INTERNAL_URL"]);
    }

    #[test]
    fn host_patterns_intersect() {
        assert_eq!(
            host_intersection("*.pypi.org", "files.pypi.org").as_deref(),
            Some("files.pypi.org")
        );
        assert_eq!(
            host_intersection("files.pypi.org", "*.pypi.org").as_deref(),
            Some("files.pypi.org")
        );
        assert_eq!(
            host_intersection("*.pypi.org", "*.a.pypi.org").as_deref(),
            Some("*.a.pypi.org")
        );
        assert_eq!(host_intersection("*.pypi.org", "pypi.org"), None);
        assert_eq!(host_intersection("a.com", "b.com"), None);
    }
}
