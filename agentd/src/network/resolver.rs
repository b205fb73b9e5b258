//! agentd's DNS resolver: answers an agent's queries, and only for allowed names.
//!
//! The kernel programs send every DNS query of an agent (port 53, UDP or TCP, whatever
//! address it was meant for) to that agent's own resolver address, so the resolver knows
//! which agent asked. For a name one of the agent's `hosts` rules admits, and a query for
//! its addresses (A, AAAA, CNAME), the query is forwarded to the upstream resolver; the
//! addresses in the answer are added to the agent's allowlist (with the rule's ports, for
//! the record's TTL) before the answer is returned. Every other query is answered REFUSED
//! here and never leaves the host, so a name cannot carry data out.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

use crate::profile::{HostRule, Ports};

/// How long the resolver waits for the upstream resolver.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Shortest time a learned address stays allowed (an answer with TTL 0 must still be usable
/// for the connect that follows it).
pub const MIN_TTL: u32 = 10;
/// Longest time a learned address stays allowed without a new answer.
pub const MAX_TTL: u32 = 3600;

/// A name normalized for matching: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a `hosts` pattern admits a name: exactly, or `*.d` for names strictly below d.
pub fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            name.len() > domain.len() + 1
                && name.ends_with(domain)
                && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
        }
        None => pattern == name,
    }
}

/// The ports the rules give `name`; empty if no rule admits it.
pub fn ports_for(hosts: &[HostRule], name: &str) -> Vec<Ports> {
    let name = normalize(name);
    let mut out: Vec<Ports> = hosts
        .iter()
        .filter(|h| host_matches(&h.pattern, &name))
        .map(|h| h.ports)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// An address learned from an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    pub addr: IpAddr,
    /// Seconds, already clamped to [`MIN_TTL`]..=[`MAX_TTL`].
    pub ttl: u32,
}

/// What the resolver does with a query.
#[derive(Debug)]
pub enum Answer {
    /// Answered here with REFUSED (name not allowed, or a query type agentd does not
    /// forward). Carries the name for the event.
    Refused { reply: Vec<u8>, name: String },
    /// Forwarded; the reply to send once `learned` is in the allowlist with `ports`.
    Forwarded {
        reply: Vec<u8>,
        name: String,
        learned: Vec<Learned>,
        ports: Vec<Ports>,
    },
    /// The upstream resolver failed; SERVFAIL.
    Failed {
        reply: Vec<u8>,
        name: String,
        error: String,
    },
    /// Not a DNS query: no answer.
    Malformed,
}

fn reply_with(request: &Message, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    for q in &request.queries {
        m.add_query(q.clone());
    }
    m.to_vec().unwrap_or_default()
}

/// A SERVFAIL answer to `query` (empty if it is not a DNS message).
pub fn servfail(query: &[u8]) -> Vec<u8> {
    Message::from_vec(query)
        .map(|m| reply_with(&m, ResponseCode::ServFail))
        .unwrap_or_default()
}

/// Decides and, for an allowed name, forwards one query.
pub async fn answer(
    query: &[u8],
    hosts: &[HostRule],
    upstream: &[SocketAddr],
    over_tcp: bool,
) -> Answer {
    let Ok(request) = Message::from_vec(query) else {
        return Answer::Malformed;
    };
    if request.metadata.message_type != MessageType::Query {
        return Answer::Malformed;
    }
    let Some(q) = request.queries.first() else {
        return Answer::Refused {
            reply: reply_with(&request, ResponseCode::FormErr),
            name: String::new(),
        };
    };
    let name = normalize(&q.name().to_ascii());
    let qtype = q.query_type();
    let ports = ports_for(hosts, &name);
    let forwardable = matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::CNAME);
    if ports.is_empty() || !forwardable || request.queries.len() != 1 {
        return Answer::Refused {
            reply: reply_with(&request, ResponseCode::Refused),
            name,
        };
    }
    match forward(query, request.metadata.id, upstream, over_tcp).await {
        Ok(reply) => {
            let learned = match Message::from_vec(&reply) {
                Ok(m) => addresses(&m),
                Err(e) => {
                    return Answer::Failed {
                        reply: reply_with(&request, ResponseCode::ServFail),
                        name,
                        error: format!("undecodable answer: {e}"),
                    };
                }
            };
            Answer::Forwarded {
                reply,
                name,
                learned,
                ports,
            }
        }
        Err(e) => Answer::Failed {
            reply: reply_with(&request, ResponseCode::ServFail),
            name,
            error: format!("{e:#}"),
        },
    }
}

/// The A and AAAA records of an answer (CNAME chains included: they answer the question).
pub fn addresses(m: &Message) -> Vec<Learned> {
    m.answers
        .iter()
        .filter_map(|r| {
            let addr = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return None,
            };
            Some(Learned {
                addr,
                ttl: r.ttl.clamp(MIN_TTL, MAX_TTL),
            })
        })
        .collect()
}

/// Forwards over UDP; a truncated answer to a query that came over TCP is fetched again
/// over TCP (a UDP client gets the truncated answer and retries over TCP itself).
async fn forward(
    query: &[u8],
    id: u16,
    upstream: &[SocketAddr],
    over_tcp: bool,
) -> Result<Vec<u8>> {
    if upstream.is_empty() {
        bail!("no upstream resolver is configured (dns.upstream)");
    }
    let mut last = None;
    for server in upstream {
        let attempt = match forward_udp(query, id, *server).await {
            Ok(reply) if over_tcp && reply.len() > 2 && reply[2] & 0x02 != 0 => {
                forward_tcp(query, *server).await
            }
            other => other,
        };
        match attempt {
            Ok(reply) => return Ok(reply),
            Err(e) => last = Some(e.context(format!("upstream {server}"))),
        }
    }
    Err(last.expect("at least one upstream"))
}

async fn forward_udp(query: &[u8], id: u16, server: SocketAddr) -> Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .context("timed out")??;
        // An answer to another query (a spoof, or a late reply) is ignored.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(query: &[u8], server: SocketAddr) -> Result<Vec<u8>> {
    let work = async {
        let mut s = TcpStream::connect(server).await?;
        s.write_all(&(query.len() as u16).to_be_bytes()).await?;
        s.write_all(query).await?;
        let len = s.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await?;
        anyhow::Ok(buf)
    };
    timeout(UPSTREAM_TIMEOUT, work).await.context("timed out")?
}

/// Nameservers of a resolv.conf text, on port 53.
pub fn upstream_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::parse_host_rule;
    use hickory_proto::{
        op::{OpCode, Query},
        rr::{Name, Record, rdata::A},
    };

    fn hosts(list: &[&str]) -> Vec<HostRule> {
        list.iter().map(|h| parse_host_rule(h).unwrap()).collect()
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    #[test]
    fn names_match_whole_labels() {
        assert!(host_matches("pypi.org", "pypi.org"));
        assert!(host_matches("*.pypi.org", "files.pypi.org"));
        assert!(host_matches("*.pypi.org", "a.b.pypi.org"));
        assert!(!host_matches("*.pypi.org", "pypi.org"));
        assert!(!host_matches("*.pypi.org", "evilpypi.org"));
        assert!(!host_matches("pypi.org", "pypi.org.evil.test"));
        let h = hosts(&["allowed.test:443/tcp", "*.allowed.test:80"]);
        assert_eq!(ports_for(&h, "Allowed.TEST."), vec![h[0].ports]);
        assert!(ports_for(&h, "secret-data.evil.test").is_empty());
    }

    #[tokio::test]
    async fn refused_names_are_answered_here_and_never_forwarded() {
        // No upstream at all: a refused name must not need one.
        let h = hosts(&["allowed.test"]);
        for (name, qtype) in [
            ("secret-data.evil.test.", RecordType::A),
            ("allowed.test.", RecordType::TXT),
        ] {
            match answer(&query(name, qtype), &h, &[], false).await {
                Answer::Refused { reply, .. } => {
                    let m = Message::from_vec(&reply).unwrap();
                    assert_eq!(m.metadata.id, 0x4242);
                    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
                    assert_eq!(m.queries.len(), 1);
                }
                other => panic!("{name} {qtype:?}: {other:?}"),
            }
        }
        assert!(matches!(
            answer(b"\x00\x01garbage", &h, &[], false).await,
            Answer::Malformed
        ));
    }

    #[tokio::test]
    async fn allowed_names_are_forwarded_and_their_addresses_learned() {
        // A one-shot upstream on loopback.
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = up.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = up.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.add_query(q.queries[0].clone());
            r.answers.push(Record::from_rdata(
                q.queries[0].name().clone(),
                0,
                RData::A(A::new(192, 0, 2, 7)),
            ));
            up.send_to(&r.to_vec().unwrap(), from).await.unwrap();
        });
        let h = hosts(&["allowed.test:443/tcp"]);
        match answer(&query("allowed.test.", RecordType::A), &h, &[addr], false).await {
            Answer::Forwarded { learned, ports, .. } => {
                assert_eq!(
                    learned,
                    vec![Learned {
                        addr: "192.0.2.7".parse().unwrap(),
                        ttl: MIN_TTL
                    }]
                );
                assert_eq!(ports, vec![h[0].ports]);
            }
            other => panic!("{other:?}"),
        }
        server.await.unwrap();
    }

    #[test]
    fn reads_nameservers() {
        let text = "# comment\nnameserver 10.255.255.53\nnameserver ::1\nsearch example\n";
        assert_eq!(
            upstream_from_resolv_conf(text),
            vec![
                "10.255.255.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
