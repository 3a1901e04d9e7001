//! Batched UDP with `sendmmsg(2)` / `recvmmsg(2)`, for load generators, sinks and the plain
//! baseline forwarder. The only unsafe code of the bench crate; every block says why.
#![allow(unsafe_code)]

use std::io;
use std::mem::zeroed;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Largest datagram a batch slot holds.
pub const SLOT: usize = 2048;

/// `n` datagram slots with their headers, reused for every call.
pub struct Batch {
    bufs: Vec<[u8; SLOT]>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    /// The headers of GSO sends, made on the first one.
    gso: Option<GsoHeaders>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("slots", &self.bufs.len())
            .finish()
    }
}

fn to_storage(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    let sa = socket2::SockAddr::from(addr);
    let len = sa.len();
    // SAFETY: `sa` holds `len` valid bytes of a socket address, and sockaddr_storage is large
    // enough for any of them; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr().cast::<u8>(),
            (out as *mut libc::sockaddr_storage).cast::<u8>(),
            len as usize,
        );
    }
    len
}

impl Batch {
    /// A batch of `n` slots.
    pub fn new(n: usize) -> Self {
        let mut batch = Self {
            bufs: vec![[0u8; SLOT]; n],
            iovs: Vec::with_capacity(n),
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { zeroed() }; n],
            hdrs: Vec::with_capacity(n),
            gso: None,
        };
        for i in 0..n {
            batch.iovs.push(libc::iovec {
                iov_base: batch.bufs[i].as_mut_ptr().cast(),
                iov_len: SLOT,
            });
        }
        for i in 0..n {
            // SAFETY: all-zero is a valid mmsghdr; the pointers are filled in right after.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_iov = &mut batch.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_name = (&mut batch.addrs[i] as *mut libc::sockaddr_storage).cast();
            batch.hdrs.push(h);
        }
        batch
    }

    /// Slots in the batch.
    pub fn len(&self) -> usize {
        self.bufs.len()
    }

    /// Whether the batch has no slots.
    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }

    /// Fills every slot with `datagram` addressed to `to`.
    pub fn fill(&mut self, datagram: &[u8], to: SocketAddr) {
        let len = datagram.len().min(SLOT);
        for i in 0..self.bufs.len() {
            self.bufs[i][..len].copy_from_slice(&datagram[..len]);
            self.iovs[i].iov_len = len;
            let name_len = to_storage(to, &mut self.addrs[i]);
            self.hdrs[i].msg_hdr.msg_namelen = name_len;
        }
    }

    /// Fills slot `i` (if it exists) with `datagram` addressed to `to`.
    pub fn fill_slot(&mut self, i: usize, datagram: &[u8], to: SocketAddr) {
        if i >= self.bufs.len() {
            return;
        }
        let len = datagram.len().min(SLOT);
        self.bufs[i][..len].copy_from_slice(&datagram[..len]);
        self.iovs[i].iov_len = len;
        let name_len = to_storage(to, &mut self.addrs[i]);
        self.hdrs[i].msg_hdr.msg_namelen = name_len;
    }

    /// The last `n` bytes of the datagram in slot `i` (as filled), e.g. to write a timestamp
    /// just before sending; `None` when the slot does not exist or holds fewer bytes.
    pub fn tail_mut(&mut self, i: usize, n: usize) -> Option<&mut [u8]> {
        let len = self.iovs.get(i)?.iov_len;
        let start = len.checked_sub(n)?;
        self.bufs.get_mut(i)?.get_mut(start..len)
    }

    /// The first `n` bytes of the datagram in slot `i` (as filled); `None` when the slot does
    /// not exist or holds fewer bytes.
    pub fn head_mut(&mut self, i: usize, n: usize) -> Option<&mut [u8]> {
        if self.iovs.get(i)?.iov_len < n {
            return None;
        }
        self.bufs.get_mut(i)?.get_mut(..n)
    }

    /// Sends the first `n` slots; returns how many the kernel took.
    pub fn send(&mut self, socket: &UdpSocket, n: usize) -> io::Result<usize> {
        let n = n.min(self.hdrs.len());
        // SAFETY: the first `n` headers point at this batch's own buffers, iovecs and
        // addresses, which live as long as `self` and are not moved during the call.
        let sent =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), self.hdrs.as_mut_ptr(), n as u32, 0) };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }

    /// Receives up to a full batch (waiting for the first datagram as the socket's timeout
    /// allows); returns how many arrived. Lengths are in [`datagram`](Self::datagram).
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        for (h, iov) in self.hdrs.iter_mut().zip(self.iovs.iter_mut()) {
            iov.iov_len = SLOT;
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_len = 0;
        }
        // SAFETY: as in `send`; the kernel writes at most SLOT bytes per buffer and at most
        // msg_namelen bytes of address per slot.
        let got = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(got as usize)
        }
    }

    /// The datagram received in slot `i`.
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..(self.hdrs[i].msg_len as usize).min(SLOT)]
    }

    /// Points the first `n` received datagrams at `to` and sends them on `socket`, unchanged:
    /// the plain forwarder's whole job.
    pub fn forward(&mut self, socket: &UdpSocket, n: usize, to: SocketAddr) -> io::Result<usize> {
        for i in 0..n.min(self.hdrs.len()) {
            self.iovs[i].iov_len = self.hdrs[i].msg_len as usize;
            let name_len = to_storage(to, &mut self.addrs[i]);
            self.hdrs[i].msg_hdr.msg_namelen = name_len;
        }
        self.send(socket, n)
    }
}

/// `setsockopt(SOL_UDP, UDP_SEGMENT)` / the cmsg type of a GSO send (linux/udp.h).
const UDP_SEGMENT: libc::c_int = 103;
/// `setsockopt(SOL_UDP, UDP_GRO)` / the cmsg type carrying a coalesced receive's segment size.
const UDP_GRO: libc::c_int = 104;
/// The most segments one GSO send may carry (`UDP_MAX_SEGMENTS` of kernels before 6.10; later
/// ones allow 128).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// The most bytes one GSO send may carry: an IPv4 datagram's limit less its headers.
const GSO_MAX_BYTES: usize = 65_507;
/// Room for one `cmsghdr` with a `u16` or an `int` of data, 8-byte aligned.
const CMSG_ROOM: usize = 32;

/// The headers of GSO sends over a [`Batch`]'s slots: a run of equal-sized datagrams to one
/// address is one message whose iovecs are those slots and whose `UDP_SEGMENT` control message
/// tells the kernel where to cut. One `sendmmsg` then builds one socket buffer per run instead
/// of one per datagram; the interface (or the receiver's stack) cuts it back into datagrams.
struct GsoHeaders {
    hdrs: Vec<libc::mmsghdr>,
    control: Vec<[u64; CMSG_ROOM / 8]>,
    /// The datagrams of each message.
    runs: Vec<usize>,
}

impl Batch {
    /// Sends the first `n` slots as UDP GSO messages: consecutive slots of equal length to the
    /// same address go in one message (at most [`GSO_MAX_SEGMENTS`] and 64 KiB). Returns how
    /// many datagrams the kernel took (whole messages only). `EIO` means the route's interface
    /// cannot checksum in hardware, without which the kernel refuses GSO: send with
    /// [`send`](Self::send) instead.
    pub fn send_gso(&mut self, socket: &UdpSocket, n: usize) -> io::Result<usize> {
        let n = n.min(self.hdrs.len());
        let gso = self.gso.get_or_insert_with(|| GsoHeaders {
            // SAFETY: all-zero is a valid mmsghdr; every field used is set before a send.
            hdrs: vec![unsafe { zeroed() }; self.bufs.len()],
            control: vec![[0u64; CMSG_ROOM / 8]; self.bufs.len()],
            runs: vec![0; self.bufs.len()],
        });
        let same_addr = |a: &libc::sockaddr_storage, b: &libc::sockaddr_storage, len: usize| {
            // SAFETY: both point at whole sockaddr_storage values, of which `len` bytes (at most
            // their size) are compared.
            unsafe {
                std::slice::from_raw_parts((a as *const libc::sockaddr_storage).cast::<u8>(), len)
                    == std::slice::from_raw_parts(
                        (b as *const libc::sockaddr_storage).cast::<u8>(),
                        len,
                    )
            }
        };
        let mut messages = 0;
        let mut i = 0;
        while i < n {
            let segment = self.iovs[i].iov_len;
            let name_len = self.hdrs[i].msg_hdr.msg_namelen;
            let most = GSO_MAX_SEGMENTS.min((GSO_MAX_BYTES / segment.max(1)).max(1));
            let mut count = 1;
            while i + count < n
                && count < most
                && self.iovs[i + count].iov_len == segment
                && self.hdrs[i + count].msg_hdr.msg_namelen == name_len
                && same_addr(&self.addrs[i], &self.addrs[i + count], name_len as usize)
            {
                count += 1;
            }
            let h = &mut gso.hdrs[messages];
            h.msg_len = 0;
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = name_len;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = count as _;
            h.msg_hdr.msg_flags = 0;
            if count > 1 {
                let control = &mut gso.control[messages];
                h.msg_hdr.msg_control = control.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = CMSG_ROOM as _;
                // SAFETY: msg_control points at CMSG_ROOM bytes of 8-byte aligned memory owned
                // by `gso`, enough for one cmsghdr and a u16, as CMSG_SPACE(2) says; CMSG_FIRSTHDR
                // and CMSG_DATA stay inside it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment as u16);
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
                }
            } else {
                h.msg_hdr.msg_control = std::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
            }
            gso.runs[messages] = count;
            messages += 1;
            i += count;
        }
        // SAFETY: the first `messages` headers point at this batch's own iovecs, addresses and
        // control buffers, which live as long as `self` and do not move during the call.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                gso.hdrs.as_mut_ptr(),
                messages as u32,
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(gso.runs[..sent as usize].iter().sum())
    }
}

/// Turns UDP GRO on or off for `socket`: with it on, the kernel may hand over several datagrams
/// of one flow as one buffer, which [`GroBatch`] cuts apart.
pub fn set_gro(socket: &UdpSocket, on: bool) -> io::Result<()> {
    let one: libc::c_int = on.into();
    // SAFETY: a valid descriptor, and a pointer to a c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Largest buffer one GRO receive fills.
const GRO_SLOT: usize = 65_536;

/// `recvmmsg` into 64 KiB slots on a socket with UDP GRO on: each slot may hold several
/// datagrams of one flow, all `segment` bytes but the last, which [`datagrams`](Self::datagrams)
/// cuts apart again.
pub struct GroBatch {
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    control: Vec<[u64; CMSG_ROOM / 8]>,
    hdrs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for GroBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroBatch")
            .field("slots", &self.hdrs.len())
            .finish()
    }
}

impl GroBatch {
    /// `n` slots of 64 KiB.
    pub fn new(n: usize) -> Self {
        let mut batch = Self {
            bufs: vec![0u8; n * GRO_SLOT],
            iovs: Vec::with_capacity(n),
            control: vec![[0u64; CMSG_ROOM / 8]; n],
            hdrs: Vec::with_capacity(n),
        };
        for i in 0..n {
            let base = batch.bufs[i * GRO_SLOT..].as_mut_ptr();
            batch.iovs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: GRO_SLOT,
            });
        }
        for i in 0..n {
            // SAFETY: all-zero is a valid mmsghdr; the pointers are filled in right after.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_iov = &mut batch.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            batch.hdrs.push(h);
        }
        batch
    }

    /// Receives up to a full batch (waiting for the first as the socket's timeout allows);
    /// returns how many buffers arrived.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        for (i, h) in self.hdrs.iter_mut().enumerate() {
            h.msg_len = 0;
            h.msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CMSG_ROOM as _;
            h.msg_hdr.msg_flags = 0;
        }
        // SAFETY: every header points at this batch's own slot, iovec and control buffer, which
        // live as long as `self`; the kernel writes at most iov_len and msg_controllen bytes.
        let got = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(got as usize)
        }
    }

    /// The datagrams in buffer `i`: one, or several of `segment` bytes (the last may be shorter)
    /// when the kernel coalesced them.
    pub fn datagrams(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(GRO_SLOT);
        let mut segment = len;
        // SAFETY: msg_control and msg_controllen are as the kernel left them after `recv`,
        // within this batch's control buffer; CMSG_FIRSTHDR/NXTHDR stay inside it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    let size = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    if size > 0 {
                        segment = size as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        self.bufs[i * GRO_SLOT..i * GRO_SLOT + len].chunks(segment.max(1))
    }
}

impl Batch {
    /// Fills slot `i` (if it exists) with `frame` and no address: for a socket that is bound
    /// to where everything goes (a packet socket bound to an interface).
    pub fn fill_slot_unaddressed(&mut self, i: usize, frame: &[u8]) {
        if i >= self.bufs.len() {
            return;
        }
        let len = frame.len().min(SLOT);
        self.bufs[i][..len].copy_from_slice(&frame[..len]);
        self.iovs[i].iov_len = len;
        self.hdrs[i].msg_hdr.msg_namelen = 0;
        self.hdrs[i].msg_hdr.msg_name = std::ptr::null_mut();
    }
}

/// An `AF_PACKET` socket that sends whole Ethernet frames out of interface `ifindex`,
/// bypassing the qdisc: the cheapest way for one core to put frames on a (veth) link. It
/// receives nothing (protocol 0). Returned as a `UdpSocket` only to carry the descriptor to
/// [`Batch::send`].
pub fn packet_socket(ifindex: u32) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, None)?;
    let one: libc::c_int = 1;
    // SAFETY: a valid descriptor, and a pointer to a c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_ll; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: `addr` is a valid sockaddr_ll and the length given is its size.
    let rc = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s.into())
}

/// Pins the calling thread to `cpu`, best effort.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks `cpu`; the call only reads the set
    // and affects the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Pins thread (or process) `tid` to `cpu`.
pub fn pin_pid(tid: u32, cpu: usize) -> io::Result<()> {
    // SAFETY: as in `pin_to`; the call affects thread `tid` only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid as libc::pid_t, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A UDP socket on `addr` with 8 MiB buffers each way: forced past `net.core.rmem_max` /
/// `wmem_max` when the process may (`SO_RCVBUFFORCE`, as `ferry-relay` does for its own
/// sockets), else as large as those limits allow. So the generator, the sink and the
/// baseline forwarders queue as much as the relay under test does.
pub fn socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    const BYTES: libc::c_int = 8 << 20;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |option: libc::c_int| {
            // SAFETY: a valid descriptor, and a pointer to a c_int of the size given.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&BYTES as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            // Not allowed (no CAP_NET_ADMIN): capped by the sysctl, which is no error.
            let _ = set(plain);
        }
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Lets the calling thread's sleeps end as close to their deadline as the kernel can (timer
/// slack 1 ns instead of the default 50 µs), so a paced generator keeps its rate.
pub fn fine_timer_slack() -> io::Result<()> {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and only changes the calling thread's
    // timer slack.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_whole() {
        let rx = socket("127.0.0.1:0".parse().unwrap()).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let tx = socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut out = Batch::new(16);
        out.fill(b"sixteen of these", rx.local_addr().unwrap());
        assert_eq!(out.send(&tx, 16).unwrap(), 16);
        let mut inb = Batch::new(64);
        let mut got = 0;
        while got < 16 {
            let n = inb.recv(&rx).unwrap();
            for i in 0..n {
                assert_eq!(inb.datagram(i), b"sixteen of these");
            }
            got += n;
        }
        assert_eq!(got, 16);
    }
}
