//! Shared set-up for the gateway's integration tests: a directory with generated keys and
//! certificates, the real `ferry-gateway` binary started on it, and HTTPS clients.
#![allow(dead_code, clippy::unwrap_used)] // shared by several test crates; a failed unwrap fails the test

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_core::keys::{GatewaySigningKey, RelayStaticKey};
use ferry_core::time::UnixTime;
use ferry_core::token::{TokenError, TokenVerifier, VerifiedToken, VerifierConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use ring::rand::SystemRandom;

pub use ferry_testkit::fixtures::RELAY_ID;

pub fn write_file(path: &Path, text: &str, mode: u32) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A test CA with a server certificate for localhost / 127.0.0.1 and a client certificate.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// Client certificate and key, PEM, for mTLS.
    pub client_identity_pem: String,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

impl Pki {
    pub fn new() -> Self {
        let (ca_pem, issuer) = ca("Ferry test CA");
        let server_key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let server = params.signed_by(&server_key, &issuer).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "test client");
        let client = params.signed_by(&client_key, &issuer).unwrap();
        Self {
            ca_pem,
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_identity_pem: format!("{}{}", client.pem(), client_key.serialize_pem()),
        }
    }

    /// A client certificate from another CA than the gateway trusts.
    pub fn foreign_identity_pem() -> String {
        let (_, issuer) = ca("Someone else's CA");
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        format!("{}{}", cert.pem(), key.serialize_pem())
    }
}

/// Everything a gateway needs on disk: TLS files, two signing keys, a relay key.
pub struct Setup {
    /// Where every file of the setup lives; removed on drop.
    pub dir: ferry_testkit::TempDir,
    pub pki: Pki,
    pub relay_key: RelayStaticKey,
    pub signing: Vec<(u32, GatewaySigningKey)>,
    /// `(id, key)` of every API key written to the config, by id.
    pub api_keys: Vec<(String, String)>,
    pub admin_token: String,
    api_key_lines: String,
    admin_hash: String,
}

pub fn run_cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-gateway"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Setup {
    pub fn new(name: &str) -> Self {
        let dir = ferry_testkit::temp_dir(&format!("gw-test-{name}")).unwrap();
        let pki = Pki::new();
        write_file(&dir.path().join("tls.crt"), &pki.server_cert_pem, 0o644);
        write_file(&dir.path().join("tls.key"), &pki.server_key_pem, 0o600);
        write_file(&dir.path().join("clients-ca.crt"), &pki.ca_pem, 0o644);
        let rng = SystemRandom::new();
        let relay_key = RelayStaticKey::generate(&rng).unwrap();
        let mut signing = Vec::new();
        for kid in [1u32, 2] {
            let path = dir.path().join(format!("gateway-{kid}.key"));
            run_cli(&["keygen", "--out", path.to_str().unwrap()]);
            signing.push((
                kid,
                ferry_keyfile::load_secret_file::<GatewaySigningKey>(&path).unwrap(),
            ));
        }
        let admin = run_cli(&["apikey", "new", "--admin"]);
        let admin_token = admin.lines().nth(1).unwrap().trim().to_string();
        let admin_hash = admin
            .lines()
            .find(|l| l.starts_with("token_hash"))
            .unwrap()
            .to_string();
        let mut setup = Self {
            dir,
            pki,
            relay_key,
            signing,
            api_keys: Vec::new(),
            admin_token,
            api_key_lines: String::new(),
            admin_hash,
        };
        setup.add_key("app", &["create:*", "join:*"]);
        setup.add_key("acme", &["create:acme", "join:acme"]);
        setup.add_key("listed-relay", &[&format!("relay:{RELAY_ID}")]);
        setup
    }

    /// The path of `name` in the setup's directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Generates an API key with the CLI and adds it to the config.
    pub fn add_key(&mut self, id: &str, scopes: &[&str]) -> String {
        let mut args = vec!["apikey", "new", "--id", id];
        for s in scopes {
            args.push("--scope");
            args.push(s);
        }
        let out = run_cli(&args);
        let key = out.lines().nth(1).unwrap().trim().to_string();
        let table: String = out
            .lines()
            .skip_while(|l| !l.starts_with("[[api_keys]]"))
            .map(|l| format!("{l}\n"))
            .collect();
        self.api_key_lines.push_str(&table);
        self.api_key_lines.push('\n');
        self.api_keys.push((id.to_string(), key.clone()));
        key
    }

    /// The `[[api_keys]]` table of key `id`, as in the config text.
    pub fn key_table(&self, id: &str) -> String {
        let start = self
            .api_key_lines
            .find(&format!("[[api_keys]]\nid = \"{id}\"\n"))
            .unwrap();
        let rest = &self.api_key_lines[start..];
        rest[..rest.find("\n\n").unwrap() + 1].to_string()
    }

    pub fn key(&self, id: &str) -> &str {
        &self.api_keys.iter().find(|(i, _)| i == id).unwrap().1
    }

    /// The config text: HTTPS on an ephemeral loopback port, both signing keys listed with
    /// `active_kid` active, one relay, and `extra` appended (more sections).
    pub fn config(&self, active_kid: u32, extra: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n\n\
             [signing]\nactive_kid = {active_kid}\n\n\
             [[signing.keys]]\nkid = 1\nkey_file = \"gateway-1.key\"\n\n\
             [[signing.keys]]\nkid = 2\nkey_file = \"gateway-2.key\"\n\n\
             {keys}\n\
             [[relays]]\nid = {RELAY_ID}\naddress = \"127.0.0.1:7000\"\npublic_key = \"{relay}\"\n\n\
             [relay_health]\nprobe = false\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{admin_hash}\n\n{extra}",
            keys = self.api_key_lines,
            relay = self.relay_key.public(),
            admin_hash = self.admin_hash,
        )
    }

    /// Writes `config` and starts the gateway on it.
    pub fn start(&self, name: &str, config: &str) -> Gateway {
        let path = self.file(&format!("{name}.toml"));
        write_file(&path, config, 0o600);
        Gateway::start(&path, &self.file(&format!("{name}.log")))
    }

    /// A token verifier as relay `RELAY_ID` trusting the given kids.
    pub fn verifier(&self, kids: &[u32]) -> TokenVerifier {
        let mut v =
            TokenVerifier::new(VerifierConfig::new(RELAY_ID), self.relay_key.clone()).unwrap();
        for (kid, key) in &self.signing {
            if kids.contains(kid) {
                v.add_trusted_key(*kid, key.public());
            }
        }
        v
    }
}

/// Verifies a base64 token as the relay would for `session_id` and `slot`.
pub fn verify(
    verifier: &TokenVerifier,
    token_b64: &str,
    session_hex: &str,
    slot: u8,
) -> Result<VerifiedToken, TokenError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token_b64)
        .unwrap();
    let session = u64::from_str_radix(session_hex, 16).unwrap();
    verifier.verify(
        &bytes,
        UnixTime::from(std::time::SystemTime::now()),
        session,
        slot,
    )
}

/// A running `ferry-gateway`, killed on drop.
pub struct Gateway {
    child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Gateway {
    pub fn start(config: &Path, log: &Path) -> Self {
        let log_file = std::fs::File::create(log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-gateway"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "gateway did not start: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        };
        let addr = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            let rest = &line[start..];
            let rest = rest.split_once("://").unwrap().1;
            rest.split_whitespace().next().unwrap().parse().unwrap()
        };
        Self {
            public: addr("public"),
            admin: addr("admin"),
            child,
            log: log.to_owned(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.public.port())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Sends `signal` (e.g. `HUP`) to this gateway's process, by its pid.
    pub fn signal(&self, signal: &str) {
        ferry_testkit::process::signal(&self.child, signal).unwrap();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Stops the gateway with SIGTERM (graceful), waiting at most 15 s.
    pub fn stop(mut self) -> std::process::ExitStatus {
        ferry_testkit::process::terminate(&mut self.child, Duration::from_secs(15))
            .expect("the gateway's exit status")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTPS client trusting the test CA (and presenting `identity_pem`, if given).
pub fn client(ca_pem: &str, identity_pem: Option<&str>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20));
    if let Some(pem) = identity_pem {
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// Posts JSON with an API key; returns status, headers and the JSON answer.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let mut req = client.post(url).json(&body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

pub fn key_file_path(setup: &Setup, kid: u32) -> PathBuf {
    setup.file(&format!("gateway-{kid}.key"))
}

/// Sends SIGHUP and waits until the gateway counts one more reload with `result`.
pub async fn reload(gw: &mut Gateway, result: &str) {
    let sample = format!("ferry_gateway_config_reloads_total{{result=\"{result}\"}}");
    let page = || async {
        reqwest::get(gw.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = ferry_testkit::metrics::metric(&page().await, &sample);
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ferry_testkit::metrics::metric(&page().await, &sample) == before {
        assert!(
            Instant::now() < deadline,
            "no {result} reload counted within 10 s:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gw.is_running(), "the gateway died on SIGHUP");
}
