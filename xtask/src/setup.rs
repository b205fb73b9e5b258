//! `cargo xtask setup`: an idempotent bootstrap for a fresh build machine.
//!
//! Each step first checks whether its piece is present and only then installs it, and
//! prints one line: `already there (...)` or `done (...)`. A step that cannot be done
//! names the missing piece and the command that would fix it.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{Timer, dev_dir, is_root, run_capture, run_logged, which, xtask_target_dir};

#[derive(clap::Args)]
pub struct Options {}

/// Debian packages the build and the tests need.
/// - libseccomp-dev: libseccomp's static library and headers (the launcher's seccomp filter).
/// - qemu-system-x86, busybox-static, cpio, gzip: the VM test stage.
/// - iproute2: network namespaces in the egress tests.
/// - systemd: `systemd-analyze verify` of packaging/agentd.service in the install tests
///   (the package only; systemd need not be PID 1). Those tests also use setpriv and
///   unshare, from util-linux, which Debian always has (Essential).
/// - python3: what the agent of `cargo xtask demo` runs (not in every Debian 12 install).
/// - bubblewrap: what `cargo xtask bench` compares `agentd run` with (case 5).
const DEBIAN_PACKAGES: &[&str] = &[
    "libseccomp-dev",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "gzip",
    "iproute2",
    "systemd",
    "python3",
    "bubblewrap",
];

/// bpf-linker release that builds against the nightly's LLVM (see shared/ENVIRONMENT.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// A kernel the VM stage boots: a Debian cloud kernel with `CONFIG_BPF_LSM=y`, chosen by a
/// meta-package so that setup follows Debian's security updates.
pub struct VmKernel {
    /// Short name used on the command line (`--kernel 6.1`).
    pub series: &'static str,
    /// Debian meta-package whose dependency names the concrete image package.
    pub meta_package: &'static str,
}

pub const VM_KERNELS: &[VmKernel] = &[
    VmKernel {
        series: "6.1",
        meta_package: "linux-image-cloud-amd64",
    },
    VmKernel {
        series: "6.12",
        meta_package: "linux-image-6.12-cloud-amd64",
    },
];

enum Outcome {
    Present(String),
    Done(String),
}

pub fn run(_opts: Options) -> Result<()> {
    let total = Timer::start();
    step("Debian packages", debian_packages)?;
    step("nightly toolchain and rust-src", nightly_rust_src)?;
    step("bpf-linker", bpf_linker)?;
    for kernel in VM_KERNELS {
        step(&format!("VM kernel {}", kernel.series), || {
            vm_kernel(kernel)
        })?;
    }
    println!("setup: complete in {:.0} s", total.secs());
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<Outcome>) -> Result<()> {
    print!("setup: {name:<32} ");
    let _ = std::io::stdout().flush();
    let timer = Timer::start();
    match f() {
        Ok(Outcome::Present(detail)) => println!("already there ({detail})"),
        Ok(Outcome::Done(detail)) => println!("done ({detail}, {:.0} s)", timer.secs()),
        Err(err) => {
            println!("FAILED");
            return Err(err.context(format!("setup step `{name}`")));
        }
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout) == "install ok installed")
        .unwrap_or(false)
}

fn debian_packages() -> Result<Outcome> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(Outcome::Present(DEBIAN_PACKAGES.join(" ")));
    }
    let fix = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        bail!(
            "missing Debian packages: {}; as root run: {fix}",
            missing.join(" ")
        );
    }
    let log = xtask_target_dir().join("setup-apt.log");
    run_logged(Command::new("apt-get").args(["update", "-q"]), &log)
        .with_context(|| format!("apt-get update failed; then run: {fix}"))?;
    run_logged(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
        &log,
    )
    .with_context(|| format!("could not install {}; try: {fix}", missing.join(" ")))?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get reported success but {} is still missing; try: {fix}",
            still.join(" ")
        );
    }
    Ok(Outcome::Done(format!("installed {}", missing.join(" "))))
}

fn rustup_has_nightly() -> Result<bool> {
    let out = run_capture(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the nightly toolchain; install it from rustup.rs")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("nightly")))
}

fn nightly_rust_src() -> Result<Outcome> {
    let mut did = Vec::new();
    if !rustup_has_nightly()? {
        run_capture(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("no nightly toolchain; run: rustup toolchain install nightly --profile minimal")?;
        did.push("installed nightly");
    }
    let installed = run_capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        run_capture(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("rust-src is missing; run: rustup component add rust-src --toolchain nightly")?;
        did.push("added rust-src");
    }
    let version = nightly_version()?;
    if did.is_empty() {
        Ok(Outcome::Present(version.release))
    } else {
        Ok(Outcome::Done(format!(
            "{}: {}",
            version.release,
            did.join(", ")
        )))
    }
}

struct NightlyVersion {
    release: String,
    llvm_major: String,
}

fn nightly_version() -> Result<NightlyVersion> {
    let out = run_capture(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| anyhow!("`rustc +nightly -vV` printed no `{key}` line"))
    };
    let release = field("release:")?;
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm.split('.').next().unwrap_or_default().to_string();
    Ok(NightlyVersion {
        release: format!("rustc {release}, LLVM {llvm}"),
        llvm_major,
    })
}

/// bpf-linker must link against the same LLVM as the nightly that compiles the eBPF crate.
/// The LLVM major it was built for is recorded beside its LLVM prefix; a nightly update
/// to another LLVM major makes setup build it again.
fn bpf_linker() -> Result<Outcome> {
    let nightly = nightly_version()?;
    let prefix = dev_dir().join(format!("llvm-prefix-{}", nightly.llvm_major));
    let stamp = dev_dir().join("bpf-linker.llvm");
    let recorded = fs::read_to_string(&stamp).unwrap_or_default();
    if let Some(bin) = which("bpf-linker") {
        let works = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| o.status.success());
        if matches!(works, Ok(true)) && recorded.trim() == nightly.llvm_major {
            return Ok(Outcome::Present(format!(
                "{}, LLVM {}",
                bin.display(),
                nightly.llvm_major
            )));
        }
    }
    if which("cargo").is_none() {
        bail!("cargo is not on PATH; install Rust with rustup");
    }
    let sysroot = String::from_utf8(
        run_capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.stdout,
    )?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = find_libllvm(&libdir)?;
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let soname = libllvm.file_name().expect("a file").to_owned();
    for name in [std::ffi::OsString::from("libLLVM.so"), soname] {
        let link = prefix_lib.join(&name);
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    let log = xtask_target_dir().join("setup-bpf-linker.log");
    run_logged(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", nightly.llvm_major)),
        &log,
    )
    .with_context(|| {
        format!(
            "building bpf-linker failed; the recipe is LLVM_PREFIX={} cargo install bpf-linker \
             --version {BPF_LINKER_VERSION} --no-default-features --features llvm-{}",
            prefix.display(),
            nightly.llvm_major
        )
    })?;
    fs::write(&stamp, &nightly.llvm_major)?;
    Ok(Outcome::Done(format!(
        "bpf-linker {BPF_LINKER_VERSION} against {}",
        libllvm.display()
    )))
}

fn find_libllvm(libdir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(libdir).with_context(|| format!("reading {}", libdir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") {
            return Ok(entry.path());
        }
    }
    bail!(
        "the nightly toolchain has no libLLVM.so.* in {}; reinstall it with: \
         rustup toolchain install nightly --profile minimal",
        libdir.display()
    )
}

/// Where setup keeps the VM kernels: `<dev dir>/kernels/<image package>/{vmlinuz,config}`,
/// and `<dev dir>/kernels/<series>.current` names the image of each series.
pub fn kernels_dir() -> PathBuf {
    dev_dir().join("kernels")
}

/// The kernel image of a series that setup installed, if any.
pub fn installed_kernel(series: &str) -> Option<PathBuf> {
    let name = fs::read_to_string(kernels_dir().join(format!("{series}.current"))).ok()?;
    let dir = kernels_dir().join(name.trim());
    dir.join("vmlinuz").is_file().then_some(dir)
}

fn image_package(meta: &str) -> Result<String> {
    let out = run_capture(Command::new("apt-cache").args(["depends", meta]))
        .with_context(|| format!("asking apt for {meta}; try: apt-get update"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("apt knows no image package behind {meta}; try: apt-get update"))
}

fn vm_kernel(kernel: &VmKernel) -> Result<Outcome> {
    let package = match image_package(kernel.meta_package) {
        Ok(p) => p,
        Err(_) if is_root() => {
            run_capture(Command::new("apt-get").args(["update", "-q"]))?;
            image_package(kernel.meta_package)?
        }
        Err(err) => return Err(err),
    };
    let dir = kernels_dir().join(&package);
    let current = kernels_dir().join(format!("{}.current", kernel.series));
    if dir.join("vmlinuz").is_file() && dir.join("config").is_file() {
        fs::write(&current, &package)?;
        return Ok(Outcome::Present(package));
    }
    let work = xtask_target_dir().join("kernel-download").join(&package);
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    run_capture(
        Command::new("apt-get")
            .current_dir(&work)
            .args(["download", &package]),
    )
    .with_context(|| {
        format!("downloading {package}; try: apt-get update && apt-get download {package}")
    })?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| {
            anyhow!(
                "apt-get download {package} left no .deb in {}",
                work.display()
            )
        })?;
    let root = work.join("root");
    run_capture(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        fs::read_dir(&boot)
            .with_context(|| format!("{package} has no /boot"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .ok_or_else(|| anyhow!("{package} has no /boot/{prefix}*"))
    };
    let vmlinuz = find("vmlinuz-")?;
    let config = find("config-")?;
    let config_text = fs::read_to_string(&config)?;
    if !config_text.lines().any(|l| l == "CONFIG_BPF_LSM=y") {
        bail!("{package} is built without CONFIG_BPF_LSM=y; it cannot run the VM tests");
    }
    let staging = kernels_dir().join(format!(".{package}.partial"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    fs::copy(&vmlinuz, staging.join("vmlinuz"))?;
    fs::copy(&config, staging.join("config"))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&staging, &dir)?;
    fs::write(&current, &package)?;
    let _ = fs::remove_dir_all(&work);
    Ok(Outcome::Done(package))
}
