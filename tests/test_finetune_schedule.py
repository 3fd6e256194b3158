"""``--finetune-schedule continuous``: the fine-tuning passes of the LoSA steps make one
optimizer run with one warmup/decay schedule. With nothing pruned in between, two continuous
passes must therefore train exactly like one pass over the same examples (the reference),
while the released per-step schedule (fresh optimizer and warmup at every step) does not."""
from __future__ import annotations

import json

import torch

from test_single_gpu_defaults import VOCAB, _adapted_llama

from losa_zero.finetune import LocalTrainer, MetricsWriter, linear_warmup_factor, train_adapters
from losa_zero.runtime import Runtime

LR = 1e-2


def _examples(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(1, VOCAB, (12,), generator=g).tolist()} for _ in range(n)]


def _passes(splits: list[int], mode: str, metrics_path):
    """Train a fresh model over ``splits`` consecutive passes; the adapters and the lr column."""
    model = _adapted_llama(0.0, False)
    trainer = LocalTrainer(model, "adamw", LR, 0.001, 0.3)
    metrics = MetricsWriter(metrics_path, tensorboard=False)
    data = _examples(sum(splits))
    opt_steps = [-(-k // 4) for k in splits]
    start = 0
    for t, k in enumerate(splits, start=1):
        continuous = mode == "continuous"
        schedule = (sum(opt_steps[:t - 1]), sum(opt_steps)) if continuous else None
        train_adapters(model, data[start:start + k], trainer, pad_id=0, lr=LR, warmup_ratio=0.3, batch_size=4,
                       micro_batch_size=2, runtime=Runtime("cpu"), metrics=metrics, losa_step=t, schedule=schedule,
                       fresh_optimizer=not (continuous and t > 1), keep_optimizer=continuous and t < len(splits))
        start += k
    lrs = [json.loads(line)["lr"] for line in metrics_path.read_text().splitlines()]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, lrs


def test_continuous_passes_train_like_one_pass(tmp_path):
    ref, ref_lrs = _passes([20], "per_step", tmp_path / "one.jsonl")
    cont, cont_lrs = _passes([8, 12], "continuous", tmp_path / "cont.jsonl")
    fresh, fresh_lrs = _passes([8, 12], "per_step", tmp_path / "fresh.jsonl")
    total = 5
    assert ref_lrs == cont_lrs == [LR * linear_warmup_factor(i, total, 0.3) for i in range(total)]
    assert fresh_lrs == [LR * linear_warmup_factor(i, 2, 0.3) for i in range(2)] + [
        LR * linear_warmup_factor(i, 3, 0.3) for i in range(3)]
    assert ref.keys() == cont.keys() and any("lora_A" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(cont[n], ref[n], rtol=0, atol=0)
    # the released per-step restarts (fresh AdamW moments, warmup again) train otherwise
    assert max((fresh[n] - ref[n]).abs().max().item() for n in ref) > 1e-4


def test_local_trainer_keeps_its_optimizer_only_when_asked():
    model = _adapted_llama(0.0, False)
    trainer = LocalTrainer(model, "adamw", LR, 0.0, 0.3)
    trainer.begin()
    first = trainer.optimizer
    trainer.end(keep_optimizer=True)
    trainer.begin(fresh=False)
    assert trainer.optimizer is first
    trainer.end()
    assert trainer.optimizer is None
    trainer.begin(fresh=False)  # nothing to continue: a new one
    assert trainer.optimizer is not None and trainer.optimizer is not first


def test_option_parses_and_rejects(stories_model_dir, tmp_path, capsys):
    from losa_zero.cli import main
    from losa_zero.config import LosaConfig, build_config

    base = {"model": str(stories_model_dir), "calib": "c.txt", "train": "t.txt", "out": str(tmp_path / "o"),
            "sparsity": 0.5}
    assert build_config(LosaConfig, base).finetune_schedule == "per_step"  # the released behaviour
    assert build_config(LosaConfig, base, {"finetune_schedule": "continuous"}).finetune_schedule == "continuous"
    out = tmp_path / "out"
    code = main(["losa", "--model", str(stories_model_dir), "--calib", "c.txt", "--train", "t.txt", "--out", str(out),
                 "--finetune-schedule", "once"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("losa-zero: error:") and "--finetune-schedule" in err[-1], err
    assert not out.exists()
