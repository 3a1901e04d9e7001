//! Criterion benchmarks of `ferry-core`'s hot functions, with printed figures:
//!
//! - `header`: the stateless header check and the full parse+classify of a DATA datagram;
//! - `token`: verifying a relay token (Ed25519 + X25519 unseal) and minting one (the
//!   gateway's cost per grant: X25519 seal + Ed25519 sign);
//! - `aead`: seal+open of 64/1200/1400-byte transport messages with Ferry's transport, next to
//!   the raw AEADs on the same buffers: `ring`'s ChaCha20-Poly1305 (which the transport uses)
//!   and the `chacha20poly1305` crate.
//!
//! After criterion, an interleaved A/B run measures the transport-to-raw-AEAD throughput ratio
//! (goal ≥ 0.8× for 1200-byte messages) and prints it. Raw and Ferry batches alternate, so a
//! noisy neighbour slows both alike and the ratio holds where absolute figures drift.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use criterion::{BenchmarkId, Criterion, Throughput};
use ferry_core::keys::{GatewaySigningKey, PeerStaticKey, RelayStaticKey};
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{
    Handshake, LocalIdentity, PeerExpectation, TAG_LEN, TRANSPORT_HEADER_LEN, Transport,
    TransportLimits,
};
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, TokenMinter, TokenVerifier, VerifierConfig};
use ferry_core::wire::{self, HEADER_LEN, MAX_DATAGRAM, Slot};
use ring::rand::SystemRandom;

const SIZES: [usize; 3] = [64, 1200, 1400];

fn bench_header(c: &mut Criterion) {
    let mut datagram = vec![0u8; HEADER_LEN + 1200];
    let n =
        wire::encode_data(&mut datagram, 0x1234_5678_9abc_def0, &[7u8; 1200]).expect("DATA fits");
    datagram.truncate(n);
    let first16: [u8; HEADER_LEN] = datagram[..HEADER_LEN].try_into().expect("16 bytes");

    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Elements(1));
    g.bench_function("check_header (XDP rules)", |b| {
        b.iter(|| ferry_common::header::check_header(black_box(&first16), black_box(n)))
    });
    g.bench_function("wire::parse DATA 1216 B", |b| {
        b.iter(|| match wire::parse(black_box(&datagram)) {
            Ok(wire::Packet::Data(d)) => d.session_id(),
            _ => 0,
        })
    });
    g.finish();
}

fn bench_token(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let relay = RelayStaticKey::generate(&rng).expect("rng");
    let minter = TokenMinter::new(7, GatewaySigningKey::generate(&rng).expect("rng"));
    let now = UnixTime(1_800_000_000);
    let input = ClaimsInput {
        slot: Slot::A,
        relay_id: 42,
        session_id: 99,
        not_before: now,
        expires: now.saturating_add(600),
        rate_bytes_per_sec: 0,
    };
    let token = minter.mint(&rng, &input, &relay.public()).expect("mint");
    let verifier_relay_public = relay.public();
    let mut verifier = TokenVerifier::new(VerifierConfig::new(42), relay).expect("config");
    verifier.add_trusted_key(7, minter.public());

    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify (Ed25519 + X25519 unseal)", |b| {
        b.iter(|| verifier.verify(black_box(&token.bytes), now, 99, 0).is_ok())
    });
    let relay_public = verifier_relay_public;
    g.bench_function("mint (X25519 seal + Ed25519 sign)", |b| {
        b.iter(|| minter.mint(&rng, black_box(&input), &relay_public).is_ok())
    });
    g.finish();
}

/// Two established transports, from a real handshake.
fn transport_pair(now: Instant) -> (Transport, Transport) {
    let rng = SystemRandom::new();
    let a = PeerStaticKey::generate(&rng).expect("rng");
    let b = PeerStaticKey::generate(&rng).expect("rng");
    let a_id = LocalIdentity::from_secret_bytes(*a.secret_bytes());
    let b_id = LocalIdentity::from_secret_bytes(*b.secret_bytes());
    let mut init =
        Handshake::initiator(&a_id, PeerExpectation::Pinned(*b_id.public()), 5).expect("initiator");
    let mut resp =
        Handshake::responder(&b_id, PeerExpectation::Pinned(*a_id.public()), 5).expect("responder");
    let mut known = KnownPeers::new();
    let mut buf = [0u8; 256];
    let n = init.write_message(&mut buf).expect("msg1");
    resp.read_message(&buf[..n], &mut known).expect("read msg1");
    let n = resp.write_message(&mut buf).expect("msg2");
    init.read_message(&buf[..n], &mut known).expect("read msg2");
    let n = init.write_message(&mut buf).expect("msg3");
    resp.read_message(&buf[..n], &mut known).expect("read msg3");
    let limits = TransportLimits::default();
    (
        init.into_transport(now, limits).expect("transport"),
        resp.into_transport(now, limits).expect("transport"),
    )
}

/// A raw AEAD: seal `buf[13..13+len]` in place with the 13 bytes before it as AAD and the tag
/// after it, then open it again. No framing, no window, no rekey logic.
trait RawSealOpen {
    fn seal_open(&mut self, buf: &mut [u8], len: usize) -> bool;
}

/// The baseline the transport is held to: `ring`'s ChaCha20-Poly1305, the AEAD it uses.
struct RawRing {
    key: ring::aead::LessSafeKey,
    counter: u64,
}

impl RawRing {
    fn new() -> Self {
        let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &[0x42u8; 32])
            .expect("32-byte key");
        Self {
            key: ring::aead::LessSafeKey::new(key),
            counter: 0,
        }
    }
}

impl RawSealOpen for RawRing {
    fn seal_open(&mut self, buf: &mut [u8], len: usize) -> bool {
        use ring::aead::{Aad, Nonce, Tag};
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.counter.to_le_bytes());
        self.counter += 1;
        let (aad, rest) = buf.split_at_mut(TRANSPORT_HEADER_LEN);
        let (msg, tag_out) = rest.split_at_mut(len);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&*aad), msg)
            .expect("seal");
        tag_out[..TAG_LEN].copy_from_slice(tag.as_ref());
        let tag = Tag::try_from(&tag_out[..TAG_LEN]).expect("16 bytes");
        self.key
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&*aad),
                tag,
                msg,
                0..,
            )
            .is_ok()
    }
}

/// For context: the RustCrypto `chacha20poly1305` crate on the same buffers.
struct RawAead {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl RawAead {
    fn new() -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(&Key::from([0x42u8; 32])),
            counter: 0,
        }
    }
}

impl RawSealOpen for RawAead {
    fn seal_open(&mut self, buf: &mut [u8], len: usize) -> bool {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.counter.to_le_bytes());
        self.counter += 1;
        let nonce = Nonce::from(nonce);
        let (aad, rest) = buf.split_at_mut(TRANSPORT_HEADER_LEN);
        let (msg, tag_out) = rest.split_at_mut(len);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, aad, msg)
            .expect("seal");
        tag_out[..TAG_LEN].copy_from_slice(tag.as_slice());
        let tag = Tag::clone_from_slice(&tag_out[..TAG_LEN]);
        self.cipher
            .decrypt_in_place_detached(&nonce, aad, msg, &tag)
            .is_ok()
    }
}

/// Seals `buf[13..13+len]` with one transport and opens it with the other.
fn ferry_seal_open(
    tx: &mut Transport,
    rx: &mut Transport,
    now: Instant,
    buf: &mut [u8],
    len: usize,
) -> bool {
    let Ok(n) = tx.seal_in_place(now, buf, len) else {
        return false;
    };
    rx.open_in_place(now, &mut buf[..n]).is_ok()
}

fn bench_aead(c: &mut Criterion) {
    let now = Instant::now();
    let (mut tx, mut rx) = transport_pair(now);
    let mut baselines: [(&str, Box<dyn RawSealOpen>); 2] = [
        ("raw ring seal+open", Box::new(RawRing::new())),
        (
            "raw chacha20poly1305 crate seal+open",
            Box::new(RawAead::new()),
        ),
    ];
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut g = c.benchmark_group("aead");
    for len in SIZES {
        g.throughput(Throughput::Bytes(len as u64));
        for (name, raw) in baselines.iter_mut() {
            g.bench_with_input(BenchmarkId::new(*name, len), &len, |b, &len| {
                b.iter(|| raw.seal_open(black_box(&mut buf), len))
            });
        }
        g.bench_with_input(
            BenchmarkId::new("ferry transport seal+open", len),
            &len,
            |b, &len| b.iter(|| ferry_seal_open(&mut tx, &mut rx, now, black_box(&mut buf), len)),
        );
    }
    g.finish();
}

/// Interleaved A/B measurement of the transport against a raw AEAD for one size; returns
/// (raw ns/op, ferry ns/op), medians over rounds.
fn aead_ratio(raw: &mut dyn RawSealOpen, len: usize, rounds: usize, batch: usize) -> (f64, f64) {
    let now = Instant::now();
    let (mut tx, mut rx) = transport_pair(now);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut raw_ns = Vec::with_capacity(rounds);
    let mut ferry_ns = Vec::with_capacity(rounds);
    let per_op = |d: Duration| d.as_nanos() as f64 / batch as f64;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..batch {
            assert!(raw.seal_open(black_box(&mut buf), len));
        }
        raw_ns.push(per_op(t.elapsed()));
        let t = Instant::now();
        for _ in 0..batch {
            assert!(ferry_seal_open(
                &mut tx,
                &mut rx,
                now,
                black_box(&mut buf),
                len
            ));
        }
        ferry_ns.push(per_op(t.elapsed()));
    }
    (median(&mut raw_ns), median(&mut ferry_ns))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let mut c = Criterion::default().configure_from_args();
    bench_header(&mut c);
    bench_token(&mut c);
    bench_aead(&mut c);
    c.final_summary();

    let (rounds, batch) = if quick { (3, 100) } else { (41, 20_000) };
    let baselines: [(&str, Box<dyn RawSealOpen>); 2] = [
        ("raw ring", Box::new(RawRing::new())),
        ("raw chacha20poly1305 crate", Box::new(RawAead::new())),
    ];
    for (name, mut raw) in baselines {
        println!(
            "\nFerry transport vs {name}, interleaved A/B, median of {rounds} rounds of {batch} seal+open:"
        );
        for len in SIZES {
            let (raw_ns, ferry_ns) = aead_ratio(raw.as_mut(), len, rounds, batch);
            let gbps = |ns: f64| len as f64 * 8.0 / ns;
            println!(
                "  {len:>5} B: raw {raw_ns:>8.1} ns ({:.2} Gbit/s)  ferry {ferry_ns:>8.1} ns ({:.2} Gbit/s)  ratio {:.3}x{}",
                gbps(raw_ns),
                gbps(ferry_ns),
                raw_ns / ferry_ns,
                if len == 1200 { "  (goal >= 0.8x)" } else { "" }
            );
        }
    }
}
