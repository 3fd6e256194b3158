"""Crash-safe, verified, world-size-independent checkpoints of a ZeRO-3 LoSA run.

Layout of ``checkpoint_dir``::

    dense_targets/            LoSA's dense reconstruction targets D_l (dense_targets.py)
    metrics.jsonl             one line per optimizer step (truncated to the checkpoint on resume)
    ckpt-002-000000/          "2 LoSA steps done, 0 optimizer steps into step 3"
        frozen.rank00000.pt       this rank's shard of every frozen weight + its mask bits
        train.rank00000.pt        this rank's fp32 shard of every LoRA factor, optimizer state, RNG
        meta.json                 LoSA state (step, rates, ranks, importance, data position...),
                                  parameter layout, world size, config fingerprint
        COMPLETE.json             the marker: written atomically by rank 0 after every rank
                                  finished writing (barrier); lists every file with its size
                                  and checksum (integrity.py: computed while writing)

A checkpoint without a marker (a kill while it was written) is never picked; a resumed run
that reaches the same tag again deletes the stale folder first. ``resume: auto`` verifies
the newest complete checkpoint's checksums (all ranks, a share of the files each) and falls
back to the previous one, with a warning naming the damaged file, until one is intact; when
none is, the run stops (exit 2) unless ``resume: auto_or_fresh`` allows starting over.

These files are ours, not DeepSpeed's: the engine's own ``save_checkpoint`` (and its
checkpoint engine) is never used, because its layout is tied to the world size; every
shard goes through :func:`~losa_zero.zero3.integrity.save_atomic`.

World-size independence: a rank's shard of a parameter is the flat slice
[rank * P, (rank + 1) * P) of the tensor (P = DeepSpeed's partition size), and the mask
bits are stored with exactly the same slicing. Any other world size can therefore cut its
own slices out of the saved ones by arithmetic (:class:`ShardReader`), for weights (pruned,
SparseGPT-updated), masks and LoRA factors alike. What cannot be re-sliced is the state of
an 8-bit optimizer (its quantisation blocks follow the partition): a checkpoint taken in
the middle of a LoSA step's fine-tuning resumes only at the same world size, while every
step-end checkpoint (the optimizer restarts with each step anyway) resumes at any; with
``finetune_schedule: continuous`` the optimizer goes on across steps, so its step-end
checkpoints hold the optimizer too and resume at the same world size only.

Every checkpoint writes its own copy of the frozen shards, also when the weights did not
change since the previous one: two checkpoints sharing one (hard-linked) file would be one
damaged file away from both being lost, so keeping two gives redundancy only this way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import preemption
from ..errors import LosaZeroError
from ..losa import LosaState
from ..modeling import decoder_layers
from ..outputs import write_json_atomic
from .bits import unpack_bits
from .integrity import file_record, remove_shared, save_atomic, verify_shared
from .partition import is_zero_param

log = logging.getLogger("losa_zero")

FORMAT = 2
MARKER = "COMPLETE.json"
_TAG = re.compile(r"^ckpt-(\d{3,})-(\d{6,})$")

#: run-config keys that may change between a checkpoint and its resume (everything else
#: defines the computation and must match)
RESUME_MAY_CHANGE = {
    "out", "overwrite", "ppl", "eval_seqlen", "device", "deepspeed", "checkpoint_dir", "checkpoint_every",
    "keep_checkpoints", "keep_checkpoints_after_export", "resume", "export_shard_size", "dist_backend", "dist_timeout_minutes",
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

    @property
    def has_optimizer(self) -> bool:
        """Whether the checkpoint holds optimizer state (partitioned per rank): taken during a
        step's fine-tuning, or after any step with ``finetune_schedule: continuous``."""
        pending = self.meta["losa_state"].get("pending")
        return bool(self.meta.get("optimizer", pending is not None and pending["train"].get("opt_step", 0) > 0))


def examine(path: Path) -> tuple[CheckpointInfo | None, str | None]:
    """``(info, None)`` when ``path`` has a readable marker whose files all have their
    recorded sizes; ``(None, None)`` when it has no marker (incomplete: killed while
    writing); ``(None, why)`` when the marker is there but it or a file is not right
    (damaged). Sizes only: :func:`damaged_files` compares the checksums."""
    marker_path = path / MARKER
    if not marker_path.exists():
        return None, None
    try:
        marker = json.loads(marker_path.read_text())
        if marker.get("format") != FORMAT:
            return None, (f"{MARKER} has format {marker.get('format')!r}, this losa-zero reads {FORMAT} "
                          "(written by another version)")
        for name, record in marker["files"].items():
            try:
                size = (path / name).stat().st_size
            except OSError:
                return None, f"{name} is missing"
            if size != record["size"]:
                return None, f"{name} has {size} bytes, {record['size']} recorded"
        meta = json.loads((path / "meta.json").read_text())
        marker["key"], marker["world_size"]  # noqa: B018 - both must be present
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"{MARKER} or meta.json unreadable ({type(exc).__name__})"
    return CheckpointInfo(path, marker, meta), None


def read_complete(path: Path) -> CheckpointInfo | None:
    """The checkpoint at ``path`` if its marker is valid and every file it lists is there
    with its recorded size; None otherwise (incomplete or damaged)."""
    return examine(path)[0]


def damaged_files(info: CheckpointInfo, peers) -> dict[str, str]:
    """``{file: problem}`` of the files of ``info`` whose bytes differ from the checksums in
    its marker (collective: every rank hashes a share of the files)."""
    return verify_shared(info.path, info.marker["files"], peers)


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
    if (info.mid_step or info.has_optimizer) and info.world_size != world_size:
        earlier = [c for c in list_complete(info.path.parent)
                   if not c.mid_step and not c.has_optimizer and c.key < info.key]
        hint = (f"or resume from the last step-end checkpoint at {world_size} ranks with resume={earlier[-1].path}"
                if earlier else "or restart with resume=never")
        where = (f"in the middle of LoSA step {info.key[0] + 1}" if info.mid_step
                 else f"after LoSA step {info.key[0]} of a finetune_schedule: continuous run")
        raise LosaZeroError(
            f"checkpoint {info.path.name} was taken by {info.world_size} ranks {where} (its 8-bit optimizer state "
            f"is partitioned per rank): relaunch with {info.world_size} ranks, {hint}")


#: ``resume`` values that pick the newest intact checkpoint of ``checkpoint_dir``
AUTO = ("auto", "auto_or_fresh")


def _tags_newest_first(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders that have a marker (complete or damaged), newest first."""
    found = []
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            m = _TAG.match(p.name)
            if m and p.is_dir() and (p / MARKER).exists():
                found.append(((int(m.group(1)), int(m.group(2))), p))
    return [p for _, p in sorted(found, reverse=True)]


def _problems(path: Path, peers) -> tuple[CheckpointInfo | None, dict[str, str]]:
    """The checkpoint at ``path`` and its damaged files (``{}``: intact), agreed by all ranks."""
    info, why = examine(path)
    if info is None and why is None:
        why = "no marker"
    views = peers.all_gather_object(why if info is None else None)
    bad = [(r, w) for r, w in enumerate(views) if w]
    if bad:
        r, why = bad[0]
        if len(bad) < len(views):  # some ranks see it whole, others do not
            why += f" on rank {r} (checkpoint_dir must be on a filesystem shared by all ranks)"
        return None, {MARKER: why}
    return info, damaged_files(info, peers)


def resolve_resume(resume: str, ckpt_dir: Path, peers) -> CheckpointInfo | None:
    """The checkpoint this run continues from, verified, the same on every rank (collective).

    ``never``: none. A folder: that checkpoint, refused (exit 2) if incomplete or damaged.
    ``auto``: the newest intact one; each damaged one is skipped with a warning naming the
    file; none at all means a fresh start, but when every one is damaged the run stops
    (exit 2) rather than silently starting over. ``auto_or_fresh``: the same, except that
    it then starts over, with a warning. ``peers``: the runtime (its rank, world size and
    ``all_gather_object``)."""
    if resume == "never":
        return None
    if resume not in AUTO:
        path = Path(resume)
        info, damaged = _problems(path, peers)
        if info is None and damaged.get(MARKER) == "no marker":
            raise LosaZeroError(f"resume={resume} is not a complete checkpoint (no {MARKER}): "
                                f"pass a folder from {ckpt_dir}, or resume=auto")
        if damaged:
            name, why = next(iter(damaged.items()))
            raise LosaZeroError(f"checkpoint {path} is damaged: {name}: {why}; pass another checkpoint folder, "
                                "or resume=auto to take the newest intact one")
        return info
    # rank 0's view of the folder decides: a shared filesystem may show ranks different
    # listings for a moment, and they must not restore different checkpoints
    candidates = [Path(p) for p in peers.all_gather_object(
        [str(p) for p in _tags_newest_first(ckpt_dir)] if peers.is_main else None)[0]]
    bad = []
    for path in candidates:
        info, damaged = _problems(path, peers)
        if not damaged:
            return info
        name, why = next(iter(damaged.items()))
        bad.append(f"{path.name}/{name}: {why}")
        if peers.is_main:
            log.warning(f"checkpoint {path} is damaged ({name}: {why}"
                        + (f"; {len(damaged) - 1} more file(s)" if len(damaged) > 1 else "")
                        + "): trying the previous complete checkpoint")
    if not bad:
        return None
    if resume == "auto_or_fresh":
        if peers.is_main:
            log.warning(f"no intact checkpoint in {ckpt_dir} ({len(bad)} damaged): starting over "
                        "(resume=auto_or_fresh)")
        return None
    raise LosaZeroError(f"no intact checkpoint in {ckpt_dir}: {len(bad)} damaged, the newest {bad[0]}; "
                        "restore the files, or pass resume=auto_or_fresh to start over from the dense model")


def remove_after_export(ckpt_dir: Path, runtime) -> None:
    """Delete, once the output is committed, what only a resume needs: the dense targets
    (hundreds of GB at 70B), the checkpoints, PREEMPTED.json, metrics.jsonl and tensorboard/
    (both copied into the output), then ``ckpt_dir`` itself if nothing else is in it.
    Collective; only files this run writes are touched.

    Rank 0 first removes the completion records (COMPLETE.json, the dense targets'
    manifest), so a run killed half-way leaves nothing that looks resumable but lacks files;
    then every rank deletes its own per-rank files (the big ones, each rank its share, at the
    same time: no rank deletes while the others wait in a collective for something else);
    after a barrier rank 0 removes what is left (meta files, files of other world sizes)."""
    rt = runtime
    dirs = [ckpt_dir / "dense_targets"]
    if ckpt_dir.is_dir():
        dirs += sorted(p for p in ckpt_dir.iterdir() if _TAG.match(p.name) and p.is_dir() and not p.is_symlink())
    rt.barrier()
    if rt.is_main:
        for d in dirs:
            for record in (d / MARKER, d / "manifest.json"):
                record.unlink(missing_ok=True)
    rt.barrier()
    for d in dirs:
        for f in (d.glob(f"*.rank{rt.rank:05d}.pt") if d.is_dir() else ()):
            f.unlink(missing_ok=True)
    rt.barrier()
    if rt.is_main:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        for name in ("metrics.jsonl", preemption.MARKER):
            (ckpt_dir / name).unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir / "tensorboard", ignore_errors=True)
        with contextlib.suppress(OSError):
            ckpt_dir.rmdir()


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
            if preemption.should_stop(self.runtime):
                self._stop(path)
            return
        if kind != "opt_step":
            return
        progress = losa.state.pending["train"]
        k = progress["opt_step"]
        total = -(-losa.steps_examples(losa.state.step + 1) // self.cfg.batch_size)
        if k >= total:
            return  # the step-end checkpoint (and stop check) follows at once
        stop = preemption.should_stop(self.runtime)
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
        t0 = time.perf_counter()
        # a stale (incomplete, or superseded) folder of the same tag: every rank deletes a share
        remove_shared([path] if rt.is_main and path.exists() else [], rt)
        if rt.is_main:
            path.mkdir(parents=True)
        rt.barrier()
        model = losa.model
        files = {}
        frozen_name = f"frozen.rank{rt.rank:05d}.pt"
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
        with_optimizer = losa.optimizer_in_flight()
        if with_optimizer:
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
                "losa_state": dataclasses.asdict(state), "seconds": dict(losa.phases.seconds),
                "fingerprint": fingerprint(self.cfg),
                "params": {name: {"numel": int(p.ds_numel), "partition": int(p.partition_numel()),
                                  "shape": list(p.ds_shape), "dtype": str(p.dtype).replace("torch.", ""),
                                  "trainable": bool(p.requires_grad)}
                           for name, p in model.named_parameters() if is_zero_param(p)},
                "masks": rt.masks.layout(),
                "resumed_from": self.resumed_from,
                "optimizer": with_optimizer,
            }
            all_files["meta.json"] = file_record(write_json_atomic(path / "meta.json", meta))
            write_json_atomic(path / MARKER, {"format": FORMAT, "key": [state.step, opt_step],
                                              "world_size": rt.world_size, "files": all_files,
                                              "time": time.time()})
            _fsync_dir(path)
            _fsync_dir(self.dir)
        rt.barrier()
        self._prune_old()
        rt.info(f"checkpoint {tag} written ({time.perf_counter() - t0:.1f}s)")
        test_hold("saved", tag)
        return path

    def _prune_old(self) -> None:
        """Keep the newest ``keep`` complete checkpoints and the newest step-end one; drop
        incomplete folders older than the newest complete checkpoint, and what an earlier
        interrupted deletion left. Rank 0 decides; every rank deletes a share (collective)."""
        doomed = []
        done = list_complete(self.dir) if self.runtime.is_main else []
        if done:
            keep = {c.path for c in done[-max(1, self.keep):]}
            step_ends = [c for c in done if not c.mid_step]
            if step_ends:
                keep.add(step_ends[-1].path)
            newest = done[-1].key
            for p in self.dir.iterdir():
                m = _TAG.match(p.name)
                if p.name.startswith(".deleting-") and p.is_dir():
                    doomed.append(p)
                if not m or not p.is_dir() or p in keep:
                    continue
                if (int(m.group(1)), int(m.group(2))) > newest:
                    continue  # never touch anything newer than what is known to be complete
                doomed.append(p)
        remove_shared(doomed, self.runtime)

    def remove_all(self, keep_final: bool = False) -> None:
        """After a successful export: delete every checkpoint (or all but the newest complete
        one with ``keep_final``). Collective."""
        doomed = []
        if self.runtime.is_main and self.dir.is_dir():
            done = list_complete(self.dir)
            final = done[-1].path if done and keep_final else None
            doomed = [p for p in self.dir.iterdir()
                      if p.is_dir() and p != final and (_TAG.match(p.name) or p.name.startswith(".deleting-"))]
        remove_shared(doomed, self.runtime)

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
        if info.has_optimizer:
            self.trainer.load_optimizer_state(train.section(rt.rank, "optimizer"))
        rng = train.section(rt.rank, "rng") if info.world_size == rt.world_size else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        losa.state = LosaState(**state)
        for phase, seconds in info.meta.get("seconds", {}).items():  # the attempts before this one
            losa.phases.add(phase, seconds)
        pending = losa.state.pending
        ranks = pending["ranks"] if pending else (
            [l["rank"] for l in losa.state.history[-1]["layers"]] if losa.state.history else [0] * losa.n_layers)
        losa.set_ranks(ranks)
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
