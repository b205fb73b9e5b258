//! Egress allowlist. Kernel twin: agentd-ebpf/src/network.rs.
//!
//! The kernel decides with one LPM lookup per connect: the longest prefix of the agent's
//! allowlist that contains the destination, and that prefix's port ranges. For that lookup
//! alone to be right, [`Allowlist::compile`] gives every prefix the ports of all the
//! shorter prefixes that contain it (`10.0.0.0/8:443` plus `10.1.0.0/16:80` means
//! 10.1.2.3 may be reached on 80 and 443).

use std::{collections::BTreeMap, fs::File, net::Ipv4Addr};

use agentd_common::network::{
    AGENT_PREFIX_BITS, Ipv4Target, MAX_PORT_RANGES, NET_ALLOW4_MAP, PROTO_TCP, PROTO_UDP,
    PortRange, PortRanges,
};
use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{LpmTrie, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use ipnet::Ipv4Net;

/// One allowlist entry: destinations in `net` on ports `first..=last` for `protocols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule4 {
    pub net: Ipv4Net,
    pub first_port: u16,
    pub last_port: u16,
    /// `PROTO_TCP` and/or `PROTO_UDP`.
    pub protocols: u8,
}

impl Rule4 {
    /// Any port, TCP and UDP.
    pub fn any_port(net: Ipv4Net) -> Self {
        Self {
            net,
            first_port: 0,
            last_port: u16::MAX,
            protocols: PROTO_TCP | PROTO_UDP,
        }
    }

    /// One TCP port.
    pub fn tcp(net: Ipv4Net, port: u16) -> Self {
        Self {
            net,
            first_port: port,
            last_port: port,
            protocols: PROTO_TCP,
        }
    }
}

/// An agent's IPv4 allowlist, ready for the kernel map.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Allowlist {
    entries: BTreeMap<Ipv4Net, PortRanges>,
}

impl Allowlist {
    /// Builds the map entries: for each distinct prefix, the union of the port ranges of
    /// every rule whose prefix contains it.
    pub fn compile(rules: &[Rule4]) -> Result<Self> {
        let mut own: BTreeMap<Ipv4Net, Vec<PortRange>> = BTreeMap::new();
        for r in rules {
            if r.first_port > r.last_port {
                bail!(
                    "port range {}-{} of {} is empty",
                    r.first_port,
                    r.last_port,
                    r.net
                );
            }
            if r.protocols & (PROTO_TCP | PROTO_UDP) == 0 {
                bail!("rule for {} names no protocol", r.net);
            }
            let range = PortRange {
                first: r.first_port,
                last: r.last_port,
                protocols: r.protocols,
                _pad: [0; 3],
            };
            let list = own.entry(r.net.trunc()).or_default();
            if !list.contains(&range) {
                list.push(range);
            }
        }
        let mut entries = BTreeMap::new();
        for net in own.keys() {
            let mut ranges: Vec<PortRange> = Vec::new();
            // The prefix itself and each shorter prefix containing it.
            for len in (0..=net.prefix_len()).rev() {
                let sup = Ipv4Net::new(net.network(), len).expect("len <= 32").trunc();
                if let Some(list) = own.get(&sup) {
                    for r in list {
                        if !ranges.contains(r) {
                            ranges.push(*r);
                        }
                    }
                }
            }
            if ranges.len() > MAX_PORT_RANGES {
                bail!(
                    "{net} is reached by {} port ranges (with those of the prefixes containing it); \
                     at most {MAX_PORT_RANGES} are allowed",
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

    /// What the kernel would decide for a destination (the same longest-prefix rule).
    pub fn allows(&self, addr: Ipv4Addr, port: u16, protocol: u8) -> bool {
        (0..=32u8)
            .rev()
            .find_map(|len| {
                self.entries
                    .get(&Ipv4Net::new(addr, len).expect("len <= 32").trunc())
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

fn trie(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut aya::maps::MapData, Ipv4Target, PortRanges>> {
    let map = ebpf
        .map_mut(NET_ALLOW4_MAP)
        .context("the object has no NET_ALLOW4 map")?;
    Ok(LpmTrie::try_from(map)?)
}

fn key(agent: u64, net: &Ipv4Net) -> Key<Ipv4Target> {
    Key::new(
        AGENT_PREFIX_BITS + u32::from(net.prefix_len()),
        Ipv4Target::new(agent, net.network().octets()),
    )
}

/// Makes `allowlist` the IPv4 allowlist of `agent`: adds the new entries first, then
/// removes the agent's entries that are no longer in it.
pub fn apply(ebpf: &mut Ebpf, agent: u64, allowlist: &Allowlist) -> Result<()> {
    let mut trie = trie(ebpf)?;
    for (net, ports) in &allowlist.entries {
        trie.insert(&key(agent, net), ports, 0)
            .with_context(|| format!("adding {net} to the allowlist of agent {agent}"))?;
    }
    let agent_bytes = agent.to_be_bytes();
    let stale: Vec<Key<Ipv4Target>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.data().agent == agent_bytes)
        .filter(|k| {
            let len = k.prefix_len().saturating_sub(AGENT_PREFIX_BITS) as u8;
            let net = Ipv4Net::new(Ipv4Addr::from(k.data().addr), len.min(32));
            net.map_or(true, |n| !allowlist.entries.contains_key(&n))
        })
        .collect();
    for k in stale {
        trie.remove(&k)
            .context("removing a stale allowlist entry")?;
    }
    Ok(())
}

/// Loads the connect4 program and attaches it to the agent root cgroup; returns the
/// program's kernel id.
pub fn attach(ebpf: &mut Ebpf, agent_root: &File) -> Result<u32> {
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut("connect4")
        .context("the object has no connect4 program")?
        .try_into()?;
    prog.load().context("loading connect4 (cgroup sock_addr)")?;
    prog.attach(agent_root, CgroupAttachMode::Single)
        .context("attaching connect4 to the agent root cgroup")?;
    crate::ebpf::program_id(ebpf, "connect4")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn longer_prefixes_inherit_the_ports_of_shorter_ones() {
        let list = Allowlist::compile(&[
            Rule4::tcp(net("10.0.0.0/8"), 443),
            Rule4::tcp(net("10.1.0.0/16"), 80),
        ])
        .unwrap();
        let a = "10.1.2.3".parse().unwrap();
        assert!(list.allows(a, 80, PROTO_TCP));
        assert!(list.allows(a, 443, PROTO_TCP), "inherited from 10.0.0.0/8");
        assert!(!list.allows(a, 22, PROTO_TCP));
        assert!(
            !list.allows(a, 80, PROTO_UDP),
            "TCP rule does not allow UDP"
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
    fn host_bits_are_ignored_and_duplicates_merged() {
        let list = Allowlist::compile(&[
            Rule4::tcp(net("192.168.1.7/24"), 22),
            Rule4::tcp(net("192.168.1.0/24"), 22),
        ])
        .unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list.entries[&net("192.168.1.0/24")].count, 1);
    }

    #[test]
    fn too_many_port_ranges_on_one_prefix_is_an_error_naming_it() {
        let rules: Vec<Rule4> = (1..=17).map(|p| Rule4::tcp(net("10.0.0.0/8"), p)).collect();
        let err = Allowlist::compile(&rules).unwrap_err().to_string();
        assert!(err.contains("10.0.0.0/8") && err.contains("17"), "{err}");
    }

    #[test]
    fn rejects_empty_port_range() {
        let r = Rule4 {
            net: net("1.2.3.4/32"),
            first_port: 9,
            last_port: 8,
            protocols: PROTO_TCP,
        };
        assert!(
            Allowlist::compile(&[r])
                .unwrap_err()
                .to_string()
                .contains("9-8")
        );
    }
}
