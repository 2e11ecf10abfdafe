"""KV cache events as an independent subscriber sees them (issue 3 acceptance).

Everything here is written against the wire format, not against the agent's encoder: pyzmq
for the sockets, the generic `msgpack` reader for the payloads (both event layouts), and
`cbor2` + `hashlib` for vLLM's chained sha256_cbor block hashes (reference §4, §5).
"""

import hashlib
import json
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cbor2
import httpx
import msgpack
import pytest
import zmq

from conftest import MODEL, Agent, agent_binary, free_port, model_file

BLOCK_SIZE = 16
STORED_FIELDS = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                 "medium", "lora_name", "extra_keys", "group_idx"]
REMOVED_FIELDS = ["block_hashes", "medium", "group_idx"]


def sha256_cbor(obj) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


NONE_HASH = sha256_cbor("vllm-none-hash")


def chained_hashes(tokens: list[int]) -> list[bytes]:
    """vLLM's hash_block_tokens over the full blocks of `tokens` (no extra keys)."""
    out, parent = [], NONE_HASH
    for i in range(len(tokens) // BLOCK_SIZE):
        parent = sha256_cbor([parent, tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE], None])
        out.append(parent)
    return out


def as_int(digest: bytes) -> int:
    return int.from_bytes(digest[-8:], "big")


def fields(event) -> tuple[str, dict]:
    """(tag, fields) of an event in either layout: a map tagged under "type" or an array."""
    if isinstance(event, dict):
        return event["type"], event
    tag, *values = event
    names = {"BlockStored": STORED_FIELDS, "BlockRemoved": REMOVED_FIELDS}.get(tag, [])
    return tag, dict(zip(names, values))


class Subscriber:
    """Rebuilds the set of cached block hashes from the live stream. `lose` is a range of
    seqs it pretends never arrived; the gap is then filled through the replay socket."""

    def __init__(self, endpoint: str, replay: str | None, topic: bytes):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(endpoint)
        self.replay_endpoint = replay
        self.lose = range(0)
        self.state: set = set()
        self.batches: list[tuple[int, list]] = []
        self.last_seq: int | None = None
        self.replayed: list[int] = []
        self.errors: list[str] = []
        self.last_message = time.monotonic()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        while not self.stop.is_set():
            if not poller.poll(50):
                continue
            topic, seq, payload = self.sub.recv_multipart()
            seq = int.from_bytes(seq, "big")
            with self.lock:
                self.last_message = time.monotonic()
                if seq in self.lose:
                    continue
                if self.last_seq is not None and seq > self.last_seq + 1:
                    self._replay(self.last_seq + 1, seq)
                self._apply(seq, payload)

    def _replay(self, start: int, until: int):
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            if not dealer.poll(5000):
                self.errors.append(f"replay from {start} timed out")
                break
            _, seq, payload = dealer.recv_multipart()
            seq = int.from_bytes(seq, "big", signed=True)
            if seq == -1:
                break
            if seq < until:
                self.replayed.append(seq)
                self._apply(seq, payload)
        dealer.close(linger=0)

    def _apply(self, seq: int, payload: bytes):
        if self.last_seq is not None and seq != self.last_seq + 1:
            self.errors.append(f"seq {seq} after {self.last_seq}")
        self.last_seq = seq
        ts, events, rank = msgpack.unpackb(payload, raw=False)
        assert isinstance(ts, float) and rank is None
        self.batches.append((seq, events))
        for event in events:
            tag, f = fields(event)
            if tag == "BlockStored":
                assert len(f["token_ids"]) == len(f["block_hashes"]) * f["block_size"]
                for h in f["block_hashes"]:
                    if h in self.state:
                        self.errors.append(f"block {h} announced stored twice")
                    self.state.add(h)
            elif tag == "BlockRemoved":
                for h in f["block_hashes"]:
                    if h not in self.state:
                        self.errors.append(f"block {h} removed but never stored")
                    self.state.discard(h)
            elif tag == "AllBlocksCleared":
                self.state.clear()

    def wait_quiet(self, seconds=1.0, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if time.monotonic() - self.last_message > seconds:
                    return
            time.sleep(0.1)
        raise AssertionError("event stream never went quiet")

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sub.close(linger=0)
        self.ctx.term()


class EventsAgent:
    """An agent publishing KV events on fresh ports, with a subscriber that saw every batch."""

    def __init__(self, *extra: str, encoding="map", env=None):
        self.events = f"tcp://127.0.0.1:{free_port()}"
        self.replay = f"tcp://127.0.0.1:{free_port()}"
        port = free_port()
        # The llm-d topic form; the PUB and replay sockets bind (wildcard host).
        topic = f"kv@127.0.0.1:{port}@{MODEL}"
        config = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": self.events.replace("127.0.0.1", "*"),
                  "replay_endpoint": self.replay.replace("127.0.0.1", "*"),
                  "topic": topic, "event_encoding": encoding}
        self.topic = topic.encode()
        self.agent = Agent(*extra, "--kv-events-config", json.dumps(config), env=env, port=port)
        self.http = httpx.Client(base_url=self.agent.base_url, timeout=120)

    def subscriber(self) -> Subscriber:
        """A subscriber that is connected: it has seen the batch of a cache reset."""
        sub = Subscriber(self.events, self.replay, b"kv@")
        deadline = time.monotonic() + 20
        while not sub.batches:
            assert time.monotonic() < deadline, "subscriber never received a batch"
            assert self.http.post("/reset_prefix_cache").status_code == 200
            time.sleep(0.1)
        return sub

    def complete(self, tokens: list[int], max_tokens=1):
        r = self.http.post("/v1/completions", json={
            "model": MODEL, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()

    def cached(self) -> dict:
        r = self.http.get("/debug/kv_cache")
        assert r.status_code == 200, r.text
        return r.json()

    def close(self):
        self.http.close()
        self.agent.stop()


# A pool of ~65 blocks (368,640 bytes per float16 block for this model), so the workload below
# evicts.
SMALL_KV = ["--kv-cache-memory-bytes", "24000000", "--max-model-len", "512"]


@pytest.fixture(scope="module")
def map_agent():
    a = EventsAgent(*SMALL_KV)
    yield a
    a.close()


@pytest.fixture(scope="module")
def array_agent():
    # Older consumers: positional arrays, and full 32-byte digests instead of 64-bit hashes.
    a = EventsAgent(encoding="array", env={"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "0"})
    yield a
    a.close()


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def stored_events(sub: Subscriber) -> list[dict]:
    with sub.lock:
        return [f for _, events in sub.batches for tag, f in map(fields, events)
                if tag == "BlockStored"]


def check_prompt_blocks(a: EventsAgent, as_wire) -> None:
    """A 40-token prompt: its two full blocks are announced with the prompt's tokens, block by
    block, under hashes computed here independently."""
    sub = a.subscriber()
    try:
        tokens = prompt(random.Random(7), 40)
        before = len(stored_events(sub))
        a.complete(tokens)
        sub.wait_quiet(0.5)
        stored = stored_events(sub)[before:]
        got_hashes = [h for f in stored for h in f["block_hashes"]]
        got_tokens = [t for f in stored for t in f["token_ids"]]
        expected = chained_hashes(tokens)
        assert got_hashes == [as_wire(h) for h in expected]
        assert got_tokens == tokens[:2 * BLOCK_SIZE]
        assert stored[0]["parent_block_hash"] is None
        assert all(f["block_size"] == BLOCK_SIZE and f["medium"] == "GPU" for f in stored)
        assert all(f["lora_id"] is None and f["lora_name"] is None for f in stored)
        assert sub.errors == []
    finally:
        sub.close()


def test_block_stored_carries_prompt_tokens_and_vllm_hashes(map_agent):
    check_prompt_blocks(map_agent, as_int)


def test_array_layout_with_full_digests(array_agent):
    check_prompt_blocks(array_agent, lambda digest: digest)
    cached = array_agent.cached()
    assert sorted(cached["block_digests"]) == sorted(h.hex() for h in chained_hashes(
        prompt(random.Random(7), 40)))


def test_state_rebuilt_from_events_equals_the_cache_and_replay_recovers(map_agent):
    """A few hundred requests over shared prefixes with a pool that must evict: one subscriber
    sees every batch, one loses a range and refills it through the replay socket; both end
    with exactly the agent's cached blocks."""
    full = map_agent.subscriber()
    lossy = map_agent.subscriber()
    with lossy.lock:
        lost = range(lossy.last_seq + 5, lossy.last_seq + 25)
        lossy.lose = lost
    try:
        rng = random.Random(3)
        prefixes = [prompt(rng, rng.choice([16, 40, 64])) for _ in range(12)]
        jobs = [(rng.choice(prefixes) + prompt(rng, rng.randrange(0, 48)), rng.randrange(1, 4))
                for _ in range(300)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda job: map_agent.complete(*job), jobs))
        metrics = map_agent.http.get("/metrics").text
        evictions = sum(1 for _, events in full.batches for e in events
                        if fields(e)[0] == "BlockRemoved")
        assert evictions > 0, "the workload did not evict: no pressure"
        full.wait_quiet()
        lossy.wait_quiet()
        cached = set(map_agent.cached()["block_hashes"])
        assert full.errors == [] and lossy.errors == []
        assert full.state == cached
        assert lossy.replayed == list(lost)
        assert lossy.state == cached
        assert len(cached) > 0
        assert "agent_kv_events_dropped_batches_total" in metrics
    finally:
        full.close()
        lossy.close()


def test_reset_prefix_cache_clears_everything(map_agent):
    sub = map_agent.subscriber()
    try:
        map_agent.complete(prompt(random.Random(11), 48))
        assert map_agent.cached()["num_cached_blocks"] > 0
        assert map_agent.http.post("/reset_prefix_cache").status_code == 200
        sub.wait_quiet(0.5)
        with sub.lock:
            _, events = sub.batches[-1]
        assert [fields(e)[0] for e in events] == ["AllBlocksCleared"]
        empty = {"num_cached_blocks": 0, "block_hashes": [], "block_digests": []}
        # The device at the top level and, without lower tiers, as the only tier.
        assert map_agent.cached() == {**empty, "tiers": {"GPU": empty}}
    finally:
        sub.close()


@pytest.mark.parametrize("config, message", [
    ('{"enable_kv_cache_events": true, "endpoint": "localhost:5557"}', "not a ZMQ endpoint"),
    ('{"enable_kv_cache_events": true, "buffer_step": 5}', "unknown field `buffer_step`"),
    ('{"enable_kv_cache_events": true, "event_encoding": "json"}', "unknown event encoding"),
    ('{"enable_kv_cache_events": 1}', "invalid type"),
    ('not json', "--kv-events-config"),
])
def test_invalid_config_is_a_clear_start_up_error(config, message):
    done = subprocess.run([str(agent_binary()), "serve", str(model_file()), "--port", str(free_port()),
                           "--kv-events-config", config],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr, done.stdout + done.stderr
    assert "panicked" not in done.stderr


def test_busy_events_port_is_a_start_up_error():
    with zmq.Context() as ctx, ctx.socket(zmq.PUB) as holder:
        port = holder.bind_to_random_port("tcp://*")
        config = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{port}"})
        done = subprocess.run([str(agent_binary()), "serve", str(model_file()),
                               "--port", str(free_port()), "--kv-events-config", config],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"KV events bind tcp://*:{port}" in done.stdout + done.stderr, done.stderr
