"""Text sources for calibration, fine-tuning and perplexity, from local files only.

A *source spec* is ``[FORMAT:]PATH`` with FORMAT one of :data:`FORMATS`. The prefix is
optional because the format can almost always be inferred from the file; it exists for the
cases where it cannot (a ``.txt`` that is really WikiText rows, a ``.json`` with both a
``text`` and an ``instruction`` field...). Everything here is deterministic given a seed,
because pruning results are compared across methods and runs: two runs of the same
command must see the same calibration windows and the same fine-tuning examples.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

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
#
# Calibration and fine-tuning files can be many GB. Records and paragraphs are streamed
# from the file (never all held at once), so what a run keeps is proportional to what it
# samples; only a ``.json`` list (which has no line structure) is parsed whole.

def _iter_records(path: Path) -> Iterator[dict]:
    """The records of a ``.jsonl`` file (one JSON object per line, streamed) or of a
    ``.json`` file holding one list of objects (parsed whole: use .jsonl for big data)."""
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
        fh.seek(0)
        if head.startswith("["):
            try:
                data = json.load(fh)
            except ValueError as exc:
                raise LosaZeroError(f"cannot read {path} as JSON ({exc}): pass a .jsonl file or a .json list of "
                                    "objects") from None
            if not all(isinstance(r, dict) for r in data):
                raise LosaZeroError(f"{path} is a JSON list whose items are not all objects: pass a list of objects")
            yield from data
            return
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise LosaZeroError(f"cannot read line {n} of {path} as JSON ({exc}): pass a .jsonl file "
                                        "(one object per line) or a .json list of objects") from None
                if not isinstance(record, dict):
                    raise LosaZeroError(f"line {n} of {path} is not a JSON object: pass one object per line")
                yield record
        except UnicodeDecodeError:
            raise LosaZeroError(f"{path} is not UTF-8 text: convert it to UTF-8") from None


def _first_record(path: Path) -> dict:
    for record in _iter_records(path):
        return record
    raise LosaZeroError(f"{path} holds no records: pass a file with at least one record")


def _record_kind(record: dict, path: Path) -> str:
    keys = set(record)
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
    is plain text; ``.json``/``.jsonl`` are looked at (the first record): a ``text`` field
    means jsonl, an ``instruction`` + ``output`` pair means alpaca.
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
            fmt = _record_kind(_first_record(path), path)
        else:
            raise LosaZeroError(
                f"cannot infer the format of {path}: prefix it with one of {', '.join(FORMATS)} (e.g. text:{path})"
            )
    elif fmt in ("jsonl", "alpaca"):
        first = _first_record(path)
        needed = ("text",) if fmt == "jsonl" else ("instruction", "output")
        missing = [k for k in needed if k not in first]
        if missing:
            raise LosaZeroError(
                f"{path} records lack {', '.join(repr(k) for k in missing)} needed by format {fmt!r} "
                f"(fields: {sorted(first)}): fix the prefix or the file"
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
    for key in ("instruction", "input", "output"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise LosaZeroError(f"an alpaca record has a non-text {key!r} field ({type(record[key]).__name__}: "
                                f"{str(record[key])[:40]!r}): every instruction, input and output must be a string")
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


def _paragraphs(path: Path) -> Iterator[str]:
    r"""Documents of a text file, streamed: paragraphs separated by whitespace-only lines,
    stripped (the same split as ``re.split(r"\n[ \t\r]*\n", text)`` of the whole text)."""
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip(" \t\r\n") == "" and line.endswith("\n"):
                    doc = "".join(lines).strip()
                    lines = []
                    if doc:
                        yield doc
                else:
                    lines.append(line)
    except UnicodeDecodeError:
        raise LosaZeroError(f"{path} is not UTF-8 text: convert it to UTF-8") from None
    doc = "".join(lines).strip()
    if doc:
        yield doc


def _pairs(fmt: str, path: Path) -> Iterator[tuple[str, str]]:
    """(prompt, text) of every document, streamed: Alpaca records as rendered prompt and
    output; every other format with an empty prompt."""
    if fmt == "text":
        yield from (("", d) for d in _paragraphs(path))
    elif fmt == "wikitext2":
        yield from (("", r) for r in rebuild_wikitext_rows(_read_text(path)))
    elif fmt == "jsonl":
        yield from (("", r["text"]) for r in _iter_records(path) if isinstance(r.get("text"), str) and r["text"].strip())
    else:
        yield from (render_alpaca(r) for r in _iter_records(path))


def load_documents(spec: str | os.PathLike) -> list[str]:
    """The documents of a source: text paragraphs (split on blank lines), jsonl ``text``
    fields, rendered Alpaca prompt + output, or WikiText-2 rows (empty ones included, so
    that joining reproduces the scored text)."""
    fmt, path = parse_source(spec)
    return [p + t for p, t in _pairs(fmt, path)]


def load_eval_text(spec: str | os.PathLike) -> str:
    """The single string scored for perplexity.

    A text file is used exactly as is (so the TinyStories number matches the reference
    protocol); WikiText-2 becomes ``"\\n\\n".join(rows)`` as in SparseGPT/Wanda.
    """
    fmt, path = parse_source(spec)
    if fmt == "text":
        return _read_text(path)
    return "\n\n".join(load_documents(spec))


# --------------------------------------------------------------------------- tokens

def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch-encode without special tokens and without the 'sequence too long' warning
    (long inputs are intended here: they are windowed or truncated afterwards)."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)
    return [list(x) for x in enc["input_ids"]]


#: Text up to this many characters is tokenized as one stream (the reference protocol
#: below, exactly): every fixture and the usual calibration sets (WikiText-2, a C4 shard's
#: slice), at about 140 bytes of memory per character; a bigger file is never held or
#: tokenized whole (see calibration_windows).
WHOLE_TEXT_CHARS = 16 << 20
#: Pieces a bigger file is read in.
CHUNK_CHARS = 1 << 20


def _text_chunks(fmt: str, path: Path) -> Iterator[str]:
    """The calibration stream ``"\\n\\n".join(documents)`` in pieces of about
    CHUNK_CHARS characters (at most 1.5x), cut between documents; every piece but the last
    ends with the separator, so joining them gives the stream back."""
    pending: list[str] = []
    size = 0
    held = None
    for prompt, text in _pairs(fmt, path):
        doc = prompt + text
        if pending and size + len(doc) > CHUNK_CHARS:
            if held is not None:
                yield held
            held = "\n\n".join(pending) + "\n\n"
            pending, size = [], 0
        pending.append(doc)
        size += len(doc) + 2
    tail = "\n\n".join(pending)
    if held is not None and len(tail) < CHUNK_CHARS // 2:  # no small last piece: merge it
        yield held + tail
    else:
        if held is not None:
            yield held
        if pending:
            yield tail


def calibration_windows(tokenizer, spec: str | os.PathLike, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, as a LongTensor ``[nsamples, seqlen]``.

    The documents are joined with blank lines and tokenized as one stream starting with a
    single BOS, then window starts are drawn with a private ``torch.Generator`` so the
    calibration set depends only on ``seed`` (not on whatever else consumed the global RNG),
    which keeps pruning runs reproducible and methods comparable on identical inputs.

    A file with more than WHOLE_TEXT_CHARS characters of text is not tokenized whole (that
    costs about 140 bytes of memory per character, and time for text never used): each window
    starts at a random character position (a piece of the stream chosen in proportion to
    its length, then a position in it, moved to the next word), and only the text from
    there that the window needs is tokenized. Memory: one piece of text plus the windows.
    """
    if nsamples < 1 or seqlen < 1:
        raise LosaZeroError(f"calibration needs nsamples >= 1 and seqlen >= 1 (got {nsamples}, {seqlen})")
    fmt, path = parse_source(spec)
    head, size = [], 0
    for chunk in _text_chunks(fmt, path):
        head.append(chunk)
        size += len(chunk)
        if size > WHOLE_TEXT_CHARS:
            break
    else:
        return _stream_windows(tokenizer, "".join(head), nsamples, seqlen, seed, spec)
    del head
    sizes = [len(c) for c in _text_chunks(fmt, path)]
    g = torch.Generator().manual_seed(int(seed))
    which = torch.multinomial(torch.tensor(sizes, dtype=torch.float64), nsamples, replacement=True,
                              generator=g).tolist()
    offsets = [int(torch.randint(0, sizes[c], (1,), generator=g)) for c in which]
    windows: list[list[int] | None] = [None] * nsamples
    for c, chunk in enumerate(_text_chunks(fmt, path)):
        for i in (i for i, w in enumerate(which) if w == c):
            windows[i] = _window_at(tokenizer, chunk, offsets[i], seqlen)
        if all(w is not None for w in windows):
            break
    return torch.tensor(windows, dtype=torch.long)


def _stream_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int, spec) -> torch.Tensor:
    """Windows of the whole text tokenized as one stream (the reference protocol)."""
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


def _window_at(tokenizer, text: str, offset: int, seqlen: int) -> list[int]:
    """``seqlen`` tokens of ``text`` from the first word starting at or after ``offset``
    (or, too near the end, the last ``seqlen`` tokens), tokenizing only what is needed."""
    start = offset
    while 0 < start < len(text) and not text[start - 1].isspace():
        start += 1
    span = 8 * seqlen
    while True:
        ids = _encode(tokenizer, [text[start:start + span]])[0]
        if len(ids) > seqlen:                  # the last token may be cut by the span: never used
            return ids[:seqlen]
        if start + span >= len(text):
            break
        span *= 2
    span = 8 * seqlen                          # too near the end: the window that ends with the text
    while True:
        ids = _encode(tokenizer, [text[max(0, len(text) - span):]])[0]
        if len(ids) > seqlen:                  # the first token may be cut by the span: never used
            return ids[-seqlen:]
        if span >= len(text):
            raise LosaZeroError(f"calibration text has fewer than seqlen+1 = {seqlen + 1} tokens per piece: "
                                "use a smaller --seqlen")
        span *= 2


def _example(fmt: str, prompt: str, p_ids: list[int], f_ids: list[int], head: list[int], tail: list[int],
             max_length: int, train_on_inputs: bool) -> dict | None:
    """One tokenized example, or None when nothing is left to learn after truncation (the
    loss of an all-padding batch would be NaN)."""
    ids = (head + f_ids + tail)[:max_length]
    labels = list(ids)
    if fmt == "alpaca" and not train_on_inputs and prompt:
        # The prompt and full text share their first len(prompt ids) tokens except,
        # rarely, at the boundary where a merge may cross it; masking the prompt's own
        # length (as Alpaca-LoRA does) errs on the side of masking one token too many.
        n_mask = min(len(head) + len(p_ids), len(ids))
        labels[:n_mask] = [-100] * n_mask
    if all(x == -100 for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def finetune_examples(tokenizer, spec: str | os.PathLike, max_length: int, limit: int | None = None,
                      seed: int = 0, train_on_inputs: bool = True) -> list[dict]:
    """Tokenized fine-tuning examples ``{"input_ids", "labels"}`` in a seeded order.

    Each example is BOS + text + EOS truncated to ``max_length``. For Alpaca data with
    ``train_on_inputs=False`` the prompt tokens get label -100 so only the response is
    learned; examples left with nothing to learn after truncation are skipped.

    ``limit`` larger than the data set cycles through it again in a fresh shuffled order:
    LoSA's released recipe visits a fixed number of samples (10K) regardless of the data
    set's size, and a step budget must not silently shrink on a small local file.

    The file is streamed: one pass counts the documents (tokenizing them only when a
    masked prompt may leave an example empty), the order is drawn, and a second pass
    tokenizes only the documents the order uses, so memory follows ``limit``, not the file.
    """
    if max_length < 2:
        raise LosaZeroError(f"max_length must be at least 2, got {max_length}")
    if limit is not None and limit < 0:
        raise LosaZeroError(f"limit must be non-negative, got {limit}")
    fmt, path = parse_source(spec)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []

    def documents() -> Iterator[tuple[str, str]]:
        return (pair for pair in _pairs(fmt, path) if fmt == "alpaca" or pair[1].strip())

    def tokenized(pairs: list[tuple[str, str]]) -> list[dict | None]:
        p_ids = _encode(tokenizer, [p for p, _ in pairs])
        f_ids = _encode(tokenizer, [p + t for p, t in pairs])
        return [_example(fmt, p, pi, fi, head, tail, max_length, train_on_inputs)
                for (p, _), pi, fi in zip(pairs, p_ids, f_ids)]

    usable = None  # document index of each usable example; None: every document is usable
    if fmt == "alpaca" and not train_on_inputs:  # a masked prompt may leave nothing to learn
        keep = bytearray()
        for batch in _batched(documents(), 512):
            keep.extend(ex is not None for ex in tokenized(batch))
        usable = torch.nonzero(torch.frombuffer(keep, dtype=torch.uint8) if keep else torch.zeros(0)).flatten()
        n = len(usable)
    else:
        n = sum(1 for _ in documents())
    if n == 0:
        raise LosaZeroError(f"no usable fine-tuning examples in {path} at max_length {max_length}: raise --max-length")
    g = torch.Generator().manual_seed(int(seed))
    want = n if limit is None else limit
    order: list[int] = []
    while len(order) < want:  # only the used head of each permutation becomes a list
        order.extend(torch.randperm(n, generator=g)[:want - len(order)].tolist())
    order = [int(usable[k]) if usable is not None else k for k in order]
    wanted = set(order)
    made: dict[int, dict] = {}
    picked = ((i, pair) for i, pair in enumerate(documents()) if i in wanted)
    for batch in _batched(picked, 512):
        made.update((i, ex) for (i, _), ex in zip(batch, tokenized([pair for _, pair in batch])))
    return [dict(input_ids=list(made[i]["input_ids"]), labels=list(made[i]["labels"])) for i in order]


def _batched(items, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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
