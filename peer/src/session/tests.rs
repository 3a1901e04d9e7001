//! The driver's own logic against a fake relay on loopback, on tokio's paused clock: renewal,
//! recovery after a silent relay, a relay CLOSE without a renewer, REBIND on request, and the
//! other peer's CLOSE. The fake relay binds any token it was told about (no cookies, no token
//! checks), MACs its answers under the slot's `K_relay`, forwards DATA between the two slots
//! and echoes KEEPALIVEs, unless told to play dead.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use ferry_core::keys::{PeerStaticKey, RelayPublicKey};
use ferry_core::proof::{SlotKeys, SlotSecret};
use ferry_core::wire::{self, CloseReason, MAX_DATAGRAM, Packet, Slot, TOKEN_LEN};
use tokio::net::UdpSocket;
use zeroize::Zeroizing;

use super::*;
use crate::gateway::RelayInfo;

const SESSION: u64 = 0x5e55;
/// The idle timeout the fake relay announces: KEEPALIVEs every second.
const IDLE_SECS: u32 = 3;

/// What the fake relay knows and does; shared with the test.
#[derive(Default)]
struct RelayState {
    /// The slot secret of every token it will bind.
    secrets: HashMap<[u8; TOKEN_LEN], [u8; 32]>,
    /// Per slot: the bound address, the keys and the last sequence number.
    bound: [Option<(SocketAddr, SlotKeys, u64)>; 2],
    /// The `expires at` its BIND-ACKs state.
    expires_at: u64,
    /// BINDs with a token that held the slot before from the same address (renewals), and
    /// REBINDs.
    binds: u64,
    rebinds: u64,
    /// The longest DATA datagram it received.
    longest_data: usize,
    /// Tokens used before: a BIND with one gets an authenticated REJECT `REPLAYED`.
    spent: std::collections::HashSet<[u8; TOKEN_LEN]>,
}

struct FakeRelay {
    addr: SocketAddr,
    state: Arc<StdMutex<RelayState>>,
    /// While set, the relay answers and forwards nothing, and forgets every binding (a relay
    /// that restarted and lost its state).
    dead: Arc<AtomicBool>,
    socket: Arc<UdpSocket>,
}

fn wall_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn slot_index(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

fn other(slot: Slot) -> Slot {
    match slot {
        Slot::A => Slot::B,
        Slot::B => Slot::A,
    }
}

impl FakeRelay {
    async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    /// A fake relay on `addr` (a port of 0 takes a free one).
    async fn start_on(addr: &str) -> Self {
        let socket = Arc::new(UdpSocket::bind(addr).await.unwrap());
        let state = Arc::new(StdMutex::new(RelayState {
            expires_at: wall_secs() + 3600,
            ..RelayState::default()
        }));
        let dead = Arc::new(AtomicBool::new(false));
        let relay = Self {
            addr: socket.local_addr().unwrap(),
            state: state.clone(),
            dead: dead.clone(),
            socket: socket.clone(),
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                if dead.load(Ordering::Relaxed) {
                    state.lock().unwrap().bound = [None, None];
                    continue;
                }
                let replies = serve(&mut state.lock().unwrap(), &buf[..n], from);
                for (datagram, to) in replies {
                    let _ = socket.send_to(&datagram, to).await;
                }
            }
        });
        relay
    }

    /// A grant for `slot` with a fresh token and secret the relay will take, pinning `peer`.
    fn grant(&self, slot: Slot, seed: u8, peer: &PeerStaticKey) -> Grant {
        let token = [seed; TOKEN_LEN];
        let secret = [seed.wrapping_add(100); 32];
        self.state.lock().unwrap().secrets.insert(token, secret);
        Grant {
            session_id: SESSION,
            slot,
            token: Zeroizing::new(token),
            slot_secret: SlotSecret::from_bytes(secret),
            kid: 1,
            not_before: wall_secs(),
            expires_at: wall_secs() + 3600,
            relay: RelayInfo {
                id: 1,
                address: self.addr,
                public_key: RelayPublicKey::from_bytes([0; 32]),
            },
            expected_peer_public_key: Some(peer.public()),
            join_code: None,
            join_code_expires_at: None,
        }
    }

    /// Sends the peer of `slot` a CLOSE with `reason` and unbinds it.
    async fn close(&self, slot: Slot, reason: CloseReason) {
        let (datagram, to) = {
            let mut state = self.state.lock().unwrap();
            let (to, keys, seq) = state.bound[slot_index(slot)].take().unwrap();
            let fields = wire::CloseFields { slot, reason, seq };
            let mut out = vec![0u8; MAX_DATAGRAM];
            let n = wire::encode_close(&mut out, SESSION, &fields, |m| keys.relay.mac(m)).unwrap();
            out.truncate(n);
            (out, to)
        };
        self.socket.send_to(&datagram, to).await.unwrap();
    }
}

/// A BIND-ACK for `slot`.
fn bind_ack(state: &RelayState, slot: Slot, keys: &SlotKeys, seq: u64) -> Vec<u8> {
    let fields = wire::BindAckFields {
        slot,
        peer_present: state.bound[slot_index(other(slot))].is_some(),
        idle_timeout_secs: IDLE_SECS,
        bind_seq: seq,
        expires_at: state.expires_at,
    };
    let mut out = vec![0u8; MAX_DATAGRAM];
    let n = wire::encode_bind_ack(&mut out, SESSION, &fields, |m| keys.relay.mac(m)).unwrap();
    out.truncate(n);
    out
}

/// The fake relay's answer to one datagram: what to send where.
fn serve(state: &mut RelayState, datagram: &[u8], from: SocketAddr) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut replies = Vec::new();
    match wire::parse(datagram) {
        Ok(Packet::Bind(bind)) => {
            let Some(secret) = state.secrets.get(bind.token()).copied() else {
                // An unknown token: what a relay says about an expired one, unauthenticated.
                let fields = wire::RejectFields {
                    reason: RejectReason::TokenExpired,
                    slot: bind.slot(),
                    bind_seq: bind.bind_seq(),
                };
                let mut out = vec![0u8; MAX_DATAGRAM];
                let n = wire::encode_reject_unauthenticated(&mut out, SESSION, &fields).unwrap();
                out.truncate(n);
                replies.push((out, from));
                return replies;
            };
            let slot = bind.slot();
            let keys = SlotKeys::derive(&SlotSecret::from_bytes(secret));
            if state.spent.contains(bind.token()) {
                let fields = wire::RejectFields {
                    reason: RejectReason::Replayed,
                    slot,
                    bind_seq: bind.bind_seq(),
                };
                let mut out = vec![0u8; MAX_DATAGRAM];
                let n =
                    wire::encode_reject(&mut out, SESSION, &fields, |m| keys.relay.mac(m)).unwrap();
                out.truncate(n);
                replies.push((out, from));
                return replies;
            }
            let was_free = state.bound[slot_index(slot)].is_none();
            if !was_free {
                state.binds += 1;
            }
            let ack = bind_ack(state, slot, &keys, bind.bind_seq());
            replies.push((ack, from));
            state.bound[slot_index(slot)] = Some((from, keys, bind.bind_seq()));
            // The peer-present notice to the other slot.
            if was_free && let Some((to, keys, seq)) = &state.bound[slot_index(other(slot))] {
                let (to, keys, seq) = (*to, keys.clone(), *seq);
                replies.push((bind_ack(state, other(slot), &keys, seq), to));
            }
        }
        Ok(Packet::Rebind(rebind)) => {
            let slot = rebind.slot();
            if let Some((_, keys, _)) = state.bound[slot_index(slot)].take() {
                state.rebinds += 1;
                let ack = bind_ack(state, slot, &keys, rebind.bind_seq());
                state.bound[slot_index(slot)] = Some((from, keys, rebind.bind_seq()));
                replies.push((ack, from));
            } else {
                // What a relay says to a REBIND for a slot it does not hold.
                let fields = wire::RejectFields {
                    reason: RejectReason::UnknownSession,
                    slot,
                    bind_seq: rebind.bind_seq(),
                };
                let mut out = vec![0u8; MAX_DATAGRAM];
                let n = wire::encode_reject_unauthenticated(&mut out, SESSION, &fields).unwrap();
                out.truncate(n);
                replies.push((out, from));
            }
        }
        Ok(Packet::Keepalive(_))
            if state
                .bound
                .iter()
                .flatten()
                .any(|(addr, _, _)| *addr == from) =>
        {
            replies.push((datagram.to_vec(), from));
        }
        Ok(Packet::Data(_)) => {
            state.longest_data = state.longest_data.max(datagram.len());
            let [a, b] = &state.bound;
            if let (Some(a), Some(b)) = (a, b) {
                if from == a.0 {
                    replies.push((datagram.to_vec(), b.0));
                } else if from == b.0 {
                    replies.push((datagram.to_vec(), a.0));
                }
            }
        }
        Ok(Packet::Close(close)) => {
            let slot = close.slot();
            if state.bound[slot_index(slot)].take().is_some()
                && let Some((to, keys, seq)) = state.bound[slot_index(other(slot))].take()
            {
                let fields = wire::CloseFields {
                    slot: other(slot),
                    reason: CloseReason::PeerClosed,
                    seq,
                };
                let mut out = vec![0u8; MAX_DATAGRAM];
                let n =
                    wire::encode_close(&mut out, SESSION, &fields, |m| keys.relay.mac(m)).unwrap();
                out.truncate(n);
                replies.push((out, to));
            }
        }
        _ => {}
    }
    replies
}

/// A renewer that hands out the grants it was given, in order, and counts the calls; with none
/// left it fails like an unreachable gateway.
#[derive(Default)]
struct FakeRenewer {
    grants: StdMutex<VecDeque<Grant>>,
    calls: AtomicU64,
}

impl Renewer for FakeRenewer {
    fn renew(
        &self,
        _session_id: u64,
        _slot: Slot,
    ) -> Pin<Box<dyn Future<Output = Result<Grant, GatewayError>> + Send + '_>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let next = self.grants.lock().unwrap().pop_front();
        Box::pin(async move {
            next.ok_or_else(|| GatewayError::Unreachable {
                url: "fake".into(),
                detail: "no grant left".into(),
            })
        })
    }
}

fn key(seed: u8) -> PeerStaticKey {
    PeerStaticKey::from_bytes(&[seed; 32])
}

fn identity(key: &PeerStaticKey) -> LocalIdentity {
    LocalIdentity::from_secret_bytes(*key.secret_bytes())
}

/// Two sessions of the fake relay, connected; each with a renewer holding `fresh` grants.
async fn pair(
    relay: &FakeRelay,
    renewers: Option<(Arc<FakeRenewer>, Arc<FakeRenewer>)>,
) -> (Session, Session) {
    let (alice, bob) = (key(1), key(2));
    let mut a = SessionConfig::new(relay.grant(Slot::A, 1, &bob), identity(&alice));
    let mut b = SessionConfig::new(relay.grant(Slot::B, 2, &alice), identity(&bob));
    if let Some((ra, rb)) = renewers {
        a.renewer = Some(ra);
        b.renewer = Some(rb);
    }
    let (a, b) = tokio::join!(Session::connect(a), Session::connect(b));
    (a.unwrap(), b.unwrap())
}

/// Sends from `from` until `to` receives something, for up to `within` of (paused) time.
async fn gets_through(from: &Session, to: &Session, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        from.send(b"ping").await.unwrap();
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), to.recv()).await {
            assert_eq!(m, b"ping");
            return true;
        }
    }
    false
}

#[tokio::test(start_paused = true)]
async fn the_other_peers_close_ends_the_session_with_its_reason() {
    let relay = FakeRelay::start().await;
    let (a, b) = pair(&relay, None).await;
    assert!(gets_through(&a, &b, Duration::from_secs(5)).await);
    b.close().await;
    let end = loop {
        match a.recv().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&end, LinkError::Closed(r) if r == "the other peer closed the session"),
        "{end}"
    );
    assert!(matches!(b.send(b"x").await, Err(LinkError::Closed(_))));
}

/// What the application sent before it closed the session reaches the other peer before the
/// CLOSE does (a QUIC CONNECTION_CLOSE, say): the relay drops DATA of a session it no longer
/// holds.
#[tokio::test(start_paused = true)]
async fn messages_sent_before_close_reach_the_other_peer_before_the_close() {
    let relay = FakeRelay::start().await;
    for round in 0..10 {
        let (a, b) = pair(&relay, None).await;
        assert!(gets_through(&a, &b, Duration::from_secs(5)).await);
        for i in 0..8u8 {
            b.send(&[b'm', i]).await.unwrap();
        }
        b.close().await;
        let mut got = Vec::new();
        let end = loop {
            match a.recv().await {
                Ok(m) if m == b"ping" => continue,
                Ok(m) => got.push(m),
                Err(e) => break e,
            }
        };
        let want: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'm', i]).collect();
        assert_eq!(got, want, "round {round}: ended with {end}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_binding_is_renewed_two_thirds_into_the_tokens_life() {
    let relay = FakeRelay::start().await;
    // The ACKs say the binding expires in 30 s: renewal is due after 20 s.
    relay.state.lock().unwrap().expires_at = wall_secs() + 30;
    let (ra, rb) = (
        Arc::new(FakeRenewer::default()),
        Arc::new(FakeRenewer::default()),
    );
    let (alice, bob) = (key(1), key(2));
    ra.grants
        .lock()
        .unwrap()
        .push_back(relay.grant(Slot::A, 11, &bob));
    rb.grants
        .lock()
        .unwrap()
        .push_back(relay.grant(Slot::B, 12, &alice));
    let (a, b) = pair(&relay, Some((ra.clone(), rb.clone()))).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(ra.calls.load(Ordering::Relaxed), 0, "renewed too early");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(a.stats().renewals, 1, "{}", a.stats());
    assert_eq!(b.stats().renewals, 1, "{}", b.stats());
    assert_eq!(relay.state.lock().unwrap().binds, 2);
    assert!(gets_through(&a, &b, Duration::from_secs(5)).await);
    assert_eq!(a.stats().recoveries, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_request_is_retried_with_back_off() {
    let relay = FakeRelay::start().await;
    relay.state.lock().unwrap().expires_at = wall_secs() + 30;
    let ra = Arc::new(FakeRenewer::default());
    let rb = Arc::new(FakeRenewer::default());
    let (a, _b) = pair(&relay, Some((ra.clone(), rb))).await;
    // No grant to give: the requests fail from 20 s on, 1, 2, 4, 8 s apart.
    tokio::time::sleep(Duration::from_secs(20 + 1 + 2 + 4) + Duration::from_millis(500)).await;
    let calls = ra.calls.load(Ordering::Relaxed);
    assert_eq!(calls, 4, "{}", a.stats());
    assert_eq!(a.stats().gateway_failures, 4);
    assert!(a.end_reason().is_none(), "the old binding stands");
}

#[tokio::test(start_paused = true)]
async fn a_silent_relay_is_found_and_the_binding_recovered_with_the_noise_session_kept() {
    let relay = FakeRelay::start().await;
    let (ra, rb) = (
        Arc::new(FakeRenewer::default()),
        Arc::new(FakeRenewer::default()),
    );
    let (alice, bob) = (key(1), key(2));
    for seed in [21, 23] {
        ra.grants
            .lock()
            .unwrap()
            .push_back(relay.grant(Slot::A, seed, &bob));
        rb.grants
            .lock()
            .unwrap()
            .push_back(relay.grant(Slot::B, seed + 10, &alice));
    }
    let (a, b) = pair(&relay, Some((ra.clone(), rb.clone()))).await;
    assert!(gets_through(&a, &b, Duration::from_secs(5)).await);

    // The relay "restarts": it forgets both bindings and stays silent for a while.
    relay.dead.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(15)).await;
    relay.dead.store(false, Ordering::Relaxed);
    relay.state.lock().unwrap().bound = [None, None];

    assert!(gets_through(&a, &b, Duration::from_secs(30)).await);
    assert!(gets_through(&b, &a, Duration::from_secs(5)).await);
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.recoveries, sb.recoveries), (1, 1), "{sa}\n{sb}");
    assert_eq!(
        (sa.handshakes, sb.handshakes),
        (1, 1),
        "the Noise session was kept"
    );
    // A first request may have failed while the relay was dead: none were left to give then.
    assert!(ra.calls.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(start_paused = true)]
async fn without_a_renewer_a_relay_close_ends_the_session_and_says_why() {
    let relay = FakeRelay::start().await;
    let (a, b) = pair(&relay, None).await;
    relay.close(Slot::A, CloseReason::Expired).await;
    let end = loop {
        match a.recv().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    let LinkError::Closed(reason) = end else {
        panic!("{end}")
    };
    assert!(reason.contains("unbound the slot (expired)"), "{reason}");
    assert!(reason.contains("cannot get a fresh token"), "{reason}");
    // The other side is untouched by a reap of this slot.
    assert!(b.end_reason().is_none());
}

#[tokio::test(start_paused = true)]
async fn rebind_moves_to_a_fresh_socket_and_the_session_goes_on() {
    let relay = FakeRelay::start().await;
    let (a, b) = pair(&relay, None).await;
    let before = relay.state.lock().unwrap().bound[0].as_ref().unwrap().0;
    a.rebind().await.unwrap();
    assert!(gets_through(&a, &b, Duration::from_secs(5)).await);
    let after = relay.state.lock().unwrap().bound[0].as_ref().unwrap().0;
    assert_ne!(before, after, "slot A is bound from another port now");
    assert_eq!(relay.state.lock().unwrap().rebinds, 1);
    assert!(gets_through(&b, &a, Duration::from_secs(5)).await);
    // The BIND-ACK came before B's message on the same socket.
    assert_eq!(a.stats().rebinds, 1);
}

#[tokio::test(start_paused = true)]
async fn a_grant_without_a_peer_key_is_refused_unless_trust_on_first_use_is_asked_for() {
    let relay = FakeRelay::start().await;
    let mut grant = relay.grant(Slot::A, 31, &key(2));
    grant.expected_peer_public_key = None;
    let config = SessionConfig::new(grant.clone(), identity(&key(1)));
    assert!(matches!(
        Session::connect(config).await,
        Err(SessionError::NoPeerKey)
    ));
    // With trust on first use, the other peer's key is learned and recorded.
    let mut a = SessionConfig::new(grant, identity(&key(1)));
    a.expectation = Expectation::TrustOnFirstUse {
        name: "bob".into(),
        known: KnownPeers::new(),
    };
    let b = SessionConfig::new(relay.grant(Slot::B, 32, &key(1)), identity(&key(2)));
    let (a, b) = tokio::join!(Session::connect(a), Session::connect(b));
    let (a, _b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.known_peers().get("bob"), Some(key(2).public().as_bytes()));
}

/// A token binds once: run again with the same grant, a session is refused with advice, or
/// with a renewer renews the grant and binds.
#[tokio::test(start_paused = true)]
async fn a_used_token_is_renewed_and_bound_again_or_refused_with_advice_without_a_renewer() {
    let relay = FakeRelay::start().await;
    let (alice, bob) = (key(1), key(2));
    let used = relay.grant(Slot::A, 51, &bob);
    relay.state.lock().unwrap().spent.insert([51; TOKEN_LEN]);
    let err = Session::connect(SessionConfig::new(used.clone(), identity(&alice)))
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::TokenUsed), "{err}");
    assert!(err.to_string().contains("ferry-peer renew"), "{err}");

    let renewer = Arc::new(FakeRenewer::default());
    renewer
        .grants
        .lock()
        .unwrap()
        .push_back(relay.grant(Slot::A, 52, &bob));
    let mut a = SessionConfig::new(used, identity(&alice));
    a.renewer = Some(renewer.clone());
    let b = SessionConfig::new(relay.grant(Slot::B, 53, &alice), identity(&bob));
    let (a, b) = tokio::join!(Session::connect(a), Session::connect(b));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(renewer.calls.load(Ordering::Relaxed), 1);
    assert!(gets_through(&a, &b, Duration::from_secs(5)).await);
}

#[tokio::test(start_paused = true)]
async fn an_expired_grant_is_renewed_before_binding_or_refused_without_a_renewer() {
    let relay = FakeRelay::start().await;
    let (alice, bob) = (key(1), key(2));
    let mut stale = relay.grant(Slot::A, 41, &bob);
    stale.expires_at = wall_secs() - 10;
    let err = Session::connect(SessionConfig::new(stale.clone(), identity(&alice)))
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::GrantExpired { .. }), "{err}");
    assert!(err.to_string().contains("ferry-peer renew"), "{err}");

    let renewer = Arc::new(FakeRenewer::default());
    let mut fresh = relay.grant(Slot::A, 42, &bob);
    fresh.expected_peer_public_key = None;
    renewer.grants.lock().unwrap().push_back(fresh);
    let mut a = SessionConfig::new(stale, identity(&alice));
    a.renewer = Some(renewer.clone());
    let b = SessionConfig::new(relay.grant(Slot::B, 43, &alice), identity(&bob));
    let (a, b) = tokio::join!(Session::connect(a), Session::connect(b));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(renewer.calls.load(Ordering::Relaxed), 1);
    // The stale grant's pin was kept although the renewal named no key.
    assert_eq!(a.remote_identity(), bob.public());
    assert!(gets_through(&a, &b, Duration::from_secs(5)).await);
}

#[tokio::test(start_paused = true)]
async fn a_bind_refused_only_by_hints_times_out_with_the_relays_reason() {
    let relay = FakeRelay::start().await;
    let mut grant = relay.grant(Slot::A, 51, &key(2));
    // A token the relay does not take: it answers with unauthenticated REJECTs.
    grant.token = Zeroizing::new([52; TOKEN_LEN]);
    let mut config = SessionConfig::new(grant, identity(&key(1)));
    config.timeouts.connect = Duration::from_secs(10);
    let err = Session::connect(config).await.unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::RefusedUnauthenticated {
                reason: "token_expired",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_changed_path_is_healed_with_a_rebind_without_the_gateway() {
    let relay = FakeRelay::start().await;
    let (a, b) = pair(&relay, None).await;
    assert!(gets_through(&a, &b, Duration::from_secs(5)).await);
    // A's NAT maps it to another port: the relay holds A at an address A no longer has, so
    // it forwards nothing to A and echoes none of its KEEPALIVEs.
    if let Some((addr, _, _)) = relay.state.lock().unwrap().bound[0].as_mut() {
        addr.set_port(addr.port() ^ 0x4000);
    }
    assert!(gets_through(&a, &b, Duration::from_secs(30)).await);
    assert!(gets_through(&b, &a, Duration::from_secs(5)).await);
    let stats = a.stats();
    assert_eq!((stats.rebinds, stats.recoveries), (1, 0), "{stats}");
    assert!(a.end_reason().is_none(), "no gateway was needed");
}

#[tokio::test(start_paused = true)]
async fn messages_are_sized_for_the_relay_address_family() {
    // IPv6's header is 20 bytes longer: a full message through an IPv6 relay address is 20
    // bytes shorter, so that its DATA datagram fits a 1500-byte path as over IPv4.
    for (addr, family, longest) in [
        ("127.0.0.1:0", Family::Ipv4, 1427),
        ("[::1]:0", Family::Ipv6, 1407),
    ] {
        let relay = FakeRelay::start_on(addr).await;
        let (a, b) = pair(&relay, None).await;
        assert_eq!(a.family(), family);
        assert_eq!(a.max_payload(), longest, "{family}");
        assert_eq!(b.max_payload(), longest, "{family}");
        let too_long = a.send(&vec![7; longest + 1]).await;
        assert!(
            matches!(too_long, Err(LinkError::TooLong { len, max }) if len == longest + 1 && max == longest),
            "{family}: {too_long:?}"
        );
        a.send(&vec![7; longest]).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), b.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), longest, "{family}");
        assert_eq!(
            relay.state.lock().unwrap().longest_data,
            family.max_datagram(),
            "{family}: the full message's DATA datagram"
        );
        assert_eq!(a.stats().dropped_outgoing, 0, "{family}");
    }
}
