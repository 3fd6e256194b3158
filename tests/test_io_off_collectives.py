"""Long single-rank file work stays out of collective waits (ZeRO-3 runs): the export's
shard writes run on a worker thread while the rank goes on to the next gather (deletions
are shared by every rank: losa_zero.zero3.integrity.remove_shared). A slow write is
simulated by blocking it on an event: the main thread (the one that enters collectives)
must get past it without waiting."""
from __future__ import annotations

import contextlib
import threading

import torch

from losa_zero.runtime import Runtime


def test_export_writes_shards_while_the_rank_gathers_the_next(tmp_path, monkeypatch):
    """Rank 0 of two owns shards 0 and 2. Its write of shard 0 is blocked until the gather of
    shard 1 (rank 1's) begins: the export only completes if rank 0 enters that collective
    while its write is still running."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from losa_zero import shards
    from losa_zero.zero3.export import export_model, plan_shards

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2, vocab_size=32, max_position_embeddings=16))
    gather_of_shard_1 = threading.Event()
    written, writer_threads = [], []
    real_write = shards.ShardWriter.write

    def slow_write(self, i, tensors):
        writer_threads.append(threading.current_thread())
        if i == 0:
            assert gather_of_shard_1.wait(30), "rank 0 waited for its write before the next gather"
        written.append(i)
        real_write(self, i, tensors)

    monkeypatch.setattr(shards.ShardWriter, "write", slow_write)

    class RankZeroOfTwo(Runtime):
        """Rank 0 of two: the other rank's part of each collective is a no-op."""
        world_size = 2

        def __init__(self):
            super().__init__("cpu")
            self.gathers = 0

        @contextlib.contextmanager
        def gathered_params(self, params, linears=()):
            if self.gathers >= 1:  # shard 0 is one group: any later gather belongs to shard 1 or after
                gather_of_shard_1.set()
            self.gathers += 1
            yield

        def all_gather_object(self, obj):
            return [obj, (({}, 0), None)]

    rt = RankZeroOfTwo()
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    plan = plan_shards(model, layer_bytes)
    n = len(plan)
    assert n >= 3 and {id(p) for _, p in plan[0]} == {id(p) for p in model.model.layers[0].parameters()}
    (tmp_path / "out").mkdir()
    export_model(model, None, tmp_path / "out", rt, layer_bytes)
    assert written == list(range(0, n, 2))
    assert all(t is not threading.main_thread() for t in writer_threads)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors") == \
        [shards.shard_names(n)[i] for i in range(0, n, 2)]
