//! A real `ferry-gateway` process over HTTPS: a test CA and a server certificate for
//! `localhost` / `127.0.0.1` (rcgen), a signing key and API keys made with the gateway's own
//! CLI, one listed relay, and the process stopped on drop.
//!
//! Cargo gives a test the path of its own crate's binaries only (`CARGO_BIN_EXE_*`), so
//! [`workspace_binary`] builds (if needed) and finds another package's binary in the target
//! directory and profile of the running test.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use ferry_core::keys::{GatewayPublicKey, GatewaySigningKey, RelayStaticKey};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::fixtures::RELAY_ID;

/// How long the gateway may take to print its listen addresses.
const START_WITHIN: Duration = Duration::from_secs(20);

/// Builds `bin` of `package` with cargo (a no-op when it is up to date) in the target directory
/// and profile the running test executable was built in, and returns its path. Only for test
/// executables (`<target>/<profile>/deps/<test>-<hash>`). The build is of every binary and
/// example of the workspace (see [`cargo_build`]).
pub fn workspace_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    cargo_build(package, "--bin", bin, Path::new(bin))
}

/// Like [`workspace_binary`], for example `name` of `package` (`<profile>/examples/<name>`).
pub fn workspace_example(package: &str, name: &str) -> anyhow::Result<PathBuf> {
    cargo_build(
        package,
        "--example",
        name,
        &Path::new("examples").join(name),
    )
}

/// `cargo build --workspace --bins --examples` in the running test's target directory and
/// profile, for `kind` `name` of `package` (named in errors); the built file is
/// `<profile dir>/<built>`.
fn cargo_build(package: &str, kind: &str, name: &str, built: &Path) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in <target>/<profile>/deps")?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .context("the profile directory has no parent")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => bail!("{} is not a profile directory", profile_dir.display()),
    };
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Cargo sets these for the test process; a build script that watches one of them (ring's
    // watches CARGO_MANIFEST_DIR) would otherwise see a change and rebuild.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_for_tests = name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref());
        if set_for_tests {
            cargo.env_remove(name.as_ref());
        }
    }
    // Every binary and example of the workspace, whichever one was asked for: `cargo test
    // --workspace` builds them with the features the whole workspace turns on, and building
    // one package alone would turn on fewer, compiling that package and a few dozen of its
    // dependencies again (docs/architecture.md, "The test suite's time"). So under `cargo
    // test --workspace` this is a no-op.
    let out = cargo
        .args(["build", "--locked", "--workspace", "--bins", "--examples"])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!(
            "cargo build --workspace --bins --examples (for {package}'s {kind} {name}) failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = profile_dir.join(built);
    if !path.is_file() {
        bail!("{} was not built", path.display());
    }
    Ok(path)
}

/// A test CA: its certificate (PEM) and what signs with it.
fn ca(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// The certificate (PEM) of a fresh CA that signed nothing: one a gateway's certificate does
/// not chain to.
pub fn unrelated_ca_pem() -> anyhow::Result<String> {
    Ok(ca("Someone else's CA")?.0)
}

/// Runs the gateway's CLI with `args` and returns its stdout.
fn run(bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "ferry-gateway {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// What [`GatewayProcess::launch`] starts.
#[derive(Clone, Copy, Debug)]
pub struct GatewaySetup<'a> {
    /// The names the server certificate is for (DNS names, or IP addresses written as such).
    pub cert_names: &'a [&'a str],
    /// One API key per `(id, scopes)`.
    pub api_keys: &'a [(&'a str, &'a [&'a str])],
    /// The address of the one listed relay (id [`RELAY_ID`], not probed: healthy), as peers
    /// are told to reach it.
    pub relay_address: SocketAddr,
    /// The listed relay's key.
    pub relay_key: &'a RelayStaticKey,
    /// Appended to the config (more sections, e.g. `[sessions]`).
    pub extra: &'a str,
    /// The network namespace to run in (`ip netns exec`); its listeners are on 127.0.0.1
    /// there.
    pub netns: Option<&'a str>,
}

/// A running `ferry-gateway` in a temporary directory (certificates, keys, config, log),
/// killed and the directory removed on drop.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Child,
    dir: tempfile::TempDir,
    api_keys: Vec<(String, String)>,
    /// Its public HTTPS listener, on 127.0.0.1 (of its namespace, if it has one).
    pub public: SocketAddr,
    /// Its admin listener, on 127.0.0.1 (of its namespace, if it has one).
    pub admin: SocketAddr,
}

impl GatewayProcess {
    /// Starts `bin` (the `ferry-gateway` binary), its certificate for `localhost` and
    /// `127.0.0.1`, with one API key per `(id, scopes)`, one listed
    /// relay (`relay_address`, `relay_key`, id [`RELAY_ID`], not probed: healthy) and
    /// `extra` appended to the config (more sections, e.g. `[sessions]`).
    pub fn start(
        bin: &Path,
        api_keys: &[(&str, &[&str])],
        relay_address: SocketAddr,
        relay_key: &RelayStaticKey,
        extra: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with_names(
            bin,
            &["localhost", "127.0.0.1"],
            api_keys,
            relay_address,
            relay_key,
            extra,
        )
    }

    /// Like [`GatewayProcess::start`], with a server certificate for `cert_names` only (DNS
    /// names, or IP addresses written as such).
    pub fn start_with_names(
        bin: &Path,
        cert_names: &[&str],
        api_keys: &[(&str, &[&str])],
        relay_address: SocketAddr,
        relay_key: &RelayStaticKey,
        extra: &str,
    ) -> anyhow::Result<Self> {
        Self::launch(
            bin,
            &GatewaySetup {
                cert_names,
                api_keys,
                relay_address,
                relay_key,
                extra,
                netns: None,
            },
        )
    }

    /// Starts `bin` (the `ferry-gateway` binary) as `setup` says.
    pub fn launch(bin: &Path, setup: &GatewaySetup<'_>) -> anyhow::Result<Self> {
        let GatewaySetup {
            cert_names,
            api_keys,
            relay_address,
            relay_key,
            extra,
            netns,
        } = *setup;
        let dir = crate::temp_dir("gateway")?;
        let file = |name: &str| dir.path().join(name);
        let (ca_pem, issuer) = ca("Ferry test CA")?;
        let server_key = KeyPair::generate()?;
        let server =
            CertificateParams::new(cert_names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?
                .signed_by(&server_key, &issuer)?;
        std::fs::write(file("ca.crt"), ca_pem)?;
        std::fs::write(file("tls.crt"), server.pem())?;
        crate::write_private(&file("tls.key"), &server_key.serialize_pem())?;
        let path_str = |name: &str| file(name).to_string_lossy().into_owned();
        run(bin, &["keygen", "--out", &path_str("gateway-1.key")])?;
        let mut key_tables = String::new();
        let mut keys = Vec::new();
        for (id, scopes) in api_keys {
            let mut args = vec!["apikey", "new", "--id", id];
            for scope in *scopes {
                args.extend(["--scope", scope]);
            }
            let out = run(bin, &args)?;
            let key = out
                .lines()
                .nth(1)
                .context("apikey new printed no key")?
                .trim()
                .to_string();
            for line in out.lines().skip_while(|l| !l.starts_with("[[api_keys]]")) {
                key_tables.push_str(line);
                key_tables.push('\n');
            }
            key_tables.push('\n');
            keys.push((id.to_string(), key));
        }
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n\n\
             [signing]\nactive_kid = 1\n\n[[signing.keys]]\nkid = 1\nkey_file = \"gateway-1.key\"\n\n\
             {key_tables}\
             [[relays]]\nid = {RELAY_ID}\naddress = \"{relay_address}\"\npublic_key = \"{relay}\"\n\n\
             [relay_health]\nprobe = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{extra}",
            relay = relay_key.public(),
        );
        crate::write_private(&file("gateway.toml"), &config)?;
        let log = std::fs::File::create(file("gateway.log"))?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = command
            .arg("--config")
            .arg(file("gateway.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(START_WITHIN);
        let mut gateway = Self {
            child,
            dir,
            api_keys: keys,
            public: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let Ok(line) = line else {
            bail!(
                "ferry-gateway did not start within {START_WITHIN:?}: {}",
                gateway.log_text()
            );
        };
        let addr = |name: &str| -> anyhow::Result<SocketAddr> {
            let start = line
                .find(&format!("{name}="))
                .with_context(|| format!("no {name}= in {line:?}"))?
                + name.len()
                + 1;
            let rest = &line[start..];
            let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
            Ok(rest.split_whitespace().next().unwrap_or("").parse()?)
        };
        gateway.public = addr("public")?;
        gateway.admin = addr("admin")?;
        Ok(gateway)
    }

    /// The public listener's base URL, by name (`https://localhost:<port>`), as the
    /// certificate names it.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.public.port())
    }

    /// The PEM file of the CA that signed the gateway's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The API key made for `id`, if [`GatewayProcess::start`] was given it.
    pub fn api_key(&self, id: &str) -> Option<&str> {
        self.api_keys
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, key)| key.as_str())
    }

    /// The kid and public key of the gateway's token-signing key, for a relay to trust.
    pub fn gateway_key(&self) -> anyhow::Result<(u32, GatewayPublicKey)> {
        let key: GatewaySigningKey =
            ferry_keyfile::load_secret_file(&self.dir.path().join("gateway-1.key"))?;
        Ok((1, key.public()))
    }

    /// The gateway's log (stderr) so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
