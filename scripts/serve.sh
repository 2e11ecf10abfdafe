#!/usr/bin/env bash
# Installs what is missing, then serves the default model behind the KV-cache-aware router:
# two agents on 127.0.0.1:8001 and :8002 (KV events PUB/replay on 5557/5558 and 5567/5568) and
# the router on port 8000. Every port can be moved: PORT (router), AGENT_A_PORT, AGENT_A_EVENTS,
# AGENT_A_REPLAY, AGENT_B_PORT, AGENT_B_EVENTS, AGENT_B_REPLAY; a port in use is an error before
# anything starts. Binaries come from $CARGO_TARGET_DIR (default target/). Extra arguments go to
# both `agent serve`s (vllm serve flags). Ctrl-C stops all three; if one exits, the others are
# stopped too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/install.sh"
if ! command -v cargo >/dev/null; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p router

BIN="$(realpath -m "${CARGO_TARGET_DIR:-target}")/release"
MODEL="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME="SmolLM2-135M-Instruct"
PORT="${PORT:-8000}"
A_HTTP="${AGENT_A_PORT:-8001}" A_EVENTS="${AGENT_A_EVENTS:-5557}" A_REPLAY="${AGENT_A_REPLAY:-5558}"
B_HTTP="${AGENT_B_PORT:-8002}" B_EVENTS="${AGENT_B_EVENTS:-5567}" B_REPLAY="${AGENT_B_REPLAY:-5568}"
for named in "PORT=$PORT" "AGENT_A_PORT=$A_HTTP" "AGENT_A_EVENTS=$A_EVENTS" "AGENT_A_REPLAY=$A_REPLAY" \
    "AGENT_B_PORT=$B_HTTP" "AGENT_B_EVENTS=$B_EVENTS" "AGENT_B_REPLAY=$B_REPLAY"; do
    port="${named#*=}"
    if (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
        echo "serve.sh: port $port (${named%%=*}) is in use; set ${named%%=*} to another port" >&2
        exit 1
    fi
done

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait || true; }
trap stop EXIT INT TERM

# agent HTTP_PORT EVENTS_PORT REPLAY_PORT [flags…]
agent() {
    local http=$1 events=$2 replay=$3
    shift 3
    local kv="{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$events\",\"replay_endpoint\":\"tcp://*:$replay\",\"topic\":\"kv@127.0.0.1:$http@$NAME\"}"
    "$BIN/agent" serve "$MODEL" --served-model-name "$NAME" \
        --host 127.0.0.1 --port "$http" --kv-events-config "$kv" "$@" &
    pids+=($!)
}
agent "$A_HTTP" "$A_EVENTS" "$A_REPLAY" "$@"
agent "$B_HTTP" "$B_EVENTS" "$B_REPLAY" "$@"
"$BIN/router" --model "$MODEL" --served-model-name "$NAME" \
    --host 0.0.0.0 --port "$PORT" \
    --pod "http://127.0.0.1:$A_HTTP,events=tcp://127.0.0.1:$A_EVENTS,replay=tcp://127.0.0.1:$A_REPLAY" \
    --pod "http://127.0.0.1:$B_HTTP,events=tcp://127.0.0.1:$B_EVENTS,replay=tcp://127.0.0.1:$B_REPLAY" &
pids+=($!)
wait -n
