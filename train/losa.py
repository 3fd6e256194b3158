#!/usr/bin/env python
"""LoSA under DeepSpeed ZeRO-3: the script launchers start.

    deepspeed --num_gpus 8 train/losa.py run.yaml
    torchrun --nproc_per_node 8 train/losa.py run.yaml steps=5 resume=auto
    srun python train/losa.py run.yaml            (ranks from SLURM_PROCID / SLURM_NTASKS)
    mpirun -np 8 -x MASTER_ADDR -x MASTER_PORT python train/losa.py run.yaml

Same as ``losa-zero train run.yaml [key=value ...]``; see losa_zero/train_command.py.
"""
import sys
from pathlib import Path

try:
    from losa_zero.train_command import main
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from losa_zero.train_command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
