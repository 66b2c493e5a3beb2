//! TLS for the swarm's data plane: mutual authentication by certificate
//! fingerprint.
//!
//! Each node makes a fresh self-signed certificate at start and announces the
//! SHA-256 of its DER on the key-protected control plane. There is no CA: a
//! peer, client or server, is accepted only if the fingerprint of the
//! end-entity certificate it presents is in the current [`Trusted`] set.
//! Names and validity dates mean nothing here (self-signed, addressed by IP),
//! but the handshake signature is still checked against the certificate's
//! public key, so replaying a member's certificate without its key fails.
//!
//! Session resumption is off on both sides: a resumed TLS 1.3 handshake
//! skips certificate verification, which would let a peer removed from the
//! trusted set keep opening connections on an old ticket. Peers keep their
//! HTTP/1.1 connections alive, so full handshakes are rare enough.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// What the data plane speaks inside TLS; both ends insist on it so that a
/// stray client of another protocol fails at the handshake, not mid-request.
const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the node's TLS key pair: {0}")]
    KeyGeneration(#[source] rcgen::Error),
    #[error("self-signing the node's TLS certificate: {0}")]
    CertificateGeneration(#[source] rcgen::Error),
    #[error("building the data plane's TLS server configuration: {0}")]
    ServerConfig(#[source] rustls::Error),
    #[error("building the data plane's TLS client configuration: {0}")]
    ClientConfig(#[source] rustls::Error),
}

/// This node's certificate and private key for the data plane.
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: String,
}

impl TlsIdentity {
    /// A fresh ECDSA P-256 key and a self-signed certificate for it.
    pub fn generate() -> Result<TlsIdentity, TlsError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(TlsError::KeyGeneration)?;
        // Peers never check the name; the SAN only keeps webpki's parser and
        // human readers (openssl s_client) content.
        let mut params = rcgen::CertificateParams::new(vec!["damselfly".to_string()])
            .map_err(TlsError::CertificateGeneration)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "damselfly swarm peer");
        let cert = params
            .self_signed(&key_pair)
            .map_err(TlsError::CertificateGeneration)?;
        let cert = cert.der().clone();
        let fingerprint = fingerprint_of(&cert);
        Ok(TlsIdentity {
            cert,
            key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
            fingerprint,
        })
    }

    /// Lower-case hex SHA-256 of the certificate's DER: what this node
    /// announces to the others.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The certificate's DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

impl fmt::Debug for TlsIdentity {
    // Hand-written so that the private key never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Lower-case hex SHA-256 of a certificate's DER.
pub fn fingerprint_of(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

fn digest_of(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// The fingerprints of the current members, shared between the control
/// plane (which replaces it) and every TLS config (which reads it on each
/// handshake). Cloning shares the same set.
#[derive(Clone, Default)]
pub struct Trusted {
    inner: Arc<RwLock<HashSet<[u8; 32]>>>,
}

impl Trusted {
    /// Replaces the whole set; handshakes after this see only these
    /// fingerprints (connections already open are not touched). Entries
    /// that are not 64 hex digits are skipped.
    pub fn replace<I: IntoIterator<Item = String>>(&self, hex_fingerprints: I) {
        let set: HashSet<[u8; 32]> = hex_fingerprints
            .into_iter()
            .filter_map(|fp| {
                let mut bytes = [0u8; 32];
                match hex::decode_to_slice(fp.as_bytes(), &mut bytes) {
                    Ok(()) => Some(bytes),
                    Err(e) => {
                        tracing::debug!(fingerprint = %fp, error = %e, "skipping malformed TLS fingerprint");
                        None
                    }
                }
            })
            .collect();
        // A panic elsewhere while holding the lock cannot leave a half-built
        // set (the set is swapped whole), so poisoning carries no meaning.
        *self.inner.write().unwrap_or_else(PoisonError::into_inner) = set;
    }

    pub fn contains(&self, fp: &[u8; 32]) -> bool {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(fp)
    }

    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Trusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trusted").field("len", &self.len()).finish()
    }
}

/// aws-lc-rs with TLS 1.3 suites only, AES-128-GCM first: with AES-NI it is
/// the fastest, and bulk piece transfer is what this link is for.
fn provider() -> Arc<CryptoProvider> {
    use aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// The one verifier behind both configs: membership by fingerprint, then
/// the usual signature check against the presented certificate.
struct MembershipVerifier {
    trusted: Trusted,
    algorithms: WebPkiSupportedAlgorithms,
    /// "server" or "client": whose certificate this verifier judges, for logs.
    peer_role: &'static str,
}

impl MembershipVerifier {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.trusted.contains(&digest_of(end_entity)) {
            return Ok(());
        }
        // Expected in normal operation for a moment when a node starts before
        // its heartbeat has reached us, hence debug; the caller logs the
        // failed handshake itself.
        tracing::debug!(
            peer = self.peer_role,
            fingerprint = %fingerprint_of(end_entity),
            trusted = self.trusted.len(),
            "TLS peer certificate is not a current swarm member"
        );
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

impl fmt::Debug for MembershipVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MembershipVerifier")
            .field("peer_role", &self.peer_role)
            .field("trusted", &self.trusted)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for MembershipVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for MembershipVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA to hint at; an empty list tells clients to send whatever
    /// certificate they have.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn verifier(
    provider: &CryptoProvider,
    trusted: Trusted,
    peer_role: &'static str,
) -> Arc<MembershipVerifier> {
    Arc::new(MembershipVerifier {
        trusted,
        algorithms: provider.signature_verification_algorithms,
        peer_role,
    })
}

/// The data plane's server side: TLS 1.3 only, a client certificate in
/// `trusted` required, ALPN "http/1.1".
pub fn server_config(
    id: &TlsIdentity,
    trusted: Trusted,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = verifier(&provider, trusted, "client");
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::ServerConfig)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key_der())
        .map_err(TlsError::ServerConfig)?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // Both ends run this code, so the client's order is ours too; still,
    // the server's word should decide.
    config.ignore_client_order = true;
    // See the module docs: resumption would bypass the membership check.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The data plane's client side: TLS 1.3 only, presents our certificate,
/// accepts a server only if its certificate is in `trusted` (the server
/// name is ignored), ALPN "http/1.1".
pub fn client_config(
    id: &TlsIdentity,
    trusted: Trusted,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = verifier(&provider, trusted, "server");
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::ClientConfig)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.key_der())
        .map_err(TlsError::ClientConfig)?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // See the module docs: resumption would bypass the membership check.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The fingerprint of the peer on an accepted server-side connection, for logs and per-peer metrics.
///
/// Works on a client-side connection too (the server's fingerprint). `None`
/// before the handshake has received the peer's certificate.
pub fn peer_fingerprint(conn: &rustls::CommonState) -> Option<String> {
    conn.peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| fingerprint_of(cert))
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use rustls::client::ResolvesClientCert;
    use rustls::sign::CertifiedKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn trusting(ids: &[&TlsIdentity]) -> Trusted {
        let t = Trusted::default();
        t.replace(ids.iter().map(|id| id.fingerprint().to_string()));
        t
    }

    /// The rustls verdict inside an I/O error from tokio-rustls, if any.
    fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
        e.get_ref()?.downcast_ref::<rustls::Error>()
    }

    /// Accepts connections until the test ends; reports each handshake's
    /// outcome (the client's fingerprint on success), then echoes.
    struct TestServer {
        addr: SocketAddr,
        handshakes: mpsc::UnboundedReceiver<io::Result<Option<String>>>,
    }

    impl TestServer {
        async fn start(config: Arc<rustls::ServerConfig>) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, handshakes) = mpsc::unbounded_channel();
            let acceptor = TlsAcceptor::from(config);
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut tls = match acceptor.accept(tcp).await {
                            Ok(tls) => tls,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                        let _ = tx.send(Ok(peer_fingerprint(tls.get_ref().1)));
                        let mut buf = [0u8; 4096];
                        loop {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if tls.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
            });
            TestServer { addr, handshakes }
        }

        async fn next_handshake(&mut self) -> io::Result<Option<String>> {
            tokio::time::timeout(WAIT, self.handshakes.recv())
                .await
                .expect("server saw no handshake")
                .expect("server task ended")
        }
    }

    async fn connect(
        config: Arc<rustls::ClientConfig>,
        addr: SocketAddr,
    ) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        // Any name does: the verifier ignores it.
        let name = ServerName::IpAddress(addr.ip().into());
        tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
            .await
            .expect("handshake hung")
    }

    /// One round trip through the echo server. In TLS 1.3 the client
    /// finishes its half of the handshake before the server has judged the
    /// client's certificate, so a rejection shows up here, not in `connect`.
    async fn ping(tls: &mut TlsStream<TcpStream>) -> io::Result<()> {
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(WAIT, tls.read_exact(&mut buf))
            .await
            .expect("echo hung")?;
        assert_eq!(&buf, b"ping");
        Ok(())
    }

    async fn connect_and_ping(
        config: Arc<rustls::ClientConfig>,
        addr: SocketAddr,
    ) -> io::Result<TlsStream<TcpStream>> {
        let mut tls = connect(config, addr).await?;
        ping(&mut tls).await?;
        Ok(tls)
    }

    #[test]
    fn identity_fingerprint_is_lower_hex_sha256_of_der() {
        let id = TlsIdentity::generate().unwrap();
        assert_eq!(id.fingerprint().len(), 64);
        assert!(id
            .fingerprint()
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(id.fingerprint(), fingerprint_of(id.cert_der()));
        let other = TlsIdentity::generate().unwrap();
        assert_ne!(id.fingerprint(), other.fingerprint());
        assert!(!format!("{id:?}").contains("key"));
    }

    #[test]
    fn replace_skips_malformed_entries_and_swaps_whole_set() {
        let a = TlsIdentity::generate().unwrap();
        let b = TlsIdentity::generate().unwrap();
        let t = Trusted::default();
        assert!(t.is_empty());
        t.replace([
            a.fingerprint().to_string(),
            "not hex".to_string(),
            "abcd".to_string(),
            format!("{}00", b.fingerprint()),
            b.fingerprint().to_uppercase(),
        ]);
        assert_eq!(t.len(), 2);
        assert!(t.contains(&digest_of(a.cert_der())));
        assert!(t.contains(&digest_of(b.cert_der())));
        let shared = t.clone();
        t.replace([b.fingerprint().to_string()]);
        assert_eq!(shared.len(), 1);
        assert!(!shared.contains(&digest_of(a.cert_der())));
    }

    #[tokio::test]
    async fn trusted_both_ways_connects_and_reports_fingerprints() {
        let (s, c) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let mut server = TestServer::start(server_config(&s, trusting(&[&c])).unwrap()).await;
        let client = client_config(&c, trusting(&[&s])).unwrap();

        let tls = connect_and_ping(client, server.addr).await.unwrap();
        let seen_by_server = server.next_handshake().await.unwrap();
        assert_eq!(seen_by_server.as_deref(), Some(c.fingerprint()));

        let conn = tls.get_ref().1;
        assert_eq!(peer_fingerprint(conn).as_deref(), Some(s.fingerprint()));
        assert_eq!(conn.alpn_protocol(), Some(ALPN_HTTP11));
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }

    #[tokio::test]
    async fn server_refuses_untrusted_client() {
        let (s, c) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let stranger = TlsIdentity::generate().unwrap();
        let mut server =
            TestServer::start(server_config(&s, trusting(&[&stranger])).unwrap()).await;
        let client = client_config(&c, trusting(&[&s])).unwrap();

        let err = connect_and_ping(client, server.addr).await.unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::AlertReceived(
                    rustls::AlertDescription::AccessDenied
                ))
            ) || err.kind() == io::ErrorKind::ConnectionReset,
            "client saw {err:?}"
        );
        let server_err = server.next_handshake().await.unwrap_err();
        assert_eq!(
            rustls_error(&server_err),
            Some(&rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            ))
        );
    }

    #[tokio::test]
    async fn client_refuses_untrusted_server() {
        let (s, c) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let stranger = TlsIdentity::generate().unwrap();
        let mut server = TestServer::start(server_config(&s, trusting(&[&c])).unwrap()).await;
        let client = client_config(&c, trusting(&[&stranger])).unwrap();

        let err = connect(client, server.addr).await.unwrap_err();
        assert_eq!(
            rustls_error(&err),
            Some(&rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            ))
        );
        let server_err = server.next_handshake().await.unwrap_err();
        assert_eq!(
            rustls_error(&server_err),
            Some(&rustls::Error::AlertReceived(
                rustls::AlertDescription::AccessDenied
            ))
        );
    }

    #[tokio::test]
    async fn removal_from_trusted_blocks_new_handshakes_only() {
        let (s, c) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let server_trusts = trusting(&[&c]);
        let client_trusts = trusting(&[&s]);
        let mut server = TestServer::start(server_config(&s, server_trusts.clone()).unwrap()).await;
        let client = client_config(&c, client_trusts.clone()).unwrap();

        let mut open = connect_and_ping(client.clone(), server.addr).await.unwrap();
        server.next_handshake().await.unwrap();
        // A second connection first, so that a session cache (were one
        // enabled) would hold something to resume.
        connect_and_ping(client.clone(), server.addr).await.unwrap();
        server.next_handshake().await.unwrap();

        // The server forgets the client.
        server_trusts.replace([]);
        assert!(connect_and_ping(client.clone(), server.addr).await.is_err());
        assert!(server.next_handshake().await.is_err());
        ping(&mut open).await.unwrap();

        // The client forgets the server.
        server_trusts.replace([c.fingerprint().to_string()]);
        client_trusts.replace([]);
        let err = connect(client.clone(), server.addr).await.unwrap_err();
        assert!(rustls_error(&err).is_some(), "{err:?}");
        assert!(server.next_handshake().await.is_err());
        ping(&mut open).await.unwrap();

        // And back: membership is live, not fixed at config time.
        client_trusts.replace([s.fingerprint().to_string()]);
        connect_and_ping(client, server.addr).await.unwrap();
        server.next_handshake().await.unwrap();
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let (s, c) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let mut server = TestServer::start(server_config(&s, trusting(&[&c])).unwrap()).await;
        let provider = provider();
        let mut anonymous = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier(&provider, trusting(&[&s]), "server"))
            .with_no_client_auth();
        anonymous.alpn_protocols = vec![ALPN_HTTP11.to_vec()];

        assert!(connect_and_ping(Arc::new(anonymous), server.addr)
            .await
            .is_err());
        let server_err = server.next_handshake().await.unwrap_err();
        assert_eq!(
            rustls_error(&server_err),
            Some(&rustls::Error::NoCertificatesPresented)
        );
    }

    /// Presents a member's certificate with a key that is not its own.
    #[derive(Debug)]
    struct Impostor(Arc<CertifiedKey>);

    impl ResolvesClientCert for Impostor {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn replayed_certificate_without_its_key_is_refused() {
        let (s, c) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let thief = TlsIdentity::generate().unwrap();
        let mut server = TestServer::start(server_config(&s, trusting(&[&c])).unwrap()).await;
        let provider = provider();
        let stolen = CertifiedKey::new(
            vec![c.cert.clone()],
            provider
                .key_provider
                .load_private_key(thief.key_der())
                .unwrap(),
        );
        let mut impostor = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier(&provider, trusting(&[&s]), "server"))
            .with_client_cert_resolver(Arc::new(Impostor(Arc::new(stolen))));
        impostor.alpn_protocols = vec![ALPN_HTTP11.to_vec()];

        assert!(connect_and_ping(Arc::new(impostor), server.addr)
            .await
            .is_err());
        let server_err = server.next_handshake().await.unwrap_err();
        assert!(
            matches!(
                rustls_error(&server_err),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::BadSignature
                ))
            ),
            "server saw {server_err:?}"
        );
    }

    /// One HTTP/1.1 exchange per connection, just enough for reqwest.
    async fn http_server(config: Arc<rustls::ServerConfig>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let fp = peer_fingerprint(tls.get_ref().1).unwrap_or_default();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{fp}",
                        fp.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn reqwest_accepts_preconfigured_client_config() {
        let (s, c) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let addr = http_server(server_config(&s, trusting(&[&c])).unwrap()).await;
        let url = format!("https://{addr}/");

        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*client_config(&c, trusting(&[&s])).unwrap()).clone())
            .build()
            .unwrap();
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), c.fingerprint());

        // A server outside the set fails with rustls' verdict in the chain,
        // which is how the caller tells it from a network error.
        let stranger = TlsIdentity::generate().unwrap();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*client_config(&c, trusting(&[&stranger])).unwrap()).clone())
            .build()
            .unwrap();
        let err = http.get(&url).send().await.unwrap_err();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        let mut found = None;
        while let Some(e) = source {
            if let Some(r) = e.downcast_ref::<rustls::Error>() {
                found = Some(r.clone());
            }
            source = e
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref().map(|i| i as _))
                .or_else(|| e.source());
        }
        assert_eq!(
            found,
            Some(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            )),
            "{err:?}"
        );
    }

    /// `cargo test --release -- --ignored --nocapture throughput`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "throughput measurement; run in --release"]
    async fn throughput_1gib_over_loopback() {
        const TOTAL: u64 = 1 << 30;
        const CHUNK: usize = 256 * 1024;
        let (s, c) = (
            TlsIdentity::generate().unwrap(),
            TlsIdentity::generate().unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server_config(&s, trusting(&[&c])).unwrap());
        let sender = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let chunk = vec![0xa5u8; CHUNK];
            let mut sent = 0u64;
            while sent < TOTAL {
                tls.write_all(&chunk).await.unwrap();
                sent += CHUNK as u64;
            }
            tls.shutdown().await.unwrap();
        });

        let mut tls = connect(client_config(&c, trusting(&[&s])).unwrap(), addr)
            .await
            .unwrap();
        let start = Instant::now();
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0u64;
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        sender.await.unwrap();
        assert_eq!(received, TOTAL);
        let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        println!(
            "{received} bytes in {secs:.2} s: {:.0} MB/s ({:.0} MiB/s), {suite:?}",
            received as f64 / secs / 1e6,
            received as f64 / secs / (1 << 20) as f64,
        );
    }
}
