//! The accept loop: a permit per open connection (no permit, no accept), one hyper HTTP/1.1
//! connection task per socket with the header deadline, request bodies wrapped in the body
//! deadline, a lingering close, and graceful shutdown.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::body::TimedBody;
use crate::limits::HttpLimits;

/// Pause after a failed accept (out of file descriptors, say) before the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// After the last response, how long and how much of what the client still sends (a body the
/// handler did not read: a 401, a 413) is read and dropped before the socket closes.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 128 << 20;

/// Serves `app` on `listener` under `limits` until `shutdown` resolves; then stops accepting,
/// lets open connections finish their requests (idle ones close at once) and returns when all
/// are closed or `limits.shutdown_grace` has passed (then it says how many were cut).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
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
            Box::pin(app.clone().oneshot(req))
        });
        let conn = builder.serve_connection(TokioIo::new(tcp), service);
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Some(tcp) = run_connection(conn, stop).await {
                linger(tcp).await;
            }
            drop(permit);
        });
        tracing::trace!(%peer, "HTTP connection accepted");
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it is closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(limits.shutdown_grace, permits.acquire_many(all)).await;
    if drained.is_err() {
        let open = limits.max_connections - permits.available_permits();
        tracing::warn!(
            open,
            "connections still open {:?} after the shutdown began; closing them",
            limits.shutdown_grace
        );
    }
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT, saying which.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    let signal = tokio::select! {
        () = interrupt => "SIGINT",
        () = term => "SIGTERM",
    };
    tracing::info!("{signal}: shutting down (in-flight requests finish first)");
}

/// Serves one connection until it is done (a graceful stop disables keep-alive, so the request
/// in flight finishes); returns the socket when it ended cleanly, for the lingering close.
async fn run_connection<S>(
    mut conn: http1::Connection<TokioIo<TcpStream>, S>,
    mut stop: watch::Receiver<bool>,
) -> Option<TcpStream>
where
    S: hyper::service::HttpService<Incoming> + Unpin,
    S::Future: Unpin,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut stopping = *stop.borrow();
    if stopping {
        Pin::new(&mut conn).graceful_shutdown();
    }
    let result = loop {
        tokio::select! {
            result = poll_fn(|cx| conn.poll_without_shutdown(cx)) => break result,
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    Pin::new(&mut conn).graceful_shutdown();
                }
            }
        }
    };
    match result {
        Ok(()) => Some(conn.into_parts().io.into_inner()),
        Err(e) => {
            // Timeouts, resets and garbage from clients: theirs, not ours.
            tracing::debug!("HTTP connection ended: {e}");
            None
        }
    }
}

/// Closes a connection whose responses are all out without resetting it: a close with unread
/// bytes in the socket makes the kernel send a reset, which can destroy a response the client
/// has not read yet (a 401 sent before its large body was read). So stop sending, then read
/// and drop what still comes, for a bounded time and amount, as Apache and nginx do.
async fn linger(mut tcp: TcpStream) {
    if tcp.shutdown().await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut drained = 0usize;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while drained < LINGER_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
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
            .route("/echo", post(echo))
            .route(
                "/reject",
                post(|| async { (axum::http::StatusCode::UNAUTHORIZED, "no") }),
            );
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
            shutdown_grace: Duration::from_secs(30),
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

    /// A response sent before the body was read (a 401, a 413) reaches a client that is still
    /// sending that body: the close lingers instead of resetting the connection.
    #[tokio::test]
    async fn an_early_answer_survives_the_unread_body() {
        let (addr, _stop, _) = start(limits(16, 5000, 5000)).await;
        let body = vec![b'x'; 8 << 20];
        for _ in 0..10 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /reject HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).await.unwrap();
            let sent = conn.write_all(&body).await;
            let mut answer = Vec::new();
            let read = conn.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                sent.is_ok() && read.is_ok() && answer.starts_with("HTTP/1.1 401"),
                "sent: {sent:?}, read: {read:?}, answer: {answer:?}"
            );
        }
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
