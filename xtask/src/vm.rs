//! The VM stage: boot a Debian kernel whose BPF LSM works under qemu (software emulation),
//! from an initramfs that carries busybox, the agentd binary, the agentd-act helper and
//! the `vm` test binary with the shared libraries they need. /init mounts what the tests
//! need, runs the tests, prints `agentd-vm-exit: N` and powers off; the host reads the
//! results from the serial console.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    setup::{self, installed_kernel},
    test::Counts,
    util::{run_capture, run_inherit, show, workspace_root, xtask_target_dir},
};

/// How long one VM run may take before it is killed and counted as failed.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(clap::Args)]
pub struct Options {
    /// Kernel series to boot (default: the first one setup installs).
    #[arg(long)]
    kernel: Option<String>,
    /// Start a shell on the console instead of running the tests.
    #[arg(long)]
    shell: bool,
    /// Only tests whose name contains this text.
    filter: Option<String>,
}

pub fn run(opts: Options) -> Result<()> {
    let series = opts
        .kernel
        .unwrap_or_else(|| setup::VM_KERNELS[0].series.to_string());
    let image = build_initramfs(opts.filter.as_deref(), opts.shell)?;
    if opts.shell {
        let kernel = kernel_dir(&series)?;
        return run_inherit(&mut qemu(&kernel, &image)?);
    }
    let report = boot(&series, &image, &format!("[vm {series}] "))?;
    println!(
        "vm {series}: {} passed, {} failed, exit code {:?}",
        report.counts.passed, report.counts.failed, report.exit_code
    );
    if report.exit_code != Some(0) {
        bail!("the VM tests failed");
    }
    Ok(())
}

pub(crate) fn kernel_dir(series: &str) -> Result<PathBuf> {
    installed_kernel(series).ok_or_else(|| {
        anyhow!(
            "no VM kernel {series} is installed; run `cargo xtask setup` (kernels live in {})",
            setup::kernels_dir().display()
        )
    })
}

/// The test executable cargo builds for `--test vm`.
fn build_vm_tests() -> Result<PathBuf> {
    let root = workspace_root();
    run_inherit(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--bins"]),
    )?;
    let out = run_capture(Command::new("cargo").current_dir(&root).args([
        "test",
        "--test",
        "vm",
        "--no-run",
        "--message-format=json",
    ]))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "vm"
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo built no `vm` test executable")
}

/// Shared libraries a dynamically linked binary loads, as `ldd` resolves them.
pub(crate) fn shared_libraries(binary: &Path) -> Result<BTreeSet<PathBuf>> {
    let out = run_capture(Command::new("ldd").arg(binary))?;
    let mut libs = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Copies `src` to `root` + `dest` without debug info.
pub(crate) fn install_stripped(src: &Path, root: &Path, dest: &str) -> Result<()> {
    let target = root.join(dest.trim_start_matches('/'));
    fs::create_dir_all(target.parent().expect("has parent"))?;
    run_capture(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&target)
            .arg(src),
    )?;
    Ok(())
}

pub(crate) fn install_copy(src: &Path, root: &Path, dest: &Path) -> Result<()> {
    let target = root.join(dest.strip_prefix("/").unwrap_or(dest));
    fs::create_dir_all(target.parent().expect("has parent"))?;
    fs::copy(src, &target)
        .with_context(|| format!("copying {} into the initramfs", src.display()))?;
    Ok(())
}

const INIT: &str = r#"#!/bin/busybox sh
# agentd VM test init: mount what the tests need, run them, report, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# /tmp stays on the root file system, as /etc: tests hard-link between them.
mount -t securityfs none /sys/kernel/security
mount -t cgroup2 none /sys/fs/cgroup
# As systemd does on a host: the pids controller for the cgroups below the root.
echo +pids > /sys/fs/cgroup/cgroup.subtree_control
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
echo "agentd-vm: kernel $(uname -r); LSMs $(cat /sys/kernel/security/lsm)"
export AGENTD_IN_VM=1 AGENTD_BIN=/agentd/agentd AGENTD_ACT=/agentd/agentd-act HOME=/root TMPDIR=/tmp
if [ -e /agentd/shell ]; then
    setsid cttyhack sh
else
    /agentd/vm-tests --test-threads=1 $(cat /agentd/args)
    echo "agentd-vm-exit: $?"
fi
poweroff -f
"#;

/// Builds the binaries and packs the initramfs; returns its path.
pub fn build_initramfs(filter: Option<&str>, shell: bool) -> Result<PathBuf> {
    let tests = build_vm_tests()?;
    let target = workspace_root().join("target/debug");
    let agentd = target.join("agentd");
    let act = target.join("agentd-act");
    let dir = xtask_target_dir().join("vm");
    let root = dir.join("root");
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp", "root", "agentd", "etc"] {
        fs::create_dir_all(root.join(d))?;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox is missing; run `cargo xtask setup` (Debian package busybox-static)");
    }
    install_copy(busybox, &root, Path::new("/bin/busybox"))?;
    install_stripped(&agentd, &root, "/agentd/agentd")?;
    install_stripped(&act, &root, "/agentd/agentd-act")?;
    install_stripped(&tests, &root, "/agentd/vm-tests")?;
    let mut libs = BTreeSet::new();
    for bin in [&agentd, &act, &tests] {
        libs.extend(shared_libraries(bin)?);
    }
    for lib in &libs {
        install_copy(lib, &root, lib)?;
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(
        root.join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\nshadow:x:42:\n",
    )?;
    // A secret for the file tests to protect (root-readable by its mode, as on the host).
    fs::write(
        root.join("etc/shadow"),
        "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
    )?;
    fs::set_permissions(root.join("etc/shadow"), fs::Permissions::from_mode(0o640))?;
    fs::write(root.join("agentd/args"), filter.unwrap_or(""))?;
    if shell {
        fs::write(root.join("agentd/shell"), "")?;
    }
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let image = dir.join("initramfs.cpio");
    let script = format!(
        "cd '{}' && find . -print0 | cpio --null -o -H newc --quiet > '{}'",
        root.display(),
        image.display()
    );
    run_capture(Command::new("sh").arg("-c").arg(script))
        .context("packing the initramfs (cpio)")?;
    Ok(image)
}

pub(crate) fn qemu(kernel: &Path, image: &Path) -> Result<Command> {
    let config = fs::read_to_string(kernel.join("config")).unwrap_or_default();
    let lsm_list = config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_LSM="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    let mut append = "console=ttyS0 quiet panic=-1".to_string();
    if !lsm_list.split(',').any(|l| l == "bpf") {
        // Put bpf in the active LSM list if the kernel's default leaves it out.
        append.push_str(&format!(" lsm={lsm_list},bpf"));
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "2048",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(kernel.join("vmlinuz"))
    .arg("-initrd")
    .arg(image)
    .arg("-append")
    .arg(append);
    Ok(cmd)
}

/// What a VM run reported.
pub struct VmReport {
    pub counts: Counts,
    /// The test binary's exit code, if the VM got as far as reporting it.
    pub exit_code: Option<i32>,
}

/// Removes terminal escape sequences and carriage returns the firmware and console print.
pub(crate) fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ params final-byte
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Boots `series` with `image`, echoing the console with `prefix`, and collects results.
pub fn boot(series: &str, image: &Path, prefix: &str) -> Result<VmReport> {
    let kernel = kernel_dir(series)?;
    let mut cmd = qemu(&kernel, image)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`; run `cargo xtask setup`", show(&cmd)))?;
    let pid = child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, timed_out) = (done.clone(), timed_out.clone());
        thread::spawn(move || {
            let step = Duration::from_millis(200);
            let mut waited = Duration::ZERO;
            while !done.load(Ordering::SeqCst) {
                if waited >= VM_TIMEOUT {
                    timed_out.store(true, Ordering::SeqCst);
                    // SAFETY: signals our own child process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return;
                }
                thread::sleep(step);
                waited += step;
            }
        })
    };
    let stderr = child.stderr.take().expect("piped");
    let stderr_text = thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let mut counts = Counts::default();
    let mut exit_code = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).split(b'\n') {
        let line = clean(&String::from_utf8_lossy(&line.unwrap_or_default()));
        counts.parse_line(&line);
        if let Some(code) = line.trim().strip_prefix("agentd-vm-exit: ") {
            exit_code = code.trim().parse().ok();
        }
        println!("{prefix}{line}");
    }
    let status = child.wait()?;
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    let errors = stderr_text.join().unwrap_or_default();
    if timed_out.load(Ordering::SeqCst) {
        bail!(
            "the VM ({series}) did not finish within {} s and was killed",
            VM_TIMEOUT.as_secs()
        );
    }
    if exit_code.is_none() {
        bail!(
            "the VM ({series}) exited ({status}) without reporting test results; qemu said: {}",
            errors.trim()
        );
    }
    Ok(VmReport { counts, exit_code })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_console_noise() {
        assert_eq!(
            clean("\x1bc\x1b[?7l\x1b[2Jagentd-vm-exit: 0\r"),
            "cagentd-vm-exit: 0"
        );
        assert_eq!(clean("test result: ok.\r"), "test result: ok.");
    }
}
