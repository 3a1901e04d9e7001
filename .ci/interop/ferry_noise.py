"""The end-to-end layer of docs/protocol.md §9, by hand from the Noise spec (revision 34) and
§9's framing: Noise_XX_25519_ChaChaPoly_BLAKE2s, both sides (slot A initiates, slot B answers), and the
TRANSPORT frames of §9.2 (epoch 0 only: a short test never rekeys)."""

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2s"
HANDSHAKE_1, HANDSHAKE_2, HANDSHAKE_3, TRANSPORT = 1, 2, 3, 4
TRANSPORT_OVERHEAD = 13 + 16
MAX_PLAINTEXT = 1456 - TRANSPORT_OVERHEAD  # 1427


def blake2s(data):
    return hashlib.blake2s(data).digest()


def hmac_blake2s(key, data):
    return hmac.new(key, data, hashlib.blake2s).digest()


def noise_hkdf(chaining_key, ikm, outputs):
    temp = hmac_blake2s(chaining_key, ikm)
    out, prev = [], b""
    for i in range(1, outputs + 1):
        prev = hmac_blake2s(temp, prev + bytes([i]))
        out.append(prev)
    return out


def nonce(n):
    """Noise's ChaChaPoly nonce: 4 zero bytes, then the counter little-endian."""
    return bytes(4) + struct.pack("<Q", n)


def pub_bytes(private):
    return private.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)


def dh(private, public):
    return private.exchange(X25519PublicKey.from_public_bytes(public))


class SymmetricState:
    def __init__(self, prologue):
        self.h = PROTOCOL_NAME.ljust(32, b"\0") if len(PROTOCOL_NAME) <= 32 else \
            blake2s(PROTOCOL_NAME)
        self.ck = self.h
        self.k = None
        self.n = 0
        self.mix_hash(prologue)

    def mix_hash(self, data):
        self.h = blake2s(self.h + data)

    def mix_key(self, ikm):
        self.ck, k = noise_hkdf(self.ck, ikm, 2)
        self.k, self.n = k, 0

    def encrypt_and_hash(self, plaintext):
        if self.k is None:
            out = plaintext
        else:
            out = ChaCha20Poly1305(self.k).encrypt(nonce(self.n), plaintext, self.h)
            self.n += 1
        self.mix_hash(out)
        return out

    def decrypt_and_hash(self, ciphertext):
        if self.k is None:
            out = ciphertext
        else:
            out = ChaCha20Poly1305(self.k).decrypt(nonce(self.n), ciphertext, self.h)
            self.n += 1
        self.mix_hash(ciphertext)
        return out

    def split(self):
        return noise_hkdf(self.ck, b"", 2)


def prologue(session_id):
    """§9.1: "ferry e2e v1" ‖ session id (u64, big-endian like every integer)."""
    return b"ferry e2e v1" + struct.pack(">Q", session_id)


class Initiator:
    """XX as the initiator: message 1, read message 2, message 3, then split()."""

    def __init__(self, static_private, session_id):
        self.s = static_private
        self.e = X25519PrivateKey.generate()
        self.ss = SymmetricState(prologue(session_id))
        self.remote_static = None

    def message_1(self):
        e_pub = pub_bytes(self.e)
        self.ss.mix_hash(e_pub)
        return bytes([HANDSHAKE_1]) + e_pub + self.ss.encrypt_and_hash(b"")

    def read_message_2(self, frame):
        """Raises ValueError (wrong length) or cryptography's InvalidTag (does not decrypt)."""
        if len(frame) != 97 or frame[0] != HANDSHAKE_2:
            raise ValueError(f"HANDSHAKE-2 frame of {len(frame)} bytes, kind {frame[:1].hex()}")
        m = frame[1:]
        re = m[0:32]
        self.ss.mix_hash(re)
        self.ss.mix_key(dh(self.e, re))
        rs = self.ss.decrypt_and_hash(m[32:80])
        self.ss.mix_key(dh(self.e, rs))
        payload = self.ss.decrypt_and_hash(m[80:96])
        if payload:
            raise ValueError("HANDSHAKE-2 with a non-empty payload (§9: payloads are empty)")
        self.remote_static = rs
        self.re = re
        return rs

    def message_3(self):
        out = self.ss.encrypt_and_hash(pub_bytes(self.s))
        self.ss.mix_key(dh(self.s, self.re))
        out += self.ss.encrypt_and_hash(b"")
        send, recv = self.ss.split()
        return bytes([HANDSHAKE_3]) + out, Transport(send, recv)


def rekey(key):
    """Noise REKEY (§9.3): the first 32 bytes of ENCRYPT(k, 2^64 - 1, empty ad, 32 zeros)."""
    return ChaCha20Poly1305(key).encrypt(nonce(2**64 - 1), bytes(32), b"")[:32]


def seal_at(key, epoch, counter, plaintext):
    """A TRANSPORT frame under `key` with a chosen epoch and counter (§9.2)."""
    head = bytes([TRANSPORT]) + struct.pack(">IQ", epoch, counter)
    return head + ChaCha20Poly1305(key).encrypt(nonce(counter), plaintext, head)


class Transport:
    """§9.2 TRANSPORT frames at epoch 0, with a replay check for received counters."""

    def __init__(self, send_key, recv_key):
        self.send_key = send_key
        self.send = ChaCha20Poly1305(send_key)
        self.recv = ChaCha20Poly1305(recv_key)
        self.counter = 0
        self.seen = set()

    def seal(self, plaintext):
        head = bytes([TRANSPORT]) + struct.pack(">IQ", 0, self.counter)
        frame = head + self.send.encrypt(nonce(self.counter), plaintext, head)
        self.counter += 1
        return frame

    def open(self, frame):
        """(epoch, counter, plaintext); raises ValueError or InvalidTag."""
        if len(frame) < TRANSPORT_OVERHEAD or frame[0] != TRANSPORT:
            raise ValueError(f"not a TRANSPORT frame: {frame[:13].hex()}")
        epoch, counter = struct.unpack(">IQ", frame[1:13])
        if epoch != 0:
            raise ValueError(f"epoch {epoch} in a fresh transport")
        if counter in self.seen:
            raise ValueError(f"counter {counter} seen before")
        plaintext = self.recv.decrypt(nonce(counter), frame[13:], frame[:13])
        self.seen.add(counter)
        return epoch, counter, plaintext


class Responder:
    """XX as the responder: read message 1, message 2, read message 3, then split()."""

    def __init__(self, static_private, session_id):
        self.s = static_private
        self.e = X25519PrivateKey.generate()
        self.ss = SymmetricState(prologue(session_id))
        self.re = None

    def read_message_1(self, frame):
        if len(frame) != 33 or frame[0] != HANDSHAKE_1:
            raise ValueError(f"HANDSHAKE-1 frame of {len(frame)} bytes, kind {frame[:1].hex()}")
        self.re = frame[1:33]
        self.ss.mix_hash(self.re)
        if self.ss.decrypt_and_hash(b""):
            raise ValueError("HANDSHAKE-1 with a payload")

    def message_2(self):
        e_pub = pub_bytes(self.e)
        self.ss.mix_hash(e_pub)
        self.ss.mix_key(dh(self.e, self.re))
        out = e_pub + self.ss.encrypt_and_hash(pub_bytes(self.s))
        self.ss.mix_key(dh(self.s, self.re))
        out += self.ss.encrypt_and_hash(b"")
        return bytes([HANDSHAKE_2]) + out

    def read_message_3(self, frame):
        """(the initiator's static key, Transport); raises ValueError or InvalidTag."""
        if len(frame) != 65 or frame[0] != HANDSHAKE_3:
            raise ValueError(f"HANDSHAKE-3 frame of {len(frame)} bytes, kind {frame[:1].hex()}")
        rs = self.ss.decrypt_and_hash(frame[1:49])
        self.ss.mix_key(dh(self.e, rs))
        if self.ss.decrypt_and_hash(frame[49:65]):
            raise ValueError("HANDSHAKE-3 with a non-empty payload (§9: payloads are empty)")
        initiator_send, initiator_recv = self.ss.split()
        return rs, Transport(initiator_recv, initiator_send)
