//! Issue 17 (7): slow and idle clients cannot hold the agent's or the router's connections: a
//! request head must arrive within `--http-header-timeout` (idle keep-alive connections close
//! after it too), a body that pauses past `--http-body-timeout` gets a 408 in vLLM's error
//! shape, and past `--max-connections` the listener stops accepting, so a flood of silent
//! connections holds a bounded number of file descriptors and the server answers once it ends.

use std::time::{Duration, Instant};

use e2e::cluster::{pod_flags, Pod, RouterProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITS: [&str; 6] = [
    "--http-header-timeout",
    "1",
    "--http-body-timeout",
    "1",
    "--max-connections",
    "8",
];

/// Everything the server sends until it closes the connection, or None after `within`.
async fn until_closed(conn: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, conn.read_to_end(&mut out)).await;
    match read {
        Ok(Ok(_)) => Some(String::from_utf8_lossy(&out).into_owned()),
        // A reset is a close too.
        Ok(Err(_)) => Some(String::new()),
        Err(_) => None,
    }
}

/// Open sockets of a process.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

async fn check(what: &str, port: u16, pid: u32) {
    let addr = ("127.0.0.1", port);
    // A head that never ends, and a connection that never sends anything.
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    for (case, conn) in [("partial head", &mut partial), ("silent", &mut silent)] {
        let closed = until_closed(conn, Duration::from_secs(15)).await;
        assert!(
            closed.is_some(),
            "{what}: {case} connection still open after 15 s"
        );
    }

    // A body that stops: 408, in vLLM's error shape.
    let mut paused = TcpStream::connect(addr).await.unwrap();
    paused
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"prompt\": \"He",
        )
        .await
        .unwrap();
    let answer = until_closed(&mut paused, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("{what}: no answer to a paused body within 15 s"));
    assert!(answer.starts_with("HTTP/1.1 408"), "{what}: {answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {answer}"));
    assert_eq!(v["error"]["code"], 408, "{what}: {body}");

    // A flood of silent connections: at most the cap of them are accepted at once.
    let before = sockets(pid);
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = sockets(pid);
    assert!(
        during <= before + 8 + 2,
        "{what}: {during} sockets with 40 silent clients (before: {before}, cap 8)"
    );
    // Each is closed after the header timeout, the backlog's turn comes, and then an honest
    // request is served.
    let started = Instant::now();
    for conn in &mut flood {
        assert!(
            until_closed(conn, Duration::from_secs(30)).await.is_some(),
            "{what}: a flooding connection was never closed"
        );
    }
    let mut honest = TcpStream::connect(addr).await.unwrap();
    honest
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut honest, Duration::from_secs(15))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
    println!("{what}: flood of 40 drained in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_bounded_on_the_agent_and_the_router() {
    let pod = Pod::start(&LIMITS).await;
    let mut flags = pod_flags([pod.spec("a", None)]);
    flags.extend(LIMITS.iter().map(|s| s.to_string()));
    let router = RouterProc::start(&flags).await;
    let pod_port: u16 = pod
        .url("")
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    check("agent", pod_port, pod.pid()).await;
    check("router", router.port, router.pid()).await;
}
