"""Text sources for calibration, fine-tuning and perplexity, from local files only.

A *source spec* is ``[FORMAT:]PATH`` with FORMAT one of :data:`FORMATS`. The prefix is
optional because the format can almost always be inferred from the file; it exists for the
cases where it cannot (a ``.txt`` that is really WikiText rows, a ``.json`` with both a
``text`` and an ``instruction`` field...). Everything here is deterministic given a seed,
because pruning results are compared across methods and runs: two runs of the same
command must see the same calibration windows and the same fine-tuning examples.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from losa_zero.errors import LosaZeroError

FORMATS = ("text", "jsonl", "alpaca", "wikitext2")

#: The id fine-tuning batches are padded with. Padding is masked out of attention and loss,
#: so it only has to be a valid embedding row; a tokenizer's pad id need not be (Qwen2's
#: lies past the vocabulary of small models), 0 always is.
PAD_ID = 0

# The Stanford Alpaca prompt (with and without an input), used by LoSA and most LoRA
# recovery recipes; the loss target is the output appended to the prompt.
ALPACA_TEMPLATE = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}

_FORMAT_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


# --------------------------------------------------------------------------- sources

def _load_records(path: Path) -> list[dict]:
    """Read a .json (list of records) or .jsonl file with the ``datasets`` JSON builder.

    ``datasets`` is used so large instruction sets are parsed by Arrow rather than held
    twice as Python objects; only a local file is ever passed, so no hub is involved.
    """
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed JSON
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LosaZeroError(f"cannot read {path} as JSON records ({first}): pass a .jsonl file or a .json list of objects") from exc
    return ds.to_list()


def _record_kind(records: list[dict], path: Path) -> str:
    if not records:
        raise LosaZeroError(f"{path} holds no records: pass a file with at least one record")
    keys = set(records[0])
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "jsonl"
    raise LosaZeroError(
        f"{path} has records with fields {sorted(keys)}, not 'text' nor 'instruction'/'output': "
        "convert it to one of those layouts"
    )


def split_source(spec: str | os.PathLike) -> tuple[str | None, Path]:
    """``[FORMAT:]PATH`` as ``(FORMAT or None, PATH)``, without reading the file."""
    spec = os.fspath(spec)
    if ":" in spec:
        head, tail = spec.split(":", 1)
        if head in FORMATS:
            return head, Path(tail).expanduser()
        if not Path(spec).exists() and _FORMAT_WORD.match(head) and len(head) > 1:
            raise LosaZeroError(
                f"unknown data format {head!r} in {spec!r}: use one of {', '.join(FORMATS)} (as FORMAT:PATH) or a plain path"
            )
    return None, Path(spec).expanduser()


def parse_source(spec: str | os.PathLike) -> tuple[str, Path]:
    """Split ``[FORMAT:]PATH`` into ``(format, path)``, inferring the format when absent.

    Inference rules: a name starting with ``wikitext-2-raw`` is WikiText-2 rows; ``.txt``
    is plain text; ``.json``/``.jsonl`` are looked at: a ``text`` field means jsonl, an
    ``instruction`` + ``output`` pair means alpaca.
    """
    fmt, path = split_source(spec)
    if not path.exists():
        raise LosaZeroError(f"data file {path} not found: check the path given as data source")
    if not path.is_file():
        raise LosaZeroError(f"data source {path} is not a file: pass a .txt, .jsonl or .json file")
    suffix = path.suffix.lower()
    if fmt is None:
        if path.name.startswith("wikitext-2-raw"):
            fmt = "wikitext2"
        elif suffix == ".txt":
            fmt = "text"
        elif suffix in (".json", ".jsonl"):
            fmt = _record_kind(_load_records(path), path)
        else:
            raise LosaZeroError(
                f"cannot infer the format of {path}: prefix it with one of {', '.join(FORMATS)} (e.g. text:{path})"
            )
    elif fmt in ("jsonl", "alpaca"):
        records = _load_records(path)
        if not records:
            raise LosaZeroError(f"{path} holds no records: pass a file with at least one record")
        needed = ("text",) if fmt == "jsonl" else ("instruction", "output")
        missing = [k for k in needed if k not in records[0]]
        if missing:
            raise LosaZeroError(
                f"{path} records lack {', '.join(repr(k) for k in missing)} needed by format {fmt!r} "
                f"(fields: {sorted(records[0])}): fix the prefix or the file"
            )
    return fmt, path


def rebuild_wikitext_rows(raw_text: str) -> list[str]:
    """Undo ``"\\n".join(rows)`` of the HF ``wikitext-2-raw-v1`` test split.

    Each row is ``""`` or one line ending in ``"\\n"``, so after splitting on ``"\\n"`` a
    non-empty piece is a row (plus its newline) and is always followed by an empty piece
    that only separates it from the next row. Getting the rows exactly right matters:
    the published SparseGPT/Wanda numbers score ``"\\n\\n".join(rows)``.
    """
    pieces = raw_text.split("\n")
    rows: list[str] = []
    i = 0
    while i < len(pieces):
        p = pieces[i]
        if p:
            rows.append(p + "\n")
            i += 2  # skip the separator that follows the row's own newline
        else:
            rows.append("")
            i += 1
    return rows


def render_alpaca(record: dict) -> tuple[str, str]:
    """``(prompt, output)`` of one Alpaca record; a missing or blank input uses the no-input prompt."""
    instruction = (record.get("instruction") or "").strip()
    inp = (record.get("input") or "").strip()
    output = record.get("output") or ""
    if inp:
        prompt = ALPACA_TEMPLATE["prompt_input"].format(instruction=instruction, input=inp)
    else:
        prompt = ALPACA_TEMPLATE["prompt_no_input"].format(instruction=instruction)
    return prompt, output


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LosaZeroError(f"{path} is not UTF-8 text: convert it to UTF-8") from exc


def _documents(fmt: str, path: Path) -> list[str]:
    if fmt == "text":
        return [d.strip() for d in re.split(r"\n[ \t\r]*\n", _read_text(path)) if d.strip()]
    if fmt == "wikitext2":
        return rebuild_wikitext_rows(_read_text(path))
    records = _load_records(path)
    if fmt == "jsonl":
        return [r["text"] for r in records if isinstance(r.get("text"), str) and r["text"].strip()]
    return ["".join(render_alpaca(r)) for r in records]


def load_documents(spec: str | os.PathLike) -> list[str]:
    """The documents of a source: text paragraphs (split on blank lines), jsonl ``text``
    fields, rendered Alpaca prompt + output, or WikiText-2 rows (empty ones included, so
    that joining reproduces the scored text)."""
    fmt, path = parse_source(spec)
    return _documents(fmt, path)


def load_eval_text(spec: str | os.PathLike) -> str:
    """The single string scored for perplexity.

    A text file is used exactly as is (so the TinyStories number matches the reference
    protocol); WikiText-2 becomes ``"\\n\\n".join(rows)`` as in SparseGPT/Wanda.
    """
    fmt, path = parse_source(spec)
    if fmt == "text":
        return _read_text(path)
    return "\n\n".join(_documents(fmt, path))


# --------------------------------------------------------------------------- tokens

def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch-encode without special tokens and without the 'sequence too long' warning
    (long inputs are intended here: they are windowed or truncated afterwards)."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)
    return [list(x) for x in enc["input_ids"]]


def calibration_windows(tokenizer, spec: str | os.PathLike, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, as a LongTensor ``[nsamples, seqlen]``.

    The documents are joined with blank lines and tokenized as one stream starting with a
    single BOS, then window starts are drawn with a private ``torch.Generator`` so the
    calibration set depends only on ``seed`` (not on whatever else consumed the global RNG),
    which keeps pruning runs reproducible and methods comparable on identical inputs.
    """
    if nsamples < 1 or seqlen < 1:
        raise LosaZeroError(f"calibration needs nsamples >= 1 and seqlen >= 1 (got {nsamples}, {seqlen})")
    text = "\n\n".join(load_documents(spec))
    ids = _encode(tokenizer, [text])[0] if text else []
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    n = len(ids)
    if n < seqlen + 1:
        raise LosaZeroError(
            f"calibration data {spec} has {n} tokens, fewer than seqlen+1 = {seqlen + 1}: "
            "use more text or a smaller --seqlen"
        )
    stream = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def finetune_examples(tokenizer, spec: str | os.PathLike, max_length: int, limit: int | None = None,
                      seed: int = 0, train_on_inputs: bool = True) -> list[dict]:
    """Tokenized fine-tuning examples ``{"input_ids", "labels"}`` in a seeded order.

    Each example is BOS + text + EOS truncated to ``max_length``. For Alpaca data with
    ``train_on_inputs=False`` the prompt tokens get label -100 so only the response is
    learned; examples left with nothing to learn after truncation are dropped (they would
    make the loss of an all-padding batch NaN).

    ``limit`` larger than the data set cycles through it again in a fresh shuffled order:
    LoSA's released recipe visits a fixed number of samples (10K) regardless of the data
    set's size, and a step budget must not silently shrink on a small local file.
    """
    if max_length < 2:
        raise LosaZeroError(f"max_length must be at least 2, got {max_length}")
    if limit is not None and limit < 0:
        raise LosaZeroError(f"limit must be non-negative, got {limit}")
    fmt, path = parse_source(spec)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []

    if fmt == "alpaca":
        pairs = [render_alpaca(r) for r in _load_records(path)]
    else:
        pairs = [("", d) for d in _documents(fmt, path) if d.strip()]
    prompts = _encode(tokenizer, [p for p, _ in pairs])
    fulls = _encode(tokenizer, [p + o for p, o in pairs])

    examples = []
    for (prompt, _), p_ids, f_ids in zip(pairs, prompts, fulls):
        ids = (head + f_ids + tail)[:max_length]
        labels = list(ids)
        if fmt == "alpaca" and not train_on_inputs and prompt:
            # The prompt and full text share their first len(prompt ids) tokens except,
            # rarely, at the boundary where a merge may cross it; masking the prompt's own
            # length (as Alpaca-LoRA does) errs on the side of masking one token too many.
            n_mask = min(len(head) + len(p_ids), len(ids))
            labels[:n_mask] = [-100] * n_mask
        if all(x == -100 for x in labels[1:]):
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise LosaZeroError(f"no usable fine-tuning examples in {path} at max_length {max_length}: raise --max-length")

    g = torch.Generator().manual_seed(int(seed))
    want = len(examples) if limit is None else limit
    order: list[int] = []
    while len(order) < want:
        order.extend(torch.randperm(len(examples), generator=g).tolist())
    return [dict(input_ids=list(examples[i]["input_ids"]), labels=list(examples[i]["labels"])) for i in order[:want]]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``attention_mask`` 1/0, labels -100
    on padding (so padding never contributes to the loss whatever ``pad_id`` is)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention[i, :k] = 1
        labels[i, :k] = torch.tensor(e.get("labels", e["input_ids"]), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
