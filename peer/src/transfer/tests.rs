//! Transfers between two ends of an in-memory link, perfect and impaired, and the ways one
//! fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;
use crate::link::{Impairment, MemoryLink, memory_pair};

/// Deterministic pseudo-random content.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Options with timeouts short enough for tests.
fn quick() -> TransferOptions {
    TransferOptions {
        idle_timeout: Duration::from_secs(2),
        stall_timeout: Duration::from_secs(10),
        ..TransferOptions::default()
    }
}

/// The names in `dir`, sorted.
pub(super) fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Writes `data` as `name` in a new source directory.
fn source(name: &str, data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, data).expect("write source");
    (dir, path)
}

/// Runs a sender and a receiver over the two ends of a link, each on its own task.
async fn run_pair<A: DatagramLink, B: DatagramLink>(
    send_end: A,
    recv_end: B,
    path: &Path,
    dest: &Path,
    send_options: TransferOptions,
    recv_options: TransferOptions,
) -> (
    Result<TransferReport, TransferError>,
    Result<TransferReport, TransferError>,
) {
    let path = path.to_owned();
    let dest = dest.to_owned();
    let receiver = tokio::spawn(async move {
        receive_file(Arc::new(recv_end), &dest, &recv_options, &NoProgress).await
    });
    let sender = tokio::spawn(async move {
        send_file(Arc::new(send_end), &path, &send_options, &NoProgress).await
    });
    let sent = sender.await.expect("sender task");
    let received = receiver.await.expect("receiver task");
    (sent, received)
}

/// Sends `data` over a link with `impairment` and checks it arrived byte for byte.
async fn round_trip(impairment: Impairment, data: &[u8]) {
    let (a, b) = memory_pair(impairment);
    let (_src, path) = source("data.bin", data);
    let dest = tempfile::tempdir().expect("tempdir");
    let (sent, received) = run_pair(a, b, &path, dest.path(), quick(), quick()).await;
    let sent = sent.expect("send");
    let received = received.expect("receive");
    let expected_hash = files::hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    assert_eq!(sent.hash_hex, expected_hash);
    assert_eq!(received.hash_hex, expected_hash);
    assert_eq!(
        (sent.bytes, received.bytes),
        (data.len() as u64, data.len() as u64)
    );
    assert_eq!(received.name, "data.bin");
    assert_eq!(
        received.path.as_deref(),
        Some(dest.path().join("data.bin").as_path())
    );
    assert_eq!(sent.path, None);
    assert!(
        std::fs::read(dest.path().join("data.bin")).expect("read") == data,
        "the received file differs"
    );
    assert_eq!(entries(dest.path()), vec!["data.bin"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_arrives_byte_identical_over_a_perfect_link() {
    round_trip(Impairment::NONE, &content(4 << 20, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_arrives_intact_through_loss_reordering_and_delay() {
    let impairment = Impairment {
        loss: 0.05,
        reorder: 0.05,
        delay: Duration::from_millis(2),
        seed: 11,
    };
    round_trip(impairment, &content(2 << 20, 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_link_makes_quic_resend() {
    let (a, b) = memory_pair(Impairment {
        loss: 0.05,
        reorder: 0.0,
        delay: Duration::from_millis(1),
        seed: 5,
    });
    let data = content(1 << 20, 3);
    let (_src, path) = source("lossy", &data);
    let dest = tempfile::tempdir().expect("tempdir");
    let (sent, received) = run_pair(a, b, &path, dest.path(), quick(), quick()).await;
    let sent = sent.expect("send");
    received.expect("receive");
    assert!(sent.lost_packets > 0, "no loss seen: {sent:?}");
    assert!(sent.sent_packets > 700, "{sent:?}");
}

#[test]
fn the_sender_judges_the_verdict() {
    let hash = [7; HASH_LEN];
    assert_eq!(
        judge(&[Verdict::Ok as u8], true, Some(hash)).expect("ok"),
        hash
    );
    assert!(matches!(
        judge(&[Verdict::Mismatch as u8], true, Some(hash)),
        Err(TransferError::ReceiverHashMismatch { sent }) if sent == "07".repeat(32)
    ));
    for (verdict, finished) in [
        (&[9u8][..], true),
        (&[0, 0][..], true),
        (&[][..], true),
        (&[0][..], false),
    ] {
        assert!(
            matches!(
                judge(verdict, finished, Some(hash)),
                Err(TransferError::Protocol(_))
            ),
            "{verdict:?} {finished}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_arrives() {
    round_trip(Impairment::NONE, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_file_is_refused_and_kept() {
    let (a, b) = memory_pair(Impairment::NONE);
    let (_src, path) = source("taken.txt", b"new content");
    let dest = tempfile::tempdir().expect("tempdir");
    std::fs::write(dest.path().join("taken.txt"), b"old content").expect("write");
    let (sent, received) = run_pair(a, b, &path, dest.path(), quick(), quick()).await;
    match sent {
        Err(TransferError::PeerRefused(reason)) => {
            // The name alone: the receiver's directory is none of the sender's business.
            assert!(reason.starts_with("taken.txt already exists"), "{reason}");
            assert!(
                !reason.contains(dest.path().to_str().expect("UTF-8")),
                "{reason}"
            );
        }
        other => panic!("the sender got {other:?}"),
    }
    assert!(
        matches!(received, Err(TransferError::FileExists { .. })),
        "{received:?}"
    );
    assert_eq!(
        std::fs::read(dest.path().join("taken.txt")).expect("read"),
        b"old content"
    );
    assert_eq!(entries(dest.path()), vec!["taken.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_refuses_an_unsafe_name_before_connecting() {
    let (a, _b) = memory_pair(Impairment::NONE);
    let (_src, path) = source("bell\x07", b"x");
    let err = send_file(Arc::new(a), &path, &quick(), &NoProgress)
        .await
        .expect_err("refused");
    assert!(matches!(err, TransferError::UnsafeName { .. }), "{err:?}");
}

#[test]
fn the_receiver_refuses_unsafe_names_and_creates_nothing() {
    let dest = tempfile::tempdir().expect("tempdir");
    for name in [
        "",
        ".",
        "..",
        "../escape",
        "a/b",
        "nul\0",
        "esc\x1b[2J",
        "invoice_\u{202e}fdp.exe",
        "zero\u{200b}width",
    ] {
        let mut r = Receiver::default();
        let err = take_inbound(
            &mut r,
            Inbound::Header {
                name: name.into(),
                size: 1,
            },
            dest.path(),
            &NoProgress,
        )
        .expect_err("refused");
        assert!(
            matches!(err, TransferError::UnsafeName { .. }),
            "{name:?}: {err:?}"
        );
        assert_eq!(err.close_code(), close::REFUSED);
        assert!(r.file.is_none());
    }
    assert!(entries(dest.path()).is_empty());
}

/// A link end that reports itself closed after it has received `budget` messages.
struct CutLink {
    inner: MemoryLink,
    budget: AtomicU64,
}

impl DatagramLink for CutLink {
    fn max_payload(&self) -> usize {
        self.inner.max_payload()
    }

    async fn send(&self, message: &[u8]) -> Result<(), LinkError> {
        self.inner.send(message).await
    }

    async fn recv(&self) -> Result<Vec<u8>, LinkError> {
        if self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_err()
        {
            return Err(LinkError::Closed("cut by the test".into()));
        }
        self.inner.recv().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_closed_mid_transfer_fails_both_sides_and_leaves_no_partial_file() {
    let (a, b) = memory_pair(Impairment::NONE);
    let cut = CutLink {
        inner: b,
        budget: AtomicU64::new(400),
    };
    let data = content(4 << 20, 4);
    let (_src, path) = source("cut.bin", &data);
    let dest = tempfile::tempdir().expect("tempdir");
    let (sent, received) = run_pair(a, cut, &path, dest.path(), quick(), quick()).await;
    assert!(
        matches!(received, Err(TransferError::Link(LinkError::Closed(_)))),
        "{received:?}"
    );
    // The receiver tells the sender why it gives up, then drops its end of the link: the
    // sender sees the one or the other, whichever reaches it first.
    assert!(
        matches!(
            sent,
            Err(TransferError::PeerAborted(_) | TransferError::Link(_))
        ),
        "{sent:?}"
    );
    assert!(
        entries(dest.path()).is_empty(),
        "{:?}",
        entries(dest.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_ends_the_transfer_after_the_idle_timeout() {
    let (a, silent) = memory_pair(Impairment::NONE);
    let (_src, path) = source("nobody", b"listening");
    let options = TransferOptions {
        idle_timeout: Duration::from_millis(500),
        ..quick()
    };
    let err = send_file(Arc::new(a), &path, &options, &NoProgress)
        .await
        .expect_err("times out");
    assert!(matches!(err, TransferError::Timeout(_)), "{err:?}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_gives_up_when_no_sender_connects() {
    // The other peer runs `recv` too, or nothing: either way no QUIC packet comes.
    let (a, _also_receiving) = memory_pair(Impairment::NONE);
    let dest = tempfile::tempdir().expect("tempdir");
    let options = TransferOptions {
        stall_timeout: Duration::from_millis(300),
        ..quick()
    };
    let err = receive_file(Arc::new(a), dest.path(), &options, &NoProgress)
        .await
        .expect_err("nobody sends");
    assert!(matches!(err, TransferError::NoConnection(_)), "{err:?}");
    assert!(err.to_string().contains("`recv` too"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_tell_that_both_are_sending() {
    let (a, b) = memory_pair(Impairment::NONE);
    let (_src, path) = source("mine", b"x");
    // Long enough that the idle timeout cannot be what ends them.
    let options = TransferOptions {
        idle_timeout: Duration::from_secs(30),
        ..quick()
    };
    let both = async {
        tokio::join!(
            send_file(Arc::new(a), &path, &options, &NoProgress),
            send_file(Arc::new(b), &path, &options, &NoProgress),
        )
    };
    let (one, two) = tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .expect("the senders did not notice each other");
    for result in [one, two] {
        let err = result.expect_err("nobody receives");
        assert!(matches!(err, TransferError::PeerAlsoSending), "{err:?}");
        assert!(err.to_string().contains("`ferry-peer recv`"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_ignores_datagrams_that_are_not_quic() {
    let (a, b) = memory_pair(Impairment::NONE);
    // Junk before the sender's first packet: the receiver drops and counts it.
    a.send(b"not quic at all").await.expect("send junk");
    let data = content(64 << 10, 6);
    let (_src, path) = source("after-junk", &data);
    let dest = tempfile::tempdir().expect("tempdir");
    let (sent, received) = run_pair(a, b, &path, dest.path(), quick(), quick()).await;
    sent.expect("send");
    let received = received.expect("receive");
    assert!(received.ignored_datagrams >= 1, "{received:?}");
    assert_eq!(
        std::fs::read(dest.path().join("after-junk")).expect("read"),
        data
    );
}

#[tokio::test]
async fn a_link_too_small_for_quic_is_refused() {
    struct Tiny(MemoryLink);
    impl DatagramLink for Tiny {
        fn max_payload(&self) -> usize {
            1000
        }
        async fn send(&self, message: &[u8]) -> Result<(), LinkError> {
            self.0.send(message).await
        }
        async fn recv(&self) -> Result<Vec<u8>, LinkError> {
            self.0.recv().await
        }
    }
    let (a, _b) = memory_pair(Impairment::NONE);
    let (_src, path) = source("f", b"x");
    let err = send_file(Arc::new(Tiny(a)), &path, &quick(), &NoProgress)
        .await
        .expect_err("too small");
    assert!(matches!(err, TransferError::LinkTooSmall(1000)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_larger_than_the_window_never_waits_for_a_keep_alive() {
    // Both loops must act on data QUIC already holds without a new packet to wake them: a
    // window smaller than the file makes the sender block and resume, and the receiver read
    // in several turns. With keep-alives 40 s apart, a loop that waited for the next packet
    // would stall far past the guard below (a liveness bound, not a speed figure).
    let options = TransferOptions {
        idle_timeout: Duration::from_secs(120),
        window: 4 << 20,
        ..quick()
    };
    let (a, b) = memory_pair(Impairment::NONE);
    let data = content(6 << 20, 8);
    let (_src, path) = source("windowed", &data);
    let dest = tempfile::tempdir().expect("tempdir");
    let run = run_pair(a, b, &path, dest.path(), options.clone(), options);
    let (sent, received) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the transfer stalled");
    sent.expect("send");
    received.expect("receive");
    assert!(std::fs::read(dest.path().join("windowed")).expect("read") == data);
}

#[test]
fn the_other_peers_close_reason_is_escaped_before_it_is_printed() {
    use quinn_proto::{ApplicationClose, ConnectionClose, ConnectionError, TransportErrorCode};
    let reason = Bytes::from_static(b"\x1b[2J\r\nferry-peer: saved \xe2\x80\xaefdp.exe\x07");
    let escaped = "\\u{1b}[2J\\r\\nferry-peer: saved \\u{202e}fdp.exe\\u{7}";
    let application = |code: u32| {
        ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: quinn_proto::VarInt::from_u32(code),
            reason: reason.clone(),
        })
    };
    let transport = ConnectionError::ConnectionClosed(ConnectionClose {
        error_code: TransportErrorCode::PROTOCOL_VIOLATION,
        frame_type: None,
        reason: reason.clone(),
    });
    for error in [
        application(close::REFUSED),
        application(close::PROTOCOL),
        application(close::ABORTED),
        transport,
    ] {
        let text = lost(error, Duration::ZERO).to_string();
        assert!(text.contains(escaped), "{text:?}");
        assert!(
            !text.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{text:?}"
        );
    }
}

#[test]
fn after_either_verdict_both_sides_close_with_done() {
    let receiver = TransferError::HashMismatch {
        sent: "01".repeat(32),
        computed: "02".repeat(32),
    };
    let sender = TransferError::ReceiverHashMismatch {
        sent: "01".repeat(32),
    };
    assert_eq!(receiver.close_code(), close::DONE);
    assert_eq!(sender.close_code(), close::DONE);
    assert!(sender.peer_reason().contains("does not match"));
}

#[test]
fn the_receiver_refuses_a_file_larger_than_its_free_space_without_naming_its_directory() {
    let dest = tempfile::tempdir().expect("tempdir");
    let mut r = Receiver::default();
    let err = take_inbound(
        &mut r,
        Inbound::Header {
            name: "huge.iso".into(),
            size: u64::MAX,
        },
        dest.path(),
        &NoProgress,
    )
    .expect_err("refused");
    assert!(matches!(err, TransferError::NoSpace { .. }), "{err:?}");
    assert_eq!(err.close_code(), close::REFUSED);
    let reason = err.peer_reason();
    assert_eq!(
        reason,
        format!("not enough space for \"huge.iso\" ({} bytes)", u64::MAX)
    );
    assert!(r.file.is_none());
    assert!(entries(dest.path()).is_empty());

    // Nor does a local failure: the name of the file alone.
    let io = TransferError::Io {
        action: "creating",
        path: dest.path().join(".ferry-partial-0123"),
        source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    };
    assert_eq!(
        io.peer_reason(),
        "creating .ferry-partial-0123: permission denied"
    );
}

/// A QUIC client that writes `stream` on the transfer's stream once connected (`None`: opens
/// no stream), never finishes it, then only keeps its connection alive, until it is lost.
async fn scripted_sender<L: DatagramLink>(
    link: L,
    stream: Option<Vec<u8>>,
    options: &TransferOptions,
) -> TransferError {
    let link = Arc::new(link);
    let datagram = quic::datagram_size(link.max_payload()).expect("size");
    let transport =
        quic::transport_config(options, datagram, quic::Role::Client).expect("transport");
    let config = quic::endpoint_config(datagram).expect("endpoint");
    let endpoint = Endpoint::new(config, None, false, None);
    let client = quic::client_config(transport).expect("client");
    let mut driver = Driver::connect(link, endpoint, client).expect("connect");
    loop {
        while let Some(event) = driver.poll() {
            match event {
                Event::Connected => {
                    if let Some(bytes) = &stream {
                        let id = driver.conn.streams().open(Dir::Bi).expect("stream");
                        driver.conn.send_stream(id).write(bytes).expect("write");
                    }
                }
                Event::ConnectionLost { reason } => return lost(reason, options.idle_timeout),
                _ => {}
            }
        }
        if let Err(e) = driver.flush().await {
            return e;
        }
        if let Err(e) = driver.wait(std::future::pending::<()>(), None).await {
            return e;
        }
    }
}

/// The start of a sender's stream: the header of `name`, `size` bytes long, and `content`.
fn stream_start(name: &str, size: u64, content: &[u8]) -> Vec<u8> {
    let mut bytes = wire::encode_header(name, size).expect("header").to_vec();
    bytes.extend_from_slice(content);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_receive_removes_its_staging_file() {
    let (a, b) = memory_pair(Impairment::NONE);
    let dest = tempfile::tempdir().expect("tempdir");
    let sender = tokio::spawn(async move {
        scripted_sender(a, Some(stream_start("big", 1 << 20, &[7; 1000])), &quick()).await
    });
    let dir = dest.path().to_owned();
    let receiver =
        tokio::spawn(async move { receive_file(Arc::new(b), &dir, &quick(), &NoProgress).await });
    let staged = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let names = entries(dest.path());
            if !names.is_empty() {
                return names;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no staging file appeared");
    assert!(staged[0].starts_with(".ferry-partial-"), "{staged:?}");
    receiver.abort();
    assert!(receiver.await.expect_err("aborted").is_cancelled());
    assert!(
        entries(dest.path()).is_empty(),
        "{:?}",
        entries(dest.path())
    );
    sender.abort();
}

/// A link end that records the size of every message it sends.
struct Recording {
    inner: MemoryLink,
    sizes: std::sync::Mutex<Vec<usize>>,
}

impl DatagramLink for Recording {
    fn max_payload(&self) -> usize {
        self.inner.max_payload()
    }

    async fn send(&self, message: &[u8]) -> Result<(), LinkError> {
        self.sizes.lock().expect("lock").push(message.len());
        self.inner.send(message).await
    }

    async fn recv(&self) -> Result<Vec<u8>, LinkError> {
        self.inner.recv().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_sends_nothing_over_the_ipv6_limit_from_its_first_initial_on() {
    let (a, b) = memory_pair(Impairment::NONE);
    assert_eq!(a.max_payload(), 1427, "an IPv4-sized link");
    let recording = |inner| {
        Arc::new(Recording {
            inner,
            sizes: std::sync::Mutex::new(Vec::new()),
        })
    };
    let (a, b) = (recording(a), recording(b));
    let data = content(1 << 20, 9);
    let (_src, path) = source("sized", &data);
    let dest = tempfile::tempdir().expect("tempdir");
    let (sender, receiver) = (a.clone(), b.clone());
    let options = quick();
    let (sent, received) = tokio::join!(
        send_file(sender, &path, &options, &NoProgress),
        receive_file(receiver, dest.path(), &options, &NoProgress),
    );
    sent.expect("send");
    received.expect("receive");
    let client = a.sizes.lock().expect("lock").clone();
    let server = b.sizes.lock().expect("lock").clone();
    assert!(
        (1200..=1407).contains(&client[0]),
        "the first Initial is {} bytes",
        client[0]
    );
    assert_eq!(client.iter().max(), Some(&1407), "{client:?}");
    // The server keeps to its own limit, which the client announced too.
    assert!(server.iter().all(|&size| size <= 1427), "{server:?}");
}

/// Options whose stall timeout ends a test quickly, while QUIC's keep-alives go on.
fn stalling() -> TransferOptions {
    TransferOptions {
        stall_timeout: Duration::from_millis(500),
        ..quick()
    }
}

/// What `receive_file` says about a sender that writes `stream` (`None`: opens no stream) and
/// then does nothing but keep QUIC alive; `dest` is its directory.
async fn receive_from_a_stalling_sender(stream: Option<Vec<u8>>, dest: &Path) -> TransferError {
    let (a, b) = memory_pair(Impairment::NONE);
    let sender = tokio::spawn(async move { scripted_sender(a, stream, &quick()).await });
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        receive_file(Arc::new(b), dest, &stalling(), &NoProgress),
    )
    .await
    .expect("the receiver kept waiting")
    .expect_err("stalls");
    sender.abort();
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_timeout_too_long_to_add_means_no_limit() {
    let options = TransferOptions {
        stall_timeout: Duration::MAX,
        ..quick()
    };
    let (a, b) = memory_pair(Impairment::NONE);
    let (_src, path) = source("patient", &content(100_000, 12));
    let dest = tempfile::tempdir().expect("tempdir");
    let (sent, received) = run_pair(a, b, &path, dest.path(), options.clone(), options).await;
    sent.expect("send");
    received.expect("receive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_gives_up_on_a_sender_that_keeps_quic_alive_but_sends_nothing() {
    let dest = tempfile::tempdir().expect("tempdir");
    let err = receive_from_a_stalling_sender(None, dest.path()).await;
    assert!(
        matches!(err, TransferError::Stalled { awaiting, .. } if awaiting == "the sender's stream"),
        "{err:?}"
    );
    let err =
        receive_from_a_stalling_sender(Some(stream_start("big", 1 << 20, &[1; 1000])), dest.path())
            .await;
    assert!(
        matches!(err, TransferError::Stalled { awaiting, .. } if awaiting == "more of the sender's stream"),
        "{err:?}"
    );
    assert!(err.to_string().contains("nothing moved for 500ms"), "{err}");
    assert!(
        entries(dest.path()).is_empty(),
        "{:?}",
        entries(dest.path())
    );
}

/// A QUIC server that accepts the connection and then never reads the stream or answers, until
/// the connection is lost; its flow-control window is `window` bytes.
async fn scripted_receiver<L: DatagramLink>(link: L, window: u64) -> TransferError {
    let options = TransferOptions { window, ..quick() };
    let link = Arc::new(link);
    let datagram = quic::datagram_size(link.max_payload()).expect("size");
    let transport =
        quic::transport_config(&options, datagram, quic::Role::Server).expect("transport");
    let server = quic::server_config(transport).expect("server");
    let config = quic::endpoint_config(datagram).expect("endpoint");
    let endpoint = Endpoint::new(config, Some(server.clone()), false, None);
    let mut driver = match Driver::accept(link, endpoint, server, options.stall_timeout).await {
        Ok(driver) => driver,
        Err(e) => return e,
    };
    loop {
        while let Some(event) = driver.poll() {
            if let Event::ConnectionLost { reason } = event {
                return lost(reason, options.idle_timeout);
            }
        }
        if let Err(e) = driver.flush().await {
            return e;
        }
        if let Err(e) = driver.wait(std::future::pending::<()>(), None).await {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_gives_up_on_a_receiver_that_keeps_quic_alive_but_takes_nothing_or_never_answers()
{
    for (size, awaiting) in [
        (1000, "the receiver's verdict"),
        (1 << 20, "the receiver to take more of the file"),
    ] {
        let (a, b) = memory_pair(Impairment::NONE);
        let receiver = tokio::spawn(scripted_receiver(b, 64 << 10));
        let (_src, path) = source("file", &content(size, 10));
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            send_file(Arc::new(a), &path, &stalling(), &NoProgress),
        )
        .await
        .expect("the sender kept waiting")
        .expect_err("stalls");
        assert!(
            matches!(&err, TransferError::Stalled { awaiting: a, .. } if *a == awaiting),
            "{size}: {err:?}"
        );
        receiver.abort();
    }
}
