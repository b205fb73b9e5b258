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

/// Components of a denied path an event carries (the deepest ones), and their length.
pub const EVENT_PATH_COMPONENTS: usize = 16;
pub const EVENT_COMPONENT_LEN: usize = 32;
/// Bytes of path in a file event.
pub const EVENT_PATH_BYTES: usize = EVENT_PATH_COMPONENTS * EVENT_COMPONENT_LEN;

/// Deepest directory nesting the kernel walk follows from a file to the root. A file
/// nested deeper gets only what the rules within these levels allow: the agent's
/// defaults do not apply, since a rule further up might have refused it (fail closed).
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

/// Byte offsets of the kernel struct fields the file and process programs read, taken from the running
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
    /// `struct dentry`'s `d_name` (a `struct qstr`).
    pub dentry_d_name: u32,
    /// `struct qstr`'s `name` pointer and `len`.
    pub qstr_name: u32,
    pub qstr_len: u32,
    /// `struct linux_binprm`'s `file`.
    pub linux_binprm_file: u32,
    /// The way from a task to its cgroup v2 (process programs): `task_struct.cgroups`,
    /// `css_set.dfl_cgrp`, `cgroup.kn`, `cgroup.level`, `cgroup.self`,
    /// `cgroup_subsys_state.parent` and `.cgroup`, `kernfs_node.id`, `task_struct.tgid`.
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub cgroup_level: u32,
    pub cgroup_self: u32,
    pub css_parent: u32,
    pub css_cgroup: u32,
    pub kernfs_node_id: u32,
    pub task_tgid: u32,
    /// `task_struct.thread_info.status` (x86: `process::TS_COMPAT` in a compat call).
    pub task_ti_status: u32,
}

/// Name of the read-only global that holds the [`KernelOffsets`].
pub const KERNEL_OFFSETS_GLOBAL: &str = "KERNEL_OFFSETS";

/// `struct file`'s `f_mode` bits the programs test.
pub const FMODE_READ: u32 = 0x1;
pub const FMODE_WRITE: u32 = 0x2;
pub const FMODE_EXEC: u32 = 0x20;

pod!(FileRuleKey, FileRule, KernelOffsets);
