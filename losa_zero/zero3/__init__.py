"""LoSA inside DeepSpeed ZeRO-3: the same algorithm as one process, on many ranks.

- :mod:`.runtime` -- ZeroRuntime, the partitioned implementation of losa_zero's Runtime
- :mod:`.masks` / :mod:`.bits` -- keep masks stored as bit-packed per-rank shards
- :mod:`.engine` -- the DeepSpeed engine, client optimizer, exact clipping, hook switching
- :mod:`.checkpoint` -- crash-safe, world-size-independent checkpoints and resume
- :mod:`.export` -- streamed sharded safetensors export
- :mod:`.evaluate` -- perplexity with windows shared across ranks
- :mod:`.dist_env` -- distributed init from torchrun / deepspeed / SLURM / MPI
- :mod:`.ds_config` -- DeepSpeed configs with "auto" fields filled from the run config
- :mod:`.run` -- the end-to-end driver behind ``losa-zero train`` and ``train/losa.py``
"""
