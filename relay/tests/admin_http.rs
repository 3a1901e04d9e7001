//! The admin listener spoken to over raw TCP: routes, methods, malformed and oversized
//! requests, slow clients, and shutdown.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_relay::admin::{AdminOptions, AdminServer, AdminState, LINGER_LIMIT};

fn server() -> (AdminServer, Arc<AdminState>) {
    let state = Arc::new(AdminState::new(|| "# TYPE x counter\nx 1\n".to_string()));
    let options = AdminOptions {
        read_timeout: Duration::from_millis(300),
        ..AdminOptions::default()
    };
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    (
        AdminServer::start_with(addr, Arc::clone(&state), options).unwrap(),
        state,
    )
}

fn request(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn routes_methods_and_bad_requests() {
    let (server, state) = server();
    let addr = server.local_addr();
    let metrics = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status(&metrics), 200);
    assert!(metrics.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(metrics.contains("\r\n\r\n# TYPE x counter\nx 1\n"));
    assert_eq!(
        status(&request(addr, b"GET /healthz HTTP/1.1\r\n\r\n")),
        200
    );
    assert_eq!(status(&request(addr, b"GET /readyz HTTP/1.1\r\n\r\n")), 503);
    state.ready.store(true, Ordering::Relaxed);
    assert_eq!(status(&request(addr, b"GET /readyz HTTP/1.0\r\n\r\n")), 200);
    let head = request(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(status(&head), 200);
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");
    assert_eq!(status(&request(addr, b"GET /secret HTTP/1.1\r\n\r\n")), 404);
    let post = request(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&post), 405);
    assert!(post.contains("Allow: GET, HEAD"));
    assert_eq!(status(&request(addr, b"\x16\x03\x01garbage\r\n\r\n")), 400);
    assert_eq!(status(&request(addr, b"GET metrics HTTP/1.1\r\n\r\n")), 400);
    // A method that is not an HTTP token is a malformed request line, not an unknown method.
    assert_eq!(status(&request(addr, b" /metrics HTTP/1.1\r\n\r\n")), 400);
    assert_eq!(
        status(&request(addr, b"G\x01T /metrics HTTP/1.1\r\n\r\n")),
        400
    );
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    for _ in 0..200 {
        huge.extend_from_slice(b"X-Padding: 0123456789012345678901234567890123456789\r\n");
    }
    huge.extend_from_slice(b"\r\n");
    assert_eq!(status(&request(addr, &huge)), 431);
    // The server's own request counts are on the page.
    let page = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(
        page.contains("ferry_admin_requests_total{route=\"other\",status=\"405\"}")
            || page.contains("ferry_admin_requests_total{route=\"/metrics\",status=\"405\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("ferry_admin_requests_total{route=\"/readyz\",status=\"503\"} 1"),
        "{page}"
    );
    server.shutdown();
}

#[test]
fn a_silent_client_is_dropped_and_does_not_block_others() {
    let (server, _state) = server();
    let addr = server.local_addr();
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /met").unwrap();
    // Another client is served meanwhile.
    assert_eq!(
        status(&request(addr, b"GET /healthz HTTP/1.1\r\n\r\n")),
        200
    );
    let started = Instant::now();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    idle.read_to_string(&mut out).unwrap();
    assert_eq!(status(&out), 408);
    assert!(started.elapsed() < Duration::from_secs(3));
    let shutdown = Instant::now();
    server.shutdown();
    assert!(shutdown.elapsed() < Duration::from_secs(2));
}

#[test]
fn many_concurrent_clients_are_served() {
    let (server, _state) = server();
    let addr = server.local_addr();
    std::thread::scope(|s| {
        for _ in 0..12 {
            s.spawn(|| {
                for _ in 0..10 {
                    assert_eq!(
                        status(&request(addr, b"GET /metrics HTTP/1.1\r\n\r\n")),
                        200
                    );
                }
            });
        }
    });
    server.shutdown();
}

#[test]
fn a_trickling_client_is_dropped_as_soon_as_a_silent_one() {
    let (server, _state) = server();
    let addr = server.local_addr();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    // One byte every 100 ms never completes a head within the 300 ms budget.
    let mut answer = String::new();
    for b in b"GET /metrics HTTP/1.1\r\n" {
        if slow.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let _ = slow.read_to_string(&mut answer);
    assert_eq!(status(&answer), 408, "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    server.shutdown();
}

#[test]
fn a_client_that_keeps_sending_after_its_answer_frees_its_slot_within_the_linger_limit() {
    let state = Arc::new(AdminState::new(String::new));
    let options = AdminOptions {
        max_connections: 1,
        ..AdminOptions::default()
    };
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = AdminServer::start_with(addr, state, options).unwrap();
    let addr = server.local_addr();
    let mut holder = TcpStream::connect(addr).unwrap();
    holder
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    holder.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    holder.read_to_string(&mut answer).unwrap();
    assert_eq!(status(&answer), 200);
    // The holder goes on sending a byte every 50 ms, far apart enough for no single read to
    // time out: only the linger's overall limit lets its slot go.
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        while started.elapsed() < LINGER_LIMIT * 6 {
            if holder.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    std::thread::sleep(LINGER_LIMIT * 2);
    assert_eq!(
        status(&request(addr, b"GET /healthz HTTP/1.1\r\n\r\n")),
        200,
        "the one slot is still held after twice the linger limit"
    );
    trickle.join().unwrap();
    server.shutdown();
}
