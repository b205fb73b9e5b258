//! Builds the kernel programs (agentd-ebpf) for the BPF target with the nightly toolchain
//! and bpf-linker, and leaves the object in OUT_DIR for `include_bytes!`, so the agentd
//! binary carries its own programs.
//!
//! `AYA_BUILD_SKIP=1` skips that build for fast `cargo check`/`clippy` loops and embeds an
//! empty object instead; such a binary fails clearly when it tries to load programs. The
//! test command never sets it.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("agentd-ebpf");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(&object, [])?;
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../agentd-ebpf");
    let root = root.to_str().expect("UTF-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agentd-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    println!("cargo:rerun-if-changed=../agentd-common/src");
    Ok(())
}
