"""A client of ferry-gateway's public API, written from docs/gateway-api.md alone."""

import base64
import http.client
import json
import re
import ssl

from ferry_wire import TOKEN_LEN, Token


class HttpAnswer:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def error(self):
        """The `error` code of an error answer (gateway-api.md, Errors), else None."""
        try:
            doc = self.json()
        except ValueError:
            return None
        return doc.get("error") if isinstance(doc, dict) else None

    def __repr__(self):
        return f"HTTP {self.status} {self.body[:200]!r}"


def http_request(host, port, method, path, *, body=None, headers=None, tls_ca=None, timeout=10,
                 announce_only=None, source=None):
    """One request on a fresh connection. `announce_only=N` sends only the head, announcing
    a body of N bytes, and reads the answer (a server that refuses the length answers at once
    and closes, so sending the body could fail)."""
    if tls_ca is not None:
        context = ssl.create_default_context(cafile=tls_ca)
        conn = http.client.HTTPSConnection(host, port, context=context, timeout=timeout,
                                           source_address=source)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=source)
    try:
        if announce_only is not None:
            conn.putrequest(method, path)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(announce_only))
            conn.endheaders()
        else:
            conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return HttpAnswer(answer.status, {k.lower(): v for k, v in answer.getheaders()},
                          answer.read())
    finally:
        conn.close()


def b64_exact(text, length):
    """Standard padded base64 of exactly `length` bytes, as the API writes keys and tokens."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != length or base64.b64encode(raw).decode() != text:
        raise ValueError(f"not the standard base64 of {length} bytes: {text!r}")
    return raw


class Grant:
    """A create, join or renew answer (gateway-api.md, *Creating and joining a session*)."""

    FIELDS_COMMON = {"session_id", "slot", "token", "slot_secret", "kid", "not_before",
                     "expires_at", "relay", "expected_peer_public_key"}

    def __init__(self, doc):
        self.doc = doc
        if not re.fullmatch(r"[0-9a-f]{16}", doc["session_id"]):
            raise ValueError(f"session_id is not 16 lower-case hex digits: {doc['session_id']!r}")
        self.session_id = int(doc["session_id"], 16)
        if doc["slot"] not in ("A", "B"):
            raise ValueError(f"slot {doc['slot']!r}")
        self.slot = 0 if doc["slot"] == "A" else 1
        self.token = Token(b64_exact(doc["token"], TOKEN_LEN))
        self.slot_secret = b64_exact(doc["slot_secret"], 32)
        self.kid = doc["kid"]
        self.not_before = doc["not_before"]
        self.expires_at = doc["expires_at"]
        relay = doc["relay"]
        self.relay_id = relay["id"]
        self.relay_address = relay["address"]
        self.relay_public_key = b64_exact(relay["public_key"], 32)
        self.expected_peer = doc["expected_peer_public_key"]

    def consistency_problems(self, gateway_public, lifetime):
        """What in the answer disagrees with its own token (§4) or the docs; [] if nothing."""
        t = self.token
        problems = []
        want = [("token version", t.version, 1), ("token slot", t.slot, self.slot),
                ("token flags", t.flags, 0), ("token reserved", t.reserved, 0),
                ("token kid", t.kid, self.kid), ("token session id", t.session_id,
                                                 self.session_id),
                ("token relay id", t.relay_id, self.relay_id), ("token nbf", t.nbf,
                                                                self.not_before),
                ("token exp", t.exp, self.expires_at),
                ("token lifetime exp - nbf", t.exp - t.nbf, lifetime),
                ("token rate (sessions.rate_bytes_per_sec, default 0)", t.rate, 0)]
        for what, got, expected in want:
            if got != expected:
                problems.append(f"{what} is {got}, expected {expected}")
        if not t.signature_ok(gateway_public):
            problems.append("the token's Ed25519 signature does not verify under the gateway key")
        return problems


# Every secret string an answer carried (tokens, slot secrets, join codes): the last check
# looks for them in the logs, which must never hold one (gateway-api.md, Audit log).
SECRETS_SEEN = set()


def remember_secrets(answer):
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return
    if isinstance(doc, dict):
        for field in ("token", "slot_secret", "join_code"):
            if isinstance(doc.get(field), str):
                SECRETS_SEEN.add(doc[field])


class GatewayClient:
    def __init__(self, base_url, ca_file, sources=None):
        """`sources`: local addresses to send from, in turn (the gateway's per-IP limit,
        gateway-api.md *Abuse controls*, then sees each as another client)."""
        self.sources = list(sources or [])
        self.turn = 0
        m = re.fullmatch(r"https://([^/:\[\]]+|\[[0-9a-fA-F:]+\]):(\d+)", base_url)
        if not m:
            raise ValueError(f"gateway URL {base_url!r}")
        self.host = m.group(1).strip("[]")
        self.port = int(m.group(2))
        self.ca = ca_file

    def call(self, method, path, *, api_key=None, doc=None, raw_body=None,
             content_type="application/json", extra_headers=None, announce_only=None):
        headers = {}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        body = raw_body
        if doc is not None:
            body = json.dumps(doc).encode()
        if (body is not None or announce_only is not None) and content_type is not None:
            headers["Content-Type"] = content_type
        headers.update(extra_headers or {})
        source = None
        if self.sources:
            source = (self.sources[self.turn % len(self.sources)], 0)
            self.turn += 1
        answer = http_request(self.host, self.port, method, path, body=body, headers=headers,
                              tls_ca=self.ca, announce_only=announce_only, source=source)
        remember_secrets(answer)
        return answer

    def create(self, api_key, peer_public_key=None, expected_peer=None, realm=None):
        doc = {}
        if realm is not None:
            doc["realm"] = realm
        if peer_public_key is not None:
            doc["peer_public_key"] = peer_public_key
        if expected_peer is not None:
            doc["expected_peer_public_key"] = expected_peer
        return self.call("POST", "/v1/sessions", api_key=api_key, doc=doc)

    def join(self, api_key, join_code, peer_public_key=None):
        doc = {"join_code": join_code}
        if peer_public_key is not None:
            doc["peer_public_key"] = peer_public_key
        return self.call("POST", "/v1/sessions/join", api_key=api_key, doc=doc)

    def renew(self, api_key, session_id, slot):
        return self.call("POST", "/v1/sessions/renew", api_key=api_key,
                         doc={"session_id": f"{session_id:016x}", "slot": "AB"[slot]})


def read_public_key_file(path, kind):
    """The key of a `ferry-public-v1 <kind> <base64>` line (gateway-api.md, public keys)."""
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "ferry-public-v1" and parts[1] == kind:
                return b64_exact(parts[2], 32)
    raise ValueError(f"{path}: no `ferry-public-v1 {kind}` line")


def metrics(address):
    """A Prometheus scrape as {(name, frozenset(labels)): value}."""
    host, port = address.rsplit(":", 1)
    answer = http_request(host, int(port), "GET", "/metrics")
    if answer.status != 200:
        raise RuntimeError(f"GET /metrics on {address}: {answer}")
    out = {}
    for line in answer.body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?", line)
        if not m:
            continue
        labels = frozenset(re.findall(r'([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


def metric(scrape, name, **labels):
    return scrape.get((name, frozenset(labels.items())), 0.0)
