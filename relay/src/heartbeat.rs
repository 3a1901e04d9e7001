//! Heartbeats to a gateway (`[heartbeat]`): every `interval_secs`, a `POST /v1/relays/heartbeat`
//! over HTTPS with the relay's id, public address, public key and load (live sessions against
//! `limits.max_sessions`), so that the gateway can register it and hand out the least loaded
//! relay (docs/gateway-api.md, *Relay registry*). The gateway hands a registered relay out only
//! once its own probe has checked that this relay holds the private key of the key reported.
//!
//! The client trusts only the certificates of `ca_file` (not the system's roots) and sends the
//! API key (`relay:<id>` scope) from `api_key_file`, which must be readable by its owner only.
//! A failed heartbeat is logged when the gateway starts failing and when it answers again, and
//! counted in `ferry_heartbeats_total{result="error"}`; the relay keeps forwarding either way.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use zeroize::Zeroizing;

/// How long one heartbeat request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The validated `[heartbeat]` section.
#[derive(Clone)]
pub struct HeartbeatSettings {
    /// `https://host[:port]` of the gateway, without a path.
    pub gateway_url: String,
    /// Where the API key came from.
    pub api_key_file: PathBuf,
    /// The API key (`fgk1.<id>.<secret>`).
    pub api_key: Zeroizing<String>,
    /// Where the trusted CA certificates came from.
    pub ca_file: PathBuf,
    /// The CA certificates, PEM.
    pub ca_pem: Vec<u8>,
    /// The UDP address peers reach this relay at, as reported.
    pub address: SocketAddr,
    /// Time between heartbeats.
    pub interval: Duration,
}

impl fmt::Debug for HeartbeatSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatSettings")
            .field("gateway_url", &self.gateway_url)
            .field("api_key_file", &self.api_key_file)
            .field("api_key", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("address", &self.address)
            .field("interval", &self.interval)
            .finish()
    }
}

/// Whether `pem` holds at least one certificate the HTTPS client accepts.
pub fn check_ca(pem: &[u8]) -> Result<(), String> {
    match reqwest::Certificate::from_pem_bundle(pem) {
        Ok(certs) if !certs.is_empty() => Ok(()),
        Ok(_) => Err("no CERTIFICATE block".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Heartbeats sent and failed, for `/metrics`.
#[derive(Debug, Default)]
pub struct HeartbeatStats {
    /// Heartbeats the gateway accepted.
    pub sent: AtomicU64,
    /// Heartbeats that failed (no answer, TLS, or a refusal).
    pub failed: AtomicU64,
}

impl HeartbeatStats {
    /// The `/metrics` families: `ferry_heartbeats_total{result="ok"|"error"}`.
    pub fn metrics_page(&self) -> String {
        crate::metrics::page(HeartbeatCounts {
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        })
    }
}

/// The counts one scrape shows.
#[derive(Debug)]
struct HeartbeatCounts {
    sent: u64,
    failed: u64,
}

impl prometheus_client::collector::Collector for HeartbeatCounts {
    fn encode(&self, encoder: prometheus_client::encoding::DescriptorEncoder) -> fmt::Result {
        crate::metrics::Families(encoder).counters(
            "ferry_heartbeats",
            "Heartbeats to the gateway ([heartbeat]), by result.",
            [
                ([("result", "ok")], self.sent),
                ([("result", "error")], self.failed),
            ],
        )
    }
}

/// What one heartbeat reports.
#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    relay_id: u64,
    address: String,
    public_key: &'a str,
    sessions: u64,
    capacity: u64,
}

/// The relay's side of the heartbeat: who it is and how to read its load.
pub struct Reporter {
    /// The relay id.
    pub relay_id: u64,
    /// Its static public key, base64.
    pub public_key: String,
    /// `limits.max_sessions`.
    pub capacity: u64,
    /// Live sessions now.
    pub load: Box<dyn Fn() -> u64 + Send>,
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reporter")
            .field("relay_id", &self.relay_id)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Starts the heartbeat thread; it sends the first heartbeat at once and stops when `stop` is
/// set. Fails only if the HTTPS client cannot be built.
pub fn start(
    settings: HeartbeatSettings,
    reporter: Reporter,
    stop: Arc<AtomicBool>,
    stats: Arc<HeartbeatStats>,
) -> anyhow::Result<JoinHandle<()>> {
    let client = client(&settings)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the heartbeat's runtime")?;
    std::thread::Builder::new()
        .name("ferry-heartbeat".into())
        .spawn(move || {
            let url = format!("{}/v1/relays/heartbeat", settings.gateway_url);
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let report = Report {
                    relay_id: reporter.relay_id,
                    address: settings.address.to_string(),
                    public_key: &reporter.public_key,
                    sessions: (reporter.load)(),
                    capacity: reporter.capacity,
                };
                match runtime.block_on(send(&client, &url, &settings.api_key, &report)) {
                    Ok(()) => {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                        if std::mem::take(&mut failing) {
                            tracing::info!(gateway = %settings.gateway_url, "heartbeats accepted again");
                        }
                    }
                    Err(e) => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(
                                gateway = %settings.gateway_url,
                                error = %e,
                                "heartbeat failed; retrying every interval"
                            );
                        }
                    }
                }
                while !stop.load(Ordering::Relaxed) && started.elapsed() < settings.interval {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .context("spawning the heartbeat thread")
}

/// The HTTPS client: the CA file's certificates only, no redirects, a request timeout.
fn client(settings: &HeartbeatSettings) -> anyhow::Result<reqwest::Client> {
    let certs = reqwest::Certificate::from_pem_bundle(&settings.ca_pem)
        .with_context(|| format!("reading {}", settings.ca_file.display()))?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(true)
        .tls_built_in_root_certs(false)
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none());
    for cert in certs {
        builder = builder.add_root_certificate(cert);
    }
    builder
        .build()
        .context("building the heartbeat's HTTPS client")
}

/// Sends one heartbeat; an error says why it was not accepted.
async fn send(
    client: &reqwest::Client,
    url: &str,
    api_key: &str,
    report: &Report<'_>,
) -> Result<(), String> {
    let bearer = Zeroizing::new(format!("Bearer {api_key}"));
    let mut auth = reqwest::header::HeaderValue::from_str(&bearer)
        .map_err(|_| "the API key is not a valid header value".to_string())?;
    auth.set_sensitive(true);
    let response = client
        .post(url)
        .header(reqwest::header::AUTHORIZATION, auth)
        .json(report)
        .send()
        .await
        .map_err(|e| ferry_core::error_line::one_line(&e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    // The gateway's error body is `{"error": "<code>", ...}`; anything else is shown as is.
    let body = response.text().await.unwrap_or_default();
    let code = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or(body);
    Err(format!("the gateway answered {status}: {code}"))
}
