//! Router acceptance 3: recovery of the prefix index.
//! - Restarting an agent clears its index entries: its old prefixes no longer attract requests.
//! - Dropping the router's event connection for a while (the pod's PUB reached through a relay
//!   that is cut) loses live events; once reconnected, the seq gap is filled from the pod's
//!   replay socket and the blocks stored meanwhile are known again.

use std::time::{Duration, Instant};

use e2e::cluster::{pod_events, pod_flags, Pod, Relay, RouterProc};
use e2e::{Metrics, LONG_TEXT, SERVED_MODEL};
use serde_json::{json, Value};

fn completion(prompt: &str) -> Value {
    json!({"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0.0})
}

/// A prompt of about ten full blocks, distinct per `tag`.
fn prompt(tag: &str) -> String {
    format!("[{tag}] {}", &LONG_TEXT[..800])
}

fn index_entries(m: &Metrics) -> f64 {
    m.value("router_index_pod_entries")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_and_lost_events_are_recovered() {
    let (mut a, mut b) = tokio::join!(Pod::start(&[]), Pod::start(&[]));
    let (mut relay_a, relay_b) = tokio::join!(Relay::start(a.events), Relay::start(b.events));
    let router = RouterProc::start(&pod_flags([
        a.spec("a", Some(relay_a.port)),
        b.spec("b", Some(relay_b.port)),
    ]))
    .await;

    // --- Restart: the pod that holds P is restarted; P no longer matches anywhere.
    let p = prompt("restart");
    let holder = router.post_ok("/v1/completions", &completion(&p)).await;
    router
        .wait_for("P's blocks in the index", |m| index_entries(m) >= 9.0)
        .await;
    let (again, matched) = router
        .post_matched("/v1/completions", &completion(&p))
        .await;
    assert_eq!(
        again, holder,
        "the second P request should follow its prefix"
    );
    assert!(matched >= 9.0, "P matched only {matched} blocks");
    let resets_before = pod_events(&router.metrics().await, &holder, "resets");
    let restarted = if holder == "a" { &mut a } else { &mut b };
    restarted.restart().await;
    // The holder's stream has started over (a reset counted once it has) and only the holder
    // had entries.
    router
        .wait_for("the restarted pod's stream to start over", |m| {
            pod_events(m, &holder, "resets") > resets_before && index_entries(m) == 0.0
        })
        .await;
    let (_, matched) = router
        .post_matched("/v1/completions", &completion(&p))
        .await;
    assert_eq!(
        matched, 0.0,
        "P still matched the restarted pod's old blocks"
    );

    // --- Lost events: pod a's event connection is cut while it stores Q.
    let replays_before = pod_events(&router.metrics().await, "a", "replays");
    relay_a.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = prompt("lost");
    let direct = a.post("/v1/completions", &completion(&q)).await;
    assert_eq!(direct.status, 200, "{}", direct.body);
    relay_a.restore().await;
    // New traffic on a shows the router a seq gap (or, after a restart, a new stream's start),
    // which it fills from a's replay socket.
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = a
            .post(
                "/v1/completions",
                &completion(&prompt(&format!("after {n}"))),
            )
            .await;
        assert_eq!(r.status, 200);
        n += 1;
        if pod_events(&router.metrics().await, "a", "replays") > replays_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no replay after the event connection came back\nrouter log:\n{}",
            router.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (pod, matched) = router
        .post_matched("/v1/completions", &completion(&q))
        .await;
    println!("after the replay: Q went to {pod} matching {matched} blocks");
    assert_eq!(
        pod, "a",
        "Q's blocks (stored while disconnected) were not recovered"
    );
    assert!(matched >= 9.0, "Q matched only {matched} blocks");
}
