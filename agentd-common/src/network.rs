//! Egress allowlist types (kernel: agentd-ebpf/src/network.rs, userspace:
//! agentd/src/network.rs).
//!
//! An agent's IPv4 allowlist lives in one LPM trie shared by all agents: the key's data is
//! the agent id followed by the address, and its prefix length is 64 (the whole agent id)
//! plus the CIDR's prefix, so a lookup never crosses from one agent into another.
//! The longest matching prefix alone decides, so userspace stores in each prefix's value
//! the ports of that prefix *and of every shorter prefix of the same agent that contains
//! it* (see `agentd::network::Allowlist`).

use crate::pod;

/// Map `NET_ALLOW4`: LPM trie, key = `Key<Ipv4Target>` (prefix length 64 + CIDR bits),
/// value = [`PortRanges`].
pub const NET_ALLOW4_MAP: &str = "NET_ALLOW4";
/// Capacity of `NET_ALLOW4` summed over all agents.
pub const MAX_NET_RULES4: u32 = 65536;

/// Bits of [`Ipv4Target::addr`] prefixed by the agent id in the trie key.
pub const AGENT_PREFIX_BITS: u32 = 64;

/// LPM trie key data: agent id (big endian, so the trie compares it first) and the
/// IPv4 address in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv4Target {
    pub agent: [u8; 8],
    pub addr: [u8; 4],
}

impl Ipv4Target {
    pub const fn new(agent: u64, addr: [u8; 4]) -> Self {
        Self {
            agent: agent.to_be_bytes(),
            addr,
        }
    }
}

/// Transport protocols a port range applies to.
pub const PROTO_TCP: u8 = 1 << 0;
pub const PROTO_UDP: u8 = 1 << 1;

/// An inclusive port range for some protocols.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
    /// `PROTO_*` bits.
    pub protocols: u8,
    pub _pad: [u8; 3],
}

/// Most port ranges one prefix can carry.
pub const MAX_PORT_RANGES: usize = 16;

/// Value of `NET_ALLOW4`: the ports allowed to the prefix's addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRanges {
    /// Number of valid entries at the start of `ranges`.
    pub count: u32,
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

impl PortRanges {
    /// True if `port` for `protocol` (a `PROTO_*` bit) is inside one of the ranges.
    #[inline(always)]
    pub fn allows(&self, port: u16, protocol: u8) -> bool {
        let mut i = 0;
        while i < MAX_PORT_RANGES {
            if i as u32 >= self.count {
                return false;
            }
            let r = &self.ranges[i];
            if r.protocols & protocol != 0 && r.first <= port && port <= r.last {
                return true;
            }
            i += 1;
        }
        false
    }
}

pod!(Ipv4Target, PortRange, PortRanges);
