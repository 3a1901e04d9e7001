"""The checks .ci/interop/run runs, each a function of `Live` (docs/protocol.md and
docs/gateway-api.md are the only source of what they expect)."""

import base64
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import ferry_noise as noise
import ferry_wire as w
from ferry_gateway import (GatewayClient, Grant, HttpAnswer, http_request, metric, metrics,
                           read_public_key_file)
from ferry_peer import ProtocolError, RelayPeer, next_local_v4, random_session_id


def raw_public(private):
    return private.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)


def b64(data):
    return base64.b64encode(data).decode()


class CheckFailed(Exception):
    pass


def need(condition, message):
    if not condition:
        raise CheckFailed(message)


# ---------------------------------------------------------------------------------------------
# Appendix A


def selftest():
    r_priv = X25519PrivateKey.from_private_bytes(b"\x01" * 32)
    relay_pub = raw_public(r_priv)
    need(relay_pub.hex() == "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209",
         "relay public key")
    need(raw_public(Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)).hex() ==
         "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394", "gateway key")
    token = w.mint_token(b"\x02" * 32, kid=7, slot=1, token_id=b"\x33" * 16, relay_id=77,
                         session_id=0x12345678, nbf=1000, exp=2000, rate=125000,
                         slot_secret=b"\x11" * 32, relay_public=relay_pub,
                         ephemeral_private=b"\x22" * 32)
    need(token[:64].hex() == "010100000000000733333333333333333333333333333333000000000000004d"
         "000000001234567800000000000003e800000000000007d0000000000001e848", "token claims")
    need(token[64:96].hex() ==
         "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20", "token E")
    need(token[96:144].hex() == "74f2d5c60f65242918313ebcb9db67765eef016ace4e79df8a9ac67ddd6a5f38"
         "aeff103447cbb9fac12b9dd324696701", "sealed slot secret")
    need(token[144:].hex() == "bd72fe5a85188783c2db750125779aafc7a2a5d488021f7356ee51e438ed33f6"
         "f7c0a0848ce1f8e7ae6e07d22570507ab12da10c14cd388e20a4385227518601", "token signature")
    k_peer, k_relay = w.slot_keys(b"\x11" * 32)
    need(w.rebind_packet(0x12345678, 1, 2, b"\x44" * 16, k_peer).hex() ==
         "465201070000000012345678002c0000010000000000000000000002"
         "44444444444444444444444444444444efe71721526822bbd6a0a2fb5c308da3", "REBIND proof")
    body = struct.pack(">BBHIQQ", 1, 1, 0, 60, 2, 2000)
    head = w.header(w.BIND_ACK, 0x12345678, 40)
    need((head + body + w.mac(k_relay, head + body)).hex() ==
         "46520103000000001234567800280000010100000000003c"
         "000000000000000200000000000007d069e865386c954704d51f0d795bef25b1", "BIND-ACK MAC")
    mapped = ipaddress.ip_address("::ffff:198.18.0.1").packed
    k_window, c4 = w.cookie(b"\x55" * 32, 1_800_000_000, 0x12345678, 1, mapped, 4000)
    need(k_window.hex() == "3a1fb2811a606601305b9481772f99e2", "K_window")
    need(c4.hex() == "662afc3662180fa821d0329859ff865a", "IPv4 cookie")
    _, c6 = w.cookie(b"\x55" * 32, 1_800_000_000, 0x12345678, 1,
                     ipaddress.ip_address("2001:db8::1").packed, 4000)
    need(c6.hex() == "bd4c489d281155c87616ab75ff671eda", "IPv6 cookie")


# ---------------------------------------------------------------------------------------------
# The live checks


class Live:
    """Everything the checks share: the environment, clients, and the main session."""

    def __init__(self, env):
        self.env = env
        # The gateway's per-IP limit keeps its default (20/s, burst 40): the checks' requests
        # come from 16 loopback addresses in turn, and the limit's own check from another.
        self.gw = GatewayClient(env["gateway"], env["ca"],
                                sources=[f"127.0.1.{n}" for n in range(200, 216)])
        with open(env["api_key_file"]) as f:
            self.api_key = f.read().strip()
        with open(env["join_only_key_file"]) as f:
            self.join_only_key = f.read().strip()
        self.gateway_public = read_public_key_file(env["gateway_public_key_file"],
                                                   "gateway-ed25519")
        self.relay_public = read_public_key_file(env["relay_public_key_file"], "relay-x25519")
        with open(env["mint_key_file"], "rb") as f:
            self.mint_seed = f.read()
        self.relay_v4 = env["relay_v4"]
        self.relay_v6 = env["relay_v6"]
        self.lifetime = env.get("token_lifetime_secs", 300)
        self.skew = env["max_clock_skew_secs"]
        self.idle = env["idle_timeout_secs"]
        self.a_identity = X25519PrivateKey.generate()
        self.b_identity = X25519PrivateKey.generate()
        self.main = {}  # the main session's grants and peers
        self.peers = []  # every RelayPeer made, for the last check

    # -- helpers --------------------------------------------------------------------------
    def relay_metrics(self):
        return metrics(self.env["relay_admin"])

    def wait_metric(self, before, name, delta=1, timeout=3.0, **labels):
        """Waits until the relay's counter grew by at least `delta` since `before`."""
        start = metric(before, name, **labels)
        deadline = time.monotonic() + timeout
        while True:
            now = metric(self.relay_metrics(), name, **labels)
            if now >= start + delta:
                return now - start
            if time.monotonic() > deadline:
                label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                raise CheckFailed(f"{name}{{{label_text}}} grew by {now - start:g}, expected "
                                  f"at least {delta}")
            time.sleep(0.05)

    def session(self, expect_peer=True):
        """A session made through the gateway: (create grant, join grant)."""
        a_key, b_key = b64(raw_public(self.a_identity)), b64(raw_public(self.b_identity))
        created = self.gw.create(self.api_key, peer_public_key=a_key,
                                 expected_peer=b_key if expect_peer else None)
        need(created.status == 201, f"create: {created}")
        doc = created.json()
        joined = self.gw.join(self.api_key, doc["join_code"], peer_public_key=b_key)
        need(joined.status == 200, f"join: {joined}")
        return Grant(doc), Grant(joined.json())

    def peer(self, grant, relay=None, name="peer"):
        return RelayPeer(relay or self.relay_v4, grant.session_id, grant.slot, grant.token.raw,
                         grant.slot_secret, name=name)

    def bound_pair(self):
        """A session with both slots bound (A over IPv4, B over IPv6)."""
        ga, gb = self.session()
        a, b = self.peer(ga, name="A"), self.peer(gb, self.relay_v6, name="B")
        for p in (a, b):
            ack, _ = p.bind()
            need(ack.type == w.BIND_ACK, f"{p.name}'s BIND: {ack.name()}")
        notice = a.expect(w.BIND_ACK, 2.0)
        need(notice is not None, "no peer-present notice")
        return ga, gb, a, b

    def minted_pair(self, rate, name):
        """A session of our own minting (not the gateway's) whose two slots claim `rate` bytes a
        second, both bound over IPv4 and kept for cleanup; returns the session id and the two
        peers, slot A first."""
        sid = random_session_id()
        peers = []
        for slot in (0, 1):
            token, secret = self.mint(sid, slot, rate=rate)
            p = RelayPeer(self.relay_v4, sid, slot, token, secret, name=f"{name}-{slot}")
            self.peers.append(p)
            ack, _ = p.bind()
            need(ack.type == w.BIND_ACK, f"{p.name}'s BIND: {ack.name()}")
            peers.append(p)
        return sid, peers[0], peers[1]

    def mint(self, session_id, slot, *, kid=None, relay_id=None, nbf=None, exp=None,
             flags=0, slot_secret=None, relay_public=None, token_id=None, seed=None, rate=0):
        now = int(time.time())
        nbf = now - 5 if nbf is None else nbf
        slot_secret = slot_secret or os.urandom(32)
        token = w.mint_token(seed or self.mint_seed, kid=self.env["mint_kid"] if kid is None
                             else kid, slot=slot, token_id=token_id or os.urandom(16),
                             relay_id=self.env["relay_id"] if relay_id is None else relay_id,
                             session_id=session_id, nbf=nbf,
                             exp=nbf + 120 if exp is None else exp, rate=rate,
                             slot_secret=slot_secret,
                             relay_public=relay_public or self.relay_public, flags=flags)
        return token, slot_secret

    def restart_relay(self):
        """Stops the relay (SIGTERM to the pid the run script wrote) and starts it again with
        the same config; the new process is this client's, stopped when it exits."""
        import atexit
        import signal
        pid_file = self.env["relay_pid_file"]
        with open(pid_file) as f:
            old = int(f.read())
        os.kill(old, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:
            try:
                with open(f"/proc/{old}/stat") as f:
                    gone = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except FileNotFoundError:
                gone = True
            if gone:
                break
            need(time.monotonic() < deadline, "the relay did not stop within 10 s of SIGTERM")
            time.sleep(0.05)
        log = open(self.env["relay_log"], "ab")
        proc = subprocess.Popen(self.env["relay_command"], stdout=log, stderr=log)
        log.close()
        with open(pid_file, "w") as f:
            f.write(str(proc.pid))

        def stop():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        atexit.register(stop)
        host, port = self.env["relay_admin"].rsplit(":", 1)
        deadline = time.monotonic() + 30
        while True:
            need(proc.poll() is None, f"the restarted relay exited with {proc.returncode}")
            try:
                if http_request(host, int(port), "GET", "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            need(time.monotonic() < deadline, "the restarted relay was not ready within 30 s")
            time.sleep(0.05)
        # The gateway hands out no relay whose probe failed until one passes (gateway-api.md,
        # Relay registry): wait until the restarted relay has answered a probe and the gateway
        # counts it healthy, so that later checks can create sessions.
        while True:
            probed = metric(self.relay_metrics(), "ferry_probes_total") >= 1
            gw = metrics(self.env["gateway_admin"])
            healthy = metric(gw, "ferry_gateway_relays", health="healthy") >= 1 and \
                metric(gw, "ferry_gateway_relays", health="unhealthy") == 0
            if probed and healthy:
                return
            need(time.monotonic() < deadline, "the gateway did not probe the restarted relay "
                 "successfully within 30 s")
            time.sleep(0.1)

    def quiet(self, peer):
        """Asserts the relay sent `peer` nothing in answer to what it sent so far: a marker
        request (a BIND without a cookie for a made-up session, which always gets a CHALLENGE
        first, §7) must get the first datagram that arrives. With one relay worker the relay
        handles one source's datagrams in order, so an answer to the earlier datagram would
        arrive before the marker's CHALLENGE."""
        sid = random_session_id()
        token, secret = self.mint(sid, 0)
        peer.send(w.bind_packet(sid, 0, 1, bytes(16), token, w.slot_keys(secret)[0]))
        before_marker = []
        deadline = time.monotonic() + 3.0
        while True:
            p = peer.recv(deadline - time.monotonic())
            need(p is not None, "the marker BIND got no CHALLENGE within 3 s")
            if p.type == w.CHALLENGE and p.session_id == sid:
                break
            before_marker.append(p)
        need(not before_marker, "the relay answered: " + ", ".join(
            f"{p.name()} for session {p.session_id:#x}" for p in before_marker))


def expect_reject(answer, reason, what):
    need(answer.type == w.REJECT, f"{what}: {answer.name()}, expected REJECT "
         f"{w.REJECT_NAMES[reason]}")
    need(answer.reason == reason, f"{what}: REJECT {w.REJECT_NAMES[answer.reason]}, expected "
         f"{w.REJECT_NAMES[reason]}")
    # (the authenticated flag and MAC are checked by RelayPeer against §3.4)




# ---------------------------------------------------------------------------------------------
# Gateway (docs/gateway-api.md)


def gateway_create_join(live):
    a_key, b_key = b64(raw_public(live.a_identity)), b64(raw_public(live.b_identity))
    created = live.gw.create(live.api_key, peer_public_key=a_key, expected_peer=b_key)
    need(created.status == 201, f"create: {created}")
    need(created.headers.get("content-type", "").startswith("application/json"),
         f"create answered Content-Type {created.headers.get('content-type')!r}")
    doc = created.json()
    want = Grant.FIELDS_COMMON | {"join_code", "join_code_expires_at"}
    need(set(doc) == want, f"create answer fields {sorted(doc)}, documented {sorted(want)}")
    ga = Grant(doc)
    need(ga.slot == 0, "create gave slot B")
    problems = ga.consistency_problems(live.gateway_public, live.lifetime)
    need(not problems, "create: " + "; ".join(problems))
    need(ga.relay_public_key == live.relay_public, "relay.public_key is not the relay's key")
    need(ga.relay_address == live.relay_v4, f"relay.address {ga.relay_address}")
    need(ga.relay_id == live.env["relay_id"], f"relay.id {ga.relay_id}")
    need(ga.expected_peer == b_key, f"expected_peer_public_key {ga.expected_peer!r}")
    code = doc["join_code"]
    need(len(code) == 26 and set(code) <= set("abcdefghijklmnopqrstuvwxyz234567"),
         f"join code {code!r} is not 26 of a-z2-7")
    now = time.time()
    ttl = live.env["join_code_ttl_secs"]
    need(abs(doc["join_code_expires_at"] - (now + ttl)) <= 2,
         f"join_code_expires_at is {doc['join_code_expires_at'] - now:.0f} s away, config {ttl}")
    need(abs(ga.not_before - now) <= 5, f"not_before {ga.not_before - now:.0f} s from now")

    joined = live.gw.join(live.api_key, code, peer_public_key=b_key)
    need(joined.status == 200, f"join: {joined}")
    jdoc = joined.json()
    need(set(jdoc) == Grant.FIELDS_COMMON, f"join answer fields {sorted(jdoc)}")
    gb = Grant(jdoc)
    need(gb.slot == 1 and gb.session_id == ga.session_id, "join: other slot or session")
    problems = gb.consistency_problems(live.gateway_public, live.lifetime)
    need(not problems, "join: " + "; ".join(problems))
    need(gb.expected_peer == a_key, "join: expected_peer_public_key is not the creator's key")
    need(gb.token.token_id != ga.token.token_id, "both slots' tokens have the same token id")
    need(gb.slot_secret != ga.slot_secret, "both slots have the same slot secret")
    again = live.gw.join(live.api_key, code, peer_public_key=b_key)
    need(again.status == 404 and again.error() == "invalid_join_code",
         f"a second join with the code: {again}")
    # Two joins with one code at once: exactly one gets the slot.
    import threading
    racing = live.gw.create(live.api_key)
    need(racing.status == 201, f"create: {racing}")
    results = []
    start = threading.Barrier(2)

    def join():
        start.wait()
        results.append(live.gw.join(live.api_key, racing.json()["join_code"]))
    threads = [threading.Thread(target=join) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    statuses = sorted((r.status, r.error()) for r in results)
    need(statuses == [(200, None), (404, "invalid_join_code")],
         f"two joins with one code at once: {statuses}")
    live.main.update(ga=ga, gb=gb, created_at=now)
    # A code nobody uses, for the check of expired codes at the end.
    unused = live.gw.create(live.api_key)
    need(unused.status == 201, f"create: {unused}")
    live.main["unused_code"] = unused.json()["join_code"]


def cli_create_and_bind(live):
    """The client's own command line: `create` writes a grant, `bind` binds it."""
    client = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client.py")
    grant = os.path.join(live.env["work"], "cli.grant")
    with open(grant, "wb") as out:
        subprocess.run([sys.executable, client, "create", "--gateway", live.env["gateway"],
                        "--ca", live.env["ca"], "--api-key-file", live.env["api_key_file"]],
                       stdout=out, check=True, timeout=20)
    result = subprocess.run([sys.executable, client, "bind", "--grant", grant],
                            capture_output=True, text=True, timeout=20)
    need(result.returncode == 0 and "BIND-ACK" in result.stdout and
         "keepalive echoed" in result.stdout, f"client.py bind: {result.stdout!r} "
         f"{result.stderr[-300:]!r}")


def gateway_errors(live):
    gw = live.gw
    gw_before = metrics(live.env["gateway_admin"])
    a_key = b64(raw_public(live.a_identity))
    cases = []
    no_auth = gw.call("POST", "/v1/sessions", doc={})
    cases.append(("no Authorization", no_auth, 401, "unauthorized"))
    need(no_auth.headers.get("www-authenticate", "").startswith("Bearer"),
         "401 without WWW-Authenticate: Bearer")
    # Another secret of the same form: one character in the middle changed.
    i = len(live.api_key) - 10
    wrong = live.api_key[:i] + ("A" if live.api_key[i] != "A" else "B") + live.api_key[i + 1:]
    cases.append(("a wrong secret", gw.call("POST", "/v1/sessions", api_key=wrong, doc={}),
                  401, "unauthorized"))
    # The secret's last character carries 4 bits and 2 unused ones, which must be zero
    # (gateway-api.md, Authentication): setting one makes the key malformed.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(live.api_key[-1])
    non_canonical = live.api_key[:-1] + alphabet[last | 1]
    cases.append(("a secret with unused bits set", gw.call(
        "POST", "/v1/sessions", api_key=non_canonical, doc={}), 401, "unauthorized"))
    cases.append(("the scheme in lower case", gw.call(
        "POST", "/v1/sessions", doc={}, extra_headers={"Authorization": "bearer " + live.api_key}),
        201, None))
    cases.append(("no Content-Type", gw.call("POST", "/v1/sessions", api_key=live.api_key,
                                             raw_body=b"{}", content_type=None),
                  415, "unsupported_media_type"))
    cases.append(("a JSON array body", gw.call("POST", "/v1/sessions", api_key=live.api_key,
                                               raw_body=b"[]"), 400, "bad_request"))
    cases.append(("an unknown field", gw.call("POST", "/v1/sessions", api_key=live.api_key,
                                              doc={"colour": "red"}), 400, "bad_request"))
    cases.append(("a null field", gw.call("POST", "/v1/sessions", api_key=live.api_key,
                                          doc={"realm": None}), 400, "bad_request"))
    cases.append(("a bad public key", gw.call("POST", "/v1/sessions", api_key=live.api_key,
                                              doc={"peer_public_key": "abc"}),
                  400, "bad_request"))
    cases.append(("a join-only key creating", gw.create(live.join_only_key), 403, "forbidden"))
    cases.append(("a malformed join code", gw.join(live.api_key, "not-a-code"), 404,
                  "invalid_join_code"))
    cases.append(("GET on a POST route", gw.call("GET", "/v1/sessions"), 405,
                  "method_not_allowed"))
    cases.append(("an unknown path", gw.call("GET", "/v1/nothing-here"), 404, "not_found"))
    cases.append(("renew: a session id that is not 16 hex digits",
                  gw.call("POST", "/v1/sessions/renew", api_key=live.api_key,
                          doc={"session_id": "XYZ", "slot": "A"}), 400, "bad_request"))
    cases.append(("renew: slot C", gw.call("POST", "/v1/sessions/renew", api_key=live.api_key,
                                           doc={"session_id": "0123456789abcdef", "slot": "C"}),
                  400, "bad_request"))
    cases.append(("renew: an unknown session", live.gw.renew(live.api_key, 0x0123456789abcdef,
                                                             0), 404, "not_found"))
    # The checks run in a fixed order: authentication before the body, 415 before 400.
    cases.append(("a wrong key with a bad body", gw.call(
        "POST", "/v1/sessions", api_key=wrong, raw_body=b"[", content_type=None), 401,
        "unauthorized"))
    cases.append(("no Content-Type and an unknown field", gw.call(
        "POST", "/v1/sessions", api_key=live.api_key, raw_body=b'{"colour": 1}',
        content_type=None), 415, "unsupported_media_type"))
    cases.append(("a realm the key may not create in", gw.create(live.api_key, realm="other"),
                  403, "forbidden"))
    cases.append(("an invalid realm", gw.create(live.api_key, realm="Upper"), 400,
                  "bad_request"))
    cases.append(("a field given twice", gw.call(
        "POST", "/v1/sessions", api_key=live.api_key,
        raw_body=b'{"realm": "default", "realm": "default"}'), 400, "bad_request"))
    too_large = gw.call("POST", "/v1/sessions", api_key=live.api_key, announce_only=17000)
    cases.append(("a Content-Length over max_body_bytes", too_large, 413, "payload_too_large"))
    if too_large.headers.get("connection", "").lower() != "close":
        cases.append(("413 without Connection: close", too_large, 0, None))
    cases.append(("Content-Type in capitals with a charset", gw.call(
        "POST", "/v1/sessions", api_key=live.api_key, raw_body=b"{}",
        content_type="Application/JSON; charset=utf-8"), 201, None))
    line = gw.create(live.api_key, peer_public_key="ferry-public-v1 peer-x25519 " + a_key)
    cases.append(("a public key given as its key file's line", line, 201, None))
    if line.status == 201:
        joined = gw.join(live.api_key, line.json()["join_code"])
        cases.append(("join of a session whose creator gave a key line", joined, 200, None))
        if joined.status == 200 and joined.json()["expected_peer_public_key"] != a_key:
            bad_line = joined.json()["expected_peer_public_key"]
            cases.append((f"the key comes back as {bad_line!r}, not plain base64", joined, 0,
                          None))
    minimal = gw.call("POST", "/v1/sessions", api_key=live.api_key, doc={})
    cases.append(("create with {} (every field optional)", minimal, 201, None))
    if minimal.status == 201:
        sid = int(minimal.json()["session_id"], 16)
        cases.append(("renew of slot A by a key that did not take it",
                      gw.renew(live.join_only_key, sid, 0), 404, "not_found"))
        cases.append(("renew of slot B before anyone joined", gw.renew(live.api_key, sid, 1),
                      404, "not_found"))
    # The creator names B's key; a join claiming another key is refused and the code survives.
    b_key = b64(raw_public(live.b_identity))
    expecting = gw.create(live.api_key, peer_public_key=a_key, expected_peer=b_key)
    need(expecting.status == 201, f"create: {expecting}")
    code = expecting.json()["join_code"]
    other = b64(raw_public(X25519PrivateKey.generate()))
    cases.append(("a join with another key than expected", gw.join(live.api_key, code, other),
                  403, "peer_identity_mismatch"))
    cases.append(("the join code after a refused join", gw.join(live.join_only_key, code, b_key),
                  200, None))
    # Only the key that took a slot renews it: slot B belongs to the join-only key here,
    # although the creator's key may join in the realm too.
    sid = int(expecting.json()["session_id"], 16)
    cases.append(("renew of slot B by the creator's key", gw.renew(live.api_key, sid, 1), 404,
                  "not_found"))
    cases.append(("renew of slot B by the joiner's key", gw.renew(live.join_only_key, sid, 1),
                  200, None))
    bad = []
    for what, answer, status, code in cases:
        if answer.status != status or (code is not None and answer.error() != code):
            bad.append(f"{what}: {answer.status} {answer.body[:80]!r}, documented {status} "
                       f"{code or ''}")
        elif code is not None:
            if not answer.headers.get("content-type", "").startswith("application/json") or \
                    answer.json() != {"error": code}:
                bad.append(f"{what}: the body is {answer.body!r}, documented {{\"error\": code}}")
    allow = gw.call("GET", "/v1/sessions").headers.get("allow")
    if allow != "POST":
        bad.append(f"405 with Allow {allow!r}, documented `Allow: POST`")
    post_health = gw.call("POST", "/healthz", raw_body=b"{}")
    if post_health.status != 405 or post_health.headers.get("allow") != "GET,HEAD":
        bad.append(f"POST /healthz: {post_health.status}, Allow "
                   f"{post_health.headers.get('allow')!r}; documented 405, `Allow: GET,HEAD`")
    admin_host, admin_port = live.env["gateway_admin"].rsplit(":", 1)
    for listener, answer in (
            ("public", gw.call("GET", "/metrics")),
            ("admin", http_request(admin_host, int(admin_port), "POST", "/v1/sessions",
                                   body=b"{}", headers={"Authorization": f"Bearer {live.api_key}",
                                                        "Content-Type": "application/json"}))):
        if answer.status != 404 or answer.error() != "not_found":
            bad.append(f"the other listener's route on the {listener} listener: {answer}")
    admin = http_request(admin_host, int(admin_port), "GET", "/admin/v1/sessions")
    if admin.status != 401 or admin.error() != "unauthorized":
        bad.append(f"GET /admin/v1/sessions without the admin token: {admin}")
    head = gw.call("HEAD", "/healthz")
    if head.status != 200 or head.body:
        bad.append(f"HEAD /healthz: {head.status} with {len(head.body)} body bytes")
    gw_after = metrics(live.env["gateway_admin"])
    for name, labels, least in (
            ("ferry_gateway_auth_failures_total", {"reason": "missing"}, 1),
            ("ferry_gateway_auth_failures_total", {"reason": "wrong_secret"}, 1),
            ("ferry_gateway_auth_failures_total", {"reason": "malformed"}, 1),
            ("ferry_gateway_auth_failures_total", {"reason": "scope"}, 1),
            ("ferry_gateway_join_codes_refused_total", {}, 1),
            ("ferry_gateway_renewals_refused_total", {}, 3),
            ("ferry_gateway_sessions_created_total", {}, 3),
            ("ferry_gateway_sessions_joined_total", {}, 1),
            ("ferry_gateway_requests_total", {"route": "/v1/sessions", "status": "401"}, 2),
            ("ferry_gateway_requests_total", {"route": "/v1/sessions", "status": "415"}, 1),
            ("ferry_gateway_requests_total", {"route": "other", "status": "404"}, 1)):
        grew = metric(gw_after, name, **labels) - metric(gw_before, name, **labels)
        if grew < least:
            bad.append(f"{name}{labels} grew by {grew:g}, expected at least {least}")
    need(not bad, "; ".join(bad))


def gateway_relays_and_admin(live):
    """gateway-api.md *Relay registry* and the admin routes: a heartbeat of the listed relay
    with its own address and key is accepted, one that would move it is not; the admin lists
    and a revocation (of a key made for it) answer as documented."""
    with open(live.env["relay_key_file"]) as f:
        relay_key = f.read().strip()
    with open(live.env["admin_token_file"]) as f:
        admin_token = f.read().strip()
    relay_pub = b64(live.relay_public)
    beat = {"relay_id": live.env["relay_id"], "address": live.relay_v4, "public_key": relay_pub,
            "sessions": 3, "capacity": 100000}
    gw = live.gw
    ok = gw.call("POST", "/v1/relays/heartbeat", api_key=relay_key, doc=beat)
    need(ok.status == 200, f"heartbeat of the listed relay: {ok}")
    doc = ok.json()
    need(set(doc) == {"relay_id", "expires_at"} and doc["relay_id"] == beat["relay_id"],
         f"heartbeat answer {doc}")
    need(abs(doc["expires_at"] - time.time() - live.env["heartbeat_ttl_secs"]) <= 2,
         f"heartbeat expires_at {doc['expires_at'] - time.time():.0f} s away")
    bad = []
    for what, body, status, code in (
            ("another address for the listed relay", dict(beat, address="127.0.0.1:9"), 403,
             "forbidden"),
            ("another relay id than the key's", dict(beat, relay_id=2), 403, "forbidden"),
            ("capacity 0", dict(beat, capacity=0), 400, "bad_request"),
            ("port 0", dict(beat, address="127.0.0.1:0"), 400, "bad_request"),
            ("a missing field", {k: v for k, v in beat.items() if k != "sessions"}, 400,
             "bad_request"),
            ("a fractional capacity", dict(beat, capacity=7.5), 400, "bad_request"),
            ("capacity 7.0 (an integer, as JSON Schema says)", dict(beat, capacity=7.0), 200,
             None),
            ("capacity 7e0", dict(beat, capacity=7e0), 200, None)):
        raw = json.dumps(body).encode()
        if "7e0" in what:
            raw = raw.replace(b'"capacity": 7.0', b'"capacity": 7e0')
        answer = gw.call("POST", "/v1/relays/heartbeat", api_key=relay_key, raw_body=raw)
        if answer.status != status or answer.error() != code:
            bad.append(f"heartbeat with {what}: {answer}, documented {status} {code}")
    host, port = live.env["gateway_admin"].rsplit(":", 1)
    auth = {"Authorization": f"Bearer {admin_token}"}
    relays = http_request(host, int(port), "GET", "/admin/v1/relays", headers=auth)
    if relays.status != 200:
        bad.append(f"GET /admin/v1/relays: {relays}")
    else:
        listed = relays.json()["relays"]
        mine = [r for r in listed if r["id"] == live.env["relay_id"]]
        if not mine or mine[0].get("source") != "config" or mine[0].get("healthy") is not True \
                or mine[0].get("sessions") != 3 or mine[0].get("address") != live.relay_v4:
            bad.append(f"GET /admin/v1/relays lists {listed}")
    sessions = http_request(host, int(port), "GET", "/admin/v1/sessions?limit=2", headers=auth)
    if sessions.status != 200 or len(sessions.json().get("sessions", [])) != 2:
        bad.append(f"GET /admin/v1/sessions?limit=2: {sessions}")
    else:
        view = sessions.json()["sessions"][0]
        want = {"session_id", "realm", "relay_id", "created_by", "created_at",
                "join_code_expires_at", "expires_at", "joined", "joined_by"}
        if set(view) != want:
            bad.append(f"a session of GET /admin/v1/sessions has the fields {sorted(view)}")
    plus = http_request(host, int(port), "GET", "/admin/v1/sessions?limit=+1", headers=auth)
    if plus.status != 400 or plus.error() != "bad_request":
        bad.append(f"GET /admin/v1/sessions?limit=+1: {plus}")
    revoked = http_request(host, int(port), "POST", "/admin/v1/keys/revoke", headers=dict(
        auth, **{"Content-Type": "application/json"}), body=b'{"key_id": "relay1"}')
    if revoked.status != 200 or revoked.json() != {"key_id": "relay1", "revoked": True,
                                                   "already_revoked": False,
                                                   "configured": True}:
        bad.append(f"POST /admin/v1/keys/revoke: {revoked}")
    after = gw.call("POST", "/v1/relays/heartbeat", api_key=relay_key, doc=beat)
    if after.status != 401 or after.error() != "unauthorized":
        bad.append(f"a heartbeat with the revoked key: {after}")
    need(not bad, "; ".join(bad))


def gateway_renew(live):
    ga = live.main["ga"]
    answer = live.gw.renew(live.api_key, ga.session_id, 0)
    need(answer.status == 200, f"renew: {answer}")
    doc = answer.json()
    need(set(doc) == Grant.FIELDS_COMMON, f"renew answer fields {sorted(doc)}")
    fresh = Grant(doc)
    problems = fresh.consistency_problems(live.gateway_public, live.lifetime)
    need(not problems, "renew: " + "; ".join(problems))
    need(fresh.session_id == ga.session_id and fresh.slot == 0 and
         fresh.relay_id == ga.relay_id, "renew: another session, slot or relay")
    need(fresh.token.token_id != ga.token.token_id, "renew: the same token id")
    need(fresh.slot_secret != ga.slot_secret, "renew: the same slot secret")
    need(fresh.expected_peer == ga.expected_peer, "renew: another expected_peer_public_key")
    live.main["ga_renewed"] = fresh


# ---------------------------------------------------------------------------------------------
# The relay layer, one session through its life (docs/protocol.md §3, §5, §6, §7)


def main_peers(live):
    need("ga" in live.main, "depends on the gateway's create and join")
    return live.main["ga"], live.main["gb"]


def relay_bind_a(live):
    ga, _ = main_peers(live)
    before = live.relay_metrics()
    a = live.peer(ga, name="A")
    live.peers.append(a)
    ack, challenges = a.bind()
    need(len(challenges) == 1, f"{len(challenges)} CHALLENGEs to a first BIND with a zero cookie")
    c = challenges[0]
    need(len(c.raw) == 40 and c.raw[:16] == w.header(w.CHALLENGE, ga.session_id, 24),
         f"CHALLENGE header {c.raw[:16].hex()}")
    need(ack.type == w.BIND_ACK, f"BIND with the cookie: {ack.name()}")
    need(len(ack.raw) == 56 and ack.raw[:16] == w.header(w.BIND_ACK, ga.session_id, 40),
         f"BIND-ACK header {ack.raw[:16].hex()}")
    need(ack.peer_present == 0, "peer present 1 with slot B free")
    need(ack.idle_timeout == live.idle, f"idle timeout {ack.idle_timeout}, config {live.idle}")
    live.wait_metric(before, "ferry_challenges_total")
    live.wait_metric(before, "ferry_binds_accepted_total")
    live.wait_metric(before, "ferry_sessions_opened_total")
    live.main["a"] = a


def relay_bind_b_v6(live):
    _, gb = main_peers(live)
    a = live.main["a"]
    before = live.relay_metrics()
    b = live.peer(gb, live.relay_v6, name="B")
    live.peers.append(b)
    ack, challenges = b.bind()
    need(ack.type == w.BIND_ACK, f"B's BIND over IPv6: {ack.name()}")
    need(len(challenges) == 1, "B's first BIND was not challenged")
    need(ack.peer_present == 1, "B's BIND-ACK says peer present 0 with slot A bound")
    notice = a.expect(w.BIND_ACK, 2.0)
    need(notice is not None, "A got no peer-present notice when B bound")
    a.check_notice(notice)
    need(notice.idle_timeout == live.idle and notice.expires_at == a.expires_at,
         "the notice's idle timeout or expires-at differs from A's BIND-ACK")
    live.wait_metric(before, "ferry_notices_total", kind="peer_present")
    live.main["b"] = b


def relay_data(live):
    a, b = live.main["a"], live.main["b"]
    before = live.relay_metrics()
    sent = 0
    for src, dst, body in ((a, b, b"hello B"), (b, a, b"hello A"),
                           (a, b, os.urandom(w.MAX_DATA_BODY)), (b, a, b"\x00")):
        datagram = w.data_packet(src.session_id, body)
        src.send(datagram)
        sent += len(datagram)
        p = dst.expect(w.DATA, 2.0)
        need(p is not None, f"{src.name} → {dst.name}: nothing forwarded")
        need(p.raw == datagram, f"{src.name} → {dst.name}: the datagram changed on the way")
    live.wait_metric(before, "ferry_forwarded_packets_total", 4)
    live.wait_metric(before, "ferry_forwarded_bytes_total", sent)


def relay_keepalive(live):
    before = live.relay_metrics()
    for p in (live.main["a"], live.main["b"]):
        need(p.keepalive() is not None, f"{p.name}'s KEEPALIVE was not echoed")
    live.wait_metric(before, "ferry_keepalives_total", 2)


def relay_retransmission(live):
    """§3.1: the same BIND again (number ≥ last) is acknowledged again; a lower one REPLAYED."""
    a = live.main["a"]
    before = live.relay_metrics()
    seq = a.last_acked

    def same(n, cookie):
        return w.bind_packet(a.session_id, a.slot, n, cookie, a.token, a.k_peer)
    ack = a.request(same, seq)
    need(ack is not None and ack.type == w.BIND_ACK, f"a retransmitted BIND: {ack and ack.name()}")
    need(ack.peer_present == 1, "retransmission's BIND-ACK says peer present 0")
    live.wait_metric(before, "ferry_binds_accepted_total")
    old = a.request(same, seq - 1)
    need(old is not None, "no answer to a BIND with a number below last")
    expect_reject(old, w.REPLAYED, "the bound token with a lower number")
    # The same BIND with a higher number is accepted and raises last: a REBIND between the two
    # numbers is then REPLAYED.
    higher = a.request(same, seq + 10)
    need(higher is not None and higher.type == w.BIND_ACK and higher.seq == seq + 10,
         f"the bound token with a higher number: {higher and higher.name()}")
    a.last_acked = seq + 10
    between = a.request(lambda n, c: w.rebind_packet(a.session_id, a.slot, n, c, a.k_peer),
                        seq + 5)
    need(between is not None, "no answer to a REBIND below the raised last")
    expect_reject(between, w.REPLAYED, "a REBIND below the number of an accepted BIND")
    a.seq = max(a.seq, seq + 10)
    live.wait_metric(before, "ferry_binds_rejected_total", reason="replayed")


def relay_rebind(live):
    """§3.7: a NAT rebinding; the REBIND from the new port is challenged, then moves the slot."""
    a, b = live.main["a"], live.main["b"]
    before = live.relay_metrics()
    old_sock = a.sock
    a.sock = None
    a.new_socket()
    try:
        ack, challenges = a.rebind()
        need(len(challenges) == 1, "a REBIND from a new port was not challenged")
        need(ack.type == w.BIND_ACK, f"REBIND: {ack.name()}")
        need(ack.peer_present == 1, "REBIND's BIND-ACK says peer present 0")
        live.wait_metric(before, "ferry_rebinds_accepted_total")
        b.send_data(b"to A's new port")
        p = a.expect(w.DATA, 2.0)
        need(p is not None and p.body == b"to A's new port", "B → A after the rebind: lost")
        a.send_data(b"from A's new port")
        p = b.expect(w.DATA, 2.0)
        need(p is not None and p.body == b"from A's new port", "A → B after the rebind: lost")
        old_sock.sendto(w.data_packet(a.session_id, b"from the old port"), a.relay)
        live.quiet(b)
        live.wait_metric(before, "ferry_drops_total", reason="data_unbound")
        need(not [p for p in b.notices if p.type == w.BIND_ACK],
             "B got a peer-present notice for A's REBIND (§3.3: never for a REBIND)")
        # §3.7: a REBIND from the address already bound is accepted like any other.
        ack, challenges = a.rebind()
        need(ack.type == w.BIND_ACK and not challenges,
             f"a REBIND from the bound address: {ack.name()}, {len(challenges)} CHALLENGEs")
    finally:
        old_sock.close()


def relay_rebind_refusals(live):
    a, b = live.main["a"], live.main["b"]
    before = live.relay_metrics()

    def stale(n, cookie):
        return w.rebind_packet(a.session_id, a.slot, n, cookie, a.k_peer)
    answer = a.request(stale, a.last_acked)
    need(answer is not None, "no answer to a REBIND with number = last")
    expect_reject(answer, w.REPLAYED, "REBIND with number = last")

    def forged(n, cookie):
        return w.rebind_packet(a.session_id, a.slot, n, cookie, os.urandom(32))
    answer = a.request(forged, a.next_seq())
    need(answer is not None, "no answer to a REBIND with a bad proof")
    expect_reject(answer, w.BAD_PROOF, "REBIND with a bad proof")
    # B moving its slot to A's address: SESSION_FULL (one address, one slot).
    b_on_a = RelayPeer(live.relay_v4, b.session_id, b.slot, b.token, b.slot_secret, name="B@A")
    b_on_a.close_socket()
    b_on_a.sock = a.sock
    b_on_a.seq = b.seq
    answer, _ = b_on_a.rebind()
    b.seq = b_on_a.seq
    need(answer.type == w.REJECT, f"B's REBIND from A's address: {answer.name()}")
    expect_reject(answer, w.SESSION_FULL, "B's REBIND from A's address")
    live.wait_metric(before, "ferry_binds_rejected_total", reason="session_full")
    live.wait_metric(before, "ferry_binds_rejected_total", reason="bad_proof")
    # Nothing changed: DATA still flows both ways.
    a.send_data(b"still bound")
    need(b.expect(w.DATA, 2.0) is not None, "A → B lost after the refused REBINDs")


def relay_bind_refusals(live):
    """§7: the slot state rows of the BIND table."""
    a, b = live.main["a"], live.main["b"]
    gb = live.main["gb"]
    before = live.relay_metrics()
    # B's token from A's address: the source holds the session's other slot.
    b_on_a = RelayPeer(live.relay_v4, b.session_id, 1, b.token, b.slot_secret, name="B@A")
    b_on_a.close_socket()
    b_on_a.sock = a.sock
    answer, _ = b_on_a.bind()
    expect_reject(answer, w.SESSION_FULL, "B's bound token from A's address")
    # B's bound token from a third address: REPLAYED.
    thief = RelayPeer(live.relay_v4, b.session_id, 1, b.token, b.slot_secret, name="B-elsewhere")
    live.peers.append(thief)
    answer, _ = thief.bind()
    expect_reject(answer, w.REPLAYED, "B's bound token from another address")
    # A fresh token for slot B (the gateway renews it) from a third address: SESSION_FULL.
    renewed = live.gw.renew(live.api_key, gb.session_id, 1)
    need(renewed.status == 200, f"renew of slot B: {renewed}")
    fresh = Grant(renewed.json())
    other = RelayPeer(live.relay_v4, b.session_id, 1, fresh.token.raw, fresh.slot_secret,
                      name="B-fresh-elsewhere")
    live.peers.append(other)
    answer, _ = other.bind()
    expect_reject(answer, w.SESSION_FULL, "a fresh slot-B token from another address")
    live.wait_metric(before, "ferry_binds_rejected_total", 2, reason="session_full")
    live.wait_metric(before, "ferry_binds_rejected_total", reason="replayed")
    live.main["gb_fresh"] = fresh


def relay_renewal(live):
    """§3.1 *Renewal*: a BIND with a fresh token from the bound address replaces the binding;
    its answer comes under the fresh K_relay. B renews with the token the previous check's
    refused BIND presented (a REJECTed BIND changes no token-cache state, §7)."""
    a, b = live.main["a"], live.main["b"]
    need("ga_renewed" in live.main and "gb_fresh" in live.main, "depends on earlier renewals")
    before = live.relay_metrics()
    for peer, fresh in ((a, live.main["ga_renewed"]), (b, live.main["gb_fresh"])):
        old_expiry = peer.expires_at
        ack, challenges = peer.bind(token=fresh.token.raw, slot_secret=fresh.slot_secret)
        need(ack.type == w.BIND_ACK, f"{peer.name}'s renewal: {ack.name()}")
        need(not challenges, f"{peer.name}'s renewal was challenged with a valid cookie")
        need(ack.expires_at == fresh.expires_at and ack.expires_at >= old_expiry,
             "the renewal's expires-at is not the fresh token's exp")
        need(ack.peer_present == 1, "renewal's BIND-ACK says peer present 0")
    live.wait_metric(before, "ferry_binds_accepted_total", 2)
    need(metric(live.relay_metrics(), "ferry_notices_total", kind="peer_present") ==
         metric(before, "ferry_notices_total", kind="peer_present"),
         "a renewal sent a peer-present notice (§3.3: only when a free slot is bound)")
    a.send_data(b"after renewal")
    need(b.expect(w.DATA, 2.0) is not None, "A → B lost after the renewals")
    need(a.keepalive() is not None, "no KEEPALIVE echo after the renewal")
    # §3.1: a BIND with another token has no sequence check, and its number becomes last.
    renewed = live.gw.renew(live.api_key, a.session_id, 0)
    need(renewed.status == 200, f"renew: {renewed}")
    fresh = Grant(renewed.json())
    high = a.seq
    ack, _ = a.bind(token=fresh.token.raw, slot_secret=fresh.slot_secret, seq=high - 1000)
    need(ack.type == w.BIND_ACK and ack.seq == high - 1000,
         f"a renewal with a number below last: {ack.name()}")
    a.seq = high - 600
    ack, _ = a.rebind()
    need(ack.type == w.BIND_ACK and ack.seq == high - 599,
         f"a REBIND above the renewal's number but below the old last: {ack.name()}")
    a.seq = high
    live.main["ga_renewed"] = fresh
    # The old K_peer no longer proves the slot; the fresh one does.
    old_k_peer = w.slot_keys(live.main["ga"].slot_secret)[0]
    answer = a.request(lambda n, c: w.rebind_packet(a.session_id, a.slot, n, c, old_k_peer),
                       a.next_seq())
    need(answer is not None, "no answer to a REBIND under the replaced K_peer")
    expect_reject(answer, w.BAD_PROOF, "a REBIND under the replaced K_peer")
    ack, _ = a.rebind()
    need(ack.type == w.BIND_ACK, f"a REBIND under the fresh K_peer: {ack.name()}")


def relay_close_refusals(live):
    a, b = live.main["a"], live.main["b"]
    before = live.relay_metrics()
    # A bad MAC, then a stale number: both dropped as bad_close, unanswered.
    forged = w.close_packet(a.session_id, a.slot, a.seq + 1000, os.urandom(32))
    a.send(forged)
    stale = w.close_packet(a.session_id, a.slot, a.last_acked, a.k_peer)
    a.send(stale)
    live.quiet(a)
    live.quiet(b)
    live.wait_metric(before, "ferry_drops_total", 2, reason="bad_close")
    # A CLOSE with reason 1 from a peer: malformed (body rule 7).
    a.send(w.close_packet(a.session_id, a.slot, a.seq + 2000, a.k_peer, reason=w.EXPIRED))
    live.quiet(a)
    live.wait_metric(before, "ferry_malformed_total", rule="body")
    a.send_data(b"still bound")
    need(b.expect(w.DATA, 2.0) is not None, "the session did not survive the refused CLOSEs")


def relay_close(live):
    """§3.8: a CLOSE from any address ends the session; the other peer gets PEER_CLOSED."""
    a, b = live.main["a"], live.main["b"]
    before = live.relay_metrics()
    elsewhere = RelayPeer(live.relay_v4, a.session_id, a.slot, a.token, a.slot_secret,
                          name="A-elsewhere")
    live.peers.append(elsewhere)
    elsewhere.k_peer = a.k_peer
    close = elsewhere.close(seq=a.next_seq())
    p = b.expect(w.CLOSE, 2.0)
    need(p is not None, "B got no CLOSE after A's")
    b.check_relay_close(p, w.PEER_CLOSED)
    need(len(p.raw) == 44, f"the relay's CLOSE is {len(p.raw)} bytes")
    live.quiet(a)
    live.quiet(elsewhere)
    live.wait_metric(before, "ferry_closes_total")
    live.wait_metric(before, "ferry_notices_total", kind="peer_closed")
    live.wait_metric(before, "ferry_sessions_closed_total")
    # The session is gone: B's KEEPALIVE is not echoed, a resent CLOSE is bad_close.
    need(b.keepalive(timeout=0.5) is None, "B's KEEPALIVE echoed after the session closed")
    live.wait_metric(before, "ferry_drops_total", reason="keepalive_unbound")
    elsewhere.send(close)
    live.quiet(elsewhere)
    live.wait_metric(before, "ferry_drops_total", reason="bad_close")
    # A's token bound once: used again it is REPLAYED (authenticated), even with the session gone.
    answer, _ = a.bind(token=a.token, slot_secret=a.slot_secret)
    expect_reject(answer, w.REPLAYED, "a spent token after CLOSE")


# ---------------------------------------------------------------------------------------------
# Refusals the docs define answers for


def malformed_headers(live):
    """§2.1: every rule broken once; no answer, counted by rule; §3 body rules; §7 relay-only
    types."""
    sock = RelayPeer(live.relay_v4, random_session_id(), 0, bytes(208), bytes(32), name="junk")
    live.peers.append(sock)
    sid = random_session_id()
    ka = w.keepalive_packet(sid)
    token, secret = live.mint(sid, 0)
    k_peer = w.slot_keys(secret)[0]
    cases = [
        ("too_short", ka[:10]),
        ("too_long", w.header(w.DATA, sid, w.MAX_DATA_BODY + 1) + bytes(w.MAX_DATA_BODY + 1)),
        ("bad_magic", w.header(w.KEEPALIVE, sid, 0, magic=b"FS")),
        ("bad_version", w.header(w.KEEPALIVE, sid, 0, version=2)),
        ("unknown_type", w.header(9, sid, 0)),
        ("zero_session", w.header(w.KEEPALIVE, 0, 0)),
        ("reserved_non_zero", w.header(w.KEEPALIVE, sid, 0, reserved=1)),
        ("length_mismatch", ka + b"\0"),
        ("too_long", w.header(w.DATA, sid, 3000) + bytes(3000)),
        ("too_long", w.header(w.DATA, sid, 65000) + bytes(65000)),
        ("body_length_out_of_range", w.header(w.KEEPALIVE, sid, 1) + b"\0"),
        # Several rules broken: the first in §2.1's order is the one counted.
        ("too_long", b"XX" + bytes(1500)),
        ("bad_magic", w.header(w.KEEPALIVE, 0, 5, magic=b"fr", version=9, reserved=1)),
        ("bad_version", w.header(w.KEEPALIVE, sid, 0, version=0, reserved=7)),
        ("unknown_type", w.header(0, 0, 3)),
        ("zero_session", w.header(w.DATA, 0, 0, reserved=1)),
        ("reserved_non_zero", w.header(w.DATA, sid, 9, reserved=1)),
        ("length_mismatch", w.header(w.KEEPALIVE, sid, 5)),
        ("body_length_out_of_range", w.header(w.DATA, sid, 0)),
        ("body", w.bind_packet(sid, 0, 1, bytes(16), token, k_peer, reserved=1)),
        ("body", w.bind_packet(sid, 0, 1, bytes(16), token, k_peer, token_len=207)),
        ("body", w.bind_packet(sid, 2, 1, bytes(16), token, k_peer)),
        ("body", w.header(w.REBIND, sid, 44) + bytes([0, 1, 0, 0]) + bytes(40)),
    ]
    bad = []
    for rule, datagram in cases:
        before = live.relay_metrics()
        sock.send(datagram)
        try:
            live.quiet(sock)
            live.wait_metric(before, "ferry_malformed_total", rule=rule)
            live.wait_metric(before, "ferry_drops_total", reason="malformed")
        except CheckFailed as e:
            bad.append(f"{rule} ({datagram[:16].hex()}…): {e}")
    # Types only the relay sends, well-formed: unexpected_type.
    for ptype, body in ((w.CHALLENGE, bytes(8) + os.urandom(16)),
                        (w.BIND_ACK, bytes(40)), (w.REJECT, bytes([1, 0, 0, 0]) + bytes(24))):
        before = live.relay_metrics()
        sock.send(w.packet(ptype, sid, body))
        try:
            live.quiet(sock)
            live.wait_metric(before, "ferry_drops_total", reason="unexpected_type")
        except CheckFailed as e:
            bad.append(f"{w.TYPE_NAMES[ptype]} sent to the relay: {e}")
    need(not bad, "; ".join(bad))


def cookies(live):
    """§5: a BIND without a cookie valid for its source address gets a CHALLENGE."""
    sid = random_session_id()
    token, secret = live.mint(sid, 0)
    one = RelayPeer(live.relay_v4, sid, 0, token, secret, name="cookie-1")
    two = RelayPeer(live.relay_v4, sid, 0, token, secret, name="cookie-2")
    live.peers += [one, two]

    def challenge(peer, cookie):
        seq = peer.next_seq()
        peer.cookie = cookie
        p = peer.request(lambda n, c: w.bind_packet(sid, 0, n, c, token, peer.k_peer), seq)
        need(p is not None, "no answer")
        return p
    first = challenge(one, bytes(16))
    need(first.type == w.CHALLENGE, f"a zero cookie: {first.name()}")
    p = challenge(one, os.urandom(16))
    need(p.type == w.CHALLENGE, f"a made-up cookie: {p.name()}")
    p = challenge(two, first.cookie)
    need(p.type == w.CHALLENGE, f"another address's cookie: {p.name()}")
    need(p.cookie != first.cookie, "two source ports got the same cookie")
    # Another session from the same address: the cookie covers the session id.
    other_sid = random_session_id()
    other_token, other_secret = live.mint(other_sid, 0)
    one.send(w.bind_packet(other_sid, 0, one.next_seq(), first.cookie, other_token,
                           w.slot_keys(other_secret)[0]))
    p = one.expect(w.CHALLENGE, 2.0)
    need(p is not None and p.session_id == other_sid,
         "a cookie of one session used for another was not challenged")
    # Another slot of the same session from the same address: the cookie covers the slot.
    other_slot = w.bind_packet(sid, 1, one.next_seq(), first.cookie, token, one.k_peer)
    one.send(other_slot)
    p = one.expect(w.CHALLENGE, 2.0)
    need(p is not None, "a cookie of slot A used for slot B was not challenged")
    # And the valid cookie is accepted; the repeat MAY reuse the challenged request's number
    # (§3.1: a request answered with a CHALLENGE sets nothing).
    seq = one.next_seq()
    one.send(w.bind_packet(sid, 0, seq, bytes(16), token, one.k_peer))
    p = one.expect(w.CHALLENGE, 2.0)
    need(p is not None and p.seq == seq and p.cookie == first.cookie,
         "no CHALLENGE with the same cookie for the same address, session and slot")
    p = one.request(lambda n, _: w.bind_packet(sid, 0, n, first.cookie, token, one.k_peer),
                    seq)
    need(p is not None and p.type == w.BIND_ACK and p.seq == seq,
         f"the valid cookie with the challenged request's number: {p and p.name()}")
    one.close(seq=one.next_seq())


def bad_proof(live):
    before = live.relay_metrics()
    sid = random_session_id()
    token, secret = live.mint(sid, 0)
    peer = RelayPeer(live.relay_v4, sid, 0, token, os.urandom(32), name="bad-proof")
    live.peers.append(peer)
    answer, _ = peer.bind()
    expect_reject(answer, w.BAD_PROOF, "a BIND whose proof is under another key")
    need(answer.mac == bytes(16) and answer.authenticated == 0, "BAD_PROOF authenticated")
    need(len(answer.raw) == 44, f"REJECT is {len(answer.raw)} bytes, documented 44")
    live.wait_metric(before, "ferry_binds_rejected_total", reason="bad_proof")
    # The token was not spent: the same token with the right proof binds.
    right = RelayPeer(live.relay_v4, sid, 0, token, secret, name="right-proof")
    live.peers.append(right)
    answer, _ = right.bind()
    need(answer.type == w.BIND_ACK, f"the token after a BAD_PROOF: {answer.name()}")
    right.close()


def token_refusals(live):
    """§4.2 steps 1–10 and their REJECT reasons (tokens minted with a key the relay trusts)."""
    now = int(time.time())
    skew = live.skew
    other_relay_key = raw_public(X25519PrivateKey.generate())
    other_seed = os.urandom(32)
    cases = []

    def case(what, reason, header_sid=None, bind_slot=0, corrupt=None, **mint):
        sid = random_session_id()
        token, secret = live.mint(sid, mint.pop("slot", 0), **mint)
        if corrupt:
            token = corrupt(token)
        cases.append((what, reason, header_sid or sid, bind_slot, token, secret))
    flip = (lambda t: t[:150] + bytes([t[150] ^ 1]) + t[151:])
    case("a bad signature", w.TOKEN_INVALID, corrupt=flip)
    case("an unknown kid", w.TOKEN_INVALID, kid=99)
    case("a kid that names another key", w.TOKEN_INVALID, seed=other_seed)
    case("another relay id", w.TOKEN_INVALID, relay_id=live.env["relay_id"] + 1)
    case("a lifetime over the maximum", w.TOKEN_INVALID, nbf=now - 5,
         exp=now - 5 + live.env["max_token_lifetime_secs"] + 1)
    case("an empty lifetime (exp = nbf)", w.TOKEN_INVALID, nbf=now - 5, exp=now - 5)
    case("a secret sealed to another relay", w.TOKEN_INVALID, relay_public=other_relay_key)
    case("an unknown flag", w.TOKEN_INVALID, flags=2)
    case("expired", w.TOKEN_EXPIRED, nbf=now - 100, exp=now - skew - 10)
    case("not yet valid", w.TOKEN_NOT_YET_VALID, nbf=now + skew + 60, exp=now + skew + 120)
    case("a token of another session", w.WRONG_SESSION, header_sid=random_session_id())
    case("a token of slot B in a BIND for slot A", w.WRONG_SESSION, slot=1, bind_slot=0)
    bad = []
    for what, reason, sid, bind_slot, token, secret in cases:
        before = live.relay_metrics()
        peer = RelayPeer(live.relay_v4, sid, bind_slot, token, secret, name=what)
        live.peers.append(peer)
        try:
            answer, _ = peer.bind()
            expect_reject(answer, reason, what)
            live.wait_metric(before, "ferry_binds_rejected_total",
                             reason=w.REJECT_NAMES[reason].lower())
        except (CheckFailed, ProtocolError) as e:
            bad.append(str(e))
        peer.close_socket()
    # §7's order: the token (steps 1–10) before the proof.
    sid = random_session_id()
    token, _ = live.mint(sid, 0, nbf=now - 100, exp=now - skew - 10)
    both = RelayPeer(live.relay_v4, sid, 0, token, os.urandom(32), name="expired-and-bad-proof")
    live.peers.append(both)
    answer, _ = both.bind()
    if answer.type != w.REJECT or answer.reason != w.TOKEN_EXPIRED:
        bad.append(f"an expired token with a bad proof: {answer.name()}, §7 checks the token "
                   "first")
    # Inside the skew: a token whose nbf is a second ahead binds (§4.2 step 8).
    sid = random_session_id()
    token, secret = live.mint(sid, 0, nbf=now + 1, exp=now + 100)
    early = RelayPeer(live.relay_v4, sid, 0, token, secret, name="early")
    live.peers.append(early)
    answer, _ = early.bind()
    if answer.type != w.BIND_ACK:
        bad.append(f"nbf 1 s ahead with a {skew} s skew: {answer.name()}")
    else:
        early.close()
    need(not bad, "; ".join(bad))


def probe_token(live):
    """§7: a probe token gets a BIND-ACK that binds nothing (idle 0, peer present 0), and its
    token id is not remembered."""
    before = live.relay_metrics()
    sid = random_session_id()
    token, secret = live.mint(sid, 1, flags=1)
    probe = RelayPeer(live.relay_v4, sid, 1, token, secret, name="probe")
    live.peers.append(probe)
    for attempt in (1, 2):
        ack, _ = probe.bind()
        need(ack.type == w.BIND_ACK, f"probe {attempt}: {ack.name()}")
        need(ack.idle_timeout == 0 and ack.peer_present == 0, "probe BIND-ACK: idle timeout "
             f"{ack.idle_timeout}, peer present {ack.peer_present}; documented 0 and 0")
    live.wait_metric(before, "ferry_probes_total", 2)
    need(probe.keepalive(timeout=0.5) is None, "a probe's KEEPALIVE was echoed: it bound")
    after = live.relay_metrics()
    need(metric(after, "ferry_binds_accepted_total") == metric(before, "ferry_binds_accepted_total"),
         "a probe was counted as a bind")


def unbound_traffic(live):
    """§3.5, §3.6, §3.7: DATA and KEEPALIVE from unbound sources are dropped silently;
    DATA with the other slot free too; a REBIND for a session the relay lacks: UNKNOWN_SESSION."""
    before = live.relay_metrics()
    ga, gb = live.session()
    a = live.peer(ga, name="half")
    live.peers.append(a)
    ack, _ = a.bind()
    need(ack.type == w.BIND_ACK, f"bind: {ack.name()}")
    a.send_data(b"nobody there")
    live.quiet(a)
    need(a.keepalive() is not None, "a bound slot's KEEPALIVE not echoed while the other is free")
    stranger = live.peer(gb, name="stranger")
    live.peers.append(stranger)
    stranger.send_data(b"from nowhere")
    stranger.send(w.keepalive_packet(ga.session_id))
    stranger.send(w.keepalive_packet(random_session_id()))
    live.quiet(stranger)
    live.quiet(a)
    live.wait_metric(before, "ferry_drops_total", 2, reason="data_unbound")
    live.wait_metric(before, "ferry_drops_total", 2, reason="keepalive_unbound")
    ghost = RelayPeer(live.relay_v4, random_session_id(), 0, bytes(208), os.urandom(32),
                      name="ghost")
    live.peers.append(ghost)
    answer, challenges = ghost.rebind()
    need(challenges, "a REBIND without a cookie was answered before the cookie check")
    expect_reject(answer, w.UNKNOWN_SESSION, "a REBIND for an unknown session")
    # Slot B of a held session that is not bound: UNKNOWN_SESSION too ("session or slot").
    free_slot = RelayPeer(live.relay_v4, ga.session_id, 1, gb.token.raw, gb.slot_secret,
                          name="free-slot")
    live.peers.append(free_slot)
    answer, _ = free_slot.rebind()
    expect_reject(answer, w.UNKNOWN_SESSION, "a REBIND for the free slot of a held session")
    live.wait_metric(before, "ferry_binds_rejected_total", 2, reason="unknown_session")
    # A CLOSE of a half-bound session: accepted, no one to tell.
    notices = metric(live.relay_metrics(), "ferry_notices_total", kind="peer_closed")
    a.close()
    live.wait_metric(before, "ferry_closes_total")
    need(metric(live.relay_metrics(), "ferry_notices_total", kind="peer_closed") == notices,
         "a CLOSE of a half-bound session sent a peer_closed notice")
    need(a.keepalive(timeout=0.5) is None, "the closed half-bound session still echoes")


def cross_session(live):
    """A peer bound in one session cannot use its binding in another: DATA and KEEPALIVE it
    sends under another session's id are dropped, a CLOSE is bad_close, a REBIND to take over
    a slot is BAD_PROOF; the other session goes on untouched (§3.5–§3.8)."""
    before = live.relay_metrics()
    _, _, a, b = live.bound_pair()
    _, _, c, d = live.bound_pair()
    live.peers += [a, b, c, d]
    victim = a.session_id
    c.send(w.data_packet(victim, b"injected"))
    c.send(w.keepalive_packet(victim))
    c.send(w.close_packet(victim, 0, c.seq + 1, c.k_peer))
    live.quiet(c)
    live.quiet(b)
    live.quiet(a)
    live.wait_metric(before, "ferry_drops_total", reason="data_unbound")
    live.wait_metric(before, "ferry_drops_total", reason="keepalive_unbound")
    live.wait_metric(before, "ferry_drops_total", reason="bad_close")
    thief = RelayPeer(live.relay_v4, victim, 0, c.token, c.slot_secret, name="thief")
    thief.close_socket()
    thief.sock = c.sock
    answer, _ = thief.rebind()
    expect_reject(answer, w.BAD_PROOF, "a REBIND of another session's slot with this one's key")
    a.send_data(b"still mine")
    p = b.expect(w.DATA, 2.0)
    need(p is not None and p.body == b"still mine", "the victim session lost A → B")
    need(not [p for p in b.notices if p.type == w.DATA and p.body == b"injected"],
         "B received the injected DATA")
    for p in (a, c):
        p.close()


def byte_budget(live):
    """§3.5: a slot's budget holds max(1 s of its rate, 2944 bytes) and charges each DATA
    datagram its whole length, header included; DATA over it is dropped and counted as
    rate_limited. At a rate claim of 1 B/s nothing refills during the check: two full
    datagrams (2 × 1472 = 2944 bytes) pass, and then not even a 17-byte one, which would fit
    if only bodies were charged (2944 − 2 × 1456 = 32 bytes left)."""
    before = live.relay_metrics()
    sid, a, b = live.minted_pair(1, "budget")
    a.expect(w.BIND_ACK, 1.0)  # the peer-present notice
    sent = [w.data_packet(sid, bytes([i]) * w.MAX_DATA_BODY) for i in range(2)]
    sent += [w.data_packet(sid, b"x"), w.data_packet(sid, b"y" * w.MAX_DATA_BODY)]
    for datagram in sent:
        a.send(datagram)
    got = []
    while True:
        p = b.expect(w.DATA, 0.5)
        if p is None:
            break
        got.append(p.raw)
    need(got == sent[:2], f"{len(got)} datagrams forwarded ({[len(d) for d in got]} bytes); "
         "expected the two full ones only")
    live.wait_metric(before, "ferry_drops_total", 2, reason="rate_limited")
    # The other direction has a budget of its own.
    b.send_data(b"the other direction")
    p = a.expect(w.DATA, 1.0)
    need(p is not None and p.body == b"the other direction", "B → A lost: budgets are per slot")
    a.close()


def idle_and_recovery(live):
    """§3.8 *Reaping* with reason IDLE, then §3.1 *Recovery*: the old token is spent, a fresh
    one from the gateway binds again and the other peer gets the peer-present notice."""
    before = live.relay_metrics()
    ga, gb, a, b = live.bound_pair()
    live.peers += [a, b]
    # A half-bound session whose peer sends only DATA: with the other slot free, DATA does not
    # refresh the idle timer (§8), so it idles out too.
    gc, _ = live.session()
    c = live.peer(gc, name="half-bound")
    live.peers.append(c)
    ack, _ = c.bind()
    need(ack.type == w.BIND_ACK, f"half-bound session's BIND: {ack.name()}")
    # A session whose slot A sends only DATA over its budget (a 1 B/s claim) while slot B is
    # bound: that DATA is dropped but still refreshes A's idle timer (§8), so A stays bound.
    sid, d_a, d_b = live.minted_pair(1, "over-budget")
    for _ in range(2):
        d_a.send_data(bytes(w.MAX_DATA_BODY))  # the whole budget
    deadline = time.monotonic() + live.idle + 4
    close = c_close = None
    while time.monotonic() < deadline and (close is None or c_close is None):
        d_a.send_data(b"over budget")
        need(d_b.keepalive(timeout=1.0) is not None, "over-budget session: B's KEEPALIVE")
        # B keeps its own slot alive and sends A DATA, which does not refresh A's timer.
        need(b.keepalive(timeout=1.0) is not None, "B's KEEPALIVE not echoed while A idles")
        if close is None:
            b.send_data(b"to the idle A")
            close = a.expect(w.CLOSE, 0.5)
        if c_close is None:
            c.send_data(b"nobody listens")
            c_close = c.expect(w.CLOSE, 0.2)
    need(close is not None, f"A got no CLOSE within {live.idle + 4} s of idling while it "
         "received DATA")
    need(c_close is not None, "a slot sending DATA with the other slot free was not reaped")
    c.check_relay_close(c_close, w.IDLE)
    # Slot A of the over-budget session was bound after the other two: give the reaper
    # (about once a second) another 1.5 s to show it would have idled out too.
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        d_a.send_data(b"over budget")
        d_b.send(w.keepalive_packet(sid))
        need(d_a.expect(w.CLOSE, 0.3) is None, "a slot sending DATA over its budget was reaped "
             "as idle (§8: such DATA refreshes the idle timer)")
    got = [p for p in d_b.notices if p.type == w.DATA]
    need(len(got) == 2, f"{len(got)} DATA forwarded from the over-budget slot, expected the "
         "first two")
    d_a.close()
    a.check_relay_close(close, w.IDLE)
    need(not [p for p in b.notices if p.type == w.CLOSE], "B was told of A's reaping")
    live.wait_metric(before, "ferry_notices_total", 2, kind="idle")
    live.wait_metric(before, "ferry_reaped_total", 2)
    b.send_data(b"into the void")
    live.quiet(b)
    answer, _ = a.bind()
    expect_reject(answer, w.REPLAYED, "the reaped slot's old token")
    renewed = live.gw.renew(live.api_key, ga.session_id, 0)
    need(renewed.status == 200, f"renew after the idle-out: {renewed}")
    fresh = Grant(renewed.json())
    ack, _ = a.bind(token=fresh.token.raw, slot_secret=fresh.slot_secret)
    need(ack.type == w.BIND_ACK and ack.peer_present == 1, f"rebinding: {ack.name()}")
    notice = b.expect(w.BIND_ACK, 2.0)
    need(notice is not None, "B got no peer-present notice when A bound again")
    b.check_notice(notice)
    a.send_data(b"back")
    p = b.expect(w.DATA, 2.0)
    need(p is not None and p.body == b"back", "A → B lost after the recovery")
    a.close()


def expiry(live):
    """§3.8 *Reaping* with reason EXPIRED: at exp + skew both slots are unbound and told."""
    before = live.relay_metrics()
    sid = random_session_id()
    now = int(time.time())
    peers = []
    for slot in (0, 1):
        token, secret = live.mint(sid, slot, nbf=now - 10, exp=now + 2)
        p = RelayPeer(live.relay_v4 if slot == 0 else live.relay_v6, sid, slot, token, secret,
                      name=f"expiring-{slot}")
        live.peers.append(p)
        ack, _ = p.bind()
        need(ack.type == w.BIND_ACK, f"bind of slot {slot}: {ack.name()}")
        need(ack.expires_at == now + 2, "BIND-ACK's expires-at is not the token's exp")
        peers.append(p)
    peers[0].expect(w.BIND_ACK, 1.0)  # the peer-present notice
    deadline = time.monotonic() + 2 + live.skew + 4
    closes = {}
    while time.monotonic() < deadline and len(closes) < 2:
        for p in peers:
            if p.slot in closes:
                continue
            p.send(w.keepalive_packet(sid))
            c = p.expect(w.CLOSE, 0.3)
            if c is not None:
                closes[p.slot] = (c, time.time())
    need(len(closes) == 2, f"{len(closes)} of 2 slots got a CLOSE after exp + skew")
    for p in peers:
        c, at = closes[p.slot]
        p.check_relay_close(c, w.EXPIRED)
        need(at >= now + 2 + live.skew - 0.5, f"slot {p.slot} reaped {now + 2 + live.skew - at:.1f}"
             " s before exp + skew")
    live.wait_metric(before, "ferry_notices_total", 2, kind="expired")


def relay_restart(live):
    """§3.1 *Recovery* after a relay restart: no KEEPALIVE echo, the old cookie is no longer
    valid, a REBIND gets UNKNOWN_SESSION, the slots bind again (B with a fresh token from the
    gateway, A with its token of before the restart, which the relay no longer remembers, §4.2
    step 11), the other peer hears of it, and DATA flows."""
    ga, gb, a, b = live.bound_pair()
    live.peers += [a, b]
    live.restart_relay()
    need(a.keepalive(timeout=1.0) is None, "a KEEPALIVE was echoed by the restarted relay")
    answer, challenges = a.rebind()
    need(challenges, "the old cookie was accepted after the restart (§3.1: a new cookie secret)")
    expect_reject(answer, w.UNKNOWN_SESSION, "a REBIND after the restart")
    answer, challenges = a.bind(token=a.token, slot_secret=a.slot_secret)
    need(answer.type == w.BIND_ACK and answer.peer_present == 0,
         f"A's token of before the restart: {answer.name()}")
    renewed = live.gw.renew(live.api_key, gb.session_id, 1)
    need(renewed.status == 200, f"renew of slot B after the restart: {renewed}")
    fresh = Grant(renewed.json())
    answer, challenges = b.bind(token=fresh.token.raw, slot_secret=fresh.slot_secret)
    need(challenges, "B's old cookie was accepted after the restart")
    need(answer.type == w.BIND_ACK and answer.peer_present == 1,
         f"B's fresh token after the restart: {answer.name()}")
    notice = a.expect(w.BIND_ACK, 2.0)
    need(notice is not None, "A got no peer-present notice after B bound again")
    a.check_notice(notice)
    for src, dst in ((a, b), (b, a)):
        src.send_data(b"after the restart")
        p = dst.expect(w.DATA, 2.0)
        need(p is not None and p.body == b"after the restart",
             f"{src.name} → {dst.name} lost after the restart")
    a.close()


def gateway_expiry(live):
    """gateway-api.md: a join code works for `join_code_ttl_secs`, then 404
    `invalid_join_code`; a slot is renewed for `max_session_age_secs` after the session's
    creation, then 410 `session_too_old`."""
    need("created_at" in live.main, "depends on the gateway's create and join")
    before = metrics(live.env["gateway_admin"])
    ttl, max_age = live.env["join_code_ttl_secs"], live.env["max_session_age_secs"]
    wait = live.main["created_at"] + max(ttl, max_age) + 1 - time.time()
    if wait > 0:
        time.sleep(wait)
    joined = live.gw.join(live.api_key, live.main["unused_code"])
    need(joined.status == 404 and joined.error() == "invalid_join_code",
         f"a join code {ttl} s after its creation: {joined}")
    renewed = live.gw.renew(live.api_key, live.main["ga"].session_id, 0)
    need(renewed.status == 410 and renewed.error() == "session_too_old",
         f"a renewal {max_age} s after the session's creation: {renewed}")
    after = metrics(live.env["gateway_admin"])
    for name in ("ferry_gateway_join_codes_refused_total", "ferry_gateway_renewals_refused_total"):
        need(metric(after, name) > metric(before, name), f"{name} did not grow")


def logs_hold_no_secrets(live):
    """gateway-api.md *Audit log* and docs/operations.md *Observability*: the logs never hold
    an API key, admin token, token, slot secret, join code or payload bytes; the relay logs its
    security events under `ferry::security` (these come early in the run: the relay logs at
    most 10 a second, bursts of 50, and the bind flood's events may be held back)."""
    import ferry_gateway
    secrets = set(ferry_gateway.SECRETS_SEEN)
    for name in ("api_key_file", "join_only_key_file", "relay_key_file", "admin_token_file"):
        with open(live.env[name]) as f:
            key = f.read().strip()
        secrets.add(key)
        secrets.add(key.rsplit(".", 1)[1])  # the secret part alone
    forms = set()
    for secret in secrets:
        forms.add(secret)
        try:
            raw = base64.b64decode(secret, validate=True)
            forms.add(raw.hex())
        except ValueError:
            pass
    forms |= {"hello from the application", "ping from a client written from protocol.md"}
    need(len(secrets) > 20, f"only {len(secrets)} secrets were seen: the check would be empty")
    bad = []
    logs = {}
    for name in ("gateway_log", "relay_log"):
        with open(live.env[name], errors="replace") as f:
            logs[name] = f.read()
        for form in forms:
            if form in logs[name]:
                bad.append(f"{name} holds a secret or payload ({form[:6]}…)")
    relay = logs["relay_log"]
    for event, reason in (("bind_refused", "bad_proof"), ("bind_refused", "token_expired"),
                          ("close_refused", "bad_close")):
        if not any("ferry::security" in line and f'event="{event}"' in line and
                   f'reason="{reason}"' in line for line in relay.splitlines()):
            bad.append(f"the relay log has no ferry::security event={event} reason={reason}")
    need(not bad, "; ".join(bad[:6]))


def check_config_refusals(live):
    """docs/config.md: `check-config` reports every problem at once, each naming its field
    (the doc's own example: `limits.idle_timeout_secs: must be between 5 and 3600, got 2`),
    and unknown fields are errors."""
    relay_bin, _, relay_config = live.env["relay_command"]
    with open(relay_config) as f:
        text = f.read()
    def check(what, broken, wanted):
        need(broken != text, f"{what}: the relay config has no line to break")
        path = os.path.join(live.env["work"], "broken-relay.toml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(broken)
        result = subprocess.run([relay_bin, "check-config", path], capture_output=True,
                                text=True, timeout=30)
        output = result.stdout + result.stderr
        need(result.returncode != 0, f"check-config accepted {what}")
        for line in wanted:
            need(line in output, f"{what}: check-config's output lacks {line!r}: "
                 f"{output[-400:]!r}")
    check("two values out of range",
          text.replace("idle_timeout_secs = 5", "idle_timeout_secs = 2")
              .replace("max_clock_skew_secs = 2", "max_clock_skew_secs = 301"),
          ["limits.idle_timeout_secs: must be between 5 and 3600, got 2",
           "limits.max_clock_skew_secs"])
    # An unknown field is a TOML parse error: reported alone, with its line (config.md).
    check("an unknown field", text.replace("idle_timeout_secs = 5",
                                           "idle_timeout_secs = 5\nfavourite_colour = 1"),
          ["unknown field `favourite_colour`", "line "])


def no_foreign_datagrams(live):
    """§1: everything a peer receives from the relay comes from the address it sends to."""
    bad = []
    for p in live.peers:
        for source, data, why in p.ignored:
            bad.append(f"{p.name}: {why} ({source}, {data[:16].hex()})")
    need(not bad, "; ".join(bad[:5]))


# ---------------------------------------------------------------------------------------------
# Per-source limits (§8): each check below sends from loopback addresses of its own.


def bind_rate(live):
    """§7, §8: BINDs with a valid cookie beyond the source's burst are dropped unanswered and
    counted as bind_rate_limited; BINDs without a cookie are not charged."""
    before = live.relay_metrics()
    sid = random_session_id()
    token, _ = live.mint(sid, 0)
    peer = RelayPeer(live.relay_v4, sid, 0, token, os.urandom(32), name="bind-flood")
    live.peers.append(peer)
    first = peer.request(lambda n, c: w.bind_packet(sid, 0, n, c, token, peer.k_peer),
                         peer.next_seq())
    need(first is not None and first.type == w.CHALLENGE, "no CHALLENGE to the first BIND")
    count = live.env["bind_burst_per_ip"] * 2
    for _ in range(count):
        peer.send(w.bind_packet(sid, 0, peer.next_seq(), first.cookie, token, peer.k_peer))
    answers = []
    while True:
        p = peer.recv(0.5)
        if p is None:
            break
        answers.append(p)
    need(all(p.type == w.REJECT and p.reason == w.BAD_PROOF for p in answers),
         "answers other than REJECT BAD_PROOF: " + ", ".join({p.name() for p in answers}))
    burst = live.env["bind_burst_per_ip"]
    need(burst <= len(answers) < count, f"{len(answers)} of {count} BINDs with the cookie "
         f"answered at once; the source's burst is {burst}")
    live.wait_metric(before, "ferry_drops_total", count - len(answers) - 5,
                     reason="bind_rate_limited")


def slots_per_source(live):
    """§8 slots per source: a BIND for a free slot, or a REBIND moving a slot to a source,
    beyond `max_bindings_per_ip` gets an authenticated OVERLOADED."""
    before = live.relay_metrics()
    limit = live.env["max_bindings_per_ip"]
    source = next_local_v4()
    held = []
    for i in range(limit + 1):
        sid = random_session_id()
        token, secret = live.mint(sid, 0)
        p = RelayPeer(live.relay_v4, sid, 0, token, secret, name=f"slot-{i}", local=source)
        live.peers.append(p)
        answer, _ = p.bind()
        if i < limit:
            need(answer.type == w.BIND_ACK, f"slot {i + 1} of {limit} from one source: "
                 f"{answer.name()}")
            held.append(p)
        else:
            expect_reject(answer, w.OVERLOADED, f"slot {limit + 1} from one source")
            extra = p
    # A slot bound elsewhere cannot move to the full source.
    sid = random_session_id()
    token, secret = live.mint(sid, 0)
    mover = RelayPeer(live.relay_v4, sid, 0, token, secret, name="mover")
    live.peers.append(mover)
    answer, _ = mover.bind()
    need(answer.type == w.BIND_ACK, f"bind elsewhere: {answer.name()}")
    mover.new_socket(local=source)
    answer, _ = mover.rebind()
    expect_reject(answer, w.OVERLOADED, "a REBIND to a source that holds its maximum")
    live.wait_metric(before, "ferry_binds_rejected_total", 2, reason="overloaded")
    # One slot freed: the refused BIND now binds (it was not spent, §7).
    held[0].close()
    deadline = time.monotonic() + 3
    while True:
        answer, _ = extra.bind()
        if answer.type == w.BIND_ACK or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    need(answer.type == w.BIND_ACK, f"after a CLOSE freed a slot: {answer.name()}")
    for p in held[1:] + [extra, mover]:
        p.close()


def flood_one(live, headers):
    """One unauthenticated create from the flood's address."""
    gw = GatewayClient(live.env["gateway"], live.env["ca"], sources=["127.0.1.250"])
    return gw.call("POST", "/v1/sessions", doc={}, extra_headers=headers)


def raw_https(live, request):
    """Sends raw bytes over TLS to the public listener; returns everything read back."""
    import ssl
    context = ssl.create_default_context(cafile=live.env["ca"])
    with socket.create_connection((live.gw.host, live.gw.port), timeout=5) as tcp:
        with context.wrap_socket(tcp, server_hostname=live.gw.host) as tls:
            tls.sendall(request)
            out = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except (OSError, ssl.SSLError):
                    break
                if not chunk:
                    break
                out += chunk
            return out


def gateway_http_layer(live):
    """gateway-api.md *Errors*: the HTTP layer answers a malformed request line 400 and a head
    with more than 64 headers 431, both with an empty body and `Connection: close`."""
    bad = []
    for what, request, status in (
            ("a malformed request line", b"GARBAGE\r\n\r\n", b"400"),
            ("70 headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
                b"X-H%d: v\r\n" % i for i in range(70)) + b"\r\n", b"431"),
            ("a 17 KiB head", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 +
             b"\r\n\r\n", b"431")):
        answer = raw_https(live, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = {l.split(b":", 1)[0].strip().lower(): l.split(b":", 1)[1].strip()
                  for l in lines[1:] if b":" in l}
        if not lines[0].startswith(b"HTTP/1.1 " + status) or body or \
                fields.get(b"connection", b"").lower() != b"close":
            bad.append(f"{what}: {answer[:120]!r}")
    need(not bad, "; ".join(bad))


def gateway_rate_limit(live):
    """gateway-api.md *Abuse controls*: over the per-IP limit, 429 `rate_limited` with
    Retry-After, before authentication."""
    before = metrics(live.env["gateway_admin"])
    import http.client
    import ssl
    context = ssl.create_default_context(cafile=live.env["ca"])
    statuses, conn, answer = [], None, None
    # One keep-alive connection, so that the requests come faster than the bucket refills
    # (20/s) even on a slow machine.
    for _ in range(200):
        if conn is None:
            conn = http.client.HTTPSConnection(live.gw.host, live.gw.port, context=context,
                                               timeout=10, source_address=("127.0.1.250", 0))
        try:
            conn.request("POST", "/v1/sessions", body=b"{}",
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = HttpAnswer(response.status, {k.lower(): v for k, v in
                                                  response.getheaders()}, response.read())
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = None
            continue
        statuses.append(answer.status)
        if answer.status == 429:
            break
    if conn is not None:
        conn.close()
    need(answer is not None and answer.status == 429,
         f"{len(statuses)} requests from one address: {sorted(set(statuses))}, no 429")
    need(set(statuses[:-1]) == {401}, f"before the 429: {sorted(set(statuses[:-1]))}")
    need(len(statuses) > 40, f"429 after {len(statuses) - 1} requests; the burst is 40")
    need(answer.error() == "rate_limited", f"429 body {answer.body!r}")
    # X-Forwarded-For from a peer that is not a trusted proxy is ignored: the audit log names
    # the TCP peer as the client (the bucket may have refilled a token meanwhile, so the
    # status is 401 or 429).
    forwarded = flood_one(live, {"X-Forwarded-For": "198.18.0.77"})
    need(forwarded.status in (401, 429), f"with X-Forwarded-For: {forwarded}")
    time.sleep(0.2)
    with open(live.env["gateway_log"], errors="replace") as f:
        audit = f.read()
    need("client=198.18.0.77" not in audit, "the audit log took X-Forwarded-For from an "
         "untrusted peer as the client")
    retry = answer.headers.get("retry-after", "")
    need(retry.isdigit() and int(retry) >= 1, f"Retry-After {retry!r}")
    after = metrics(live.env["gateway_admin"])
    need(metric(after, "ferry_gateway_rate_limited_total", limiter="ip") >
         metric(before, "ferry_gateway_rate_limited_total", limiter="ip"),
         "ferry_gateway_rate_limited_total{limiter=\"ip\"} did not grow")


# ---------------------------------------------------------------------------------------------
# The end-to-end layer (§9) against a real ferry-peer


def _tunnel_b(live, name):
    """A session whose slot B is a real `ferry-peer tunnel --connect` delivering to a UDP
    socket of this process; slot A is left to the caller. Returns (A's grant, A's static key,
    B's public key, the application socket, the process, its log path)."""
    fp, work = live.env["ferry_peer"], live.env["work"]
    b_key = os.path.join(work, f"{name}-b.key")
    subprocess.run([fp, "keygen", "--out", b_key], check=True, capture_output=True)
    out = subprocess.run([fp, "pubkey", b_key], check=True, capture_output=True, text=True)
    b_public_text = out.stdout.strip().split()[-1]
    b_public = base64.b64decode(b_public_text)
    need(len(b_public) == 32, f"ferry-peer pubkey printed {out.stdout!r}")
    a_static = X25519PrivateKey.generate()
    created = live.gw.create(live.api_key, peer_public_key=b64(raw_public(a_static)),
                             expected_peer=b_public_text)
    need(created.status == 201, f"create: {created}")
    joined = live.gw.join(live.api_key, created.json()["join_code"], b_public_text)
    need(joined.status == 200, f"join: {joined}")
    grant_path = os.path.join(work, f"{name}-b.grant")
    fd = os.open(grant_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(joined.body)
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("127.0.0.1", 0))
    log_path = os.path.join(work, f"{name}-b.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([fp, "tunnel", "--grant", grant_path, "--identity", b_key,
                                 "--connect", "127.0.0.1:%d" % app.getsockname()[1],
                                 "--connect-timeout", "20"], stdout=log, stderr=log)
    return Grant(created.json()), a_static, b_public, app, proc, log_path


def _run_with_tunnel(proc, log_path, app, body):
    try:
        body()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        with open(log_path, "rb") as f:
            print("---- ferry-peer tunnel's output\n" + f.read().decode(errors="replace")[-2000:])
        raise
    finally:
        app.close()


def e2e_with_ferry_peer(live):
    """§9.1–§9.4: this client is slot A (the Noise initiator) and a real `ferry-peer tunnel`
    slot B (`--connect`, delivering to a UDP socket of this process): the handshake, the
    responder's key confirmation (an empty TRANSPORT frame, epoch 0, counter 0), application
    datagrams each way, replayed and forged frames, the rules of §9.1.1 on an established
    channel, epochs (§9.3), and a CLOSE that ends the tunnel."""
    ga, a_static, b_public, app, proc, log_path = _tunnel_b(live, "tunnel")
    _run_with_tunnel(proc, log_path, app,
                     lambda: _e2e_exchange(live, noise, ga, a_static, b_public, app, proc))


def e2e_wrong_identity_connecting(live):
    """The reference peer while connecting (no transport yet): a handshake finished with
    another static key than the one its grant pins ends `ferry-peer tunnel` with an error
    (§9.1.1, *wrong identity*; docs/operations.md, Peers)."""
    ga, _, _, app, proc, log_path = _tunnel_b(live, "impostor")

    def body():
        a = live.peer(ga, name="impostor-A")
        live.peers.append(a)
        ack, _ = a.bind()
        need(ack.type == w.BIND_ACK, f"A's BIND: {ack.name()}")
        deadline = time.monotonic() + 20
        frame = None
        while frame is None and time.monotonic() < deadline:
            impostor = noise.Initiator(X25519PrivateKey.generate(), ga.session_id)
            a.send_data(impostor.message_1())
            p = a.recv(1.0)
            while p is not None and p.type != w.DATA:
                p = a.recv(1.0)
            frame = p and p.body
            need(proc.poll() is None, f"ferry-peer tunnel exited with {proc.returncode}")
        need(frame is not None and frame[0] == noise.HANDSHAKE_2, "no HANDSHAKE-2 within 20 s")
        impostor.read_message_2(frame)
        a.send_data(impostor.message_3()[0])
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise CheckFailed("ferry-peer tunnel still runs 10 s after a handshake with the "
                              "wrong identity while connecting")
        with open(log_path, "rb") as f:
            output = f.read().decode(errors="replace")
        need(rc == 1 and "wrong identity" in output,
             f"ferry-peer tunnel exited with {rc}, output {output[-300:]!r}")
        a.close()
    _run_with_tunnel(proc, log_path, app, body)


def e2e_ferry_peer_initiates(live):
    """§9.1.1 rules 1–3 from the other side: a real `ferry-peer tunnel --listen` is slot A (the
    initiator) and this client slot B (the responder). It answers only the second HANDSHAKE-1
    (the first must be retried with a fresh ephemeral key) and holds back the confirmation
    once (the same HANDSHAKE-3 must come again); then one datagram each way."""
    fp, work = live.env["ferry_peer"], live.env["work"]
    a_key = os.path.join(work, "tunnel-a.key")
    subprocess.run([fp, "keygen", "--out", a_key], check=True, capture_output=True)
    out = subprocess.run([fp, "pubkey", a_key], check=True, capture_output=True, text=True)
    a_public_text = out.stdout.strip().split()[-1]
    a_public = base64.b64decode(a_public_text)
    b_static = X25519PrivateKey.generate()
    b_public_text = b64(raw_public(b_static))
    created = live.gw.create(live.api_key, peer_public_key=a_public_text,
                             expected_peer=b_public_text)
    need(created.status == 201, f"create: {created}")
    joined = live.gw.join(live.api_key, created.json()["join_code"], b_public_text)
    need(joined.status == 200, f"join: {joined}")
    grant_path = os.path.join(work, "tunnel-a.grant")
    fd = os.open(grant_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(created.body)
    gb = Grant(joined.json())
    listen_port = int(subprocess.check_output([sys.executable, os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "client.py"), "free-ports", "1"]).split()[0])
    log_path = os.path.join(work, "tunnel-a.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([fp, "tunnel", "--grant", grant_path, "--identity", a_key,
                                 "--listen", f"127.0.0.1:{listen_port}",
                                 "--connect-timeout", "20"], stdout=log, stderr=log)
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("127.0.0.1", 0))

    def body():
        b = live.peer(gb, name="noise-B")
        live.peers.append(b)
        ack, _ = b.bind()
        need(ack.type == w.BIND_ACK, f"B's BIND: {ack.name()}")

        next_frame = b.next_data_body

        def next_kind(kind, timeout):
            deadline = time.monotonic() + timeout
            while True:
                frame = next_frame(deadline - time.monotonic())
                need(proc.poll() is None, f"ferry-peer tunnel exited with {proc.returncode}")
                if frame is None or frame[0] == kind:
                    return frame, time.monotonic()
        first, t1 = next_kind(noise.HANDSHAKE_1, 20)
        need(first is not None, "no HANDSHAKE-1 from ferry-peer within 20 s")
        need(len(first) == 33, f"HANDSHAKE-1 frame of {len(first)} bytes, §9 says 1 + 32")
        second, t2 = next_kind(noise.HANDSHAKE_1, 10)
        need(second is not None, "the unanswered HANDSHAKE-1 was not retried within 10 s")
        need(second != first, "the retried HANDSHAKE-1 repeats the first (rule 1: a fresh state)")
        need(t2 - t1 >= 0.5, f"HANDSHAKE-1 retried after {t2 - t1:.2f} s (HS_RETRY is 1 s)")
        responder = noise.Responder(b_static, gb.session_id)
        responder.read_message_1(second)
        b.send_data(responder.message_2())
        third, t3 = next_kind(noise.HANDSHAKE_3, 5)
        need(third is not None, "no HANDSHAKE-3 after HANDSHAKE-2")
        remote, transport = responder.read_message_3(third)
        need(remote == a_public, "the initiator's static key is not the one its grant names")
        again, t4 = next_kind(noise.HANDSHAKE_3, 5)
        need(again == third, "HANDSHAKE-3 was not resent unchanged without a confirmation "
             "(rule 3)")
        need(t4 - t3 >= 0.5, f"HANDSHAKE-3 resent after {t4 - t3:.2f} s (HS_RETRY is 1 s)")
        b.send_data(transport.seal(b""))  # the confirmation (rule 6)
        # ferry-peer opens its --listen socket once the channel is up (docs/operations.md,
        # Peers): the application sends until its datagram comes through, as UDP
        # applications do.
        for _ in range(20):
            app.sendto(b"hello from the application", ("127.0.0.1", listen_port))
            frame, _ = next_kind(noise.TRANSPORT, 0.25)
            if frame is not None:
                break
        need(frame is not None, "the application's datagram did not come through")
        _, _, plaintext = transport.open(frame)
        need(plaintext == b"hello from the application", f"B got {plaintext!r}")
        b.send_data(transport.seal(b"hello back"))
        app.settimeout(5)
        got, source = app.recvfrom(2048)
        need(got == b"hello back" and source == ("127.0.0.1", listen_port),
             f"the application got {got!r} from {source}")
        b.close()
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise CheckFailed("ferry-peer tunnel still runs 10 s after B's CLOSE")
        need(rc == 0, f"ferry-peer tunnel exited with {rc} after the other peer closed")

    _run_with_tunnel(proc, log_path, app, body)


def _e2e_handshake_rules(live, noise, a, ga, a_static, app, transport, first_message_1,
                         message_3, confirmed_at, next_frame):
    """§9.1.1 rules 4, 7, 8 and 11 against the responder, on the established channel."""
    def frames_for(seconds):
        out, end = [], time.monotonic() + seconds
        while True:
            frame = next_frame(end - time.monotonic())
            if frame is None:
                return out
            out.append(frame)

    def kinds(frames):
        return [f[0] for f in frames]
    # Rule 4: the message 1 that made the current transport, again: dropped.
    a.send_data(first_message_1)
    got = frames_for(0.7)
    need(noise.HANDSHAKE_2 not in kinds(got), "a replayed HANDSHAKE-1 of the current transport "
         "was answered")
    # Rule 7: the same HANDSHAKE-3 again, HS_ANSWER_INTERVAL after the confirmation: another
    # empty TRANSPORT frame.
    time.sleep(max(0.0, confirmed_at + 1.1 - time.monotonic()))
    a.send_data(message_3)
    got = frames_for(1.0)
    need(got and all(f[0] == noise.TRANSPORT for f in got),
         f"a repeated HANDSHAKE-3 got frames of kinds {kinds(got)}, expected a confirmation")
    need(transport.open(got[0])[2] == b"", "the repeated confirmation is not empty")
    # Rule 4: a fresh HANDSHAKE-1 on the established channel is answered, another one within
    # HS_ANSWER_INTERVAL of that answer is not.
    second = noise.Initiator(a_static, ga.session_id)
    a.send_data(second.message_1())
    got = [next_frame(2.0)]
    need(got[0] is not None and got[0][0] == noise.HANDSHAKE_2,
         "a fresh HANDSHAKE-1 on the established channel got no HANDSHAKE-2")
    answer_2 = got[0]
    answered_at = time.monotonic()
    third = noise.Initiator(a_static, ga.session_id)
    a.send_data(third.message_1())
    got = frames_for(0.5)
    need(noise.HANDSHAKE_2 not in kinds(got), "a HANDSHAKE-1 less than 1 s after the last "
         "HANDSHAKE-2 on an established channel was answered")
    a.send_data(transport.seal(b"the old transport still works"))
    msg, _ = app.recvfrom(2048)
    need(msg == b"the old transport still works", f"during the re-handshake the app got {msg!r}")
    # Rule 11 (the application asks for a new handshake) and rule 8: the responder switches
    # when message 3 authenticates and confirms under the new keys; frames under the replaced
    # transport are still received.
    second.read_message_2(answer_2)
    message_3b, transport_b = second.message_3()
    a.send_data(message_3b)
    got = frames_for(1.0)
    need(got, "no confirmation of the re-handshake")
    epoch, counter, plaintext = transport_b.open(got[0])
    need((len(got[0]), epoch, counter, plaintext) == (29, 0, 0, b""),
         "the re-handshake's confirmation is not an empty frame at epoch 0, counter 0")
    a.send_data(transport_b.seal(b"under the new keys"))
    a.send_data(transport.seal(b"late, under the replaced keys"))
    for want in (b"under the new keys", b"late, under the replaced keys"):
        msg, addr = app.recvfrom(2048)
        need(msg == want, f"after the re-handshake the app got {msg!r}, expected {want!r}")
    app.sendto(b"answer under the new keys", addr)
    frame = next_frame(3.0)
    need(frame is not None, "no answer after the re-handshake")
    need(transport_b.open(frame)[2] == b"answer under the new keys",
         "the responder's answer after the re-handshake")
    # Rules 5 and 12: on an established channel, a handshake finished with another static key
    # than the expected one is discarded without a confirmation; the transport goes on.
    time.sleep(max(0.0, answered_at + 1.1 - time.monotonic()))
    impostor = noise.Initiator(X25519PrivateKey.generate(), ga.session_id)
    a.send_data(impostor.message_1())
    frame = next_frame(2.0)
    need(frame is not None and frame[0] == noise.HANDSHAKE_2,
         "a fresh HANDSHAKE-1 1 s after the last answer got no HANDSHAKE-2")
    impostor.read_message_2(frame)
    a.send_data(impostor.message_3()[0])
    got = frames_for(0.7)
    need(not got, f"a handshake with the wrong static key was answered: kinds {kinds(got)}")
    a.send_data(transport_b.seal(b"after the impostor"))
    msg, _ = app.recvfrom(2048)
    need(msg == b"after the impostor", f"after a wrong-identity handshake the app got {msg!r}")
    # §9.3: epochs. The receiver opens a frame up to 8 epochs ahead by applying REKEY to a copy
    # of its key, keeps the epoch it left as the previous one, and drops frames of skipped,
    # older and too distant epochs.
    k0 = transport_b.send_key
    k1 = noise.rekey(k0)
    k2 = noise.rekey(k1)
    k3 = noise.rekey(k2)
    k12 = k3
    for _ in range(9):
        k12 = noise.rekey(k12)
    for frame in (noise.seal_at(k1, 1, 0, b"epoch 1"), noise.seal_at(k3, 3, 0, b"epoch 3"),
                  noise.seal_at(k1, 1, 1, b"late, epoch 1"),
                  noise.seal_at(k2, 2, 0, b"skipped epoch 2"),
                  noise.seal_at(k12, 12, 0, b"9 epochs ahead"),
                  noise.seal_at(k0, 0, 100, b"epoch 0, two back"),
                  noise.seal_at(k3, 3, 1, b"marker")):
        a.send_data(frame)
    got = []
    while not got or got[-1] != b"marker":
        msg, _ = app.recvfrom(2048)
        got.append(msg)
    need(got == [b"epoch 1", b"epoch 3", b"late, epoch 1", b"marker"],
         f"frames of epochs 1, 3, 1, 2, 12, 0, 3 delivered {got}")


def _e2e_exchange(live, noise, ga, a_static, b_public, app, proc):
    a = live.peer(ga, name="noise-A")
    live.peers.append(a)
    ack, _ = a.bind()
    need(ack.type == w.BIND_ACK, f"A's BIND: {ack.name()}")

    next_frame = a.next_data_body  # passes over B's arrival notice

    # Rule 1 of §9.1.1: a fresh HANDSHAKE-1 at 0, 1, 3, 7 … s until a HANDSHAKE-2 answers.
    deadline = time.monotonic() + 20
    interval, handshake, frame = 1.0, None, None
    while time.monotonic() < deadline:
        handshake = noise.Initiator(a_static, ga.session_id)
        first_message_1 = handshake.message_1()
        a.send_data(first_message_1)
        frame = next_frame(interval)
        while frame is not None and frame[0] != noise.HANDSHAKE_2:
            frame = next_frame(interval)
        if frame is not None:
            break
        need(proc.poll() is None, f"ferry-peer tunnel exited with {proc.returncode}")
        interval = min(interval * 2, 8.0)
    need(frame is not None, "no HANDSHAKE-2 within 20 s")
    need(len(frame) == 97, f"HANDSHAKE-2 frame of {len(frame)} bytes, §9 says 1 + 96")
    remote = handshake.read_message_2(frame)
    need(remote == b_public, "the responder's static key is not the key its grant names")
    message_3, transport = handshake.message_3()
    need(len(message_3) == 65, f"HANDSHAKE-3 of {len(message_3)} bytes")
    a.send_data(message_3)
    ping = b"ping from a client written from protocol.md"
    ping_frame = transport.seal(ping)
    a.send_data(ping_frame)
    app.settimeout(5.0)
    got, tunnel_addr = app.recvfrom(2048)
    need(got == ping, f"the application got {got!r}")
    app.sendto(b"pong from the application", tunnel_addr)
    delivered, confirmation = [], None
    end = time.monotonic() + 5
    while time.monotonic() < end and not delivered:
        frame = next_frame(end - time.monotonic())
        need(frame is not None, "no TRANSPORT frame came back within 5 s")
        need(frame[0] == noise.TRANSPORT, f"frame kind {frame[0]} after the handshake")
        epoch, counter, plaintext = transport.open(frame)
        if plaintext:
            delivered.append(plaintext)
        elif confirmation is None:
            confirmation = (len(frame), epoch, counter)
            confirmed_at = time.monotonic()
    need(delivered == [b"pong from the application"], f"A got {delivered!r}")
    need(confirmation == (29, 0, 0), f"the confirmation was {confirmation} (length, epoch, "
         "counter), §9.1.1 rule 6 says (29, 0, 0) before any data")
    # §9.2: a replayed frame is dropped by the replay window; the next new one is delivered.
    a.send_data(ping_frame)
    forged = bytearray(transport.seal(b"forged"))
    forged[-1] ^= 1
    a.send_data(bytes(forged))
    a.send_data(transport.seal(b"second"))
    got, _ = app.recvfrom(2048)
    need(got == b"second", f"after a replayed and a forged frame the application got {got!r}")
    # §9.4: 1427 bytes is the largest datagram the tunnel carries; a longer one is dropped.
    largest = os.urandom(noise.MAX_PLAINTEXT)
    a.send_data(transport.seal(largest))
    got, _ = app.recvfrom(2048)
    need(got == largest, f"the application got {len(got)} bytes of a 1427-byte datagram")
    app.sendto(os.urandom(noise.MAX_PLAINTEXT + 1), tunnel_addr)
    app.sendto(largest, tunnel_addr)
    frame = next_frame(3.0)
    need(frame is not None and len(frame) == w.MAX_DATA_BODY,
         f"after a 1428-byte datagram the first frame is {frame and len(frame)} bytes")
    need(transport.open(frame)[2] == largest, "the 1427-byte datagram back is not the one sent")
    _e2e_handshake_rules(live, noise, a, ga, a_static, app, transport, first_message_1,
                         message_3, confirmed_at, next_frame)
    # A CLOSE ends the session for both peers (§3.8), and so the tunnel.
    a.close()
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise CheckFailed("ferry-peer tunnel still runs 10 s after A's CLOSE")
    need(rc == 0, f"ferry-peer tunnel exited with {rc} after the other peer closed")


ALL = [
    ("gateway: create and join a session, tokens verified against protocol.md §4", gateway_create_join),
    ("client.py create, then client.py bind of its grant", cli_create_and_bind),
    ("gateway: documented error answers (401, 415, 400, 403, 404, 405)", gateway_errors),
    ("gateway: renew slot A (fresh token id and slot secret)", gateway_renew),
    ("gateway: relay heartbeats, the admin lists, a key revocation", gateway_relays_and_admin),
    ("relay: A binds over IPv4 (CHALLENGE, BIND with cookie, BIND-ACK MAC)", relay_bind_a),
    ("relay: B binds over IPv6, A gets the peer-present notice", relay_bind_b_v6),
    ("relay: DATA both ways forwarded unchanged (up to 1456-byte bodies)", relay_data),
    ("relay: KEEPALIVE echoed to both peers", relay_keepalive),
    ("relay: BIND retransmission re-acknowledged, a lower number REPLAYED", relay_retransmission),
    ("relay: REBIND from a new port (NAT rebinding), DATA after it, old port dropped", relay_rebind),
    ("relay: REBIND refusals (REPLAYED, BAD_PROOF, SESSION_FULL)", relay_rebind_refusals),
    ("relay: BIND refusals by slot state (SESSION_FULL, REPLAYED)", relay_bind_refusals),
    ("relay: renewal BINDs with fresh tokens, answered under the fresh K_relay", relay_renewal),
    ("relay: CLOSE with a bad MAC, a stale number or a reason dropped", relay_close_refusals),
    ("relay: CLOSE from another address ends the session, the other peer told", relay_close),
    ("relay: malformed datagrams dropped unanswered, counted by rule", malformed_headers),
    ("relay: address cookies (zero, made-up, another address's, another slot's)", cookies),
    ("relay: BIND with a bad proof: REJECT BAD_PROOF, token not spent", bad_proof),
    ("relay: token refusals of §4.2 with their REJECT reasons", token_refusals),
    ("relay: probe token answered with a BIND-ACK that binds nothing", probe_token),
    ("relay: DATA/KEEPALIVE from unbound sources dropped, REBIND UNKNOWN_SESSION", unbound_traffic),
    ("relay: a peer of one session cannot send DATA, KEEPALIVE, CLOSE or REBIND into another", cross_session),
    ("relay: a slot's byte budget: 2944 bytes, whole datagrams charged, then rate_limited", byte_budget),
    ("relay: BINDs over the source's bind rate dropped (bind_rate_limited)", bind_rate),
    ("relay: slots per source: BIND and REBIND beyond the maximum get OVERLOADED", slots_per_source),
    ("gateway: the HTTP layer's 400 and 431 (empty body, Connection: close)", gateway_http_layer),
    ("gateway: over the per-IP limit, 429 rate_limited with Retry-After", gateway_rate_limit),
    ("relay: idle slot reaped with CLOSE IDLE, recovery with a fresh token", idle_and_recovery),
    ("relay: slots reaped with CLOSE EXPIRED at exp + skew", expiry),
    ("end to end: Noise XX with a real ferry-peer tunnel: handshake, data both ways, replay, §9.1.1 rules 4, 7, 8, 11, §9.3 epochs", e2e_with_ferry_peer),
    ("gateway: an expired join code 404, a renewal past the session's maximum age 410", gateway_expiry),
    ("end to end: ferry-peer gives up connecting on a handshake with the wrong identity", e2e_wrong_identity_connecting),
    ("end to end: a real ferry-peer tunnel initiates; its retries of message 1 and 3 (§9.1.1 rules 1-3)", e2e_ferry_peer_initiates),
    ("relay: restarted, the peers bind again (an old token too), DATA flows", relay_restart),
    ("logs: no key, token, slot secret, join code or payload; the relay's security events", logs_hold_no_secrets),
    ("ferry-relay check-config: every problem at once, named by field", check_config_refusals),
    ("relay: every datagram a peer received came from the relay's address", no_foreign_datagrams),
]
