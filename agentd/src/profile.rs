//! Policy profiles: TOML files that say what the agents started under them may do.
//!
//! ```toml
//! name = "default"
//! version = "1.0.0"          # semver; shown in events and `agentd ps`
//! mode = "enforce"           # or "audit": report what would be denied, deny nothing
//! description = "..."
//!
//! [network]
//! allow = ["10.0.0.0/8:443/tcp", "192.0.2.7:53/udp", "[2001:db8::/32]:443"]
//! hosts = ["pypi.org:443", "*.pythonhosted.org:443"]
//! loopback = false           # 127.0.0.0/8 and ::1, any port
//!
//! [files]                    # paths may start with {workdir}, {home} or {tmp}
//! default = "deny"           # paths no rule covers: "deny" (the default) or "allow"
//! read = ["/usr", "/etc"]
//! write = ["{workdir}", "{tmp}"]
//! exec = ["/usr/bin"]
//! deny = ["{home}/.ssh"]     # deny beats allow at the same path; deeper paths win
//!
//! [process]
//! capabilities = []          # kept (those the daemon has), e.g. ["CAP_NET_BIND_SERVICE"]
//!
//! [seccomp]
//! deny = ["mincore"]         # syscalls denied (EPERM) on top of agentd's own list
//!
//! [rlimits]                  # integers, sizes ("512M", "4G") or "unlimited"
//! nofile = 1024
//! as = "8G"
//!
//! [budgets.syscalls]        # rate budgets: see crate::budgets
//! rate = 50000               # per second; burst defaults to the rate
//! action = "kill"            # "log", "throttle", "kill" or (some classes) "deny"
//!
//! [breaker]                  # circuit breaker: see crate::budgets
//! denials = 50               # more than 50 refusals within 10 seconds
//! seconds = 10
//! action = "kill"            # or "freeze"
//!
//! [environment]
//! remove = ["MY_*"]          # on top of agentd's list of secret-looking names
//! pass = ["GITHUB_TOKEN"]    # kept even if a remove pattern matches
//! set = { PIP_NO_INPUT = "1" }
//! ```
//!
//! Parsing is strict: an unknown key, a bad CIDR, port, path, size, syscall or capability
//! is an error that names the file, line, column and key.

pub mod diff;

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    ops::Range,
    path::{Component, Path, PathBuf},
};

use agentd_common::network::{PROTO_TCP, PROTO_UDP};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A profile error, located in its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileError {
    /// The file (or other source name) the text came from.
    pub source: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.source, self.line, self.column, self.message
            )
        }
    }
}

impl std::error::Error for ProfileError {}

/// Line and column (1-based) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Builds errors that point into one source text.
pub struct Locator<'a> {
    pub source: &'a str,
    pub text: &'a str,
}

impl Locator<'_> {
    pub fn at(&self, span: Range<usize>, message: impl Into<String>) -> ProfileError {
        let (line, column) = line_col(self.text, span.start);
        ProfileError {
            source: self.source.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    pub fn whole(&self, message: impl Into<String>) -> ProfileError {
        ProfileError {
            source: self.source.to_string(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    /// Converts a toml parse/deserialize error.
    pub fn toml(&self, e: toml::de::Error) -> ProfileError {
        let message = e.message().trim().to_string();
        match e.span() {
            Some(span) => {
                let message = match self.key_of_value(span.start) {
                    Some(key) => format!("{key}: {message}"),
                    None => message,
                };
                self.at(span, message)
            }
            None => self.whole(message),
        }
    }

    /// The dotted key whose value starts at `offset` (`agents.max` for the `"many"` of
    /// `max = "many"` under `[agents]`), if the offset is on a `key = value` line after the
    /// `=`.
    fn key_of_value(&self, offset: usize) -> Option<String> {
        let before = self.text.get(..offset)?;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let (key, _) = before[line_start..].split_once('=')?;
        let key = key.trim().trim_matches('"');
        if key.is_empty() || key.starts_with('[') {
            return None;
        }
        let table = before[..line_start].lines().rev().find_map(|l| {
            let l = l.trim();
            l.strip_prefix('[')
                .and_then(|h| h.split(']').next())
                .map(|h| h.trim_matches('[').trim().to_string())
        });
        Some(match table {
            Some(t) if !t.is_empty() => format!("{t}.{key}"),
            _ => key.to_string(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Denials are enforced.
    Enforce,
    /// Would-be denials are reported; nothing is denied.
    Audit,
}

/// Ports and protocols of a network rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
    /// `PROTO_TCP` and/or `PROTO_UDP`.
    pub protocols: u8,
}

impl Ports {
    pub const ANY: Ports = Ports {
        first: 0,
        last: u16::MAX,
        protocols: PROTO_TCP | PROTO_UDP,
    };

    /// The ports and protocols both allow, if any.
    pub fn intersect(&self, other: &Ports) -> Option<Ports> {
        let first = self.first.max(other.first);
        let last = self.last.min(other.last);
        let protocols = self.protocols & other.protocols;
        (first <= last && protocols != 0).then_some(Ports {
            first,
            last,
            protocols,
        })
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Ports::ANY {
            return Ok(());
        }
        if self.first == 0 && self.last == u16::MAX {
        } else if self.first == self.last {
            write!(f, ":{}", self.first)?;
        } else {
            write!(f, ":{}-{}", self.first, self.last)?;
        }
        match self.protocols {
            PROTO_TCP => write!(f, "/tcp"),
            PROTO_UDP => write!(f, "/udp"),
            _ => Ok(()),
        }
    }
}

/// An allowed destination network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetRule {
    pub net: IpNet,
    pub ports: Ports,
}

impl fmt::Display for NetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpNet::V6(n) if self.ports.first != 0 || self.ports.last != u16::MAX => {
                write!(f, "[{n}]{}", self.ports)
            }
            n => write!(f, "{n}{}", self.ports),
        }
    }
}

/// An allowed DNS name (exact, or `*.` for any name below a domain).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostRule {
    pub pattern: String,
    pub ports: Ports,
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.pattern, self.ports)
    }
}

/// A path that may start with a placeholder: `{workdir}`, `{home}` or `{tmp}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PathTemplate(pub String);

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Values of the path placeholders for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placeholders {
    pub workdir: PathBuf,
    pub home: PathBuf,
    pub tmp: PathBuf,
}

impl PathTemplate {
    /// The absolute path for one agent.
    pub fn resolve(&self, ph: &Placeholders) -> PathBuf {
        let s = &self.0;
        for (name, value) in [
            ("{workdir}", &ph.workdir),
            ("{home}", &ph.home),
            ("{tmp}", &ph.tmp),
        ] {
            if let Some(rest) = s.strip_prefix(name) {
                return normalize(&value.join(rest.trim_start_matches('/')));
            }
        }
        normalize(Path::new(s))
    }
}

/// Lexically normalizes an absolute path: no `.`, no empty components, no trailing slash.
/// (`..` is refused when a path is parsed, so none remains here.)
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        if let Component::Normal(part) = c {
            out.push(part);
        }
    }
    out
}

/// File rules as written: paths per access kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRules {
    pub read: Vec<PathTemplate>,
    pub write: Vec<PathTemplate>,
    pub exec: Vec<PathTemplate>,
    pub deny: Vec<PathTemplate>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRules {
    pub allow: Vec<NetRule>,
    pub hosts: Vec<HostRule>,
    pub loopback: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvRules {
    pub remove: Vec<String>,
    pub pass: Vec<String>,
    pub set: BTreeMap<String, String>,
}

/// A parsed, validated profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub version: semver::Version,
    pub mode: Mode,
    pub description: String,
    /// Where the profile was read from.
    pub source: String,
    pub network: NetworkRules,
    pub files: FileRules,
    /// Access bits allowed where no file rule applies (`files.default`).
    pub files_default_allow: u32,
    /// Capabilities kept by the agent (numbers, see [`crate::caps`]).
    pub capabilities: Vec<u32>,
    /// Extra syscalls denied, by name.
    pub seccomp_deny: Vec<String>,
    /// Resource limits (`RLIMIT_*` name in lower case → value; `u64::MAX` = unlimited).
    pub rlimits: BTreeMap<String, u64>,
    /// Rate budgets by class name (see [`crate::budgets`]).
    pub budgets: BTreeMap<String, crate::budgets::Budget>,
    /// The circuit breaker (`[breaker]`).
    pub breaker: Option<crate::budgets::Breaker>,
    pub environment: EnvRules,
}

// ---- raw TOML shapes -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: Spanned<String>,
    version: Spanned<String>,
    mode: Option<Spanned<String>>,
    description: Option<String>,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    files: RawFiles,
    #[serde(default)]
    process: RawProcess,
    #[serde(default)]
    seccomp: RawSeccomp,
    #[serde(default)]
    rlimits: RawRlimits,
    #[serde(default)]
    budgets: BTreeMap<String, Spanned<RawBudget>>,
    breaker: Option<Spanned<RawBreaker>>,
    #[serde(default)]
    environment: RawEnvironment,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    denials: Option<Spanned<i64>>,
    seconds: Option<Spanned<i64>>,
    exhaustions: Option<Spanned<i64>>,
    action: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    rate: Spanned<i64>,
    burst: Option<Spanned<i64>>,
    action: Option<Spanned<String>>,
    syscalls: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    loopback: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    default: Option<Spanned<String>>,
    #[serde(default)]
    read: Vec<Spanned<String>>,
    #[serde(default)]
    write: Vec<Spanned<String>>,
    #[serde(default)]
    exec: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    #[serde(default)]
    capabilities: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSeccomp {
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

/// One field per resource limit, so an unknown name is an error naming it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRlimits {
    #[serde(rename = "as")]
    as_: Option<Spanned<toml::Value>>,
    core: Option<Spanned<toml::Value>>,
    cpu: Option<Spanned<toml::Value>>,
    data: Option<Spanned<toml::Value>>,
    fsize: Option<Spanned<toml::Value>>,
    locks: Option<Spanned<toml::Value>>,
    memlock: Option<Spanned<toml::Value>>,
    msgqueue: Option<Spanned<toml::Value>>,
    nice: Option<Spanned<toml::Value>>,
    nofile: Option<Spanned<toml::Value>>,
    nproc: Option<Spanned<toml::Value>>,
    rss: Option<Spanned<toml::Value>>,
    rtprio: Option<Spanned<toml::Value>>,
    rttime: Option<Spanned<toml::Value>>,
    sigpending: Option<Spanned<toml::Value>>,
    stack: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    #[serde(default)]
    remove: Vec<Spanned<String>>,
    #[serde(default)]
    pass: Vec<Spanned<String>>,
    #[serde(default)]
    set: BTreeMap<String, Spanned<String>>,
}

// ---- value parsers (shared with command-line flags) --------------------------------

/// Parses `[:PORTS][/PROTO]` suffix pieces: PORTS is `N`, `N-M` or `*`.
fn parse_ports(ports: Option<&str>, proto: Option<&str>) -> Result<Ports, String> {
    let protocols = match proto {
        None => PROTO_TCP | PROTO_UDP,
        Some("tcp") => PROTO_TCP,
        Some("udp") => PROTO_UDP,
        Some(p) => return Err(format!("unknown protocol `{p}` (expected tcp or udp)")),
    };
    let (first, last) = match ports {
        None | Some("*") => (0, u16::MAX),
        Some(p) => {
            let port = |s: &str| -> Result<u16, String> {
                match s.parse::<u16>() {
                    Ok(0) | Err(_) => Err(format!("`{s}` is not a port (1-65535)")),
                    Ok(n) => Ok(n),
                }
            };
            match p.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (port(a)?, port(b)?);
                    if a > b {
                        return Err(format!("port range `{p}` is empty"));
                    }
                    (a, b)
                }
                None => {
                    let n = port(p)?;
                    (n, n)
                }
            }
        }
    };
    Ok(Ports {
        first,
        last,
        protocols,
    })
}

/// Splits a trailing `/tcp` or `/udp`; any other word after the last `/` is an error (a
/// number there is a CIDR prefix length).
fn split_proto(s: &str) -> Result<(&str, Option<&str>), String> {
    if let Some((rest, last)) = s.rsplit_once('/')
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_alphabetic())
    {
        return match last {
            "tcp" | "udp" => Ok((rest, Some(last))),
            _ => Err(format!("unknown protocol `{last}` (expected tcp or udp)")),
        };
    }
    Ok((s, None))
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        if net != net.trunc() {
            return Err(format!(
                "`{s}` has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!("`{s}` is not an IP address or CIDR"))
}

/// Parses `CIDR[:PORTS][/PROTO]`; IPv6 with ports as `[CIDR]:PORTS`.
pub fn parse_net_rule(text: &str) -> Result<NetRule, String> {
    let (rest, proto) = split_proto(text.trim())?;
    let (net, ports) = if let Some(inner) = rest.strip_prefix('[') {
        let (net, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("`{text}`: missing `]`"))?;
        let ports = match after {
            "" => None,
            a => Some(
                a.strip_prefix(':')
                    .ok_or_else(|| format!("`{text}`: expected `:PORTS` after `]`"))?,
            ),
        };
        (parse_net(net)?, ports)
    } else if rest.parse::<IpNet>().is_ok() || rest.parse::<IpAddr>().is_ok() || !rest.contains(':')
    {
        // A whole address or CIDR (IPv6 included), with no port.
        (parse_net(rest)?, None)
    } else if let Some((net, ports)) = rest.rsplit_once(':') {
        let net = parse_net(net).map_err(|e| {
            if net.contains(':') {
                format!("{e} (write IPv6 with a port as `[2001:db8::/32]:443`)")
            } else {
                e
            }
        })?;
        (net, Some(ports))
    } else {
        return Err(format!("`{rest}` is not an IP address or CIDR"));
    };
    Ok(NetRule {
        net,
        ports: parse_ports(ports, proto)?,
    })
}

/// Parses `NAME[:PORTS][/PROTO]` where NAME is a DNS name, optionally `*.domain`.
pub fn parse_host_rule(text: &str) -> Result<HostRule, String> {
    let (rest, proto) = split_proto(text.trim())?;
    let (name, ports) = match rest.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (rest, None),
    };
    let name = name.to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if bare.is_empty() || name.len() > 253 || !bare.split('.').all(valid_label) {
        return Err(format!(
            "`{name}` is not a DNS name (letters, digits, `-`; `*.` only as the first label)"
        ));
    }
    if bare.parse::<IpAddr>().is_ok()
        || bare
            .split('.')
            .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("`{name}` is an address: put it in network.allow"));
    }
    Ok(HostRule {
        pattern: name,
        ports: parse_ports(ports, proto)?,
    })
}

/// Validates a path template: absolute, or starting with a placeholder; no `..`.
pub fn parse_path(text: &str) -> Result<PathTemplate, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty path".into());
    }
    let after_placeholder = if t.starts_with('{') {
        let end = t
            .find('}')
            .ok_or_else(|| format!("`{t}`: unclosed placeholder"))?;
        let name = &t[..=end];
        if !["{workdir}", "{home}", "{tmp}"].contains(&name) {
            return Err(format!(
                "`{t}`: unknown placeholder {name} (expected {{workdir}}, {{home}} or {{tmp}})"
            ));
        }
        let rest = &t[end + 1..];
        if !rest.is_empty() && !rest.starts_with('/') {
            return Err(format!("`{t}`: expected `/` after {name}"));
        }
        rest
    } else if t.starts_with('/') {
        t
    } else {
        return Err(format!(
            "`{t}` is not an absolute path (or one starting with {{workdir}}, {{home}} or {{tmp}})"
        ));
    };
    if after_placeholder.contains('{') || after_placeholder.contains('}') {
        return Err(format!("`{t}`: placeholders may only start a path"));
    }
    if Path::new(after_placeholder)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Err(format!("`{t}`: `..` is not allowed in rule paths"));
    }
    if t.contains('\0') {
        return Err(format!("`{t}`: NUL in path"));
    }
    Ok(PathTemplate(t.to_string()))
}

/// Parses a resource limit value: an integer, a size (`512K`, `64M`, `4G`, `1T`, binary
/// units) or `unlimited`.
pub fn parse_limit(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Ok(*i as u64),
        toml::Value::Integer(i) => Err(format!("{i} is negative")),
        toml::Value::String(s) if s == "unlimited" || s == "infinity" => Ok(u64::MAX),
        toml::Value::String(s) => {
            let (digits, mult) = match s.trim().char_indices().last() {
                Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
                Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
                Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
                Some((i, 'T' | 't')) => (&s[..i], 1 << 40),
                _ => (s.as_str(), 1),
            };
            digits
                .trim()
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(mult))
                .ok_or_else(|| format!("`{s}` is not a size (like 512M, 4G) or `unlimited`"))
        }
        other => Err(format!(
            "expected an integer, a size or \"unlimited\", found {}",
            other.type_str()
        )),
    }
}

/// Validates an environment variable pattern: a name, with `*` as a wildcard.
fn parse_env_pattern(p: &str) -> Result<String, String> {
    if p.is_empty()
        || !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'*')
    {
        return Err(format!(
            "`{p}` is not a variable name pattern (letters, digits, `_`, `*`)"
        ));
    }
    Ok(p.to_string())
}

/// Matches a name against a pattern where `*` matches any run of characters.
pub fn env_pattern_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

// ---- profile parsing -------------------------------------------------------------

const PROFILE_NAME_MAX: usize = 64;

/// Checks a profile or agent name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= PROFILE_NAME_MAX
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Parses and validates a profile. `source` names it in errors (usually the file path).
pub fn parse(text: &str, source: &str) -> Result<Profile, ProfileError> {
    let loc = Locator { source, text };
    let raw: RawProfile = toml::from_str(text).map_err(|e| loc.toml(e))?;

    let name = raw.name.get_ref().clone();
    if !valid_name(&name) {
        return Err(loc.at(raw.name.span(), format!("name: `{name}` is not a valid profile name (letters, digits, `.`, `_`, `-`; at most 64)")));
    }
    let version = semver::Version::parse(raw.version.get_ref()).map_err(|e| {
        loc.at(
            raw.version.span(),
            format!(
                "version: `{}` is not a semantic version like 1.2.0: {e}",
                raw.version.get_ref()
            ),
        )
    })?;
    let mode = match raw.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
        None | Some(("enforce", _)) => Mode::Enforce,
        Some(("audit", _)) => Mode::Audit,
        Some((other, span)) => {
            return Err(loc.at(
                span,
                format!("mode: `{other}` is not a mode (expected \"enforce\" or \"audit\")"),
            ));
        }
    };

    let each = |items: &[Spanned<String>],
                key: &str,
                f: &dyn Fn(&str) -> Result<(), String>|
     -> Result<(), ProfileError> {
        for item in items {
            f(item.get_ref()).map_err(|e| loc.at(item.span(), format!("{key}: {e}")))?;
        }
        Ok(())
    };
    let mut network = NetworkRules {
        loopback: raw.network.loopback,
        ..Default::default()
    };
    for item in &raw.network.allow {
        network.allow.push(
            parse_net_rule(item.get_ref())
                .map_err(|e| loc.at(item.span(), format!("network.allow: {e}")))?,
        );
    }
    for item in &raw.network.hosts {
        network.hosts.push(
            parse_host_rule(item.get_ref())
                .map_err(|e| loc.at(item.span(), format!("network.hosts: {e}")))?,
        );
    }

    let paths = |items: &[Spanned<String>], key: &str| -> Result<Vec<PathTemplate>, ProfileError> {
        items
            .iter()
            .map(|i| {
                parse_path(i.get_ref()).map_err(|e| loc.at(i.span(), format!("files.{key}: {e}")))
            })
            .collect()
    };
    let files = FileRules {
        read: paths(&raw.files.read, "read")?,
        write: paths(&raw.files.write, "write")?,
        exec: paths(&raw.files.exec, "exec")?,
        deny: paths(&raw.files.deny, "deny")?,
    };

    let files_default_allow = match raw
        .files
        .default
        .as_ref()
        .map(|d| (d.get_ref().as_str(), d.span()))
    {
        None | Some(("deny", _)) => 0,
        Some(("allow", _)) => agentd_common::files::ACCESS_ALL,
        Some((other, span)) => {
            return Err(loc.at(
                span,
                format!(
                    "files.default: `{other}` is not a default (expected \"deny\" or \"allow\")"
                ),
            ));
        }
    };

    let mut capabilities = Vec::new();
    for item in &raw.process.capabilities {
        let caps = crate::caps::parse(item.get_ref())
            .map_err(|e| loc.at(item.span(), format!("process.capabilities: {e}")))?;
        capabilities.extend(caps);
    }
    capabilities.sort_unstable();
    capabilities.dedup();

    each(&raw.seccomp.deny, "seccomp.deny", &|s| {
        crate::seccomp::check_syscall_name(s)
    })?;
    let seccomp_deny: Vec<String> = raw
        .seccomp
        .deny
        .iter()
        .map(|s| s.get_ref().clone())
        .collect();

    let mut rlimits = BTreeMap::new();
    let r = &raw.rlimits;
    for (key, value) in [
        ("as", &r.as_),
        ("core", &r.core),
        ("cpu", &r.cpu),
        ("data", &r.data),
        ("fsize", &r.fsize),
        ("locks", &r.locks),
        ("memlock", &r.memlock),
        ("msgqueue", &r.msgqueue),
        ("nice", &r.nice),
        ("nofile", &r.nofile),
        ("nproc", &r.nproc),
        ("rss", &r.rss),
        ("rtprio", &r.rtprio),
        ("rttime", &r.rttime),
        ("sigpending", &r.sigpending),
        ("stack", &r.stack),
    ] {
        if let Some(v) = value {
            let n = parse_limit(v.get_ref())
                .map_err(|e| loc.at(v.span(), format!("rlimits.{key}: {e}")))?;
            rlimits.insert(key.to_string(), n);
        }
    }

    let mut budgets = BTreeMap::new();
    for (class, raw_budget) in &raw.budgets {
        let b = raw_budget.get_ref();
        if !valid_name(class) {
            return Err(loc.at(
                raw_budget.span(),
                format!("budgets.{class}: class names are letters, digits, `.`, `_`, `-`"),
            ));
        }
        let action = match &b.action {
            Some(a) => crate::budgets::Action::parse(a.get_ref())
                .map_err(|e| loc.at(a.span(), format!("budgets.{class}.action: {e}")))?,
            None => crate::budgets::Action::Log,
        };
        let names: Option<Vec<String>> = b
            .syscalls
            .as_ref()
            .map(|l| l.get_ref().iter().map(|s| s.get_ref().clone()).collect());
        let budget = crate::budgets::build(
            class,
            *b.rate.get_ref(),
            b.burst.as_ref().map(|v| *v.get_ref()),
            action,
            names.as_deref(),
        )
        .map_err(|(key, e)| {
            // Point at the value the message is about.
            let span = match key {
                "rate" => b.rate.span(),
                "burst" => b.burst.as_ref().map_or(raw_budget.span(), |v| v.span()),
                "action" => b.action.as_ref().map_or(raw_budget.span(), |v| v.span()),
                _ => b.syscalls.as_ref().map_or(raw_budget.span(), |v| {
                    v.get_ref()
                        .iter()
                        .find(|s| e.contains(&format!("`{}`", s.get_ref())))
                        .map_or(v.span(), |s| s.span())
                }),
            };
            loc.at(span, format!("budgets.{class}.{key}: {e}"))
        })?;
        budgets.insert(class.clone(), budget);
    }
    let builtin =
        |c: &str| c == "syscalls" || crate::budgets::BUILTIN_CLASSES.iter().any(|(n, _)| *n == c);
    let classes = budgets.keys().filter(|c| !builtin(c)).count();
    let most = crate::budgets::MAX_CUSTOM_CLASSES;
    if classes > most {
        let span = raw
            .budgets
            .iter()
            .filter(|(k, _)| !builtin(k))
            .nth(most)
            .map_or(0..0, |(_, v)| v.span());
        return Err(loc.at(
            span,
            format!("budgets: {classes} classes of the profile's own; at most {most}"),
        ));
    }
    let breaker = match &raw.breaker {
        None => None,
        Some(rb) => {
            let b = rb.get_ref();
            let value = |v: &Option<Spanned<i64>>| v.as_ref().map(|v| *v.get_ref());
            let built = crate::budgets::build_breaker(
                value(&b.denials),
                value(&b.seconds),
                value(&b.exhaustions),
                b.action.get_ref(),
            );
            Some(built.map_err(|(key, e)| {
                let span = match key {
                    "denials" => b.denials.as_ref().map(|v| v.span()),
                    "seconds" => b.seconds.as_ref().map(|v| v.span()),
                    "exhaustions" => b.exhaustions.as_ref().map(|v| v.span()),
                    _ => Some(b.action.span()),
                };
                loc.at(span.unwrap_or(rb.span()), format!("breaker.{key}: {e}"))
            })?)
        }
    };

    let mut environment = EnvRules::default();
    for (list, key, out) in [
        (&raw.environment.remove, "remove", &mut environment.remove),
        (&raw.environment.pass, "pass", &mut environment.pass),
    ] {
        for item in list {
            out.push(
                parse_env_pattern(item.get_ref())
                    .map_err(|e| loc.at(item.span(), format!("environment.{key}: {e}")))?,
            );
        }
    }
    for (k, v) in &raw.environment.set {
        if k.is_empty() || k.contains('*') || parse_env_pattern(k).is_err() {
            return Err(loc.at(
                v.span(),
                format!("environment.set: `{k}` is not a variable name"),
            ));
        }
        if v.get_ref().contains('\0') {
            return Err(loc.at(v.span(), format!("environment.set.{k}: NUL in value")));
        }
        environment.set.insert(k.clone(), v.get_ref().clone());
    }

    Ok(Profile {
        name,
        version,
        mode,
        description: raw.description.unwrap_or_default(),
        source: source.to_string(),
        network,
        files,
        files_default_allow,
        capabilities,
        seccomp_deny,
        rlimits,
        budgets,
        breaker,
        environment,
    })
}

/// Reads and parses a profile file.
pub fn load_file(path: &Path) -> Result<Profile, ProfileError> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ProfileError {
        source: source.clone(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, &source)
}

/// True if the argument of `--profile` names a file rather than a profile.
pub fn is_path(name_or_path: &str) -> bool {
    name_or_path.contains('/') || name_or_path.ends_with(".toml")
}

/// Loads profile `name` from `dir` (`dir/NAME.toml`); the file's `name` must match.
pub fn load_named(dir: &Path, name: &str) -> Result<Profile, ProfileError> {
    if !valid_name(name) {
        return Err(ProfileError {
            source: name.into(),
            line: 0,
            column: 0,
            message: "not a valid profile name".into(),
        });
    }
    let path = dir.join(format!("{name}.toml"));
    if !path.is_file() {
        let known = list(dir)
            .map(|l| l.into_iter().map(|(n, _)| n).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        return Err(ProfileError {
            source: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!(
                "no profile named `{name}` (profiles in {}: {known})",
                dir.display()
            ),
        });
    }
    let p = load_file(&path)?;
    if p.name != name {
        return Err(ProfileError {
            source: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("the file is named {name}.toml but its name is `{}`", p.name),
        });
    }
    Ok(p)
}

/// Profile files in `dir`: (name, path), sorted by name.
pub fn list(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| Some((p.file_stem()?.to_string_lossy().into_owned(), p)))
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name = \"t\"\nversion = \"1.0.0\"\n";

    fn err(text: &str) -> String {
        parse(text, "p.toml").unwrap_err().to_string()
    }

    #[test]
    fn parses_every_section() {
        let p = parse(
            r#"
name = "full"
version = "1.2.3"
mode = "audit"
description = "all keys"
[network]
allow = ["10.0.0.0/8:443/tcp", "192.0.2.7", "[2001:db8::/32]:80-90", "::1"]
hosts = ["PyPI.org:443", "*.pythonhosted.org"]
loopback = true
[files]
read = ["/usr", "{home}/.config/tool"]
write = ["{workdir}", "{tmp}"]
exec = ["/usr/bin"]
deny = ["{home}/.ssh"]
[process]
capabilities = ["CAP_NET_BIND_SERVICE"]
[seccomp]
deny = ["personality"]
[rlimits]
nofile = 1024
as = "4G"
core = 0
nproc = "unlimited"
[environment]
remove = ["MY_*"]
pass = ["GITHUB_TOKEN"]
set = { PIP_NO_INPUT = "1" }
"#,
            "full.toml",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.version, semver::Version::new(1, 2, 3));
        assert_eq!(p.network.allow[0].to_string(), "10.0.0.0/8:443/tcp");
        assert_eq!(p.network.allow[1].to_string(), "192.0.2.7/32");
        assert_eq!(p.network.allow[2].to_string(), "[2001:db8::/32]:80-90");
        assert_eq!(p.network.hosts[0].pattern, "pypi.org");
        assert_eq!(p.network.hosts[1].ports, Ports::ANY);
        assert_eq!(p.capabilities, vec![10]);
        assert_eq!(p.rlimits["as"], 4 << 30);
        assert_eq!(p.rlimits["nproc"], u64::MAX);
        assert_eq!(p.environment.set["PIP_NO_INPUT"], "1");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = err(&format!("{MINIMAL}[network]\nallow = []\nalow = []\n"));
        assert!(e.starts_with("p.toml:5:1: unknown field `alow`"), "{e}");
        let e = err(&format!("{MINIMAL}colour = \"red\"\n"));
        assert!(e.starts_with("p.toml:3:1: unknown field `colour`"), "{e}");
        let e = err(&format!("{MINIMAL}[rlimits]\nnofiles = 3\n"));
        assert!(e.starts_with("p.toml:4:1: unknown field `nofiles`"), "{e}");
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        let cases = [
            (
                "[network]\nallow = [\"10.0.0.300/8\"]",
                "p.toml:4:10: network.allow: `10.0.0.300/8` is not an IP address or CIDR",
            ),
            (
                "[network]\nallow = [\"10.0.0.1/8\"]",
                "p.toml:4:10: network.allow: `10.0.0.1/8` has host bits set; did you mean 10.0.0.0/8?",
            ),
            (
                "[network]\nallow = [\"10.0.0.0/8:70000\"]",
                "p.toml:4:10: network.allow: `70000` is not a port (1-65535)",
            ),
            (
                "[network]\nallow = [\"10.0.0.0/8:443/sctp\"]",
                "p.toml:4:10: network.allow: unknown protocol `sctp`",
            ),
            (
                "[network]\nhosts = [\"exa mple.com\"]",
                "p.toml:4:10: network.hosts: `exa mple.com` is not a DNS name",
            ),
            (
                "[files]\nread = [\"relative/path\"]",
                "p.toml:4:9: files.read: `relative/path` is not an absolute path",
            ),
            (
                "[files]\ndeny = [\"{home}/../etc\"]",
                "p.toml:4:9: files.deny: `{home}/../etc`: `..` is not allowed",
            ),
            (
                "[files]\nwrite = [\"{cwd}/x\"]",
                "p.toml:4:10: files.write: `{cwd}/x`: unknown placeholder {cwd}",
            ),
            (
                "[rlimits]\nas = \"4Q\"",
                "p.toml:4:6: rlimits.as: `4Q` is not a size",
            ),
            (
                "[rlimits]\nnofile = -1",
                "p.toml:4:10: rlimits.nofile: -1 is negative",
            ),
            (
                "[seccomp]\ndeny = [\"not_a_syscall\"]",
                "p.toml:4:9: seccomp.deny: `not_a_syscall` is not a system call",
            ),
            (
                "[budgets.syscalls]\nrate = 0",
                "p.toml:4:8: budgets.syscalls.rate: 0 is not between 1 and 10000000 per second",
            ),
            (
                "[budgets.mine]\nrate = 5\nsyscalls = [\"getpid\", \"nope\"]",
                "p.toml:5:23: budgets.mine.syscalls: `nope` is not an x86-64 system call",
            ),
            (
                "[budgets.syscalls]\nrate = 5\naction = \"deny\"",
                "p.toml:5:10: budgets.syscalls.action: `deny` needs a hook that can refuse the operation, which `syscalls` does not have: use it on processes, connects, egress_bytes (or \"log\", \"throttle\", \"kill\" here)",
            ),
            (
                "[breaker]\ndenials = 5\naction = \"kill\"",
                "p.toml:3:1: breaker.seconds: `denials` needs `seconds`",
            ),
            (
                "[breaker]\nexhaustions = 3\naction = \"throttle\"",
                "p.toml:5:10: breaker.action: `throttle` is not a breaker action: \"kill\" or \"freeze\"",
            ),
            (
                "[budgets.denials]\nrate = 5\nsyscalls = [\"getpid\"]",
                "p.toml:5:12: budgets.denials.syscalls: `denials` is the circuit breaker's: configure it under [breaker]",
            ),
            (
                "[process]\ncapabilities = [\"CAP_FLY\"]",
                "p.toml:4:17: process.capabilities: `CAP_FLY` is not a capability",
            ),
            (
                "[environment]\npass = [\"A-B\"]",
                "p.toml:4:9: environment.pass: `A-B` is not a variable name pattern",
            ),
        ];
        for (body, want) in cases {
            let e = err(&format!("{MINIMAL}{body}\n"));
            assert!(e.starts_with(want), "\n got: {e}\nwant: {want}");
        }
        assert!(
            err("name = \"t\"\nversion = \"one\"\n")
                .starts_with("p.toml:2:11: version: `one` is not a semantic version")
        );
        assert!(err("name = \"bad name\"\nversion = \"1.0.0\"\n").starts_with("p.toml:1:8: name:"));
        assert!(
            err("name = \"t\"\nversion = \"1.0.0\"\nmode = \"strict\"\n")
                .starts_with("p.toml:3:8: mode: `strict`")
        );
        assert!(err("version = \"1.0.0\"\n").contains("missing field `name`"));
        assert!(err("name = [\n").starts_with("p.toml:"));
    }

    #[test]
    fn paths_resolve_placeholders_and_normalize() {
        let ph = Placeholders {
            workdir: "/w/d".into(),
            home: "/home/u".into(),
            tmp: "/tmp/agentd/a1".into(),
        };
        assert_eq!(
            parse_path("{home}/.ssh/").unwrap().resolve(&ph),
            Path::new("/home/u/.ssh")
        );
        assert_eq!(
            parse_path("{workdir}").unwrap().resolve(&ph),
            Path::new("/w/d")
        );
        assert_eq!(
            parse_path("//usr//./lib/").unwrap().resolve(&ph),
            Path::new("/usr/lib")
        );
        assert!(parse_path("/a/{home}").is_err());
    }

    #[test]
    fn env_patterns_match_like_globs() {
        assert!(env_pattern_matches("*_TOKEN", "GITHUB_TOKEN"));
        assert!(env_pattern_matches("AWS_*", "AWS_SECRET_ACCESS_KEY"));
        assert!(!env_pattern_matches("AWS_*", "XAWS_"));
        assert!(env_pattern_matches("PATH", "PATH"));
        assert!(!env_pattern_matches("PATH", "PATHX"));
    }

    #[test]
    fn port_intersection() {
        let a = parse_net_rule("10.0.0.0/8:400-500/tcp").unwrap().ports;
        let b = parse_net_rule("10.0.0.0/8:443").unwrap().ports;
        assert_eq!(
            a.intersect(&b),
            Some(Ports {
                first: 443,
                last: 443,
                protocols: PROTO_TCP
            })
        );
        let c = parse_net_rule("10.0.0.0/8:53/udp").unwrap().ports;
        assert_eq!(a.intersect(&c), None);
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    /// The profiles shipped in profiles/ parse, and keep the promises their names make.
    #[test]
    fn shipped_profiles_are_valid_and_strict() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let listed = list(&dir).unwrap();
        let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec!["coding-agent", "default", "offline", "research-agent"]
        );
        let ph = Placeholders {
            workdir: "/w".into(),
            home: "/home/u".into(),
            tmp: "/tmp/agentd/a".into(),
        };
        for (name, _) in &listed {
            let p = load_named(&dir, name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.mode, Mode::Enforce, "{name}");
            assert!(p.capabilities.is_empty(), "{name} keeps no capability");
            let policy = crate::policy::Policy::from_profile(&p, &ph);
            let f = &policy.files;
            for secret in [
                "/home/u/.ssh/id_ed25519",
                "/home/u/.aws/credentials",
                "/etc/shadow",
                "/home/other/notes",
                "/root/x",
            ] {
                assert_eq!(f.allowed(Path::new(secret)), 0, "{name}: {secret}");
            }
            assert_eq!(
                f.allowed(Path::new("/etc/passwd")) & agentd_common::files::ACCESS_WRITE,
                0,
                "{name}: /etc is read-only"
            );
            assert_ne!(
                f.allowed(Path::new("/tmp/agentd/a/x")) & agentd_common::files::ACCESS_WRITE,
                0,
                "{name}: tmp is writable"
            );
            assert_eq!(
                f.allowed(Path::new("/var/log/syslog")),
                0,
                "{name}: unlisted paths are denied"
            );
        }
        let offline = load_named(&dir, "offline").unwrap();
        assert!(
            offline.network.allow.is_empty()
                && offline.network.hosts.is_empty()
                && !offline.network.loopback
        );
        let default = load_named(&dir, "default").unwrap();
        assert!(default.network.allow.is_empty() && !default.network.loopback);
        let research =
            crate::policy::Policy::from_profile(&load_named(&dir, "research-agent").unwrap(), &ph);
        assert_eq!(
            research.files.allowed(Path::new("/w/file")) & agentd_common::files::ACCESS_WRITE,
            0,
            "research: workdir read-only"
        );
        let coding =
            crate::policy::Policy::from_profile(&load_named(&dir, "coding-agent").unwrap(), &ph);
        assert_ne!(
            coding.files.allowed(Path::new("/w/src/main.rs")) & agentd_common::files::ACCESS_WRITE,
            0
        );
        assert!(coding.network.hosts.iter().any(|h| h.pattern == "pypi.org"));
    }
}
