//! The demo as an end-to-end test: gateway tokens, the relay's session table and two peers,
//! through binds, the Noise handshake, data both ways, attacks, a NAT rebind and a close.

use ferry_bench::demo::{DemoOptions, run};

#[test]
fn the_demo_runs_end_to_end() {
    let report = run(&DemoOptions {
        messages: 200,
        payload: 1200,
        verbose: false,
    })
    .expect("the demo should succeed");
    // 200 each way, plus one each way after the rebind.
    assert_eq!(report.delivered, 402);
    // Handshake (3 messages and the key confirmation) + data (402) forwarded; nothing from the
    // attacker.
    assert_eq!(report.relay.forwarded, 406);
    assert_eq!(report.relay.binds_accepted, 2);
    assert_eq!(report.relay.rebinds_accepted, 1);
    assert_eq!(report.relay.closed, 1);
    assert_eq!(report.relay.malformed, 1);
    assert_eq!(report.relay.data_unbound, 1);
}

#[test]
fn the_demo_handles_the_largest_and_smallest_payloads() {
    for payload in [1, 1427] {
        let report = run(&DemoOptions {
            messages: 5,
            payload,
            verbose: false,
        })
        .expect("the demo should succeed");
        assert_eq!(report.delivered, 12);
    }
}

#[test]
fn the_demo_runs_with_its_default_options() {
    // What `.ci/demo` runs: the README's first command must work as shipped.
    let report = run(&DemoOptions {
        verbose: false,
        ..DemoOptions::default()
    })
    .expect("the demo should succeed with its defaults");
    assert_eq!(report.delivered, 2 * DemoOptions::default().messages + 2);
}
