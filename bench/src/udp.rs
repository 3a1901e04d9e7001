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
