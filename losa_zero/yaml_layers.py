"""Run-config YAML files and ``key=value`` overrides, read without importing torch.

The SLURM batch shell (``slurm/_common.sh``, through :mod:`losa_zero.slurm_job`) reads and
writes the run config several times before every launch, on one CPU of the first node;
keeping these readers free of torch and the model code keeps a job's start short.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import LosaZeroError

USAGE = "usage: losa-zero train CONFIG.yaml [key=value ...]"


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LosaZeroError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LosaZeroError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LosaZeroError(f"config file {p} must hold a mapping of option: value")
    return data


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings as a mapping; values are parsed as YAML scalars (numbers, true...)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise LosaZeroError(f"expected key=value, got {item!r} ({USAGE})")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise LosaZeroError(f"empty key in {item!r} ({USAGE})")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        out[key] = value if isinstance(parsed, (dict, list)) and key != "ppl" else parsed
    return out
