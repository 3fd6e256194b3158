"""What every benchmark script shares: the machine/version header, medians, measuring a
child process's wall time and peak memory, random LLaMA-shaped models, and appending a
result to BENCHMARKS.md.

Benchmarks compare side by side in one run (never against numbers from another day or
machine) and report medians: these are shared machines, and single timings are noisy.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"

# Random-initialised LLaMA shapes (vocab 32000, as LLaMA-2). Parameter counts include the
# embeddings and the untied LM head.
LLAMA_SHAPES = {
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12),
    "400m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=26, num_attention_heads=16),
}


def describe_shape(shape: str) -> str:
    """'100m LLaMA (hidden 768, intermediate 2048, 8 layers, 12 heads)'."""
    s = LLAMA_SHAPES[shape]
    return (f"{shape} LLaMA (hidden {s['hidden_size']}, intermediate {s['intermediate_size']}, "
            f"{s['num_hidden_layers']} layers, {s['num_attention_heads']} heads)")


def median(xs) -> float:
    return float(statistics.median(list(xs)))


def total_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "bitsandbytes", "peft"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - an absent optional package is simply not listed
            continue
    out.update(extra or {})
    return out


def machine_header(device: str | None = None, extra_versions: dict[str, str] | None = None) -> str:
    """One Markdown line: date, device, cores, memory, versions, commit."""
    from losa_zero.outputs import cpu_model  # here, not at import: llm-compressor's worker has no losa_zero

    dev = device or f"CPU {cpu_model()}, {os.cpu_count()} cores, {total_memory_gib():.0f} GiB"
    vers = ", ".join(f"{k} {v}" for k, v in versions(extra_versions).items())
    return (f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {dev} · {vers} · "
            f"losa-zero commit {git_commit()}")


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 timeout: float | None = None) -> dict:
    """Run ``cmd`` and return its wall seconds, stdout and stderr. A failure raises with the
    child's stderr tail, so a benchmark never reports a number from a run that did not finish.
    Peak memory is reported by the child itself (``peak_rss_bytes`` in its ``emit_result``),
    per phase where it matters."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{' '.join(cmd)} ran past {timeout}s:\n{err[-3000:]}")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return {"wall_s": wall, "stdout": out, "stderr": err}


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux: VmHWM from /proc/self/status, the high-water mark of this process's own memory
    since exec. Not ``ru_maxrss``: across fork + exec the kernel carries the parent's RSS at
    fork time into the child's ``ru_maxrss``, so a child of a large parent (a benchmark
    driver holding a model) would report the parent's size. Elsewhere: ``ru_maxrss`` (KiB)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit_result(obj: dict) -> None:
    """Children print one tagged JSON line; the parent picks it out of their stdout."""
    print("BENCH_RESULT " + json.dumps(obj), flush=True)


def parse_result(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError("child printed no BENCH_RESULT line:\n" + stdout[-2000:])


def make_random_llama(out_dir: str | os.PathLike, shape: str, seed: int = 0, tokenizer_from: str | None = None) -> Path:
    """Save a random-initialised LLaMA of a named shape (``LLAMA_SHAPES``) in HF format, fp32.

    A random model has no meaningful perplexity, so comparisons on it use layer
    reconstruction error; the shapes are what set time and memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, num_key_value_heads=None,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, **LLAMA_SHAPES[shape])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    if tokenizer_from:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
    tmp.rename(out)
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def append_benchmark(title: str, command: str, header_line: str, body: str) -> None:
    """Append one dated section to BENCHMARKS.md (created with its preamble if absent)."""
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text(
            "# Benchmarks\n\nEach section was appended by the script named in it, from one run: "
            "every ratio compares numbers measured side by side in that run, on the machine named "
            "in the section. Times are medians over the repeats stated.\n", encoding="utf-8")
    section = f"\n## {title}\n\n{header_line}\n\nCommand: `{command}`\n\n{body.rstrip()}\n"
    with BENCHMARKS_MD.open("a", encoding="utf-8") as f:
        f.write(section)
    print(section)


def this_command() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


def _proc_status_bytes(key: str) -> int | None:
    """A memory field of /proc/self/status (``VmHWM``, ``VmRSS``; kB there) in bytes, or None
    where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's current resident memory (Linux /proc; 0 where unavailable)."""
    return _proc_status_bytes("VmRSS") or 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ``/proc/self/clear_refs`` 5), so
    that ``peak_rss_bytes`` afterwards reports the peak of one phase only. False where the
    kernel does not allow it (then the peak still covers the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def save_state_dict(model, path) -> float:
    """torch.save the model's state dict to ``path`` (for evaluation by the driver); seconds.
    Used by both tools' workers, so both save the same way."""
    import torch
    t0 = time.perf_counter()
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, path)
    return time.perf_counter() - t0
