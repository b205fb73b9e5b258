//! Who is on the other end of a connection.

use std::{
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use tokio::net::UnixStream;

/// Which socket the peer connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    Control,
    Launch,
}

/// The peer, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of the peer process.
    pub groups: Vec<u32>,
    /// The agent (name of its cgroup directly below the agent root) the peer belongs to,
    /// or `None` for a process outside the root. `Some("")` for a process in the root
    /// itself, which no agent is.
    pub agent: Option<String>,
}

/// The cgroup v2 path of a process (relative to the cgroup2 root, starting with `/`).
fn cgroup_of(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

fn groups_of(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The agent a cgroup path (as in /proc/PID/cgroup) belongs to, given the agent root's
/// path relative to the cgroup2 mount root.
pub fn agent_of(cgroup: &str, root_rel: &Path) -> Option<String> {
    let rel = Path::new(cgroup).strip_prefix("/").ok()?;
    let below = rel.strip_prefix(root_rel).ok()?;
    Some(
        below
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

/// A pidfd for the process that connected (`SO_PEERPIDFD`, Linux 6.5): `Ok(None)` only
/// where the kernel does not have the option; any other failure (such as a peer already
/// reaped) is an error, so that the liveness check cannot be skipped by it.
fn peer_pidfd(stream: &UnixStream) -> std::io::Result<Option<OwnedFd>> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `fd`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: on success the kernel installed a new descriptor for us.
    Ok((fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// True while the process behind `pidfd` has not exited.
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks; the pidfd is valid.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<u8>(),
            0,
        ) == 0
    }
}

/// Identifies the peer of `stream`. The peer cannot move itself between cgroups (agents
/// cannot write to the cgroup file system); what could go wrong is reading /proc of
/// another process that got the peer's pid after the peer exited. Where the kernel gives
/// a pidfd of the peer, the peer is checked to be alive after /proc was read, so what was
/// read is the peer's; a peer that has exited is refused.
pub fn identify(stream: &UnixStream, root_rel: &Path) -> std::io::Result<Peer> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().unwrap_or(0) as u32;
    let pidfd = peer_pidfd(stream)?;
    let cgroup = cgroup_of(pid)
        .ok_or_else(|| std::io::Error::other("the peer's cgroup is unknown (it exited?)"))?;
    let groups = groups_of(pid);
    if pidfd.as_ref().is_some_and(|fd| !alive(fd)) {
        return Err(std::io::Error::other(
            "the peer exited before it could be identified",
        ));
    }
    Ok(Peer {
        pid,
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
        agent: agent_of(&cgroup, root_rel),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_is_the_first_directory_below_the_root() {
        let root = Path::new("agentd");
        assert_eq!(agent_of("/agentd/a1", root).as_deref(), Some("a1"));
        assert_eq!(
            agent_of("/agentd/a1/made/by/agent", root).as_deref(),
            Some("a1")
        );
        assert_eq!(agent_of("/agentd", root).as_deref(), Some(""));
        assert_eq!(agent_of("/agentdx/a1", root), None);
        assert_eq!(agent_of("/user.slice/x", root), None);
        assert_eq!(agent_of("/", root), None);
    }
}
