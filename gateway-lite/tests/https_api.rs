//! The real `ferry-gateway` binary, started with generated certificates and keys, driven by a
//! real HTTPS client (reqwest on rustls): sessions, tokens a relay accepts, authentication,
//! revocation, join codes, bodies, rate limits, TLS trust, mTLS, key rotation, the audit log.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::time::Duration;

use common::*;
use ferry_core::keys::{PeerPublicKey, PeerStaticKey};
use ferry_core::token::TokenError;
use ferry_testkit::metrics::metric;
use ferry_testkit::monitoring::{self, Exporter};
use serde_json::json;

fn peer_key() -> PeerPublicKey {
    PeerStaticKey::generate(&ring::rand::SystemRandom::new())
        .unwrap()
        .public()
}

#[tokio::test]
async fn sessions_are_created_and_joined_with_tokens_the_relay_accepts() {
    let setup = Setup::new("create-join");
    let gw = setup.start("gw", &setup.config(1, ""));
    let http = client(&setup.pki.ca_pem, None);
    let (a_key, b_key) = (peer_key(), peer_key());
    let (status, _, created) = post(
        &http,
        &gw.url("/v1/sessions"),
        Some(setup.key("app")),
        json!({ "peer_public_key": a_key.to_string(), "expected_peer_public_key": b_key.to_string() }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["slot"], "A");
    assert_eq!(created["kid"], 1);
    assert_eq!(created["relay"]["id"], RELAY_ID);
    assert_eq!(created["relay"]["address"], "127.0.0.1:7000");
    assert_eq!(
        created["relay"]["public_key"],
        setup.relay_key.public().to_string()
    );
    assert_eq!(created["expected_peer_public_key"], b_key.to_string());
    let lifetime =
        created["expires_at"].as_u64().unwrap() - created["not_before"].as_u64().unwrap();
    assert_eq!(lifetime, 300);
    let session = created["session_id"].as_str().unwrap();
    let code = created["join_code"].as_str().unwrap();

    let relay = setup.verifier(&[1]);
    let a = verify(&relay, created["token"].as_str().unwrap(), session, 0).unwrap();
    assert_eq!(
        a.slot_secret.to_base64().as_str(),
        created["slot_secret"].as_str().unwrap()
    );

    // Someone claiming another identity may not join; the code is not used up by trying.
    let (status, _, body) = post(
        &http,
        &gw.url("/v1/sessions/join"),
        Some(setup.key("app")),
        json!({ "join_code": code, "peer_public_key": peer_key().to_string() }),
    )
    .await;
    assert_eq!(
        (status, body),
        (403, json!({ "error": "peer_identity_mismatch" }))
    );

    let (status, _, joined) = post(
        &http,
        &gw.url("/v1/sessions/join"),
        Some(setup.key("app")),
        json!({ "join_code": code, "peer_public_key": b_key.to_string() }),
    )
    .await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["slot"], "B");
    assert_eq!(joined["session_id"], session);
    assert_eq!(joined["expected_peer_public_key"], a_key.to_string());
    assert!(joined.get("join_code").is_none());
    let b = verify(&relay, joined["token"].as_str().unwrap(), session, 1).unwrap();
    assert_eq!(
        b.slot_secret.to_base64().as_str(),
        joined["slot_secret"].as_str().unwrap()
    );
    assert_ne!(a.claims.token_id, b.claims.token_id);
    // A token for slot A is not one for slot B.
    assert!(matches!(
        verify(&relay, joined["token"].as_str().unwrap(), session, 0),
        Err(TokenError::WrongSlot { .. })
    ));

    // The admin API lists it as joined, by whom; no secret in the listing.
    let admin = reqwest::Client::new();
    let list: serde_json::Value = admin
        .get(gw.admin_url("/admin/v1/sessions"))
        .bearer_auth(&setup.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["sessions"][0]["session_id"], session);
    assert_eq!(list["sessions"][0]["joined_by"], "app");
    assert!(!list.to_string().contains(code));
    let relays: serde_json::Value = admin
        .get(gw.admin_url("/admin/v1/relays"))
        .bearer_auth(&setup.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(relays["relays"][0]["id"], RELAY_ID);
    assert_eq!(relays["relays"][0]["healthy"], true);
}

#[tokio::test]
async fn a_slot_is_renewed_only_by_the_key_that_took_it_while_the_session_may_last() {
    let setup = Setup::new("renew");
    let config = setup.config(1, "");
    let mut gw = setup.start("gw", &config);
    let http = client(&setup.pki.ca_pem, None);
    let url = gw.url("/v1/sessions/renew");
    let renew = |key: &str, body: serde_json::Value| {
        let (http, url, key) = (http.clone(), url.clone(), setup.key(key).to_string());
        async move { post(&http, &url, Some(&key), body).await }
    };
    let (a_key, b_key) = (peer_key(), peer_key());
    // Key `acme` creates in its realm; key `app` joins.
    let (status, _, created) = post(
        &http,
        &gw.url("/v1/sessions"),
        Some(setup.key("acme")),
        json!({ "realm": "acme", "peer_public_key": a_key.to_string(), "expected_peer_public_key": b_key.to_string() }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let session = created["session_id"].as_str().unwrap().to_string();
    let body = |slot: &str| json!({ "session_id": session, "slot": slot });

    // Slot B has no holder before the join: the same 404 as an unknown session.
    let not_found = json!({ "error": "not_found" });
    assert_eq!(renew("app", body("B")).await.0, 404);
    let (status, _, answer) = renew(
        "acme",
        json!({ "session_id": "00000000000000ff", "slot": "A" }),
    )
    .await;
    assert_eq!((status, answer), (404, not_found.clone()));
    for bad in [
        json!({ "session_id": session.to_uppercase(), "slot": "A" }),
        json!({ "session_id": &session[1..], "slot": "A" }),
        json!({ "session_id": session, "slot": "C" }),
        json!({ "session_id": session, "slot": "a" }),
        json!({ "session_id": session }),
        json!({ "session_id": session, "slot": "A", "join_code": "x" }),
    ] {
        let (status, _, answer) = renew("acme", bad.clone()).await;
        assert_eq!(
            (status, answer),
            (400, json!({ "error": "bad_request" })),
            "{bad}"
        );
    }

    let (status, _, renewed_a) = renew("acme", body("A")).await;
    assert_eq!(status, 200, "{renewed_a}");
    let relay = setup.verifier(&[1]);
    let first = verify(&relay, created["token"].as_str().unwrap(), &session, 0).unwrap();
    let again = verify(&relay, renewed_a["token"].as_str().unwrap(), &session, 0).unwrap();
    assert_ne!(first.claims.token_id, again.claims.token_id);
    assert_eq!(
        again.slot_secret.to_base64().as_str(),
        renewed_a["slot_secret"].as_str().unwrap()
    );
    assert_ne!(renewed_a["slot_secret"], created["slot_secret"]);
    assert_eq!(renewed_a["slot"], "A");
    assert_eq!(renewed_a["session_id"], session);
    assert_eq!(renewed_a["relay"], created["relay"]);
    assert_eq!(renewed_a["expected_peer_public_key"], b_key.to_string());
    assert!(
        renewed_a.get("join_code").is_none() && renewed_a.get("join_code_expires_at").is_none()
    );
    assert!(renewed_a["expires_at"].as_u64() >= created["expires_at"].as_u64());

    let (status, _, joined) = post(
        &http,
        &gw.url("/v1/sessions/join"),
        Some(setup.key("app")),
        json!({ "join_code": created["join_code"], "peer_public_key": b_key.to_string() }),
    )
    .await;
    assert_eq!(status, 200, "{joined}");
    let (status, _, renewed_b) = renew("app", body("B")).await;
    assert_eq!(status, 200, "{renewed_b}");
    assert_eq!(renewed_b["slot"], "B");
    assert_eq!(renewed_b["expected_peer_public_key"], a_key.to_string());
    let b = verify(&relay, renewed_b["token"].as_str().unwrap(), &session, 1).unwrap();
    assert_eq!(
        b.slot_secret.to_base64().as_str(),
        renewed_b["slot_secret"].as_str().unwrap()
    );
    // Each key holds its own slot only.
    for (key, slot) in [("app", "A"), ("acme", "B"), ("listed-relay", "A")] {
        let (status, _, answer) = renew(key, body(slot)).await;
        assert_eq!((status, answer), (404, not_found.clone()), "{key} {slot}");
    }

    // The creator's key loses `create:acme`: 403 for slot A; the joiner still renews B.
    let table = setup.key_table("acme");
    let narrowed = table.replace("\"create:acme\", ", "");
    assert_ne!(table, narrowed);
    write_file(
        &setup.file("gw.toml"),
        &config.replace(&table, &narrowed),
        0o600,
    );
    reload(&mut gw, "applied").await;
    let (status, _, answer) = renew("acme", body("A")).await;
    assert_eq!((status, answer), (403, json!({ "error": "forbidden" })));
    assert_eq!(renew("app", body("B")).await.0, 200);

    // Past the maximum age the session's slots are no longer renewed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let short = config + "[sessions]\nmax_session_age_secs = 1\n";
    write_file(&setup.file("gw.toml"), &short, 0o600);
    reload(&mut gw, "applied").await;
    let (status, _, answer) = renew("app", body("B")).await;
    assert_eq!(
        (status, answer),
        (410, json!({ "error": "session_too_old" }))
    );

    let page = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&page, "ferry_gateway_sessions_renewed_total"),
        3,
        "{page}"
    );
    // Every gateway metric the alert rules and the dashboard in monitoring/ use is on the page.
    assert_eq!(
        monitoring::missing_from(&page, Exporter::Gateway),
        Vec::<String>::new(),
        "monitoring/ uses gateway metrics this page lacks"
    );
    // And docs/gateway-api.md names every family on it.
    assert_eq!(
        monitoring::undocumented(&page, &["gateway-api.md"]),
        Vec::<String>::new(),
        "gateway metrics docs/gateway-api.md does not name"
    );
    // Slot B before the join, the unknown session, three slots not held, and the old session.
    assert_eq!(
        metric(&page, "ferry_gateway_renewals_refused_total"),
        6,
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "ferry_gateway_requests_total{route=\"/v1/sessions/renew\",status=\"200\"}"
        ),
        3,
        "{page}"
    );
    let log = gw.log_text();
    assert_eq!(log.matches("session_renewed").count(), 3, "{log}");
    for secret in [
        &renewed_a["token"],
        &renewed_a["slot_secret"],
        &renewed_b["slot_secret"],
    ] {
        assert!(
            !log.contains(secret.as_str().unwrap()),
            "a secret in the log"
        );
    }
}

#[tokio::test]
async fn join_codes_work_once_and_expire() {
    let setup = Setup::new("codes");
    let gw = setup.start(
        "gw",
        &setup.config(1, "[sessions]\njoin_code_ttl_secs = 10\n"),
    );
    let http = client(&setup.pki.ca_pem, None);
    let (create_url, join_url) = (gw.url("/v1/sessions"), gw.url("/v1/sessions/join"));
    let create = || post(&http, &create_url, Some(setup.key("app")), json!({}));
    let join = |code: String| {
        post(
            &http,
            &join_url,
            Some(setup.key("app")),
            json!({ "join_code": code }),
        )
    };
    let (_, _, first) = create().await;
    let code = first["join_code"].as_str().unwrap().to_string();
    assert_eq!(join(code.clone()).await.0, 200);
    let (status, _, body) = join(code.clone()).await;
    assert_eq!(
        (status, body),
        (404, json!({ "error": "invalid_join_code" }))
    );
    // Unknown and malformed codes get the same answer.
    assert_eq!(join("a".repeat(26)).await.0, 404);
    assert_eq!(join("not a code".into()).await.0, 404);
    let (_, _, second) = create().await;
    let late = second["join_code"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (status, _, body) = join(late).await;
    assert_eq!(
        (status, body),
        (404, json!({ "error": "invalid_join_code" }))
    );
}

#[tokio::test]
async fn wrong_unknown_missing_and_revoked_keys_are_refused_and_counted() {
    let setup = Setup::new("auth");
    let gw = setup.start("gw", &setup.config(1, ""));
    let http = client(&setup.pki.ca_pem, None);
    let url = gw.url("/v1/sessions");
    let good = setup.key("app").to_string();
    let wrong_secret = format!("{}{}", &good[..good.len() - 4], "AAAA");
    let unknown = good.replace("fgk1.app.", "fgk1.nobody.");
    let cases: [(Option<&str>, &str); 4] = [
        (None, "missing"),
        (Some("not-a-key"), "malformed"),
        (Some(&unknown), "unknown_key"),
        (Some(&wrong_secret), "wrong_secret"),
    ];
    for (key, _) in &cases {
        let (status, headers, body) = post(&http, &url, *key, json!({})).await;
        assert_eq!(
            (status, body),
            (401, json!({ "error": "unauthorized" })),
            "{key:?}"
        );
        assert_eq!(headers["www-authenticate"], "Bearer");
    }
    // A key scoped to realm acme may not create elsewhere.
    let (status, _, body) = post(
        &http,
        &url,
        Some(setup.key("acme")),
        json!({ "realm": "other" }),
    )
    .await;
    assert_eq!((status, body), (403, json!({ "error": "forbidden" })));
    assert_eq!(
        post(
            &http,
            &url,
            Some(setup.key("acme")),
            json!({ "realm": "acme" })
        )
        .await
        .0,
        201
    );
    // A key that may join only acme cannot join (or burn) a default-realm code.
    let (_, _, created) = post(&http, &url, Some(&good), json!({})).await;
    let join = gw.url("/v1/sessions/join");
    let code = json!({ "join_code": created["join_code"] });
    assert_eq!(
        post(&http, &join, Some(setup.key("acme")), code.clone())
            .await
            .0,
        403
    );
    assert_eq!(post(&http, &join, Some(&good), code).await.0, 200);

    // Revocation through the admin API: needs the admin token, then holds at once.
    let admin = reqwest::Client::new();
    let revoke = |token: Option<String>| {
        let mut req = admin
            .post(gw.admin_url("/admin/v1/keys/revoke"))
            .json(&json!({ "key_id": "app" }));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(revoke(None).await.unwrap().status(), 401);
    assert_eq!(revoke(Some(good.clone())).await.unwrap().status(), 401);
    let answer: serde_json::Value = revoke(Some(setup.admin_token.clone()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer,
        json!({ "key_id": "app", "revoked": true, "already_revoked": false, "configured": true })
    );
    let (status, _, _) = post(&http, &url, Some(&good), json!({})).await;
    assert_eq!(status, 401);

    let page = admin
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (_, reason) in &cases {
        let sample = format!("ferry_gateway_auth_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&page, &sample), 1, "{reason}");
    }
    assert_eq!(
        metric(
            &page,
            "ferry_gateway_auth_failures_total{reason=\"revoked\"}"
        ),
        1
    );
    assert_eq!(
        metric(&page, "ferry_gateway_auth_failures_total{reason=\"scope\"}"),
        2
    );
    assert_eq!(
        metric(
            &page,
            "ferry_gateway_auth_failures_total{reason=\"admin_token\"}"
        ),
        2
    );
    assert_eq!(metric(&page, "ferry_gateway_sessions_created_total"), 2);
    assert!(
        page.contains("ferry_gateway_requests_total{route=\"/v1/sessions\",status=\"401\"} 5"),
        "{page}"
    );
}

#[tokio::test]
async fn oversize_malformed_and_mistyped_bodies_get_generic_errors() {
    let setup = Setup::new("bodies");
    let config = setup.config(1, "").replace(
        "listen = \"127.0.0.1:0\"\n\n[tls]",
        "listen = \"127.0.0.1:0\"\nmax_body_bytes = 1024\n\n[tls]",
    );
    let gw = setup.start("gw", &config);
    let http = client(&setup.pki.ca_pem, None);
    let url = gw.url("/v1/sessions");
    let key = setup.key("app");
    let send = |body: Vec<u8>, content_type: &'static str| {
        http.post(&url)
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let expect = |resp: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body, json!({ "error": code }));
    };
    let big = format!("{{\"realm\": \"{}\"}}", "x".repeat(2000)).into_bytes();
    expect(
        send(big.clone(), "application/json").await.unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    // Without a Content-Length (chunked), the limit holds while reading.
    let chunked = http
        .post(&url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap(Chunks::new(&big)))
        .send()
        .await
        .unwrap();
    expect(chunked, 413, "payload_too_large").await;
    expect(
        send(b"{\"realm\": ".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect(
        send(b"[1, 2]".to_vec(), "application/json").await.unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect(
        send(
            b"{\"realm\": \"a\", \"admin\": true}".to_vec(),
            "application/json",
        )
        .await
        .unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect(
        send(b"{\"realm\": \"Not A Realm\"}".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect(
        send(
            b"{\"peer_public_key\": \"AAAA\"}".to_vec(),
            "application/json",
        )
        .await
        .unwrap(),
        400,
        "bad_request",
    )
    .await;
    expect(
        send(b"{}".to_vec(), "text/plain").await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    expect(
        http.get(&url).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    expect(
        http.get(gw.url("/v2/anything")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    expect(
        http.get(gw.url("/admin/v1/relays")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    // Still serving.
    assert_eq!(
        send(b"{}".to_vec(), "application/json")
            .await
            .unwrap()
            .status(),
        201
    );
}

#[tokio::test]
async fn request_bodies_and_queries_are_taken_exactly_as_documented() {
    let setup = Setup::new("forms");
    let gw = setup.start("gw", &setup.config(1, ""));
    let http = client(&setup.pki.ca_pem, None);
    let create = gw.url("/v1/sessions");
    let app = setup.key("app");
    let key = peer_key().to_string();
    // null is not a value of an optional field: leave the field out instead.
    for field in ["realm", "peer_public_key", "expected_peer_public_key"] {
        let (status, _, body) = post(&http, &create, Some(app), json!({ field: null })).await;
        assert_eq!(
            (status, body),
            (400, json!({ "error": "bad_request" })),
            "{field}"
        );
    }
    // A key as plain base64 or as the one line of a public key file, nothing looser.
    let line = format!("ferry-public-v1 peer-x25519 {key}");
    let (status, _, created) = post(
        &http,
        &create,
        Some(app),
        json!({ "peer_public_key": line, "expected_peer_public_key": key }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["expected_peer_public_key"], key.as_str());
    for loose in [
        format!("{key}\n"),
        format!("{line} # peer b"),
        format!(" {key}"),
    ] {
        let (status, _, _) = post(
            &http,
            &create,
            Some(app),
            json!({ "peer_public_key": loose }),
        )
        .await;
        assert_eq!(status, 400, "{loose:?}");
    }
    let (status, _, _) = post(
        &http,
        &gw.url("/v1/sessions/join"),
        Some(app),
        json!({ "join_code": created["join_code"], "peer_public_key": null }),
    )
    .await;
    assert_eq!(status, 400);
    // A heartbeat address with an IPv6 scope id is refused.
    let relay_public = setup.relay_key.public().to_string();
    let (status, _, _) = post(
        &http,
        &gw.url("/v1/relays/heartbeat"),
        Some(setup.key("listed-relay")),
        json!({ "relay_id": RELAY_ID, "address": "[fe80::1%1]:7000", "public_key": relay_public, "sessions": 0, "capacity": 1 }),
    )
    .await;
    assert_eq!(status, 400);
    // The admin listing takes `limit` in plain digits and no other parameter.
    let admin = reqwest::Client::new();
    let list = |query: &'static str| {
        admin
            .get(format!("{}{query}", gw.admin_url("/admin/v1/sessions")))
            .bearer_auth(&setup.admin_token)
            .send()
    };
    for (query, expected) in [
        ("?limit=1", 200),
        ("?limit=+1", 400),
        ("?limit=0", 400),
        ("?limit=1&x=1", 400),
        ("?x", 400),
    ] {
        assert_eq!(list(query).await.unwrap().status(), expected, "{query}");
    }
    // HEAD is answered on GET routes; another method gets 405 with Allow.
    let head = http.head(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let wrong = http.delete(gw.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "POST");
    let wrong = admin
        .post(gw.admin_url("/admin/v1/relays"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "GET,HEAD");
}

/// A body sent in 256-byte chunks, without a Content-Length.
struct Chunks(Vec<Vec<u8>>);

impl Chunks {
    fn new(bytes: &[u8]) -> Self {
        Self(bytes.chunks(256).rev().map(<[u8]>::to_vec).collect())
    }
}

impl http_body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        let chunk = self.0.pop();
        std::task::Poll::Ready(chunk.map(|c| Ok(http_body::Frame::data(bytes::Bytes::from(c)))))
    }
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let setup = Setup::new("ratelimit");
    let per_ip = setup.start(
        "ip",
        &setup.config(1, "[limits]\nper_ip_rate = 0.2\nper_ip_burst = 3\n"),
    );
    let http = client(&setup.pki.ca_pem, None);
    let url = per_ip.url("/v1/sessions");
    for _ in 0..3 {
        assert_eq!(
            post(&http, &url, Some(setup.key("app")), json!({})).await.0,
            201
        );
    }
    // Over the per-IP limit even without a key: checked before authentication.
    for key in [Some(setup.key("app")), None] {
        let (status, headers, body) = post(&http, &url, key, json!({})).await;
        assert_eq!((status, body), (429, json!({ "error": "rate_limited" })));
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=5).contains(&retry), "{retry}");
    }
    // Health checks are not limited.
    assert_eq!(
        http.get(per_ip.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let per_key = setup.start(
        "key",
        &setup.config(1, "[limits]\nper_key_rate = 0.1\nper_key_burst = 2\n"),
    );
    let url = per_key.url("/v1/sessions");
    for _ in 0..2 {
        assert_eq!(
            post(&http, &url, Some(setup.key("app")), json!({})).await.0,
            201
        );
    }
    let (status, headers, _) = post(&http, &url, Some(setup.key("app")), json!({})).await;
    assert_eq!(status, 429);
    // One token per 10 s: the wait is 10 s, less what has refilled since (on a slow machine).
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((8..=10).contains(&retry), "{retry}");
    // Another key from the same address has its own budget.
    assert_eq!(
        post(
            &http,
            &url,
            Some(setup.key("acme")),
            json!({ "realm": "acme" })
        )
        .await
        .0,
        201
    );
    let page = reqwest::get(per_key.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&page, "ferry_gateway_rate_limited_total{limiter=\"key\"}"),
        1
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_and_mtls_needs_a_client_certificate() {
    let setup = Setup::new("tls");
    let gw = setup.start("gw", &setup.config(1, ""));
    // A client that does not trust the gateway's CA refuses to talk.
    let stranger = client(&Pki::new().ca_pem, None);
    let err = stranger.get(gw.url("/healthz")).send().await.unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");
    assert_eq!(
        client(&setup.pki.ca_pem, None)
            .get(gw.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let mtls_config = setup.config(1, "").replace(
        "key = \"tls.key\"\n",
        "key = \"tls.key\"\nclient_ca = \"clients-ca.crt\"\n",
    );
    let mtls = setup.start("mtls", &mtls_config);
    let no_cert = client(&setup.pki.ca_pem, None);
    assert!(no_cert.get(mtls.url("/healthz")).send().await.is_err());
    let foreign = client(&setup.pki.ca_pem, Some(&Pki::foreign_identity_pem()));
    assert!(foreign.get(mtls.url("/healthz")).send().await.is_err());
    let with_cert = client(&setup.pki.ca_pem, Some(&setup.pki.client_identity_pem));
    assert_eq!(
        post(
            &with_cert,
            &mtls.url("/v1/sessions"),
            Some(setup.key("app")),
            json!({})
        )
        .await
        .0,
        201
    );
    let page = reqwest::get(mtls.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric(&page, "ferry_gateway_tls_handshake_failures_total") >= 2,
        "{page}"
    );
}

#[tokio::test]
async fn key_rotation_relays_accept_both_keys_during_the_overlap() {
    let setup = Setup::new("rotation");
    let http = client(&setup.pki.ca_pem, None);
    // Step 1: kid 1 signs; kid 2 is listed (published) and added to the relay.
    let old = setup.start("old", &setup.config(1, ""));
    let (_, _, before) = post(
        &http,
        &old.url("/v1/sessions"),
        Some(setup.key("app")),
        json!({}),
    )
    .await;
    assert_eq!(before["kid"], 1);
    // Step 2: the gateway switches to kid 2 (a restart, one replica after another).
    assert!(old.stop().success());
    let new = setup.start("new", &setup.config(2, ""));
    let (_, _, after) = post(
        &http,
        &new.url("/v1/sessions"),
        Some(setup.key("app")),
        json!({}),
    )
    .await;
    assert_eq!(after["kid"], 2);
    let token = |v: &serde_json::Value| {
        (
            v["token"].as_str().unwrap().to_string(),
            v["session_id"].as_str().unwrap().to_string(),
        )
    };
    let (old_token, old_session) = token(&before);
    let (new_token, new_session) = token(&after);
    // During the overlap the relay trusts both: tokens of either key verify.
    let both = setup.verifier(&[1, 2]);
    verify(&both, &old_token, &old_session, 0).unwrap();
    verify(&both, &new_token, &new_session, 0).unwrap();
    // A relay that had not learnt kid 2 would refuse the new tokens: publish first.
    assert_eq!(
        verify(&setup.verifier(&[1]), &new_token, &new_session, 0).unwrap_err(),
        TokenError::UnknownKid { kid: 2 }
    );
    // Step 3: after the old tokens expire, the relay drops kid 1; new tokens still verify.
    verify(&setup.verifier(&[2]), &new_token, &new_session, 0).unwrap();
    assert_eq!(
        verify(&setup.verifier(&[2]), &old_token, &old_session, 0).unwrap_err(),
        TokenError::UnknownKid { kid: 1 }
    );
    // The joiner of a session created before the switch gets a kid-2 token for the same session.
    let (status, _, joined) = post(
        &http,
        &new.url("/v1/sessions/join"),
        Some(setup.key("app")),
        json!({ "join_code": before["join_code"] }),
    )
    .await;
    // The memory backend does not survive the restart: the code is unknown to the new process.
    assert_eq!(status, 404, "{joined}");
}

#[tokio::test]
async fn the_audit_log_records_grants_and_never_secrets() {
    let mut setup = Setup::new("audit");
    let relay_key = setup.add_key("relay9", &["relay:9"]);
    let gw = setup.start("gw", &setup.config(1, ""));
    let http = client(&setup.pki.ca_pem, None);
    let (_, _, created) = post(
        &http,
        &gw.url("/v1/sessions"),
        Some(setup.key("app")),
        json!({ "peer_public_key": peer_key().to_string() }),
    )
    .await;
    let code = created["join_code"].as_str().unwrap().to_string();
    let (_, _, joined) = post(
        &http,
        &gw.url("/v1/sessions/join"),
        Some(setup.key("acme")),
        json!({ "join_code": code }),
    )
    .await;
    assert_eq!(joined["error"], "forbidden");
    let (_, _, joined) = post(
        &http,
        &gw.url("/v1/sessions/join"),
        Some(setup.key("app")),
        json!({ "join_code": code }),
    )
    .await;
    let wrong = format!("{}AAAA", &setup.key("app")[..setup.key("app").len() - 4]);
    post(&http, &gw.url("/v1/sessions"), Some(&wrong), json!({})).await;
    let relay_public = ferry_core::keys::RelayStaticKey::generate(&ring::rand::SystemRandom::new())
        .unwrap()
        .public();
    let (status, _, _) = post(&http, &gw.url("/v1/relays/heartbeat"), Some(&relay_key), json!({ "relay_id": 9, "address": "127.0.0.1:7009", "public_key": relay_public.to_string(), "sessions": 3, "capacity": 100 })).await;
    assert_eq!(status, 200);
    reqwest::Client::new()
        .post(gw.admin_url("/admin/v1/keys/revoke"))
        .bearer_auth(&setup.admin_token)
        .json(&json!({ "key_id": "acme" }))
        .send()
        .await
        .unwrap();
    let status = gw.stop();
    assert!(status.success(), "graceful stop: {status:?}");
    let log = std::fs::read_to_string(setup.file("gw.log")).unwrap();
    for event in [
        "session_created",
        "session_joined",
        "auth_failure",
        "key_revoked",
    ] {
        assert!(
            log.contains(event),
            "{event} missing from the audit log:\n{log}"
        );
    }
    assert!(log.contains("ferry_gateway::audit"), "{log}");
    // The admin's revocation names who asked, like every event.
    let revoked = log.lines().find(|l| l.contains("key_revoked")).unwrap();
    assert!(
        revoked.contains("client=127.0.0.1") && revoked.contains("via=-"),
        "{revoked}"
    );
    let mut secrets = vec![
        created["token"].as_str().unwrap().to_string(),
        created["slot_secret"].as_str().unwrap().to_string(),
        joined["token"].as_str().unwrap().to_string(),
        joined["slot_secret"].as_str().unwrap().to_string(),
        code.clone(),
        setup.admin_token.clone(),
        wrong.clone(),
    ];
    for (_, key) in &setup.api_keys {
        secrets.push(key.clone());
    }
    for secret in &secrets {
        // The whole secret, and any 16-character piece of its secret part.
        let tail = secret.rsplit('.').next().unwrap();
        assert!(!log.contains(secret.as_str()), "a secret is in the log");
        for start in (0..tail.len().saturating_sub(16)).step_by(8) {
            assert!(
                !log.contains(&tail[start..start + 16]),
                "part of a secret is in the log"
            );
        }
    }
    // The signing keys' secrets neither.
    for kid in [1, 2] {
        let text = std::fs::read_to_string(key_file_path(&setup, kid)).unwrap();
        let b64 = text
            .lines()
            .find(|l| l.starts_with("ferry-secret-v1"))
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap();
        assert!(!log.contains(b64));
    }
}

/// Heartbeats register relays and report load; what they may say is checked. With probing off
/// (this config), a registered relay is listed but never handed out, whatever load it reports:
/// only a probe can show it holds its key (the probed case is in e2e.rs and registry.rs).
#[tokio::test]
async fn relays_register_by_heartbeat_and_only_listed_relays_are_handed_out_unprobed() {
    let mut setup = Setup::new("heartbeat");
    let key9 = setup.add_key("relay9", &["relay:9"]);
    let gw = setup.start("gw", &setup.config(1, ""));
    let http = client(&setup.pki.ca_pem, None);
    let relay9 = ferry_core::keys::RelayStaticKey::generate(&ring::rand::SystemRandom::new())
        .unwrap()
        .public();
    let beat = |key: String, id: u64, address: &str, public: String, sessions: u64| {
        let url = gw.url("/v1/relays/heartbeat");
        let http = http.clone();
        let body = json!({ "relay_id": id, "address": address, "public_key": public, "sessions": sessions, "capacity": 100 });
        async move { post(&http, &url, Some(&key), body).await.0 }
    };
    let listed_public = setup.relay_key.public().to_string();
    let listed_key = setup.key("listed-relay").to_string();
    let pick = || async {
        let (_, _, created) = post(
            &http,
            &gw.url("/v1/sessions"),
            Some(setup.key("app")),
            json!({}),
        )
        .await;
        created["relay"]["id"].as_u64().unwrap()
    };
    // Relay 9 registers itself with load 0.1: the listed relay, without a report (load 0),
    // is handed out.
    assert_eq!(
        beat(key9.clone(), 9, "127.0.0.1:7009", relay9.to_string(), 10).await,
        200
    );
    assert_eq!(pick().await, RELAY_ID);
    // The listed relay reports load 0.5 through its own credential: relay 9, unprobed, is
    // still never handed out.
    assert_eq!(
        beat(
            listed_key.clone(),
            RELAY_ID,
            "127.0.0.1:7000",
            listed_public.clone(),
            50
        )
        .await,
        200
    );
    for _ in 0..3 {
        assert_eq!(pick().await, RELAY_ID);
    }
    // A relay credential speaks for its own relay only, and cannot move a listed relay or
    // change its key; malformed reports are refused.
    assert_eq!(
        beat(
            listed_key.clone(),
            9,
            "127.0.0.1:7009",
            relay9.to_string(),
            0
        )
        .await,
        403
    );
    assert_eq!(
        beat(
            key9.clone(),
            RELAY_ID,
            "127.0.0.1:7000",
            listed_public.clone(),
            0
        )
        .await,
        403
    );
    assert_eq!(
        beat(
            listed_key.clone(),
            RELAY_ID,
            "127.0.0.1:7999",
            listed_public.clone(),
            0
        )
        .await,
        403
    );
    assert_eq!(
        beat(
            listed_key.clone(),
            RELAY_ID,
            "127.0.0.1:7000",
            relay9.to_string(),
            0
        )
        .await,
        403
    );
    assert_eq!(
        beat(key9.clone(), 9, "0.0.0.0:7009", relay9.to_string(), 10).await,
        400
    );
    assert_eq!(
        beat(key9.clone(), 9, "127.0.0.1:7009", "AAAA".into(), 10).await,
        400
    );
    assert_eq!(
        beat(
            setup.key("app").to_string(),
            9,
            "127.0.0.1:7009",
            relay9.to_string(),
            10
        )
        .await,
        403
    );
    let relays: serde_json::Value = reqwest::Client::new()
        .get(gw.admin_url("/admin/v1/relays"))
        .bearer_auth(&setup.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let relays = relays["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 2, "{relays:?}");
    let nine = relays.iter().find(|r| r["id"] == 9).unwrap();
    assert_eq!(
        (&nine["source"], &nine["sessions"], &nine["healthy"]),
        (&json!("heartbeat"), &json!(10), &json!(false))
    );
    let listed = relays.iter().find(|r| r["id"] == RELAY_ID).unwrap();
    assert_eq!(
        (&listed["source"], &listed["sessions"]),
        (&json!("config"), &json!(50))
    );
}

#[test]
fn slow_clients_are_cut_off_by_the_header_and_request_timeouts() {
    let setup = Setup::new("slow");
    let config = setup
        .config(1, "")
        .replace("[tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n", "")
        .replace(
            "listen = \"127.0.0.1:0\"\n\n",
            "listen = \"127.0.0.1:0\"\nplain_http = true\nheader_read_timeout_ms = 300\nrequest_timeout_ms = 1000\n\n",
        );
    let gw = setup.start("gw", &config);
    let mut stream = std::net::TcpStream::connect(gw.public).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    // The server closes the connection (possibly after a 408) well before our 5 s.
    let _ = stream.read_to_end(&mut buf);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );

    // A complete head whose body never comes: the request timeout answers 408 and closes.
    let mut stream = std::net::TcpStream::connect(gw.public).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = format!(
        "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        setup.key("app")
    );
    stream.write_all(head.as_bytes()).unwrap();
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.ends_with("{\"error\":\"request_timeout\"}"), "{text}");
}

#[tokio::test]
async fn a_listed_relay_that_fails_its_probe_is_not_handed_out() {
    let setup = Setup::new("probe");
    // A UDP port that never answers stands in for a dead relay.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = setup
        .config(1, "")
        .replace(
            "address = \"127.0.0.1:7000\"",
            &format!("address = \"{}\"", silent.local_addr().unwrap()),
        )
        .replace(
            "[relay_health]\nprobe = false\n",
            "[relay_health]\nprobe = true\ninterval_secs = 1\ntimeout_ms = 100\n",
        );
    let gw = setup.start("gw", &config);
    let http = client(&setup.pki.ca_pem, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = post(
            &http,
            &gw.url("/v1/sessions"),
            Some(setup.key("app")),
            json!({}),
        )
        .await;
        if status == 503 {
            assert_eq!(body, json!({ "error": "no_relay_available" }));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead relay is still handed out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&page, "ferry_gateway_relays{health=\"unhealthy\"}"),
        1
    );
    assert!(metric(&page, "ferry_gateway_no_relay_total") >= 1);
}

#[tokio::test]
async fn forwarded_for_names_the_client_only_behind_trusted_proxies_and_ipv6_counts_by_prefix() {
    let setup = Setup::new("proxies");
    let with_proxies = |proxies: &str| {
        setup
            .config(
                1,
                "[limits]\nper_ip_rate = 0.01\nper_ip_burst = 2\nper_key_rate = 1000.0\nper_key_burst = 1000\n",
            )
            .replace(
                "listen = \"127.0.0.1:0\"\n\n[tls]",
                &format!("listen = \"127.0.0.1:0\"\ntrusted_proxies = {proxies}\n\n[tls]"),
            )
    };
    let http = client(&setup.pki.ca_pem, None);
    let create = |gw: &Gateway, forwarded: Option<&'static str>| {
        let mut req = http
            .post(gw.url("/v1/sessions"))
            .bearer_auth(setup.key("app"))
            .json(&json!({}));
        if let Some(f) = forwarded {
            req = req.header("x-forwarded-for", f);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };

    // 127.0.0.1 (this test, standing in for a load balancer) is a trusted proxy.
    let gw = setup.start("trusted", &with_proxies("[\"127.0.0.1\", \"10.0.0.0/8\"]"));
    // The client forged the leftmost entry; the rightmost untrusted one is the client.
    let chain = Some("198.51.100.66, 203.0.113.9, 10.1.2.3");
    assert_eq!(create(&gw, chain).await, 201);
    assert_eq!(create(&gw, chain).await, 201);
    assert_eq!(create(&gw, chain).await, 429);
    // Changing the forged part does not help; another client has its own bucket.
    assert_eq!(create(&gw, Some("192.0.2.1, 203.0.113.9")).await, 429);
    assert_eq!(create(&gw, Some("203.0.113.10")).await, 201);
    // IPv6 clients share a bucket per /64.
    assert_eq!(create(&gw, Some("2001:db8:1:2::1")).await, 201);
    assert_eq!(create(&gw, Some("[2001:db8:1:2:ffff::9]:4711")).await, 201);
    assert_eq!(create(&gw, Some("2001:db8:1:2:abcd::3")).await, 429);
    assert_eq!(create(&gw, Some("2001:db8:1:3::1")).await, 201);
    // Without the header, the proxy itself is the client.
    assert_eq!(create(&gw, None).await, 201);
    let log = gw.log_text();
    assert!(
        log.contains("event=\"session_created\"") || log.contains("event=session_created"),
        "{log}"
    );
    assert!(log.contains("client=203.0.113.9 via=127.0.0.1"), "{log}");
    assert!(
        log.contains("limiter=\"ip\"") || log.contains("limiter=ip"),
        "{log}"
    );
    assert!(
        log.contains("client=2001:db8:1:2:abcd::3 via=127.0.0.1"),
        "{log}"
    );
    assert!(!log.contains("client=198.51.100.66"), "{log}");

    // When the TCP peer is not a trusted proxy, the header is ignored: every request below
    // counts against 127.0.0.1, whatever it claims.
    let untrusted = setup.start("untrusted", &with_proxies("[\"10.0.0.0/8\"]"));
    assert_eq!(create(&untrusted, Some("203.0.113.1")).await, 201);
    assert_eq!(create(&untrusted, Some("203.0.113.2")).await, 201);
    assert_eq!(create(&untrusted, Some("203.0.113.3")).await, 429);
    let log = untrusted.log_text();
    assert!(log.contains("client=127.0.0.1 via=-"), "{log}");
    assert!(!log.contains("203.0.113."), "{log}");
}

#[tokio::test]
async fn an_admin_listener_beyond_loopback_speaks_only_https() {
    let setup = Setup::new("admin-tls");
    let loopback = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let everywhere = "[admin]\nlisten = \"0.0.0.0:0\"\nallow_non_loopback = true\n";
    let config = setup.config(1, "");
    assert!(config.contains(loopback));
    let gw = setup.start("admin-tls", &config.replace(loopback, everywhere));
    assert!(gw.admin.ip().is_unspecified(), "{}", gw.admin);
    // Over HTTPS, with the server's certificate, it answers, admin token and all.
    let https = client(&setup.pki.ca_pem, None);
    let url = |path: &str| format!("https://localhost:{}{path}", gw.admin.port());
    let health = https.get(url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let list = https
        .get(url("/admin/v1/sessions"))
        .bearer_auth(&setup.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    // In clear text, nothing: the token would cross the network readable.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", gw.admin.port()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // And without TLS on the server, such a listener is refused before anything starts.
    let plain_config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nplain_http = true\n\n{}",
        config
            .split_once("[signing]")
            .map(|(_, rest)| format!("[signing]{rest}"))
            .unwrap()
            .replace(loopback, everywhere)
    );
    let path = setup.file("admin-plain.toml");
    write_file(&path, &plain_config, 0o600);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-gateway"))
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("admin.listen") && stderr.contains("needs TLS"),
        "{stderr}"
    );
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let setup = Setup::new("per-address");
    let config = setup
        .config(1, "")
        .replace("[server]\n", "[server]\nmax_connections_per_address = 2\n");
    let gw = setup.start("per-address", &config);
    // Two idle connections: the address's share.
    let idle: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(gw.public).unwrap())
        .collect();
    // A third is closed as soon as it is accepted: reading it ends at once.
    let mut third = std::net::TcpStream::connect(gw.public).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    let read = third.read(&mut byte);
    assert!(
        matches!(read, Ok(0)) || read.is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the third connection stayed open"
    );
    let metrics = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric(
            &metrics,
            "ferry_gateway_connections_refused_per_address_total"
        ) >= 1,
        "{metrics}"
    );
    // Once one of them closes, the address may connect again.
    drop(idle);
    let https = client(&setup.pki.ca_pem, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match https.get(gw.url("/healthz")).send().await {
            Ok(r) if r.status() == 200 => break,
            other => assert!(std::time::Instant::now() < deadline, "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw TLS client connection to `gw`, trusting the test CA, offering `alpn`.
async fn raw_tls(
    setup: &Setup,
    gw: &Gateway,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(setup.pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(gw.public).await.unwrap();
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// One response read off a raw connection: the head (lower-cased) and the body.
#[derive(Debug)]
struct RawResponse {
    head: String,
    body: String,
}

impl RawResponse {
    fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }

    fn closes(&self) -> bool {
        self.head.contains("\r\nconnection: close\r\n")
    }
}

/// Reads one response (a `Content-Length` body) off `stream`.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> RawResponse {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("a response within 5 s")
            .expect("a response, not an error");
        assert_eq!(
            n,
            1,
            "EOF in the response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
    let len: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.unwrap();
    RawResponse {
        head,
        body: String::from_utf8(body).unwrap(),
    }
}

/// Sends a POST to `path` whose head and body go in separate writes (separate TLS records,
/// 150 ms apart), as a client streaming its body does, and reads the answer.
async fn split_post(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    key: &str,
    content_type: &str,
    body: &str,
) -> RawResponse {
    use tokio::io::AsyncWriteExt as _;
    let head = format!(
        "POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The server may have answered and closed already; the answer is read either way.
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.flush().await;
    read_response(stream).await
}

/// After a response with `Connection: close`, the server ends the TLS session with a
/// close_notify (a clean EOF here; a TCP close without it is an error in rustls).
async fn assert_closed_gracefully(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    use tokio::io::AsyncReadExt as _;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection");
    assert_eq!(
        read.map_err(|e| e.to_string()),
        Ok(0),
        "after: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// An answer given before the request's body was read (it arrives in a later TLS record):
/// 401, 415 and 429 say `Connection: close` and end the connection with a close_notify, so a
/// keep-alive client knows not to send its next request there; an answer after the body was
/// read keeps the connection open for the next request.
#[tokio::test]
async fn answers_before_the_body_is_read_close_the_connection_gracefully() {
    use tokio::io::AsyncWriteExt as _;
    let setup = Setup::new("early-close");
    let gw = setup.start(
        "gw",
        &setup.config(1, "[limits]\nper_key_rate = 0.01\nper_key_burst = 2\n"),
    );
    let wrong = format!("fgk1.app.{}", "A".repeat(43));
    let cases = [
        (wrong.as_str(), "application/json", 401, "unauthorized"),
        // The 415 takes one of the key's two tokens, the 201 below the other.
        (
            setup.key("app"),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
    ];
    for (key, content_type, status, code) in cases {
        let mut tls = raw_tls(&setup, &gw, &[b"http/1.1"]).await;
        let answer = split_post(&mut tls, key, content_type, "{}").await;
        assert_eq!(answer.status(), status, "{answer:?}");
        assert_eq!(answer.body, format!("{{\"error\":\"{code}\"}}"));
        assert!(answer.closes(), "no Connection: close: {answer:?}");
        assert_closed_gracefully(&mut tls).await;
    }

    // The body read (201): the connection stays open, and serves the next request.
    let mut tls = raw_tls(&setup, &gw, &[b"http/1.1"]).await;
    let answer = split_post(&mut tls, setup.key("app"), "application/json", "{}").await;
    assert_eq!(answer.status(), 201, "{answer:?}");
    assert!(!answer.closes(), "{answer:?}");
    // The key's budget is spent: 429, before the body is read.
    let answer = split_post(&mut tls, setup.key("app"), "application/json", "{}").await;
    assert_eq!(answer.status(), 429, "{answer:?}");
    assert!(answer.closes(), "no Connection: close: {answer:?}");
    assert_closed_gracefully(&mut tls).await;

    // A request without a body is answered on a kept connection, whatever its status.
    let mut tls = raw_tls(&setup, &gw, &[b"http/1.1"]).await;
    for path in ["/nope", "/healthz"] {
        tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = read_response(&mut tls).await;
        assert!(!answer.closes(), "{answer:?}");
    }
}

/// A client that sends its whole body before it reads the answer, as most do, gets the early
/// answer and not a connection reset: after an answer given before the body was read, the
/// gateway reads and discards what the client still sends before it closes, so its kernel
/// holds no unread data to answer with a TCP reset.
#[tokio::test]
async fn a_client_that_sends_its_whole_body_before_reading_gets_the_early_answer() {
    use tokio::io::AsyncWriteExt as _;
    let setup = Setup::new("linger");
    let gw = setup.start("gw", &setup.config(1, ""));
    let wrong = format!("fgk1.app.{}", "A".repeat(43));
    // Within `server.max_body_bytes`, so the answer is the key's 401; JSON whitespace.
    let body = vec![b' '; 16 * 1024];
    for round in 0..3 {
        let mut tls = raw_tls(&setup, &gw, &[b"http/1.1"]).await;
        let head = format!(
            "POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {wrong}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        // The answer is given and the connection closed on the gateway's side meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for chunk in body.chunks(1024) {
            let sent = async {
                tls.write_all(chunk).await?;
                tls.flush().await
            };
            sent.await
                .unwrap_or_else(|e| panic!("round {round}: the body's write failed: {e}"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let answer = read_response(&mut tls).await;
        assert_eq!(answer.status(), 401, "round {round}: {answer:?}");
        assert!(answer.closes(), "round {round}: {answer:?}");
        assert_closed_gracefully(&mut tls).await;
    }
}

/// The gateway speaks HTTP/1.1 only. ALPN offers `http/1.1` alone: a client offering only `h2`
/// fails the handshake (`no_application_protocol`), one offering both gets `http/1.1`, one
/// offering none is served HTTP/1.1. A client sending the HTTP/2 connection preface anyway
/// (prior knowledge) gets no answer: the connection is closed, without a TLS close_notify.
#[tokio::test]
async fn only_http_1_1_is_spoken_and_an_http2_preface_gets_the_connection_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let setup = Setup::new("h2");
    let gw = setup.start("gw", &setup.config(1, ""));
    for (offered, chosen) in [
        (
            &[b"h2".as_slice(), b"http/1.1"][..],
            Some(b"http/1.1".as_slice()),
        ),
        (&[b"http/1.1".as_slice()][..], Some(b"http/1.1".as_slice())),
        (&[][..], None),
    ] {
        let tls = raw_tls(&setup, &gw, offered).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), chosen, "{offered:?}");
    }
    // Only h2 offered: rustls refuses the handshake.
    {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(setup.pki.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(gw.public).await.unwrap();
        let e = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("NoApplicationProtocol"), "{e}");
    }
    // The HTTP/2 preface over HTTP/1.1: no bytes come back.
    let mut tls = raw_tls(&setup, &gw, &[]).await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer))
        .await
        .expect("the connection is closed");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // As gateway-api.md says: closed without a TLS close_notify.
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::UnexpectedEof)
    );
    // The gateway serves on.
    let http = client(&setup.pki.ca_pem, None);
    assert_eq!(
        http.get(gw.url("/healthz")).send().await.unwrap().status(),
        200
    );
}
