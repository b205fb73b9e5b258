//! The launcher's seccomp filter, built with libseccomp.
//!
//! Denied system calls fail with EPERM (audit mode: they are allowed and logged). The
//! filter covers the x86-64, i386 (`int 0x80`) and x32 entry points, and any other
//! architecture is killed. The kernel logs every denial (SECCOMP_FILTER_FLAG_LOG; audit
//! record type 1326 when auditd runs, otherwise a rate-limited kernel log line).
//!
//! Special cases:
//! - `clone` and `unshare` are denied only with a namespace flag; `clone3` passes its flags
//!   in memory that seccomp cannot read, so it fails with ENOSYS, which makes the C
//!   library fall back to `clone`, where the flags are checked.
//! - `socket` is allowed only for AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK with
//!   NETLINK_ROUTE (what the C library's getaddrinfo uses). The cgroup `sock_create`
//!   program sees IP sockets only, so packet, vsock, other netlink and every other family
//!   are refused here. On i386, `socketcall` hides its arguments in memory and is refused;
//!   the C library uses the direct socket calls instead.
//!
//! The filter is compiled to BPF before the launcher forks, so the child only makes the
//! `seccomp(2)` call: no allocation between fork and exec.

use std::{
    ffi::CString,
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    os::fd::FromRawFd as _,
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
    // Time.
    "clock_settime",
    "settimeofday",
    "adjtimex",
    "clock_adjtime",
    "stime",
    // File handles bypass path-based checks.
    "open_by_handle_at",
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
        #[repr(C)]
        struct SockFprog {
            len: u16,
            filter: *const u8,
        }
        const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
        const SECCOMP_FILTER_FLAG_LOG: libc::c_ulong = 2;
        let prog = SockFprog {
            len: self.len() as u16,
            filter: self.program.as_ptr(),
        };
        // SAFETY: prog points at a valid sock_filter array that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                SECCOMP_FILTER_FLAG_LOG,
                &prog as *const SockFprog,
            )
        };
        if r == 0 {
            Ok(())
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
    names.sort_unstable();
    names.dedup();
    for name in names {
        if name == "clone" || name == "clone3" || name == "unshare" {
            // Denied outright by the profile: no flag conditions needed.
            let sys = ScmpSyscall::from_name(name)?;
            ctx.add_rule(deny, sys)
                .with_context(|| format!("seccomp rule for {name}"))?;
            continue;
        }
        // For a call missing from the x86-64 table (stime), libseccomp returns a
        // pseudo-number that it maps on the architectures that have the call.
        let sys = ScmpSyscall::from_name(name)
            .with_context(|| format!("`{name}` is not a system call"))?;
        ctx.add_rule(deny, sys)
            .with_context(|| format!("seccomp rule for {name}"))?;
    }
    if !extra.iter().any(|n| n == "clone" || n == "unshare") {
        for sys in ["clone", "unshare"] {
            for (flag_name, flag) in NAMESPACE_FLAGS {
                ctx.add_rule_conditional(
                    deny,
                    ScmpSyscall::from_name(sys)?,
                    &[ScmpArgCompare::new(
                        0,
                        ScmpCompareOp::MaskedEqual(*flag),
                        *flag,
                    )],
                )
                .with_context(|| format!("seccomp rule for {sys} with {flag_name}"))?;
            }
        }
    }
    if !extra.iter().any(|n| n == "socket") {
        let socket = ScmpSyscall::from_name("socket")?;
        // Every family number that is not allowed: the gaps between the allowed ones, and
        // everything above the highest.
        let allowed: Vec<u64> = ALLOWED_FAMILIES.iter().map(|(_, n)| *n).collect();
        let highest = *allowed.iter().max().expect("non-empty");
        for family in (0..highest).filter(|f| !allowed.contains(f)) {
            ctx.add_rule_conditional(
                deny,
                socket,
                &[ScmpArgCompare::new(0, ScmpCompareOp::Equal, family)],
            )
            .with_context(|| format!("seccomp rule for socket family {family}"))?;
        }
        ctx.add_rule_conditional(
            deny,
            socket,
            &[ScmpArgCompare::new(0, ScmpCompareOp::Greater, highest)],
        )
        .context("seccomp rule for socket families above AF_NETLINK")?;
        ctx.add_rule_conditional(
            deny,
            socket,
            &[
                ScmpArgCompare::new(0, ScmpCompareOp::Equal, 16),
                ScmpArgCompare::new(2, ScmpCompareOp::NotEqual, NETLINK_ROUTE),
            ],
        )
        .context("seccomp rule for netlink protocols")?;
        ctx.add_rule(deny, ScmpSyscall::from_name("socketcall")?)
            .context("seccomp rule for socketcall")?;
    }
    if !extra.iter().any(|n| n == "clone3") {
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
    if program.is_empty() || program.len() % 8 != 0 || program.len() / 8 > u16::MAX as usize {
        bail!(
            "libseccomp exported a malformed filter ({} bytes)",
            program.len()
        );
    }
    Ok(Filter { program })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
