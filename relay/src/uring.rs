//! All of the relay's unsafe io_uring plumbing, in one module.
//!
//! - `BufRing`: a provided-buffer ring. The kernel picks a free buffer for each received
//!   datagram; we give it back once we are done with the bytes, which for a forwarded datagram
//!   is when its send completes, so forwarding never copies. The buffers are memory the kernel
//!   writes into, so they are held as a raw pointer and read only through `unsafe` accessors
//!   ([`Ring::datagram`]) whose caller vouches that the kernel has handed the buffer over.
//! - `SendSlab`: fixed storage for in-flight sends (message header, iovec, destination
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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use socket2::SockAddr;

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
    /// The kernel could not allocate the ring's memory, also after a few tries.
    #[error(
        "the kernel could not allocate memory for an io_uring ({0}), also after {SETUP_TRIES} \
         tries; check free memory and the memory limit of the service"
    )]
    NoMemory(io::Error),
    /// The kernel lacks an operation the relay needs.
    #[error("the kernel's io_uring lacks {0}; Ferry needs Linux 6.1 or newer")]
    Unsupported(&'static str),
    /// Registering the provided-buffer ring failed (needs Linux 5.19+ and locked memory).
    #[error("registering the io_uring buffer ring failed ({0}); check `ulimit -l` / LimitMEMLOCK")]
    BufRing(io::Error),
    /// Submitting to the ring failed.
    #[error("io_uring submit failed: {0}")]
    Submit(io::Error),
    /// A forward named more than [`MAX_SEGMENTS`] datagrams, or bytes outside the receive
    /// buffers userspace holds (a bug in the caller; nothing was sent).
    #[error("a forward named too many datagrams or bytes outside the receive buffers held")]
    BadSegment,
}

/// A ring of provided buffers the kernel fills with received datagrams.
///
/// The buffers are one allocation the kernel writes into whenever it owns a buffer, so this
/// type never holds a Rust reference to it: it keeps a raw pointer and hands out a buffer's
/// bytes only through the `unsafe` [`BufRing::bytes`], whose caller vouches that the kernel has
/// handed that buffer to userspace (as s2n-quic-xdp's `Umem` does for its frames). A buffer
/// belongs to the kernel from [`BufRing::give_back`] (or `new`) until a receive completion
/// names it ([`BufRing::take`]), and to userspace from then until its last reference is given
/// back. Userspace counts references: the completion holds one, and each send that forwards
/// bytes of the buffer takes one more ([`BufRing::retain`]), since with UDP GRO one buffer
/// holds several datagrams that may leave in different sends. The ring keeps track, so a
/// buffer is never given to the kernel twice, nor while a send still reads it.
///
/// # Lending only what the load needs
///
/// The kernel takes buffers in the order they were lent, so with every buffer lent each
/// datagram lands in the buffer used longest ago: below saturation, when datagrams come one
/// at a time, that is a buffer whose page and cache lines went cold long before (256 buffers
/// of 68 KiB, one datagram a millisecond: the buffer was last written a quarter of a second
/// earlier). So the ring lends the kernel only a window of buffers, [`MIN_LENT`] to start
/// with, and keeps the rest back as spares. One at a time, the same few buffers go round and
/// stay warm. When a drain finds the kernel used the whole window, or ran out
/// ([`BufRing::after_drain`]), the window grows fourfold at once (to the whole ring in three
/// steps, since a backlog must not wait for buffers; meanwhile its datagrams wait in the
/// socket's queue); after [`QUIET_DRAINS`] drains in a row that used a quarter of it or less,
/// it halves. A buffer given back goes on top of the spares, which are lent last-given-back
/// first for the same reason, whenever fewer than the window are lent.
pub(crate) struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    count: u16,
    /// Our copy of the ring's tail; published to the kernel after each give-back.
    tail: u16,
    /// `count` buffers of `buf_size` bytes, back to back, allocated with `buffers_layout`.
    buffers: NonNull<u8>,
    buffers_layout: Layout,
    buf_size: usize,
    /// Per buffer: the references userspace holds (0: the kernel owns it, or it is a spare).
    refs: Box<[u16]>,
    /// Buffers neither lent nor held, the one given back last on top.
    spare: Vec<u16>,
    /// Buffers lent to the kernel that no completion has named yet.
    lent: u16,
    /// How many buffers to keep lent: from `min_lent` to `count`.
    window: u16,
    /// The smallest window: [`MIN_LENT`] (or `count`, if smaller) unless set otherwise.
    min_lent: u16,
    /// Drains in a row that found the kernel used a quarter of the window or less.
    quiet: u16,
}

/// The fewest buffers lent to the kernel at a time: the window below saturation.
pub const MIN_LENT: u16 = 8;

/// Drains in a row that used at most a quarter of the window before the window halves: at one
/// datagram a millisecond, 64 ms after a burst.
pub(crate) const QUIET_DRAINS: u16 = 64;

/// Allocates `layout` zeroed, or fails with `what` in the error.
fn alloc_region(layout: Layout, what: &str) -> io::Result<NonNull<u8>> {
    // SAFETY: callers pass layouts with a non-zero size (checked by `BufRing::new`).
    let ptr = unsafe { alloc_zeroed(layout) };
    NonNull::new(ptr).ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, what.to_owned()))
}

impl BufRing {
    /// `count` buffers (a power of two, at most 32768) of `buf_size` bytes each (at most
    /// `u32::MAX`); the first [`MIN_LENT`] (or all, if fewer) are lent to the kernel.
    pub fn new(count: u16, buf_size: usize) -> io::Result<Self> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
        if !count.is_power_of_two() || count > 32768 {
            return Err(invalid("buffer count must be a power of two up to 32768"));
        }
        if buf_size == 0 || u32::try_from(buf_size).is_err() {
            return Err(invalid("buffer size must be between 1 and u32::MAX bytes"));
        }
        let total = usize::from(count)
            .checked_mul(buf_size)
            .ok_or_else(|| invalid("buffer ring too large"))?;
        let page = |size| {
            Layout::from_size_align(size, 4096)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        };
        let entries_layout = page(usize::from(count) * size_of::<BufRingEntry>())?;
        let buffers_layout = page(total)?;
        let entries = alloc_region(entries_layout, "buffer ring entries")?.cast::<BufRingEntry>();
        let buffers = match alloc_region(buffers_layout, "receive buffers") {
            Ok(buffers) => buffers,
            Err(e) => {
                // SAFETY: allocated just above with this layout, not shared with anyone yet.
                unsafe { dealloc(entries.as_ptr().cast(), entries_layout) };
                return Err(e);
            }
        };
        let mut ring = Self {
            entries,
            entries_layout,
            count,
            tail: 0,
            buffers,
            buffers_layout,
            buf_size,
            refs: vec![0; usize::from(count)].into_boxed_slice(),
            spare: (0..count).rev().collect(),
            lent: 0,
            window: MIN_LENT.min(count),
            min_lent: MIN_LENT.min(count),
            quiet: 0,
        };
        ring.lend_spares();
        Ok(ring)
    }

    /// Registers the ring with `ring`'s kernel side under [`BGID`].
    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: `entries` points to `count` initialised entries in a page-aligned allocation
        // that lives as long as `self`, each naming a buffer inside `buffers`. `Ring` frees
        // `self` only after its shutdown found no request in flight and unregistered the ring,
        // and leaks it otherwise, so the kernel never reads freed entries or writes freed
        // buffers.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.entries.as_ptr() as u64,
                self.count,
                BGID,
                0,
            )
        }
    }

    /// Writes buffer `bid` (in range) into the next ring slot (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        let addr = self.start(bid) as u64;
        // SAFETY: `slot < count`, so the pointer stays inside the entries allocation; the
        // kernel only reads slots between its head and our published tail, and this slot is
        // beyond the published tail until `publish`, so nothing else accesses it now.
        let entry = unsafe { &mut *self.entries.as_ptr().add(slot) };
        entry.set_addr(addr);
        // Lossless: `new` checked that `buf_size` fits a u32.
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Lends spares, the one given back last first, until the window is lent or none is left.
    fn lend_spares(&mut self) {
        let mut lent_any = false;
        while self.lent < self.window
            && let Some(bid) = self.spare.pop()
        {
            self.push(bid);
            self.lent += 1;
            lent_any = true;
        }
        if lent_any {
            self.publish();
        }
    }

    /// Resizes the window after a drain in which receive completions named `taken` buffers
    /// and, if `starved`, one found none lent. Quadruples it (at least) whenever the kernel
    /// used all of it, or ran out; halves it after [`QUIET_DRAINS`] drains in a row that used
    /// a quarter of it or less. The few datagrams a paced sender's late timer bunches together
    /// use less than the window, so they do not widen it.
    pub fn after_drain(&mut self, taken: usize, starved: bool) {
        let window = usize::from(self.window);
        if starved || taken >= window {
            let wanted = taken.saturating_mul(2).max(window.saturating_mul(4));
            // Lossless: at most `count`, a u16.
            self.window = wanted.min(usize::from(self.count)) as u16;
            self.quiet = 0;
            self.lend_spares();
        } else if taken.saturating_mul(4) <= window {
            self.quiet += 1;
            if self.quiet >= QUIET_DRAINS {
                self.window = (self.window / 2).max(self.min_lent);
                self.quiet = 0;
            }
        } else {
            self.quiet = 0;
        }
    }

    /// Sets the smallest window to `min_lent` buffers (at least 1, at most all of them) and
    /// lends as many at once.
    pub fn set_min_lent(&mut self, min_lent: u16) {
        self.min_lent = min_lent.clamp(1, self.count);
        self.window = self.window.max(self.min_lent);
        self.lend_spares();
    }

    /// Makes pushed buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: `entries` is the base of an initialised buffer ring; `tail` returns the
        // address of its shared tail field, which is a u16 the kernel reads atomically.
        let tail = unsafe { &*BufRingEntry::tail(self.entries.as_ptr()).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// Notes that a receive completion handed buffer `bid` to userspace: the completion's
    /// reference.
    fn take(&mut self, bid: u16) {
        if let Some(refs) = self.refs.get_mut(usize::from(bid)) {
            *refs = 1;
            self.lent = self.lent.saturating_sub(1);
        }
    }

    /// Takes one more reference to buffer `bid`, for a send that forwards bytes of it.
    /// Returns false (and takes none) unless userspace holds the buffer.
    pub fn retain(&mut self, bid: u16) -> bool {
        match self.refs.get_mut(usize::from(bid)) {
            Some(refs) if *refs > 0 => {
                *refs = refs.saturating_add(1);
                true
            }
            _ => false,
        }
    }

    /// Gives back one reference to buffer `bid`; with the last one the buffer goes back to
    /// the kernel, which may write it at any time from then on, or, while the window is lent,
    /// on top of the spares. A buffer userspace does not hold (never received, already given
    /// back, a spare, or no buffer of this ring) is left alone, so the kernel never gets one
    /// buffer twice.
    pub fn give_back(&mut self, bid: u16) {
        match self.refs.get_mut(usize::from(bid)) {
            Some(refs) if *refs > 1 => {
                *refs -= 1;
                return;
            }
            Some(refs) if *refs == 1 => *refs = 0,
            _ => {
                tracing::error!(bid, "giving back a receive buffer userspace does not hold");
                return;
            }
        }
        self.spare.push(bid);
        self.lend_spares();
    }

    /// Whether userspace holds buffer `bid`.
    fn holds(&self, bid: u16) -> bool {
        self.refs.get(usize::from(bid)).is_some_and(|&r| r > 0)
    }

    /// The address of buffer `bid`, which must be in range (callers check; out of range it
    /// would be clamped to the last buffer).
    fn start(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.count);
        let start = usize::from(bid.min(self.count - 1)) * self.buf_size;
        // SAFETY: `bid.min(count - 1) < count`, so `start` is the offset of a buffer inside
        // the allocation of `count * buf_size` bytes.
        unsafe { self.buffers.as_ptr().add(start) }
    }

    /// The address of bytes `offset..offset + len` of buffer `bid`, for a send's iovec, or
    /// `None` unless userspace holds that buffer and the range lies inside it. Taking the
    /// address reads nothing; the send that reads through it is covered by `Ring`'s rule that
    /// a forwarded buffer is given back only when the send's last completion has been reaped.
    fn span(&self, bid: u16, offset: usize, len: usize) -> Option<*const u8> {
        let end = offset.checked_add(len)?;
        if !self.holds(bid) || end > self.buf_size {
            return None;
        }
        // SAFETY: `offset <= end <= buf_size`, so the result stays inside buffer `bid`.
        Some(unsafe { self.start(bid).add(offset) }.cast_const())
    }

    /// Bytes `offset..offset + len` of buffer `bid`, or `None` unless userspace holds that
    /// buffer and the range lies inside it.
    ///
    /// # Safety
    ///
    /// Nothing may write buffer `bid` for as long as the returned slice lives. That holds
    /// when a receive completion reaped from the ring named the buffer and its last reference
    /// has not been given back since: the kernel writes only buffers it owns, and
    /// [`BufRing::give_back`] needs `&mut self`, so it cannot run while the slice borrows
    /// `self`. (Sends may read the bytes meanwhile; they never write them.)
    unsafe fn bytes(&self, bid: u16, offset: usize, len: usize) -> Option<&[u8]> {
        let start = self.span(bid, offset, len)?;
        // SAFETY: `span` checked that the range lies inside buffer `bid` of the live
        // allocation, which is initialised (zeroed by `new`, then written by the kernel); by
        // the caller's contract nothing writes it while the returned borrow of `self` lives.
        Some(unsafe { std::slice::from_raw_parts(start, len) })
    }

    /// The whole buffer region, for registering it as a fixed buffer.
    fn region(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.buffers.as_ptr().cast(),
            iov_len: self.buffers_layout.size(),
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both allocated in `new` with these exact layouts, freed once. A registered
        // `BufRing` is dropped only by `Drop for Ring`, after it was unregistered with no
        // request in flight (otherwise it is leaked and never gets here).
        unsafe {
            dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            dealloc(self.buffers.as_ptr(), self.buffers_layout);
        }
    }
}

/// Most datagrams one GSO send carries.
pub const MAX_SEGMENTS: usize = 64;

/// Largest total payload of one GSO send (a UDP datagram's limit, with headroom).
pub const MAX_GSO_BYTES: usize = 65_000;

struct SendSlot {
    hdr: libc::msghdr,
    iovs: [libc::iovec; MAX_SEGMENTS],
    /// The destination; `hdr.msg_name` points into it.
    addr: SockAddr,
    /// Control message space for UDP_SEGMENT and IP_PKTINFO / IPV6_PKTINFO ([`encode_control`]).
    control: ControlBuf,
    /// Receive buffers this send forwards, given back on completion.
    bids: [u16; MAX_SEGMENTS],
    /// Where in each of them its datagram starts.
    offsets: [usize; MAX_SEGMENTS],
    nbids: usize,
    /// The socket it goes out on, and the length of each datagram of a forward.
    socket: usize,
    len: usize,
    /// Datagrams this send carries.
    segments: usize,
    /// Sent with SEND_ZC: the buffers stay lent until the kernel's notification.
    zero_copy: bool,
    /// The source address the send names (an `IP_PKTINFO` / `IPV6_PKTINFO` message), if any.
    src: Option<IpAddr>,
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
                addr: SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0))),
                control: ControlBuf([0; SEND_CONTROL_LEN]),
                bids: [0; MAX_SEGMENTS],
                offsets: [0; MAX_SEGMENTS],
                nbids: 0,
                socket: 0,
                len: 0,
                segments: 0,
                zero_copy: false,
                src: None,
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

/// Reads the source address the kernel wrote for a received datagram (`name`, as many of its
/// bytes as fitted). `None` unless it is a whole IPv4 or IPv6 socket address.
fn read_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    // SAFETY: `try_init` hands the closure a zeroed `sockaddr_storage` and its size; the
    // closure copies in at most that many bytes (the address the kernel wrote) and sets the
    // length to what it copied, so the storage holds that address with its true length, as
    // `SockAddr` requires. The storage is whole and initialised, so no read of it can go out
    // of bounds even if the kernel's address were short; it is used only after its length is
    // checked against its family's below.
    let (_, addr) = unsafe {
        SockAddr::try_init(|storage, len| {
            let n = name.len().min(*len as usize);
            std::ptr::copy_nonoverlapping(name.as_ptr(), storage.cast::<u8>(), n);
            *len = n as libc::socklen_t;
            Ok(())
        })
    }
    .ok()?;
    let whole = match addr.family() as i32 {
        libc::AF_INET => size_of::<libc::sockaddr_in>(),
        libc::AF_INET6 => size_of::<libc::sockaddr_in6>(),
        _ => return None,
    };
    (addr.len() as usize >= whole)
        .then(|| addr.as_socket())
        .flatten()
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

/// A received datagram, borrowed from its provided buffer (see [`Ring::datagram`]): with UDP
/// GRO, several datagrams of one sender, back to back.
#[derive(Debug)]
pub struct Datagram<'a> {
    /// Who sent it.
    pub from: SocketAddr,
    /// The address it was sent to, on a socket that asked for it (one bound to a wildcard
    /// address, see [`Ring::new`]); `None` on others, and when the kernel did not say.
    pub local: Option<IpAddr>,
    /// The datagram bytes: with `segment_size`, several datagrams back to back.
    pub payload: &'a [u8],
    /// Offset of the payload in its buffer (for forwarding it in place).
    pub offset: usize,
    /// Set when the kernel coalesced several datagrams of one sender into this receive (UDP
    /// GRO): each is this many bytes long but the last, which may be shorter.
    pub segment_size: Option<usize>,
}

impl Datagram<'_> {
    /// The datagrams this receive carried, as (offset in the buffer, length): one, or with
    /// UDP GRO every `segment_size` bytes.
    pub fn segments(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let (offset, total) = (self.offset, self.payload.len());
        // A segment size of 0 (which the kernel never reports) counts as no coalescing.
        let size = self.segment_size.filter(|&s| s > 0).unwrap_or(total.max(1));
        (0..total.div_ceil(size).max(1)).map(move |k| {
            let start = k * size;
            (offset + start, size.min(total - start))
        })
    }
}

/// Why a received completion carried no usable datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvProblem {
    /// Longer than the room for it in the buffer ([`recv_payload_room`]): cut short by the
    /// kernel, so it must be dropped, never forwarded or parsed.
    Truncated,
    /// The completion's header or its source address could not be read (not expected from a
    /// UDP socket).
    Undecodable,
}

/// Length of the header (`struct io_uring_recvmsg_out`, four u32) the kernel writes at the
/// start of every buffer of a multishot `recvmsg`.
const RECVMSG_OUT_LEN: usize = 16;

/// Size of a `struct cmsghdr`.
const CMSG_HDR: usize = size_of::<libc::cmsghdr>();

/// `CMSG_SPACE(len)`: a control message of `len` data bytes with its header, padded to the
/// alignment of the next one (that of a `long`, as Linux's `CMSG_ALIGN`).
const fn cmsg_space(len: usize) -> usize {
    CMSG_HDR + len.next_multiple_of(size_of::<usize>())
}

/// `CMSG_LEN(len)`: a control message's `cmsg_len` for `len` data bytes.
const fn cmsg_len(len: usize) -> usize {
    CMSG_HDR + len
}

/// Room for the one control message a UDP GRO receive carries (`UDP_GRO`, an int: the
/// segment size): `CMSG_SPACE(sizeof(int))` on 64-bit Linux.
pub const GRO_CONTROL_LEN: usize = cmsg_space(size_of::<libc::c_int>());

/// Room for the control message that names a received datagram's destination address on a
/// socket bound to a wildcard address (`IP_PKTINFO` or `IPV6_PKTINFO`, the larger):
/// `CMSG_SPACE(sizeof(struct in6_pktinfo))`.
pub const PKTINFO_CONTROL_LEN: usize = cmsg_space(size_of::<libc::in6_pktinfo>());

/// Room for a send's control messages: `UDP_SEGMENT` (a u16) and a source address
/// (`IPV6_PKTINFO`, the larger of the two).
const SEND_CONTROL_LEN: usize = cmsg_space(size_of::<u16>()) + PKTINFO_CONTROL_LEN;

/// A send's control message area, aligned for `struct cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; SEND_CONTROL_LEN]);

/// The room a receive on a socket leaves for control messages: the `UDP_GRO` message with UDP
/// GRO (`gro`), the destination address message on a wildcard socket (`pktinfo`).
pub const fn recv_control_len(gro: bool, pktinfo: bool) -> usize {
    (if gro { GRO_CONTROL_LEN } else { 0 }) + if pktinfo { PKTINFO_CONTROL_LEN } else { 0 }
}

/// The most payload a receive buffer of `buf_size` bytes holds: the rest goes to the kernel's
/// header, the room for the source address and that for control messages
/// ([`recv_control_len`] of `gro` and `pktinfo`). A longer datagram is
/// [`RecvProblem::Truncated`].
pub const fn recv_payload_room(buf_size: usize, gro: bool, pktinfo: bool) -> usize {
    buf_size.saturating_sub(
        RECVMSG_OUT_LEN + size_of::<libc::sockaddr_storage>() + recv_control_len(gro, pktinfo),
    )
}

/// What a receive's control messages say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Received {
    /// The UDP GRO segment size; `None` when the receive carried one datagram.
    segment_size: Option<usize>,
    /// The address the datagram was sent to (`IP_PKTINFO`'s `ipi_addr`, `IPV6_PKTINFO`'s
    /// `ipi6_addr`), when it is one the relay can send from: not multicast, broadcast or
    /// unspecified.
    local: Option<IpAddr>,
}

/// Reads the control messages the kernel wrote for a receive (`control`): the `UDP_GRO`
/// segment size and the destination address. A message cut short, or a header that does not
/// fit, ends the reading (what was read before it stands); other messages are skipped.
fn read_control(control: &[u8]) -> Received {
    let mut out = Received::default();
    let mut rest = control;
    while rest.len() >= CMSG_HDR {
        // SAFETY: `rest` holds at least a whole cmsghdr; it is read unaligned, by value.
        let hdr: libc::cmsghdr = unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
        let len = hdr.cmsg_len as usize;
        if len < CMSG_HDR || len > rest.len() {
            break;
        }
        let data = &rest[CMSG_HDR..len];
        match (hdr.cmsg_level, hdr.cmsg_type) {
            (libc::SOL_UDP, libc::UDP_GRO) => {
                if let Some(bytes) = data.get(..4).and_then(|b| b.try_into().ok()) {
                    let size = libc::c_int::from_ne_bytes(bytes);
                    out.segment_size = usize::try_from(size).ok().filter(|&s| s > 0);
                }
            }
            // struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }:
            // `ipi_addr` is the header's destination. (`ipi_spec_dst` is the source the
            // kernel's route back to the sender would pick, the very address not to use.)
            (libc::SOL_IP, libc::IP_PKTINFO) => {
                if let Some(bytes) = data.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
                    let ip = Ipv4Addr::from(bytes);
                    let usable = !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast());
                    out.local = usable.then_some(IpAddr::V4(ip));
                }
            }
            // struct in6_pktinfo { in6_addr ipi6_addr; int ipi6_ifindex; }
            (libc::SOL_IPV6, libc::IPV6_PKTINFO) => {
                if let Some(bytes) = data.get(..16).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                    let ip = Ipv6Addr::from(bytes);
                    let usable = !(ip.is_unspecified() || ip.is_multicast());
                    out.local = usable.then_some(IpAddr::V6(ip));
                }
            }
            _ => {}
        }
        // The next message starts at the aligned end of this one.
        match rest.get(len.next_multiple_of(size_of::<usize>())..) {
            Some(next) => rest = next,
            None => break,
        }
    }
    out
}

/// Writes one control message (`level`, `kind`, `data`) at the start of `out`, which must
/// have [`cmsg_space`] of its length; returns that space.
fn put_cmsg(out: &mut [u8], level: i32, kind: i32, data: &[u8]) -> usize {
    let space = cmsg_space(data.len());
    let out = &mut out[..space];
    out.fill(0);
    // SAFETY: all-zero is a valid cmsghdr (plain integers, and padding on some libcs).
    let mut hdr: libc::cmsghdr = unsafe { zeroed() };
    hdr.cmsg_len = cmsg_len(data.len()) as _;
    hdr.cmsg_level = level;
    hdr.cmsg_type = kind;
    // SAFETY: `out` has at least `CMSG_HDR` bytes (`space` is more); the header is written
    // unaligned, by value.
    unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
    out[CMSG_HDR..CMSG_HDR + data.len()].copy_from_slice(data);
    space
}

/// Writes a send's control messages into `out` and returns their length (0: none): a
/// `UDP_SEGMENT` of `gso` bytes for a GSO send, and `IP_PKTINFO` (`ipi_spec_dst`) or
/// `IPV6_PKTINFO` (`ipi6_addr`) naming `src` as the datagrams' source address, for a socket
/// on a wildcard address (interface 0: the route picks it, as for any send).
fn encode_control(
    out: &mut [u8; SEND_CONTROL_LEN],
    gso: Option<u16>,
    src: Option<IpAddr>,
) -> usize {
    let mut at = 0;
    if let Some(size) = gso {
        at += put_cmsg(out, libc::SOL_UDP, libc::UDP_SEGMENT, &size.to_ne_bytes());
    }
    match src {
        Some(IpAddr::V4(ip)) => {
            let mut info = [0u8; size_of::<libc::in_pktinfo>()];
            info[4..8].copy_from_slice(&ip.octets());
            at += put_cmsg(&mut out[at..], libc::SOL_IP, libc::IP_PKTINFO, &info);
        }
        Some(IpAddr::V6(ip)) => {
            let mut info = [0u8; size_of::<libc::in6_pktinfo>()];
            info[..16].copy_from_slice(&ip.octets());
            at += put_cmsg(&mut out[at..], libc::SOL_IPV6, libc::IPV6_PKTINFO, &info);
        }
        None => {}
    }
    at
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
    /// Sends queued since the last [`submit_and_wait`](Self::submit_and_wait): each posts its
    /// (first) completion as it is submitted, which that wait does not count as one it waits for.
    sends_since_wait: usize,
    /// Set by the shutdown; `Drop` frees the lent memory only if it says so.
    shut: Option<ShutdownReport>,
    /// Forwards of at least this many bytes use SEND_ZC; `None`: never.
    zero_copy_min: Option<usize>,
    /// The receive buffers are also registered as fixed buffer 0, so zero-copy sends skip
    /// pinning their pages on every send.
    fixed_buffers: bool,
    /// The sockets are registered with the ring (fixed files, at their indexes), so a request
    /// names its socket by index and the kernel takes no reference to the socket's file per
    /// request (an atomic increment and decrement on every send otherwise).
    fixed_files: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("sockets", &self.sockets.len())
            .field("sends_in_flight", &self.sends_in_flight())
            .finish_non_exhaustive()
    }
}

/// How often ring setup is tried when the kernel cannot allocate the ring's memory, and the
/// first pause between tries (doubled each time: 50 + 100 + 200 + 400 ms in all).
const SETUP_TRIES: u32 = 5;
const SETUP_FIRST_PAUSE: Duration = Duration::from_millis(50);

/// Creates the ring: with `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel has them, else a
/// plain one. The ring's queues are a few contiguous pages each, which a busy, fragmented
/// machine can fail to find for a moment (`ENOMEM`); setup is then tried again after a pause
/// rather than failing the worker at once.
fn build_ring(entries: u32) -> Result<IoUring, UringError> {
    let mut pause = SETUP_FIRST_PAUSE;
    let mut tries = 0;
    loop {
        tries += 1;
        let result = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(entries.saturating_mul(4))
                    .build(entries)
            });
        match result {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && tries < SETUP_TRIES => {
                tracing::warn!(
                    tries,
                    "io_uring setup: the kernel is short of memory, trying again"
                );
                std::thread::sleep(pause);
                pause *= 2;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                return Err(UringError::NoMemory(e));
            }
            Err(e) => return Err(UringError::Setup(e)),
        }
    }
}

impl Ring {
    /// A ring of `entries` submission slots, `buffers` receive buffers of `buf_size` bytes and
    /// `sends` in-flight sends, for `sockets` (which must outlive the ring). With `gro` the
    /// receives leave room for the `UDP_GRO` control message of sockets that coalesce
    /// datagrams (see [`Datagram::segment_size`]); on the sockets `pktinfo` marks (by index;
    /// those bound to a wildcard address, with `IP_PKTINFO` or `IPV6_RECVPKTINFO` on), for the
    /// message that names each datagram's destination address ([`Datagram::local`]).
    pub fn new(
        entries: u32,
        buffers: u16,
        buf_size: usize,
        sends: u32,
        sockets: Vec<RawFd>,
        gro: bool,
        pktinfo: &[bool],
    ) -> Result<Self, UringError> {
        // One thread submits and reaps (a `Ring` holds raw pointers, so it is not `Send`), which
        // lets the kernel defer completion work until that thread waits (Linux 6.1+): no task
        // work interrupts the worker while it handles a batch, and a wait for one completion
        // wakes it once. It measured a little cheaper per packet below saturation; older
        // kernels refuse the flags and get a plain ring.
        let ring = build_ring(entries)?;
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
        // Where the kernel refuses (a file table limit), requests name the raw descriptors.
        let fixed_files = match ring.submitter().register_files(&sockets) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("registering the sockets with the ring: {e}; using descriptors");
                false
            }
        };
        let recv_hdrs = (0..sockets.len())
            .map(|i| {
                // SAFETY: an all-zero msghdr is valid; only the lengths matter to the kernel
                // for multishot recvmsg (the name and control areas live in each buffer).
                let mut hdr: libc::msghdr = unsafe { zeroed() };
                hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                let pktinfo = pktinfo.get(i).copied().unwrap_or(false);
                hdr.msg_controllen = recv_control_len(gro, pktinfo);
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
            sends_since_wait: 0,
            shut: None,
            zero_copy_min: None,
            fixed_buffers: false,
            fixed_files,
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
            let region = [self.bufs.region()];
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

    /// Whether requests name their sockets as registered (fixed) files.
    pub fn uses_fixed_files(&self) -> bool {
        self.fixed_files
    }

    /// Keeps at least `min_lent` receive buffers lent to the kernel ([`MIN_LENT`] unless set;
    /// see the receive-buffer window in this module's `BufRing`).
    pub fn set_min_lent(&mut self, min_lent: u16) {
        self.bufs.set_min_lent(min_lent);
    }

    /// Arms (or re-arms) multishot receive on socket `index`.
    pub fn arm_recv(&mut self, index: usize) -> Result<(), UringError> {
        let hdr: *const libc::msghdr = &self.recv_hdrs[index];
        let entry = match self.fixed_files {
            // Lossless: `register_files` took one entry per socket, so the index fits its u32.
            true => opcode::RecvMsgMulti::new(types::Fixed(index as u32), hdr, BGID).build(),
            false => opcode::RecvMsgMulti::new(types::Fd(self.sockets[index]), hdr, BGID).build(),
        }
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

    /// Submits queued work and waits, at most `timeout`, for `want` completions besides those
    /// of the sends queued since the last wait, in one entry into the kernel.
    ///
    /// A UDP `sendmsg` completes as it is submitted: the kernel copies the datagram into the
    /// socket's send queue, or fails, inside the submission, and posts the completion right
    /// there (a zero-copy send posts its result there; its notification comes later and only
    /// ends a wait early). So a wait for `want` completions counting those would return at once
    /// with nothing but the sends' own completions, and the worker would enter the kernel a
    /// second time to wait for the next datagram: two entries per forwarded datagram below
    /// saturation, where a `recvmmsg`/`sendmmsg` forwarder makes two system calls too. Waiting
    /// for `want` more makes the submission of a batch's sends and the wait for the next
    /// datagram one entry, and the sends' completions are reaped with the next drain, without
    /// a wake-up of their own. A send that does not complete at once (its socket's send buffer
    /// is full, so the kernel waits for room before sending) still counts as one that will: the
    /// wait then needs it, or one completion more, before it ends. That happens only while the
    /// relay offers a device more than it transmits, when datagrams wait in queues anyway.
    pub fn submit_and_wait(&mut self, want: usize, timeout: &Timespec) -> Result<(), UringError> {
        let want = want.saturating_add(std::mem::take(&mut self.sends_since_wait));
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
        let (mut taken, mut starved) = (0, false);
        for cqe in self.ring.completion() {
            let data = cqe.user_data();
            let index = data & !TAG_MASK;
            let last = !cqueue::more(cqe.flags());
            match data & TAG_MASK {
                TAG_RECV => {
                    if last && let Some(armed) = self.armed.get_mut(index as usize) {
                        *armed = false;
                    }
                    if let Some(bid) = cqueue::buffer_select(cqe.flags()) {
                        self.bufs.take(bid);
                        taken += 1;
                    }
                    starved |= cqe.result() == -libc::ENOBUFS;
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
        self.bufs.after_drain(taken, starved);
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
            // The ring holds a reference to each registered socket until then; let the sockets
            // close with their owner, not whenever the kernel gets round to freeing the ring.
            if self.fixed_files
                && let Err(e) = self.ring.submitter().unregister_files()
            {
                tracing::debug!("unregistering the sockets at shutdown: {e}");
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

    /// The datagram of a receive completion on socket `socket`, with the id of the buffer the
    /// completion handed to userspace; `None` if it handed over no buffer (an error, or the
    /// kernel found no free buffer). The completion holds one reference to the buffer, which
    /// stays userspace's until that reference is given back ([`give_back`](Self::give_back))
    /// and so is every one a forward of its bytes took ([`retain`](Self::retain), returned by
    /// [`finish_send`](Self::finish_send)).
    ///
    /// # Safety
    ///
    /// `socket`, `result` and `flags` must be those of a [`Completion::Recv`] reaped from this
    /// ring by [`drain`](Self::drain) whose buffer has not been given back since (directly, or
    /// by finishing a send that forwarded it). The kernel then does not write that buffer, and
    /// cannot until it is given back, which needs `&mut self` and so waits until the returned
    /// [`Datagram`] no longer borrows the ring.
    pub unsafe fn datagram(
        &self,
        socket: usize,
        result: i32,
        flags: u32,
    ) -> Option<(u16, Result<Datagram<'_>, RecvProblem>)> {
        let bid = cqueue::buffer_select(flags)?;
        let (Ok(len), Some(hdr)) = (usize::try_from(result), self.recv_hdrs.get(socket)) else {
            return Some((bid, Err(RecvProblem::Undecodable)));
        };
        // SAFETY: by this function's contract the completion handed buffer `bid` to userspace
        // and it has not been given back, so the kernel is not writing it, and it cannot be
        // given back while the slice (and the `Datagram` made from it) borrows `self`.
        let Some(buffer) = (unsafe { self.bufs.bytes(bid, 0, len.min(self.bufs.buf_size)) }) else {
            return Some((bid, Err(RecvProblem::Undecodable)));
        };
        let parsed = match RecvMsgOut::parse(buffer, hdr) {
            Err(()) => Err(RecvProblem::Undecodable),
            Ok(out) if out.is_payload_truncated() => Err(RecvProblem::Truncated),
            Ok(out) => {
                // The payload is a part of `buffer`; re-slice it for the longer borrow.
                let payload = out.payload_data();
                let offset = payload.as_ptr() as usize - buffer.as_ptr() as usize;
                let payload = buffer.get(offset..offset + payload.len());
                let control = read_control(out.control_data());
                match (read_sockaddr(out.name_data()), payload) {
                    (Some(from), Some(payload)) => Ok(Datagram {
                        from,
                        local: control.local,
                        payload,
                        offset,
                        segment_size: control.segment_size,
                    }),
                    _ => Err(RecvProblem::Undecodable),
                }
            }
        };
        Some((bid, parsed))
    }

    /// Bytes `offset..offset + len` of receive buffer `bid`, or `None` unless userspace holds
    /// that buffer and the range lies inside it: one datagram of a receive that carried several
    /// (UDP GRO), read again after the ring was used in between.
    ///
    /// # Safety
    ///
    /// As for [`datagram`](Self::datagram): a receive completion reaped from this ring named
    /// buffer `bid`, and its last reference has not been given back since.
    pub unsafe fn received(&self, bid: u16, offset: usize, len: usize) -> Option<&[u8]> {
        // SAFETY: by this function's contract userspace holds buffer `bid`, so the kernel is
        // not writing it, and it cannot be given back while the slice borrows `self`.
        unsafe { self.bufs.bytes(bid, offset, len) }
    }

    /// Takes one more reference to receive buffer `bid`, for a forward of bytes of it; false
    /// unless userspace holds it. [`finish_send`](Self::finish_send), or
    /// [`give_back`](Self::give_back) if the forward is abandoned, returns the reference.
    pub fn retain(&mut self, bid: u16) -> bool {
        self.bufs.retain(bid)
    }

    /// Gives back one reference to a receive buffer; with the last one the buffer goes back
    /// to the kernel (ignored, with an error logged, unless userspace holds it).
    pub fn give_back(&mut self, bid: u16) {
        self.bufs.give_back(bid);
    }

    /// Queues one send of `segments` (received datagrams of `len` bytes each, in their
    /// receive buffers, not copied) to `to` on socket `socket`, from source address `src` if
    /// set (an `IP_PKTINFO` or `IPV6_PKTINFO` control message; only for a socket on a wildcard
    /// address). With more than one segment it
    /// is a UDP GSO send: one system-level send, split by the kernel into `len`-byte
    /// datagrams. Each segment brings one reference to its buffer ([`retain`](Self::retain)),
    /// which the send's [`finish_send`](Self::finish_send) gives back. Returns false (and the
    /// caller gives those references back) if every send slot is
    /// in use, and [`UringError::BadSegment`] (sending nothing) for more than [`MAX_SEGMENTS`]
    /// segments or one outside a buffer userspace holds.
    pub fn send_forward(
        &mut self,
        socket: usize,
        segments: &[Segment],
        len: usize,
        to: SocketAddr,
        src: Option<IpAddr>,
    ) -> Result<bool, UringError> {
        let n = segments.len();
        if n > MAX_SEGMENTS {
            return Err(UringError::BadSegment);
        }
        let Some(&slot) = self.slab.free.last() else {
            return Ok(false);
        };
        // Only the iovecs this send uses are written, in place: the kernel reads `n` of them.
        // The slot is taken only once they all check out, so a bad segment holds no slot.
        let s = &mut self.slab.slots[slot as usize];
        for (i, seg) in segments.iter().enumerate() {
            let base = self.bufs.span(seg.bid, seg.offset, len);
            // The kernel only reads through a send's iovecs.
            s.iovs[i].iov_base = base.ok_or(UringError::BadSegment)?.cast_mut().cast();
            s.iovs[i].iov_len = len;
            s.bids[i] = seg.bid;
            s.offsets[i] = seg.offset;
        }
        s.nbids = n;
        (s.socket, s.len) = (socket, len);
        s.segments = n;
        s.zero_copy = self.zero_copy_min.is_some_and(|min| n * len >= min);
        self.slab.free.pop();
        // Lossless: a GSO send carries at most MAX_GSO_BYTES, so its segments are shorter.
        let gso = (n > 1).then_some(len as u16);
        self.submit_send(socket, slot, to, n, gso, src)
    }

    /// Queues a send of a copy of `bytes` to `to` on socket `socket`, from source address
    /// `src` if set (as for [`send_forward`](Self::send_forward)). Returns false if every send
    /// slot is in use.
    pub fn send_reply(
        &mut self,
        socket: usize,
        bytes: &[u8],
        to: SocketAddr,
        src: Option<IpAddr>,
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
        self.submit_send(socket, slot, to, 1, None, src)
    }

    /// Fills in slot `slot`'s message header (address, `iovs` iovecs, and control messages:
    /// UDP_SEGMENT when `gso` is set, the source address when `src` is) and queues its
    /// `sendmsg`.
    fn submit_send(
        &mut self,
        socket: usize,
        slot: u32,
        to: SocketAddr,
        iovs: usize,
        gso: Option<u16>,
        src: Option<IpAddr>,
    ) -> Result<bool, UringError> {
        let s = &mut self.slab.slots[slot as usize];
        s.addr = SockAddr::from(to);
        s.src = src;
        // The kernel only reads a send's address.
        s.hdr.msg_name = s.addr.as_ptr().cast_mut().cast();
        s.hdr.msg_namelen = s.addr.len();
        s.hdr.msg_iov = s.iovs.as_mut_ptr();
        s.hdr.msg_iovlen = iovs;
        if gso.is_none() && src.is_none() {
            // A single datagram from a socket on a specific address: no control message.
            s.hdr.msg_control = std::ptr::null_mut();
            s.hdr.msg_controllen = 0;
        } else {
            let len = encode_control(&mut s.control.0, gso, src);
            s.hdr.msg_control = s.control.0.as_mut_ptr().cast();
            s.hdr.msg_controllen = len;
        }
        let hdr: *const libc::msghdr = &s.hdr;
        // Forwards point into the registered receive buffers: fixed buffer 0.
        let fixed_buffer = (self.fixed_buffers && s.nbids > 0).then_some(0);
        let entry = match (s.zero_copy, self.fixed_files) {
            (true, true) => opcode::SendMsgZc::new(types::Fixed(socket as u32), hdr)
                .buf_index(fixed_buffer)
                .build(),
            (true, false) => opcode::SendMsgZc::new(types::Fd(self.sockets[socket]), hdr)
                .buf_index(fixed_buffer)
                .build(),
            (false, true) => opcode::SendMsg::new(types::Fixed(socket as u32), hdr).build(),
            (false, false) => opcode::SendMsg::new(types::Fd(self.sockets[socket]), hdr).build(),
        };
        self.push(&entry.user_data(TAG_SEND | u64::from(slot)))?;
        self.sends_in_kernel += 1;
        self.sends_since_wait += 1;
        Ok(true)
    }

    /// Datagrams the send in `slot` carries.
    pub fn send_segments(&self, slot: u32) -> usize {
        self.slab.slots[slot as usize].segments
    }

    /// The destination of the send in `slot`.
    pub fn send_destination(&self, slot: u32) -> Option<SocketAddr> {
        self.slab.slots[slot as usize].addr.as_socket()
    }

    /// The source address the send in `slot` names, if it names one (a wildcard socket's).
    pub fn send_source(&self, slot: u32) -> Option<IpAddr> {
        self.slab.slots[slot as usize].src
    }

    /// Queues the datagrams of the forward in `slot` again, each in a send of its own, before
    /// the slot is finished: for a GSO send the kernel refused whole with `EMSGSIZE` (its
    /// datagrams are longer than the path's MTU, which it would fragment one by one but will
    /// not segment). Returns how many were queued; the rest (every send slot in use) are lost.
    pub fn resend_alone(&mut self, slot: u32) -> Result<usize, UringError> {
        let s = &self.slab.slots[slot as usize];
        let (socket, len, src, n) = (s.socket, s.len, s.src, s.nbids);
        let to = s.addr.as_socket().ok_or(UringError::BadSegment)?;
        let segments: Vec<Segment> = s.bids[..n]
            .iter()
            .zip(&s.offsets[..n])
            .map(|(&bid, &offset)| Segment { bid, offset })
            .collect();
        let mut queued = 0;
        for segment in segments {
            // The slot still holds its own reference, so this one cannot fail.
            if !self.retain(segment.bid) {
                continue;
            }
            if !self.send_forward(socket, &[segment], len, to, src)? {
                self.give_back(segment.bid);
                break;
            }
            queued += 1;
        }
        Ok(queued)
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

    /// How many sockets the ring serves (their indexes are `0..socket_count()`).
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

/// Whether `ip` is an IPv4 address, so that a send to it goes out on an IPv4 socket. An
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is not: it would go to an IPv6 socket, which is
/// v6-only and cannot reach it. Peers' addresses never are: they are the source addresses of
/// received datagrams, and the IPv6 sockets are v6-only (and Linux drops IPv6 packets from a
/// v4-mapped source).
pub fn is_v4(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sockaddr_in` / `sockaddr_in6` as Linux lays them out, written by hand.
    fn c_sockaddr(addr: SocketAddr) -> Vec<u8> {
        match addr {
            SocketAddr::V4(a) => [
                &(libc::AF_INET as u16).to_ne_bytes()[..],
                &a.port().to_be_bytes(),
                &a.ip().octets(),
                &[0; 8],
            ]
            .concat(),
            SocketAddr::V6(a) => [
                &(libc::AF_INET6 as u16).to_ne_bytes()[..],
                &a.port().to_be_bytes(),
                &a.flowinfo().to_ne_bytes(),
                &a.ip().octets(),
                &a.scope_id().to_ne_bytes(),
            ]
            .concat(),
        }
    }

    #[test]
    fn source_addresses_are_read_from_c_structs() {
        for text in [
            "198.18.0.1:7000",
            "[2001:db8::1]:443",
            "[2001:db8::2%3]:1",
            "0.0.0.0:0",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            let bytes = c_sockaddr(addr);
            assert_eq!(bytes.len(), SockAddr::from(addr).len() as usize, "{text}");
            assert_eq!(read_sockaddr(&bytes), Some(addr), "{text}");
            assert_eq!(
                read_sockaddr(&bytes[..bytes.len() - 1]),
                None,
                "{text} cut short"
            );
        }
        assert_eq!(read_sockaddr(&[]), None);
        assert_eq!(read_sockaddr(&[0; 3]), None);
        assert_eq!(read_sockaddr(&[0xff; 28]), None, "an unknown family");
        let unix = [&(libc::AF_UNIX as u16).to_ne_bytes()[..], b"/tmp/x\0"].concat();
        assert_eq!(read_sockaddr(&unix), None, "not an IP address");
    }

    #[test]
    fn buffer_ring_sizes_are_checked() {
        assert!(BufRing::new(3, 2048).is_err());
        assert!(BufRing::new(0, 2048).is_err());
        assert!(BufRing::new(8, 0).is_err());
        let ring = BufRing::new(8, 2048).unwrap();
        assert_eq!(
            ring.tail, 8,
            "every buffer of the window starts out lent to the kernel"
        );
        let ring = BufRing::new(1024, 2048).unwrap();
        assert_eq!(ring.tail, MIN_LENT, "the rest are spares");
    }

    #[test]
    fn only_buffers_userspace_holds_go_back_to_the_kernel() {
        let mut ring = BufRing::new(8, 2048).unwrap();
        ring.give_back(3);
        ring.give_back(8);
        ring.give_back(u16::MAX);
        assert_eq!(ring.tail, 8, "never received, or no such buffer: ignored");
        assert!(
            ring.span(3, 0, 1).is_none(),
            "the kernel's buffer is not lent to a send"
        );
        ring.take(3);
        ring.take(9);
        assert!(ring.span(3, 0, 2048).is_some());
        assert!(ring.span(3, 1, 2048).is_none(), "past the buffer's end");
        assert!(ring.span(3, usize::MAX, 2).is_none());
        assert!(ring.span(9, 0, 1).is_none());
        // SAFETY: buffer 3 is held (taken above, as a completion would) and nothing writes it:
        // no kernel ring was registered.
        let bytes = unsafe { ring.bytes(3, 0, 2048) }.unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "the buffers start zeroed");
        // SAFETY: as above.
        assert!(unsafe { ring.bytes(3, 0, 2049) }.is_none(), "past the end");
        // SAFETY: as above.
        assert_eq!(
            unsafe { ring.bytes(3, 2000, 48) }.map(<[u8]>::len),
            Some(48)
        );
        // Two forwards of bytes of buffer 3: it stays userspace's until all three references
        // (the completion's and the forwards') are back.
        assert!(ring.retain(3));
        assert!(ring.retain(3));
        assert!(
            !ring.retain(4),
            "a buffer the kernel owns takes no reference"
        );
        ring.give_back(3);
        ring.give_back(3);
        assert_eq!(ring.tail, 8, "a send still reads it");
        assert!(ring.span(3, 0, 1).is_some());
        ring.give_back(3);
        ring.give_back(3);
        assert_eq!(ring.tail, 9, "given back once, however often asked");
        // SAFETY: as above; buffer 3 is no longer held, so `bytes` must refuse it.
        assert!(unsafe { ring.bytes(3, 0, 1) }.is_none());
    }

    /// The kernel's side of a buffer ring in a test: it takes the buffers lent, in the order
    /// they were lent, from its head up to the published tail.
    struct KernelSide {
        head: u16,
    }

    impl KernelSide {
        /// The buffers lent and not yet taken, in the order the kernel will take them.
        fn lent(&self, ring: &BufRing) -> Vec<u16> {
            (0..ring.tail.wrapping_sub(self.head))
                .map(|i| {
                    let slot = usize::from(self.head.wrapping_add(i) & (ring.count - 1));
                    // SAFETY: `slot < count`: an initialised entry of the live allocation.
                    unsafe { &*ring.entries.as_ptr().add(slot) }.bid()
                })
                .collect()
        }

        /// Receives one datagram into the next lent buffer, as a completion would hand it
        /// over; `None` if none is lent (`ENOBUFS`).
        fn receive(&mut self, ring: &mut BufRing) -> Option<u16> {
            let bid = *self.lent(ring).first()?;
            self.head = self.head.wrapping_add(1);
            ring.take(bid);
            Some(bid)
        }

        /// Checks that every buffer is in exactly one place: lent, a spare, or `held`.
        fn check(&self, ring: &BufRing, held: &[u16]) {
            let lent = self.lent(ring);
            assert_eq!(
                lent.len(),
                usize::from(ring.lent),
                "the count matches the ring"
            );
            let mut all: Vec<u16> = [lent.as_slice(), &ring.spare, held].concat();
            all.sort_unstable();
            assert_eq!(all, (0..ring.count).collect::<Vec<_>>(), "each buffer once");
        }
    }

    #[test]
    fn the_kernel_is_lent_a_window_of_buffers_that_follows_the_load() {
        let mut ring = BufRing::new(256, 2048).unwrap();
        let mut kernel = KernelSide { head: 0 };
        assert_eq!(kernel.lent(&ring), (0..MIN_LENT).collect::<Vec<_>>());
        kernel.check(&ring, &[]);

        // One datagram at a time: the same few buffers go round, however long it lasts.
        let mut used = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let bid = kernel.receive(&mut ring).unwrap();
            used.insert(bid);
            ring.give_back(bid);
            ring.after_drain(1, false);
            kernel.check(&ring, &[]);
        }
        assert_eq!(used.len(), usize::from(MIN_LENT), "{used:?}");
        assert_eq!(ring.window, MIN_LENT);

        // A burst: the kernel takes the whole window and runs out. The window at once grows
        // fourfold (the spares given back last go out first) and then, burst after burst, to
        // the whole ring.
        let mut held = Vec::new();
        while let Some(bid) = kernel.receive(&mut ring) {
            held.push(bid);
        }
        assert_eq!(held.len(), usize::from(MIN_LENT));
        ring.after_drain(held.len(), true);
        assert_eq!(ring.window, 4 * MIN_LENT);
        assert_eq!(
            kernel.lent(&ring),
            (MIN_LENT..5 * MIN_LENT).collect::<Vec<_>>()
        );
        kernel.check(&ring, &held);
        for bid in held.drain(..) {
            ring.give_back(bid);
        }
        assert_eq!(
            ring.spare.last(),
            Some(&7),
            "the window was lent: back to the spares"
        );
        kernel.check(&ring, &[]);
        let mut windows = Vec::new();
        for starved in [true, false, true, false] {
            while let Some(bid) = kernel.receive(&mut ring) {
                held.push(bid);
            }
            // The kernel used every buffer lent; whether it also ran out makes no difference.
            ring.after_drain(held.len(), starved);
            windows.push(ring.window);
            kernel.check(&ring, &held);
            for bid in held.drain(..) {
                ring.give_back(bid);
            }
        }
        assert_eq!(windows, [128, 256, 256, 256]);
        assert_eq!(
            usize::from(ring.lent),
            256,
            "the whole ring is lent under a backlog"
        );

        // A drain that used more than a quarter of the window but not all of it neither grows
        // nor shrinks it, and restarts the count of quiet drains.
        for _ in 0..QUIET_DRAINS - 1 {
            ring.after_drain(1, false);
        }
        ring.after_drain(255, false);
        for _ in 0..QUIET_DRAINS - 1 {
            ring.after_drain(1, false);
        }
        assert_eq!(ring.window, 256);
        ring.after_drain(1, false);
        assert_eq!(
            ring.window, 128,
            "halved after {QUIET_DRAINS} quiet drains in a row"
        );

        // Quiet again: the window shrinks back to MIN_LENT, and as the kernel uses up what it
        // was lent the buffers given back go to the spares, until only the window is lent.
        for _ in 0..2000 {
            let bid = kernel.receive(&mut ring).unwrap();
            ring.give_back(bid);
            ring.after_drain(1, false);
            kernel.check(&ring, &[]);
        }
        assert_eq!(ring.window, MIN_LENT);
        assert_eq!(ring.lent, MIN_LENT);
    }

    #[test]
    fn a_smallest_window_set_higher_is_lent_at_once_and_kept() {
        let mut ring = BufRing::new(64, 2048).unwrap();
        let kernel = KernelSide { head: 0 };
        ring.set_min_lent(u16::MAX);
        assert_eq!((ring.window, ring.lent), (64, 64), "at most every buffer");
        kernel.check(&ring, &[]);
        for _ in 0..10 * QUIET_DRAINS {
            ring.after_drain(0, false);
        }
        assert_eq!(
            ring.window, 64,
            "quiet drains do not shrink it below the minimum"
        );
        ring.set_min_lent(0);
        assert_eq!(ring.min_lent, 1, "at least one buffer");
    }

    #[test]
    fn a_ring_smaller_than_the_window_lends_every_buffer() {
        let mut ring = BufRing::new(4, 2048).unwrap();
        let mut kernel = KernelSide { head: 0 };
        assert_eq!(kernel.lent(&ring), [0, 1, 2, 3]);
        for _ in 0..100 {
            ring.after_drain(0, false);
        }
        assert_eq!(ring.window, 4, "never below the ring's size");
        let bid = kernel.receive(&mut ring).unwrap();
        ring.after_drain(1, true);
        assert_eq!(ring.window, 4, "never above it");
        kernel.check(&ring, &[bid]);
    }

    /// A control area as the kernel writes it: one message of `level`/`kind` with `data`.
    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let len = size_of::<libc::cmsghdr>() + data.len();
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        out.resize(len.next_multiple_of(8), 0);
        out
    }

    /// What `read_control` makes of `control`: the segment size and the local address.
    fn read(control: &[u8]) -> (Option<usize>, Option<IpAddr>) {
        let r = read_control(control);
        (r.segment_size, r.local)
    }

    #[test]
    fn the_gro_segment_size_is_read_from_its_control_message() {
        let gro = cmsg(libc::SOL_UDP, libc::UDP_GRO, &1200i32.to_ne_bytes());
        assert_eq!(gro.len(), GRO_CONTROL_LEN);
        assert_eq!(read(&gro), (Some(1200), None));
        assert_eq!(read(&[]), (None, None), "one datagram: no message");
        assert_eq!(read(&[0; GRO_CONTROL_LEN]), (None, None), "zeroed room");
        let other = cmsg(libc::SOL_IP, libc::IP_TTL, &64i32.to_ne_bytes());
        assert_eq!(read(&[other.clone(), gro.clone()].concat()).0, Some(1200));
        assert_eq!(read(&other), (None, None));
        assert_eq!(
            read(&gro[..20]).0,
            Some(1200),
            "the padding may be left out"
        );
        assert_eq!(read(&gro[..19]).0, None, "cut short");
        let zero = cmsg(libc::SOL_UDP, libc::UDP_GRO, &0i32.to_ne_bytes());
        assert_eq!(read(&zero).0, None);
        let negative = cmsg(libc::SOL_UDP, libc::UDP_GRO, &(-5i32).to_ne_bytes());
        assert_eq!(read(&negative).0, None);
        let mut huge = gro.clone();
        huge[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(read(&huge).0, None, "a length past the area");
    }

    /// `struct in_pktinfo` as Linux lays it out: interface, `ipi_spec_dst`, `ipi_addr`.
    fn in_pktinfo(ifindex: i32, spec_dst: [u8; 4], addr: [u8; 4]) -> Vec<u8> {
        [&ifindex.to_ne_bytes()[..], &spec_dst, &addr].concat()
    }

    /// `struct in6_pktinfo` as Linux lays it out: `ipi6_addr`, interface.
    fn in6_pktinfo(addr: Ipv6Addr, ifindex: u32) -> Vec<u8> {
        [&addr.octets()[..], &ifindex.to_ne_bytes()].concat()
    }

    #[test]
    fn the_destination_address_is_read_from_its_control_message() {
        // The kernel's route back to the sender would leave from 198.19.1.1 (`ipi_spec_dst`);
        // the datagram was sent to 198.18.1.1 (`ipi_addr`), which is the one that counts.
        let v4 = cmsg(
            libc::SOL_IP,
            libc::IP_PKTINFO,
            &in_pktinfo(3, [198, 19, 1, 1], [198, 18, 1, 1]),
        );
        assert_eq!(v4.len(), 32);
        let far = IpAddr::from([198, 18, 1, 1]);
        assert_eq!(read(&v4), (None, Some(far)));
        let v6_addr: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        let v6 = cmsg(libc::SOL_IPV6, libc::IPV6_PKTINFO, &in6_pktinfo(v6_addr, 3));
        assert_eq!(v6.len(), PKTINFO_CONTROL_LEN);
        assert_eq!(read(&v6), (None, Some(IpAddr::V6(v6_addr))));
        // With UDP GRO, both messages, in either order.
        let gro = cmsg(libc::SOL_UDP, libc::UDP_GRO, &1200i32.to_ne_bytes());
        assert_eq!(
            read(&[gro.clone(), v4.clone()].concat()),
            (Some(1200), Some(far))
        );
        assert_eq!(
            read(&[v6.clone(), gro.clone()].concat()),
            (Some(1200), Some(IpAddr::V6(v6_addr)))
        );
        assert_eq!(
            read(&[v4.clone(), gro[..19].to_vec()].concat()),
            (None, Some(far)),
            "what came before a message cut short stands"
        );
        assert_eq!(read(&v4[..27]), (None, None), "cut short");
        // Addresses no datagram can leave from are not taken.
        for bad in [[0, 0, 0, 0], [255, 255, 255, 255], [224, 0, 0, 1]] {
            let m = cmsg(
                libc::SOL_IP,
                libc::IP_PKTINFO,
                &in_pktinfo(3, [198, 19, 1, 1], bad),
            );
            assert_eq!(read(&m), (None, None), "{bad:?}");
        }
        for bad in [Ipv6Addr::UNSPECIFIED, "ff02::1".parse().unwrap()] {
            let m = cmsg(libc::SOL_IPV6, libc::IPV6_PKTINFO, &in6_pktinfo(bad, 3));
            assert_eq!(read(&m), (None, None), "{bad}");
        }
        // Right type, wrong level: not a destination address.
        let wrong = cmsg(libc::SOL_IPV6, libc::IP_PKTINFO, &in6_pktinfo(v6_addr, 3));
        assert_eq!(read(&wrong), (None, None));
    }

    #[test]
    fn a_send_names_its_segment_size_and_source_in_control_messages() {
        let mut out = [0xaa; SEND_CONTROL_LEN];
        assert_eq!(encode_control(&mut out, None, None), 0, "nothing to say");

        let n = encode_control(&mut out, Some(1200), None);
        assert_eq!(
            out[..n],
            cmsg(libc::SOL_UDP, libc::UDP_SEGMENT, &1200u16.to_ne_bytes())[..]
        );

        let v4 = IpAddr::from([198, 18, 1, 1]);
        let n = encode_control(&mut out, None, Some(v4));
        let want = cmsg(
            libc::SOL_IP,
            libc::IP_PKTINFO,
            &in_pktinfo(0, [198, 18, 1, 1], [0; 4]),
        );
        assert_eq!(out[..n], want[..], "ipi_spec_dst names the source");

        let v6: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        let n = encode_control(&mut out, Some(600), Some(IpAddr::V6(v6)));
        assert_eq!(n, SEND_CONTROL_LEN, "the area holds both messages");
        let want = [
            cmsg(libc::SOL_UDP, libc::UDP_SEGMENT, &600u16.to_ne_bytes()),
            cmsg(libc::SOL_IPV6, libc::IPV6_PKTINFO, &in6_pktinfo(v6, 0)),
        ]
        .concat();
        assert_eq!(out[..n], want[..]);
        // What a send writes, a receive reads back.
        assert_eq!(read(&out[..n]).1, Some(IpAddr::V6(v6)));
    }

    #[test]
    fn a_wildcard_socket_leaves_room_for_the_destination_address() {
        assert_eq!(recv_control_len(false, false), 0);
        assert_eq!(recv_control_len(true, false), GRO_CONTROL_LEN);
        assert_eq!(
            recv_control_len(true, true),
            GRO_CONTROL_LEN + PKTINFO_CONTROL_LEN
        );
        assert_eq!(
            recv_payload_room(2048, false, false) - recv_payload_room(2048, false, true),
            PKTINFO_CONTROL_LEN
        );
    }

    #[test]
    fn a_coalesced_receive_splits_into_its_datagrams() {
        static BYTES: [u8; 3000] = [0; 3000];
        let bytes = &BYTES;
        let from: SocketAddr = "198.18.0.1:9".parse().unwrap();
        let at = |payload: &'static [u8], segment_size| Datagram {
            from,
            local: None,
            payload,
            offset: 160,
            segment_size,
        };
        let all = |d: Datagram<'_>| d.segments().collect::<Vec<_>>();
        assert_eq!(all(at(&bytes[..1200], None)), [(160, 1200)]);
        assert_eq!(
            all(at(&bytes[..3000], Some(1200))),
            [(160, 1200), (1360, 1200), (2560, 600)],
            "the last may be shorter"
        );
        assert_eq!(
            all(at(&bytes[..2400], Some(1200))),
            [(160, 1200), (1360, 1200)]
        );
        assert_eq!(
            all(at(&bytes[..0], None)),
            [(160, 0)],
            "an empty datagram is one"
        );
        assert_eq!(all(at(&bytes[..64], Some(0))), [(160, 64)]);
    }
}
