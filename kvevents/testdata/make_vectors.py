"""Writes the msgpack test vectors the kvevents unit tests decode and re-encode.

The structs follow vLLM's msgspec definitions (vllm/distributed/kv_events.py): tagged
structs with omit_defaults; `tag_field="type"` maps for vLLM >= 0.33, `array_like=True` for
older releases. Run with msgspec installed: python make_vectors.py
"""

from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent


def event_types(array_like: bool):
    class KVCacheEvent(msgspec.Struct, array_like=array_like, omit_defaults=True,
                       gc=False, tag=True, tag_field="type"):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple[Any, ...] | None] | None = None
        group_idx: int | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]
        data_parallel_rank: int | None = None

    return BlockStored, BlockRemoved, AllBlocksCleared, EventBatch


def batch(array_like: bool):
    BlockStored, BlockRemoved, AllBlocksCleared, EventBatch = event_types(array_like)
    return EventBatch(
        ts=1763712000.25,
        events=[
            BlockStored(block_hashes=[2**64 - 1, 7], parent_block_hash=None,
                        token_ids=[1, 200, 70000, 3] * 2, block_size=4, lora_id=None,
                        medium="GPU", lora_name=None),
            BlockStored(block_hashes=[bytes(range(32))], parent_block_hash=bytes([9] * 32),
                        token_ids=[5, 6, 7, 8], block_size=4, lora_id=None, medium="GPU",
                        lora_name=None, extra_keys=[("salt",)]),
            BlockRemoved(block_hashes=[7, 2**63], medium="GPU"),
            BlockStored(block_hashes=[11], parent_block_hash=7, token_ids=[1, 2, 3, 4],
                        block_size=4, lora_id=3, medium="CPU", lora_name="adapter",
                        group_idx=1),
            AllBlocksCleared(),
        ],
    )


if __name__ == "__main__":
    enc = msgspec.msgpack.Encoder()
    (HERE / "batch_map.msgpack").write_bytes(enc.encode(batch(array_like=False)))
    (HERE / "batch_array.msgpack").write_bytes(enc.encode(batch(array_like=True)))
