//! Keys and tokens as a gateway would hold and mint them.

use std::time::SystemTime;

use anyhow::Context as _;
use ferry_core::keys::{GatewayPublicKey, GatewaySigningKey, RelayPublicKey, RelayStaticKey};
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter};
use ferry_core::wire::Slot;
use ring::rand::SystemRandom;

/// The relay id that tokens from an [`Authority`] are bound to, and that the relay
/// [`crate::relay::RelayConfig`] generates is configured with.
pub const RELAY_ID: u64 = 0x5e1a7;
/// The key id of the [`Authority`]'s gateway signing key.
pub const KID: u32 = 1;

/// A gateway signing key (kid [`KID`]) and a relay key pair, as the gateway would hold them.
#[derive(Debug)]
pub struct Authority {
    /// The random source for keys, tokens and cookies.
    pub rng: SystemRandom,
    /// Mints tokens with the gateway key.
    pub minter: TokenMinter,
    /// The relay's private key.
    pub relay_key: RelayStaticKey,
    /// The relay's public key, which tokens seal slot secrets to.
    pub relay_public: RelayPublicKey,
}

impl Authority {
    /// Fresh keys.
    pub fn new() -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let relay_key = RelayStaticKey::generate(&rng).context("a relay key")?;
        let relay_public = relay_key.public();
        let signing = GatewaySigningKey::generate(&rng).context("a gateway signing key")?;
        Ok(Self {
            minter: TokenMinter::new(KID, signing),
            rng,
            relay_key,
            relay_public,
        })
    }

    /// The gateway key a relay must trust for these tokens: its kid and public key.
    pub fn gateway_key(&self) -> (u32, GatewayPublicKey) {
        (KID, self.minter.public())
    }

    /// A token for `slot` of `session_id` on relay [`RELAY_ID`], valid from five seconds ago
    /// for `lifetime_secs` from now.
    pub fn mint(
        &self,
        session_id: u64,
        slot: Slot,
        lifetime_secs: u64,
    ) -> anyhow::Result<MintedToken> {
        let now = UnixTime::from(SystemTime::now());
        let input = ClaimsInput {
            slot,
            relay_id: RELAY_ID,
            session_id,
            not_before: now.saturating_sub(5),
            expires: now.saturating_add(lifetime_secs),
            rate_bytes_per_sec: 0,
        };
        self.minter
            .mint(&self.rng, &input, &self.relay_public)
            .context("minting a token")
    }
}
