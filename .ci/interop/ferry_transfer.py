"""File transfer over QUIC inside the end-to-end channel (docs/protocol.md §9.4), written from the
docs alone. QUIC is aioquic's (pinned, see .ci/interop/transfer.py); everything around it is
ours: the relay slot (ferry_peer.RelayPeer), the Noise channel (ferry_noise), and the two
things §9.4 asks of QUIC that aioquic does not do by itself:

- each side announces its own limit (1427 bytes through an IPv4 relay address, 1407 through an
  IPv6 one) as its `max_udp_payload_size` transport parameter, and
- once it has the other's, sends no datagram larger than the smaller of the two; before that
  only the client's Initials go out, of at least 1200 bytes and at most 1407 (this client's
  are 1200).

`Channel` is one bound slot with the §9 channel on it; `Link` pumps one QUIC connection through
a Channel, one QUIC UDP datagram per transport plaintext, and records every datagram's size.
"""

import datetime
import hashlib
import os
import socket
import ssl
import struct
import time

from aioquic import tls as aioquic_tls
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (QuicProtocolVersion, pull_quic_header,
                                 pull_quic_transport_parameters,
                                 push_quic_transport_parameters)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import ferry_noise as noise
import ferry_wire as w
from checks import CheckFailed, need
from ferry_peer import RelayPeer

# §9.2 / §9.4: a transport plaintext (so a QUIC UDP datagram) is at most 1427 bytes, 1407 from
# a peer that reaches its relay over IPv6.
LIMIT_V4 = w.MAX_DATA_BODY - noise.TRANSPORT_OVERHEAD  # 1427
LIMIT_V6 = LIMIT_V4 - 20  # 1407
QUIC_MIN = 1200

# §9.4 stream 0 framing and application error codes.
MAGIC = b"ferry-ft"
VERSION = 1
DONE, REFUSED, PROTOCOL_VIOLATION, ABORTED = 0, 1, 2, 3
SERVER_NAME = "ferry-transfer.invalid"
DEBUG = os.environ.get("FERRY_TRANSFER_DEBUG") == "1"
FAKE_ADDR = ("192.0.2.1", 4433)  # QUIC needs a peer address; nothing is ever sent to it


def header(name, size, *, magic=MAGIC, version=VERSION):
    """`"ferry-ft"`, version (1), name length (u16), name, size (u64)."""
    if isinstance(name, str):
        name = name.encode()
    return magic + bytes([version]) + struct.pack(">H", len(name)) + name + struct.pack(">Q", size)


def parse_header(buf):
    """(magic, version, name bytes, size, header length) of a complete header in `buf`, or
    None if more bytes are needed."""
    if len(buf) < 11:
        return None
    n = struct.unpack(">H", buf[9:11])[0]
    if len(buf) < 11 + n + 8:
        return None
    size = struct.unpack(">Q", buf[11 + n:19 + n])[0]
    return buf[:8], buf[8], bytes(buf[11:11 + n]), size, 19 + n


# ---------------------------------------------------------------------------------------------
# The end-to-end channel (§9.1, §9.2) on one bound slot


class Channel:
    """A slot bound on the relay, and the Noise channel to the other peer on it. Slot A is the
    Noise initiator, slot B the responder (§9.1), whichever end of the transfer it is."""

    def __init__(self, grant, relay, static, peer_public, name):
        self.peer = RelayPeer(relay, grant.session_id, grant.slot, grant.token.raw,
                              grant.slot_secret, name=name)
        self.slot = grant.slot
        self.session_id = grant.session_id
        self.static = static
        self.peer_public = peer_public
        self.limit = LIMIT_V6 if self.peer.family == socket.AF_INET6 else LIMIT_V4
        self.transport = None
        self.message_3 = None  # the HANDSHAKE-3 that made the transport (either role)
        self.last_sent = time.monotonic()
        self.last_confirmation = 0.0
        self.received = []  # plaintexts that arrived with the handshake's last frames
        self.relay_closed = None  # when a relay CLOSE came (the other peer closed the session)
        self.peer_present = False
        self.t0 = time.monotonic()
        self.trace = []  # what this slot sent and received, for failure messages

    # -- relay layer ------------------------------------------------------------------------
    def bind(self):
        ack, _ = self.peer.bind()
        need(ack.type == w.BIND_ACK, f"{self.peer.name}'s BIND: {ack.name()}")
        self.peer_present = ack.peer_present == 1
        return ack

    def _send_body(self, body):
        self.peer.send_data(body)
        self.last_sent = time.monotonic()
        self.trace.append(f"{self.last_sent - self.t0:.3f} sent DATA {len(body)} kind {body[0]}")

    def tick(self):
        """§3.6, §8: a peer that has sent nothing for a while sends a KEEPALIVE (the run's
        relay has a 5 s idle timeout, so KEEPALIVE_INTERVAL is under 2 s)."""
        if time.monotonic() - self.last_sent > 1.0:
            self.peer.send(w.keepalive_packet(self.session_id))
            self.last_sent = time.monotonic()

    def _next_body(self, timeout):
        """The next DATA body, or None at the deadline; relay packets on the way are handled."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.peer.recv(max(0.0, deadline - time.monotonic()))
            if p is None:
                return None
            event = f"{time.monotonic() - self.t0:.3f} got {w.TYPE_NAMES[p.type]} " \
                f"{len(p.body)}" + (f" kind {p.body[0]}" if p.type == w.DATA else "")
            self.trace.append(event)
            if DEBUG:
                print(f"  {self.peer.name}: {event}", flush=True)
            if p.type == w.DATA:
                return p.body
            if p.type == w.BIND_ACK:
                self.peer.check_notice(p)
                self.peer_present = True
            elif p.type == w.CLOSE:
                self.peer.check_relay_close(p, w.PEER_CLOSED)
                self.relay_closed = time.monotonic()
            if time.monotonic() >= deadline:
                return None

    # -- handshake (§9.1, §9.1.1) -----------------------------------------------------------
    def handshake(self, timeout):
        deadline = time.monotonic() + timeout
        if self.slot == 0:
            self._initiate(deadline)
        else:
            self._respond(deadline)

    def _initiate(self, deadline):
        # The relay drops DATA while the session is half bound (§3.5): message 1 goes out once
        # the peer-present notice (§3.3) says the other peer is there.
        while not self.peer_present and time.monotonic() < deadline:
            self.tick()
            self._next_body(min(0.2, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            state = noise.Initiator(self.static, self.session_id)
            self._send_body(state.message_1())
            retry = time.monotonic() + 1.0  # HS_RETRY
            while time.monotonic() < min(retry, deadline):
                self.tick()
                body = self._next_body(min(retry, deadline) - time.monotonic())
                if body is None or body[0] != noise.HANDSHAKE_2:
                    continue
                try:
                    remote = state.read_message_2(body)
                except Exception:  # noqa: BLE001 - an answer to an older message 1
                    continue
                need(remote == self.peer_public, "the responder's static key is not the one "
                     "its grant names")
                self.message_3, self.transport = state.message_3()
                self._send_body(self.message_3)
                self._await_confirmation(deadline)
                return
        raise CheckFailed("no HANDSHAKE-2 from the other peer in time")

    def _await_confirmation(self, deadline):
        """Rule 3: the first authenticated TRANSPORT frame confirms; HANDSHAKE-3 is resent
        unchanged after 1, 3, 7, 15 s without one."""
        resend, interval = time.monotonic() + 1.0, 1.0
        while time.monotonic() < deadline:
            body = self._next_body(min(resend, deadline) - time.monotonic())
            if body is None:
                if time.monotonic() >= resend:
                    self._send_body(self.message_3)
                    interval *= 2
                    resend = time.monotonic() + interval
                continue
            if body[0] == noise.TRANSPORT:
                plaintext = self._open(body)
                if plaintext is not None:
                    if plaintext:
                        self.received.append(plaintext)
                    return
        raise CheckFailed("the responder never confirmed the transport keys")

    def _respond(self, deadline):
        state = None
        while time.monotonic() < deadline:
            self.tick()
            body = self._next_body(min(0.5, deadline - time.monotonic()))
            if body is None:
                continue
            if body[0] == noise.HANDSHAKE_1:
                state = noise.Responder(self.static, self.session_id)
                state.read_message_1(body)
                self._send_body(state.message_2())
            elif body[0] == noise.HANDSHAKE_3 and state is not None:
                try:
                    remote, transport = state.read_message_3(body)
                except Exception:  # noqa: BLE001 - not for our newest state
                    continue
                need(remote == self.peer_public, "the initiator's static key is not the one "
                     "its grant names")
                self.transport, self.message_3 = transport, body
                self._confirm()
                return
        raise CheckFailed("no complete handshake from the initiator in time")

    def _confirm(self):
        """Rule 6: an empty TRANSPORT frame under the new keys."""
        self._send_body(self.transport.seal(b""))
        self.last_confirmation = time.monotonic()

    def _open(self, body):
        try:
            return self.transport.open(body)[2]
        except Exception:  # noqa: BLE001 - forged, replayed or of another transport: dropped
            return None

    # -- transport ----------------------------------------------------------------------------
    def send(self, plaintext):
        need(len(plaintext) <= self.limit, f"this client was about to send a {len(plaintext)}-"
             f"byte plaintext, over its limit of {self.limit}")
        self._send_body(self.transport.seal(plaintext))

    def recv(self, timeout):
        """The next non-empty plaintext, or None at the deadline."""
        if self.received:
            return self.received.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            body = self._next_body(max(0.0, deadline - time.monotonic()))
            if body is None:
                return None
            if body[0] == noise.TRANSPORT:
                plaintext = self._open(body)
                if plaintext:
                    return plaintext
            elif (body[0] == noise.HANDSHAKE_3 and body == self.message_3 and self.slot == 1
                  and time.monotonic() - self.last_confirmation >= 1.0):
                self._confirm()  # rule 7: the initiator missed the confirmation
            if time.monotonic() >= deadline:
                return None

    def close(self):
        self.peer.close()
        self.peer.close_socket()


# ---------------------------------------------------------------------------------------------
# QUIC (§9.4)


class SessionClosed(CheckFailed):
    """The other peer closed the relay session (§3.8) while QUIC still waited for something."""


class FerryQuic(QuicConnection):
    """aioquic with §9.4's datagram sizes: announces `limit` as max_udp_payload_size, and sends
    at most min(limit, the peer's max_udp_payload_size) once it has the peer's parameters.
    A client starts at 1200 (its Initials are padded to that)."""

    def __init__(self, *, limit, **kwargs):
        super().__init__(**kwargs)
        self.ferry_limit = limit
        self.peer_max_udp_payload_size = "not received"
        self.peer_close = None  # the other side's CONNECTION_CLOSE, as a ConnectionTerminated

    def _handle_connection_close_frame(self, context, frame_type, buf):
        closing_first = self._close_event is None
        super()._handle_connection_close_frame(context, frame_type, buf)
        if closing_first and self._close_event is not None:
            self.peer_close = self._close_event

    def _serialize_transport_parameters(self):
        ours = super()._serialize_transport_parameters()
        params = pull_quic_transport_parameters(Buffer(data=ours))
        params.max_udp_payload_size = self.ferry_limit
        buf = Buffer(capacity=4096)
        push_quic_transport_parameters(buf, params)
        return buf.data

    def _parse_transport_parameters(self, data, from_session_ticket=False):
        super()._parse_transport_parameters(data, from_session_ticket)
        peer = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        self.peer_max_udp_payload_size = peer
        # Absent, the peer's limit is QUIC's default of 65527.
        self._max_datagram_size = min(self.ferry_limit, 65527 if peer is None else peer)


def self_signed_certificate():
    """A certificate made for one transfer (§9.4), ECDSA P-256."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferry transfer (interop)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    return cert, key


def configuration(is_client, limit, certificate=None):
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=None,  # §9.4: no ALPN
        cipher_suites=[aioquic_tls.CipherSuite.AES_128_GCM_SHA256],
        supported_versions=[QuicProtocolVersion.VERSION_1],
        max_datagram_size=QUIC_MIN if is_client else limit,
        idle_timeout=15.0,
    )
    if is_client:
        config.server_name = SERVER_NAME
        config.verify_mode = ssl.CERT_NONE  # any certificate; the signature is still checked
    else:
        config.certificate, config.private_key = certificate or self_signed_certificate()
    return config


# The server side reads the other peer's ClientHello (SNI, ALPN, cipher suites) from here.
CLIENT_HELLOS = []
_pull_client_hello = aioquic_tls.pull_client_hello


def _recording_pull_client_hello(buf):
    hello = _pull_client_hello(buf)
    CLIENT_HELLOS.append(hello)
    return hello


aioquic_tls.pull_client_hello = _recording_pull_client_hello


def is_long_header_initial(datagram):
    """A QUIC v1 long-header Initial packet starts the datagram (RFC 9000 17.2.2)."""
    return len(datagram) > 0 and datagram[0] & 0xB0 == 0x80 and datagram[0] & 0x30 == 0


class Link:
    """One QUIC connection carried by a Channel: every QUIC datagram is one transport
    plaintext. Records the sizes sent and received; `events` is every QUIC event so far."""

    def __init__(self, channel, is_client, certificate=None):
        self.channel = channel
        self.is_client = is_client
        self.config = configuration(is_client, channel.limit, certificate)
        self.conn = None
        self.events = []
        self.sent = []  # sizes of the datagrams this side sent
        self.received = []  # the datagrams (bytes) received, in order
        self.stream = bytearray()  # stream 0 as received
        self.stream_ended = False
        self.terminated = None  # the ConnectionTerminated event (3 PTO after a close)
        if is_client:
            self.conn = FerryQuic(limit=channel.limit, configuration=self.config)
            self.conn.connect(FAKE_ADDR, now=time.monotonic())

    def _accept(self, datagram, now):
        if self.conn is None:
            h = pull_quic_header(Buffer(data=datagram),
                                 host_cid_length=self.config.connection_id_length)
            self.conn = FerryQuic(limit=self.channel.limit, configuration=self.config,
                                  original_destination_connection_id=h.destination_cid)
        self.conn.receive_datagram(datagram, FAKE_ADDR, now=now)

    def _flush(self):
        if self.conn is None:
            return
        for data, _ in self.conn.datagrams_to_send(now=time.monotonic()):
            self.channel.send(data)
            self.sent.append(len(data))

    def _note(self, ev):
        self.events.append(ev)
        if isinstance(ev, events.StreamDataReceived) and ev.stream_id == 0:
            self.stream += ev.data
            self.stream_ended = self.stream_ended or ev.end_stream
        elif isinstance(ev, events.ConnectionTerminated):
            self.terminated = ev

    def pump(self, until, timeout, what):
        """Runs the connection until `until()` is true; CheckFailed after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now >= deadline:
                raise CheckFailed(f"{what}: not within {timeout} s")
            closed = self.channel.relay_closed
            if closed is not None and now - closed > 0.5:
                raise SessionClosed(f"{what}: the other peer closed the session (relay CLOSE, "
                                    "PEER_CLOSED) and no QUIC datagram has come for 0.5 s since")
            self._flush()
            timer = self.conn.get_timer() if self.conn else None
            wait = min(0.1, deadline - now)
            if timer is not None:
                wait = max(0.0, min(wait, timer - now))
            plaintext = self.channel.recv(wait)
            while plaintext is not None:
                self.received.append(plaintext)
                self._accept(plaintext, time.monotonic())
                plaintext = self.channel.recv(0)
            if self.conn is not None:
                timer = self.conn.get_timer()
                if timer is not None and time.monotonic() >= timer:
                    self.conn.handle_timer(now=time.monotonic())
                ev = self.conn.next_event()
                while ev is not None:
                    self._note(ev)
                    ev = self.conn.next_event()
            self.channel.tick()
        self._flush()

    def send_stream(self, data, end):
        self.conn.send_stream_data(0, data, end_stream=end)

    def close(self, code, reason=""):
        self.conn.close(error_code=code, reason_phrase=reason)
        self._flush()

    def peer_close(self):
        """The other side's CONNECTION_CLOSE (a ConnectionTerminated), if it closed first."""
        return self.conn.peer_close if self.conn else None

    def peer_application_close(self):
        """(code, reason) when the other side closed first with an application error code
        (CONNECTION_CLOSE 0x1d: aioquic reports frame_type None), else None."""
        t = self.peer_close()
        if t is None or t.frame_type is not None:
            return None
        return t.error_code, t.reason_phrase

    def drain(self, seconds):
        """Keeps answering for a while (ACKs, the other side's close), without failing."""
        end = time.monotonic() + seconds
        try:
            self.pump(lambda: time.monotonic() >= end, seconds + 1, "drain")
        except CheckFailed:
            pass


def sha256(data):
    return hashlib.sha256(data).digest()


def random_content(size):
    return os.urandom(size)
