//! The HTTPS listener's rustls configuration: ring as the only crypto provider, TLS 1.3 and
//! 1.2 (rustls speaks nothing older, and prefers 1.3), certificate chain and key from PEM
//! files, and optional client certificates (mTLS) checked against a CA file.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Why the TLS files could not be turned into a server config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The private key file may be read by group or others.
    #[error(
        "{path} is open to group or others (mode {mode:04o}); run `chmod 600 {path}`",
        path = path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file holds no usable PEM item of the kind expected.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected or wrong.
        what: String,
    },
    /// The private key is PEM, but of a kind or size rustls with ring cannot sign with (or its
    /// DER is corrupt).
    #[error(
        "{}: the gateway (rustls with ring) cannot sign with this private key: it is of a kind or \
         size not supported (such as RSA under 2048 bits, P-521, Ed448 or DSA), or corrupt; \
         supported are {SUPPORTED_KEYS}",
        path.display()
    )]
    UnsupportedKey {
        /// The key file.
        path: PathBuf,
    },
    /// rustls refused the certificate, key or CA.
    #[error("{0}")]
    Rustls(String),
}

/// The private keys rustls with ring signs with.
pub const SUPPORTED_KEYS: &str =
    "RSA keys of 2048 to 4096 bits, ECDSA keys on P-256 or P-384, and Ed25519 keys";

/// What is wrong with a PEM file, in words (the library's own message shows a truncated
/// section's label as a list of byte values).
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(end_marker);
            format!(
                "PEM section `{label}` is not terminated: no `-----END {label}-----` line (truncated file?)"
            )
        }
        Error::IllegalSectionStart { line } => format!(
            "malformed PEM section start line {:?}",
            String::from_utf8_lossy(line)
        ),
        Error::Base64Decode(e) => format!("the base64 text of a PEM section is corrupt ({e})"),
        other => other.to_string(),
    }
}

fn read_pem(path: &Path, secret: bool) -> Result<Vec<u8>, TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    // Anything but a regular file is refused before its permissions are looked at (a
    // directory is called one, not told to `chmod 600`), and a FIFO without blocking.
    let file = ferry_keyfile::open_regular_file(path).map_err(io)?;
    if secret {
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TlsError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let text = ferry_keyfile::read_text_at_most(file, ferry_keyfile::MAX_PEM_FILE).map_err(io)?;
    Ok(text.as_bytes().to_vec())
}

/// Reads every certificate of a PEM file (a chain, leaf first, or a CA bundle).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(path, false)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("not a PEM certificate file: {}", pem_problem(&e)),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no CERTIFICATE found".into(),
        });
    }
    Ok(certs)
}

/// Reads the private key (PKCS#8, SEC1 or PKCS#1 PEM); the file must be mode 0600.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = zeroize::Zeroizing::new(read_pem(path, true)?);
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key found (expected PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)"
                    .into()
            }
            e => format!("not a PEM private key file: {}", pem_problem(&e)),
        },
    })
}

/// The crypto provider every TLS config of the gateway uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server config from the certificate chain, key and optional client CA files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTls, TlsError> {
    let chain = load_certs(cert)?;
    let key_path = key;
    let key = load_key(key)?;
    let provider = provider();
    // Loaded once on its own so that a key rustls cannot sign with is named as such, not
    // reported as one that failed to parse.
    if provider
        .key_provider
        .load_private_key(key.clone_key())
        .is_err()
    {
        return Err(TlsError::UnsupportedKey {
            path: key_path.to_owned(),
        });
    }
    let validity = Validity::of(&chain[0]);
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: ca.to_owned(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Rustls(format!(
            "the key {} is not the key of the certificate {}",
            key_path.display(),
            cert.display()
        )),
        e => TlsError::Rustls(format!("certificate and key: {e}")),
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        validity,
    })
}

/// The HTTPS listener's TLS: the rustls config and its certificate's validity dates.
#[derive(Debug)]
pub struct ServerTls {
    /// The rustls server config.
    pub config: Arc<ServerConfig>,
    /// The leaf certificate's validity, or why it could not be read.
    pub validity: Result<Validity, String>,
}

impl ServerTls {
    /// A warning for the operator if the certificate is expired or not yet valid at `now`
    /// (Unix seconds), or its dates cannot be read; `None` if it is valid. rustls does not
    /// look at the dates of its own certificate, but every client does.
    pub fn warning(&self, cert: &Path, now: i64) -> Option<String> {
        let path = cert.display();
        match &self.validity {
            Err(e) => Some(format!(
                "{path}: cannot read the certificate's validity dates ({e}); check them with \
                 `openssl x509 -noout -dates -in {path}`"
            )),
            Ok(v) if now > v.not_after => Some(format!(
                "{path}: the certificate expired on {} (notAfter): clients will refuse it; renew it \
                 and reload (SIGHUP)",
                utc_date(v.not_after)
            )),
            Ok(v) if now < v.not_before => Some(format!(
                "{path}: the certificate is not valid before {} (notBefore): clients will refuse it \
                 until then (or this machine's clock is wrong)",
                utc_date(v.not_before)
            )),
            Ok(_) => None,
        }
    }
}

/// A certificate's validity period (RFC 5280 §4.1.2.5), Unix seconds, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// notBefore.
    pub not_before: i64,
    /// notAfter.
    pub not_after: i64,
}

impl Validity {
    /// Reads the validity field of a DER X.509 certificate: `Certificate ::= SEQUENCE {
    /// tbsCertificate, signatureAlgorithm, signatureValue }`, `tbsCertificate ::= SEQUENCE {
    /// [0] version OPTIONAL, serialNumber, signature, issuer, validity, subject,
    /// subjectPublicKeyInfo, ... }`, `Validity ::= SEQUENCE { notBefore Time, notAfter Time }`,
    /// each `Time` a UTCTime or a GeneralizedTime. Everything else is skipped unread.
    pub fn of(cert: &[u8]) -> Result<Self, String> {
        use yasna::Tag;
        fn time(r: yasna::BERReader<'_, '_>) -> yasna::ASN1Result<i64> {
            match r.lookahead_tag()? {
                yasna::tags::TAG_UTCTIME => Ok(r.read_utctime()?.datetime().unix_timestamp()),
                yasna::tags::TAG_GENERALIZEDTIME => {
                    Ok(r.read_generalized_time()?.datetime().unix_timestamp())
                }
                _ => Err(yasna::ASN1Error::new(yasna::ASN1ErrorKind::Invalid)),
            }
        }
        yasna::parse_ber(cert, |r| {
            r.read_sequence(|r| {
                let validity = r.next().read_sequence(|r| {
                    r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
                    for _ in ["serialNumber", "signature", "issuer"] {
                        r.next().read_der()?;
                    }
                    let validity = r.next().read_sequence(|r| {
                        Ok(Validity {
                            not_before: time(r.next())?,
                            not_after: time(r.next())?,
                        })
                    })?;
                    // subject, subjectPublicKeyInfo, then the optional unique ids and
                    // extensions.
                    while r.read_optional(|r| r.read_der())?.is_some() {}
                    Ok(validity)
                })?;
                r.next().read_der()?;
                r.next().read_der()?;
                Ok(validity)
            })
        })
        .map_err(|e| format!("not an X.509 certificate: {e}"))
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian calendar).
pub fn utc_date(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (H. Hinnant, "chrono-Compatible Low-Level Date
    // Algorithms", civil_from_days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A throwaway RSA-1024 key (PKCS#8), which ring does not sign with; test use only.
    pub(crate) const RSA_1024_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIICdgIBADANBgkqhkiG9w0BAQEFAASCAmAwggJcAgEAAoGBAMCEsL7/0EQOS4WJ
PmcDcewsRqN8I8xEnV4aao7ZFQUeJ7uHhUy0E8D/Vz/5odHM0HB/pdAquCGvqa4A
nGCDzv7kW9jAyjBHfr2KdOlRjDs0h5xGV8xAxET1VkcBvuTDOG4ihYox+0nA1nFj
uv7Ux91r3q9R2kwiIICxK285VJZXAgMBAAECgYAh/Ap7XQs1yFQ6mXSjmK8WouZB
W9ux5nblMsKWvumAAse+yfiVBsDp8+lCCN4w+/fbtBzgN3pTr//DEKaKPxpeBBeS
xRgFpx3gfQESqLuPwJjCwCmE/kDsZVnnWZxEf6tCqmsikQFUn0JNf5N5J2VhKAbN
+WLge79Hf2EJoDYbWQJBAOjsJ7HqUrZoBbm41nv48cVaP8MZLRXKtmIXHKDhVZDV
ThgO1xk6EyM93LxoGGg0rPRqAy7HjpxHtWYY8fChLE0CQQDTl7lzt4JrBEWdaDzW
dKDyilYCO1fl9YmRcp63cGYmjdMydBxmtt2adJsSzPb06qCaVJvYtDZDF3SaWGoB
QU8zAkB+av44cEeoPNkurgWrj7gZNxx4VYfE1hsbLhQZtXNtgng6UoOoa37Ll93g
XFcy57QfjBJiJ2ldpQXtfgiCY9fZAkBlWICtGjJPS8aENE8fcNE+GmBDxWS+cjKo
BbxbpGxo/vkva0nHMMNHnZ5BDQckG9U81lWnH/n1fKCO5NYxL7TdAkEAuXjBpYew
CaCgAeFA1jmPeBxdKhBaN8mfeC+U0gU8fPv/f2t2F/5dXzW2yiTI/pKIcbt7FelK
qGIEpBXHB/PKhQ==
-----END PRIVATE KEY-----
";

    /// A throwaway Ed448 key (PKCS#8), which ring does not sign with; test use only.
    const ED448_KEY: &str = "-----BEGIN PRIVATE KEY-----
MEcCAQAwBQYDK2VxBDsEOeM1XtDi9Hxm7J9fmRbevMSZ7G6A0J3BuAb3pNvxWkOq
i45l0DS/UBDJPNBzwzLkx/wB3zEhS7uCOQ==
-----END PRIVATE KEY-----
";

    /// A self-signed certificate for localhost valid from `from` to `until` (y, m, d), PEM,
    /// and its key, PEM.
    pub(crate) fn cert_valid(from: (i32, u8, u8), until: (i32, u8, u8)) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    struct Files(PathBuf);

    impl Files {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "ferry-gw-tls-{}-{name}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            use std::os::unix::fs::OpenOptionsExt as _;
            let path = self.0.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap();
            std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
            path
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn the_validity_is_read_in_utc_time_and_in_generalized_time() {
        // Years before 2050 are UTCTime, from 2050 on GeneralizedTime (RFC 5280 §4.1.2.5).
        let (pem, _) = cert_valid((2020, 1, 1), (2100, 1, 2));
        assert_eq!(
            Validity::of(&der(&pem)),
            Ok(Validity {
                not_before: 1_577_836_800,
                not_after: 4_102_531_200,
            })
        );
        let (pem, _) = cert_valid((1999, 12, 31), (2049, 12, 31));
        let v = Validity::of(&der(&pem)).unwrap();
        assert_eq!(utc_date(v.not_before), "1999-12-31 00:00:00 UTC");
        assert_eq!(utc_date(v.not_after), "2049-12-31 00:00:00 UTC");
        // Not a certificate; a certificate cut short.
        assert!(Validity::of(b"\x30\x03\x02\x01\x01").is_err());
        let whole = der(&pem);
        assert!(Validity::of(&whole[..whole.len() / 2]).is_err());
        assert!(Validity::of(&[]).is_err());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_named_with_both_files() {
        let files = Files::new("mismatch");
        let (cert, _) = cert_valid((2020, 1, 1), (2100, 1, 1));
        let (_, other_key) = cert_valid((2020, 1, 1), (2100, 1, 1));
        let cert = files.write("gw.crt", &cert);
        let key = files.write("other.key", &other_key);
        let Err(e) = server_config(&cert, &key, None) else {
            panic!("a key of another certificate was accepted");
        };
        let message = e.to_string();
        assert!(
            message.contains("other.key is not the key of the certificate")
                && message.contains("gw.crt"),
            "{message}"
        );
    }

    #[test]
    fn utc_dates_are_written_out() {
        for (unix, text) in [
            (0, "1970-01-01 00:00:00 UTC"),
            (-1, "1969-12-31 23:59:59 UTC"),
            (951_782_400, "2000-02-29 00:00:00 UTC"),
            (1_577_923_200, "2020-01-02 00:00:00 UTC"),
            (1_709_210_096, "2024-02-29 12:34:56 UTC"),
            (4_102_444_799, "2099-12-31 23:59:59 UTC"),
            (253_402_300_799, "9999-12-31 23:59:59 UTC"),
        ] {
            assert_eq!(utc_date(unix), text, "{unix}");
        }
    }

    #[test]
    fn an_expired_or_not_yet_valid_certificate_gets_a_warning_naming_the_date() {
        let files = Files::new("dates");
        let key = files.write("any.key", &cert_valid((2020, 1, 1), (2020, 1, 2)).1);
        for (name, from, until, expected) in [
            (
                "expired",
                (2020, 1, 1),
                (2020, 1, 2),
                Some("the certificate expired on 2020-01-02 00:00:00 UTC (notAfter)"),
            ),
            (
                "future",
                (2090, 6, 1),
                (2091, 1, 1),
                Some("the certificate is not valid before 2090-06-01 00:00:00 UTC (notBefore)"),
            ),
            ("valid", (2020, 1, 1), (2090, 1, 1), None),
        ] {
            let (cert_pem, key_pem) = cert_valid(from, until);
            let cert = files.write(&format!("{name}.crt"), &cert_pem);
            std::fs::write(&key, key_pem).unwrap();
            let tls = server_config(&cert, &key, None).unwrap();
            let now = 1_700_000_000;
            let warning = tls.warning(&cert, now);
            match expected {
                None => assert_eq!(warning, None),
                Some(text) => {
                    let warning = warning.unwrap();
                    assert!(warning.contains(text), "{warning}");
                    assert!(warning.starts_with(&cert.display().to_string()));
                }
            }
        }
    }

    #[test]
    fn a_truncated_pem_file_is_called_truncated() {
        let files = Files::new("truncated");
        let (cert, key) = cert_valid((2020, 1, 1), (2090, 1, 1));
        let cut = files.write("cut.crt", &cert[..cert.len() - 60]);
        let e = load_certs(&cut).unwrap_err().to_string();
        assert!(
            e.contains("PEM section `CERTIFICATE` is not terminated: no `-----END CERTIFICATE-----` line (truncated file?)"),
            "{e}"
        );
        assert!(!e.contains("[67"), "{e}");
        let cut = files.write("cut.key", &key[..key.len() - 40]);
        let e = load_key(&cut).unwrap_err().to_string();
        assert!(
            e.contains("PEM section `PRIVATE KEY` is not terminated"),
            "{e}"
        );
    }

    #[test]
    fn a_key_ring_cannot_sign_with_is_called_unsupported() {
        let files = Files::new("unsupported");
        let cert = files.write("tls.crt", &cert_valid((2020, 1, 1), (2090, 1, 1)).0);
        for (name, pem) in [("rsa1024.key", RSA_1024_KEY), ("ed448.key", ED448_KEY)] {
            let key = files.write(name, pem);
            let e = server_config(&cert, &key, None).unwrap_err();
            assert!(matches!(e, TlsError::UnsupportedKey { .. }), "{e:?}");
            let e = e.to_string();
            assert!(e.contains("cannot sign with this private key"), "{e}");
            assert!(e.contains(SUPPORTED_KEYS), "{e}");
            assert!(!e.contains("failed to parse"), "{e}");
        }
    }
}
