//! Router in centralized events mode (llm-d's `kvEventsConfig.zmqEndpoint`): the router binds
//! one SUB socket, the agents' PUB sockets connect to it (their endpoint has no wildcard, so
//! they connect, as vLLM's do), and events are attributed to pods by the topic
//! `kv@HOST:PORT@MODEL`. Repeated requests of a group then land on the pod that holds the
//! group's prefix, with the router matching its blocks.

use e2e::cluster::{pod_events, pod_flags, reserve_ports, Pod, RouterProc};
use e2e::{LONG_TEXT, SERVED_MODEL};
use serde_json::json;

fn request(group: usize, i: usize) -> serde_json::Value {
    let start = group * 60;
    json!({
        "model": SERVED_MODEL,
        "prompt": format!("[document {group}] {} Question {i}:", &LONG_TEXT[start..start + 400]),
        "max_tokens": 2,
        "temperature": 0.0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn centralized_subscriber_routes_by_topic() {
    let sub_port = reserve_ports(1)[0];
    let (a, b) = tokio::join!(
        Pod::start_publishing_to(sub_port, &[]),
        Pod::start_publishing_to(sub_port, &[])
    );
    // No `events=` on the pods: their events arrive on the bound socket. Pods are named by
    // their HTTP address, which is what their topics carry.
    let pod_arg = |p: &Pod| {
        format!(
            "http://127.0.0.1:{},replay=tcp://127.0.0.1:{}",
            p.http, p.replay
        )
    };
    let mut args = vec![
        "--events-bind".to_string(),
        format!("tcp://127.0.0.1:{sub_port}"),
    ];
    args.extend(pod_flags([pod_arg(&a), pod_arg(&b)]));
    let router = RouterProc::start(&args).await;

    // PUB/SUB drops what is published before a subscription has propagated: reset both
    // caches (each reset is a batch) until the router has received a batch from each pod.
    let names = [
        format!("127.0.0.1:{}", a.http),
        format!("127.0.0.1:{}", b.http),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        for p in [&a, &b] {
            assert_eq!(p.post("/reset_prefix_cache", &json!({})).await.status, 200);
        }
        let m = router.metrics().await;
        if names.iter().all(|n| pod_events(&m, n, "batches") > 0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no events from the pods reached the bound socket:\n{}",
            router.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let mut homes = Vec::new();
    for group in 0..4 {
        let before = router.metrics().await.value("router_index_pod_entries");
        let first = router.post_ok("/v1/completions", &request(group, 0)).await;
        // The group's blocks reach the router through the central socket. Until they have, a
        // follow-up would be routed by load alone and put the prefix on both pods.
        router
            .wait_for("the group's blocks in the index", |m| {
                m.value("router_index_pod_entries") >= before + 3.0
            })
            .await;
        for i in 1..4 {
            let (pod, hits) = router
                .post_matched("/v1/completions", &request(group, i))
                .await;
            assert_eq!(pod, first, "group {group} request {i} left its pod");
            assert!(
                hits >= 3.0,
                "group {group} request {i}: only {hits} blocks matched"
            );
        }
        homes.push(first);
    }
    assert!(
        homes.iter().all(|h| names.contains(h)),
        "unexpected pod names {homes:?}"
    );
}
