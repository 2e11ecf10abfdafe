//! A model named by its Hugging Face id (`org/name`), found where the hub client caches it, as
//! vLLM finds it offline: `$HF_HUB_CACHE` (else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), `models--org--name/snapshots/<commit>/`, the commit read from
//! `refs/<revision>` (`main` by default) or given as the revision itself. There is no hub
//! access: a model not in the cache is an error that says how to provide it.

use std::path::{Path, PathBuf};

use crate::LoadError;

/// Where `MODEL` points: a path that exists is used as it is; otherwise an `org/name` id is
/// looked up in the hub cache (a GGUF repository's snapshot resolves to its one `.gguf` file).
/// Returns the path and, for an id, the id (vLLM's default served model name).
pub fn resolve(
    model: &Path,
    revision: Option<&str>,
) -> Result<(PathBuf, Option<String>), LoadError> {
    if model.exists() {
        return Ok((model.to_path_buf(), None));
    }
    let Some(id) = model.to_str().filter(|s| is_hub_id(s)) else {
        return Err(LoadError::NotFound(model.to_path_buf()));
    };
    let cache = cache_dir();
    let snapshot = snapshot(&cache, id, revision.unwrap_or("main"))?;
    Ok((model_in(&snapshot)?, Some(id.to_string())))
}

/// `org/name`: two non-empty parts of the characters the hub allows, not a relative path.
fn is_hub_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

/// The hub client's cache directory, from its environment variables.
pub fn cache_dir() -> PathBuf {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .unwrap_or_else(|| {
            var("HOME")
                .unwrap_or_else(|| PathBuf::from("/"))
                .join(".cache/huggingface/hub")
        })
}

fn not_cached(id: &str, cache: &Path, why: String) -> LoadError {
    LoadError::NotCached {
        id: id.to_string(),
        cache: cache.to_path_buf(),
        why,
    }
}

fn snapshot(cache: &Path, id: &str, revision: &str) -> Result<PathBuf, LoadError> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(not_cached(id, cache, format!("no {}", repo.display())));
    }
    let by_ref = std::fs::read_to_string(repo.join("refs").join(revision))
        .ok()
        .map(|commit| commit.trim().to_string());
    let commit = by_ref.unwrap_or_else(|| revision.to_string());
    let dir = repo.join("snapshots").join(&commit);
    if commit.contains('/') || commit.contains("..") || !dir.is_dir() {
        return Err(not_cached(
            id,
            cache,
            format!(
                "revision {revision:?} has no snapshot under {}",
                repo.display()
            ),
        ));
    }
    Ok(dir)
}

/// The model in a snapshot: the directory when it has `config.json`, else its one `.gguf`.
fn model_in(snapshot: &Path) -> Result<PathBuf, LoadError> {
    if snapshot.join("config.json").is_file() {
        return Ok(snapshot.to_path_buf());
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(snapshot)
        .map_err(LoadError::io(snapshot))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    ggufs.sort();
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(LoadError::MissingFile(snapshot.join("config.json"))),
        many => Err(LoadError::AmbiguousGguf {
            dir: snapshot.to_path_buf(),
            files: many
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::scratch_dir;

    /// A hub cache with `org/model` at commit `abc123` (refs/main) holding `files`.
    fn cache_with(name: &str, files: &[&str]) -> PathBuf {
        let cache = scratch_dir(name);
        let repo = cache.join("models--org--model");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        for f in files {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
        cache
    }

    #[test]
    fn ids_and_paths() {
        assert!(is_hub_id("meta-llama/Llama-3.1-8B-Instruct"));
        assert!(is_hub_id("Qwen/Qwen2.5-0.5B"));
        for not in [
            "model.gguf",
            "/abs/path",
            "./a/b",
            "a/b/c",
            "../x",
            "a/",
            "/b",
            "a b/c",
        ] {
            assert!(!is_hub_id(not), "{not}");
        }
    }

    #[test]
    fn snapshots_resolve_by_ref_or_commit() {
        let cache = cache_with("hub-hf", &["config.json", "tokenizer.json"]);
        let snap = cache.join("models--org--model/snapshots/abc123");
        assert_eq!(snapshot(&cache, "org/model", "main").unwrap(), snap);
        assert_eq!(snapshot(&cache, "org/model", "abc123").unwrap(), snap);
        assert_eq!(model_in(&snap).unwrap(), snap);
        for (id, rev) in [
            ("org/other", "main"),
            ("org/model", "v2"),
            ("org/model", "../abc123"),
        ] {
            let err = snapshot(&cache, id, rev).unwrap_err().to_string();
            assert!(err.contains("not in the Hugging Face cache"), "{err}");
            assert!(err.contains("huggingface-cli download"), "{err}");
        }
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn gguf_snapshots_need_exactly_one_file() {
        let cache = cache_with("hub-gguf", &["m-Q4_1.gguf", "README.md"]);
        let snap = cache.join("models--org--model/snapshots/abc123");
        assert_eq!(model_in(&snap).unwrap(), snap.join("m-Q4_1.gguf"));
        std::fs::write(snap.join("m-Q8_0.gguf"), "").unwrap();
        let err = model_in(&snap).unwrap_err().to_string();
        assert!(err.contains("m-Q4_1.gguf, m-Q8_0.gguf"), "{err}");
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
