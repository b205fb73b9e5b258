//! Each agent's resolver: a UDP socket and a TCP listener on an address of its own in
//! 127.53.0.0/16 (the whole of 127/8 is local on Linux's loopback), so a query tells by
//! where it arrived which agent asked. The kernel programs send the agent's port-53
//! traffic there. Answers come from [`crate::network::resolver`].

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
};

use super::{Daemon, Locked as _, agents::AgentState};
use crate::network::resolver::{self, Answer};

/// The network agents' resolver addresses are taken from.
pub const RESOLVER_NET: [u8; 2] = [127, 53];

/// An agent's resolver address, returned to the daemon's pool when dropped.
pub struct Slot {
    daemon: Arc<Daemon>,
    n: u16,
}

impl Slot {
    /// Takes the lowest free address 127.53.x.y (x.y from 0.1 to 255.254).
    pub fn take(daemon: &Arc<Daemon>) -> Result<Slot> {
        let mut used = daemon.dns_slots.locked();
        let n = (1..u16::MAX).find(|n| !used.contains(n) && (n & 0xff) != 0 && (n & 0xff) != 0xff);
        let Some(n) = n else {
            bail!("no free resolver address is left in 127.53.0.0/16")
        };
        used.insert(n);
        Ok(Slot {
            daemon: daemon.clone(),
            n,
        })
    }

    /// Takes `addr` again (an adopted agent keeps its resolver address).
    pub fn claim(daemon: &Arc<Daemon>, addr: Ipv4Addr) -> Result<Slot> {
        let [a, b, hi, lo] = addr.octets();
        if [a, b] != RESOLVER_NET {
            bail!("{addr} is not a resolver address (127.53.0.0/16)");
        }
        let n = u16::from_be_bytes([hi, lo]);
        if !daemon.dns_slots.locked().insert(n) {
            bail!("the resolver address {addr} is taken");
        }
        Ok(Slot {
            daemon: daemon.clone(),
            n,
        })
    }

    pub fn addr(&self) -> Ipv4Addr {
        let [hi, lo] = self.n.to_be_bytes();
        Ipv4Addr::new(RESOLVER_NET[0], RESOLVER_NET[1], hi, lo)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.daemon.dns_slots.locked().remove(&self.n);
    }
}

/// The resolver's sockets, bound before the agent starts.
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

/// Binds the agent's resolver address (UDP and TCP).
pub fn bind(addr: Ipv4Addr, port: u16) -> Result<Sockets> {
    let at = SocketAddr::from((addr, port));
    let udp = std::net::UdpSocket::bind(at)
        .with_context(|| format!("binding the agent's resolver on udp {at}"))?;
    let tcp = std::net::TcpListener::bind(at)
        .with_context(|| format!("binding the agent's resolver on tcp {at}"))?;
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    Ok(Sockets { udp, tcp })
}

/// The running resolver of one agent; dropping it stops it and frees the address.
pub struct AgentResolver {
    tasks: Vec<JoinHandle<()>>,
    _slot: Slot,
}

impl Drop for AgentResolver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Answers one query of `agent`; `None` for something that is not a query.
async fn handle(
    daemon: &Daemon,
    agent: &AgentState,
    query: &[u8],
    over_tcp: bool,
) -> Option<Vec<u8>> {
    let hosts = agent.live.locked().policy.network.hosts.clone();
    let upstream = daemon.settings.locked().upstream.clone();
    let answer = resolver::answer(query, &hosts, &upstream, over_tcp).await;
    let count = |f: fn(&mut crate::protocol::Counters)| {
        f(daemon.counters.locked().entry(agent.id).or_default());
    };
    match answer {
        Answer::Forwarded {
            reply,
            name,
            learned,
            ports,
        } => {
            // The addresses are allowed before the agent can see them.
            if let Err(e) = super::agents::learn(daemon, agent, &learned, &ports) {
                eprintln!(
                    "agentd: agent {}: allowing the addresses of {name}: {e:#}",
                    agent.name
                );
                return Some(resolver::servfail(query));
            }
            count(|c| c.dns_answered += 1);
            daemon.metrics.dns_answers.inc();
            daemon.audit_allowed(agent, "dns_answered", &name);
            Some(reply)
        }
        Answer::Refused { reply, name } => {
            count(|c| c.dns_refused += 1);
            daemon.metrics.dns_refusals.inc();
            daemon.audit_agent(
                agent,
                "dns_refused",
                serde_json::json!({"name": name, "text": format!("DNS query for {name} refused: not in the allowed names")}),
            );
            Some(reply)
        }
        Answer::Failed { reply, name, error } => {
            eprintln!("agentd: agent {}: resolving {name}: {error}", agent.name);
            Some(reply)
        }
        Answer::Malformed => None,
    }
}

async fn serve_udp(daemon: Arc<Daemon>, agent: Arc<AgentState>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            return;
        };
        let query = buf[..n].to_vec();
        let (daemon, agent, sock) = (daemon.clone(), agent.clone(), sock.clone());
        tokio::spawn(async move {
            if let Some(reply) = handle(&daemon, &agent, &query, false).await {
                let _ = sock.send_to(&reply, from).await;
            }
        });
    }
}

async fn serve_tcp_conn(daemon: Arc<Daemon>, agent: Arc<AgentState>, mut conn: TcpStream) {
    // Several length-prefixed queries may come on one connection.
    loop {
        let Ok(len) = conn.read_u16().await else {
            return;
        };
        let mut query = vec![0u8; len as usize];
        if conn.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = handle(&daemon, &agent, &query, true).await else {
            return;
        };
        if conn
            .write_all(&(reply.len() as u16).to_be_bytes())
            .await
            .is_err()
            || conn.write_all(&reply).await.is_err()
        {
            return;
        }
    }
}

async fn serve_tcp(daemon: Arc<Daemon>, agent: Arc<AgentState>, listener: TcpListener) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(serve_tcp_conn(daemon.clone(), agent.clone(), conn));
    }
}

/// Starts the resolver of `agent` on sockets bound by [`bind`].
pub fn start(
    daemon: Arc<Daemon>,
    agent: Arc<AgentState>,
    sockets: Sockets,
    slot: Slot,
) -> AgentResolver {
    let mut tasks = Vec::new();
    match UdpSocket::from_std(sockets.udp) {
        Ok(udp) => tasks.push(tokio::spawn(serve_udp(
            daemon.clone(),
            agent.clone(),
            Arc::new(udp),
        ))),
        Err(e) => eprintln!("agentd: agent {}: resolver (udp): {e}", agent.name),
    }
    match TcpListener::from_std(sockets.tcp) {
        Ok(tcp) => tasks.push(tokio::spawn(serve_tcp(daemon.clone(), agent.clone(), tcp))),
        Err(e) => eprintln!("agentd: agent {}: resolver (tcp): {e}", agent.name),
    }
    AgentResolver { tasks, _slot: slot }
}
