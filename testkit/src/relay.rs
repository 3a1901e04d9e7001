//! A real `ferry-relay` process with a config generated for it, on loopback or in a network
//! namespace: what the relay's namespace tests, the gateway's end-to-end test, the live demo and
//! `ferry-bench` start.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_core::keys::{GatewayPublicKey, RelayStaticKey};

#[cfg(doc)]
use crate::fixtures::Authority;
use crate::fixtures::RELAY_ID;
use crate::free_port;
use crate::metrics::{http_get, ok_body};
use crate::netns::in_ns;

/// How long a relay may take to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// What the generated config says, and how the process runs.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// `relay.id`.
    pub relay_id: u64,
    /// `relay.listen`.
    pub listen: Vec<SocketAddr>,
    /// `relay.workers`.
    pub workers: usize,
    /// More lines of the `[relay]` section, e.g. `cpus = [0]`.
    pub relay_extra: String,
    /// The `[[gateway_keys]]` the relay trusts: kid and public key.
    pub gateway_keys: Vec<(u32, GatewayPublicKey)>,
    /// `admin.listen` (inside the namespace, if any).
    pub admin: SocketAddr,
    /// The sections after `[admin]`: `[xdp]` (which the relay requires), `[limits]`, `[log]`…
    pub sections: String,
    /// The network namespace to run in (`ip netns exec`), if any.
    pub netns: Option<String>,
    /// `RUST_LOG` for the process.
    pub log_filter: String,
    /// Whether its stderr (the log) goes to `relay.log` in its directory
    /// ([`RelayProcess::log_text`]) rather than to this process's stderr.
    pub log_to_file: bool,
}

impl RelayConfig {
    /// A relay on 127.0.0.1 (free ports for its UDP listener and its admin listener) with
    /// one worker, relay id [`RELAY_ID`], trusting `gateway_keys` (kid and public key; see
    /// [`Authority::gateway_key`]), its XDP guard off, logging warnings to a file.
    pub fn loopback(gateway_keys: Vec<(u32, GatewayPublicKey)>) -> anyhow::Result<Self> {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Ok(Self {
            relay_id: RELAY_ID,
            listen: vec![SocketAddr::new(lo, free_port(lo)?)],
            workers: 1,
            relay_extra: String::new(),
            gateway_keys,
            admin: SocketAddr::new(lo, free_port(lo)?),
            sections: "[xdp]\nmode = \"off\"\n".into(),
            netns: None,
            log_filter: "warn".into(),
            log_to_file: true,
        })
    }

    /// A relay in `topo`'s relay namespace on its IPv4 and IPv6 addresses at `port`, two
    /// workers, its XDP guard native on the relay's veth, with `xdp_extra` appended to the
    /// `[xdp]` section (more lines, or more sections), its admin listener on
    /// 127.0.0.1:`admin_port` inside the namespace, logging at `info` to its file.
    pub fn native_in(
        topo: &crate::netns::Topology,
        gateway_keys: Vec<(u32, GatewayPublicKey)>,
        port: u16,
        admin_port: u16,
        xdp_extra: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            listen: vec![
                SocketAddr::new(topo.relay_v4().into(), port),
                SocketAddr::new(topo.relay_v6().into(), port),
            ],
            workers: 2,
            admin: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), admin_port),
            sections: format!(
                "[xdp]\nmode = \"native\"\ninterfaces = [\"{}\"]\n{xdp_extra}",
                topo.relay_if
            ),
            netns: Some(topo.relay_ns.clone()),
            log_filter: "info".into(),
            ..Self::loopback(gateway_keys)?
        })
    }

    /// The config file's text; the relay's key is in `relay.key` beside it.
    pub fn text(&self) -> String {
        let listen: Vec<String> = self.listen.iter().map(|a| format!("\"{a}\"")).collect();
        let mut text = format!(
            "[relay]\nid = {}\nlisten = [{}]\nstatic_key = \"relay.key\"\nworkers = {}\n{}\n\n",
            self.relay_id,
            listen.join(", "),
            self.workers,
            self.relay_extra,
        );
        for (kid, key) in &self.gateway_keys {
            text.push_str(&format!(
                "[[gateway_keys]]\nkid = {kid}\npublic_key = \"{key}\"\n\n"
            ));
        }
        text.push_str(&format!(
            "[admin]\nlisten = \"{}\"\n\n{}\n",
            self.admin, self.sections
        ));
        text
    }
}

/// A running relay in a temporary directory (its key, config and log); stopped (SIGTERM,
/// then SIGKILL after five seconds) and the directory removed on drop.
#[derive(Debug)]
pub struct RelayProcess {
    child: Child,
    dir: tempfile::TempDir,
    netns: Option<String>,
    /// Its first UDP listen address.
    pub listen: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
}

impl RelayProcess {
    /// Writes `relay_key` and `config` to a fresh directory, starts `bin` (the `ferry-relay`
    /// binary) on them and waits until `/readyz` says ready.
    pub fn start(
        bin: &Path,
        relay_key: &RelayStaticKey,
        config: &RelayConfig,
    ) -> anyhow::Result<Self> {
        let listen = *config
            .listen
            .first()
            .context("the config listens nowhere")?;
        let dir = crate::temp_dir("relay")?;
        ferry_keyfile::write_secret_file(&dir.path().join("relay.key"), relay_key, true)?;
        std::fs::write(dir.path().join("relay.toml"), config.text())?;
        let mut command = match &config.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        command
            .arg("--config")
            .arg(dir.path().join("relay.toml"))
            .env("RUST_LOG", &config.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if config.log_to_file {
            command.stderr(std::fs::File::create(dir.path().join("relay.log"))?);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} (cargo build -p ferry-relay)", bin.display()))?;
        // `ip netns exec` execs the relay, so the child's pid is the relay's.
        let mut relay = Self {
            child,
            dir,
            netns: config.netns.clone(),
            listen,
            admin: config.admin,
        };
        let deadline = Instant::now() + READY_WITHIN;
        while ok_body(&relay.get("/readyz")).is_none() {
            if let Some(status) = relay.child.try_wait()? {
                bail!("ferry-relay exited ({status}): {}", relay.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "ferry-relay did not become ready within {READY_WITHIN:?}: {}",
                    relay.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(relay)
    }

    /// GET `path` from the admin listener (from inside the relay's namespace if it has one):
    /// the whole response, or empty on failure.
    pub fn get(&self, path: &str) -> String {
        match &self.netns {
            Some(ns) => in_ns(ns, || http_get(self.admin, path)).unwrap_or_default(),
            None => http_get(self.admin, path),
        }
    }

    /// The relay's `/metrics` page (empty if it cannot be fetched).
    pub fn metrics(&self) -> String {
        ok_body(&self.get("/metrics"))
            .unwrap_or_default()
            .to_string()
    }

    /// The process id (of the relay itself, also in a namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file, which a test may rewrite before a SIGHUP.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("relay.toml")
    }

    /// What the relay has logged so far, when it logs to a file.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }

    /// Sends `signal` (a name such as `HUP`) to the relay.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        crate::process::signal(&self.child, signal)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        crate::process::terminate(&mut self.child, Duration::from_secs(5));
    }
}
