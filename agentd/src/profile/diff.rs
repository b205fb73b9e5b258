//! `agentd profiles diff OLD NEW`: what a new profile (version) allows that the old did
//! not, and what it denies that the old allowed, key by key.
//!
//! Each difference is one [`Change`]: the profile key, what was added, removed or changed,
//! and its [`Effect`]: `allows` (the new profile allows something the old did not: a new
//! allow rule, a removed deny rule, a higher limit), `denies` (the reverse) or `changes`
//! (neither wider nor narrower, such as a budget's action or the description).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;

use serde::Serialize;

use super::{Mode, Profile};

/// What a difference does to what the agent may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// The new profile allows something the old did not.
    Allows,
    /// The new profile denies something the old allowed.
    Denies,
    /// Neither: a different action, a description, a version.
    Changes,
}

impl Effect {
    pub fn word(self) -> &'static str {
        match self {
            Effect::Allows => "allows",
            Effect::Denies => "denies",
            Effect::Changes => "changes",
        }
    }
}

/// One difference between two profiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The profile key, as written in the TOML (`network.allow`, `budgets.processes.rate`).
    pub key: String,
    pub effect: Effect,
    /// The old value (`None`: added).
    pub old: Option<String>,
    /// The new value (`None`: removed).
    pub new: Option<String>,
}

impl Change {
    /// One line for people: `allows  network.allow  + 10.0.0.0/8:443/tcp`.
    pub fn line(&self) -> String {
        let what = match (&self.old, &self.new) {
            (None, Some(n)) => format!("+ {n}"),
            (Some(o), None) => format!("- {o}"),
            (Some(o), Some(n)) => format!("{o} -> {n}"),
            (None, None) => String::new(),
        };
        format!("{:<8} {:<28} {what}", self.effect.word(), self.key)
    }
}

/// The differences from `old` to `new`, in the order of the profile reference.
pub fn diff(old: &Profile, new: &Profile) -> Vec<Change> {
    let mut d = Diff(Vec::new());
    d.value("name", &old.name, &new.name, Effect::Changes);
    d.value("version", &old.version, &new.version, Effect::Changes);
    let mode = |m: Mode| match m {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    };
    d.value(
        "mode",
        mode(old.mode),
        mode(new.mode),
        if new.mode == Mode::Audit {
            Effect::Allows
        } else {
            Effect::Denies
        },
    );
    d.value(
        "description",
        &old.description,
        &new.description,
        Effect::Changes,
    );
    d.sets(
        "network.allow",
        &old.network.allow,
        &new.network.allow,
        true,
    );
    d.sets(
        "network.hosts",
        &old.network.hosts,
        &new.network.hosts,
        true,
    );
    d.value(
        "network.loopback",
        &old.network.loopback,
        &new.network.loopback,
        widening(new.network.loopback),
    );
    d.access(
        "files.default",
        old.files_default_allow,
        new.files_default_allow,
    );
    d.sets("files.read", &old.files.read, &new.files.read, true);
    d.sets("files.write", &old.files.write, &new.files.write, true);
    d.sets("files.exec", &old.files.exec, &new.files.exec, true);
    d.sets("files.deny", &old.files.deny, &new.files.deny, false);
    let caps = |p: &Profile| -> Vec<String> {
        p.capabilities
            .iter()
            .map(|c| crate::caps::name(*c))
            .collect()
    };
    d.sets("process.capabilities", &caps(old), &caps(new), true);
    d.sets("seccomp.deny", &old.seccomp_deny, &new.seccomp_deny, false);
    d.limits("rlimits", &old.rlimits, &new.rlimits);
    d.budgets(&old.budgets, &new.budgets);
    d.breaker(old.breaker.as_ref(), new.breaker.as_ref());
    d.sets(
        "environment.remove",
        &old.environment.remove,
        &new.environment.remove,
        false,
    );
    d.sets(
        "environment.pass",
        &old.environment.pass,
        &new.environment.pass,
        true,
    );
    let set = |p: &Profile| -> Vec<String> {
        p.environment
            .set
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    };
    for (key, old, new) in [("environment.set", set(old), set(new))] {
        let (o, n): (BTreeSet<_>, BTreeSet<_>) =
            (old.into_iter().collect(), new.into_iter().collect());
        for gone in o.difference(&n) {
            d.push(key, Effect::Changes, Some(gone), None::<&str>);
        }
        for added in n.difference(&o) {
            d.push(key, Effect::Changes, None::<&str>, Some(added));
        }
    }
    d.0
}

/// `Allows` when the new value is the wider one.
fn widening(new_is_wider: bool) -> Effect {
    if new_is_wider {
        Effect::Allows
    } else {
        Effect::Denies
    }
}

struct Diff(Vec<Change>);

impl Diff {
    fn push(
        &mut self,
        key: &str,
        effect: Effect,
        old: Option<impl Display>,
        new: Option<impl Display>,
    ) {
        self.0.push(Change {
            key: key.to_string(),
            effect,
            old: old.map(|v| v.to_string()),
            new: new.map(|v| v.to_string()),
        });
    }

    fn value<T: PartialEq + Display + ?Sized>(
        &mut self,
        key: &str,
        old: &T,
        new: &T,
        effect: Effect,
    ) {
        if old != new {
            self.push(key, effect, Some(old), Some(new));
        }
    }

    /// A list whose entries each allow something (`allow_list`) or deny something: an
    /// added entry of an allow list allows more, of a deny list denies more.
    fn sets<T: Ord + Display>(&mut self, key: &str, old: &[T], new: &[T], allow_list: bool) {
        let o: BTreeSet<&T> = old.iter().collect();
        let n: BTreeSet<&T> = new.iter().collect();
        for gone in o.difference(&n) {
            self.push(key, widening(!allow_list), Some(gone), None::<&str>);
        }
        for added in n.difference(&o) {
            self.push(key, widening(allow_list), None::<&str>, Some(added));
        }
    }

    /// `files.default`: the access bits allowed where no rule applies.
    fn access(&mut self, key: &str, old: u32, new: u32) {
        if old == new {
            return;
        }
        let name = |bits: u32| {
            if bits == 0 {
                "deny".to_string()
            } else {
                crate::events::access_names(bits)
            }
        };
        let effect = if new & old == old {
            Effect::Allows
        } else if new & old == new {
            Effect::Denies
        } else {
            Effect::Changes
        };
        self.push(key, effect, Some(name(old)), Some(name(new)));
    }

    /// Upper limits by name: a higher limit allows more, a new limit denies more.
    fn limits(&mut self, section: &str, old: &BTreeMap<String, u64>, new: &BTreeMap<String, u64>) {
        let show = |v: u64| {
            if v == u64::MAX {
                "unlimited".to_string()
            } else {
                v.to_string()
            }
        };
        for name in old.keys().chain(new.keys()).collect::<BTreeSet<_>>() {
            let key = format!("{section}.{name}");
            match (old.get(name), new.get(name)) {
                (Some(o), Some(n)) if o != n => {
                    self.push(&key, widening(n > o), Some(show(*o)), Some(show(*n)))
                }
                (Some(o), None) => self.push(&key, Effect::Allows, Some(show(*o)), None::<&str>),
                (None, Some(n)) => self.push(&key, Effect::Denies, None::<&str>, Some(show(*n))),
                _ => {}
            }
        }
    }

    fn budgets(
        &mut self,
        old: &BTreeMap<String, crate::budgets::Budget>,
        new: &BTreeMap<String, crate::budgets::Budget>,
    ) {
        let show = |b: &crate::budgets::Budget| {
            format!(
                "rate {} burst {} action {}",
                b.rate,
                b.burst,
                b.action.name()
            )
        };
        for name in old.keys().chain(new.keys()).collect::<BTreeSet<_>>() {
            let key = format!("budgets.{name}");
            match (old.get(name), new.get(name)) {
                (Some(o), Some(n)) => {
                    self.value(
                        &format!("{key}.rate"),
                        &o.rate,
                        &n.rate,
                        widening(n.rate > o.rate),
                    );
                    self.value(
                        &format!("{key}.burst"),
                        &o.burst,
                        &n.burst,
                        widening(n.burst > o.burst),
                    );
                    self.value(
                        &format!("{key}.action"),
                        o.action.name(),
                        n.action.name(),
                        Effect::Changes,
                    );
                    if o.syscalls != n.syscalls {
                        self.push(
                            &format!("{key}.syscalls"),
                            Effect::Changes,
                            Some(format!("{} calls", o.syscalls.len())),
                            Some(format!("{} calls", n.syscalls.len())),
                        );
                    }
                }
                (Some(o), None) => self.push(&key, Effect::Allows, Some(show(o)), None::<&str>),
                (None, Some(n)) => self.push(&key, Effect::Denies, None::<&str>, Some(show(n))),
                (None, None) => {}
            }
        }
    }

    fn breaker(
        &mut self,
        old: Option<&crate::budgets::Breaker>,
        new: Option<&crate::budgets::Breaker>,
    ) {
        let show = |b: &crate::budgets::Breaker| {
            let mut parts = Vec::new();
            if let Some((n, secs)) = b.denials {
                parts.push(format!("{n} denials in {secs} s"));
            }
            if let Some(n) = b.exhaustions {
                parts.push(format!("{n} exhaustions"));
            }
            format!("{}: {}", parts.join(" or "), b.action.name())
        };
        match (old, new) {
            (Some(o), Some(n)) if o != n => {
                self.push("breaker", Effect::Changes, Some(show(o)), Some(show(n)))
            }
            (Some(o), None) => self.push("breaker", Effect::Allows, Some(show(o)), None::<&str>),
            (None, Some(n)) => self.push("breaker", Effect::Denies, None::<&str>, Some(show(n))),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(body: &str) -> Profile {
        let version = if body.starts_with("version") {
            ""
        } else {
            "version = \"1.0.0\"\n"
        };
        super::super::parse(&format!("name = \"p\"\n{version}{body}"), "p.toml").unwrap()
    }

    fn lines(old: &str, new: &str) -> Vec<String> {
        diff(&profile(old), &profile(new))
            .iter()
            .map(|c| c.line().split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    #[test]
    fn the_same_profile_has_no_differences() {
        let text = "[network]\nallow = [\"10.0.0.0/8:443/tcp\"]\n[files]\nread = [\"/usr\"]\n";
        assert_eq!(lines(text, text), Vec::<String>::new());
    }

    #[test]
    fn each_difference_says_whether_it_allows_or_denies_more() {
        let old = "[network]\nallow = [\"10.0.0.0/8:443/tcp\"]\n\
                   [files]\nread = [\"/usr\", \"/opt\"]\ndeny = [\"{home}/.ssh\"]\n\
                   [budgets.processes]\nrate = 100\naction = \"deny\"\n";
        let new = "mode = \"audit\"\n[network]\nallow = [\"10.0.0.0/8:443/tcp\", \"192.0.2.7:53/udp\"]\nloopback = true\n\
                   [files]\nread = [\"/usr\"]\ndeny = [\"{home}/.ssh\", \"{home}/.aws\"]\n\
                   [budgets.processes]\nrate = 50\naction = \"kill\"\n\
                   [rlimits]\nnofile = 1024\n";
        assert_eq!(
            lines(old, new),
            [
                "allows mode enforce -> audit",
                "allows network.allow + 192.0.2.7/32:53/udp",
                "allows network.loopback false -> true",
                "denies files.read - /opt",
                "denies files.deny + {home}/.aws",
                "denies rlimits.nofile + 1024",
                "denies budgets.processes.rate 100 -> 50",
                "denies budgets.processes.burst 100 -> 50",
                "changes budgets.processes.action deny -> kill",
            ]
        );
        // The other way round, each effect turns over (the action stays a change).
        assert_eq!(
            lines(new, old),
            [
                "denies mode audit -> enforce",
                "denies network.allow - 192.0.2.7/32:53/udp",
                "denies network.loopback true -> false",
                "allows files.read + /opt",
                "allows files.deny - {home}/.aws",
                "allows rlimits.nofile - 1024",
                "allows budgets.processes.rate 50 -> 100",
                "allows budgets.processes.burst 50 -> 100",
                "changes budgets.processes.action kill -> deny",
            ]
        );
    }

    #[test]
    fn a_new_version_and_default_access_are_named() {
        let old = "[files]\ndefault = \"deny\"\n";
        let new = "version = \"1.1.0\"\n[files]\ndefault = \"allow\"\n";
        let changes = diff(&profile(old), &profile(new));
        assert_eq!(changes[0].key, "version");
        assert_eq!(changes[0].new.as_deref(), Some("1.1.0"));
        assert_eq!(changes[1].key, "files.default");
        assert_eq!(changes[1].effect, Effect::Allows);
    }
}
