//! Ferry benchmarks. See `benches/core.rs` and docs/bench.md.
