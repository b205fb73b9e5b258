//! Egress allowlist. Kernel twin: agentd-ebpf/src/network.rs.
//!
//! The kernel decides with one LPM lookup per connect, datagram or packet: the longest
//! prefix of the agent's allowlist that contains the destination, and that prefix's port
//! ranges. For that lookup alone to be right, [`Allowlist::compile`] gives every prefix the
//! ports of all the shorter prefixes that contain it (`10.0.0.0/8:443` plus
//! `10.1.0.0/16:80` means 10.1.2.3 may be reached on 80 and 443).
//!
//! Entries are keyed by a policy id, not by agent: a policy change writes the new
//! entries under a fresh id, switches the agent's entry to it in one map update, and only
//! then removes the old entries ([`crate::daemon`] does the switch).
//!
//! [`resolver`] is agentd's DNS resolver: it answers an agent's queries for the names its
//! policy allows and adds the answered addresses to its allowlist.

pub mod resolver;

use std::{collections::BTreeMap, fs::File, net::IpAddr};

use agentd_common::network::{
    Ipv4Target, Ipv6Target, MAX_PORT_RANGES, NET_ALLOW4_MAP, NET_ALLOW6_MAP, POLICY_PREFIX_BITS,
    PROTO_TCP, PROTO_UDP, PortRange, PortRanges,
};
use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{LpmTrie, MapData, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr},
};
use ipnet::IpNet;

use crate::profile::{NetRule, Ports};

/// An agent's allowlist, ready for the kernel maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Allowlist {
    entries: BTreeMap<IpNet, PortRanges>,
}

fn range(p: &Ports) -> PortRange {
    PortRange {
        first: p.first,
        last: p.last,
        protocols: p.protocols,
        _pad: [0; 3],
    }
}

impl Allowlist {
    /// Builds the map entries: for each distinct prefix, the union of the port ranges of
    /// every rule whose prefix contains it (same address family).
    pub fn compile(rules: &[NetRule]) -> Result<Self> {
        let mut own: BTreeMap<IpNet, Vec<PortRange>> = BTreeMap::new();
        for r in rules {
            if r.ports.first > r.ports.last {
                bail!(
                    "port range {}-{} of {} is empty",
                    r.ports.first,
                    r.ports.last,
                    r.net
                );
            }
            if r.ports.protocols & (PROTO_TCP | PROTO_UDP) == 0 {
                bail!("rule for {} names no protocol", r.net);
            }
            let list = own.entry(r.net.trunc()).or_default();
            if !list.contains(&range(&r.ports)) {
                list.push(range(&r.ports));
            }
        }
        let mut entries = BTreeMap::new();
        for net in own.keys() {
            let mut ranges: Vec<PortRange> = Vec::new();
            // The prefix itself and each shorter prefix containing it.
            for len in (0..=net.prefix_len()).rev() {
                let sup = IpNet::new(net.network(), len)
                    .expect("len within the family")
                    .trunc();
                for r in own.get(&sup).into_iter().flatten() {
                    if !ranges.contains(r) {
                        ranges.push(*r);
                    }
                }
            }
            if ranges.len() > MAX_PORT_RANGES {
                bail!(
                    "{net} is reached by {} port ranges (with those of the prefixes containing it); at most \
                     {MAX_PORT_RANGES} are allowed",
                    ranges.len()
                );
            }
            let mut value = PortRanges {
                count: ranges.len() as u32,
                ..Default::default()
            };
            value.ranges[..ranges.len()].copy_from_slice(&ranges);
            entries.insert(*net, value);
        }
        Ok(Self { entries })
    }

    /// What the kernel decides for a destination (the same longest-prefix rule). An
    /// IPv4-mapped IPv6 address is judged as IPv4, as the kernel does.
    pub fn allows(&self, addr: IpAddr, port: u16, protocol: u8) -> bool {
        let addr = match addr {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (0..=max)
            .rev()
            .find_map(|len| {
                self.entries.get(
                    &IpNet::new(addr, len)
                        .expect("len within the family")
                        .trunc(),
                )
            })
            .is_some_and(|ranges| ranges.allows(port, protocol))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn trie4(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut MapData, Ipv4Target, PortRanges>> {
    Ok(LpmTrie::try_from(
        ebpf.map_mut(NET_ALLOW4_MAP)
            .context("the object has no NET_ALLOW4 map")?,
    )?)
}

fn trie6(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut MapData, Ipv6Target, PortRanges>> {
    Ok(LpmTrie::try_from(
        ebpf.map_mut(NET_ALLOW6_MAP)
            .context("the object has no NET_ALLOW6 map")?,
    )?)
}

/// Writes `allowlist` as the entries of `policy`: adds new and changed entries first, then
/// removes the policy's entries that are no longer in it.
pub fn apply(ebpf: &mut Ebpf, policy: u64, allowlist: &Allowlist) -> Result<()> {
    sync_family(
        &mut trie4(ebpf)?,
        NET_ALLOW4_MAP,
        policy,
        allowlist,
        |net| match net {
            IpNet::V4(n) => Some(Ipv4Target::new(policy, n.network().octets())),
            IpNet::V6(_) => None,
        },
        |t| (t.policy, IpAddr::from(t.addr)),
    )?;
    sync_family(
        &mut trie6(ebpf)?,
        NET_ALLOW6_MAP,
        policy,
        allowlist,
        |net| match net {
            IpNet::V6(n) => Some(Ipv6Target::new(policy, n.network().octets())),
            IpNet::V4(_) => None,
        },
        |t| (t.policy, IpAddr::from(t.addr)),
    )
}

/// [`apply`] for one address family's trie: `target` keys the family's networks (`None`
/// for the other family's), `parts` reads a key back as (policy tag, address).
fn sync_family<T: aya::Pod>(
    trie: &mut LpmTrie<&mut MapData, T, PortRanges>,
    map: &str,
    policy: u64,
    allowlist: &Allowlist,
    target: impl Fn(&IpNet) -> Option<T>,
    parts: impl Fn(&T) -> ([u8; 8], IpAddr),
) -> Result<()> {
    for (net, ports) in &allowlist.entries {
        if let Some(t) = target(net) {
            let bits = POLICY_PREFIX_BITS + u32::from(net.prefix_len());
            trie.insert(&Key::new(bits, t), ports, 0)
                .with_context(|| format!("adding {net} to {map}"))?;
        }
    }
    let tag = policy.to_be_bytes();
    let stale: Vec<_> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            let (key_tag, addr) = parts(&k.data());
            let len = k.prefix_len().saturating_sub(POLICY_PREFIX_BITS) as u8;
            key_tag == tag
                && IpNet::new(addr, len).map_or(true, |n| !allowlist.entries.contains_key(&n))
        })
        .collect();
    for k in stale {
        trie.remove(&k)
            .with_context(|| format!("removing a stale {map} entry"))?;
    }
    Ok(())
}

/// The policy ids that have rules in the allowlist maps.
pub fn policies(ebpf: &mut Ebpf) -> Result<std::collections::BTreeSet<u64>> {
    let mut out: std::collections::BTreeSet<u64> = trie4(ebpf)?
        .keys()
        .filter_map(Result::ok)
        .map(|k| u64::from_be_bytes(k.data().policy))
        .collect();
    out.extend(
        trie6(ebpf)?
            .keys()
            .filter_map(Result::ok)
            .map(|k| u64::from_be_bytes(k.data().policy)),
    );
    Ok(out)
}

/// Removes every entry of `policy`.
pub fn clear(ebpf: &mut Ebpf, policy: u64) -> Result<()> {
    apply(ebpf, policy, &Allowlist::default())
}

/// The egress programs and where they attach.
pub const SOCK_ADDR_PROGRAMS: &[&str] = &[
    "bind4",
    "bind6",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
];

/// Loads every egress program and attaches it to the agent root cgroup; returns the
/// programs' kernel ids by name.
/// Loads the egress programs, attaches them to the agent root, and pins their links (the
/// daemon; kernel-only tests pass `None`).
pub fn attach(
    ebpf: &mut Ebpf,
    agent_root: &File,
    pins: Option<&crate::ebpf::Pins>,
) -> Result<Vec<(&'static str, u32)>> {
    let mut ids = Vec::new();
    for name in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("the object has no {name} program"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {name} (cgroup sock_addr)"))?;
        if !updated(pins, name, prog.fd()?)? {
            let link = prog
                .attach(agent_root, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to the agent root"))?;
            if let Some(pins) = pins {
                pins.pin(name, prog.take_link(link)?.try_into()?)?;
            }
        }
        ids.push((*name, crate::ebpf::program_id(ebpf, name)?));
    }
    let prog: &mut CgroupSock = ebpf
        .program_mut("sock_create")
        .context("the object has no sock_create program")?
        .try_into()?;
    prog.load().context("loading sock_create (cgroup sock)")?;
    if !updated(pins, "sock_create", prog.fd()?)? {
        let link = prog
            .attach(agent_root, CgroupAttachMode::Single)
            .context("attaching sock_create to the agent root")?;
        if let Some(pins) = pins {
            pins.pin("sock_create", prog.take_link(link)?.try_into()?)?;
        }
    }
    ids.push(("sock_create", crate::ebpf::program_id(ebpf, "sock_create")?));
    let prog: &mut CgroupSkb = ebpf
        .program_mut("skb_egress")
        .context("the object has no skb_egress program")?
        .try_into()?;
    prog.load().context("loading skb_egress (cgroup skb)")?;
    if !updated(pins, "skb_egress", prog.fd()?)? {
        let link = prog
            .attach(
                agent_root,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .context("attaching skb_egress to the agent root")?;
        if let Some(pins) = pins {
            pins.pin("skb_egress", prog.take_link(link)?.try_into()?)?;
        }
    }
    ids.push(("skb_egress", crate::ebpf::program_id(ebpf, "skb_egress")?));
    Ok(ids)
}

/// Where an earlier daemon's link is pinned (a restart that adopts its agents), gives it
/// this program in one step; returns whether it did (else the caller attaches).
fn updated(
    pins: Option<&crate::ebpf::Pins>,
    name: &str,
    prog: &aya::programs::ProgramFd,
) -> Result<bool> {
    let Some(pins) = pins else {
        return Ok(false);
    };
    let done = pins.update(name, std::os::fd::AsFd::as_fd(prog))?;
    if done {
        eprintln!(
            "agentd: {name}: the pinned link runs this build's program now (BPF_LINK_UPDATE)"
        );
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::parse_net_rule;

    fn rules(list: &[&str]) -> Vec<NetRule> {
        list.iter().map(|r| parse_net_rule(r).unwrap()).collect()
    }

    #[test]
    fn longer_prefixes_inherit_the_ports_of_shorter_ones() {
        let list =
            Allowlist::compile(&rules(&["10.0.0.0/8:443/tcp", "10.1.0.0/16:80/tcp"])).unwrap();
        let a = "10.1.2.3".parse().unwrap();
        assert!(list.allows(a, 80, PROTO_TCP));
        assert!(list.allows(a, 443, PROTO_TCP), "inherited from 10.0.0.0/8");
        assert!(!list.allows(a, 22, PROTO_TCP));
        assert!(
            !list.allows(a, 80, PROTO_UDP),
            "a TCP rule does not allow UDP"
        );
        let b = "10.2.0.1".parse().unwrap();
        assert!(list.allows(b, 443, PROTO_TCP));
        assert!(
            !list.allows(b, 80, PROTO_TCP),
            "80 is only allowed inside 10.1.0.0/16"
        );
        assert!(!list.allows("11.0.0.1".parse().unwrap(), 443, PROTO_TCP));
    }

    #[test]
    fn families_stay_apart_and_mapped_addresses_are_ipv4() {
        let list = Allowlist::compile(&rules(&["192.0.2.0/24:443", "[2001:db8::/32]:80"])).unwrap();
        assert!(list.allows("::ffff:192.0.2.9".parse().unwrap(), 443, PROTO_TCP));
        assert!(list.allows("2001:db8::1".parse().unwrap(), 80, PROTO_TCP));
        assert!(!list.allows("2001:db8::1".parse().unwrap(), 443, PROTO_TCP));
        assert!(!list.allows("::ffff:10.0.0.1".parse().unwrap(), 443, PROTO_TCP));
        let any = Allowlist::compile(&rules(&["0.0.0.0/0:443"])).unwrap();
        assert!(
            !any.allows("2001:db8::1".parse().unwrap(), 443, PROTO_TCP),
            "0.0.0.0/0 says nothing of IPv6"
        );
    }

    #[test]
    fn duplicates_merge_and_too_many_ranges_are_named() {
        let list = Allowlist::compile(&rules(&["192.168.1.0/24:22", "192.168.1.0/24:22"])).unwrap();
        assert_eq!(list.len(), 1);
        let many: Vec<String> = (1..=17).map(|p| format!("10.0.0.0/8:{p}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = Allowlist::compile(&rules(&many)).unwrap_err().to_string();
        assert!(err.contains("10.0.0.0/8") && err.contains("17"), "{err}");
    }
}
