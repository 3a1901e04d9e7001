//! The async peer session: two peers of one session (here in one process; an application runs
//! one per host) connect through the relay, A sends numbered messages, B echoes them, and A
//! prints how many came back and the round-trip times.
//!
//! ```text
//! ferry-peer keygen --out alice.key; ferry-peer keygen --out bob.key
//! ferry-peer create --gateway URL --ca CA --identity alice.key --expect-peer "$(ferry-peer pubkey bob.key)" --out a.grant
//! ferry-peer join --gateway URL --ca CA --identity bob.key --code CODE --out b.grant
//! FERRY_API_KEY=... cargo run -p ferry-peer --example session_echo -- a.grant alice.key b.grant bob.key [COUNT] [GATEWAY CA]
//! ```
//!
//! Each peer is a [`Session`]: `Session::connect` binds the grant's slot, waits for the other
//! peer and runs the Noise handshake, pinning the key the grant names; then the session keeps
//! itself alive (keepalives, renewal and recovery through the gateway when one is given, here
//! with the API key from `FERRY_API_KEY`) until it is closed. Messages go through the
//! [`DatagramLink`] methods `send` and `recv`: unreliable datagrams, as UDP.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_core::keys::PeerStaticKey;
use ferry_core::noise::LocalIdentity;
use ferry_peer::gateway::{ApiKey, GatewayClient, Grant};
use ferry_peer::link::DatagramLink;
use ferry_peer::session::{Renewer, Session, SessionConfig};

/// A session config for the grant and key files, renewing through `renewer` if given.
fn config(
    grant_file: &str,
    key_file: &str,
    renewer: Option<Arc<dyn Renewer>>,
) -> anyhow::Result<SessionConfig> {
    let text =
        std::fs::read_to_string(grant_file).with_context(|| format!("reading {grant_file}"))?;
    let grant = Grant::from_json(&text).with_context(|| format!("reading {grant_file}"))?;
    let key: PeerStaticKey = ferry_keyfile::load_secret_file(Path::new(key_file))?;
    let mut config =
        SessionConfig::new(grant, LocalIdentity::from_secret_bytes(*key.secret_bytes()));
    config.renewer = renewer;
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [grant_a, key_a, grant_b, key_b, rest @ ..] = args.as_slice() else {
        bail!("usage: session_echo A.grant A.key B.grant B.key [COUNT] [GATEWAY CA]");
    };
    let count: u32 = match rest.first() {
        Some(n) => n.parse().context("COUNT")?,
        None => 100,
    };
    let renewer: Option<Arc<dyn Renewer>> = match rest.get(1..3) {
        Some([url, ca]) => {
            let key = std::env::var("FERRY_API_KEY").context("FERRY_API_KEY is not set")?;
            Some(Arc::new(GatewayClient::new(
                url,
                Path::new(ca),
                &ApiKey::new(&key),
            )?))
        }
        _ => None,
    };
    let (a, b) = tokio::join!(
        Session::connect(config(grant_a, key_a, renewer.clone())?),
        Session::connect(config(grant_b, key_b, renewer)?),
    );
    let (a, b) = (a.context("A connecting")?, b.context("B connecting")?);
    println!(
        "connected: session {:016x}, A sees {}, B sees {}",
        a.session_id(),
        a.remote_identity(),
        b.remote_identity()
    );

    // B echoes whatever arrives until its session ends.
    let b = Arc::new(b);
    let echo = {
        let b = b.clone();
        tokio::spawn(async move {
            while let Ok(message) = b.recv().await {
                if b.send(&message).await.is_err() {
                    break;
                }
            }
        })
    };

    let mut rtts = Vec::new();
    for i in 0..count {
        let sent = Instant::now();
        a.send(&i.to_be_bytes()).await?;
        // A datagram may be lost: wait a moment, then go on with the next.
        let deadline = sent + Duration::from_secs(1);
        while let Ok(Ok(back)) = tokio::time::timeout_at(deadline.into(), a.recv()).await {
            if back == i.to_be_bytes() {
                rtts.push(sent.elapsed());
                break;
            }
        }
    }
    rtts.sort_unstable();
    let median = rtts.get(rtts.len() / 2).copied().unwrap_or_default();
    println!(
        "echoed {} of {count}, median round trip {median:?}",
        rtts.len()
    );
    println!("A: {}", a.stats());
    a.close().await;
    // A's CLOSE ends B's session, and with it the echo loop.
    echo.await?;
    println!("B ended: {}", b.end_reason().unwrap_or_default());
    Ok(())
}
