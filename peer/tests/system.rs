//! The whole system with real processes: `ferry-relay` with its XDP guard native on a veth in
//! one network namespace, `ferry-gateway` over HTTPS and the peers (`ferry-peer create`,
//! `join`, `send`, `recv`, `tunnel` as child processes) in another, sometimes with an on-path
//! hop ([`ferry_testkit::hop`]) between the peers and the relay that impairs or attacks.
//!
//! Needs root (namespaces, XDP), so every test is `#[ignore]`d:
//! `cargo test -p ferry-peer --test system -- --include-ignored` runs them. Each test prints
//! how long it took, and its figures, on stderr (`--nocapture` shows them).
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry_core::keys::RelayStaticKey;
use ferry_core::noise::frame::{HANDSHAKE_1_LEN, KIND_HANDSHAKE_1};
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::wire::{self, Packet};
use ferry_peer::channel::Channel;
use ferry_testkit::gateway::{GatewayProcess, GatewaySetup, workspace_binary};
use ferry_testkit::hop::{Direction, Hop, Impairment};
use ferry_testkit::metrics::{metric, sample};
use ferry_testkit::netns::Topology;
use ferry_testkit::relay::{RelayConfig, RelayProcess};
use ferry_testkit::{TempDir, skip, temp_dir};
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom as _, SystemRandom};

const PEER: &str = env!("CARGO_BIN_EXE_ferry-peer");
/// The relay's UDP port, in its namespace.
const RELAY_PORT: u16 = 7000;
/// The hop's UDP port, in the peers' namespace (peer host 9's address).
const HOP_PORT: u16 = 7100;
/// The relay's admin listener, inside its namespace.
const ADMIN_PORT: u16 = 9477;
/// How long one transfer of a test file may take, at most.
const TRANSFER_WITHIN: Duration = Duration::from_secs(240);

/// The relay and gateway binaries, built once per test process.
fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        (
            workspace_binary("ferry-relay", "ferry-relay").unwrap(),
            workspace_binary("ferry-gateway", "ferry-gateway").unwrap(),
        )
    })
}

/// Fails the test unless it may run here: root, and a relay built with its XDP program.
/// Returns false when it should be skipped instead.
fn may_run(test: &str) -> bool {
    skip::require_root(test);
    if std::env::var("FERRY_SKIP_EBPF").as_deref() == Ok("1") {
        skip::skip(test, "FERRY_SKIP_EBPF=1: the relay has no XDP guard");
        return false;
    }
    true
}

/// Whether `program` is on the PATH; skips `test` (or fails it, in CI) if not.
fn have_program(test: &str, program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip::skip(
            test,
            format!("{program} is not installed (.ci/setup --test)"),
        );
    }
    found
}

/// Prints a test's duration when it ends (also when it fails).
struct Timed(&'static str, Instant);

impl Timed {
    fn start(name: &'static str) -> Self {
        Self(name, Instant::now())
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        eprintln!("TIME {}: {:.1} s", self.0, self.1.elapsed().as_secs_f64());
    }
}

/// How a [`System`] is set up.
struct Setup {
    /// The gateway's `sessions.token_lifetime_secs`.
    token_lifetime_secs: u64,
    /// A hop in the path, with this impairment, recording this many DATA datagrams each way.
    hop: Option<(Impairment, usize)>,
    /// The relay's `limits.idle_timeout_secs`: peers send KEEPALIVEs at a third of it, and
    /// find a relay that forgot them (a restart) within about 2/3 of it plus 6 s.
    relay_idle_timeout_secs: u64,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            token_lifetime_secs: 300,
            hop: None,
            relay_idle_timeout_secs: 60,
        }
    }
}

/// One peer child process, killed on drop; its stdout and stderr go to files.
struct PeerProcess {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// How a peer process ended.
#[derive(Debug)]
struct Ended {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl PeerProcess {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit, at most `within` (then kills it and fails the test).
    fn wait(&mut self, within: Duration) -> Ended {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not finish within {within:?}; stderr:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ended {
            success: status.success(),
            code: status.code(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }

    /// Waits for a successful exit, failing the test with the process's stderr otherwise.
    fn finish(&mut self, within: Duration) -> Ended {
        let ended = self.wait(within);
        assert!(
            ended.success,
            "{} failed ({:?}):\n{}",
            self.name, ended.code, ended.stderr
        );
        ended
    }

    /// Stops the process (SIGTERM, then SIGKILL after five seconds).
    fn stop(&mut self) {
        ferry_testkit::process::terminate(&mut self.child, Duration::from_secs(5));
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer's identity key file and its public key.
struct Identity {
    key: PathBuf,
    public: String,
}

/// Two peers of one session: A created it expecting B, B joined.
struct Pair {
    a: Identity,
    b: Identity,
    a_grant: PathBuf,
    b_grant: PathBuf,
    session_id: u64,
}

/// The relay, the gateway, maybe a hop, in a fresh topology. Fields drop in order: the hop,
/// the gateway and the relay stop before the namespaces go.
struct System {
    hop: Option<Hop>,
    gateway: GatewayProcess,
    relay: Option<RelayProcess>,
    relay_config: RelayConfig,
    relay_key: RelayStaticKey,
    api_key_file: PathBuf,
    dir: TempDir,
    topo: Topology,
}

impl System {
    fn start(setup: Setup) -> Self {
        let topo = Topology::new().unwrap();
        let dir = temp_dir("system").unwrap();
        let (relay_bin, gateway_bin) = binaries();
        let relay_key = RelayStaticKey::generate(&SystemRandom::new()).unwrap();
        let relay_addr = SocketAddr::new(topo.relay_v4().into(), RELAY_PORT);
        let hop = setup.hop.map(|(impairment, record)| {
            let listen = SocketAddr::new(topo.peer_v4(9).into(), HOP_PORT);
            Hop::in_namespace(&topo.peers_ns, listen, relay_addr, impairment, record).unwrap()
        });
        let advertised = hop.as_ref().map_or(relay_addr, Hop::listen_addr);
        // The gateway runs beside the peers (on the loopback of their namespace): the relay
        // never talks to it, and its certificate names localhost.
        let extra = format!(
            "[sessions]\ntoken_lifetime_secs = {}\nrate_bytes_per_sec = 2500000000\n",
            setup.token_lifetime_secs
        );
        let scopes: &[&str] = &["create:default", "join:default"];
        let gateway = GatewayProcess::launch(
            gateway_bin,
            &GatewaySetup {
                cert_names: &["localhost", "127.0.0.1"],
                api_keys: &[("system", scopes)],
                relay_address: advertised,
                relay_key: &relay_key,
                extra: &extra,
                netns: Some(&topo.peers_ns),
            },
        )
        .unwrap();
        let api_key_file = dir.path().join("api.key");
        ferry_testkit::write_private(&api_key_file, gateway.api_key("system").unwrap()).unwrap();
        let relay_config = RelayConfig {
            listen: vec![relay_addr],
            workers: 2,
            admin: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            relay_extra: String::new(),
            // Rates well above the defaults: the peers share one source address, and the
            // tests measure this machine, not the limits.
            sections: format!(
                "[limits]\nmax_session_rate = 2500000000\nidle_timeout_secs = {}\n\n\
                 [xdp]\nmode = \"native\"\ninterfaces = [\"{}\"]\n\
                 data_packets_per_second = 2000000\ndata_packet_burst = 200000\n\
                 data_bytes_per_second = 2500000000\ndata_byte_burst = 250000000\n",
                setup.relay_idle_timeout_secs, topo.relay_if
            ),
            netns: Some(topo.relay_ns.clone()),
            log_filter: "info".into(),
            ..RelayConfig::loopback(vec![gateway.gateway_key().unwrap()]).unwrap()
        };
        let relay = RelayProcess::start(relay_bin, &relay_key, &relay_config).unwrap();
        Self {
            hop,
            gateway,
            relay: Some(relay),
            relay_config,
            relay_key,
            api_key_file,
            dir,
            topo,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn relay(&self) -> &RelayProcess {
        self.relay.as_ref().unwrap()
    }

    fn hop(&self) -> &Hop {
        self.hop.as_ref().unwrap()
    }

    /// Stops the relay and starts it again, same key, config and address: a restart that
    /// forgets every session.
    fn restart_relay(&mut self) {
        drop(self.relay.take());
        self.relay =
            Some(RelayProcess::start(&binaries().0, &self.relay_key, &self.relay_config).unwrap());
    }

    /// `ferry-peer` with `args`, in the peers' namespace.
    fn peer_command(&self, args: &[OsString]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.topo.peers_ns, PEER])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ferry-peer args` to the end: (success, stdout, stderr).
    fn run_peer(&self, args: &[OsString]) -> (bool, String, String) {
        let out = self.peer_command(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `ferry-peer args` as `name`, its output in files named after it.
    fn spawn_peer(&self, name: &str, args: &[OsString]) -> PeerProcess {
        let stdout = self.path(&format!("{name}.out"));
        let stderr = self.path(&format!("{name}.err"));
        let child = self
            .peer_command(args)
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        PeerProcess {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    /// `--gateway URL --ca FILE --api-key-file FILE`.
    fn gateway_args(&self) -> Vec<OsString> {
        vec![
            "--gateway".into(),
            self.gateway.url().into(),
            "--ca".into(),
            self.gateway.ca_file().into(),
            "--api-key-file".into(),
            self.api_key_file.clone().into(),
        ]
    }

    fn keygen(&self, name: &str) -> Identity {
        let key = self.path(&format!("{name}.key"));
        let (ok, _, err) = self.run_peer(&["keygen".into(), "--out".into(), key.clone().into()]);
        assert!(ok, "keygen: {err}");
        let (ok, public, err) = self.run_peer(&["pubkey".into(), key.clone().into()]);
        assert!(ok, "pubkey: {err}");
        Identity {
            key,
            public: public.trim().to_string(),
        }
    }

    /// `create` with A's key, expecting `expect`: the grant file, the join code, the session.
    fn create(&self, a: &Identity, expect: &str) -> (PathBuf, String, u64) {
        let grant = self.path("a.grant");
        let mut args: Vec<OsString> = vec!["create".into()];
        args.extend(self.gateway_args());
        args.extend([
            "--identity".into(),
            a.key.clone().into(),
            "--expect-peer".into(),
            expect.into(),
            "--out".into(),
            grant.clone().into(),
        ]);
        let (ok, out, err) = self.run_peer(&args);
        assert!(ok, "create: {err}");
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("create printed no {name}: {out}"))
                .trim()
                .to_string()
        };
        let session = u64::from_str_radix(&field("session_id"), 16).unwrap();
        (grant, field("join_code"), session)
    }

    /// `join` with `key` and `code`: the grant file, or the error text.
    fn join(&self, key: &Path, code: &str, out: &Path) -> Result<PathBuf, String> {
        let mut args: Vec<OsString> = vec!["join".into()];
        args.extend(self.gateway_args());
        args.extend([
            "--identity".into(),
            key.into(),
            "--code".into(),
            code.into(),
            "--out".into(),
            out.into(),
        ]);
        match self.run_peer(&args) {
            (true, _, _) => Ok(out.to_path_buf()),
            (false, _, err) => Err(err),
        }
    }

    /// Two fresh identities, A's session expecting B, B joined.
    fn pair(&self) -> Pair {
        let a = self.keygen("a");
        let b = self.keygen("b");
        let (a_grant, code, session_id) = self.create(&a, &b.public);
        let b_grant = self.join(&b.key, &code, &self.path("b.grant")).unwrap();
        Pair {
            a,
            b,
            a_grant,
            b_grant,
            session_id,
        }
    }

    /// `ferry-peer send` of `file` by A, with the gateway arguments.
    fn send(&self, pair: &Pair, file: &Path) -> PeerProcess {
        let mut args: Vec<OsString> = vec![
            "send".into(),
            "--grant".into(),
            pair.a_grant.clone().into(),
            "--identity".into(),
            pair.a.key.clone().into(),
        ];
        args.extend(self.gateway_args());
        args.push(file.into());
        self.spawn_peer("send", &args)
    }

    /// `ferry-peer recv` by B with `identity` into `dir`, with the gateway arguments.
    fn recv(&self, pair: &Pair, identity: &Path, dir: &Path) -> PeerProcess {
        std::fs::create_dir_all(dir).unwrap();
        let mut args: Vec<OsString> = vec![
            "recv".into(),
            "--grant".into(),
            pair.b_grant.clone().into(),
            "--identity".into(),
            identity.into(),
        ];
        args.extend(self.gateway_args());
        args.extend(["--dir".into(), dir.into()]);
        self.spawn_peer("recv", &args)
    }

    /// `ferry-peer tunnel`: A with `--listen listen`, B with `--connect connect`.
    fn tunnels(
        &self,
        pair: &Pair,
        listen: SocketAddr,
        connect: SocketAddr,
    ) -> (PeerProcess, PeerProcess) {
        let end = |grant: &Path, key: &Path, mode: &str, addr: SocketAddr| {
            let mut args: Vec<OsString> = vec![
                "tunnel".into(),
                "--grant".into(),
                grant.into(),
                "--identity".into(),
                key.into(),
            ];
            args.extend(self.gateway_args());
            args.extend([mode.into(), addr.to_string().into()]);
            args
        };
        let b = self.spawn_peer(
            "tunnel-b",
            &end(&pair.b_grant, &pair.b.key, "--connect", connect),
        );
        let a = self.spawn_peer(
            "tunnel-a",
            &end(&pair.a_grant, &pair.a.key, "--listen", listen),
        );
        (a, b)
    }

    /// The relay's metrics page.
    fn metrics(&self) -> String {
        self.relay().metrics()
    }

    /// Waits until the relay has accepted at least `n` binds (its counter since it started).
    fn await_binds(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while sample(&self.metrics(), "ferry_binds_accepted_total").unwrap_or(0) < n {
            assert!(
                Instant::now() < deadline,
                "the relay accepted fewer than {n} binds within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A UDP socket on `addr` in the peers' namespace.
    fn peer_socket(&self, addr: SocketAddr) -> UdpSocket {
        self.topo.peer_socket(addr).unwrap()
    }
}

/// Writes `len` random bytes to `path`.
fn random_file(path: &Path, len: usize) {
    let mut bytes = vec![0u8; len];
    SystemRandom::new().fill(&mut bytes).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn sha256(path: &Path) -> Vec<u8> {
    digest(&SHA256, &std::fs::read(path).unwrap())
        .as_ref()
        .to_vec()
}

/// The one file in `dir`.
fn received_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(files.len(), 1, "expected one received file: {files:?}");
    files.into_iter().next().unwrap()
}

/// B receives into a fresh directory while A sends `file`; both must succeed within
/// [`TRANSFER_WITHIN`]. Returns the received file and the seconds from start to both ends.
fn transfer(sys: &System, pair: &Pair, file: &Path) -> (PathBuf, f64, String) {
    let dir = sys.path("received");
    let mut recv = sys.recv(pair, &pair.b.key, &dir);
    let start = Instant::now();
    let mut send = sys.send(pair, file);
    let sent = send.finish(TRANSFER_WITHIN);
    recv.finish(TRANSFER_WITHIN);
    let secs = start.elapsed().as_secs_f64();
    (received_file(&dir), secs, sent.stdout)
}

/// The value of `name` in a `name value` line of a peer's output.
fn printed(output: &str, name: &str) -> Option<String> {
    output.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().to_string())
    })
}

fn assert_same_file(sent: &Path, received: &Path) {
    assert_eq!(
        std::fs::metadata(sent).unwrap().len(),
        std::fs::metadata(received).unwrap().len(),
        "sizes differ"
    );
    assert!(sha256(sent) == sha256(received), "the SHA-256 sums differ");
}

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// The same file transfer (`ferry_peer::transfer`, in this process) straight between two UDP
/// sockets of the peers' namespace: no relay, no Noise. The seconds it took, measured as
/// `ferry-peer send` measures (from the start of the QUIC connection to the verdict).
fn direct_transfer(sys: &System, file: &Path) -> f64 {
    use ferry_peer::link::UdpLink;
    use ferry_peer::transfer::{NoProgress, TransferOptions, receive_file, send_file};
    use std::sync::Arc;

    let a = sys.peer_socket(SocketAddr::new(sys.topo.peer_v4(2).into(), 0));
    let b = sys.peer_socket(SocketAddr::new(sys.topo.peer_v4(3).into(), 0));
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let dir = sys.path("received-direct");
    std::fs::create_dir_all(&dir).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let a = Arc::new(
            UdpLink::connect(tokio::net::UdpSocket::from_std(a).unwrap(), b_addr)
                .await
                .unwrap(),
        );
        let b = Arc::new(
            UdpLink::connect(tokio::net::UdpSocket::from_std(b).unwrap(), a_addr)
                .await
                .unwrap(),
        );
        let options = TransferOptions::default();
        let start = Instant::now();
        let (sent, received) = tokio::join!(
            send_file(a.clone(), file, &options, &NoProgress),
            receive_file(b.clone(), &dir, &options, &NoProgress)
        );
        let sent = sent.unwrap();
        let received = received.unwrap();
        assert!(start.elapsed() >= sent.elapsed);
        assert_same_file(file, received.path.as_deref().unwrap());
        let (rcvbuf, sndbuf) = b.buffer_sizes().unwrap();
        eprintln!(
            "direct transfer: sender {} packets, {} lost, rtt {:?}; receiver {} packets, {} \
             lost; socket drops: sender {}, receiver {}; receiver's socket buffers {rcvbuf} \
             / {sndbuf} bytes",
            sent.sent_packets,
            sent.lost_packets,
            sent.rtt,
            received.sent_packets,
            received.lost_packets,
            socket_drops(sys, a_addr.port()),
            socket_drops(sys, b_addr.port())
        );
        sent.elapsed.as_secs_f64()
    })
}

/// Datagrams the kernel dropped at the UDP socket on local `port` in the peers' namespace
/// (its receive queue was full): the `drops` column of `/proc/net/udp`.
fn socket_drops(sys: &System, port: u16) -> u64 {
    let table = ferry_testkit::netns::in_ns(&sys.topo.peers_ns, || {
        std::fs::read_to_string("/proc/thread-self/net/udp")
    })
    .unwrap()
    .unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&local))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

#[test]
#[ignore = "needs root: network namespaces, the XDP guard"]
fn a_file_crosses_the_relay_byte_identical() {
    let _t = Timed::start("a_file_crosses_the_relay_byte_identical");
    if !may_run(_t.0) {
        return;
    }
    let sys = System::start(Setup::default());
    let pair = sys.pair();
    // FERRY_SYSTEM_TRANSFER_MIB sets the size for a longer measurement; 32 MiB by default.
    let mib: usize = std::env::var("FERRY_SYSTEM_TRANSFER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let len = mib << 20;
    let file = sys.path("random.bin");
    random_file(&file, len);
    let (received, whole, said) = transfer(&sys, &pair, &file);
    assert_same_file(&file, &received);
    let page = sys.metrics();
    assert!(metric(&page, "ferry_forwarded_bytes_total") >= len as u64);
    let secs: f64 = printed(&said, "seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("send printed no seconds: {said}"));
    assert_eq!(printed(&said, "bytes"), Some(len.to_string()), "{said}");
    // What was dropped on the way, by reason: none of it need be zero (the transfer resends).
    let drops: Vec<&str> = page
        .lines()
        .filter(|l| {
            (l.starts_with("ferry_drops_total{")
                || l.starts_with("ferry_xdp_packets_total{action=\"drop\"")
                || l.starts_with("ferry_worker_socket_drops_total"))
                && !l.ends_with(" 0")
        })
        .collect();
    eprintln!("relay drops during the transfer: {drops:?}\nsend said:\n{said}");
    // The baseline, same run: the transfer with no relay in the path.
    let direct = direct_transfer(&sys, &file);
    eprintln!(
        "FIGURE transfer of {} MiB: through the relay {:.1} MB/s ({secs:.2} s; {whole:.2} s \
         with the processes' start, bind and handshake), direct with no relay {:.1} MB/s \
         ({direct:.2} s): {:.2}x",
        len >> 20,
        mb_per_s(len, secs),
        mb_per_s(len, direct),
        direct / secs
    );
}

#[test]
#[ignore = "needs root: network namespaces, the XDP guard"]
fn a_file_arrives_intact_through_loss_and_reordering() {
    let _t = Timed::start("a_file_arrives_intact_through_loss_and_reordering");
    if !may_run(_t.0) {
        return;
    }
    let impairment = Impairment {
        reorder_delay: Duration::from_millis(3),
        ..Impairment::lossy(0.05, 0.05, 0x5eed)
    };
    let sys = System::start(Setup {
        hop: Some((impairment, 0)),
        ..Setup::default()
    });
    let pair = sys.pair();
    let len = 4 << 20;
    let file = sys.path("random.bin");
    random_file(&file, len);
    let (received, secs, _) = transfer(&sys, &pair, &file);
    assert_same_file(&file, &received);
    let c = sys.hop().counts();
    assert!(c.dropped_to_relay > 0 && c.dropped_to_clients > 0, "{c:?}");
    assert!(
        c.reordered_to_relay > 0 && c.reordered_to_clients > 0,
        "{c:?}"
    );
    eprintln!(
        "FIGURE transfer with 5% loss and 5% reordering: {} MiB in {secs:.2} s, {:.1} MB/s; hop {c:?}",
        len >> 20,
        mb_per_s(len, secs)
    );
}

#[test]
#[ignore = "needs root: network namespaces, the XDP guard"]
fn a_relay_restart_in_the_middle_of_a_transfer_is_survived() {
    let _t = Timed::start("a_relay_restart_in_the_middle_of_a_transfer_is_survived");
    if !may_run(_t.0) {
        return;
    }
    // With the default idle timeout (60 s) a sending peer finds a restarted relay within
    // 2 × 20 s + 3 × 2 s = 46 s (docs/protocol.md §8), and the transfer gives up after 30 s
    // of silence first; 15 s finds it within 16 s.
    let mut sys = System::start(Setup {
        relay_idle_timeout_secs: 15,
        ..Setup::default()
    });
    let pair = sys.pair();
    let len = 64 << 20;
    let file = sys.path("random.bin");
    random_file(&file, len);
    let dir = sys.path("received");
    let mut recv = sys.recv(&pair, &pair.b.key, &dir);
    let mut send = sys.send(&pair, &file);
    // Restart once a few MiB have crossed, while the sender still sends.
    let deadline = Instant::now() + TRANSFER_WITHIN;
    while sample(&sys.metrics(), "ferry_forwarded_bytes_total").unwrap_or(0) < 4 << 20 {
        assert!(Instant::now() < deadline, "the transfer never started");
        assert!(send.running(), "the sender ended before the restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(send.running(), "the sender ended before the restart");
    let restarted = Instant::now();
    sys.restart_relay();
    send.finish(TRANSFER_WITHIN);
    recv.finish(TRANSFER_WITHIN);
    assert_same_file(&file, &received_file(&dir));
    // Both peers bound again to the new relay, with fresh tokens.
    let page = sys.metrics();
    assert!(metric(&page, "ferry_binds_accepted_total") >= 2, "{page}");
    assert!(metric(&page, "ferry_forwarded_bytes_total") > 0);
    eprintln!(
        "FIGURE relay restart: the transfer finished {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
}

/// A UDP echo application in the peers' namespace: answers every datagram with itself.
struct Echo {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(sys: &System, addr: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let socket = sys.peer_socket(addr);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends datagrams with sequence numbers through `socket` to `to` until one comes back, for at
/// most `within`: the tunnel is up end to end.
fn await_echo(socket: &UdpSocket, to: SocketAddr, within: Duration) {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 64];
    loop {
        assert!(
            Instant::now() < deadline,
            "nothing came back through the tunnel within {within:?}"
        );
        socket.send_to(b"are you there", to).unwrap();
        if socket.recv(&mut buf).is_ok() {
            return;
        }
    }
}

#[test]
#[ignore = "needs root: network namespaces, the XDP guard"]
fn a_session_outlives_several_token_lifetimes() {
    let _t = Timed::start("a_session_outlives_several_token_lifetimes");
    if !may_run(_t.0) {
        return;
    }
    // 30 s tokens, the gateway's minimum; the traffic runs for 100 s, over three lifetimes.
    let sys = System::start(Setup {
        token_lifetime_secs: 30,
        ..Setup::default()
    });
    let pair = sys.pair();
    let echo = Echo::start(&sys, SocketAddr::new(sys.topo.peer_v4(3).into(), 0));
    let listen = SocketAddr::new(sys.topo.peer_v4(2).into(), free_port(&sys));
    let (mut tunnel_a, mut tunnel_b) = sys.tunnels(&pair, listen, echo.addr);
    let app = sys.peer_socket(SocketAddr::new(sys.topo.peer_v4(4).into(), 0));
    await_echo(&app, listen, Duration::from_secs(30));

    // Ten numbered datagrams a second for 100 s; each must come back. One that does not
    // within two seconds is sent again (what any UDP application over a lossy path does) and
    // counted; the test allows a handful, never a gap.
    app.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let run_for = Duration::from_secs(100);
    let start = Instant::now();
    let mut next = 0u64;
    let mut outstanding: std::collections::BTreeMap<u64, Instant> = Default::default();
    let mut answered = 0u64;
    let mut resent = 0u64;
    let mut buf = [0u8; 64];
    while start.elapsed() < run_for || !outstanding.is_empty() {
        assert!(
            start.elapsed() < run_for + Duration::from_secs(30),
            "datagrams {:?} never came back",
            outstanding.keys().collect::<Vec<_>>()
        );
        if start.elapsed() < run_for && start.elapsed() >= Duration::from_millis(100) * next as u32
        {
            app.send_to(&next.to_be_bytes(), listen).unwrap();
            outstanding.insert(next, Instant::now());
            next += 1;
        }
        if let Ok(8) = app.recv(&mut buf) {
            let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
            if outstanding.remove(&seq).is_some() {
                answered += 1;
            }
        }
        for (seq, sent) in outstanding.iter_mut() {
            if sent.elapsed() > Duration::from_secs(2) {
                app.send_to(&seq.to_be_bytes(), listen).unwrap();
                *sent = Instant::now();
                resent += 1;
            }
        }
    }
    assert!(
        tunnel_a.running() && tunnel_b.running(),
        "a tunnel end quit"
    );
    assert_eq!(answered, next, "every datagram came back");
    assert!(
        resent <= next / 100,
        "{resent} of {next} datagrams had to be sent again"
    );
    // Several tokens were used: every renewal is a BIND with a fresh token.
    let binds = metric(&sys.metrics(), "ferry_binds_accepted_total");
    assert!(
        binds >= 2 + 2 * 2,
        "only {binds} binds in 100 s of 30 s tokens"
    );
    eprintln!(
        "FIGURE 100 s over 30 s tokens: {next} datagrams echoed, {resent} sent again, {binds} binds"
    );
    tunnel_a.stop();
    tunnel_b.stop();
}

/// A UDP port on peer host 2 that was free a moment ago.
fn free_port(sys: &System) -> u16 {
    sys.peer_socket(SocketAddr::new(sys.topo.peer_v4(2).into(), 0))
        .local_addr()
        .unwrap()
        .port()
}

/// A HANDSHAKE-1 for `session_id` from a stranger's fresh key: a complete DATA datagram, as
/// the relay would forward it.
fn forged_handshake_1(session_id: u64) -> Vec<u8> {
    let mut secret = [0u8; 32];
    SystemRandom::new().fill(&mut secret).unwrap();
    let stranger = LocalIdentity::from_secret_bytes(secret);
    let mut channel = Channel::initiator(
        &stranger,
        PeerExpectation::Pinned([7u8; 32]),
        session_id,
        TransportLimits::default(),
    )
    .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = channel.start(Instant::now(), &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Whether `datagram` is a DATA datagram carrying a HANDSHAKE-1 frame.
fn is_handshake_1(datagram: &[u8]) -> bool {
    match wire::parse(datagram) {
        Ok(Packet::Data(d)) => {
            d.payload().first() == Some(&KIND_HANDSHAKE_1)
                && d.payload().len() == 1 + HANDSHAKE_1_LEN
        }
        _ => false,
    }
}

#[test]
#[ignore = "needs root: network namespaces, the XDP guard"]
fn forged_and_replayed_first_handshakes_do_not_stop_the_real_one() {
    let _t = Timed::start("forged_and_replayed_first_handshakes_do_not_stop_the_real_one");
    if !may_run(_t.0) {
        return;
    }
    let sys = System::start(Setup {
        hop: Some((Impairment::none(), 64)),
        ..Setup::default()
    });
    let pair = sys.pair();
    let len = 16 << 20;
    let file = sys.path("random.bin");
    random_file(&file, len);
    let forged = forged_handshake_1(pair.session_id);
    assert!(is_handshake_1(&forged));

    // B first: once it is bound, a forged HANDSHAKE-1 reaches it from "the relay" before A
    // has even started.
    let dir = sys.path("received");
    let mut recv = sys.recv(&pair, &pair.b.key, &dir);
    sys.await_binds(1, Duration::from_secs(30));
    let b_client = sys.hop().clients()[0];
    for _ in 0..3 {
        sys.hop().inject_to_client(b_client, &forged).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut send = sys.send(&pair, &file);

    // Mid-transfer, A's real HANDSHAKE-1 comes again, replayed from A's address, and the
    // forged one once more.
    let deadline = Instant::now() + TRANSFER_WITHIN;
    while sys.hop().counts().forwarded_to_relay < 500 {
        assert!(Instant::now() < deadline, "the transfer never started");
        assert!(send.running(), "the sender ended before the replay");
        std::thread::sleep(Duration::from_millis(10));
    }
    let recorded = sys.hop().recorded();
    let real = recorded
        .iter()
        .find(|r| {
            r.direction == Direction::ToRelay && r.client != b_client && is_handshake_1(&r.bytes)
        })
        .expect("A's HANDSHAKE-1 was recorded");
    assert_ne!(real.bytes, forged);
    for _ in 0..3 {
        sys.hop().replay(real).unwrap();
        sys.hop().inject_to_client(b_client, &forged).unwrap();
    }
    send.finish(TRANSFER_WITHIN);
    recv.finish(TRANSFER_WITHIN);
    assert_same_file(&file, &received_file(&dir));
    let c = sys.hop().counts();
    assert_eq!((c.injected, c.replayed), (6, 3));
}

#[test]
#[ignore = "needs root: network namespaces, the XDP guard"]
fn a_peer_with_the_wrong_identity_is_refused() {
    let _t = Timed::start("a_peer_with_the_wrong_identity_is_refused");
    if !may_run(_t.0) {
        return;
    }
    let sys = System::start(Setup::default());
    let a = sys.keygen("a");
    let b = sys.keygen("b");
    let mallory = sys.keygen("mallory");
    let (a_grant, code, session_id) = sys.create(&a, &b.public);
    // The gateway refuses a join with another key than the one A named.
    let refused = sys.join(&mallory.key, &code, &sys.path("mallory.grant"));
    assert!(refused.is_err(), "the gateway let another key join");
    // B joins with its own key, then runs with another: the handshake shows A a key it does
    // not expect.
    let b_grant = sys.join(&b.key, &code, &sys.path("b.grant")).unwrap();
    let pair = Pair {
        a,
        b,
        a_grant,
        b_grant,
        session_id,
    };
    let file = sys.path("random.bin");
    random_file(&file, 1 << 20);
    let dir = sys.path("received");
    let mut recv = sys.recv(&pair, &mallory.key, &dir);
    let mut send = sys.send(&pair, &file);
    let ended = send.wait(Duration::from_secs(60));
    assert_eq!(ended.code, Some(1), "A must refuse: {ended:?}");
    let text = ended.stderr.to_lowercase();
    assert!(
        text.contains("identity") || text.contains("key"),
        "A's error names the identity: {}",
        ended.stderr
    );
    recv.stop();
    let complete = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && std::fs::read(p).unwrap() == std::fs::read(&file).unwrap())
        .count();
    assert_eq!(complete, 0, "the file reached the wrong peer");
}

/// Whether `haystack` contains `needle` (Horspool's search: it skips ahead by up to the
/// needle's length, so gigabytes of memory are searched in reasonable time in a debug build).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let m = needle.len();
    if m == 0 || haystack.len() < m {
        return m == 0;
    }
    let mut shift = [m; 256];
    for (i, &b) in needle[..m - 1].iter().enumerate() {
        shift[usize::from(b)] = m - 1 - i;
    }
    let mut at = 0;
    while at + m <= haystack.len() {
        if &haystack[at..at + m] == needle {
            return true;
        }
        at += shift[usize::from(haystack[at + m - 1])];
    }
    false
}

#[test]
fn the_search_finds_a_needle_anywhere_and_nothing_else() {
    let needle = b"FERRY-MARK";
    for at in [0, 1, 9, 10, 500, 990] {
        let mut hay = vec![b'x'; 1000];
        hay[at..at + needle.len()].copy_from_slice(needle);
        assert!(contains(&hay, needle), "at {at}");
        hay[at + 4] = b'?';
        assert!(!contains(&hay, needle), "at {at}, broken");
    }
    assert!(!contains(b"FERRY-MAR", needle));
    assert!(contains(b"FERRY-FERRY-MARK", needle));
}

/// Reads every readable mapping of process `pid` and says whether any contains `needle`;
/// also returns how many bytes it read.
fn process_memory_contains(pid: u32, needle: &[u8]) -> (bool, usize) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut read = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = line.split_whitespace().nth(5).unwrap_or("");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut region = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() {
            continue;
        }
        // Some mappings cannot be read (guard pages); what can be read is searched.
        let mut got = 0;
        while got < region.len() {
            match mem.read(&mut region[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        read += got;
        if contains(&region[..got], needle) {
            return (true, read);
        }
    }
    (false, read)
}

#[test]
fn the_memory_scan_finds_what_a_process_holds() {
    // This process holds a fresh marker on its heap: the scan of its own memory finds it.
    let mut marker = vec![0u8; 24];
    SystemRandom::new().fill(&mut marker).unwrap();
    let held = marker.repeat(1000);
    let (found, read) = process_memory_contains(std::process::id(), &marker);
    assert!(found, "searched {read} bytes");
    assert!(read >= held.len());
}

#[test]
#[ignore = "needs root: network namespaces, the XDP guard"]
fn no_plaintext_on_the_relay_wire_or_in_its_memory() {
    let _t = Timed::start("no_plaintext_on_the_relay_wire_or_in_its_memory");
    if !may_run(_t.0) || !have_program(_t.0, "tcpdump") {
        return;
    }
    let sys = System::start(Setup::default());
    let pair = sys.pair();
    let marker = b"FERRY-PLAINTEXT-MARKER-4f1c";
    let len = 16 << 20;
    let file = sys.path("marked.bin");
    let text: Vec<u8> = marker
        .iter()
        .chain(b" ")
        .copied()
        .cycle()
        .take(len)
        .collect();
    std::fs::write(&file, &text).unwrap();

    let pcap = sys.path("relay.pcap");
    let mut tcpdump = sys
        .topo
        .in_relay_ns("tcpdump")
        .args(["-i", &sys.topo.relay_if, "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg("udp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // tcpdump says "listening on" when its capture runs.
    let mut err = tcpdump.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("listening on") {
        assert_eq!(err.read(&mut byte).unwrap(), 1, "tcpdump quit");
        seen.push(byte[0]);
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));

    let dir = sys.path("received");
    let mut recv = sys.recv(&pair, &pair.b.key, &dir);
    let mut send = sys.send(&pair, &file);
    // The relay's memory, several times while the transfer runs, and once after.
    let pid = sys.relay().pid();
    let mut scans = 0;
    let mut scanned = 0;
    while send.running() {
        let (found, read) = process_memory_contains(pid, marker);
        assert!(!found, "the relay's memory holds the plaintext marker");
        scans += 1;
        scanned += read;
    }
    send.finish(TRANSFER_WITHIN);
    recv.finish(TRANSFER_WITHIN);
    let (found, read) = process_memory_contains(pid, marker);
    assert!(!found, "the relay's memory holds the plaintext marker");
    assert!(read > 0);
    assert_same_file(&file, &received_file(&dir));

    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    let captured = std::fs::read(&pcap).unwrap();
    assert!(
        captured.len() > len,
        "the capture holds less than the file: {} bytes",
        captured.len()
    );
    assert!(
        !contains(&captured, marker),
        "the plaintext marker crossed the relay's interface"
    );
    eprintln!(
        "FIGURE no plaintext: {} capture bytes searched, relay memory searched {} times ({} MiB in all)",
        captured.len(),
        scans + 1,
        (scanned + read) >> 20
    );
}

/// Runs `sockperf args` in the peers' namespace and returns its output (both streams).
fn sockperf(sys: &System, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &sys.topo.peers_ns, "sockperf"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "sockperf {args:?} failed: {out:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `sockperf server` in the peers' namespace on `addr`, interrupted on drop.
struct SockperfServer {
    child: Child,
    log: PathBuf,
}

impl SockperfServer {
    fn start(sys: &System, addr: SocketAddr, name: &str) -> Self {
        let log = sys.path(name);
        let child = Command::new("ip")
            .args(["netns", "exec", &sys.topo.peers_ns, "sockperf", "server"])
            .args(["-i", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&server.log)
            .unwrap_or_default()
            .contains("listen on")
        {
            assert!(Instant::now() < deadline, "sockperf server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Interrupts the server and returns how many messages it received.
    fn received(mut self) -> u64 {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .find_map(|l| {
                l.split("Total ")
                    .nth(1)?
                    .split(" messages received")
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no message count in the server's log: {log}"))
    }
}

impl Drop for SockperfServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// sockperf's "Latency is X usec" (half the round trip), in microseconds.
fn sockperf_latency(output: &str) -> f64 {
    output
        .lines()
        .find_map(|l| {
            l.split("Latency is ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no latency in sockperf's output: {output}"))
}

/// Ping-pong for `secs` through `to`, then a throughput run: (round trip µs, MB/s received).
fn measure_udp_path(sys: &System, server: SocketAddr, to: SocketAddr, secs: u32) -> (f64, f64) {
    let (ip, port) = (to.ip().to_string(), to.port().to_string());
    let msg = 1200usize;
    let ping = SockperfServer::start(sys, server, "sockperf-ping.log");
    let out = sockperf(
        sys,
        &[
            "ping-pong",
            "-i",
            &ip,
            "-p",
            &port,
            "-t",
            &secs.to_string(),
            "-m",
            "64",
        ],
    );
    ping.received();
    let rtt_us = 2.0 * sockperf_latency(&out);
    let sink = SockperfServer::start(sys, server, "sockperf-tput.log");
    let start = Instant::now();
    sockperf(
        sys,
        &[
            "throughput",
            "-i",
            &ip,
            "-p",
            &port,
            "-t",
            &secs.to_string(),
            "-m",
            &msg.to_string(),
        ],
    );
    // Whatever is still in flight lands within a moment.
    std::thread::sleep(Duration::from_millis(500));
    let received = sink.received();
    let secs_run = start.elapsed().as_secs_f64() - 0.5;
    (rtt_us, (received as usize * msg) as f64 / secs_run / 1e6)
}

#[test]
#[ignore = "needs root: network namespaces, the XDP guard"]
fn the_tunnel_carries_a_udp_application_both_ways() {
    let _t = Timed::start("the_tunnel_carries_a_udp_application_both_ways");
    if !may_run(_t.0) || !have_program(_t.0, "sockperf") {
        return;
    }
    let sys = System::start(Setup::default());
    let pair = sys.pair();
    let server = SocketAddr::new(sys.topo.peer_v4(3).into(), free_port(&sys));
    let listen = SocketAddr::new(sys.topo.peer_v4(2).into(), free_port(&sys));

    // The direct path first: the same application, no tunnel.
    let (direct_rtt, direct_tput) = measure_udp_path(&sys, server, server, 3);

    let (mut tunnel_a, mut tunnel_b) = sys.tunnels(&pair, listen, server);
    {
        // Up end to end before the measurement.
        let echo_server = SockperfServer::start(&sys, server, "sockperf-ready.log");
        // sockperf's server answers only sockperf's messages: a one-second ping-pong run
        // (bounded by `timeout`, in case nothing ever comes back) says whether the tunnel
        // carries both ways.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &sys.topo.peers_ns])
                .args(["timeout", "10", "sockperf", "ping-pong"])
                .args([
                    "-i",
                    &listen.ip().to_string(),
                    "-p",
                    &listen.port().to_string(),
                ])
                .args(["-t", "1", "-m", "64"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if out.status.success() && text.contains("Latency is") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the tunnel never carried sockperf: {text}"
            );
        }
        echo_server.received();
    }
    let (tunnel_rtt, tunnel_tput) = measure_udp_path(&sys, server, listen, 5);
    assert!(
        tunnel_a.running() && tunnel_b.running(),
        "a tunnel end quit"
    );
    assert!(tunnel_tput > 0.0);
    eprintln!(
        "FIGURE tunnel: round trip {tunnel_rtt:.0} µs (direct {direct_rtt:.0} µs, added {:.0} µs); \
         throughput received {tunnel_tput:.1} MB/s (direct {direct_tput:.1} MB/s), 1200-byte datagrams",
        tunnel_rtt - direct_rtt
    );
    tunnel_a.stop();
    tunnel_b.stop();
}
