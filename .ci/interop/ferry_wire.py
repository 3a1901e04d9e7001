"""Ferry's relay protocol, written from docs/protocol.md alone (no Ferry source was read).

The pieces a peer needs: the fixed header and its stateless rules (§2), the packet types and
their body rules (§3), relay tokens (§4, parsed, and minted for tests with a signing key the
relay is told to trust), the address cookie (§5, only to check the test vectors: a peer never
computes one), slot proofs and relay MACs (§6). Standard library plus `cryptography`.
"""

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"FR"
VERSION = 1
HEADER_LEN = 16
MAX_DATAGRAM = 1472
MAX_DATA_BODY = MAX_DATAGRAM - HEADER_LEN
TOKEN_LEN = 208

BIND, CHALLENGE, BIND_ACK, REJECT, DATA, KEEPALIVE, REBIND, CLOSE = range(1, 9)
TYPE_NAMES = {
    BIND: "BIND", CHALLENGE: "CHALLENGE", BIND_ACK: "BIND-ACK", REJECT: "REJECT", DATA: "DATA",
    KEEPALIVE: "KEEPALIVE", REBIND: "REBIND", CLOSE: "CLOSE",
}
# §3: body length allowed per type, as (min, max).
BODY_RANGE = {
    BIND: (252, 252), CHALLENGE: (24, 24), BIND_ACK: (40, 40), REJECT: (28, 28),
    DATA: (1, MAX_DATA_BODY), KEEPALIVE: (0, 0), REBIND: (44, 44), CLOSE: (28, 28),
}

# §3.4 REJECT reasons.
TOKEN_INVALID, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, WRONG_SESSION, REPLAYED, BAD_PROOF, \
    SESSION_FULL, OVERLOADED, UNKNOWN_SESSION = range(1, 10)
REJECT_NAMES = {
    TOKEN_INVALID: "TOKEN_INVALID", TOKEN_EXPIRED: "TOKEN_EXPIRED",
    TOKEN_NOT_YET_VALID: "TOKEN_NOT_YET_VALID", WRONG_SESSION: "WRONG_SESSION",
    REPLAYED: "REPLAYED", BAD_PROOF: "BAD_PROOF", SESSION_FULL: "SESSION_FULL",
    OVERLOADED: "OVERLOADED", UNKNOWN_SESSION: "UNKNOWN_SESSION",
}
# §3.4: the reasons always authenticated; all others never are.
AUTHENTICATED_REASONS = {REPLAYED, SESSION_FULL, OVERLOADED}
# §3.8 CLOSE reasons.
PEER_CLOSED, EXPIRED, IDLE = 0, 1, 2
CLOSE_NAMES = {PEER_CLOSED: "PEER_CLOSED", EXPIRED: "EXPIRED", IDLE: "IDLE"}


class Malformed(Exception):
    """A datagram that breaks a rule of §2.1 or a body rule of §3; `rule` names it."""

    def __init__(self, rule, detail=""):
        super().__init__(f"{rule}: {detail}" if detail else rule)
        self.rule = rule


# ---------------------------------------------------------------------------------------------
# §6 keys and MACs


def hkdf32(salt, ikm, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def slot_keys(slot_secret):
    """(K_peer, K_relay) of a slot secret S (§6)."""
    k_peer = hkdf32(b"ferry slot mac v1", slot_secret, b"peer to relay")
    k_relay = hkdf32(b"ferry slot mac v1", slot_secret, b"relay to peer")
    return k_peer, k_relay


def mac(key, message):
    return hmac.new(key, message, hashlib.sha256).digest()[:16]


def mac_ok(key, message, tag):
    return hmac.compare_digest(mac(key, message), tag)


# ---------------------------------------------------------------------------------------------
# §2 header


def header(ptype, session_id, body_len, *, magic=MAGIC, version=VERSION, reserved=0):
    return magic + struct.pack(">BBQHH", version, ptype, session_id, body_len, reserved)


def packet(ptype, session_id, body):
    return header(ptype, session_id, len(body)) + body


def check_header(datagram):
    """Applies §2.1 in order; returns (type, session id, body) or raises Malformed."""
    n = len(datagram)
    if n < HEADER_LEN:
        raise Malformed("too_short")
    if n > MAX_DATAGRAM:
        raise Malformed("too_long")
    if datagram[0:2] != MAGIC:
        raise Malformed("bad_magic")
    version, ptype, session_id, body_len, reserved = struct.unpack(">BBQHH", datagram[2:16])
    if version != VERSION:
        raise Malformed("bad_version")
    if ptype not in BODY_RANGE:
        raise Malformed("unknown_type")
    if session_id == 0:
        raise Malformed("zero_session")
    if reserved != 0:
        raise Malformed("reserved_non_zero")
    if body_len != n - HEADER_LEN:
        raise Malformed("length_mismatch")
    low, high = BODY_RANGE[ptype]
    if not low <= body_len <= high:
        raise Malformed("body_length_out_of_range")
    return ptype, session_id, datagram[HEADER_LEN:]


class Packet:
    """A parsed, well-formed relay packet (header and body rules checked)."""

    def __init__(self, datagram):
        self.raw = bytes(datagram)
        self.type, self.session_id, body = check_header(self.raw)
        self.body = body
        t = self.type
        if t == CHALLENGE:
            self.seq, = struct.unpack(">Q", body[0:8])
            self.cookie = body[8:24]
        elif t == BIND_ACK:
            self.slot, self.peer_present, reserved, self.idle_timeout, self.seq, \
                self.expires_at = struct.unpack(">BBHIQQ", body[0:24])
            self.mac = body[24:40]
            self._need(reserved == 0, "BIND-ACK reserved bytes 2-3")
            self._need(self.slot in (0, 1), "slot")
            self._need(self.peer_present in (0, 1), "peer present")
        elif t == REJECT:
            self.reason, self.slot, self.authenticated, reserved, self.seq = \
                struct.unpack(">BBBBQ", body[0:12])
            self.mac = body[12:28]
            self._need(reserved == 0, "REJECT reserved byte 3")
            self._need(self.slot in (0, 1), "slot")
            self._need(self.authenticated in (0, 1), "authenticated flag")
            self._need(self.reason in REJECT_NAMES, "reason")
            self._need(self.authenticated == 1 or self.mac == bytes(16), "MAC of unauthenticated")
        elif t == CLOSE:
            self.slot, self.reason, reserved, self.seq = struct.unpack(">BBHQ", body[0:12])
            self.mac = body[12:28]
            self._need(reserved == 0, "CLOSE reserved bytes 2-3")
            self._need(self.slot in (0, 1), "slot")
            self._need(self.reason in CLOSE_NAMES, "reason")
        elif t == BIND:
            self.slot, reserved, token_len, self.seq = struct.unpack(">BBHQ", body[0:12])
            self.cookie, self.token, self.mac = body[12:28], body[28:236], body[236:252]
            self._need(reserved == 0 and self.slot in (0, 1) and token_len == TOKEN_LEN, "BIND")
        elif t == REBIND:
            self.slot = body[0]
            self.seq, = struct.unpack(">Q", body[4:12])
            self.cookie, self.mac = body[12:28], body[28:44]
            self._need(body[1:4] == b"\0\0\0" and self.slot in (0, 1), "REBIND")

    @staticmethod
    def _need(ok, what):
        if not ok:
            raise Malformed("body", what)

    def signed_part(self):
        """Header and body up to the MAC field: what the MAC covers (§6)."""
        return self.raw[: len(self.raw) - 16]

    def name(self):
        extra = ""
        if self.type == REJECT:
            extra = f" {REJECT_NAMES[self.reason]} auth={self.authenticated}"
        elif self.type == CLOSE:
            extra = f" {CLOSE_NAMES[self.reason]}"
        return TYPE_NAMES[self.type] + extra


def bind_packet(session_id, slot, seq, cookie, token, k_peer, *, reserved=0, token_len=TOKEN_LEN):
    body = struct.pack(">BBHQ", slot, reserved, token_len, seq) + cookie + token
    head = header(BIND, session_id, 252)
    return head + body + mac(k_peer, head + body)


def rebind_packet(session_id, slot, seq, cookie, k_peer):
    body = bytes([slot, 0, 0, 0]) + struct.pack(">Q", seq) + cookie
    head = header(REBIND, session_id, 44)
    return head + body + mac(k_peer, head + body)


def close_packet(session_id, slot, seq, k_peer, reason=PEER_CLOSED):
    body = struct.pack(">BBHQ", slot, reason, 0, seq)
    head = header(CLOSE, session_id, 28)
    return head + body + mac(k_peer, head + body)


def keepalive_packet(session_id):
    return header(KEEPALIVE, session_id, 0)


def data_packet(session_id, body):
    return packet(DATA, session_id, body)


# ---------------------------------------------------------------------------------------------
# §4 tokens

TOKEN_SIG_PREFIX = b"ferry token v1\0"


class Token:
    """The claims of a 208-byte token (§4), parsed without checking anything."""

    def __init__(self, raw):
        if len(raw) != TOKEN_LEN:
            raise ValueError(f"a token is {TOKEN_LEN} bytes, got {len(raw)}")
        self.raw = bytes(raw)
        (self.version, self.slot, self.flags, self.reserved, self.kid) = \
            struct.unpack(">BBBBI", raw[0:8])
        self.token_id = raw[8:24]
        self.relay_id, self.session_id, self.nbf, self.exp, self.rate = \
            struct.unpack(">QQQQQ", raw[24:64])
        self.ephemeral = raw[64:96]
        self.sealed = raw[96:144]
        self.signature = raw[144:208]

    def signature_ok(self, ed25519_public):
        try:
            Ed25519PublicKey.from_public_bytes(ed25519_public).verify(
                self.signature, TOKEN_SIG_PREFIX + self.raw[:144])
            return True
        except Exception:  # noqa: BLE001 - any failure is a bad signature
            return False


def seal_slot_secret(claims64, slot_secret, relay_public, ephemeral_private=None):
    """§4.1: returns (E, ciphertext ‖ tag)."""
    e = (X25519PrivateKey.from_private_bytes(ephemeral_private) if ephemeral_private
         else X25519PrivateKey.generate())
    big_e = e.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = e.exchange(X25519PublicKey.from_public_bytes(relay_public))
    if shared == bytes(32):
        raise ValueError("all-zero X25519 result")
    k_seal = hkdf32(b"ferry token seal v1", shared, big_e + relay_public)
    sealed = ChaCha20Poly1305(k_seal).encrypt(bytes(12), slot_secret, claims64)
    return big_e, sealed


def mint_token(signing_seed, *, kid, slot, token_id, relay_id, session_id, nbf, exp, rate,
               slot_secret, relay_public, flags=0, reserved=0, version=1,
               ephemeral_private=None):
    """A token as a gateway mints it (§4), signed with an Ed25519 seed."""
    claims = struct.pack(">BBBBI", version, slot, flags, reserved, kid) + token_id + \
        struct.pack(">QQQQQ", relay_id, session_id, nbf, exp, rate)
    big_e, sealed = seal_slot_secret(claims, slot_secret, relay_public, ephemeral_private)
    body = claims + big_e + sealed
    signature = Ed25519PrivateKey.from_private_bytes(signing_seed).sign(TOKEN_SIG_PREFIX + body)
    return body + signature


# ---------------------------------------------------------------------------------------------
# §5 cookies (the relay computes them; here only to check the appendix's vectors)

MASK64 = (1 << 64) - 1


def _rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & MASK64


def siphash_2_4_128(key16, message):
    k0 = int.from_bytes(key16[0:8], "little")
    k1 = int.from_bytes(key16[8:16], "little")
    v = [0x736F6D6570736575 ^ k0, 0x646F72616E646F6D ^ k1 ^ 0xEE,
         0x6C7967656E657261 ^ k0, 0x7465646279746573 ^ k1]

    def rounds(n):
        for _ in range(n):
            v[0] = (v[0] + v[1]) & MASK64
            v[1] = _rotl(v[1], 13) ^ v[0]
            v[0] = _rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & MASK64
            v[3] = _rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & MASK64
            v[3] = _rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & MASK64
            v[1] = _rotl(v[1], 17) ^ v[2]
            v[2] = _rotl(v[2], 32)

    full = len(message) // 8 * 8
    for i in range(0, full, 8):
        m = int.from_bytes(message[i:i + 8], "little")
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    last = (len(message) & 0xFF) << 56 | int.from_bytes(message[full:], "little")
    v[3] ^= last
    rounds(2)
    v[0] ^= last
    v[2] ^= 0xEE
    rounds(4)
    out0 = v[0] ^ v[1] ^ v[2] ^ v[3]
    v[1] ^= 0xDD
    rounds(4)
    out1 = v[0] ^ v[1] ^ v[2] ^ v[3]
    return out0.to_bytes(8, "little") + out1.to_bytes(8, "little")


def cookie(k_cookie, now_unix, session_id, slot, ip16, port):
    window = now_unix // 60
    k_window = hmac.new(k_cookie, b"ferry cookie v2" + struct.pack(">Q", window),
                        hashlib.sha256).digest()[:16]
    message = struct.pack(">QB", session_id, slot) + ip16 + struct.pack(">H", port)
    return k_window, siphash_2_4_128(k_window, message)
