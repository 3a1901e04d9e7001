//! Fuzzes the parsers of operator- and user-supplied key material: the text of every kind of
//! key file (`ferry_core::keys`, docs/config.md) and the known-peers file
//! (`ferry_core::known_peers`).
//!
//! None may panic. What parses must format back to text that parses to the same value:
//! - a public key of each kind formats to a file that parses to the same key;
//! - a secret key of each kind formats to a file that parses to a key with the same public key;
//! - a known-peers file formats to text that parses to the same store.
#![no_main]

use ferry_core::keys::{
    GatewayPublicKey, GatewaySigningKey, PeerPublicKey, PeerStaticKey, RelayPublicKey,
    RelayStaticKey, format_public_key, format_secret_key, parse_public_key, parse_secret_key,
};
use ferry_core::known_peers::KnownPeers;
use libfuzzer_sys::fuzz_target;

/// A public key kind parses, and round-trips through its text.
fn public<K: ferry_core::keys::PublicKey + PartialEq + std::fmt::Debug>(text: &str) {
    if let Ok(key) = parse_public_key::<K>(text) {
        let again = parse_public_key::<K>(&format_public_key(&key)).expect("formatted key parses");
        assert_eq!(again, key);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    public::<GatewayPublicKey>(text);
    public::<RelayPublicKey>(text);
    public::<PeerPublicKey>(text);
    if let Ok(key) = parse_secret_key::<RelayStaticKey>(text) {
        let again: RelayStaticKey =
            parse_secret_key(&format_secret_key(&key)).expect("formatted key parses");
        assert_eq!(again.public(), key.public());
    }
    if let Ok(key) = parse_secret_key::<PeerStaticKey>(text) {
        let again: PeerStaticKey =
            parse_secret_key(&format_secret_key(&key)).expect("formatted key parses");
        assert_eq!(again.public(), key.public());
    }
    if let Ok(key) = parse_secret_key::<GatewaySigningKey>(text) {
        let again: GatewaySigningKey =
            parse_secret_key(&format_secret_key(&key)).expect("formatted key parses");
        assert_eq!(again.public(), key.public());
    }
    if let Ok(peers) = KnownPeers::parse(text) {
        let again = KnownPeers::parse(&peers.to_text()).expect("formatted store parses");
        assert_eq!(again, peers);
    }
});
