//! The JSON result's schema (docs/bench-result.schema.json, JSON Schema 2020-12) and a
//! validator for the part of JSON Schema it uses: `type` (one or a list), `required`,
//! `properties`, `additionalProperties: false`, `items`, `enum`, `const`, `minimum`, `anyOf`
//! and `$ref` to `#/$defs/…`. Any other keyword in the schema is an error, so the schema cannot
//! say more than is checked.

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The schema's text.
pub const SCHEMA: &str = include_str!("../../../docs/bench-result.schema.json");

/// Checks `result` against [`SCHEMA`]; the error names the first place that does not match.
pub fn validate(result: &Value) -> anyhow::Result<()> {
    let schema: Value = serde_json::from_str(SCHEMA).context("docs/bench-result.schema.json")?;
    check(&schema, &schema, result, "$")
}

const KNOWN: [&str; 14] = [
    "anyOf",
    "$schema",
    "$id",
    "$defs",
    "title",
    "description",
    "type",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
];

fn check(root: &Value, schema: &Value, value: &Value, at: &str) -> anyhow::Result<()> {
    let Some(rules) = schema.as_object() else {
        bail!("{at}: the schema there is not an object");
    };
    if let Some(reference) = rules.get("$ref") {
        let name = reference
            .as_str()
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .with_context(|| format!("{at}: only #/$defs/… references are supported"))?;
        let target = root
            .get("$defs")
            .and_then(|d| d.get(name))
            .with_context(|| format!("{at}: no $defs/{name}"))?;
        return check(root, target, value, at);
    }
    if let Some(k) = rules.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        bail!("{at}: the schema uses {k:?}, which this validator does not check");
    }
    if let Some(Value::Array(options)) = rules.get("anyOf")
        && !options
            .iter()
            .any(|option| check(root, option, value, at).is_ok())
    {
        bail!("{at}: {value} matches none of the anyOf schemas");
    }
    if let Some(t) = rules.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            _ => bail!("{at}: a bad type rule"),
        };
        if !types.iter().any(|t| is_type(value, t)) {
            bail!("{at}: {value} is not of type {}", types.join(" or "));
        }
    }
    if let Some(Value::Array(allowed)) = rules.get("enum")
        && !allowed.contains(value)
    {
        bail!("{at}: {value} is not one of {allowed:?}");
    }
    if let Some(c) = rules.get("const")
        && c != value
    {
        bail!("{at}: {value} is not {c}");
    }
    if let (Some(min), Some(v)) = (rules.get("minimum").and_then(Value::as_f64), value.as_f64())
        && v < min
    {
        bail!("{at}: {v} is below the minimum {min}");
    }
    if let Value::Object(fields) = value {
        if let Some(Value::Array(required)) = rules.get("required") {
            for name in required.iter().filter_map(Value::as_str) {
                if !fields.contains_key(name) {
                    bail!("{at}: the required field {name:?} is missing");
                }
            }
        }
        let properties = rules.get("properties").and_then(Value::as_object);
        for (name, v) in fields {
            match properties.and_then(|p| p.get(name)) {
                Some(sub) => check(root, sub, v, &format!("{at}.{name}"))?,
                None if rules.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    bail!("{at}: the field {name:?} is not in the schema")
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(sub)) = (value, rules.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(root, sub, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_validator_catches_what_the_schema_forbids() {
        let schema = json!({
            "$defs": {"n": {"type": "integer", "minimum": 0}},
            "type": "object",
            "required": ["a", "b"],
            "additionalProperties": false,
            "properties": {
                "a": {"$ref": "#/$defs/n"},
                "b": {"type": "array", "items": {"enum": ["x", "y"]}},
                "c": {"type": ["string", "null"]},
                "e": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/n"}]}
            }
        });
        let ok = json!({"a": 3, "b": ["x", "y"], "c": null, "e": 2});
        check(&schema, &schema, &ok, "$").expect("valid");
        for bad in [
            json!({"a": 3}),
            json!({"a": -1, "b": []}),
            json!({"a": 1.5, "b": []}),
            json!({"a": 1, "b": ["z"]}),
            json!({"a": 1, "b": [], "d": 0}),
            json!({"a": 1, "b": [], "c": 4}),
            json!({"a": 1, "b": [], "e": -2}),
        ] {
            assert!(check(&schema, &schema, &bad, "$").is_err(), "{bad} passed");
        }
        let unknown = json!({"pattern": "x"});
        assert!(check(&unknown, &unknown, &json!("x"), "$").is_err());
    }

    #[test]
    fn the_schema_file_parses_and_uses_only_checked_keywords() {
        let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
        // An empty object fails on its first required field, not on the schema itself.
        let err = validate(&json!({})).expect_err("an empty result is invalid");
        assert!(format!("{err}").contains("required"), "{err}");
        assert_eq!(
            schema["properties"]["version"]["const"],
            json!(super::super::report::SCHEMA_VERSION)
        );
    }
}
