//! The Landlock form of an agent's file policy, applied by the launcher before exec.
//!
//! Landlock grants rights on file trees and never takes them back inside a granted tree.
//! A policy whose rule denies something inside an allowed tree (deny `{home}/.ssh` inside
//! read `{home}`) is expressed by not granting the tree itself but each of its entries,
//! except the one that leads to the denied path, as they exist when the agent starts.
//! What that cannot cover, exactly:
//! - an entry created later directly in such a directory (or in one of its ancestors up
//!   to the allowed root) is not accessible to the agent at all (Landlock errs on the
//!   side of denying), and the agent cannot create entries there itself;
//! - a denied path that does not exist yet cannot be reached later either, for the same
//!   reason (it is not in any granted tree);
//! - chmod, chown and other attribute changes are not checked by Landlock (BPF LSM's
//!   path_chmod/path_chown do that where it is usable); see `files::guarantees`.
//!
//! Symbolic links met while expanding a directory are not granted (access through them is
//! judged at their target). Scopes (Landlock ABI 6) keep the agent from signalling
//! processes outside its sandbox and from connecting to their abstract Unix sockets.

use std::{
    collections::BTreeMap,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use agentd_common::files::{ACCESS_EXEC, ACCESS_READ, ACCESS_WRITE};
use anyhow::{Context as _, Result, bail};
use landlock::{
    ABI, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    Scope,
};

use crate::policy::FilePolicy;

/// Most directory entries granted one by one for one policy (a deny rule inside a huge
/// directory would otherwise make an enormous ruleset).
pub const MAX_EXPANDED: usize = 50_000;

/// The grants for one agent: path → our access bits.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub grants: BTreeMap<PathBuf, u32>,
}

fn parent_allows(policy: &FilePolicy, p: &Path, bit: u32) -> bool {
    p.parent()
        .is_some_and(|parent| policy.allowed(parent) & bit != 0)
}

/// Builds the grants of `policy` from the file system as it is now.
pub fn compile(policy: &FilePolicy) -> Result<Plan> {
    let policy = &policy.without_moved_allows();
    let mut plan = Plan::default();
    let mut budget = MAX_EXPANDED;
    let root = PathBuf::from("/");
    for bit in [ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC] {
        // Where the bit turns on: the root, or a rule path whose parent lacks it.
        let roots: Vec<&PathBuf> = std::iter::once(&root)
            .chain(policy.rules.keys())
            .filter(|p| {
                policy.allowed(p) & bit != 0
                    && (p.as_path() == Path::new("/") || !parent_allows(policy, p, bit))
            })
            .collect();
        for r in roots {
            expand(policy, bit, r, &mut plan, &mut budget)?;
        }
    }
    Ok(plan)
}

/// Grants `bit` on `p`, or, if some rule below `p` denies it, on each entry of `p` instead.
fn expand(
    policy: &FilePolicy,
    bit: u32,
    p: &Path,
    plan: &mut Plan,
    budget: &mut usize,
) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return Ok(());
    };
    let denied_below = policy
        .rules
        .keys()
        .any(|q| q.as_path() != p && q.starts_with(p) && policy.allowed(q) & bit == 0);
    if !denied_below || !meta.is_dir() {
        // A symlink named by a rule is granted at its target (that is what the rule meant).
        *plan.grants.entry(p.to_path_buf()).or_default() |= bit;
        return Ok(());
    }
    let entries = std::fs::read_dir(p)
        .with_context(|| format!("listing {} to express a deny rule below it", p.display()))?;
    for entry in entries {
        let entry = entry?;
        if *budget == 0 {
            bail!(
                "more than {MAX_EXPANDED} directory entries to grant one by one to express the deny rules below {}",
                p.display()
            );
        }
        *budget -= 1;
        if entry.file_type()?.is_symlink() {
            continue;
        }
        let child = entry.path();
        if policy.allowed(&child) & bit != 0 {
            expand(policy, bit, &child, plan, budget)?;
        }
    }
    Ok(())
}

/// Landlock rights for our access bits, on a directory or on a file.
pub fn rights(bits: u32, dir: bool, abi: ABI) -> BitFlags<AccessFs> {
    let supported = AccessFs::from_all(abi);
    let mut r = BitFlags::<AccessFs>::empty();
    if bits & ACCESS_READ != 0 {
        r |= AccessFs::ReadFile;
        if dir {
            r |= AccessFs::ReadDir;
        }
    }
    if bits & ACCESS_WRITE != 0 {
        r |= AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
        if dir {
            r |= AccessFs::RemoveDir
                | AccessFs::RemoveFile
                | AccessFs::MakeChar
                | AccessFs::MakeDir
                | AccessFs::MakeReg
                | AccessFs::MakeSock
                | AccessFs::MakeFifo
                | AccessFs::MakeBlock
                | AccessFs::MakeSym
                | AccessFs::Refer;
        }
    }
    if bits & ACCESS_EXEC != 0 {
        r |= AccessFs::Execute;
    }
    r & supported
}

/// The rights the ruleset handles: everything the ABI knows except connecting to Unix
/// sockets by path (agentd leaves that to file permissions, so the launch socket stays
/// reachable).
pub fn handled(abi: ABI) -> BitFlags<AccessFs> {
    AccessFs::from_all(abi) & !BitFlags::<AccessFs>::from(AccessFs::ResolveUnix)
}

/// Creates the Landlock ruleset for `plan` at ABI `abi`; the launcher's child restricts
/// itself with it just before exec.
pub fn ruleset(plan: &Plan, abi: i32) -> Result<OwnedFd> {
    let abi = ABI::from(abi);
    let mut rs = Ruleset::default()
        .handle_access(handled(abi))
        .context("Landlock: handled access rights")?;
    if !Scope::from_all(abi).is_empty() {
        rs = rs.scope(Scope::from_all(abi)).context("Landlock: scopes")?;
    }
    let mut created = rs.create().context("creating the Landlock ruleset")?;
    for (path, bits) in &plan.grants {
        let dir = std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false);
        let fd = PathFd::new(path)
            .with_context(|| format!("opening {} for a Landlock rule", path.display()))?;
        created = created
            .add_rule(PathBeneath::new(fd, rights(*bits, dir, abi)))
            .with_context(|| format!("adding the Landlock rule for {}", path.display()))?;
    }
    let fd: Option<OwnedFd> = created.into();
    fd.context("Landlock is not supported by this kernel")
}

/// Restricts the calling thread with a ruleset. Only makes the system call, so it is safe
/// between fork and exec. Requires no_new_privs.
pub fn restrict_self(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: landlock_restrict_self on a ruleset descriptor with no flags.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_common::files::ACCESS_ALL;

    fn tree() -> (PathBuf, FilePolicy) {
        let dir = std::env::temp_dir().join(format!("agentd-landlock-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["home/.ssh", "home/src", "home/docs"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("home/.ssh/id"), "k").unwrap();
        std::fs::write(dir.join("home/notes"), "n").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", dir.join("home/link")).unwrap();
        let mut p = FilePolicy::default();
        p.add(&dir.join("home"), ACCESS_READ, 0);
        p.add(&dir.join("home/.ssh"), 0, ACCESS_ALL);
        p.add(&dir.join("home/src"), ACCESS_WRITE, 0);
        (dir, p)
    }

    #[test]
    fn a_deny_inside_an_allowed_tree_grants_the_siblings() {
        let (dir, p) = tree();
        let plan = compile(&p).unwrap();
        let h = dir.join("home");
        assert_eq!(plan.grants.get(&h), None, "the tree itself is not granted");
        assert_eq!(plan.grants[&h.join("src")], ACCESS_READ | ACCESS_WRITE);
        assert_eq!(plan.grants[&h.join("docs")], ACCESS_READ);
        assert_eq!(plan.grants[&h.join("notes")], ACCESS_READ);
        assert!(
            !plan.grants.contains_key(&h.join(".ssh")),
            "the denied entry is not granted"
        );
        assert!(
            !plan.grants.contains_key(&h.join("link")),
            "symlinks are not granted"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rights_follow_file_kinds_and_the_abi() {
        assert_eq!(rights(ACCESS_READ, false, ABI::V7), AccessFs::ReadFile);
        assert!(
            rights(ACCESS_WRITE, true, ABI::V7)
                .contains(AccessFs::MakeReg | AccessFs::Refer | AccessFs::Truncate)
        );
        assert!(
            !rights(ACCESS_WRITE, true, ABI::V1).contains(AccessFs::Refer),
            "ABI 1 has no Refer"
        );
        assert!(!handled(ABI::V7).contains(AccessFs::ResolveUnix));
    }
}
