//! File access rules on the BPF LSM path. Userspace twin: agentd/src/files.rs.
//!
//! Rules are keyed by inode (see `agentd_common::files`). For an access, the program
//! walks from the file's dentry up to the root of the whole mount tree, crossing mount
//! points as the kernel's own path walk does, and applies at each level the rule stored
//! for that inode, if any. The first rule that mentions an access bit decides that bit,
//! so the most specific rule wins; at the same level a bit in both `deny` and `allow` is
//! denied. Bits that no rule mentions take the agent's default.
//!
//! Kernel structs are read with `bpf_probe_read_kernel` at offsets the loader takes from
//! the running kernel's BTF ([`KernelOffsets`]), so one object serves every kernel.

use agentd_common::{
    agent::{AGENT_FLAG_AUDIT, AGENT_FLAG_KILLED, AgentEntry},
    events::{EVENT_FILE, FileEvent, HOOK_FILE_OPEN, VERDICT_AUDIT, VERDICT_DENY},
    files::{
        ACCESS_ALL, ACCESS_EXEC, ACCESS_READ, ACCESS_WRITE, FMODE_EXEC, FMODE_READ, FMODE_WRITE,
        FileRule, FileRuleKey, KernelOffsets, MAX_FILE_RULES, MAX_PATH_DEPTH,
    },
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::bpf_probe_read_kernel,
    macros::{lsm, map},
    maps::HashMap,
    programs::LsmContext,
};

use crate::{agent, events};

const EACCES: i32 = 13;

/// Map `FILE_RULES`.
/// - key: [`FileRuleKey`] (agent id, inode number, kernel device number)
/// - value: [`FileRule`] (access bits allowed and denied at that inode)
/// - size: [`MAX_FILE_RULES`] rules over all agents
/// - owner: the daemon writes on policy load and change; programs only read.
#[map]
static FILE_RULES: HashMap<FileRuleKey, FileRule> =
    HashMap::with_max_entries(MAX_FILE_RULES, BPF_F_NO_PREALLOC);

/// Field offsets of the running kernel; set by the loader from BTF.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    file_f_path: 0,
    file_f_mode: 0,
    path_mnt: 0,
    path_dentry: 0,
    dentry_d_parent: 0,
    dentry_d_inode: 0,
    dentry_d_sb: 0,
    inode_i_ino: 0,
    super_block_s_dev: 0,
    mount_mnt: 0,
    mount_mnt_parent: 0,
    mount_mnt_mountpoint: 0,
    vfsmount_mnt_root: 0,
    _pad: 0,
};

/// Most mounts stacked on one directory that the walk climbs through in one step.
const MAX_STACKED_MOUNTS: u32 = 8;

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    let (id, entry) = match agent::current() {
        agent::Subject::Outside => return 0,
        agent::Subject::Unregistered { id } => {
            report(id, ACCESS_ALL, 0, 0, VERDICT_DENY);
            return -EACCES;
        }
        agent::Subject::Agent { id, entry } => (id, entry),
    };
    // file_open(struct file *file): argument 0 is the file being opened.
    let file: *const u8 = ctx.arg(0);
    // SAFETY: the loader set the offsets; volatile keeps the load from .rodata.
    let off = unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) };
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
    // SAFETY: f_path is embedded in the file.
    let path = unsafe { file.add(off.file_f_path as usize) };
    let verdict = judge(&entry, &off, path, access);
    if verdict.denied == 0 {
        return 0;
    }
    if entry.flags & AGENT_FLAG_AUDIT != 0 && entry.flags & AGENT_FLAG_KILLED == 0 {
        report(id, verdict.denied, verdict.dev, verdict.ino, VERDICT_AUDIT);
        return 0;
    }
    report(id, verdict.denied, verdict.dev, verdict.ino, VERDICT_DENY);
    -EACCES
}

struct Verdict {
    /// Requested access bits that are refused.
    denied: u32,
    /// The accessed inode, for the event.
    dev: u32,
    ino: u64,
}

/// Decides `access` to the file at `path` (a `struct path *`) under an agent's entry.
#[inline(always)]
fn judge(entry: &AgentEntry, off: &KernelOffsets, path: *const u8, access: u32) -> Verdict {
    let mut verdict = Verdict {
        denied: 0,
        dev: 0,
        ino: 0,
    };
    if entry.flags & AGENT_FLAG_KILLED != 0 {
        verdict.denied = access;
        return verdict;
    }
    let (Some(mut dentry), Some(mut vfsmnt)) = (
        read::<*const u8>(path, off.path_dentry),
        read::<*const u8>(path, off.path_mnt),
    ) else {
        // An unreadable path is denied: fail closed.
        verdict.denied = access;
        return verdict;
    };
    let mut undecided = access;
    let mut denied = 0u32;
    let mut depth = 0u32;
    while depth < MAX_PATH_DEPTH {
        let Some((dev, ino)) = inode_of(off, dentry) else {
            verdict.denied = access;
            return verdict;
        };
        if depth == 0 {
            verdict.dev = dev;
            verdict.ino = ino;
        }
        let key = FileRuleKey {
            policy: entry.policy_id,
            ino,
            dev,
            _pad: 0,
        };
        // SAFETY: the value is copied at once.
        if let Some(rule) = unsafe { FILE_RULES.get(key) } {
            let rule = *rule;
            denied |= undecided & rule.deny;
            undecided &= !(rule.allow | rule.deny);
            if undecided == 0 {
                break;
            }
        }
        // Climb: at the root of a mount, continue from the directory it is mounted on
        // (that directory itself is hidden under the mount and not judged), then go to
        // the parent directory.
        let mut hops = 0u32;
        while hops < MAX_STACKED_MOUNTS {
            let Some(mnt_root) = read::<*const u8>(vfsmnt, off.vfsmount_mnt_root) else {
                break;
            };
            if dentry != mnt_root {
                break;
            }
            // SAFETY: the vfsmount is embedded in its struct mount at mount_mnt.
            let mount = unsafe { vfsmnt.sub(off.mount_mnt as usize) };
            let (Some(parent), Some(mountpoint)) = (
                read::<*const u8>(mount, off.mount_mnt_parent),
                read::<*const u8>(mount, off.mount_mnt_mountpoint),
            ) else {
                break;
            };
            if parent == mount {
                // The root of the mount tree: the walk is complete.
                depth = MAX_PATH_DEPTH;
                break;
            }
            dentry = mountpoint;
            // SAFETY: as above.
            vfsmnt = unsafe { parent.add(off.mount_mnt as usize) };
            hops += 1;
        }
        if depth >= MAX_PATH_DEPTH {
            break;
        }
        let Some(parent) = read::<*const u8>(dentry, off.dentry_d_parent) else {
            break;
        };
        if parent == dentry {
            break;
        }
        dentry = parent;
        depth += 1;
    }
    verdict.denied = denied | (undecided & !entry.file_default_allow);
    verdict
}

/// (kernel device number, inode number) of a dentry's inode.
#[inline(always)]
fn inode_of(off: &KernelOffsets, dentry: *const u8) -> Option<(u32, u64)> {
    let inode: *const u8 = read(dentry, off.dentry_d_inode)?;
    let sb: *const u8 = read(dentry, off.dentry_d_sb)?;
    let ino: u64 = read(inode, off.inode_i_ino)?;
    let dev: u32 = read(sb, off.super_block_s_dev)?;
    Some((dev, ino))
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address and reports a fault as an error.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T).ok() }
}

#[inline(always)]
fn report(agent: u64, access: u32, dev: u32, ino: u64, verdict: u32) {
    let event = FileEvent {
        header: events::header(EVENT_FILE, HOOK_FILE_OPEN, agent, verdict),
        access,
        dev,
        ino,
    };
    events::emit(&event);
}
