//! The Redis state backend against a real `redis-server` that the tests start and stop
//! themselves: the backend conformance tests, then two real gateway processes sharing one
//! Redis — a join code used on one replica is refused on the other, a revocation on one holds
//! on the other, a heartbeat to one is seen by the other.
//!
//! Without `redis-server` (Debian package `redis-server`) the tests say so and pass, unless
//! `FERRY_REQUIRE_PRIVILEGED=1` (set in CI), where they fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ferry_gateway::redis_state::{RedisOptions, RedisState};
use ferry_gateway::state::conformance;
use serde_json::json;

/// A `redis-server` on a free loopback port, without persistence; killed on drop.
struct RedisServer {
    child: Child,
    addr: SocketAddr,
    _dir: ferry_testkit::TempDir,
}

impl RedisServer {
    /// Starts one, or returns `None` (after saying why) if `redis-server` is not installed
    /// and the environment does not require it.
    fn start(name: &str) -> Option<Self> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            ferry_testkit::skip::skip(
                name,
                "redis-server is not installed (apt-get install redis-server)",
            );
            return None;
        }
        let dir = ferry_testkit::temp_dir(&format!("redis-{name}")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.pong() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    /// A `redis-server` serving only TLS (with `pki`'s server certificate) and only the ACL
    /// user `user` with `password` (the default user is off).
    fn start_tls(name: &str, pki: &Pki, user: &str, password: &str) -> Option<(Self, u16)> {
        let plain = Self::start(name)?;
        let dir = ferry_testkit::temp_dir(&format!("redis-tls-{name}")).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            write_file(&path, text, 0o600);
            path.to_str().unwrap().to_string()
        };
        let (cert, key) = (
            file("server.crt", &pki.server_cert_pem),
            file("server.key", &pki.server_key_pem),
        );
        let ca = file("ca.crt", &pki.ca_pem);
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--tls-cert-file", &cert, "--tls-key-file", &key])
            .args(["--tls-ca-cert-file", &ca, "--tls-auth-clients", "no"])
            .args(["--user", "default", "off"])
            .args([
                "--user",
                user,
                "on",
                &format!(">{password}"),
                "~*",
                "&*",
                "+@all",
            ])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        drop(plain);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some((
            Self {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                _dir: dir,
            },
            port,
        ))
    }

    fn pong(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn redis_backend_conforms() {
    let Some(redis) = RedisServer::start("conformance") else {
        return;
    };
    let state = RedisState::connect(&redis.url(), "t1:").await.unwrap();
    conformance::join_codes_work_once(&state).await;
    let state = RedisState::connect(&redis.url(), "t4:").await.unwrap();
    conformance::sessions_are_found_and_extended(&state).await;
    let state = RedisState::connect(&redis.url(), "t2:").await.unwrap();
    conformance::revocations_are_kept(&state).await;
    let state = RedisState::connect(&redis.url(), "t3:").await.unwrap();
    conformance::relay_reports_expire(&state).await;
    let state = RedisState::connect(&redis.url(), "t5:").await.unwrap();
    conformance::many_sessions_are_listed_newest_first(&state).await;
}

/// `rediss://` with the CA file and an ACL user works (the backend conforms); a wrong password,
/// no credentials, or the system's roots instead of the CA each fail at connect, clearly.
#[tokio::test]
async fn a_redis_over_tls_with_an_acl_user_works_and_wrong_trust_or_credentials_fail() {
    let pki = Pki::new();
    let Some((redis, port)) = RedisServer::start_tls("tls", &pki, "ferry", "pw-of-ferry") else {
        return;
    };
    let url = format!("rediss://localhost:{port}/0");
    fn options<'a>(
        url: &'a str,
        password: Option<&'a str>,
        ca: Option<&'a [u8]>,
    ) -> RedisOptions<'a> {
        RedisOptions {
            url,
            ca_pem: ca,
            username: Some("ferry"),
            password,
        }
    }
    let ca = pki.ca_pem.as_bytes();
    let state = RedisState::connect_with(&options(&url, Some("pw-of-ferry"), Some(ca)), "tls:")
        .await
        .unwrap();
    conformance::join_codes_work_once(&state).await;
    for (what, opts) in [
        ("a wrong password", options(&url, Some("wrong"), Some(ca))),
        ("no password", options(&url, None, Some(ca))),
        (
            "the system's roots",
            options(&url, Some("pw-of-ferry"), None),
        ),
    ] {
        let error = RedisState::connect_with(&opts, "tls:").await.unwrap_err();
        eprintln!("{what}: {error}");
        assert!(
            matches!(error, ferry_gateway::state::StateError::Unavailable(_)),
            "{what}"
        );
    }
    drop(redis);
}

#[tokio::test]
async fn an_unreachable_redis_fails_at_start_with_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = RedisState::connect(&format!("redis://127.0.0.1:{port}/0"), "x:")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unavailable"), "{err}");
}

#[tokio::test]
async fn two_replicas_share_join_codes_revocations_and_relays() {
    let Some(redis) = RedisServer::start("replicas") else {
        return;
    };
    let mut setup = Setup::new("replicas");
    let key9 = setup.add_key("relay9", &["relay:9"]);
    let extra = format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
        redis.url()
    );
    let one = setup.start("one", &setup.config(1, &extra));
    let two = setup.start("two", &setup.config(1, &extra));
    let http = client(&setup.pki.ca_pem, None);
    let app = setup.key("app");

    // Created on one, joined on two; the code is then refused on both.
    let (status, _, created) = post(&http, &one.url("/v1/sessions"), Some(app), json!({})).await;
    assert_eq!(status, 201);
    let code = json!({ "join_code": created["join_code"] });
    let (status, _, joined) = post(
        &http,
        &two.url("/v1/sessions/join"),
        Some(app),
        code.clone(),
    )
    .await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["session_id"], created["session_id"]);
    for gw in [&one, &two] {
        let (status, _, body) =
            post(&http, &gw.url("/v1/sessions/join"), Some(app), code.clone()).await;
        assert_eq!(
            (status, body),
            (404, json!({ "error": "invalid_join_code" }))
        );
    }
    let relay = setup.verifier(&[1]);
    let session = created["session_id"].as_str().unwrap();
    verify(&relay, created["token"].as_str().unwrap(), session, 0).unwrap();
    verify(&relay, joined["token"].as_str().unwrap(), session, 1).unwrap();
    // Either slot is renewed on either replica: both know who created and who joined it.
    for (gw, slot, index) in [(&two, "A", 0), (&one, "B", 1)] {
        let body = json!({ "session_id": session, "slot": slot });
        let (status, _, renewed) =
            post(&http, &gw.url("/v1/sessions/renew"), Some(app), body).await;
        assert_eq!(status, 200, "{renewed}");
        verify(&relay, renewed["token"].as_str().unwrap(), session, index).unwrap();
    }
    let body = json!({ "session_id": session, "slot": "B" });
    let (status, _, _) = post(
        &http,
        &two.url("/v1/sessions/renew"),
        Some(setup.key("acme")),
        body,
    )
    .await;
    assert_eq!(status, 404, "only the joiner's key renews slot B");

    // Many joins of one code at once, spread over both replicas: exactly one wins.
    let (_, _, created) = post(&http, &one.url("/v1/sessions"), Some(app), json!({})).await;
    let code = json!({ "join_code": created["join_code"] });
    let mut racers = Vec::new();
    for i in 0..8 {
        let url = if i % 2 == 0 {
            one.url("/v1/sessions/join")
        } else {
            two.url("/v1/sessions/join")
        };
        let (http, code, key) = (http.clone(), code.clone(), app.to_string());
        racers.push(tokio::spawn(async move {
            post(&http, &url, Some(&key), code).await.0
        }));
    }
    let mut statuses = Vec::new();
    for r in racers {
        statuses.push(r.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 404, 404, 404, 404, 404, 404, 404]);

    // The admin API of either replica lists the sessions of both.
    let list: serde_json::Value = reqwest::Client::new()
        .get(two.admin_url("/admin/v1/sessions"))
        .bearer_auth(&setup.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 2, "{list}");

    // A heartbeat to one is seen by two.
    let relay9 = ferry_core::keys::RelayStaticKey::generate(&ring::rand::SystemRandom::new())
        .unwrap()
        .public();
    let beat = json!({ "relay_id": 9, "address": "127.0.0.1:7009", "public_key": relay9.to_string(), "sessions": 0, "capacity": 10 });
    assert_eq!(
        post(&http, &one.url("/v1/relays/heartbeat"), Some(&key9), beat)
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let relays: serde_json::Value = reqwest::Client::new()
        .get(two.admin_url("/admin/v1/relays"))
        .bearer_auth(&setup.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        relays["relays"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == 9),
        "{relays}"
    );

    // Revoked through one, refused by two.
    let answer = reqwest::Client::new()
        .post(one.admin_url("/admin/v1/keys/revoke"))
        .bearer_auth(&setup.admin_token)
        .json(&json!({ "key_id": "app" }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let (status, _, body) = post(&http, &two.url("/v1/sessions"), Some(app), json!({})).await;
    assert_eq!((status, body), (401, json!({ "error": "unauthorized" })));
    // Another key still works on both.
    for gw in [&one, &two] {
        let (status, _, _) = post(
            &http,
            &gw.url("/v1/sessions"),
            Some(setup.key("acme")),
            json!({ "realm": "acme" }),
        )
        .await;
        assert_eq!(status, 201);
    }

    // With Redis gone, requests fail with a generic 503, not a hang or a leak.
    drop(redis);
    let (status, _, body) = post(
        &http,
        &one.url("/v1/sessions"),
        Some(setup.key("acme")),
        json!({ "realm": "acme" }),
    )
    .await;
    assert_eq!((status, body), (503, json!({ "error": "unavailable" })));
    // Every such 503 counts as a state error, whichever step met the state: here the
    // revocation check of the API key, and the admin listing.
    let (status, _, _) = post(
        &http,
        &one.url("/v1/sessions/join"),
        Some(setup.key("acme")),
        json!({ "join_code": "a".repeat(26) }),
    )
    .await;
    assert_eq!(status, 503);
    let admin = reqwest::Client::new();
    let status = admin
        .get(one.admin_url("/admin/v1/sessions"))
        .bearer_auth(&setup.admin_token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 503);
    let page = admin
        .get(one.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        ferry_testkit::metrics::metric(&page, "ferry_gateway_state_errors_total"),
        3,
        "{page}"
    );
}
