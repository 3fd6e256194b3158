"""LoSA to N:M: steps toward a pattern never prune past what the pattern allows, the last step
is an exact N:M pattern, and the merged model is valid N:M in every linear (2:4, mixed N per
layer, an explicit per-layer list); config errors are one line and exit 2."""
from __future__ import annotations

import json

import pytest

from losa_zero.allocation import cubic_schedule
from losa_zero.cli import main
from losa_zero.config import LosaConfig, PruneConfig, build_config, nm_sparsity
from losa_zero.errors import LosaZeroError
from losa_zero.nm import NMSteps, parse_nm
from losa_zero.pruners import SparsityTarget, satisfies_nm

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# -- step targets (the selection toward N:M is tested against a loop reference in test_pruners) --

def test_step_targets_per_schedule():
    rates = cubic_schedule(0.5, 5)
    capped = NMSteps("2:4", 3, 5, "capped")
    assert NMSteps("2:4", 3, 5).schedule == "patterns"
    assert [capped.target(t, (2, 4)) for t in range(1, 6)] == (
        [SparsityTarget.toward_nm(r, 2, 4) for r in rates[:-1]] + [SparsityTarget.nm_pattern(2, 4)])
    patterns = NMSteps("2:4", 3, 5, "patterns")
    assert [patterns.target(t, (2, 4)).nm for t in range(1, 6)] == [(3, 4), (2, 4), (2, 4), (2, 4), (2, 4)]
    # descend: one weight fewer per group each step, then the final pattern stays
    assert [NMSteps("2:4", 3, 2, "descend").target(t, (2, 4)).nm for t in (1, 2)] == [(3, 4), (2, 4)]
    descend = NMSteps("2:4", 3, 4, "descend")
    assert [descend.target(t, (2, 4)).nm for t in range(1, 5)] == [(3, 4), (2, 4), (2, 4), (2, 4)]
    assert [descend.target(t, (1, 4)).nm for t in range(1, 5)] == [(3, 4), (2, 4), (1, 4), (1, 4)]
    assert [descend.target(t, (3, 4)).nm for t in range(1, 5)] == [(3, 4)] * 4
    project = NMSteps("2:4", 3, 5, "project")
    assert [project.target(t, (2, 4)).describe() for t in (1, 5)] == [f"{100 * rates[0]:.2f}%", "2:4"]
    # a layer heading for 1:4 follows its own schedule toward 75%
    assert capped.target(2, (1, 4)).rate == pytest.approx(cubic_schedule(0.75, 5)[1])
    assert NMSteps("2:4", 1, 1).target(1, (2, 4)) == SparsityTarget.nm_pattern(2, 4)
    assert parse_nm("3:4,2:4,1:4", 3) == [(3, 4), (2, 4), (1, 4)] and nm_sparsity("3:4,2:4,1:4") == 0.5


# -- config -----------------------------------------------------------------------------------------

def test_config_nm_sets_sparsity_and_allocation(stories_model_dir, tmp_path):
    base = {"model": str(stories_model_dir), "calib": "x.txt", "train": "x.txt", "out": str(tmp_path / "o")}
    cfg = build_config(LosaConfig, base, {"nm": "2:4"})
    assert cfg.sparsity == 0.5 and cfg.allocation == "uniform" and cfg.nm_schedule == "patterns"
    assert build_config(LosaConfig, base, {"nm": "2:4", "sparsity": 0.5}).sparsity == 0.5
    assert build_config(LosaConfig, base, {"sparsity": 0.7}).allocation == "rmi"
    assert build_config(LosaConfig, base, {"nm": "2:4", "allocation": "owl"}).allocation == "owl"
    assert build_config(LosaConfig, base, {"nm": "3:4,2:4,1:4,2:4,2:4"}).sparsity == 0.5
    prune = {k: v for k, v in base.items() if k != "train"}
    with pytest.raises(LosaZeroError, match="prunes 0.75 of the weights but --sparsity is 0.5"):
        build_config(PruneConfig, prune, {"nm": "1:4", "sparsity": 0.5})


@pytest.mark.parametrize("extra, needle", [
    (["--nm", "2:4", "--sparsity", "0.7"], "--nm 2:4 prunes 0.5 of the weights but --sparsity is 0.7"),
    (["--nm", "2:4", "--allocation", "besa"], "does not apply to --nm"),
    (["--nm", "3:4,2:4,1:4,2:4,2:4", "--allocation", "rmi"], "one N:M per layer already"),
    (["--nm", "2:5x"], "not of the form N:M"),
    (["--nm", "4:8"], "divisible by 8"),
    (["--nm", "2:4,2:4"], "2 patterns for a model of 5 layers"),
    (["--nm", "2:4", "--nm-spread", "-1"], "--nm-spread must be >= 0"),
])
def test_losa_nm_errors(capsys, stories_model_dir, tinystories_split, tmp_path, extra, needle):
    _, train_txt = tinystories_split
    out = tmp_path / "out"
    code = main(["losa", "--model", str(stories_model_dir), "--calib", str(train_txt), "--train", str(train_txt),
                 "--nsamples", "4", "--seqlen", "64", "--samples-per-step", "8", "--final-step-samples", "8",
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("losa-zero: error:") and needle in err[-1], err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


# -- end to end on stories260K -------------------------------------------------------------------------

def _tiny(stories_model_dir, train_txt) -> list[str]:
    return ["--model", str(stories_model_dir), "--calib", str(train_txt), "--train", str(train_txt),
            "--nsamples", "8", "--seqlen", "128", "--cka-nsamples", "8", "--steps", "3", "--samples-per-step", "8",
            "--final-step-samples", "8", "--max-length", "128", "--lr", "3e-3", "--optimizer", "adamw"]


def nm_of_saved_model(out, patterns) -> float:
    """Assert every linear of the saved model keeps exactly N of every M (no weight of these
    models is exactly 0 before pruning) and return the sparsity."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    kept = total = 0
    for l, layer in enumerate(model.model.layers):
        n, m = patterns[l]
        for name in LINEARS:
            w = layer.get_submodule(name).weight
            groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
            assert bool((groups == n).all()), (l, name, n, m)
            kept += int((w != 0).sum())
            total += w.numel()
    return 1 - kept / total


def _layer_patterns(summary) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in row["nm"].split(":")) for row in summary["per_layer"]]


@pytest.fixture(scope="module")
def losa_2_4(stories_model_dir, tinystories_split, tmp_path_factory):
    eval_txt, train_txt = tinystories_split
    out = tmp_path_factory.mktemp("nm") / "losa24"
    assert main(["losa", *_tiny(stories_model_dir, train_txt), "--nm", "2:4", "--pruner", "sparsegpt", "--nm-schedule", "capped",
                 "--ppl", str(eval_txt), "--eval-seqlen", "512", "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def test_losa_2_4_every_linear_valid(losa_2_4):
    s = losa_2_4
    assert s["nm"] == "2:4" and s["allocation"] == "uniform" and s["target_sparsity"] == 0.5
    assert _layer_patterns(s) == [(2, 4)] * 5
    assert nm_of_saved_model(s["config"]["out"], _layer_patterns(s)) == 0.5 == s["achieved_sparsity"]
    assert all(v == 0.5 for v in s["per_linear_sparsity"].values())
    # the steps head for 50% along the cubic schedule and only ever prune more
    rates = cubic_schedule(0.5, 3)
    assert [st["nm_schedule"] for st in s["steps"]] == ["capped"] * 3
    assert [st["layers"][0]["step_target"] for st in s["steps"]] == [
        f"{100 * rates[0]:.2f}% toward 2:4", f"{100 * rates[1]:.2f}% toward 2:4", "2:4"]
    for l in range(5):
        seen = [st["layers"][l]["sparsity"] for st in s["steps"]]
        assert seen == sorted(seen) and seen[-1] == 0.5
        assert all(abs(st["layers"][l]["sparsity"] - st["layers"][l]["rate"]) < 0.002 for st in s["steps"])
    assert s["perplexity"]["eval.txt"]["ppl"] < 200


def test_report_on_an_nm_run(losa_2_4, tmp_path):
    assert main(["report", losa_2_4["config"]["out"], "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "(2:4)" in md and len(list((tmp_path / "rep").glob("*.png"))) >= 3


@pytest.mark.parametrize("allocation", ["owl", "rmi"])
def test_losa_mixed_n_per_layer(allocation, stories_model_dir, tinystories_split, tmp_path):
    _, train_txt = tinystories_split
    out = tmp_path / allocation
    assert main(["losa", *_tiny(stories_model_dir, train_txt), "--nm", "2:4", "--allocation", allocation,
                 "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    patterns = _layer_patterns(s)
    ns = [n for n, _ in patterns]
    assert sum(ns) == 10 and len(set(ns)) > 1 and all(1 <= n <= 3 for n in ns)
    assert nm_of_saved_model(out, patterns) == 0.5 == s["achieved_sparsity"]
    # N was chosen at step 1 from the importance, more important layers keeping more
    imp = [row["importance"] for row in s["steps"][0]["layers"]]
    assert all(ns[a] >= ns[b] for a in range(5) for b in range(5) if imp[a] > imp[b])
    assert [[row["nm"] for row in st["layers"]] for st in s["steps"]] == [[f"{n}:4" for n in ns]] * 3


def test_losa_explicit_per_layer_list(stories_model_dir, tinystories_split, tmp_path):
    _, train_txt = tinystories_split
    out = tmp_path / "list"
    assert main(["losa", *_tiny(stories_model_dir, train_txt), "--nm", "3:4,2:4,1:4,2:4,2:4", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert _layer_patterns(s) == [(3, 4), (2, 4), (1, 4), (2, 4), (2, 4)]
    assert nm_of_saved_model(out, _layer_patterns(s)) == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["patterns", "project"])
def test_other_schedules_end_valid(schedule, stories_model_dir, tinystories_split, tmp_path):
    """The default `patterns` and the measured alternative `project` also end valid 2:4;
    `project` ends sparser than 50% (groups over-pruned before the last step stay so),
    `patterns` exactly at 50%."""
    from transformers import AutoModelForCausalLM

    _, train_txt = tinystories_split
    out = tmp_path / schedule
    assert main(["losa", *_tiny(stories_model_dir, train_txt), "--nm", "2:4", "--nm-schedule", schedule,
                 "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        for name in LINEARS:
            assert satisfies_nm(layer.get_submodule(name).weight != 0, 2, 4), name
    if schedule == "patterns":
        assert s["achieved_sparsity"] == 0.5
        assert [st["layers"][0]["step_target"] for st in s["steps"]] == ["3:4", "2:4", "2:4"]
    else:
        assert s["achieved_sparsity"] > 0.5


def test_losa_2_4_descend_continuous(stories_model_dir, tinystories_split, tmp_path):
    """The measured best LoSA 2:4 recipe ("LoSA to 2:4" in the README): 3:4 then 2:4
    (--nm-schedule descend), uniform ranks, one optimizer and learning-rate schedule over both
    steps (--finetune-schedule continuous). Ends valid 2:4 in every linear; the learning rate
    of the whole run is one warmup/decay schedule across the steps."""
    from losa_zero.finetune import linear_warmup_factor

    _, train_txt = tinystories_split
    out = tmp_path / "descend"
    args = _tiny(stories_model_dir, train_txt)
    args[args.index("--steps") + 1] = "2"
    assert main(["losa", *args, "--nm", "2:4", "--pruner", "sparsegpt", "--nm-schedule", "descend",
                 "--finetune-schedule", "continuous", "--rank-allocation", "uniform", "--rank-start", "10",
                 "--batch-size", "4", "--micro-batch-size", "4", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [st["layers"][0]["step_target"] for st in s["steps"]] == ["3:4", "2:4"]
    assert [st["nm_schedule"] for st in s["steps"]] == ["descend"] * 2
    assert [row["rank"] for st in s["steps"] for row in st["layers"]] == [10] * 10
    assert [st["layers"][0]["sparsity"] for st in s["steps"]] == [0.25, 0.5]
    assert nm_of_saved_model(out, _layer_patterns(s)) == 0.5 == s["achieved_sparsity"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["losa_step"] for r in rows] == [1, 1, 2, 2]
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * linear_warmup_factor(i, 4, 0.3) for i in range(4)])
