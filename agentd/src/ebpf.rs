//! The kernel object agentd carries inside its binary, and how it is loaded.
//!
//! Loading creates every map; each enforcement module then loads and attaches its own
//! programs ([`crate::network::attach`], [`crate::files::attach`]). Four read-only
//! globals are fixed at load time: the agent root cgroup's id and level, the kernel
//! struct offsets taken from BTF, and the metrics port no agent may bind.

use agentd_common::{
    agent::globals::{AGENT_ROOT_ID, AGENT_ROOT_LEVEL, METRICS_PORT},
    files::{KERNEL_OFFSETS_GLOBAL, KernelOffsets},
};
use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, EbpfLoader};

/// The compiled agentd-ebpf object (built by build.rs).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentd-ebpf"));

/// The cgroup below which every task is an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentRoot {
    /// cgroup id of the agent root.
    pub id: u64,
    /// Its level in the cgroup2 hierarchy (the cgroup2 root is 0).
    pub level: u32,
}

/// What the programs are told at load time.
#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    pub root: AgentRoot,
    pub offsets: KernelOffsets,
    /// The daemon's metrics port, which no agent may bind (0: none).
    pub metrics_port: u16,
}

/// The maps that hold agentd's state (agents, rules, buckets, events). With [`Pins`] they
/// are pinned under `<bpffs>/maps/` and a restarted daemon's programs use the same maps,
/// so the agents it adopts keep their policy, buckets and undelivered events without a gap.
/// (The rest are per-CPU scratch space and the read-only globals.)
pub const STATE_MAPS: &[&str] = &[
    "AGENTS",
    "BUDGETS",
    "BUDGET_CLASSES",
    "NET_ALLOW4",
    "NET_ALLOW6",
    "DNS_ORIG",
    "EVENTS",
    "EVENTS_LOST",
    "FILE_RULES",
    "SYSCALLS_DENIED",
];

/// Creates agentd's maps and readies its programs for loading.
pub fn load(cfg: &LoadConfig) -> Result<Ebpf> {
    load_with(cfg, None)
}

/// [`load`], with the state maps pinned in `pins` (reused where an earlier daemon pinned
/// them, after a check that their layout is this build's).
pub fn load_with(cfg: &LoadConfig, pins: Option<&Pins>) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!(
            "this agentd binary carries no kernel programs (it was built with AYA_BUILD_SKIP=1); \
             rebuild it with `cargo xtask build`"
        );
    }
    let mut loader = EbpfLoader::new();
    loader
        .override_global(AGENT_ROOT_ID, &cfg.root.id, true)
        .override_global(AGENT_ROOT_LEVEL, &cfg.root.level, true)
        .override_global(KERNEL_OFFSETS_GLOBAL, &cfg.offsets, true)
        .override_global(METRICS_PORT, &cfg.metrics_port, true);
    if let Some(pins) = pins {
        pins.check_maps()?;
        for name in STATE_MAPS {
            loader.map_pin_path(name, pins.map_path(name));
        }
    }
    loader
        .load(OBJECT)
        .context("creating agentd's BPF maps (needs root: CAP_BPF and CAP_SYS_ADMIN)")
}

/// The kernel's id of a loaded program.
pub fn program_id(ebpf: &Ebpf, name: &str) -> Result<u32> {
    let prog = ebpf
        .program(name)
        .with_context(|| format!("no program {name} in the object"))?;
    Ok(prog
        .info()
        .with_context(|| format!("querying program {name}"))?
        .id())
}

/// True while a program with this id is loaded in the kernel.
pub fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs()
        .flatten()
        .any(|p| p.id() == id)
}

/// One BPF LSM program as loaded: what the daemon logs at start.
#[derive(Debug, Clone)]
pub struct LoadedProgram {
    pub hook: &'static str,
    /// The kernel's program id.
    pub id: u32,
    /// Instructions the verifier walked (kernels >= 5.16 report it).
    pub verified_insns: Option<u32>,
    /// Time spent in the verifier and attaching.
    pub took: std::time::Duration,
}

/// Loads and attaches BPF LSM programs named after their hooks, and pins their links (the
/// daemon; kernel-only tests pass `None`: the links end with the `Ebpf`).
pub fn attach_lsm(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    hooks: &[&'static str],
    pins: Option<&Pins>,
) -> Result<Vec<LoadedProgram>> {
    let mut out = Vec::new();
    for hook in hooks {
        let prog: &mut aya::programs::Lsm = ebpf
            .program_mut(hook)
            .with_context(|| format!("the object has no {hook} program"))?
            .try_into()?;
        let start = std::time::Instant::now();
        prog.load(hook, btf)
            .with_context(|| format!("loading the {hook} BPF LSM program"))?;
        let link = prog
            .attach()
            .with_context(|| format!("attaching the {hook} BPF LSM program"))?;
        if let Some(pins) = pins {
            pins.pin(hook, prog.take_link(link)?.into())?;
        }
        let verified_insns = prog
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count());
        out.push(LoadedProgram {
            hook,
            id: program_id(ebpf, hook)?,
            verified_insns,
            took: start.elapsed(),
        });
    }
    Ok(out)
}

/// One line for the daemon's log: how many programs, how long, the verifier's largest walk.
pub fn describe_loaded(programs: &[LoadedProgram]) -> String {
    let took: std::time::Duration = programs.iter().map(|p| p.took).sum();
    let mut line = format!(
        "{} BPF LSM programs loaded and attached in {} ms",
        programs.len(),
        took.as_millis()
    );
    if let Some(p) = programs
        .iter()
        .filter(|p| p.verified_insns.is_some())
        .max_by_key(|p| p.verified_insns)
    {
        line.push_str(&format!(
            " (largest: {}, {} verified instructions)",
            p.hook,
            p.verified_insns.unwrap_or(0)
        ));
    }
    line
}

/// agentd's objects pinned under bpffs (`daemon.bpffs`): the state maps in `maps/` and the
/// links of the network and BPF LSM programs in `links/`. They stay when the daemon dies,
/// so its agents stay contained by the same policy (fail closed), and a restarted daemon
/// adopts them: its programs use the pinned maps, a cgroup link gets the new program in
/// one step (BPF_LINK_UPDATE), a BPF LSM link is replaced by a new one attached before the
/// old pin is renamed over (no moment without either). A clean stop that kills every
/// agent removes them. The raw tracepoint programs (budgets, the Landlock path's reporter)
/// are not pinned: they end with the daemon, and the next one attaches them again.
pub struct Pins {
    dir: std::path::PathBuf,
    /// Removed when dropped (a clean stop); false when the agents are left running.
    pub remove_on_drop: bool,
}

/// `f_type` of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &std::path::Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct, with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

impl Pins {
    /// Readies `dir` (on bpffs; /sys/fs/bpf is mounted if it is not, as systemd does at
    /// boot). Without `adopt`, the agent root holds no agents: pins a dead daemon left
    /// contain nothing and are removed. With it, they are kept for the adopted agents.
    pub fn open(dir: &std::path::Path, adopt: bool) -> Result<Pins> {
        let parent = dir
            .parent()
            .with_context(|| format!("daemon.bpffs {}: no parent directory", dir.display()))?;
        if !is_bpffs(parent) {
            let standard = std::path::Path::new("/sys/fs/bpf");
            if parent == standard && standard.is_dir() {
                nix::mount::mount(
                    Some("bpf"),
                    standard,
                    Some("bpf"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .context("mounting bpffs at /sys/fs/bpf")?;
                eprintln!("agentd: mounted bpffs at /sys/fs/bpf");
            } else {
                bail!(
                    "daemon.bpffs {}: {} is not a bpffs mount",
                    dir.display(),
                    parent.display()
                );
            }
        }
        if dir.exists() && !adopt {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing stale pins in {}", dir.display()))?;
        }
        for d in [dir.to_path_buf(), dir.join("maps"), dir.join("links")] {
            if !d.is_dir() {
                std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
            }
        }
        Ok(Pins {
            dir: dir.to_path_buf(),
            remove_on_drop: true,
        })
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Where the state map `name` is pinned.
    pub fn map_path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("maps").join(name)
    }

    /// Where the link of program `name` is pinned.
    pub fn link_path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("links").join(name)
    }

    /// Refuses maps pinned by a build whose programs expect another layout (a new build
    /// whose maps changed cannot adopt the agents of the old one).
    fn check_maps(&self) -> Result<()> {
        let obj = aya_obj::Object::parse(OBJECT).context("reading the kernel object")?;
        for name in STATE_MAPS {
            let path = self.map_path(name);
            if !path.exists() {
                continue;
            }
            let want = obj
                .maps
                .get(*name)
                .with_context(|| format!("the object has no map {name}"))?;
            let have = aya::maps::MapInfo::from_pin(&path)
                .with_context(|| format!("reading the pinned map {}", path.display()))?;
            let have_type = have.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
            let (h, w) = (
                (
                    have_type,
                    have.key_size(),
                    have.value_size(),
                    have.max_entries(),
                ),
                (
                    want.map_type(),
                    want.key_size(),
                    want.value_size(),
                    want.max_entries(),
                ),
            );
            if h != w {
                bail!(
                    "the pinned map {} was made by a build of agentd whose programs expect another layout \
                     (type, key, value, entries: {h:?}, this build: {w:?}); this daemon cannot adopt the \
                     agents that use it: end them with `agentd kill --all --direct` before starting it",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// Gives the link pinned as `name`, if there is one, the program `prog` in one step
    /// (BPF_LINK_UPDATE: no moment without a program, nor with two). Returns whether a
    /// pinned link was there.
    pub fn update(&self, name: &str, prog: std::os::fd::BorrowedFd<'_>) -> Result<bool> {
        let path = self.link_path(name);
        if !path.exists() {
            return Ok(false);
        }
        let link = sys::obj_get(&path)
            .with_context(|| format!("opening the pinned link {}", path.display()))?;
        sys::link_update(std::os::fd::AsFd::as_fd(&link), prog).with_context(|| {
            format!(
                "replacing the program of the pinned link {} (BPF_LINK_UPDATE)",
                path.display()
            )
        })?;
        Ok(true)
    }

    /// Pins `link` as `name`: it stays attached until the pin is removed. A link pinned
    /// there before (an earlier daemon's) is replaced by a rename, after the new one is
    /// attached, and detaches then.
    pub fn pin(&self, name: &str, link: aya::programs::links::FdLink) -> Result<()> {
        let path = self.link_path(name);
        // (bpffs refuses names with a dot.)
        let new = self.dir.join("links").join(format!("next-{name}"));
        let _ = std::fs::remove_file(&new);
        link.pin(&new)
            .with_context(|| format!("pinning the {name} link at {}", new.display()))?;
        std::fs::rename(&new, &path)
            .with_context(|| format!("renaming {} to {}", new.display(), path.display()))?;
        Ok(())
    }
}

/// A clean stop (every agent killed first) or a failed start (no agent yet) removes the
/// pins; their links detach once nothing else holds them. A panic leaves them: the agents
/// stay contained, as they do when the daemon is killed.
impl Drop for Pins {
    fn drop(&mut self) {
        if std::thread::panicking() || !self.remove_on_drop {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("agentd: removing the pins in {}: {e}", self.dir.display());
        }
    }
}

/// The two bpf(2) commands aya does not offer for pinned links.
mod sys {
    use std::{
        ffi::CString,
        os::fd::{BorrowedFd, FromRawFd as _, OwnedFd},
        path::Path,
    };

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;

    fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for `cmd`; the kernel
        // reads at most its size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *const T,
                std::mem::size_of::<T>(),
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// BPF_OBJ_GET: a file descriptor for the object pinned at `path`.
    pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
        #[repr(C)]
        struct Attr {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let fd = bpf(
            BPF_OBJ_GET,
            &Attr {
                pathname: c.as_ptr() as u64,
                bpf_fd: 0,
                file_flags: 0,
            },
        )?;
        // SAFETY: the kernel returned a new file descriptor that we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// BPF_LINK_UPDATE: `link` runs `prog` from now on.
    pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        #[repr(C)]
        struct Attr {
            link_fd: u32,
            new_prog_fd: u32,
            flags: u32,
            old_prog_fd: u32,
        }
        bpf(
            BPF_LINK_UPDATE,
            &Attr {
                link_fd: link.as_raw_fd() as u32,
                new_prog_fd: prog.as_raw_fd() as u32,
                flags: 0,
                old_prog_fd: 0,
            },
        )
        .map(|_| ())
    }
}

/// The raw tracepoint program named after its tracepoint (`sys_enter`, `sys_exit`).
pub mod raw_tp {
    use anyhow::{Context as _, Result};
    use aya::{
        Ebpf,
        programs::{RawTracePoint, raw_trace_point::RawTracePointLinkId},
    };

    fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut RawTracePoint> {
        Ok(ebpf
            .program_mut(name)
            .with_context(|| format!("the object has no {name} program"))?
            .try_into()?)
    }

    /// Loads it (the verifier runs now), without attaching it.
    pub fn load(ebpf: &mut Ebpf, name: &str) -> Result<()> {
        program(ebpf, name)?
            .load()
            .with_context(|| format!("loading the {name} program"))
    }

    pub fn attach(ebpf: &mut Ebpf, name: &str) -> Result<RawTracePointLinkId> {
        program(ebpf, name)?
            .attach(name)
            .with_context(|| format!("attaching the {name} program"))
    }

    pub fn detach(ebpf: &mut Ebpf, name: &str, link: RawTracePointLinkId) -> Result<()> {
        program(ebpf, name)?
            .detach(link)
            .with_context(|| format!("detaching the {name} program"))
    }
}
