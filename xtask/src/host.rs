//! Pieces of the host that the tasks which run a daemon of their own (`demo`, `bench`)
//! share: cgroups, processes, ports, and the flag of an interruption (Ctrl-C, SIGTERM,
//! SIGHUP), which their guards answer by cleaning up before they exit.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};

pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A port free on loopback (UDP and TCP) for the daemon's resolvers.
pub fn free_port() -> Result<u16> {
    for _ in 0..20 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port for the daemon's resolvers")
}

/// The cgroup2 mount point, from /proc/self/mountinfo (the first one, as agentd finds it).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4))
                .flatten()
                .map(|p| PathBuf::from(p.replace("\\040", " ")))
        })
        .ok_or_else(|| anyhow!("no cgroup2 file system is mounted (see /proc/self/mountinfo)"))
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C, SIGTERM and SIGHUP end the task through its guard (which stops its daemon and
/// removes what the task created) instead of killing it on the spot.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Polls `done` every 20 ms until it holds (true) or `timeout` passes (false); an error
/// when the task is interrupted.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Ok(true);
        }
        check_interrupted()?;
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The same for cleanup, which goes on after an interruption.
pub fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `populated` of a cgroup's cgroup.events.
pub fn populated(cg: &Path) -> Option<bool> {
    let text = fs::read_to_string(cg.join("cgroup.events")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
}

/// Kills every process of a cgroup tree the task named, and removes the tree.
pub fn remove_cgroup_tree(path: &Path) -> Result<()> {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    wait_for(Duration::from_secs(10), || populated(path) != Some(true));
    rmdir_tree(path)
}

pub fn rmdir_tree(path: &Path) -> Result<()> {
    for entry in fs::read_dir(path)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            rmdir_tree(&entry.path())?;
        }
    }
    let mut last = None;
    let gone = wait_for(Duration::from_secs(5), || match fs::remove_dir(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            last = Some(e);
            false
        }
    });
    if !gone {
        bail!("rmdir {}: {:?}", path.display(), last);
    }
    Ok(())
}

pub fn proc_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}
