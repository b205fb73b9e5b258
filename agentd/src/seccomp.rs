//! The launcher's seccomp filter, built with libseccomp.
//!
//! Denied system calls fail with EPERM (audit mode: they are allowed and logged). The
//! filter covers the x86-64, i386 (`int 0x80`) and x32 entry points, and any other
//! architecture is killed. The kernel logs every denial (SECCOMP_FILTER_FLAG_LOG; audit
//! record type 1326 when auditd runs, otherwise a rate-limited kernel log line).
//!
//! Special cases (a call the profile's `seccomp.deny` names is denied outright instead):
//! - `clone` and `unshare` are denied only with a namespace flag, each unless that very
//!   call is denied outright; `clone3` passes its flags in memory that seccomp cannot
//!   read, so it fails with ENOSYS, which makes the C library fall back to `clone`, where
//!   the flags are checked. A profile that denies `clone` also denies `fork`, `vfork` and
//!   `clone3` (with EPERM): otherwise they would still create processes.
//! - `socket` is allowed only for AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK with
//!   NETLINK_ROUTE (what the C library's getaddrinfo uses). The cgroup `sock_create`
//!   program sees IP sockets only, so packet, vsock, other netlink and every other family
//!   are refused here. On i386, `socketcall` hides its arguments in memory and is always
//!   refused; the C library uses the direct socket calls instead.
//! - `socketpair` is allowed only for AF_UNIX.
//! - `personality` is allowed only as the query `personality(0xffffffff)` (compared on all
//!   64 bits, so a sign-extended -1 is refused too): a change could, for example, switch
//!   off address space randomisation for the programs the agent starts.
//! - `ioctl` with TIOCSTI or TIOCLINUX is refused (typing into, or driving, a terminal).
//!   The request is compared on its low 32 bits, all the kernel reads of it.
//! - Calls missing from one architecture's table (`stime`, `socketcall`, `uselib`) are
//!   denied where they exist.
//!
//! A filter longer than the kernel's limit of 4096 instructions (BPF_MAXINSNS) is an error
//! at build time. It is compiled to BPF before the launcher forks, so the child only makes
//! the `seccomp(2)` call: no allocation between fork and exec.

use std::{
    ffi::CString,
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    os::fd::{FromRawFd as _, RawFd},
};

use anyhow::{Context as _, Result, bail};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

/// System calls every agent is denied, whatever its profile says.
pub const ALWAYS_DENIED: &[&str] = &[
    // Inspecting or changing other processes.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    "process_madvise",
    "move_pages",
    "migrate_pages",
    // The kernel's programmable surfaces.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // Mounts and namespaces.
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "setns",
    // Keys.
    "keyctl",
    "add_key",
    "request_key",
    // The kernel itself.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "lookup_dcookie",
    // Old interfaces: the i386 LDT, a.out libraries.
    "modify_ldt",
    "uselib",
    // i386 socket calls with their arguments in memory (see the module comment).
    "socketcall",
    // Time.
    "clock_settime",
    "settimeofday",
    "adjtimex",
    "clock_adjtime",
    "stime",
    // File handles bypass path-based checks.
    "open_by_handle_at",
    "name_to_handle_at",
];

/// Namespace flags that `clone` and `unshare` may not use.
pub const NAMESPACE_FLAGS: &[(&str, u64)] = &[
    ("CLONE_NEWNS", libc::CLONE_NEWNS as u64),
    ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP as u64),
    ("CLONE_NEWUTS", libc::CLONE_NEWUTS as u64),
    ("CLONE_NEWIPC", libc::CLONE_NEWIPC as u64),
    ("CLONE_NEWUSER", libc::CLONE_NEWUSER as u64),
    ("CLONE_NEWPID", libc::CLONE_NEWPID as u64),
    ("CLONE_NEWNET", libc::CLONE_NEWNET as u64),
    ("CLONE_NEWTIME", 0x80),
];

/// Socket families an agent may create (besides these, everything is refused).
pub const ALLOWED_FAMILIES: &[(&str, u64)] = &[
    ("AF_UNIX", 1),
    ("AF_INET", 2),
    ("AF_INET6", 10),
    ("AF_NETLINK", 16),
];
/// The only netlink protocol allowed: NETLINK_ROUTE.
const NETLINK_ROUTE: u64 = 0;

/// `ioctl` requests an agent may not make: typing into a terminal (the input of a shell
/// the agent shares its terminal with), and the virtual console's selection and control.
pub const DENIED_IOCTLS: &[(&str, u64)] = &[("TIOCSTI", 0x5412), ("TIOCLINUX", 0x541C)];

/// `personality(PERSONALITY_QUERY)` reports the persona without changing it.
const PERSONALITY_QUERY: u64 = 0xffff_ffff;

/// The kernel's limit on a filter's length (BPF_MAXINSNS).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// Checks that `name` is a system call libseccomp knows on x86-64 or i386.
pub fn check_syscall_name(name: &str) -> Result<(), String> {
    let known = [ScmpArch::X8664, ScmpArch::X86]
        .iter()
        .any(|arch| ScmpSyscall::from_name_by_arch(name, *arch).is_ok());
    if known {
        Ok(())
    } else {
        Err(format!("`{name}` is not a system call"))
    }
}

/// A compiled filter: a `struct sock_filter` array.
pub struct Filter {
    program: Vec<u8>,
}

impl Filter {
    /// Number of BPF instructions.
    pub fn len(&self) -> usize {
        self.program.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.program.is_empty()
    }

    /// Installs the filter on the calling thread (with TSYNC off: the launcher's child is
    /// single-threaded). Only makes the `seccomp(2)` system call, so it is safe between fork
    /// and exec. Requires no_new_privs (or CAP_SYS_ADMIN).
    pub fn install(&self) -> std::io::Result<()> {
        const SECCOMP_FILTER_FLAG_LOG: libc::c_ulong = 2;
        self.install_with(SECCOMP_FILTER_FLAG_LOG).map(|_| ())
    }

    /// Installs a filter of [`Action::Notify`] rules and returns the listener descriptor
    /// (close-on-exec) through which the kernel hands those calls to a supervisor.
    pub fn install_listener(&self) -> std::io::Result<RawFd> {
        self.install_with(libc::SECCOMP_FILTER_FLAG_NEW_LISTENER)
            .map(|fd| fd as RawFd)
    }

    fn install_with(&self, flags: libc::c_ulong) -> std::io::Result<libc::c_long> {
        #[repr(C)]
        struct SockFprog {
            len: u16,
            filter: *const u8,
        }
        const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
        let prog = SockFprog {
            len: self.len() as u16,
            filter: self.program.as_ptr(),
        };
        // SAFETY: prog points at a valid sock_filter array that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const SockFprog,
            )
        };
        if r >= 0 {
            Ok(r)
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Builds the filter: agentd's list plus `extra` (profile `seccomp.deny`). In `audit` mode
/// nothing is denied, every listed call is logged instead.
pub fn build(extra: &[String], audit: bool) -> Result<Filter> {
    let deny = if audit {
        ScmpAction::Log
    } else {
        ScmpAction::Errno(libc::EPERM)
    };
    let mut ctx =
        ScmpFilterContext::new(ScmpAction::Allow).context("creating the seccomp filter")?;
    ctx.add_arch(ScmpArch::X86)
        .context("adding i386 to the seccomp filter")?;
    ctx.add_arch(ScmpArch::X32)
        .context("adding x32 to the seccomp filter")?;
    ctx.set_act_badarch(ScmpAction::KillProcess)?;

    let mut names: Vec<&str> = ALWAYS_DENIED.to_vec();
    names.extend(extra.iter().map(String::as_str));
    if names.contains(&"clone") {
        // Without these, denying clone would not stop the agent creating processes.
        names.extend(["fork", "vfork", "clone3"]);
    }
    names.sort_unstable();
    names.dedup();
    for name in &names {
        // For a call missing from the x86-64 table (stime), libseccomp returns a
        // pseudo-number that it maps on the architectures that have the call.
        let sys = ScmpSyscall::from_name(name)
            .with_context(|| format!("`{name}` is not a system call"))?;
        ctx.add_rule(deny, sys)
            .with_context(|| format!("seccomp rule for {name}"))?;
    }
    // The calls below are denied only with some arguments, unless denied outright above.
    let outright = |name: &str| names.contains(&name);
    let mut deny_if = |name: &str, what: &str, conditions: &[ScmpArgCompare]| -> Result<()> {
        ctx.add_rule_conditional(deny, ScmpSyscall::from_name(name)?, conditions)
            .with_context(|| format!("seccomp rule for {name} with {what}"))?;
        Ok(())
    };
    for sys in ["clone", "unshare"].into_iter().filter(|s| !outright(s)) {
        for (flag_name, flag) in NAMESPACE_FLAGS {
            let masked = ScmpCompareOp::MaskedEqual(*flag);
            deny_if(sys, flag_name, &[ScmpArgCompare::new(0, masked, *flag)])?;
        }
    }
    if !outright("socket") {
        // Every family number that is not allowed: the gaps between the allowed ones, and
        // everything above the highest.
        let allowed: Vec<u64> = ALLOWED_FAMILIES.iter().map(|(_, n)| *n).collect();
        let highest = *allowed.iter().max().expect("non-empty");
        for family in (0..highest).filter(|f| !allowed.contains(f)) {
            let equal = ScmpArgCompare::new(0, ScmpCompareOp::Equal, family);
            deny_if("socket", &format!("family {family}"), &[equal])?;
        }
        let above = ScmpArgCompare::new(0, ScmpCompareOp::Greater, highest);
        deny_if("socket", "families above AF_NETLINK", &[above])?;
        let netlink = [
            ScmpArgCompare::new(0, ScmpCompareOp::Equal, 16),
            ScmpArgCompare::new(2, ScmpCompareOp::NotEqual, NETLINK_ROUTE),
        ];
        deny_if("socket", "netlink protocols", &netlink)?;
    }
    if !outright("socketpair") {
        let not_unix = ScmpArgCompare::new(0, ScmpCompareOp::NotEqual, 1);
        deny_if("socketpair", "families other than AF_UNIX", &[not_unix])?;
    }
    if !outright("personality") {
        let change = ScmpArgCompare::new(0, ScmpCompareOp::NotEqual, PERSONALITY_QUERY);
        deny_if("personality", "anything but the query", &[change])?;
    }
    if !outright("ioctl") {
        for (request_name, request) in DENIED_IOCTLS {
            let low32 = ScmpCompareOp::MaskedEqual(0xffff_ffff);
            deny_if(
                "ioctl",
                request_name,
                &[ScmpArgCompare::new(1, low32, *request)],
            )?;
        }
    }
    if !outright("clone3") {
        let enosys = if audit {
            ScmpAction::Log
        } else {
            ScmpAction::Errno(libc::ENOSYS)
        };
        ctx.add_rule(enosys, ScmpSyscall::from_name("clone3")?)
            .context("seccomp rule for clone3")?;
    }
    export(&ctx)
}

/// i386 numbers of `socket` and `socketpair` (arch/x86/entry/syscalls/syscall_32.tbl).
const I386_SOCKET: u32 = 359;
const I386_SOCKETPAIR: u32 = 360;

/// The calls `build(extra, _)` refuses (outright or with some arguments), as a set per
/// table (`agentd_common::process::ARCH_*`): what the `sys_exit` reporter looks up to tell a
/// refusal of the filter from another EPERM. (A call refused only with some arguments
/// that fails with EPERM for another reason is reported as refused by the filter too.)
pub fn refused_sets(extra: &[String]) -> Vec<(u32, agentd_common::process::SyscallSet)> {
    use agentd_common::process::{ARCH_I386, ARCH_X86_64, SyscallSet};
    let mut names: Vec<&str> = ALWAYS_DENIED.to_vec();
    names.extend(extra.iter().map(String::as_str));
    if names.contains(&"clone") {
        names.extend(["fork", "vfork", "clone3"]);
    }
    names.extend([
        "clone",
        "unshare",
        "socket",
        "socketpair",
        "personality",
        "ioctl",
    ]);
    [(ARCH_X86_64, ScmpArch::X8664), (ARCH_I386, ScmpArch::X86)]
        .into_iter()
        .map(|(arch, scmp)| {
            let mut set = SyscallSet::default();
            for name in &names {
                if let Ok(nr) = ScmpSyscall::from_name_by_arch(name, scmp).map(i32::from)
                    && nr >= 0
                {
                    set.insert(nr as u32);
                }
            }
            if arch == ARCH_I386 {
                // libseccomp names i386's direct socket calls (Linux 4.3) by pseudo-numbers
                // of the `socketcall` multiplexer; the filter refuses them by these.
                set.insert(I386_SOCKET);
                set.insert(I386_SOCKETPAIR);
            }
            (arch, set)
        })
        .collect()
}

/// `name (table)` of system call `nr` of table `arch` (`agentd_common::process::ARCH_*`).
pub fn describe(arch: u32, nr: u32) -> String {
    let (scmp, table) = match arch {
        agentd_common::process::ARCH_I386 => (ScmpArch::X86, "i386"),
        _ => (ScmpArch::X8664, "x86-64"),
    };
    let name = match (table, nr) {
        ("i386", I386_SOCKET) => "socket".to_string(),
        ("i386", I386_SOCKETPAIR) => "socketpair".to_string(),
        _ => ScmpSyscall::from(nr as i32)
            .get_name_by_arch(scmp)
            .unwrap_or_else(|_| format!("#{nr}")),
    };
    format!("{name} ({table})")
}

/// The filter that hands process creations to the daemon (a `processes` budget with
/// `deny` where BPF LSM does not work): fork, vfork, and clone without CLONE_THREAD. clone3
/// fails with ENOSYS in the main filter (an errno outranks a notification), so the C
/// library uses clone. Everything else is allowed here (the main filter decides).
pub fn process_notifier() -> Result<Filter> {
    let mut ctx =
        ScmpFilterContext::new(ScmpAction::Allow).context("creating the notifier filter")?;
    ctx.add_arch(ScmpArch::X86)?;
    ctx.add_arch(ScmpArch::X32)?;
    for name in ["fork", "vfork"] {
        ctx.add_rule(ScmpAction::Notify, ScmpSyscall::from_name(name)?)
            .with_context(|| format!("notifier rule for {name}"))?;
    }
    let no_thread =
        ScmpArgCompare::new(0, ScmpCompareOp::MaskedEqual(libc::CLONE_THREAD as u64), 0);
    ctx.add_rule_conditional(
        ScmpAction::Notify,
        ScmpSyscall::from_name("clone")?,
        &[no_thread],
    )
    .context("notifier rule for clone")?;
    export(&ctx)
}

fn export(ctx: &ScmpFilterContext) -> Result<Filter> {
    let name = CString::new("agentd-seccomp").expect("no NUL");
    // SAFETY: memfd_create with a valid name; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create for the seccomp filter");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let mut file = unsafe { File::from_raw_fd(fd) };
    ctx.export_bpf(&file)
        .context("exporting the seccomp filter")?;
    file.seek(SeekFrom::Start(0))?;
    let mut program = Vec::new();
    file.read_to_end(&mut program)?;
    if program.is_empty() || program.len() % 8 != 0 {
        bail!(
            "libseccomp exported a malformed filter ({} bytes)",
            program.len()
        );
    }
    let len = program.len() / 8;
    if len > MAX_INSTRUCTIONS {
        bail!(
            "the seccomp filter has {len} instructions, more than the kernel's limit of \
             {MAX_INSTRUCTIONS}: deny fewer system calls in seccomp.deny"
        );
    }
    Ok(Filter { program })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_calls_are_known_by_number_in_both_tables() {
        use agentd_common::process::{ARCH_I386, ARCH_X86_64};
        let sets = refused_sets(&["mincore".to_string()]);
        let set = |arch| sets.iter().find(|(a, _)| *a == arch).unwrap().1;
        // ptrace: 101 on x86-64, 26 on i386; mincore: 27 and 218; getpid is not refused.
        assert!(set(ARCH_X86_64).contains(101) && set(ARCH_I386).contains(26));
        assert!(set(ARCH_X86_64).contains(27) && set(ARCH_I386).contains(218));
        assert!(!set(ARCH_X86_64).contains(39) && !set(ARCH_I386).contains(20));
        assert!(set(ARCH_I386).contains(I386_SOCKETPAIR));
        assert_eq!(describe(ARCH_I386, 26), "ptrace (i386)");
        assert_eq!(describe(ARCH_X86_64, 101), "ptrace (x86-64)");
        assert_eq!(describe(ARCH_I386, I386_SOCKETPAIR), "socketpair (i386)");
    }

    #[test]
    fn every_listed_call_is_known() {
        for name in ALWAYS_DENIED {
            assert!(check_syscall_name(name).is_ok(), "{name}");
        }
        assert!(check_syscall_name("not_a_syscall").is_err());
    }

    #[test]
    fn builds_for_enforce_and_audit() {
        let f = build(&["personality".to_string()], false).unwrap();
        assert!(
            f.len() > 50,
            "a multi-arch filter with dozens of rules: {} instructions",
            f.len()
        );
        assert!(build(&[], true).unwrap().len() > 50);
        assert!(build(&["nope".to_string()], false).is_err());
    }

    /// The errno of `call` made in a forked child, under `filter` if there is one (0: the
    /// call succeeded).
    fn errno_in_child(filter: Option<&Filter>, call: impl Fn() -> libc::c_long) -> i32 {
        // SAFETY: the child (of a multi-threaded test process) makes system calls only.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(200);
                }
                if filter.is_some_and(|f| f.install().is_err()) {
                    libc::_exit(201);
                }
                let e = if call() < 0 {
                    *libc::__errno_location()
                } else {
                    0
                };
                libc::_exit(e);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status), "wait status {status:#x}");
            libc::WEXITSTATUS(status)
        }
    }

    #[test]
    fn denying_clone_or_unshare_keeps_the_namespace_rules_of_the_other() {
        // Invalid flag combinations: without a filter both calls fail with EINVAL before
        // any permission check, whoever runs the test; EPERM can only come from the filter.
        // SAFETY (both): system calls with integer arguments only.
        let unshare =
            || unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER | libc::CLONE_VFORK) };
        let clone = || unsafe {
            let flags = libc::CLONE_NEWUSER | libc::CLONE_FS | libc::SIGCHLD;
            libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0)
        };
        assert_eq!(errno_in_child(None, unshare), libc::EINVAL);
        assert_eq!(errno_in_child(None, clone), libc::EINVAL);
        for extra in [&[][..], &["clone"], &["unshare"], &["clone", "unshare"]] {
            let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            let filter = build(&extra, false).unwrap();
            for (name, call) in [("unshare", &unshare as &dyn Fn() -> _), ("clone", &clone)] {
                assert_eq!(
                    errno_in_child(Some(&filter), call),
                    libc::EPERM,
                    "{name}(CLONE_NEWUSER) with seccomp.deny = {extra:?}"
                );
            }
        }
    }

    #[test]
    fn a_long_deny_list_stays_under_the_kernel_limit() {
        // Every system call in the x86-64 table.
        let all: Vec<String> = (0..1024)
            .filter_map(|n| ScmpSyscall::from(n).get_name_by_arch(ScmpArch::X8664).ok())
            .collect();
        assert!(all.len() > 300, "{} names", all.len());
        let default = build(&[], false).unwrap().len();
        let long = build(&all, false).unwrap().len();
        println!(
            "seccomp filter: {default} instructions by default, {long} with all {} x86-64 \
             system calls in seccomp.deny (limit {MAX_INSTRUCTIONS})",
            all.len()
        );
        assert!(default <= MAX_INSTRUCTIONS && long <= MAX_INSTRUCTIONS);
    }

    #[test]
    fn a_filter_over_the_kernel_limit_is_refused() {
        let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).unwrap();
        let ioctl = ScmpSyscall::from_name("ioctl").unwrap();
        for request in 0..(MAX_INSTRUCTIONS as u64) {
            let equal = ScmpArgCompare::new(1, ScmpCompareOp::Equal, request);
            ctx.add_rule_conditional(ScmpAction::Errno(libc::EPERM), ioctl, &[equal])
                .unwrap();
        }
        let e = format!("{:#}", export(&ctx).err().expect("too long"));
        assert!(e.contains("more than the kernel's limit of 4096"), "{e}");
    }
}
