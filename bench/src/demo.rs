//! The in-memory demo: a gateway minting tokens, the relay's real session table, and two real
//! peers, wired together by an in-memory network instead of UDP sockets.
//!
//! Every step is checked; the demo fails loudly when Ferry does not behave as
//! docs/protocol.md says, so it doubles as an end-to-end test (`tests/demo.rs`).

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use ferry_core::keys::{GatewaySigningKey, PeerStaticKey, RelayPublicKey, RelayStaticKey};
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::proof::CookieJar;
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter, TokenVerifier, VerifierConfig};
use ferry_core::wire::{self, CloseReason, MAX_DATAGRAM, Slot};
use ferry_peer::bind::{BindClient, BindEvent, BindState};
use ferry_peer::channel::{Channel, PLAINTEXT_OFFSET};
use ferry_relay::limits::IpLimits;
use ferry_relay::session::{Outcome, SessionLimits};
use ferry_relay::shards::Sessions;
use ring::rand::{SecureRandom, SystemRandom};

/// Knobs of one demo run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// DATA messages each way after the handshake.
    pub messages: usize,
    /// Plaintext bytes per message.
    pub payload: usize,
    /// Print each step.
    pub verbose: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            messages: 20_000,
            payload: 1200,
            verbose: true,
        }
    }
}

/// What a demo run measured.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// Messages delivered and authenticated end to end, both directions.
    pub delivered: usize,
    /// Wall time of the data phase.
    pub elapsed: Duration,
    /// The relay's counters at the end.
    pub relay: ferry_relay::session::Counters,
}

// Addresses from 198.18.0.0/15, the range reserved for benchmarking; nothing is sent on a
// real network.
const RELAY_ID: u64 = 0x0f3e_77a1;
const GATEWAY_KID: u32 = 1;

fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)), port)
}

/// The relay and the datagrams in flight to and from it.
struct Network {
    relay: Sessions,
    relay_addr: SocketAddr,
    /// Datagrams the relay sent: (destination, bytes).
    to_peers: VecDeque<(SocketAddr, Vec<u8>)>,
    reply: Vec<u8>,
}

impl Network {
    /// Delivers one datagram to the relay and queues whatever it sends back.
    fn send_to_relay(&mut self, from: SocketAddr, datagram: &[u8]) -> Outcome {
        let now = Instant::now();
        let wall = UnixTime::from(SystemTime::now());
        let outcome = self
            .relay
            .handle(now, wall, from, None, datagram, &mut self.reply);
        match outcome {
            Outcome::Forward { to, .. } => self.to_peers.push_back((to, datagram.to_vec())),
            Outcome::Reply { to, len, .. } => {
                self.to_peers.push_back((to, self.reply[..len].to_vec()))
            }
            Outcome::ReplyAndNotify {
                to,
                len,
                notify,
                notice_len,
                ..
            } => {
                self.to_peers.push_back((to, self.reply[..len].to_vec()));
                if let Some(notice) = self.reply.get(len..len + notice_len) {
                    self.to_peers.push_back((notify, notice.to_vec()));
                }
            }
            Outcome::Consumed | Outcome::Drop(_) => {}
        }
        outcome
    }

    /// The next datagram the relay sent to `to`, if any.
    fn take_for(&mut self, to: SocketAddr) -> Option<Vec<u8>> {
        let at = self.to_peers.iter().position(|(dst, _)| *dst == to)?;
        self.to_peers.remove(at).map(|(_, bytes)| bytes)
    }
}

/// One endpoint: its address, its binding and its channel.
struct Peer {
    name: &'static str,
    addr: SocketAddr,
    bind: BindClient,
    channel: Channel,
    known: KnownPeers,
    out: Vec<u8>,
}

impl Peer {
    /// Runs the bind exchange (BIND, CHALLENGE, BIND with cookie, BIND-ACK) to completion.
    fn bind(&mut self, net: &mut Network, log: &mut Log) -> anyhow::Result<bool> {
        let now = Instant::now();
        let n = if self.bind.state() == BindState::Bound {
            self.bind.rebind(now, &mut self.out)?
        } else {
            self.bind.start(now, &mut self.out)?
        };
        let mut request = self.out[..n].to_vec();
        for _ in 0..4 {
            log.line(format_args!(
                "{} -> relay  {} bytes",
                self.name,
                request.len()
            ));
            net.send_to_relay(self.addr, &request);
            let answer = net
                .take_for(self.addr)
                .with_context(|| format!("{}: the relay did not answer", self.name))?;
            match self.bind.handle(Instant::now(), &answer, &mut self.out) {
                BindEvent::Transmit(n) => {
                    log.line(format_args!(
                        "relay -> {}  CHALLENGE, {} bytes",
                        self.name,
                        answer.len()
                    ));
                    request = self.out[..n].to_vec();
                }
                BindEvent::Bound { peer_present } => {
                    log.line(format_args!(
                        "relay -> {}  BIND-ACK, {} bytes (other peer bound: {peer_present})",
                        self.name,
                        answer.len()
                    ));
                    return Ok(peer_present);
                }
                other => bail!("{}: unexpected answer to BIND: {other:?}", self.name),
            }
        }
        bail!("{}: bind did not complete", self.name)
    }
}

struct Log {
    verbose: bool,
}

impl Log {
    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        if self.verbose {
            println!("  {args}");
        }
    }
}

fn mint(
    minter: &TokenMinter,
    rng: &dyn SecureRandom,
    relay: &RelayPublicKey,
    session_id: u64,
    slot: Slot,
) -> anyhow::Result<MintedToken> {
    let now = UnixTime::from(SystemTime::now());
    let input = ClaimsInput {
        slot,
        relay_id: RELAY_ID,
        session_id,
        not_before: now.saturating_sub(5),
        expires: now.saturating_add(600),
        rate_bytes_per_sec: 0,
    };
    Ok(minter.mint(rng, &input, relay)?)
}

fn random_u64(rng: &dyn SecureRandom) -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    rng.fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    Ok(u64::from_be_bytes(b).max(1))
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

/// Runs the whole demo. Returns what it measured, or the first thing that went wrong.
pub fn run(opts: &DemoOptions) -> anyhow::Result<DemoReport> {
    let mut log = Log {
        verbose: opts.verbose,
    };
    let rng = SystemRandom::new();

    println!("1. keys: a gateway signing key, a relay static key, two peer identities");
    let gateway = TokenMinter::new(GATEWAY_KID, GatewaySigningKey::generate(&rng)?);
    let relay_key = RelayStaticKey::generate(&rng)?;
    let relay_public = relay_key.public();
    let alice_key = PeerStaticKey::generate(&rng)?;
    let bob_key = PeerStaticKey::generate(&rng)?;

    println!("2. gateway: mint one token per slot of a new session");
    let session_id = random_u64(&rng)?;
    let token_a = mint(&gateway, &rng, &relay_public, session_id, Slot::A)?;
    let token_b = mint(&gateway, &rng, &relay_public, session_id, Slot::B)?;
    log.line(format_args!(
        "session {session_id:#018x}: tokens of {} bytes, slot secrets sealed to the relay",
        token_a.bytes.len()
    ));

    let mut verifier = TokenVerifier::new(VerifierConfig::new(RELAY_ID), relay_key)?;
    verifier.add_trusted_key(GATEWAY_KID, gateway.public());
    let mut net = Network {
        // The relay's default per-slot budget (1.25 MB/s) would throttle a burst of 48 MB
        // sent as fast as one core can; the demo shows the protocol, so it lifts the budget.
        relay: Sessions::new(
            SessionLimits {
                default_session_rate: 100_000_000_000,
                max_session_rate: 100_000_000_000,
                ..SessionLimits::default()
            },
            IpLimits::default(),
            verifier,
            CookieJar::generate(&rng)?,
        ),
        relay_addr: addr(254, 7000),
        to_peers: VecDeque::new(),
        reply: vec![0; MAX_DATAGRAM],
    };

    let limits = TransportLimits::default();
    let alice_id = LocalIdentity::from_secret_bytes(*alice_key.secret_bytes());
    let bob_id = LocalIdentity::from_secret_bytes(*bob_key.secret_bytes());
    let mut alice = Peer {
        name: "alice",
        addr: addr(1, 40001),
        bind: BindClient::new(
            session_id,
            Slot::A,
            token_a.bytes,
            &token_a.slot_secret,
            micros_now(),
        ),
        channel: Channel::initiator(
            &alice_id,
            PeerExpectation::Pinned(*bob_key.public().as_bytes()),
            session_id,
            limits,
        )?,
        known: KnownPeers::new(),
        out: vec![0; MAX_DATAGRAM],
    };
    let mut bob = Peer {
        name: "bob",
        addr: addr(2, 40002),
        bind: BindClient::new(
            session_id,
            Slot::B,
            token_b.bytes,
            &token_b.slot_secret,
            micros_now(),
        ),
        channel: Channel::responder(
            &bob_id,
            PeerExpectation::Pinned(*alice_key.public().as_bytes()),
            session_id,
            limits,
        )?,
        known: KnownPeers::new(),
        out: vec![0; MAX_DATAGRAM],
    };

    println!(
        "3. both peers bind their slot at the relay {}",
        net.relay_addr
    );
    alice.bind(&mut net, &mut log)?;
    ensure!(bob.bind(&mut net, &mut log)?, "bob should see alice bound");
    let notice = net
        .take_for(alice.addr)
        .context("alice got no peer-present notice")?;
    log.line(format_args!(
        "relay -> alice  BIND-ACK notice, {} bytes (other peer bound: true)",
        notice.len()
    ));
    ensure!(
        alice.bind.handle(Instant::now(), &notice, &mut alice.out) == BindEvent::PeerPresent,
        "alice should accept the relay's peer-present notice"
    );

    println!("4. Noise XX handshake end to end, through the relay (which forwards it blind)");
    handshake(&mut alice, &mut bob, &mut net, &mut log)?;

    println!(
        "5. {} messages of {} bytes each way, sealed, relayed and opened",
        opts.messages, opts.payload
    );
    let started = Instant::now();
    let mut delivered = 0;
    for i in 0..opts.messages {
        delivered += exchange(&mut alice, &mut bob, &mut net, opts.payload, i)?;
        delivered += exchange(&mut bob, &mut alice, &mut net, opts.payload, i)?;
    }
    let elapsed = started.elapsed();
    let per_sec = delivered as f64 / elapsed.as_secs_f64();
    println!(
        "   {delivered} messages in {:.3} s: {:.0} messages/s, {:.1} MB/s of plaintext (one core, everything in one process)",
        elapsed.as_secs_f64(),
        per_sec,
        per_sec * opts.payload as f64 / 1e6
    );

    println!("6. an attacker sniffed alice's BIND: replays it, tries the token, sends garbage");
    attacks(&alice, &mut net, &token_a, &mut log)?;

    println!("7. alice's NAT changes her address: REBIND with proof, data flows again");
    alice.addr = addr(3, 50003);
    alice.bind(&mut net, &mut log)?;
    delivered += exchange(&mut alice, &mut bob, &mut net, opts.payload, 0)?;
    delivered += exchange(&mut bob, &mut alice, &mut net, opts.payload, 0)?;

    println!("8. alice closes the session; the relay tells bob");
    let n = alice.bind.close(&mut alice.out)?;
    net.send_to_relay(alice.addr, &alice.out[..n]);
    let close = net.take_for(bob.addr).context("bob got no CLOSE")?;
    ensure!(
        bob.bind.handle(Instant::now(), &close, &mut bob.out)
            == BindEvent::Closed {
                reason: CloseReason::PeerClosed
            },
        "bob should accept the relay's CLOSE"
    );
    ensure!(
        net.relay.occupancy() == (0, 0),
        "the relay should forget the session"
    );

    let relay = net.relay.counters();
    let rejected: Vec<String> = (0..=u8::MAX)
        .filter_map(|code| {
            let reason = wire::RejectReason::from_u8(code)?;
            let n = *relay.binds_rejected.get(usize::from(code))?;
            (n > 0).then(|| format!("{}={n}", reason.name()))
        })
        .collect();
    println!(
        "relay counters: forwarded {} ({} bytes), binds accepted {}, rebinds {}, challenges {}, \
         rejected [{}], malformed {}, unbound data {}, closed {}",
        relay.forwarded,
        relay.forwarded_bytes,
        relay.binds_accepted,
        relay.rebinds_accepted,
        relay.challenges,
        rejected.join(" "),
        relay.malformed,
        relay.data_unbound,
        relay.closed
    );
    Ok(DemoReport {
        delivered,
        elapsed,
        relay,
    })
}

fn handshake(
    alice: &mut Peer,
    bob: &mut Peer,
    net: &mut Network,
    log: &mut Log,
) -> anyhow::Result<()> {
    let n = alice.channel.start(Instant::now(), &mut alice.out)?;
    let mut in_flight = VecDeque::from([(alice.addr, alice.out[..n].to_vec())]);
    // Message 1, 2, 3 and the responder's confirmation (an empty TRANSPORT frame); nothing is
    // lost in this network, so the channels' retransmission timers never fire.
    while let Some((from, datagram)) = in_flight.pop_front() {
        ensure!(
            matches!(net.send_to_relay(from, &datagram), Outcome::Forward { .. }),
            "the relay should forward handshake DATA"
        );
        let receiver = if from == alice.addr {
            &mut *bob
        } else {
            &mut *alice
        };
        let mut received = net
            .take_for(receiver.addr)
            .context("handshake message not forwarded")?;
        log.line(format_args!(
            "-> {}  {}, {} bytes",
            receiver.name,
            match received.get(wire::HEADER_LEN) {
                Some(4) => "key confirmation",
                _ => "handshake",
            },
            received.len()
        ));
        let now = Instant::now();
        let output =
            receiver
                .channel
                .handle(now, &mut received, &mut receiver.known, &mut receiver.out)?;
        if let Some(n) = output.transmit {
            in_flight.push_back((receiver.addr, receiver.out[..n].to_vec()));
        }
    }
    ensure!(
        alice.channel.is_confirmed() && bob.channel.is_confirmed(),
        "both ends should be established"
    );
    log.line(format_args!(
        "established: each side checked the other's pinned static key"
    ));
    Ok(())
}

/// Sends one message from `from` to `to` through the relay; returns 1 when it arrived intact.
fn exchange(
    from: &mut Peer,
    to: &mut Peer,
    net: &mut Network,
    payload: usize,
    i: usize,
) -> anyhow::Result<usize> {
    let fill = (i % 251) as u8;
    let buf = &mut from.out;
    buf[PLAINTEXT_OFFSET..PLAINTEXT_OFFSET + payload].fill(fill);
    let n = from.channel.send_in_place(Instant::now(), buf, payload)?;
    from.bind.note_data_sent(Instant::now());
    let outcome = net.send_to_relay(from.addr, &buf[..n]);
    ensure!(
        outcome
            == Outcome::Forward {
                to: to.addr,
                src: None
            },
        "{} -> {}: relay did not forward: {outcome:?}",
        from.name,
        to.name
    );
    let mut datagram = net
        .take_for(to.addr)
        .context("forwarded DATA went missing")?;
    let output = to
        .channel
        .handle(Instant::now(), &mut datagram, &mut to.known, &mut to.out)?;
    let range = output.plaintext.context("DATA carried no plaintext")?;
    let plaintext = &datagram[range];
    ensure!(
        plaintext.len() == payload && plaintext.iter().all(|&b| b == fill),
        "plaintext corrupted"
    );
    Ok(1)
}

fn attacks(
    alice: &Peer,
    net: &mut Network,
    token: &MintedToken,
    log: &mut Log,
) -> anyhow::Result<()> {
    let mallory = addr(66, 6666);
    let before = net.relay.counters();

    // Mallory rebuilds a BIND around alice's token, with a cookie she got for her own address,
    // but she cannot compute the proof without the slot secret.
    let mut probe = vec![0u8; MAX_DATAGRAM];
    let fields = wire::BindFields {
        slot: Slot::A,
        bind_seq: u64::MAX,
        cookie: [0; 16],
        token: &token.bytes,
    };
    let n = wire::encode_bind(&mut probe, alice.bind.session_id(), &fields, |_| [0; 16])?;
    net.send_to_relay(mallory, &probe[..n]);
    let challenge = net.take_for(mallory).context("no CHALLENGE for mallory")?;
    let Ok(wire::Packet::Challenge(c)) = wire::parse(&challenge) else {
        bail!("mallory expected a CHALLENGE");
    };
    let fields = wire::BindFields {
        cookie: *c.cookie(),
        ..fields
    };
    let n = wire::encode_bind(&mut probe, alice.bind.session_id(), &fields, |_| [0x5a; 16])?;
    net.send_to_relay(mallory, &probe[..n]);
    let reject = net.take_for(mallory).context("no REJECT for mallory")?;
    let Ok(wire::Packet::Reject(r)) = wire::parse(&reject) else {
        bail!("mallory expected a REJECT");
    };
    log.line(format_args!(
        "stolen token without the slot secret: REJECT {:?} ({} bytes for a {}-byte BIND)",
        r.reason(),
        reject.len(),
        n
    ));
    ensure!(
        r.reason() == wire::RejectReason::BadProof,
        "expected BAD_PROOF"
    );

    // DATA from mallory's address, and bytes that are not Ferry at all.
    let n = wire::encode_data(&mut probe, alice.bind.session_id(), b"let me in")?;
    let dropped = net.send_to_relay(mallory, &probe[..n]);
    log.line(format_args!("DATA from an unbound address: {dropped:?}"));
    let dropped = net.send_to_relay(mallory, b"GET / HTTP/1.1\r\n\r\n");
    log.line(format_args!("garbage: {dropped:?}"));

    let after = net.relay.counters();
    ensure!(
        after.forwarded == before.forwarded,
        "nothing from mallory may be forwarded"
    );
    ensure!(
        after.data_unbound == before.data_unbound + 1,
        "unbound DATA must be counted"
    );
    ensure!(
        after.malformed == before.malformed + 1,
        "garbage must be counted"
    );
    ensure!(
        net.to_peers.is_empty(),
        "the relay must not answer DATA or garbage"
    );
    Ok(())
}
