//! TRANSPORT frames with explicit counters, replay windows and rekeying (docs/protocol.md
//! §9.2, §9.3).

use std::fmt;
use std::ops::Range;
use std::time::{Duration, Instant};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::Zeroizing;

use super::NoiseError;
use super::frame::{
    MAX_PLAINTEXT, TAG_LEN, TRANSPORT_HEADER_LEN, TRANSPORT_OVERHEAD, TransportHeader,
};
use super::replay::ReplayWindow;

/// How many epochs ahead of the current receive epoch a frame may be (docs/protocol.md §9.3).
///
/// A frame of epoch `current + k`, `1 <= k <= MAX_EPOCH_SKIP`, is opened under a key derived by
/// applying Noise `REKEY` `k` times to a copy of the current receive key; the receiver moves to
/// that epoch only if the tag verifies. So up to `MAX_EPOCH_SKIP − 1` epochs whose every frame
/// was lost are survived, and a forged frame costs the receiver at most `MAX_EPOCH_SKIP` `REKEY`s
/// (each one ChaCha20-Poly1305 encryption of 32 bytes) plus one failed AEAD open, and changes
/// nothing.
pub(crate) const MAX_EPOCH_SKIP: u32 = 8;

/// When to rekey and when the session ends (docs/protocol.md §8, §9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportLimits {
    /// Rekey the sending key once this many messages were sent under it (default 2^32).
    pub rekey_after_messages: u64,
    /// Rekey the sending key once it is this old (default 120 s).
    pub rekey_after: Duration,
    /// Refuse to send or accept anything once the session is this old (default 24 h).
    pub max_age: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            rekey_after_messages: 1 << 32,
            rekey_after: Duration::from_secs(120),
            max_age: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl TransportLimits {
    /// Checks the ranges: `rekey_after_messages` in `1..=2^64 − 2` (so no counter ever reaches
    /// the reserved 2^64 − 1) and non-zero durations.
    pub fn validate(&self) -> Result<(), NoiseError> {
        if !(1..=u64::MAX - 1).contains(&self.rekey_after_messages) {
            return Err(NoiseError::InvalidLimits(
                "rekey_after_messages must be in 1..=2^64-2",
            ));
        }
        if self.rekey_after.is_zero() {
            return Err(NoiseError::InvalidLimits("rekey_after must be positive"));
        }
        if self.max_age.is_zero() {
            return Err(NoiseError::InvalidLimits("max_age must be positive"));
        }
        Ok(())
    }
}

/// Running totals of one transport, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Frames sealed.
    pub sent: u64,
    /// Frames that authenticated and were accepted.
    pub received: u64,
    /// Frames refused (malformed, replayed, unknown epoch, forged, or after expiry).
    pub dropped: u64,
}

/// A ChaCha20-Poly1305 key used with Noise's nonce layout.
///
/// The AEAD is `ring`'s: on this project's machines it seals a 1200-byte message about four
/// times faster than the `chacha20poly1305` crate (docs/bench.md). `ring` keeps the key
/// inside its own type and does not zeroize it on drop; the raw key bytes we handle are
/// wiped (`Zeroizing`) as soon as the `ring` key is built.
#[derive(Clone)]
struct CipherKey(LessSafeKey);

impl CipherKey {
    fn new(bytes: Zeroizing<[u8; 32]>) -> Self {
        match UnboundKey::new(&CHACHA20_POLY1305, bytes.as_slice()) {
            Ok(key) => Self(LessSafeKey::new(key)),
            // ring refuses only keys of the wrong length, and a [u8; 32] is never that.
            Err(_) => unreachable!("ChaCha20-Poly1305 keys are 32 bytes"),
        }
    }

    /// Noise's ChaChaPoly nonce: 4 zero bytes, then the counter little-endian.
    fn nonce(counter: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_le_bytes());
        Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts `in_out` in place and returns the tag.
    fn seal(
        &self,
        counter: u64,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], NoiseError> {
        let tag = self
            .0
            .seal_in_place_separate_tag(Self::nonce(counter), Aad::from(aad), in_out)
            .map_err(|_| NoiseError::PayloadTooLarge(MAX_PLAINTEXT + 1))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `in_out` in place if `tag` authenticates it (and `aad`).
    fn open(
        &self,
        counter: u64,
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8],
    ) -> Result<(), NoiseError> {
        let tag = Tag::try_from(tag).map_err(|_| NoiseError::Decrypt)?;
        self.0
            .open_in_place_separate_tag(Self::nonce(counter), Aad::from(aad), tag, in_out, 0..)
            .map(|_| ())
            .map_err(|_| NoiseError::Decrypt)
    }

    /// Noise `REKEY`: the first 32 bytes of `ENCRYPT(k, 2^64 − 1, ∅, 32 zero bytes)`.
    fn rekey(&self) -> Result<Self, NoiseError> {
        let mut next = Zeroizing::new([0u8; 32]);
        // The tag is discarded; only the ciphertext becomes the new key.
        self.seal(u64::MAX, &[], next.as_mut_slice())?;
        Ok(Self::new(next))
    }

    /// The key `steps` epochs ahead: `REKEY` applied `steps` times to a copy of this key.
    /// The raw bytes of each intermediate key are wiped as soon as its `ring` key is built.
    fn rekeyed(&self, steps: u32) -> Result<Self, NoiseError> {
        let mut key = self.clone();
        for _ in 0..steps {
            key = key.rekey()?;
        }
        Ok(key)
    }
}

/// The sending half: one key, its epoch, the next counter and when the key was made.
struct Sender {
    key: CipherKey,
    epoch: u32,
    counter: u64,
    key_born: Instant,
}

impl Sender {
    /// Rekeys if due, then hands out the `(epoch, counter)` of the next frame.
    fn next_nonce(
        &mut self,
        now: Instant,
        limits: &TransportLimits,
    ) -> Result<TransportHeader, NoiseError> {
        let key_age = now.saturating_duration_since(self.key_born);
        if self.counter >= limits.rekey_after_messages || key_age >= limits.rekey_after {
            self.rekey(now)?;
        }
        if self.counter >= u64::MAX - 1 {
            return Err(NoiseError::CounterExhausted);
        }
        let header = TransportHeader {
            epoch: self.epoch,
            counter: self.counter,
        };
        self.counter += 1;
        Ok(header)
    }

    fn rekey(&mut self, now: Instant) -> Result<(), NoiseError> {
        let epoch = self
            .epoch
            .checked_add(1)
            .ok_or(NoiseError::EpochExhausted)?;
        self.key = self.key.rekey()?;
        self.epoch = epoch;
        self.counter = 0;
        self.key_born = now;
        Ok(())
    }
}

/// One receive epoch: its key and its replay window.
struct ReceiveEpoch {
    key: CipherKey,
    epoch: u32,
    window: ReplayWindow,
}

/// Which key a received frame's epoch selects.
enum EpochSlot {
    Current,
    Previous,
    /// `1..=MAX_EPOCH_SKIP` epochs ahead of the current one.
    Ahead(u32),
}

/// An established end-to-end session: seals and opens TRANSPORT frames.
///
/// Made by [`Handshake::into_transport`](super::Handshake::into_transport). The keys live inside
/// `ring`'s AEAD key type, which `ring` neither exposes nor zeroizes on drop, so the keys of a
/// dropped transport (or of an epoch left behind by a rekey) can remain in freed memory. What
/// this code holds itself is wiped: the raw key bytes from the handshake's split and from every
/// rekey sit in `Zeroizing` buffers that are cleared as soon as the `ring` key is built (see
/// `CipherKey`). `Debug` shows epochs and counters only.
pub struct Transport {
    sender: Sender,
    current: ReceiveEpoch,
    /// The epoch that was current before the last shift: after a jump from `e` to `e + k` this
    /// is `e`, whatever `k`. Skipped epochs get no slot: none of their frames arrived before the
    /// jump, and accepting them afterwards would mean keeping more keys alive.
    previous: Option<ReceiveEpoch>,
    created: Instant,
    limits: TransportLimits,
    remote: [u8; 32],
    stats: TransportStats,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("send_epoch", &self.sender.epoch)
            .field("send_counter", &self.sender.counter)
            .field("recv_epoch", &self.current.epoch)
            .field("limits", &self.limits)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A transport from the two split keys, created at `now`. `limits` must be valid.
    pub(crate) fn new(
        send_key: Zeroizing<[u8; 32]>,
        recv_key: Zeroizing<[u8; 32]>,
        remote: [u8; 32],
        now: Instant,
        limits: TransportLimits,
    ) -> Self {
        Self {
            sender: Sender {
                key: CipherKey::new(send_key),
                epoch: 0,
                counter: 0,
                key_born: now,
            },
            current: ReceiveEpoch {
                key: CipherKey::new(recv_key),
                epoch: 0,
                window: ReplayWindow::new(),
            },
            previous: None,
            created: now,
            limits,
            remote,
            stats: TransportStats::default(),
        }
    }

    /// The authenticated static key of the peer.
    pub fn remote_identity(&self) -> &[u8; 32] {
        &self.remote
    }

    /// The epoch of the sending key (the number of rekeys done on it).
    pub fn send_epoch(&self) -> u32 {
        self.sender.epoch
    }

    /// The counter the next sealed frame will carry, unless a rekey resets it first.
    pub fn send_counter(&self) -> u64 {
        self.sender.counter
    }

    /// The newest epoch a received frame authenticated in (0 before any).
    pub fn recv_epoch(&self) -> u32 {
        self.current.epoch
    }

    /// The limits this transport enforces.
    pub fn limits(&self) -> &TransportLimits {
        &self.limits
    }

    /// Frames sent, received and dropped so far.
    pub fn stats(&self) -> TransportStats {
        self.stats
    }

    /// Whether the session is past its maximum age at `now`: no frame is sealed or opened any
    /// more, and the peers must run a new handshake.
    pub fn is_expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.created) >= self.limits.max_age
    }

    fn check_age(&self, now: Instant) -> Result<(), NoiseError> {
        match self.is_expired(now) {
            true => Err(NoiseError::SessionExpired),
            false => Ok(()),
        }
    }

    /// Seals `plaintext` into a whole TRANSPORT frame written at the start of `out`; returns
    /// the frame's length (`plaintext.len() + 29`).
    pub fn seal(
        &mut self,
        now: Instant,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, NoiseError> {
        let frame_len = Self::check_seal_sizes(plaintext.len(), out.len())?;
        let (header, body) = out[..frame_len].split_at_mut(TRANSPORT_HEADER_LEN);
        let (ciphertext, tag) = body.split_at_mut(plaintext.len());
        ciphertext.copy_from_slice(plaintext);
        self.seal_parts(now, header, ciphertext, tag)?;
        Ok(frame_len)
    }

    /// Seals in place: the plaintext sits at `buf[13..13 + plaintext_len]`; the header goes in
    /// front of it and the tag after it. Returns the frame's length (`plaintext_len + 29`).
    ///
    /// Lets a caller reserve room for its own headers before `buf` and send without copying.
    pub fn seal_in_place(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        plaintext_len: usize,
    ) -> Result<usize, NoiseError> {
        let frame_len = Self::check_seal_sizes(plaintext_len, buf.len())?;
        let (header, body) = buf[..frame_len].split_at_mut(TRANSPORT_HEADER_LEN);
        let (plaintext, tag) = body.split_at_mut(plaintext_len);
        self.seal_parts(now, header, plaintext, tag)?;
        Ok(frame_len)
    }

    fn check_seal_sizes(plaintext_len: usize, out_len: usize) -> Result<usize, NoiseError> {
        if plaintext_len > MAX_PLAINTEXT {
            return Err(NoiseError::PayloadTooLarge(plaintext_len));
        }
        let frame_len = plaintext_len + TRANSPORT_OVERHEAD;
        if out_len < frame_len {
            return Err(NoiseError::BufferTooSmall { needed: frame_len });
        }
        Ok(frame_len)
    }

    /// Writes the header, encrypts `in_out` in place and writes the tag; `header` is 13 bytes
    /// and `tag` 16.
    fn seal_parts(
        &mut self,
        now: Instant,
        header: &mut [u8],
        in_out: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), NoiseError> {
        self.check_age(now)?;
        let nonce = self.sender.next_nonce(now, &self.limits)?;
        header.copy_from_slice(&nonce.encode());
        let sealed = self.sender.key.seal(nonce.counter, header, in_out)?;
        tag.copy_from_slice(&sealed);
        self.stats.sent += 1;
        Ok(())
    }

    /// Opens a TRANSPORT frame, writing the plaintext at the start of `out`; returns its length.
    /// On error the first bytes of `out` are unspecified and must not be used.
    pub fn open(
        &mut self,
        now: Instant,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, NoiseError> {
        let result = self.open_checked(now, frame, |key, header, aad| {
            let body = &frame[TRANSPORT_HEADER_LEN..];
            let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
            let plaintext = out
                .get_mut(..ciphertext.len())
                .ok_or(NoiseError::BufferTooSmall {
                    needed: ciphertext.len(),
                })?;
            plaintext.copy_from_slice(ciphertext);
            key.open(header.counter, aad, plaintext, tag)?;
            Ok(ciphertext.len())
        });
        self.count(result)
    }

    /// Opens a TRANSPORT frame in place; returns the range of `frame` that holds the plaintext
    /// (`13..frame.len() - 16`). On error the frame's contents are unspecified.
    pub fn open_in_place(
        &mut self,
        now: Instant,
        frame: &mut [u8],
    ) -> Result<Range<usize>, NoiseError> {
        let header = match TransportHeader::parse(frame) {
            Ok(header) => header,
            Err(error) => return self.count(Err(error.into())),
        };
        let (aad, body) = frame.split_at_mut(TRANSPORT_HEADER_LEN);
        let (ciphertext, tag) = body.split_at_mut(body.len() - TAG_LEN);
        let plaintext = TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + ciphertext.len();
        let result = self.open_header(now, header, aad, |key, header, aad| {
            key.open(header.counter, aad, ciphertext, tag)
        });
        self.count(result.map(|()| plaintext))
    }

    fn count<T>(&mut self, result: Result<T, NoiseError>) -> Result<T, NoiseError> {
        match result {
            Ok(_) => self.stats.received += 1,
            Err(_) => self.stats.dropped += 1,
        }
        result
    }

    fn open_checked<T>(
        &mut self,
        now: Instant,
        frame: &[u8],
        decrypt: impl FnOnce(&CipherKey, TransportHeader, &[u8]) -> Result<T, NoiseError>,
    ) -> Result<T, NoiseError> {
        let header = TransportHeader::parse(frame)?;
        self.open_header(now, header, &frame[..TRANSPORT_HEADER_LEN], decrypt)
    }

    /// The receive path after parsing: age, epoch, window, decrypt, then commit.
    fn open_header<T>(
        &mut self,
        now: Instant,
        header: TransportHeader,
        aad: &[u8],
        decrypt: impl FnOnce(&CipherKey, TransportHeader, &[u8]) -> Result<T, NoiseError>,
    ) -> Result<T, NoiseError> {
        self.check_age(now)?;
        match self.slot(header.epoch)? {
            EpochSlot::Current => open_in_epoch(&mut self.current, header, aad, decrypt),
            EpochSlot::Previous => match self.previous.as_mut() {
                Some(previous) => open_in_epoch(previous, header, aad, decrypt),
                None => Err(NoiseError::UnknownEpoch),
            },
            EpochSlot::Ahead(steps) => {
                // Derived tentatively from a copy: the shift is committed only once the tag
                // verifies, so a forged frame costs at most MAX_EPOCH_SKIP rekeys and one failed
                // open, and moves nothing.
                let mut next = ReceiveEpoch {
                    key: self.current.key.rekeyed(steps)?,
                    epoch: header.epoch,
                    window: ReplayWindow::new(),
                };
                let plaintext = open_in_epoch(&mut next, header, aad, decrypt)?;
                // The old current becomes the previous epoch even after a jump of more than
                // one, so its late frames still open; the old previous is dropped.
                self.previous = Some(std::mem::replace(&mut self.current, next));
                Ok(plaintext)
            }
        }
    }

    fn slot(&self, epoch: u32) -> Result<EpochSlot, NoiseError> {
        let current = self.current.epoch;
        if epoch == current {
            Ok(EpochSlot::Current)
        } else if self.previous.as_ref().map(|previous| previous.epoch) == Some(epoch) {
            Ok(EpochSlot::Previous)
        } else if epoch > current && epoch - current <= MAX_EPOCH_SKIP {
            Ok(EpochSlot::Ahead(epoch - current))
        } else {
            Err(NoiseError::UnknownEpoch)
        }
    }

    /// Test-only: jump the sending key forward to `epoch` and `counter` (the key is not
    /// rederived; both peers must be moved alike).
    #[cfg(test)]
    pub(crate) fn force_send_state(&mut self, epoch: u32, counter: u64) {
        self.sender.epoch = epoch;
        self.sender.counter = counter;
    }

    /// Test-only: move the receive epoch to `epoch`, as if it had followed the sender there.
    #[cfg(test)]
    pub(crate) fn force_recv_epoch(&mut self, epoch: u32) {
        self.current.epoch = epoch;
        self.previous = None;
    }

    /// Test-only: change the limits without validation.
    #[cfg(test)]
    pub(crate) fn force_limits(&mut self, limits: TransportLimits) {
        self.limits = limits;
    }
}

/// Window check, decrypt, then mark: a frame that fails to authenticate changes nothing.
fn open_in_epoch<T>(
    epoch: &mut ReceiveEpoch,
    header: TransportHeader,
    aad: &[u8],
    decrypt: impl FnOnce(&CipherKey, TransportHeader, &[u8]) -> Result<T, NoiseError>,
) -> Result<T, NoiseError> {
    if !epoch.window.will_accept(header.counter) {
        return Err(match epoch.window.is_too_old(header.counter) {
            true => NoiseError::TooOld,
            false => NoiseError::Replayed,
        });
    }
    let plaintext = decrypt(&epoch.key, header, aad)?;
    match epoch.window.mark_received(header.counter) {
        true => Ok(plaintext),
        false => Err(NoiseError::Replayed),
    }
}
