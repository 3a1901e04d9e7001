//! `ferry_flood`: a traffic generator for `ferry-bench run flood --flood-generator xdp`, never
//! attached by the relay.
//!
//! Run with `BPF_PROG_TEST_RUN` in live-frames mode on the peers' end of a veth pair: the
//! kernel feeds it copies of one template frame (Ethernet, IPv4 without options, UDP) and
//! transmits whatever it returns `XDP_TX` for out of that interface, into the relay's end.
//! Each run rewrites the IPv4 source to the next of `sources` spoofed addresses in
//! 198.19.0.0/16 and patches the header checksum to match, so the relay's kernel would accept
//! the packet. One core generates millions of frames a second this way.
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action::{XDP_ABORTED, XDP_TX};
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, PerCpuArray};
use aya_ebpf::programs::XdpContext;

/// Index 0: how many distinct sources to cycle through (a power of two, at most 65,536).
#[map(name = "FLOOD_CFG")]
static FLOOD_CFG: Array<u32> = Array::with_max_entries(1, 0);

/// Per CPU: the sequence number of the next frame.
#[map(name = "FLOOD_SEQ")]
static FLOOD_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Offsets in the template: the IPv4 header checksum and the last two bytes of the source.
const CHECKSUM: usize = 14 + 10;
const SOURCE_LOW: usize = 14 + 14;

#[xdp]
pub fn ferry_flood(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + SOURCE_LOW + 2 > ctx.data_end() {
        return XDP_ABORTED;
    }
    let mask = FLOOD_CFG.get(0).map_or(0, |n| n.wrapping_sub(1));
    let seq = match FLOOD_SEQ.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
        Some(p) => unsafe {
            *p = (*p).wrapping_add(1);
            *p
        },
        None => 0,
    };
    let host = (seq & mask) as u16;
    let source = (start + SOURCE_LOW) as *mut [u8; 2];
    let checksum = (start + CHECKSUM) as *mut [u8; 2];
    // SAFETY: both lie before `start + SOURCE_LOW + 2`, checked against data_end above; the
    // frame is this program's to write.
    unsafe {
        let old = u16::from_be_bytes(*source);
        let sum = u16::from_be_bytes(*checksum);
        // RFC 1624: HC' = ~(~HC + ~m + m'), in ones' complement arithmetic.
        let mut acc = u32::from(!sum) + u32::from(!old) + u32::from(host);
        acc = (acc & 0xffff) + (acc >> 16);
        acc = (acc & 0xffff) + (acc >> 16);
        *checksum = (!(acc as u16)).to_be_bytes();
        *source = host.to_be_bytes();
    }
    XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
