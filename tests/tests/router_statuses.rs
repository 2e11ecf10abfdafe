//! Issue 17 (8): the router's own errors carry the status the agent gives for the same request: a
//! body that breaks off is a 400 (not 413), a declared length over the limit a 413, and
//! `OPTIONS *` the agent's 404 without trying every pod (it was a 503).

use std::time::Duration;

use e2e::cluster::{pod_flags, Pod, RouterProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` raw (half-closing after it when `cut`: the body ends early) and returns the
/// response's status line and body.
async fn raw(port: u16, request: &[u8], cut: bool) -> (String, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    conn.write_all(request).await.unwrap();
    if cut {
        conn.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut answer))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_errors_have_the_agents_statuses() {
    let pod = Pod::start(&[]).await;
    let mut flags = pod_flags([pod.spec("a", None)]);
    flags.extend(["--max-body-bytes".to_string(), "4096".to_string()]);
    let router = RouterProc::start(&flags).await;
    let (router_port, pod_port) = (router.port, port_of(&pod.url("")));

    let cut = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\nConnection: close\r\n\r\n{\"prompt\": \"He";
    let options = b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let declared_over = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: \
                          application/json\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n{";
    for (case, request, status, kind) in [
        ("body cut short", &cut[..], "400", "BadRequestError"),
        ("OPTIONS *", &options[..], "404", "Not Found"),
        (
            "declared length over the limit",
            &declared_over[..],
            "413",
            "",
        ),
    ] {
        let cut = case == "body cut short";
        let (line, body) = raw(router_port, request, cut).await;
        assert!(line.contains(status), "{case} via router: {line}\n{body}");
        if !kind.is_empty() {
            let v: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{case}: not JSON ({e}): {body}"));
            assert_eq!(v["error"]["type"], kind, "{case}: {body}");
        }
        if status != "413" {
            // The agent (whose limit is 64 MiB) answers the same.
            let (line, body) = raw(pod_port, request, cut).await;
            assert!(line.contains(status), "{case} on the agent: {line}\n{body}");
        }
    }
    let failures = router
        .metrics()
        .await
        .get("router_upstream_failures_total", &[("pod", "a")])
        .unwrap_or(0.0);
    assert_eq!(
        failures, 0.0,
        "the router's own errors are not the pod's failures"
    );
}

/// Issue 17 (8): a large unauthenticated body in front of an `--api-key` pod gets the pod's 401
/// through the router every time. The pod answers before reading the body; it used to close
/// with the body unread, the kernel reset the connection, the router saw a send error instead
/// of the 401 and answered 503 after trying every pod (4 times in 10 in the probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_unauthenticated_body_gets_the_pods_401() {
    let pod = Pod::start(&["--api-key", "k"]).await;
    let router = RouterProc::start(&pod_flags([pod.spec("a", None)])).await;
    let prompt = "x".repeat(8 << 20);
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1}).to_string();
    let client = reqwest::Client::new();
    for i in 0..10 {
        let resp = client
            .post(router.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(
            resp.status().as_u16(),
            401,
            "request {i}: {:?}",
            resp.text().await
        );
    }
    let failures = router
        .metrics()
        .await
        .get("router_upstream_failures_total", &[("pod", "a")])
        .unwrap_or(0.0);
    assert_eq!(failures, 0.0, "a 401 is the pod's answer, not its failure");
}
