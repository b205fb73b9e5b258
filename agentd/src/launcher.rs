//! Starting an agent's first process: the steps between fork and exec.
//!
//! Everything that allocates or can fail in interesting ways happens before the fork:
//! the seccomp filter is compiled to BPF, the environment is filtered, the cgroup's
//! `cgroup.procs` is opened. Between fork and exec the child makes only system calls, in
//! this order (each is a [`Step`]; a failure reports which one):
//!
//! 1. join the agent's cgroup (so every later instruction, and every descendant, is the
//!    agent's), 2. start a new session (no controlling terminal: no TIOCSTI into the
//!    user's shell), 3. no_new_privs, 4. drop the capability bounding set and the ambient
//!    set (except kept capabilities), 5. setgroups/setgid/setuid, 6. set the remaining
//!    capability sets to the kept ones (usually none), 7. resource limits, 8. mark every
//!    inherited descriptor above 2 close-on-exec, 9. restrict itself with the Landlock
//!    ruleset (where the file rules are applied that way), 10. install the seccomp
//!    filter; then exec with the filtered environment.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    process::Stdio,
};

use crate::seccomp;

/// One step of the pre-exec sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    JoinCgroup = 1,
    NewSession,
    NoNewPrivs,
    DropBoundingSet,
    ClearAmbient,
    KeepCaps,
    SetGroups,
    SetGid,
    SetUid,
    SetCapabilities,
    RaiseAmbient,
    ResourceLimits,
    CloseDescriptors,
    Landlock,
    Seccomp,
    ChangeDir,
    Notifier,
}

impl Step {
    fn from_byte(b: u8) -> Option<Step> {
        use Step::*;
        [
            JoinCgroup,
            NewSession,
            NoNewPrivs,
            DropBoundingSet,
            ClearAmbient,
            KeepCaps,
            SetGroups,
            SetGid,
            SetUid,
            SetCapabilities,
            RaiseAmbient,
            ResourceLimits,
            CloseDescriptors,
            Landlock,
            Seccomp,
            ChangeDir,
            Notifier,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Step::JoinCgroup => "joining the agent's cgroup",
            Step::NewSession => "starting a new session",
            Step::NoNewPrivs => "setting no_new_privs",
            Step::DropBoundingSet => "dropping the capability bounding set",
            Step::ClearAmbient => "clearing ambient capabilities",
            Step::KeepCaps => "keeping capabilities across setuid",
            Step::SetGroups => "setting supplementary groups",
            Step::SetGid => "setting the group id",
            Step::SetUid => "setting the user id",
            Step::SetCapabilities => "setting capabilities",
            Step::RaiseAmbient => "raising ambient capabilities",
            Step::ResourceLimits => {
                "setting resource limits (a limit above the daemon's hard limit cannot be raised)"
            }
            Step::CloseDescriptors => "closing inherited file descriptors",
            Step::Landlock => "applying the file rules with Landlock",
            Step::Seccomp => "installing the seccomp filter",
            Step::ChangeDir => "entering the working directory (as the agent's user)",
            Step::Notifier => "installing the process notifier and handing it to the daemon",
        }
    }
}

/// The account an agent runs as.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (agentd gives none by default).
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

/// Everything the child needs, prepared before the fork.
pub struct Plan {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// `cgroup.procs` of the agent's cgroup, open for writing.
    pub cgroup_procs: File,
    pub identity: Identity,
    /// Capabilities kept (bit n = capability n).
    pub keep_caps: u64,
    /// (RLIMIT_* number, value; `u64::MAX` = unlimited).
    pub rlimits: Vec<(u32, u64)>,
    pub seccomp: seccomp::Filter,
    /// The filter whose listener the daemon answers (process creations under a `deny`
    /// budget where BPF LSM does not work); see [`seccomp::process_notifier`].
    pub notifier: Option<seccomp::Filter>,
    /// The Landlock ruleset to restrict the agent with, if the file rules use Landlock.
    pub landlock: Option<OwnedFd>,
    pub stdio: [OwnedFd; 3],
}

/// Why a launch failed.
#[derive(Debug)]
pub struct LaunchError {
    /// The step that failed, or `None` when exec itself failed.
    pub step: Option<Step>,
    pub error: io::Error,
    pub program: String,
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Some(step) => write!(
                f,
                "launching `{}` failed while {}: {}",
                self.program,
                step.describe(),
                self.error
            ),
            None => write!(f, "cannot run `{}`: {}", self.program, self.error),
        }
    }
}

impl std::error::Error for LaunchError {}

impl LaunchError {
    /// The exit status `agentd run` reports: 127 not found, 126 cannot execute, 125 for a
    /// failure of agentd's own steps.
    pub fn exit_code(&self) -> i32 {
        match (self.step, self.error.raw_os_error()) {
            (None, Some(libc::ENOENT)) => 127,
            (None, _) => 126,
            (Some(_), _) => 125,
        }
    }
}

/// RLIMIT_* number of a resource name used in profiles.
pub fn rlimit_resource(name: &str) -> Option<u32> {
    Some(match name {
        "cpu" => 0,
        "fsize" => 1,
        "data" => 2,
        "stack" => 3,
        "core" => 4,
        "rss" => 5,
        "nproc" => 6,
        "nofile" => 7,
        "memlock" => 8,
        "as" => 9,
        "locks" => 10,
        "sigpending" => 11,
        "msgqueue" => 12,
        "nice" => 13,
        "rtprio" => 14,
        "rttime" => 15,
        _ => return None,
    })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number the bounding-set drop walks to (the kernel answers EINVAL
/// above its own last capability).
const CAP_WALK_LAST: u32 = 63;

/// What the pre-exec sequence needs, prepared before the fork (nothing is allocated after).
struct ChildSetup {
    /// `cgroup.procs` of the agent's cgroup, open for writing.
    procs: RawFd,
    /// Write end of the pipe that tells the parent which step failed.
    report: RawFd,
    identity: Identity,
    keep_caps: u64,
    rlimits: Vec<(u32, u64)>,
    landlock: Option<RawFd>,
    filter: seccomp::Filter,
    /// The notifier filter and the child's end of the socket its listener is sent on.
    notifier: Option<(seccomp::Filter, RawFd)>,
    cwd: std::ffi::CString,
}

/// The pre-exec sequence. Runs in the forked child: system calls only.
fn child_steps(setup: &ChildSetup) -> io::Result<()> {
    let ChildSetup {
        procs,
        report,
        identity,
        keep_caps,
        rlimits,
        landlock,
        filter,
        notifier,
        cwd,
    } = setup;
    let (procs, report, keep_caps, landlock) = (*procs, *report, *keep_caps, *landlock);
    let fail = |step: Step| -> io::Error {
        let err = io::Error::last_os_error();
        let b = [step as u8];
        // SAFETY: write(2) of one byte from a stack buffer.
        unsafe { libc::write(report, b.as_ptr().cast(), 1) };
        err
    };
    // SAFETY (whole block): plain system calls with valid arguments; no allocation.
    unsafe {
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            return Err(fail(Step::JoinCgroup));
        }
        if libc::setsid() < 0 {
            return Err(fail(Step::NewSession));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(fail(Step::NoNewPrivs));
        }
        for cap in 0..=CAP_WALK_LAST {
            if keep_caps & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(fail(Step::DropBoundingSet));
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(fail(Step::ClearAmbient));
        }
        if keep_caps != 0 && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(fail(Step::KeepCaps));
        }
        if libc::setgroups(identity.groups.len(), identity.groups.as_ptr()) != 0 {
            return Err(fail(Step::SetGroups));
        }
        if libc::setresgid(identity.gid, identity.gid, identity.gid) != 0 {
            return Err(fail(Step::SetGid));
        }
        if libc::setresuid(identity.uid, identity.uid, identity.uid) != 0 {
            return Err(fail(Step::SetUid));
        }
        // As the agent's user, never as root: a directory it may not enter stays closed.
        if libc::chdir(cwd.as_ptr()) != 0 {
            return Err(fail(Step::ChangeDir));
        }
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [
            CapData {
                effective: keep_caps as u32,
                permitted: keep_caps as u32,
                inheritable: keep_caps as u32,
            },
            CapData {
                effective: (keep_caps >> 32) as u32,
                permitted: (keep_caps >> 32) as u32,
                inheritable: (keep_caps >> 32) as u32,
            },
        ];
        if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
            return Err(fail(Step::SetCapabilities));
        }
        for cap in 0..=CAP_WALK_LAST {
            if keep_caps & (1 << cap) != 0
                && libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                ) != 0
            {
                return Err(fail(Step::RaiseAmbient));
            }
        }
        for &(resource, value) in rlimits.iter() {
            let v = if value == u64::MAX {
                libc::RLIM_INFINITY
            } else {
                value
            };
            let lim = libc::rlimit {
                rlim_cur: v,
                rlim_max: v,
            };
            if libc::setrlimit(resource as _, &lim) != 0 {
                return Err(fail(Step::ResourceLimits));
            }
        }
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        if libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            return Err(fail(Step::CloseDescriptors));
        }
    }
    if let Some(fd) = landlock
        && crate::files::landlock::restrict_self(fd).is_err()
    {
        return Err(fail(Step::Landlock));
    }
    // The notifier first: the main filter may deny seccomp(2) itself.
    if let Some((notifier, sock)) = notifier {
        let Ok(listener) = notifier.install_listener() else {
            return Err(fail(Step::Notifier));
        };
        let sent = send_fd(*sock, listener);
        // SAFETY: closing the descriptor we just got; the daemon has its own copy.
        unsafe { libc::close(listener) };
        if sent.is_err() {
            return Err(fail(Step::Notifier));
        }
    }
    if filter.install().is_err() {
        return Err(fail(Step::Seccomp));
    }
    Ok(())
}

/// A control message with room for one descriptor.
#[repr(C)]
struct FdCmsg {
    hdr: libc::cmsghdr,
    fd: RawFd,
}

/// A one-byte message carrying `cmsg`: both buffers must outlive its use.
fn fd_msghdr(iov: &mut libc::iovec, cmsg: &mut FdCmsg) -> libc::msghdr {
    // SAFETY: a zeroed msghdr is valid; the pointers set below are the caller's.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (cmsg as *mut FdCmsg).cast();
    msg.msg_controllen = std::mem::size_of::<FdCmsg>() as _;
    msg
}

/// Sends descriptor `fd` over the Unix socket `sock` (SCM_RIGHTS). System calls only.
fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a zeroed cmsghdr is valid; filled in below.
    let mut cmsg = FdCmsg {
        hdr: unsafe { std::mem::zeroed() },
        fd,
    };
    // SAFETY: CMSG_LEN only computes.
    cmsg.hdr.cmsg_len = unsafe { libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) } as _;
    cmsg.hdr.cmsg_level = libc::SOL_SOCKET;
    cmsg.hdr.cmsg_type = libc::SCM_RIGHTS;
    let msg = fd_msghdr(&mut iov, &mut cmsg);
    // SAFETY: msg points at live stack buffers.
    if unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives the descriptor [`send_fd`] sent, without waiting.
fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a zeroed cmsghdr is valid; the kernel fills it in.
    let mut cmsg = FdCmsg {
        hdr: unsafe { std::mem::zeroed() },
        fd: -1,
    };
    let mut msg = fd_msghdr(&mut iov, &mut cmsg);
    // SAFETY: msg points at live stack buffers.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n != 1
        || msg.msg_flags & libc::MSG_CTRUNC != 0
        || cmsg.hdr.cmsg_level != libc::SOL_SOCKET
        || cmsg.hdr.cmsg_type != libc::SCM_RIGHTS
        || cmsg.fd < 0
    {
        return Err(io::Error::other(
            "no process notifier descriptor from the agent's launcher",
        ));
    }
    // SAFETY: the kernel installed this descriptor for us.
    Ok(unsafe { OwnedFd::from_raw_fd(cmsg.fd) })
}

/// A started agent: its first process, and the listener of its process notifier if the
/// plan had one.
pub struct Spawned {
    pub child: tokio::process::Child,
    pub listener: Option<OwnedFd>,
}

/// Forks, runs the pre-exec sequence in the child, and execs the agent's program.
pub fn spawn(plan: Plan) -> Result<Spawned, LaunchError> {
    let program = plan.argv.first().cloned().unwrap_or_default();
    let err = |step, error| LaunchError {
        step,
        error,
        program: program.clone(),
    };
    if program.is_empty() {
        return Err(err(None, io::Error::from_raw_os_error(libc::ENOENT)));
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(err(None, io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors from pipe2.
    let (report_read, report_write) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&plan.argv[1..]);
    cmd.env_clear();
    cmd.envs(plan.env.iter().map(|(k, v)| (k, v)));
    // The working directory is entered in child_steps, after the switch to the agent's user.
    let cwd = std::ffi::CString::new(plan.cwd.as_os_str().as_encoded_bytes())
        .map_err(|_| err(None, io::Error::from_raw_os_error(libc::EINVAL)))?;
    let [stdin, stdout, stderr] = plan.stdio;
    // The notifier's listener comes back on this socket pair.
    let pair = match &plan.notifier {
        None => None,
        Some(_) => {
            let mut sv = [0; 2];
            // SAFETY: socketpair fills two descriptors we own.
            if unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    0,
                    sv.as_mut_ptr(),
                )
            } != 0
            {
                return Err(err(None, io::Error::last_os_error()));
            }
            // SAFETY: fresh descriptors.
            Some(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
        }
    };
    cmd.stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    let setup = ChildSetup {
        procs: plan.cgroup_procs.as_raw_fd(),
        report: report_write.as_raw_fd(),
        identity: plan.identity.clone(),
        keep_caps: plan.keep_caps,
        rlimits: plan.rlimits.clone(),
        landlock: plan.landlock.as_ref().map(|fd| fd.as_raw_fd()),
        filter: plan.seccomp,
        notifier: plan
            .notifier
            .zip(pair.as_ref())
            .map(|(f, (_, theirs))| (f, theirs.as_raw_fd())),
        cwd,
    };
    // SAFETY: the closure only makes system calls (see child_steps).
    unsafe {
        cmd.pre_exec(move || child_steps(&setup));
    }
    let spawned = cmd.spawn();
    drop(report_write);
    drop(plan.cgroup_procs);
    drop(plan.landlock);
    match spawned {
        Ok(child) => {
            let listener = match &pair {
                None => None,
                Some((ours, _)) => match recv_fd(ours.as_raw_fd()) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        // Cannot happen once exec succeeded; never leave the agent running
                        // with calls nobody answers (they would fail, not pass).
                        let mut child = child;
                        let _ = child.start_kill();
                        return Err(err(Some(Step::Notifier), e));
                    }
                },
            };
            Ok(Spawned { child, listener })
        }
        Err(error) => {
            let mut b = [0u8; 1];
            let n = unsafe { libc::read(report_read.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            let step = if n == 1 { Step::from_byte(b[0]) } else { None };
            Err(err(step, error))
        }
    }
}

/// `cgroup.procs` of a cgroup, open for the launcher.
pub fn open_cgroup_procs(cgroup: &std::path::Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
}
