//! Fuzzes the gateway's JSON request bodies (`ferry_gateway::api`: `CreateSession`,
//! `JoinSession`, `RenewSession`, `Heartbeat`, `Revoke`), read the way the API reads them
//! (`ferry_gateway::api::parse_body`), against the schema docs/gateway-openapi.yaml states.
//!
//! The first byte picks the body type. Nothing may panic, and for each body:
//! - what it accepts is a JSON object holding only the type's fields, every required field
//!   present, strings as strings (never `null`), and integers as non-negative JSON numbers
//!   without a fraction; the fields it reads are the values the object holds;
//! - any JSON object that follows those rules is accepted.
#![no_main]

use ferry_gateway::api::{CreateSession, Heartbeat, JoinSession, RenewSession, Revoke, parse_body};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// The JSON type of a field.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
}

/// A field's value as a body type read it.
#[derive(Debug, PartialEq)]
enum Got {
    Str(String),
    Int(u64),
}

/// One body type: its fields (name, kind, required) and a reader that returns what it read.
struct Body {
    fields: &'static [(&'static str, Kind, bool)],
    read: fn(&[u8]) -> Option<Vec<(&'static str, Got)>>,
}

fn strings(fields: &[(&'static str, Option<String>)]) -> Vec<(&'static str, Got)> {
    fields
        .iter()
        .filter_map(|(name, v)| v.clone().map(|v| (*name, Got::Str(v))))
        .collect()
}

const BODIES: [Body; 5] = [
    Body {
        fields: &[
            ("realm", Kind::Str, false),
            ("peer_public_key", Kind::Str, false),
            ("expected_peer_public_key", Kind::Str, false),
        ],
        read: |b| {
            let c: CreateSession = parse_body(b)?;
            Some(strings(&[
                ("realm", c.realm),
                ("peer_public_key", c.peer_public_key),
                ("expected_peer_public_key", c.expected_peer_public_key),
            ]))
        },
    },
    Body {
        fields: &[
            ("join_code", Kind::Str, true),
            ("peer_public_key", Kind::Str, false),
        ],
        read: |b| {
            let j: JoinSession = parse_body(b)?;
            Some(strings(&[
                ("join_code", Some(j.join_code)),
                ("peer_public_key", j.peer_public_key),
            ]))
        },
    },
    Body {
        fields: &[("session_id", Kind::Str, true), ("slot", Kind::Str, true)],
        read: |b| {
            let r: RenewSession = parse_body(b)?;
            Some(strings(&[
                ("session_id", Some(r.session_id)),
                ("slot", Some(r.slot)),
            ]))
        },
    },
    Body {
        fields: &[
            ("relay_id", Kind::Int, true),
            ("address", Kind::Str, true),
            ("public_key", Kind::Str, true),
            ("sessions", Kind::Int, true),
            ("capacity", Kind::Int, true),
        ],
        read: |b| {
            let h: Heartbeat = parse_body(b)?;
            let mut got = strings(&[
                ("address", Some(h.address)),
                ("public_key", Some(h.public_key)),
            ]);
            got.extend([
                ("relay_id", Got::Int(h.relay_id)),
                ("sessions", Got::Int(h.sessions)),
                ("capacity", Got::Int(h.capacity)),
            ]);
            Some(got)
        },
    },
    Body {
        fields: &[("key_id", Kind::Str, true)],
        read: |b| {
            let r: Revoke = parse_body(b)?;
            Some(strings(&[("key_id", Some(r.key_id))]))
        },
    },
];

/// What a schema-abiding reader reads from `object` for `body`, or `None` if the schema
/// refuses it.
fn expected(body: &Body, object: &Map<String, Value>) -> Option<Vec<(&'static str, Got)>> {
    if object
        .keys()
        .any(|k| !body.fields.iter().any(|(name, ..)| name == k))
    {
        return None;
    }
    let mut out = Vec::new();
    for &(name, kind, required) in body.fields {
        let Some(value) = object.get(name) else {
            if required {
                return None;
            }
            continue;
        };
        let got = match (kind, value) {
            (Kind::Str, Value::String(s)) => Got::Str(s.clone()),
            (Kind::Int, Value::Number(n)) => Got::Int(integer(n)?),
            _ => return None,
        };
        out.push((name, got));
    }
    Some(out)
}

/// JSON Schema's `integer`, non-negative, as a u64: `7`, `7.0` and `7e0` alike.
fn integer(n: &serde_json::Number) -> Option<u64> {
    if let Some(v) = n.as_u64() {
        return Some(v);
    }
    if n.is_i64() {
        return None;
    }
    let f = n.as_f64()?;
    (f.fract() == 0.0 && f >= 0.0 && f < 18_446_744_073_709_551_616.0).then_some(f as u64)
}

fn sorted(mut fields: Vec<(&'static str, Got)>) -> Vec<(&'static str, Got)> {
    fields.sort_by_key(|(name, _)| *name);
    fields
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    let body = &BODIES[usize::from(pick) % BODIES.len()];
    let read = (body.read)(json);
    let value: Option<Value> = serde_json::from_slice(json).ok();
    if let Some(got) = &read {
        let Some(Value::Object(object)) = &value else {
            panic!("accepted a body that is not a JSON object");
        };
        // serde_json's Value keeps the last of duplicate keys; the body type refuses them, so
        // the object seen here is the one the body type read.
        let want = expected(body, object).expect("accepted a body the schema refuses");
        assert_eq!(
            sorted(got.iter().map(|(n, g)| (*n, clone(g))).collect()),
            sorted(want)
        );
    }
    // Any object the schema allows (written out again, without duplicate keys) is accepted.
    if let Some(Value::Object(object)) = &value {
        if let Some(want) = expected(body, object) {
            let text = serde_json::to_vec(object).expect("a Value serialises");
            let got = (body.read)(&text).expect("refused a body the schema allows");
            assert_eq!(sorted(got), sorted(want));
        }
    }
});

fn clone(g: &Got) -> Got {
    match g {
        Got::Str(s) => Got::Str(s.clone()),
        Got::Int(n) => Got::Int(*n),
    }
}
