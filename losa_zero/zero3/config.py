"""The run config of ``losa-zero train`` / ``train/losa.py``: every option of ``losa-zero
losa`` (same names), plus where DeepSpeed, checkpoints and the export go."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import AT_LEAST_0, AT_LEAST_1, POSITIVE, LosaConfig, opt
from ..errors import LosaZeroError


@dataclass
class ZeroRunConfig(LosaConfig):
    deepspeed: str = opt("ds_configs/zero3.json", "DeepSpeed config (JSON); its \"auto\" fields are filled from this config")
    checkpoint_dir: str | None = opt(None, "checkpoints, dense targets and metrics.jsonl (default: OUT.checkpoints)")
    checkpoint_every: int = opt(0, "also checkpoint every N optimizer steps (0: only at the end of each LoSA step)",
                                range=AT_LEAST_0)
    keep_checkpoints: int = opt(2, "complete checkpoints kept (the newest step-end one is always kept too)",
                                range=AT_LEAST_1)
    keep_checkpoints_after_export: bool = opt(False, "keep the checkpoint folder (checkpoints, dense targets) once "
                                                     "the model is exported (by default it is deleted then)")
    resume: str = opt("auto", "auto (newest intact checkpoint, if any; stop when all are damaged), "
                      "auto_or_fresh (the same, but start over when all are damaged), never, or a checkpoint folder")
    dist_backend: str = opt("auto", "torch.distributed backend (auto: nccl on GPU, gloo on CPU)", ("auto", "nccl", "gloo"))
    dist_timeout_minutes: float = opt(60.0, "how long a collective waits for the slowest rank before the run fails "
                                            "(torch's default, 10, is shorter than a large checkpoint save)",
                                      range=POSITIVE)

    @staticmethod
    def option_name(field_name: str) -> str:
        """Run configs are YAML files and key=value overrides: messages name the key."""
        return field_name

    def check_combinations(self) -> None:
        super().check_combinations()
        if self.resume not in ("auto", "auto_or_fresh", "never") and not Path(self.resume).is_dir():
            raise LosaZeroError(f"resume={self.resume}: use auto, auto_or_fresh, never or an existing checkpoint folder")

    def input_paths(self) -> list[tuple[str, str | Path]]:
        return super().input_paths() + [("checkpoint_dir", self.checkpoint_path)]

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.out}.checkpoints")
