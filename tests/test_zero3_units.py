"""Fast single-process tests of the ZeRO-3 building blocks (no process group needed):
bit packing, work splitting, DeepSpeed config filling, run-config parsing, checkpoint
selection and re-sharding, exact clipping, optimizer reset, launcher detection, and the
sparse-LoRA mask-store protocol."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from losa_zero.errors import LosaZeroError
from losa_zero.zero3.bits import pack_bits, packed_size, unpack_bits
from losa_zero.zero3.partition import balance, split_range


# -- bits and splitting ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 1000, 4097])
def test_pack_unpack_roundtrip(n):
    g = torch.Generator().manual_seed(n)
    keep = torch.rand(n, generator=g) < 0.3
    packed = pack_bits(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n) == math.ceil(n / 8)
    assert torch.equal(unpack_bits(packed, n), keep)


def test_split_range_whole_batches_in_order():
    for n, world, unit in [(32, 2, 8), (30, 2, 8), (5, 4, 8), (128, 3, 8), (7, 1, 8), (0, 2, 8)]:
        ranges = [split_range(n, world, r, unit) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        for (a0, b0), (a1, b1) in zip(ranges, ranges[1:]):
            assert b0 == a1
        for a, b in ranges:
            assert a % unit == 0 and (b == n or b % unit == 0)


def test_balance_assigns_largest_first():
    sizes = [4096, 2048, 2048, 4096, 11008, 11008, 11008]
    owners = balance(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert max(load) - min(load) <= max(sizes)
    assert owners == balance(sizes, 2)  # deterministic
    assert balance(sizes, 1) == [0] * 7


# -- DeepSpeed config ---------------------------------------------------------------------------------
def _cfg(**kw):
    from types import SimpleNamespace

    base = dict(batch_size=8, micro_batch_size=4, max_grad_norm=0.3, dtype="float32")
    base.update(kw)
    return SimpleNamespace(**base)


def _ds(**zero):
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": dict({"stage": 3, "reduce_bucket_size": "auto"}, **zero)}


def test_fill_ds_config_autos():
    from losa_zero.zero3.ds_config import fill_ds_config

    ds = fill_ds_config(_ds(), _cfg(), world_size=2, hidden_size=64)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0  # losa-zero clips itself
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert ds["zero_allow_untested_optimizer"] and ds["zero_force_ds_cpu_optimizer"] is False
    assert fill_ds_config(_ds(), _cfg(), 1, 64)["gradient_accumulation_steps"] == 2
    many = fill_ds_config(_ds(), _cfg(micro_batch_size=1), 64, 64)  # more ranks than micro-batches
    assert many["gradient_accumulation_steps"] == 1 and many["train_batch_size"] == 64
    assert fill_ds_config(_ds(), _cfg(dtype="bfloat16"), 1, 64)["bf16"]["enabled"] is True


@pytest.mark.parametrize("ds,cfg,msg", [
    (dict(_ds(), optimizer={"type": "AdamW"}), _cfg(), "optimizer"),
    (dict(_ds(), train_micro_batch_size_per_gpu=2), _cfg(), "micro_batch_size"),
    (dict(_ds(), gradient_clipping=1.0), _cfg(), "max_grad_norm"),
    (_ds(), _cfg(dtype="float16"), "bfloat16"),
    (_ds(zero_quantized_nontrainable_weights=True), _cfg(), "quantised"),
    (_ds(zero_hpz_partition_size=8), _cfg(), "hpZ"),
    (_ds(offload_optimizer={"device": "nvme"}), _cfg(), "NVMe"),
    (dict(_ds(), bf16={"enabled": True}), _cfg(), "dtype"),
])
def test_fill_ds_config_refuses(ds, cfg, msg):
    from losa_zero.zero3.ds_config import fill_ds_config

    with pytest.raises(LosaZeroError, match=msg):
        fill_ds_config(ds, cfg, 2, 64)


def test_shipped_ds_configs_fill():
    from losa_zero.zero3.ds_config import fill_ds_config, load_ds_config, offloads_params

    root = Path(__file__).resolve().parents[1] / "ds_configs"
    names = sorted(p.name for p in root.glob("*.json"))
    assert names == ["zero3.json", "zero3_cpu_test.json", "zero3_offload_cpu.json", "zero3_offload_nvme.json"]
    for name in names:
        ds = fill_ds_config(load_ds_config(root / name), _cfg(dtype="bfloat16"), 8, 4096)
        assert ds["zero_optimization"]["stage"] == 3
    assert load_ds_config(root / "zero3_cpu_test.json")["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert offloads_params(load_ds_config(root / "zero3_offload_nvme.json")) == "nvme"
    assert offloads_params(load_ds_config(root / "zero3.json")) is None


# -- run config -----------------------------------------------------------------------------------------
def test_run_config_yaml_and_overrides(tmp_path, stories_model_dir):
    from losa_zero.train_command import build_run_config, parse_overrides

    assert parse_overrides(["steps=3", "lr=0.0002", "resume=auto", "gradient_checkpointing=true", "ppl=a.txt,b.txt"]) == {
        "steps": 3, "lr": 2e-4, "resume": "auto", "gradient_checkpointing": True, "ppl": "a.txt,b.txt"}
    f = tmp_path / "run.yaml"
    f.write_text(f"model: {stories_model_dir}\ncalib: x.txt\ntrain: x.txt\nsparsity: 0.7\nout: {tmp_path / 'o'}\n"
                 "deepspeed: ds_configs/zero3.json\nppl: [a.txt, b.txt]\n")
    cfg = build_run_config(str(f), ["steps=3", "checkpoint_every=50", "lr=2e-4"])
    assert cfg.lr == 2e-4 and cfg.steps == 3 and cfg.checkpoint_every == 50 and cfg.ppl == ["a.txt", "b.txt"]
    assert cfg.checkpoint_path == Path(f"{tmp_path / 'o'}.checkpoints")
    with pytest.raises(LosaZeroError, match="unknown option"):
        build_run_config(str(f), ["stepz=3"])
    with pytest.raises(LosaZeroError, match="key=value"):
        build_run_config(str(f), ["steps"])


# -- launcher detection -----------------------------------------------------------------------------------
def test_detect_launchers(monkeypatch):
    from losa_zero.zero3 import dist_env

    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert dist_env.detect(env) == (3, 8, 1, "torchrun/deepspeed")

    def no_scontrol(*a, **k):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(dist_env.subprocess, "run", no_scontrol)  # parse the node list ourselves
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-10],x1",
           "SLURM_JOB_ID": "123456"}
    assert dist_env.detect(env) == (5, 16, 1, "slurm")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "16" and env["LOCAL_RANK"] == "1"

    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    with pytest.raises(LosaZeroError, match="MASTER_ADDR"):
        dist_env.detect(env)
    env.update(MASTER_ADDR="n0", MASTER_PORT="29500")
    assert dist_env.detect(env) == (2, 4, 0, "mpi")
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    assert dist_env.detect(env) == (1, 2, 0, "mpi")
    env = {}
    assert dist_env.detect(env) == (0, 1, 0, "single") and env["MASTER_ADDR"] == "127.0.0.1"


# -- checkpoints ------------------------------------------------------------------------------------------
def _fake_checkpoint(root: Path, step: int, opt: int, world: int, complete=True, pending=False, fp=None):
    from losa_zero.outputs import write_json_atomic
    from losa_zero.zero3.checkpoint import FORMAT, MARKER, tag_of
    from losa_zero.zero3.integrity import file_record, save_atomic

    p = root / tag_of(step, opt)
    p.mkdir(parents=True)
    files = {}
    for r in range(world):
        files[f"train.rank{r:05d}.pt"] = save_atomic({"x": torch.arange(10 + r + step)}, p / f"train.rank{r:05d}.pt")
    meta = {"losa_state": {"pending": {"train": {"opt_step": opt}} if pending else None}, "fingerprint": fp or {}}
    files["meta.json"] = file_record(write_json_atomic(p / "meta.json", meta))
    if complete:
        write_json_atomic(p / MARKER, {"format": FORMAT, "key": [step, opt], "world_size": world, "files": files})
    return p


def test_checkpoint_selection_ignores_incomplete(tmp_path):
    from losa_zero.zero3.checkpoint import MARKER, latest_complete, list_complete

    assert latest_complete(tmp_path) is None
    _fake_checkpoint(tmp_path, 1, 0, 2)
    _fake_checkpoint(tmp_path, 2, 0, 2)
    _fake_checkpoint(tmp_path, 2, 3, 2, complete=False, pending=True)   # killed before its marker
    torn = _fake_checkpoint(tmp_path, 3, 0, 2)
    (torn / "train.rank00001.pt").write_bytes(b"short")                    # a file that does not match
    assert [c.key for c in list_complete(tmp_path)] == [(1, 0), (2, 0)]
    assert latest_complete(tmp_path).path.name == "ckpt-002-000000"
    (tmp_path / "ckpt-002-000000" / MARKER).write_text("{not json")
    assert latest_complete(tmp_path).path.name == "ckpt-001-000000"


def test_resume_refusals(tmp_path):

    from losa_zero.zero3.checkpoint import check_resumable, fingerprint, read_complete
    from losa_zero.zero3.config import ZeroRunConfig

    cfg = ZeroRunConfig(model=None, out="o", calib="c", train="t", sparsity=0.7)
    fp = fingerprint(cfg)
    _fake_checkpoint(tmp_path, 1, 0, 2, fp=fp)
    mid = read_complete(_fake_checkpoint(tmp_path, 1, 4, 2, pending=True, fp=fp))
    with pytest.raises(LosaZeroError, match=r"relaunch with 2 ranks, or resume from the last step-end checkpoint") as e:
        check_resumable(mid, cfg, world_size=4)
    assert "ckpt-001-000000" in str(e.value) and "\n" not in str(e.value)
    check_resumable(mid, cfg, world_size=2)
    step_end = read_complete(tmp_path / "ckpt-001-000000")
    check_resumable(step_end, cfg, world_size=4)  # step ends re-shard to any world size
    cfg.sparsity = 0.5
    with pytest.raises(LosaZeroError, match="sparsity=0.7"):
        check_resumable(step_end, cfg, world_size=2)
    cfg.sparsity, cfg.checkpoint_every, cfg.micro_batch_size = 0.7, 100, 2   # allowed to change
    check_resumable(step_end, cfg, world_size=2)


def test_shard_reader_reshards(tmp_path):
    """Shards written by 3 ranks are cut into 2 ranks' (and 1 rank's) slices by arithmetic."""
    from losa_zero.zero3.checkpoint import CheckpointInfo, ShardReader

    w = torch.randn(7, 11)
    keep = torch.rand(7, 11) < 0.4
    numel, old_world = w.numel(), 3
    old_part = math.ceil(numel / old_world)
    for q in range(old_world):
        flat = torch.zeros(old_part)
        bits = torch.zeros(old_part, dtype=torch.bool)
        a, b = q * old_part, min((q + 1) * old_part, numel)
        flat[:b - a] = w.view(-1)[a:b]
        bits[:b - a] = keep.view(-1)[a:b]
        torch.save({"frozen": {"w": flat}, "masks": {"w": pack_bits(bits)}}, tmp_path / f"frozen.rank{q:05d}.pt")
    info = CheckpointInfo(tmp_path, {"world_size": old_world, "key": [1, 0]},
                          {"params": {"w": {"numel": numel, "partition": old_part, "shape": [7, 11],
                                            "trainable": False}},
                           "masks": {"w": {"numel": numel, "partition": old_part, "shape": [7, 11], "dense": False}}})
    reader = ShardReader(info, "frozen")
    assert torch.equal(reader.full("w"), w)
    assert torch.equal(reader.full_mask("w"), keep)
    new_part = math.ceil(numel / 2)
    pieces = [reader.local("frozen", "w", numel, old_part, new_part, r) for r in range(2)]
    assert torch.equal(torch.cat(pieces)[:numel], w.view(-1))
    masks = [reader.local_mask("w", numel, old_part, new_part, r) for r in range(2)]
    assert torch.equal(torch.cat(masks)[:numel], keep.view(-1))


def test_truncate_metrics(tmp_path):
    from losa_zero.zero3.checkpoint import truncate_metrics

    p = tmp_path / "metrics.jsonl"
    rows = [{"losa_step": s, "opt_step": o} for s in (1, 2, 3) for o in (1, 2, 3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_metrics(p, (1, 2))  # step 1 done, 2 optimizer steps into step 2
    got = [(r["losa_step"], r["opt_step"]) for r in map(json.loads, p.read_text().splitlines())]
    assert got == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]


# -- optimizer ----------------------------------------------------------------------------------------------
def test_exact_clip_matches_torch_clip():
    from losa_zero.zero3.engine import ExactClipOptimizer

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(300))
    b = torch.nn.Parameter(a.detach().clone())
    grad = torch.randn(300) * 10
    ref = torch.optim.AdamW([a], lr=0.1)
    a.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([a], 0.3)
    ref.step()
    opt = ExactClipOptimizer(torch.optim.AdamW([b], lr=0.1), 0.3)
    b.grad = grad.clone()
    opt.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-7)
    assert opt.last_norm == pytest.approx(grad.norm().item(), rel=1e-6)
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_reset_equals_fresh_optimizer(name):
    from losa_zero.finetune import make_optimizer
    from losa_zero.zero3.engine import reset_optimizer_state

    torch.manual_seed(1)
    start = torch.randn(5000)
    grads = [torch.randn(5000) for _ in range(3)]
    p = torch.nn.Parameter(start.clone())
    opt = make_optimizer([p], name, 1e-2, 0.001)
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    reset_optimizer_state(opt)
    mid = p.detach().clone()
    p.grad = grads[2].clone()
    opt.step()
    q = torch.nn.Parameter(mid.clone())
    fresh = make_optimizer([q], name, 1e-2, 0.001)
    q.grad = grads[2].clone()
    fresh.step()
    assert torch.equal(p.detach(), q.detach())


# -- schedule and mask-store protocol --------------------------------------------------------------------
def test_linear_warmup_factor_matches_hf():
    from transformers import get_linear_schedule_with_warmup

    from losa_zero.finetune import linear_warmup_factor

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(13 * 0.3), 13)
    for step in range(13):
        assert opt.param_groups[0]["lr"] == pytest.approx(linear_warmup_factor(step, 13, 0.3), abs=0)
        opt.step()
        sched.step()


def test_mask_store_protocol_rebuilds_mask_in_backward():
    from losa_zero.lora import SparseLoRALinear
    from zero3_helpers import DictMaskStore

    torch.manual_seed(0)
    w = torch.randn(6, 5)
    keep = torch.rand(6, 5) < 0.5
    plain = SparseLoRALinear(torch.nn.Parameter(w * keep), None, 4, 2.0, rank=3, init_seed=1)
    stored = SparseLoRALinear(torch.nn.Parameter(w * keep), None, 4, 2.0, rank=3, init_seed=1)
    store = DictMaskStore()
    stored.mask_store = store
    plain.set_keep_mask(keep)
    stored.set_keep_mask(keep)
    for m in (plain, stored):
        with torch.no_grad():
            m.lora_B.copy_(torch.arange(24, dtype=torch.float32).view(6, 4) / 10)
    x = torch.randn(3, 5)
    y1, y2 = plain(x), stored(x)
    assert torch.equal(y1, y2)
    before = store.calls
    y1.sum().backward()
    y2.sum().backward()
    assert store.calls == before + 1  # the backward asked the store again instead of keeping the mask
    assert torch.equal(plain.lora_A.grad, stored.lora_A.grad) and torch.equal(plain.lora_B.grad, stored.lora_B.grad)
    assert torch.equal(stored.keep_mask(), keep) and stored._keep is None


class _Rank:
    """One rank of ``world`` seen alone: collectives are no-ops, and it records when it
    deleted what (the order matters: completion records first)."""

    def __init__(self, rank: int, world: int = 2):
        self.rank, self.world_size, self.barriers = rank, world, 0

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        self.barriers += 1


def _train_leftovers(root: Path):
    from losa_zero.zero3.dense_targets import write_activation

    for step in (1, 2):
        _fake_checkpoint(root, step, 0, 2)
    for r in range(2):
        for layer in range(2):
            write_activation(root / "dense_targets", layer, r, torch.zeros(2, 3))
    (root / "dense_targets" / "manifest.json").write_text("{}")
    (root / "metrics.jsonl").write_text("{}\n")
    (root / "PREEMPTED.json").write_text("{}")


def test_remove_after_export_deletes_what_only_a_resume_needs(tmp_path):
    from losa_zero.zero3.checkpoint import MARKER, remove_after_export

    root = tmp_path / "ck"
    _train_leftovers(root)
    # rank 1 alone: only its own per-rank files, nothing rank 0 owns, no completion record
    remove_after_export(root, _Rank(1))
    assert not list(root.rglob("*.rank00001.pt"))
    assert list(root.rglob("*.rank00000.pt")) and (root / "ckpt-001-000000" / MARKER).is_file()
    remove_after_export(root, _Rank(0))
    assert not root.exists()


def test_keep_checkpoints_after_export_keeps_the_folder(tmp_path):
    from types import SimpleNamespace

    from losa_zero.zero3.backend import ZeroBackend
    from losa_zero.zero3.checkpoint import list_complete

    root = tmp_path / "ck"
    _train_leftovers(root)
    before = sorted(str(p) for p in root.rglob("*"))
    backend = object.__new__(ZeroBackend)  # only what after_commit reads
    backend.cfg, backend.ckpt_dir, backend.runtime = SimpleNamespace(keep_checkpoints_after_export=True), root, _Rank(0)
    backend.after_commit()
    assert sorted(str(p) for p in root.rglob("*")) == before and len(list_complete(root)) == 2
    backend.cfg.keep_checkpoints_after_export = False
    backend.after_commit()
    assert not root.exists()


def test_remove_after_export_keeps_what_it_did_not_write(tmp_path):
    """checkpoint_dir may be a folder that holds other things: only the run's own files go."""
    from losa_zero.zero3.checkpoint import remove_after_export

    root = tmp_path / "results"
    _train_leftovers(root)
    (root / "notes.txt").write_text("mine")
    (root / "ckpt-old-run").mkdir()
    remove_after_export(root, _Rank(0, world=1))
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-old-run", "notes.txt"]


def test_remove_after_export_drops_completion_records_before_the_big_files(tmp_path, monkeypatch):
    """Killed half-way through the deletion, nothing may look resumable: rank 0 unlinks
    every COMPLETE.json and the dense-target manifest before any rank deletes shard files."""
    from pathlib import Path as P

    from losa_zero.zero3.checkpoint import remove_after_export

    root = tmp_path / "ck"
    _train_leftovers(root)
    order = []
    real_unlink = P.unlink

    def unlink(self, missing_ok=False):
        order.append(self.name)
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(P, "unlink", unlink)
    remove_after_export(root, _Rank(0, world=1))
    first_shard = next(i for i, n in enumerate(order) if n.endswith(".pt"))
    records = [i for i, n in enumerate(order) if n in ("COMPLETE.json", "manifest.json")]
    assert len(records) == 6 and max(records) < first_shard, order  # both names tried in the 3 folders
