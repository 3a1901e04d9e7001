//! See docs/protocol.md §9.
