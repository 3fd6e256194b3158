"""Run reports: plots and a Markdown comparison built from finished run directories.

A run directory holds ``summary.json`` (written once at the end of a run) and, for runs
that fine-tune, ``metrics.jsonl`` (one line per optimizer step). The report reads only
those files, so it can be rebuilt at any time, on any machine, without a GPU, a model or
the training code; comparing methods is then a matter of pointing it at several runs.

Plots are drawn on a bare :class:`matplotlib.figure.Figure` and rendered by Agg: no
pyplot state, no GUI backend, so the report works on headless nodes and does not disturb
an interactive session that imports this module. Every figure has the same fixed size
(:data:`FIG_SIZE` at :data:`DPI`) so images line up in the Markdown and can be checked.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

from matplotlib.figure import Figure

from losa_zero.errors import LosaZeroError

log = logging.getLogger(__name__)

FIG_SIZE = (9.0, 5.0)  # inches
DPI = 100  # -> every PNG is 900 x 500 pixels
IMAGE_PIXELS = (int(FIG_SIZE[0] * DPI), int(FIG_SIZE[1] * DPI))  # (width, height)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------- reading


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"dir", "name", "summary", "metrics"}`` for one run directory.

    A run killed while appending to ``metrics.jsonl`` can leave a truncated last line; it
    is skipped with a warning rather than failing the whole report, because everything
    before it is still valid and the summary is the authoritative record.
    """
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.is_file():
        raise LosaZeroError(f"{path} not found: pass run directories written by losa-zero (they hold summary.json)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LosaZeroError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): rerun or repair that run") from exc
    if not isinstance(summary, dict):
        raise LosaZeroError(f"{path} does not hold a JSON object: pass a losa-zero run directory")
    metrics: list[dict] = []
    mpath = run_dir / "metrics.jsonl"
    if mpath.is_file():
        for n, line in enumerate(mpath.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping unreadable line %d of %s", n, mpath)
                continue
            if isinstance(record, dict):
                metrics.append(record)
    return {"dir": run_dir, "name": run_dir.resolve().name, "summary": summary, "metrics": metrics}


def update_summary_with_zeroshot(run_dir: str | os.PathLike, result: dict) -> Path:
    """Store an :func:`losa_zero.zeroshot.evaluate_zeroshot` result in a run's summary.

    Zero-shot scoring is often run later than the run itself (it is slow on big models);
    writing it into ``summary.json`` keeps one file per run for the report. Atomic, so a
    crash cannot leave a half-written summary behind.
    """
    from losa_zero.outputs import write_json_atomic

    run = load_run(run_dir)
    summary = run["summary"]
    summary["zeroshot"] = {k: result[k] for k in ("tasks", "mean_acc", "limit") if k in result}
    return write_json_atomic(Path(run_dir) / "summary.json", summary)


# --------------------------------------------------------------------------- data shaping


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _layer_points(layers: Iterable[dict] | None, key: str) -> tuple[list[int], list[float]]:
    pts = []
    for row in layers or []:
        if not isinstance(row, dict):
            continue
        layer, value = row.get("layer"), _num(row.get(key))
        if isinstance(layer, int) and value is not None:
            pts.append((layer, value))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def _steps(summary: dict) -> list[dict]:
    return [s for s in summary.get("steps") or [] if isinstance(s, dict)]


def _linear_layer(name: str) -> tuple[int, str] | None:
    m = _LAYER_RE.search(name)
    return (int(m.group(1)), m.group(2)) if m else None


def final_layer_sparsity(summary: dict) -> tuple[list[int], list[float], str] | None:
    """The run's final per-layer sparsity and where it came from.

    One-shot runs may not write ``per_layer``; then the last LoSA step or, failing that,
    the unweighted mean of the layer's linears is used (labelled as such, since linears of
    different sizes make it an approximation of the true layer sparsity).
    """
    xs, ys = _layer_points(summary.get("per_layer"), "sparsity")
    if xs:
        return xs, ys, "per layer"
    steps = _steps(summary)
    if steps:
        xs, ys = _layer_points(steps[-1].get("layers"), "sparsity")
        if xs:
            return xs, ys, "last LoSA step"
    groups: dict[int, list[float]] = {}
    for name, value in (summary.get("per_linear_sparsity") or {}).items():
        parsed, v = _linear_layer(str(name)), _num(value)
        if parsed and v is not None:
            groups.setdefault(parsed[0], []).append(v)
    if groups:
        layers = sorted(groups)
        return layers, [sum(groups[i]) / len(groups[i]) for i in layers], "mean of linears"
    return None


# --------------------------------------------------------------------------- plotting


def _figure(integer_x: bool = True) -> tuple[Figure, Any]:
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIG_SIZE, dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, alpha=0.3)
    if integer_x:  # layers and optimizer steps are counts: no "2.5" ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()  # rearranges inside the canvas; the pixel size stays fixed
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _step_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def _plot_layer_metric(run: dict, key: str, ylabel: str, path: Path) -> Path | None:
    """One line per LoSA step (dark = early, light = late) plus the final value dashed."""
    summary = run["summary"]
    steps = _steps(summary)
    series = []
    for s in steps:
        xs, ys = _layer_points(s.get("layers"), key)
        if xs:
            series.append((f"step {s.get('step', len(series) + 1)}", xs, ys))
    fx, fy = _layer_points(summary.get("per_layer"), key)
    if not series and not fx:
        return None
    fig, ax = _figure()
    for (label, xs, ys), color in zip(series, _step_colors(len(series))):
        ax.plot(xs, ys, marker="o", ms=3, color=color, label=label)
    if fx:
        ax.plot(fx, fy, ls="--", color="black", marker="x", ms=4, label="final")
    target = _num(summary.get("target_sparsity"))
    if key == "sparsity" and target is not None:
        ax.axhline(target, color="red", lw=0.8, ls=":", label=f"target {target:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{run['name']}: {ylabel} per layer" + (" across LoSA steps" if series else ""))
    ax.legend(fontsize=7, ncol=max(1, math.ceil((len(series) + 2) / 12)))
    return _save(fig, path)


def loss_series(metrics: list[dict]) -> tuple[dict[Any, list[tuple[float, float]]], bool]:
    """Training loss per LoSA step against a run-wide optimizer step.

    The trainer may count optimizer steps from 1 again in every LoSA step; plotted as is,
    the steps' curves would lie on top of each other. A count that goes backwards is
    therefore continued from where the previous records ended. Returns the series and
    whether such a restart was found (the x axis is then cumulative).
    """
    groups: dict[Any, list[tuple[float, float]]] = {}
    offset, last_raw, last_x, restarted = 0.0, None, 0.0, False
    for rec in metrics:
        loss = _num(rec.get("loss"))
        if loss is None:
            continue
        raw = _num(rec.get("opt_step"))
        if raw is None:
            raw = (last_raw or 0.0) + 1
        if last_raw is not None and raw <= last_raw:
            offset, restarted = last_x, True
        x = raw + offset
        last_raw, last_x = raw, x
        groups.setdefault(rec.get("losa_step"), []).append((x, loss))
    return groups, restarted


def _plot_train_loss(run: dict, path: Path) -> Path | None:
    groups, restarted = loss_series(run["metrics"])
    if not groups:
        return None
    numeric = (int, float)
    keys = sorted(groups, key=lambda k: (k is None, not isinstance(k, numeric), k if isinstance(k, numeric) else 0, str(k)))
    fig, ax = _figure()
    for key, color in zip(keys, _step_colors(len(keys))):
        pts = sorted(groups[key])
        label = "fine-tuning" if key is None else f"LoSA step {key}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1.2, marker="." if len(pts) < 60 else None, label=label)
    ax.set_xlabel("optimizer step" + (" (counted across LoSA steps)" if restarted else ""))
    ax.set_ylabel("training loss")
    ax.set_title(f"{run['name']}: training loss")
    ax.legend(fontsize=7, ncol=max(1, math.ceil(len(keys) / 12)))
    return _save(fig, path)


def _plot_linear_sparsity(run: dict, path: Path) -> Path | None:
    """Bars in model order, coloured by projection; layers marked on the x axis because
    hundreds of module names would be unreadable."""
    summary = run["summary"]
    items = [(str(k), _num(v)) for k, v in (summary.get("per_linear_sparsity") or {}).items()]
    items = [(k, v) for k, v in items if v is not None]
    if not items:
        return None
    parsed = [_linear_layer(k) for k, _ in items]
    order = sorted(range(len(items)), key=lambda i: (parsed[i][0] if parsed[i] else math.inf, i))
    items = [items[i] for i in order]
    parsed = [parsed[i] for i in order]
    kinds = list(dict.fromkeys(p[1] if p else k for p, (k, _) in zip(parsed, items)))
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    color_of = {k: cmap(i % 10) for i, k in enumerate(kinds)}
    fig, ax = _figure(integer_x=False)
    xs = list(range(len(items)))
    kind_of = [p[1] if p else k for p, (k, _) in zip(parsed, items)]
    ax.bar(xs, [v for _, v in items], width=0.85, color=[color_of[k] for k in kind_of])
    target = _num(summary.get("target_sparsity"))
    if target is not None:
        ax.axhline(target, color="red", lw=0.8, ls=":")
    if all(parsed) and len(kinds) <= 10:
        starts = [i for i, p in enumerate(parsed) if i == 0 or p[0] != parsed[i - 1][0]]
        ends = starts[1:] + [len(parsed)]
        every = max(1, math.ceil(len(starts) / 16))
        picked = range(0, len(starts), every)
        ax.set_xticks([(starts[j] + ends[j] - 1) / 2 for j in picked])  # centre of each layer's group
        ax.set_xticklabels([str(parsed[starts[j]][0]) for j in picked])
        ax.set_xlabel("linear layers, grouped by decoder layer")
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=color_of[k], label=k) for k in kinds], fontsize=7, ncol=min(len(kinds), 4))
    else:
        ax.set_xticks(xs)
        ax.set_xticklabels([k for k, _ in items], rotation=90, fontsize=5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("realised sparsity")
    ax.set_title(f"{run['name']}: sparsity of each linear layer")
    return _save(fig, path)


def _plot_compare_sparsity(runs: list[dict], path: Path) -> Path | None:
    fig, ax = _figure()
    drawn = 0
    for run in runs:
        final = final_layer_sparsity(run["summary"])
        if final is None:
            continue
        xs, ys, source = final
        label = run["name"] if source == "per layer" else f"{run['name']} ({source})"
        ax.plot(xs, ys, marker="o", ms=3, label=label)
        drawn += 1
    if drawn < 2:
        return None
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity")
    ax.set_title("per-layer sparsity by run")
    ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- markdown


def _fmt(x: Any, spec: str = ".4f") -> str:
    v = _num(x)
    return "-" if v is None else format(v, spec)


def _gib(x: Any) -> str:
    v = _num(x)
    return "-" if v is None else f"{v / 2**30:.2f}"


def _cell(x: Any) -> str:
    return "-" if x is None or x == "" else str(x).replace("|", "\\|")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _unique_names(runs: list[dict]) -> None:
    """Two runs named ``out`` in different parents must not overwrite each other's plots."""
    seen: dict[str, int] = {}
    for run in runs:
        base = run["name"]
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            run["name"] = f"{base}-{seen[base]}"
        run["slug"] = _slug(run["name"])


def _summary_table(runs: list[dict]) -> list[str]:
    ppl_keys: list[str] = []
    for run in runs:
        for k in (run["summary"].get("perplexity") or {}):
            if k not in ppl_keys:
                ppl_keys.append(k)
    head = ["run", "method", "pruner", "allocation", "target", "achieved"]
    head += [f"ppl {k}" for k in ppl_keys]
    head += ["zero-shot mean", "total s", "peak host RSS GiB", "peak CUDA GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        s = run["summary"]
        target = _fmt(s.get("target_sparsity"), ".2f")
        if s.get("nm"):
            target = f"{target} ({s['nm']})"
        ppl = s.get("perplexity") or {}
        row = [run["name"], _cell(s.get("method")), _cell(s.get("pruner")), _cell(s.get("allocation")),
               target, _fmt(s.get("achieved_sparsity"))]
        row += [_fmt((ppl.get(k) or {}).get("ppl"), ".3f") for k in ppl_keys]
        row += [_fmt((s.get("zeroshot") or {}).get("mean_acc")), _fmt((s.get("seconds") or {}).get("total"), ".1f"),
                _gib((s.get("peak_memory") or {}).get("host_rss_bytes")),
                _gib((s.get("peak_memory") or {}).get("cuda_bytes"))]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def _zeroshot_table(runs: list[dict]) -> list[str]:
    tasks: list[str] = []
    for run in runs:
        for t in ((run["summary"].get("zeroshot") or {}).get("tasks") or {}):
            if t not in tasks:
                tasks.append(t)
    if not tasks:
        return []
    head = ["run"] + tasks + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        z = run["summary"].get("zeroshot")
        if not z:
            continue
        per = z.get("tasks") or {}

        def score(t: str) -> str:
            r = per.get(t) or {}
            acc, norm = _fmt(r.get("acc")), _fmt(r.get("acc_norm"))
            return acc if norm == "-" else f"{acc} / {norm}"

        lines.append("| " + " | ".join([run["name"]] + [score(t) for t in tasks] + [_fmt(z.get("mean_acc"))]) + " |")
    return lines


def _steps_table(summary: dict) -> list[str]:
    steps = _steps(summary)
    if not steps:
        return []
    lines = ["| step | target | delta | mean rank | train loss | seconds |", "|---|---|---|---|---|---|"]
    for s in steps:
        secs = s.get("seconds") or {}
        total = sum(v for v in (_num(x) for x in secs.values()) if v is not None) if secs else None
        lines.append(
            f"| {_cell(s.get('step'))} | {_fmt(s.get('target'))} | {_fmt(s.get('delta'))} | "
            f"{_fmt(s.get('mean_rank'), '.2f')} | {_fmt(s.get('train_loss'))} | {_fmt(total, '.1f')} |"
        )
    return lines


def write_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir``; return the Markdown path.

    Only the plots a run's files support are drawn (a one-shot Wanda run has no LoSA
    steps and no training loss), so the report never shows empty axes.
    """
    if not run_dirs:
        raise LosaZeroError("no run directories given: pass at least one run folder holding summary.json")
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    md = ["# losa-zero run report", ""]
    md.append("Runs: " + ", ".join(f"`{r['name']}` ({r['dir']})" for r in runs))
    md += ["", "## Summary", ""] + _summary_table(runs)
    zs = _zeroshot_table(runs)
    if zs:
        md += ["", "## Zero-shot accuracy (acc / acc_norm)", ""] + zs
    compare = _plot_compare_sparsity(runs, out / "compare_layer_sparsity.png") if len(runs) > 1 else None
    if compare:
        md += ["", "## Per-layer sparsity of all runs", "", f"![per-layer sparsity by run]({compare.name})"]

    for run in runs:
        slug, s = run["slug"], run["summary"]
        md += ["", f"## {run['name']}"]
        if s.get("command"):
            md += ["", f"`{s['command']}`"]
        steps = _steps_table(s)
        if steps:
            md += [""] + steps
        across = " across LoSA steps" if _steps(s) else ""
        plots = [
            ("per-layer sparsity" + across, _plot_layer_metric(run, "sparsity", "sparsity", out / f"{slug}_layer_sparsity.png")),
            ("per-layer LoRA rank" + across, _plot_layer_metric(run, "rank", "LoRA rank", out / f"{slug}_layer_rank.png")),
            ("per-layer importance" + across, _plot_layer_metric(run, "importance", "importance", out / f"{slug}_layer_importance.png")),
            ("training loss", _plot_train_loss(run, out / f"{slug}_train_loss.png")),
            ("realised sparsity per linear layer", _plot_linear_sparsity(run, out / f"{slug}_linear_sparsity.png")),
        ]
        drawn = [(caption, p) for caption, p in plots if p is not None]
        for caption, p in drawn:
            md += ["", f"![{run['name']}: {caption}]({p.name})"]
        if not drawn:
            md += ["", "_No per-layer data, steps or training metrics in this run to plot._"]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
