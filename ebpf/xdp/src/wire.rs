//! `ferry_wire`: one end of an XDP "wire" for `ferry-bench run --xdp-wire`, never attached by
//! the relay. Attached to a veth, it redirects every frame it receives to the one interface in
//! [`WIRE_OUT`], whose veth peer then receives it as an XDP frame in a page of its own, as a
//! NIC driver receives into its DMA pages, instead of as a socket buffer, which a veth copies
//! into a fresh page before it runs a native XDP program (docs/bench.md).
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action::XDP_ABORTED;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::DevMap;
use aya_ebpf::programs::XdpContext;

/// Index 0: the interface every frame leaves by.
#[map(name = "WIRE_OUT")]
static WIRE_OUT: DevMap = DevMap::with_max_entries(1, 0);

#[xdp]
pub fn ferry_wire(_ctx: XdpContext) -> u32 {
    WIRE_OUT.redirect(0, 0).unwrap_or(XDP_ABORTED)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
