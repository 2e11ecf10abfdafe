#!/usr/bin/env bash
# Installs what is missing, then serves the default model behind the KV-cache-aware router:
# two agents on 127.0.0.1:8001 and :8002 (KV events PUB/replay on 5557/5558 and 5567/5568) and
# the router on port 8000 (override with PORT). Extra arguments go to both `agent serve`s
# (vllm serve flags). Ctrl-C stops all three; if one exits, the others are stopped too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/install.sh"
if ! command -v cargo >/dev/null; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p router

MODEL="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME="SmolLM2-135M-Instruct"
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait || true; }
trap stop EXIT INT TERM

# agent HTTP_PORT EVENTS_PORT REPLAY_PORT [flags…]
agent() {
    local http=$1 events=$2 replay=$3
    shift 3
    local kv="{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$events\",\"replay_endpoint\":\"tcp://*:$replay\",\"topic\":\"kv@127.0.0.1:$http@$NAME\"}"
    "$ROOT/target/release/agent" serve "$MODEL" --served-model-name "$NAME" \
        --host 127.0.0.1 --port "$http" --kv-events-config "$kv" "$@" &
    pids+=($!)
}
agent 8001 5557 5558 "$@"
agent 8002 5567 5568 "$@"
"$ROOT/target/release/router" --model "$MODEL" --served-model-name "$NAME" \
    --host 0.0.0.0 --port "${PORT:-8000}" \
    --pod "http://127.0.0.1:8001,events=tcp://127.0.0.1:5557,replay=tcp://127.0.0.1:5558" \
    --pod "http://127.0.0.1:8002,events=tcp://127.0.0.1:5567,replay=tcp://127.0.0.1:5568" &
pids+=($!)
wait -n
