//! The skip policy of Ferry's tests.
//!
//! - A test that needs root (network namespaces, XDP, `tc`) is marked
//!   `#[ignore = "needs root: …"]`, so a plain `cargo test` lists it as ignored, with the
//!   reason, instead of passing it without running it. `cargo test -- --include-ignored` runs
//!   it; it then calls [`require_root`] first, which fails it when the process is not root.
//!   `.ci/test` adds `--include-ignored` when it runs as root or with
//!   `FERRY_REQUIRE_PRIVILEGED=1`.
//! - A test that finds a kernel feature or a program missing at run time (io_uring, `SEND_ZC`,
//!   `tc`'s tbf qdisc, `redis-server`) calls [`skip`]: it says why on stderr and returns, or,
//!   with `FERRY_REQUIRE_PRIVILEGED=1` (CI), fails.

use std::fmt::Display;

/// The variable that turns every skip into a failure when it is `1`.
pub const REQUIRE_VAR: &str = "FERRY_REQUIRE_PRIVILEGED";

/// Whether `FERRY_REQUIRE_PRIVILEGED=1`: nothing may be skipped.
pub fn required() -> bool {
    std::env::var(REQUIRE_VAR).as_deref() == Ok("1")
}

/// Whether this process runs with effective user id 0.
#[allow(unsafe_code)]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails `test` (an `#[ignore = "needs root: …"]` test that was asked to run) unless this
/// process is root.
///
/// # Panics
///
/// When the process is not root.
pub fn require_root(test: &str) {
    if !is_root() {
        panic!(
            "{test} needs root and this process is not root: run it as root, or without \
             --include-ignored to leave it out"
        );
    }
}

/// Skips `test` because of `why` (something the machine lacks): prints `SKIP test: why` on
/// stderr and returns, so the caller can return; with `FERRY_REQUIRE_PRIVILEGED=1`, fails
/// instead.
///
/// # Panics
///
/// When `FERRY_REQUIRE_PRIVILEGED=1`.
pub fn skip(test: &str, why: impl Display) {
    assert!(!required(), "{test}: {why}, and {REQUIRE_VAR}=1");
    eprintln!("SKIP {test}: {why}");
}
