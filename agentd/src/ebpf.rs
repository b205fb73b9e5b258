//! The kernel object agentd carries inside its binary, and how it is loaded.
//!
//! Loading creates every map; each enforcement module then loads and attaches its own
//! programs ([`crate::network::attach`], [`crate::files::attach`]). Three read-only
//! globals are fixed at load time: the agent root cgroup's id and level, and the kernel
//! struct offsets taken from BTF.

use agentd_common::{
    agent::globals::{AGENT_ROOT_ID, AGENT_ROOT_LEVEL},
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
}

/// Creates agentd's maps and readies its programs for loading.
pub fn load(cfg: &LoadConfig) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!(
            "this agentd binary carries no kernel programs (it was built with AYA_BUILD_SKIP=1); \
             rebuild it with `cargo xtask build`"
        );
    }
    EbpfLoader::new()
        .override_global(AGENT_ROOT_ID, &cfg.root.id, true)
        .override_global(AGENT_ROOT_LEVEL, &cfg.root.level, true)
        .override_global(KERNEL_OFFSETS_GLOBAL, &cfg.offsets, true)
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

/// Links pinned under bpffs: the network and BPF LSM programs stay attached when the daemon
/// dies, so its agents stay contained by the same policy (fail closed). A clean stop removes
/// them (after killing every agent). The raw tracepoint programs (budgets, the Landlock
/// path's reporter) are not pinned: they end with the daemon.
pub struct Pins {
    dir: std::path::PathBuf,
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
    /// boot) and removes the pins a daemon that died left there. Called once the agent root
    /// is known to hold no agents: nothing is then contained by those pins.
    pub fn open(dir: &std::path::Path) -> Result<Pins> {
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
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing stale pins in {}", dir.display()))?;
        }
        std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Pins {
            dir: dir.to_path_buf(),
        })
    }

    /// Pins `link` as `name`: it stays attached until the pin is removed.
    pub fn pin(&self, name: &str, link: aya::programs::links::FdLink) -> Result<()> {
        let path = self.dir.join(name);
        link.pin(&path)
            .with_context(|| format!("pinning the {name} link at {}", path.display()))?;
        Ok(())
    }
}

/// A clean stop (every agent killed first) or a failed start (no agent yet) removes the
/// pins; their links detach once nothing else holds them. A panic leaves them: the agents
/// stay contained, as they do when the daemon is killed.
impl Drop for Pins {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("agentd: removing the pins in {}: {e}", self.dir.display());
        }
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
