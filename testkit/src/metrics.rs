//! Reading a Prometheus text page, and a minimal HTTP GET for the relay's admin listener.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The value of `sample` (a metric name with its labels, exactly as on the page, e.g.
/// `ferry_drops_total{reason="malformed"}`) on a Prometheus text page, if present.
pub fn sample(page: &str, sample: &str) -> Option<u64> {
    page.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The value of `sample` on a Prometheus text page, for tests.
///
/// # Panics
///
/// When the page has no such sample.
pub fn metric(page: &str, sample_name: &str) -> u64 {
    sample(page, sample_name).unwrap_or_else(|| panic!("{sample_name} not on the page:\n{page}"))
}

/// The sum of every sample on a Prometheus page whose line starts with `prefix` (a family, or
/// a family with some of its labels).
pub fn sum_metric(page: &str, prefix: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// GET `path` from the plain-HTTP listener at `addr`: the whole response (status line,
/// headers, body), or an empty string when it cannot be fetched within a few seconds.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return String::new();
    };
    if s.set_read_timeout(Some(Duration::from_secs(5))).is_err()
        || s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .is_err()
    {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The body of an HTTP response whose status is 200.
pub fn ok_body(response: &str) -> Option<&str> {
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then_some(body)
}
