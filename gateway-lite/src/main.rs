//! Ferry gateway.
fn main() {}
