"""Zero-shot accuracy through lm-eval, on local JSONL slices and an already-loaded model.

Why this module exists instead of calling ``lm_eval --model hf``:

* Pruned and LoSA-fine-tuned models live in memory, sometimes partitioned by DeepSpeed
  ZeRO-3 across ranks. Saving them and letting lm-eval's ``HFLM`` reload them would cost
  disk and time, and would not work at all for a partitioned engine. :class:`LosaZeroLM`
  therefore wraps the live module and only ever calls ``model(input_ids=...,
  attention_mask=...)`` (plus ``use_cache=False`` where the forward accepts it) and
  reads ``.logits``.
* The machines that run the tests and the demo reach no dataset hub. The eight tasks of
  the LoSA paper are defined in ``losa_zero/tasks/*.yaml`` as lm-eval task configs that
  read JSONL files from a local folder (``$LOSA_ZERO_DATA/lm-eval-slices`` by default),
  with lm-eval's own prompts and metrics rebuilt from the slices' schemas. Any other task
  name goes to lm-eval's ``TaskManager`` unchanged, so hub tasks still work where a hub is
  reachable.

The numbers are lm-eval's: requests, prompt rendering, acc / acc_norm and the limit are
all handled by ``lm_eval.simple_evaluate``; only the model calls are ours.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import yaml
from lm_eval.api.model import LM

from losa_zero.errors import LosaZeroError

log = logging.getLogger(__name__)

# The LoSA paper's zero-shot suite, in its table order. Each has a YAML file in TASKS_DIR.
LOCAL_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_ENV = "LOSA_ZERO_DATA"
SLICES_SUBDIR = "lm-eval-slices"
# lm-eval's HFLM falls back to this context length when neither config nor tokenizer has one.
_DEFAULT_MAX_LENGTH = 2048


# --------------------------------------------------------------------------- task data


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the JSONL slices.

    ``data_dir`` may name the slices folder itself or a data root that contains
    ``lm-eval-slices/`` (so ``$LOSA_ZERO_DATA`` and ``--data-dir`` accept the same value);
    without it, ``$LOSA_ZERO_DATA/lm-eval-slices`` is used.
    """
    if data_dir is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise LosaZeroError(
                f"no zero-shot data folder: set {DATA_ENV} to the shared data folder "
                f"(holding {SLICES_SUBDIR}/) or pass data_dir"
            )
        path = Path(root).expanduser() / SLICES_SUBDIR
    else:
        path = Path(data_dir).expanduser()
        if (path / SLICES_SUBDIR).is_dir():
            path = path / SLICES_SUBDIR
    if not path.is_dir():
        raise LosaZeroError(f"zero-shot data folder {path} does not exist: set {DATA_ENV} or pass data_dir")
    return path.resolve()


def local_task_config(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The lm-eval config dict of one local task, with its data files made absolute.

    The YAML files give data files relative to the slices folder because the folder is
    only known at run time; lm-eval would resolve a relative ``data_files`` against the
    current directory, so they are rewritten here, and a missing file is reported before
    lm-eval turns it into a long ``datasets`` traceback.
    """
    if name not in LOCAL_TASKS:
        raise LosaZeroError(f"{name!r} is not a local zero-shot task: use one of {', '.join(LOCAL_TASKS)}")
    cfg = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    folder = resolve_data_dir(data_dir)
    files = cfg["dataset_kwargs"]["data_files"]
    for split, rel in files.items():
        path = folder / rel
        if not path.is_file():
            raise LosaZeroError(
                f"zero-shot data file {path} for task {name!r} is missing: point {DATA_ENV} "
                f"(or data_dir) at a folder with {SLICES_SUBDIR}/{rel}"
            )
        files[split] = str(path)
    return cfg


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Tell the HF libraries not to reach a hub while local tasks are evaluated.

    Local JSON files need no network; the variables only stop a stray lookup (a metric
    script, a tokenizer config) from hanging on a machine without one. Restored afterwards
    so hub tasks evaluated later in the same process are unaffected.
    """
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    """Keep the caller's RNG streams: ``simple_evaluate`` reseeds python, numpy and torch
    globally, which would otherwise change a fine-tuning run that evaluates mid-way."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# --------------------------------------------------------------------------- the model


def _unwrapped_config(model: Any) -> Any:
    """The HF config of a plain model or of a DeepSpeed engine (which keeps it on .module)."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "module"):
        config = getattr(model.module, "config", None)
    return config


def _device_of(model: torch.nn.Module) -> torch.device:
    # Under ZeRO-3 parameters are empty placeholders, but they still sit on the rank's device.
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts_kwarg(model: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class LosaZeroLM(LM):
    """lm-eval's view of an in-memory causal LM (plain, LoRA-wrapped or a ZeRO-3 engine).

    Tokenisation follows lm-eval's ``HFLM`` exactly, so scores match it on the same model:
    the tokenizer's own special-token setting (BOS for LLaMA) unless ``add_bos_token``
    overrides it; trailing context spaces move into the continuation; context +
    continuation are encoded together and split at the length of the encoded context
    (so a word boundary that merges across the split is scored as the model sees it);
    an empty context is replaced by the BOS (else EOS) token; inputs longer than the
    model's context are cut from the left.

    Every process evaluates every request (``rank`` 0, ``world_size`` 1 to lm-eval): under
    ZeRO-3 each forward is a collective that all ranks must enter the same number of times,
    which identical request lists guarantee; splitting requests across ranks would not.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        device: str | torch.device | None = None,
        max_gen_toks: int = 256,
        progress: bool | None = None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise LosaZeroError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.add_bos_token = add_bos_token
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else self._infer_max_length()
        self._device = torch.device(device) if device is not None else _device_of(model)
        # None lets tqdm decide (bars on a terminal, silent in logs and tests); -q: none.
        if progress is None and not log.isEnabledFor(logging.INFO):
            progress = False
        self._progress_disabled = None if progress is None else not progress
        self._forward_kwargs = {"use_cache": False} if _accepts_kwarg(model, "use_cache") else {}
        self._pad_id = next(
            (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None), 0
        )

    def _infer_max_length(self) -> int:
        config = _unwrapped_config(self.model)
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, attr, None)
            if value:
                return int(value)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < 1e9:  # transformers uses ~1e30 for "unset"
            return int(tok_max)
        return _DEFAULT_MAX_LENGTH

    # -- lm-eval properties --------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__).replace("/", "__")

    # -- tokenisation ----------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """Encode like HFLM: explicit flag, else ``add_bos_token``, else the tokenizer's
        default, and never a second BOS when the text already starts with one."""
        if add_special_tokens is not None:
            kwargs = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            kwargs = {"add_special_tokens": self.add_bos_token}
        else:
            kwargs = {}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kwargs["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **kwargs))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_enc = self.tok_encode(context)
        return context_enc, whole[len(context_enc):]

    # -- scoring -----------------------------------------------------------------------
    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._forward_kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs (and whether greedy decoding reproduces it).

        Requests with identical inputs share one forward row (lm-eval's HFLM does the same
        for one-token continuations). Rows are sorted longest first so each batch pads
        little and memory peaks on the first batch; right padding plus the attention mask leaves the real positions
        of a causal model untouched. Log-softmax runs in float32 on the continuation rows
        only, which keeps bf16 models accurate without a batch x length x vocab copy.
        """
        from tqdm import tqdm

        items = []
        truncated = 0
        for ctx, cont in pairs:
            ctx = ctx or [self.prefix_token_id]  # something to condition the first token on
            if len(cont) > self.max_length:
                raise LosaZeroError(
                    f"a continuation of {len(cont)} tokens exceeds the model's context of {self.max_length}: "
                    "pass a larger max_length or use shorter texts"
                )
            truncated += len(ctx) + len(cont) > self.max_length + 1
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]
            items.append((inp, cont))
        if truncated:
            log.warning("%d of %d %s requests exceed the %d-token context; their contexts were cut from the left",
                        truncated, len(items), desc, self.max_length)
        results: list[tuple[float, bool] | None] = [None] * len(items)
        # Requests with the same input share one row: the choices "yes"/"no" of a BoolQ
        # item, for instance, are one-token continuations of the same context.
        rows: dict[tuple[int, ...], list[int]] = {}
        for i, (inp, cont) in enumerate(items):
            if cont:
                rows.setdefault(tuple(inp), []).append(i)
            else:  # the empty string has probability one
                results[i] = (0.0, True)
        unique = sorted(rows, key=lambda inp: (-len(inp), inp))
        with self._eval_mode():
            for start in tqdm(range(0, len(unique), self.batch_size), desc=desc, disable=self._progress_disabled):
                batch = unique[start:start + self.batch_size]
                width = len(batch[0])
                ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, inp in enumerate(batch):
                    ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                    mask[row, : len(inp)] = 1
                logits = self._logits(ids.to(self._device), mask.to(self._device))
                for row, inp in enumerate(batch):
                    for i in rows[inp]:
                        cont = items[i][1]
                        logprobs = logits[row, len(inp) - len(cont): len(inp)].float().log_softmax(-1)
                        target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
                        ll = logprobs.gather(-1, target[:, None]).sum()
                        greedy = bool((logprobs.argmax(-1) == target).all())
                        results[i] = (float(ll), greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (req.args for req in requests):
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                if cont and cont[0] == self.prefix_token_id:
                    pairs.append((cont[:1], cont[1:]))
                else:
                    pairs.append(([self.prefix_token_id], cont))
            else:
                pairs.append(self._encode_pair(context, continuation))
        return self._score_tokens(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full-text log-likelihood in disjoint windows of the model's context, as HFLM
        does (lm-eval's own window helpers, so perplexity tasks agree with it)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for win in get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(make_disjoint_window(win))
                owner.append(n)
        scores = self._score_tokens(windows, "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scores):
            totals[n] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, one request at a time, until a stop string, EOS or
        ``max_gen_toks``. No KV cache and no padding: slow but obviously correct, and it
        needs nothing from the model beyond a forward (so it also runs under ZeRO-3, where
        ``generate`` would need ``synced_gpus``). Sampling arguments are ignored."""
        outputs = []
        with self._eval_mode():
            for context, gen_kwargs in (req.args for req in requests):
                kwargs = dict(gen_kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                if max_gen >= self.max_length:
                    raise LosaZeroError(
                        f"max_gen_toks {max_gen} leaves no room for a prompt in a {self.max_length}-token context: lower it"
                    )
                ids = self.tok_encode(context) or [self.prefix_token_id]
                ids = ids[-(self.max_length - max_gen):]
                generated: list[int] = []
                text = ""
                for _ in range(max_gen):
                    x = torch.tensor([ids + generated], dtype=torch.long, device=self._device)
                    nxt = int(self._logits(x, torch.ones_like(x))[0, -1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    generated.append(nxt)
                    text = self.tokenizer.decode(generated, skip_special_tokens=True)
                    if any(stop in text for stop in until):
                        break
                cut = min((text.index(s) for s in until if s in text), default=len(text))
                outputs.append(text[:cut])
        return outputs


# --------------------------------------------------------------------------- evaluation


def _task_specs(tasks: Sequence[str], data_dir) -> tuple[list[Any], list[str], bool]:
    """Turn names into lm-eval specs: config dicts for local tasks, names for the rest.

    Returns (specs, result names in request order, whether lm-eval's registry is needed).
    The registry is only built when a non-local name appears: indexing lm-eval's ~15k
    task YAMLs takes several seconds.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    names: list[str] = []
    for t in tasks:
        t = str(t).strip()
        key = t.lower() if t.lower() in LOCAL_TASKS else t
        if key and key not in names:
            names.append(key)
    if not names:
        raise LosaZeroError(f"no zero-shot tasks given: name some of {', '.join(LOCAL_TASKS)}")
    specs = [local_task_config(n, data_dir) if n in LOCAL_TASKS else n for n in names]
    return specs, names, any(n not in LOCAL_TASKS for n in names)


@functools.lru_cache(maxsize=1)
def _registry():
    """lm-eval's full task index, built once per process: indexing its task folder takes
    many seconds, and a process may check and score tasks several times."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _task_manager(names: list[str], need_registry: bool):
    from lm_eval.tasks import TaskManager

    if not need_registry:
        return TaskManager(include_defaults=False)
    tm = _registry()
    known = set(tm.all_tasks)
    for n in names:
        if n not in LOCAL_TASKS and n not in known and not tm.match_tasks([n]):
            raise LosaZeroError(
                f"unknown zero-shot task {n!r}: use one of {', '.join(LOCAL_TASKS)} or a task "
                "name lm-eval knows (see `lm-eval ls tasks`)"
            )
    return tm


@contextlib.contextmanager
def _hub_errors(names: list[str]) -> Iterator[None]:
    """A task lm-eval must download while the hub is off (losa-zero's default) is a user
    error: say which variables allow the download."""
    try:
        yield
    except ConnectionError as exc:
        hub = [n for n in names if n not in LOCAL_TASKS]
        raise LosaZeroError(
            f"zero-shot task(s) {', '.join(hub) or ', '.join(names)} need data from the Hugging Face hub, which "
            f"could not be reached ({str(exc).splitlines()[0]}): set HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 (losa-zero "
            f"sets them to 1 unless given) on a machine with network access, or use the bundled tasks "
            f"({', '.join(LOCAL_TASKS)})") from exc


def check_tasks(tasks: Sequence[str], data_dir: str | os.PathLike | None = None):
    """Task names and local data checked before any model work: returns ``(specs, names,
    task manager, whether lm-eval's registry is used)``; unknown names and missing local
    files are one-line errors."""
    specs, names, need_registry = _task_specs(tasks, data_dir)
    with contextlib.nullcontext() if need_registry else _offline():
        tm = _task_manager(names, need_registry)
    return specs, names, tm, need_registry


def evaluate_zeroshot(
    model: torch.nn.Module | LM,
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    **lm_kwargs: Any,
) -> dict:
    """Zero-shot accuracy of ``model`` on ``tasks``.

    ``model`` is a loaded causal LM (wrapped in :class:`LosaZeroLM` with ``tokenizer`` and
    ``lm_kwargs``) or any ready ``lm_eval`` LM, e.g. lm-eval's own ``HFLM`` as a reference.
    ``limit`` keeps the first ``limit`` documents of each task (a float below 1 is a
    fraction, as in lm-eval). Returns
    ``{"tasks": {name: {"acc", "acc_norm" (None where lm-eval reports none), "n"}},
    "mean_acc": mean of the tasks' acc, "limit": limit}``.
    """
    import lm_eval

    specs, names, tm, need_registry = check_tasks(tasks, data_dir)  # before any model work
    if isinstance(model, LM):
        lm = model
    else:
        if tokenizer is None:
            raise LosaZeroError("evaluate_zeroshot needs the model's tokenizer: pass tokenizer")
        lm = LosaZeroLM(model, tokenizer, batch_size=batch_size, **lm_kwargs)
    offline = contextlib.nullcontext() if need_registry else _offline()
    with offline, _preserve_rng(), _hub_errors(names):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            limit=limit,
            batch_size=batch_size,
            task_manager=tm,
            bootstrap_iters=0,  # stderr is not reported; bootstrapping would only cost time
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if out is None:  # only when an LM reports a non-zero rank
        return {"tasks": {}, "mean_acc": None, "limit": limit}
    n_samples = out.get("n-samples", {})
    results: dict[str, dict] = {}
    for name, metrics in out["results"].items():
        if "acc,none" not in metrics:
            continue  # generative / perplexity tasks have no accuracy to report here
        norm = metrics.get("acc_norm,none")
        results[name] = {
            "acc": float(metrics["acc,none"]),
            "acc_norm": None if norm is None else float(norm),
            "n": int(n_samples.get(name, {}).get("effective", 0)) or None,
        }
    # Local tasks first in the requested order, then whatever lm-eval expanded names into.
    ordered = {n: results[n] for n in names if n in results}
    ordered.update({n: r for n, r in results.items() if n not in ordered})
    leaf_accs = [r["acc"] for n, r in ordered.items() if r["n"]]
    mean = float(np.mean(leaf_accs)) if leaf_accs else None
    return {"tasks": ordered, "mean_acc": mean, "limit": limit}


def format_table(result: dict) -> str:
    """A small aligned text table of :func:`evaluate_zeroshot`'s result, for logs and CLIs."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    rows = [("task", "acc", "acc_norm", "n")]
    for name, r in result.get("tasks", {}).items():
        rows.append((name, num(r.get("acc")), num(r.get("acc_norm")), "-" if r.get("n") is None else str(r["n"])))
    rows.append(("mean", num(result.get("mean_acc")), "", ""))
    widths = [max(len(row[c]) for row in rows) for c in range(4)]

    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    out = [line(rows[0]), sep] + [line(r) for r in rows[1:-1]] + [sep, line(rows[-1])]
    if result.get("limit") is not None:
        out.append(f"(limit {result['limit']} documents per task)")
    return "\n".join(out)
