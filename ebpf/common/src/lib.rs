//! Code shared by Ferry's XDP program (`ebpf/xdp`, built for `bpfel-unknown-none`) and the
//! userspace crates: the stateless header rules ([`header`]), the address cookie's keyed
//! function ([`cookie`]), and the XDP guard's map types,
//! counters and rate arithmetic ([`xdp`]).
//!
//! What this crate does **not** do: allocate, panic, or depend on `std`. Everything in it must
//! pass the eBPF verifier when inlined into the XDP program, so loops are bounded and every
//! index is checked.
#![no_std]
#![cfg_attr(not(feature = "user"), forbid(unsafe_code))]
#![cfg_attr(feature = "user", deny(unsafe_code))]

pub mod cookie;
pub mod header;
pub mod xdp;
