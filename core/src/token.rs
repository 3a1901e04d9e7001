//! Relay tokens: minted by a gateway, verified by a relay (`docs/protocol.md` §4 and §4.2).
//!
//! A token is a fixed 208-byte record: 64 bytes of claims, the slot secret sealed to the relay
//! ([`crate::seal`], §4.1), and an Ed25519 signature over `"ferry token v1\0" ‖ bytes[0..144]`.
//!
//! - [`TokenMinter::mint`] (gateway) draws a token id and a slot secret, seals and signs.
//! - [`TokenVerifier::verify`] (relay) runs checks 1–10 of §4.2 in the spec's order, each
//!   failure with its own [`TokenError`] variant.
//! - [`TokenReplayCache`] is check 11: the relay calls it after `verify` succeeds.
//! - [`parse_unverified`] decodes the claims without any check beyond the layout, for
//!   diagnostics and fuzzing only.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use ring::rand::SecureRandom;
use ring::signature::{ED25519, UnparsedPublicKey};

use crate::keys::{GatewayPublicKey, GatewaySigningKey, RelayPublicKey, RelayStaticKey};
use crate::proof::SlotSecret;
use crate::seal::{self, CLAIMS_AAD_LEN, SEALED_LEN, SealError};
use crate::time::UnixTime;
use crate::wire::Slot;

/// Length of every token.
pub const TOKEN_LEN: usize = 208;
/// The only token version.
pub const TOKEN_VERSION: u8 = 1;
/// Length of a token id.
pub const TOKEN_ID_LEN: usize = 16;
/// Default maximum clock skew between gateway and relay, seconds (§4.2).
pub const DEFAULT_MAX_SKEW_SECS: u64 = 30;
/// The largest maximum clock skew a relay may be configured with, seconds (§4.2).
pub const MAX_SKEW_LIMIT_SECS: u64 = 300;
/// Default maximum token lifetime `exp − nbf`, seconds (§4.2).
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 3600;

const CLAIMS_LEN: usize = CLAIMS_AAD_LEN;
const SIGNED_LEN: usize = CLAIMS_LEN + SEALED_LEN;
const SIGNATURE_LEN: usize = TOKEN_LEN - SIGNED_LEN;
const SIGNATURE_CONTEXT: &[u8] = b"ferry token v1\0";
// The layout of §4: claims 0..64, sealed secret 64..144, Ed25519 signature 144..208.
const _: () = assert!(SIGNED_LEN == 144 && SIGNATURE_LEN == 64);

/// The claims of a token (bytes 0..64).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The slot the bearer may bind.
    pub slot: Slot,
    /// Id of the gateway key that signed the token.
    pub kid: u32,
    /// Random, unique per token; the replay cache key.
    pub token_id: [u8; TOKEN_ID_LEN],
    /// The relay the token is for.
    pub relay_id: u64,
    /// The session; never zero.
    pub session_id: u64,
    /// Not valid before this time.
    pub not_before: UnixTime,
    /// Not valid from this time on; later than `not_before`.
    pub expires: UnixTime,
    /// Maximum bytes per second the slot may send; 0 means the relay's default.
    pub rate_bytes_per_sec: u64,
    /// A gateway's health probe (flags bit 0, §4): the relay answers its BIND with a BIND-ACK
    /// and binds nothing ([`TokenMinter::mint_probe`]).
    pub probe: bool,
}

/// The flags byte's health-probe bit (byte 2, bit 0, §4).
const FLAG_PROBE: u8 = 0x01;

/// What a gateway asks [`TokenMinter::mint`] for; the minter adds `kid` and a random token id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimsInput {
    /// The slot the bearer may bind.
    pub slot: Slot,
    /// The relay the token is for.
    pub relay_id: u64,
    /// The session; must not be zero.
    pub session_id: u64,
    /// Not valid before this time.
    pub not_before: UnixTime,
    /// Not valid from this time on; must be later than `not_before`.
    pub expires: UnixTime,
    /// Maximum bytes per second the slot may send; 0 means the relay's default.
    pub rate_bytes_per_sec: u64,
}

/// Why a token is malformed (§4.2 check 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedReason {
    /// The token is not [`TOKEN_LEN`] bytes long.
    #[error("length {len}, expected {TOKEN_LEN}")]
    Length {
        /// The length received.
        len: usize,
    },
    /// The version byte is not [`TOKEN_VERSION`].
    #[error("unsupported version {version}")]
    Version {
        /// The version received.
        version: u8,
    },
    /// A flag bit other than the probe bit (byte 2), or the reserved byte 3, is not zero.
    #[error("reserved bytes are not zero")]
    Reserved,
    /// The slot byte is neither 0 nor 1.
    #[error("invalid slot {slot}")]
    Slot {
        /// The slot byte received.
        slot: u8,
    },
    /// The session id is zero.
    #[error("session id is zero")]
    ZeroSession,
}

/// Everything that can go wrong minting or verifying a token. Verification failures are the
/// bearer's (or the gateway's configuration's) fault; `Rng` is the host's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Check 1: the token's layout is invalid.
    #[error("malformed token: {0}")]
    Malformed(MalformedReason),
    /// Check 2: no trusted gateway key has this `kid`.
    #[error("token signed with unknown key id {kid}")]
    UnknownKid {
        /// The token's `kid`.
        kid: u32,
    },
    /// Check 3: the Ed25519 signature does not verify (forged or altered token).
    #[error("token signature does not verify")]
    BadSignature,
    /// Check 4: the token is for another relay.
    #[error("token is for relay {found}, this is relay {expected}")]
    WrongRelay {
        /// This relay's id.
        expected: u64,
        /// The token's relay id.
        found: u64,
    },
    /// Check 5: the token is for another session than the packet header's.
    #[error("token is for session {found:#x}, packet is for session {expected:#x}")]
    WrongSession {
        /// The header's session id.
        expected: u64,
        /// The token's session id.
        found: u64,
    },
    /// Check 6: the token is for another slot than the BIND's slot field.
    #[error("token is for slot {found}, BIND claims slot {expected}")]
    WrongSlot {
        /// The BIND's slot field.
        expected: u8,
        /// The token's slot.
        found: u8,
    },
    /// Check 7: `exp ≤ nbf`, or `exp − nbf` exceeds the relay's maximum lifetime.
    #[error("token lifetime {not_before}..{expires} is empty or longer than {max_secs} s")]
    LifetimeTooLong {
        /// The token's `nbf`.
        not_before: UnixTime,
        /// The token's `exp`.
        expires: UnixTime,
        /// The relay's maximum lifetime.
        max_secs: u64,
    },
    /// Check 8: `nbf` is further in the future than the allowed skew.
    #[error("token not valid before {not_before} (now {now})")]
    NotYetValid {
        /// The token's `nbf`.
        not_before: UnixTime,
        /// The relay's clock.
        now: UnixTime,
    },
    /// Check 9: `exp` has passed, beyond the allowed skew. The peer should fetch a new token.
    #[error("token expired at {expires} (now {now})")]
    Expired {
        /// The token's `exp`.
        expires: UnixTime,
        /// The relay's clock.
        now: UnixTime,
    },
    /// Check 10: the slot secret does not unseal (sealed to another relay's key), or sealing
    /// failed while minting.
    #[error("slot secret: {0}")]
    Seal(#[from] SealError),
    /// Check 11: the token id was already accepted.
    #[error("token id already used")]
    Replayed,
    /// Check 11: the replay cache is full of live token ids; the relay refuses new tokens
    /// rather than forget one. Retry later.
    #[error("token replay cache full ({capacity} live ids)")]
    ReplayCacheFull {
        /// The cache's capacity.
        capacity: usize,
    },
    /// Minting refused: the session id is zero.
    #[error("cannot mint a token for session 0")]
    MintZeroSession,
    /// Minting refused: `expires` is not later than `not_before`.
    #[error("cannot mint a token with exp {expires} <= nbf {not_before}")]
    MintEmptyLifetime {
        /// The requested `nbf`.
        not_before: UnixTime,
        /// The requested `exp`.
        expires: UnixTime,
    },
    /// A verifier was configured with a skew above [`MAX_SKEW_LIMIT_SECS`].
    #[error("maximum clock skew {secs} s exceeds the limit of {MAX_SKEW_LIMIT_SECS} s")]
    SkewTooLarge {
        /// The configured skew.
        secs: u64,
    },
    /// The system random number generator failed.
    #[error("the random number generator failed")]
    Rng,
}

fn read_u32(bytes: &[u8; TOKEN_LEN], offset: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_be_bytes(field)
}

fn read_u64(bytes: &[u8; TOKEN_LEN], offset: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_be_bytes(field)
}

impl Claims {
    fn encode(&self) -> [u8; CLAIMS_LEN] {
        let mut out = [0u8; CLAIMS_LEN];
        out[0] = TOKEN_VERSION;
        out[1] = self.slot.as_u8();
        out[2] = if self.probe { FLAG_PROBE } else { 0 };
        out[4..8].copy_from_slice(&self.kid.to_be_bytes());
        out[8..24].copy_from_slice(&self.token_id);
        out[24..32].copy_from_slice(&self.relay_id.to_be_bytes());
        out[32..40].copy_from_slice(&self.session_id.to_be_bytes());
        out[40..48].copy_from_slice(&self.not_before.as_secs().to_be_bytes());
        out[48..56].copy_from_slice(&self.expires.as_secs().to_be_bytes());
        out[56..64].copy_from_slice(&self.rate_bytes_per_sec.to_be_bytes());
        out
    }

    /// Check 1 of §4.2 and decoding of the claims.
    fn decode(bytes: &[u8; TOKEN_LEN]) -> Result<Self, MalformedReason> {
        if bytes[0] != TOKEN_VERSION {
            return Err(MalformedReason::Version { version: bytes[0] });
        }
        if bytes[2] & !FLAG_PROBE != 0 || bytes[3] != 0 {
            return Err(MalformedReason::Reserved);
        }
        let slot = Slot::from_u8(bytes[1]).ok_or(MalformedReason::Slot { slot: bytes[1] })?;
        let session_id = read_u64(bytes, 32);
        if session_id == 0 {
            return Err(MalformedReason::ZeroSession);
        }
        let mut token_id = [0u8; TOKEN_ID_LEN];
        token_id.copy_from_slice(&bytes[8..24]);
        Ok(Self {
            slot,
            kid: read_u32(bytes, 4),
            token_id,
            relay_id: read_u64(bytes, 24),
            session_id,
            not_before: UnixTime(read_u64(bytes, 40)),
            expires: UnixTime(read_u64(bytes, 48)),
            rate_bytes_per_sec: read_u64(bytes, 56),
            probe: bytes[2] & FLAG_PROBE != 0,
        })
    }
}

/// The fixed-size view of a token that passed check 1, with its decoded claims.
fn parse(token: &[u8]) -> Result<(&[u8; TOKEN_LEN], Claims), TokenError> {
    let bytes: &[u8; TOKEN_LEN] = token
        .try_into()
        .map_err(|_| TokenError::Malformed(MalformedReason::Length { len: token.len() }))?;
    let claims = Claims::decode(bytes).map_err(TokenError::Malformed)?;
    Ok((bytes, claims))
}

/// Decodes a token's claims checking **only** its layout (§4.2 check 1): no signature, no
/// relay, no time, no seal. For diagnostics and fuzzing; never base a decision on the result.
pub fn parse_unverified(token: &[u8]) -> Result<Claims, TokenError> {
    parse(token).map(|(_, claims)| claims)
}

/// The message the gateway signs: `"ferry token v1\0" ‖ bytes[0..144]`.
fn signed_message(bytes: &[u8; TOKEN_LEN]) -> [u8; SIGNATURE_CONTEXT.len() + SIGNED_LEN] {
    let mut message = [0u8; SIGNATURE_CONTEXT.len() + SIGNED_LEN];
    message[..SIGNATURE_CONTEXT.len()].copy_from_slice(SIGNATURE_CONTEXT);
    message[SIGNATURE_CONTEXT.len()..].copy_from_slice(&bytes[..SIGNED_LEN]);
    message
}

/// A freshly minted token with the slot secret the gateway hands to the peer over TLS.
#[derive(Debug)]
pub struct MintedToken {
    /// The 208 token bytes.
    pub bytes: [u8; TOKEN_LEN],
    /// The claims encoded in `bytes`.
    pub claims: Claims,
    /// The slot secret `S` sealed inside the token.
    pub slot_secret: SlotSecret,
}

/// Mints tokens with one gateway signing key (§4).
#[derive(Debug)]
pub struct TokenMinter {
    kid: u32,
    signing: GatewaySigningKey,
}

impl TokenMinter {
    /// A minter that signs with `signing`, which relays trust under `kid`.
    pub fn new(kid: u32, signing: GatewaySigningKey) -> Self {
        Self { kid, signing }
    }

    /// The key id written into every token.
    pub fn kid(&self) -> u32 {
        self.kid
    }

    /// The verification key relays must trust under [`TokenMinter::kid`].
    pub fn public(&self) -> GatewayPublicKey {
        self.signing.public()
    }

    /// Mints a token for `input`, sealing a fresh slot secret to `relay_public`.
    ///
    /// Refuses a zero session id and `expires ≤ not_before`. The lifetime limit is the
    /// relay's to enforce (§4.2 check 7); a gateway should stay well within it.
    pub fn mint(
        &self,
        rng: &dyn SecureRandom,
        input: &ClaimsInput,
        relay_public: &RelayPublicKey,
    ) -> Result<MintedToken, TokenError> {
        self.mint_flagged(rng, input, relay_public, false)
    }

    /// Mints a health-probe token (§4, flags bit 0): a relay that verifies it and the BIND's
    /// proof answers with a BIND-ACK under the slot's `K_relay` and binds nothing, so a gateway
    /// that checks that MAC knows the relay holds the private key for `relay_public`.
    pub fn mint_probe(
        &self,
        rng: &dyn SecureRandom,
        input: &ClaimsInput,
        relay_public: &RelayPublicKey,
    ) -> Result<MintedToken, TokenError> {
        self.mint_flagged(rng, input, relay_public, true)
    }

    fn mint_flagged(
        &self,
        rng: &dyn SecureRandom,
        input: &ClaimsInput,
        relay_public: &RelayPublicKey,
        probe: bool,
    ) -> Result<MintedToken, TokenError> {
        if input.session_id == 0 {
            return Err(TokenError::MintZeroSession);
        }
        if input.expires <= input.not_before {
            return Err(TokenError::MintEmptyLifetime {
                not_before: input.not_before,
                expires: input.expires,
            });
        }
        let mut token_id = [0u8; TOKEN_ID_LEN];
        rng.fill(&mut token_id).map_err(|_| TokenError::Rng)?;
        let claims = Claims {
            slot: input.slot,
            kid: self.kid,
            token_id,
            relay_id: input.relay_id,
            session_id: input.session_id,
            not_before: input.not_before,
            expires: input.expires,
            rate_bytes_per_sec: input.rate_bytes_per_sec,
            probe,
        };
        self.seal_and_sign(rng, claims, relay_public)
    }

    /// Encodes `claims`, seals a fresh slot secret and signs, without checking the claims.
    fn seal_and_sign(
        &self,
        rng: &dyn SecureRandom,
        claims: Claims,
        relay_public: &RelayPublicKey,
    ) -> Result<MintedToken, TokenError> {
        let claims_bytes = claims.encode();
        let (sealed, slot_secret) = seal::seal_slot_secret(rng, relay_public, &claims_bytes)?;
        Ok(MintedToken {
            bytes: self.sign(&claims_bytes, &sealed),
            claims,
            slot_secret,
        })
    }

    /// The token bytes: `claims`, `sealed`, and the signature over both.
    fn sign(&self, claims: &[u8; CLAIMS_LEN], sealed: &[u8; SEALED_LEN]) -> [u8; TOKEN_LEN] {
        let mut bytes = [0u8; TOKEN_LEN];
        bytes[..CLAIMS_LEN].copy_from_slice(claims);
        bytes[CLAIMS_LEN..SIGNED_LEN].copy_from_slice(sealed);
        let signature = self.signing.sign(&signed_message(&bytes));
        bytes[SIGNED_LEN..].copy_from_slice(&signature);
        bytes
    }
}

/// A relay's token verification settings (§4.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierConfig {
    /// This relay's id; tokens for other relays are refused.
    pub relay_id: u64,
    /// Maximum clock skew tolerated on `nbf` and `exp`, seconds; at most
    /// [`MAX_SKEW_LIMIT_SECS`].
    pub max_skew_secs: u64,
    /// Maximum `exp − nbf`, seconds.
    pub max_lifetime_secs: u64,
}

impl VerifierConfig {
    /// The defaults of §4.2 (30 s skew, 3600 s lifetime) for relay `relay_id`.
    pub fn new(relay_id: u64) -> Self {
        Self {
            relay_id,
            max_skew_secs: DEFAULT_MAX_SKEW_SECS,
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
        }
    }
}

/// A token and the slot secret unsealed from it, after checks 1–10 of §4.2.
#[derive(Debug)]
pub struct VerifiedToken {
    /// The verified claims.
    pub claims: Claims,
    /// The unsealed slot secret, from which the relay derives `K_peer` and `K_relay` (§6).
    pub slot_secret: SlotSecret,
}

/// Verifies tokens for one relay against a set of trusted gateway keys (§4.2).
#[derive(Clone, Debug)]
pub struct TokenVerifier {
    config: VerifierConfig,
    relay_static: RelayStaticKey,
    trusted: HashMap<u32, GatewayPublicKey>,
}

impl TokenVerifier {
    /// A verifier with no trusted keys yet. Fails if `max_skew_secs` exceeds
    /// [`MAX_SKEW_LIMIT_SECS`].
    pub fn new(config: VerifierConfig, relay_static: RelayStaticKey) -> Result<Self, TokenError> {
        if config.max_skew_secs > MAX_SKEW_LIMIT_SECS {
            return Err(TokenError::SkewTooLarge {
                secs: config.max_skew_secs,
            });
        }
        Ok(Self {
            config,
            relay_static,
            trusted: HashMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// Trusts `key` under `kid`, returning the key it replaces, if any.
    pub fn add_trusted_key(&mut self, kid: u32, key: GatewayPublicKey) -> Option<GatewayPublicKey> {
        self.trusted.insert(kid, key)
    }

    /// Stops trusting `kid`; its tokens then fail with [`TokenError::UnknownKid`].
    pub fn remove_trusted_key(&mut self, kid: u32) -> Option<GatewayPublicKey> {
        self.trusted.remove(&kid)
    }

    /// The trusted key ids, in no particular order.
    pub fn trusted_kids(&self) -> impl Iterator<Item = u32> + '_ {
        self.trusted.keys().copied()
    }

    /// Runs checks 1–10 of §4.2, in order, for a token presented in a packet for
    /// `expected_session` claiming slot `expected_slot`. The caller then runs check 11 with a
    /// [`TokenReplayCache`].
    pub fn verify(
        &self,
        token: &[u8],
        now: UnixTime,
        expected_session: u64,
        expected_slot: u8,
    ) -> Result<VerifiedToken, TokenError> {
        let (bytes, claims) = parse(token)?;
        let key = self
            .trusted
            .get(&claims.kid)
            .ok_or(TokenError::UnknownKid { kid: claims.kid })?;
        UnparsedPublicKey::new(&ED25519, key.as_bytes())
            .verify(&signed_message(bytes), &bytes[SIGNED_LEN..])
            .map_err(|_| TokenError::BadSignature)?;
        self.check_binding(&claims, expected_session, expected_slot)?;
        self.check_time(&claims, now)?;
        let slot_secret = open(&self.relay_static, bytes)?;
        Ok(VerifiedToken {
            claims,
            slot_secret,
        })
    }

    /// Checks 4–6: relay, session, slot.
    fn check_binding(
        &self,
        claims: &Claims,
        expected_session: u64,
        expected_slot: u8,
    ) -> Result<(), TokenError> {
        if claims.relay_id != self.config.relay_id {
            return Err(TokenError::WrongRelay {
                expected: self.config.relay_id,
                found: claims.relay_id,
            });
        }
        if claims.session_id != expected_session {
            return Err(TokenError::WrongSession {
                expected: expected_session,
                found: claims.session_id,
            });
        }
        if claims.slot.as_u8() != expected_slot {
            return Err(TokenError::WrongSlot {
                expected: expected_slot,
                found: claims.slot.as_u8(),
            });
        }
        Ok(())
    }

    /// Checks 7–9: lifetime, `nbf`, `exp`, with the configured skew.
    fn check_time(&self, claims: &Claims, now: UnixTime) -> Result<(), TokenError> {
        let (nbf, exp) = (claims.not_before, claims.expires);
        let lifetime_ok =
            exp > nbf && exp.as_secs() - nbf.as_secs() <= self.config.max_lifetime_secs;
        if !lifetime_ok {
            return Err(TokenError::LifetimeTooLong {
                not_before: nbf,
                expires: exp,
                max_secs: self.config.max_lifetime_secs,
            });
        }
        let skew = self.config.max_skew_secs;
        if now.saturating_add(skew) < nbf {
            return Err(TokenError::NotYetValid {
                not_before: nbf,
                now,
            });
        }
        if now >= exp.saturating_add(skew) {
            return Err(TokenError::Expired { expires: exp, now });
        }
        Ok(())
    }
}

/// Check 10: unseals the slot secret with the token's claims as AAD.
fn open(relay_static: &RelayStaticKey, bytes: &[u8; TOKEN_LEN]) -> Result<SlotSecret, SealError> {
    let mut claims = [0u8; CLAIMS_LEN];
    claims.copy_from_slice(&bytes[..CLAIMS_LEN]);
    let mut sealed = [0u8; SEALED_LEN];
    sealed.copy_from_slice(&bytes[CLAIMS_LEN..SIGNED_LEN]);
    seal::open_slot_secret(relay_static, &sealed, &claims)
}

/// Check 11 of §4.2: remembers accepted token ids until `exp + skew`, in bounded memory.
///
/// When full of live ids it refuses new ones ([`TokenError::ReplayCacheFull`]) rather than
/// forget a live one, so a token can never be accepted twice.
///
/// An id is forgotten only once both clocks agree that its token can no longer verify: the
/// monotonic clock has run for as long as the token had left when it was recorded, *and* the
/// wall clock says `exp + skew` has passed. The wall clock alone would re-admit a token once
/// after being stepped back; the monotonic one alone would re-admit it after being stepped
/// forward and back again. Token verification itself goes by the wall clock (the token's
/// times are wall-clock times), so the wall-clock half is what makes a forgotten id harmless.
#[derive(Debug)]
pub struct TokenReplayCache {
    capacity: usize,
    /// Live ids and the wall-clock time from which they may be forgotten.
    live: HashMap<[u8; TOKEN_ID_LEN], UnixTime>,
    /// The same entries, soonest monotonic deadline first.
    by_deadline: BinaryHeap<Reverse<(Instant, [u8; TOKEN_ID_LEN])>>,
    /// Entries past their monotonic deadline whose wall-clock time has not come (the wall
    /// clock was stepped back), soonest first.
    held_by_wall: BinaryHeap<Reverse<(UnixTime, [u8; TOKEN_ID_LEN])>>,
}

impl TokenReplayCache {
    /// A cache holding at most `capacity` live token ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            live: HashMap::new(),
            by_deadline: BinaryHeap::new(),
            held_by_wall: BinaryHeap::new(),
        }
    }

    /// The maximum number of live ids.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of ids held (expired ones are dropped on the next insert).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Records `token_id` of a token that expires at `expires`, or fails with
    /// [`TokenError::Replayed`] if it was recorded before and is still live,
    /// [`TokenError::Expired`] if `now ≥ expires + skew_secs`, or
    /// [`TokenError::ReplayCacheFull`]. `now` is the wall clock and `mono` the monotonic
    /// clock at the same moment.
    pub fn check_and_insert(
        &mut self,
        token_id: [u8; TOKEN_ID_LEN],
        expires: UnixTime,
        now: UnixTime,
        mono: Instant,
        skew_secs: u64,
    ) -> Result<(), TokenError> {
        self.forget_expired(now, mono);
        if self.live.contains_key(&token_id) {
            return Err(TokenError::Replayed);
        }
        let forget_at = expires.saturating_add(skew_secs);
        if forget_at <= now {
            return Err(TokenError::Expired { expires, now });
        }
        if self.live.len() >= self.capacity {
            return Err(TokenError::ReplayCacheFull {
                capacity: self.capacity,
            });
        }
        let left = Duration::from_secs(forget_at.as_secs() - now.as_secs());
        self.live.insert(token_id, forget_at);
        self.by_deadline.push(Reverse((mono + left, token_id)));
        Ok(())
    }

    /// Drops every id whose token can no longer verify by either clock (see the type's doc).
    fn forget_expired(&mut self, now: UnixTime, mono: Instant) {
        while let Some(Reverse((deadline, id))) = self.by_deadline.peek().copied() {
            if deadline > mono {
                break;
            }
            self.by_deadline.pop();
            match self.live.get(&id) {
                Some(&forget_at) if forget_at > now => {
                    self.held_by_wall.push(Reverse((forget_at, id)));
                }
                _ => {
                    self.live.remove(&id);
                }
            }
        }
        while let Some(Reverse((forget_at, id))) = self.held_by_wall.peek().copied() {
            if forget_at > now {
                break;
            }
            self.held_by_wall.pop();
            self.live.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests;
