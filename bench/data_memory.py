"""Memory of reading calibration and fine-tuning data from big files: the peak RSS a
process gains while drawing LoSA's calibration windows (128 x 2048 tokens) and fine-tuning
examples (10,000 at 1,024 tokens) from a text file of --sizes (default 64 MB and 1 GB),
and, as the reference, what tokenizing a whole file as one string costs per character.

    LOSA_ZERO_DATA=../shared/data python bench/data_memory.py [--sizes 64,1024] [--reference-mb 16]
        [--workdir runs/bench/data_memory] [--quick] [--no-record]

The file is the fixture's TinyStories text repeated; the tokenizer is the stories260K one
(512 pieces, so about 2.5 characters per token). Every measurement runs in its own child
process: the peak RSS it reaches (VmHWM) minus its RSS after importing and loading the
tokenizer. Reading is streamed, so the extra memory must not grow with the file: the
script prints the ratio of the biggest file's extra memory to the smallest's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import (REPO, append_benchmark, machine_header, markdown_table, parse_result,  # noqa: E402
                          run_measured, this_command)

MiB = 2**20

CHILD = r"""
import sys, time
sys.path.insert(0, {repo!r})
from bench.common import emit_result, peak_rss_bytes, rss_bytes
from losa_zero.modeling import load_tokenizer
tok = load_tokenizer({model!r})
from losa_zero import data
base = rss_bytes()
t0 = time.perf_counter()
what, path = {what!r}, {path!r}
if what == "calibration":
    out = data.calibration_windows(tok, path, 128, 2048, seed=0)
    n = int(out.numel())
elif what == "finetune":
    out = data.finetune_examples(tok, path, 1024, limit=10000, seed=0)
    n = sum(len(e["input_ids"]) for e in out)
else:  # reference: the whole file tokenized as one string
    text = open(path, encoding="utf-8").read()
    n = len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
emit_result({{"extra_bytes": peak_rss_bytes() - base, "seconds": time.perf_counter() - t0, "tokens": n}})
"""


def make_file(path: Path, size: int, source: Path) -> Path:
    if path.exists() and path.stat().st_size >= size:
        return path
    block = source.read_text(encoding="utf-8").rstrip("\n") + "\n\n"
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            f.write(block)
            written += len(block.encode("utf-8"))
    tmp.rename(path)
    return path


def measure(what: str, path: Path, model: Path, timeout: float) -> dict:
    code = CHILD.format(repo=str(REPO), model=str(model), what=what, path=str(path))
    res = run_measured([sys.executable, "-c", code], env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                       timeout=timeout)
    return parse_result(res["stdout"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,1024", help="file sizes in MB (10^6 bytes), comma-separated")
    ap.add_argument("--reference-mb", type=int, default=16, help="size of the whole-file tokenization reference")
    ap.add_argument("--workdir", default="runs/bench/data_memory")
    ap.add_argument("--quick", action="store_true", help="sizes 4 and 16 MB, reference 4 MB (a smoke run)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--timeout", type=float, default=7200)
    args = ap.parse_args()
    data_dir = Path(os.environ.get("LOSA_ZERO_DATA", REPO.parent / "shared" / "data"))
    source = data_dir / "tinystories" / "tinystories_val.txt"
    if not source.is_file():
        sys.exit(f"fixture data not found under {data_dir}: set LOSA_ZERO_DATA to the shared/data folder")
    sizes = [4, 16] if args.quick else [int(s) for s in args.sizes.split(",")]
    ref_mb = 4 if args.quick else args.reference_mb
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from losa_zero.convert_llama2c import convert_llama2c

    model = work / "stories260K"
    if not (model / "config.json").exists():
        convert_llama2c(data_dir / "stories260K" / "stories260K.bin", data_dir / "stories260K" / "tok512.model", model)

    rows = []
    ref_path = make_file(work / f"text_{ref_mb}MB.txt", ref_mb * 10**6, source)
    ref = measure("reference", ref_path, model, args.timeout)
    ref_per_char = ref["extra_bytes"] / ref_path.stat().st_size
    rows.append([f"{ref_mb} MB", "whole file tokenized as one string (reference)", ref["extra_bytes"] / MiB,
                 ref_per_char, ref["seconds"]])
    print(rows[-1], flush=True)
    extra = {}
    for mb in sizes:
        path = make_file(work / f"text_{mb}MB.txt", mb * 10**6, source)
        for what, label in (("calibration", "calibration windows 128 x 2048"),
                            ("finetune", "fine-tuning examples 10,000 x <= 1,024")):
            r = measure(what, path, model, args.timeout)
            extra[(what, mb)] = r["extra_bytes"]
            rows.append([f"{mb} MB", label, r["extra_bytes"] / MiB, r["extra_bytes"] / path.stat().st_size,
                         r["seconds"]])
            print(rows[-1], flush=True)
    lo, hi = min(sizes), max(sizes)
    ratios = {w: extra[(w, hi)] / max(1, extra[(w, lo)]) for w in ("calibration", "finetune")}
    body = markdown_table(["file", "what", "extra peak RSS (MiB)", "bytes per file byte", "seconds"], rows)
    body += (f"\n\nExtra memory at {hi} MB / at {lo} MB (file {hi / lo:.0f}x larger): calibration "
             f"{ratios['calibration']:.2f}x, fine-tuning {ratios['finetune']:.2f}x. Whole-file tokenization "
             f"(what reading the file at once costs) needs {ref_per_char:.0f} bytes per byte of text, so "
             f"{ref_per_char * hi * 10**6 / 2**30:.0f} GiB for the {hi} MB file.")
    print(body)
    if not args.no_record:
        append_benchmark("Data reading: memory against file size", this_command(),
                         machine_header() + " (shared with other jobs)", body)


if __name__ == "__main__":
    main()
