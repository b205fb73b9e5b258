//! Egress allowlist. Userspace twin: agentd/src/network/.
//!
//! Attached to the agent root cgroup, for every socket created below it:
//! - `connect4`, `connect6`, `sendmsg4`, `sendmsg6` allow a connection or datagram only
//!   when the destination's longest matching prefix in the agent's allowlist has the
//!   destination port. An IPv4-mapped IPv6 destination (::ffff:a.b.c.d) is judged as the
//!   IPv4 address. Port 53 (DNS, any address, TCP or UDP) is sent to the agent's own
//!   resolver in agentd instead, and the original destination is remembered per socket.
//! - `recvmsg4`, `recvmsg6`, `getpeername4`, `getpeername6` make replies from that resolver
//!   look as if they came from the original destination (resolvers check where answers
//!   come from).
//! - `sock_create` refuses raw sockets and ICMP "ping" sockets (the kernel calls it for IP
//!   sockets only; other families are refused by the launcher's seccomp filter).
//! - `skb_egress` is the backstop: it drops any packet of an agent's socket to a
//!   destination the allowlist does not allow, whatever path the socket took (a socket
//!   created before a policy change, a syscall no hook covers).

use agentd_common::{
    agent::{AGENT_FLAG_AUDIT, AGENT_FLAG_KILLED, AgentEntry},
    budgets::{CLASS_CONNECTS, CLASS_EGRESS_BYTES},
    events::{
        EVENT_NET, HOOK_BIND4, HOOK_BIND6, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4,
        HOOK_SENDMSG6, HOOK_SKB_EGRESS, HOOK_SOCK_CREATE, NetEvent, VERDICT_AUDIT, VERDICT_DENY,
    },
    network::{
        DNS_PORT, Ipv4Target, Ipv6Target, MAX_DNS_SOCKETS, MAX_NET_RULES, OrigDest,
        POLICY_PREFIX_BITS, PROTO_TCP, PROTO_UDP, PortRanges,
    },
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_NO_PREALLOC, bpf_sock_addr},
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{LpmTrie, LruHashMap, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};

use crate::{
    agent,
    budgets::{self, Refused, Role},
    events,
};

/// cgroup program verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const EAGAIN: i32 = 11;

/// Map `NET_ALLOW4`.
/// - key: `Key<Ipv4Target>`: prefix length 64 + CIDR bits; data = policy id (big endian)
///   then the IPv4 address
/// - value: [`PortRanges`], the ports allowed to that prefix (with those of every shorter
///   prefix of the same policy that contains it)
/// - size: [`MAX_NET_RULES`] prefixes over all agents
/// - owner: the daemon writes on policy load and change and for DNS answers; programs read.
#[map]
static NET_ALLOW4: LpmTrie<Ipv4Target, PortRanges> =
    LpmTrie::with_max_entries(MAX_NET_RULES, BPF_F_NO_PREALLOC);

/// Map `NET_ALLOW6`: as `NET_ALLOW4`, for IPv6 (`Key<Ipv6Target>`).
#[map]
static NET_ALLOW6: LpmTrie<Ipv6Target, PortRanges> =
    LpmTrie::with_max_entries(MAX_NET_RULES, BPF_F_NO_PREALLOC);

/// Map `DNS_ORIG`.
/// - key: socket cookie (`u64`) of an agent socket whose DNS query was redirected
/// - value: [`OrigDest`], where the query was going
/// - size: [`MAX_DNS_SOCKETS`], least recently used entries evicted
/// - owner: `connect*`/`sendmsg*` write; `recvmsg*`/`getpeername*` read.
#[map]
static DNS_ORIG: LruHashMap<u64, OrigDest> = LruHashMap::with_max_entries(MAX_DNS_SOCKETS, 0);

/// A destination: IPv4 (also for IPv4-mapped IPv6) or IPv6.
#[derive(Clone, Copy)]
enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Dest {
    fn from_v6(b: [u8; 16]) -> Dest {
        let mapped = b[..10].iter().all(|x| *x == 0) && b[10] == 0xff && b[11] == 0xff;
        if mapped {
            Dest::V4([b[12], b[13], b[14], b[15]])
        } else {
            Dest::V6(b)
        }
    }
}

/// What a connect, datagram or bind is about.
#[derive(Clone, Copy)]
struct Target {
    dest: Dest,
    port: u16,
    protocol: u8,
    sock_type: u16,
}

#[inline(always)]
fn target(sa: &bpf_sock_addr, v6: bool) -> Target {
    Target {
        dest: if v6 {
            Dest::from_v6(v6_bytes(&sa.user_ip6))
        } else {
            Dest::V4(sa.user_ip4.to_ne_bytes())
        },
        port: u16::from_be(sa.user_port as u16),
        protocol: if sa.type_ == SOCK_STREAM {
            PROTO_TCP
        } else {
            PROTO_UDP
        },
        sock_type: sa.type_ as u16,
    }
}

/// [`report`] of a socket call's target.
#[inline(always)]
fn report_target(agent: u64, hook: u32, verdict: u32, t: Target) {
    report(
        agent,
        hook,
        verdict,
        t.dest,
        t.port,
        t.protocol,
        t.sock_type,
    );
}

#[inline(always)]
fn ports_of(policy: u64, dest: Dest) -> Option<PortRanges> {
    match dest {
        Dest::V4(a) => NET_ALLOW4
            .get(Key::new(
                POLICY_PREFIX_BITS + 32,
                Ipv4Target::new(policy, a),
            ))
            .copied(),
        Dest::V6(a) => NET_ALLOW6
            .get(Key::new(
                POLICY_PREFIX_BITS + 128,
                Ipv6Target::new(policy, a),
            ))
            .copied(),
    }
}

#[inline(always)]
fn allowed(policy: u64, dest: Dest, port: u16, protocol: u8) -> bool {
    match ports_of(policy, dest) {
        Some(p) => p.allows(port, protocol),
        None => false,
    }
}

fn v6_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = words[i].to_ne_bytes();
        b[i * 4] = w[0];
        b[i * 4 + 1] = w[1];
        b[i * 4 + 2] = w[2];
        b[i * 4 + 3] = w[3];
        i += 1;
    }
    b
}

/// Sends a network event, built in place in the ring buffer: the hooks' stack must leave
/// room for the budget code they call (512 bytes for both).
#[inline(always)]
fn report(
    agent: u64,
    hook: u32,
    verdict: u32,
    dest: Dest,
    port: u16,
    protocol: u8,
    sock_type: u16,
) {
    let Some(mut entry) = events::reserve::<NetEvent>() else {
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: a reserved record; every field is written before it is submitted.
    unsafe {
        events::write_header(
            &raw mut (*ev).header,
            EVENT_NET,
            hook,
            agent,
            verdict,
            hook == HOOK_SKB_EGRESS,
        );
        (*ev).port = port;
        (*ev).protocol = protocol;
        (*ev)._pad = 0;
        (*ev).sock_type = sock_type;
        match dest {
            Dest::V4(a) => {
                (*ev).family = AF_INET;
                (*ev).addr = [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            }
            Dest::V6(a) => {
                (*ev).family = AF_INET6;
                (*ev).addr = a;
            }
        }
    }
    entry.submit(0);
}

/// Charges an allowed connect or datagram to the agent's and the host's `connects`
/// budgets where they are `deny`; true when one is empty (the call fails with EAGAIN).
#[inline(always)]
fn over_budget(id: u64, hook: u32) -> bool {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match budgets::take_both(id, CLASS_CONNECTS, 1, Role::Refusing, hook, now) {
        Refused::No => return false,
        Refused::Own => budgets::denied(id, hook),
        Refused::Host => {}
    }
    // SAFETY: sets the error the refused call returns (instead of EPERM).
    unsafe { bpf_set_retval(-EAGAIN) };
    true
}

fn denied_for_audit(entry: &AgentEntry) -> bool {
    entry.flags & AGENT_FLAG_AUDIT != 0 && entry.flags & AGENT_FLAG_KILLED == 0
}

/// The decision for a connect or sendmsg: the allowlist, then the budgets.
#[inline(always)]
fn decide(ctx: &SockAddrContext, hook: u32, v6: bool) -> i32 {
    let mut id = 0u64;
    let verdict = allowlist(ctx.sock_addr, hook, v6, &mut id);
    if id == 0 {
        return verdict;
    }
    if verdict == DENY {
        budgets::denied(id, hook);
        return DENY;
    }
    if over_budget(id, hook) { DENY } else { ALLOW }
}

/// The allowlist's decision for a connect or sendmsg; `who` is set to the agent's id
/// when the caller is an agent whose operation was decided (not for a refusal of an
/// agent in audit mode, nor for a task outside agents).
#[inline(always)]
fn allowlist(sock_addr: *mut bpf_sock_addr, hook: u32, v6: bool, who: &mut u64) -> i32 {
    let ctx = SockAddrContext { sock_addr };
    let ctx = &ctx;
    // SAFETY: the context is valid for the run; these fields allow 4-byte reads.
    let sa = unsafe { &mut *ctx.sock_addr };
    let t = target(sa, v6);
    let Target {
        dest,
        port,
        protocol,
        ..
    } = t;
    let (id, entry) = match agent::current() {
        agent::Subject::Outside => return ALLOW,
        agent::Subject::Unregistered { id } => {
            report_target(id, hook, VERDICT_DENY, t);
            return DENY;
        }
        agent::Subject::Agent { id, entry } => (id, entry),
    };
    *who = id;
    if entry.flags & AGENT_FLAG_KILLED != 0 {
        report_target(id, hook, VERDICT_DENY, t);
        return DENY;
    }
    if port == DNS_PORT && entry.dns_port != 0 {
        // Every DNS query goes to the agent's own resolver in agentd.
        // SAFETY: the helper reads the context's socket.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let mut orig = OrigDest {
            port_be: sa.user_port as u16,
            ..Default::default()
        };
        match dest {
            Dest::V4(a) => {
                orig.family = AF_INET;
                orig.addr[..4].copy_from_slice(&a);
            }
            Dest::V6(a) => {
                orig.family = AF_INET6;
                orig.addr = a;
            }
        }
        let _ = DNS_ORIG.insert(cookie, orig, 0);
        let dns = u32::from_ne_bytes(entry.dns_addr);
        if v6 {
            sa.user_ip6 = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), dns];
        } else {
            sa.user_ip4 = dns;
        }
        sa.user_port = u32::from(entry.dns_port.to_be());
        return ALLOW;
    }
    if allowed(entry.policy_id, dest, port, protocol) {
        return ALLOW;
    }
    if denied_for_audit(&entry) {
        *who = 0;
        report_target(id, hook, VERDICT_AUDIT, t);
        return ALLOW;
    }
    report_target(id, hook, VERDICT_DENY, t);
    if events::debug_log_on() {
        aya_log_ebpf::debug!(
            ctx,
            "egress denied: agent {} hook {} port {} protocol {}",
            id,
            hook,
            port,
            protocol
        );
    }
    DENY
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, HOOK_CONNECT4, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, HOOK_CONNECT6, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, HOOK_SENDMSG4, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, HOOK_SENDMSG6, true)
}

/// Puts back the original source of a reply from the agent's resolver. recvmsg and
/// getpeername hooks must allow (return 1); they only rewrite.
#[inline(always)]
fn restore(ctx: &SockAddrContext, v6: bool) -> i32 {
    let agent::Subject::Agent { entry, .. } = agent::current() else {
        return ALLOW;
    };
    // SAFETY: as in decide().
    let sa = unsafe { &mut *ctx.sock_addr };
    let dns = u32::from_ne_bytes(entry.dns_addr);
    let from_resolver = if v6 {
        sa.user_ip6[0] == 0
            && sa.user_ip6[1] == 0
            && sa.user_ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
            && sa.user_ip6[3] == dns
    } else {
        sa.user_ip4 == dns
    };
    if !from_resolver || u16::from_be(sa.user_port as u16) != entry.dns_port {
        return ALLOW;
    }
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { DNS_ORIG.get(cookie) }).copied() else {
        return ALLOW;
    };
    if v6 {
        if orig.family == AF_INET {
            let a = [orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]];
            sa.user_ip6 = [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                u32::from_ne_bytes(a),
            ];
        } else {
            let b = orig.addr;
            sa.user_ip6 = [
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            ];
        }
    } else if orig.family == AF_INET {
        sa.user_ip4 = u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
    } else {
        return ALLOW;
    }
    sa.user_port = u32::from(orig.port_be);
    ALLOW
}

/// Port of the daemon's metrics listener (0: none); set by the loader.
#[unsafe(no_mangle)]
static METRICS_PORT: u16 = 0;

/// `bind`: an agent may not bind agentd's resolver addresses (127.53.0.0/16, any port),
/// nor the daemon's metrics port on any address: while no daemon runs, such an agent
/// could answer other agents' DNS queries or pose as agentd's /metrics, and a restarted
/// daemon would find the address taken. Always enforced (also in audit mode): it guards
/// agentd itself.
#[inline(always)]
fn bind_decision(ctx: &SockAddrContext, hook: u32, v6: bool) -> i32 {
    // SAFETY: the context is valid for the run; these fields allow 4-byte reads.
    let sa = unsafe { &*ctx.sock_addr };
    let id = match agent::current() {
        agent::Subject::Outside => return ALLOW,
        agent::Subject::Unregistered { id } => id,
        agent::Subject::Agent { id, .. } => id,
    };
    let t = target(sa, v6);
    let resolver = matches!(t.dest, Dest::V4([127, 53, _, _]));
    // SAFETY: a read-only global, set before the program was loaded.
    let metrics_port = unsafe { core::ptr::read_volatile(&METRICS_PORT) };
    if !resolver && (metrics_port == 0 || t.port != metrics_port) {
        return ALLOW;
    }
    report_target(id, hook, VERDICT_DENY, t);
    DENY
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    bind_decision(&ctx, HOOK_BIND4, false)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    bind_decision(&ctx, HOOK_BIND6, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true)
}

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context is valid for the run.
    let sk = unsafe { &*ctx.sock };
    let (family, sock_type, protocol) = (sk.family, sk.type_, sk.protocol);
    let raw = sock_type == SOCK_RAW || protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6;
    let (id, entry) = match agent::current() {
        agent::Subject::Outside => return ALLOW,
        agent::Subject::Unregistered { id } => (id, None),
        agent::Subject::Agent { id, entry } => {
            if !raw && entry.flags & AGENT_FLAG_KILLED == 0 {
                return ALLOW;
            }
            (id, Some(entry))
        }
    };
    let audit = entry.as_ref().is_some_and(denied_for_audit);
    let verdict = if audit { VERDICT_AUDIT } else { VERDICT_DENY };
    // For a refused socket, the event's port carries the IP protocol number.
    let event = NetEvent {
        header: events::header(EVENT_NET, HOOK_SOCK_CREATE, id, verdict),
        family: family as u16,
        port: protocol as u16,
        protocol: 0,
        _pad: 0,
        sock_type: sock_type as u16,
        addr: [0; 16],
    };
    events::emit(&event);
    if audit {
        return ALLOW;
    }
    budgets::denied(id, HOOK_SOCK_CREATE);
    DENY
}

/// What an outgoing packet is: destination, port (if the L4 header is there), protocol.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<(Dest, Option<u16>, u8)> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => {
            let ihl = ((first & 0x0f) as usize) * 4;
            let proto: u8 = ctx.load(9).ok()?;
            let frag: u16 = u16::from_be(ctx.load(6).ok()?);
            let dst: [u8; 4] = ctx.load(16).ok()?;
            let port = if frag & 0x1fff == 0
                && (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
                && (20..=60).contains(&ihl)
            {
                Some(u16::from_be(ctx.load(ihl + 2).ok()?))
            } else {
                None
            };
            Some((Dest::V4(dst), port, proto))
        }
        6 => {
            let next: u8 = ctx.load(6).ok()?;
            let dst: [u8; 16] = ctx.load(24).ok()?;
            let port = if next == IPPROTO_TCP || next == IPPROTO_UDP {
                Some(u16::from_be(ctx.load(42).ok()?))
            } else {
                None
            };
            Some((Dest::from_v6(dst), port, next))
        }
        _ => None,
    }
}

#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    let (id, entry) = match agent::of_skb(&ctx) {
        agent::Subject::Outside => return ALLOW,
        agent::Subject::Unregistered { id } => {
            report(id, HOOK_SKB_EGRESS, VERDICT_DENY, Dest::V4([0; 4]), 0, 0, 0);
            return DENY;
        }
        agent::Subject::Agent { id, entry } => (id, entry),
    };
    let Some((dest, port, proto)) = parse(&ctx) else {
        // Not IP: an agent socket has no business sending it.
        report(id, HOOK_SKB_EGRESS, VERDICT_DENY, Dest::V4([0; 4]), 0, 0, 0);
        budgets::denied(id, HOOK_SKB_EGRESS);
        return DENY;
    };
    let protocol = match proto {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => 0,
    };
    if entry.flags & AGENT_FLAG_KILLED == 0 {
        if let (Dest::V4(a), Some(p)) = (dest, port)
            && a == entry.dns_addr
            && p == entry.dns_port
        {
            return ALLOW;
        }
        let ok = match port {
            Some(p) => allowed(entry.policy_id, dest, p, protocol),
            // A later fragment, or no TCP/UDP header: the address must be allowed. The first
            // fragment carries the port and was judged with it.
            None => protocol != 0 && ports_of(entry.policy_id, dest).is_some_and(|r| r.count > 0),
        };
        if ok {
            // SAFETY: no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            let len = u64::from(ctx.len());
            let bytes = budgets::take_both(
                id,
                CLASS_EGRESS_BYTES,
                len,
                Role::Only,
                HOOK_SKB_EGRESS,
                now,
            );
            return match bytes {
                Refused::No => ALLOW,
                Refused::Own => {
                    budgets::denied(id, HOOK_SKB_EGRESS);
                    DENY
                }
                Refused::Host => DENY,
            };
        }
        if denied_for_audit(&entry) {
            report(
                id,
                HOOK_SKB_EGRESS,
                VERDICT_AUDIT,
                dest,
                port.unwrap_or(0),
                protocol,
                0,
            );
            return ALLOW;
        }
    }
    report(
        id,
        HOOK_SKB_EGRESS,
        VERDICT_DENY,
        dest,
        port.unwrap_or(0),
        protocol,
        0,
    );
    budgets::denied(id, HOOK_SKB_EGRESS);
    DENY
}
