//! SIGHUP to the real `ferry-gateway` process: a valid config applies live (new and revoked
//! keys, relays, session settings, the active signing kid, a renewed TLS certificate); an
//! invalid one, or one that changes what only a restart changes, is refused whole and the
//! running config stays in force.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_core::token::{TokenVerifier, VerifierConfig};
use ferry_testkit::metrics::metric;
use serde_json::json;

#[tokio::test]
async fn sighup_applies_a_valid_config_and_refuses_a_bad_one_whole() {
    let mut setup = Setup::new("reload");
    let first = setup.config(1, "");
    let mut gw = setup.start("gw", &first);
    let config_path = setup.file("gw.toml");
    let http = client(&setup.pki.ca_pem, None);
    let create = |key: String| {
        let (http, url) = (http.clone(), gw.url("/v1/sessions"));
        async move { post(&http, &url, Some(&key), json!({})).await }
    };
    let late = setup.add_key("late", &["create:*"]);
    assert_eq!(create(late.clone()).await.0, 401, "not configured yet");
    let (status, _, before) = create(setup.key("app").to_string()).await;
    assert_eq!(status, 201);
    assert_eq!(
        (before["kid"].as_u64(), before["relay"]["id"].as_u64()),
        (Some(1), Some(RELAY_ID))
    );

    // The new config: key "late" added, "acme" revoked, kid 2 signs, tokens live 60 s, another
    // relay replaces the listed one, and a renewed certificate from another CA.
    let renewed = Pki::new();
    write_file(&setup.file("tls2.crt"), &renewed.server_cert_pem, 0o644);
    write_file(&setup.file("tls2.key"), &renewed.server_key_pem, 0o600);
    let relay9_key =
        ferry_core::keys::RelayStaticKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let relay9 = relay9_key.public();
    let second = setup
        .config(
            2,
            "[auth]\nrevoked_keys = [\"acme\"]\n\n[sessions]\ntoken_lifetime_secs = 60\n",
        )
        .replace(
            &format!(
                "id = {RELAY_ID}\naddress = \"127.0.0.1:7000\"\npublic_key = \"{}\"",
                setup.relay_key.public()
            ),
            &format!("id = 9\naddress = \"127.0.0.1:7009\"\npublic_key = \"{relay9}\""),
        )
        .replace(
            "cert = \"tls.crt\"\nkey = \"tls.key\"",
            "cert = \"tls2.crt\"\nkey = \"tls2.key\"",
        );
    write_file(&config_path, &second, 0o600);
    reload(&mut gw, "applied").await;
    assert!(gw.log_text().contains("config reloaded"));

    // New connections get the renewed certificate: a client of the old CA no longer connects.
    let old_ca = client(&setup.pki.ca_pem, None);
    assert!(old_ca.get(gw.url("/healthz")).send().await.is_err());
    let http = client(&renewed.ca_pem, None);
    let url = gw.url("/v1/sessions");
    let (status, _, after) = post(&http, &url, Some(&late), json!({})).await;
    assert_eq!(status, 201, "{after}");
    assert_eq!(after["kid"], 2);
    assert_eq!(after["relay"]["id"], 9);
    assert_eq!(after["relay"]["public_key"], relay9.to_string());
    assert_eq!(
        after["expires_at"].as_u64().unwrap() - after["not_before"].as_u64().unwrap(),
        60
    );
    // Relay 9, trusting kid 2 only, accepts the token.
    let mut relay9_verifier = TokenVerifier::new(VerifierConfig::new(9), relay9_key).unwrap();
    relay9_verifier.add_trusted_key(2, setup.signing[1].1.public());
    verify(
        &relay9_verifier,
        after["token"].as_str().unwrap(),
        after["session_id"].as_str().unwrap(),
        0,
    )
    .unwrap();
    let (status, _, body) = post(
        &http,
        &url,
        Some(setup.key("acme")),
        json!({ "realm": "acme" }),
    )
    .await;
    assert_eq!((status, body), (401, json!({ "error": "unauthorized" })));
    // The session created before the reload is on a relay no longer listed (and silent): a
    // join gets 503 and the code stays usable, for when the relay is back.
    let join_url = gw.url("/v1/sessions/join");
    let join = |http: reqwest::Client| {
        let url = join_url.clone();
        let body = json!({ "join_code": before["join_code"] });
        let key = setup.key("app").to_string();
        async move { post(&http, &url, Some(&key), body).await }
    };
    let (status, _, body) = join(http.clone()).await;
    assert_eq!(
        (status, body),
        (503, json!({ "error": "no_relay_available" }))
    );
    // Counted as a 503 for want of a relay, and audited with the client like every event.
    let page = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&page, "ferry_gateway_no_relay_total"), 1, "{page}");
    let log = gw.log_text();
    let gone = log
        .lines()
        .find(|l| l.contains("reason=\"relay_gone\"") || l.contains("reason=relay_gone"))
        .unwrap_or_else(|| panic!("no relay_gone event:\n{log}"));
    assert!(
        gone.contains("client=127.0.0.1") && gone.contains("via=-"),
        "{gone}"
    );

    // An invalid file: refused whole, even the valid change it carries (dropping "late").
    let invalid = second.replace(&setup.key_table("late"), "").replace(
        "[sessions]\n",
        "[limits]\nper_ip_rate = 0.0\n\n[sessions]\n",
    );
    assert_ne!(invalid, second);
    write_file(&config_path, &invalid, 0o600);
    reload(&mut gw, "refused").await;
    assert!(
        gw.log_text()
            .contains("limits.per_ip_rate: must be above 0"),
        "{}",
        gw.log_text()
    );
    assert_eq!(post(&http, &url, Some(&late), json!({})).await.0, 201);

    // A change only a restart applies: refused whole too, naming the field.
    let moved = second.replace(&setup.key_table("late"), "").replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:1\"",
        1,
    );
    write_file(&config_path, &moved, 0o600);
    reload(&mut gw, "refused").await;
    let log = gw.log_text();
    assert!(
        log.contains("changes settings that need a restart: server.listen"),
        "{log}"
    );
    assert_eq!(post(&http, &url, Some(&late), json!({})).await.0, 201);

    // A missing file: refused, still serving.
    std::fs::remove_file(&config_path).unwrap();
    reload(&mut gw, "refused").await;
    assert_eq!(post(&http, &url, Some(&late), json!({})).await.0, 201);

    // And back to the first config: "late" is unknown again, kid 1 signs, the old CA works.
    write_file(&config_path, &first, 0o600);
    reload(&mut gw, "applied").await;
    let http = client(&setup.pki.ca_pem, None);
    assert_eq!(post(&http, &url, Some(&late), json!({})).await.0, 401);
    let (_, _, again) = post(&http, &url, Some(setup.key("app")), json!({})).await;
    assert_eq!(again["kid"], 1);
    // Its relay is listed again: the session created before the first reload is joined now.
    let (status, _, joined) = join(http.clone()).await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["relay"]["id"], RELAY_ID);
    let page = reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &page,
            "ferry_gateway_auth_failures_total{reason=\"revoked\"}"
        ),
        1
    );
    assert!(gw.stop().success());
}
