//! File access rule types (kernel: agentd-ebpf/src/files.rs, userspace:
//! agentd/src/files.rs).
//!
//! Rules are attached to inodes, as Landlock does: userspace opens each rule's path when
//! the policy is loaded and stores the rule under the inode's (device, inode number). At
//! access time the kernel program walks from the accessed file up through its parent
//! directories (crossing mount points) to the root and applies the first rule it meets,
//! which is the most specific one. Symlinks, `..`, `/proc/self/root` and hard links all
//! lead to the same inodes, so they are judged like the real path.

use crate::pod;

/// Map `FILE_RULES`: key = [`FileRuleKey`], value = [`FileRule`].
pub const FILE_RULES_MAP: &str = "FILE_RULES";
/// Capacity of `FILE_RULES` summed over all agents.
pub const MAX_FILE_RULES: u32 = 65536;

/// Read access (open for reading).
pub const ACCESS_READ: u32 = 1 << 0;
/// Write access (open for writing, truncate, create, remove, rename).
pub const ACCESS_WRITE: u32 = 1 << 1;
/// Execute access (exec, mmap PROT_EXEC).
pub const ACCESS_EXEC: u32 = 1 << 2;
pub const ACCESS_ALL: u32 = ACCESS_READ | ACCESS_WRITE | ACCESS_EXEC;

/// Deepest directory nesting the kernel walk follows from a file to the root. A file
/// nested deeper is judged by the agent's defaults for the levels beyond.
pub const MAX_PATH_DEPTH: u32 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileRuleKey {
    /// The agent's policy id (`AgentEntry::policy_id`).
    pub policy: u64,
    pub ino: u64,
    /// The kernel's internal device number of the inode's super block (`s_dev`):
    /// major << 20 | minor.
    pub dev: u32,
    pub _pad: u32,
}

/// A rule on one inode. A bit in both `allow` and `deny` is denied (deny beats allow at
/// the same depth). Bits in neither fall through to shallower rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileRule {
    pub allow: u32,
    pub deny: u32,
}

/// Byte offsets of the kernel struct fields the file programs read, taken from the running
/// kernel's BTF at load time (Rust eBPF objects carry no CO-RE relocations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub file_f_path: u32,
    pub file_f_mode: u32,
    pub path_mnt: u32,
    pub path_dentry: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    pub dentry_d_sb: u32,
    pub inode_i_ino: u32,
    pub super_block_s_dev: u32,
    /// Offset of `struct vfsmount mnt` inside `struct mount`.
    pub mount_mnt: u32,
    pub mount_mnt_parent: u32,
    pub mount_mnt_mountpoint: u32,
    pub vfsmount_mnt_root: u32,
    pub _pad: u32,
}

/// Name of the read-only global that holds the [`KernelOffsets`].
pub const KERNEL_OFFSETS_GLOBAL: &str = "KERNEL_OFFSETS";

/// `struct file`'s `f_mode` bits the programs test.
pub const FMODE_READ: u32 = 0x1;
pub const FMODE_WRITE: u32 = 0x2;
pub const FMODE_EXEC: u32 = 0x20;

pod!(FileRuleKey, FileRule, KernelOffsets);
