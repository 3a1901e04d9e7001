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

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# TYPE ferry_drops_total counter\n\
                        ferry_drops_total{reason=\"malformed\"} 3\n\
                        ferry_drops_total{reason=\"data_unbound\"} 10\n\
                        ferry_sessions_active 2\n\
                        ferry_sessions_active_max 7\n";

    #[test]
    fn a_sample_is_found_by_its_whole_name_and_labels() {
        assert_eq!(sample(PAGE, "ferry_sessions_active"), Some(2));
        assert_eq!(sample(PAGE, "ferry_sessions_active_max"), Some(7));
        assert_eq!(
            sample(PAGE, "ferry_drops_total{reason=\"malformed\"}"),
            Some(3)
        );
        assert_eq!(
            sample(PAGE, "ferry_drops_total"),
            None,
            "a family is not a sample"
        );
        assert_eq!(sample(PAGE, "ferry_sessions"), None, "nor is a prefix");
        assert_eq!(sum_metric(PAGE, "ferry_drops_total"), 13);
        assert_eq!(sum_metric(PAGE, "ferry_nothing"), 0);
    }

    #[test]
    #[should_panic(expected = "ferry_nothing not on the page")]
    fn a_missing_sample_fails_a_test_by_name() {
        metric(PAGE, "ferry_nothing");
    }

    #[test]
    fn only_a_200_response_has_a_body() {
        assert_eq!(ok_body("HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"), Some("body"));
        assert_eq!(ok_body("HTTP/1.1 503 Unavailable\r\n\r\nnot ready"), None);
        assert_eq!(ok_body(""), None);
    }
}
