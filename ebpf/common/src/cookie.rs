//! The address cookie's keyed function (docs/protocol.md §5), shared by the relay, which
//! issues and checks cookies, and the XDP guard, which checks them to tell a handshake from a
//! proven source from one that may be spoofed.
//!
//! A cookie is SipHash-2-4 with a 128-bit output (Aumasson and Bernstein, "SipHash: a fast
//! short-input PRF", 2012) over a fixed 27-byte input, under a 128-bit key that the relay
//! derives from its secret for each 60-second window. SipHash is a PRF built for short inputs,
//! which is all a cookie needs, and it is cheap enough to run in the XDP program: a few dozen
//! additions, rotations and XORs per 8-byte block, no tables.

/// Length of the input [`cookie_input`] builds.
pub const COOKIE_INPUT_LEN: usize = 27;

/// One window's cookie key: SipHash's `k0` and `k1` (the key's bytes 0–7 and 8–15, read as
/// little-endian integers).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CookieKey {
    /// Key bytes 0–7, little-endian.
    pub k0: u64,
    /// Key bytes 8–15, little-endian.
    pub k1: u64,
}

impl CookieKey {
    /// The key from its 16 bytes.
    pub fn from_bytes(bytes: &[u8; 16]) -> Self {
        let mut k0 = [0u8; 8];
        let mut k1 = [0u8; 8];
        k0.copy_from_slice(&bytes[..8]);
        k1.copy_from_slice(&bytes[8..]);
        CookieKey {
            k0: u64::from_le_bytes(k0),
            k1: u64::from_le_bytes(k1),
        }
    }
}

/// The cookie's input: session id (8 bytes, big-endian) ‖ slot (1) ‖ source address (16; an
/// IPv4 address as the IPv4-mapped `::ffff:a.b.c.d`) ‖ source port (2, big-endian).
#[inline(always)]
pub fn cookie_input(
    session_id: u64,
    slot: u8,
    addr: &[u8; 16],
    port: u16,
) -> [u8; COOKIE_INPUT_LEN] {
    let mut input = [0u8; COOKIE_INPUT_LEN];
    let id = session_id.to_be_bytes();
    let mut i = 0;
    while i < 8 {
        input[i] = id[i];
        i += 1;
    }
    input[8] = slot;
    let mut j = 0;
    while j < 16 {
        input[9 + j] = addr[j];
        j += 1;
    }
    let port = port.to_be_bytes();
    input[25] = port[0];
    input[26] = port[1];
    input
}

/// The cookie for `input` under `key`: SipHash-2-4-128, its two output words little-endian.
#[inline(always)]
pub fn cookie(key: &CookieKey, input: &[u8; COOKIE_INPUT_LEN]) -> [u8; 16] {
    siphash24_128(key, input)
}

/// SipHash-2-4 with the 128-bit output, over `msg`.
#[inline(always)]
pub fn siphash24_128(key: &CookieKey, msg: &[u8]) -> [u8; 16] {
    let mut v = [
        key.k0 ^ 0x736f_6d65_7073_6575,
        key.k1 ^ 0x646f_7261_6e64_6f6d ^ 0xee,
        key.k0 ^ 0x6c79_6765_6e65_7261,
        key.k1 ^ 0x7465_6462_7974_6573,
    ];
    let blocks = msg.len() / 8;
    let mut b = 0;
    while b < blocks {
        let mut word = [0u8; 8];
        word.copy_from_slice(&msg[b * 8..b * 8 + 8]);
        let m = u64::from_le_bytes(word);
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
        b += 1;
    }
    // The last block: the remaining bytes, and the message length in the top byte.
    let mut last = (msg.len() as u64 & 0xff) << 56;
    let tail = &msg[blocks * 8..];
    let mut t = 0;
    while t < tail.len() {
        last |= u64::from(tail[t]) << (8 * t);
        t += 1;
    }
    v[3] ^= last;
    round(&mut v);
    round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xee;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    round(&mut v);
    let first = v[0] ^ v[1] ^ v[2] ^ v[3];
    v[1] ^= 0xdd;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    round(&mut v);
    let second = v[0] ^ v[1] ^ v[2] ^ v[3];
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&first.to_le_bytes());
    out[8..].copy_from_slice(&second.to_le_bytes());
    out
}

/// One SipRound.
#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::hash::Hasher as _;
    use proptest::prelude::*;
    use siphasher::sip128::{Hasher128 as _, SipHasher24};

    fn reference(key: &CookieKey, msg: &[u8]) -> [u8; 16] {
        let mut h = SipHasher24::new_with_keys(key.k0, key.k1);
        h.write(msg);
        h.finish128().as_bytes()
    }

    #[test]
    fn the_reference_paper_key_and_messages_of_every_length() {
        // The paper's key 00 01 .. 0f and messages 00 01 .. (n-1), as in its test vectors.
        let key_bytes: [u8; 16] = core::array::from_fn(|i| i as u8);
        let key = CookieKey::from_bytes(&key_bytes);
        let msg: [u8; 64] = core::array::from_fn(|i| i as u8);
        for n in 0..=64 {
            assert_eq!(
                siphash24_128(&key, &msg[..n]),
                reference(&key, &msg[..n]),
                "{n}"
            );
        }
        // The first vector of the reference implementation's vectors_sip128 (empty message).
        assert_eq!(
            siphash24_128(&key, &[]),
            [
                0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55,
                0x02, 0x93
            ]
        );
    }

    #[test]
    fn the_cookie_input_lays_out_its_fields() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[198, 18, 0, 1]);
        let input = cookie_input(0x0102_0304_0506_0708, 1, &addr, 0xabcd);
        assert_eq!(&input[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(input[8], 1);
        assert_eq!(&input[9..25], &addr);
        assert_eq!(&input[25..], &[0xab, 0xcd]);
    }

    proptest! {
        #[test]
        fn matches_the_siphasher_crate(k0: u64, k1: u64, msg in proptest::collection::vec(any::<u8>(), 0..80)) {
            let key = CookieKey { k0, k1 };
            prop_assert_eq!(siphash24_128(&key, &msg), reference(&key, &msg));
        }
    }
}
