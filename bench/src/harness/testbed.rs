//! A testbed from a config file: a relay on real interfaces, `ferry-bench agent`s on the
//! generator and sink machines ([`super::agent`]), and what to run on them. docs/bench.md
//! describes the file field by field; bench/testbed.example.toml is an example.
//!
//! [`TestbedFile::load`] reads and checks the whole file — every field, every address, every
//! key file — and names every problem it finds at once, before anything runs.
//! [`super::remote`] runs it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use ferry_core::keys::{GatewaySigningKey, RelayPublicKey};
use ferry_core::token::TokenMinter;
use serde::Deserialize;

use super::agent::{MAX_CLOCK_TOLERANCE_NS, Secret};
use super::load::{Pacing, Payload};
use super::paths::PathKind;
use super::scenario::{Plan, Scenario};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    secret_file: PathBuf,
    relay: RawRelay,
    gateway: Option<RawGateway>,
    #[serde(default)]
    agents: Vec<RawAgent>,
    #[serde(default)]
    lanes: Vec<RawLane>,
    #[serde(default)]
    load: RawLoad,
    #[serde(default)]
    baselines: RawBaselines,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    generator_side: SocketAddr,
    sink_side: Option<SocketAddr>,
    admin: SocketAddr,
    id: u64,
    public_key_file: PathBuf,
    command: Option<Vec<String>>,
    #[serde(default = "default_ready_secs")]
    ready_timeout_secs: u64,
}

fn default_ready_secs() -> u64 {
    20
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    signing_key_file: PathBuf,
    kid: u32,
    #[serde(default = "default_lifetime")]
    token_lifetime_secs: u64,
    #[serde(default)]
    session_rate_bytes: u64,
}

fn default_lifetime() -> u64 {
    3000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: String,
    control: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLane {
    generator: String,
    generator_ip: IpAddr,
    sink: String,
    sink_addr: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLoad {
    scenarios: Vec<String>,
    paths: Vec<String>,
    payloads: Vec<String>,
    sessions: u64,
    max_loss: f64,
    trial_seconds: f64,
    latency_seconds: f64,
    search_steps: u32,
    rounds: u32,
    pacing: String,
    burst: usize,
    fractions: Vec<f64>,
    low_rate: u64,
    rates: Vec<u64>,
    generator_cpu: Option<usize>,
    sink_cpu: Option<usize>,
    clock_tolerance_us: u64,
}

impl Default for RawLoad {
    fn default() -> Self {
        Self {
            scenarios: vec!["throughput".into(), "latency".into(), "rates".into()],
            paths: vec!["direct".into(), "ferry".into()],
            payloads: vec!["64".into(), "1200".into()],
            sessions: 16,
            max_loss: 0.001,
            trial_seconds: 2.0,
            latency_seconds: 3.0,
            search_steps: 7,
            rounds: 1,
            pacing: "constant".into(),
            burst: 32,
            fractions: vec![0.1, 0.5, 0.9],
            low_rate: 1000,
            rates: vec![1000, 20_000, 100_000, 200_000],
            generator_cpu: None,
            sink_cpu: None,
            clock_tolerance_us: 1000,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBaselines {
    plain: Option<SocketAddr>,
}

/// The relay under test.
#[derive(Debug)]
pub struct RelaySpec {
    /// Where generators send (the relay's address on their network); slot A binds here.
    pub generator_side: SocketAddr,
    /// Where sinks bind slot B (the relay's address on their network).
    pub sink_side: SocketAddr,
    /// The relay's admin listener: `/readyz` and `/metrics`.
    pub admin: SocketAddr,
    /// `relay.id` of its config: tokens name it.
    pub id: u64,
    /// Its X25519 public key: tokens seal their slot secrets to it.
    pub public_key: RelayPublicKey,
    /// A program and its arguments the coordinator starts (on its own machine) and stops at
    /// the end; `None`: the relay is already running.
    pub command: Option<Vec<String>>,
    /// How long the relay may take to answer `/readyz`, seconds.
    pub ready_timeout_secs: u64,
}

/// What the coordinator mints tokens with, as a gateway would.
#[derive(Debug)]
pub struct GatewaySpec {
    /// Mints with the gateway signing key the relay trusts, under its key id in the relay's
    /// `[[gateway_keys]]`.
    pub minter: TokenMinter,
    /// Tokens' lifetime, seconds.
    pub token_lifetime_secs: u64,
    /// The rate tokens claim per slot, bytes per second (0: the relay's default).
    pub session_rate_bytes: u64,
}

/// An agent.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Its name in the file.
    pub name: String,
    /// Its control address (`ferry-bench agent --listen`).
    pub control: SocketAddr,
}

/// One generator and one sink: the unit that carries sessions.
#[derive(Clone, Debug)]
pub struct LaneSpec {
    /// The generator's agent (index into [`TestbedFile::agents`]).
    pub generator: usize,
    /// The address its socket binds (port chosen by the kernel).
    pub generator_ip: IpAddr,
    /// The sink's agent.
    pub sink: usize,
    /// The address the sink's socket binds; the direct path sends here.
    pub sink_addr: SocketAddr,
}

/// A checked testbed file.
#[derive(Debug)]
pub struct TestbedFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The pre-shared secret of its agents.
    pub secret: Secret,
    /// The relay.
    pub relay: RelaySpec,
    /// The token minting material (required when `ferry` is a path).
    pub gateway: Option<GatewaySpec>,
    /// The agents.
    pub agents: Vec<AgentSpec>,
    /// The lanes.
    pub lanes: Vec<LaneSpec>,
    /// A plain forwarder the operator started (`ferry-plainfwd --listen ADDR --to SINK`).
    pub plain: Option<SocketAddr>,
    /// What to run. Sessions are per lane; `load_cpu` is the generators' CPU.
    pub plan: Plan,
    /// The sinks' CPU.
    pub sink_cpu: Option<usize>,
    /// The generators' CPU.
    pub generator_cpu: Option<usize>,
    /// How far two agents' clocks may differ, nanoseconds.
    pub clock_tolerance_ns: u64,
}

/// The paths a testbed can measure.
pub const TESTBED_PATHS: [PathKind; 3] = [PathKind::Direct, PathKind::Plain, PathKind::Ferry];

impl TestbedFile {
    /// Reads and checks the file at `path`; relative paths in it are relative to its
    /// directory. The error lists every problem found.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        // A regular file (a FIFO would block the read) of bounded length.
        let text = ferry_keyfile::read_text_file(path, ferry_keyfile::MAX_CONFIG_FILE)
            .with_context(|| format!("reading the testbed file {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir)
            .map(|mut t| {
                t.path = path.to_path_buf();
                t
            })
            .with_context(|| format!("the testbed file {}", path.display()))
    }

    /// Parses and checks `text`; relative paths are relative to `dir`.
    pub fn parse(text: &str, dir: &Path) -> anyhow::Result<Self> {
        let raw: Raw = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut problems: Vec<String> = Vec::new();
        let mut problem = |p: String| problems.push(p);
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };

        let secret = Secret::load(&resolve(&raw.secret_file))
            .map_err(|e| problem(format!("secret_file: {e:#}")))
            .ok();

        // The relay.
        let r = &raw.relay;
        if r.id == 0 {
            problem("relay.id: 0 is not a relay id".into());
        }
        for (field, addr) in [
            ("relay.generator_side", Some(r.generator_side)),
            ("relay.sink_side", r.sink_side),
            ("relay.admin", Some(r.admin)),
        ] {
            if let Some(a) = addr
                && (a.port() == 0 || a.ip().is_unspecified())
            {
                problem(format!("{field}: {a} needs an address and a port"));
            }
        }
        if let Some(cmd) = &r.command
            && cmd.first().is_none_or(|p| p.is_empty())
        {
            problem("relay.command: the program's path comes first".into());
        }
        if !(1..=600).contains(&r.ready_timeout_secs) {
            problem("relay.ready_timeout_secs: 1 to 600".into());
        }
        let public_key =
            ferry_keyfile::load_public_file::<RelayPublicKey>(&resolve(&r.public_key_file))
                .map_err(|e| problem(format!("relay.public_key_file: {e}")))
                .ok();

        // The gateway.
        let gateway = raw.gateway.as_ref().and_then(|g| {
            if !(60..=86_400).contains(&g.token_lifetime_secs) {
                problem("gateway.token_lifetime_secs: 60 to 86,400".into());
            }
            ferry_keyfile::load_secret_file::<GatewaySigningKey>(&resolve(&g.signing_key_file))
                .map_err(|e| problem(format!("gateway.signing_key_file: {e}")))
                .ok()
                .map(|signing_key| GatewaySpec {
                    minter: TokenMinter::new(g.kid, signing_key),
                    token_lifetime_secs: g.token_lifetime_secs,
                    session_rate_bytes: g.session_rate_bytes,
                })
        });

        // Agents and lanes.
        if raw.agents.is_empty() {
            problem("[[agents]]: at least one".into());
        }
        let mut names = HashSet::new();
        let mut controls = HashSet::new();
        for (i, a) in raw.agents.iter().enumerate() {
            if a.name.is_empty()
                || !a
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problem(format!(
                    "agents[{i}].name: {:?}: letters, digits, - and _",
                    a.name
                ));
            }
            if !names.insert(a.name.as_str()) {
                problem(format!("agents[{i}].name: {:?} twice", a.name));
            }
            if a.control.port() == 0 || a.control.ip().is_unspecified() {
                problem(format!(
                    "agents[{i}].control: {} needs an address and a port",
                    a.control
                ));
            }
            if !controls.insert(a.control) {
                problem(format!("agents[{i}].control: {} twice", a.control));
            }
        }
        let agent_index = |name: &str| raw.agents.iter().position(|a| a.name == name);
        if raw.lanes.is_empty() {
            problem("[[lanes]]: at least one".into());
        }
        let mut lanes = Vec::new();
        let mut sinks = HashSet::new();
        for (i, l) in raw.lanes.iter().enumerate() {
            let generator = agent_index(&l.generator);
            let sink = agent_index(&l.sink);
            if generator.is_none() {
                problem(format!(
                    "lanes[{i}].generator: no agent named {:?}",
                    l.generator
                ));
            }
            if sink.is_none() {
                problem(format!("lanes[{i}].sink: no agent named {:?}", l.sink));
            }
            if l.sink_addr.port() == 0 || l.sink_addr.ip().is_unspecified() {
                problem(format!(
                    "lanes[{i}].sink_addr: {} needs an address and a port",
                    l.sink_addr
                ));
            }
            if !sinks.insert(l.sink_addr) {
                problem(format!(
                    "lanes[{i}].sink_addr: {} is another lane's",
                    l.sink_addr
                ));
            }
            if l.generator_ip.is_unspecified() {
                problem(format!(
                    "lanes[{i}].generator_ip: name the address generators send from"
                ));
            }
            if let (Some(generator), Some(sink)) = (generator, sink) {
                lanes.push(LaneSpec {
                    generator,
                    generator_ip: l.generator_ip,
                    sink,
                    sink_addr: l.sink_addr,
                });
            }
        }
        let sink_side = r.sink_side.unwrap_or(r.generator_side);

        // The load.
        let load = &raw.load;
        let mut scenarios = Vec::new();
        for s in &load.scenarios {
            match s.as_str() {
                "throughput" => scenarios.push(Scenario::Throughput),
                "latency" => scenarios.push(Scenario::Latency),
                "rates" => scenarios.push(Scenario::Rates),
                "scale" | "flood" => problem(format!(
                    "load.scenarios: {s:?} runs only on the namespace topology (ferry-bench run {s})"
                )),
                other => problem(format!(
                    "load.scenarios: {other:?}: throughput, latency or rates"
                )),
            }
        }
        if scenarios.is_empty() {
            problem("load.scenarios: at least one".into());
        }
        let mut paths = Vec::new();
        for p in &load.paths {
            match TESTBED_PATHS.iter().find(|k| k.name() == p) {
                Some(k) if paths.contains(k) => problem(format!("load.paths: {p:?} twice")),
                Some(k) => paths.push(*k),
                None => problem(format!(
                    "load.paths: {p:?}: direct, plain or ferry (tokio and coturn run only on the \
                     namespace topology)"
                )),
            }
        }
        if paths.is_empty() {
            problem("load.paths: at least one".into());
        }
        if paths.contains(&PathKind::Ferry) && gateway.is_none() && raw.gateway.is_none() {
            problem("[gateway]: the ferry path needs a signing key to mint tokens".into());
        }
        if paths.contains(&PathKind::Plain) {
            match raw.baselines.plain {
                None => problem(
                    "baselines.plain: the plain path needs the address of a plain forwarder \
                     (ferry-plainfwd --listen ADDR --to SINK_ADDR)"
                        .into(),
                ),
                Some(a) if a.port() == 0 || a.ip().is_unspecified() => {
                    problem(format!("baselines.plain: {a} needs an address and a port"))
                }
                Some(_) => {}
            }
            if raw.lanes.len() != 1 {
                problem(
                    "load.paths: plain needs exactly one lane (a plain forwarder sends everything \
                     to one sink)"
                        .into(),
                );
            }
        }
        if paths.contains(&PathKind::Ferry) {
            // The relay answers each side's binds from the address that side reaches.
            for (i, l) in raw.lanes.iter().enumerate() {
                if l.generator_ip.is_ipv4() != r.generator_side.is_ipv4() {
                    problem(format!(
                        "lanes[{i}].generator_ip: {} is not of relay.generator_side's family",
                        l.generator_ip
                    ));
                }
                if l.sink_addr.is_ipv4() != sink_side.is_ipv4() {
                    problem(format!(
                        "lanes[{i}].sink_addr: {} is not of relay.sink_side's family",
                        l.sink_addr
                    ));
                }
            }
        }
        let payloads: Vec<Payload> = load
            .payloads
            .iter()
            .filter_map(|p| {
                Payload::parse(p)
                    .map_err(|e| problem(format!("load.payloads: {e}")))
                    .ok()
            })
            .collect();
        if load.payloads.is_empty() {
            problem("load.payloads: at least one".into());
        }
        if !(1..=100_000).contains(&load.sessions) {
            problem(format!(
                "load.sessions: {} (1 to 100,000 per lane)",
                load.sessions
            ));
        }
        if !(0.0..1.0).contains(&load.max_loss) {
            problem(format!(
                "load.max_loss: {} is a fraction in [0, 1)",
                load.max_loss
            ));
        }
        for (field, s) in [
            ("load.trial_seconds", load.trial_seconds),
            ("load.latency_seconds", load.latency_seconds),
        ] {
            if !(0.1..=600.0).contains(&s) {
                problem(format!("{field}: {s} (0.1 to 600 s)"));
            }
        }
        if !(1..=20).contains(&load.rounds) {
            problem(format!("load.rounds: {} (1 to 20)", load.rounds));
        }
        if load.search_steps > 30 {
            problem(format!(
                "load.search_steps: {} (at most 30)",
                load.search_steps
            ));
        }
        let pacing = match load.pacing.as_str() {
            "constant" => Pacing::Constant,
            "bursty" if (1..=1024).contains(&load.burst) => Pacing::Bursty { burst: load.burst },
            "bursty" => {
                problem(format!("load.burst: {} (1 to 1024)", load.burst));
                Pacing::Constant
            }
            other => {
                problem(format!("load.pacing: {other:?}: constant or bursty"));
                Pacing::Constant
            }
        };
        if let Some(f) = load.fractions.iter().find(|f| !(**f > 0.0 && **f <= 1.0)) {
            problem(format!("load.fractions: {f} (above 0, at most 1)"));
        }
        if load.low_rate == 0 {
            problem("load.low_rate: above 0".into());
        }
        if load.rates.contains(&0)
            || (scenarios.contains(&Scenario::Rates) && load.rates.is_empty())
        {
            problem("load.rates: one or more rates above 0".into());
        }
        if load.clock_tolerance_us.saturating_mul(1000) > MAX_CLOCK_TOLERANCE_NS {
            problem(format!(
                "load.clock_tolerance_us: {} (at most 1,000,000)",
                load.clock_tolerance_us
            ));
        }

        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        let (Some(secret), Some(public_key)) = (secret, public_key) else {
            bail!("the key files could not be read");
        };
        scenarios.sort();
        Ok(Self {
            path: PathBuf::new(),
            secret,
            relay: RelaySpec {
                generator_side: r.generator_side,
                sink_side,
                admin: r.admin,
                id: r.id,
                public_key,
                command: r.command.clone(),
                ready_timeout_secs: r.ready_timeout_secs,
            },
            gateway,
            agents: raw
                .agents
                .iter()
                .map(|a| AgentSpec {
                    name: a.name.clone(),
                    control: a.control,
                })
                .collect(),
            lanes,
            plain: raw.baselines.plain,
            plan: Plan {
                profile: "custom".into(),
                scenarios,
                payloads,
                paths,
                require_all_paths: true,
                sessions: load.sessions as usize,
                max_loss: load.max_loss,
                trial_seconds: load.trial_seconds,
                latency_seconds: load.latency_seconds,
                search_steps: load.search_steps,
                pacing,
                latency_fractions: load.fractions.clone(),
                low_rate: load.low_rate,
                fixed_rates: load.rates.clone(),
                scale_sessions: Vec::new(),
                flood_legit_rate: 1,
                relay_cpu: 0,
                load_cpu: load.generator_cpu.unwrap_or(0),
                max_workers: 1,
                gso: true,
                flood_xdp: false,
                // Not on a testbed: the probe needs the relay's gateway key in this process.
                probe_rate: 0,
                probe_timeout: std::time::Duration::ZERO,
                rounds: load.rounds,
            },
            sink_cpu: load.sink_cpu,
            generator_cpu: load.generator_cpu,
            clock_tolerance_ns: load.clock_tolerance_us * 1000,
        })
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::keys::RelayStaticKey;
    use ring::rand::SystemRandom;

    use super::*;

    /// A directory with a secret file and both key files, as the example expects them.
    fn keys() -> ferry_testkit::TempDir {
        let dir = ferry_testkit::temp_dir("testbed-keys").expect("dir");
        let rng = SystemRandom::new();
        let relay = RelayStaticKey::generate(&rng).expect("relay key");
        ferry_keyfile::write_public_file(&dir.path().join("relay.key.pub"), &relay.public(), true)
            .expect("relay public");
        let gateway = GatewaySigningKey::generate(&rng).expect("gateway key");
        ferry_keyfile::write_secret_file(&dir.path().join("gateway.key"), &gateway, true)
            .expect("gateway key file");
        let secret = dir.path().join("agent.secret");
        std::fs::write(&secret, "s3cret-s3cret-s3cret-s3cret-s3cret\n").expect("secret");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        dir
    }

    const EXAMPLE: &str = include_str!("../../testbed.example.toml");

    #[test]
    fn the_example_file_is_valid() {
        let dir = keys();
        let t = TestbedFile::parse(EXAMPLE, dir.path()).expect("the example is valid");
        assert_eq!(t.lanes.len(), 1);
        assert_eq!(
            t.plan.paths,
            [PathKind::Direct, PathKind::Plain, PathKind::Ferry]
        );
        assert!(t.gateway.is_some());
        assert_eq!(t.plan.profile, "custom");
    }

    fn error_of(text: &str) -> String {
        let dir = keys();
        format!(
            "{:#}",
            TestbedFile::parse(text, dir.path()).expect_err("an invalid file")
        )
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let bad = EXAMPLE
            .replace("id = 385447", "id = 0")
            .replace("name = \"gen1\"", "name = \"gen 1\"")
            .replace(
                "payloads = [\"64\", \"1200\"]",
                "payloads = [\"4\", \"huge\"]",
            )
            .replace("max_loss = 0.001", "max_loss = 1.5")
            .replace(
                "scenarios = [\"throughput\", \"latency\", \"rates\"]",
                "scenarios = [\"flood\"]",
            );
        let err = error_of(&bad);
        for says in [
            "relay.id: 0",
            "agents[0].name: \"gen 1\"",
            "lanes[0].generator: no agent named \"gen1\"",
            "load.payloads: payload 4",
            "load.payloads: payload \"huge\"",
            "load.max_loss: 1.5",
            "\"flood\" runs only on the namespace topology",
        ] {
            assert!(err.contains(says), "{says:?} not in:\n{err}");
        }
    }

    #[test]
    fn unknown_fields_bad_addresses_and_missing_pieces_are_refused() {
        for (change, says) in [
            (("[relay]", "[relay]\nlisten = 1"), "unknown field `listen`"),
            (
                ("admin = \"127.0.0.1:9477\"", "admin = \"nowhere\""),
                "invalid socket address",
            ),
            (
                ("admin = \"127.0.0.1:9477\"", "admin = \"127.0.0.1:0\""),
                "relay.admin",
            ),
            (
                ("\"direct\", \"plain\", \"ferry\"", "\"direct\", \"coturn\""),
                "namespace topology",
            ),
            (("plain = \"198.18.0.1:7100\"", ""), "baselines.plain"),
            (
                (
                    "signing_key_file = \"gateway.key\"",
                    "signing_key_file = \"missing.key\"",
                ),
                "gateway.signing_key_file",
            ),
            (
                (
                    "secret_file = \"agent.secret\"",
                    "secret_file = \"gateway.key.none\"",
                ),
                "secret_file",
            ),
            (("sessions = 16", "sessions = 0"), "load.sessions"),
            (
                ("pacing = \"constant\"", "pacing = \"jumpy\""),
                "load.pacing",
            ),
            (
                ("clock_tolerance_us = 1000", "clock_tolerance_us = 5000000"),
                "clock_tolerance_us",
            ),
            (
                (
                    "generator_ip = \"198.18.0.2\"",
                    "generator_ip = \"2001:db8::2\"",
                ),
                "family",
            ),
            (
                ("sink = \"sink1\"", "sink = \"nobody\""),
                "no agent named \"nobody\"",
            ),
        ] {
            let err = error_of(&EXAMPLE.replace(change.0, change.1));
            assert!(err.contains(says), "{change:?}: {says:?} not in:\n{err}");
        }
        // The ferry path without a [gateway] section.
        let start = EXAMPLE.find("[gateway]").expect("gateway section");
        let end = start + EXAMPLE[start..].find("\n\n").expect("its end");
        let err = error_of(&format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]));
        assert!(err.contains("[gateway]: the ferry path needs"), "{err}");
    }
}
