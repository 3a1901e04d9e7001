//! Slot secrets, slot proofs, relay MACs and stateless address cookies
//! (`docs/protocol.md` §5 and §6).
//!
//! - [`SlotSecret`] is the 32-byte secret `S` a gateway draws for each token. The peer receives
//!   it over TLS; the relay unseals it from the token ([`crate::seal`]).
//! - [`SlotKeys::derive`] turns `S` into one [`MacKey`] per direction (§6), so a relay message
//!   can never be reflected as a peer message.
//! - [`CookieJar`] issues and checks the address cookies of §5 without keeping any state.
//!
//! Nothing here knows the wire layout: the codec (`crate::wire`) hands in the MAC input bytes
//! (`header ‖ body-before-mac`), either as one slice ([`MacKey::mac`]) or as parts
//! ([`MacKey::mac_parts`]) so that it need not copy them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ferry_common::cookie::{self, CookieKey};
use ring::hmac;
use ring::rand::SecureRandom;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::time::UnixTime;

/// Length of a [`SlotSecret`].
pub const SLOT_SECRET_LEN: usize = 32;
/// Length of a truncated MAC (slot proof or relay MAC), §6.
pub const MAC_LEN: usize = 16;
/// Length of an address cookie, §5.
pub const COOKIE_LEN: usize = 16;
/// Length of one cookie window in seconds, §5.
pub const COOKIE_WINDOW_SECS: u64 = 60;

const SLOT_MAC_SALT: &[u8] = b"ferry slot mac v1";
const PEER_TO_RELAY_INFO: &[u8] = b"peer to relay";
const RELAY_TO_PEER_INFO: &[u8] = b"relay to peer";
const COOKIE_LABEL: &[u8] = b"ferry cookie v2";

/// Errors of this module: drawing randomness and decoding a slot secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// The system random number generator failed (the host is to blame, not the input).
    #[error("the random number generator failed")]
    Rng,
    /// A slot secret given as text is not valid base64 (the sender of the text is to blame).
    #[error("slot secret is not valid base64")]
    SlotSecretBase64,
    /// A slot secret decoded to the wrong number of bytes (the sender of the text is to blame).
    #[error("slot secret decodes to {len} bytes, expected {SLOT_SECRET_LEN}")]
    SlotSecretLength {
        /// Number of decoded bytes.
        len: usize,
    },
}

/// HKDF-SHA256 (RFC 5869) with a single 32-byte output block.
///
/// With `L = 32` the expand step is exactly one HMAC: `OKM = HMAC(PRK, info ‖ 0x01)`, so this
/// is written with HMAC directly and cannot fail (ring's `hkdf` API returns a `Result` for
/// lengths that can never occur here). A test checks it against `ring::hkdf`.
pub(crate) fn hkdf_sha256_32(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt), ikm);
    let mut expand = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()));
    for part in info {
        expand.update(part);
    }
    expand.update(&[1]);
    let okm = expand.sign();
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&okm.as_ref()[..32]);
    out
}

/// The per-token slot secret `S` (§4.1, §6).
///
/// Zeroized on drop; `Debug` never shows it. Only the gateway (which hands it to the peer over
/// TLS), the peer and the relay ever hold it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SlotSecret([u8; SLOT_SECRET_LEN]);

impl SlotSecret {
    /// Wraps 32 secret bytes, e.g. received from the gateway.
    pub fn from_bytes(bytes: [u8; SLOT_SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// Draws a fresh secret from `rng`.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, ProofError> {
        let mut secret = Self([0; SLOT_SECRET_LEN]);
        rng.fill(&mut secret.0).map_err(|_| ProofError::Rng)?;
        Ok(secret)
    }

    /// The raw secret bytes, for the gateway to send to the peer over TLS.
    ///
    /// Anyone who sees these bytes can take the slot until the token expires: never log them
    /// and do not copy them into buffers that outlive the request.
    pub fn expose(&self) -> &[u8; SLOT_SECRET_LEN] {
        &self.0
    }

    /// The secret in standard base64, for a JSON answer over TLS. The string is zeroized on drop.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(self.0))
    }

    /// Parses the standard base64 form produced by [`SlotSecret::to_base64`].
    pub fn from_base64(text: &str) -> Result<Self, ProofError> {
        let bytes = Zeroizing::new(
            BASE64
                .decode(text.trim())
                .map_err(|_| ProofError::SlotSecretBase64)?,
        );
        let array: [u8; SLOT_SECRET_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| ProofError::SlotSecretLength { len: bytes.len() })?;
        Ok(Self(array))
    }
}

impl fmt::Debug for SlotSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SlotSecret(<redacted>)")
    }
}

/// A key for the truncated HMAC-SHA256 of §6: `MAC(K, m) = HMAC-SHA256(K, m)[0..16]`.
///
/// Holds ring's precomputed HMAC state (as secret as the key itself); `Debug` is redacted.
#[derive(Clone)]
pub struct MacKey(hmac::Key);

impl MacKey {
    fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// `HMAC-SHA256(K, input)[0..16]`.
    pub fn mac(&self, input: &[u8]) -> [u8; MAC_LEN] {
        self.mac_parts(&[input])
    }

    /// The MAC of the concatenation of `parts`, e.g. `&[header, body_before_mac]`.
    pub fn mac_parts(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        for part in parts {
            ctx.update(part);
        }
        truncate(ctx.sign())
    }

    /// Whether `mac` is the MAC of `input`, compared in constant time.
    pub fn verify(&self, input: &[u8], mac: &[u8; MAC_LEN]) -> bool {
        self.verify_parts(&[input], mac)
    }

    /// Whether `mac` is the MAC of the concatenation of `parts`, compared in constant time.
    pub fn verify_parts(&self, parts: &[&[u8]], mac: &[u8; MAC_LEN]) -> bool {
        bool::from(self.mac_parts(parts).ct_eq(mac))
    }
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey(<redacted>)")
    }
}

fn truncate(tag: hmac::Tag) -> [u8; MAC_LEN] {
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
    out
}

/// The two MAC keys derived from a slot secret (§6).
#[derive(Clone, Debug)]
pub struct SlotKeys {
    /// `K_peer`: proofs on BIND, REBIND and peer → relay CLOSE.
    pub peer: MacKey,
    /// `K_relay`: MACs on BIND-ACK, REJECT and relay → peer CLOSE.
    pub relay: MacKey,
}

impl SlotKeys {
    /// `K_peer` and `K_relay` = HKDF-SHA256(salt = "ferry slot mac v1", ikm = S, info = …).
    pub fn derive(secret: &SlotSecret) -> Self {
        let peer = hkdf_sha256_32(SLOT_MAC_SALT, secret.expose(), &[PEER_TO_RELAY_INFO]);
        let relay = hkdf_sha256_32(SLOT_MAC_SALT, secret.expose(), &[RELAY_TO_PEER_INFO]);
        Self {
            peer: MacKey::from_bytes(&peer),
            relay: MacKey::from_bytes(&relay),
        }
    }
}

/// Issues and checks the stateless address cookies of §5.
///
/// A cookie is valid in the 60-second window it was issued in and the next one, for exactly
/// the (session, slot, source IP, source port) it was issued for. The all-zero cookie (what a
/// peer sends on a first attempt) is never valid.
///
/// Each window has its own SipHash key, derived from `K_cookie` ([`CookieJar::window_key`]);
/// the cookie is SipHash-2-4-128 under it ([`ferry_common::cookie`]), so that the XDP guard,
/// given the window keys, can check cookies too.
#[derive(Clone)]
pub struct CookieJar(hmac::Key);

impl CookieJar {
    /// A jar keyed with `secret` (`K_cookie`). The caller's copy should be dropped or zeroized.
    pub fn new(mut secret: [u8; 32]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        secret.zeroize();
        Self(key)
    }

    /// A jar with a fresh random `K_cookie`, as a relay draws at start.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, ProofError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill(secret.as_mut()).map_err(|_| ProofError::Rng)?;
        Ok(Self::new(*secret))
    }

    /// The cookie for `source` asking for `slot` of `session_id` at `now`.
    pub fn issue(
        &self,
        now: UnixTime,
        session_id: u64,
        slot: u8,
        source: SocketAddr,
    ) -> [u8; COOKIE_LEN] {
        self.cookie(window(now), session_id, slot, source)
    }

    /// Whether `cookie` was issued for this request in the current or the previous window.
    /// Constant time in the cookie's value.
    pub fn check(
        &self,
        now: UnixTime,
        cookie: &[u8; COOKIE_LEN],
        session_id: u64,
        slot: u8,
        source: SocketAddr,
    ) -> bool {
        let current = window(now);
        let is_zero = cookie.ct_eq(&[0u8; COOKIE_LEN]);
        let in_current = self.cookie(current, session_id, slot, source).ct_eq(cookie);
        let in_previous = match current.checked_sub(1) {
            Some(previous) => self
                .cookie(previous, session_id, slot, source)
                .ct_eq(cookie),
            None => subtle::Choice::from(0),
        };
        bool::from(!is_zero & (in_current | in_previous))
    }

    /// The SipHash key of cookie window `window` (Unix time ÷ 60):
    /// `HMAC-SHA256(K_cookie, "ferry cookie v2" ‖ window (u64))[0..16]`.
    pub fn window_key(&self, window: u64) -> CookieKey {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(COOKIE_LABEL);
        ctx.update(&window.to_be_bytes());
        let mut key = Zeroizing::new(truncate(ctx.sign()));
        let out = CookieKey::from_bytes(&key);
        key.zeroize();
        out
    }

    /// The keys of the windows before, at and after `now`, oldest first: what the XDP guard
    /// holds so that it agrees with the relay across a window's change.
    pub fn window_keys(&self, now: UnixTime) -> [CookieKey; 3] {
        let current = window(now);
        [current.saturating_sub(1), current, current + 1].map(|w| self.window_key(w))
    }

    fn cookie(&self, window: u64, session_id: u64, slot: u8, source: SocketAddr) -> [u8; 16] {
        let addr = match source.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
            IpAddr::V6(ip) => ip.octets(),
        };
        let input = cookie::cookie_input(session_id, slot, &addr, source.port());
        cookie::cookie(&self.window_key(window), &input)
    }
}

impl fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieJar(<redacted>)")
    }
}

fn window(now: UnixTime) -> u64 {
    now.as_secs() / COOKIE_WINDOW_SECS
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn secret() -> SlotSecret {
        SlotSecret::from_bytes([0x5a; 32])
    }

    #[test]
    fn hkdf_matches_ring() {
        let salt = b"salt";
        let ikm = [7u8; 32];
        let ours = hkdf_sha256_32(salt, &ikm, &[b"in", b"fo"]);
        let mut theirs = [0u8; 32];
        ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt)
            .extract(&ikm)
            .expand(&[b"info"], ring::hkdf::HKDF_SHA256)
            .unwrap()
            .fill(&mut theirs)
            .unwrap();
        assert_eq!(*ours, theirs);
    }

    #[test]
    fn peer_and_relay_keys_differ() {
        let keys = SlotKeys::derive(&secret());
        assert_ne!(keys.peer.mac(b"m"), keys.relay.mac(b"m"));
    }

    #[test]
    fn mac_verifies_and_detects_changes() {
        let keys = SlotKeys::derive(&secret());
        let mac = keys.peer.mac(b"header and body");
        assert!(keys.peer.verify(b"header and body", &mac));
        assert!(keys.peer.verify_parts(&[b"header ", b"and body"], &mac));
        assert!(!keys.peer.verify(b"header and bodY", &mac));
        assert!(!keys.relay.verify(b"header and body", &mac));
        let mut flipped = mac;
        flipped[15] ^= 1;
        assert!(!keys.peer.verify(b"header and body", &flipped));
        let other = SlotKeys::derive(&SlotSecret::from_bytes([0x5b; 32]));
        assert!(!other.peer.verify(b"header and body", &mac));
    }

    #[test]
    fn slot_secret_debug_is_redacted_and_base64_round_trips() {
        let s = secret();
        let text = s.to_base64();
        assert!(!format!("{s:?}").contains(text.as_str()));
        assert!(!format!("{s:?}").contains("5a5a"));
        assert_eq!(SlotSecret::from_base64(&text).unwrap().expose(), s.expose());
        assert_eq!(
            SlotSecret::from_base64("AAAA").unwrap_err(),
            ProofError::SlotSecretLength { len: 3 }
        );
        assert_eq!(
            SlotSecret::from_base64("not base64!").unwrap_err(),
            ProofError::SlotSecretBase64
        );
    }

    #[test]
    fn generated_secrets_differ() {
        let rng = SystemRandom::new();
        let a = SlotSecret::generate(&rng).unwrap();
        let b = SlotSecret::generate(&rng).unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cookie_lives_one_to_two_windows() {
        let jar = CookieJar::new([1; 32]);
        let src = addr("198.18.0.1:4000");
        let issued_at = UnixTime(6_000); // start of a window
        let cookie = jar.issue(issued_at, 9, 0, src);
        assert!(jar.check(issued_at, &cookie, 9, 0, src));
        assert!(jar.check(UnixTime(6_059), &cookie, 9, 0, src));
        assert!(jar.check(UnixTime(6_060), &cookie, 9, 0, src)); // next window
        assert!(jar.check(UnixTime(6_119), &cookie, 9, 0, src));
        assert!(!jar.check(UnixTime(6_120), &cookie, 9, 0, src)); // two windows later
        assert!(!jar.check(UnixTime(5_999), &cookie, 9, 0, src)); // from the future
    }

    #[test]
    fn cookies_are_siphash_under_the_window_key_and_the_guard_gets_three_windows() {
        let jar = CookieJar::new([1; 32]);
        let now = UnixTime(1_000_000);
        let src = addr("198.18.0.1:4000");
        let w = now.as_secs() / COOKIE_WINDOW_SECS;
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1];
        let input = cookie::cookie_input(9, 1, &mapped, 4000);
        let by_hand = cookie::cookie(&jar.window_key(w), &input);
        assert_eq!(jar.issue(now, 9, 1, src), by_hand);
        assert_eq!(
            jar.window_keys(now),
            [
                jar.window_key(w - 1),
                jar.window_key(w),
                jar.window_key(w + 1)
            ]
        );
        assert_ne!(jar.window_key(w), jar.window_key(w + 1));
    }

    #[test]
    fn cookie_is_bound_to_address_session_and_slot() {
        let jar = CookieJar::new([1; 32]);
        let now = UnixTime(1_000_000);
        let src = addr("198.18.0.1:4000");
        let cookie = jar.issue(now, 9, 1, src);
        assert!(jar.check(now, &cookie, 9, 1, src));
        assert!(!jar.check(now, &cookie, 9, 1, addr("198.18.0.2:4000")));
        assert!(!jar.check(now, &cookie, 9, 1, addr("198.18.0.1:4001")));
        // An IPv4 source is the same source when a dual-stack socket reports it IPv4-mapped.
        assert!(jar.check(now, &cookie, 9, 1, addr("[::ffff:198.18.0.1]:4000")));
        assert!(!jar.check(now, &cookie, 9, 1, addr("[2001:db8::c612:1]:4000")));
        assert!(!jar.check(now, &cookie, 10, 1, src));
        assert!(!jar.check(now, &cookie, 9, 0, src));
        assert!(!CookieJar::new([2; 32]).check(now, &cookie, 9, 1, src));
    }

    #[test]
    fn cookie_works_for_ipv6_and_at_the_epoch() {
        let jar = CookieJar::generate(&SystemRandom::new()).unwrap();
        let src = addr("[2001:db8::1]:443");
        let cookie = jar.issue(UnixTime(0), 1, 0, src);
        assert!(jar.check(UnixTime(0), &cookie, 1, 0, src));
        assert!(jar.check(UnixTime(119), &cookie, 1, 0, src));
        assert!(!jar.check(UnixTime(120), &cookie, 1, 0, src));
    }

    #[test]
    fn all_zero_cookie_is_never_valid() {
        let jar = CookieJar::new([1; 32]);
        let src = addr("198.18.0.1:4000");
        for t in [0, 59, 60, 1_000_000] {
            assert!(!jar.check(UnixTime(t), &[0; 16], 1, 0, src));
        }
    }
}
