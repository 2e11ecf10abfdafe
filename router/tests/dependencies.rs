//! The router stays small: it shares the `protocol`, `prompt` and `kvevents` crates with the
//! agent and never links the engine, its kernels, candle, or the CUDA and UCX layers the agent
//! grows (a router image needs neither a GPU stack nor UCX).

use std::collections::BTreeSet;
use std::process::Command;

/// Packages that must not appear in the router's build graph (exact names, or prefixes ending
/// in `-`).
const FORBIDDEN: &[&str] = &[
    "agent",
    "kernels",
    "offload",
    "kvtransfer",
    "candle-",
    "cudarc",
    "ucx-",
];

/// Every package the router's normal and build dependencies pull in, on any target.
fn router_packages() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "router",
            "--edges",
            "normal,build",
            "--target",
            "all",
            "--all-features",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn router_does_not_link_the_engine() {
    let packages = router_packages();
    // The graph was really read: the router and what it must share are in it.
    for shared in ["router", "protocol", "prompt", "kvevents"] {
        assert!(
            packages.contains(shared),
            "{shared} missing from {packages:?}"
        );
    }
    let forbidden: Vec<&String> = packages
        .iter()
        .filter(|p| {
            FORBIDDEN.iter().any(|f| match f.strip_suffix('-') {
                Some(prefix) => p.starts_with(&format!("{prefix}-")),
                None => p.as_str() == *f,
            })
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "the router depends on {forbidden:?}; move what it needs into a shared crate"
    );
}
