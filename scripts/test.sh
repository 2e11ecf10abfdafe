#!/usr/bin/env bash
# Everything CI runs: install, the Rust test suites (unit + end-to-end against the real
# binary), then the Python conformance suite with the official openai client.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/install.sh"
if ! command -v cargo >/dev/null; then export PATH="$HOME/.cargo/bin:$PATH"; fi

# Release: the binary the e2e tests start and the tests themselves share one build.
cargo test --release --workspace

"$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider tests/python
