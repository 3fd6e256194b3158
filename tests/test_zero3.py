"""LoSA under DeepSpeed ZeRO-3 on CPU: 1 and 2 ranks (gloo) on the real stories260K model.

Every run is a real launch (``train/losa.py`` under torchrun, the deepspeed launcher, or
ranks spawned here in one process group) with one thread per rank, under a timeout. The
runs are short (5 LoSA steps at 70%, 16 fine-tuning samples per step, 32 at the last) so
the whole file stays within a few minutes on 2 cores.

What is checked:
- 2 ranks vs 1 rank: identical masks, ranks and rates, the same perplexity (the
  algorithm is the same code; statistics, Grams, gradients and the clipping norm are
  combined so the split does not change the numbers); mask bytes per rank halve;
- a SIGKILL of the whole run after step 2 then ``resume: auto``: the final model equals
  the uninterrupted run's bit for bit (8-bit paged AdamW, CPU offload config);
- a SIGKILL while a checkpoint is being written: the resume takes the previous complete
  one, also at another world size (2 -> 1 ranks); a mid-step checkpoint at another world
  size is refused at once with a one-line message saying what to do;
- a stop signal (SIGUSR1) on one rank: every rank checkpoints at the same optimizer step
  and exits 75 for a requeue; the resume ends with the uninterrupted model;
- the CPU-offload config runs to the end; the exported folder loads with plain
  transformers and has the sparsity summary.json states.

The equivalence test uses torch AdamW: 8-bit optimizers quantise their state in blocks of
each rank's flat partition, so the same gradients give slightly different updates at
different world sizes (this is a property of blockwise 8-bit states, not of the LoSA port).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zero3_helpers import REPO, base_env, launch, summary, write_config

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed

RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def zbase(stories_model_dir, tinystories_split, short_eval_txt, tmp_path_factory):
    _, train_txt = tinystories_split
    eval_txt = short_eval_txt  # the runs' perplexities are compared with each other only
    tmp = tmp_path_factory.mktemp("zero3")
    cfg = {
        "model": str(stories_model_dir), "calib": str(train_txt), "train": str(train_txt), "ppl": str(eval_txt),
        "sparsity": 0.7, "steps": 5, "nsamples": 32, "seqlen": 128, "cka_nsamples": 16, "calib_batch_size": 8,
        "samples_per_step": 16, "final_step_samples": 32, "max_length": 128, "batch_size": 8,
        "micro_batch_size": 4, "lr": 3.0e-3, "checkpoint_every": 1,
        "keep_checkpoints_after_export": True,  # the final checkpoints are compared (the usr1 test drops them)
        "deepspeed": str(REPO / "ds_configs" / "zero3_cpu_test.json"),
    }
    return {"tmp": tmp, "cfg": cfg}


def _config(zbase, name: str, **extra) -> tuple[Path, Path]:
    out = zbase["tmp"] / name
    cfg = dict(zbase["cfg"], out=str(out), **extra)
    return write_config(zbase["tmp"] / f"{name}.yaml", cfg), out


def _run_ok(run, timeout=RUN_TIMEOUT):
    rc = run.wait(timeout)
    assert rc == 0, f"run failed (exit {rc}); log tail:\n{run.text()[-6000:]}"
    return summary(run.out)


def _final_checkpoint(out: Path):
    from losa_zero.zero3.checkpoint import latest_complete

    info = latest_complete(Path(f"{out}.checkpoints"))
    assert info is not None and info.key == (5, 0)
    return info


def _full_state(info):
    """Every parameter (whole tensor, reassembled from the per-rank shards) and every mask."""
    from losa_zero.zero3.checkpoint import ShardReader

    frozen, train = ShardReader(info, "frozen"), ShardReader(info, "train")
    params = {n: (train if m["trainable"] else frozen).full(n) for n, m in info.meta["params"].items()}
    masks = {n: frozen.full_mask(n) for n in info.meta["masks"]}
    return params, masks


def _assert_same_model(info_a, info_b, tol=1e-6):
    pa, ma = _full_state(info_a)
    pb, mb = _full_state(info_b)
    assert pa.keys() == pb.keys() and ma.keys() == mb.keys()
    worst = max((pa[n].float() - pb[n].float()).abs().max().item() for n in pa)
    assert worst < tol, f"max abs difference {worst}"
    for n in ma:
        assert ma[n] is not None and torch.equal(ma[n], mb[n]), f"mask of {n} differs"
    return worst


def _layer_field(s: dict, field: str) -> list:
    return [layer[field] for step in s["steps"] for layer in step["layers"]]


@pytest.fixture(scope="module")
def adamw_runs(zbase):
    """The same LoSA run (torch AdamW) on 1 rank (one process, no launcher) and on 2 ranks (torchrun).

    LoRA dropout 0 here (and in the runs compared with these), so they train on the sparse
    LoRA's merged-weight path (a custom autograd Function holding the ZeRO-3 weight); the
    offload runs use the released dropout 0.1 and so the separate path."""
    cfg1, out1 = _config(zbase, "adamw_w1", optimizer="adamw", lora_dropout=0.0)
    s1 = _run_ok(launch(cfg1, [], 1, zbase["tmp"], zbase["tmp"] / "adamw_w1.log", out1, launcher="single"))
    cfg2, out2 = _config(zbase, "adamw_w2", optimizer="adamw", lora_dropout=0.0)
    s2 = _run_ok(launch(cfg2, [], 2, zbase["tmp"], zbase["tmp"] / "adamw_w2.log", out2, launcher="torchrun"))
    return {"w1": (s1, out1), "w2": (s2, out2), "cfg2": cfg2}


def test_two_ranks_match_one_rank(adamw_runs):
    (s1, out1), (s2, out2) = adamw_runs["w1"], adamw_runs["w2"]
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    assert _layer_field(s1, "rate") == _layer_field(s2, "rate")
    assert _layer_field(s1, "rank") == _layer_field(s2, "rank")
    assert [st["achieved_sparsity"] for st in s1["steps"]] == [st["achieved_sparsity"] for st in s2["steps"]]
    worst = _assert_same_model(_final_checkpoint(out1), _final_checkpoint(out2))
    p1, p2 = s1["perplexity"]["eval.txt"]["ppl"], s2["perplexity"]["eval.txt"]["ppl"]
    print(f"\nppl 1 rank {p1:.6f}, 2 ranks {p2:.6f}; max weight difference {worst}")
    assert abs(p1 - p2) / p1 < 1e-3
    assert s1["achieved_sparsity"] == pytest.approx(0.7, abs=0.01)


def test_mask_bytes_per_rank_halve(adamw_runs):
    (s1, _), (s2, _) = adamw_runs["w1"], adamw_runs["w2"]
    one, two = s1["mask_bytes_per_rank"], s2["mask_bytes_per_rank"]
    n_weights = sum(1 for _ in s1["per_linear_sparsity"])
    assert len(one) == 1 and len(two) == 2
    print(f"\nmask bytes per rank: 1 rank {one}, 2 ranks {two}")
    for b in two:
        assert abs(b / one[0] - 0.5) < 0.01 + 8 * n_weights / one[0]
    # and the bytes are bits: about numel / 8 in total
    assert len(s2["peak_memory_per_rank"]) == 2 and all(p["host_rss_bytes"] > 0 for p in s2["peak_memory_per_rank"])


def test_memory_by_phase_per_rank(adamw_runs):
    """Every rank records, at the end of every phase in time order, the peak RSS so far (never
    falling) and the current RSS (not above that peak, up to the kernel's per-thread batching
    of RSS counts); the last peak is within the run's overall peak."""
    phases = (["load", "data", "dense_targets", "prepare"]
              + [f"step{t}.{p}" for t in range(1, 6) for p in ("importance", "prune", "finetune")]
              + ["merge", "eval", "save"])
    for s, _ in (adamw_runs["w1"], adamw_runs["w2"]):
        by_rank = s["memory_by_phase_per_rank"]
        assert len(by_rank) == s["world_size"]
        for mem, overall in zip(by_rank, s["peak_memory_per_rank"]):
            assert list(mem) == phases
            peaks = [m["peak_rss_bytes"] for m in mem.values()]
            assert peaks[0] > 0 and peaks == sorted(peaks), peaks
            assert all(0 < m["rss_bytes"] <= m["peak_rss_bytes"] + 8 * 2**20 for m in mem.values()), mem
            assert peaks[-1] <= overall["host_rss_bytes"]


def test_export_loads_with_plain_transformers(adamw_runs):
    s2, out2 = adamw_runs["w2"]
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d = sys.argv[1]\n"
        "m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)\n"
        "tok = AutoTokenizer.from_pretrained(d)\n"
        "assert len(tok('Once upon a time')['input_ids']) > 1\n"
        "names = ('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj')\n"
        "z = t = 0\n"
        "for n, p in m.named_parameters():\n"
        "    if n.endswith('.weight') and n.split('.')[-2] in names:\n"
        "        z += int((p == 0).sum()); t += p.numel()\n"
        "assert 'losa_zero' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    out = m(torch.tensor([[1, 2, 3]])).logits\n"
        "assert torch.isfinite(out).all()\n"
        "print(json.dumps({'sparsity': z / t, 'type': type(m).__name__}))\n"
    )
    env = base_env(Path(out2).parent)
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", code, str(out2)], capture_output=True, text=True, env=env,
                         timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["type"] == "LlamaForCausalLM"
    assert got["sparsity"] == pytest.approx(s2["achieved_sparsity"], abs=1e-6)
    assert (out2 / "metrics.jsonl").is_file()
    lines = [json.loads(l) for l in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert {"losa_step", "opt_step", "loss", "lr", "tokens_per_s"} <= set(lines[0])
    assert len(lines) == sum(st["opt_steps"] for st in s2["steps"])


@pytest.fixture(scope="module")
def offload_run(zbase):
    """The CPU-offload config with the default optimizer (paged 8-bit AdamW), 2 ranks, deepspeed
    launcher, exported in the compressed-tensors format (``save_format: compressed``)."""
    cfg, out = _config(zbase, "offload", deepspeed=str(REPO / "ds_configs" / "zero3_offload_cpu.json"),
                       save_format="compressed")
    s = _run_ok(launch(cfg, [], 2, zbase["tmp"], zbase["tmp"] / "offload.log", out, launcher="deepspeed"))
    return s, out, cfg


def test_offload_config_runs_to_the_end(offload_run):
    s, out, _ = offload_run
    assert s["config"]["optimizer"] == "paged_adamw_8bit"
    # CPU optimizer offload with the 8-bit optimizer: bitsandbytes' CPU kernels really ran, no fallback
    assert s["optimizer"] == {"requested": "paged_adamw_8bit", "used": "paged_adamw_8bit", "fallback": None}
    assert s["achieved_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert len(s["steps"]) == 5 and math.isfinite(s["perplexity"]["eval.txt"]["ppl"])
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert s["export"]["format"] == "sparse-bitmask"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "sparse-bitmask"


def test_sigkill_after_step2_then_resume_auto_equals_uninterrupted(offload_run, zbase):
    """Paged 8-bit AdamW, CPU offload, 2 ranks: killed with SIGKILL (whole process group)
    right after the first checkpoint of step 3 (one optimizer step in), resumed with
    resume=auto: the same final model as the uninterrupted run, bit for bit. That run
    exported compressed and this one dense, so their exports also show the streamed
    compressed export of ZeRO-3 holding exactly the dense weights."""
    from losa_zero.modeling import load_model

    s_ref, out_ref, _ = offload_run
    cfg, out = _config(zbase, "killed", deepspeed=str(REPO / "ds_configs" / "zero3_offload_cpu.json"),
                       save_format="dense")
    run = launch(cfg, [], 2, zbase["tmp"], zbase["tmp"] / "killed.log", out, hold="saved:ckpt-002-000001")
    run.wait_for("test hold at saved ckpt-002-000001", RUN_TIMEOUT)
    run.kill()
    assert not out.exists()
    tmp = list(out.parent.glob("killed.tmp-*"))
    assert len(tmp) == 1 and Path(f"{out}.lock").is_file()  # what the SIGKILL left
    resumed = launch(cfg, ["resume=auto"], 2, zbase["tmp"], zbase["tmp"] / "killed_resume.log", out)
    s = _run_ok(resumed)
    assert "resumed from checkpoint" in resumed.text() and "ckpt-002-000001 (2 -> 2 ranks" in resumed.text()
    # the resumed run took over the dead run's lock and removed its temporary output (the
    # checkpoint folder is kept whole: keep_checkpoints_after_export)
    assert "took over the lock" in resumed.text() and f"removed {tmp[0]}" in resumed.text()
    assert not list(out.parent.glob("killed.tmp-*")) and not Path(f"{out}.lock").exists()
    assert (Path(f"{out}.checkpoints") / "dense_targets" / "manifest.json").is_file()
    assert s["resumed_from"] == ["ckpt-002-000001"]
    _assert_same_model(_final_checkpoint(out_ref), _final_checkpoint(out))
    assert s["perplexity"]["eval.txt"]["ppl"] == s_ref["perplexity"]["eval.txt"]["ppl"]
    # the metrics file has exactly one line per optimizer step (none duplicated by the replay)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == sum(st["opt_steps"] for st in s["steps"])
    compressed, _ = load_model(out_ref, dtype=torch.float32)
    dense, _ = load_model(out, dtype=torch.float32)
    a, b = compressed.state_dict(), dense.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_while_writing_checkpoint_resumes_from_previous(adamw_runs, zbase):
    """Killed while rank files of ckpt-002-000001 are on disk but its marker is not: the
    resume takes ckpt-002-000000, here at another world size (2 -> 1 ranks), and ends with
    the same model as the uninterrupted 2-rank run. A mid-step checkpoint cannot change
    world size: that is refused at once, saying what to do."""
    from losa_zero.zero3.checkpoint import MARKER, latest_complete, list_complete

    _, out_ref = adamw_runs["w2"]
    cfg, out = _config(zbase, "torn", optimizer="adamw", lora_dropout=0.0)
    run = launch(cfg, [], 2, zbase["tmp"], zbase["tmp"] / "torn.log", out, hold="save:ckpt-002-000001")
    run.wait_for("test hold at save ckpt-002-000001", RUN_TIMEOUT)
    run.kill()
    ckdir = Path(f"{out}.checkpoints")
    torn = ckdir / "ckpt-002-000001"
    assert (torn / "train.rank00000.pt").exists() and (torn / "train.rank00001.pt").exists()
    assert not (torn / MARKER).exists()
    assert latest_complete(ckdir).path.name == "ckpt-002-000000"

    mid = [c for c in list_complete(ckdir) if c.mid_step]
    assert mid, "expected a complete mid-step checkpoint to try at another world size"
    refused = launch(cfg, [f"resume={mid[-1].path}"], 1, zbase["tmp"], zbase["tmp"] / "torn_refused.log", out,
                     launcher="single")
    assert refused.wait(120) == 2
    err = [l for l in refused.text().splitlines() if l.startswith("losa-zero: error:")]
    assert len(err) == 1 and "relaunch with 2 ranks" in err[0], refused.text()[-3000:]

    resumed = launch(cfg, [], 1, zbase["tmp"], zbase["tmp"] / "torn_resume.log", out, launcher="single")
    s = _run_ok(resumed)
    assert "ckpt-002-000000 (2 -> 1 ranks" in resumed.text()
    assert s["world_size"] == 1 and s["resumed_from"] == ["ckpt-002-000000"]
    _assert_same_model(_final_checkpoint(out_ref), _final_checkpoint(out))


def test_sigusr1_on_one_rank_checkpoints_exits_75_and_resumes(adamw_runs, zbase):
    """A stop signal reaching one rank only: all ranks agree at the next optimizer step,
    write the checkpoint, leave PREEMPTED.json and exit 75 (requeue); resume=auto then ends
    with the uninterrupted model."""
    import os
    import signal

    _, out_ref = adamw_runs["w2"]
    cfg, out = _config(zbase, "usr1", optimizer="adamw", lora_dropout=0.0, checkpoint_every=0)
    run = launch(cfg, [], 2, zbase["tmp"], zbase["tmp"] / "usr1.log", out)
    run.wait_for("LoSA step 2/5", RUN_TIMEOUT)
    os.kill(run.procs[1].pid, signal.SIGUSR1)
    codes = [p.wait(120) for p in run.procs]
    assert codes == [75, 75], run.text()[-4000:]
    ckdir = Path(f"{out}.checkpoints")
    marker = json.loads((ckdir / "PREEMPTED.json").read_text())
    assert Path(marker["checkpoint"]).name.startswith("ckpt-002-")
    assert sorted(p.name for p in out.parent.glob("usr1.*")) == ["usr1.checkpoints", "usr1.log", "usr1.yaml"]  # no tmp, no lock
    resumed = launch(cfg, ["keep_checkpoints_after_export=false"], 2, zbase["tmp"], zbase["tmp"] / "usr1_resume.log",
                     out)
    s = _run_ok(resumed)
    assert s["resumed_from"] == [Path(marker["checkpoint"]).name]
    # after the export the checkpoint folder is gone (checkpoints, dense targets, metrics, marker)
    assert not ckdir.exists() and (out / "metrics.jsonl").is_file()
    a, b = _exported(out), _exported(out_ref)
    assert a.keys() == b.keys()
    worst = max((a[n].float() - b[n].float()).abs().max().item() for n in a)
    assert worst < 1e-6 and all(torch.equal(a[n] == 0, b[n] == 0) for n in a), worst


def test_checkpoints_share_no_file(adamw_runs):
    """Two checkpoints of the same weights (a mid-step one and the step end after it) each
    hold their own copy: a hard-linked file would be one damaged file for both."""
    _, out = adamw_runs["w2"]
    ckdir = Path(f"{out}.checkpoints")
    folders = sorted(p for p in ckdir.glob("ckpt-*") if p.is_dir())
    assert len(folders) >= 2, folders
    files = [f for p in folders for f in p.iterdir()]
    assert files and all(f.stat().st_nlink == 1 for f in files), [f for f in files if f.stat().st_nlink > 1]


def test_damaged_checkpoint_and_dense_targets_resume_from_previous(adamw_runs, zbase):
    """One byte changed in the newest checkpoint (same size) and in a dense-targets file:
    the resume warns naming both files, takes the previous checkpoint, computes the dense
    targets again, and ends with the uninterrupted model."""
    import shutil

    _, out_ref = adamw_runs["w2"]
    ckdir = zbase["tmp"] / "damaged.checkpoints"
    shutil.copytree(Path(f"{out_ref}.checkpoints"), ckdir)
    newest = ckdir / "ckpt-005-000000"
    previous = max(p.name for p in ckdir.glob("ckpt-004-*"))
    for f in (newest / "frozen.rank00001.pt", ckdir / "dense_targets" / "layer0002.rank00000.pt"):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    cfg, out = _config(zbase, "damaged", optimizer="adamw", lora_dropout=0.0, checkpoint_dir=str(ckdir))
    resumed = launch(cfg, [], 2, zbase["tmp"], zbase["tmp"] / "damaged.log", out)
    s = _run_ok(resumed)
    log = resumed.text()
    assert "ckpt-005-000000 is damaged (frozen.rank00001.pt: checksum mismatch" in log, log[-4000:]
    assert "layer0002.rank00000.pt is damaged" in log and "computing them again" in log
    assert s["resumed_from"] == [previous]
    _assert_same_model(_final_checkpoint(out_ref), _final_checkpoint(out))


def _exported(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    assert tensors, f"no exported weights in {out}"
    return tensors


NM_EXTRA = {"optimizer": "adamw", "lora_dropout": 0.0, "nm": "2:4", "sparsity": None, "allocation": "rmi",
            "pruner": "sparsegpt", "finetune_schedule": "continuous", "keep_checkpoints": 100}


@pytest.fixture(scope="module")
def nm_runs(zbase):
    """LoSA to a mixed N:4 (N per layer from RMI at step 1, SparseGPT, the default
    --nm-schedule) on 1 rank and on 2 ranks (torchrun), torch AdamW, dropout 0, one optimizer
    and learning-rate schedule over all steps (finetune_schedule continuous), every
    checkpoint kept."""
    cfg1, out1 = _config(zbase, "nm_w1", **NM_EXTRA)
    s1 = _run_ok(launch(cfg1, [], 1, zbase["tmp"], zbase["tmp"] / "nm_w1.log", out1, launcher="single"))
    cfg2, out2 = _config(zbase, "nm_w2", **NM_EXTRA)
    s2 = _run_ok(launch(cfg2, [], 2, zbase["tmp"], zbase["tmp"] / "nm_w2.log", out2, launcher="torchrun"))
    return {"w1": (s1, out1), "w2": (s2, out2)}


def test_nm_continuous_resumes_from_a_step_end_checkpoint(nm_runs, zbase):
    """finetune_schedule continuous: the optimizer goes on across steps, so the checkpoint
    after step 2 holds it; resumed from there (2 ranks) the run ends with the uninterrupted
    model, and a resume at another world size is refused at once, saying what to do."""
    import shutil

    from losa_zero.zero3.checkpoint import list_complete

    _, out_ref = nm_runs["w2"]
    src = Path(f"{out_ref}.checkpoints")
    step2 = [c for c in list_complete(src) if c.key == (2, 0)]
    assert step2 and step2[0].has_optimizer and not step2[0].mid_step
    cfg, out = _config(zbase, "nm_resumed", **NM_EXTRA)
    dst = Path(f"{out}.checkpoints")
    # the dense targets, metrics and only that checkpoint: the final one must be written again
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if d == str(src) and n.startswith("ckpt-")
                                                        and n != step2[0].path.name])
    ckpt = dst / step2[0].path.name
    refused = launch(cfg, [f"resume={ckpt}"], 1, zbase["tmp"], zbase["tmp"] / "nm_refused.log", out,
                     launcher="single")
    assert refused.wait(120) == 2
    err = [l for l in refused.text().splitlines() if l.startswith("losa-zero: error:")]
    assert len(err) == 1 and "after LoSA step 2 of a finetune_schedule: continuous run" in err[0], refused.text()[-3000:]
    assert "relaunch with 2 ranks" in err[0]
    resumed = launch(cfg, [f"resume={ckpt}"], 2, zbase["tmp"], zbase["tmp"] / "nm_resumed.log", out,
                     launcher="torchrun")
    s = _run_ok(resumed)
    assert s["resumed_from"] == [ckpt.name]
    _assert_same_model(_final_checkpoint(out_ref), _final_checkpoint(out), tol=1e-6)


def test_nm_two_ranks_match_one_rank_and_export_is_valid_nm(nm_runs):
    from transformers import AutoModelForCausalLM

    (s1, out1), (s2, out2) = nm_runs["w1"], nm_runs["w2"]
    assert s1["nm"] == s2["nm"] == "2:4" and s1["target_sparsity"] == 0.5
    assert _layer_field(s1, "nm") == _layer_field(s2, "nm")
    assert _layer_field(s1, "rate") == _layer_field(s2, "rate")
    assert _layer_field(s1, "rank") == _layer_field(s2, "rank")
    assert [st["achieved_sparsity"] for st in s1["steps"]] == [st["achieved_sparsity"] for st in s2["steps"]]
    # Identical masks; SparseGPT's weight update solves with the all-reduced Hessian, whose
    # float32 sum runs in another order on 2 ranks, so the weights agree to ~1e-5, not 1e-6.
    _assert_same_model(_final_checkpoint(out1), _final_checkpoint(out2), tol=1e-4)
    p1, p2 = s1["perplexity"]["eval.txt"]["ppl"], s2["perplexity"]["eval.txt"]["ppl"]
    assert abs(p1 - p2) / p1 < 1e-3
    ns = [int(row["nm"].split(":")[0]) for row in s2["per_layer"]]
    assert sum(ns) == 2 * len(ns) and len(set(ns)) > 1
    model = AutoModelForCausalLM.from_pretrained(out2, dtype=torch.float32)
    kept = total = 0
    for l, layer in enumerate(model.model.layers):
        for name, lin in layer.named_modules():
            if isinstance(lin, torch.nn.Linear):
                groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
                assert bool((groups == ns[l]).all()), (l, name)
                kept += int((lin.weight != 0).sum())
                total += lin.weight.numel()
    assert 1 - kept / total == 0.5 == s2["achieved_sparsity"]
