#!/usr/bin/env bash
# Installs what is missing, then serves the default model on port 8000 (override with PORT).
# Extra arguments are passed to `agent serve` (vllm serve flags), e.g. --max-model-len 4096.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/install.sh"
exec "$ROOT/target/release/agent" serve "$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --served-model-name SmolLM2-135M-Instruct --host 0.0.0.0 --port "${PORT:-8000}" "$@"
