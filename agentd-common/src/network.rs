//! Egress allowlist types (kernel: agentd-ebpf/src/network.rs, userspace:
//! agentd/src/network.rs).
//!
//! The allowlists live in two LPM tries (IPv4, IPv6) shared by all agents: the key's data
//! is the agent's policy id (see `AgentEntry::policy_id`) followed by the address, and its
//! prefix length is 64 (the whole policy id) plus the CIDR's prefix, so a lookup never
//! crosses from one policy into another.
//! The longest matching prefix alone decides, so userspace stores in each prefix's value
//! the ports of that prefix *and of every shorter prefix of the same agent that contains
//! it* (see `agentd::network::Allowlist`).

use crate::pod;

/// Map `NET_ALLOW4`: LPM trie, key = `Key<Ipv4Target>` (prefix length 64 + CIDR bits),
/// value = [`PortRanges`].
pub const NET_ALLOW4_MAP: &str = "NET_ALLOW4";
/// Map `NET_ALLOW6`: LPM trie, key = `Key<Ipv6Target>` (prefix length 64 + CIDR bits),
/// value = [`PortRanges`].
pub const NET_ALLOW6_MAP: &str = "NET_ALLOW6";
/// Capacity of each of `NET_ALLOW4` and `NET_ALLOW6`, summed over all agents.
pub const MAX_NET_RULES: u32 = 65536;

/// Bits of the trie key taken by the policy id before the address.
pub const POLICY_PREFIX_BITS: u32 = 64;

/// LPM trie key data: policy id (big endian, so the trie compares it first) and the IPv4
/// address in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv4Target {
    pub policy: [u8; 8],
    pub addr: [u8; 4],
}

impl Ipv4Target {
    pub const fn new(policy: u64, addr: [u8; 4]) -> Self {
        Self {
            policy: policy.to_be_bytes(),
            addr,
        }
    }
}

/// LPM trie key data for IPv6: policy id (big endian) and the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv6Target {
    pub policy: [u8; 8],
    pub addr: [u8; 16],
}

impl Ipv6Target {
    pub const fn new(policy: u64, addr: [u8; 16]) -> Self {
        Self {
            policy: policy.to_be_bytes(),
            addr,
        }
    }
}

/// Map `DNS_ORIG`: LRU hash, key = socket cookie (`u64`), value = [`OrigDest`]: where a
/// DNS query of the agent was going before it was sent to agentd's resolver, so replies
/// can be made to look as if they came from there.
pub const DNS_ORIG_MAP: &str = "DNS_ORIG";
pub const MAX_DNS_SOCKETS: u32 = 65536;

/// The destination a program replaced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDest {
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
    /// Network byte order, as in `bpf_sock_addr.user_port`.
    pub port_be: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    pub _pad: u32,
}

/// The DNS port: queries to it are sent to agentd's resolver instead.
pub const DNS_PORT: u16 = 53;

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

pod!(Ipv4Target, Ipv6Target, OrigDest, PortRange, PortRanges);
