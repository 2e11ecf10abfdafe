//! Issue 21: MODEL given as a Hugging Face id resolves from the local hub cache as vLLM does
//! offline (`models--org--name/snapshots/<commit>/`, the commit from `refs/main` or given by
//! `--revision`), is served under that id by default, and a model not in the cache is an error
//! that says how to provide it. The cache here is built by the test around the default GGUF.

use std::path::Path;

use e2e::{agent_bin, failed_start, model_path, Agent, Launch};
use serde_json::json;

const ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub cache holding [`ID`] at [`COMMIT`] (refs/main), its GGUF linked as the hub client links
/// snapshot files to blobs.
fn cache(dir: &Path) {
    let repo = dir.join("models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    std::os::unix::fs::symlink(
        model_path(),
        snapshot.join("smollm2-135m-instruct-q4_1.gguf"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hugging_face_id_resolves_from_the_cache_and_names_the_model() {
    let dir = std::env::temp_dir().join(format!("e2e-hub-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    cache(&dir);
    for revision in [None, Some(COMMIT)] {
        let launch = Launch {
            model: ID.into(),
            served_model_name: None,
            env: vec![("HF_HUB_CACHE".into(), dir.clone().into())],
        };
        let extra: Vec<&str> = revision.map(|r| vec!["--revision", r]).unwrap_or_default();
        let agent = Agent::launch(&launch, &extra).await;
        let models = agent.get("/v1/models").await;
        assert_eq!(models.body["data"][0]["id"], ID, "{}", models.body);
        let out = agent
            .post_ok(
                "/v1/completions",
                &json!({"model": ID, "prompt": "Hello", "max_tokens": 2}),
            )
            .await;
        assert_eq!(out["model"], ID);
    }

    // Not in the cache: the error names the id, the cache and how to provide it.
    failed_start(
        std::process::Command::new(agent_bin())
            .args(["serve", "HuggingFaceTB/not-downloaded"])
            .env("HF_HUB_CACHE", &dir),
        &[
            "HuggingFaceTB/not-downloaded",
            "not in the Hugging Face cache",
            "huggingface-cli download",
            &dir.to_string_lossy(),
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
