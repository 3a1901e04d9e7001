//! The namespace helper itself: two namespaces, a veth pair, a datagram each way, cleanup.
//! Needs root, so `#[ignore]`d: `cargo test -- --include-ignored` runs it.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferry_testkit::netns::{Topology, in_ns};
use ferry_testkit::skip;

#[test]
#[ignore = "needs root: network namespaces"]
fn datagrams_cross_the_veth_both_families_and_namespaces_are_removed() {
    skip::require_root("netns_smoke");
    let names;
    {
        let topo = Topology::new().unwrap();
        names = (topo.relay_ns.clone(), topo.peers_ns.clone());
        let pairs: [(IpAddr, IpAddr); 2] = [
            (topo.relay_v4().into(), topo.peer_v4(2).into()),
            (topo.relay_v6().into(), topo.peer_v6(2).into()),
        ];
        for (relay_ip, peer_ip) in pairs {
            let server = in_ns(&topo.relay_ns, || {
                std::net::UdpSocket::bind(SocketAddr::new(relay_ip, 0)).unwrap()
            })
            .unwrap();
            let server_addr = server.local_addr().unwrap();
            let client = topo.peer_socket(SocketAddr::new(peer_ip, 0)).unwrap();
            client.send_to(b"ping", server_addr).unwrap();
            server
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 16];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"ping");
            assert_eq!(from.ip(), peer_ip);
            server.send_to(b"pong", from).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let (n, _) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"pong");
        }
    }
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        !list.contains(&names.0) && !list.contains(&names.1),
        "{list}"
    );
}
