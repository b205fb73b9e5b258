//! File access rules. Userspace twin: agentd/src/files/.
//!
//! On kernels where BPF LSM works, the LSM hooks below decide every file access of an
//! agent. Rules are keyed by inode (see `agentd_common::files`): from the accessed file
//! the program walks up through its parent directories to the root of the whole mount
//! tree, crossing mount points as the kernel's own path walk does, and applies at each
//! level the rule stored for that inode, if any. The first rule that mentions an access
//! bit decides that bit, so the most specific rule wins; at the same level a bit in both
//! `deny` and `allow` is denied. Bits no rule mentions take the agent's default.
//!
//! Where BPF LSM is refused, the launcher applies the rules with Landlock instead and
//! `sys_exit` reports an agent's file system calls that failed with EACCES or EPERM, so
//! denials are events there too.
//!
//! Kernel structs are read with `bpf_probe_read_kernel` at offsets the loader takes from
//! the running kernel's BTF ([`KernelOffsets`]), so one object serves every kernel.

use core::ffi::c_void;

use agentd_common::{
    agent::{AGENT_FLAG_AUDIT, AGENT_FLAG_KILLED, AgentEntry},
    events::{
        EVENT_FILE, FileEvent, HOOK_BPRM_CHECK, HOOK_FILE_OPEN, HOOK_PATH_CHMOD, HOOK_PATH_CHOWN,
        HOOK_PATH_LINK, HOOK_PATH_MKDIR, HOOK_PATH_MKNOD, HOOK_PATH_RENAME, HOOK_PATH_RMDIR,
        HOOK_PATH_SYMLINK, HOOK_PATH_TRUNCATE, HOOK_PATH_UNLINK, HOOK_SYSCALL_EXIT, PATH_AS_GIVEN,
        PATH_COMPONENTS, VERDICT_AUDIT, VERDICT_DENY,
    },
    files::{
        ACCESS_ALL, ACCESS_EXEC, ACCESS_READ, ACCESS_WRITE, EVENT_COMPONENT_LEN, EVENT_PATH_BYTES,
        EVENT_PATH_COMPONENTS, FMODE_EXEC, FMODE_READ, FMODE_WRITE, FileRule, FileRuleKey,
        KernelOffsets, MAX_FILE_RULES, MAX_PATH_DEPTH,
    },
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::{bpf_loop, bpf_probe_read_kernel_str, bpf_probe_read_user_str},
    macros::{lsm, map, raw_tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::{LsmContext, RawTracePointContext},
};

use crate::{
    agent, events,
    kernel::{offsets, read},
};

const EACCES: i32 = 13;
const EPERM: i32 = 1;
/// `rename` flag: the two entries swap places.
const RENAME_EXCHANGE: u32 = 2;

/// Map `FILE_RULES`.
/// - key: [`FileRuleKey`] (policy id, inode number, kernel device number)
/// - value: [`FileRule`] (access bits allowed and denied at that inode)
/// - size: [`MAX_FILE_RULES`] rules over all agents
/// - owner: the daemon writes on policy load and change; programs only read.
#[map]
static FILE_RULES: HashMap<FileRuleKey, FileRule> =
    HashMap::with_max_entries(MAX_FILE_RULES, BPF_F_NO_PREALLOC);

/// A position in the file tree: a dentry on a mount (`struct vfsmount *`).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Place {
    dentry: *const u8,
    mnt: *const u8,
}

/// The place a `struct path *` names.
#[inline(always)]
fn place_of_path(off: &KernelOffsets, path: *const u8) -> Option<Place> {
    Some(Place {
        dentry: read(path, off.path_dentry)?,
        mnt: read(path, off.path_mnt)?,
    })
}

/// The place of an open `struct file *`.
#[inline(always)]
fn place_of_file(off: &KernelOffsets, file: *const u8) -> Option<Place> {
    if file.is_null() {
        return None;
    }
    // SAFETY: f_path is embedded in the file.
    place_of_path(off, unsafe { file.add(off.file_f_path as usize) })
}

/// (kernel device number, inode number) of a dentry's inode.
#[inline(always)]
fn inode_of(off: &KernelOffsets, dentry: *const u8) -> Option<(u32, u64)> {
    let inode: *const u8 = read(dentry, off.dentry_d_inode)?;
    let sb: *const u8 = read(dentry, off.dentry_d_sb)?;
    Some((
        read(sb, off.super_block_s_dev)?,
        read(inode, off.inode_i_ino)?,
    ))
}

/// Where one step up from a place leads.
enum Up {
    /// To the parent directory (`false`), or, at the root of a mount, to the directory it
    /// is mounted on in the parent mount (`true`).
    To(Place, bool),
    /// Nowhere: this is the root of the mount tree.
    Root,
    /// A kernel read failed.
    Fault,
}

#[inline(always)]
fn step_up(off: &KernelOffsets, p: Place) -> Up {
    let Some(mnt_root) = read::<*const u8>(p.mnt, off.vfsmount_mnt_root) else {
        return Up::Fault;
    };
    if p.dentry == mnt_root {
        // SAFETY: the vfsmount is embedded in its struct mount at mount_mnt.
        let mount = unsafe { p.mnt.sub(off.mount_mnt as usize) };
        let Some(parent) = read::<*const u8>(mount, off.mount_mnt_parent) else {
            return Up::Fault;
        };
        if parent == mount {
            return Up::Root;
        }
        let Some(mountpoint) = read::<*const u8>(mount, off.mount_mnt_mountpoint) else {
            return Up::Fault;
        };
        // SAFETY: as above.
        return Up::To(
            Place {
                dentry: mountpoint,
                mnt: unsafe { parent.add(off.mount_mnt as usize) },
            },
            true,
        );
    }
    let Some(parent) = read::<*const u8>(p.dentry, off.dentry_d_parent) else {
        return Up::Fault;
    };
    if parent == p.dentry {
        // A dentry that is its own parent but not its mount's root (a detached tree).
        return Up::Root;
    }
    Up::To(
        Place {
            dentry: parent,
            mnt: p.mnt,
        },
        false,
    )
}

/// A walk from a place up to the root of the mount tree, one step per `bpf_loop`
/// iteration. It lives on the caller's stack; the callbacks see it through their context
/// pointer. No padding, so the verifier sees every byte written before the loop starts.
///
/// The caller never branches on what the walk found, only computes with it: a branch on
/// a result would make the verifier check everything after the loop once per distinct
/// result, and hooks such as `path_rename` run several walks in a row.
#[repr(C)]
struct Walk {
    /// Where the walk is now.
    dentry: *const u8,
    mnt: *const u8,
    /// Rule key prefix (`AgentEntry::policy_id`).
    policy: u64,
    /// Inode of the starting place, for events.
    ino0: u64,
    dev0: u32,
    /// Access bits no rule has decided yet, and those decided "allowed".
    undecided: u32,
    allowed: u32,
    /// What the agent's defaults allow; applied to the undecided bits at the root.
    default_allow: u32,
    /// 0 right after a mount crossing: the directory a mount hides is not judged, and has
    /// no name of its own in a path.
    judge: u32,
    /// Path slots written (event walks).
    depth: u32,
    /// 1 once the walk reached the root of the mount tree (event walks).
    complete: u32,
    _pad: u32,
}

impl Walk {
    #[inline(always)]
    fn new(place: Place, policy: u64, default_allow: u32) -> Walk {
        Walk {
            dentry: place.dentry,
            mnt: place.mnt,
            policy,
            ino0: 0,
            dev0: 0,
            undecided: ACCESS_ALL,
            allowed: 0,
            default_allow,
            judge: 1,
            depth: 0,
            complete: 0,
            _pad: 0,
        }
    }

    /// One step up.
    #[inline(always)]
    fn step(&mut self, off: &KernelOffsets) -> Up {
        let up = step_up(
            off,
            Place {
                dentry: self.dentry,
                mnt: self.mnt,
            },
        );
        if let Up::To(next, crossed) = up {
            self.dentry = next.dentry;
            self.mnt = next.mnt;
            self.judge = if crossed { 0 } else { 1 };
        }
        up
    }
}

const _: () = assert!(EVENT_PATH_COMPONENTS.is_power_of_two());

/// `bpf_loop` callback results.
const CONTINUE: i64 = 0;
const BREAK: i64 = 1;

/// One level of [`allowed_at`]: the rule at this place, if any, then one step up.
#[inline(never)]
extern "C" fn rule_step(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the Walk that allowed_at gave it.
    let w = unsafe { &mut *ctx.cast::<Walk>() };
    let off = offsets();
    if w.judge != 0 {
        // An unreadable level decides nothing more: fail closed.
        let Some((dev, ino)) = inode_of(off, w.dentry) else {
            return BREAK;
        };
        if i == 0 {
            w.dev0 = dev;
            w.ino0 = ino;
        }
        let key = FileRuleKey {
            policy: w.policy,
            ino,
            dev,
            _pad: 0,
        };
        // SAFETY: the value is copied at once.
        if let Some(rule) = unsafe { FILE_RULES.get(key) } {
            let rule = *rule;
            let mentioned = (rule.allow | rule.deny) & w.undecided;
            w.allowed |= rule.allow & !rule.deny & mentioned;
            w.undecided &= !mentioned;
            if w.undecided == 0 {
                return BREAK;
            }
        }
    }
    match w.step(off) {
        Up::To(..) => CONTINUE,
        Up::Root => {
            // Only a walk that saw every level may fall back on the defaults.
            w.allowed |= w.undecided & w.default_allow;
            BREAK
        }
        Up::Fault => BREAK,
    }
}

/// The access bits an agent has at `place`, and the place's (device, inode) for events.
///
/// The first rule up the tree that mentions an access bit decides it; bits no rule
/// mentions take the agent's default. The walk runs in `bpf_loop`, so the verifier checks
/// one step however deep the walk goes. A walk that does not reach the root within
/// [`MAX_PATH_DEPTH`] steps, or meets a read fault, fails closed: a rule further up might
/// have refused what the default allows.
#[inline(always)]
fn allowed_at(entry: &AgentEntry, place: Place) -> (u32, u32, u64) {
    // A killed agent is allowed nothing: no defaults, and the walk ends at once.
    let killed = entry.flags & AGENT_FLAG_KILLED != 0;
    let mut w = Walk::new(
        place,
        entry.policy_id,
        if killed { 0 } else { entry.file_default_allow },
    );
    let steps = if killed { 0 } else { MAX_PATH_DEPTH };
    // SAFETY: the callback is a BPF subprogram taking (index, &mut Walk).
    unsafe {
        bpf_loop(
            steps,
            rule_step as *const () as *mut c_void,
            (&raw mut w).cast::<c_void>(),
            0,
        );
    }
    (w.allowed, w.dev0, w.ino0)
}

/// Map `FILE_EVENT_SCRATCH`.
/// - key: index 0 only; value: the [`FileEvent`] being built on this CPU
/// - size: 1 entry per CPU
/// - owner: programs only (a record is too big for the BPF stack).
#[map]
static FILE_EVENT_SCRATCH: PerCpuArray<FileEvent> = PerCpuArray::with_max_entries(1, 0);

/// Sends a file event for `place`; `access` are the refused bits.
#[inline(always)]
fn report(
    hook: u32,
    agent: u64,
    verdict: u32,
    place: Option<Place>,
    access: u32,
    dev: u32,
    ino: u64,
) {
    let Some(ev) = FILE_EVENT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch record; every field is written before it is sent.
    unsafe {
        (*ev).header = events::header(EVENT_FILE, hook, agent, verdict);
        (*ev).access = access;
        (*ev).dev = dev;
        (*ev).ino = ino;
        (*ev).path_kind = PATH_COMPONENTS;
        (*ev).syscall = 0;
        (*ev).errno = 0;
        (*ev)._pad = 0;
        (*ev).path = [0; EVENT_PATH_BYTES];
        (*ev).depth = 0;
        (*ev).complete = 0;
        if let Some(p) = place {
            let mut w = Walk::new(p, 0, 0);
            // One more step than slots: the last one only tells whether the path is complete.
            bpf_loop(
                EVENT_PATH_COMPONENTS as u32 + 1,
                name_step as *const () as *mut c_void,
                (&raw mut w).cast::<c_void>(),
                0,
            );
            (*ev).depth = w.depth;
            (*ev).complete = w.complete;
        }
        events::emit(&*ev);
    }
    if verdict == VERDICT_DENY {
        crate::budgets::denied(agent, hook);
    }
}

/// One slot of a file event's path: the name of this place (unless it is a mount's root,
/// which takes the name of the directory it is mounted on: the slot stays empty), then one
/// step up. Names are written into this CPU's scratch record.
#[inline(never)]
extern "C" fn name_step(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the Walk that report gave it.
    let w = unsafe { &mut *ctx.cast::<Walk>() };
    let off = offsets();
    let here = w.dentry;
    match w.step(off) {
        Up::To(..) => {}
        Up::Root => {
            w.complete = 1;
            return BREAK;
        }
        Up::Fault => return BREAK,
    }
    if i as usize >= EVENT_PATH_COMPONENTS {
        return BREAK;
    }
    w.depth = i + 1;
    if w.judge == 0 {
        return CONTINUE;
    }
    let Some(ev) = FILE_EVENT_SCRATCH.get_ptr_mut(0) else {
        return BREAK;
    };
    // SAFETY: d_name is embedded in the dentry.
    let qstr = unsafe { here.add(off.dentry_d_name as usize) };
    if let Some(name) = read::<*const u8>(qstr, off.qstr_name) {
        // The bound is checked again on a value the compiler cannot reason about, right
        // where the verifier needs it (otherwise the compiler drops it as already known).
        // SAFETY: reads a local.
        let slot = unsafe { core::ptr::read_volatile(&i) } as usize;
        if slot >= EVENT_PATH_COMPONENTS {
            return BREAK;
        }
        // SAFETY: the slot lies inside the record's path array; the helper bounds the copy.
        unsafe {
            bpf_probe_read_kernel_str(
                (*ev)
                    .path
                    .as_mut_ptr()
                    .add(slot * EVENT_COMPONENT_LEN)
                    .cast::<c_void>(),
                EVENT_COMPONENT_LEN as u32,
                name.cast::<c_void>(),
            )
        };
    }
    CONTINUE
}

/// The common tail of every hook: `access` at `place` for the current task.
#[inline(always)]
fn enforce(hook: u32, place: Option<Place>, access: u32, errno: i32) -> i32 {
    enforce_reporting(hook, place, place, access, errno)
}

/// [`enforce`], with a denial's event naming `shown` instead (a new entry is judged by
/// the rules of its directory, but the event names the entry).
#[inline(always)]
fn enforce_reporting(
    hook: u32,
    place: Option<Place>,
    shown: Option<Place>,
    access: u32,
    errno: i32,
) -> i32 {
    let (id, entry) = match agent::current() {
        agent::Subject::Outside => return 0,
        agent::Subject::Unregistered { id } => {
            report(hook, id, VERDICT_DENY, shown, access, 0, 0);
            return -errno;
        }
        agent::Subject::Agent { id, entry } => (id, entry),
    };
    let Some(place) = place else {
        report(hook, id, VERDICT_DENY, None, access, 0, 0);
        return -errno;
    };
    let (allowed, dev, ino) = allowed_at(&entry, place);
    let denied = access & !allowed;
    finish(
        hook,
        id,
        &entry,
        shown.unwrap_or(place),
        denied,
        dev,
        ino,
        errno,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn finish(
    hook: u32,
    id: u64,
    entry: &AgentEntry,
    place: Place,
    denied: u32,
    dev: u32,
    ino: u64,
    errno: i32,
) -> i32 {
    if denied == 0 {
        return 0;
    }
    // One report call site per hook: each one costs the verifier a walk of the path.
    let audit = entry.flags & AGENT_FLAG_AUDIT != 0 && entry.flags & AGENT_FLAG_KILLED == 0;
    report(
        hook,
        id,
        if audit { VERDICT_AUDIT } else { VERDICT_DENY },
        Some(place),
        denied,
        dev,
        ino,
    );
    if audit { 0 } else { -errno }
}

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // file_open(struct file *file)
    let file: *const u8 = ctx.arg(0);
    let off = offsets();
    let f_mode: u32 = read(file, off.file_f_mode).unwrap_or(0);
    let mut access = 0;
    if f_mode & FMODE_READ != 0 {
        access |= ACCESS_READ;
    }
    if f_mode & FMODE_WRITE != 0 {
        access |= ACCESS_WRITE;
    }
    if f_mode & FMODE_EXEC != 0 {
        access |= ACCESS_EXEC;
    }
    enforce(HOOK_FILE_OPEN, place_of_file(off, file), access, EACCES)
}

#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    // bprm_check_security(struct linux_binprm *bprm)
    let bprm: *const u8 = ctx.arg(0);
    let off = offsets();
    let file: Option<*const u8> = read(bprm, off.linux_binprm_file);
    enforce(
        HOOK_BPRM_CHECK,
        file.and_then(|f| place_of_file(off, f)),
        ACCESS_EXEC,
        EACCES,
    )
}

/// Removing `dentry` from the directory `dir` (a `struct path *`).
#[inline(always)]
fn removal(hook: u32, ctx: &LsmContext) -> i32 {
    let dir: *const u8 = ctx.arg(0);
    let dentry: *const u8 = ctx.arg(1);
    let off = offsets();
    let place = read::<*const u8>(dir, off.path_mnt).map(|mnt| Place { dentry, mnt });
    enforce(hook, place, ACCESS_WRITE, EACCES)
}

#[lsm(hook = "path_unlink")]
pub fn path_unlink(ctx: LsmContext) -> i32 {
    // path_unlink(const struct path *dir, struct dentry *dentry)
    removal(HOOK_PATH_UNLINK, &ctx)
}

#[lsm(hook = "path_rmdir")]
pub fn path_rmdir(ctx: LsmContext) -> i32 {
    // path_rmdir(const struct path *dir, struct dentry *dentry)
    removal(HOOK_PATH_RMDIR, &ctx)
}

/// Creating the entry `dentry` (argument 1, not yet backed by an inode) in the directory
/// `dir` (argument 0, a `struct path *`): judged by the directory's rules; a denial names
/// the new entry.
#[inline(always)]
fn creation(hook: u32, ctx: &LsmContext) -> i32 {
    let dir: *const u8 = ctx.arg(0);
    let dentry: *const u8 = ctx.arg(1);
    let off = offsets();
    let place = place_of_path(off, dir);
    let shown = place.map(|p| Place { dentry, mnt: p.mnt });
    enforce_reporting(hook, place, shown, ACCESS_WRITE, EACCES)
}

#[lsm(hook = "path_mkdir")]
pub fn path_mkdir(ctx: LsmContext) -> i32 {
    // path_mkdir(const struct path *dir, struct dentry *dentry, umode_t mode)
    creation(HOOK_PATH_MKDIR, &ctx)
}

#[lsm(hook = "path_mknod")]
pub fn path_mknod(ctx: LsmContext) -> i32 {
    // path_mknod(const struct path *dir, struct dentry *dentry, umode_t mode, unsigned int dev):
    // also every open(O_CREAT) that creates a file.
    creation(HOOK_PATH_MKNOD, &ctx)
}

#[lsm(hook = "path_symlink")]
pub fn path_symlink(ctx: LsmContext) -> i32 {
    // path_symlink(const struct path *dir, struct dentry *dentry, const char *old_name)
    creation(HOOK_PATH_SYMLINK, &ctx)
}

/// Changing the file a `struct path *` (argument 0) names.
#[inline(always)]
fn change(hook: u32, ctx: &LsmContext, errno: i32) -> i32 {
    let path: *const u8 = ctx.arg(0);
    let off = offsets();
    enforce(hook, place_of_path(off, path), ACCESS_WRITE, errno)
}

#[lsm(hook = "path_truncate")]
pub fn path_truncate(ctx: LsmContext) -> i32 {
    // path_truncate(const struct path *path)
    change(HOOK_PATH_TRUNCATE, &ctx, EACCES)
}

#[lsm(hook = "path_chmod")]
pub fn path_chmod(ctx: LsmContext) -> i32 {
    // path_chmod(const struct path *path, umode_t mode)
    change(HOOK_PATH_CHMOD, &ctx, EPERM)
}

#[lsm(hook = "path_chown")]
pub fn path_chown(ctx: LsmContext) -> i32 {
    // path_chown(const struct path *path, kuid_t uid, kgid_t gid)
    change(HOOK_PATH_CHOWN, &ctx, EPERM)
}

/// A file moving (link or rename) from `src` into the directory `dst_dir`: the target
/// directory must be writable, and the file must not gain there any access it does not
/// have where it is (so a hard link or rename cannot carry a protected file into an
/// allowed place).
#[inline(always)]
fn moving(hook: u32, src: Option<Place>, src_dir: Option<Place>, dst_dir: Option<Place>) -> i32 {
    let (id, entry) = match agent::current() {
        agent::Subject::Outside => return 0,
        agent::Subject::Unregistered { id } => {
            report(hook, id, VERDICT_DENY, src, ACCESS_ALL, 0, 0);
            return -EACCES;
        }
        agent::Subject::Agent { id, entry } => (id, entry),
    };
    let (Some(src), Some(dst_dir)) = (src, dst_dir) else {
        report(hook, id, VERDICT_DENY, src, ACCESS_ALL, 0, 0);
        return -EACCES;
    };
    let (src_allowed, dev, ino) = allowed_at(&entry, src);
    let (dst_allowed, _, _) = allowed_at(&entry, dst_dir);
    let mut denied = (dst_allowed & !src_allowed) | (ACCESS_WRITE & !dst_allowed);
    if let Some(d) = src_dir {
        let (src_dir_allowed, _, _) = allowed_at(&entry, d);
        denied |= ACCESS_WRITE & !src_dir_allowed;
    }
    finish(hook, id, &entry, src, denied, dev, ino, EACCES)
}

#[lsm(hook = "path_link")]
pub fn path_link(ctx: LsmContext) -> i32 {
    // path_link(struct dentry *old_dentry, const struct path *new_dir, struct dentry *new_dentry)
    let old_dentry: *const u8 = ctx.arg(0);
    let new_dir: *const u8 = ctx.arg(1);
    let off = offsets();
    let dst = place_of_path(off, new_dir);
    // A hard link stays on its mount.
    let src = dst.map(|d| Place {
        dentry: old_dentry,
        mnt: d.mnt,
    });
    moving(HOOK_PATH_LINK, src, None, dst)
}

#[lsm(hook = "path_rename")]
pub fn path_rename(ctx: LsmContext) -> i32 {
    // path_rename(const struct path *old_dir, struct dentry *old_dentry,
    //             const struct path *new_dir, struct dentry *new_dentry, unsigned int flags)
    let old_dir: *const u8 = ctx.arg(0);
    let old_dentry: *const u8 = ctx.arg(1);
    let new_dir: *const u8 = ctx.arg(2);
    let new_dentry: *const u8 = ctx.arg(3);
    let flags: u32 = ctx.arg(4);
    let off = offsets();
    let src_dir = place_of_path(off, old_dir);
    let dst_dir = place_of_path(off, new_dir);
    let src = src_dir.map(|d| Place {
        dentry: old_dentry,
        mnt: d.mnt,
    });
    let r = moving(HOOK_PATH_RENAME, src, src_dir, dst_dir);
    if r != 0 || flags & RENAME_EXCHANGE == 0 {
        return r;
    }
    // An exchange also moves the other entry the other way.
    let other = dst_dir.map(|d| Place {
        dentry: new_dentry,
        mnt: d.mnt,
    });
    moving(HOOK_PATH_RENAME, other, dst_dir, src_dir)
}

/// x86-64 `struct pt_regs` offsets of the saved argument registers and `orig_ax`.
const REG_DI: u32 = 112;
const REG_SI: u32 = 104;
const REG_DX: u32 = 96;
const REG_ORIG_AX: u32 = 120;

/// The path argument of an x86-64 file system call, by number: which register holds it.
#[inline(always)]
fn path_register(nr: u64) -> Option<u32> {
    Some(match nr {
        // open, creat, execve, unlink, rename, link, mkdir, rmdir, truncate, chmod, chown,
        // lchown, symlink (the new name is the second argument)
        2 | 85 | 59 | 87 | 82 | 86 | 83 | 84 | 76 | 90 | 92 | 94 => REG_DI,
        88 => REG_SI,
        // openat, openat2, execveat, unlinkat, renameat, renameat2, linkat, mkdirat,
        // fchmodat, fchownat, fchmodat2
        257 | 437 | 322 | 263 | 264 | 316 | 265 | 258 | 268 | 260 | 452 => REG_SI,
        // symlinkat(target, newdirfd, linkpath)
        266 => REG_DX,
        _ => return None,
    })
}

/// The Landlock path's denial reports: an agent's file system call that failed with
/// EACCES or EPERM, with the path it asked for; and any call its seccomp filter refused
/// (see `crate::process::seccomp_refused`). Attached only while agents run.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    // sys_exit(struct pt_regs *regs, long ret)
    let ret: i64 = ctx.arg(1);
    if ret != -(EACCES as i64) && ret != -(EPERM as i64) {
        return 0;
    }
    let id = match agent::current() {
        agent::Subject::Outside => return 0,
        agent::Subject::Unregistered { id } => id,
        agent::Subject::Agent { id, .. } => id,
    };
    let regs: *const u8 = ctx.arg(0);
    let Some(nr) = read::<u64>(regs, REG_ORIG_AX) else {
        return 0;
    };
    if ret == -(EPERM as i64) && crate::process::seccomp_refused(id, nr) {
        return 0;
    }
    let Some(reg) = path_register(nr) else {
        return 0;
    };
    let Some(user_path) = read::<u64>(regs, reg) else {
        return 0;
    };
    // Not counted for the circuit breaker: a failure seen here may be Landlock's refusal or
    // an ordinary permission error, which agentd did not decide.
    let Some(mut entry) = events::reserve::<FileEvent>() else {
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: as in report().
    unsafe {
        (*ev).header = events::header(EVENT_FILE, HOOK_SYSCALL_EXIT, id, VERDICT_DENY);
        (*ev).access = 0;
        (*ev).dev = 0;
        (*ev).ino = 0;
        (*ev).path_kind = PATH_AS_GIVEN;
        (*ev).depth = 0;
        (*ev).complete = 0;
        (*ev).syscall = nr as u32;
        (*ev).errno = (-ret) as u32;
        (*ev)._pad = 0;
        let path = (*ev).path.as_mut_ptr();
        *path = 0;
        bpf_probe_read_user_str(
            path.cast::<c_void>(),
            EVENT_PATH_BYTES as u32,
            user_path as *const c_void,
        );
    }
    entry.submit(0);
    0
}
