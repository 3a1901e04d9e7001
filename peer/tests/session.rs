//! `ferry_peer::session::Session` against a real `ferry-gateway` and `ferry-relay` on loopback:
//! connecting and talking, a wrong identity, close, renewal across several token lifetimes, and
//! a relay restart.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_core::keys::{PeerStaticKey, RelayStaticKey};
use ferry_core::noise::LocalIdentity;
use ferry_peer::gateway::{ApiKey, GatewayClient, Grant};
use ferry_peer::link::{DatagramLink, LinkError};
use ferry_peer::session::{Expectation, Session, SessionConfig, SessionError, Timeouts};
use ferry_testkit::gateway::{GatewayProcess, workspace_binary};
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use tokio::time::{Instant, timeout};

fn binary(package: &str) -> &'static Path {
    static BINS: OnceLock<std::sync::Mutex<Vec<(String, &'static Path)>>> = OnceLock::new();
    let bins = BINS.get_or_init(Default::default);
    let mut bins = bins.lock().unwrap();
    if let Some((_, path)) = bins.iter().find(|(p, _)| p == package) {
        return path;
    }
    let path: &'static Path = Box::leak(
        workspace_binary(package, package)
            .unwrap()
            .into_boxed_path(),
    );
    bins.push((package.to_string(), path));
    path
}

/// A gateway and a relay that trusts it, on loopback; `gateway_extra` and `relay_limits` are
/// config text for the gateway and the relay's `[limits]` section.
struct Setup {
    _gateway: GatewayProcess,
    relay: Option<RelayProcess>,
    relay_key: RelayStaticKey,
    relay_config: RelayConfig,
    client: Arc<GatewayClient>,
}

impl Setup {
    fn start(gateway_extra: &str, relay_limits: &str) -> Self {
        let relay_key = RelayStaticKey::generate(&ring::rand::SystemRandom::new()).unwrap();
        let mut relay_config = RelayConfig::loopback(Vec::new()).unwrap();
        relay_config.sections = format!("[xdp]\nmode = \"off\"\n\n[limits]\n{relay_limits}\n");
        let gateway = GatewayProcess::start(
            binary("ferry-gateway"),
            &[("app", &["create:*", "join:*"])],
            relay_config.listen[0],
            &relay_key,
            gateway_extra,
        )
        .unwrap();
        relay_config.gateway_keys = vec![gateway.gateway_key().unwrap()];
        let relay = RelayProcess::start(binary("ferry-relay"), &relay_key, &relay_config).unwrap();
        let key = ApiKey::new(gateway.api_key("app").unwrap());
        let client =
            Arc::new(GatewayClient::new(&gateway.url(), &gateway.ca_file(), &key).unwrap());
        Self {
            _gateway: gateway,
            relay: Some(relay),
            relay_key,
            relay_config,
            client,
        }
    }

    /// Stops the relay and starts a fresh one on the same address and key (it remembers
    /// nothing).
    fn restart_relay(&mut self) {
        drop(self.relay.take());
        self.relay = Some(
            RelayProcess::start(binary("ferry-relay"), &self.relay_key, &self.relay_config)
                .unwrap(),
        );
    }

    /// Grants for two peers of a fresh session, each pinning the other.
    async fn grants(&self, alice: &PeerStaticKey, bob: &PeerStaticKey) -> (Grant, Grant) {
        let a = self
            .client
            .create("default", &alice.public(), Some(&bob.public()))
            .await
            .unwrap();
        let b = self
            .client
            .join(a.join_code.as_deref().unwrap(), &bob.public())
            .await
            .unwrap();
        (a, b)
    }

    /// A config for `grant` and `key` that renews and recovers through the gateway.
    fn config(&self, grant: Grant, key: &PeerStaticKey) -> SessionConfig {
        SessionConfig::new(grant, identity(key)).with_renewer(self.client.clone())
    }
}

fn identity(key: &PeerStaticKey) -> LocalIdentity {
    LocalIdentity::from_secret_bytes(*key.secret_bytes())
}

fn new_key() -> PeerStaticKey {
    PeerStaticKey::generate(&ring::rand::SystemRandom::new()).unwrap()
}

/// Connects both sessions at once.
async fn connect_pair(a: SessionConfig, b: SessionConfig) -> (Session, Session) {
    let (a, b) = tokio::join!(Session::connect(a), Session::connect(b));
    (a.unwrap(), b.unwrap())
}

/// Sends `count` numbered messages tagged `tag` from `from` and waits (up to `within`) until
/// `to` received at least `want` of them intact; returns how many arrived.
async fn flow(
    from: &Session,
    to: &Session,
    tag: &str,
    count: u32,
    want: u32,
    within: Duration,
) -> u32 {
    let receive = async {
        let mut got = 0;
        let deadline = Instant::now() + within;
        while got < want {
            let Ok(message) = tokio::time::timeout_at(deadline, to.recv()).await else {
                break;
            };
            let message = message.unwrap();
            let text = String::from_utf8(message).unwrap();
            if text.starts_with(tag) {
                got += 1;
            }
        }
        got
    };
    let send = async {
        for i in 0..count {
            from.send(format!("{tag} {i:06}").as_bytes()).await.unwrap();
            if i % 32 == 31 {
                tokio::task::yield_now().await;
            }
        }
    };
    let ((), got) = tokio::join!(send, receive);
    got
}

/// Receives until the session ends; returns the error.
async fn until_end(session: &Session) -> LinkError {
    loop {
        if let Err(e) = session.recv().await {
            return e;
        }
    }
}

#[tokio::test]
async fn two_peers_connect_talk_both_ways_and_a_close_reaches_the_other() {
    let setup = Setup::start("", "");
    let (alice, bob) = (new_key(), new_key());
    let (ga, gb) = setup.grants(&alice, &bob).await;
    let (a, b) = connect_pair(setup.config(ga, &alice), setup.config(gb, &bob)).await;
    assert_eq!(a.remote_identity(), bob.public());
    assert_eq!(b.remote_identity(), alice.public());
    assert_eq!(a.max_payload(), ferry_core::noise::MAX_PLAINTEXT);

    let within = Duration::from_secs(10);
    assert!(flow(&a, &b, "a->b", 200, 180, within).await >= 180);
    assert!(flow(&b, &a, "b->a", 200, 180, within).await >= 180);
    let full = vec![0x5a; a.max_payload()];
    a.send(&full).await.unwrap();
    // Skip what is left of the numbered messages.
    let got = timeout(within, async {
        loop {
            let message = b.recv().await.unwrap();
            if message.len() == full.len() {
                return message;
            }
        }
    })
    .await
    .unwrap();
    assert!(got == full, "the largest message arrived changed");
    let too_long = vec![0; a.max_payload() + 1];
    assert!(matches!(
        a.send(&too_long).await,
        Err(LinkError::TooLong { .. })
    ));

    let stats = a.stats();
    assert!(stats.messages_sent >= 201, "{stats}");
    assert!(stats.messages_received >= 180, "{stats}");
    assert!(stats.bytes_sent > stats.messages_sent * 10, "{stats}");
    assert_eq!(stats.handshakes, 1, "{stats}");
    assert_eq!(b.stats().handshakes, 1);

    a.close().await;
    // What arrived before the close is still delivered; then the end and its reason.
    let a_end = timeout(within, until_end(&a)).await.unwrap();
    assert!(
        matches!(&a_end, LinkError::Closed(r) if r.contains("closed by this peer")),
        "{a_end}"
    );
    let end = timeout(within, until_end(&b)).await.unwrap();
    let LinkError::Closed(reason) = end else {
        panic!("{end}");
    };
    assert!(reason.contains("other peer closed"), "{reason}");
    assert!(matches!(b.send(b"late").await, Err(LinkError::Closed(_))));
    assert_eq!(b.end_reason().as_deref(), Some(reason.as_str()));
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_is_refused_at_connect() {
    let setup = Setup::start("", "");
    let (alice, bob, mallory) = (new_key(), new_key(), new_key());
    // The creator names no joiner, so Mallory may join; Alice pins Bob herself.
    let ga = setup
        .client
        .create("default", &alice.public(), None)
        .await
        .unwrap();
    let gm = setup
        .client
        .join(ga.join_code.as_deref().unwrap(), &mallory.public())
        .await
        .unwrap();

    // Without a key to pin, the default expectation is refused before anything is sent.
    let err = Session::connect(SessionConfig::new(ga.clone(), identity(&alice)))
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::NoPeerKey), "{err}");

    let mut a = setup.config(ga, &alice);
    a.expectation = Expectation::Pinned(bob.public());
    let mut m = setup.config(gm, &mallory);
    m.timeouts = Timeouts {
        connect: Duration::from_secs(4),
        ..Timeouts::default()
    };
    let started = Instant::now();
    let (a, m) = tokio::join!(Session::connect(a), Session::connect(m));
    let err = a.unwrap_err();
    assert!(matches!(err, SessionError::WrongIdentity), "{err}");
    assert!(err.to_string().contains("wrong identity"));
    // Refused as soon as Mallory's key was seen, not at the 60 s timeout.
    assert!(started.elapsed() < Duration::from_secs(30));
    // Mallory never gets a HANDSHAKE-3: her connect times out.
    let err = m.unwrap_err();
    assert!(matches!(err, SessionError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn a_session_outlives_several_token_lifetimes() {
    // Tokens live 30 s (the gateway's minimum); the relay unbinds at exp with no skew. Without
    // renewal the session would end at 30 s.
    let setup = Setup::start(
        "[sessions]\ntoken_lifetime_secs = 30\n",
        "max_clock_skew_secs = 0",
    );
    let (alice, bob) = (new_key(), new_key());
    let (ga, gb) = setup.grants(&alice, &bob).await;
    let expires = ga.expires_at;
    let (a, b) = connect_pair(setup.config(ga, &alice), setup.config(gb, &bob)).await;
    let run_for = Duration::from_secs(70);
    let end = Instant::now() + run_for;
    let mut round = 0u32;
    let mut delivered = 0u32;
    while Instant::now() < end {
        let tag = format!("r{round}");
        delivered += flow(&a, &b, &tag, 10, 10, Duration::from_secs(2)).await;
        delivered += flow(&b, &a, &tag, 10, 10, Duration::from_secs(2)).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now > expires + 30, "the run outlived the first token");
    // The last rounds came through, long after the first token expired.
    let tag = "last";
    assert_eq!(flow(&a, &b, tag, 10, 10, Duration::from_secs(5)).await, 10);
    assert_eq!(flow(&b, &a, tag, 10, 10, Duration::from_secs(5)).await, 10);
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sa.renewals >= 2 && sb.renewals >= 2, "{sa}\n{sb}");
    assert_eq!(sa.recoveries + sb.recoveries, 0, "{sa}\n{sb}");
    // Nearly everything arrived (loopback; a few may be lost).
    let sent = round * 20;
    assert!(delivered * 10 >= sent * 9, "{delivered} of {sent}");
    assert!(a.end_reason().is_none() && b.end_reason().is_none());
}

#[tokio::test]
async fn a_relay_restart_mid_session_is_survived() {
    // An idle timeout of 6 s makes KEEPALIVEs go every 2 s, so a silent relay is found within
    // about 10 s.
    let mut setup = Setup::start("", "idle_timeout_secs = 6");
    let (alice, bob) = (new_key(), new_key());
    let (ga, gb) = setup.grants(&alice, &bob).await;
    let (a, b) = connect_pair(setup.config(ga, &alice), setup.config(gb, &bob)).await;
    let within = Duration::from_secs(10);
    assert!(flow(&a, &b, "before", 50, 45, within).await >= 45);

    setup.restart_relay();

    // Both peers find the relay silent, get fresh tokens and bind again; then messages flow.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (sa, sb) = (a.stats(), b.stats());
        if sa.recoveries >= 1 && sb.recoveries >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not recovered:\n{sa}\n{sb}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got < 20 && Instant::now() < deadline {
        got += flow(&a, &b, "after", 10, 10, Duration::from_secs(1)).await;
    }
    assert!(got >= 20, "only {got} messages after the restart");
    assert!(flow(&b, &a, "back", 50, 45, within).await >= 45);
    // Same Noise session: no new handshake was needed.
    assert_eq!(a.stats().handshakes, 1);
    assert!(a.end_reason().is_none());
}

/// Sends 1400-byte messages from `from` to `to` as fast as `from` takes them for `period`;
/// returns (messages sent, messages received, seconds).
async fn blast<L: DatagramLink>(from: Arc<L>, to: Arc<L>, period: Duration) -> (u64, u64, f64) {
    let message = vec![0xa7u8; 1400];
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        while started.elapsed() < period {
            for _ in 0..64 {
                from.send(&message).await.unwrap();
                sent += 1;
            }
        }
        sent
    });
    let mut received = 0u64;
    // Count until the sender is done and nothing more arrives for a moment.
    let mut last = Instant::now();
    loop {
        match timeout(Duration::from_millis(300), to.recv()).await {
            Ok(Ok(m)) => {
                assert_eq!(m.len(), 1400);
                received += 1;
                last = Instant::now();
            }
            Ok(Err(e)) => panic!("{e}"),
            Err(_) if started.elapsed() > period => break,
            Err(_) => {}
        }
    }
    let sent = sender.await.unwrap();
    let seconds = last.duration_since(started).as_secs_f64();
    (sent, received, seconds)
}

fn report(what: &str, (sent, received, seconds): (u64, u64, f64)) -> f64 {
    let rate = received as f64 / seconds;
    println!(
        "{what}: {sent} sent, {received} received in {seconds:.2} s: {rate:.0} msgs/s, {:.1} MB/s of payload",
        rate * 1400.0 / 1e6
    );
    rate
}

/// Prints the message throughput of a session through a real relay on loopback against plain
/// UDP between two sockets (`link::UdpLink`), for 1400-byte messages sent as fast as the sender
/// can. A measurement, not a check: run it in release,
/// `cargo test --release -p ferry-peer --test session -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run in release with --nocapture"]
async fn throughput_of_1400_byte_messages_through_a_relay() {
    let period = Duration::from_secs(5);
    let setup = Setup::start(
        "",
        "default_session_rate = 1000000000\nmax_session_rate = 1000000000",
    );
    let (alice, bob) = (new_key(), new_key());
    let (ga, gb) = setup.grants(&alice, &bob).await;
    let (a, b) = connect_pair(setup.config(ga, &alice), setup.config(gb, &bob)).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let relayed = report(
        "session through the relay",
        blast(a.clone(), b.clone(), period).await,
    );
    println!("sender: {}\nreceiver: {}", a.stats(), b.stats());

    let sa = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sb = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let ua = Arc::new(ferry_peer::link::UdpLink::connect(sa, ab).await.unwrap());
    let ub = Arc::new(ferry_peer::link::UdpLink::connect(sb, aa).await.unwrap());
    let direct = report("plain UDP, no relay", blast(ua, ub, period).await);
    println!("ratio relayed/direct: {:.2}", relayed / direct);
    assert!(relayed > 0.0);
}

#[tokio::test]
async fn the_session_echo_example_runs_against_a_real_relay() {
    let example = ferry_testkit::gateway::workspace_example("ferry-peer", "session_echo").unwrap();
    let setup = Setup::start("", "");
    let (alice, bob) = (new_key(), new_key());
    let (ga, gb) = setup.grants(&alice, &bob).await;
    let dir = ferry_testkit::temp_dir("session-echo").unwrap();
    let file = |name: &str| dir.path().join(name);
    ferry_testkit::write_private(&file("a.grant"), &ga.to_json()).unwrap();
    ferry_testkit::write_private(&file("b.grant"), &gb.to_json()).unwrap();
    ferry_keyfile::write_secret_file(&file("alice.key"), &alice, false).unwrap();
    ferry_keyfile::write_secret_file(&file("bob.key"), &bob, false).unwrap();
    let s = |name: &str| file(name).to_str().unwrap().to_string();
    // The example is another process: waiting for it blocks nothing of this test's.
    let out = std::process::Command::new(example)
        .args([
            s("a.grant"),
            s("alice.key"),
            s("b.grant"),
            s("bob.key"),
            "20".into(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("connected: session"), "{stdout}");
    let echoed: u32 = stdout
        .split("echoed ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(echoed >= 15, "{stdout}");
    assert!(
        stdout.contains("B ended: the other peer closed the session"),
        "{stdout}"
    );
}

#[tokio::test]
async fn rebind_moves_the_session_to_a_fresh_socket_on_a_real_relay() {
    let setup = Setup::start("", "");
    let (alice, bob) = (new_key(), new_key());
    let (ga, gb) = setup.grants(&alice, &bob).await;
    let (a, b) = connect_pair(setup.config(ga, &alice), setup.config(gb, &bob)).await;
    let within = Duration::from_secs(10);
    assert!(flow(&a, &b, "before", 20, 18, within).await >= 18);
    a.rebind().await.unwrap();
    // The relay CHALLENGEs the new address, then moves the binding.
    let deadline = Instant::now() + within;
    while a.stats().rebinds == 0 {
        assert!(Instant::now() < deadline, "{}", a.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(flow(&a, &b, "after", 20, 18, within).await >= 18);
    assert!(flow(&b, &a, "back", 20, 18, within).await >= 18);
    assert_eq!(a.stats().recoveries, 0);
}

/// Sets the MTU of `interface` in namespace `ns`.
fn set_mtu(ns: &str, interface: &str, mtu: u32) {
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            ns,
            "link",
            "set",
            "dev",
            interface,
            "mtu",
            &mtu.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A relay listening only on an IPv6 address in one network namespace, the peers in another,
/// joined by a veth pair with the usual MTU of 1500 (loopback's 65536 hides the problem): a
/// full-size message, a tunnel's largest datagram and a file all get through, and a datagram
/// one byte too long for the tunnel is dropped and counted. Before messages were sized by the
/// relay's family, a 1427-byte message went out as a 1472-byte UDP payload, 20 bytes too long
/// for IPv6 on this path: the kernel refused it (don't-fragment), so nothing arrived.
#[test]
#[ignore = "needs root: network namespaces and a veth pair"]
fn through_an_ipv6_relay_on_a_1500_byte_path_messages_a_tunnel_and_a_file_get_through() {
    use ferry_peer::sizes::Family;
    use ferry_peer::transfer::{NoProgress, TransferOptions, receive_file, send_file};
    use ferry_peer::tunnel::{self, TunnelMode, TunnelStats};
    use ferry_testkit::netns::{Topology, in_ns};

    let test = "through_an_ipv6_relay_on_a_1500_byte_path_messages_a_tunnel_and_a_file_get_through";
    ferry_testkit::skip::require_root(test);
    let topo = Topology::new().unwrap();
    set_mtu(&topo.relay_ns, &topo.relay_if, 1500);
    set_mtu(&topo.peers_ns, &topo.peers_if, 1500);
    let relay_addr = std::net::SocketAddr::new(topo.relay_v6().into(), 7000);
    let relay_key = RelayStaticKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    // The gateway runs on this namespace's loopback; only the peers talk to the relay.
    let gateway = GatewayProcess::start(
        binary("ferry-gateway"),
        &[("app", &["create:*", "join:*"])],
        relay_addr,
        &relay_key,
        "",
    )
    .unwrap();
    let relay_config = RelayConfig {
        listen: vec![relay_addr],
        admin: "127.0.0.1:9477".parse().unwrap(),
        netns: Some(topo.relay_ns.clone()),
        ..RelayConfig::loopback(vec![gateway.gateway_key().unwrap()]).unwrap()
    };
    let _relay = RelayProcess::start(binary("ferry-relay"), &relay_key, &relay_config).unwrap();
    let key = ApiKey::new(gateway.api_key("app").unwrap());
    let client = GatewayClient::new(&gateway.url(), &gateway.ca_file(), &key).unwrap();
    let (alice, bob) = (new_key(), new_key());
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (ga, gb) = runtime().block_on(async {
        let a = client
            .create("default", &alice.public(), Some(&bob.public()))
            .await
            .unwrap();
        let b = client
            .join(a.join_code.as_deref().unwrap(), &bob.public())
            .await
            .unwrap();
        (a, b)
    });
    let dir = ferry_testkit::temp_dir("ipv6-mtu").unwrap();
    let within = Duration::from_secs(10);

    // Everything of the peers runs on a thread in their namespace, so their sockets are there.
    in_ns(&topo.peers_ns, || {
        runtime().block_on(async {
            let a = SessionConfig::new(ga, identity(&alice));
            let b = SessionConfig::new(gb, identity(&bob));
            let (a, b) = connect_pair(a, b).await;
            let (a, b) = (Arc::new(a), Arc::new(b));
            assert_eq!(a.family(), Family::Ipv6);
            let max = a.max_payload();
            assert_eq!(max, 1407);

            // Full-size messages.
            for i in 0..50u8 {
                a.send(&vec![i; max]).await.unwrap();
            }
            let mut got = 0;
            while got < 50 {
                let Ok(message) = timeout(Duration::from_secs(3), b.recv()).await else {
                    break;
                };
                assert_eq!(message.unwrap().len(), max);
                got += 1;
            }
            assert_eq!(a.stats().dropped_outgoing, 0, "{}", a.stats());
            assert!(
                got >= 45,
                "{got} of 50 full-size messages arrived; {}",
                a.stats()
            );

            // The tunnel: the largest datagram crosses, one byte more is dropped and counted.
            let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let app = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let listen = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let (stats_a, stats_b) = (
                Arc::new(TunnelStats::default()),
                Arc::new(TunnelStats::default()),
            );
            let tunnel_a = tokio::spawn(tunnel::run(
                a.clone(),
                TunnelMode::Listen(listen),
                stats_a.clone(),
            ));
            let tunnel_b = tokio::spawn(tunnel::run(
                b.clone(),
                TunnelMode::Connect(server.local_addr().unwrap()),
                stats_b.clone(),
            ));
            let largest = vec![0x6b; max];
            let mut buf = vec![0u8; 2048];
            // Until the listening end is open, what the application sends is refused.
            let crossed = timeout(within, async {
                loop {
                    let _ = app.send_to(&largest, listen).await;
                    if let Ok(Ok((n, _))) =
                        timeout(Duration::from_millis(200), server.recv_from(&mut buf)).await
                    {
                        return n;
                    }
                }
            })
            .await
            .expect("the tunnel's largest datagram did not cross");
            assert_eq!(crossed, max);
            app.send_to(&vec![0x6c; max + 1], listen).await.unwrap();
            let deadline = Instant::now() + within;
            while stats_a.snapshot().dropped_too_long == 0 {
                assert!(Instant::now() < deadline, "{:?}", stats_a.snapshot());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(stats_a.snapshot().dropped_too_long, 1);
            assert_eq!(a.stats().dropped_outgoing, 0, "{}", a.stats());
            tunnel_a.abort();
            tunnel_b.abort();
            let _ = (tunnel_a.await, tunnel_b.await);

            // A file: QUIC's packets are the session's messages, so at most 1407 bytes.
            let file = dir.path().join("payload.bin");
            let mut content = vec![0u8; 300_000];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut content).unwrap();
            std::fs::write(&file, &content).unwrap();
            let into = dir.path().join("received");
            std::fs::create_dir(&into).unwrap();
            let options = TransferOptions {
                idle_timeout: within,
                ..TransferOptions::default()
            };
            let (sent, received) = timeout(Duration::from_secs(60), async {
                tokio::join!(
                    send_file(a.clone(), &file, &options, &NoProgress),
                    receive_file(b.clone(), &into, &options, &NoProgress),
                )
            })
            .await
            .unwrap();
            sent.unwrap();
            received.unwrap();
            assert!(std::fs::read(into.join("payload.bin")).unwrap() == content);
            assert_eq!(a.stats().dropped_outgoing, 0, "{}", a.stats());
            a.close().await;
        })
    })
    .unwrap();
}
