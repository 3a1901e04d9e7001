//! Prometheus text exposition (format 0.0.4), written by hand: a family header once, then
//! its samples. No registry, no globals: the relay renders its counters on each scrape.

use std::fmt::Write as _;

/// The kind of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets on restart).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// Builds a Prometheus text page.
#[derive(Debug, Default)]
pub struct PromWriter {
    out: String,
}

/// Whether `name` is a valid metric or label name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

impl PromWriter {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Samples follow with [`sample`].
    ///
    /// [`sample`]: Self::sample
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Self {
        debug_assert!(valid_name(name), "bad metric name {name:?}");
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the family `name` with `labels`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                debug_assert!(valid_name(key), "bad label name {key:?}");
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(key);
                self.out.push_str("=\"");
                for c in value.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, help: &str, kind: Kind, value: u64) -> &mut Self {
        self.family(name, help, kind).sample(name, &[], value)
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_once_with_their_samples() {
        let mut w = PromWriter::new();
        w.family(
            "ferry_drops_total",
            "Datagrams dropped, by reason.",
            Kind::Counter,
        )
        .sample("ferry_drops_total", &[("reason", "malformed")], 3)
        .sample("ferry_drops_total", &[("reason", "rate_limited")], 0);
        w.single("ferry_sessions", "Sessions held.", Kind::Gauge, 7);
        assert_eq!(
            w.finish(),
            "# HELP ferry_drops_total Datagrams dropped, by reason.\n\
             # TYPE ferry_drops_total counter\n\
             ferry_drops_total{reason=\"malformed\"} 3\n\
             ferry_drops_total{reason=\"rate_limited\"} 0\n\
             # HELP ferry_sessions Sessions held.\n\
             # TYPE ferry_sessions gauge\n\
             ferry_sessions 7\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut w = PromWriter::new();
        w.sample("m", &[("a", "x\"y\\z\nw"), ("b", "ok")], 1);
        assert_eq!(w.finish(), "m{a=\"x\\\"y\\\\z\\nw\",b=\"ok\"} 1\n");
    }

    #[test]
    fn names_are_validated() {
        for good in ["ferry_rx_total", "_x", "a:b", "A1"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "1a", "a-b", "a b", "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
