"""``losa-zero train CONFIG.yaml [key=value ...]`` (and ``train/losa.py``, the same thing
for launchers): LoSA under DeepSpeed ZeRO-3 on however many ranks launched it.

The run config is YAML whose keys are the ``losa-zero losa`` options (``model``,
``sparsity``, ``steps``, ``pruner``, ``calib``, ``train``, ``nsamples``, ``seqlen``,
``out``...) plus ``deepspeed`` (a ds_configs/*.json file), ``checkpoint_dir``,
``checkpoint_every``, ``resume`` and the export options; ``key=value`` arguments override it.
Launch it with ``deepspeed``, ``torchrun``, ``srun`` or ``mpirun``, or run it directly
(one process). A user error prints one line (on rank 0) and exits with code 2.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys

from .config import build_config
from .errors import LosaZeroError
from .yaml_layers import USAGE, load_yaml, parse_overrides

log = logging.getLogger("losa_zero")


def build_run_config(config_file: str, overrides: list[str]):
    from .zero3.config import ZeroRunConfig

    layers = [load_yaml(config_file), parse_overrides(overrides)]
    for layer in layers:
        if isinstance(layer.get("ppl"), list):
            layer["ppl"] = ",".join(str(x) for x in layer["ppl"])
    return build_config(ZeroRunConfig, *layers)


def _rank() -> int:
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def run(config_file: str, overrides: list[str], command: str) -> int:
    from .lifecycle import run_train

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cfg = build_run_config(config_file, overrides)
    run_train(cfg, command=command, config_file=config_file)
    # Leave with the process group destroyed: a gloo/NCCL group torn down at interpreter exit
    # after its peers are gone can abort (SIGABRT) and turn exit 0 into -6.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train/losa.py``: parses, sets up logging, runs, maps errors to exit codes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__)
        return 0 if argv else 2
    quiet = "-q" in argv or "--quiet" in argv
    # the deepspeed launcher appends --local_rank=N (the rank also comes from the environment)
    argv = [a for a in argv if a not in ("-q", "--quiet") and not a.startswith(("--local_rank", "--local-rank"))]
    rank = _rank()
    logging.basicConfig(level=logging.WARNING if (quiet or rank != 0) else logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    command = "losa-zero train " + " ".join(shlex.quote(a) for a in argv)
    return cli_run(argv[0], argv[1:], command)


def cli_run(config_file: str, overrides: list[str], command: str) -> int:
    """Run and map errors to exit codes: a user error prints one line (rank 0) and exits 2."""
    import warnings

    # torch 2.13 renamed collectives DeepSpeed still calls: one FutureWarning per call (every
    # optimizer step) would flood the log, for `losa-zero train` and train/losa.py alike
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..*deprecated.*")
    try:
        return run(config_file, overrides, command)
    except LosaZeroError as e:
        if _rank() == 0:
            print(f"losa-zero: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if _rank() == 0:
            print("losa-zero: interrupted; the newest complete checkpoint is kept (resume=auto continues)",
                  file=sys.stderr)
        return 130
