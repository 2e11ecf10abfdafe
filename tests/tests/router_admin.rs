//! Issue 17 (10): admin endpoints (`/reset_prefix_cache`, `/debug/…`) need the pod's `--api-key`,
//! and the router answers 404 for them unless started with `--expose-admin-routes`, in which
//! case the pod's own answer (401 without the key) comes through.

use e2e::cluster::{pod_flags, Pod, RouterProc};

const KEY: &str = "admin-test-key";

async fn status(client: &reqwest::Client, method: reqwest::Method, url: String, key: bool) -> u16 {
    let mut req = client.request(method, &url);
    if key {
        req = req.bearer_auth(KEY);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_key_and_are_not_routed_by_default() {
    let pod = Pod::start(&["--api-key", KEY]).await;
    let pods = pod_flags([pod.spec("a", None)]);
    let closed = RouterProc::start(&pods).await;
    let mut open_flags = pods.clone();
    open_flags.push("--expose-admin-routes".into());
    let open = RouterProc::start(&open_flags).await;
    let client = reqwest::Client::new();
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);

    // The pod itself.
    let reset = |base: &dyn Fn(&str) -> String| base("/reset_prefix_cache");
    let debug = |base: &dyn Fn(&str) -> String| base("/debug/kv_cache");
    let on_pod = |p: &str| pod.url(p);
    assert_eq!(
        status(&client, post.clone(), reset(&on_pod), false).await,
        401
    );
    assert_eq!(
        status(&client, get.clone(), debug(&on_pod), false).await,
        401
    );
    assert_eq!(
        status(&client, post.clone(), reset(&on_pod), true).await,
        200
    );
    assert_eq!(
        status(&client, get.clone(), debug(&on_pod), true).await,
        200
    );

    // A router left at its default does not pass them on, key or not.
    let via_closed = |p: &str| closed.url(p);
    for key in [false, true] {
        assert_eq!(
            status(&client, post.clone(), reset(&via_closed), key).await,
            404
        );
        assert_eq!(
            status(&client, get.clone(), debug(&via_closed), key).await,
            404
        );
    }

    // One told to expose them passes the pod's answers through.
    let via_open = |p: &str| open.url(p);
    assert_eq!(
        status(&client, post.clone(), reset(&via_open), false).await,
        401
    );
    assert_eq!(status(&client, post, reset(&via_open), true).await, 200);
    assert_eq!(status(&client, get, debug(&via_open), true).await, 200);
}
