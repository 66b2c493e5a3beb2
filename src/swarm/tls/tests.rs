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
    let mut server = TestServer::start(server_config(&s, trusting(&[&stranger])).unwrap()).await;
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
