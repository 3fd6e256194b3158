"""Zero-shot evaluation through lm-eval on the local JSONL slices and the real stories260K.

What stories260K can and cannot show (measured, limit 50, dense model):

    task              acc  acc_norm      chance
    boolq          0.2000         -      0.5 (model answers "no"; 11 of the first 50 are "no")
    rte            0.5000         -      0.5
    hellaswag      0.2800    0.1600      0.25
    winogrande     0.5200         -      0.5
    arc_easy       0.2200    0.2000      0.25
    arc_challenge  0.2000    0.1800      0.25
    openbookqa     0.1600    0.3000      0.25
    piqa           0.4000    0.4200      0.5
    mean           0.3100                0.375

A 260K-parameter model with a 512-piece vocabulary, trained only on children's stories,
has no reading comprehension, world knowledge or science to draw on: no task is above
chance by even one binomial standard error (hellaswag's 0.28 vs 0.25 is 0.5 SE). So the
tests do not ask for above-chance accuracy. They check what the model does support: the
numbers are valid, deterministic and chance-level as a whole (the mean lies within four
standard errors of the mean chance rate), and, most importantly, that our in-memory
wrapper gives exactly the scores of lm-eval's own HFLM on the same model and data, which
validates tokenisation, batching and scoring independently of the model's quality.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from losa_zero.errors import LosaZeroError
from losa_zero.zeroshot import (
    LOCAL_TASKS,
    LosaZeroLM,
    evaluate_zeroshot,
    format_table,
    local_task_config,
)

CHANCE = {"boolq": 0.5, "rte": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "openbookqa": 0.25, "piqa": 0.5}
LIMIT = 50


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """stories260K's matrices are 64 wide: on a small CPU machine OpenMP's per-op fork/join
    costs more than the math (measured 0.1 s per batch on one thread, 0.2-1 s on two), so
    this module runs single-threaded and restores the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slices(data_dir):
    path = data_dir / "lm-eval-slices"
    if not (path / "piqa.jsonl").is_file():
        pytest.skip(f"zero-shot slices not found under {path}: set LOSA_ZERO_DATA to the shared/data folder")
    return path


@pytest.fixture(scope="module")
def dense(stories_model_dir):
    from losa_zero.modeling import load_model

    return load_model(stories_model_dir)


def _task(name, slices):
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=local_task_config(name, slices))


def test_local_tasks_rebuild_lm_eval_prompts(slices):
    """The YAML configs render lm-eval's prompts from the slices' schemas (no model)."""
    lines = {
        "boolq": 3270, "rte": 277, "hellaswag": 1000, "winogrande": 1267,
        "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838,
    }
    tasks = {n: _task(n, slices) for n in LOCAL_TASKS}
    for name, task in tasks.items():
        assert len(task.eval_docs) == lines[name], name

    # HellaSwag: identical to lm-eval's own Python preprocessing, on all 1000 items.
    from lm_eval.tasks.hellaswag.utils import preprocess

    hs = tasks["hellaswag"]
    for doc in hs.eval_docs:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        assert hs.doc_to_text(doc) == preprocess(doc["activity_label"] + ": " + ctx)
        assert hs.doc_to_choice(doc) == [preprocess(e) for e in doc["endings"]]
        assert hs.doc_to_target(doc) == doc["label"]

    doc = tasks["boolq"].eval_docs[0]
    text = tasks["boolq"].doc_to_text(doc)
    assert text.startswith("All biomass goes through") and text.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert tasks["boolq"].doc_to_choice(doc) == ["no", "yes"]

    rte = tasks["rte"]
    doc = rte.eval_docs[0]
    assert rte.doc_to_text(doc) == doc["premise"] + "\nQuestion: " + doc["hypothesis"] + " True or False?\nAnswer:"
    assert rte.doc_to_target(doc) == 1 and rte.doc_to_choice(doc) == ["True", "False"]  # not_entailment -> False

    for name in ("arc_easy", "arc_challenge", "piqa"):
        text = tasks[name].doc_to_text(tasks[name].eval_docs[0])
        assert text.startswith("Question: ") and text.endswith("\nAnswer:") and "\n\n" not in text, name

    wg = tasks["winogrande"]
    assert wg.multiple_input == 2  # lm-eval's partial scoring: one context per option
    doc = wg.eval_docs[0]
    assert wg.doc_to_choice(doc) == doc["context_options"] and wg.doc_to_target(doc) == "always got the easier cases."


@pytest.mark.slow
def test_all_tasks_deterministic_and_chance_level(dense, slices):
    model, tokenizer = dense
    first = evaluate_zeroshot(model, tokenizer, list(LOCAL_TASKS), data_dir=slices, limit=LIMIT)
    print("\n" + format_table(first))
    assert list(first["tasks"]) == list(LOCAL_TASKS) and first["limit"] == LIMIT
    for name, r in first["tasks"].items():
        assert 0.0 <= r["acc"] <= 1.0 and r["n"] == LIMIT, name
        has_norm = name in ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa")
        assert (r["acc_norm"] is not None) == has_norm, name
        if has_norm:
            assert 0.0 <= r["acc_norm"] <= 1.0
    assert first["mean_acc"] == pytest.approx(sum(r["acc"] for r in first["tasks"].values()) / len(LOCAL_TASKS))

    second = evaluate_zeroshot(model, tokenizer, list(LOCAL_TASKS), data_dir=slices, limit=LIMIT)
    assert second == first

    # Chance level as a whole (see the module docstring for why nothing is above it).
    chance = sum(CHANCE.values()) / len(CHANCE)
    se = math.sqrt(sum(p * (1 - p) / LIMIT for p in CHANCE.values())) / len(CHANCE)
    assert abs(first["mean_acc"] - chance) <= 4 * se, (first["mean_acc"], chance, se)


@pytest.mark.slow
def test_matches_lm_eval_hflm(stories_model_dir, dense, slices):
    """Same model directory through lm-eval's HFLM: identical accuracies, same log-likelihoods."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = dense
    reference = HFLM(pretrained=str(stories_model_dir), device="cpu", batch_size=8)
    tasks = ["arc_easy", "piqa"]
    theirs = evaluate_zeroshot(reference, None, tasks, data_dir=slices, limit=LIMIT)
    ours = evaluate_zeroshot(model, tokenizer, tasks, data_dir=slices, limit=LIMIT)
    print("\nlm-eval HFLM:\n" + format_table(theirs) + "\nLosaZeroLM:\n" + format_table(ours))
    for name in tasks:
        assert ours["tasks"][name] == theirs["tasks"][name], name

    # Request-level: context/continuation splitting (trailing space moved, empty context),
    # rolling windows longer than the 512-token context, and greedy generation.
    lm = LosaZeroLM(model, tokenizer, batch_size=3)
    pairs = [("Once upon a time", " there was"), ("", "Hello world"), ("Lily went to the park. ", "She saw a dog."),
             ("Tom had a red ball", ". He liked it")]
    reqs = [Instance("loglikelihood", {}, p, 0) for p in pairs]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs), reference.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    story = "Once upon a time there was a little girl named Lily. She liked to play outside. " * 30
    rolling = [Instance("loglikelihood_rolling", {}, (story,), 0)]
    assert lm.loglikelihood_rolling(rolling)[0] == pytest.approx(reference.loglikelihood_rolling(rolling)[0], rel=1e-5)
    gen = [Instance("generate_until", {}, ("Once upon a time", {"until": ["."], "max_gen_toks": 40}), 0)]
    assert lm.generate_until(gen) == reference.generate_until(gen) == [", there was a little girl named Lily"]


def test_errors_and_table(slices, tmp_path, monkeypatch):
    with pytest.raises(LosaZeroError, match="unknown zero-shot task 'no_such_task_xyz'"):
        evaluate_zeroshot(object(), object(), ["no_such_task_xyz"], data_dir=slices)
    with pytest.raises(LosaZeroError, match=r"piqa\.jsonl.*LOSA_ZERO_DATA"):
        evaluate_zeroshot(object(), object(), ["piqa"], data_dir=tmp_path)
    monkeypatch.delenv("LOSA_ZERO_DATA", raising=False)
    with pytest.raises(LosaZeroError, match="LOSA_ZERO_DATA"):
        local_task_config("boolq")
    monkeypatch.setenv("LOSA_ZERO_DATA", str(slices.parent))
    got = local_task_config("boolq")["dataset_kwargs"]["data_files"]["validation"]
    assert Path(got) == (slices / "boolq.jsonl").resolve()  # also when the data folder is reached by a symlink
    with pytest.raises(LosaZeroError, match="no zero-shot tasks"):
        evaluate_zeroshot(object(), object(), [], data_dir=slices)

    table = format_table({"tasks": {"boolq": {"acc": 0.6, "acc_norm": None, "n": 50},
                                    "arc_challenge": {"acc": 0.25, "acc_norm": 0.3, "n": 50}},
                          "mean_acc": 0.425, "limit": 50})
    lines = table.splitlines()
    assert lines[0].split() == ["task", "acc", "acc_norm", "n"]
    assert lines[2].split() == ["boolq", "0.6000", "-", "50"]
    assert lines[3].split() == ["arc_challenge", "0.2500", "0.3000", "50"]
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns
    assert "mean" in lines[-2] and "0.4250" in lines[-2]
