//! Ferry peer library.
