//! `ferry-gateway`: the gateway binary. Tokens are minted with
//! [`ferry_core::token::TokenMinter`]; its HTTPS API arrives with issue 7; today the binary manages the signing key.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_core::keys::{self, GatewaySigningKey};

/// Ferry gateway-lite: authenticates clients and issues relay tokens.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the gateway's Ed25519 token-signing key.
    ///
    /// Writes the secret to OUT with mode 0600 and the public key to OUT.pub; the public key
    /// is pinned in every relay's config as a trusted gateway key.
    Keygen {
        /// Where to write the secret key, e.g. /etc/ferry/gateway.key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of an existing gateway signing key file.
    Pubkey {
        /// The secret key file.
        key: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Keygen { out, force } => {
            let rng = ring::rand::SystemRandom::new();
            let key =
                GatewaySigningKey::generate(&rng).context("generating the gateway signing key")?;
            let public = keys::write_key_pair(&out, &key, force)?;
            println!(
                "gateway signing key written to {} (public key in {})",
                out.display(),
                public.display()
            );
            println!("public key: {}", key.public());
        }
        Command::Pubkey { key } => {
            let key = GatewaySigningKey::load(&key)?;
            println!("{}", key.public());
        }
    }
    Ok(())
}
