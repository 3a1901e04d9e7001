use super::*;
use proptest::prelude::*;
use ring::rand::SystemRandom;

const RELAY_ID: u64 = 77;
const SESSION: u64 = 0x1234_5678;
const KID: u32 = 7;

fn relay_key() -> RelayStaticKey {
    RelayStaticKey::from_bytes(&[1; 32])
}

fn minter(kid: u32, seed: u8) -> TokenMinter {
    TokenMinter::new(
        kid,
        GatewaySigningKey::from_seed_bytes(&[seed; 32]).unwrap(),
    )
}

fn verifier_trusting(minters: &[&TokenMinter]) -> TokenVerifier {
    let mut verifier = TokenVerifier::new(VerifierConfig::new(RELAY_ID), relay_key()).unwrap();
    for m in minters {
        verifier.add_trusted_key(m.kid(), m.public());
    }
    verifier
}

fn input() -> ClaimsInput {
    ClaimsInput {
        slot: Slot::B,
        relay_id: RELAY_ID,
        session_id: SESSION,
        not_before: UnixTime(1_000),
        expires: UnixTime(2_000),
        rate_bytes_per_sec: 125_000,
    }
}

fn mint(m: &TokenMinter, input: &ClaimsInput) -> MintedToken {
    m.mint(&SystemRandom::new(), input, &relay_key().public())
        .unwrap()
}

const NOW: UnixTime = UnixTime(1_500);

fn verify(v: &TokenVerifier, token: &[u8], now: UnixTime) -> Result<VerifiedToken, TokenError> {
    v.verify(token, now, SESSION, 1)
}

#[test]
fn mint_verify_round_trip() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let minted = mint(&m, &input());
    let verified = verify(&v, &minted.bytes, NOW).unwrap();
    assert_eq!(verified.claims, minted.claims);
    assert_eq!(verified.claims.kid, KID);
    assert_eq!(verified.slot_secret.expose(), minted.slot_secret.expose());
    assert_eq!(parse_unverified(&minted.bytes).unwrap(), minted.claims);
    // Two tokens for the same claims differ in id and secret.
    let again = mint(&m, &input());
    assert_ne!(again.claims.token_id, minted.claims.token_id);
    assert_ne!(again.slot_secret.expose(), minted.slot_secret.expose());
}

/// Pins a whole token for fixed inputs (gateway key, relay key, claims, slot secret and the
/// sealing's ephemeral key; Ed25519 signatures are deterministic), so that any change to the
/// claims layout, the sealing or the signature fails here.
#[test]
fn known_answer() {
    let m = minter(KID, 2);
    let claims = Claims {
        slot: Slot::B,
        kid: KID,
        token_id: [0x33; TOKEN_ID_LEN],
        relay_id: RELAY_ID,
        session_id: SESSION,
        not_before: UnixTime(1_000),
        expires: UnixTime(2_000),
        rate_bytes_per_sec: 125_000,
        probe: false,
    };
    let claims_bytes = claims.encode();
    let secret = SlotSecret::from_bytes([0x11; 32]);
    let sealed =
        seal::seal_with_ephemeral(&secret, &[0x22; 32], &relay_key().public(), &claims_bytes)
            .unwrap();
    let token = m.sign(&claims_bytes, &sealed);
    let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, KNOWN_TOKEN.concat());
    let verified = verify(&verifier_trusting(&[&m]), &token, NOW).unwrap();
    assert_eq!(verified.claims, claims);
    assert_eq!(verified.slot_secret.expose(), secret.expose());
}

const KNOWN_TOKEN: [&str; 7] = [
    // claims 0..32: version, slot B, reserved, kid 7, token id, relay id 77
    "010100000000000733333333333333333333333333333333000000000000004d",
    // claims 32..64: session, nbf 1000, exp 2000, rate 125000
    "000000001234567800000000000003e800000000000007d0000000000001e848",
    // sealed: ephemeral public key E
    "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20",
    // sealed: ciphertext of S
    "74f2d5c60f65242918313ebcb9db67765eef016ace4e79df8a9ac67ddd6a5f38",
    // sealed: tag
    "aeff103447cbb9fac12b9dd324696701",
    // Ed25519 signature
    "bd72fe5a85188783c2db750125779aafc7a2a5d488021f7356ee51e438ed33f6",
    "f7c0a0848ce1f8e7ae6e07d22570507ab12da10c14cd388e20a4385227518601",
];

#[test]
fn time_checks_allow_skew_on_both_sides() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let token = mint(&m, &input()).bytes;
    assert!(verify(&v, &token, UnixTime(970)).is_ok());
    assert_eq!(
        verify(&v, &token, UnixTime(969)).unwrap_err(),
        TokenError::NotYetValid {
            not_before: UnixTime(1_000),
            now: UnixTime(969)
        }
    );
    assert!(verify(&v, &token, UnixTime(2_029)).is_ok());
    assert_eq!(
        verify(&v, &token, UnixTime(2_030)).unwrap_err(),
        TokenError::Expired {
            expires: UnixTime(2_000),
            now: UnixTime(2_030)
        }
    );
    assert!(matches!(
        verify(&v, &token, UnixTime(u64::MAX)),
        Err(TokenError::Expired { .. })
    ));
}

#[test]
fn binding_checks() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let token = mint(&m, &input()).bytes;
    assert_eq!(
        v.verify(&token, NOW, SESSION + 1, 1).unwrap_err(),
        TokenError::WrongSession {
            expected: SESSION + 1,
            found: SESSION
        }
    );
    for slot in [0, 2, 255] {
        assert_eq!(
            v.verify(&token, NOW, SESSION, slot).unwrap_err(),
            TokenError::WrongSlot {
                expected: slot,
                found: 1
            }
        );
    }
    let other_relay = mint(
        &m,
        &ClaimsInput {
            relay_id: RELAY_ID + 1,
            ..input()
        },
    );
    assert_eq!(
        verify(&v, &other_relay.bytes, NOW).unwrap_err(),
        TokenError::WrongRelay {
            expected: RELAY_ID,
            found: RELAY_ID + 1
        }
    );
}

#[test]
fn unknown_kid_and_rotation() {
    let old = minter(1, 2);
    let new = minter(2, 3);
    let unknown = minter(3, 4);
    let mut v = verifier_trusting(&[&old, &new]);
    let old_token = mint(&old, &input()).bytes;
    let new_token = mint(&new, &input()).bytes;
    assert!(verify(&v, &old_token, NOW).is_ok());
    assert!(verify(&v, &new_token, NOW).is_ok());
    assert_eq!(
        verify(&v, &mint(&unknown, &input()).bytes, NOW).unwrap_err(),
        TokenError::UnknownKid { kid: 3 }
    );
    assert_eq!(v.remove_trusted_key(1), Some(old.public()));
    assert_eq!(
        verify(&v, &old_token, NOW).unwrap_err(),
        TokenError::UnknownKid { kid: 1 }
    );
    assert!(verify(&v, &new_token, NOW).is_ok());
    assert_eq!(v.trusted_kids().collect::<Vec<_>>(), vec![2]);
}

#[test]
fn key_under_wrong_kid_is_a_bad_signature() {
    let signer = minter(1, 2);
    let mut v = verifier_trusting(&[]);
    v.add_trusted_key(1, minter(1, 9).public());
    assert_eq!(
        verify(&v, &mint(&signer, &input()).bytes, NOW).unwrap_err(),
        TokenError::BadSignature
    );
}

#[test]
fn flipped_signature_or_claims_bit_is_a_bad_signature() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let token = mint(&m, &input()).bytes;
    let mut sig = token;
    sig[SIGNED_LEN + 5] ^= 0x01;
    assert_eq!(verify(&v, &sig, NOW).unwrap_err(), TokenError::BadSignature);
    let mut claims = token;
    claims[24 + 7] ^= 0x01; // relay id
    assert_eq!(
        verify(&v, &claims, NOW).unwrap_err(),
        TokenError::BadSignature
    );
    let mut expiry = token;
    expiry[48 + 6] ^= 0x01; // exp, extends the token
    assert_eq!(
        verify(&v, &expiry, NOW).unwrap_err(),
        TokenError::BadSignature
    );
    let mut sealed = token;
    sealed[100] ^= 0x01;
    assert_eq!(
        verify(&v, &sealed, NOW).unwrap_err(),
        TokenError::BadSignature
    );
}

#[test]
fn malformed_tokens() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let token = mint(&m, &input()).bytes;
    let malformed = |bytes: &[u8]| match verify(&v, bytes, NOW) {
        Err(TokenError::Malformed(reason)) => reason,
        other => panic!("expected malformed, got {other:?}"),
    };
    assert_eq!(
        malformed(&token[..207]),
        MalformedReason::Length { len: 207 }
    );
    assert_eq!(malformed(&[]), MalformedReason::Length { len: 0 });
    let mut t = token;
    t[0] = 2;
    assert_eq!(malformed(&t), MalformedReason::Version { version: 2 });
    let mut t = token;
    t[1] = 2;
    assert_eq!(malformed(&t), MalformedReason::Slot { slot: 2 });
    let mut t = token;
    t[3] = 1;
    assert_eq!(malformed(&t), MalformedReason::Reserved);
    // Byte 2 is the flags: only bit 0 (probe) is defined.
    for bit in 1..8 {
        let mut t = token;
        t[2] = 1 << bit;
        assert_eq!(malformed(&t), MalformedReason::Reserved, "flag bit {bit}");
    }
    let mut t = token;
    t[32..40].fill(0);
    assert_eq!(malformed(&t), MalformedReason::ZeroSession);
}

#[test]
fn lifetime_limits() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let at_limit = mint(
        &m,
        &ClaimsInput {
            expires: UnixTime(1_000 + DEFAULT_MAX_LIFETIME_SECS),
            ..input()
        },
    );
    assert!(verify(&v, &at_limit.bytes, NOW).is_ok());
    let too_long = mint(
        &m,
        &ClaimsInput {
            expires: UnixTime(1_001 + DEFAULT_MAX_LIFETIME_SECS),
            ..input()
        },
    );
    assert!(matches!(
        verify(&v, &too_long.bytes, NOW),
        Err(TokenError::LifetimeTooLong { .. })
    ));
    // A signed token with exp <= nbf (which `mint` refuses to make) fails check 7 too.
    let mut claims = mint(&m, &input()).claims;
    claims.expires = claims.not_before;
    let empty = m
        .seal_and_sign(&SystemRandom::new(), claims, &relay_key().public())
        .unwrap();
    assert!(matches!(
        verify(&v, &empty.bytes, NOW),
        Err(TokenError::LifetimeTooLong { .. })
    ));
}

#[test]
fn mint_refuses_bad_input() {
    let m = minter(KID, 2);
    let rng = SystemRandom::new();
    let relay = relay_key().public();
    let zero_session = ClaimsInput {
        session_id: 0,
        ..input()
    };
    assert_eq!(
        m.mint(&rng, &zero_session, &relay).unwrap_err(),
        TokenError::MintZeroSession
    );
    for expires in [UnixTime(999), UnixTime(1_000)] {
        let empty = ClaimsInput { expires, ..input() };
        assert!(matches!(
            m.mint(&rng, &empty, &relay),
            Err(TokenError::MintEmptyLifetime { .. })
        ));
    }
}

#[test]
fn sealed_to_another_relay_fails_to_unseal() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let other_relay = RelayStaticKey::from_bytes(&[9; 32]).public();
    let token = m
        .mint(&SystemRandom::new(), &input(), &other_relay)
        .unwrap();
    assert_eq!(
        verify(&v, &token.bytes, NOW).unwrap_err(),
        TokenError::Seal(SealError::Open)
    );
}

#[test]
fn skew_config_is_bounded() {
    let config = VerifierConfig {
        max_skew_secs: 301,
        ..VerifierConfig::new(RELAY_ID)
    };
    assert_eq!(
        TokenVerifier::new(config, relay_key()).unwrap_err(),
        TokenError::SkewTooLarge { secs: 301 }
    );
    let config = VerifierConfig {
        max_skew_secs: 300,
        ..VerifierConfig::new(RELAY_ID)
    };
    assert!(TokenVerifier::new(config, relay_key()).is_ok());
}

#[test]
fn replay_cache_refuses_a_second_use() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let token = mint(&m, &input()).bytes;
    let mut cache = TokenReplayCache::new(4);
    let skew = v.config().max_skew_secs;
    let claims = verify(&v, &token, NOW).unwrap().claims;
    cache
        .check_and_insert(claims.token_id, claims.expires, NOW, mono(NOW), skew)
        .unwrap();
    let claims = verify(&v, &token, UnixTime(1_600)).unwrap().claims;
    assert_eq!(
        cache
            .check_and_insert(
                claims.token_id,
                claims.expires,
                UnixTime(1_600),
                mono(UnixTime(1_600)),
                skew
            )
            .unwrap_err(),
        TokenError::Replayed
    );
    // Still remembered up to the last second the token could verify.
    assert_eq!(
        cache
            .check_and_insert(
                claims.token_id,
                claims.expires,
                UnixTime(2_029),
                mono(UnixTime(2_029)),
                skew
            )
            .unwrap_err(),
        TokenError::Replayed
    );
}

#[test]
fn replay_cache_full_of_live_ids_refuses_and_then_recovers() {
    let mut cache = TokenReplayCache::new(2);
    let now = UnixTime(100);
    cache
        .check_and_insert([1; 16], UnixTime(200), now, mono(now), 30)
        .unwrap();
    cache
        .check_and_insert([2; 16], UnixTime(300), now, mono(now), 30)
        .unwrap();
    assert_eq!(
        cache
            .check_and_insert([3; 16], UnixTime(300), now, mono(now), 30)
            .unwrap_err(),
        TokenError::ReplayCacheFull { capacity: 2 }
    );
    // A live id is never forgotten, so its replay is still caught while full.
    assert_eq!(
        cache.check_and_insert([1; 16], UnixTime(200), now, mono(now), 30),
        Err(TokenError::Replayed)
    );
    // At 230 = 200 + skew, id 1 can no longer verify: its place is free.
    let later = UnixTime(230);
    cache
        .check_and_insert([3; 16], UnixTime(300), later, mono(later), 30)
        .unwrap();
    assert_eq!(cache.len(), 2);
    assert_eq!(
        cache.check_and_insert([2; 16], UnixTime(300), later, mono(later), 30),
        Err(TokenError::Replayed)
    );
    assert!(matches!(
        cache.check_and_insert([4; 16], UnixTime(100), later, mono(later), 30),
        Err(TokenError::Expired { .. })
    ));
}

#[test]
fn every_truncation_extension_and_bit_flip_fails() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let token = mint(&m, &input()).bytes;
    for len in 0..TOKEN_LEN {
        assert!(verify(&v, &token[..len], NOW).is_err());
    }
    for extra in 1..=16 {
        let mut longer = token.to_vec();
        longer.extend(std::iter::repeat_n(0u8, extra));
        assert!(verify(&v, &longer, NOW).is_err());
    }
    for bit in 0..TOKEN_LEN * 8 {
        let mut flipped = token;
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(verify(&v, &flipped, NOW).is_err(), "bit {bit}");
    }
}

fn fixture() -> &'static (TokenVerifier, [u8; TOKEN_LEN]) {
    static FIXTURE: std::sync::OnceLock<(TokenVerifier, [u8; TOKEN_LEN])> =
        std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let m = minter(KID, 2);
        (verifier_trusting(&[&m]), mint(&m, &input()).bytes)
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let (v, _) = fixture();
        let _ = parse_unverified(&bytes);
        prop_assert!(verify(v, &bytes, NOW).is_err());
    }

    #[test]
    fn edited_valid_token_fails_unless_identical(
        edits in proptest::collection::vec((0..TOKEN_LEN, any::<u8>()), 1..8),
        new_len in 0..TOKEN_LEN + 32,
        fill in any::<u8>(),
    ) {
        let (v, token) = fixture();
        let mut edited = token.to_vec();
        for (at, mask) in edits {
            edited[at] ^= mask;
        }
        edited.resize(new_len, fill);
        let result = verify(v, &edited, NOW);
        if edited == token {
            prop_assert!(result.is_ok());
        } else {
            prop_assert!(result.is_err());
        }
    }
}

/// The monotonic clock at wall time `at`, for clocks that have never been stepped: both start
/// together at wall time 0.
fn mono(at: UnixTime) -> Instant {
    mono_base() + Duration::from_secs(at.as_secs())
}

fn mono_base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

#[test]
fn replay_cache_keeps_an_id_while_either_clock_says_its_token_lives() {
    let mut cache = TokenReplayCache::new(4);
    let id = [9; 16];
    // Recorded at wall 1000 with exp 1100 and skew 30: 130 s to live.
    let t0 = mono_base();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    cache
        .check_and_insert(id, UnixTime(1_100), UnixTime(1_000), at(0), 30)
        .unwrap();
    // 200 s later by the monotonic clock, but the wall clock was stepped back 150 s: the token
    // verifies again by the wall clock, so its id must still be refused.
    assert_eq!(
        cache.check_and_insert(id, UnixTime(1_100), UnixTime(1_050), at(200), 30),
        Err(TokenError::Replayed)
    );
    // Once both clocks are past, the id goes (the token no longer verifies anyway).
    assert!(matches!(
        cache.check_and_insert(id, UnixTime(1_100), UnixTime(1_130), at(300), 30),
        Err(TokenError::Expired { .. })
    ));
    assert!(cache.is_empty());

    // Another relay's wall clock is stepped forward past exp + skew 10 s after recording,
    // then back: the monotonic clock still holds the id.
    let mut cache = TokenReplayCache::new(4);
    cache
        .check_and_insert(id, UnixTime(1_100), UnixTime(1_000), at(0), 30)
        .unwrap();
    assert_eq!(
        cache.check_and_insert([8; 16], UnixTime(1_100), UnixTime(5_000), at(10), 30),
        Err(TokenError::Expired {
            expires: UnixTime(1_100),
            now: UnixTime(5_000)
        })
    );
    assert_eq!(
        cache.check_and_insert(id, UnixTime(1_100), UnixTime(1_020), at(20), 30),
        Err(TokenError::Replayed)
    );
}

/// A probe token carries flag bit 0, which the signature covers, and verifies as a probe; a
/// normal token does not.
#[test]
fn probe_tokens_are_flagged_and_signed() {
    let m = minter(KID, 2);
    let v = verifier_trusting(&[&m]);
    let rng = SystemRandom::new();
    let probe = m.mint_probe(&rng, &input(), &relay_key().public()).unwrap();
    assert_eq!(probe.bytes[2], 1);
    let verified = verify(&v, &probe.bytes, NOW).unwrap();
    assert!(verified.claims.probe);
    let normal = mint(&m, &input());
    assert_eq!(normal.bytes[2], 0);
    assert!(!verify(&v, &normal.bytes, NOW).unwrap().claims.probe);
    // Setting the flag on a normal token breaks its signature.
    let mut forged = normal.bytes;
    forged[2] = 1;
    assert!(matches!(
        verify(&v, &forged, NOW),
        Err(TokenError::BadSignature)
    ));
}
