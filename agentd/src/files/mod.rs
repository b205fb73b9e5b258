//! File access rules. Kernel twin: agentd-ebpf/src/files.rs.
//!
//! Two enforcers apply an agent's [`FilePolicy`]:
//! - **BPF LSM** (where the kernel allows it): rules are stored under the inodes of their
//!   paths, keyed by the agent's policy id, and the kernel programs judge every open,
//!   exec, create, remove, rename, link, truncate, chmod and chown.
//! - **Landlock** ([`landlock`]): the launcher restricts the agent to a ruleset built from
//!   the same policy before exec. Where both are usable, both apply.
//!
//! [`guarantees`] says which parts of a policy the enforcers of this host cannot give, so
//! that `agentd run` can refuse to start an agent that would be less confined than its
//! profile says (unless told `--degraded-ok`).

pub mod landlock;

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agentd_common::files::{ACCESS_ALL, ACCESS_WRITE, FILE_RULES_MAP, FileRule, FileRuleKey};
use anyhow::{Context as _, Result};
use aya::{Btf, Ebpf, maps::HashMap};

use crate::policy::FilePolicy;

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

/// A policy's rules by inode, as the LSM programs look them up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InodeRules {
    /// (kernel device number, inode number) → rule.
    pub rules: BTreeMap<(u32, u64), FileRule>,
    /// Rule paths that do not exist (nothing to key a rule on).
    pub missing: Vec<PathBuf>,
}

impl InodeRules {
    /// Resolves each rule path to its inode. Two paths of one inode (a symlink and its
    /// target, a bind mount) share the rule: allows and denies add up.
    pub fn of(policy: &FilePolicy) -> InodeRules {
        let policy = policy.without_moved_allows();
        let mut out = InodeRules::default();
        for (path, access) in &policy.rules {
            match std::fs::metadata(path) {
                Ok(meta) => {
                    let r = out
                        .rules
                        .entry((kernel_dev(meta.dev()), meta.ino()))
                        .or_default();
                    r.allow |= access.allow;
                    r.deny |= access.deny;
                }
                Err(_) => out.missing.push(path.clone()),
            }
        }
        out
    }
}

/// Writes `rules` as the rules of `policy`, then removes the policy's rules no longer in it.
pub fn apply(ebpf: &mut Ebpf, policy: u64, rules: &InodeRules) -> Result<()> {
    let map = ebpf
        .map_mut(FILE_RULES_MAP)
        .context("the object has no FILE_RULES map")?;
    let mut map: HashMap<_, FileRuleKey, FileRule> = HashMap::try_from(map)?;
    for (&(dev, ino), rule) in &rules.rules {
        map.insert(
            FileRuleKey {
                policy,
                ino,
                dev,
                _pad: 0,
            },
            rule,
            0,
        )
        .context("storing a file rule in FILE_RULES")?;
    }
    let stale: Vec<FileRuleKey> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.policy == policy && !rules.rules.contains_key(&(k.dev, k.ino)))
        .collect();
    for k in stale {
        map.remove(&k).context("removing a stale file rule")?;
    }
    Ok(())
}

/// The policy ids that have file rules.
pub fn policies(ebpf: &mut Ebpf) -> Result<std::collections::BTreeSet<u64>> {
    let map = ebpf
        .map_mut(FILE_RULES_MAP)
        .context("the object has no FILE_RULES map")?;
    let map: HashMap<_, FileRuleKey, FileRule> = HashMap::try_from(map)?;
    Ok(map
        .keys()
        .filter_map(Result::ok)
        .map(|k| k.policy)
        .collect())
}

/// Removes every file rule of `policy`.
pub fn clear(ebpf: &mut Ebpf, policy: u64) -> Result<()> {
    apply(ebpf, policy, &InodeRules::default())
}

/// The BPF LSM programs and their hooks.
pub const LSM_PROGRAMS: &[&str] = &[
    "file_open",
    "bprm_check_security",
    "path_unlink",
    "path_rmdir",
    "path_mkdir",
    "path_mknod",
    "path_symlink",
    "path_truncate",
    "path_chmod",
    "path_chown",
    "path_link",
    "path_rename",
];

/// Loads every file program and attaches it (BPF LSM); returns what was loaded.
pub fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    pins: Option<&crate::ebpf::Pins>,
) -> Result<Vec<crate::ebpf::LoadedProgram>> {
    crate::ebpf::attach_lsm(ebpf, btf, LSM_PROGRAMS, pins)
}

/// Loads the Landlock path's denial reporter (`sys_exit`), without attaching it.
pub fn load_reporter(ebpf: &mut Ebpf) -> Result<()> {
    crate::ebpf::raw_tp::load(ebpf, "sys_exit")
}

/// Which file enforcers this host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enforcers {
    pub lsm: bool,
    /// The Landlock ABI version, if Landlock is usable.
    pub landlock: Option<u32>,
}

impl Enforcers {
    /// What this host offers, found by trying (a BPF LSM program load, the Landlock ABI).
    pub fn of_host() -> Enforcers {
        let landlock = crate::doctor::landlock_abi().ok().map(|abi| abi as u32);
        let lsm = crate::doctor::bpf_lsm_usable();
        Enforcers { lsm, landlock }
    }

    pub fn describe(&self) -> String {
        match (self.lsm, self.landlock) {
            (true, Some(abi)) => format!(
                "files: BPF LSM (every access, with events) and Landlock ABI {abi} (at launch)"
            ),
            (true, None) => "files: BPF LSM (every access, with events)".to_string(),
            (false, Some(abi)) => format!(
                "files: Landlock ABI {abi} (applied by the launcher; BPF LSM is not usable on this host; chmod/chown \
                 are not checked; denials reported from failed system calls)"
            ),
            (false, None) => {
                "files: NOT ENFORCED (neither BPF LSM nor Landlock is usable on this host)"
                    .to_string()
            }
        }
    }
}

/// The parts of a policy that no enforcer of this host can guarantee, each as a sentence
/// saying what is not enforced and why. `owns_home` says whether the agent's user owns its
/// home directory (then chmod/chown of its own files matter); `root` whether it is uid 0.
pub fn guarantees(
    policy: &FilePolicy,
    enforcers: &Enforcers,
    root: bool,
    owns_home: Option<&Path>,
) -> Vec<String> {
    let restricts =
        policy.default_allow != ACCESS_ALL || policy.rules.values().any(|a| a.deny != 0);
    if !restricts {
        return Vec::new();
    }
    let mut out = Vec::new();
    match (enforcers.lsm, enforcers.landlock) {
        (true, _) => {
            // Inode rules need the path to exist; Landlock (if present) covers paths created
            // later by leaving them out of the allowed tree.
            if enforcers.landlock.is_none() {
                let denied_missing: Vec<String> = InodeRules::of(policy)
                    .missing
                    .iter()
                    .filter(|p| policy.allowed(p) != ACCESS_ALL)
                    .map(|p| p.display().to_string())
                    .collect();
                if !denied_missing.is_empty() {
                    out.push(format!(
                        "rules on paths that do not exist yet ({}) are not enforced if they are created later (needs Landlock)",
                        denied_missing.join(", ")
                    ));
                }
            }
        }
        (false, None) => {
            out.push("file rules: neither BPF LSM nor Landlock is usable on this host".to_string())
        }
        (false, Some(abi)) => {
            if abi < 2 {
                out.push(format!("hard links and renames across directories are not checked (Landlock ABI {abi} < 2)"));
            }
            if abi < 3 {
                out.push(format!(
                    "truncate outside writable areas is not checked (Landlock ABI {abi} < 3)"
                ));
            }
            let writes_restricted = policy.default_allow & ACCESS_WRITE == 0
                || policy.rules.values().any(|a| a.deny & ACCESS_WRITE != 0);
            if writes_restricted
                && (root || owns_home.is_some_and(|h| policy.allowed(h) & ACCESS_WRITE == 0))
            {
                out.push(format!(
                    "chmod and chown of files the agent's user owns outside its writable areas ({}) are not checked (needs BPF LSM)",
                    if root { "as root, most of the system".to_string() } else { owns_home.map(|h| h.display().to_string()).unwrap_or_default() }
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_common::files::{ACCESS_READ, ACCESS_WRITE};

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

    #[test]
    fn rules_on_one_inode_merge_and_missing_paths_are_listed() {
        let mut p = FilePolicy::default();
        p.add(Path::new("/"), ACCESS_READ, 0);
        p.add(Path::new("/proc/self/root"), 0, ACCESS_WRITE);
        p.add(Path::new("/nonexistent/agentd-test"), 0, ACCESS_ALL);
        let r = InodeRules::of(&p);
        let root = std::fs::metadata("/").unwrap();
        assert_eq!(
            r.rules[&(kernel_dev(root.dev()), root.ino())],
            FileRule {
                allow: ACCESS_READ,
                deny: ACCESS_WRITE
            }
        );
        assert_eq!(r.missing, vec![PathBuf::from("/nonexistent/agentd-test")]);
    }

    #[test]
    fn guarantees_name_what_the_host_cannot_enforce() {
        let mut p = FilePolicy::default();
        p.add(Path::new("/"), ACCESS_READ, 0);
        p.add(Path::new("/nonexistent/agentd-secret"), 0, ACCESS_ALL);
        let landlock = Enforcers {
            lsm: false,
            landlock: Some(7),
        };
        assert!(
            guarantees(&p, &landlock, false, None).is_empty(),
            "a dedicated user that owns nothing"
        );
        let root = guarantees(&p, &landlock, true, None);
        assert!(
            root.len() == 1 && root[0].contains("chmod and chown"),
            "{root:?}"
        );
        let old = guarantees(
            &p,
            &Enforcers {
                lsm: false,
                landlock: Some(1),
            },
            false,
            None,
        );
        assert!(
            old.iter().any(|g| g.contains("hard links"))
                && old.iter().any(|g| g.contains("truncate")),
            "{old:?}"
        );
        let lsm_only = guarantees(
            &p,
            &Enforcers {
                lsm: true,
                landlock: None,
            },
            true,
            None,
        );
        assert!(
            lsm_only[0].contains("/nonexistent/agentd-secret"),
            "{lsm_only:?}"
        );
        assert!(
            guarantees(
                &p,
                &Enforcers {
                    lsm: true,
                    landlock: Some(7)
                },
                true,
                None
            )
            .is_empty()
        );
        assert_eq!(
            guarantees(
                &p,
                &Enforcers {
                    lsm: false,
                    landlock: None
                },
                false,
                None
            )
            .len(),
            1
        );
        let open = FilePolicy {
            default_allow: ACCESS_ALL,
            ..Default::default()
        };
        assert!(
            guarantees(
                &open,
                &Enforcers {
                    lsm: false,
                    landlock: None
                },
                true,
                None
            )
            .is_empty(),
            "nothing to enforce"
        );
    }
}
