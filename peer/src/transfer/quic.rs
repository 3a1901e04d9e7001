//! QUIC set up as the transfer's reliability and congestion-control layer over a
//! [`DatagramLink`](crate::link::DatagramLink): one QUIC datagram is one link message, no path
//! MTU discovery, no GSO, one bidirectional stream.
//!
//! # Why the client accepts any server certificate
//!
//! Every link message is a Noise transport message between two peers that authenticated each
//! other's static keys in the Noise handshake; the relay forwards them without being able to
//! read or forge them. So the only party that can answer the QUIC client is the peer it already
//! authenticated, and QUIC's TLS adds nothing to who the other end is. The receiver therefore
//! makes a throw-away self-signed certificate per transfer, and the client accepts whatever
//! certificate arrives ([`NoiseAuthenticatedServer`]), still checking the handshake signature
//! made with it, as TLS 1.3 requires. Pinning the certificate's hash would need one more message
//! outside QUIC and could only ever confirm what Noise already proved. Nothing about Ferry's
//! guarantees rests on this TLS: confidentiality and integrity on the path come from Noise (TLS
//! encrypts a second time inside it), and the end-to-end SHA-256 of the content catches faults
//! in the transfer's own code.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{
    ClientConfig, EndpointConfig, IdleTimeout, ServerConfig, TransportConfig, VarInt,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::{Congestion, TransferError, TransferOptions};

/// QUIC's smallest allowed UDP payload (RFC 9000 §14): a link that carries less cannot run it.
pub(crate) const QUIC_MIN_PAYLOAD: usize = 1200;

/// The largest datagram the QUIC client sends, from its first Initial on: the limit of a peer
/// whose relay address is IPv6 (protocol.md §1, §9.4). The client learns the server's limit
/// only from the server's transport parameters, after its first flight; keeping to the smaller
/// family's limit from the start makes that flight fit the server's path whatever its family.
/// Without path MTU discovery the client's packets keep that size for the whole connection
/// (1.4 % more packets than 1427 over an IPv4 pair; the server's packets are not affected).
pub(crate) const CLIENT_MAX_DATAGRAM: u16 = 1407;

/// Which end of the QUIC connection a config is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The sender, which connects and opens the stream.
    Client,
    /// The receiver, which accepts one connection and one stream.
    Server,
}

/// The name the client asks for; the certificate is made for it, and it is never looked up.
pub(crate) const SERVER_NAME: &str = "ferry-transfer.invalid";

/// The address QUIC files the other peer under. It is only a label: every datagram goes
/// through the link, none to this address.
pub(crate) const PEER_LABEL: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::LOCALHOST), 1);

/// The TLS 1.3 cipher suite QUIC's packets use, chosen by measurement (AES-128-GCM with the
/// CPU's AES instructions beat ChaCha20-Poly1305 on this transfer; see the crate's figures).
/// QUIC's Initial packets use AES-128-GCM whatever is chosen (RFC 9001 §5.2).
fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider
}

/// The suite of QUIC's Initial packets.
fn initial_suite() -> Result<rustls::quic::Suite, TransferError> {
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|suite| suite.quic_suite())
        .ok_or_else(|| TransferError::Setup("ring offers no QUIC AES-128-GCM suite".into()))
}

/// The largest QUIC datagram: the link's largest message, within what QUIC can express.
pub(crate) fn datagram_size(max_payload: usize) -> Result<u16, TransferError> {
    if max_payload < QUIC_MIN_PAYLOAD {
        return Err(TransferError::LinkTooSmall(max_payload));
    }
    Ok(u16::try_from(max_payload).unwrap_or(u16::MAX).min(65527))
}

/// The endpoint config: datagrams no larger than the link's.
pub(crate) fn endpoint_config(datagram: u16) -> Result<Arc<EndpointConfig>, TransferError> {
    let mut config = EndpointConfig::default();
    config
        .max_udp_payload_size(datagram)
        .map_err(|e| TransferError::Setup(format!("QUIC endpoint: {e}")))?;
    Ok(Arc::new(config))
}

/// The transport config of either side, whose link carries `datagram` bytes at most. The
/// server lets the client open one bidirectional stream (the transfer's), the client accepts
/// none; the client sends no datagram over [`CLIENT_MAX_DATAGRAM`].
pub(crate) fn transport_config(
    options: &TransferOptions,
    datagram: u16,
    role: Role,
) -> Result<Arc<TransportConfig>, TransferError> {
    let (accept_streams, mtu) = match role {
        Role::Client => (0, datagram.min(CLIENT_MAX_DATAGRAM)),
        Role::Server => (1, datagram),
    };
    let idle = IdleTimeout::try_from(options.idle_timeout).map_err(|_| {
        TransferError::Setup(format!(
            "idle timeout {:?} is too long for QUIC",
            options.idle_timeout
        ))
    })?;
    let window = VarInt::from_u64(options.window).map_err(|_| {
        TransferError::Setup(format!("window of {} bytes is too large", options.window))
    })?;
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle))
        // Keep-alives let a live but busy peer (a slow disk) never look idle; only silence does.
        .keep_alive_interval(Some(
            (options.idle_timeout / 3)
                .min(super::KEEP_ALIVE)
                .max(Duration::from_millis(100)),
        ))
        // Client Initials are padded to `min_mtu` (at least QUIC's 1200); with no path MTU
        // discovery nothing grows past `initial_mtu`, and nothing shrinks below `min_mtu`.
        .initial_mtu(mtu)
        .min_mtu(mtu)
        .mtu_discovery_config(None)
        .enable_segmentation_offload(false)
        .stream_receive_window(window)
        .receive_window(window)
        .send_window(options.window)
        .max_concurrent_bidi_streams(VarInt::from_u32(accept_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    match options.congestion {
        Congestion::Cubic => {
            transport.congestion_controller_factory(Arc::new(CubicConfig::default()))
        }
        Congestion::NewReno => {
            transport.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
        }
        Congestion::Bbr => transport.congestion_controller_factory(Arc::new(BbrConfig::default())),
    };
    Ok(Arc::new(transport))
}

/// The receiver's (QUIC server's) config, with a fresh self-signed certificate.
pub(crate) fn server_config(
    transport: Arc<TransportConfig>,
) -> Result<Arc<ServerConfig>, TransferError> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .map_err(|e| TransferError::Setup(format!("making the transfer's certificate: {e}")))?;
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransferError::Setup(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| TransferError::Setup(format!("TLS certificate: {e}")))?;
    let crypto = QuicServerConfig::with_initial(Arc::new(tls), initial_suite()?)
        .map_err(|e| TransferError::Setup(format!("QUIC TLS: {e}")))?;
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport).migration(false);
    Ok(Arc::new(config))
}

/// The sender's (QUIC client's) config.
pub(crate) fn client_config(
    transport: Arc<TransportConfig>,
) -> Result<ClientConfig, TransferError> {
    let provider = provider();
    let verifier = Arc::new(NoiseAuthenticatedServer {
        algorithms: provider.signature_verification_algorithms,
    });
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransferError::Setup(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let crypto = QuicClientConfig::with_initial(Arc::new(tls), initial_suite()?)
        .map_err(|e| TransferError::Setup(format!("QUIC TLS: {e}")))?;
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// The client's certificate check: any certificate, because the link under QUIC already
/// authenticates the other peer (see the module doc); the TLS 1.3 handshake signature is still
/// verified against the certificate presented.
#[derive(Debug)]
struct NoiseAuthenticatedServer {
    /// The signature algorithms of the crypto provider.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoiseAuthenticatedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "QUIC runs only on TLS 1.3; a TLS 1.2 signature is refused".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
