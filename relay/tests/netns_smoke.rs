//! The namespace helper itself: two namespaces, a veth pair, a datagram each way, cleanup.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap fails the test

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::netns::{self, Topology};

#[test]
fn datagrams_cross_the_veth_both_families_and_namespaces_are_removed() {
    if netns::require("netns_smoke").is_none() {
        return;
    }
    let names;
    {
        let topo = Topology::new();
        names = (topo.relay_ns.clone(), topo.peers_ns.clone());
        for (relay_ip, peer_ip) in [
            (topo.relay_v4(), topo.peer_v4(2)),
            (topo.relay_v6(), topo.peer_v6(2)),
        ] {
            let server = Topology::in_ns(&topo.relay_ns, || {
                std::net::UdpSocket::bind(SocketAddr::new(relay_ip, 0)).unwrap()
            });
            let server_addr = server.local_addr().unwrap();
            let client = topo.peer_socket(SocketAddr::new(peer_ip, 0));
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
