//! The stateless header rules of docs/protocol.md §2.1.
