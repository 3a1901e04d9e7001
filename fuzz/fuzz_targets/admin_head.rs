//! Fuzzes the relay's admin listener's request-line parser
//! (`ferry_relay::admin::parse_request_line`), which reads whatever a TCP client sends.
//!
//! Nothing may panic, and:
//! - what it accepts is exactly the head's first line split in three at its two spaces: a
//!   method without spaces, a target starting with `/` (the path is the target up to its
//!   first `?`) and `HTTP/1.1` or `HTTP/1.0`;
//! - a line built from parts of the input that follow those rules parses back to those parts,
//!   whatever header lines follow it.
#![no_main]

use ferry_relay::admin::{is_token_char, parse_request_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((method, path)) = parse_request_line(data) {
        let end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("an accepted head has a CRLF");
        let line = std::str::from_utf8(&data[..end]).expect("an accepted line is UTF-8");
        let (head, version) = line.rsplit_once(' ').expect("three parts");
        let (m, target) = head.split_once(' ').expect("three parts");
        assert_eq!(m, method);
        assert!(!method.is_empty() && method.bytes().all(is_token_char));
        assert!(!method.contains(' ') && !target.contains(' '));
        assert!(
            matches!(version, "HTTP/1.1" | "HTTP/1.0"),
            "version {version:?}"
        );
        assert!(path.starts_with('/') && !path.contains('?'));
        assert!(target.starts_with(path));
        assert!(target.len() == path.len() || target[path.len()..].starts_with('?'));
    }

    // A well-formed line from the input's first two space-separated words, if they qualify.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut words = text.splitn(3, ' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return;
    };
    let target = format!("/{target}");
    let method_is_token = !method.is_empty() && method.bytes().all(is_token_char);
    if !method_is_token || target.contains(['\r', '\n', ' ']) {
        return;
    }
    let rest = words.next().unwrap_or("");
    let built = format!("{method} {target} HTTP/1.0\r\nHost: x\r\n{rest}\r\n\r\n");
    let path = target.split('?').next().unwrap_or(&target);
    assert_eq!(
        parse_request_line(built.as_bytes()),
        Some((method, path)),
        "well-formed line {built:?} refused"
    );
});
