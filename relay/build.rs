//! Builds the XDP guard (`ebpf/xdp`) from source and leaves the object at
//! `$OUT_DIR/ferry-xdp.o`, where `relay/src/xdp.rs` embeds it: the approach of aya-template's
//! build script, done by hand because the eBPF crate lives outside this workspace (it builds
//! only on nightly, and the workspace's `cargo test` runs on stable).
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker` on the PATH; `.ci/setup`
//! installs both.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let ebpf = manifest_dir.join("..").join("ebpf");
    for path in [
        "xdp/src",
        "xdp/Cargo.toml",
        "xdp/Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=FERRY_XDP_TOOLCHAIN");
    let toolchain = env::var("FERRY_XDP_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());

    let target_dir = out_dir.join("xdp-target");
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", &toolchain, "cargo", "build", "--release", "--locked"])
        .arg("--manifest-path")
        .arg(ebpf.join("xdp").join("Cargo.toml"))
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // BTF, so the verifier's messages name source lines.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    // The outer build's settings are for the host toolchain, not this one.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        cargo.env_remove(var);
    }
    let status = cargo.status().unwrap_or_else(|e| {
        panic!("running `rustup run {toolchain} cargo` to build the XDP program: {e}")
    });
    if !status.success() {
        panic!(
            "building the XDP program (ebpf/xdp) failed ({status}). It needs the {toolchain} \
             toolchain with rust-src (`rustup component add rust-src --toolchain {toolchain}`) \
             and bpf-linker (`cargo install bpf-linker`); `.ci/setup` installs both."
        );
    }
    // The guard, and the flood generator that ferry-floodbench drives (never attached).
    for name in ["ferry-xdp", "ferry-flood"] {
        let object = target_dir.join(TARGET).join("release").join(name);
        let dest = out_dir.join(format!("{name}.o"));
        std::fs::copy(&object, &dest)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), dest.display()));
    }
}
