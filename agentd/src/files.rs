//! File access rules. Kernel twin: agentd-ebpf/src/files.rs (BPF LSM path).
//!
//! A rule names a path; it is stored under that path's inode, which must exist when the
//! rule is set (as with Landlock). The kernel judges an access by the rules on the file's
//! inode and on its ancestors' inodes, nearest first.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use agentd_common::files::{FILE_RULES_MAP, FileRule, FileRuleKey};
use anyhow::{Context as _, Result};
use aya::{Btf, Ebpf, maps::HashMap, programs::Lsm};

/// The kernel's internal encoding of a device number (`MKDEV` in the kernel: major in the
/// top 12 bits, minor in the low 20), as `super_block.s_dev` holds it.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | (minor & 0xfffff)
}

/// The key under which a rule for `path` of policy `policy` is stored.
pub fn rule_key(policy: u64, path: &Path) -> Result<FileRuleKey> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "a file rule names {}, which cannot be opened",
            path.display()
        )
    })?;
    Ok(FileRuleKey {
        policy,
        ino: meta.ino(),
        dev: kernel_dev(meta.dev()),
        _pad: 0,
    })
}

/// Sets the rule of policy `policy` on `path`.
pub fn set_rule(ebpf: &mut Ebpf, policy: u64, path: &Path, rule: FileRule) -> Result<()> {
    let key = rule_key(policy, path)?;
    let map = ebpf
        .map_mut(FILE_RULES_MAP)
        .context("the object has no FILE_RULES map")?;
    let mut rules: HashMap<_, FileRuleKey, FileRule> = HashMap::try_from(map)?;
    rules
        .insert(key, rule, 0)
        .with_context(|| format!("storing the rule of policy {policy} on {}", path.display()))
}

/// Loads the file_open BPF LSM program and attaches it; returns its kernel id.
pub fn attach(ebpf: &mut Ebpf, btf: &Btf) -> Result<u32> {
    let prog: &mut Lsm = ebpf
        .program_mut("file_open")
        .context("the object has no file_open program")?
        .try_into()?;
    prog.load("file_open", btf)
        .context("loading the file_open BPF LSM program")?;
    prog.attach()
        .context("attaching the file_open BPF LSM program")?;
    crate::ebpf::program_id(ebpf, "file_open")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dev_matches_mkdev() {
        // /dev/vda is 254:0 on the build host; 8:1 is sda1; a large minor keeps its bits.
        assert_eq!(kernel_dev(libc::makedev(254, 0)), 254 << 20);
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(0, 300_000)), 300_000);
    }

    #[test]
    fn missing_path_is_named() {
        let err = rule_key(1, Path::new("/nonexistent/agentd-test"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/agentd-test"), "{err}");
    }
}
