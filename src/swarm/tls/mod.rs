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
mod tests;
