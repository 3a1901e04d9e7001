//! The fields a strict config parser accepts, found by asking the parser itself, so that a
//! test can hold docs/config.md to the code rather than to a hand-kept list or an example file.
//!
//! serde refuses an unknown field of a `deny_unknown_fields` struct with "unknown field `x`,
//! expected one of `a`, `b`, ...": feeding each section a probe field lists that section's
//! fields, and probing each field as a table, or an array of tables, finds the nested ones.

/// The probe field: no config has a field of this name.
const PROBE: &str = "ferry_field_probe";

/// The fields `parse` refuses a probe in, after the header lines `headers`; `None` when it
/// does not answer with an unknown-field error (the header names no table of fields).
fn expected(parse: &impl Fn(&str) -> Result<(), String>, headers: &str) -> Option<Vec<String>> {
    let message = parse(&format!("{headers}{PROBE} = 1\n")).err()?;
    let rest = message.split(&format!("unknown field `{PROBE}`")).nth(1)?;
    let list = rest
        .split_once("expected one of ")
        .or_else(|| rest.split_once("expected "))
        .map_or("", |(_, list)| list);
    if rest.contains("there are no fields") {
        return Some(Vec::new());
    }
    let names: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some(names)
}

/// Probes `path` (`a` or `a.b`) as a table, then as an array of tables.
fn fields_of(parse: &impl Fn(&str) -> Result<(), String>, path: &str) -> Option<Vec<String>> {
    expected(parse, &format!("[{path}]\n")).or_else(|| expected(parse, &format!("[[{path}]]\n")))
}

/// Every field `parse` accepts, as `section.field`, and `section.table.field` for the fields
/// of a nested table or array of tables (`signing.keys.kid`), sorted.
///
/// `parse` parses a whole config text with the strict serde structs (no validation) and says
/// why it failed.
///
/// # Panics
///
/// When `parse` does not refuse a top-level probe field with serde's unknown-field error:
/// the config is not strict, and this cannot list its fields.
pub fn accepted_fields(parse: impl Fn(&str) -> Result<(), String>) -> Vec<String> {
    let sections = expected(&parse, "")
        .unwrap_or_else(|| panic!("the parser takes an unknown top-level field: it is not strict"));
    let mut out = Vec::new();
    for section in sections {
        let Some(fields) = fields_of(&parse, &section) else {
            out.push(section);
            continue;
        };
        for field in fields {
            let path = format!("{section}.{field}");
            match fields_of(&parse, &path) {
                Some(nested) => out.extend(nested.iter().map(|n| format!("{path}.{n}"))),
                None => out.push(path),
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a strict parser of `[a] x, y` and `[[b]] z` with a nested `[[b.c]] w`.
    fn parse(text: &str) -> Result<(), String> {
        let unknown = |expected: &str| Err(format!("unknown field `{PROBE}`, {expected}"));
        match text.lines().next() {
            Some(l) if l.starts_with(PROBE) => unknown("expected one of `a`, `b`"),
            Some("[a]") => unknown("expected one of `x`, `y`"),
            Some("[[b]]") => unknown("expected one of `z`, `c`"),
            Some("[[b.c]]") => unknown("expected `w`"),
            _ => Err("invalid type".into()),
        }
    }

    #[test]
    fn fields_are_listed_with_their_sections_and_nested_tables() {
        assert_eq!(accepted_fields(parse), ["a.x", "a.y", "b.c.w", "b.z"]);
    }
}
