//! Three questions to a network device through ioctls: which driver it is and its
//! driver-specific statistics (`SIOCETHTOOL`, what `ethtool -i` and `ethtool -S` ask), and its
//! MAC address (`SIOCGIFHWADDR`). The XDP fast path asks them of a veth to learn whether the
//! veth's peer takes XDP frames ([`crate::xdp`]). None needs a privilege. Every `unsafe` block
//! is an ioctl on buffers sized and laid out as `<linux/ethtool.h>` and `<linux/if.h>` say.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `<linux/ethtool.h>` commands.
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
/// The string set of `ethtool -S`'s names.
const ETH_SS_STATS: u32 = 1;
/// `ETH_GSTRING_LEN`: each name's fixed length.
const GSTRING_LEN: usize = 32;
/// More statistics than any driver has; a count above it is refused as implausible.
const MAX_STATS: usize = 1 << 16;

/// `struct ethtool_drvinfo`: the command, then the driver's name and other fixed-size strings
/// and counts, 196 bytes in all.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    rest: [u8; 160],
}

/// `struct ifreq`: the interface's name, then a union 24 bytes long on 64-bit systems (a
/// pointer to the command's buffer for `SIOCETHTOOL`, a `struct sockaddr` for
/// `SIOCGIFHWADDR`). Aligned as the pointer in it.
#[repr(C, align(8))]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    union: [u8; 24],
}

/// The driver of `interface` (in the calling thread's network namespace): `veth`, `mlx5_core`,
/// `virtio_net`, ...
pub fn driver(interface: &str) -> io::Result<String> {
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    ethtool(interface, (&raw mut info).cast())?;
    Ok(c_string(&info.driver))
}

/// The MAC address of `interface` (in the calling thread's network namespace).
pub fn hardware_address(interface: &str) -> io::Result<[u8; 6]> {
    let mut req = if_req(interface)?;
    ioctl(&mut req, libc::SIOCGIFHWADDR)?;
    // struct sockaddr: a two-byte family, then the address.
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&req.union[2..8]);
    Ok(mac)
}

/// The driver-specific statistics of `interface`, by name, as `ethtool -S` lists them.
pub fn stats(interface: &str) -> io::Result<Vec<(String, u64)>> {
    // struct ethtool_sset_info: u32 cmd, u32 reserved, u64 sset_mask, then one u32 per set
    // left in the mask. Held in u64s for the mask's alignment.
    let mask = 1u64 << ETH_SS_STATS;
    let mut sset = [0u64; 3];
    sset[0] = u64_of(ETHTOOL_GSSET_INFO, 0);
    sset[1] = mask;
    ethtool(interface, sset.as_mut_ptr().cast())?;
    if sset[1] & mask == 0 {
        // The driver keeps no statistics of its own (the loopback device, for one).
        return Ok(Vec::new());
    }
    let count = u32_at(&sset[2].to_ne_bytes(), 0) as usize;
    if count > MAX_STATS {
        return Err(io::Error::other(format!(
            "{interface}'s driver claims {count} statistics"
        )));
    }
    // struct ethtool_gstrings: cmd, string_set, len, then len names.
    let mut names = vec![0u8; 12 + count * GSTRING_LEN];
    names[..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    names[4..8].copy_from_slice(&ETH_SS_STATS.to_ne_bytes());
    names[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
    ethtool(interface, names.as_mut_ptr().cast())?;
    // struct ethtool_stats: u32 cmd, u32 n_stats, then n_stats u64 values.
    let mut values = vec![0u64; 1 + count];
    values[0] = u64_of(ETHTOOL_GSTATS, count as u32);
    ethtool(interface, values.as_mut_ptr().cast())?;
    // The kernel fills the names and values in the same order; it may have written fewer
    // names than asked for if the count changed meanwhile, which `len` then says.
    let written = u32_at(&names, 8) as usize;
    Ok(names[12..]
        .chunks_exact(GSTRING_LEN)
        .take(written.min(count))
        .zip(&values[1..])
        .map(|(name, value)| (c_string(name), *value))
        .collect())
}

/// The sum of `interface`'s statistics whose name ends in `suffix` (one per queue, as
/// `tx_queue_0_xdp_xmit`, `tx_queue_1_xdp_xmit`, ...).
pub fn sum_of(interface: &str, suffix: &str) -> io::Result<u64> {
    Ok(stats(interface)?
        .iter()
        .filter(|(name, _)| name.ends_with(suffix))
        .map(|(_, value)| *value)
        .fold(0, u64::wrapping_add))
}

/// The value of `interface`'s statistic `name`, if it has one.
pub fn stat(interface: &str, name: &str) -> io::Result<Option<u64>> {
    Ok(stats(interface)?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, value)| value))
}

/// `SIOCETHTOOL` on `interface` with the command buffer at `data`, which must be laid out as
/// the command in its first four bytes requires and sized for what the kernel writes.
fn ethtool(interface: &str, data: *mut c_void) -> io::Result<()> {
    let mut req = if_req(interface)?;
    req.union[..size_of::<usize>()].copy_from_slice(&(data as usize).to_ne_bytes());
    ioctl(&mut req, libc::SIOCETHTOOL)
}

/// An ifreq naming `interface`, its union zeroed.
fn if_req(interface: &str) -> io::Result<IfReq> {
    let bytes = interface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{interface:?} is not an interface name"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        union: [0; 24],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    Ok(req)
}

/// ioctl `request` with `req` on a fresh datagram socket.
fn ioctl(req: &mut IfReq, request: libc::Ioctl) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor just opened and owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `req` is a valid ifreq, borrowed for the call. For SIOCETHTOOL its pointer is
    // to a buffer `ethtool`'s callers laid out as the command requires and sized for what the
    // kernel writes (from the counts the kernel itself gave), alive until they return.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, std::ptr::from_mut(req)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Two u32 fields that follow each other in memory, as one u64 holds them.
fn u64_of(first: u32, second: u32) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&first.to_ne_bytes());
    bytes[4..].copy_from_slice(&second.to_ne_bytes());
    u64::from_ne_bytes(bytes)
}

/// The u32 at byte `at` of `bytes`.
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// A NUL-padded C string field as text.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_names_are_refused_and_a_device_without_statistics_has_none() {
        for bad in ["", "a-name-far-too-long", "nul\0byte"] {
            assert_eq!(
                driver(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
            assert_eq!(stats(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
        assert!(driver("no-such-if0").is_err());
        assert!(stats("no-such-if0").is_err());
        // Every namespace has a loopback device, and its driver keeps no statistics.
        assert_eq!(stats("lo").unwrap(), Vec::new());
        assert_eq!(sum_of("lo", "_xdp_xmit").unwrap(), 0);
        assert_eq!(stat("lo", "peer_ifindex").unwrap(), None);
        assert_eq!(hardware_address("lo").unwrap(), [0; 6]);
        assert!(hardware_address("no-such-if0").is_err());
    }

    #[test]
    fn fields_are_laid_out_as_the_kernel_reads_them() {
        let packed = u64_of(7, 9).to_ne_bytes();
        assert_eq!(u32_at(&packed, 0), 7);
        assert_eq!(u32_at(&packed, 4), 9);
        assert_eq!(size_of::<DrvInfo>(), 196);
        assert_eq!(size_of::<IfReq>(), 40);
    }

    #[test]
    fn c_strings_end_at_the_first_nul() {
        assert_eq!(c_string(b"veth\0\0\0"), "veth");
        assert_eq!(c_string(b"full"), "full");
    }
}
