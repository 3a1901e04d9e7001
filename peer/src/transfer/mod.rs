//! A reliable, ordered file transfer over a [`DatagramLink`]: [`send_file`] on one peer,
//! [`receive_file`] on the other.
//!
//! QUIC (quinn-proto, sans-IO) is the reliability and congestion-control layer: the sender is
//! the QUIC client, the receiver the QUIC server, and every QUIC datagram is one link message
//! (no larger than [`DatagramLink::max_payload`], which must be at least QUIC's 1200; no path
//! MTU discovery). One loop per side waits for the link, QUIC's timer and the file, feeds QUIC
//! and sends what it has to send; the file is read and written on blocking threads in chunks,
//! so memory stays bounded by the flow-control window ([`TransferOptions::window`]) whatever the
//! file's size. Why QUIC's TLS accepts any certificate without weakening anything: see the
//! `quic` module (the link is Noise, already end-to-end authenticated).
//!
//! On its one stream the sender writes a header (magic, version, file name, size), the content
//! and the content's SHA-256; the receiver writes the content to a staging file
//! `DIR/.ferry-partial-RANDOM`, compares its own SHA-256, renames the file into place only on a
//! match (never over an existing file), and answers with a verdict byte. The receiver refuses a
//! name that is not one safe path component ([`check_file_name`]), a name that exists in `DIR`
//! and a file larger than the free space of `DIR`'s file system. Either side ends a transfer whose
//! peer stays silent for [`TransferOptions::idle_timeout`], or whose peer makes no progress
//! (no connection, no stream data, no verdict) for [`TransferOptions::stall_timeout`].

mod driver;
mod files;
mod progress;
mod quic;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{Dir, Endpoint, Event, ReadError, StreamEvent, StreamId, WriteError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use progress::{BarProgress, NoProgress, Progress};
pub use wire::check_file_name;

use crate::link::{DatagramLink, LinkError};
use driver::{Driver, Wake, lost};
use files::{PartialFile, ReadChunk};
use wire::{HASH_LEN, Inbound, InboundParser, Verdict, close};

/// The longest time between QUIC keep-alives: after a relay restart the session recovers its
/// binding in about 20 s, and the first keep-alive after that restarts a transfer whose
/// retransmissions backed off meanwhile.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The congestion controller QUIC runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// BBR (quinn-proto's implementation, which it calls experimental), the default: paces at
    /// the measured bottleneck rate and does not take random loss for congestion. Measured over
    /// an in-memory link with 5 % random loss: about 45 MiB/s, against 2.3 MiB/s for CUBIC.
    #[default]
    Bbr,
    /// CUBIC (RFC 9438), quinn-proto's own default; halves its window on every loss, which on
    /// a path with random loss keeps it slow.
    Cubic,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
}

/// How a transfer runs. [`Default`] suits a relay over the internet.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferOptions {
    /// A transfer whose peer sends nothing for this long ends with [`TransferError::Timeout`].
    /// Both sides send QUIC keep-alives every [`KEEP_ALIVE`] (or a third of this, if that is
    /// shorter), so a live peer never looks idle, and a transfer resumes within seconds once
    /// a session has recovered its binding (after a relay restart, about 20 s of silence).
    /// Default 60 s.
    pub idle_timeout: Duration,
    /// A transfer in which nothing moves for this long while this side waits for the other
    /// peer ends with [`TransferError::Stalled`]: no QUIC connection from the sender
    /// ([`receive_file`] fails with [`TransferError::NoConnection`]), no stream, no content,
    /// no room to send more, no verdict. Keep-alives do not count, so a peer that keeps QUIC
    /// alive but does nothing is caught too; waiting on this side's own disk does not count
    /// either. Default 60 s.
    pub stall_timeout: Duration,
    /// QUIC's flow-control window, in bytes: the most content in flight and buffered at the
    /// receiver at once, which caps throughput at `window / round-trip time`. Default 16 MiB
    /// (about 670 Mbit/s at a 200 ms round trip).
    pub window: u64,
    /// The congestion controller. Default [`Congestion::Bbr`].
    pub congestion: Congestion,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
            window: 16 * 1024 * 1024,
            congestion: Congestion::default(),
        }
    }
}

/// What a finished transfer did.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferReport {
    /// The file's name (its base name; the receiver wrote it under this name).
    pub name: String,
    /// The content's length in bytes.
    pub bytes: u64,
    /// From the start of the QUIC connection to the verdict.
    pub elapsed: Duration,
    /// The content's SHA-256, lower-case hex, as both sides computed it.
    pub hash_hex: String,
    /// Where the receiver wrote the file; `None` on the sender.
    pub path: Option<PathBuf>,
    /// QUIC packets this side sent.
    pub sent_packets: u64,
    /// QUIC packets this side declared lost (and sent again).
    pub lost_packets: u64,
    /// QUIC's smoothed round-trip time at the end.
    pub rtt: Duration,
    /// Link messages that were not part of the transfer's QUIC connection and were dropped.
    pub ignored_datagrams: u64,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The link under the transfer failed (the session ended).
    #[error("the link to the other peer failed: {0}")]
    Link(#[from] LinkError),
    /// The receiver would not take the file (unsafe name, file exists, not enough space); it
    /// says why.
    #[error("the receiver refused the file: {0}")]
    PeerRefused(String),
    /// The other peer gave up on its own (its file could not be read or written).
    #[error("the other peer aborted the transfer: {0}")]
    PeerAborted(String),
    /// The sender's file name is not one safe path component.
    #[error("refusing the file name {name:?}: {reason}")]
    UnsafeName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The receiver's directory already holds the name.
    #[error("{} already exists; a transfer never replaces a file", path.display())]
    FileExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The file is larger than the free space of the receiver's file system.
    #[error("not enough space for {name:?} ({size} bytes) in {}: {free} bytes free", dir.display())]
    NoSpace {
        /// The receiver's directory.
        dir: PathBuf,
        /// The file's name.
        name: String,
        /// The file's size, as announced.
        size: u64,
        /// The space left on the directory's file system.
        free: u64,
    },
    /// The receiver's SHA-256 of what arrived differs from the sender's; nothing was kept.
    #[error(
        "the content's SHA-256 does not match: the sender computed {sent}, this receiver {computed}; the partial file was deleted"
    )]
    HashMismatch {
        /// The sender's hash, hex.
        sent: String,
        /// The receiver's hash, hex.
        computed: String,
    },
    /// The receiver reports that its SHA-256 differs from this sender's.
    #[error(
        "the receiver's SHA-256 of the content does not match this sender's {sent}; it kept nothing"
    )]
    ReceiverHashMismatch {
        /// The sender's hash, hex.
        sent: String,
    },
    /// A local file or directory could not be used.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`"reading"`, `"creating"`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The other peer sent nothing for this long, not even a QUIC keep-alive.
    #[error("the other peer was silent for {0:?}; the transfer is abandoned")]
    Timeout(Duration),
    /// Nothing moved for this long while this side waited for the other peer.
    #[error("nothing moved for {waited:?} while waiting for {awaiting}; the transfer is abandoned")]
    Stalled {
        /// How long nothing moved ([`TransferOptions::stall_timeout`]).
        waited: Duration,
        /// What this side was waiting for.
        awaiting: &'static str,
    },
    /// No sender opened a QUIC connection within this long of the receiver's start.
    #[error(
        "the other peer opened no transfer within {0:?}; it must run `ferry-peer send` (is it running `recv` too?)"
    )]
    NoConnection(Duration),
    /// The other peer is a QUIC client too: both sides run [`send_file`].
    #[error(
        "the other peer is sending too (its QUIC client's first packet reached this one); one side must run `ferry-peer recv`"
    )]
    PeerAlsoSending,
    /// The other peer broke the transfer protocol.
    #[error("transfer protocol violation: {0}")]
    Protocol(String),
    /// The link's messages are too small for QUIC.
    #[error("the link carries messages of at most {0} bytes; QUIC needs 1200")]
    LinkTooSmall(usize),
    /// QUIC or TLS could not be set up with these options.
    #[error("setting up the transfer: {0}")]
    Setup(String),
    /// The QUIC connection failed (a transport error, a reset).
    #[error("the transfer's QUIC connection failed: {0}")]
    Quic(String),
}

impl TransferError {
    /// The QUIC close code that tells the other peer about this error.
    fn close_code(&self) -> u32 {
        match self {
            Self::UnsafeName { .. } | Self::FileExists { .. } | Self::NoSpace { .. } => {
                close::REFUSED
            }
            Self::Protocol(_) => close::PROTOCOL,
            // The verdict told the other peer the outcome; the transfer itself is done.
            Self::HashMismatch { .. } | Self::ReceiverHashMismatch { .. } => close::DONE,
            _ => close::ABORTED,
        }
    }

    /// The reason a close for this error gives the other peer: the error's text without this
    /// side's directories (a file's name alone), cut to [`MAX_REASON`] bytes.
    fn peer_reason(&self) -> String {
        let base = |path: &Path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut text = match self {
            Self::FileExists { path } => format!(
                "{} already exists; a transfer never replaces a file",
                base(path)
            ),
            Self::NoSpace { name, size, .. } => {
                format!("not enough space for {name:?} ({size} bytes)")
            }
            Self::Io {
                action,
                path,
                source,
            } => format!("{action} {}: {source}", base(path)),
            other => other.to_string(),
        };
        if text.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }
}

/// The longest reason sent in a QUIC close.
const MAX_REASON: usize = 512;

/// Sends the file at `path` to the peer at the other end of `link`, which runs
/// [`receive_file`]. Returns once the receiver has confirmed the content's hash.
pub async fn send_file<L: DatagramLink>(
    link: Arc<L>,
    path: &Path,
    options: &TransferOptions,
    progress: &dyn Progress,
) -> Result<TransferReport, TransferError> {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| TransferError::UnsafeName {
            name: path.display().to_string(),
            reason: "the path has no UTF-8 file name",
        })?
        .to_owned();
    check_file_name(&name).map_err(|reason| TransferError::UnsafeName {
        name: name.clone(),
        reason,
    })?;
    let io_error = |action, source| TransferError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|e| io_error("opening", e))?;
    let meta = file.metadata().map_err(|e| io_error("reading", e))?;
    if !meta.is_file() {
        return Err(io_error(
            "sending",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let size = meta.len();
    let header = wire::encode_header(&name, size).map_err(|reason| TransferError::UnsafeName {
        name: name.clone(),
        reason,
    })?;

    let datagram = quic::datagram_size(link.max_payload())?;
    let transport = quic::transport_config(options, datagram, quic::Role::Client)?;
    let endpoint = Endpoint::new(quic::endpoint_config(datagram)?, None, false, None);
    let started = Instant::now();
    let mut driver = Driver::connect(link, endpoint, quic::client_config(transport)?)?;
    let mut reader = files::spawn_reader(file, path.to_owned(), size);
    progress.start(&name, size);
    match run_sender(&mut driver, header, size, &mut reader, progress, options).await {
        Ok(hash) => {
            driver.close(close::DONE, "done").await;
            progress.finish();
            Ok(report(&driver, name, size, started, &hash, None))
        }
        Err(e) => {
            driver.close(e.close_code(), &e.peer_reason()).await;
            Err(e)
        }
    }
}

/// The sender's loop: connect, open the stream, write header, content and hash, read the
/// verdict. Returns the content's hash once the receiver confirmed it.
async fn run_sender<L: DatagramLink>(
    driver: &mut Driver<L>,
    header: Bytes,
    size: u64,
    reader: &mut mpsc::Receiver<ReadChunk>,
    progress: &dyn Progress,
    options: &TransferOptions,
) -> Result<[u8; HASH_LEN], TransferError> {
    let header_len = header.len() as u64;
    let mut stream: Option<StreamId> = None;
    let mut pending: VecDeque<Bytes> = VecDeque::from([header]);
    let mut hash: Option<[u8; HASH_LEN]> = None;
    let mut finished = false;
    let mut blocked = false;
    let mut stopped = false;
    let mut written: u64 = 0;
    let mut verdict: Vec<u8> = Vec::new();
    // When something last moved: the connection came up, the stream took data, the verdict
    // arrived.
    let mut moved = tokio::time::Instant::now();
    loop {
        while let Some(event) = driver.poll() {
            match event {
                Event::Connected => {
                    moved = tokio::time::Instant::now();
                    stream = Some(driver.conn.streams().open(Dir::Bi).ok_or_else(|| {
                        TransferError::Protocol("the receiver allows no stream".into())
                    })?);
                }
                Event::ConnectionLost { reason } => return Err(lost(reason, options.idle_timeout)),
                Event::Stream(StreamEvent::Writable { .. }) => blocked = false,
                Event::Stream(StreamEvent::Readable { id }) if Some(id) == stream => {
                    moved = tokio::time::Instant::now();
                    let ended = read_verdict(driver, id, &mut verdict)?;
                    if ended {
                        return judge(&verdict, finished, hash);
                    }
                }
                _ => {}
            }
        }
        if stream.is_none() && driver.peer_is_client {
            return Err(TransferError::PeerAlsoSending);
        }
        if let Some(id) = stream
            && !blocked
        {
            let before = written;
            while let Some(front) = pending.front_mut() {
                match driver
                    .conn
                    .send_stream(id)
                    .write_chunks(std::slice::from_mut(front))
                {
                    // A partial write filled the window; the next write returns `Blocked`,
                    // which is what makes quinn report `Writable` once there is room again.
                    Ok(w) => {
                        written += w.bytes as u64;
                        if front.is_empty() {
                            pending.pop_front();
                        }
                    }
                    Err(WriteError::Blocked) => {
                        blocked = true;
                        break;
                    }
                    // The receiver stopped the stream: its close, with the reason, follows.
                    Err(WriteError::Stopped(_)) => {
                        blocked = true;
                        stopped = true;
                        pending.clear();
                        break;
                    }
                    Err(WriteError::ClosedStream) => {
                        return Err(TransferError::Protocol(
                            "the transfer's stream closed early".into(),
                        ));
                    }
                }
            }
            if written != before {
                moved = tokio::time::Instant::now();
                progress.advance(written.saturating_sub(header_len).min(size));
            }
            if pending.is_empty() && hash.is_some() && !finished {
                driver
                    .conn
                    .send_stream(id)
                    .finish()
                    .map_err(|e| TransferError::Quic(format!("finishing the stream: {e}")))?;
                finished = true;
            }
        }
        driver.flush().await?;
        let want_chunk = stream.is_some() && pending.is_empty() && hash.is_none() && !blocked;
        let next_chunk = async {
            if want_chunk {
                reader.recv().await
            } else {
                std::future::pending().await
            }
        };
        // What this side waits for from the receiver; nothing while it waits for its own file.
        let awaiting = if stream.is_none() {
            Some("the receiver's QUIC handshake")
        } else if stopped {
            Some("the receiver's close after it stopped the stream")
        } else if blocked {
            Some("the receiver to take more of the file")
        } else if finished {
            Some("the receiver's verdict")
        } else {
            None
        };
        let stall = awaiting.and_then(|_| moved.checked_add(options.stall_timeout));
        match driver.wait(next_chunk, stall).await? {
            Wake::Stalled => {
                return Err(TransferError::Stalled {
                    waited: options.stall_timeout,
                    awaiting: awaiting.unwrap_or("the receiver"),
                });
            }
            Wake::Network => {}
            Wake::App(Some(ReadChunk::Data(chunk))) => pending.push_back(chunk),
            Wake::App(Some(ReadChunk::Done(digest))) => {
                hash = Some(digest);
                pending.push_back(Bytes::copy_from_slice(&digest));
            }
            Wake::App(Some(ReadChunk::Failed(e))) => return Err(e),
            Wake::App(None) => {
                return Err(TransferError::Setup("the file reader stopped".into()));
            }
        }
    }
}

/// What the receiver's verdict means for the sender, which wrote everything (`finished`) with
/// the content's `hash`.
fn judge(
    verdict: &[u8],
    finished: bool,
    hash: Option<[u8; HASH_LEN]>,
) -> Result<[u8; HASH_LEN], TransferError> {
    let (true, Some(sent)) = (finished, hash) else {
        return Err(TransferError::Protocol(
            "the receiver answered before the whole file was sent".into(),
        ));
    };
    match verdict {
        [byte] => match Verdict::from_byte(*byte) {
            Some(Verdict::Ok) => Ok(sent),
            Some(Verdict::Mismatch) => Err(TransferError::ReceiverHashMismatch {
                sent: files::hex(&sent),
            }),
            None => Err(TransferError::Protocol(format!("unknown verdict {byte}"))),
        },
        other => Err(TransferError::Protocol(format!(
            "a verdict of {} bytes",
            other.len()
        ))),
    }
}

/// Reads what the receiver has sent on the stream into `verdict`; true once the stream ended.
fn read_verdict<L: DatagramLink>(
    driver: &mut Driver<L>,
    id: StreamId,
    verdict: &mut Vec<u8>,
) -> Result<bool, TransferError> {
    let mut recv = driver.conn.recv_stream(id);
    let mut chunks = recv
        .read(true)
        .map_err(|e| TransferError::Quic(format!("reading the verdict: {e}")))?;
    let ended = loop {
        match chunks.next(16) {
            Ok(Some(chunk)) => {
                if verdict.len() + chunk.bytes.len() > 16 {
                    let _ = chunks.finalize();
                    return Err(TransferError::Protocol("an overlong verdict".into()));
                }
                verdict.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => break true,
            Err(ReadError::Blocked) => break false,
            Err(ReadError::Reset(code)) => {
                let _ = chunks.finalize();
                return Err(TransferError::PeerAborted(format!(
                    "the receiver reset the stream (code {code})"
                )));
            }
        }
    };
    let _ = chunks.finalize();
    Ok(ended)
}

/// Receives one file from the peer at the other end of `link`, which runs [`send_file`], into
/// the directory `dir`. Returns once the file is in place under its sent name with a matching
/// hash, and the sender has the verdict (or has gone).
pub async fn receive_file<L: DatagramLink>(
    link: Arc<L>,
    dir: &Path,
    options: &TransferOptions,
    progress: &dyn Progress,
) -> Result<TransferReport, TransferError> {
    let meta = std::fs::metadata(dir).map_err(|source| TransferError::Io {
        action: "opening the directory",
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(TransferError::Io {
            action: "opening the directory",
            path: dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let datagram = quic::datagram_size(link.max_payload())?;
    let transport = quic::transport_config(options, datagram, quic::Role::Server)?;
    let server = quic::server_config(transport)?;
    let endpoint = Endpoint::new(
        quic::endpoint_config(datagram)?,
        Some(server.clone()),
        false,
        None,
    );
    let mut driver = Driver::accept(link, endpoint, server, options.stall_timeout).await?;
    let started = Instant::now();
    let mut receiver = Receiver {
        more_to_read: true,
        ..Receiver::default()
    };
    let outcome = run_receiver(&mut driver, &mut receiver, dir, progress, options).await;
    match outcome {
        Ok((path, hash)) => {
            driver.close(close::DONE, "done").await;
            progress.finish();
            let (name, size) = receiver.header.unwrap_or_default();
            Ok(report(&driver, name, size, started, &hash, Some(path)))
        }
        Err(e) => {
            driver.close(e.close_code(), &e.peer_reason()).await;
            Err(e)
        }
    }
}

/// The receiver's state between loop turns.
#[derive(Default)]
struct Receiver {
    stream: Option<StreamId>,
    parser: InboundParser,
    /// The header's name and size, once read.
    header: Option<(String, u64)>,
    /// The partial file and the writer's channel and task.
    file: Option<PartialFile>,
    writer: Option<mpsc::Sender<Bytes>>,
    writer_task: Option<JoinHandle<Result<[u8; HASH_LEN], TransferError>>>,
    /// Content read from QUIC, gathered into a chunk for the writer.
    batch: BytesMut,
    /// Chunks the writer has no room for yet.
    to_writer: VecDeque<Bytes>,
    handed: u64,
    /// The sender's hash, once read.
    sent_hash: Option<[u8; HASH_LEN]>,
    stream_ended: bool,
    /// The stream may hold data not read yet: false only after a read found it drained and
    /// before anything new came in.
    more_to_read: bool,
    /// The outcome, once the verdict is written: waiting for the sender to acknowledge it.
    outcome: Option<Result<(PathBuf, [u8; HASH_LEN]), TransferError>>,
    /// The sender acknowledged everything on the stream, the verdict included.
    verdict_acknowledged: bool,
    /// When something last moved (the stream opened, data came, the writer took some); `None`
    /// until the first turn.
    moved: Option<tokio::time::Instant>,
}

/// What the receiver's file work finished with.
enum FileWake {
    /// The writer has room again.
    WriterReady,
    /// The stream had more data than one turn reads.
    ReadMore,
    /// The writer wrote and synced everything: its hash, or why it failed.
    WriterDone(Result<[u8; HASH_LEN], TransferError>),
}

/// How much stream data the receiver reads per loop turn before it lets QUIC and the writer
/// run.
const READ_PER_TURN: usize = 1024 * 1024;

/// The receiver's loop: accept the stream, parse it, write the file, conclude, answer, and wait
/// for the answer to be acknowledged.
async fn run_receiver<L: DatagramLink>(
    driver: &mut Driver<L>,
    r: &mut Receiver,
    dir: &Path,
    progress: &dyn Progress,
    options: &TransferOptions,
) -> Result<(PathBuf, [u8; HASH_LEN]), TransferError> {
    loop {
        let turn = receiver_turn(driver, r, dir, progress, options).await;
        // Once the verdict is out the file's fate is decided, whatever the link does next.
        if (r.verdict_acknowledged || turn.is_err())
            && let Some(outcome) = r.outcome.take()
        {
            return outcome;
        }
        turn?;
    }
}

/// One turn of the receiver's loop.
async fn receiver_turn<L: DatagramLink>(
    driver: &mut Driver<L>,
    r: &mut Receiver,
    dir: &Path,
    progress: &dyn Progress,
    options: &TransferOptions,
) -> Result<(), TransferError> {
    let handed_before = r.handed;
    let mut moved = false;
    while let Some(event) = driver.poll() {
        match event {
            Event::ConnectionLost { reason } => return Err(lost(reason, options.idle_timeout)),
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) if r.stream.is_none() => {
                r.stream = driver.conn.streams().accept(Dir::Bi);
                moved = true;
            }
            Event::Stream(StreamEvent::Finished { id }) if Some(id) == r.stream => {
                r.verdict_acknowledged = true;
            }
            _ => {}
        }
    }
    feed_writer(r, progress)?;
    if let Some(id) = r.stream
        && r.to_writer.is_empty()
        && r.more_to_read
        && !r.stream_ended
    {
        let mut found = Vec::new();
        let mut recv = driver.conn.recv_stream(id);
        let mut chunks = recv
            .read(true)
            .map_err(|e| TransferError::Quic(format!("reading the stream: {e}")))?;
        let mut read = 0;
        let mut failure = None;
        while read < READ_PER_TURN {
            match chunks.next(READ_PER_TURN - read) {
                Ok(Some(chunk)) => {
                    read += chunk.bytes.len();
                    if let Err(e) = r.parser.feed(chunk.bytes, &mut found) {
                        failure = Some(TransferError::Protocol(e));
                        break;
                    }
                }
                Ok(None) => {
                    if let Err(e) = r.parser.finish() {
                        failure = Some(TransferError::Protocol(e));
                    }
                    r.stream_ended = true;
                    r.more_to_read = false;
                    break;
                }
                Err(ReadError::Blocked) => {
                    r.more_to_read = false;
                    break;
                }
                Err(ReadError::Reset(code)) => {
                    failure = Some(TransferError::PeerAborted(format!(
                        "the sender reset the stream (code {code})"
                    )));
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        moved |= read > 0;
        if let Some(e) = failure {
            return Err(e);
        }
        for item in found {
            take_inbound(r, item, dir, progress)?;
        }
    }
    feed_writer(r, progress)?;
    if r.stream_ended && r.to_writer.is_empty() && r.writer.is_some() {
        // All content is with the writer: let it sync and hash.
        r.writer = None;
    }
    driver.flush().await?;
    let want_room = !r.to_writer.is_empty();
    let writer_task = if r.writer.is_none() {
        r.writer_task.as_mut()
    } else {
        None
    };
    let writer = r.writer.as_ref();
    let more_to_read =
        r.more_to_read && r.stream.is_some() && !r.stream_ended && r.to_writer.is_empty();
    let now = tokio::time::Instant::now();
    if moved || r.handed != handed_before || r.moved.is_none() {
        r.moved = Some(now);
    }
    // What this side waits for from the sender; nothing while its own disk is busy.
    let awaiting = if r.stream.is_none() {
        Some("the sender's stream")
    } else if r.outcome.is_some() {
        Some("the sender to acknowledge the verdict")
    } else if want_room || writer_task.is_some() || more_to_read {
        None
    } else {
        Some("more of the sender's stream")
    };
    let stall = awaiting.and_then(|_| r.moved.unwrap_or(now).checked_add(options.stall_timeout));
    let file_work = async {
        match (want_room, writer, writer_task) {
            // No packet may come to wake the loop for data QUIC already holds.
            _ if more_to_read => FileWake::ReadMore,
            (true, Some(writer), _) => {
                let _ = writer.reserve().await;
                FileWake::WriterReady
            }
            (_, None, Some(task)) => FileWake::WriterDone(task.await.unwrap_or_else(|e| {
                Err(TransferError::Setup(format!("the file writer failed: {e}")))
            })),
            _ => std::future::pending().await,
        }
    };
    match driver.wait(file_work, stall).await? {
        Wake::Stalled => {
            return Err(TransferError::Stalled {
                waited: options.stall_timeout,
                awaiting: awaiting.unwrap_or("the sender"),
            });
        }
        Wake::Network => r.more_to_read = true,
        Wake::App(FileWake::WriterReady | FileWake::ReadMore) => {}
        Wake::App(FileWake::WriterDone(result)) => {
            r.writer_task = None;
            r.moved = Some(tokio::time::Instant::now());
            let computed = result?;
            let id = r
                .stream
                .ok_or_else(|| TransferError::Setup("no stream".into()))?;
            let sent = r
                .sent_hash
                .ok_or_else(|| TransferError::Protocol("the stream ended without a hash".into()))?;
            let partial = r
                .file
                .take()
                .ok_or_else(|| TransferError::Setup("no partial file".into()))?;
            let outcome = files::conclude(partial, &sent, &computed);
            let verdict = match &outcome {
                Ok(_) => Verdict::Ok,
                Err(TransferError::HashMismatch { .. }) => Verdict::Mismatch,
                Err(_) => return outcome.map(|_| ()),
            };
            let mut send = driver.conn.send_stream(id);
            send.write(&[verdict as u8])
                .map_err(|e| TransferError::Quic(format!("writing the verdict: {e}")))?;
            send.finish()
                .map_err(|e| TransferError::Quic(format!("finishing the stream: {e}")))?;
            r.outcome = Some(outcome.map(|path| (path, computed)));
            driver.flush().await?;
        }
    }
    Ok(())
}

/// Acts on one thing the parser found: the header opens the partial file, content goes to the
/// writer, the hash is kept for the verdict.
fn take_inbound(
    r: &mut Receiver,
    item: Inbound,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<(), TransferError> {
    match item {
        Inbound::Header { name, size } => {
            check_file_name(&name).map_err(|reason| TransferError::UnsafeName {
                name: name.clone(),
                reason,
            })?;
            let (partial, file) = PartialFile::create(dir, &name, size)?;
            let (writer, task) = files::spawn_writer(file, partial.path.clone());
            progress.start(&name, size);
            r.file = Some(partial);
            r.writer = Some(writer);
            r.writer_task = Some(task);
            r.header = Some((name, size));
        }
        // QUIC hands content over a packet at a time; the writer gets it in large chunks, so
        // that a chunk costs one wake-up and one write, not one per packet.
        Inbound::Content(bytes) => {
            r.batch.extend_from_slice(&bytes);
            if r.batch.len() >= files::CHUNK {
                r.to_writer.push_back(r.batch.split().freeze());
            }
        }
        Inbound::Hash(hash) => {
            if !r.batch.is_empty() {
                r.to_writer.push_back(r.batch.split().freeze());
            }
            r.sent_hash = Some(hash);
        }
    }
    Ok(())
}

/// Hands queued content to the writer while it has room.
fn feed_writer(r: &mut Receiver, progress: &dyn Progress) -> Result<(), TransferError> {
    let Some(writer) = &r.writer else {
        return Ok(());
    };
    let before = r.handed;
    while let Some(chunk) = r.to_writer.pop_front() {
        let len = chunk.len() as u64;
        match writer.try_send(chunk) {
            Ok(()) => r.handed += len,
            Err(mpsc::error::TrySendError::Full(chunk)) => {
                r.to_writer.push_front(chunk);
                break;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The writer stopped on an error; its task says which.
                r.writer = None;
                r.to_writer.clear();
                break;
            }
        }
    }
    if r.handed != before {
        progress.advance(r.handed);
    }
    Ok(())
}

/// The report of a finished transfer.
fn report<L: DatagramLink>(
    driver: &Driver<L>,
    name: String,
    bytes: u64,
    started: Instant,
    hash: &[u8; HASH_LEN],
    path: Option<PathBuf>,
) -> TransferReport {
    let stats = driver.conn.stats();
    TransferReport {
        name,
        bytes,
        elapsed: started.elapsed(),
        hash_hex: files::hex(hash),
        path,
        sent_packets: stats.path.sent_packets,
        lost_packets: stats.path.lost_packets,
        rtt: stats.path.rtt,
        ignored_datagrams: driver.ignored,
    }
}
