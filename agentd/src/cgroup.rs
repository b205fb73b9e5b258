//! cgroup v2: finding the mount, and the directories agentd creates.
//!
//! agentd only ever creates, moves processes into, kills and removes cgroups below a
//! directory it created itself ([`CgroupDir::create`]); it never writes to a cgroup it did
//! not create.

use std::{
    fs,
    io::{self, ErrorKind},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// A cgroup2 mount as /proc/self/mountinfo describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The cgroup that is the mount's root, relative to the cgroup namespace's root
    /// (usually `/`).
    pub root: PathBuf,
}

/// Finds the cgroup2 mount in /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<Cgroup2Mount> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    parse_mountinfo(&text).ok_or_else(|| {
        anyhow!(
            "no cgroup2 file system is mounted (see /proc/self/mountinfo); agentd needs cgroup v2: \
             mount -t cgroup2 none /sys/fs/cgroup"
        )
    })
}

/// The first cgroup2 mount in a mountinfo text.
pub fn parse_mountinfo(text: &str) -> Option<Cgroup2Mount> {
    text.lines().find_map(|line| {
        // id parent major:minor root mount_point options [optional...] - fstype source super
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        Some(Cgroup2Mount {
            mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
            root: PathBuf::from(unescape_mountinfo(root)),
        })
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kernel's id of a cgroup: the inode number of its cgroup2 directory (what
/// `bpf_get_current_cgroup_id` returns).
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// The level of a cgroup directory in the global hierarchy (the cgroup2 root is level 0),
/// as `bpf_get_current_ancestor_cgroup_id` counts.
pub fn cgroup_level(mount: &Cgroup2Mount, path: &Path) -> Result<u32> {
    let rel = path.strip_prefix(&mount.mount_point).with_context(|| {
        format!(
            "{} is not below the cgroup2 mount {}",
            path.display(),
            mount.mount_point.display()
        )
    })?;
    let below_root = mount
        .root
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)));
    Ok((below_root.count() + rel.components().count()) as u32)
}

/// A cgroup directory that agentd created and is responsible for removing.
#[derive(Debug)]
pub struct CgroupDir {
    path: PathBuf,
    id: u64,
    /// Remove the directory (after killing what is in it) when dropped.
    owned: bool,
}

impl CgroupDir {
    /// Creates `parent/name`. Fails if it already exists: agentd never adopts a cgroup by
    /// accident.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            bail!("invalid cgroup name {name:?}");
        }
        let path = parent.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let id = cgroup_id(&path)?;
        Ok(Self {
            path,
            id,
            owned: true,
        })
    }

    /// Takes responsibility for an existing directory (agentd's agent root from an earlier
    /// run, or one named in the configuration).
    pub fn adopt(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a cgroup directory", path.display());
        }
        Ok(Self {
            path: path.to_path_buf(),
            id: meta.ino(),
            owned: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Child cgroup directories (names).
    pub fn children(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in
            fs::read_dir(&self.path).with_context(|| format!("reading {}", self.path.display()))?
        {
            let e = e?;
            if e.file_type()?.is_dir() {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every process in this cgroup and the cgroups below it.
    pub fn all_processes(&self) -> Result<Vec<u32>> {
        fn walk(dir: &Path, out: &mut Vec<u32>) -> io::Result<()> {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            for e in fs::read_dir(dir)? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    walk(&e.path(), out)?;
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.path, &mut out)
            .with_context(|| format!("listing processes of {}", self.path.display()))?;
        Ok(out)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving process {pid} into {}", procs.display()))
    }

    /// Process ids in this cgroup (not its children).
    pub fn processes(&self) -> Result<Vec<u32>> {
        let procs = self.path.join("cgroup.procs");
        let text =
            fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// True while any process is in this cgroup or below it.
    pub fn populated(&self) -> Result<bool> {
        let events = self.path.join("cgroup.events");
        let text =
            fs::read_to_string(&events).with_context(|| format!("reading {}", events.display()))?;
        Ok(text.lines().any(|l| l.trim() == "populated 1"))
    }

    /// Kills every process in this cgroup and below it (cgroup.kill), and waits until it is
    /// empty or `timeout` passes.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        let kill = self.path.join("cgroup.kill");
        fs::write(&kill, "1").with_context(|| format!("writing {}", kill.display()))?;
        let deadline = Instant::now() + timeout;
        while self.populated()? {
            if Instant::now() >= deadline {
                bail!(
                    "{} still has processes {timeout:?} after cgroup.kill",
                    self.path.display()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Kills what is inside, then removes this directory and every directory below it.
    pub fn remove(mut self) -> Result<()> {
        self.owned = false;
        remove_tree(&self.path)
    }

    /// Forget this directory without removing it (used when another owner takes over).
    pub fn release(mut self) -> PathBuf {
        self.owned = false;
        std::mem::take(&mut self.path)
    }
}

/// Caps the tasks (processes and threads) below `dir`, all its children together, with the
/// pids controller: a fork or clone beyond fails with EAGAIN in the kernel. The
/// controller must be enabled in the parent's `cgroup.subtree_control` (systemd does so
/// for a service with `Delegate=yes`); agentd never changes cgroups it did not create.
pub fn limit_tasks(dir: &Path, max: u64) -> Result<()> {
    let controllers = fs::read_to_string(dir.join("cgroup.controllers"))
        .with_context(|| format!("reading {}/cgroup.controllers", dir.display()))?;
    if !controllers.split_whitespace().any(|c| c == "pids") {
        bail!(
            "the pids controller is not available to {} (its controllers: {}); enable it in \
             {}/cgroup.subtree_control, or run agentd as a systemd service with Delegate=yes",
            dir.display(),
            if controllers.trim().is_empty() {
                "none"
            } else {
                controllers.trim()
            },
            dir.parent().unwrap_or(dir).display()
        );
    }
    fs::write(dir.join("pids.max"), max.to_string())
        .with_context(|| format!("writing {}/pids.max", dir.display()))
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        if self.owned
            && let Err(err) = remove_tree(&self.path)
        {
            eprintln!(
                "agentd: could not remove cgroup {}: {err:#}",
                self.path.display()
            );
        }
    }
}

/// Kills the processes in a cgroup tree and removes its directories, deepest first.
fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kill = path.join("cgroup.kill");
    match fs::write(&kill, "1") {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("writing {}", kill.display())),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match remove_dirs(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                // Killed processes leave the cgroup asynchronously.
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", path.display())),
        }
    }
}

fn remove_dirs(path: &Path) -> io::Result<()> {
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_dirs(&entry.path())?;
        }
    }
    match fs::remove_dir(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "\
25 30 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        let m = parse_mountinfo(hybrid).unwrap();
        assert_eq!(m.mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m.root, Path::new("/"));

        let unified =
            "28 22 0:25 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_mountinfo(unified).unwrap().mount_point,
            Path::new("/sys/fs/cgroup")
        );

        assert_eq!(
            parse_mountinfo("25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_mount_points_and_counts_levels() {
        let text = "33 25 0:29 /sub/dir /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        let m = parse_mountinfo(text).unwrap();
        assert_eq!(m.mount_point, Path::new("/mnt/cg two"));
        assert_eq!(cgroup_level(&m, Path::new("/mnt/cg two")).unwrap(), 2);
        assert_eq!(
            cgroup_level(&m, Path::new("/mnt/cg two/agentd/a1")).unwrap(),
            4
        );
        assert!(cgroup_level(&m, Path::new("/elsewhere")).is_err());
    }

    #[test]
    fn refuses_names_that_leave_the_parent() {
        for bad in ["", "a/b", ".", ".."] {
            assert!(
                CgroupDir::create(Path::new("/nonexistent"), bad).is_err(),
                "{bad:?}"
            );
        }
    }
}
