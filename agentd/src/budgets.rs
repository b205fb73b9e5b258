//! Rate budgets and circuit breakers. Kernel twin: agentd-ebpf/src/budgets.rs; the bucket
//! arithmetic is explained in agentd-common/src/budgets.rs.
//!
//! ```toml
//! [budgets.syscalls]           # every system call
//! rate = 50000                 # per second
//! burst = 100000               # default: rate
//! action = "kill"              # "log" (default), "throttle", "kill" or "deny"
//!
//! [budgets.processes]          # built-in classes: processes, opens, connects, egress_bytes
//! rate = 20
//! action = "deny"              # fork/clone fail with EAGAIN once the budget is spent
//!
//! [budgets.egress_bytes]       # bytes of outgoing packets
//! rate = 1000000
//! burst = 10000000
//! action = "deny"              # packets are dropped once the budget is spent
//!
//! [budgets.clock]              # any other name: a class of the listed system calls
//! syscalls = ["clock_gettime", "gettimeofday"]
//! rate = 1000
//!
//! [breaker]                    # circuit breaker
//! denials = 50                 # more than 50 refusals of any kind ...
//! seconds = 10                 # ... within 10 seconds (at most 10,000 a second)
//! exhaustions = 5              # or 5 exhaustion events of its budgets, in all
//! action = "kill"              # or "freeze" (stays frozen)
//! ```
//!
//! Classes match x86-64 system call numbers; calls through the i386 entry (`int 0x80`)
//! count in `syscalls` only (a class may also count one whose i386 number equals a listed
//! x86-64 number).
//!
//! `deny` needs a hook that can refuse, so it is offered for three classes:
//! - `processes`: counts new processes (fork, vfork, clone without CLONE_THREAD, clone3;
//!   not threads, not exec). Refused in the kernel by BPF LSM `task_alloc` where BPF LSM
//!   works; elsewhere by a seccomp user notification that the daemon answers
//!   ([`Notifier`]): if the daemon is gone, those calls fail (ENOSYS), they never pass.
//! - `connects`: connects and datagrams sent with an address, refused by the socket hooks.
//! - `egress_bytes`: packets dropped by `skb_egress`.
//!
//! The breaker is the budget class `denials`: N denials in T seconds is a bucket of
//! burst N and rate N/T that every refusal of the agent by a kernel hook (network, BPF
//! LSM file and process hooks, its own `deny` budgets) draws from; when it is empty the
//! daemon kills or freezes the agent. Not counted: Landlock's refusals (the kernel gives
//! no hook; a failed call seen at system call exit may be an ordinary permission error),
//! the seccomp notifier's refusals, and refusals by host-wide budgets (shared by all
//! agents). `exhaustions` is counted by the daemon from the agent's own budget events
//! (at most one per budget per second while it stays empty), over its whole run. In audit
//! mode the breaker only reports. Host-wide `deny` budgets refuse agents in audit mode
//! too: they are the host's invariant, not the agent's policy.

use std::collections::{BTreeMap, BTreeSet};

use agentd_common::budgets::{
    ACTION_DENY, ACTION_FREEZE, ACTION_KILL, ACTION_LOG, ACTION_THROTTLE, BUDGET_CLASSES_MAP,
    BUDGETS_MAP, Bucket, BudgetKey, CLASS_CONNECTS, CLASS_DENIALS, CLASS_EGRESS_BYTES,
    CLASS_FIRST_CUSTOM, CLASS_OPENS, CLASS_PROCESSES, CLASS_SYSCALLS, ClassKey, DENIAL_TOKENS,
    MAX_CLASSES, MAX_RATE,
};
use anyhow::{Context as _, Result};
use aya::{Ebpf, maps::HashMap, programs::raw_trace_point::RawTracePointLinkId};
use serde::{Deserialize, Serialize};

/// What happens when a budget is found empty. Ordered from the weakest: nesting keeps
/// the stronger of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Report (at most one event per second per budget).
    Log,
    /// Freeze the agent until the budget has refilled.
    Throttle,
    /// The operation fails with EAGAIN (a packet is dropped).
    Deny,
    /// Freeze the agent and leave it frozen (circuit breakers).
    Freeze,
    /// Kill the process at once, then the whole agent.
    Kill,
}

const ACTIONS: [Action; 5] = [
    Action::Log,
    Action::Throttle,
    Action::Deny,
    Action::Freeze,
    Action::Kill,
];

impl Action {
    /// A budget's action (`freeze` is a breaker's).
    pub fn parse(s: &str) -> Result<Action, String> {
        match s {
            "log" => Ok(Action::Log),
            "throttle" => Ok(Action::Throttle),
            "kill" => Ok(Action::Kill),
            "deny" => Ok(Action::Deny),
            other => Err(format!(
                "`{other}` is not an action: \"log\", \"throttle\", \"kill\" or \"deny\""
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Throttle => "throttle",
            Action::Deny => "deny",
            Action::Freeze => "freeze",
            Action::Kill => "kill",
        }
    }

    fn code(self) -> u32 {
        match self {
            Action::Log => ACTION_LOG,
            Action::Throttle => ACTION_THROTTLE,
            Action::Deny => ACTION_DENY,
            Action::Freeze => ACTION_FREEZE,
            Action::Kill => ACTION_KILL,
        }
    }

    pub fn from_code(code: u32) -> Option<Action> {
        ACTIONS.into_iter().find(|a| a.code() == code)
    }
}

/// Classes whose `deny` a hook can refuse.
pub const DENY_CLASSES: &[&str] = &["processes", "connects", "egress_bytes"];

/// The breaker's class name (reserved: not a budget a profile can name).
pub const BREAKER_CLASS: &str = "denials";

/// A circuit breaker (`[breaker]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breaker {
    /// Trips on more than `denials` refusals within `seconds` ...
    pub denials: Option<(u64, u64)>,
    /// ... or on this many exhaustion events of one budget.
    pub exhaustions: Option<u64>,
    /// `Kill` or `Freeze`.
    pub action: Action,
}

impl Breaker {
    /// The kernel bucket of the denial count, if the breaker counts denials.
    pub fn bucket(&self) -> Option<Budget> {
        let (n, secs) = self.denials?;
        Some(Budget {
            rate: (n * DENIAL_TOKENS / secs.max(1)).max(1),
            burst: n * DENIAL_TOKENS,
            action: self.action,
            syscalls: BTreeSet::new(),
        })
    }

    /// The narrower of two breakers: each condition at its lower threshold (denials: the
    /// higher rate of N per T), the stronger action.
    pub fn intersect(a: &Option<Breaker>, b: &Option<Breaker>) -> Option<Breaker> {
        match (a, b) {
            (None, x) | (x, None) => x.clone(),
            (Some(a), Some(b)) => Some(Breaker {
                denials: match (a.denials, b.denials) {
                    (None, x) | (x, None) => x,
                    (Some((n1, t1)), Some((n2, t2))) => Some((n1.min(n2), t1.max(t2))),
                },
                exhaustions: match (a.exhaustions, b.exhaustions) {
                    (None, x) | (x, None) => x,
                    (Some(x), Some(y)) => Some(x.min(y)),
                },
                action: a.action.max(b.action),
            }),
        }
    }
}

/// Checks a `[breaker]` table's values. Errors name the key they are about.
pub fn build_breaker(
    denials: Option<i64>,
    seconds: Option<i64>,
    exhaustions: Option<i64>,
    action: &str,
) -> Result<Breaker, (&'static str, String)> {
    let action = match action {
        "kill" => Action::Kill,
        "freeze" => Action::Freeze,
        other => {
            return Err((
                "action",
                format!("`{other}` is not a breaker action: \"kill\" or \"freeze\""),
            ));
        }
    };
    let positive = |key: &'static str, v: i64| {
        if (1..=1_000_000).contains(&v) {
            Ok(v as u64)
        } else {
            Err((key, format!("{v} is not between 1 and 1000000")))
        }
    };
    let denials = match (denials, seconds) {
        (Some(n), Some(t)) => {
            let (n, t) = (positive("denials", n)?, positive("seconds", t)?);
            if t > n * DENIAL_TOKENS {
                return Err((
                    "seconds",
                    format!("{t} seconds for {n} denials: at most {}", n * DENIAL_TOKENS),
                ));
            }
            if n * DENIAL_TOKENS / t > MAX_RATE {
                return Err((
                    "denials",
                    format!(
                        "{n} denials in {t} seconds: at most {} a second",
                        MAX_RATE / DENIAL_TOKENS
                    ),
                ));
            }
            Some((n, t))
        }
        (None, None) => None,
        (Some(_), None) => return Err(("seconds", "`denials` needs `seconds`".into())),
        (None, Some(_)) => return Err(("denials", "`seconds` needs `denials`".into())),
    };
    let exhaustions = exhaustions
        .map(|k| positive("exhaustions", k))
        .transpose()?;
    if denials.is_none() && exhaustions.is_none() {
        return Err((
            "denials",
            "a breaker needs `denials` and `seconds`, or `exhaustions`".into(),
        ));
    }
    Ok(Breaker {
        denials,
        exhaustions,
        action,
    })
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

/// The built-in classes besides `syscalls`, by system call name (`egress_bytes` counts
/// bytes, not calls).
pub const BUILTIN_CLASSES: &[(&str, &[&str])] = &[
    (
        "processes",
        &["fork", "vfork", "clone", "clone3", "execve", "execveat"],
    ),
    ("opens", &["open", "openat", "openat2", "creat"]),
    ("connects", &["connect", "sendto", "sendmsg", "sendmmsg"]),
    ("egress_bytes", &[]),
];

/// The fixed class ids of the built-in classes.
fn builtin_id(class: &str) -> Option<u32> {
    Some(match class {
        "syscalls" => CLASS_SYSCALLS,
        "processes" => CLASS_PROCESSES,
        "opens" => CLASS_OPENS,
        "connects" => CLASS_CONNECTS,
        "egress_bytes" => CLASS_EGRESS_BYTES,
        BREAKER_CLASS => CLASS_DENIALS,
        _ => return None,
    })
}

/// Most classes of a profile's own (ids `CLASS_FIRST_CUSTOM..MAX_CLASSES`).
pub const MAX_CUSTOM_CLASSES: usize = (MAX_CLASSES - CLASS_FIRST_CUSTOM) as usize;

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
    if class == BREAKER_CLASS {
        return Err((
            "syscalls",
            format!("`{BREAKER_CLASS}` is the circuit breaker's: configure it under [breaker]"),
        ));
    }
    if action == Action::Deny && !DENY_CLASSES.contains(&class) {
        return Err((
            "action",
            format!(
                "`deny` needs a hook that can refuse the operation, which `{class}` does not have: \
                 use it on {} (or \"log\", \"throttle\", \"kill\" here)",
                DENY_CLASSES.join(", ")
            ),
        ));
    }
    let builtin = BUILTIN_CLASSES.iter().find(|(n, _)| *n == class);
    let names: Vec<String> = match (class, builtin, syscalls) {
        ("syscalls" | "egress_bytes", _, None) => Vec::new(),
        (_, Some((_, list)), None) => list.iter().map(|s| s.to_string()).collect(),
        (_, None, Some(list)) if !list.is_empty() => list.to_vec(),
        ("syscalls" | "egress_bytes", _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err((
                "syscalls",
                format!("`{class}` is a built-in class: its system calls cannot be listed"),
            ));
        }
        (_, None, _) => {
            return Err((
                "syscalls",
                format!(
                    "`{class}` is not a built-in class (syscalls, processes, opens, connects, egress_bytes): list its system calls"
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

/// Class ids: built-in classes have fixed ids, a profile's own follow in name order.
fn class_ids(budgets: &BTreeMap<String, Budget>) -> Result<BTreeMap<&str, u32>> {
    let mut ids = BTreeMap::new();
    let mut next = CLASS_FIRST_CUSTOM;
    for class in budgets.keys() {
        if let Some(id) = builtin_id(class) {
            ids.insert(class.as_str(), id);
        } else {
            anyhow::ensure!(
                next < MAX_CLASSES,
                "more than {MAX_CUSTOM_CLASSES} budget classes of a profile's own"
            );
            ids.insert(class.as_str(), next);
            next += 1;
        }
    }
    Ok(ids)
}

/// What the kernel keeps for a policy: its budgets and the breaker's denial bucket. In
/// audit mode nothing is acted on: every action is `log`.
pub fn kernel_budgets(
    budgets: &BTreeMap<String, Budget>,
    breaker: Option<&Breaker>,
    audit: bool,
) -> BTreeMap<String, Budget> {
    let mut all = budgets.clone();
    if let Some(b) = breaker.and_then(Breaker::bucket) {
        all.insert(BREAKER_CLASS.to_string(), b);
    }
    if audit {
        all.values_mut().for_each(|b| b.action = Action::Log);
    }
    all
}

/// Whether `sys_enter` must charge some of these (kernel) budgets: a system call class
/// whose action is not `deny`.
pub fn needs_sys_enter(budgets: &BTreeMap<String, Budget>) -> bool {
    budgets.iter().any(|(class, b)| {
        b.action != Action::Deny && class != "egress_bytes" && class != BREAKER_CLASS
    })
}

/// Whether these (kernel) budgets refuse process creations.
pub fn denies_processes(budgets: &BTreeMap<String, Budget>) -> bool {
    budgets
        .get("processes")
        .is_some_and(|b| b.action == Action::Deny)
}

/// The class name of id `class` among `budgets` (or of a built-in class).
pub fn class_name(budgets: &BTreeMap<String, Budget>, class: u32) -> Option<String> {
    if class == CLASS_DENIALS {
        return Some("breaker (denials)".to_string());
    }
    let builtin = ["syscalls", "processes", "opens", "connects", "egress_bytes"]
        .into_iter()
        .find(|n| builtin_id(n) == Some(class));
    if let Some(n) = builtin {
        return Some(n.to_string());
    }
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

/// The BPF LSM budget programs (attached with the file programs, where BPF LSM works).
pub const LSM_PROGRAMS: &[&str] = &["task_alloc"];

/// Loads and attaches `task_alloc` (BPF LSM): `processes` budgets with `deny`.
pub fn attach_lsm(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    pins: Option<&crate::ebpf::Pins>,
) -> Result<Vec<crate::ebpf::LoadedProgram>> {
    crate::ebpf::attach_lsm(ebpf, btf, LSM_PROGRAMS, pins)
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

/// A token bucket kept in the daemon: the seccomp path of a `processes` budget with
/// `deny`, where no kernel hook can refuse a process creation.
#[derive(Debug, Clone)]
pub struct UserBucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: std::time::Instant,
    last_event: Option<std::time::Instant>,
    /// Times it was found empty.
    pub exhausted: u64,
    pub budget: Budget,
}

impl UserBucket {
    /// A full bucket.
    pub fn new(b: &Budget) -> UserBucket {
        UserBucket {
            rate: b.rate,
            burst: b.burst,
            tokens: b.burst as f64,
            last: std::time::Instant::now(),
            last_event: None,
            exhausted: 0,
            budget: b.clone(),
        }
    }

    /// Takes one token. `Err(report)` when empty; `report` at most once a second.
    pub fn take(&mut self, now: std::time::Instant) -> Result<(), bool> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        self.exhausted += 1;
        let report = self
            .last_event
            .is_none_or(|t| now.saturating_duration_since(t) >= std::time::Duration::from_secs(1));
        if report {
            self.last_event = Some(now);
        }
        Err(report)
    }
}

/// The supervisor of an agent's process notifier: a thread that answers each notified
/// process creation with "go on" or EAGAIN. Dropping it stops the thread (within 200 ms);
/// from then on, or if the daemon dies, the notified calls fail with ENOSYS: they never
/// pass unanswered.
pub struct Notifier {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Starts answering the notifications of `listener`: `allow(pid)` decides for the calling
/// process.
pub fn supervise(
    listener: std::os::fd::OwnedFd,
    name: &str,
    mut allow: impl FnMut(u32) -> bool + Send + 'static,
) -> std::io::Result<Notifier> {
    use std::os::fd::AsRawFd as _;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name(format!("notifier {name}"))
        .spawn(move || {
            let fd = listener.as_raw_fd();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let n = unsafe { libc::poll(&mut pfd, 1, 200) };
                if n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    // Closing the listener makes the notified calls fail (ENOSYS): closed.
                    eprintln!(
                        "agentd: notifier: poll: {}; its process creations now fail",
                        std::io::Error::last_os_error()
                    );
                    break;
                }
                if n <= 0 {
                    continue;
                }
                if pfd.revents & libc::POLLIN == 0 {
                    // POLLHUP: no process uses the filter any more.
                    break;
                }
                // SAFETY: a zeroed seccomp_notif is what NOTIF_RECV expects.
                let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
                // SAFETY: ioctl on our listener with a struct of the right size.
                if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } != 0 {
                    // ENOENT: the caller died meanwhile; EINTR: try again.
                    continue;
                }
                let go = allow(req.pid);
                let resp = libc::seccomp_notif_resp {
                    id: req.id,
                    val: 0,
                    error: if go { 0 } else { -libc::EAGAIN },
                    flags: if go {
                        libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32
                    } else {
                        0
                    },
                };
                // SAFETY: as above. ENOENT (the caller died) needs nothing.
                if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) } != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        // The caller stays blocked until it dies or the listener closes.
                        eprintln!("agentd: notifier: answering pid {}: {e}", req.pid);
                    }
                }
            }
        })?;
    Ok(Notifier { stop })
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
        assert_eq!(
            build("opens", 5, None, Action::Deny, None).unwrap_err().0,
            "action",
            "no hook refuses an open everywhere"
        );
        assert!(build("processes", 5, None, Action::Deny, None).is_ok());
        assert!(
            build("egress_bytes", 5, None, Action::Deny, None)
                .unwrap()
                .syscalls
                .is_empty()
        );
        assert_eq!(
            build("denials", 5, None, Action::Log, None).unwrap_err().0,
            "syscalls"
        );
    }

    #[test]
    fn breakers_are_checked_and_narrowed() {
        let b = build_breaker(Some(5), Some(10), None, "kill").unwrap();
        let bucket = b.bucket().unwrap();
        assert_eq!(
            (bucket.burst, bucket.rate),
            (5000, 500),
            "5 denials in 10 s"
        );
        assert_eq!(
            build_breaker(Some(1_000_000), Some(1), None, "kill")
                .unwrap_err()
                .0,
            "denials",
            "a rate the bucket arithmetic cannot hold"
        );
        assert_eq!(
            build_breaker(None, None, None, "kill").unwrap_err().0,
            "denials"
        );
        assert_eq!(
            build_breaker(None, None, Some(3), "log").unwrap_err().0,
            "action"
        );
        let other = build_breaker(Some(10), Some(5), Some(3), "freeze").unwrap();
        let both = Breaker::intersect(&Some(b), &Some(other)).unwrap();
        assert_eq!(
            (both.denials, both.exhaustions, both.action),
            (Some((5, 10)), Some(3), Action::Kill)
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
