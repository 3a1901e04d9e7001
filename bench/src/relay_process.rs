//! A real `ferry-relay` process on loopback (or in a network namespace), with keys and a
//! config generated for it, and a gateway signing key that it trusts: what the live demo,
//! `ferry-fwdbench` and `ferry-floodbench` start.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use ferry_core::keys::{GatewaySigningKey, RelayPublicKey, RelayStaticKey};
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter};
use ferry_core::wire::Slot;
use ring::rand::SystemRandom;

/// The relay id the generated config uses.
pub const RELAY_ID: u64 = 77;

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// GET `path` from an admin listener; the whole response, or empty on failure.
pub fn http_get(admin: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(500)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
        .is_err()
    {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of `sample` (a metric name with its labels, as on the page) on a Prometheus page;
/// 0 if absent.
pub fn metric(page: &str, sample: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// The sum of every sample on a Prometheus page whose line starts with `prefix` (a family, or
/// a family with some of its labels).
pub fn sum_metric(page: &str, prefix: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Total CPU time (user + system) the process `pid` has used, in nanoseconds.
pub fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ, the unit of utime/stime: 100 on every Linux ABI Ferry runs on.
    let hz = 100u64;
    Ok(ticks * 1_000_000_000 / hz)
}

/// A running relay; stopped (SIGTERM, then SIGKILL) and its files removed on drop.
#[derive(Debug)]
pub struct RelayProcess {
    child: Child,
    dir: PathBuf,
    netns: Option<String>,
    /// Where it receives.
    pub listen: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
    /// A gateway key it trusts (kid 1).
    pub minter: TokenMinter,
    /// Its public key, to seal slot secrets to.
    pub relay_public: RelayPublicKey,
    rng: SystemRandom,
}

impl RelayProcess {
    /// Starts `bin` (the `ferry-relay` binary) on 127.0.0.1 with one worker pinned to `cpu`,
    /// `relay_extra` appended to its `[relay]` section and `rest` appended to the file, and
    /// waits until `/readyz` says ready. With `xdp_generic_on = Some("lo")` the XDP guard runs
    /// on that interface in generic mode (needs root); with `None` it is off.
    pub fn start(
        bin: &Path,
        cpu: usize,
        relay_extra: &str,
        rest: &str,
        xdp_generic_on: Option<&str>,
    ) -> anyhow::Result<Self> {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let xdp = match xdp_generic_on {
            Some(interface) => {
                format!("[xdp]\nmode = \"generic\"\ninterfaces = [\"{interface}\"]")
            }
            None => "[xdp]\nmode = \"off\"".to_string(),
        };
        Self::launch(
            bin,
            None,
            listen,
            admin,
            cpu,
            relay_extra,
            &format!("{xdp}\n\n{rest}"),
        )
    }

    /// Starts `bin` inside network namespace `netns`, listening on `listen`, with `rest`
    /// (which must hold an `[xdp]` section) appended to the config.
    pub fn start_in_netns(
        bin: &Path,
        netns: &str,
        listen: SocketAddr,
        cpu: usize,
        relay_extra: &str,
        rest: &str,
    ) -> anyhow::Result<Self> {
        let admin: SocketAddr = "127.0.0.1:9477".parse()?;
        Self::launch(bin, Some(netns), listen, admin, cpu, relay_extra, rest)
    }

    fn launch(
        bin: &Path,
        netns: Option<&str>,
        listen: SocketAddr,
        admin: SocketAddr,
        cpu: usize,
        relay_extra: &str,
        rest: &str,
    ) -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let dir = std::env::temp_dir().join(format!(
            "ferry-relay-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let relay_key = RelayStaticKey::generate(&rng)?;
        ferry_keyfile::write_secret_file(&dir.join("relay.key"), &relay_key, true)?;
        let minter = TokenMinter::new(1, GatewaySigningKey::generate(&rng)?);
        let config = format!(
            "[relay]\nid = {RELAY_ID}\nlisten = [\"{listen}\"]\nstatic_key = \"relay.key\"\n\
             workers = 1\ncpus = [{cpu}]\n{relay_extra}\n\n[[gateway_keys]]\nkid = 1\n\
             public_key = \"{gw}\"\n\n[admin]\nlisten = \"{admin}\"\n\n{rest}\n",
            gw = minter.public(),
        );
        std::fs::write(dir.join("relay.toml"), config)?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .arg("--config")
            .arg(dir.join("relay.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (cargo build --release -p ferry-relay)",
                    bin.display()
                )
            })?;
        let relay = Self {
            child,
            dir,
            netns: netns.map(str::to_owned),
            listen,
            admin,
            minter,
            relay_public: relay_key.public(),
            rng,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !relay.get("/readyz").starts_with("HTTP/1.1 200") {
            if Instant::now() > deadline {
                bail!("ferry-relay did not become ready within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(relay)
    }

    /// GET `path` from the admin listener, from inside the relay's namespace if it has one.
    fn get(&self, path: &str) -> String {
        match &self.netns {
            Some(ns) => crate::netns::in_ns(ns, || http_get(self.admin, path)).unwrap_or_default(),
            None => http_get(self.admin, path),
        }
    }

    /// The process id, for CPU accounting.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A token for `slot` of `session`, valid for ten minutes.
    pub fn mint(&self, session: u64, slot: Slot) -> anyhow::Result<MintedToken> {
        let now = UnixTime::from(SystemTime::now());
        let input = ClaimsInput {
            slot,
            relay_id: RELAY_ID,
            session_id: session,
            not_before: now.saturating_sub(5),
            expires: now.saturating_add(600),
            rate_bytes_per_sec: 0,
        };
        Ok(self.minter.mint(&self.rng, &input, &self.relay_public)?)
    }

    /// The relay's `/metrics` page (empty if it cannot be fetched).
    pub fn metrics(&self) -> String {
        let page = self.get("/metrics");
        page.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
