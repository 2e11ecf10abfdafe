//! Which request paths are what, for both binaries: the authenticated API and the operator's
//! (admin) endpoints that change or expose a server's state.

/// vLLM's dev-mode endpoints (`VLLM_SERVER_DEV_MODE=1`) that we serve or may meet on a vLLM
/// pod, and our own `/debug/` pages.
const ADMIN_PATHS: &[&str] = &[
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/server_info",
];

/// An operator's endpoint: it needs the API key where one is set, and a router does not pass it
/// through from clients unless told to.
pub fn is_admin(path: &str) -> bool {
    ADMIN_PATHS.contains(&path) || path.starts_with("/debug/")
}

/// A path `--api-key` guards: vLLM's `/v1` API, and the admin endpoints.
pub fn needs_api_key(path: &str) -> bool {
    path.starts_with("/v1") || is_admin(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_and_guarded_paths() {
        for p in ["/reset_prefix_cache", "/debug/kv_cache", "/sleep"] {
            assert!(is_admin(p) && needs_api_key(p), "{p}");
        }
        for p in ["/v1/completions", "/v1/models"] {
            assert!(!is_admin(p) && needs_api_key(p), "{p}");
        }
        for p in [
            "/health",
            "/metrics",
            "/ping",
            "/version",
            "/tokenize",
            "/debug",
        ] {
            assert!(!needs_api_key(p), "{p}");
        }
    }
}
