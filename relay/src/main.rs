//! `ferry-relay`: the relay binary. The data path (io_uring workers, issue 5) drives
//! [`ferry_relay::session::SessionTable`]; today the binary manages the relay's key.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_core::keys::{self, RelayStaticKey};

/// Ferry relay: forwards end-to-end encrypted datagrams between two bound peers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the relay's static X25519 key (opens the slot secrets sealed in tokens).
    ///
    /// Writes the secret to OUT with mode 0600 and the public key to OUT.pub; the public key
    /// goes into the gateway's relay registry.
    Keygen {
        /// Where to write the secret key, e.g. /etc/ferry/relay.key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of an existing relay key file.
    Pubkey {
        /// The secret key file.
        key: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Keygen { out, force } => {
            let rng = ring::rand::SystemRandom::new();
            let key = RelayStaticKey::generate(&rng).context("generating the relay key")?;
            let public = keys::write_key_pair(&out, &key, force)?;
            println!(
                "relay key written to {} (public key in {})",
                out.display(),
                public.display()
            );
            println!("public key: {}", key.public());
        }
        Command::Pubkey { key } => {
            let key = RelayStaticKey::load(&key)?;
            println!("{}", key.public());
        }
    }
    Ok(())
}
