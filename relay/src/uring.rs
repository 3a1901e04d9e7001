//! All of the relay's unsafe io_uring plumbing, in one module.
//!
//! - [`BufRing`]: a provided-buffer ring. The kernel picks a free buffer for each received
//!   datagram; we give it back once we are done with the bytes, which for a forwarded datagram
//!   is when its send completes, so forwarding never copies.
//! - [`SendSlab`]: fixed storage for in-flight sends (message header, iovec, destination
//!   address), so every pointer handed to the kernel stays valid until its completion.
//! - [`Ring`]: the ring with its buffer ring and send slab, the operations the worker needs
//!   (multishot `recvmsg`, `sendmsg`) and completion decoding.
//!
//! # Memory lent to the kernel
//!
//! The buffer ring (its entries and buffers, also registered as fixed buffer 0 for zero-copy
//! sends), the receive headers and the send slab are lent to the kernel while any request
//! that points into them is in flight. Closing the ring does *not* end those requests: the
//! kernel cancels them asynchronously, from a workqueue, after `close` has returned, and a
//! zero-copy send's buffers stay in use until its notification, however long the network
//! holds the packet. So [`Ring`] tracks, from the completions it reaps, which multishot
//! receives are still armed and which sends the kernel has not finished with (a send is
//! finished by its completion without `IORING_CQE_F_MORE`: the result of a plain send, the
//! notification of a zero-copy one). [`Ring::shutdown`] (and `Drop for Ring`, as the
//! backstop) cancels everything, waits a bounded time until nothing is in flight, unregisters
//! the buffers and only then frees the memory. If the kernel is still not done by then, the
//! memory is leaked, never freed under it. Every `unsafe` block says why it is sound.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::mem::{ManuallyDrop, size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};

/// Buffer group id of the relay's only buffer ring.
const BGID: u16 = 0;

/// Why io_uring cannot be used here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UringError {
    /// The kernel refused to create a ring (too old, or `kernel.io_uring_disabled`).
    #[error(
        "io_uring is unavailable ({0}); check `sysctl kernel.io_uring_disabled` (must be 0) and \
         that the kernel is 6.1 or newer"
    )]
    Setup(io::Error),
    /// The kernel lacks an operation the relay needs.
    #[error("the kernel's io_uring lacks {0}; Ferry needs Linux 6.1 or newer")]
    Unsupported(&'static str),
    /// Registering the provided-buffer ring failed (needs Linux 5.19+ and locked memory).
    #[error("registering the io_uring buffer ring failed ({0}); check `ulimit -l` / LimitMEMLOCK")]
    BufRing(io::Error),
    /// Submitting to the ring failed.
    #[error("io_uring submit failed: {0}")]
    Submit(io::Error),
}

/// A ring of provided buffers the kernel fills with received datagrams.
pub(crate) struct BufRing {
    entries: *mut BufRingEntry,
    entries_layout: Layout,
    count: u16,
    /// Our copy of the ring's tail; published to the kernel after each give-back.
    tail: u16,
    buffers: Box<[u8]>,
    buf_size: usize,
}

impl BufRing {
    /// `count` buffers (a power of two, at most 32768) of `buf_size` bytes each, all free.
    pub fn new(count: u16, buf_size: usize) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two up to 32768",
            ));
        }
        let entries_layout =
            Layout::from_size_align(usize::from(count) * size_of::<BufRingEntry>(), 4096)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size (count >= 1) and a valid alignment.
        let entries = unsafe { alloc_zeroed(entries_layout) }.cast::<BufRingEntry>();
        if entries.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "buffer ring"));
        }
        let mut ring = Self {
            entries,
            entries_layout,
            count,
            tail: 0,
            buffers: vec![0u8; usize::from(count) * buf_size].into_boxed_slice(),
            buf_size,
        };
        for bid in 0..count {
            ring.push(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Registers the ring with `ring`'s kernel side under [`BGID`].
    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: `entries` points to `count` zero-initialised-then-filled entries in a
        // page-aligned allocation that lives as long as `self`. `Ring` frees `self` only after
        // its shutdown found no request in flight and unregistered the ring, and leaks it
        // otherwise, so the kernel never reads freed entries or writes freed buffers.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(self.entries as u64, self.count, BGID, 0)
        }
    }

    /// Writes buffer `bid` into the next ring slot (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot < count`, so the pointer stays inside the entries allocation; the
        // kernel only reads slots between its head and our published tail, and this slot is
        // beyond the published tail until `publish`.
        let entry = unsafe { &mut *self.entries.add(slot) };
        let offset = usize::from(bid) * self.buf_size;
        entry.set_addr(self.buffers[offset..].as_ptr() as u64);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: `entries` is the base of an initialised buffer ring; `tail` returns the
        // address of its shared tail field, which is a u16 the kernel reads atomically.
        let tail = unsafe { &*BufRingEntry::tail(self.entries).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn give_back(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    /// The first `len` bytes of buffer `bid`.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.buf_size;
        &self.buffers[start..start + len.min(self.buf_size)]
    }

    /// The address of byte `offset` of buffer `bid`, for a send iovec.
    fn ptr(&self, bid: u16, offset: usize) -> *const u8 {
        self.buffers[usize::from(bid) * self.buf_size + offset..].as_ptr()
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this exact layout, freed once. A registered
        // `BufRing` is dropped only by `Drop for Ring`, after it was unregistered with no
        // request in flight (otherwise it is leaked and never gets here).
        unsafe { dealloc(self.entries.cast(), self.entries_layout) };
    }
}

/// Most datagrams one GSO send carries.
pub const MAX_SEGMENTS: usize = 64;

/// Largest total payload of one GSO send (a UDP datagram's limit, with headroom).
pub const MAX_GSO_BYTES: usize = 65_000;

struct SendSlot {
    hdr: libc::msghdr,
    iovs: [libc::iovec; MAX_SEGMENTS],
    addr: libc::sockaddr_storage,
    /// Control message space for UDP_SEGMENT (a cmsghdr and a u16, aligned).
    control: [u64; 4],
    /// Receive buffers this send forwards, given back on completion.
    bids: [u16; MAX_SEGMENTS],
    nbids: usize,
    /// Datagrams this send carries.
    segments: usize,
    /// Sent with SEND_ZC: the buffers stay lent until the kernel's notification.
    zero_copy: bool,
    reply: [u8; ferry_core::wire::MAX_DATAGRAM],
}

/// Fixed storage for in-flight sends; a slot's pointers stay valid until it is freed.
pub(crate) struct SendSlab {
    slots: Box<[SendSlot]>,
    free: Vec<u32>,
}

impl SendSlab {
    fn new(capacity: u32) -> Self {
        let slots = (0..capacity)
            .map(|_| SendSlot {
                // SAFETY: all-zero is a valid value for these plain C structs.
                hdr: unsafe { zeroed() },
                iovs: [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_SEGMENTS],
                // SAFETY: as above.
                addr: unsafe { zeroed() },
                control: [0; 4],
                bids: [0; MAX_SEGMENTS],
                nbids: 0,
                segments: 0,
                zero_copy: false,
                reply: [0; ferry_core::wire::MAX_DATAGRAM],
            })
            .collect();
        Self {
            slots,
            free: (0..capacity).rev().collect(),
        }
    }
}

/// One received datagram to forward: its buffer and where its bytes start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The receive buffer.
    pub bid: u16,
    /// Offset of the datagram in the buffer.
    pub offset: usize,
}

/// Writes `addr` as a C socket address into `out`; returns its length.
pub fn write_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr type.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a C socket address (as the kernel wrote it into a receive buffer).
pub fn read_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_ne_bytes(name.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// What a completion was for, decoded from its `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// A datagram (or an error) from multishot receive on socket `socket`.
    Recv {
        /// Index of the socket.
        socket: usize,
        /// Bytes received into the selected buffer, or a negative errno.
        result: i32,
        /// The completion flags (buffer id, more).
        flags: u32,
    },
    /// A send finished, or (zero-copy sends) its buffers were released.
    Send {
        /// The slab slot.
        slot: u32,
        /// Bytes sent, or a negative errno.
        result: i32,
        /// The completion flags (`more`: a zero-copy notification follows; `notif`: this is
        /// it).
        flags: u32,
    },
}

const TAG_RECV: u64 = 1 << 62;
const TAG_SEND: u64 = 2 << 62;
/// Requests of the ring's own (the shutdown's cancel); their completions are not reported.
const TAG_CTRL: u64 = 3 << 62;
const TAG_MASK: u64 = 3 << 62;

/// How long dropping a [`Ring`] waits for the kernel to finish with its memory.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(1);

/// What [`Ring::shutdown`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every request ended (zero-copy sends: their notification arrived) within the limit.
    pub drained: bool,
    /// The buffer ring, receive headers and send slab were leaked rather than freed, because
    /// the kernel might still use them.
    pub leaked: bool,
    /// Multishot receives armed when the shutdown began.
    pub armed_at_start: usize,
    /// Sends the kernel had not finished with when the shutdown began.
    pub sends_at_start: usize,
    /// Multishot receives still armed when it ended (0 when drained).
    pub armed_left: usize,
    /// Sends still in the kernel's hands when it ended (0 when drained).
    pub sends_left: usize,
    /// Completions reaped while draining.
    pub completions: usize,
    /// How long it took.
    pub elapsed: Duration,
}

/// A received datagram, borrowed from its provided buffer.
#[derive(Debug)]
pub struct Datagram<'a> {
    /// Who sent it.
    pub from: SocketAddr,
    /// The datagram bytes.
    pub payload: &'a [u8],
    /// Offset of the payload in its buffer (for forwarding it in place).
    pub offset: usize,
}

/// Why a received completion carried no usable datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvProblem {
    /// Longer than the buffer: dropped, never forwarded cut short.
    Truncated,
    /// The source address could not be read.
    BadName,
}

/// One io_uring with its buffer ring, receive headers and send slab.
pub struct Ring {
    ring: IoUring,
    // Memory lent to the kernel: freed by `Drop` only once the shutdown found nothing in
    // flight, leaked otherwise (see the module documentation).
    bufs: ManuallyDrop<BufRing>,
    recv_hdrs: ManuallyDrop<Box<[libc::msghdr]>>,
    slab: ManuallyDrop<SendSlab>,
    sockets: Vec<RawFd>,
    /// Per socket: a multishot receive was queued and its last completion (the one without
    /// `more`) has not been reaped yet.
    armed: Vec<bool>,
    /// Sends queued whose last completion (without `more`: the result, or for a zero-copy
    /// send the notification) has not been reaped yet.
    sends_in_kernel: usize,
    /// Set by the shutdown; `Drop` frees the lent memory only if it says so.
    shut: Option<ShutdownReport>,
    /// Forwards of at least this many bytes use SEND_ZC; `None`: never.
    zero_copy_min: Option<usize>,
    /// The receive buffers are also registered as fixed buffer 0, so zero-copy sends skip
    /// pinning their pages on every send.
    fixed_buffers: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("sockets", &self.sockets.len())
            .field("sends_in_flight", &self.sends_in_flight())
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// A ring of `entries` submission slots, `buffers` receive buffers of `buf_size` bytes and
    /// `sends` in-flight sends, for `sockets` (which must outlive the ring).
    pub fn new(
        entries: u32,
        buffers: u16,
        buf_size: usize,
        sends: u32,
        sockets: Vec<RawFd>,
    ) -> Result<Self, UringError> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .build(entries)
            .map_err(UringError::Setup)?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(UringError::Setup)?;
        if !probe.is_supported(opcode::RecvMsgMulti::CODE) {
            return Err(UringError::Unsupported("multishot recvmsg"));
        }
        if !probe.is_supported(opcode::SendMsg::CODE) {
            return Err(UringError::Unsupported("sendmsg"));
        }
        let bufs = BufRing::new(buffers, buf_size).map_err(UringError::BufRing)?;
        bufs.register(&ring).map_err(UringError::BufRing)?;
        let recv_hdrs = sockets
            .iter()
            .map(|_| {
                // SAFETY: an all-zero msghdr is valid; only the lengths matter to the kernel
                // for multishot recvmsg (the name and control areas live in each buffer).
                let mut hdr: libc::msghdr = unsafe { zeroed() };
                hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                hdr
            })
            .collect();
        Ok(Self {
            ring,
            bufs: ManuallyDrop::new(bufs),
            recv_hdrs: ManuallyDrop::new(recv_hdrs),
            slab: ManuallyDrop::new(SendSlab::new(sends)),
            armed: vec![false; sockets.len()],
            sockets,
            sends_in_kernel: 0,
            shut: None,
            zero_copy_min: None,
            fixed_buffers: false,
        })
    }

    /// Sends forwards of at least `min_bytes` with SEND_ZC (zero copy), if the kernel has it.
    /// Returns whether it will.
    pub fn set_zero_copy_min(&mut self, min_bytes: Option<usize>) -> bool {
        let mut probe = Probe::new();
        let supported = self.ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::SendMsgZc::CODE);
        self.zero_copy_min = min_bytes.filter(|_| supported);
        if self.zero_copy_min.is_some() {
            let region = [libc::iovec {
                iov_base: self.bufs.buffers.as_mut_ptr().cast(),
                iov_len: self.bufs.buffers.len(),
            }];
            // SAFETY: the region is the buffer ring's own memory, which lives as long as `self`;
            // `Drop` unregisters it (with no request in flight) before freeing it, or leaks it.
            self.fixed_buffers = unsafe { self.ring.submitter().register_buffers(&region) }.is_ok();
        }
        self.zero_copy_min.is_some()
    }

    /// Whether zero-copy sends use the registered receive buffers.
    pub fn uses_fixed_buffers(&self) -> bool {
        self.fixed_buffers
    }

    /// Arms (or re-arms) multishot receive on socket `index`.
    pub fn arm_recv(&mut self, index: usize) -> Result<(), UringError> {
        let hdr: *const libc::msghdr = &self.recv_hdrs[index];
        let entry = opcode::RecvMsgMulti::new(types::Fd(self.sockets[index]), hdr, BGID)
            .build()
            .user_data(TAG_RECV | index as u64);
        self.push(&entry)?;
        self.armed[index] = true;
        Ok(())
    }

    fn push(&mut self, entry: &squeue::Entry) -> Result<(), UringError> {
        loop {
            // SAFETY: every pointer in `entry` refers to memory lent to the kernel (receive
            // headers, send slots, buffers), which `Ring` frees only after the operation's
            // last completion has been reaped, and otherwise leaks (see `Drop for Ring`).
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and try again.
            self.ring.submit().map_err(UringError::Submit)?;
        }
    }

    /// Submits queued work and waits for at least `want` completions or `timeout`.
    pub fn submit_and_wait(&mut self, want: usize, timeout: &Timespec) -> Result<(), UringError> {
        let args = SubmitArgs::new().timespec(timeout);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            // The completion queue is full; the caller drains it next.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(UringError::Submit(e)),
        }
    }

    /// Moves every available completion into `out` (cleared first).
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        out.clear();
        for cqe in self.ring.completion() {
            let data = cqe.user_data();
            let index = data & !TAG_MASK;
            let last = !cqueue::more(cqe.flags());
            match data & TAG_MASK {
                TAG_RECV => {
                    if last && let Some(armed) = self.armed.get_mut(index as usize) {
                        *armed = false;
                    }
                    out.push(Completion::Recv {
                        socket: index as usize,
                        result: cqe.result(),
                        flags: cqe.flags(),
                    });
                }
                TAG_SEND => {
                    if last {
                        self.sends_in_kernel = self.sends_in_kernel.saturating_sub(1);
                    }
                    out.push(Completion::Send {
                        slot: index as u32,
                        result: cqe.result(),
                        flags: cqe.flags(),
                    });
                }
                _ => {}
            }
        }
    }

    /// Multishot receives armed now (queued, last completion not reaped).
    pub fn recvs_armed(&self) -> usize {
        self.armed.iter().filter(|&&a| a).count()
    }

    /// Sends the kernel has not finished with (last completion not reaped). Unlike
    /// [`sends_in_flight`](Self::sends_in_flight) this does not wait for
    /// [`finish_send`](Self::finish_send).
    pub fn sends_in_kernel(&self) -> usize {
        self.sends_in_kernel
    }

    /// Whether no request points into the lent memory.
    fn idle(&self) -> bool {
        self.sends_in_kernel == 0 && !self.armed.contains(&true)
    }

    /// Cancels every request and waits, up to `limit`, until none is in flight; then
    /// unregisters the buffers. Queued but unsubmitted requests are submitted first (ahead of
    /// the cancel), so they too end. The report says whether `Drop` may free the memory.
    fn quiesce(&mut self, limit: Duration) -> ShutdownReport {
        let started = Instant::now();
        let deadline = started + limit;
        let mut report = ShutdownReport {
            armed_at_start: self.recvs_armed(),
            sends_at_start: self.sends_in_kernel,
            ..ShutdownReport::default()
        };
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(TAG_CTRL);
        let mut scratch = Vec::new();
        let mut cancel_due = !self.idle();
        loop {
            if cancel_due {
                // Queued behind every unsubmitted request, so it cancels those too. Sent
                // again after each quiet wait, for a request that was not cancellable yet.
                if let Err(e) = self.push(&cancel) {
                    tracing::debug!("queueing the shutdown cancel: {e}");
                }
                cancel_due = false;
            }
            self.drain(&mut scratch);
            report.completions += scratch.len();
            if self.idle() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            let ts = Timespec::from(wait);
            let args = SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => cancel_due = true,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::warn!("waiting for io_uring requests to end at shutdown: {e}");
                    break;
                }
            }
        }
        report.drained = self.idle();
        report.armed_left = self.recvs_armed();
        report.sends_left = self.sends_in_kernel;
        report.leaked = !report.drained;
        if report.drained {
            // Nothing can use the buffers now; unregister them so the kernel holds no
            // reference to memory about to be freed. Should that fail, leak instead.
            if let Err(e) = self.ring.submitter().unregister_buf_ring(BGID) {
                tracing::warn!("unregistering the buffer ring at shutdown: {e}; leaking it");
                report.leaked = true;
            }
            if self.fixed_buffers
                && let Err(e) = self.ring.submitter().unregister_buffers()
            {
                tracing::warn!("unregistering the fixed buffers at shutdown: {e}; leaking them");
                report.leaked = true;
            }
        } else {
            tracing::warn!(
                recvs_armed = report.armed_left,
                sends = report.sends_left,
                limit_ms = limit.as_millis() as u64,
                "io_uring requests still in flight at shutdown; leaking their buffers rather \
                 than freeing memory the kernel may still use"
            );
        }
        report.elapsed = started.elapsed();
        report
    }

    /// Cancels every request, waits up to `limit` for the kernel to finish with the ring's
    /// memory (zero-copy notifications included), then closes the ring and frees that memory,
    /// or leaks it (with a warning) if the kernel was not done in time. Dropping a `Ring` does
    /// the same with [`SHUTDOWN_LIMIT`].
    pub fn shutdown(mut self, limit: Duration) -> ShutdownReport {
        let report = self.quiesce(limit);
        self.shut = Some(report);
        report
    }

    /// The datagram of a successful receive completion on socket `socket`, with its buffer
    /// id. The buffer stays ours until [`give_back`](Self::give_back) or a forward's
    /// completion.
    pub fn datagram(
        &self,
        socket: usize,
        result: i32,
        flags: u32,
    ) -> Option<(u16, Result<Datagram<'_>, RecvProblem>)> {
        let bid = cqueue::buffer_select(flags)?;
        let len = usize::try_from(result).ok()?;
        let buffer = self.bufs.bytes(bid, len);
        let parsed = match RecvMsgOut::parse(buffer, &self.recv_hdrs[socket]) {
            Err(()) => Err(RecvProblem::Truncated),
            Ok(out) if out.is_payload_truncated() => Err(RecvProblem::Truncated),
            Ok(out) => match read_sockaddr(out.name_data()) {
                None => Err(RecvProblem::BadName),
                Some(from) => {
                    let payload = out.payload_data();
                    let offset = payload.as_ptr() as usize - buffer.as_ptr() as usize;
                    let len = payload.len();
                    Ok(Datagram {
                        from,
                        payload: &buffer[offset..offset + len],
                        offset,
                    })
                }
            },
        };
        Some((bid, parsed))
    }

    /// Gives a receive buffer back to the kernel.
    pub fn give_back(&mut self, bid: u16) {
        self.bufs.give_back(bid);
    }

    /// Queues one send of `segments` (received datagrams of `len` bytes each, in their
    /// receive buffers, not copied) to `to` on socket `socket`. With more than one segment it
    /// is a UDP GSO send: one system-level send, split by the kernel into `len`-byte
    /// datagrams. Returns false (and the caller gives the buffers back) if every send slot is
    /// in use.
    pub fn send_forward(
        &mut self,
        socket: usize,
        segments: &[Segment],
        len: usize,
        to: SocketAddr,
    ) -> Result<bool, UringError> {
        let Some(slot) = self.slab.free.pop() else {
            return Ok(false);
        };
        let n = segments.len().min(MAX_SEGMENTS);
        let s = &mut self.slab.slots[slot as usize];
        for (i, seg) in segments[..n].iter().enumerate() {
            s.iovs[i] = libc::iovec {
                iov_base: self.bufs.ptr(seg.bid, seg.offset).cast_mut().cast(),
                iov_len: len,
            };
            s.bids[i] = seg.bid;
        }
        s.nbids = n;
        s.segments = n;
        s.zero_copy = self.zero_copy_min.is_some_and(|min| n * len >= min);
        let gso = (n > 1).then_some(len);
        self.submit_send(socket, slot, to, n, gso)
    }

    /// Queues a send of a copy of `bytes` to `to` on socket `socket`. Returns false if every
    /// send slot is in use.
    pub fn send_reply(
        &mut self,
        socket: usize,
        bytes: &[u8],
        to: SocketAddr,
    ) -> Result<bool, UringError> {
        let Some(slot) = self.slab.free.pop() else {
            return Ok(false);
        };
        let n = bytes.len().min(ferry_core::wire::MAX_DATAGRAM);
        let s = &mut self.slab.slots[slot as usize];
        s.reply[..n].copy_from_slice(&bytes[..n]);
        s.iovs[0] = libc::iovec {
            iov_base: s.reply.as_mut_ptr().cast(),
            iov_len: n,
        };
        s.nbids = 0;
        s.segments = 1;
        s.zero_copy = false;
        self.submit_send(socket, slot, to, 1, None)
    }

    /// Fills in slot `slot`'s message header (address, `iovs` iovecs, and a UDP_SEGMENT
    /// control message when `gso` is set) and queues its `sendmsg`.
    fn submit_send(
        &mut self,
        socket: usize,
        slot: u32,
        to: SocketAddr,
        iovs: usize,
        gso: Option<usize>,
    ) -> Result<bool, UringError> {
        let s = &mut self.slab.slots[slot as usize];
        let addr_len = write_sockaddr(to, &mut s.addr);
        s.hdr.msg_name = (&mut s.addr as *mut libc::sockaddr_storage).cast();
        s.hdr.msg_namelen = addr_len;
        s.hdr.msg_iov = s.iovs.as_mut_ptr();
        s.hdr.msg_iovlen = iovs;
        match gso {
            Some(size) => {
                // SAFETY: CMSG_SPACE is a pure size computation.
                let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
                s.hdr.msg_control = s.control.as_mut_ptr().cast();
                s.hdr.msg_controllen = space;
                // SAFETY: msg_control points at `control` (32 bytes, 8-aligned), which holds
                // CMSG_SPACE(2) = 24 bytes, so CMSG_FIRSTHDR is non-null and the header and its
                // u16 payload fit.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&s.hdr);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size as u16);
                }
            }
            None => {
                s.hdr.msg_control = std::ptr::null_mut();
                s.hdr.msg_controllen = 0;
            }
        }
        let hdr: *const libc::msghdr = &s.hdr;
        let fd = types::Fd(self.sockets[socket]);
        let entry = match (s.zero_copy, self.fixed_buffers && s.nbids > 0) {
            // Forwards point into the registered receive buffers: fixed buffer 0.
            (true, true) => opcode::SendMsgZc::new(fd, hdr).buf_index(Some(0)).build(),
            (true, false) => opcode::SendMsgZc::new(fd, hdr).build(),
            (false, _) => opcode::SendMsg::new(fd, hdr).build(),
        };
        self.push(&entry.user_data(TAG_SEND | u64::from(slot)))?;
        self.sends_in_kernel += 1;
        Ok(true)
    }

    /// Datagrams the send in `slot` carries.
    pub fn send_segments(&self, slot: u32) -> usize {
        self.slab.slots[slot as usize].segments
    }

    /// Frees a send slot once the kernel is done with it (its completion, or for a zero-copy
    /// send its notification), giving its receive buffers back.
    pub fn finish_send(&mut self, slot: u32) {
        let s = &self.slab.slots[slot as usize];
        let (nbids, bids) = (s.nbids, s.bids);
        for &bid in &bids[..nbids] {
            self.bufs.give_back(bid);
        }
        self.slab.free.push(slot);
    }

    /// Send slots in use now.
    pub fn sends_in_flight(&self) -> usize {
        self.slab.slots.len() - self.slab.free.len()
    }

    /// Whether a receive completion says the multishot receive is still armed.
    pub fn still_armed(flags: u32) -> bool {
        cqueue::more(flags)
    }

    /// The address family a socket index serves, for choosing the socket to send on.
    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let report = match self.shut {
            Some(report) => report,
            None => self.quiesce(SHUTDOWN_LIMIT),
        };
        if report.leaked {
            // The fields are `ManuallyDrop`: the kernel may still use this memory, so it stays
            // allocated for the rest of the process.
            return;
        }
        // SAFETY: the shutdown reaped the last completion of every request (no receive armed,
        // every send's result and zero-copy notification seen) and unregistered the buffer
        // ring and fixed buffers, so the kernel holds no pointer into these; each is dropped
        // once, here, and not used after (the ring is only closed after this).
        unsafe {
            ManuallyDrop::drop(&mut self.slab);
            ManuallyDrop::drop(&mut self.recv_hdrs);
            ManuallyDrop::drop(&mut self.bufs);
        }
    }
}

/// Whether `ip` is IPv4 (including IPv4-mapped IPv6, which a v6-only socket cannot reach).
pub fn is_v4(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_through_c_structs() {
        for text in [
            "198.18.0.1:7000",
            "[2001:db8::1]:443",
            "[2001:db8::2%3]:1",
            "0.0.0.0:0",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
            let len = write_sockaddr(addr, &mut storage) as usize;
            // SAFETY: storage is plain bytes of at least `len` initialised bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&storage as *const libc::sockaddr_storage).cast::<u8>(),
                    len,
                )
            };
            assert_eq!(read_sockaddr(bytes), Some(addr), "{text}");
        }
        assert_eq!(read_sockaddr(&[0; 3]), None);
        assert_eq!(read_sockaddr(&[0xff; 28]), None);
    }

    #[test]
    fn buffer_ring_sizes_are_checked() {
        assert!(BufRing::new(3, 2048).is_err());
        assert!(BufRing::new(0, 2048).is_err());
        let ring = BufRing::new(8, 2048).unwrap();
        assert_eq!(ring.tail, 8, "every buffer starts out given to the kernel");
    }
}
