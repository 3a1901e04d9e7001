//! Sealing a slot secret to a relay's static X25519 key (`docs/protocol.md` §4.1).
//!
//! ```text
//! e, E     = fresh X25519 key pair
//! shared   = X25519(e, R)            (rejected if all zero)
//! K_seal   = HKDF-SHA256(salt = "ferry token seal v1", ikm = shared, info = E ‖ R), 32 bytes
//! sealed   = ChaCha20-Poly1305(K_seal, nonce = 0^12, aad = token bytes 0..64, S)
//! ```
//!
//! The sealed form is `E (32) ‖ ciphertext (32) ‖ tag (16)`, token bytes 64..144.
//!
//! The AEAD is `ring`'s ChaCha20-Poly1305, the one the Noise transport uses. The all-zero nonce
//! is safe because every `K_seal` seals exactly one secret: it is derived from a fresh
//! ephemeral key each time. `K_seal` itself is held in `Zeroizing` and wiped once `ring`'s key is
//! built; `ring` does not zeroize its own copy on drop, and that copy opens only this one
//! sealed secret.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::rand::SecureRandom;
use x25519_dalek::{PublicKey as X25519Public, StaticSecret};
use zeroize::Zeroizing;

use crate::keys::{RelayPublicKey, RelayStaticKey};
use crate::proof::{SLOT_SECRET_LEN, SlotSecret, hkdf_sha256_32};

/// Length of the sealed slot secret: ephemeral public key, ciphertext, tag.
pub const SEALED_LEN: usize = 32 + SLOT_SECRET_LEN + 16;
/// Length of the associated data: the token's claims, bytes 0..64.
pub const CLAIMS_AAD_LEN: usize = 64;

const SEAL_SALT: &[u8] = b"ferry token seal v1";

/// Why a slot secret could not be sealed or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The system random number generator failed (the host is to blame).
    #[error("the random number generator failed")]
    Rng,
    /// The X25519 result is all zero: a low-order public key was used (the sender is to blame).
    #[error("non-contributory X25519 key exchange (low-order public key)")]
    NonContributory,
    /// The AEAD tag does not verify: sealed to another relay's key, or the claims or sealed
    /// bytes were changed.
    #[error("slot secret does not unseal (sealed to another relay, or tampered with)")]
    Open,
}

/// Draws a fresh slot secret and seals it to `relay_public`, binding it to `claims_aad`
/// (token bytes 0..64). Returns the 80 sealed bytes and the secret for the peer.
pub fn seal_slot_secret(
    rng: &dyn SecureRandom,
    relay_public: &RelayPublicKey,
    claims_aad: &[u8; CLAIMS_AAD_LEN],
) -> Result<([u8; SEALED_LEN], SlotSecret), SealError> {
    let secret = SlotSecret::generate(rng).map_err(|_| SealError::Rng)?;
    let mut ephemeral = Zeroizing::new([0u8; 32]);
    rng.fill(ephemeral.as_mut()).map_err(|_| SealError::Rng)?;
    let sealed = seal_with_ephemeral(&secret, &ephemeral, relay_public, claims_aad)?;
    Ok((sealed, secret))
}

/// Seals `secret` with the ephemeral X25519 secret key `ephemeral`: the deterministic part of
/// [`seal_slot_secret`], which the known-answer tests pin.
pub(crate) fn seal_with_ephemeral(
    secret: &SlotSecret,
    ephemeral: &[u8; 32],
    relay_public: &RelayPublicKey,
    claims_aad: &[u8; CLAIMS_AAD_LEN],
) -> Result<[u8; SEALED_LEN], SealError> {
    let ephemeral = StaticSecret::from(*ephemeral);
    let ephemeral_public = X25519Public::from(&ephemeral).to_bytes();

    let shared = ephemeral.diffie_hellman(&X25519Public::from(*relay_public.as_bytes()));
    if !shared.was_contributory() {
        return Err(SealError::NonContributory);
    }
    let key = seal_key(shared.as_bytes(), &ephemeral_public, relay_public);

    let mut ciphertext = *secret.expose();
    let tag = key
        .seal_in_place_separate_tag(zero_nonce(), Aad::from(claims_aad), &mut ciphertext)
        .map_err(|_| SealError::Open)?;

    let mut sealed = [0u8; SEALED_LEN];
    sealed[..32].copy_from_slice(&ephemeral_public);
    sealed[32..64].copy_from_slice(&ciphertext);
    sealed[64..].copy_from_slice(tag.as_ref());
    Ok(sealed)
}

/// Opens a sealed slot secret with the relay's static key. Fails with [`SealError::Open`] when
/// it was sealed to another key or `sealed` or `claims_aad` changed.
pub fn open_slot_secret(
    relay_static: &RelayStaticKey,
    sealed: &[u8; SEALED_LEN],
    claims_aad: &[u8; CLAIMS_AAD_LEN],
) -> Result<SlotSecret, SealError> {
    let (ephemeral_public, rest) = sealed.split_at(32);
    let (ciphertext, tag) = rest.split_at(SLOT_SECRET_LEN);
    let mut ephemeral = [0u8; 32];
    ephemeral.copy_from_slice(ephemeral_public);

    let shared = relay_static.diffie_hellman(&ephemeral);
    if !shared.was_contributory() {
        return Err(SealError::NonContributory);
    }
    let key = seal_key(shared.as_bytes(), &ephemeral, &relay_static.public());

    let mut plaintext = Zeroizing::new([0u8; SLOT_SECRET_LEN]);
    plaintext.copy_from_slice(ciphertext);
    let tag = Tag::try_from(tag).map_err(|_| SealError::Open)?;
    key.open_in_place_separate_tag(
        zero_nonce(),
        Aad::from(claims_aad),
        tag,
        plaintext.as_mut_slice(),
        0..,
    )
    .map_err(|_| SealError::Open)?;
    Ok(SlotSecret::from_bytes(*plaintext))
}

/// ChaCha20-Poly1305 under `K_seal = HKDF(salt, shared, E ‖ R)`.
fn seal_key(
    shared: &[u8; 32],
    ephemeral_public: &[u8; 32],
    relay_public: &RelayPublicKey,
) -> LessSafeKey {
    let key = hkdf_sha256_32(
        SEAL_SALT,
        shared,
        &[ephemeral_public, relay_public.as_bytes()],
    );
    match UnboundKey::new(&CHACHA20_POLY1305, key.as_slice()) {
        Ok(key) => LessSafeKey::new(key),
        // ring refuses only keys of the wrong length, and a [u8; 32] is never that.
        Err(_) => unreachable!("ChaCha20-Poly1305 keys are 32 bytes"),
    }
}

/// The nonce of §4.1: twelve zero bytes, safe because each `K_seal` is used once.
fn zero_nonce() -> Nonce {
    Nonce::assume_unique_for_key([0; 12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn claims() -> [u8; CLAIMS_AAD_LEN] {
        let mut c = [0u8; CLAIMS_AAD_LEN];
        c.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        c
    }

    /// Lowercase hex, for comparing against the pinned values below.
    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Pins the sealed bytes for fixed inputs, so that a change of AEAD, KDF or layout that
    /// alters a single bit of a token fails here.
    #[test]
    fn known_answer() {
        let relay = RelayStaticKey::from_bytes(&[0x01; 32]);
        let secret = SlotSecret::from_bytes([0x11; SLOT_SECRET_LEN]);
        let sealed = seal_with_ephemeral(&secret, &[0x22; 32], &relay.public(), &claims()).unwrap();
        assert_eq!(hex(&sealed), KNOWN_SEALED);
        let opened = open_slot_secret(&relay, &sealed, &claims()).unwrap();
        assert_eq!(opened.expose(), secret.expose());
    }

    /// `E ‖ ciphertext ‖ tag` for relay key `[0x01; 32]`, slot secret `[0x11; 32]`, ephemeral
    /// key `[0x22; 32]` and the claims `0, 1, …, 63`.
    const KNOWN_SEALED: &str = concat!(
        "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20",
        "74f2d5c60f65242918313ebcb9db67765eef016ace4e79df8a9ac67ddd6a5f38",
        "28afa2bb2993e855136ecf42ab00108d",
    );

    #[test]
    fn round_trip() {
        let rng = SystemRandom::new();
        let relay = RelayStaticKey::generate(&rng).unwrap();
        let (sealed, secret) = seal_slot_secret(&rng, &relay.public(), &claims()).unwrap();
        let opened = open_slot_secret(&relay, &sealed, &claims()).unwrap();
        assert_eq!(opened.expose(), secret.expose());
        // The ciphertext is not the secret in the clear.
        assert_ne!(&sealed[32..64], secret.expose());
    }

    #[test]
    fn wrong_key_fails() {
        let rng = SystemRandom::new();
        let relay = RelayStaticKey::generate(&rng).unwrap();
        let other = RelayStaticKey::generate(&rng).unwrap();
        let (sealed, _) = seal_slot_secret(&rng, &relay.public(), &claims()).unwrap();
        assert_eq!(
            open_slot_secret(&other, &sealed, &claims()).unwrap_err(),
            SealError::Open
        );
    }

    #[test]
    fn aad_mismatch_or_tampering_fails() {
        let rng = SystemRandom::new();
        let relay = RelayStaticKey::generate(&rng).unwrap();
        let (sealed, _) = seal_slot_secret(&rng, &relay.public(), &claims()).unwrap();
        let mut other_claims = claims();
        other_claims[40] ^= 1;
        assert_eq!(
            open_slot_secret(&relay, &sealed, &other_claims).unwrap_err(),
            SealError::Open
        );
        for byte in [0, 31, 32, 63, 64, 79] {
            let mut tampered = sealed;
            tampered[byte] ^= 0x80;
            assert!(open_slot_secret(&relay, &tampered, &claims()).is_err());
        }
    }

    #[test]
    fn low_order_points_are_rejected() {
        let rng = SystemRandom::new();
        let relay = RelayStaticKey::generate(&rng).unwrap();
        let zero = RelayPublicKey::from_bytes([0; 32]);
        assert_eq!(
            seal_slot_secret(&rng, &zero, &claims()).unwrap_err(),
            SealError::NonContributory
        );
        let sealed = [0u8; SEALED_LEN];
        assert_eq!(
            open_slot_secret(&relay, &sealed, &claims()).unwrap_err(),
            SealError::NonContributory
        );
    }
}
