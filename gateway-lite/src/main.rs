//! `ferry-gateway`: the gateway binary. This file only wires things together: the CLI, the
//! config, and the server in [`ferry_gateway::server`].

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_core::keys::GatewaySigningKey;
use ferry_gateway::apikey;
use ferry_gateway::config;
use zeroize::Zeroizing;

/// Ferry gateway-lite: authenticates clients and issues relay tokens.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The config file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate a config file (and every file it names), print every problem found, and exit
    /// non-zero if there is one.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
    /// Generate a token-signing Ed25519 key.
    ///
    /// Writes the secret to OUT with mode 0600 and the public key to OUT.pub; the public key
    /// is pinned in every relay's config as a trusted gateway key under its kid.
    Keygen {
        /// Where to write the secret key, e.g. /etc/ferry/gateway-1.key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Prepare a new install: create DIR (mode 0700) with the first signing key
    /// (DIR/gateway-1.key, public key in DIR/gateway-1.key.pub) and a self-signed TLS
    /// certificate (DIR/gateway-tls.crt, its key in DIR/gateway-tls.key, mode 0600), each
    /// unless it already exists.
    ///
    /// Safe to run again: existing files are kept. The shipped config names these files; the
    /// Debian package runs it after install. The certificate is valid for a year for
    /// localhost, 127.0.0.1, ::1, this host's name and every --name; replace it with one
    /// clients trust (docs/operations.md, key rotation).
    Init {
        /// The directory for the keys and the certificate.
        #[arg(long, default_value = "/var/lib/ferry")]
        dir: PathBuf,
        /// More DNS names or IP addresses for the certificate. Repeat for several.
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Print the public key of an existing signing key file.
    Pubkey {
        /// The secret key file.
        key: PathBuf,
    },
    /// Manage API keys.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ApikeyCommand {
    /// Generate an API key: prints the key once (give it to the client; it is stored
    /// nowhere) and the config lines holding only its hash.
    New {
        /// The key id (a-z, 0-9, '-', '_'); random if not given. Logs and revocation use it.
        #[arg(long)]
        id: Option<String>,
        /// What the key may do: create:<realm>, join:<realm> (realm or *), relay:<relay id>.
        /// Repeat for several.
        #[arg(long = "scope", required_unless_present = "admin")]
        scopes: Vec<String>,
        /// Generate the admin listener's bearer token instead (for admin.token_hash).
        #[arg(long, conflicts_with_all = ["scopes", "id"])]
        admin: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => ferry_gateway::server::run(&cli.config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Keygen { out, force } => keygen(&out, force),
        Command::Init { dir, names } => init(&dir, &names),
        Command::Pubkey { key } => ferry_keyfile::load_secret_file::<GatewaySigningKey>(&key)
            .map(|k| println!("{}", k.public()))
            .map_err(anyhow::Error::from),
        Command::Apikey {
            command: ApikeyCommand::New { id, scopes, admin },
        } => apikey_new(id, &scopes, admin),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = ferry_core::error_line::one_line(e.as_ref());
            eprintln!("ferry-gateway: {line}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(out: &Path, force: bool) -> anyhow::Result<()> {
    let rng = ring::rand::SystemRandom::new();
    let key = GatewaySigningKey::generate(&rng).context("generating the gateway signing key")?;
    let public = ferry_keyfile::write_key_pair(out, &key, force)?;
    println!(
        "gateway signing key written to {} (public key in {})",
        out.display(),
        public.display()
    );
    println!("public key: {}", key.public());
    Ok(())
}

/// How long the self-signed certificate of `init` is valid.
const INIT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

fn init(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        if !is_certificate_name(name) {
            anyhow::bail!(
                "--name {name:?}: not a DNS name (letters, digits, '-' and '.') or an IP address"
            );
        }
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join("gateway-1.key");
    if key_path.exists() {
        let key = ferry_keyfile::load_secret_file::<GatewaySigningKey>(&key_path)?;
        println!("gateway signing key {} kept", key_path.display());
        if let Some(public) = ferry_keyfile::write_missing_public_file(&key_path, &key)? {
            println!(
                "its public key was missing: written to {}",
                public.display()
            );
        }
        println!("public key: {}", key.public());
    } else {
        keygen(&key_path, false)?;
    }
    let (cert_path, tls_key_path) = (dir.join("gateway-tls.crt"), dir.join("gateway-tls.key"));
    match (cert_path.exists(), tls_key_path.exists()) {
        (true, true) => {
            println!("TLS certificate {} kept", cert_path.display());
            if !names.is_empty() {
                println!(
                    "--name not applied: the certificate exists (remove {} and {} for a new one)",
                    cert_path.display(),
                    tls_key_path.display()
                );
            }
        }
        (false, false) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let mut all: Vec<String> = Vec::new();
            for name in ["localhost", "127.0.0.1", "::1", host.trim()]
                .into_iter()
                .chain(names.iter().map(String::as_str))
            {
                if !name.is_empty() && !all.iter().any(|n| n == name) {
                    all.push(name.to_owned());
                }
            }
            let (cert, key) = self_signed(&all)?;
            write_new(&tls_key_path, key.as_bytes(), 0o600)?;
            write_new(&cert_path, cert.as_bytes(), 0o644)?;
            println!(
                "self-signed TLS certificate for {} written to {} (key in {})",
                all.join(", "),
                cert_path.display(),
                tls_key_path.display()
            );
        }
        _ => anyhow::bail!(
            "only one of {} and {} exists: remove it, or put its partner next to it",
            cert_path.display(),
            tls_key_path.display()
        ),
    }
    Ok(())
}

/// Whether `name` can stand in a certificate as `--name` asks: an IP address, or a DNS name of
/// dot-separated labels of 1 to 63 letters, digits and hyphens (not at either end), at most
/// 253 characters.
fn is_certificate_name(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A self-signed certificate for `names` (DNS names or IP addresses), valid from now for
/// [`INIT_CERT_VALIDITY`]: the certificate's PEM and its private key's PEM.
fn self_signed(names: &[String]) -> anyhow::Result<(String, Zeroizing<String>)> {
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).context("the certificate's names")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry-gateway (self-signed)");
    params.not_before = SystemTime::now().into();
    params.not_after = params.not_before + INIT_CERT_VALIDITY;
    let key = rcgen::KeyPair::generate().context("generating the certificate's key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the certificate")?;
    Ok((cert.pem(), Zeroizing::new(key.serialize_pem())))
}

/// Writes `bytes` to a new file `path` with `mode`; an existing file is an error.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn check_config(file: &Path) -> anyhow::Result<()> {
    let cfg = config::load(file)?;
    let transport = match cfg.server.transport {
        config::Transport::Tls(_) if cfg.server.client_auth => "HTTPS with client certificates",
        config::Transport::Tls(_) => "HTTPS",
        config::Transport::PlainLoopback => "plain HTTP on loopback",
    };
    println!(
        "{}: ok ({transport} on {}, signing kid {}, {} published key(s), {} API key(s), {} listed relay(s), {} state)",
        file.display(),
        cfg.server.listen,
        cfg.signing.active.kid(),
        cfg.signing.published.len(),
        cfg.api_keys.len(),
        cfg.relays.len(),
        match cfg.state {
            config::StateBackend::Memory { .. } => "memory",
            config::StateBackend::Redis { .. } => "redis",
        },
    );
    for (kid, public) in &cfg.signing.published {
        let role = if *kid == cfg.signing.active.kid() {
            "active"
        } else {
            "published"
        };
        println!("signing key kid {kid} ({role}): {public}");
    }
    for warning in &cfg.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

fn apikey_new(id: Option<String>, scopes: &[String], admin: bool) -> anyhow::Result<()> {
    let rng = ring::rand::SystemRandom::new();
    if admin {
        let key = apikey::generate(&rng, "admin")?;
        println!("admin token (shown once; the gateway keeps only its hash):");
        println!("  {}", key.key.as_str());
        println!();
        println!("put this in the [admin] section of the gateway config:");
        println!("token_hash = \"{}\"", key.hash);
        return Ok(());
    }
    let parsed = scopes
        .iter()
        .map(|s| s.parse::<apikey::Scope>())
        .collect::<Result<Vec<_>, _>>()?;
    let id = match id {
        Some(id) => id,
        None => apikey::random_id(&rng)?,
    };
    let key = apikey::generate(&rng, &id)?;
    let scopes = parsed
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    println!("API key {id} (shown once; the gateway keeps only its hash):");
    println!("  {}", key.key.as_str());
    println!();
    println!("add this to the gateway config (or to auth.key_file):");
    println!("[[api_keys]]");
    println!("id = \"{id}\"");
    println!("hash = \"{}\"", key.hash);
    println!("scopes = [{scopes}]");
    Ok(())
}
