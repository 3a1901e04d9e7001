#!/usr/bin/env python3
"""File transfer (docs/protocol.md §9.4) between this client and a real ferry-peer, written
from the docs alone: this client's QUIC (aioquic) inside its own Noise channel (ferry_noise)
on its own relay slot (ferry_peer), against `ferry-peer recv` (this client sends) and
`ferry-peer send` (this client receives), through the relay's IPv4 and IPv6 addresses.

Usage: transfer.py ENV.json (the environment .ci/interop/run writes; `run transfer` does it all).
Needs aioquic==1.7.2 (exactly: ferry_transfer.py uses some of its internals) besides
`cryptography`, e.g.:
    /usr/bin/python3 -m venv --system-site-packages /tmp/quic-venv
    /tmp/quic-venv/bin/pip install aioquic==1.7.2
    FERRY_PYTHON=/tmp/quic-venv/bin/python FERRY_BIN_DIR=... .ci/interop/run transfer
Prints one ok/FAIL line per check; exits 1 if any fails. FERRY_INTEROP_ONLY=WORD runs the checks
whose name contains WORD; FERRY_TRANSFER_DEBUG=1 prints every datagram this client receives.

Each check runs one or more transfers, each in a fresh session made through the gateway: this
client binds its slot first, then starts ferry-peer (send or recv) on the other slot, runs the
§9.1 handshake (either role, by slot), then QUIC (`ferry_transfer.Link`) over the channel.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

import ferry_transfer as ft  # noqa: E402
from checks import CheckFailed, Live, b64, need, raw_public  # noqa: E402
from client import Runner, wait_ready  # noqa: E402
from ferry_gateway import Grant  # noqa: E402

FILE_SIZE = 300 * 1024
# Every QUIC close this client waited for from ferry-peer: (case, arrived before ferry-peer's
# relay CLOSE?). The last check reports the ones that did not.
CLOSES = []
LOST_DETAIL = []


class FerryPeer:
    """One ferry-peer process (send or recv) on one side of a fresh session, this client on
    the other slot, each through the relay address of its choice."""

    count = 0

    def __init__(self, live, name, *, python_slot, python_v6=False, ferry_v6=False):
        self.live = live
        self.name = name
        env = live.env
        self.bin = env["ferry_peer"]
        FerryPeer.count += 1
        self.dir = os.path.join(env["work"], f"ft-{FerryPeer.count:02d}-{name}")
        os.makedirs(self.dir, mode=0o700)
        self.key = os.path.join(self.dir, "ferry.key")
        subprocess.run([self.bin, "keygen", "--out", self.key], check=True, capture_output=True)
        out = subprocess.run([self.bin, "pubkey", self.key], check=True, capture_output=True,
                             text=True)
        ferry_text = out.stdout.strip().split()[-1]
        ferry_public = base64.b64decode(ferry_text)
        static = X25519PrivateKey.generate()
        python_text = b64(raw_public(static))
        creator, joiner = (python_text, ferry_text) if python_slot == 0 else \
            (ferry_text, python_text)
        created = live.gw.create(live.api_key, peer_public_key=creator, expected_peer=joiner)
        need(created.status == 201, f"create: {created}")
        joined = live.gw.join(live.api_key, created.json()["join_code"], joiner)
        need(joined.status == 200, f"join: {joined}")
        mine, theirs = (created, joined) if python_slot == 0 else (joined, created)
        self.grant = os.path.join(self.dir, "ferry.grant")
        with open(self.grant, "wb") as f:
            f.write(theirs.body)
        self.ferry_relay = live.relay_v6 if ferry_v6 else live.relay_v4
        self.channel = ft.Channel(Grant(mine.json()), live.relay_v6 if python_v6 else
                                  live.relay_v4, static, ferry_public, name)
        self.proc = None
        self.log = os.path.join(self.dir, "ferry.log")
        self.out = os.path.join(self.dir, "ferry.out")

    def start(self, *args):
        """Binds this client's slot first (so that ferry-peer's first handshake message gets
        through), then starts ferry-peer and runs the §9.1 handshake."""
        self.channel.bind()
        with open(self.out, "wb") as out, open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.bin, *args, "--grant", self.grant, "--identity", self.key,
                 "--relay", self.ferry_relay, "--connect-timeout", "15"],
                stdout=out, stderr=log, stdin=subprocess.DEVNULL)
        self.channel.handshake(10)

    def wait(self, link, timeout=8):
        """ferry-peer's exit status, stdout and stderr; this client keeps answering QUIC
        meanwhile."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if link is not None:
                link.drain(0.1)
            else:
                time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise CheckFailed(f"ferry-peer still ran {timeout} s after the transfer ended; "
                              f"stderr: {self.stderr()[-300:]!r}")
        return self.proc.returncode, self.stdout(), self.stderr()

    def stdout(self):
        with open(self.out, "rb") as f:
            return f.read().decode(errors="replace")

    def stderr(self):
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def finish(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self.channel.close()
        except OSError:
            pass


def lines(text):
    """`name value` lines as a dict."""
    out = {}
    for line in text.splitlines():
        # One space after the name: the value may itself be or hold spaces (a file named " ").
        key, space, value = line.partition(" ")
        if space:
            out[key] = value
    return out


def check_sizes(link, peer_limit, what):
    """§9.4: the other side announced its own limit as max_udp_payload_size and, once it had
    this client's, sent nothing larger than the smaller of the two limits; before that only a
    client's Initials, of at least 1200 bytes and at most 1407. Returns the largest datagram
    each way."""
    mine = link.channel.limit
    announced = link.conn.peer_max_udp_payload_size
    need(announced == peer_limit, f"{what}: ferry-peer announced max_udp_payload_size "
         f"{announced}, its limit is {peer_limit}")
    bound = min(mine, peer_limit)
    initials = [len(d) for d in link.received if ft.is_long_header_initial(d)]
    over = [len(d) for d in link.received if len(d) > bound and not ft.is_long_header_initial(d)]
    need(not over, f"{what}: ferry-peer sent QUIC datagrams of {sorted(set(over))} bytes, over "
         f"min({mine}, {peer_limit}) = {bound}")
    if link.is_client:
        need(all(n <= bound for n in initials), f"{what}: ferry-peer's Initial datagrams are "
             f"{sorted(set(initials))} bytes")
    # (ferry-peer's own Initials as a client: check_client_initial)
    own = [n for n in link.sent if n > bound]
    need(not own, f"{what}: this client sent datagrams of {sorted(set(own))} bytes")
    return max(len(d) for d in link.received if not ft.is_long_header_initial(d)), max(link.sent)


# ---------------------------------------------------------------------------------------------
# This client sends, ferry-peer recv receives


class SendResult:
    pass


def python_sends(live, name, stream, *, python_slot=0, python_v6=False, ferry_v6=False,
                 existing=(), timeout=10, driver=None):
    """Runs one transfer from this client to `ferry-peer recv`: `stream` is the whole of
    stream 0 (then FIN), or `driver(link, result)` sends it (and may close the connection
    itself, setting result.aborted). `existing`: (name, bytes) of files already in --dir.
    Returns what happened."""
    fp = FerryPeer(live, name, python_slot=python_slot, python_v6=python_v6, ferry_v6=ferry_v6)
    r = SendResult()
    r.dir = os.path.join(fp.dir, "in")
    os.makedirs(r.dir)
    for file_name, data in existing:
        with open(os.path.join(r.dir, file_name), "wb") as f:
            f.write(data)
    r.aborted = False
    r.fp = fp
    try:
        fp.start("recv", "--dir", r.dir)
        link = ft.Link(fp.channel, is_client=True)
        if driver is None:
            link.send_stream(stream, True)
        else:
            driver(link, r)
        r.close_lost = False
        try:
            if not r.aborted:
                link.pump(lambda: link.stream_ended or link.peer_close() is not None, timeout,
                          "a verdict or a close from ferry-peer recv")
                if not link.stream_ended:
                    CLOSES.append((name, True))
                elif link.peer_close() is None:
                    # The verdict is in: a receiver may close once it sees it acknowledged
                    # (ferry-peer recv does), else this client closes below.
                    try:
                        link.pump(lambda: link.peer_close() is not None, 2,
                                  "ferry-peer recv's close after the verdict")
                        CLOSES.append((name, True))
                    except ft.SessionClosed:
                        raise
                    except CheckFailed:
                        pass
        except ft.SessionClosed:
            # ferry-peer closed its relay session, and its QUIC close never came: counted
            # (the last check), and the checks read its stderr instead.
            r.close_lost = True
            CLOSES.append((name, False))
            LOST_DETAIL.append(f"{name}: " + "; ".join(until_close(fp.channel.trace)))
        r.verdict = bytes(link.stream) if link.stream_ended else None
        r.close = link.peer_close()
        r.app_close = link.peer_application_close()
        if r.close is None and not r.aborted:
            # The sender has the verdict: done (§9.4 code 0).
            link.close(ft.DONE, "done")
        r.rc, r.stdout, r.stderr = fp.wait(link)
        r.link = link
        r.peer_limit = ft.LIMIT_V6 if ferry_v6 else ft.LIMIT_V4
        r.files = sorted(os.listdir(r.dir))
        return r
    except BaseException:
        print(f"---- ferry-peer recv ({name}) stderr:\n{fp.stderr()[-1500:]}", flush=True)
        raise
    finally:
        fp.finish()


def until_close(trace):
    """The last few datagrams of a Channel's trace up to the relay CLOSE."""
    end = next((i for i, t in enumerate(trace) if "got CLOSE" in t), len(trace) - 1)
    return trace[max(0, end - 7):end + 1]


def good_stream(name, content):
    return ft.header(name, len(content)) + content + ft.sha256(content)


def check_stored(r, name, content):
    need(r.verdict == b"\x00", f"verdict {r.verdict!r}, close {r.close}; ferry-peer: rc "
         f"{r.rc}, {r.stderr[-300:]!r}")
    need(r.close is None or r.app_close == (ft.DONE, r.app_close[1]),
         f"ferry-peer recv closed with {r.close} after the verdict")
    need(r.rc == 0, f"ferry-peer recv exited with {r.rc}: {r.stderr[-300:]!r}")
    path = os.path.join(r.dir, name)
    need(r.files == [name], f"the directory holds {r.files}, expected [{name!r}]")
    with open(path, "rb") as f:
        need(f.read() == content, "the stored file's content differs from what was sent")
    out = lines(r.stdout)
    need(out.get("name") == name and out.get("bytes") == str(len(content)) and
         out.get("sha256") == hashlib.sha256(content).hexdigest() and
         out.get("path") == path, f"ferry-peer recv printed {r.stdout[:400]!r}")


def send_v4(live):
    """This client (slot A, IPv4) sends a 300 KiB file; ferry-peer recv (slot B, IPv4) stores
    it and answers verdict 0; datagram sizes as §9.4; TLS as §9.4."""
    content = ft.random_content(FILE_SIZE)
    r = python_sends(live, "send-v4", good_stream("report.bin", content))
    check_stored(r, "report.bin", content)
    check_sizes(r.link, r.peer_limit, "IPv4/IPv4")
    need(all(d[1:5] == b"\x00\x00\x00\x01" for d in r.link.received
             if ft.is_long_header_initial(d)), "a long header of another QUIC version than 1")
    cert = r.link.conn.tls._peer_certificate
    need(cert.issuer == cert.subject, f"ferry-peer recv's certificate is issued by "
         f"{cert.issuer.rfc4514_string()} to {cert.subject.rfc4514_string()}, not self-signed")
    suite = r.link.conn.tls.key_schedule.cipher_suite
    need(suite == ft.aioquic_tls.CipherSuite.AES_128_GCM_SHA256, f"cipher suite {suite!r}")
    need(r.link.conn.tls.alpn_negotiated is None,
         f"ALPN {r.link.conn.tls.alpn_negotiated!r} negotiated")


def send_families(live):
    """The same through the relay's IPv6 address, both ends, and across families (this
    client on IPv6 with ferry-peer on IPv4 and the reverse): each side announces its own
    limit (1427 over IPv4, 1407 over IPv6) and neither sends more than the smaller. The name
    is UTF-8 with spaces; this client is slot B this time (the receiver initiates the Noise
    handshake); ferry-peer recv's certificate is a new one each time."""
    name = "r\u00e9sum\u00e9 2026.txt"
    seen = set()
    for python_v6, ferry_v6 in ((True, True), (True, False), (False, True)):
        what = f"this client over IPv{6 if python_v6 else 4}, ferry-peer over " \
            f"IPv{6 if ferry_v6 else 4}"
        content = ft.random_content(FILE_SIZE // 2)
        r = python_sends(live, f"send-{int(python_v6)}{int(ferry_v6)}",
                         good_stream(name, content), python_slot=1, python_v6=python_v6,
                         ferry_v6=ferry_v6)
        try:
            check_stored(r, name, content)
            fingerprint = r.link.conn.tls._peer_certificate.fingerprint(ft.hashes.SHA256())
            need(fingerprint not in seen, "ferry-peer recv presented a certificate it had "
                 "presented in an earlier transfer (§9.4: one made for the transfer)")
            seen.add(fingerprint)
            check_sizes(r.link, r.peer_limit, what)
            need(f"messages of up to {r.peer_limit} bytes over IPv{6 if ferry_v6 else 4}"
                 in r.stderr, f"ferry-peer's connected line: {r.stderr[-300:]!r}")
        except CheckFailed as e:
            raise CheckFailed(f"{what}: {e}")


def check_refused(r, code, what, hint):
    """ferry-peer recv closed with application error `code`; when its close was lost (counted
    by the last check), its stderr names the refusal (`hint`) instead."""
    if r.close_lost:
        need(hint in r.stderr, f"{what}: no QUIC close arrived, and ferry-peer recv's stderr "
             f"does not say {hint!r}: {r.stderr.splitlines()[-1]!r}")
        need(r.rc == 1, f"{what}: ferry-peer recv exited with {r.rc}, expected 1")
        return
    need(r.app_close is not None and r.app_close[0] == code,
         f"{what}: ferry-peer recv closed with {r.close} (verdict {r.verdict!r}), expected "
         f"application error {code}")
    need(r.rc == 1, f"{what}: ferry-peer recv exited with {r.rc}, expected 1; stderr "
         f"{r.stderr[-200:]!r}")


REFUSED_NAMES = [
    ("empty", b""), (".", b"."), ("..", b".."), ("/", b"/"), ("a/b", b"a/b"),
    ("/etc-x", b"/etc-x"), ("NUL", b"a\0b"), ("control 0x01", b"a\x01b"),
    ("newline", b"a\nb"), ("tab", b"a\tb"), ("escape 0x1b", b"\x1b[1m"), ("DEL", b"a\x7fb"),
    ("C1 U+0085", "a\u0085b".encode()), ("C1 U+009B", "\u009b31m".encode()),
    ("Cf U+202E", "invoice_\u202efdp.exe".encode()), ("Cf U+200B", "a\u200bb".encode()),
    ("Cf U+2066", "a\u2066b".encode()), ("Cf U+FEFF", "\ufeffa".encode()),
    ("Cf U+00AD", "a\u00adb".encode()),
]


def send_refused_names(live):
    """§9.4: a name that is empty, `.` or `..`, or contains `/`, a control character
    (Unicode's Cc: U+0000-U+001F, U+007F-U+009F) or a format character (Cf: bidi controls,
    zero-width characters, U+FEFF, U+00AD, ...) is refused: ferry-peer recv closes with
    application error 1 (refused), with a reason text, stores nothing and exits 1."""
    content = ft.random_content(1000)
    bad = []
    for what, name in REFUSED_NAMES:
        try:
            r = python_sends(live, f"name-{what.split()[0]}",
                             ft.header(name, len(content)) + content + ft.sha256(content))
            check_refused(r, ft.REFUSED, f"name {what} ({name[:20]!r})", "refusing the file name")
            need(r.close_lost or r.app_close[1], f"name {what}: the close has no reason text")
            need(r.files == [], f"name {what}: the directory holds {r.files}")
        except CheckFailed as e:
            bad.append(str(e))
    need(not bad, "; ".join(bad))


def send_accepted_names(live):
    """The names §9.4 does not refuse are taken: 255 bytes (the limit), a dot-file, `...`,
    `a..b`, a backslash, a space, non-ASCII UTF-8."""
    content = ft.random_content(1000)
    bad = []
    for name in ("x" * 251 + ".bin", ".hidden", "...", "a..b", "a\\b", " ",
                 "\u65e5\u672c.txt"):
        try:
            r = python_sends(live, "ok-name", good_stream(name, content))
            check_stored(r, name, content)
        except CheckFailed as e:
            bad.append(f"name {name[:20]!r}: {e}")
    need(not bad, "; ".join(bad))


def send_existing(live):
    """§9.4: an existing file is never replaced: refused (application error 1), the old
    content stays, nothing else is written."""
    content = ft.random_content(5000)
    r = python_sends(live, "existing", good_stream("old.txt", content),
                     existing=[("old.txt", b"the old content\n")])
    check_refused(r, ft.REFUSED, "an existing name", "already exists")
    reason = r.app_close[1] if r.app_close else ""
    need(r.dir not in reason, f"the reason {reason!r} names ferry-peer recv's directory "
         "(§9.4: never a directory of the peer that sends it)")
    need(r.files == ["old.txt"], f"the directory holds {r.files}")
    with open(os.path.join(r.dir, "old.txt"), "rb") as f:
        need(f.read() == b"the old content\n", "the existing file was changed")


def with_close(run, tries=4):
    """Runs a transfer up to `tries` times until ferry-peer's QUIC close arrives (it may be lost,
    see closes_arrive), to check its code; the last result."""
    for _ in range(tries):
        r = run()
        if r.close is not None:
            return r
    raise CheckFailed(f"ferry-peer's QUIC close never arrived in {tries} tries, so its code "
                      "could not be checked")


def send_wrong_hash(live):
    """§9.4: a hash that does not match gets verdict 1, and nothing is kept; then the
    receiver closes with 0 (done: it saw the verdict acknowledged)."""
    content = ft.random_content(FILE_SIZE // 3)
    r = with_close(lambda: python_sends(live, "wrong-hash", ft.header("bad.bin", len(content)) +
                                        content + bytes(32)))
    need(r.verdict == b"\x01", f"verdict {r.verdict!r}, close {r.close}")
    need(r.files == [], f"the directory holds {r.files} after verdict 1")
    need(r.rc == 1, f"ferry-peer recv exited with {r.rc} after verdict 1; stderr "
         f"{r.stderr[-200:]!r}")
    # §9.4 code 0: "done (the sender has the verdict, or the receiver saw it acknowledged)".
    need(r.app_close is not None and r.app_close[0] == ft.DONE,
         f"after verdict 1 ferry-peer recv closed with {r.close}, expected application code 0 "
         "(done)")


def send_violations(live):
    """§9.4 application error 2 (protocol violation): bad magic, bad version, a name length
    over 255, a name that is not UTF-8, a stream that ends before the announced content, one
    that ends inside the hash, one with bytes after the (matching) hash, one that ends inside
    the header. Nothing is stored."""
    content = ft.random_content(20000)
    h = ft.header("v.bin", len(content))
    cases = [
        ("bad magic", ft.header("v.bin", len(content), magic=b"ferry-fx") + content +
         ft.sha256(content)),
        ("version 2", ft.header("v.bin", len(content), version=2) + content +
         ft.sha256(content)),
        ("a name of 256 bytes", ft.header(b"n" * 256, len(content)) + content +
         ft.sha256(content)),
        ("a name that is not UTF-8", ft.header(b"\xff\xfe.bin", len(content)) + content +
         ft.sha256(content)),
        ("content shorter than announced", h + content[:-100] + ft.sha256(content[:-100])),
        ("end inside the hash", h + content + ft.sha256(content)[:10]),
        ("bytes after the hash", h + content + ft.sha256(content) + b"extra"),
        ("end inside the header", h[:12]),
    ]
    bad = []
    for i, (what, stream) in enumerate(cases):
        try:
            r = python_sends(live, f"violation-{i}", stream)
            check_refused(r, ft.PROTOCOL_VIOLATION, what, "protocol violation")
            need(r.files == [], f"{what}: the directory holds {r.files}")
        except CheckFailed as e:
            bad.append(str(e))
    need(not bad, "; ".join(bad))


def send_staged(live):
    """§9.4: the receiver stores the content under the name only after the hash matched: with
    the whole content delivered but the hash held back, no file of that name is in --dir;
    then the hash and the end of the stream, and it is."""
    content = ft.random_content(FILE_SIZE // 3)
    name = "staged.bin"

    def driver(link, r):
        link.send_stream(ft.header(name, len(content)) + content, False)
        stream = link.conn._streams[0]
        link.pump(lambda: stream.sender.buffer_is_empty and not link.conn._loss.bytes_in_flight,
                  5, "the content acknowledged")
        r.during = sorted(os.listdir(r.dir))
        link.send_stream(ft.sha256(content), True)
    r = python_sends(live, "staged", None, driver=driver)
    need(name not in r.during, f"with the hash still to come, --dir holds {r.during}")
    need(r.verdict == b"\x00" and r.rc == 0, f"verdict {r.verdict!r}, exit status {r.rc}")
    with open(os.path.join(r.dir, name), "rb") as f:
        need(f.read() == content, "the stored content differs")
    r.during_names = r.during


def send_leftover_partial(live):
    """operations.md: ferry-peer recv stages a file under a hidden name of its own
    (`.ferry-partial-` and 16 random hex digits), never an existing file: files there with the
    name of a staging file (of an older ferry-peer, or one a killed recv left) block nothing
    and are left as they were."""
    content = ft.random_content(5000)
    name = "other.bin"
    others = [f".{name}.ferry-partial", ".ferry-partial-0123456789abcdef"]
    r = python_sends(live, "leftover", good_stream(name, content),
                     existing=[(other, b"not ferry-peer's\n") for other in others])
    need(r.verdict == b"\x00" and r.rc == 0, f"verdict {r.verdict!r}, close {r.close}; "
         f"ferry-peer: rc {r.rc}, {r.stderr[-300:]!r}")
    for other in others:
        with open(os.path.join(r.dir, other), "rb") as f:
            need(f.read() == b"not ferry-peer's\n", f"the file {other!r} was changed")
    need(r.files == sorted(others + [name]), f"--dir holds {r.files}")
    with open(os.path.join(r.dir, name), "rb") as f:
        need(f.read() == content, "the stored file's content differs from what was sent")


def send_too_large(live):
    """§9.4 code 1 (refused), not enough space: a size larger than the free space of --dir's
    file system is refused at the header, before anything is written."""
    def driver(link, r):
        link.send_stream(ft.header("huge.bin", 1 << 62) + ft.random_content(1000), False)
    r = python_sends(live, "too-large", None, driver=driver)
    check_refused(r, ft.REFUSED, "a size of 2^62 bytes", "not enough space")
    need(r.close_lost or "not enough space" in r.app_close[1],
         f"the reason is {r.app_close and r.app_close[1]!r}")
    need(r.files == [], f"the directory holds {r.files}")


def send_abort(live):
    """§9.4 code 3 (aborted) from the sender halfway through: ferry-peer recv exits 1 and
    keeps nothing in --dir. The reason, with terminal escapes and a line break in it, reaches
    ferry-peer's stderr escaped (§9.4: printed with control and format characters escaped)."""
    content = ft.random_content(FILE_SIZE)
    reason = "cannot read\x1b[2J\r\nferry-peer: saved \u202efdp.exe"

    def driver(link, r):
        link.send_stream(ft.header("half.bin", len(content)) + content[:len(content) // 2],
                         False)
        link.drain(0.3)
        link.close(ft.ABORTED, reason)
        r.aborted = True
    r = python_sends(live, "abort", None, driver=driver)
    need(r.rc == 1, f"ferry-peer recv exited with {r.rc} after the sender aborted")
    need(r.files == [], f"--dir holds {r.files} after an aborted transfer")
    need(not any(c in r.stderr for c in "\x1b\r\u202e"), f"ferry-peer recv printed the "
         f"reason unescaped: {r.stderr[-300:]!r}")
    need("cannot read\\u{1b}[2J\\r\\nferry-peer: saved \\u{202e}fdp.exe" in r.stderr,
         f"ferry-peer recv's stderr does not quote the reason escaped: {r.stderr[-300:]!r}")


# ---------------------------------------------------------------------------------------------
# ferry-peer send sends, this client receives


class RecvResult:
    pass


def python_receives(live, name, verdict, *, python_slot=1, python_v6=False, ferry_v6=False,
                    file_name="data.bin", size=FILE_SIZE, refuse=None, certificate=None):
    """Runs one transfer from `ferry-peer send` to this client (the QUIC server), which answers
    `verdict` (or, with `refuse`, closes with that application error code instead), presenting
    `certificate` ((certificate, private key), default a fresh self-signed P-256 one)."""
    fp = FerryPeer(live, name, python_slot=python_slot, python_v6=python_v6, ferry_v6=ferry_v6)
    r = RecvResult()
    r.content = ft.random_content(size)
    r.path = os.path.join(fp.dir, file_name)
    with open(r.path, "wb") as f:
        f.write(r.content)
    hellos = len(ft.CLIENT_HELLOS)
    try:
        fp.start("send", r.path)
        link = ft.Link(fp.channel, is_client=False, certificate=certificate)
        r.close_lost = False
        try:
            link.pump(lambda: link.stream_ended or link.peer_close() is not None, 15,
                      "stream 0 with its end from ferry-peer send")
            if not link.stream_ended:
                CLOSES.append((name, True))
        except ft.SessionClosed:
            r.close_lost = True
            CLOSES.append((name, False))
            LOST_DETAIL.append(f"{name}: " + "; ".join(until_close(fp.channel.trace)))
        r.stream = bytes(link.stream)
        r.hello = ft.CLIENT_HELLOS[hellos] if len(ft.CLIENT_HELLOS) > hellos else None
        r.early_close = link.peer_close()
        if r.close_lost:
            pass
        elif refuse is not None:
            link.close(refuse, "refused by the interop client")
        elif r.early_close is None:
            link.send_stream(bytes([verdict]), True)
            # ferry-peer, which now has the verdict, closes (0, done); else this client does
            # once the verdict is acknowledged.
            try:
                link.pump(lambda: link.peer_close() is not None, 5, "ferry-peer's close")
                CLOSES.append((name, True))
            except ft.SessionClosed:
                CLOSES.append((name, False))
                LOST_DETAIL.append(f"{name}: " + "; ".join(until_close(fp.channel.trace)))
        r.close = link.peer_close()
        if r.close is None and refuse is None:
            link.close(ft.DONE, "done")
        r.rc, r.stdout, r.stderr = fp.wait(link)
        r.link = link
        r.peer_limit = ft.LIMIT_V6 if ferry_v6 else ft.LIMIT_V4
        return r
    except BaseException:
        print(f"---- ferry-peer send ({name}) stderr:\n{fp.stderr()[-1500:]}", flush=True)
        raise
    finally:
        fp.finish()


def check_client_initial(r, what):
    """§9.4: a client sends, before it has the server's max_udp_payload_size, only its
    Initials, of at least 1200 bytes and at most 1407 (the IPv6 limit): the first datagram
    from ferry-peer send; and ferry-peer's client sends no datagram over 1407 at all."""
    first = r.link.received[0]
    need(ft.is_long_header_initial(first), f"{what}: the first datagram is not an Initial")
    need(ft.QUIC_MIN <= len(first) <= ft.LIMIT_V6, f"{what}: ferry-peer send's first Initial "
         f"is {len(first)} bytes, not 1200 to 1407 (its limit is {r.peer_limit}, this "
         f"client's {r.link.channel.limit})")
    largest = max(len(d) for d in r.link.received)
    need(largest <= ft.LIMIT_V6, f"{what}: ferry-peer send sent a datagram of {largest} bytes")


def recv_initial(live):
    """ferry-peer send's first Initial (sent before it knows the server's
    max_udp_payload_size) is 1200 to 1407 bytes, over IPv4 and across families (§9.4)."""
    bad = []
    for python_v6, ferry_v6 in ((False, False), (True, False)):
        r = python_receives(live, f"initial-{int(python_v6)}{int(ferry_v6)}", 0,
                            python_v6=python_v6, ferry_v6=ferry_v6, size=2000)
        try:
            check_client_initial(r, f"this client over IPv{6 if python_v6 else 4}, "
                                 f"ferry-peer over IPv{6 if ferry_v6 else 4}")
        except CheckFailed as e:
            bad.append(str(e))
    need(not bad, "; ".join(bad))


def check_framing(r, file_name):
    """§9.4: "ferry-ft", version 1, name length, the base name, size, content, SHA-256, FIN."""
    s = r.stream
    parsed = ft.parse_header(s)
    need(parsed is not None, f"stream 0 holds {len(s)} bytes, no complete header")
    magic, version, name, size, n = parsed
    need(magic == ft.MAGIC and version == 1, f"magic {magic!r}, version {version}")
    need(name == file_name.encode(), f"name {name!r}, sent as {file_name!r}")
    need(size == len(r.content), f"size {size}, the file has {len(r.content)}")
    need(len(s) == n + size + 32, f"stream 0 holds {len(s)} bytes, header {n} + content {size} "
         "+ hash 32 announced")
    need(s[n:n + size] == r.content, "the content differs from the file")
    need(s[n + size:] == ft.sha256(r.content), "the hash is not the content's SHA-256")
    h = r.hello
    need(h is not None, "no ClientHello recorded")
    need(h.server_name == ft.SERVER_NAME, f"SNI {h.server_name!r}")
    need(not h.alpn_protocols, f"ALPN offered: {h.alpn_protocols!r}")
    need(h.cipher_suites == [ft.aioquic_tls.CipherSuite.AES_128_GCM_SHA256],
         f"cipher suites offered: {[hex(c) for c in h.cipher_suites]}, expected only "
         "TLS_AES_128_GCM_SHA256 (0x1301)")
    need(h.supported_versions == [0x0304], f"TLS versions offered: {h.supported_versions}")


def recv_v4(live):
    """ferry-peer send (slot A, IPv4) sends a 300 KiB file to this client (slot B, IPv4, the
    QUIC server): the framing of stream 0, the ClientHello (SNI ferry-transfer.invalid, no
    ALPN, TLS_AES_128_GCM_SHA256), datagram sizes (its Initial 1200 to 1407, then at most
    1407: its client sends nothing larger);
    verdict 0 makes it exit 0 with its `name value` lines."""
    r = python_receives(live, "recv-v4", 0, file_name="big file.bin")
    check_framing(r, "big file.bin")
    need(r.early_close is None, f"ferry-peer send closed before the verdict: {r.early_close}")
    largest, _ = check_sizes(r.link, r.peer_limit, "IPv4/IPv4")
    need(largest == min(r.peer_limit, ft.LIMIT_V6), f"ferry-peer's largest datagram was "
         f"{largest} bytes, not 1407 (its client's most; no full-size packets in a 300 KiB "
         "transfer?)")
    need(r.rc == 0, f"ferry-peer send exited with {r.rc} after verdict 0: {r.stderr[-300:]!r}")
    out = lines(r.stdout)
    need(out.get("name") == "big file.bin" and out.get("bytes") == str(len(r.content)) and
         out.get("sha256") == hashlib.sha256(r.content).hexdigest(),
         f"ferry-peer send printed {r.stdout[:300]!r}")
    need(r.close is None or (r.close.frame_type is None and r.close.error_code == ft.DONE),
         f"ferry-peer send, which had the verdict, closed with {r.close}, expected "
         "application code 0 (done)")


def recv_families(live):
    """ferry-peer send across families: on IPv4 it announces 1427 and, once it has this
    client's 1407 (IPv6), sends no datagram over 1407; on IPv6 it announces and keeps to
    1407 whatever this client's limit. Here ferry-peer is slot B (the Noise responder)."""
    for python_v6, ferry_v6 in ((True, False), (False, True), (True, True)):
        what = f"this client over IPv{6 if python_v6 else 4}, ferry-peer over " \
            f"IPv{6 if ferry_v6 else 4}"
        r = python_receives(live, f"recv-{int(python_v6)}{int(ferry_v6)}", 0, python_slot=0,
                            python_v6=python_v6, ferry_v6=ferry_v6)
        try:
            check_framing(r, "data.bin")
            largest, _ = check_sizes(r.link, r.peer_limit, what)
            need(largest == min(r.peer_limit, r.link.channel.limit),
                 f"ferry-peer's largest datagram (its Initials aside) was {largest} bytes")
            need(r.rc == 0, f"exit status {r.rc}: {r.stderr[-300:]!r}")
        except CheckFailed as e:
            raise CheckFailed(f"{what}: {e}")


def certificate(key, *, name="ferry-transfer.invalid", days=1, signer=None):
    """A certificate for `key`'s public key, self-signed unless `signer` signs it."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    signer = signer or key
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days - 2))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey)
                  else hashes.SHA256()))


def recv_any_certificate(live):
    """§9.4: the client accepts any certificate (Ed25519, RSA-2048, an expired one for another
    name), while still checking the TLS handshake signature: a server that signs with another
    key than its certificate's is refused (a TLS alert, so a QUIC CRYPTO_ERROR 0x100 + alert),
    and ferry-peer send exits 1 without sending the file."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    bad = []
    ed, rs, p256 = (ed25519.Ed25519PrivateKey.generate(),
                    rsa.generate_private_key(public_exponent=65537, key_size=2048),
                    ec.generate_private_key(ec.SECP256R1()))
    for what, cert in (("Ed25519", (certificate(ed), ed)), ("RSA-2048", (certificate(rs), rs)),
                       ("expired, for another name", (certificate(p256, name="example.org",
                                                                  days=-1), p256))):
        try:
            r = python_receives(live, "cert", 0, size=3000, certificate=cert)
            check_framing(r, "data.bin")
            need(r.rc == 0, f"exit status {r.rc}: {r.stderr.splitlines()[-1]!r}")
        except CheckFailed as e:
            bad.append(f"{what}: {e}")
    other = ec.generate_private_key(ec.SECP256R1())
    try:
        r = python_receives(live, "cert-forged", 0, size=3000,
                            certificate=(certificate(p256), other))
        t = r.early_close
        need(r.close_lost or (t is not None and t.frame_type is not None and
                              0x100 <= t.error_code <= 0x1ff),
             f"ferry-peer send closed with {t}, expected a CRYPTO_ERROR")
        need(not r.stream, f"ferry-peer send sent {len(r.stream)} bytes of the transfer")
        need(r.rc == 1, f"exit status {r.rc}")
    except CheckFailed as e:
        bad.append(f"a handshake signature by another key: {e}")
    need(not bad, "; ".join(bad))


def recv_verdict_1(live):
    """Verdict 1 (the hash does not match, nothing kept): ferry-peer send closes with 0 (done:
    it has the verdict) and exits 1 with a one-line error."""
    r = with_close(lambda: python_receives(live, "recv-verdict-1", 1, size=50000))
    check_framing(r, "data.bin")
    need(r.rc == 1, f"ferry-peer send exited with {r.rc} after verdict 1")
    errors = [line for line in r.stderr.splitlines() if line.startswith("ferry-peer: error:")]
    need(len(errors) == 1, f"ferry-peer send's stderr has {len(errors)} error lines")
    # §9.4 code 0: "done (the sender has the verdict, …)".
    need(r.close.frame_type is None and r.close.error_code == ft.DONE,
         f"after verdict 1 ferry-peer send closed with {r.close}, expected application code 0 "
         "(done)")


def recv_refused(live):
    """A receiver that will not take the file closes with application error 1 and a reason:
    ferry-peer send exits 1 with a one-line error naming the refusal."""
    r = python_receives(live, "recv-refused", 0, size=50000, refuse=ft.REFUSED)
    need(r.rc == 1, f"ferry-peer send exited with {r.rc} after a refusal")
    errors = [line for line in r.stderr.splitlines() if line.startswith("ferry-peer: error:")]
    need(len(errors) == 1, f"ferry-peer send's stderr has {len(errors)} error lines")
    need("refused by the interop client" in r.stderr or "refused" in r.stderr.lower(),
         f"ferry-peer send's stderr does not mention the refusal: {r.stderr[-300:]!r}")


def closes_arrive(live):
    """§9.4: the side that ends the transfer closes the QUIC connection with an application
    error code and a reason, so the other side learns why: ferry-peer's CONNECTION_CLOSE must
    reach this client before ferry-peer's relay CLOSE (§3.8) ends the session (the relay drops
    DATA of a session it no longer holds). Counted over every close the checks above waited
    for."""
    need(CLOSES, "no close was waited for")
    lost = [name for name, arrived in CLOSES if not arrived]
    if lost:
        example = LOST_DETAIL[0] if LOST_DETAIL else "no detail recorded"
        need(False, f"{len(lost)} of {len(CLOSES)} QUIC closes of ferry-peer never arrived, its "
             f"relay CLOSE did: {', '.join(lost)}; e.g. {example}")


ALL = [
    ("transfer: this client sends 300 KiB to ferry-peer recv over IPv4, verdict 0, file stored",
     send_v4),
    ("transfer: this client sends over IPv6 and across families; max_udp_payload_size and "
     "datagram sizes", send_families),
    ("transfer: ferry-peer recv refuses unsafe names (empty, ., .., /, Cc, Cf) with error 1",
     send_refused_names),
    ("transfer: ferry-peer recv takes names §9.4 does not refuse (255 bytes, dot-files, "
     "UTF-8)", send_accepted_names),
    ("transfer: ferry-peer recv never replaces an existing file (error 1)", send_existing),
    ("transfer: a wrong hash gets verdict 1, nothing kept, a close with 0 (done)",
     send_wrong_hash),
    ("transfer: bad magic/version, long or non-UTF-8 names, short and long streams: error 2",
     send_violations),
    ("transfer: ferry-peer recv stores the file only once the hash matched",
     send_staged),
    ("transfer: ferry-peer recv takes a file when staging-like files are in --dir, and leaves "
     "them alone", send_leftover_partial),
    ("transfer: ferry-peer recv refuses a file larger than its free space (error 1)",
     send_too_large),
    ("transfer: the sender aborts halfway (error 3): ferry-peer recv keeps nothing, prints the "
     "reason escaped", send_abort),
    ("transfer: ferry-peer send to this client over IPv4: framing, TLS, sizes, verdict 0",
     recv_v4),
    ("transfer: ferry-peer send across families keeps to the smaller max_udp_payload_size",
     recv_families),
    ("transfer: ferry-peer send accepts any certificate, but checks the handshake signature",
     recv_any_certificate),
    ("transfer: ferry-peer send's first Initial is 1200 to 1407 bytes, and nothing over 1407",
     recv_initial),
    ("transfer: ferry-peer send after verdict 1 closes with 0 (done), exits 1", recv_verdict_1),
    ("transfer: ferry-peer send after a refusal (application error 1) exits 1", recv_refused),
    ("transfer: ferry-peer's QUIC close reaches this client before its relay CLOSE",
     closes_arrive),
]


def main(env_path):
    with open(env_path) as f:
        env = json.load(f)
    r = Runner()
    live = Live(env)
    if not r.run("relay /readyz and gateway /healthz answer 200 (waits up to 30 s)",
                 wait_ready, live):
        return 1
    only = os.environ.get("FERRY_INTEROP_ONLY", "")
    start = time.monotonic()
    for name, fn in ALL:
        if only in name:
            r.run(name, fn, live)
    failed = r.failed()
    print(f"{len(r.results) - len(failed)} of {len(r.results)} checks passed "
          f"({time.monotonic() - start:.1f} s)", flush=True)
    for name in failed:
        print(f"failed: {name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
