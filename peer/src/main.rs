//! Ferry peer CLI.
fn main() {}
