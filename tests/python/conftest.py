"""Fixtures that start the real agent binary on a free loopback port and stop it afterwards.

AGENT_BIN and MODEL_PATH override the defaults ($CARGO_TARGET_DIR/release/agent, with
CARGO_TARGET_DIR defaulting to <repo>/target, and <repo>/models/SmolLM2-135M-Instruct.Q4_1.gguf).
"""

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 512
API_KEY = "test-secret-key"
STARTUP_TIMEOUT_S = 60


def _path(env: str, default: Path, hint: str) -> Path:
    path = Path(os.environ.get(env, default))
    if not path.is_file():
        pytest.exit(f"{path} not found: {hint} (or set {env})", returncode=2)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_binary() -> Path:
    # Relative to the repository, where the scripts run cargo.
    target = ROOT / os.environ.get("CARGO_TARGET_DIR", "target")
    return _path("AGENT_BIN", target / "release/agent", "run scripts/install.sh")


def model_file() -> Path:
    return _path(
        "MODEL_PATH", ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf", "run scripts/install.sh"
    )


class Agent:
    """One `agent serve` process; `stop()` kills and reaps it. `env` adds environment
    variables; `port` picks the HTTP port (a free one by default)."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None, port: int | None = None):
        binary = agent_binary()
        model = model_file()
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+b")
        self.proc = subprocess.Popen(
            [str(binary), "serve", str(model), "--served-model-name", MODEL,
             "--host", "127.0.0.1", "--port", str(self.port), *extra],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"agent not healthy after {STARTUP_TIMEOUT_S}s:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-20000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def agent():
    a = Agent("--max-model-len", str(MAX_MODEL_LEN))
    yield a
    a.stop()


@pytest.fixture(scope="session")
def auth_agent():
    a = Agent("--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY)
    yield a
    a.stop()


@pytest.fixture(scope="session")
def client(agent):
    return openai.OpenAI(base_url=f"{agent.base_url}/v1", api_key="EMPTY", max_retries=0)


@pytest.fixture(scope="session")
def http(agent):
    with httpx.Client(base_url=agent.base_url, timeout=120) as c:
        yield c
