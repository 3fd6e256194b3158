"""The ``losa-zero`` command line.

Flags of ``prune`` and ``losa`` are generated from the config dataclasses, so a flag, a YAML
recipe key and a ZeRO-3 run-config key are always the same option. Errors the user can fix
print one line and exit with code 2; nothing half-written is left behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from .config import EvalConfig, LosaConfig, PruneConfig, add_config_flags, config_from_args
from .errors import LosaZeroError, OneLineParser, Terminated, raise_on_sigterm

log = logging.getLogger("losa_zero")


def _command_line(argv: list[str]) -> str:
    return "losa-zero " + " ".join(shlex.quote(a) for a in argv)


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert_llama2c import convert_llama2c

    out = convert_llama2c(Path(args.checkpoint), Path(args.tokenizer), Path(args.out), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .lifecycle import run_prune

    run_prune(config_from_args(PruneConfig, args), command=args.command_line, config_file=args.config)
    return 0


def cmd_losa(args: argparse.Namespace) -> int:
    from .lifecycle import run_losa

    run_losa(config_from_args(LosaConfig, args), command=args.command_line, config_file=args.config)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train_command import cli_run

    return cli_run(args.config, args.overrides, args.command_line)


def cmd_compress(args: argparse.Namespace) -> int:
    from .compress_command import cmd_compress as run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval_command import run_eval

    run_eval(config_from_args(EvalConfig, args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report([Path(d) for d in args.runs], Path(args.out))
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.workdir), data_dir=args.data, quick=args.quick)
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from .kernels.bench_speed import run_bench_speed_cli

    return run_bench_speed_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="losa-zero", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("convert-llama2c", help="convert a llama2.c checkpoint to a Hugging Face LLaMA directory")
    p.add_argument("checkpoint", help="llama2.c legacy .bin checkpoint")
    p.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer .model")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("prune", help="one-shot magnitude / Wanda / SparseGPT pruning, unstructured or N:M")
    add_config_flags(p, PruneConfig)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("losa", help="LoSA: progressive pruning with sparse LoRA fine-tuning between steps")
    add_config_flags(p, LosaConfig)
    p.set_defaults(func=cmd_losa)

    p = sub.add_parser("train", help="LoSA under DeepSpeed ZeRO-3 on every rank that launched it (a YAML run config)")
    p.add_argument("config", help="run config: the losa options plus deepspeed, checkpoint_dir, checkpoint_every, resume")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.set_defaults(func=cmd_train)

    # `losa-zero plan` has its own parser (losa_zero/plan.py); main() hands it the arguments
    sub.add_parser("plan", add_help=False,
                   help="per-GPU / per-node memory of a ZeRO-3 LoSA run and whether it fits (exit 3 if not)")

    p = sub.add_parser("compress", help="rewrite an exported model directory in the compressed-tensors sparse format")
    p.add_argument("model_dir", help="model directory (dense safetensors, e.g. the output of prune / losa / train)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--shard-size", default="5GB", help="largest shard, in dense bytes (default: 5GB)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity (and zero-shot accuracy) of a model directory")
    add_config_flags(p, EvalConfig)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="PNG plots and a Markdown report comparing run directories")
    p.add_argument("runs", nargs="+", help="run directories (each with summary.json, optionally metrics.jsonl)")
    p.add_argument("--out", default="report", help="report directory (default: ./report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench-speed", help="generation tokens/s and per-linear times, sparse kernel against dense")
    p.add_argument("model", nargs="?", default=None, help="a pruned model directory (omit with --layers-only)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--repeats", type=int, default=3, help="generation repeats (median)")
    p.add_argument("--layer-repeats", type=int, default=20, help="repeats per linear timing (median)")
    p.add_argument("--patterns", default="50%%,60%%,70%%,80%%,2:4", help="LLaMA-7B-shaped layer sparsities")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in of the LLaMA-7B-shaped layers")
    p.add_argument("--no-layers", action="store_true", help="skip the LLaMA-7B-shaped layers")
    p.add_argument("--layers-only", action="store_true", help="only the LLaMA-7B-shaped layers (no model)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: the GPU paths (Triton bitmask, 2:4)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=cmd_bench_speed)

    p = sub.add_parser("demo", help="convert stories260K, run one-shot Wanda and LoSA at 70%%, print the table")
    p.add_argument("--data", default=None, help="fixture folder (default: $LOSA_ZERO_DATA)")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes its models and report (replaced on every run)")
    p.add_argument("--quick", action="store_true", help="fewer fine-tuning samples (a smoke test, not the result)")
    p.set_defaults(func=cmd_demo)
    return parser


def quiet_environment(quiet: bool, uses_deepspeed: bool) -> None:
    """Offline by default; no progress bars from transformers / datasets / hub with ``-q``;
    no DeepSpeed accelerator line from commands that do not use DeepSpeed (transformers
    imports it while saving a model, and on a machine without CUDA it announces falling
    back to the CPU). Set before those libraries are imported; explicit settings win."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if not uses_deepspeed and "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = [a for a in argv if a not in ("-q", "--quiet")]
    if rest[:1] == ["plan"]:
        from .plan import main_plan

        return main_plan(rest[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line argparse error (2)
        return int(exc.code or 0)
    args.command_line = _command_line(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    quiet_environment(args.quiet, uses_deepspeed=args.cmd == "train")
    if args.cmd != "train":  # train stops at a checkpoint on SIGTERM (losa_zero.preemption)
        raise_on_sigterm()
    try:
        return args.func(args)
    except LosaZeroError as e:
        print(f"losa-zero: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("losa-zero: terminated (SIGTERM); the temporary output was removed and --out left as it was",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("losa-zero: interrupted; the temporary output was removed and --out left as it was", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
