//! docs/gateway-openapi.yaml and the gateway's routes stay in step: every route the routers
//! serve is in the file with its method, every operation in the file is served, each path's
//! `servers` names exactly the listeners that serve it, and the real binary answers each of
//! them (never with 404).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

/// `(METHOD, path)` of every operation under `paths:` in the OpenAPI file.
fn documented() -> BTreeSet<(String, String)> {
    let text = include_str!("../../docs/gateway-openapi.yaml");
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let key = line.trim().trim_end_matches(':');
        match indent {
            2 => {
                assert!(
                    key.starts_with('/') && line.ends_with(':'),
                    "odd path line {line:?}"
                );
                path = Some(key.to_string());
            }
            4 if line.ends_with(':') => {
                let method = key.to_uppercase();
                assert!(
                    ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&method.as_str()),
                    "odd method line {line:?}"
                );
                out.insert((method, path.clone().unwrap()));
            }
            _ => {}
        }
    }
    out
}

/// The listeners each path's own `servers` line names, by the URLs of the top-level
/// `servers` (the public listener is the `https` one, the admin listener the `http` one).
fn documented_servers() -> BTreeMap<String, BTreeSet<&'static str>> {
    let text = include_str!("../../docs/gateway-openapi.yaml");
    let mut out = BTreeMap::new();
    let mut path = None;
    for line in text.lines() {
        if line.starts_with("  /") {
            path = Some(line.trim().trim_end_matches(':').to_string());
        } else if let Some(servers) = line.strip_prefix("    servers: ") {
            let mut listeners = BTreeSet::new();
            if servers.contains("\"https://gateway.example.net:8443\"") {
                listeners.insert("public");
            }
            if servers.contains("\"http://127.0.0.1:9478\"") {
                listeners.insert("admin");
            }
            let path = path.clone().unwrap();
            assert!(
                !listeners.is_empty(),
                "{path}: no known server in {servers}"
            );
            assert!(out.insert(path.clone(), listeners).is_none(), "{path}");
        } else if !line.starts_with(' ') && !line.is_empty() && line != "paths:" {
            path = None;
        }
    }
    out
}

fn served() -> BTreeSet<(String, String)> {
    ferry_gateway::api::public_routes()
        .into_iter()
        .chain(ferry_gateway::api::admin_routes())
        .map(|(method, path, _)| (method.to_string(), path.to_string()))
        .collect()
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_served() {
    let documented = documented();
    let served = served();
    assert!(served.len() >= 8, "{served:?}");
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "routes missing from docs/gateway-openapi.yaml: {missing:?}"
    );
    assert!(extra.is_empty(), "documented but not served: {extra:?}");
}

#[test]
fn every_path_names_the_listeners_that_serve_it() {
    let mut expected: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for (listener, routes) in [
        ("public", ferry_gateway::api::public_routes()),
        ("admin", ferry_gateway::api::admin_routes()),
    ] {
        for (_, path, _) in routes {
            expected
                .entry(path.to_string())
                .or_default()
                .insert(listener);
        }
    }
    assert_eq!(documented_servers(), expected);
}

#[test]
fn every_api_doc_route_is_in_the_openapi_file() {
    // docs/gateway-api.md names every route in its route table as `METHOD /path`.
    let doc = include_str!("../../docs/gateway-api.md");
    let mut named = BTreeSet::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.trim_start_matches("| `").split('`').next().unwrap();
        if let Some((method, path)) = cell.split_once(' ')
            && path.starts_with('/')
        {
            named.insert((method.to_string(), path.to_string()));
        }
    }
    assert_eq!(named, documented());
}

#[test]
fn the_error_codes_of_the_api_doc_and_the_openapi_file_are_the_same() {
    // gateway-api.md: the rows of the error table, `| <status> | `<code>` | … |`.
    let doc = include_str!("../../docs/gateway-api.md");
    let in_doc: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .filter_map(|l| l.split('`').nth(1))
        .map(str::to_string)
        .collect();
    // gateway-openapi.yaml: the enum of the Error schema, one `- <code>` line each.
    let text = include_str!("../../docs/gateway-openapi.yaml");
    let start = text.find("\n    Error:\n").unwrap();
    let in_openapi: BTreeSet<String> = text[start..]
        .lines()
        .skip_while(|l| l.trim() != "enum:")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim_start().trim_start_matches("- ").to_string())
        .collect();
    assert!(in_doc.len() >= 14, "{in_doc:?}");
    assert_eq!(in_doc, in_openapi);
}

#[tokio::test]
async fn the_binary_serves_every_route_it_documents() {
    let setup = Setup::new("openapi");
    let gw = setup.start("gw", &setup.config(1, ""));
    let https = client(&setup.pki.ca_pem, None);
    let plain = reqwest::Client::new();
    let public: BTreeSet<String> = ferry_gateway::api::public_routes()
        .into_iter()
        .map(|(_, p, _)| p.to_string())
        .collect();
    for (method, path) in documented() {
        let (client, url) = if public.contains(&path) {
            (&https, gw.url(&path))
        } else {
            (&plain, gw.admin_url(&path))
        };
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let status = client
            .request(method.clone(), &url)
            .send()
            .await
            .unwrap()
            .status();
        assert!(
            [200, 401, 415].contains(&status.as_u16()),
            "{method} {path}: {status}"
        );
    }
}
