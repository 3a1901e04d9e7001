//! `ferry-gateway`: the gateway binary. This file only wires things together: the CLI, the
//! config, and the server in [`ferry_gateway::server`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_core::keys::GatewaySigningKey;
use ferry_gateway::apikey;
use ferry_gateway::config;

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
            eprintln!("ferry-gateway: {e:#}");
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
