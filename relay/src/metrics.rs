//! Prometheus text (format 0.0.4), written by `prometheus-client`. The relay registers no
//! metric objects: each page is a [`Collector`] that reads its values when a scrape encodes it,
//! so the data path keeps its own plain counters and nothing new is locked or counted on it.
//!
//! Counter names are given without `_total`: the encoder appends it, so `ferry_drops` is
//! exported as `ferry_drops_total` (in the `# HELP` and `# TYPE` lines too).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The text of `collector`'s families.
pub fn page(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    // Writing to a `String` cannot fail, and the collectors of the relay fail only when
    // writing does.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

/// Writes metric families, each with its `# HELP` and `# TYPE` lines, from a
/// [`Collector::encode`].
#[derive(Debug)]
pub struct Families<'a>(pub DescriptorEncoder<'a>);

impl Families<'_> {
    /// A counter family with a single unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(value).encode(metric)
    }

    /// A gauge family with a single unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(value).encode(metric)
    }

    /// A counter family with one sample per label set, in the order given.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in samples {
            ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A gauge family with one sample per label set, in the order given.
    pub fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut metric = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in samples {
            ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Config reloads (SIGHUP) applied and refused: `ferry_config_reloads_total{result}`. A
/// refused reload leaves the running config in force, and `systemctl reload` cannot tell (its
/// `check-config` passes a valid file whose changes need a restart), so this is what an alert
/// watches.
#[derive(Debug, Default)]
pub struct ReloadStats {
    applied: AtomicU64,
    refused: AtomicU64,
}

impl ReloadStats {
    /// Counts one reload.
    pub fn count(&self, applied: bool) {
        let counter = if applied {
            &self.applied
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The family as Prometheus text.
    pub fn metrics_page(&self) -> String {
        page(ReloadCounts([
            self.applied.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        ]))
    }
}

/// Applied and refused reloads, as one scrape shows them.
#[derive(Debug)]
struct ReloadCounts([u64; 2]);

impl Collector for ReloadCounts {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        Families(encoder).counters(
            "ferry_config_reloads",
            "Config reloads (SIGHUP), by result: applied, or refused with the running config kept.",
            [
                ([("result", "applied")], self.0[0]),
                ([("result", "refused")], self.0[1]),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Example;

    impl Collector for Example {
        fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
            let mut w = Families(encoder);
            w.counters(
                "ferry_drops",
                "Datagrams dropped, by reason.",
                [
                    ([("reason", "malformed")], 3),
                    ([("reason", "rate_limited")], 0),
                ],
            )?;
            w.gauge("ferry_sessions", "Sessions held.", 7)?;
            w.counter("ferry_closes", "Help with a \\ and a\nnewline.", 1)?;
            w.gauges(
                "m",
                "Escaped labels.",
                [([("a", "x\"y\\z\nw"), ("b", "ok")], 1)],
            )
        }
    }

    #[test]
    fn families_render_once_with_their_samples_and_counters_end_in_total() {
        assert_eq!(
            page(Example),
            "# HELP ferry_drops_total Datagrams dropped, by reason.\n\
             # TYPE ferry_drops_total counter\n\
             ferry_drops_total{reason=\"malformed\"} 3\n\
             ferry_drops_total{reason=\"rate_limited\"} 0\n\
             # HELP ferry_sessions Sessions held.\n\
             # TYPE ferry_sessions gauge\n\
             ferry_sessions 7\n\
             # HELP ferry_closes_total Help with a \\\\ and a\\nnewline.\n\
             # TYPE ferry_closes_total counter\n\
             ferry_closes_total 1\n\
             # HELP m Escaped labels.\n\
             # TYPE m gauge\n\
             m{a=\"x\\\"y\\\\z\\nw\",b=\"ok\"} 1\n"
        );
    }
}
