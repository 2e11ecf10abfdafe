"""The CPU KV tier (issue 18 acceptance 1) as an independent subscriber and client see it: a
long prompt pushed out of a small device pool is reloaded from host memory, with the cold run's
greedy output, `cached_tokens` counting the reloaded blocks, and the events showing the GPU
removal, the CPU store, and the GPU store on reload."""

import json
import random
import re
import subprocess
import threading
import time

import httpx
import msgpack
import pytest
import zmq

from conftest import MODEL, Agent, free_port
from test_kv_events import as_int, chained_hashes, fields

BLOCK_SIZE = 16
PROMPT_TOKENS = 1500
# 120 blocks of 368,640 bytes (float16): room for one 1,500-token prompt, not two.
DEVICE = ["--kv-cache-memory-bytes", str(120 * 368640), "--max-model-len", "1800"]


class TierEvents:
    """Every event batch in order, and per medium the set of block hashes it holds."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.sub.connect(endpoint)
        self.events: list[tuple[str, str, list]] = []  # (tag, medium, hashes)
        self.tiers: dict[str, set] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if not self.sub.poll(100):
                continue
            _topic, _seq, payload = self.sub.recv_multipart()
            _ts, events, _rank = msgpack.unpackb(payload, raw=False)
            for event in events:
                tag, f = fields(event)
                medium = f.get("medium") or "GPU"
                hashes = f.get("block_hashes", [])
                self.events.append((tag, medium, hashes))
                tier = self.tiers.setdefault(medium, set())
                if tag == "BlockStored":
                    tier.update(hashes)
                elif tag == "BlockRemoved":
                    tier.difference_update(hashes)
                elif tag == "AllBlocksCleared":
                    for t in self.tiers.values():
                        t.clear()

    def index(self, tag: str, medium: str, h: int, after: int = -1) -> int:
        for i, (t, m, hashes) in enumerate(self.events):
            if i > after and t == tag and m == medium and h in hashes:
                return i
        raise AssertionError(f"no {tag} {medium} of {h} after #{after}: {self.events[-20:]}")

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sub.close(linger=0)
        self.ctx.term()


def events_agent(*extra: str):
    """An agent publishing KV events, a client, and a subscriber that is connected (a SUB
    misses what came before it joined: resets until one of their batches arrives)."""
    events = f"tcp://127.0.0.1:{free_port()}"
    config = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": events.replace("127.0.0.1", "*"), "topic": f"kv@tier@{MODEL}"}
    agent = Agent(*DEVICE, *extra, "--kv-events-config", json.dumps(config))
    http = httpx.Client(base_url=agent.base_url, timeout=300)
    sub = TierEvents(events)
    deadline = time.monotonic() + 20
    while not sub.events:
        assert time.monotonic() < deadline, "no event reached the subscriber"
        http.post("/reset_prefix_cache")
        time.sleep(0.1)
    return agent, http, sub


def test_cpu_tier_reloads_a_prefix_pushed_out_of_the_device():
    agent, http, sub = events_agent("--kv-offloading-size", "0.25",
                                    "--enable-prompt-tokens-details")
    try:

        rng = random.Random(18)
        prompts = [[rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)] for _ in range(3)]

        def complete(tokens):
            r = http.post("/v1/completions", json={
                "model": MODEL, "prompt": tokens, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            body = r.json()
            return body["choices"][0]["token_ids"], body["usage"]["prompt_tokens_details"]["cached_tokens"]

        cold, cached = complete(prompts[0])
        assert cached == 0
        for other in prompts[1:]:
            complete(other)
        warm, cached = complete(prompts[0])
        assert warm == cold, "the reloaded prefix changed the greedy output"
        # Everything but the last block (and the remainder) came back from the CPU tier.
        assert cached >= PROMPT_TOKENS - BLOCK_SIZE - PROMPT_TOKENS % BLOCK_SIZE, cached

        time.sleep(0.5)
        first = as_int(chained_hashes(prompts[0])[0])
        stored_cpu = sub.index("BlockStored", "CPU", first)
        removed_gpu = sub.index("BlockRemoved", "GPU", first)
        stored_gpu = sub.index("BlockStored", "GPU", first)
        # Stored on the device and, in the same step's batch, in the CPU tier; later evicted.
        assert stored_gpu < stored_cpu < removed_gpu, (stored_gpu, stored_cpu, removed_gpu)
        assert sub.index("BlockStored", "GPU", first, after=removed_gpu) > removed_gpu
        # The CPU tier holds every full block of the three prompts.
        for p in prompts:
            assert {as_int(h) for h in chained_hashes(p)[:PROMPT_TOKENS // BLOCK_SIZE]} <= sub.tiers["CPU"]
    finally:
        sub.close()
        http.close()
        agent.stop()


def test_each_tier_rebuilt_from_events_matches_the_agent():
    """Acceptance 4 for the device and CPU tiers: evictions in both, then an independent
    subscriber's per-tier sets equal /debug/kv_cache; a reset with reset_external empties both
    and the tier's metrics are on /metrics."""
    # A CPU tier of 150 blocks: the four prompts' 372 blocks evict there too.
    agent, http, sub = events_agent("--kv-offloading-size", str(150 * 368640 / 2**30))
    try:
        rng = random.Random(4)
        for _ in range(4):
            tokens = [rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)]
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": tokens,
                                                    "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text

        def agree():
            time.sleep(0.5)
            tiers = http.get("/debug/kv_cache").json()["tiers"]
            for medium in ("GPU", "CPU"):
                assert set(tiers[medium]["block_hashes"]) == sub.tiers.get(medium, set()), medium
            return tiers

        tiers = agree()
        assert tiers["CPU"]["num_cached_blocks"] == 150
        assert any(t == "BlockRemoved" and m == "CPU" for t, m, _ in sub.events)
        page = http.get("/metrics").text
        for name in ("vllm:kv_offload_store_bytes_total", "vllm:kv_offload_cpu_cache_usage_perc"):
            assert name in page, name
        assert 'vllm:kv_offload_cpu_cache_usage_perc{engine="0",model_name="SmolLM2-135M-Instruct"} 1' in page

        assert http.post("/reset_prefix_cache", params={"reset_external": "true"}).status_code == 200
        tiers = agree()
        assert tiers["CPU"]["num_cached_blocks"] == 0 and tiers["GPU"]["num_cached_blocks"] == 0
    finally:
        sub.close()
        http.close()
        agent.stop()


def tiered(root) -> list[str]:
    """CPU + storage tier flags as llm-d's tiered-prefix-cache guide writes them."""
    config = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {
                  "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 200 * 368640,
                  "secondary_tiers": [{"type": "fs", "root_dir": str(root),
                                       "n_read_threads": 4, "n_write_threads": 4}]}}
    return [*DEVICE, "--enable-prompt-tokens-details", "--kv-transfer-config", json.dumps(config)]


def block_files(root) -> dict:
    """Block file path by its hash's 64-bit form, under the one layout folder."""
    (base,) = [p for p in root.iterdir() if p.is_dir()]
    return {int(p.stem[-16:], 16): p for p in base.rglob("*.bin")}


def folder_bytes(root) -> int:
    """Bytes of the block files; one the sweeper removes while this lists them counts 0."""
    total = 0
    for p in block_files(root).values():
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def wait_for_files(root, hashes, timeout=30):
    deadline = time.monotonic() + timeout
    while not set(hashes) <= set(block_files(root)):
        assert time.monotonic() < deadline, "the storage tier never wrote the blocks"
        time.sleep(0.1)


def completion(http, tokens):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": tokens, "max_tokens": 8,
                                           "temperature": 0, "ignore_eos": True,
                                           "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["token_ids"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_storage_tier_shared_by_two_agents_and_checked_on_read(tmp_path):
    """Acceptance 2 and 3 (corruption): B serves a prompt only A has seen from A's files; a
    damaged file stops the reload there (the rest recomputed, same output, counted); after a
    restart A reuses its own files."""
    rng = random.Random(2)
    prompt = [rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)]
    other = [rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)]
    full = PROMPT_TOKENS // BLOCK_SIZE
    a = Agent(*tiered(tmp_path))
    b = Agent(*tiered(tmp_path))
    ha = httpx.Client(base_url=a.base_url, timeout=300)
    hb = httpx.Client(base_url=b.base_url, timeout=300)
    try:
        cold, cached = completion(ha, prompt)
        assert cached == 0
        wait_for_files(tmp_path, [as_int(h) for h in chained_hashes(prompt)[:full]])
        warm, cached = completion(hb, prompt)
        assert warm == cold
        assert cached >= PROMPT_TOKENS - BLOCK_SIZE - PROMPT_TOKENS % BLOCK_SIZE, cached

        # Damage the 11th block's file of another prompt A served: B reloads 10 blocks.
        cold2, _ = completion(ha, other)
        hashes = [as_int(h) for h in chained_hashes(other)[:full]]
        wait_for_files(tmp_path, hashes)
        path = block_files(tmp_path)[hashes[10]]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        warm2, cached = completion(hb, other)
        assert warm2 == cold2
        assert cached == 10 * BLOCK_SIZE, cached
        page = hb.get("/metrics").text
        assert 'agent_kv_offload_corrupt_blocks_total{engine="0",model_name="SmolLM2-135M-Instruct"} 1' in page
        assert not path.exists(), "the damaged file was kept"

        # A restarted: its CPU tier is empty, its files are not.
        a.stop()
        a = Agent(*tiered(tmp_path))
        ha.close()
        ha = httpx.Client(base_url=a.base_url, timeout=300)
        again, cached = completion(ha, prompt)
        assert again == cold
        assert cached >= PROMPT_TOKENS - BLOCK_SIZE - PROMPT_TOKENS % BLOCK_SIZE, cached
    finally:
        ha.close()
        hb.close()
        a.stop()
        b.stop()


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} on /metrics")


def store_failures(http) -> float:
    return metric(http, "agent_kv_offload_store_failures_total")


def test_a_full_then_read_only_volume_leaves_the_agent_serving(tmp_path):
    """Acceptance 3 (volumes that refuse writes): an 8 MB tmpfs fills up, then is remounted
    read-only; stores fail soft and are counted, and the agent keeps serving the same output."""
    vol = tmp_path / "vol"
    vol.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(vol)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")
    agent = None
    try:
        agent = Agent(*tiered(vol))
        http = httpx.Client(base_url=agent.base_url, timeout=300)
        rng = random.Random(3)
        tokens = [rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)]
        first, _ = completion(http, tokens)
        deadline = time.monotonic() + 30
        while store_failures(http) == 0:
            assert time.monotonic() < deadline, "a full volume failed no store"
            time.sleep(0.05)
        subprocess.run(["mount", "-o", "remount,ro", str(vol)], check=True)
        before = store_failures(http)
        completion(http, [rng.randrange(100, 40000) for _ in range(600)])
        while store_failures(http) == before:
            assert time.monotonic() < deadline + 30, "a read-only volume failed no store"
            time.sleep(0.05)
        again, _ = completion(http, tokens)
        assert again == first
        assert http.get("/health").status_code == 200
        http.close()
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(["umount", str(vol)], check=False)


def test_a_capped_storage_tier_evicts_the_least_recently_used(tmp_path):
    """The storage tier's own size cap (max_bytes): after three prompts' worth of files the
    folder settles under it, and the files it dropped are announced as STORAGE removals."""
    cap = 100 * 368_700
    config = json.loads(tiered(tmp_path)[-1])
    config["kv_connector_extra_config"]["secondary_tiers"][0]["max_bytes"] = cap
    agent, http, sub = events_agent("--enable-prompt-tokens-details",
                                    "--kv-transfer-config", json.dumps(config))
    try:
        rng = random.Random(5)
        for _ in range(3):
            tokens = [rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)]
            completion(http, tokens)
        deadline = time.monotonic() + 30
        while True:
            used = folder_bytes(tmp_path)
            removed = any(t == "BlockRemoved" and m == "STORAGE" for t, m, _ in sub.events)
            if used <= cap and removed:
                break
            assert time.monotonic() < deadline, f"{used} bytes of files, cap {cap}"
            time.sleep(0.05)
    finally:
        sub.close()
        http.close()
        agent.stop()


def test_every_tier_rebuilt_from_events_and_nothing_leaks(tmp_path):
    """Acceptance 4 with all three tiers, and 6: a mixed workload (new prompts, repeats that
    reload from the CPU tier or the files, a stream aborted mid-way) evicts in the device pool,
    a 100-block CPU tier and a capped storage tier; then an independent subscriber's per-tier
    sets equal /debug/kv_cache, no device block is held by anyone, the CPU usage gauge is what
    its cached blocks account for, and the folder holds exactly the announced files."""
    cpu_blocks, file_bytes = 100, 368_700
    cap = 150 * file_bytes
    config = json.loads(tiered(tmp_path)[-1])
    extra = config["kv_connector_extra_config"]
    extra["cpu_bytes_to_use"] = cpu_blocks * 368640
    extra["secondary_tiers"][0]["max_bytes"] = cap
    agent, http, sub = events_agent("--enable-prompt-tokens-details",
                                    "--kv-transfer-config", json.dumps(config))
    try:
        rng = random.Random(6)
        prompts = [[rng.randrange(100, 40000) for _ in range(PROMPT_TOKENS)] for _ in range(5)]
        cold = {}
        for step, i in enumerate([0, 1, 0, 2, 3, 2, 4, 1]):
            out, cached = completion(http, prompts[i])
            if i in cold:
                assert out == cold[i], f"prompt {i} changed after a reload"
            else:
                cold[i] = out
            if step == 2:
                # Every tier gave up prompt 0's tail, not its head: the device's leftovers, the
                # CPU tier's and the files the sweep left still chain from its first block.
                assert cached >= 40 * BLOCK_SIZE, cached
        # The tiers' traffic in vLLM's metric names.
        assert metric(http, "vllm:kv_offload_tiering_read_bytes_total") > 0
        assert metric(http, "vllm:kv_offload_load_time_total") > 0
        assert metric(http, "vllm:external_prefix_cache_hits_total") > 0
        page = http.get("/metrics").text
        assert re.search(r'vllm:kv_offload_tiering_chunk_hits_total\{[^}]*tier="1:fs"[^}]*\} [1-9]', page)
        assert 'agent_kv_offload_transfer_seconds_count{direction="load"' in page
        # A stream dropped after its first chunk.
        body = {"model": MODEL, "prompt": prompts[3][:700], "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())

        deadline = time.monotonic() + 30
        while True:
            time.sleep(0.3)
            tiers = http.get("/debug/kv_cache").json()["tiers"]
            mismatch = [m for m in ("GPU", "CPU", "STORAGE")
                        if set(tiers[m]["block_hashes"]) != sub.tiers.get(m, set())]
            files = set(block_files(tmp_path))
            idle = metric(http, "vllm:kv_cache_usage_perc") == 0.0
            if not mismatch and idle and files == set(tiers["STORAGE"]["block_hashes"]):
                break
            assert time.monotonic() < deadline, (mismatch, idle, len(files),
                                                 tiers["STORAGE"]["num_cached_blocks"])
        removed = {m for t, m, _ in sub.events if t == "BlockRemoved"}
        assert removed >= {"GPU", "CPU", "STORAGE"}, removed
        assert tiers["CPU"]["num_cached_blocks"] == cpu_blocks
        usage = metric(http, "vllm:kv_offload_cpu_cache_usage_perc")
        assert usage == tiers["CPU"]["num_cached_blocks"] / cpu_blocks, usage
        assert folder_bytes(tmp_path) <= cap
        assert metric(http, "vllm:num_requests_running") == 0
    finally:
        sub.close()
        http.close()
        agent.stop()
