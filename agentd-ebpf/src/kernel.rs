//! Reading kernel structs at the offsets the loader took from the running kernel's BTF.
//! Userspace twin: agentd/src/btf.rs.

use agentd_common::files::KernelOffsets;
use aya_ebpf::helpers::bpf_probe_read_kernel;

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
    dentry_d_name: 0,
    qstr_name: 0,
    qstr_len: 0,
    linux_binprm_file: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    cgroup_level: 0,
    cgroup_self: 0,
    css_parent: 0,
    css_cgroup: 0,
    kernfs_node_id: 0,
    task_tgid: 0,
    task_ti_status: 0,
};

/// The offsets. Each field is loaded where it is used (the verifier knows its value, since
/// the loader freezes the map that holds it).
#[inline(always)]
pub fn offsets() -> &'static KernelOffsets {
    let p: *const KernelOffsets = &KERNEL_OFFSETS;
    // SAFETY: the address is read back through a volatile load so that the compiler cannot
    // fold the zeros of the object file into the code; the loader set the real values.
    unsafe { &*core::ptr::read_volatile(&p) }
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address and reports a fault as an error.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T).ok() }
}
