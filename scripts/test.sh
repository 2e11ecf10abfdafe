#!/usr/bin/env bash
# Everything CI runs: install, the Rust test suites (unit + end-to-end against the real
# binary), then the Python conformance suite with the official openai client. Both suites run
# even when the first fails; the script fails if either does.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/install.sh"
if ! command -v cargo >/dev/null; then export PATH="$HOME/.cargo/bin:$PATH"; fi

failed=()
# Release: the binary the e2e tests start and the tests themselves share one build.
cargo test --release --workspace --no-fail-fast || failed+=("cargo test")
"$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider tests/python || failed+=("pytest")

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all test suites passed"
