"""Small helpers the SLURM batch scripts call (``slurm/_common.sh``): the job's run config.

``python -m losa_zero.slurm_job write-config OUT.yaml [--layer FILE ...] [key=value ...]``
merges YAML layers (later wins) and ``key=value`` overrides (values parsed as YAML scalars,
as ``losa-zero train`` does) into one run config, written atomically. The job writes it to
``$OUTPUT_DIR/run.yaml`` at every start, so the run, the planner and a later reader all see
the same keys.

``python -m losa_zero.slurm_job get RUN.yaml KEY [DEFAULT]`` prints one key.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from .errors import LosaZeroError
from .yaml_layers import load_yaml
from .yaml_layers import parse_overrides as parse_train_overrides


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` overrides as the train entry point reads them, keys with underscores."""
    return {key.replace("-", "_"): value for key, value in parse_train_overrides(items).items()}


def merge(layers: list[str], overrides: list[str]) -> dict:
    cfg: dict = {}
    for layer in layers:
        if layer:
            cfg.update({k.replace("-", "_"): v for k, v in load_yaml(layer).items()})
    cfg.update(parse_overrides(overrides))
    return cfg


def write_config(path: str, layers: list[str], overrides: list[str]) -> Path:
    cfg = merge(layers, overrides)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text("# written by slurm/_common.sh (losa_zero.slurm_job); edit RECIPE / CONFIG / EXTRA_ARGS instead\n"
                   + yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["write-config"] and len(argv) >= 2:
            layers, rest, it = [], [], iter(argv[2:])
            for a in it:
                if a == "--layer":
                    layers.append(next(it, ""))
                else:
                    rest.append(a)
            write_config(argv[1], layers, rest)
            return 0
        if argv[:1] == ["get"] and len(argv) in (3, 4):
            value = load_yaml(argv[1]).get(argv[2])
            if value is None:
                if len(argv) == 4:
                    print(argv[3])
                    return 0
                return 1
            print(value)
            return 0
    except LosaZeroError as e:
        print(f"losa-zero: error: {e}", file=sys.stderr)
        return 2
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
