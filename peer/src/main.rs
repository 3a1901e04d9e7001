//! `ferry-peer`: the endpoint CLI. Manages the peer's identity key and its known-peers file.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_core::keys::{self, PeerStaticKey};

/// Ferry peer: an endpoint that talks to another peer through a Ferry relay.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the peer's static X25519 identity key (its Noise static key).
    Keygen {
        /// Where to write the secret key; the public key goes to OUT.pub.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key (the identity other peers pin) of a peer key file.
    Pubkey {
        /// The secret key file.
        key: PathBuf,
    },
    /// The peers trusted on first use.
    KnownPeers {
        /// The known-peers file.
        #[arg(long, default_value_os_t = default_known_peers())]
        file: PathBuf,
        #[command(subcommand)]
        action: KnownPeersAction,
    },
}

#[derive(Debug, Subcommand)]
enum KnownPeersAction {
    /// List every remembered peer and its key.
    List,
    /// Forget a peer, so that its next key is trusted on first use again.
    Forget {
        /// The peer's name.
        name: String,
    },
}

fn default_known_peers() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("ferry").join("known-peers")
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Keygen { out, force } => {
            let rng = ring::rand::SystemRandom::new();
            let key = PeerStaticKey::generate(&rng).context("generating the peer key")?;
            let public = ferry_keyfile::write_key_pair(&out, &key, force)?;
            println!(
                "peer key written to {} (public key in {})",
                out.display(),
                public.display()
            );
            println!("identity: {}", key.public());
        }
        Command::Pubkey { key } => {
            let key: PeerStaticKey = ferry_keyfile::load_secret_file(&key)?;
            println!("{}", key.public());
        }
        Command::KnownPeers { file, action } => {
            let mut known =
                ferry_keyfile::load_known_peers(&file).context("reading the known-peers file")?;
            match action {
                KnownPeersAction::List => {
                    for (name, key) in known.list() {
                        println!("{name} {}", keys::PeerPublicKey::from_bytes(*key));
                    }
                }
                KnownPeersAction::Forget { name } => {
                    if !known.forget(&name) {
                        anyhow::bail!("no peer named {name:?} in {}", file.display());
                    }
                    ferry_keyfile::save_known_peers(&file, &known)
                        .context("writing the known-peers file")?;
                    println!("forgot {name}");
                }
            }
        }
    }
    Ok(())
}
