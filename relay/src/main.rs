//! Ferry relay.
fn main() {}
