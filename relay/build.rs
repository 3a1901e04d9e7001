//! Builds the XDP programs (`ebpf/xdp`: the guard and the flood generator) from source and
//! leaves the objects at `$OUT_DIR/ferry-xdp.o` and `$OUT_DIR/ferry-flood.o`, where
//! `relay/src/xdp.rs` embeds them: the approach of aya-template's build script, done by hand
//! because the eBPF crate lives outside this workspace (it builds only on nightly, and the
//! workspace's `cargo test` runs on stable).
//!
//! Needs the dated nightly pinned in `ebpf/xdp/rust-toolchain.toml` (so the object loaded into
//! the kernel is reproducible) with `rust-src`, and `bpf-linker` on the PATH; `.ci/setup`
//! installs both. `FERRY_XDP_TOOLCHAIN` names another toolchain instead.
//!
//! `FERRY_SKIP_EBPF=1` (or `true`) skips that build, as `AYA_BUILD_SKIP` does in aya-build:
//! the objects are left empty, so the workspace checks, lints, documents and tests on stable
//! alone. Such a relay refuses to load the guard (any `xdp.mode` but `"off"`) or the flood
//! generator with an error naming the switch, and the `ferry_skip_ebpf` cfg it sets lets the
//! XDP tests say why they are ignored.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "bpfel-unknown-none";
/// The programs of `ebpf/xdp`: the guard, the flood generator that
/// `ferry-bench run flood --flood-generator xdp` drives, and the wire of
/// `ferry-bench run --xdp-wire` (neither attached by the relay).
const OBJECTS: [&str; 3] = ["ferry-xdp", "ferry-flood", "ferry-wire"];
const SKIP: &str = "FERRY_SKIP_EBPF";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    println!("cargo::rustc-check-cfg=cfg(ferry_skip_ebpf)");
    println!("cargo::rerun-if-env-changed={SKIP}");
    let skip = env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!(
            "cargo::warning={SKIP} is set: the XDP programs are not built; this relay runs \
             only with xdp.mode = \"off\""
        );
        println!("cargo::rustc-cfg=ferry_skip_ebpf");
        // Written every time: a build without the switch may have left real objects here.
        for name in OBJECTS {
            let dest = out_dir.join(format!("{name}.o"));
            std::fs::write(&dest, []).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
        }
        return;
    }
    build(&manifest_dir.join("..").join("ebpf"), &out_dir);
}

fn build(ebpf: &Path, out_dir: &Path) {
    for path in [
        "xdp/src",
        "xdp/Cargo.toml",
        "xdp/Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo::rerun-if-changed={}", ebpf.join(path).display());
    }
    println!("cargo::rerun-if-env-changed=FERRY_XDP_TOOLCHAIN");
    let pin = ebpf.join("xdp").join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", pin.display());
    let toolchain = env::var("FERRY_XDP_TOOLCHAIN").unwrap_or_else(|_| pinned_channel(&pin));

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
        panic!(
            "running `rustup run {toolchain} cargo` to build the XDP program: {e}. \
             {SKIP}=1 builds without it"
        )
    });
    if !status.success() {
        panic!(
            "building the XDP program (ebpf/xdp) failed ({status}). It needs the {toolchain} \
             toolchain with rust-src (`rustup component add rust-src --toolchain {toolchain}`) \
             and bpf-linker (`cargo install bpf-linker`); `.ci/setup` installs both. \
             {SKIP}=1 builds the relay without it (xdp.mode = \"off\" only)."
        );
    }
    for name in OBJECTS {
        let object = target_dir.join(TARGET).join("release").join(name);
        let dest = out_dir.join(format!("{name}.o"));
        std::fs::copy(&object, &dest)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), dest.display()));
    }
}

/// The `channel = "..."` of the `rust-toolchain.toml` at `path`: the dated nightly the XDP
/// object is built with.
fn pinned_channel(path: &Path) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .unwrap_or_else(|| panic!("{} names no channel", path.display()))
}
