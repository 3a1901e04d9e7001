#!/usr/bin/env python3
"""An independent Ferry client, written from docs/protocol.md and docs/gateway-api.md alone.

Library: ferry_wire (packets, tokens, proofs, cookies), ferry_gateway (the HTTPS API),
ferry_peer (a slot's bind client over UDP), ferry_noise (the end-to-end layer of §9).

CLI:
  client.py selftest                 the test vectors of protocol.md Appendix A
  client.py checks ENV.json          every check against a live gateway and relay (.ci/interop/run)
  client.py free-ports N             N free loopback ports (TCP and UDP), for the run script
  client.py wait-relay ADDR SECS     wait for the relay admin listener's /readyz to answer 200
  client.py mint-keygen FILE         an Ed25519 seed for minting test tokens; prints its public key
  client.py create|join|renew ...    the gateway's routes by hand; the grant (JSON) to stdout
  client.py bind --grant FILE        bind a grant's slot, check a KEEPALIVE echo, then CLOSE
"""

import json
import os
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

import checks  # noqa: E402
from checks import CheckFailed, Live, b64, need, raw_public, selftest  # noqa: E402
from ferry_gateway import http_request  # noqa: E402
from ferry_peer import ProtocolError  # noqa: E402


class Runner:
    def __init__(self):
        self.results = []

    def run(self, name, fn, *args):
        start = time.monotonic()
        try:
            fn(*args)
        except (CheckFailed, ProtocolError) as e:
            self.results.append((name, False))
            print(f"FAIL  {name}: {e}", flush=True)
            return False
        except Exception as e:  # noqa: BLE001 - a crash in a check is its failure
            self.results.append((name, False))
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
            return False
        self.results.append((name, True))
        print(f"ok    {name} ({time.monotonic() - start:.2f} s)", flush=True)
        return True

    def failed(self):
        return [name for name, ok in self.results if not ok]


def run_checks(env_path):
    with open(env_path) as f:
        env = json.load(f)
    r = Runner()
    r.run("protocol.md Appendix A test vectors (token, seal, proofs, MACs, cookies)", selftest)
    live = Live(env)
    if not r.run("relay /readyz and gateway /healthz answer 200 (waits up to 30 s)",
                 wait_ready, live):
        return 1
    only = os.environ.get("FERRY_INTEROP_ONLY", "")
    for name, fn in checks.ALL:
        if only in name:
            r.run(name, fn, live)
    failed = r.failed()
    print(f"{len(r.results) - len(failed)} of {len(r.results)} checks passed", flush=True)
    for name in failed:
        print(f"failed: {name}", flush=True)
    return 1 if failed else 0


def wait_ready(live):
    deadline = time.monotonic() + 30
    host, port = live.env["relay_admin"].rsplit(":", 1)
    gw_host, gw_port = live.env["gateway_admin"].rsplit(":", 1)
    last = ""
    while time.monotonic() < deadline:
        try:
            ready = http_request(host, int(port), "GET", "/readyz", timeout=2)
            health = live.gw.call("GET", "/healthz")
            admin = http_request(gw_host, int(gw_port), "GET", "/healthz", timeout=2)
            if ready.status == 200 and health.status == 200 and admin.status == 200:
                need(health.json() == {"status": "ok"}, f"/healthz body {health.body!r}")
                return
            last = f"relay /readyz {ready.status}, gateway /healthz {health.status}"
        except (OSError, ConnectionError) as e:
            last = str(e)
        time.sleep(0.2)
    raise CheckFailed(f"not ready within 30 s: {last}")


def wait_relay(address, seconds):
    """Waits until the relay's admin listener answers /readyz with 200 (docs/operations.md)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if http_request(host, int(port), "GET", "/readyz", timeout=2).status == 200:
                return 0
        except (OSError, ConnectionError):
            pass
        time.sleep(0.1)
    print(f"the relay's /readyz on {address} did not answer 200 within {seconds} s",
          file=sys.stderr)
    return 1


def free_ports(n):
    socks, ports = [], []
    while len(ports) < n:
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        try:
            for family, host, kind in ((socket.AF_INET, "127.0.0.1", socket.SOCK_DGRAM),
                                       (socket.AF_INET6, "::1", socket.SOCK_DGRAM),
                                       (socket.AF_INET6, "::1", socket.SOCK_STREAM)):
                s = socket.socket(family, kind)
                socks.append(s)
                s.bind((host, port))
        except OSError:
            t.close()
            continue
        socks.append(t)
        ports.append(port)
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


def mint_keygen(path):
    seed = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(seed)
    print(b64(raw_public(Ed25519PrivateKey.from_private_bytes(seed))))


def peer_commands(argv):
    """create / join / renew / bind: the gateway calls and a bind, by hand."""
    import argparse
    import ferry_wire as w
    from ferry_gateway import GatewayClient, Grant
    from ferry_peer import RelayPeer
    parser = argparse.ArgumentParser(prog="client.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("create", "join", "renew"):
        p = sub.add_parser(name, help=f"POST the gateway's {name} route; the grant to stdout")
        p.add_argument("--gateway", required=True, help="https://host:port")
        p.add_argument("--ca", required=True, help="PEM file the gateway's certificate chains to")
        p.add_argument("--api-key-file", required=True)
        if name == "create":
            p.add_argument("--peer-key", help="this peer's Noise key, base64")
            p.add_argument("--expect-peer", help="the other peer's key, base64")
        elif name == "join":
            p.add_argument("--code", required=True)
            p.add_argument("--peer-key", help="this peer's Noise key, base64")
        else:
            p.add_argument("--grant", required=True, help="the grant of the slot to renew")
    p = sub.add_parser("bind", help="bind a grant's slot, check a KEEPALIVE echo, CLOSE")
    p.add_argument("--grant", required=True)
    p.add_argument("--relay", help="ip:port instead of the grant's relay address")
    args = parser.parse_args(argv[1:])
    if args.command == "bind":
        with open(args.grant) as f:
            grant = Grant(json.load(f))
        peer = RelayPeer(args.relay or grant.relay_address, grant.session_id, grant.slot,
                         grant.token.raw, grant.slot_secret)
        answer, challenges = peer.bind()
        print(f"{len(challenges)} CHALLENGE(s), then {answer.name()}")
        if answer.type != w.BIND_ACK:
            return 1
        print(f"peer_present {answer.peer_present} idle_timeout {answer.idle_timeout} "
              f"expires_at {answer.expires_at}")
        print("keepalive echoed" if peer.keepalive() else "keepalive NOT echoed")
        peer.close()
        return 0
    with open(args.api_key_file) as f:
        key = f.read().strip()
    gw = GatewayClient(args.gateway, args.ca)
    if args.command == "create":
        answer = gw.create(key, peer_public_key=args.peer_key, expected_peer=args.expect_peer)
    elif args.command == "join":
        answer = gw.join(key, args.code, peer_public_key=args.peer_key)
    else:
        with open(args.grant) as f:
            grant = Grant(json.load(f))
        answer = gw.renew(key, grant.session_id, grant.slot)
    if answer.status not in (200, 201):
        print(f"{answer.status} {answer.body.decode(errors='replace')}", file=sys.stderr)
        return 1
    sys.stdout.write(answer.body.decode() + "\n")
    return 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "selftest":
        selftest()
        print("ok    protocol.md Appendix A test vectors")
        return 0
    if len(argv) == 3 and argv[1] == "checks":
        return run_checks(argv[2])
    if len(argv) == 4 and argv[1] == "wait-relay":
        return wait_relay(argv[2], float(argv[3]))
    if len(argv) == 3 and argv[1] == "free-ports":
        free_ports(int(argv[2]))
        return 0
    if len(argv) == 3 and argv[1] == "mint-keygen":
        mint_keygen(argv[2])
        return 0
    if len(argv) >= 2 and argv[1] in ("create", "join", "renew", "bind"):
        return peer_commands(argv)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
