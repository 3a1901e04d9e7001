//! The half of the session logic that needs no session state: [`check`].
//!
//! Everything here reads only its arguments, so the relay runs it before it locks a session
//! shard: the expensive work of a BIND (the token's Ed25519 signature, unsealing its slot
//! secret, the slot proof's MAC) never holds up another datagram of the same shard.

use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;

use ferry_core::proof::{CookieJar, SlotKeys};
use ferry_core::time::UnixTime;
use ferry_core::token::TokenVerifier;
use ferry_core::wire::{self, CloseReason, HeaderError, Packet, RejectReason};

use super::{DropReason, Outcome, Request, encode_reject, reject_reason};

/// A datagram that passed [`check`]: what the session table still has to decide.
#[derive(Debug)]
pub enum Input<'a> {
    /// DATA, to forward if `from` is bound to the session.
    Data {
        /// The source address.
        from: SocketAddr,
        /// The session the datagram names.
        session_id: u64,
        /// The whole datagram's length, charged to the sender's budget.
        len: usize,
    },
    /// A BIND whose cookie, bind rate, token and proof checked out (boxed: its slot keys are
    /// large, and DATA should not carry their room around).
    Bind(Box<VerifiedBind>),
    /// A REBIND whose cookie and bind rate checked out; its proof is checked against the
    /// binding's keys, which only the table knows.
    Rebind {
        /// Who asked for what.
        req: Request,
        /// The REBIND.
        rebind: wire::Rebind<'a>,
    },
    /// A KEEPALIVE, to echo if `from` is bound to the session.
    Keepalive {
        /// The source address.
        from: SocketAddr,
        /// The relay address it was sent to, when the socket said (the echo leaves from it).
        local: Option<IpAddr>,
        /// The session the datagram names.
        session_id: u64,
    },
    /// A CLOSE, whose proof is checked against the binding's keys.
    Close(wire::Close<'a>),
}

impl Input<'_> {
    /// The session the datagram is for: it picks the shard that decides.
    pub fn session_id(&self) -> u64 {
        match self {
            Input::Data { session_id, .. } | Input::Keepalive { session_id, .. } => *session_id,
            Input::Bind(bind) => bind.req.session_id,
            Input::Rebind { req, .. } => req.session_id,
            Input::Close(close) => close.session_id(),
        }
    }
}

/// A BIND whose address cookie, source bind rate, token and slot proof have been checked.
/// Only [`check`] makes one, so the session table cannot be handed a BIND it has to verify.
#[derive(Debug)]
pub struct VerifiedBind {
    pub(super) req: Request,
    pub(super) token_id: [u8; 16],
    pub(super) expires: UnixTime,
    pub(super) claimed_rate: u64,
    pub(super) keys: SlotKeys,
}

impl VerifiedBind {
    /// Who asked for what.
    pub fn request(&self) -> &Request {
        &self.req
    }
}

/// What to count for an answer [`check`] gave by itself ([`super::Counters::tally`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    /// A malformed datagram, by the rule it broke: [`HeaderError::as_index`], or
    /// [`HeaderError::COUNT`] for body-level rules.
    Malformed {
        /// The index into [`super::Counters::malformed_by_rule`].
        rule: usize,
    },
    /// Another drop: a relay-only type, or a source over its bind rate.
    Dropped(DropReason),
    /// A CHALLENGE sent.
    Challenged,
    /// A gateway's health probe answered with a BIND-ACK.
    Probed,
    /// An unauthenticated REJECT sent.
    Rejected(RejectReason),
}

/// A datagram [`check`] answered or dropped by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answered {
    /// What the caller does with the datagram.
    pub outcome: Outcome,
    /// What the caller counts.
    pub tally: Tally,
    /// The session the datagram names (0 for a malformed datagram): it picks the shard whose
    /// counters count the answer.
    pub session_id: u64,
}

/// The result of [`check`]: an input for the session table, or an answer already given.
pub type Checked<'a> = Result<Input<'a>, Answered>;

/// The checks of docs/protocol.md §7 that need no session state, in its order.
///
/// - A datagram that does not parse, of a type only the relay sends, or a CLOSE with a reason
///   (only the relay's CLOSE has one), is dropped.
/// - A BIND or REBIND without a valid address cookie for its source gets a CHALLENGE (§5).
/// - Then its source is charged one bind attempt through `charge_bind`, which says whether the
///   source was under its rate; if not, the datagram is dropped. Charged only once the cookie
///   proves the address, so that nobody can spend another host's bind budget by spoofing it.
/// - A BIND's token is verified with the verifier `verifier` returns (called only for a BIND
///   that got this far), and its proof with the slot keys from the token's secret; a failure
///   gets an unauthenticated REJECT.
/// - A BIND whose verified token is a gateway's health probe (§4, flags) is answered here with
///   a BIND-ACK under the slot's `K_relay` and binds nothing: only a relay holding the private
///   key the token's secret was sealed to can compute that MAC, which is what the probe checks.
///
/// `from` is the datagram's source and `local` the relay address it was sent to, when the
/// socket said: the answers leave from it. Replies are written into `reply`, which must hold
/// at least [`wire::MAX_DATAGRAM`] bytes.
// `Answered` (an `Outcome` naming two destinations and their source addresses) is a little
// over clippy's 128 bytes; boxing it would allocate for every CHALLENGE and every dropped
// datagram of a flood, where moving it costs a few stores.
#[allow(clippy::too_many_arguments, clippy::result_large_err)]
pub fn check<'a, V: Deref<Target = TokenVerifier>>(
    cookies: &CookieJar,
    verifier: impl FnOnce() -> V,
    charge_bind: impl FnOnce(IpAddr) -> bool,
    wall: UnixTime,
    from: SocketAddr,
    local: Option<IpAddr>,
    datagram: &'a [u8],
    reply: &mut [u8],
) -> Checked<'a> {
    let malformed = |rule| Answered {
        outcome: Outcome::Drop(DropReason::Malformed),
        tally: Tally::Malformed { rule },
        session_id: 0,
    };
    let packet = match wire::parse(datagram) {
        Ok(p) => p,
        Err(e) => {
            // Counted by the rule it broke (docs/protocol.md §2.1); body-level problems
            // (reserved bytes, slot, flags) have one bucket of their own.
            let rule = match e {
                wire::WireError::Header(h) => h.as_index(),
                _ => HeaderError::COUNT,
            };
            return Err(malformed(rule));
        }
    };
    let request = |session_id, slot, seq| Request {
        from,
        local,
        session_id,
        slot,
        seq,
    };
    let (req, cookie, asks) = match packet {
        Packet::Data(data) => {
            return Ok(Input::Data {
                from,
                session_id: data.session_id(),
                len: datagram.len(),
            });
        }
        Packet::Keepalive(ka) => {
            return Ok(Input::Keepalive {
                from,
                local,
                session_id: ka.session_id(),
            });
        }
        // Only the relay says why a binding ended: a peer's CLOSE carries reason 0 (§3).
        Packet::Close(close) if close.reason() != CloseReason::PeerClosed => {
            return Err(malformed(HeaderError::COUNT));
        }
        Packet::Close(close) => return Ok(Input::Close(close)),
        Packet::Challenge(_) | Packet::BindAck(_) | Packet::Reject(_) => {
            let reason = DropReason::UnexpectedType;
            return Err(Answered {
                outcome: Outcome::Drop(reason),
                tally: Tally::Dropped(reason),
                session_id: packet.session_id(),
            });
        }
        Packet::Bind(b) => {
            let req = request(b.session_id(), b.slot(), b.bind_seq());
            (req, b.cookie(), Asks::Bind(b))
        }
        Packet::Rebind(r) => {
            let req = request(r.session_id(), r.slot(), r.bind_seq());
            (req, r.cookie(), Asks::Rebind(r))
        }
    };
    let answered = |outcome, tally| Answered {
        outcome,
        tally,
        session_id: req.session_id,
    };
    if !cookies.check(wall, cookie, req.session_id, req.slot.as_u8(), req.from) {
        let outcome = challenge(cookies, wall, &req, reply);
        return Err(answered(outcome, Tally::Challenged));
    }
    if !charge_bind(req.from.ip()) {
        let reason = DropReason::BindRateLimited;
        return Err(answered(Outcome::Drop(reason), Tally::Dropped(reason)));
    }
    let bind = match asks {
        Asks::Rebind(rebind) => return Ok(Input::Rebind { req, rebind }),
        Asks::Bind(bind) => bind,
    };
    let reject = |reason, reply: &mut [u8]| {
        let outcome = encode_reject(&req, reason, None, reply);
        Err(answered(outcome, Tally::Rejected(reason)))
    };
    let verified = match verifier().verify(bind.token(), wall, req.session_id, req.slot.as_u8()) {
        Ok(v) => v,
        Err(e) => return reject(reject_reason(&e), reply),
    };
    let keys = SlotKeys::derive(&verified.slot_secret);
    if !keys.peer.verify(bind.mac_input(), bind.mac()) {
        return reject(RejectReason::BadProof, reply);
    }
    let claims = verified.claims;
    if claims.probe {
        let fields = wire::BindAckFields {
            slot: req.slot,
            peer_present: false,
            idle_timeout_secs: 0,
            bind_seq: req.seq,
            expires_at: claims.expires.as_secs(),
        };
        return Err(
            match wire::encode_bind_ack(reply, req.session_id, &fields, |m| keys.relay.mac(m)) {
                Ok(len) => {
                    let outcome = Outcome::Reply {
                        to: req.from,
                        src: req.local,
                        len,
                    };
                    answered(outcome, Tally::Probed)
                }
                Err(_) => answered(Outcome::Consumed, Tally::Probed),
            },
        );
    }
    Ok(Input::Bind(Box::new(VerifiedBind {
        req,
        token_id: claims.token_id,
        expires: claims.expires,
        claimed_rate: claims.rate_bytes_per_sec,
        keys,
    })))
}

/// The two packets that ask for a slot.
enum Asks<'a> {
    Bind(wire::Bind<'a>),
    Rebind(wire::Rebind<'a>),
}

/// Answers `req` with a CHALLENGE carrying a cookie for its source address.
fn challenge(cookies: &CookieJar, wall: UnixTime, req: &Request, reply: &mut [u8]) -> Outcome {
    let cookie = cookies.issue(wall, req.session_id, req.slot.as_u8(), req.from);
    let fields = wire::ChallengeFields {
        bind_seq: req.seq,
        cookie,
    };
    match wire::encode_challenge(reply, req.session_id, &fields) {
        Ok(len) => Outcome::Reply {
            to: req.from,
            src: req.local,
            len,
        },
        Err(_) => Outcome::Consumed,
    }
}
