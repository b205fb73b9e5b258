//! Builds the kernel programs (agentd-ebpf) for the BPF target with the nightly toolchain
//! and bpf-linker, and leaves the object in OUT_DIR for `include_bytes!`, so the agentd
//! binary carries its own programs.
//!
//! This does what aya-build does, but quietly: aya-build forwards every line of the nested
//! cargo's output as a cargo warning, which cargo then replays on every later build. Here
//! the nested output is shown only when the build fails.
//!
//! `AYA_BUILD_SKIP=1` skips the nested build for fast `cargo check`/`clippy` loops and
//! embeds an empty object instead; such a binary refuses to load programs and says why.
//! The test command never sets it.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    if let Err(e) = build() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("cargo did not set OUT_DIR")?);
    let object = out_dir.join("agentd-ebpf");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: the eBPF object is not built and this agentd binary cannot load programs (for check/clippy only)"
        );
        fs::write(&object, []).map_err(|e| e.to_string())?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let ebpf_dir = manifest_dir.join("../agentd-ebpf");
    for dir in [
        "../agentd-ebpf/src",
        "../agentd-ebpf/Cargo.toml",
        "../agentd-common/src",
        "../agentd-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={dir}");
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").map_err(|e| e.to_string())?;
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => return Err(format!("unsupported target endianness {other:?}")),
    };
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "agentd-ebpf",
        "--bins",
        "--release",
    ])
    .args([
        "--target",
        target,
        "-Z",
        "build-std=core",
        "--message-format=json",
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&ebpf_dir)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    );
    // The outer build's compiler and wrappers are for the host toolchain, not the nightly.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd.output().map_err(|e| {
        format!("could not start `rustup run nightly cargo` to build the kernel programs ({e}); run `cargo xtask setup`")
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let mut rendered = String::new();
        for line in stdout.lines() {
            if let Ok(msg) = serde_json::from_str::<serde_json::Value>(line)
                && let Some(r) = msg["message"]["rendered"].as_str()
            {
                rendered.push_str(r);
            }
        }
        return Err(format!(
            "building the kernel programs (agentd-ebpf) failed; `cargo xtask setup` installs the nightly \
             toolchain's rust-src and bpf-linker they need.\n{rendered}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let artifact = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == "agentd-ebpf"
                && m["executable"].is_string()
        })
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or("the eBPF build reported no agentd-ebpf object")?;
    copy(&artifact, &object)
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}
