//! The loop against an in-memory listener, in paused time.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

use super::*;

/// Hands out what the test sends: a connection (a number) or an error.
struct Fake(Mutex<mpsc::UnboundedReceiver<io::Result<u32>>>);

impl Listener for Fake {
    type Conn = u32;
    type Addr = ();

    async fn accept(&self) -> io::Result<(u32, ())> {
        match self.0.lock().await.recv().await {
            Some(r) => r.map(|c| (c, ())),
            None => std::future::pending().await,
        }
    }
}

fn fake() -> (mpsc::UnboundedSender<io::Result<u32>>, Fake) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Fake(Mutex::new(rx)))
}

fn emfile() -> io::Error {
    io::Error::from_raw_os_error(24)
}

/// Counts up when dropped: a connection task that ended, or was cut.
struct Ended(Arc<AtomicUsize>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn accept_errors_back_off_and_the_loop_goes_on() {
    let (tx, listener) = fake();
    for _ in 0..3 {
        tx.send(Err(emfile())).unwrap();
    }
    tx.send(Ok(7)).unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let server = tokio::spawn(serve(
        "test",
        listener,
        move |conn, (), _| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send((conn, Instant::now()));
            }
        },
        stop.clone(),
        Duration::from_secs(1),
    ));
    let (conn, at) = seen.recv().await.unwrap();
    assert_eq!(conn, 7);
    assert_eq!(at - started, ACCEPT_BACKOFF * 3);
    stop.cancel();
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_open_connections_finish() {
    let (tx, listener) = fake();
    let ended = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let count = ended.clone();
    let server = tokio::spawn(serve(
        "test",
        listener,
        move |_, (), stop: CancellationToken| {
            let ended = Ended(count.clone());
            async move {
                // A response in flight when shutdown comes.
                stop.cancelled().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(ended);
            }
        },
        stop.clone(),
        Duration::from_secs(5),
    ));
    tx.send(Ok(1)).unwrap();
    tx.send(Ok(2)).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ended.load(Ordering::SeqCst), 0);
    let t = Instant::now();
    stop.cancel();
    server.await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_secs(1));
    assert_eq!(ended.load(Ordering::SeqCst), 2, "both finished");
}

#[tokio::test(start_paused = true)]
async fn the_drain_is_bounded() {
    let (tx, listener) = fake();
    let ended = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let count = ended.clone();
    let server = tokio::spawn(serve(
        "test",
        listener,
        move |_, (), _| {
            let ended = Ended(count.clone());
            async move {
                std::future::pending::<()>().await;
                drop(ended);
            }
        },
        stop.clone(),
        Duration::from_secs(2),
    ));
    tx.send(Ok(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t = Instant::now();
    stop.cancel();
    server.await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_secs(2));
    assert_eq!(ended.load(Ordering::SeqCst), 1, "cut and dropped");
}

#[tokio::test(start_paused = true)]
async fn with_nothing_open_shutdown_is_immediate() {
    let (_tx, listener) = fake();
    let stop = CancellationToken::new();
    stop.cancel();
    let t = Instant::now();
    serve(
        "test",
        listener,
        |_, (), _| async {},
        stop,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(t.elapsed(), Duration::ZERO);
}

/// A hyper connection over an in-memory pipe whose one route answers
/// after a second.
fn slow_server(
    stop: &CancellationToken,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let (client, server) = tokio::io::duplex(64 << 10);
    let stop = stop.clone();
    let conn = tokio::spawn(async move {
        let svc = hyper::service::service_fn(|_req| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"hi"))))
        });
        let builder = hyper::server::conn::http1::Builder::new();
        serve_hyper(server, svc, &builder, &stop).await
    });
    (client, conn)
}

#[tokio::test(start_paused = true)]
async fn hyper_connections_finish_the_response_in_flight_then_close() {
    let stop = CancellationToken::new();
    let (mut client, conn) = slow_server(&stop);
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    let mut got = Vec::new();
    // EOF: the server closed the connection after the response.
    client.read_to_end(&mut got).await.unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nhi"), "{text}");
    conn.await.unwrap().unwrap();
}

/// Kept alive after a response, a connection closes as soon as shutdown
/// comes.
#[tokio::test(start_paused = true)]
async fn idle_hyper_connections_close_at_shutdown() {
    let stop = CancellationToken::new();
    let (mut client, conn) = slow_server(&stop);
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\nhi") {
        let mut buf = [0u8; 1024];
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&got).contains("connection: close"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!conn.is_finished(), "kept alive");
    let t = Instant::now();
    stop.cancel();
    conn.await.unwrap().unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(client.read(&mut [0u8; 16]).await.unwrap(), 0, "closed");
}
