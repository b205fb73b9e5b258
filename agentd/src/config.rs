//! The daemon's configuration: /etc/agentd/agentd.toml (or `--config`, or `AGENTD_CONFIG`).
//!
//! Every key is optional; the defaults are what a file with this content gives:
//!
//! ```toml
//! [daemon]
//! socket = "/run/agentd/agentd.sock"          # control socket: root and admin_group only
//! launch_socket = "/run/agentd/launch.sock"   # launches from inside agents (narrowing only)
//! admin_group = "agentd"                      # group allowed on the control socket
//! cgroup_root = "auto"                        # where agent cgroups go; "auto": see below
//! bpffs = "/sys/fs/bpf/agentd"                # pinned maps and links: agents stay contained
//!                                             # if the daemon dies; the next one adopts them
//! on_stop = "kill"                            # a stop (SIGTERM, systemctl stop) kills every
//!                                             # agent; "keep": they run on, contained by the
//!                                             # pins, and the next daemon adopts them
//!
//! [agents]
//! profiles_dir = "/etc/agentd/profiles"
//! default_profile = "default"
//! user = "agentd-agent"                       # account for agents when no --user/SUDO_UID
//! tmp_dir = "/run/agentd/tmp"                 # per-agent private tmp directories go here
//!                                             # (root-owned, writable by no one else)
//! max = 1024                                  # most agents running at once
//! max_tasks = 10000                           # none by default: processes and threads of
//!                                             # all agents together (pids controller)
//!
//! [dns]
//! upstream = "auto"                           # or ["192.0.2.53:53"]; auto: /etc/resolv.conf
//! port = 10053                                # port of each agent's resolver (127.53.x.y)
//!
//! [files]
//! enforcers = ["lsm", "landlock"]             # which file enforcers may be used, if usable
//!
//! [audit]
//! path = "/var/log/agentd/audit.jsonl"        # hash-chained, one JSON record per line
//! max_bytes = 104857600                       # rotate beyond this size (audit.jsonl.1, .2 …)
//! keep = 10                                   # rotated files kept
//! aggregate_seconds = 10                      # allowed events (DNS answers): one record per
//!                                             # agent, kind and destination per interval
//!
//! [metrics]
//! listen = "127.0.0.1:9464"                   # Prometheus /metrics; "off" for none
//!
//! [host_budgets.connects]                     # none by default: shared by all agents together
//! rate = 1000                                 # connects and addressed datagrams per second
//! burst = 2000
//! action = "deny"                             # "deny" (EAGAIN / dropped packet) or "log"
//!
//! [host_budgets.egress_bytes]                 # bytes of all agents' outgoing packets
//! rate = 10000000
//! ```
//!
//! `cgroup_root = "auto"` is `<cgroup2 mount>/agentd`, or, when the daemon runs as a
//! systemd service with `Delegate=yes`, `agents/` inside the service's own cgroup.
//! An unknown key is an error that names the file, line and key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::profile::{Locator, ProfileError, valid_name};

pub const DEFAULT_PATH: &str = "/etc/agentd/agentd.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The file it was read from, if any.
    pub path: Option<PathBuf>,
    pub socket: PathBuf,
    pub launch_socket: PathBuf,
    /// Where the programs' maps and links are pinned (bpffs).
    pub bpffs: PathBuf,
    /// What a stop does to the agents.
    pub on_stop: OnStop,
    pub admin_group: String,
    /// `None` for "auto".
    pub cgroup_root: Option<PathBuf>,
    pub profiles_dir: PathBuf,
    pub default_profile: String,
    pub agent_user: String,
    pub tmp_dir: PathBuf,
    /// Upstream DNS resolvers; `None` for "auto" (the nameservers of /etc/resolv.conf).
    pub dns_upstream: Option<Vec<std::net::SocketAddr>>,
    pub dns_port: u16,
    /// May the daemon use BPF LSM / Landlock for file rules (when the host allows them).
    pub use_lsm: bool,
    pub use_landlock: bool,
    /// Most agents running at once.
    pub max_agents: usize,
    /// Most tasks (processes and threads) of all agents together: `pids.max` of the agent
    /// root.
    pub max_tasks: Option<u64>,
    /// Budgets shared by all agents (`connects`, `egress_bytes`).
    pub host_budgets: std::collections::BTreeMap<String, crate::budgets::Budget>,
    pub audit_path: PathBuf,
    pub audit_max_bytes: u64,
    pub audit_keep: u32,
    pub audit_aggregate_secs: u64,
    /// `None`: no metrics listener.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What a daemon stop (SIGTERM, SIGINT) does to the running agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStop {
    /// Kill every agent, then remove the agent root and the pins.
    Kill,
    /// Leave the agents running, contained by the pinned programs and maps, for the next
    /// daemon to adopt (an upgrade or a restart without stopping the agents).
    Keep,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            path: None,
            socket: "/run/agentd/agentd.sock".into(),
            launch_socket: "/run/agentd/launch.sock".into(),
            bpffs: "/sys/fs/bpf/agentd".into(),
            on_stop: OnStop::Kill,
            admin_group: "agentd".into(),
            cgroup_root: None,
            profiles_dir: "/etc/agentd/profiles".into(),
            default_profile: "default".into(),
            agent_user: "agentd-agent".into(),
            tmp_dir: "/run/agentd/tmp".into(),
            dns_upstream: None,
            dns_port: 10053,
            use_lsm: true,
            use_landlock: true,
            max_agents: 1024,
            max_tasks: None,
            host_budgets: Default::default(),
            audit_path: "/var/log/agentd/audit.jsonl".into(),
            audit_max_bytes: 100 << 20,
            audit_keep: 10,
            audit_aggregate_secs: 10,
            metrics_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    agents: RawAgents,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    files: RawFiles,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    host_budgets: std::collections::BTreeMap<String, Spanned<RawHostBudget>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostBudget {
    rate: Spanned<i64>,
    burst: Option<Spanned<i64>>,
    action: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    enforcers: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<Spanned<String>>,
    max_bytes: Option<Spanned<i64>>,
    keep: Option<Spanned<i64>>,
    aggregate_seconds: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    upstream: Option<Spanned<toml::Value>>,
    port: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    socket: Option<Spanned<String>>,
    launch_socket: Option<Spanned<String>>,
    bpffs: Option<Spanned<String>>,
    on_stop: Option<Spanned<String>>,
    admin_group: Option<Spanned<String>>,
    cgroup_root: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    profiles_dir: Option<Spanned<String>>,
    default_profile: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    tmp_dir: Option<Spanned<String>>,
    max: Option<Spanned<i64>>,
    max_tasks: Option<Spanned<i64>>,
}

impl Config {
    /// Parses a configuration text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Config, ProfileError> {
        let loc = Locator { source, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| loc.toml(e))?;
        let mut c = Config::default();
        let abs = |v: &Option<Spanned<String>>,
                   key: &str,
                   out: &mut PathBuf|
         -> Result<(), ProfileError> {
            if let Some(v) = v {
                let p = Path::new(v.get_ref());
                if !p.is_absolute() {
                    return Err(loc.at(
                        v.span(),
                        format!("{key}: `{}` is not an absolute path", v.get_ref()),
                    ));
                }
                *out = p.to_path_buf();
            }
            Ok(())
        };
        abs(&raw.daemon.socket, "daemon.socket", &mut c.socket)?;
        abs(&raw.daemon.bpffs, "daemon.bpffs", &mut c.bpffs)?;
        abs(
            &raw.daemon.launch_socket,
            "daemon.launch_socket",
            &mut c.launch_socket,
        )?;
        abs(
            &raw.agents.profiles_dir,
            "agents.profiles_dir",
            &mut c.profiles_dir,
        )?;
        abs(&raw.agents.tmp_dir, "agents.tmp_dir", &mut c.tmp_dir)?;
        if c.socket == c.launch_socket {
            let span = raw
                .daemon
                .launch_socket
                .as_ref()
                .map(|s| s.span())
                .unwrap_or(0..0);
            return Err(loc.at(span, "daemon.launch_socket: must differ from daemon.socket"));
        }
        if let Some(v) = &raw.daemon.on_stop {
            c.on_stop = match v.get_ref().as_str() {
                "kill" => OnStop::Kill,
                "keep" => OnStop::Keep,
                other => {
                    return Err(loc.at(
                        v.span(),
                        format!("daemon.on_stop: `{other}` is not \"kill\" or \"keep\""),
                    ));
                }
            };
        }
        if let Some(v) = &raw.daemon.cgroup_root
            && v.get_ref() != "auto"
        {
            let mut p = PathBuf::new();
            abs(&raw.daemon.cgroup_root, "daemon.cgroup_root", &mut p)?;
            c.cgroup_root = Some(p);
        }
        for (v, key, out) in [
            (
                &raw.daemon.admin_group,
                "daemon.admin_group",
                &mut c.admin_group,
            ),
            (&raw.agents.user, "agents.user", &mut c.agent_user),
        ] {
            if let Some(v) = v {
                let s = v.get_ref();
                let ok = !s.is_empty()
                    && s.len() <= 32
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    return Err(loc.at(
                        v.span(),
                        format!("{key}: `{s}` is not a user or group name"),
                    ));
                }
                *out = s.clone();
            }
        }
        if let Some(v) = &raw.agents.default_profile {
            if !valid_name(v.get_ref()) {
                return Err(loc.at(
                    v.span(),
                    format!(
                        "agents.default_profile: `{}` is not a profile name",
                        v.get_ref()
                    ),
                ));
            }
            c.default_profile = v.get_ref().clone();
        }
        if let Some(v) = &raw.dns.upstream {
            c.dns_upstream = match v.get_ref() {
                toml::Value::String(s) if s == "auto" => None,
                toml::Value::Array(list) => {
                    let mut out = Vec::new();
                    for item in list {
                        let addr = item
                            .as_str()
                            .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
                            .ok_or_else(|| loc.at(v.span(), format!("dns.upstream: `{item}` is not an address with a port, like \"192.0.2.53:53\"")))?;
                        out.push(addr);
                    }
                    Some(out)
                }
                other => {
                    return Err(loc.at(
                        v.span(),
                        format!(
                            "dns.upstream: expected \"auto\" or a list of addresses, found {}",
                            other.type_str()
                        ),
                    ));
                }
            };
        }
        abs(&raw.audit.path, "audit.path", &mut c.audit_path)?;
        let ranged = |v: &Option<Spanned<i64>>, key: &str, min: i64, max: i64| match v {
            None => Ok(None),
            Some(v) if (min..=max).contains(v.get_ref()) => Ok(Some(*v.get_ref())),
            Some(v) => Err(loc.at(
                v.span(),
                format!("{key}: {} is out of range ({min} to {max})", v.get_ref()),
            )),
        };
        if let Some(n) = ranged(&raw.audit.max_bytes, "audit.max_bytes", 4096, i64::MAX)? {
            c.audit_max_bytes = n as u64;
        }
        if let Some(n) = ranged(&raw.audit.keep, "audit.keep", 1, 1000)? {
            c.audit_keep = n as u32;
        }
        if let Some(n) = ranged(
            &raw.audit.aggregate_seconds,
            "audit.aggregate_seconds",
            1,
            3600,
        )? {
            c.audit_aggregate_secs = n as u64;
        }
        if let Some(v) = &raw.metrics.listen {
            c.metrics_listen = match v.get_ref().as_str() {
                "off" => None,
                s => Some(s.parse().map_err(|_| {
                    loc.at(
                        v.span(),
                        format!("metrics.listen: `{s}` is not an address with a port (like \"127.0.0.1:9464\") or \"off\""),
                    )
                })?),
            };
        }
        if let Some(p) = &raw.dns.port {
            c.dns_port = u16::try_from(*p.get_ref())
                .ok()
                .filter(|p| *p != 0 && *p != 53)
                .ok_or_else(|| {
                    loc.at(
                        p.span(),
                        format!(
                            "dns.port: {} is not a port for agentd's resolver (1-65535, not 53)",
                            p.get_ref()
                        ),
                    )
                })?;
        }
        if let Some(list) = &raw.files.enforcers {
            c.use_lsm = false;
            c.use_landlock = false;
            for e in list {
                match e.get_ref().as_str() {
                    "lsm" => c.use_lsm = true,
                    "landlock" => c.use_landlock = true,
                    other => {
                        return Err(loc.at(e.span(), format!("files.enforcers: `{other}` is not an enforcer (\"lsm\" or \"landlock\")")));
                    }
                }
            }
        }
        if let Some(v) = &raw.agents.max {
            let most = agentd_common::agent::MAX_AGENTS as i64;
            if !(1..=most).contains(v.get_ref()) {
                return Err(loc.at(
                    v.span(),
                    format!("agents.max: {} is not between 1 and {most}", v.get_ref()),
                ));
            }
            c.max_agents = *v.get_ref() as usize;
        }
        if let Some(v) = &raw.agents.max_tasks {
            if *v.get_ref() < 1 {
                return Err(loc.at(
                    v.span(),
                    format!("agents.max_tasks: {} is not a positive number", v.get_ref()),
                ));
            }
            c.max_tasks = Some(*v.get_ref() as u64);
        }
        for (class, rb) in &raw.host_budgets {
            let b = rb.get_ref();
            if class != "connects" && class != "egress_bytes" {
                return Err(loc.at(
                    rb.span(),
                    format!(
                        "host_budgets.{class}: host-wide budgets are `connects` and `egress_bytes`"
                    ),
                ));
            }
            let action = match b.action.as_ref().map(|a| a.get_ref().as_str()) {
                None | Some("log") => crate::budgets::Action::Log,
                Some("deny") => crate::budgets::Action::Deny,
                Some(other) => {
                    let span = b.action.as_ref().map_or(rb.span(), |a| a.span());
                    return Err(loc.at(
                        span,
                        format!("host_budgets.{class}.action: `{other}` is not a host-wide action: \"deny\" or \"log\""),
                    ));
                }
            };
            let budget = crate::budgets::build(
                class,
                *b.rate.get_ref(),
                b.burst.as_ref().map(|v| *v.get_ref()),
                action,
                None,
            )
            .map_err(|(key, e)| {
                let span = match key {
                    "burst" => b.burst.as_ref().map_or(rb.span(), |v| v.span()),
                    _ => b.rate.span(),
                };
                loc.at(span, format!("host_budgets.{class}.{key}: {e}"))
            })?;
            c.host_budgets.insert(class.clone(), budget);
        }
        c.path = Some(PathBuf::from(source));
        Ok(c)
    }

    /// Loads the configuration: `explicit` (which must exist), else `AGENTD_CONFIG`, else
    /// /etc/agentd/agentd.toml if it exists, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ProfileError> {
        let env = std::env::var_os("AGENTD_CONFIG").map(PathBuf::from);
        let (path, must_exist) = match (explicit, env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                Ok(Config::default())
            }
            Err(e) => Err(ProfileError {
                source: path.display().to_string(),
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = Config::parse("", "a.toml").unwrap();
        assert_eq!(Config { path: None, ..c }, Config::default());
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let e = Config::parse(
            "[daemon]\nbpffs = \"/x\"\n[agents]\nmax = \"many\"\n",
            "a.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("a.toml:4:7: agents.max: invalid type"), "{e}");
    }

    #[test]
    fn keys_are_read_and_checked() {
        let c = Config::parse(
            "[daemon]\nsocket = \"/tmp/x.sock\"\ncgroup_root = \"/sys/fs/cgroup/agents\"\n[agents]\nuser = \"nobody\"\n",
            "a.toml",
        )
        .unwrap();
        assert_eq!(c.socket, Path::new("/tmp/x.sock"));
        assert_eq!(
            c.cgroup_root.as_deref(),
            Some(Path::new("/sys/fs/cgroup/agents"))
        );
        assert_eq!(c.agent_user, "nobody");
        let e = Config::parse("[daemon]\nsockett = \"/x\"\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.toml:2:1: unknown field `sockett`"), "{e}");
        let e = Config::parse("[agents]\nprofiles_dir = \"rel\"\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "a.toml:2:16: agents.profiles_dir: `rel` is not an absolute path"
        );
        let c = Config::parse("[files]\nenforcers = [\"lsm\"]\n", "a.toml").unwrap();
        assert!(c.use_lsm && !c.use_landlock);
        let e = Config::parse("[files]\nenforcers = [\"selinux\"]\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("a.toml:2:14: files.enforcers: `selinux`"),
            "{e}"
        );
        let c = Config::parse(
            "[agents]\nmax = 3\n[host_budgets.connects]\nrate = 10\naction = \"deny\"\n",
            "a.toml",
        )
        .unwrap();
        assert_eq!(c.max_agents, 3);
        assert_eq!(
            c.host_budgets["connects"].action,
            crate::budgets::Action::Deny
        );
        let e = Config::parse("[host_budgets.processes]\nrate = 10\n", "a.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.toml:1:1: host_budgets.processes: host-wide budgets are `connects` and `egress_bytes`"
        );
        let e = Config::parse(
            "[host_budgets.connects]\nrate = 10\naction = \"kill\"\n",
            "a.toml",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("a.toml:3:10: host_budgets.connects.action"),
            "{e}"
        );
        let e = Config::parse("[metricz]\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.toml:1:2: unknown field `metricz`"), "{e}");
        for (text, want) in [
            (
                "[daemon]\non_stop = \"later\"\n",
                "daemon.on_stop: `later` is not",
            ),
            (
                "[metrics]\nlisten = \"9464\"\n",
                "metrics.listen: `9464` is not an address",
            ),
            (
                "[audit]\nmax_bytes = 10\n",
                "audit.max_bytes: 10 is out of range",
            ),
            (
                "[audit]\npath = \"log\"\n",
                "audit.path: `log` is not an absolute path",
            ),
        ] {
            let e = Config::parse(text, "a.toml").unwrap_err().to_string();
            assert!(
                e.starts_with("a.toml:2:") && e.contains(want),
                "{text}: {e}"
            );
        }
        let c = Config::parse(
            "[daemon]\non_stop = \"keep\"\n[metrics]\nlisten = \"off\"\n[audit]\nkeep = 3\n",
            "a.toml",
        )
        .unwrap();
        assert_eq!(
            (c.on_stop, c.metrics_listen, c.audit_keep),
            (OnStop::Keep, None, 3)
        );
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/agentd.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/agentd.toml: cannot read"),
            "{e}"
        );
    }
}
