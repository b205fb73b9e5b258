//! Egress allowlist. Userspace twin: agentd/src/network.rs.
//!
//! `connect4` runs, attached to the agent root cgroup, for every connect() on an IPv4
//! socket created below it. It allows the connection only when the agent's allowlist has
//! the destination's longest matching prefix with the destination port.

use agentd_common::{
    agent::AGENT_FLAG_AUDIT,
    agent::AGENT_FLAG_KILLED,
    events::{EVENT_NET, HOOK_CONNECT4, NetEvent, VERDICT_AUDIT, VERDICT_DENY},
    network::{AGENT_PREFIX_BITS, Ipv4Target, MAX_NET_RULES4, PROTO_TCP, PROTO_UDP, PortRanges},
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::{cgroup_sock_addr, map},
    maps::{LpmTrie, lpm_trie::Key},
    programs::SockAddrContext,
};

use crate::{agent, events};

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_INET: u16 = 2;
const SOCK_STREAM: u32 = 1;

/// Map `NET_ALLOW4`.
/// - key: `Key<Ipv4Target>`: prefix length 64 + CIDR bits; data = agent id (big endian)
///   then the IPv4 address
/// - value: [`PortRanges`], the ports allowed to that prefix (including the ports of every
///   shorter prefix of the same agent that contains it)
/// - size: [`MAX_NET_RULES4`] prefixes over all agents
/// - owner: the daemon writes on policy load and change; programs only read.
#[map]
static NET_ALLOW4: LpmTrie<Ipv4Target, PortRanges> =
    LpmTrie::with_max_entries(MAX_NET_RULES4, BPF_F_NO_PREALLOC);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let (id, entry) = match agent::current() {
        agent::Subject::Outside => return ALLOW,
        agent::Subject::Unregistered { id } => {
            report(&ctx, id, VERDICT_DENY);
            return DENY;
        }
        agent::Subject::Agent { id, entry } => (id, entry),
    };
    if entry.flags & AGENT_FLAG_KILLED == 0 && allowed4(&ctx, id) {
        return ALLOW;
    }
    if entry.flags & AGENT_FLAG_AUDIT != 0 && entry.flags & AGENT_FLAG_KILLED == 0 {
        report(&ctx, id, VERDICT_AUDIT);
        return ALLOW;
    }
    report(&ctx, id, VERDICT_DENY);
    DENY
}

#[inline(always)]
fn destination(ctx: &SockAddrContext) -> ([u8; 4], u16, u8) {
    // SAFETY: the context pointer is valid for the program's run; these fields allow
    // 4-byte reads.
    let sa = unsafe { &*ctx.sock_addr };
    // user_ip4 and user_port hold network byte order in memory.
    let addr = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let protocol = if sa.type_ == SOCK_STREAM {
        PROTO_TCP
    } else {
        PROTO_UDP
    };
    (addr, port, protocol)
}

#[inline(always)]
fn allowed4(ctx: &SockAddrContext, agent: u64) -> bool {
    let (addr, port, protocol) = destination(ctx);
    let key = Key::new(AGENT_PREFIX_BITS + 32, Ipv4Target::new(agent, addr));
    match NET_ALLOW4.get(&key) {
        Some(ports) => ports.allows(port, protocol),
        None => false,
    }
}

#[inline(always)]
fn report(ctx: &SockAddrContext, agent: u64, verdict: u32) {
    let (addr4, port, protocol) = destination(ctx);
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&addr4);
    let event = NetEvent {
        header: events::header(EVENT_NET, HOOK_CONNECT4, agent, verdict),
        family: AF_INET,
        port,
        protocol,
        _pad: [0; 3],
        addr,
    };
    events::emit(&event);
}
