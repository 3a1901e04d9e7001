//! `ferry-bench agent`: what runs on each generator and sink machine of a testbed from a
//! config file ([`super::testbed`]), and the coordinator's side of its control protocol.
//!
//! The agent listens on TCP for a coordinator. Everything it does, it does through the
//! harness's own code: it opens UDP sockets, binds Ferry slots with the tokens the coordinator
//! minted ([`super::paths`]' BIND exchange), sends with the paced [`Generator`] and counts and
//! times arrivals with the [`super::load`] sink, then answers with the counts and the latency
//! histogram (hdrhistogram's V2 serialization, base64). It never runs a command it is sent and
//! never reads or writes a file after it starts.
//!
//! # Protocol (version 1)
//!
//! 1. On connect the agent sends 32 random bytes (its nonce), the coordinator 32 of its own.
//! 2. Then both send frames: a 4-byte big-endian body length (at most [`MAX_FRAME`]), a 32-byte
//!    tag, the body (one JSON object, [`Request`] or [`Response`]). The tag is HMAC-SHA256 under
//!    the pre-shared secret of `"ferry-bench-agent/1"`, the direction (`C` coordinator → agent,
//!    `A` agent → coordinator), the agent's nonce, the coordinator's nonce, the frame's sequence
//!    number in its direction (8 bytes big-endian, from 0), and the body. A frame from another
//!    connection, out of order, replayed or changed fails its tag.
//! 3. Each request gets one response. A frame whose tag fails, or whose length is over the
//!    limit, gets an [`Response::Error`] saying so and the connection is closed; a body that is
//!    not a valid request (unknown `op`, missing or unknown field, value out of range) gets an
//!    error and the connection stays open.
//!
//! The secret authenticates; it does not encrypt. Requests carry Ferry tokens and slot secrets
//! (valid for one bench run's sessions on one relay): keep the control network to the lab.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ferry_core::proof::SlotSecret;
use ferry_core::token::{MintedToken, TOKEN_LEN, parse_unverified};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use ring::hmac;
use serde::{Deserialize, Serialize};

use super::load::{Flow, Framing, Generator, Pacing, Payload, Received, now_ns};
use super::topology::KernelCounters;
use crate::udp::socket;

/// The protocol version, in the tag's context string and in [`Response::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame body either side accepts, bytes.
pub const MAX_FRAME: usize = 1 << 20;
/// The most grants one [`Request::Bind`] may carry (the coordinator sends more in several).
pub const MAX_GRANTS: usize = 1024;
/// The most UDP sockets one connection may hold open.
pub const MAX_SOCKETS: usize = 64;
/// The most sessions one [`Request::Send`] may drive.
pub const MAX_SESSIONS: u64 = 1_000_000;
/// The longest a [`Request::Send`] may send, seconds.
pub const MAX_SEND_SECONDS: f64 = 600.0;
/// The most connections an agent serves at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The shortest secret accepted, bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// The largest clock tolerance a sink accepts, nanoseconds (1 s).
pub const MAX_CLOCK_TOLERANCE_NS: u64 = 1_000_000_000;

const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;
const CONTEXT: &[u8] = b"ferry-bench-agent/1";
/// How long a connection may stay silent (between requests, or inside a frame).
const IDLE: Duration = Duration::from_secs(900);

/// The pre-shared secret of a testbed: every agent and the coordinator read the same file.
pub struct Secret(hmac::Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The secret from `bytes` (surrounding whitespace removed): at least [`MIN_SECRET_LEN`]
    /// bytes.
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_LEN {
            bail!(
                "the agent secret is {} bytes; it needs at least {MIN_SECRET_LEN} \
                 (head -c 32 /dev/urandom | base64 > FILE)",
                trimmed.len()
            );
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, trimmed)))
    }

    /// Reads the secret file at `path`, which the group and others must not be able to read.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("reading the agent secret file {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "the agent secret file {} is readable by others: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the agent secret file {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("{}", path.display()))
    }
}

/// Which role a UDP socket of an agent plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sends (a generator's socket; Ferry's slot A binds from it).
    Generator,
    /// Receives (a sink's socket; Ferry's slot B binds from it).
    Sink,
}

/// A Ferry token and its slot secret, as a gateway hands them to a peer (both base64).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The 208 token bytes.
    pub token: String,
    /// The 32-byte slot secret.
    pub slot_secret: String,
}

impl Grant {
    /// The grant of a minted token.
    pub fn of(token: &MintedToken) -> Self {
        Self {
            token: BASE64.encode(token.bytes),
            slot_secret: token.slot_secret.to_base64().to_string(),
        }
    }

    fn minted(&self) -> anyhow::Result<MintedToken> {
        let bytes: [u8; TOKEN_LEN] = BASE64
            .decode(&self.token)
            .context("a grant's token is not base64")?
            .try_into()
            .map_err(|_| anyhow::anyhow!("a grant's token is not {TOKEN_LEN} bytes"))?;
        let claims = parse_unverified(&bytes).context("a grant's token")?;
        let slot_secret =
            SlotSecret::from_base64(&self.slot_secret).context("a grant's slot secret")?;
        Ok(MintedToken {
            bytes,
            claims,
            slot_secret,
        })
    }
}

/// A coordinator's request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Who are you, and what does your stamp clock read now? (`{"op":"hello"}`)
    Hello {},
    /// Open a UDP socket bound to `bind` (port 0: any).
    Open {
        /// Generator or sink.
        role: Role,
        /// The local address.
        bind: SocketAddr,
    },
    /// Bind one Ferry slot per grant from `socket` at the relay address `relay`.
    Bind {
        /// A socket [`Request::Open`] returned.
        socket: u32,
        /// Where the relay receives this side's datagrams.
        relay: SocketAddr,
        /// At most [`MAX_GRANTS`].
        grants: Vec<Grant>,
    },
    /// Start counting and timing what arrives on a sink socket.
    StartSink {
        /// A sink socket.
        socket: u32,
        /// The CPU to pin the sink's thread to.
        cpu: Option<usize>,
        /// How far the sender's stamp clock may differ from this agent's, nanoseconds (0 when
        /// the sender is this agent); at most [`MAX_CLOCK_TOLERANCE_NS`].
        clock_tolerance_ns: u64,
    },
    /// Wait until nothing has arrived for 30 ms (at most 2 s), stop the sink and report.
    StopSink {
        /// A sink socket with a running sink.
        socket: u32,
    },
    /// Send DATA datagrams for sessions `first_session ..first_session + sessions` to
    /// `target` with the paced generator, then report.
    Send {
        /// A generator socket.
        socket: u32,
        /// Where the datagrams go.
        target: SocketAddr,
        /// The first session id.
        first_session: u64,
        /// How many sessions (1 to [`MAX_SESSIONS`]).
        sessions: u64,
        /// DATA body bytes or `imix`.
        payload: String,
        /// Datagrams per second, 0: as fast as it can.
        rate: u64,
        /// Datagrams back to back (bursty pacing), 0: constant pacing.
        burst: usize,
        /// How long, seconds (up to [`MAX_SEND_SECONDS`]).
        seconds: f64,
        /// The CPU to pin the sending thread to.
        cpu: Option<usize>,
    },
    /// Close a socket (a running sink on it stops).
    Close {
        /// The socket.
        socket: u32,
    },
}

/// An agent's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The answer to [`Request::Hello`].
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// The machine's host name.
        hostname: String,
        /// Its CPUs.
        cpus: usize,
        /// The agent's stamp clock ([`now_ns`]) as it answered.
        clock_ns: u64,
        /// Whether that clock is anchored to the realtime clock (nanoseconds since 1970), as
        /// `ferry-bench agent` does; otherwise it counts from the agent's start.
        realtime: bool,
    },
    /// A socket opened.
    Opened {
        /// Its id on this connection.
        socket: u32,
        /// Its local address.
        local: SocketAddr,
    },
    /// Slots bound.
    Bound {
        /// How many.
        slots: usize,
        /// How long it took, seconds.
        seconds: f64,
    },
    /// The sink runs.
    SinkStarted,
    /// What the generator sent.
    Sent {
        /// Datagrams the kernel accepted.
        datagrams: u64,
        /// Their DATA body bytes.
        body_bytes: u64,
        /// Seconds from the first send to the last.
        seconds: f64,
        /// Failed sends.
        errors: u64,
        /// Whether it sent with UDP GSO to the end (false: the kernel refused it and the
        /// generator fell back to one datagram per message).
        gso: bool,
    },
    /// What the sink counted.
    Received {
        /// Datagrams of this trial.
        datagrams: u64,
        /// Datagrams stamped before it.
        stale: u64,
        /// Datagrams stamped later than they arrived (the sender's clock is ahead).
        ahead: u64,
        /// Datagrams the kernel dropped at full receive queues on this host meanwhile
        /// (`Udp: RcvbufErrors`).
        rcvbuf_errors: u64,
        /// One-way latency in nanoseconds: hdrhistogram V2 serialization, base64.
        histogram: String,
    },
    /// A socket closed.
    Closed,
    /// The request was refused; the text says why.
    Error {
        /// Why.
        message: String,
    },
}

/// Why a frame was not read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The length field is over [`MAX_FRAME`].
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The tag does not match.
    #[error(
        "not authenticated: the frame's HMAC does not match this side's secret (different \
         secret files, or a frame replayed, reordered or changed)"
    )]
    BadTag,
}

/// One authenticated connection, either side.
struct Channel {
    stream: TcpStream,
    key: hmac::Key,
    nonces: [u8; 2 * NONCE_LEN],
    send_dir: u8,
    send_seq: u64,
    recv_seq: u64,
}

impl Channel {
    fn handshake(mut stream: TcpStream, secret: &Secret, agent_side: bool) -> anyhow::Result<Self> {
        let rng = ring::rand::SystemRandom::new();
        let mut mine = [0u8; NONCE_LEN];
        ring::rand::SecureRandom::fill(&rng, &mut mine)
            .map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        stream.write_all(&mine)?;
        let mut theirs = [0u8; NONCE_LEN];
        stream
            .read_exact(&mut theirs)
            .context("no nonce from the other side within 10 s")?;
        stream.set_read_timeout(Some(IDLE))?;
        let mut nonces = [0u8; 2 * NONCE_LEN];
        let (agent, coordinator) = if agent_side {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        nonces[..NONCE_LEN].copy_from_slice(&agent);
        nonces[NONCE_LEN..].copy_from_slice(&coordinator);
        Ok(Self {
            stream,
            key: secret.0.clone(),
            nonces,
            send_dir: if agent_side { b'A' } else { b'C' },
            send_seq: 0,
            recv_seq: 0,
        })
    }

    /// What a frame's tag covers.
    fn covered(&self, dir: u8, seq: u64, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(CONTEXT.len() + 1 + self.nonces.len() + 8 + body.len());
        m.extend_from_slice(CONTEXT);
        m.push(dir);
        m.extend_from_slice(&self.nonces);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn tag(&self, dir: u8, seq: u64, body: &[u8]) -> hmac::Tag {
        hmac::sign(&self.key, &self.covered(dir, seq, body))
    }

    fn send(&mut self, body: &[u8]) -> anyhow::Result<()> {
        if body.len() > MAX_FRAME {
            bail!("a frame of {} bytes is over the limit", body.len());
        }
        let tag = self.tag(self.send_dir, self.send_seq, body);
        self.send_seq += 1;
        let mut frame = Vec::with_capacity(4 + TAG_LEN + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(tag.as_ref());
        frame.extend_from_slice(body);
        self.stream.write_all(&frame)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Vec<u8>, FrameError> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let mut tag = [0u8; TAG_LEN];
        self.stream.read_exact(&mut tag)?;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        let dir = if self.send_dir == b'A' { b'C' } else { b'A' };
        // ring compares in constant time.
        hmac::verify(&self.key, &self.covered(dir, self.recv_seq, &body), &tag)
            .map_err(|_| FrameError::BadTag)?;
        self.recv_seq += 1;
        Ok(body)
    }
}

/// A running sink on one socket.
struct RunningSink {
    stop: Arc<AtomicBool>,
    arrivals: Arc<AtomicU64>,
    thread: JoinHandle<anyhow::Result<Received>>,
    drops_before: Option<u64>,
}

struct AgentSocket {
    role: Role,
    socket: UdpSocket,
    sink: Option<RunningSink>,
}

/// The state of one coordinator's connection: its sockets and sinks, dropped with it.
#[derive(Default)]
struct Connection {
    sockets: HashMap<u32, AgentSocket>,
    next: u32,
}

impl Drop for Connection {
    fn drop(&mut self) {
        for s in self.sockets.values_mut() {
            if let Some(sink) = s.sink.take() {
                sink.stop.store(true, Ordering::Relaxed);
                let _ = sink.thread.join();
            }
        }
    }
}

fn rcvbuf_errors() -> Option<u64> {
    let page = std::fs::read_to_string("/proc/thread-self/net/snmp").ok()?;
    KernelCounters::parse(&page)
        .ok()
        .map(|c| c.udp_rcvbuf_errors)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl Connection {
    fn socket(&mut self, id: u32, role: Role) -> anyhow::Result<&mut AgentSocket> {
        let s = self
            .sockets
            .get_mut(&id)
            .with_context(|| format!("no socket {id} on this connection"))?;
        if s.role != role {
            bail!(
                "socket {id} is a {:?} socket, not a {role:?} socket",
                s.role
            );
        }
        Ok(s)
    }

    fn handle(&mut self, request: Request, realtime: bool) -> anyhow::Result<Response> {
        Ok(match request {
            Request::Hello {} => Response::Hello {
                version: PROTOCOL_VERSION,
                hostname: hostname(),
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
                clock_ns: now_ns(),
                realtime,
            },
            Request::Open { role, bind } => {
                if self.sockets.len() >= MAX_SOCKETS {
                    bail!("this connection already holds {MAX_SOCKETS} sockets");
                }
                let udp = socket(bind).with_context(|| format!("binding {bind}"))?;
                let local = udp.local_addr()?;
                let id = self.next;
                self.next += 1;
                self.sockets.insert(
                    id,
                    AgentSocket {
                        role,
                        socket: udp,
                        sink: None,
                    },
                );
                Response::Opened { socket: id, local }
            }
            Request::Bind {
                socket: id,
                relay,
                grants,
            } => {
                if grants.is_empty() || grants.len() > MAX_GRANTS {
                    bail!(
                        "a bind carries 1 to {MAX_GRANTS} grants, not {}",
                        grants.len()
                    );
                }
                let tokens = grants
                    .iter()
                    .map(Grant::minted)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let s = self
                    .sockets
                    .get(&id)
                    .with_context(|| format!("no socket {id} on this connection"))?;
                if s.sink.is_some() {
                    bail!("socket {id} has a running sink");
                }
                let started = Instant::now();
                for t in &tokens {
                    super::paths::bind(&s.socket, relay, t).with_context(|| {
                        format!(
                            "binding slot {:?} of session {:#x} at {relay}",
                            t.claims.slot, t.claims.session_id
                        )
                    })?;
                }
                Response::Bound {
                    slots: tokens.len(),
                    seconds: started.elapsed().as_secs_f64(),
                }
            }
            Request::StartSink {
                socket: id,
                cpu,
                clock_tolerance_ns,
            } => {
                if clock_tolerance_ns > MAX_CLOCK_TOLERANCE_NS {
                    bail!("a clock tolerance of {clock_tolerance_ns} ns is over 1 s");
                }
                let s = self.socket(id, Role::Sink)?;
                if s.sink.is_some() {
                    bail!("socket {id} already has a running sink");
                }
                super::load::drain(&s.socket)?;
                let udp = s.socket.try_clone()?;
                let stop = Arc::new(AtomicBool::new(false));
                let arrivals = Arc::new(AtomicU64::new(0));
                let since = now_ns();
                let thread = {
                    let (stop, arrivals) = (Arc::clone(&stop), Arc::clone(&arrivals));
                    std::thread::spawn(move || {
                        super::load::sink_across_clocks(
                            &udp,
                            since,
                            clock_tolerance_ns,
                            cpu,
                            &stop,
                            &arrivals,
                        )
                    })
                };
                s.sink = Some(RunningSink {
                    stop,
                    arrivals,
                    thread,
                    drops_before: rcvbuf_errors(),
                });
                Response::SinkStarted
            }
            Request::StopSink { socket: id } => {
                let s = self.socket(id, Role::Sink)?;
                let sink = s
                    .sink
                    .take()
                    .with_context(|| format!("socket {id} has no running sink"))?;
                // Until nothing arrived for 30 ms (at most 2 s), as the namespace harness waits.
                let deadline = Instant::now() + Duration::from_secs(2);
                let mut seen = sink.arrivals.load(Ordering::Relaxed);
                loop {
                    std::thread::sleep(Duration::from_millis(30));
                    let now = sink.arrivals.load(Ordering::Relaxed);
                    if now == seen || Instant::now() > deadline {
                        break;
                    }
                    seen = now;
                }
                sink.stop.store(true, Ordering::Relaxed);
                let received = sink
                    .thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("the sink thread panicked"))??;
                let drops = match (sink.drops_before, rcvbuf_errors()) {
                    (Some(a), Some(b)) => b.saturating_sub(a),
                    _ => 0,
                };
                let mut bytes = Vec::new();
                V2Serializer::new()
                    .serialize(&received.latency, &mut bytes)
                    .map_err(|e| anyhow::anyhow!("serializing the histogram: {e:?}"))?;
                Response::Received {
                    datagrams: received.datagrams,
                    stale: received.stale,
                    ahead: received.ahead,
                    rcvbuf_errors: drops,
                    histogram: BASE64.encode(bytes),
                }
            }
            Request::Send {
                socket: id,
                target,
                first_session,
                sessions,
                payload,
                rate,
                burst,
                seconds,
                cpu,
            } => {
                if !(1..=MAX_SESSIONS).contains(&sessions) {
                    bail!("sessions: 1 to {MAX_SESSIONS}, not {sessions}");
                }
                if first_session == 0 || first_session.checked_add(sessions).is_none() {
                    bail!("session ids start at 1 and do not wrap");
                }
                if !(seconds > 0.0 && seconds <= MAX_SEND_SECONDS) {
                    bail!("a send lasts more than 0 and at most {MAX_SEND_SECONDS} s");
                }
                let payload = Payload::parse(&payload)?;
                let pacing = match burst {
                    0 => Pacing::Constant,
                    b => Pacing::Bursty {
                        burst: b.clamp(1, 1024),
                    },
                };
                let s = self.socket(id, Role::Generator)?;
                let flows = (0..sessions)
                    .map(|i| Flow {
                        socket: 0,
                        target,
                        framing: Framing::FerryData {
                            session: first_session + i,
                        },
                    })
                    .collect();
                let generator = Generator::new(vec![s.socket.try_clone()?], flows)?;
                let sent =
                    generator.run(payload, rate, pacing, seconds, cpu, &AtomicBool::new(false))?;
                Response::Sent {
                    datagrams: sent.datagrams,
                    body_bytes: sent.body_bytes,
                    seconds: sent.seconds,
                    errors: sent.errors,
                    gso: generator.uses_gso(),
                }
            }
            Request::Close { socket: id } => {
                let mut s = self
                    .sockets
                    .remove(&id)
                    .with_context(|| format!("no socket {id} on this connection"))?;
                if let Some(sink) = s.sink.take() {
                    sink.stop.store(true, Ordering::Relaxed);
                    let _ = sink.thread.join();
                }
                Response::Closed
            }
        })
    }
}

fn error_body(message: String) -> Vec<u8> {
    serde_json::to_vec(&Response::Error { message }).unwrap_or_default()
}

/// Serves one coordinator until it disconnects, refusing what it must.
fn serve_connection(stream: TcpStream, secret: &Secret, realtime: bool) -> anyhow::Result<()> {
    let peer = stream.peer_addr()?;
    let mut channel = Channel::handshake(stream, secret, true)?;
    let mut state = Connection::default();
    loop {
        let body = match channel.recv() {
            Ok(body) => body,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(());
            }
            Err(e @ (FrameError::BadTag | FrameError::TooLarge(_))) => {
                let message = format!("refused: {e}; closing the connection");
                eprintln!("ferry-bench agent: {peer}: {message}");
                let _ = channel.send(&error_body(message));
                return Ok(());
            }
            Err(FrameError::Io(e)) => return Err(e.into()),
        };
        let answer = match serde_json::from_slice::<Request>(&body) {
            Err(e) => {
                let message = format!("refused: not a valid request: {e}");
                eprintln!("ferry-bench agent: {peer}: {message}");
                error_body(message)
            }
            Ok(request) => match state.handle(request, realtime) {
                Ok(response) => serde_json::to_vec(&response)?,
                Err(e) => {
                    let message = format!("{e:#}");
                    eprintln!("ferry-bench agent: {peer}: request failed: {message}");
                    error_body(message)
                }
            },
        };
        channel.send(&answer)?;
    }
}

/// Serves coordinators on `listener` until the process ends, each connection in a thread of
/// its own (at most [`MAX_CONNECTIONS`]). `realtime` says whether this process's stamp clock
/// was anchored to the realtime clock ([`super::load::anchor_epoch_to_realtime`]).
pub fn serve(listener: TcpListener, secret: Arc<Secret>, realtime: bool) -> anyhow::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ferry-bench agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            eprintln!(
                "ferry-bench agent: refusing {:?}: {MAX_CONNECTIONS} connections already",
                stream.peer_addr()
            );
            continue;
        }
        let (secret, active) = (Arc::clone(&secret), Arc::clone(&active));
        std::thread::spawn(move || {
            if let Err(e) = serve_connection(stream, &secret, realtime) {
                eprintln!("ferry-bench agent: connection ended: {e:#}");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

/// The coordinator's connection to one agent.
pub struct AgentClient {
    channel: Channel,
    /// The agent's name in the testbed file.
    pub name: String,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("name", &self.name)
            .finish()
    }
}

/// What the sink of one trial reported, decoded.
#[derive(Debug)]
pub struct SinkReport {
    /// Datagrams of this trial.
    pub datagrams: u64,
    /// Datagrams stamped before it.
    pub stale: u64,
    /// Datagrams stamped later than they arrived.
    pub ahead: u64,
    /// Kernel drops at full receive queues on the sink's host.
    pub rcvbuf_errors: u64,
    /// One-way latency, nanoseconds.
    pub latency: Histogram<u64>,
}

impl AgentClient {
    /// Connects to the agent `name` at `addr` (within 5 s) and authenticates with `secret`.
    pub fn connect(name: &str, addr: SocketAddr, secret: &Secret) -> anyhow::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("agent {name}: connecting to {addr}"))?;
        let channel = Channel::handshake(stream, secret, false)
            .with_context(|| format!("agent {name} at {addr}: handshake"))?;
        Ok(Self {
            channel,
            name: name.to_string(),
        })
    }

    /// Sends `request` and returns the answer; an [`Response::Error`] becomes an error.
    pub fn call(&mut self, request: &Request) -> anyhow::Result<Response> {
        let body = serde_json::to_vec(request)?;
        self.call_raw(&body)
    }

    /// Sends `body` as a request as it is (tests send malformed ones) and returns the answer.
    pub fn call_raw(&mut self, body: &[u8]) -> anyhow::Result<Response> {
        let name = self.name.clone();
        self.channel.send(body)?;
        let answer = match self.channel.recv() {
            Ok(answer) => answer,
            Err(FrameError::BadTag) => {
                bail!(
                    "agent {name}: its answer is not authenticated with this secret (do the \
                     agent and the coordinator read the same secret file?)"
                )
            }
            Err(e) => return Err(anyhow::anyhow!("agent {name}: {e}")),
        };
        match serde_json::from_slice::<Response>(&answer)
            .with_context(|| format!("agent {name}: a malformed answer"))?
        {
            Response::Error { message } => bail!("agent {name}: {message}"),
            other => Ok(other),
        }
    }

    /// Opens a socket of `role` bound to `bind`: its id and local address.
    pub fn open(&mut self, role: Role, bind: SocketAddr) -> anyhow::Result<(u32, SocketAddr)> {
        match self.call(&Request::Open { role, bind })? {
            Response::Opened { socket, local } => Ok((socket, local)),
            other => bail!("agent {}: unexpected answer {other:?}", self.name),
        }
    }

    /// Binds one slot per token from `socket` at `relay`, [`MAX_GRANTS`] at a time; the seconds
    /// it took.
    pub fn bind(
        &mut self,
        socket: u32,
        relay: SocketAddr,
        tokens: &[MintedToken],
    ) -> anyhow::Result<f64> {
        let mut seconds = 0.0;
        for chunk in tokens.chunks(MAX_GRANTS) {
            super::check_interrupted()?;
            let grants = chunk.iter().map(Grant::of).collect();
            match self.call(&Request::Bind {
                socket,
                relay,
                grants,
            })? {
                Response::Bound { seconds: s, .. } => seconds += s,
                other => bail!("agent {}: unexpected answer {other:?}", self.name),
            }
        }
        Ok(seconds)
    }

    /// Stops the sink on `socket` and decodes its report.
    pub fn stop_sink(&mut self, socket: u32) -> anyhow::Result<SinkReport> {
        match self.call(&Request::StopSink { socket })? {
            Response::Received {
                datagrams,
                stale,
                ahead,
                rcvbuf_errors,
                histogram,
            } => {
                let bytes = BASE64
                    .decode(histogram)
                    .with_context(|| format!("agent {}: a histogram not in base64", self.name))?;
                let latency: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .map_err(|e| anyhow::anyhow!("agent {}: histogram: {e:?}", self.name))?;
                Ok(SinkReport {
                    datagrams,
                    stale,
                    ahead,
                    rcvbuf_errors,
                    latency,
                })
            }
            other => bail!("agent {}: unexpected answer {other:?}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn agent() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        let secret = Arc::new(Secret::from_bytes(SECRET).expect("secret"));
        std::thread::spawn(move || serve(listener, secret, false));
        addr
    }

    fn client(addr: SocketAddr) -> AgentClient {
        AgentClient::connect("test", addr, &Secret::from_bytes(SECRET).expect("secret"))
            .expect("connect")
    }

    #[test]
    fn short_secrets_and_open_secret_files_are_refused() {
        let err = Secret::from_bytes(b"  short  \n").expect_err("too short");
        assert!(format!("{err}").contains("at least 32"), "{err}");
        let dir = ferry_testkit::temp_dir("agent-secret").expect("dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, SECRET).expect("write");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Secret::load(&path).expect_err("readable by others");
        assert!(format!("{err}").contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Secret::load(&path).expect("a private file of 32 bytes");
    }

    #[test]
    fn a_wrong_secret_is_refused_and_the_connection_closed() {
        let addr = agent();
        let wrong = Secret::from_bytes(b"another secret of at least 32 bytes!").expect("secret");
        let mut c = AgentClient::connect("test", addr, &wrong).expect("connect");
        let err = c.call(&Request::Hello {}).expect_err("refused");
        assert!(format!("{err}").contains("not authenticated"), "{err}");
        // The agent closed the connection.
        assert!(c.call(&Request::Hello {}).is_err());
        // And it still serves a coordinator with the right secret.
        assert!(matches!(
            client(addr).call(&Request::Hello {}).expect("hello"),
            Response::Hello { version: 1, .. }
        ));
    }

    #[test]
    fn a_replayed_or_changed_frame_fails_its_tag() {
        let addr = agent();
        let secret = Secret::from_bytes(SECRET).expect("secret");
        let mut c = AgentClient::connect("test", addr, &secret).expect("connect");
        // A frame tagged for sequence number 1 arrives first: as if frame 0 were dropped
        // or a later frame replayed in its place.
        let body = serde_json::to_vec(&Request::Hello {}).expect("json");
        c.channel.send_seq = 1;
        let err = c.call_raw(&body).expect_err("out of order");
        assert!(format!("{err}").contains("refused"), "{err}");

        let mut c = AgentClient::connect("test", addr, &secret).expect("connect");
        let tag = c.channel.tag(b'C', 0, &body);
        let mut changed = body.clone();
        changed[2] ^= 1;
        let mut frame = (changed.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(tag.as_ref());
        frame.extend_from_slice(&changed);
        c.channel.stream.write_all(&frame).expect("write");
        c.channel.send_seq = 1;
        let answer = c.channel.recv().expect("an authenticated refusal");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("not authenticated"), "{text}");
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        let addr = agent();
        let mut c = client(addr);
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0u8; TAG_LEN]);
        c.channel.stream.write_all(&frame).expect("write");
        let answer = c.channel.recv().expect("an authenticated refusal");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("over the limit"), "{text}");
    }

    #[test]
    fn malformed_and_out_of_range_requests_get_errors_and_the_connection_stays() {
        let addr = agent();
        let mut c = client(addr);
        for (body, says) in [
            (&b"not json"[..], "not a valid request"),
            (br#"{"op":"format_disk"}"#, "unknown variant"),
            (br#"{"op":"hello","extra":1}"#, "unknown field"),
            (br#"{"op":"close"}"#, "missing field"),
            (br#"{"op":"close","socket":7}"#, "no socket 7"),
            (
                br#"{"op":"start_sink","socket":0,"cpu":null,"clock_tolerance_ns":5000000000}"#,
                "over 1 s",
            ),
        ] {
            let err = c.call_raw(body).expect_err("refused");
            assert!(format!("{err}").contains(says), "{err} (wanted {says})");
        }
        let (id, _) = c
            .open(Role::Generator, "127.0.0.1:0".parse().expect("addr"))
            .expect("open");
        for (request, says) in [
            (
                Request::Send {
                    socket: id,
                    target: "127.0.0.1:9".parse().expect("addr"),
                    first_session: 1,
                    sessions: 1,
                    payload: "64".into(),
                    rate: 100,
                    burst: 0,
                    seconds: 601.0,
                    cpu: None,
                },
                "at most 600",
            ),
            (
                Request::Send {
                    socket: id,
                    target: "127.0.0.1:9".parse().expect("addr"),
                    first_session: 1,
                    sessions: 0,
                    payload: "64".into(),
                    rate: 100,
                    burst: 0,
                    seconds: 1.0,
                    cpu: None,
                },
                "sessions",
            ),
            (
                Request::StartSink {
                    socket: id,
                    cpu: None,
                    clock_tolerance_ns: 0,
                },
                "not a Sink socket",
            ),
            (
                Request::Bind {
                    socket: id,
                    relay: "127.0.0.1:9".parse().expect("addr"),
                    grants: vec![Grant {
                        token: "AAAA".into(),
                        slot_secret: "AAAA".into(),
                    }],
                },
                "not 208 bytes",
            ),
        ] {
            let err = c.call(&request).expect_err("refused");
            assert!(format!("{err}").contains(says), "{err} (wanted {says})");
        }
        assert!(matches!(
            c.call(&Request::Hello {}).expect("still served"),
            Response::Hello { .. }
        ));
    }

    #[test]
    fn a_generator_and_a_sink_report_counts_and_a_histogram() {
        let addr = agent();
        let (mut g, mut s) = (client(addr), client(addr));
        let lo: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let (sink, sink_addr) = s.open(Role::Sink, lo).expect("sink");
        let (generator, _) = g.open(Role::Generator, lo).expect("generator");
        s.call(&Request::StartSink {
            socket: sink,
            cpu: None,
            clock_tolerance_ns: 0,
        })
        .expect("start");
        let sent = g
            .call(&Request::Send {
                socket: generator,
                target: sink_addr,
                first_session: 5,
                sessions: 3,
                payload: "imix".into(),
                rate: 2000,
                burst: 0,
                seconds: 0.2,
                cpu: None,
            })
            .expect("send");
        let Response::Sent { datagrams, .. } = sent else {
            panic!("{sent:?}")
        };
        let got = s.stop_sink(sink).expect("stop");
        assert!(datagrams > 0 && got.datagrams > 0 && got.datagrams <= datagrams);
        assert_eq!(got.latency.len(), got.datagrams);
        assert!(matches!(
            s.call(&Request::Close { socket: sink }).expect("close"),
            Response::Closed
        ));
    }
}
