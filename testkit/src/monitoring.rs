//! The metric names monitoring/ (alert rules and the Grafana dashboard) uses, checked against
//! a page the code really serves, so a renamed metric cannot leave a silent alert or an empty
//! panel behind.

use std::collections::BTreeSet;
use std::path::Path;

/// The files in monitoring/ that name metrics.
pub const FILES: [&str; 2] = ["ferry-alerts.yml", "ferry-dashboard.json"];

/// Which process exports a metric: names starting `ferry_gateway_` are the gateway's, every
/// other `ferry_` name is the relay's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exporter {
    /// `ferry-relay`'s admin listener.
    Relay,
    /// `ferry-gateway`'s admin listener.
    Gateway,
}

impl Exporter {
    fn owns(self, name: &str) -> bool {
        match self {
            Self::Gateway => name.starts_with("ferry_gateway_"),
            Self::Relay => !name.starts_with("ferry_gateway_"),
        }
    }
}

/// Every `ferry_*` metric name in `text`: a run of `[a-z0-9_]` starting with `ferry_`, not
/// followed by `::` (a Rust path such as the log target `ferry_gateway::audit`).
pub fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("ferry_") {
        let start = i + found;
        let preceded = start > 0 && is_name_byte(bytes[start - 1]);
        let mut end = start;
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        if !preceded && !text[end..].starts_with("::") {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
}

/// The metric names `exporter` should serve that monitoring/ (next to the workspace's
/// `testkit/`) uses.
///
/// # Panics
///
/// When a file of monitoring/ cannot be read, or names no metric of `exporter`.
pub fn names_used(exporter: Exporter) -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring");
    let mut names = BTreeSet::new();
    for file in FILES {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let found: BTreeSet<String> = names_in(&text)
            .into_iter()
            .filter(|n| exporter.owns(n))
            .collect();
        assert!(!found.is_empty(), "{file} names no {exporter:?} metric");
        names.extend(found);
    }
    names
}

/// The metric families on a Prometheus text page: the name of every sample line.
pub fn names_on_page(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The names monitoring/ uses for `exporter` that `page` (a scrape of it) lacks; empty when
/// every alert and panel has its data.
pub fn missing_from(page: &str, exporter: Exporter) -> Vec<String> {
    let served = names_on_page(page);
    names_used(exporter)
        .into_iter()
        .filter(|n| !served.contains(n))
        .collect()
}

/// The metric families on `page` that none of `docs` (paths under the workspace's docs/) names
/// in a metric reference table (the first cell of a Markdown table row): empty when an
/// operator reading the docs' tables finds every metric the process serves. A name mentioned
/// only in passing elsewhere does not count.
///
/// # Panics
///
/// When a file of docs/ cannot be read.
pub fn undocumented(page: &str, docs: &[&str]) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let text: String = docs
        .iter()
        .map(|file| {
            let path = dir.join(file);
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        })
        .collect();
    let documented = names_in(&first_cells(&text));
    names_on_page(page)
        .into_iter()
        .filter(|n| !documented.contains(n))
        .collect()
}

/// The first cell of every Markdown table row of `text`, one per line.
fn first_cells(text: &str) -> String {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix('|'))
        .filter_map(|row| row.split('|').next())
        .map(|cell| format!("{cell}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_in_a_tables_first_cell_are_documented() {
        let text = "The `ferry_prose_total` counter.\n\
                    | metric | labels |\n|---|---|\n\
                    | `ferry_a_total`, `ferry_b` | `ferry_in_labels_total` |\n";
        let names: Vec<_> = names_in(&first_cells(text)).into_iter().collect();
        assert_eq!(names, ["ferry_a_total", "ferry_b"]);
    }

    #[test]
    fn names_are_found_whole() {
        let text = r#"rate(ferry_forwarded_bytes_total{job="x"}[5m]) / my_ferry_thing ferry_gateway::audit"#;
        let names: Vec<_> = names_in(text).into_iter().collect();
        assert_eq!(names, ["ferry_forwarded_bytes_total"]);
        let page = "# TYPE ferry_a_total counter\nferry_a_total{x=\"1\"} 2\nferry_b 3\n";
        let on_page: Vec<_> = names_on_page(page).into_iter().collect();
        assert_eq!(on_page, ["ferry_a_total", "ferry_b"]);
    }

    #[test]
    fn each_exporter_has_names_in_both_files() {
        assert!(names_used(Exporter::Relay).contains("ferry_worker_socket_drops_total"));
        assert!(names_used(Exporter::Gateway).contains("ferry_gateway_auth_failures_total"));
    }
}
