//! agentd-act: performs operations the way an agent would and reports the outcome as one
//! JSON line on stdout. Exit status 0 when the operation was attempted, 2 on bad usage.
//!
//! Operations:
//!   connect ADDR:PORT        TCP connect, then send "agentd-act"
//!   open PATH read|write     open(2) the file for reading or writing
//!   cgroup                   the process's cgroup v2 path
//!   ids                      uid, gid, groups, capability sets, no_new_privs, seccomp mode
//!   syscalls                 each dangerous system call, natively, with harmless arguments
//!   syscalls32               the same through `int 0x80` (the i386 entry point)
//!   syscalls-here NAME...    the named calls of `syscalls`, in this process (no fork: for
//!                            an agent that may not fork); syscalls32-here likewise
//!   tree                     fork, double fork and setsid; report each process's cgroup,
//!                            then wait (until killed) so they can be inspected
//!   udp-send ADDR:PORT       send one UDP datagram "agentd-act" (unconnected sendto)
//!   socket FAMILY TYPE PROTO create a socket (numbers, as for socket(2))
//!   connect-loop ADDR:PORT N MS
//!                            try to connect up to N times, MS apart; a line per try;
//!                            stop at the first success
//!   hold ADDR:PORT           connect, send "first", report; then for every line on
//!                            stdin send it and report (until end of input)
//!   dns NAME SERVER:PORT udp|tcp
//!                            one A query for NAME, to SERVER over UDP or TCP; report the
//!                            response code and addresses
//!   fork-loop SECS           for SECS seconds, fork children that exit at once; report
//!                            how many were created and how many forks failed (by errno)
//!   connect-for ADDR:PORT SECS
//!                            for SECS seconds, connect and close, 1 ms apart; report the
//!                            counts of successes and failures (by errno)
//!   upload ADDR:PORT BYTES SECS
//!                            connect and write up to BYTES (stop after SECS seconds);
//!                            report how many bytes the kernel took
//!   spawn-hold N SECS        start N children that wait (stop at the first failure), hold
//!                            them SECS seconds, then end them; report how many started
//!                            and the errno that stopped it
//!   fork-bomb N              N times: fork a child that calls setsid and forks a
//!                            grandchild (every other child then exits: a double fork);
//!                            all wait. Report how many were created, then keep forking
//!                            short-lived children until killed
//!   probe                    for every line on stdin, `connect ADDR:PORT` or `open PATH`
//!                            (read): try it and report (until end of input)
//!   env                      the environment
//!   fds                      open file descriptors
//!   bind ADDR:PORT tcp|udp   bind a socket there (and close it)
//!   ptrace PID               PTRACE_SEIZE the process (detached again at once if it worked)
//!   sleep SECS               sleep
//!   exit CODE                exit with CODE
//!   uring-setup              create an io_uring instance
//!   uring-connect ADDR:PORT  a TCP connect submitted through io_uring
//!   uring-open PATH          an openat of PATH (read) submitted through io_uring
//!   landlocked DENY OP...    restrict itself with Landlock (every file allowed but DENY,
//!                            as agentd's launcher does), then do OP
//!   openat2 PATH FLAGS       openat2(AT_FDCWD, PATH, O_RDONLY) with RESOLVE_* FLAGS (a
//!                            number)
//!   opath-reopen PATH        open PATH with O_PATH, then open /proc/self/fd/N for reading
//!   rename FROM TO           rename(2)
//!   setns PATH               open a namespace file (e.g. /proc/1/ns/net) and setns into it
//!   mount-bind SRC DST       mount(SRC, DST, MS_BIND)
//!   bpf-obj-get PATH         a descriptor of the BPF object pinned at PATH (BPF_OBJ_GET)
//!   x32 NR [ARG]             system call NR of the x32 table (NR | __X32_SYSCALL_BIT),
//!                            with ARG (a number) as its first argument

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::{Error, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::{Value, json};

fn report(op: &str, result: Result<Value, Error>) {
    let v = match result {
        Ok(detail) => json!({"op": op, "ok": true, "detail": detail}),
        Err(e) => {
            json!({"op": op, "ok": false, "errno": e.raw_os_error().unwrap_or(-1), "error": e.to_string()})
        }
    };
    println!("{v}");
    let _ = std::io::stdout().flush();
}

fn usage() -> ! {
    eprintln!(
        "usage: agentd-act connect ADDR:PORT | open PATH read|write | open-many PATH N | getpid-loop N | cgroup | ids | syscalls | syscalls32 | syscalls-here NAME... | syscalls32-here NAME... | tree | env | fds | sleep SECS | exit CODE"
    );
    std::process::exit(2);
}

fn cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        })
        .unwrap_or_default()
}

/// A dangerous call: name, x86-64 number, i386 number (0: none), arguments chosen so that
/// without a filter the call fails harmlessly with something other than EPERM (or, for
/// the namespace, time, fork, personality and terminal calls, succeeds without effect:
/// each is made in a child of its own, and the terminal is a pty of our own).
struct Call {
    name: &'static str,
    nr64: i64,
    nr32: u32,
    args: [u64; 6],
}

const NONE: u64 = 0;
const MINUS1: u64 = u64::MAX;

/// What the calls point at: a pty of our own (never the terminal we were started from)
/// and a zeroed page below 4 GiB, so that `int 0x80` can pass its address.
struct Scratch {
    tty: u64,
    page: u64,
}

impl Scratch {
    /// Failures leave -1 or 0, which the calls then report (EBADF, EFAULT).
    fn new() -> Scratch {
        // SAFETY: plain calls; ptsname_r writes into the buffer it is given.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            let mut name = [0 as libc::c_char; 64];
            let tty = if master >= 0
                && libc::grantpt(master) == 0
                && libc::unlockpt(master) == 0
                && libc::ptsname_r(master, name.as_mut_ptr(), name.len()) == 0
            {
                libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY)
            } else {
                -1
            };
            let page = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                -1,
                0,
            );
            Scratch {
                tty: tty as u64,
                page: if page == libc::MAP_FAILED {
                    0
                } else {
                    page as u64
                },
            }
        }
    }
}

fn calls(s: &Scratch) -> Vec<Call> {
    use libc::*;
    // The byte at page+0 (0) is TIOCSTI's character and TIOCLINUX's subcode; calls that
    // write get their own part of the page.
    let (byte, winsize, pair) = (s.page, s.page + 64, s.page + 128);
    let c = |name, nr64, nr32, args| Call {
        name,
        nr64,
        nr32,
        args,
    };
    vec![
        c("ptrace", SYS_ptrace, 26, [3, 0, 0, 0, 0, 0]),
        c(
            "process_vm_readv",
            SYS_process_vm_readv,
            347,
            [0, 0, 0, 0, 0, 1],
        ),
        c(
            "process_vm_writev",
            SYS_process_vm_writev,
            348,
            [0, 0, 0, 0, 0, 1],
        ),
        c("bpf", SYS_bpf, 357, [9999, 0, 0, 0, 0, 0]),
        c(
            "perf_event_open",
            SYS_perf_event_open,
            336,
            [0, 0, MINUS1, MINUS1, 0, 0],
        ),
        c("userfaultfd", SYS_userfaultfd, 374, [0xffff, 0, 0, 0, 0, 0]),
        c(
            "io_uring_setup",
            SYS_io_uring_setup,
            425,
            [0, 0, 0, 0, 0, 0],
        ),
        c(
            "io_uring_enter",
            SYS_io_uring_enter,
            426,
            [MINUS1, 0, 0, 0, 0, 0],
        ),
        c(
            "io_uring_register",
            SYS_io_uring_register,
            427,
            [MINUS1, 0, 0, 0, 0, 0],
        ),
        c("mount", SYS_mount, 21, [0, 0, 0, 0, 0, 0]),
        c("umount2", SYS_umount2, 52, [0, 0xffff_0000, 0, 0, 0, 0]),
        c("pivot_root", SYS_pivot_root, 217, [0, 0, 0, 0, 0, 0]),
        c("fsopen", SYS_fsopen, 430, [0, 0xff, 0, 0, 0, 0]),
        c("fsmount", SYS_fsmount, 432, [MINUS1, 0xff, 0, 0, 0, 0]),
        c(
            "move_mount",
            SYS_move_mount,
            429,
            [MINUS1, 0, MINUS1, 0, 0xffff, 0],
        ),
        c(
            "unshare(CLONE_NEWUSER)",
            SYS_unshare,
            310,
            [CLONE_NEWUSER as u64, 0, 0, 0, 0, 0],
        ),
        c(
            "unshare(CLONE_NEWNET)",
            SYS_unshare,
            310,
            [CLONE_NEWNET as u64, 0, 0, 0, 0, 0],
        ),
        c(
            "unshare(CLONE_NEWNS)",
            SYS_unshare,
            310,
            [CLONE_NEWNS as u64, 0, 0, 0, 0, 0],
        ),
        c("setns", SYS_setns, 346, [MINUS1, 0, 0, 0, 0, 0]),
        c("keyctl", SYS_keyctl, 288, [9999, 0, 0, 0, 0, 0]),
        c("add_key", SYS_add_key, 286, [0, 0, 0, 0, 0, 0]),
        c("request_key", SYS_request_key, 287, [0, 0, 0, 0, 0, 0]),
        c(
            "kexec_load",
            SYS_kexec_load,
            283,
            [0, 0, 0, 0xffff_0000, 0, 0],
        ),
        c(
            "kexec_file_load",
            SYS_kexec_file_load,
            0,
            [MINUS1, MINUS1, 0, 0, 0xffff, 0],
        ),
        c("init_module", SYS_init_module, 128, [0, 0, 0, 0, 0, 0]),
        c(
            "finit_module",
            SYS_finit_module,
            350,
            [MINUS1, 0, 0xffff, 0, 0, 0],
        ),
        c("delete_module", SYS_delete_module, 129, [0, 0, 0, 0, 0, 0]),
        c("iopl", SYS_iopl, 110, [4, 0, 0, 0, 0, 0]),
        c("ioperm", SYS_ioperm, 101, [0xffff_ffff, 1, 1, 0, 0, 0]),
        c(
            "open_by_handle_at",
            SYS_open_by_handle_at,
            342,
            [MINUS1, 0, 0, 0, 0, 0],
        ),
        c("swapon", SYS_swapon, 87, [0, 0, 0, 0, 0, 0]),
        c("swapoff", SYS_swapoff, 115, [0, 0, 0, 0, 0, 0]),
        c("reboot", SYS_reboot, 88, [0, 0, 0, 0, 0, 0]),
        c(
            "clock_settime",
            SYS_clock_settime,
            264,
            [9999, 0, 0, 0, 0, 0],
        ),
        c("settimeofday", SYS_settimeofday, 79, [0, 0, 0, 0, 0, 0]),
        c("adjtimex", SYS_adjtimex, 124, [0, 0, 0, 0, 0, 0]),
        c("acct", SYS_acct, 51, [1, 0, 0, 0, 0, 0]),
        c("quotactl", SYS_quotactl, 131, [0, 0, 0, 0, 0, 0]),
        c(
            "clone(CLONE_NEWUSER)",
            SYS_clone,
            120,
            [(CLONE_NEWUSER | SIGCHLD) as u64, 0, 0, 0, 0, 0],
        ),
        c(
            "clone(CLONE_NEWPID)",
            SYS_clone,
            120,
            [(CLONE_NEWPID | SIGCHLD) as u64, 0, 0, 0, 0, 0],
        ),
        c("clone3", SYS_clone3, 435, [0, 0, 0, 0, 0, 0]),
        c(
            "unshare(CLONE_FILES)",
            SYS_unshare,
            310,
            [CLONE_FILES as u64, 0, 0, 0, 0, 0],
        ),
        c("pidfd_getfd", SYS_pidfd_getfd, 438, [MINUS1, 0, 0, 0, 0, 0]),
        c("kcmp", SYS_kcmp, 349, [0, 0, 0, 0, 0, 0]),
        c(
            "process_madvise",
            SYS_process_madvise,
            440,
            [MINUS1, 0, 0, 0, 0, 0],
        ),
        c("move_pages", SYS_move_pages, 317, [0, 0, 0, 0, 0, 0xffff]),
        c(
            "migrate_pages",
            SYS_migrate_pages,
            294,
            [MINUS1, 0, 0, 0, 0, 0],
        ),
        c("quotactl_fd", SYS_quotactl_fd, 443, [MINUS1, 0, 0, 0, 0, 0]),
        c("syslog", SYS_syslog, 103, [9999, 0, 0, 0, 0, 0]),
        c(
            "lookup_dcookie",
            SYS_lookup_dcookie,
            253,
            [0, 0, 0, 0, 0, 0],
        ),
        c("modify_ldt", SYS_modify_ldt, 123, [0, 0, 0, 0, 0, 0]),
        c("uselib", SYS_uselib, 86, [0, 0, 0, 0, 0, 0]),
        c(
            "name_to_handle_at",
            SYS_name_to_handle_at,
            341,
            [MINUS1, 0, 0, 0, 0xffff_0000, 0],
        ),
        c(
            "socketpair(AF_INET)",
            SYS_socketpair,
            360,
            [AF_INET as u64, SOCK_STREAM as u64, 0, pair, 0, 0],
        ),
        c(
            "socketpair(AF_PACKET)",
            SYS_socketpair,
            360,
            [AF_PACKET as u64, SOCK_DGRAM as u64, 0, pair, 0, 0],
        ),
        c(
            "socketpair(AF_UNIX)",
            SYS_socketpair,
            360,
            [AF_UNIX as u64, SOCK_STREAM as u64, 0, pair, 0, 0],
        ),
        c(
            "personality(query)",
            SYS_personality,
            136,
            [0xffff_ffff, 0, 0, 0, 0, 0],
        ),
        c(
            "personality(ADDR_NO_RANDOMIZE)",
            SYS_personality,
            136,
            [ADDR_NO_RANDOMIZE as u64, 0, 0, 0, 0, 0],
        ),
        c(
            "ioctl(TIOCSTI)",
            SYS_ioctl,
            54,
            [s.tty, TIOCSTI, byte, 0, 0, 0],
        ),
        // The kernel reads the request's low 32 bits only.
        c(
            "ioctl(TIOCSTI with high bits)",
            SYS_ioctl,
            54,
            [s.tty, 0xffff_ffff_0000_0000 | TIOCSTI, byte, 0, 0, 0],
        ),
        c(
            "ioctl(TIOCLINUX)",
            SYS_ioctl,
            54,
            [s.tty, TIOCLINUX, byte, 0, 0, 0],
        ),
        c(
            "ioctl(TIOCGWINSZ)",
            SYS_ioctl,
            54,
            [s.tty, TIOCGWINSZ, winsize, 0, 0, 0],
        ),
        c("fork", SYS_fork, 2, [0; 6]),
        c("vfork", SYS_vfork, 190, [0; 6]),
        c("getpid", SYS_getpid, 20, [0; 6]),
    ]
    .into_iter()
    .map(|mut c| {
        let _ = NONE;
        if c.nr32 == 0 {
            c.nr32 = u32::MAX;
        }
        c
    })
    .collect()
}

/// After a clone or fork that succeeded, the child leaves at once.
fn leave_if_child(name: &str, ret: i64) {
    let forks = name.starts_with("clone(") || name == "fork" || name == "vfork";
    if forks && ret == 0 {
        // SAFETY: exit the forked child without running anything of the parent's.
        unsafe { libc::syscall(libc::SYS_exit_group, 0) };
    }
    if forks && ret > 0 {
        let mut status = 0;
        // SAFETY: reap the child we just created.
        unsafe { libc::waitpid(ret as i32, &mut status, libc::__WALL) };
    }
}

/// vfork whose child exits at once, before touching the stack it shares with its parent
/// (nobody reads its exit status); returns the raw result (-errno on error).
fn vfork(via_int80: bool) -> i64 {
    // SAFETY: the child only makes the exit_group call; the parent continues as usual.
    unsafe {
        if via_int80 {
            let mut eax: u64 = 190;
            core::arch::asm!(
                "int 0x80",
                "test eax, eax",
                "jnz 2f",
                "mov eax, 252",
                "int 0x80",
                "2:",
                inout("rax") eax,
            );
            eax as u32 as i32 as i64
        } else {
            let mut rax: u64 = libc::SYS_vfork as u64;
            core::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "mov eax, 231",
                "syscall",
                "2:",
                inout("rax") rax,
                out("rcx") _,
                out("r11") _,
            );
            rax as i64
        }
    }
}

fn native(c: &Call) -> i64 {
    if c.name == "vfork" {
        let ret = vfork(false);
        leave_if_child(c.name, ret);
        return ret;
    }
    let a = c.args;
    // SAFETY: every call gets arguments that make it fail or do nothing (see calls()).
    let r = unsafe { libc::syscall(c.nr64, a[0], a[1], a[2], a[3], a[4], a[5]) };
    let ret = if r < 0 {
        -(Error::last_os_error().raw_os_error().unwrap_or(0) as i64)
    } else {
        r
    };
    leave_if_child(c.name, ret);
    ret
}

/// A system call through the i386 entry point; returns the raw result (-errno on error).
fn int80(c: &Call) -> i64 {
    if c.name == "vfork" {
        let ret = vfork(true);
        leave_if_child(c.name, ret);
        return ret;
    }
    let a: Vec<u32> = c.args.iter().map(|x| *x as u32).collect();
    let mut eax = c.nr32 as u64;
    // SAFETY: as for native(); rbx and rbp are saved and restored around the trap.
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            "mov ebx, {a0:e}",
            "mov ebp, {a5:e}",
            "int 0x80",
            "pop rbp",
            "pop rbx",
            a0 = in(reg) a[0],
            a5 = in(reg) a[5],
            inout("rax") eax,
            in("rcx") a[1] as u64,
            in("rdx") a[2] as u64,
            in("rsi") a[3] as u64,
            in("rdi") a[4] as u64,
        );
    }
    let ret = eax as u32 as i32 as i64;
    leave_if_child(c.name, ret);
    ret
}

/// Runs `f` in a forked child, so that a call that succeeds (a new namespace) cannot
/// change what the next calls see; returns its result.
fn isolated(f: impl FnOnce() -> i64) -> i64 {
    let mut fds = [0; 2];
    // SAFETY: pipe, fork, write, _exit and waitpid in a single-threaded program.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return -(Error::last_os_error().raw_os_error().unwrap_or(0) as i64);
        }
        let pid = libc::fork();
        if pid == 0 {
            libc::close(fds[0]);
            let r = f();
            libc::write(fds[1], (&r as *const i64).cast(), 8);
            libc::_exit(0);
        }
        libc::close(fds[1]);
        let mut r: i64 = i64::MIN;
        libc::read(fds[0], (&mut r as *mut i64).cast(), 8);
        libc::close(fds[0]);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        r
    }
}

/// Every call, each in a child of its own; or, with `here`, only the calls it names, in
/// this process.
fn syscalls(via_int80: bool, here: Option<&[&str]>) -> Value {
    let scratch = Scratch::new();
    let mut out = BTreeMap::new();
    for c in calls(&scratch) {
        if via_int80 && c.nr32 == u32::MAX {
            continue;
        }
        let call = || if via_int80 { int80(&c) } else { native(&c) };
        let r = match here {
            None => isolated(call),
            Some(names) if names.contains(&c.name) => call(),
            Some(_) => continue,
        };
        out.insert(
            c.name.to_string(),
            if r < 0 {
                json!({"errno": -r})
            } else {
                json!({"ok": r})
            },
        );
    }
    json!(out)
}

fn tree() -> Result<Value, Error> {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two descriptors.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(Error::last_os_error());
    }
    let (rd, wr) = (fds[0], fds[1]);
    // Each child reports "pid cgroup", closes every descriptor but 0-2 (so the parent
    // sees end-of-file once all have reported) and waits for a signal.
    let child = move || -> ! {
        let line = format!("{} {}\n", std::process::id(), cgroup());
        // SAFETY: write, close_range and pause in a forked child of this single-threaded program.
        unsafe {
            libc::write(wr, line.as_ptr().cast(), line.len());
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            loop {
                libc::pause();
            }
        }
    };
    // SAFETY: fork in a single-threaded program.
    unsafe {
        // A plain child.
        if libc::fork() == 0 {
            child();
        }
        // A double fork: the grandchild is orphaned.
        if libc::fork() == 0 {
            if libc::fork() == 0 {
                child();
            }
            libc::_exit(0);
        }
        // A new session.
        if libc::fork() == 0 {
            libc::setsid();
            child();
        }
        libc::close(wr);
    }
    let mut text = String::new();
    // SAFETY: rd is our pipe's read end; File takes ownership.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(rd) };
    file.read_to_string(&mut text)?;
    let procs: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(p, c)| (p.to_string(), c.to_string()))
        })
        .collect();
    Ok(json!({"self": {"pid": std::process::id(), "cgroup": cgroup()}, "children": procs}))
}

/// One A query; the response code and the addresses in the answer.
fn dns_query(name: &str, server: SocketAddr, tcp: bool) -> Result<Value, Error> {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData, RecordType},
    };
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).map_err(Error::other)?,
        RecordType::A,
    ));
    let q = m.to_vec().map_err(Error::other)?;
    let reply = if tcp {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&(q.len() as u16).to_be_bytes())?;
        s.write_all(&q)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf)?;
        buf
    } else {
        let s = std::net::UdpSocket::bind(if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.send_to(&q, server)?;
        let mut buf = vec![0u8; 4096];
        let (n, from) = s.recv_from(&mut buf)?;
        if from != server {
            return Err(Error::other(format!(
                "answer from {from}, not from {server}"
            )));
        }
        buf.truncate(n);
        buf
    };
    let r = Message::from_vec(&reply).map_err(Error::other)?;
    let addrs: Vec<String> = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    Ok(json!({"rcode": format!("{:?}", r.metadata.response_code), "addresses": addrs}))
}

fn cstring(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_else(|_| usage())
}

/// One io_uring submission and its completion's result (a negative errno on failure).
fn uring_submit(entry: io_uring::squeue::Entry) -> Result<i32, Error> {
    let mut ring = io_uring::IoUring::new(8)?;
    // SAFETY: the entry's buffers outlive the wait below (the callers keep them alive).
    unsafe { ring.submission().push(&entry) }.map_err(Error::other)?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(Error::from_raw_os_error(-cqe.result()));
    }
    Ok(cqe.result())
}

fn uring_connect(addr: SocketAddr) -> Result<Value, Error> {
    use io_uring::{opcode, types};
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V4(v4) = addr else {
        return Err(Error::other("IPv4 only"));
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let entry = opcode::Connect::new(
        types::Fd(sock.as_raw_fd()),
        (&sa as *const libc::sockaddr_in).cast(),
        size_of::<libc::sockaddr_in>() as u32,
    )
    .build();
    uring_submit(entry).map(|_| json!(format!("connected to {addr} through io_uring")))
}

fn uring_open(path: &str) -> Result<Value, Error> {
    use io_uring::{opcode, types};
    let c = cstring(path);
    let entry = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c.as_ptr())
        .flags(libc::O_RDONLY)
        .build();
    uring_submit(entry).map(|fd| {
        // SAFETY: the descriptor io_uring opened for us.
        unsafe { libc::close(fd) };
        json!(format!("opened {path} through io_uring"))
    })
}

fn openat2(path: &str, resolve: u64) -> Result<Value, Error> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let c = cstring(path);
    let how = OpenHow {
        flags: libc::O_RDONLY as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: openat2 with a valid path and a struct open_how of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: the descriptor openat2 returned.
    unsafe { libc::close(fd as i32) };
    Ok(json!(format!("opened {path}")))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["connect", addr] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            let r = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
                s.write_all(b"agentd-act")?;
                Ok(json!(format!("connected to {addr}")))
            });
            report("connect", r);
        }
        ["open", path, mode] => {
            let mut o = OpenOptions::new();
            match *mode {
                "read" => o.read(true),
                "write" => o.write(true),
                _ => usage(),
            };
            report(
                "open",
                o.open(path)
                    .map(|_| json!(format!("opened {path} for {mode}"))),
            );
        }
        ["open-many", path, n] => {
            // Opens PATH for reading N times: the work whose in-kernel cost is measured.
            let n: u32 = n.parse().unwrap_or_else(|_| usage());
            let r = (0..n)
                .try_for_each(|_| std::fs::File::open(path).map(drop))
                .map(|()| json!(format!("opened {path} {n} times")));
            report("open-many", r);
        }
        ["fork-loop", secs] => {
            let secs: f64 = secs.parse().unwrap_or_else(|_| usage());
            let start = std::time::Instant::now();
            let (mut created, mut failed) = (0u64, BTreeMap::<i32, u64>::new());
            while start.elapsed().as_secs_f64() < secs {
                // SAFETY: the child only calls _exit.
                match unsafe { libc::fork() } {
                    0 => unsafe { libc::_exit(0) },
                    -1 => {
                        *failed
                            .entry(Error::last_os_error().raw_os_error().unwrap_or(-1))
                            .or_default() += 1;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    pid => {
                        created += 1;
                        // SAFETY: reaps our own child.
                        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                    }
                }
            }
            report(
                "fork-loop",
                Ok(
                    json!({"created": created, "failed": failed, "secs": start.elapsed().as_secs_f64()}),
                ),
            );
        }
        ["connect-for", addr, secs] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            let secs: f64 = secs.parse().unwrap_or_else(|_| usage());
            let start = std::time::Instant::now();
            let (mut ok, mut failed) = (0u64, BTreeMap::<i32, u64>::new());
            while start.elapsed().as_secs_f64() < secs {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(_) => ok += 1,
                    Err(e) => *failed.entry(e.raw_os_error().unwrap_or(-1)).or_default() += 1,
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            report("connect-for", Ok(json!({"ok": ok, "failed": failed})));
        }
        ["upload", addr, bytes, secs] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            let bytes: u64 = bytes.parse().unwrap_or_else(|_| usage());
            let secs: f64 = secs.parse().unwrap_or_else(|_| usage());
            let start = std::time::Instant::now();
            let r = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map(|mut s| {
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let chunk = vec![b'x'; 65536];
                let mut sent = 0u64;
                while sent < bytes && start.elapsed().as_secs_f64() < secs {
                    let n = chunk.len().min((bytes - sent) as usize);
                    match s.write(&chunk[..n]) {
                        Ok(w) => sent += w as u64,
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
                json!({"sent": sent})
            });
            report("upload", r);
        }
        ["probe"] => {
            report("probe", Ok(json!("ready")));
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["connect", addr] => {
                        let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
                        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(
                            |mut s| {
                                s.write_all(b"agentd-act")?;
                                Ok(json!(format!("connected to {addr}")))
                            },
                        );
                        report("connect", r);
                    }
                    ["open", path] => report(
                        "open",
                        std::fs::File::open(path).map(|_| json!(format!("opened {path}"))),
                    ),
                    _ => usage(),
                }
            }
        }
        ["fork-bomb", n] => {
            let n: u32 = n.parse().unwrap_or_else(|_| usage());
            let mut created = 0u32;
            for i in 0..n {
                // SAFETY: the children only make system calls.
                match unsafe { libc::fork() } {
                    0 => unsafe {
                        libc::setsid();
                        if libc::fork() == 0 || i % 2 == 1 {
                            loop {
                                libc::pause();
                            }
                        }
                        libc::_exit(0);
                    },
                    -1 => break,
                    _ => created += if i % 2 == 1 { 2 } else { 1 },
                }
            }
            report("fork-bomb", Ok(json!({"created": created})));
            loop {
                // SAFETY: the child exits at once; reaped below.
                match unsafe { libc::fork() } {
                    0 => unsafe { libc::_exit(0) },
                    -1 => std::thread::sleep(Duration::from_millis(1)),
                    _ => {
                        let mut status = 0;
                        // SAFETY: reaps any exited child (the double fork's middle ones too).
                        while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
                    }
                }
            }
        }
        ["spawn-hold", n, secs] => {
            let n: u32 = n.parse().unwrap_or_else(|_| usage());
            let secs: u64 = secs.parse().unwrap_or_else(|_| usage());
            let mut children = Vec::new();
            let mut errno = None;
            for _ in 0..n {
                // SAFETY: the child only waits for a signal.
                match unsafe { libc::fork() } {
                    0 => loop {
                        unsafe { libc::pause() };
                    },
                    -1 => {
                        errno = Error::last_os_error().raw_os_error();
                        break;
                    }
                    pid => children.push(pid),
                }
            }
            report(
                "spawn-hold",
                Ok(json!({"started": children.len(), "errno": errno})),
            );
            std::thread::sleep(Duration::from_secs(secs));
            for pid in children {
                // SAFETY: our own children.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
        }
        ["getpid-loop", n] => {
            // N getpid system calls (not the C library's: it may cache), a budget's target.
            let n: u64 = n.parse().unwrap_or_else(|_| usage());
            for _ in 0..n {
                // SAFETY: no arguments.
                unsafe { libc::syscall(libc::SYS_getpid) };
            }
            report("getpid-loop", Ok(json!(format!("{n} calls"))));
        }
        ["cgroup"] => report("cgroup", Ok(json!(cgroup()))),
        ["ids"] => {
            // SAFETY: plain getters.
            let (uid, euid, gid) = unsafe { (libc::getuid(), libc::geteuid(), libc::getgid()) };
            let sid = unsafe { libc::getsid(0) };
            report(
                "ids",
                Ok(json!({
                    "uid": uid, "euid": euid, "gid": gid,
                    "groups": status_field("Groups:"),
                    "cap_eff": status_field("CapEff:"), "cap_prm": status_field("CapPrm:"),
                    "cap_inh": status_field("CapInh:"), "cap_bnd": status_field("CapBnd:"),
                    "cap_amb": status_field("CapAmb:"),
                    "no_new_privs": status_field("NoNewPrivs:"), "seccomp": status_field("Seccomp:"),
                    "session_leader": sid == std::process::id() as i32,
                    "cgroup": cgroup(),
                })),
            );
        }
        ["syscalls"] => report("syscalls", Ok(syscalls(false, None))),
        ["syscalls32"] => report("syscalls32", Ok(syscalls(true, None))),
        ["syscalls-here", names @ ..] => report("syscalls-here", Ok(syscalls(false, Some(names)))),
        ["syscalls32-here", names @ ..] => {
            report("syscalls32-here", Ok(syscalls(true, Some(names))))
        }
        ["tree"] => {
            report("tree", tree());
            loop {
                // SAFETY: waits for a signal.
                unsafe { libc::pause() };
            }
        }
        ["udp-send", addr] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let r = std::net::UdpSocket::bind(bind)
                .and_then(|s| s.send_to(b"agentd-act", addr))
                .map(|n| json!(n));
            report("udp-send", r);
        }
        ["socket", family, kind, proto] => {
            let n = |s: &str| s.parse::<i32>().unwrap_or_else(|_| usage());
            // SAFETY: plain socket(2); the descriptor is closed at once.
            let fd = unsafe { libc::socket(n(family), n(kind), n(proto)) };
            let r = if fd < 0 {
                Err(Error::last_os_error())
            } else {
                unsafe { libc::close(fd) };
                Ok(json!("created"))
            };
            report("socket", r);
        }
        ["connect-loop", addr, tries, ms] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            let tries: u32 = tries.parse().unwrap_or_else(|_| usage());
            let ms: u64 = ms.parse().unwrap_or_else(|_| usage());
            for _ in 0..tries {
                let r =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                        s.write_all(b"agentd-act")?;
                        Ok(json!(format!("connected to {addr}")))
                    });
                let ok = r.is_ok();
                report("connect", r);
                if ok {
                    return;
                }
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        ["hold", addr] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => s,
                Err(e) => return report("hold", Err(e)),
            };
            report("hold", s.write_all(b"first\n").map(|_| json!("sent first")));
            let mut line = String::new();
            while std::io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                report(
                    "send",
                    s.write_all(line.as_bytes())
                        .map(|_| json!(format!("sent {}", line.trim()))),
                );
                line.clear();
            }
        }
        ["dns", name, server, proto] => {
            let server: SocketAddr = server.parse().unwrap_or_else(|_| usage());
            report("dns", dns_query(name, server, *proto == "tcp"));
        }
        ["env"] => report(
            "env",
            Ok(json!(
                std::env::vars().collect::<BTreeMap<String, String>>()
            )),
        ),
        ["fds"] => {
            let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .map(|d| {
                    d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            report("fds", Ok(json!(fds)));
        }
        ["bind", addr, proto] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            let r = match *proto {
                "tcp" => std::net::TcpListener::bind(addr)
                    .map(|l| json!(l.local_addr().map(|a| a.to_string()).unwrap_or_default())),
                "udp" => std::net::UdpSocket::bind(addr)
                    .map(|l| json!(l.local_addr().map(|a| a.to_string()).unwrap_or_default())),
                _ => usage(),
            };
            report("bind", r);
        }
        ["ptrace", pid] => {
            let pid: libc::pid_t = pid.parse().unwrap_or_else(|_| usage());
            // SAFETY: PTRACE_SEIZE takes no pointers; a success is undone at once.
            let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
            let result = if r == 0 {
                // SAFETY: detaches the tracee seized above.
                unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
                Ok(json!("seized"))
            } else {
                Err(Error::last_os_error())
            };
            report("ptrace", result);
        }
        ["uring-setup"] => report(
            "uring-setup",
            io_uring::IoUring::new(8).map(|_| json!("io_uring created")),
        ),
        ["uring-connect", addr] => {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
            report("uring-connect", uring_connect(addr));
        }
        ["uring-open", path] => report("uring-open", uring_open(path)),
        ["landlocked", deny, rest @ ..] => {
            let mut policy = agentd::policy::FilePolicy {
                default_allow: agentd_common::files::ACCESS_ALL,
                ..Default::default()
            };
            policy.add(
                std::path::Path::new(deny),
                0,
                agentd_common::files::ACCESS_ALL,
            );
            let abi = agentd::doctor::landlock_abi().unwrap_or_else(|e| {
                report(
                    "landlocked",
                    Err(Error::other(format!("no Landlock: {e:#}"))),
                );
                std::process::exit(1)
            });
            let fd = agentd::files::landlock::compile(&policy)
                .and_then(|plan| agentd::files::landlock::ruleset(&plan, abi as i32))
                .unwrap_or_else(|e| {
                    report("landlocked", Err(Error::other(format!("{e:#}"))));
                    std::process::exit(1)
                });
            use std::os::fd::AsRawFd as _;
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) has no memory arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            if let Err(e) = agentd::files::landlock::restrict_self(fd.as_raw_fd()) {
                report("landlocked", Err(e));
                std::process::exit(1);
            }
            match rest {
                ["uring-open", path] => report("uring-open", uring_open(path)),
                ["open", path] => report(
                    "open",
                    std::fs::File::open(path).map(|_| json!(format!("opened {path}"))),
                ),
                _ => usage(),
            }
        }
        ["openat2", path, flags] => {
            let flags: u64 = flags.parse().unwrap_or_else(|_| usage());
            report("openat2", openat2(path, flags));
        }
        ["opath-reopen", path] => {
            use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
            let r = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(path)
                .and_then(|f| {
                    let via = format!("/proc/self/fd/{}", f.as_raw_fd());
                    std::fs::File::open(&via).map(|_| json!(format!("reopened {path} via {via}")))
                });
            report("opath-reopen", r);
        }
        ["rename", from, to] => report(
            "rename",
            std::fs::rename(from, to).map(|()| json!(format!("renamed {from} to {to}"))),
        ),
        ["setns", path] => {
            use std::os::fd::AsRawFd as _;
            let r = std::fs::File::open(path).and_then(|f| {
                // SAFETY: setns on a descriptor we own.
                if unsafe { libc::setns(f.as_raw_fd(), 0) } == 0 {
                    Ok(json!(format!("entered {path}")))
                } else {
                    Err(Error::last_os_error())
                }
            });
            report("setns", r);
        }
        ["bpf-obj-get", path] => {
            // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
            #[repr(C)]
            struct ObjGet {
                pathname: u64,
                bpf_fd: u32,
                file_flags: u32,
            }
            const BPF_OBJ_GET: libc::c_long = 7;
            let c = cstring(path);
            let attr = ObjGet {
                pathname: c.as_ptr() as u64,
                bpf_fd: 0,
                file_flags: 0,
            };
            // SAFETY: bpf(BPF_OBJ_GET) with an attr of the size given and a valid path.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_OBJ_GET,
                    &attr as *const ObjGet,
                    size_of::<ObjGet>(),
                )
            };
            let r = if fd >= 0 {
                // SAFETY: the descriptor the call returned.
                unsafe { libc::close(fd as i32) };
                Ok(json!(format!("got a descriptor of {path}")))
            } else {
                Err(Error::last_os_error())
            };
            report("bpf-obj-get", r);
        }
        ["x32", nr, rest @ ..] => {
            const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;
            let nr: libc::c_long = nr.parse().unwrap_or_else(|_| usage());
            let arg: libc::c_long = rest
                .first()
                .map_or(0, |a| a.parse().unwrap_or_else(|_| usage()));
            // SAFETY: a raw system call with number arguments only.
            let r = unsafe { libc::syscall(X32_SYSCALL_BIT | nr, arg, 0, 0, 0) };
            report(
                "x32",
                if r >= 0 {
                    Ok(json!(r))
                } else {
                    Err(Error::last_os_error())
                },
            );
        }
        ["mount-bind", src, dst] => {
            let (src, dst) = (cstring(src), cstring(dst));
            // SAFETY: mount with valid C strings and no data.
            let r = unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            report(
                "mount-bind",
                if r == 0 {
                    Ok(json!("mounted"))
                } else {
                    Err(Error::last_os_error())
                },
            );
        }
        ["sleep", secs] => {
            let s: u64 = secs.parse().unwrap_or_else(|_| usage());
            report("sleep", Ok(json!(format!("sleeping {s} s"))));
            std::thread::sleep(Duration::from_secs(s));
        }
        ["exit", code] => std::process::exit(code.parse().unwrap_or_else(|_| usage())),
        _ => usage(),
    }
}
