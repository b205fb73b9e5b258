//! Connections: who may ask what, and reading a request with the descriptors sent with it.

use std::{
    fs,
    io::IoSliceMut,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::Arc,
};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::{io::Interest, net::UnixStream};

use super::{
    Daemon, Locked as _,
    agents::{self, Refusal, refuse},
    peer::{self, Peer, Socket},
    send,
};
use crate::protocol::{EXIT_AGENTD, EXIT_POLICY, ProcessInfo, Reply, Request};

/// How long a peer has to send its request once connected.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the first request line, with any descriptors sent alongside it.
async fn read_request(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    loop {
        stream.readable().await?;
        let got = stream.try_io(Interest::READABLE, || {
            let mut buf = [0u8; 16 * 1024];
            let mut space = nix::cmsg_space!([RawFd; 3]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut new_fds = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(rights) = c {
                    // SAFETY: the kernel just installed these descriptors for us.
                    new_fds.extend(
                        rights
                            .into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let n = msg.bytes;
            Ok((buf[..n].to_vec(), new_fds))
        });
        match got {
            Ok((bytes, new_fds)) => {
                fds.extend(new_fds);
                if fds.len() > 3 {
                    return Err(std::io::Error::other("too many descriptors"));
                }
                if bytes.is_empty() {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                data.extend_from_slice(&bytes);
                if let Some(pos) = data.iter().position(|&b| b == b'\n') {
                    data.truncate(pos);
                    return Ok((data, fds));
                }
                if data.len() > crate::protocol::MAX_MESSAGE {
                    return Err(std::io::Error::other("request too large"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Who may use which socket.
fn authorize(daemon: &Daemon, peer: &Peer, socket: Socket) -> Result<(), Refusal> {
    match (socket, &peer.agent) {
        (Socket::Control, Some(_)) => Err(refuse(
            "processes inside an agent may not use agentd's control socket",
        )),
        (Socket::Control, None) => {
            let admin = peer.uid == 0
                || daemon
                    .admin_gid
                    .is_some_and(|g| peer.gid == g || peer.groups.contains(&g));
            if admin {
                Ok(())
            } else {
                Err(refuse(format!(
                    "permission denied: only root and members of group `{}` may use agentd",
                    daemon.config.admin_group
                )))
            }
        }
        // The peer must also run as the agent's user: a process of another agent (another
        // user) cannot speak for this one.
        (Socket::Launch, Some(name))
            if !name.is_empty()
                && daemon
                    .agent(name)
                    .is_some_and(|a| a.identity.uid == peer.uid) =>
        {
            Ok(())
        }
        (Socket::Launch, _) => Err(refuse(format!(
            "the launch socket serves processes inside agents; use the control socket {}",
            daemon.config.socket.display()
        ))),
    }
}

fn process_info(pid: u32) -> ProcessInfo {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let uid = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(u32::MAX);
    ProcessInfo { pid, comm, uid }
}

/// Serves one connection.
pub async fn serve(daemon: Arc<Daemon>, mut stream: UnixStream, socket: Socket) {
    let peer = match peer::identify(&stream, &daemon.root_rel()) {
        Ok(p) => p,
        Err(e) => {
            let _ = send(
                &mut stream,
                &Reply::Error {
                    message: format!("cannot identify the peer: {e}"),
                    exit_code: EXIT_AGENTD,
                },
            )
            .await;
            return;
        }
    };
    if let Err((message, exit_code)) = authorize(&daemon, &peer, socket) {
        let _ = send(&mut stream, &Reply::Error { message, exit_code }).await;
        return;
    }
    // A peer that connects and says nothing does not hold a connection for long.
    let Ok(Ok((line, fds))) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&stream)).await
    else {
        return;
    };
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(
                &mut stream,
                &Reply::Error {
                    message: format!("malformed request: {e}"),
                    exit_code: EXIT_AGENTD,
                },
            )
            .await;
            return;
        }
    };
    let reply = match (request, socket) {
        (Request::Run(req), _) => return agents::run(daemon, stream, peer, *req, fds).await,
        (
            Request::Events {
                follow,
                agent,
                last,
            },
            Socket::Control,
        ) => return events(daemon, stream, follow, agent, last).await,
        (_, Socket::Launch) => Reply::Error {
            message: "only `run` is served on the launch socket".into(),
            exit_code: EXIT_POLICY,
        },
        (Request::Ps, Socket::Control) => {
            let list: Vec<_> = daemon.agents.locked().values().cloned().collect();
            Reply::Agents {
                agents: list.iter().map(|a| a.info(&daemon)).collect(),
            }
        }
        (Request::Inspect { agent }, Socket::Control) => match daemon.agent(&agent) {
            Some(a) => Reply::Inspect {
                agent: Box::new(a.info(&daemon)),
                policy: Box::new(a.live.locked().policy.clone()),
                processes: a.processes().into_iter().map(process_info).collect(),
                counters: daemon
                    .counters
                    .locked()
                    .get(&a.id)
                    .cloned()
                    .unwrap_or_default(),
                denials: daemon
                    .denials
                    .locked()
                    .get(&a.id)
                    .map(|d| d.iter().cloned().collect())
                    .unwrap_or_default(),
            },
            None => Reply::Error {
                message: format!("no agent named `{agent}` is running"),
                exit_code: 1,
            },
        },
        (
            Request::Kill {
                agents,
                all,
                action,
            },
            Socket::Control,
        ) => {
            // At once: the client falls back to acting directly if this does not come.
            let _ = send(&mut stream, &Reply::Accepted).await;
            let d = daemon.clone();
            match tokio::task::spawn_blocking(move || agents::kill_switch(&d, &agents, all, action))
                .await
            {
                Ok(outcomes) => Reply::Killed { outcomes },
                Err(e) => Reply::Error {
                    message: format!("the kill switch failed: {e}"),
                    exit_code: EXIT_AGENTD,
                },
            }
        }
        (Request::DebugLog { on }, Socket::Control) => {
            let set = crate::events::set_debug_log(&mut daemon.kernel.locked(), on);
            match set {
                Ok(()) => {
                    let _ = daemon.audit(
                        &crate::audit::Subject::daemon(),
                        "debug_log",
                        serde_json::json!({"on": on}),
                        false,
                    );
                    eprintln!(
                        "agentd: the kernel programs' debug log is {}",
                        if on { "on" } else { "off" }
                    );
                    Reply::DebugLog { on }
                }
                Err(e) => Reply::Error {
                    message: format!("{e:#}"),
                    exit_code: EXIT_AGENTD,
                },
            }
        }
        (Request::Reload, Socket::Control) => {
            let d = daemon.clone();
            match tokio::task::spawn_blocking(move || super::reload::reload(&d)).await {
                Ok(Ok(report)) => {
                    eprintln!("agentd: {}", report.summary());
                    Reply::Reloaded { report }
                }
                Ok(Err((message, exit_code))) => {
                    let message = format!("reload refused, nothing was changed: {message}");
                    eprintln!("agentd: {message}");
                    Reply::Error { message, exit_code }
                }
                Err(e) => Reply::Error {
                    message: format!("reload failed: {e}"),
                    exit_code: EXIT_AGENTD,
                },
            }
        }
        (Request::Update(req), Socket::Control) => {
            let d = daemon.clone();
            match tokio::task::spawn_blocking(move || agents::update(&d, &req)).await {
                Ok(Ok(reply)) => reply,
                Ok(Err((message, exit_code))) => Reply::Error { message, exit_code },
                Err(e) => Reply::Error {
                    message: format!("update failed: {e}"),
                    exit_code: EXIT_AGENTD,
                },
            }
        }
    };
    let _ = send(&mut stream, &reply).await;
}

/// `agentd events`: recent records, then (with `follow`) new ones until the client goes.
async fn events(
    daemon: Arc<Daemon>,
    mut stream: UnixStream,
    follow: bool,
    agent: Option<String>,
    last: usize,
) {
    let wanted = |r: &serde_json::Value| agent.as_ref().is_none_or(|a| r["agent"] == **a);
    // Subscribed before the recent records are read: nothing falls in between.
    let mut feed = daemon.trail.feed.subscribe();
    let recent: Vec<serde_json::Value> = {
        let recent = daemon.trail.recent.locked();
        let matching: Vec<_> = recent.iter().filter(|r| wanted(r)).cloned().collect();
        matching[matching.len().saturating_sub(last)..].to_vec()
    };
    let mut seen = recent.last().and_then(|r| r["seq"].as_u64()).unwrap_or(0);
    for record in recent {
        if send(&mut stream, &Reply::Event { record }).await.is_err() {
            return;
        }
    }
    if !follow {
        let _ = send(&mut stream, &Reply::EventsEnd).await;
        return;
    }
    let (mut read, mut write) = stream.into_split();
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            r = feed.recv() => match r {
                Ok(record) => {
                    let seq = record["seq"].as_u64().unwrap_or(0);
                    if seq <= seen || !wanted(&record) {
                        continue;
                    }
                    seen = seq;
                    if send(&mut write, &Reply::Event { record }).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // A slow reader misses records here (the audit log has them all).
                    let record = serde_json::json!({"kind": "feed_lagged", "details": {"missed": n}});
                    if send(&mut write, &Reply::Event { record }).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            // The client closed its end.
            n = tokio::io::AsyncReadExt::read(&mut read, &mut buf) => {
                if matches!(n, Ok(0) | Err(_)) {
                    return;
                }
            }
        }
    }
}
