//! The accept loop: a permit per open connection (no permit, no accept), one hyper HTTP/1.1
//! connection task per socket with the header deadline, request bodies wrapped in the body
//! deadline, and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::body::TimedBody;
use crate::limits::HttpLimits;

/// Pause after a failed accept (out of file descriptors, say) before the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` under `limits` until `shutdown` resolves; then stops accepting,
/// lets open connections finish their requests (idle ones close at once) and returns when all
/// are closed. Callers that must not wait forever bound that wait themselves.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut at_cap = 0u64;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else {
            break; // never closed
        };
        if permits.available_permits() == 0 {
            at_cap += 1;
            // Logged at the 1st, 2nd, 4th, … time: visible, never a flood.
            if at_cap.is_power_of_two() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    times = at_cap,
                    "HTTP connection cap reached: new connections wait in the backlog"
                );
            }
        }
        let (tcp, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Streamed chunks are small and latency is the point.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
        let app = app.clone();
        let body_timeout = limits.body_timeout;
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let req = req.map(|b| Body::new(TimedBody::new(b, body_timeout)));
            app.clone().oneshot(req)
        });
        let conn = builder.serve_connection(TokioIo::new(tcp), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                // Timeouts, resets and garbage from clients: theirs, not ours.
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::body_timeout;

    async fn echo(body: Body) -> (axum::http::StatusCode, String) {
        match axum::body::to_bytes(body, usize::MAX).await {
            Ok(b) => (
                axum::http::StatusCode::OK,
                String::from_utf8_lossy(&b).into(),
            ),
            Err(e) if body_timeout(&e).is_some() => {
                (axum::http::StatusCode::REQUEST_TIMEOUT, e.to_string())
            }
            Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string()),
        }
    }

    /// A server on a free port; returns its address and the sender that stops it.
    async fn start(
        limits: HttpLimits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/echo", post(echo));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve(listener, app, limits, async {
            let _ = rx.await;
        }));
        (addr, tx, task)
    }

    fn limits(max_connections: usize, header_ms: u64, body_ms: u64) -> HttpLimits {
        HttpLimits {
            max_connections,
            header_timeout: Duration::from_millis(header_ms),
            body_timeout: Duration::from_millis(body_ms),
        }
    }

    /// Everything the server sends until it closes (or `within` passes: then None).
    async fn read_to_close(conn: &mut TcpStream, within: Duration) -> Option<String> {
        let mut out = Vec::new();
        tokio::time::timeout(within, conn.read_to_end(&mut out))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&out).into())
    }

    #[tokio::test]
    async fn a_partial_head_and_an_idle_keep_alive_are_closed() {
        let (addr, _stop, _) = start(limits(16, 300, 5000)).await;
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        assert!(read_to_close(&mut partial, Duration::from_secs(10))
            .await
            .is_some());
        assert!(started.elapsed() >= Duration::from_millis(250));

        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut idle, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
    }

    #[tokio::test]
    async fn a_paused_body_gets_408_and_a_steady_one_gets_through() {
        let (addr, _stop, _) = start(limits(16, 5000, 300)).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let answer = read_to_close(&mut conn, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 6\r\n\r\n",
        )
        .await
        .unwrap();
        for piece in [b"ab", b"cd", b"ef"] {
            tokio::time::sleep(Duration::from_millis(150)).await;
            conn.write_all(piece).await.unwrap();
        }
        let answer = read_to_close(&mut conn, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("abcdef"), "{answer}");
    }

    #[tokio::test]
    async fn past_the_cap_connections_wait_until_one_closes() {
        let (addr, _stop, _) = start(limits(2, 60_000, 60_000)).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            held.push(c);
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // Not accepted while both slots are held (the kernel's backlog has it).
        assert!(read_to_close(&mut third, Duration::from_millis(500))
            .await
            .is_none());
        held.pop();
        let answer = read_to_close(&mut third, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn shutdown_finishes_the_request_in_flight_and_returns() {
        let (addr, stop, task) = start(limits(16, 60_000, 60_000)).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(b"cd").await.unwrap();
        let answer = read_to_close(&mut conn, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("abcd"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }
}
