"""Crash-safe, world-size-independent checkpoints of a ZeRO-3 LoSA run.

Layout of ``checkpoint_dir``::

    dense_targets/            LoSA's dense reconstruction targets D_l, written once
        layer0003.rank00001.pt    (this rank's calibration sequences of layer 3)
        manifest.json             which sequences each file holds; written last
    metrics.jsonl             one line per optimizer step (truncated to the checkpoint on resume)
    ckpt-002-000000/          "2 LoSA steps done, 0 optimizer steps into step 3"
        frozen.rank00000.pt       this rank's shard of every frozen weight + its mask bits
        train.rank00000.pt        this rank's fp32 shard of every LoRA factor, optimizer state, RNG
        meta.json                 LoSA state (step, rates, ranks, importance, data position...),
                                  parameter layout, world size, config fingerprint
        COMPLETE.json             the marker: written atomically by rank 0 after every rank
                                  finished writing (barrier); lists every file and its size

A checkpoint without a valid marker (a kill while it was written) is never picked; a
resumed run that reaches the same tag again deletes the stale folder first.

World-size independence: a rank's shard of a parameter is the flat slice
[rank * P, (rank + 1) * P) of the tensor (P = DeepSpeed's partition size), and the mask
bits are stored with exactly the same slicing. Any other world size can therefore cut its
own slices out of the saved ones by arithmetic (:class:`ShardReader`), for weights (pruned,
SparseGPT-updated), masks and LoRA factors alike. What cannot be re-sliced is the state of
an 8-bit optimizer (its quantisation blocks follow the partition): a checkpoint taken in
the middle of a LoSA step's fine-tuning resumes only at the same world size, while every
step-end checkpoint (the optimizer restarts with each step anyway) resumes at any.

Frozen weights and masks only change when a step prunes, so the checkpoints taken during
one step's fine-tuning (and at its end) hard-link the frozen files of the first one
instead of writing the model again: a periodic checkpoint costs the LoRA factors and the
optimizer state only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from ..errors import LosaZeroError
from ..outputs import write_json_atomic

from .. import preemption
from .partition import is_zero_param, split_range

FORMAT = 1
MARKER = "COMPLETE.json"
_TAG = re.compile(r"^ckpt-(\d{3,})-(\d{6,})$")

#: run-config keys that may change between a checkpoint and its resume (everything else
#: defines the computation and must match)
RESUME_MAY_CHANGE = {
    "out", "overwrite", "ppl", "eval_seqlen", "device", "deepspeed", "checkpoint_dir", "checkpoint_every",
    "keep_checkpoints", "resume", "export_shard_size", "dist_backend", "dist_timeout_minutes",
    "gradient_checkpointing",
    "micro_batch_size", "calib_batch_size", "eval_batch_size",
}


def tag_of(step: int, opt_step: int) -> str:
    return f"ckpt-{step:03d}-{opt_step:06d}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic(obj, path: Path) -> int:
    """torch.save to a temporary name, fsync, rename; returns the file size."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def test_hold(point: str, tag: str) -> None:
    """Fault-injection hook for the kill/resume tests: with LOSA_ZERO_TEST_HOLD=point:tag the
    process announces itself and waits here (to be SIGKILLed by the test)."""
    want = os.environ.get("LOSA_ZERO_TEST_HOLD")
    if want and want == f"{point}:{tag}":
        print(f"losa-zero: test hold at {point} {tag}", file=sys.stderr, flush=True)
        time.sleep(3600)


# -- finding checkpoints ------------------------------------------------------------------------
@dataclasses.dataclass
class CheckpointInfo:
    path: Path
    marker: dict
    meta: dict

    @property
    def key(self) -> tuple[int, int]:
        return tuple(self.marker["key"])

    @property
    def world_size(self) -> int:
        return int(self.marker["world_size"])

    @property
    def mid_step(self) -> bool:
        return self.meta["losa_state"].get("pending") is not None


def read_complete(path: Path) -> CheckpointInfo | None:
    """The checkpoint at ``path`` if its marker is valid and every file it lists is there
    with its recorded size; None otherwise (incomplete or damaged)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        if marker.get("format") != FORMAT:
            return None
        for name, size in marker["files"].items():
            if (path / name).stat().st_size != size:
                return None
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CheckpointInfo(path, marker, meta)


def list_complete(ckpt_dir: Path) -> list[CheckpointInfo]:
    out = []
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            if p.is_dir() and _TAG.match(p.name):
                info = read_complete(p)
                if info is not None:
                    out.append(info)
    return sorted(out, key=lambda c: c.key)


def latest_complete(ckpt_dir: Path) -> CheckpointInfo | None:
    done = list_complete(ckpt_dir)
    return done[-1] if done else None


def fingerprint(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in RESUME_MAY_CHANGE:
            continue
        v = getattr(cfg, f.name)
        if f.name == "model" and v:
            v = str(Path(v).resolve())
        out[f.name] = v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)
    return out


def check_resumable(info: CheckpointInfo, cfg, world_size: int) -> None:
    """Fail at once, in one line, when ``info`` cannot continue this run."""
    saved = info.meta.get("fingerprint", {})
    now = fingerprint(cfg)
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise LosaZeroError(
            f"checkpoint {info.path} was written with {k}={saved.get(k)!r} but this run has {k}={now.get(k)!r}: "
            "run with the checkpoint's settings, or choose a new checkpoint_dir (or resume=never)")
    if info.mid_step and info.world_size != world_size:
        earlier = [c for c in list_complete(info.path.parent) if not c.mid_step and c.key < info.key]
        hint = (f"or resume from the last step-end checkpoint at {world_size} ranks with resume={earlier[-1].path}"
                if earlier else "or restart with resume=never")
        raise LosaZeroError(
            f"checkpoint {info.path.name} was taken by {info.world_size} ranks in the middle of LoSA step "
            f"{info.key[0] + 1} (its 8-bit optimizer state is partitioned per rank): relaunch with "
            f"{info.world_size} ranks, {hint}")


def resolve_resume(resume: str, ckpt_dir: Path) -> CheckpointInfo | None:
    """``resume``: auto (newest complete checkpoint, if any), never, or a checkpoint folder."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_complete(ckpt_dir)
    info = read_complete(Path(resume))
    if info is None:
        raise LosaZeroError(f"resume={resume} is not a complete checkpoint (no valid {MARKER}): "
                            f"pass a folder from {ckpt_dir}, or resume=auto")
    return info


# -- dense targets --------------------------------------------------------------------------------
def write_activation(directory: Path, layer: int, rank: int, hidden: torch.Tensor) -> torch.Tensor:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"layer{layer:04d}.rank{rank:05d}.pt"
    save_atomic(hidden.detach().cpu().contiguous(), path)
    return torch.load(path, mmap=True, map_location="cpu", weights_only=True)


def write_activation_manifest(directory: Path, runtime, n_layers: int, n: int) -> None:
    runtime.barrier()
    if runtime.is_main:
        ranges = [list(split_range(n, runtime.world_size, r, runtime.calib_batch_size))
                  for r in range(runtime.world_size)]
        write_json_atomic(directory / "manifest.json", {
            "format": FORMAT, "n_layers": n_layers, "n": n, "world_size": runtime.world_size, "ranges": ranges})
    runtime.barrier()


def load_activations(directory: Path, runtime, n_layers: int, n: int) -> list[torch.Tensor]:
    """This rank's share of the saved dense targets, at any world size (memory-mapped)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        raise LosaZeroError(f"{directory} has no complete dense targets (manifest.json): restart with resume=never") from None
    if manifest["n"] != n or manifest["n_layers"] != n_layers:
        raise LosaZeroError(f"dense targets in {directory} are for {manifest['n']} sequences x {manifest['n_layers']} "
                            f"layers, this run has {n} x {n_layers}: restart with resume=never")
    a, b = split_range(n, runtime.world_size, runtime.rank, runtime.calib_batch_size)
    out = []
    for l in range(n_layers):
        pieces = []
        for q, (qa, qb) in enumerate(manifest["ranges"]):
            lo, hi = max(a, qa), min(b, qb)
            if lo < hi:
                t = torch.load(directory / f"layer{l:04d}.rank{q:05d}.pt", mmap=True, map_location="cpu",
                               weights_only=True)
                pieces.append(t[lo - qa:hi - qa])
        out.append(pieces[0] if len(pieces) == 1 else (torch.cat(pieces) if pieces else None))
    return out


# -- reading shards at any world size -------------------------------------------------------------
class ShardReader:
    """Cuts this rank's slices out of the per-rank files of a checkpoint (any world size)."""

    def __init__(self, info: CheckpointInfo, kind: str):
        self.info, self.kind = info, kind
        self.old_world = info.world_size
        self._files: dict[int, dict] = {}

    def _file(self, q: int) -> dict:
        f = self._files.get(q)
        if f is None:
            f = self._files[q] = torch.load(self.info.path / f"{self.kind}.rank{q:05d}.pt", mmap=True,
                                            map_location="cpu", weights_only=False)
        return f

    def local(self, section: str, name: str, numel: int, old_part: int, new_part: int, rank: int,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Flat elements [rank * new_part, (rank + 1) * new_part) of ``name`` (zero padded)."""
        start = rank * new_part
        end = min(start + new_part, numel)
        out = None
        for q in range(self.old_world):
            lo, hi = max(start, q * old_part), min(end, (q + 1) * old_part, numel)
            if lo >= hi:
                continue
            src = self._file(q)[section][name]
            if out is None:
                out = torch.zeros(new_part, dtype=dtype or src.dtype)
            out[lo - start:hi - start] = src[lo - q * old_part:hi - q * old_part]
        if out is None:
            out = torch.zeros(new_part, dtype=dtype or torch.float32)
        return out

    def local_mask(self, name: str, numel: int, old_part: int, new_part: int, rank: int) -> torch.Tensor | None:
        from .bits import unpack_bits

        start = rank * new_part
        end = min(start + new_part, numel)
        out = torch.zeros(new_part, dtype=torch.bool)
        for q in range(self.old_world):
            lo, hi = max(start, q * old_part), min(end, (q + 1) * old_part, numel)
            if lo >= hi:
                continue
            packed = self._file(q)["masks"][name]
            if packed is None:
                return None
            bits = unpack_bits(packed, old_part)
            out[lo - start:hi - start] = bits[lo - q * old_part:hi - q * old_part]
        return out

    def full(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (for tests and offline tools; one process)."""
        meta = self.info.meta["params"][name]
        section = "trainable" if meta["trainable"] else "frozen"
        flat = self.local(section, name, meta["numel"], meta["partition"], meta["numel"], 0)
        return flat.view(meta["shape"])

    def full_mask(self, name: str) -> torch.Tensor | None:
        meta = self.info.meta["masks"][name]
        if meta["dense"]:
            return None
        return self.local_mask(name, meta["numel"], meta["partition"], meta["numel"], 0).view(meta["shape"])

    def section(self, q: int, key: str):
        return self._file(q).get(key)


# -- the checkpointer ---------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Parameters gathered one group at a time: each decoder layer, then all the others
    (embeddings, final norm, untied head)."""
    from ..modeling import decoder_layers

    layers = decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    groups = [list(layer.parameters()) for layer in layers]
    rest = [p for p in model.parameters() if id(p) not in in_layers]
    if rest:
        groups.append(rest)
    return groups


def _on_nvme(p) -> bool:
    loc = getattr(getattr(p, "ds_tensor", None), "final_location", None)
    return loc is not None and "nvme" in str(loc).lower()


def frozen_shards(model: torch.nn.Module, runtime) -> dict[str, torch.Tensor]:
    """A CPU copy of this rank's shard of every frozen partitioned parameter. Shards that
    live on NVMe are cut out of the gathered parameter instead (slower, same bytes)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in param_groups(model):
        frozen = [p for p in group if is_zero_param(p) and not p.requires_grad]
        if any(_on_nvme(p) for p in frozen):
            with runtime.gathered_params(frozen):
                for p in frozen:
                    part = p.partition_numel()
                    start = runtime.rank * part
                    n = max(0, min(part, p.ds_numel - start))
                    shard = torch.zeros(part, dtype=p.dtype)
                    shard[:n] = p.data.view(-1)[start:start + n].cpu()
                    out[names[id(p)]] = shard
        else:
            for p in frozen:
                out[names[id(p)]] = p.ds_tensor.detach().cpu().clone()
    return out


class Checkpointer:
    """Writes checkpoints at LoSA events (``Losa.on_event``) and restores them."""

    def __init__(self, ckpt_dir: Path, runtime, trainer, cfg, every: int = 0, keep: int = 2):
        self.dir = Path(ckpt_dir)
        self.runtime, self.trainer, self.cfg = runtime, trainer, cfg
        self.every, self.keep = int(every), int(keep)
        self.last = None  # (weights version, checkpoint path) whose frozen files can be linked
        self.resumed_from: list[str] = []
        self._install_signal_handlers()

    # -- preemption ---------------------------------------------------------------------------------
    # Signals (SIGUSR1 before a time limit, SIGTERM before a preemption) go through
    # losa_zero.preemption: the handler only sets a flag; every rank all-reduces it (MAX) at
    # each optimizer step and at each LoSA step's end, so all stop at the same step; the stop
    # checkpoint is written, rank 0 leaves PREEMPTED.json beside it, and every rank exits 75
    # ("requeue me"; resume=auto continues).
    def _install_signal_handlers(self) -> None:
        preemption.install()

    def _stop_everywhere(self) -> bool:
        return preemption.should_stop(self.runtime)

    def _stop(self, path: Path) -> None:
        rt = self.runtime
        if rt.is_main:
            preemption.write_marker(self.dir, checkpoint=path)
        rt.barrier()
        msg = (f"losa-zero: stop requested by a signal: checkpoint {path.name} written; exiting with 75 "
               "(requeue, or relaunch with resume=auto to continue)")
        preemption.exit_for_requeue(msg if rt.is_main else None)

    # -- events ---------------------------------------------------------------------------------------
    def on_event(self, losa, kind: str) -> None:
        if kind == "step_end":
            path = self.save(losa)
            if self._stop_everywhere():
                self._stop(path)
            return
        if kind != "opt_step":
            return
        progress = losa.state.pending["train"]
        k = progress["opt_step"]
        total = -(-losa.steps_examples(losa.state.step + 1) // self.cfg.batch_size)
        if k >= total:
            return  # the step-end checkpoint (and stop check) follows at once
        stop = self._stop_everywhere()
        if stop or (self.every > 0 and k % self.every == 0):
            path = self.save(losa)
            if stop:
                self._stop(path)

    # -- saving ---------------------------------------------------------------------------------------
    def save(self, losa) -> Path:
        rt = self.runtime
        state = losa.state
        pending = state.pending
        opt_step = pending["train"].get("opt_step", 0) if pending else 0
        tag = tag_of(state.step, opt_step)
        path = self.dir / tag
        version = state.step + (1 if pending else 0)
        t0 = time.perf_counter()
        rt.barrier()
        if rt.is_main:
            if path.exists():  # a stale (incomplete, or superseded) folder of the same tag
                with contextlib.suppress(FileNotFoundError):
                    (path / MARKER).unlink()
                shutil.rmtree(path)
            path.mkdir(parents=True)
        rt.barrier()
        model = losa.model
        files = {}
        frozen_name = f"frozen.rank{rt.rank:05d}.pt"
        if self.last is not None and self.last[0] == version and (self.last[1] / frozen_name).exists():
            try:
                os.link(self.last[1] / frozen_name, path / frozen_name)
            except OSError:
                shutil.copyfile(self.last[1] / frozen_name, path / frozen_name)
            files[frozen_name] = (path / frozen_name).stat().st_size
        else:
            frozen = frozen_shards(model, rt)
            files[frozen_name] = save_atomic({"frozen": frozen, "masks": rt.masks.local_state()}, path / frozen_name)
            del frozen
        train_name = f"train.rank{rt.rank:05d}.pt"
        train = {"trainable": {}, "optimizer": None,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
        for name, p in model.named_parameters():
            if is_zero_param(p) and p.requires_grad:
                train["trainable"][name] = self.trainer.local_fp32(p)
        if pending is not None and opt_step > 0:
            train["optimizer"] = self.trainer.optimizer_state()
        files[train_name] = save_atomic(train, path / train_name)
        del train
        everyone = rt.all_gather_object(files)
        test_hold("save", tag)
        rt.barrier()
        if rt.is_main:
            all_files = {k: v for d in everyone for k, v in d.items()}
            meta = {
                "format": FORMAT, "tag": tag, "world_size": rt.world_size, "key": [state.step, opt_step],
                "weights_version": version,
                "losa_state": dataclasses.asdict(state), "seconds": dict(losa.phases.seconds),
                "fingerprint": fingerprint(self.cfg),
                "params": {name: {"numel": int(p.ds_numel), "partition": int(p.partition_numel()),
                                  "shape": list(p.ds_shape), "dtype": str(p.dtype).replace("torch.", ""),
                                  "trainable": bool(p.requires_grad)}
                           for name, p in model.named_parameters() if is_zero_param(p)},
                "masks": rt.masks.layout(),
                "resumed_from": self.resumed_from,
            }
            all_files["meta.json"] = write_json_atomic(path / "meta.json", meta).stat().st_size
            write_json_atomic(path / MARKER, {"format": FORMAT, "key": [state.step, opt_step],
                                              "world_size": rt.world_size, "files": all_files,
                                              "time": time.time()})
            _fsync_dir(path)
            _fsync_dir(self.dir)
        rt.barrier()
        self.last = (version, path)
        if rt.is_main:
            self._prune_old()
        rt.info(f"checkpoint {tag} written ({time.perf_counter() - t0:.1f}s)")
        test_hold("saved", tag)
        return path

    def _prune_old(self) -> None:
        """Keep the newest ``keep`` complete checkpoints and the newest step-end one; drop
        incomplete folders older than the newest complete checkpoint."""
        done = list_complete(self.dir)
        if not done:
            return
        keep = {c.path for c in done[-max(1, self.keep):]}
        step_ends = [c for c in done if not c.mid_step]
        if step_ends:
            keep.add(step_ends[-1].path)
        newest = done[-1].key
        for p in self.dir.iterdir():
            m = _TAG.match(p.name)
            if not m or not p.is_dir() or p in keep:
                continue
            if (int(m.group(1)), int(m.group(2))) > newest:
                continue  # never touch anything newer than what is known to be complete
            with contextlib.suppress(FileNotFoundError):
                (p / MARKER).unlink()
            shutil.rmtree(p, ignore_errors=True)

    # -- restoring ------------------------------------------------------------------------------------
    def load(self, info: CheckpointInfo, losa) -> None:
        """Restore weights, masks, LoRA factors (and, mid-step at the same world size, the
        optimizer) from ``info`` at this run's world size, then the LoSA state."""
        rt = self.runtime
        model = losa.model
        t0 = time.perf_counter()
        frozen = ShardReader(info, "frozen")
        train = ShardReader(info, "train")
        layout = info.meta["params"]
        names = {id(p): n for n, p in model.named_parameters()}
        for params in param_groups(model):
            with rt.gathered_params(params):
                for p in params:
                    if not is_zero_param(p):
                        continue
                    name = names[id(p)]
                    if name not in layout:
                        raise LosaZeroError(f"checkpoint {info.path} has no parameter {name}: it is from another model")
                    old = layout[name]
                    if old["numel"] != p.ds_numel:
                        raise LosaZeroError(f"checkpoint {info.path}: {name} has {old['numel']} elements, "
                                            f"the model {p.ds_numel}: it is from another model")
                    section = "trainable" if p.requires_grad else "frozen"
                    reader = train if p.requires_grad else frozen
                    part = p.partition_numel()
                    local = reader.local(section, name, p.ds_numel, old["partition"], part, rt.rank)
                    start = rt.rank * part
                    n = max(0, min(part, p.ds_numel - start))
                    flat = p.data.view(-1)
                    if n:
                        flat[start:start + n].copy_(local[:n].to(device=flat.device, dtype=flat.dtype))
                    rt.mark_modified(p)
                    if p.requires_grad:
                        self.trainer.set_local_fp32(p, local)
        for name, entry in info.meta["masks"].items():
            part = rt.masks.partition_size(name)
            bits = None if entry["dense"] else frozen.local_mask(name, entry["numel"], entry["partition"], part,
                                                                 rt.rank)
            rt.masks.load_local_bits(name, bits)
        state = info.meta["losa_state"]
        if info.mid_step and state["pending"]["train"].get("opt_step", 0) > 0:
            self.trainer.load_optimizer_state(train.section(rt.rank, "optimizer"))
        rng = train.section(rt.rank, "rng") if info.world_size == rt.world_size else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        from ..losa import LosaState

        losa.state = LosaState(**state)
        for phase, seconds in info.meta.get("seconds", {}).items():  # the attempts before this one
            losa.phases.add(phase, seconds)
        pending = losa.state.pending
        ranks = pending["ranks"] if pending else (
            [l["rank"] for l in losa.state.history[-1]["layers"]] if losa.state.history else [0] * losa.n_layers)
        losa.set_ranks(ranks)
        version = info.meta.get("weights_version")
        self.last = (version, info.path) if info.world_size == rt.world_size else None
        self.resumed_from = list(info.meta.get("resumed_from", [])) + [info.path.name]
        rt.barrier()
        rt.info(f"resumed from checkpoint {info.path} ({info.world_size} -> {rt.world_size} ranks, "
                f"{time.perf_counter() - t0:.1f}s)")


def truncate_metrics(path: Path, key: tuple[int, int]) -> None:
    """Drop metric lines written after the checkpoint ``key`` = (steps done, opt steps into the next)."""
    if not path.is_file():
        return
    step, opt = key
    keep = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        s, o = int(r.get("losa_step", 0)), int(r.get("opt_step", 0))
        if s <= step or (s == step + 1 and o <= opt):
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)
