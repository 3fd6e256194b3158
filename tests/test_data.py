"""Data sources, tokenized examples and crash-safe outputs.

The tokenizer is the real stories260K one (converted once per session), so the tests see
the same BOS/EOS handling and SentencePiece behaviour as the pruning runs.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from losa_zero.data import (
    ALPACA_TEMPLATE,
    calibration_windows,
    collate,
    finetune_examples,
    load_documents,
    load_eval_text,
    parse_source,
    rebuild_wikitext_rows,
    render_alpaca,
)
from losa_zero.errors import LosaZeroError
from losa_zero.outputs import atomic_output_dir, peak_memory, write_json_atomic

WIKITEXT = "wikitext-2/wikitext-2-raw-v1.test.rows-newline-joined.txt"


@pytest.fixture(scope="module")
def tok(stories_model_dir):
    from losa_zero.modeling import load_tokenizer

    return load_tokenizer(stories_model_dir)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


ALPACA_RECORDS = [
    {"instruction": "Name a color.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hi.", "input": "", "output": "Hi there, friend."},
]


# ----------------------------------------------------------------------------- WikiText

def test_wikitext_rows_rebuild_byte_exact(data_dir):
    raw = (data_dir / WIKITEXT).read_text(encoding="utf-8")
    rows = rebuild_wikitext_rows(raw)
    assert len(rows) == 4358
    assert sum(1 for r in rows if r) == 2891
    assert all(r == "" or (r.endswith("\n") and "\n" not in r[:-1]) for r in rows)
    assert "\n".join(rows) == raw
    spec = str(data_dir / WIKITEXT)
    assert parse_source(spec)[0] == "wikitext2"
    assert load_eval_text(spec) == "\n\n".join(rows)
    assert load_documents(spec) == rows


def test_wikitext_rows_small_cases():
    rows = ["", " = A = \n", "", " text one \n", " text two \n", ""]
    assert rebuild_wikitext_rows("\n".join(rows)) == rows
    assert rebuild_wikitext_rows("") == [""]


# ----------------------------------------------------------------------------- sources

def test_format_inference_and_prefixes(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\ntwo\n", encoding="utf-8")
    jl = _write_jsonl(tmp_path / "c.jsonl", [{"text": "doc one"}, {"text": "doc two"}])
    al_json = tmp_path / "al.json"
    al_json.write_text(json.dumps(ALPACA_RECORDS), encoding="utf-8")
    al_jsonl = _write_jsonl(tmp_path / "al.jsonl", ALPACA_RECORDS)
    wt = tmp_path / "wikitext-2-raw-mine.txt"
    wt.write_text(" = T = \n\n\n x \n", encoding="utf-8")

    assert parse_source(str(txt)) == ("text", txt)
    assert parse_source(jl) == ("jsonl", jl)
    assert parse_source(str(al_json)) == ("alpaca", al_json)
    assert parse_source(str(al_jsonl)) == ("alpaca", al_jsonl)
    assert parse_source(str(wt)) == ("wikitext2", wt)
    assert parse_source(f"text:{wt}") == ("text", wt)
    assert parse_source(f"wikitext2:{txt}") == ("wikitext2", txt)


def test_source_errors(tmp_path):
    with pytest.raises(LosaZeroError, match="not found"):
        parse_source(str(tmp_path / "missing.txt"))
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(LosaZeroError, match="unknown data format 'parquet'"):
        parse_source(f"parquet:{tmp_path / 'a.txt'}")
    csv = tmp_path / "a.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(LosaZeroError, match="cannot infer the format"):
        parse_source(str(csv))
    odd = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(LosaZeroError, match="not 'text' nor 'instruction'"):
        parse_source(str(odd))
    jl = _write_jsonl(tmp_path / "c.jsonl", [{"text": "doc"}])
    with pytest.raises(LosaZeroError, match="'instruction'"):
        parse_source(f"alpaca:{jl}")
    with pytest.raises(LosaZeroError) as err:
        parse_source(str(odd))
    assert "\n" not in str(err.value)


def test_text_documents_and_eval_text(tmp_path):
    raw = "First story.\nStill first.\n\n  \nSecond story.\n\n\n\nThird.\n"
    p = tmp_path / "s.txt"
    p.write_text(raw, encoding="utf-8")
    assert load_documents(str(p)) == ["First story.\nStill first.", "Second story.", "Third."]
    assert load_eval_text(str(p)) == raw
    jl = _write_jsonl(tmp_path / "c.jsonl", [{"text": "doc one"}, {"text": "doc two"}])
    assert load_documents(str(jl)) == ["doc one", "doc two"]
    assert load_eval_text(str(jl)) == "doc one\n\ndoc two"


def test_alpaca_rendering(tmp_path):
    prompt, out = render_alpaca(ALPACA_RECORDS[0])
    assert prompt == ALPACA_TEMPLATE["prompt_no_input"].format(instruction="Name a color.")
    assert "### Input:" not in prompt and prompt.endswith("### Response:\n") and out == "Red."
    prompt, out = render_alpaca(ALPACA_RECORDS[1])
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n" in prompt
    # a record without the "input" key at all is a no-input record
    assert render_alpaca({"instruction": "X", "output": "Y"})[0] == ALPACA_TEMPLATE["prompt_no_input"].format(instruction="X")
    p = tmp_path / "al.json"
    p.write_text(json.dumps(ALPACA_RECORDS), encoding="utf-8")
    docs = load_documents(str(p))
    assert docs[1] == "".join(render_alpaca(ALPACA_RECORDS[1]))


def test_real_fixture_sources(data_dir):
    assert parse_source(str(data_dir / "c4" / "c4_demo.jsonl"))[0] == "jsonl"
    assert len(load_documents(str(data_dir / "c4" / "c4_demo.jsonl"))) == 300
    alpaca = str(data_dir / "alpaca-gpt4" / "alpaca_en_demo.json")
    assert parse_source(alpaca)[0] == "alpaca"
    docs = load_documents(alpaca)
    assert len(docs) == 999 and docs[0].startswith("Below is an instruction")


# ----------------------------------------------------------------------------- tokens

def test_calibration_windows(tok, tinystories_split):
    spec = str(tinystories_split[1])
    a = calibration_windows(tok, spec, nsamples=6, seqlen=64, seed=0)
    assert a.shape == (6, 64) and a.dtype == torch.long
    torch.manual_seed(123)  # the global RNG must not matter
    b = calibration_windows(tok, spec, nsamples=6, seqlen=64, seed=0)
    assert torch.equal(a, b)
    c = calibration_windows(tok, spec, nsamples=6, seqlen=64, seed=1)
    assert not torch.equal(a, c)
    # every window is a contiguous slice of BOS + tokens("\n\n".join(documents))
    stream = [tok.bos_token_id] + tok("\n\n".join(load_documents(spec)), add_special_tokens=False)["input_ids"]
    s = "," + ",".join(map(str, stream)) + ","
    for w in a.tolist():
        assert "," + ",".join(map(str, w)) + "," in s


def test_calibration_windows_too_short(tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("Once upon a time.", encoding="utf-8")
    with pytest.raises(LosaZeroError, match="fewer than seqlen"):
        calibration_windows(tok, str(p), nsamples=2, seqlen=64)
    n = 1 + len(tok("Once upon a time.", add_special_tokens=False)["input_ids"])
    w = calibration_windows(tok, str(p), nsamples=3, seqlen=n - 1)  # exactly seqlen+1 tokens: one start
    assert w.shape == (3, n - 1) and (w[:, 0] == tok.bos_token_id).all()


def test_finetune_examples_text_truncation_and_order(tok, tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("Once upon a time there was a cat.\n\nThe dog ran.\n\nLily was happy.\n", encoding="utf-8")
    ex = finetune_examples(tok, str(p), max_length=8)
    assert len(ex) == 3
    for e in ex:
        assert e["input_ids"][0] == tok.bos_token_id and len(e["input_ids"]) <= 8
        assert e["labels"] == e["input_ids"]
    full = finetune_examples(tok, str(p), max_length=64)
    longest = max(full, key=lambda e: len(e["input_ids"]))
    assert len(longest["input_ids"]) > 8
    assert longest["input_ids"][:8] in [e["input_ids"] for e in ex]  # truncated: cut, no EOS appended
    assert all(e["input_ids"][-1] == tok.eos_token_id for e in full)
    assert {tok.decode(e["input_ids"], skip_special_tokens=True) for e in full} == {
        "Once upon a time there was a cat.", "The dog ran.", "Lily was happy."}
    assert finetune_examples(tok, str(p), 64, seed=3) == finetune_examples(tok, str(p), 64, seed=3)
    # limit beyond the data: cycle, each pass a full shuffled permutation
    seven = finetune_examples(tok, str(p), 64, limit=7, seed=0)
    assert len(seven) == 7
    first, second = seven[:3], seven[3:6]
    key = lambda e: tuple(e["input_ids"])  # noqa: E731
    assert sorted(map(key, first)) == sorted(map(key, second)) == sorted(map(key, full))
    assert len(finetune_examples(tok, str(p), 64, limit=2)) == 2


def test_finetune_examples_alpaca_label_masking(tok, tmp_path):
    p = tmp_path / "al.json"
    p.write_text(json.dumps(ALPACA_RECORDS), encoding="utf-8")
    masked = finetune_examples(tok, str(p), max_length=512, train_on_inputs=False, seed=0)
    unmasked = finetune_examples(tok, str(p), max_length=512, train_on_inputs=True, seed=0)
    assert len(masked) == 3
    for m, u in zip(masked, unmasked):
        assert m["input_ids"] == u["input_ids"] and u["labels"] == u["input_ids"]
        n_masked = sum(1 for x in m["labels"] if x == -100)
        assert m["labels"][:n_masked] == [-100] * n_masked  # a prefix only
        prompt = tok.decode(m["input_ids"][:n_masked], skip_special_tokens=True)
        answer = tok.decode(m["labels"][n_masked:], skip_special_tokens=True)
        assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
        assert answer in {"Red.", "The sum is 5.", "Hi there, friend."}
        assert m["labels"][-1] == tok.eos_token_id
    # prompt longer than max_length: nothing left to learn, so the example is dropped
    with pytest.raises(LosaZeroError, match="no usable fine-tuning examples"):
        finetune_examples(tok, str(p), max_length=10, train_on_inputs=False)


def test_collate_right_pads():
    batch = collate([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [1, 7]}],
                    pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [1, 7, -100]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_atomic_output_dir_success_and_refusal(tmp_path):
    out = tmp_path / "run"
    with atomic_output_dir(out) as tmp:
        assert tmp != out and tmp.parent == tmp_path and tmp.name == f"run.tmp-{os.getpid()}"
        (tmp / "f.txt").write_text("new")
        assert not out.exists()
    assert (out / "f.txt").read_text() == "new"
    ran = []
    with pytest.raises(LosaZeroError, match="already exists: choose another --out or pass --overwrite"):
        with atomic_output_dir(out):
            ran.append(1)
    assert not ran  # refused before any work
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "g.txt").write_text("newer")
    assert sorted(p.name for p in out.iterdir()) == ["g.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_output_dir_cleans_up_on_exception(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "partial.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-way")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True) as tmp:
            raise KeyboardInterrupt
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_write_json_atomic_and_peak_memory(tmp_path):
    p = write_json_atomic(tmp_path / "sub" / "m.json", {"b": 1, "a": [1.5, None]})
    assert p.read_text().startswith('{\n  "b": 1')  # indent 2, insertion order kept
    assert json.loads(p.read_text()) == {"b": 1, "a": [1.5, None]}
    write_json_atomic(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [q.name for q in p.parent.iterdir()] == ["m.json"]
    mem = peak_memory()
    assert mem["host_rss_bytes"] > 10 * 2**20
    assert mem["cuda_bytes"] is None or mem["cuda_bytes"] >= 0


# ----------------------------------------------------------------------------- big files

def test_big_files_are_never_tokenized_whole(tok, tmp_path, monkeypatch):
    """Past WHOLE_TEXT_CHARS a window starts at a random word of the text and only the text it
    needs is tokenized: every window is a run of tokens of one document onwards, the draw
    is seeded, and no call ever sees more than a window's worth of text."""
    import losa_zero.data as data

    docs = [f"Story {i}: Once upon a time there was a cat number {i}. It liked fish and milk." for i in range(400)]
    p = tmp_path / "big.txt"
    p.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    monkeypatch.setattr(data, "CHUNK_CHARS", 2000)
    monkeypatch.setattr(data, "WHOLE_TEXT_CHARS", 5000)
    pieces = list(data._text_chunks("text", p))
    assert len(pieces) > 10 and "".join(pieces) == "\n\n".join(docs)
    assert min(map(len, pieces)) >= 1000 and max(map(len, pieces)) <= 3000 + max(map(len, docs))
    seen = []
    real_encode = data._encode

    def spy(tokenizer, texts):
        seen.extend(len(t) for t in texts)
        return real_encode(tokenizer, texts)

    monkeypatch.setattr(data, "_encode", spy)
    got = calibration_windows(tok, str(p), nsamples=12, seqlen=40, seed=5)
    assert got.shape == (12, 40) and max(seen) <= 8 * 40 * 2
    assert torch.equal(got, calibration_windows(tok, str(p), nsamples=12, seqlen=40, seed=5))
    assert not torch.equal(got, calibration_windows(tok, str(p), nsamples=12, seqlen=40, seed=6))
    whole = "\n\n".join(docs)
    for row in got.tolist():
        assert tok.decode(row).strip() in whole                # a contiguous run of the text
    assert len({tuple(r) for r in got.tolist()}) > 6           # spread over the file


def test_files_up_to_the_threshold_are_tokenized_whole(tok, tmp_path, monkeypatch, data_dir):
    """Up to WHOLE_TEXT_CHARS (every fixture file, WikiText-2 included) the windows are those of
    the whole text tokenized at once (the reference protocol), however many pieces it is read in."""
    import losa_zero.data as data

    assert all(f.stat().st_size <= data.WHOLE_TEXT_CHARS for f in data_dir.rglob("*.txt"))
    docs = [f"Story {i}: a dog ran to the park and found a red ball near the tree." for i in range(200)]
    p = tmp_path / "mid.txt"
    p.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    whole = calibration_windows(tok, str(p), nsamples=6, seqlen=32, seed=3)
    monkeypatch.setattr(data, "CHUNK_CHARS", 1000)
    assert len(list(data._text_chunks(*parse_source(str(p))))) > 5
    assert torch.equal(calibration_windows(tok, str(p), nsamples=6, seqlen=32, seed=3), whole)


def test_finetune_examples_tokenize_only_what_is_used(tok, tmp_path, monkeypatch):
    import losa_zero.data as data

    docs = [f"Doc {i} is about a dog and a ball." for i in range(300)]
    p = tmp_path / "many.txt"
    p.write_text("\n\n".join(docs), encoding="utf-8")
    reference = finetune_examples(tok, str(p), 32, limit=7, seed=2)
    counted = []
    real_encode = data._encode
    monkeypatch.setattr(data, "_encode", lambda tk, texts: counted.append(len(texts)) or real_encode(tk, texts))
    got = finetune_examples(tok, str(p), 32, limit=7, seed=2)
    assert got == reference and sum(counted) <= 2 * 7      # prompts + texts of the 7 drawn documents only
    order = torch.randperm(300, generator=torch.Generator().manual_seed(2)).tolist()[:7]
    assert [tok.decode(e["input_ids"], skip_special_tokens=True) for e in got] == [docs[i] for i in order]


def test_record_errors_are_one_line(tok, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"},
                               {"instruction": "c", "input": {"x": 1}, "output": "d"}]), encoding="utf-8")
    with pytest.raises(LosaZeroError, match="non-text 'input' field") as e:
        finetune_examples(tok, str(bad), 64)
    assert "\n" not in str(e.value)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut\n', encoding="utf-8")
    with pytest.raises(LosaZeroError, match="cannot read line 2 of"):
        load_documents(str(broken))


def test_local_files_write_no_dataset_cache(tok, tmp_path, monkeypatch):
    """Local JSON data is parsed here, not by the datasets library (which writes an Arrow
    cache into the user's home for every file it reads)."""
    datasets = pytest.importorskip("datasets")

    def refuse(*args, **kwargs):
        raise AssertionError("datasets.load_dataset called for a local file")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    jl = _write_jsonl(tmp_path / "c.jsonl", [{"text": f"document {i}"} for i in range(20)])
    al = _write_jsonl(tmp_path / "al.jsonl", ALPACA_RECORDS)
    assert len(load_documents(str(jl))) == 20
    assert len(finetune_examples(tok, str(al), 64, limit=5)) == 5
