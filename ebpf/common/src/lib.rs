//! Code shared by Ferry's XDP program (`ebpf/xdp`, built for `bpfel-unknown-none`) and the
//! userspace crates.
//!
//! What this crate does **not** do: allocate, panic, or depend on `std`. Everything in it must
//! pass the eBPF verifier when inlined into the XDP program, so loops are bounded and every
//! index is checked.
#![no_std]
#![forbid(unsafe_code)]

pub mod header;
