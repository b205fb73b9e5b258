//! Rate budgets. Kernel twin: agentd-ebpf/src/budgets.rs; the bucket arithmetic is
//! explained in agentd-common/src/budgets.rs.
//!
//! ```toml
//! [budgets.syscalls]           # every system call
//! rate = 50000                 # per second
//! burst = 100000               # default: rate
//! action = "kill"              # "log" (default), "throttle" or "kill"
//!
//! [budgets.processes]          # built-in classes: processes, opens, connects
//! rate = 20
//! action = "throttle"
//!
//! [budgets.clock]              # any other name: a class of the listed system calls
//! syscalls = ["clock_gettime", "gettimeofday"]
//! rate = 1000
//! ```
//!
//! Classes match x86-64 system call numbers; calls through the i386 entry (`int 0x80`)
//! count in `syscalls` only (a class may also count one whose i386 number equals a listed
//! x86-64 number). The `deny` action (fail with EAGAIN) needs hooks that can refuse and is
//! not offered yet.

use std::collections::{BTreeMap, BTreeSet};

use agentd_common::budgets::{
    ACTION_KILL, ACTION_LOG, ACTION_THROTTLE, BUDGET_CLASSES_MAP, BUDGETS_MAP, Bucket, BudgetKey,
    CLASS_SYSCALLS, ClassKey, MAX_CLASSES, MAX_RATE,
};
use anyhow::{Context as _, Result};
use aya::{Ebpf, maps::HashMap, programs::raw_trace_point::RawTracePointLinkId};
use serde::{Deserialize, Serialize};

/// What happens when a budget is found empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Report (at most one event per second per budget).
    Log,
    /// Freeze the agent until the budget has refilled.
    Throttle,
    /// Kill the process at once, then the whole agent.
    Kill,
}

impl Action {
    pub fn parse(s: &str) -> Result<Action, String> {
        match s {
            "log" => Ok(Action::Log),
            "throttle" => Ok(Action::Throttle),
            "kill" => Ok(Action::Kill),
            "deny" => Err("`deny` (fail with EAGAIN) is not offered yet: use \"log\", \"throttle\" or \"kill\"".into()),
            other => Err(format!("`{other}` is not an action: \"log\", \"throttle\" or \"kill\"")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Throttle => "throttle",
            Action::Kill => "kill",
        }
    }

    fn code(self) -> u32 {
        match self {
            Action::Log => ACTION_LOG,
            Action::Throttle => ACTION_THROTTLE,
            Action::Kill => ACTION_KILL,
        }
    }

    pub fn from_code(code: u32) -> Option<Action> {
        [Action::Log, Action::Throttle, Action::Kill]
            .into_iter()
            .find(|a| a.code() == code)
    }
}

/// One budget: a class of system calls, a rate, a burst and an action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Per second.
    pub rate: u64,
    pub burst: u64,
    pub action: Action,
    /// x86-64 system call numbers of the class; empty for `syscalls` (every call).
    pub syscalls: BTreeSet<u32>,
}

/// The built-in classes besides `syscalls`, by system call name.
pub const BUILTIN_CLASSES: &[(&str, &[&str])] = &[
    (
        "processes",
        &["fork", "vfork", "clone", "clone3", "execve", "execveat"],
    ),
    ("opens", &["open", "openat", "openat2", "creat"]),
    ("connects", &["connect", "sendto", "sendmsg", "sendmmsg"]),
];

/// The x86-64 number of a system call.
pub fn syscall_number(name: &str) -> Result<u32, String> {
    libseccomp::ScmpSyscall::from_name_by_arch(name, libseccomp::ScmpArch::X8664)
        .ok()
        .map(i32::from)
        .filter(|n| *n >= 0)
        .map(|n| n as u32)
        .ok_or_else(|| format!("`{name}` is not an x86-64 system call"))
}

/// Checks a budget's numbers; `class` is the key under `[budgets]`, `syscalls` its list
/// (`None` unless given). Errors name the key they are about (after `budgets.<class>.`).
pub fn build(
    class: &str,
    rate: i64,
    burst: Option<i64>,
    action: Action,
    syscalls: Option<&[String]>,
) -> Result<Budget, (&'static str, String)> {
    if !(1..=MAX_RATE as i64).contains(&rate) {
        return Err((
            "rate",
            format!("{rate} is not between 1 and {MAX_RATE} per second"),
        ));
    }
    let burst = burst.unwrap_or(rate);
    if !(1..=i64::MAX / 2).contains(&burst) {
        return Err(("burst", format!("{burst} is not a positive number")));
    }
    let builtin = BUILTIN_CLASSES.iter().find(|(n, _)| *n == class);
    let names: Vec<String> = match (class, builtin, syscalls) {
        ("syscalls", _, None) => Vec::new(),
        (_, Some((_, list)), None) => list.iter().map(|s| s.to_string()).collect(),
        (_, None, Some(list)) if !list.is_empty() => list.to_vec(),
        ("syscalls", _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err((
                "syscalls",
                format!("`{class}` is a built-in class: its system calls cannot be listed"),
            ));
        }
        (_, None, _) => {
            return Err((
                "syscalls",
                format!(
                    "`{class}` is not a built-in class (syscalls, processes, opens, connects): list its system calls"
                ),
            ));
        }
    };
    let mut numbers = BTreeSet::new();
    for n in &names {
        // clone3 and a few others exist only on some kernels' tables: all are x86-64 calls.
        numbers.insert(syscall_number(n).map_err(|e| ("syscalls", e))?);
    }
    Ok(Budget {
        rate: rate as u64,
        burst: burst as u64,
        action,
        syscalls: numbers,
    })
}

/// Budgets of both (nested launches): every class either has, with the lower rate and
/// burst and the stronger action. Classes of one name are the same class on both sides
/// (built-in) or compared by their calls (the child's own list is kept, with every call
/// of the parent's).
pub fn intersect(
    a: &BTreeMap<String, Budget>,
    b: &BTreeMap<String, Budget>,
) -> BTreeMap<String, Budget> {
    let mut out = a.clone();
    for (class, theirs) in b {
        out.entry(class.clone())
            .and_modify(|mine| {
                mine.rate = mine.rate.min(theirs.rate);
                mine.burst = mine.burst.min(theirs.burst);
                mine.action = mine.action.max(theirs.action);
                mine.syscalls.extend(theirs.syscalls.iter().copied());
            })
            .or_insert_with(|| theirs.clone());
    }
    out
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// How long until the bucket of `key` is full again (what a throttled agent waits), if
/// the bucket exists.
pub fn time_to_full(ebpf: &Ebpf, key: BudgetKey) -> Option<std::time::Duration> {
    let buckets: HashMap<_, BudgetKey, Bucket> = HashMap::try_from(ebpf.map(BUDGETS_MAP)?).ok()?;
    let b = buckets.get(&key, 0).ok()?;
    // Full when rate × (t − base) ≥ consumed.
    let full_at = b
        .base_ns
        .saturating_add(b.consumed.saturating_mul(1_000_000_000) / b.rate.max(1));
    Some(std::time::Duration::from_nanos(
        full_at.saturating_sub(monotonic_ns()),
    ))
}

/// Class ids: `syscalls` is 0, the others follow in name order.
fn class_ids(budgets: &BTreeMap<String, Budget>) -> Result<BTreeMap<&str, u32>> {
    let mut ids = BTreeMap::new();
    let mut next = 1;
    for class in budgets.keys() {
        if class == "syscalls" {
            ids.insert(class.as_str(), CLASS_SYSCALLS);
        } else {
            anyhow::ensure!(
                next < MAX_CLASSES,
                "more than {} budget classes",
                MAX_CLASSES - 1
            );
            ids.insert(class.as_str(), next);
            next += 1;
        }
    }
    Ok(ids)
}

/// The class name of id `class` among `budgets`.
pub fn class_name(budgets: &BTreeMap<String, Budget>, class: u32) -> Option<String> {
    class_ids(budgets)
        .ok()?
        .into_iter()
        .find(|(_, id)| *id == class)
        .map(|(n, _)| n.to_string())
}

/// Writes the buckets and class lists of agent `agent`, then removes what it no longer
/// has. Buckets start full; a policy change refills them.
pub fn apply(ebpf: &mut Ebpf, agent: u64, budgets: &BTreeMap<String, Budget>) -> Result<()> {
    let ids = class_ids(budgets)?;
    let mut classes: BTreeMap<u32, u32> = BTreeMap::new();
    {
        let mut buckets: HashMap<_, BudgetKey, Bucket> = HashMap::try_from(
            ebpf.map_mut(BUDGETS_MAP)
                .context("the object has no BUDGETS map")?,
        )?;
        for (name, b) in budgets {
            let class = ids[name.as_str()];
            let bucket = Bucket {
                rate: b.rate,
                burst: b.burst,
                base_ns: monotonic_ns(),
                consumed: 0,
                exhausted: 0,
                last_event_ns: 0,
                action: b.action.code(),
                _pad: 0,
            };
            buckets
                .insert(
                    BudgetKey {
                        agent,
                        class,
                        _pad: 0,
                    },
                    bucket,
                    0,
                )
                .with_context(|| {
                    format!("storing budget {name} of agent {agent} (BUDGETS full?)")
                })?;
            for nr in &b.syscalls {
                *classes.entry(*nr).or_default() |= 1 << class;
            }
        }
        let stale: Vec<BudgetKey> = buckets
            .keys()
            .flatten()
            .filter(|k| k.agent == agent && !ids.values().any(|c| *c == k.class))
            .collect();
        for k in stale {
            let _ = buckets.remove(&k);
        }
    }
    let mut map: HashMap<_, ClassKey, u32> = HashMap::try_from(
        ebpf.map_mut(BUDGET_CLASSES_MAP)
            .context("the object has no BUDGET_CLASSES map")?,
    )?;
    for (nr, mask) in &classes {
        map.insert(
            ClassKey {
                agent,
                nr: *nr,
                _pad: 0,
            },
            mask,
            0,
        )
        .with_context(|| {
            format!("storing budget classes of agent {agent} (BUDGET_CLASSES full?)")
        })?;
    }
    let stale: Vec<ClassKey> = map
        .keys()
        .flatten()
        .filter(|k| k.agent == agent && !classes.contains_key(&k.nr))
        .collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    Ok(())
}

/// Removes every bucket and class entry of agent `agent`.
pub fn clear(ebpf: &mut Ebpf, agent: u64) -> Result<()> {
    apply(ebpf, agent, &BTreeMap::new())
}

/// Loads the `sys_enter` budget program (not attached).
pub fn load(ebpf: &mut Ebpf) -> Result<()> {
    crate::ebpf::raw_tp::load(ebpf, "sys_enter")
}

/// Attaches `sys_enter`: done while at least one agent has budgets.
pub fn attach(ebpf: &mut Ebpf) -> Result<RawTracePointLinkId> {
    crate::ebpf::raw_tp::attach(ebpf, "sys_enter")
}

pub fn detach(ebpf: &mut Ebpf, link: RawTracePointLinkId) -> Result<()> {
    crate::ebpf::raw_tp::detach(ebpf, "sys_enter", link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_checked_and_named() {
        let b = build("processes", 10, None, Action::Kill, None).unwrap();
        assert_eq!(b.burst, 10, "burst defaults to the rate");
        assert!(
            b.syscalls.contains(&57) && b.syscalls.contains(&59),
            "fork 57, execve 59: {:?}",
            b.syscalls
        );
        assert!(
            build("syscalls", 10, Some(5), Action::Log, None)
                .unwrap()
                .syscalls
                .is_empty()
        );
        let custom = build("clock", 5, None, Action::Log, Some(&["getpid".to_string()])).unwrap();
        assert_eq!(custom.syscalls, BTreeSet::from([39]));
        assert_eq!(
            build("clock", 5, None, Action::Log, None).unwrap_err().0,
            "syscalls"
        );
        assert_eq!(
            build("opens", 5, None, Action::Log, Some(&["getpid".into()]))
                .unwrap_err()
                .0,
            "syscalls"
        );
        assert_eq!(
            build("x", 5, None, Action::Log, Some(&["nope".into()]))
                .unwrap_err()
                .0,
            "syscalls"
        );
        assert_eq!(
            build("x", 0, None, Action::Log, Some(&["getpid".into()]))
                .unwrap_err()
                .0,
            "rate"
        );
        assert!(
            Action::parse("deny")
                .unwrap_err()
                .contains("not offered yet")
        );
    }

    #[test]
    fn nesting_keeps_the_lower_rate_and_the_stronger_action() {
        let parent = BTreeMap::from([(
            "syscalls".to_string(),
            build("syscalls", 100, Some(50), Action::Throttle, None).unwrap(),
        )]);
        let child = BTreeMap::from([
            (
                "syscalls".to_string(),
                build("syscalls", 1000, Some(10), Action::Log, None).unwrap(),
            ),
            (
                "opens".to_string(),
                build("opens", 5, None, Action::Log, None).unwrap(),
            ),
        ]);
        let both = intersect(&child, &parent);
        assert_eq!(
            (
                both["syscalls"].rate,
                both["syscalls"].burst,
                both["syscalls"].action
            ),
            (100, 10, Action::Throttle)
        );
        assert_eq!(both["opens"].rate, 5);
        assert_eq!(
            intersect(&parent, &child),
            both,
            "the order does not matter"
        );
    }
}
