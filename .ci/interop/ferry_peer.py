"""A peer of the relay layer (docs/protocol.md §3, §5, §6, §8), written from the docs alone.

`RelayPeer` owns one UDP socket (one source address) and a slot of a session. It makes the
requests a peer makes (BIND with the cookie round trip, renewal, REBIND, KEEPALIVE, DATA,
CLOSE) and checks every answer the way §3 tells a peer to: the source is the relay address it
sends to, the header and body rules hold, the session id, slot and sequence number are those
of the request in flight, and MACs verify under its `K_relay`. Anything that fails those
checks is not silently dropped here but raised as `ProtocolError`: this client exists to find
where the relay and the docs disagree.
"""

import os
import socket
import struct
import time

import ferry_wire as w


class ProtocolError(Exception):
    """The relay did something docs/protocol.md says it does not do."""


def now_us():
    return time.time_ns() // 1000


def parse_address(text):
    """`ip:port` or `[ipv6]:port` as (family, (host, port))."""
    host, port = text.rsplit(":", 1)
    if host.startswith("["):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


_next_local = [2]


def next_local_v4():
    """A loopback address of its own (127.0.0.2, 127.0.0.3, …): the relay's per-source limits
    (§8) count each as another source, so one check's binds never charge another's."""
    n = _next_local[0]
    _next_local[0] += 1
    return f"127.0.{n // 250}.{n % 250 + 2}"


class RelayPeer:
    """One slot's bind client on one source address (a UDP socket of its own)."""

    def __init__(self, relay, session_id, slot, token, slot_secret, *, name="peer", local=None):
        self.family, self.relay = parse_address(relay) if isinstance(relay, str) else relay
        self.name = name
        self.session_id = session_id
        self.slot = slot
        self.token = token
        self.slot_secret = slot_secret
        self.k_peer, self.k_relay = w.slot_keys(slot_secret)
        self.seq = now_us()  # §3.1: SHOULD start from the Unix time in microseconds
        self.last_acked = None  # the number of the last acknowledged request
        self.cookie = bytes(16)
        self.expires_at = None
        self.idle_timeout = None
        self.sock = None
        self.local = local or ("::1" if self.family == socket.AF_INET6 else next_local_v4())
        self.ignored = []  # (source, bytes, why) of datagrams a peer ignores
        self.notices = []  # unsolicited packets seen while waiting for something else
        self.new_socket()

    # -- sockets ---------------------------------------------------------------------------
    def new_socket(self, local=None):
        """A fresh source port (on another address if given), as a NAT rebinding gives."""
        if self.sock is not None:
            self.sock.close()
        self.local = local or self.local
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.sock.bind((self.local, 0))
        return self.sock.getsockname()[:2]

    def address(self):
        return self.sock.getsockname()[:2]

    def close_socket(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, datagram):
        self.sock.sendto(datagram, self.relay)

    def recv(self, timeout):
        """The next well-formed packet from the relay's address, or None at the deadline.

        §1: a peer SHOULD ignore datagrams from any other source; they are recorded in
        `ignored` (the checks assert there are none). Malformed ones are recorded too.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, source = self.sock.recvfrom(65535)
            except socket.timeout:
                return None
            if source[:2] != self.relay:
                self.ignored.append((source, data, "not from the relay's address"))
                continue
            try:
                return w.Packet(data)
            except w.Malformed as e:
                self.ignored.append((source, data, f"malformed: {e}"))

    def next_seq(self):
        self.seq += 1
        return self.seq

    # -- answer checks (§1 headers of relay answers, §3.2–§3.4) ------------------------------
    def _check_answer(self, p, seq):
        if p.session_id != self.session_id:
            raise ProtocolError(f"{p.name()} carries session {p.session_id:#x}, the request "
                                f"had {self.session_id:#x}")
        if p.seq != seq:
            raise ProtocolError(f"{p.name()} carries sequence number {p.seq}, the request "
                                f"in flight has {seq}")
        if p.type in (w.BIND_ACK, w.REJECT) and p.slot != self.slot:
            raise ProtocolError(f"{p.name()} for slot {p.slot}, the request was for {self.slot}")
        if p.type == w.BIND_ACK and not w.mac_ok(self.k_relay, p.signed_part(), p.mac):
            raise ProtocolError("BIND-ACK whose MAC does not verify under K_relay")
        if p.type == w.REJECT:
            if (p.reason in w.AUTHENTICATED_REASONS) != (p.authenticated == 1):
                raise ProtocolError(f"REJECT {w.REJECT_NAMES[p.reason]} with authenticated="
                                    f"{p.authenticated}, §3.4 says "
                                    f"{int(p.reason in w.AUTHENTICATED_REASONS)}")
            if p.authenticated and not w.mac_ok(self.k_relay, p.signed_part(), p.mac):
                raise ProtocolError(f"authenticated REJECT {w.REJECT_NAMES[p.reason]} whose "
                                    "MAC does not verify under K_relay")

    def request(self, build, seq, timeout=5.0):
        """Sends build(seq, cookie) and returns the answer to that number (CHALLENGE, BIND-ACK
        or REJECT), resending the same bytes after 1 s, 2 s, … (§8 bind retry); None at the
        deadline. Other packets that arrive meanwhile go to `notices`."""
        datagram = build(seq, self.cookie)
        deadline = time.monotonic() + timeout
        interval = 1.0
        while time.monotonic() < deadline:
            self.send(datagram)
            wait_until = min(deadline, time.monotonic() + interval)
            while True:
                p = self.recv(wait_until - time.monotonic())
                if p is None:
                    break
                if p.type in (w.CHALLENGE, w.BIND_ACK, w.REJECT) and p.seq == seq:
                    self._check_answer(p, seq)
                    return p
                self.notices.append(p)
            interval = min(interval * 2, 8.0)
        return None

    def _bind_like(self, build, seq, what, timeout):
        """The cookie round trip of §5: a CHALLENGE makes the peer repeat its request with the
        cookie and a new number; returns (final answer, challenges seen)."""
        challenges = []
        for _ in range(3):
            p = self.request(build, seq, timeout)
            if p is None:
                raise ProtocolError(f"no answer to {what} within {timeout} s")
            if p.type != w.CHALLENGE:
                return p, challenges
            if p.cookie == bytes(16):
                raise ProtocolError("CHALLENGE with an all-zero cookie (§5: never valid)")
            challenges.append(p)
            self.cookie = p.cookie
            seq = self.next_seq()
        raise ProtocolError(f"{what}: three CHALLENGEs in a row, the cookie is never accepted")

    def _accept_ack(self, p, token_exp=None):
        if p.type == w.BIND_ACK:
            self.last_acked = p.seq
            self.expires_at = p.expires_at
            self.idle_timeout = p.idle_timeout
            if token_exp is not None and p.expires_at != token_exp:
                raise ProtocolError(f"BIND-ACK expires at {p.expires_at}, the token's exp is "
                                    f"{token_exp}")

    # -- requests -----------------------------------------------------------------------------
    def bind(self, *, token=None, slot_secret=None, timeout=5.0, seq=None):
        """A first BIND or a renewal (a fresh token and slot secret). Returns (answer,
        challenges). On a BIND-ACK of a renewal the peer switches to the fresh keys (§3.1)."""
        token = token or self.token
        k_peer, k_relay = (w.slot_keys(slot_secret) if slot_secret else
                           (self.k_peer, self.k_relay))
        old = (self.k_peer, self.k_relay)
        # The answer to this BIND comes under the fresh K_relay.
        self.k_relay = k_relay
        seq = seq if seq is not None else self.next_seq()

        def build(n, cookie):
            return w.bind_packet(self.session_id, self.slot, n, cookie, token, k_peer)
        try:
            p, challenges = self._bind_like(build, seq, "BIND", timeout)
        except Exception:
            self.k_peer, self.k_relay = old
            raise
        if p.type == w.BIND_ACK:
            self.k_peer = k_peer
            self.token = token
            if slot_secret:
                self.slot_secret = slot_secret
            self._accept_ack(p, w.Token(token).exp)
        else:
            self.k_peer, self.k_relay = old
        return p, challenges

    def rebind(self, timeout=5.0):
        def build(n, cookie):
            return w.rebind_packet(self.session_id, self.slot, n, cookie, self.k_peer)
        p, challenges = self._bind_like(build, self.next_seq(), "REBIND", timeout)
        token_exp = w.Token(self.token).exp if len(self.token) == w.TOKEN_LEN else None
        self._accept_ack(p, token_exp)
        return p, challenges

    def keepalive(self, timeout=2.0):
        """Sends a KEEPALIVE; returns its echo, or None (§3.6)."""
        self.send(w.keepalive_packet(self.session_id))
        deadline = time.monotonic() + timeout
        while True:
            p = self.recv(deadline - time.monotonic())
            if p is None:
                return None
            if p.type == w.KEEPALIVE:
                if p.raw != w.keepalive_packet(self.session_id):
                    raise ProtocolError(f"KEEPALIVE echo {p.raw.hex()} is not the 16-byte "
                                        "header with our session id")
                return p
            self.notices.append(p)

    def send_data(self, body):
        self.send(w.data_packet(self.session_id, body))

    def close(self, reason=w.PEER_CLOSED, seq=None):
        """Sends a CLOSE (§3.8); returns its bytes (nothing answers it)."""
        datagram = w.close_packet(self.session_id, self.slot,
                                  seq if seq is not None else self.next_seq(), self.k_peer,
                                  reason)
        self.send(datagram)
        return datagram

    def expect(self, ptype, timeout=2.0):
        """The next packet of a type (checking it is for us); others go to `notices`."""
        for i, p in enumerate(self.notices):
            if p.type == ptype:
                return self.notices.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            p = self.recv(deadline - time.monotonic())
            if p is None or p.type == ptype:
                return p
            self.notices.append(p)

    def check_relay_close(self, p, reason):
        """§3.8: a peer accepts a relay CLOSE whose slot is its own and whose MAC verifies."""
        if p.session_id != self.session_id:
            raise ProtocolError(f"CLOSE for session {p.session_id:#x}")
        if p.slot != self.slot:
            raise ProtocolError(f"relay CLOSE for slot {p.slot}, ours is {self.slot}")
        if not w.mac_ok(self.k_relay, p.signed_part(), p.mac):
            raise ProtocolError("relay CLOSE whose MAC does not verify under K_relay")
        if p.reason != reason:
            raise ProtocolError(f"CLOSE {w.CLOSE_NAMES[p.reason]}, expected "
                                f"{w.CLOSE_NAMES[reason]}")
        if p.seq != self.last_acked:
            raise ProtocolError(f"relay CLOSE carries {p.seq}, our last accepted request was "
                                f"{self.last_acked}")

    def check_notice(self, p):
        """§3.3: the peer-present notice is a BIND-ACK with our slot, peer present 1, our last
        acknowledged number and a MAC under our K_relay."""
        if p.session_id != self.session_id or p.slot != self.slot:
            raise ProtocolError("peer-present notice for another session or slot")
        if not w.mac_ok(self.k_relay, p.signed_part(), p.mac):
            raise ProtocolError("peer-present notice whose MAC does not verify")
        if p.peer_present != 1:
            raise ProtocolError("peer-present notice with peer present 0")
        if p.seq != self.last_acked:
            raise ProtocolError(f"peer-present notice carries {p.seq}, our last acknowledged "
                                f"request was {self.last_acked}")

    def next_data_body(self, timeout):
        """The body of the next DATA from the relay within `timeout` seconds, or None: what the
        other peer sent (§3.5). A peer-present notice on the way (a BIND-ACK, §3.3) is checked
        and passed over; any other packet is passed over too."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.recv(deadline - time.monotonic())
            if p is None or p.type == w.DATA:
                return p and p.body
            if p.type == w.BIND_ACK:
                self.check_notice(p)


def random_session_id():
    while True:
        sid = struct.unpack(">Q", os.urandom(8))[0]
        if sid:
            return sid
