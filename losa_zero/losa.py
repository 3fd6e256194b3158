"""LoSA, Algorithm 1 of the method doc (section 5): progressive pruning over T steps with
layer-wise rates from representation mutual information, sparse-LoRA adapters whose ranks
follow the reconstruction error, and fine-tuning between steps.

Every weight access goes through the :class:`~losa_zero.runtime.Runtime`, and every
statistic is a sum reduced across ranks, so this module is the same on one process and
under ZeRO-3.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .allocation import (ReconstructionError, allocate_ranks, band_delta, cubic_schedule, mean_rank_schedule,
                         rmi_importance, solve_layer_rates)
from .blockwise import Activations, capture_inputs, dense_layer_outputs, layer_input_grams, sequential_prune
from .config import LosaConfig
from .finetune import MetricsWriter, train_adapters
from .lora import SparseLoRALinear, unwrap_linear, wrap_linear
from .modeling import TARGET_LINEARS, decoder_layers, layer_linears
from .outputs import memory_now
from .pruners import SparsityTarget
from .runtime import Runtime


def attach_sparse_lora(model: nn.Module, max_rank: int, scale: float, dropout: float, seed: int) -> None:
    """Replace the 7 target linears of every decoder layer by SparseLoRALinear (rank 0).

    Each layer's A init uses its own seed derived from ``seed``, so the factors are the same
    whatever the number of ranks or the order modules are created in."""
    for l, layer in enumerate(decoder_layers(model)):
        for j, (name, lin) in enumerate(layer_linears(layer).items()):
            parent_name, child = name.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            setattr(parent, child, wrap_linear(lin, max_rank, scale, dropout, init_seed=seed * 100003 + l * 7 + j))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, SparseLoRALinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)


@torch.no_grad()
def merge_block_adapters(block: nn.Module, runtime: Runtime, rank_after: int = 0) -> None:
    """W <- W + s (B_r A_r) ⊙ M for every adapted linear of the block, then set the rank."""
    for lin in layer_linears(block).values():
        if isinstance(lin, SparseLoRALinear) and lin.rank > 0:
            runtime.write_linear(lin, runtime.read_weight(lin) + lin.delta_weight())
        if isinstance(lin, SparseLoRALinear):
            lin.set_rank(rank_after)


@torch.no_grad()
def unmerge_block_adapters(block: nn.Module, runtime: Runtime, rank: int) -> None:
    """W <- W_merged - s (B_r A_r) ⊙ M_new with the rank the layer will train at next
    (method doc section 5, step 4). Using the *new* rank keeps W_eff equal to the pruned
    merged weight exactly, also when the rank shrinks."""
    for lin in layer_linears(block).values():
        lin.set_rank(rank)
        if rank > 0:
            runtime.write_linear(lin, runtime.read_weight(lin) - lin.delta_weight())


@torch.no_grad()
def merge_and_unwrap(model: nn.Module, runtime: Runtime) -> None:
    """Merge the masked adapters for good and put plain nn.Linear modules back: the result is
    an ordinary sparse model with no adapter and no inference overhead."""
    for layer in decoder_layers(model):
        with runtime.gathered(layer):
            merge_block_adapters(layer, runtime)
            if not runtime.unwrap_after_merge:
                continue  # ZeRO-3: rank-0 adapted layers are plain linears already
            for name, lin in layer_linears(layer).items():
                if isinstance(lin, SparseLoRALinear):
                    parent_name, child = name.rsplit(".", 1)
                    setattr(layer.get_submodule(parent_name), child, unwrap_linear(lin))


@dataclass
class LosaState:
    """Everything that changes across steps (what a checkpoint has to hold)."""

    step: int = 0                                # last completed step
    data_position: int = 0                       # fine-tuning examples consumed
    history: list[dict] = field(default_factory=list)
    # The step in progress once it is pruned (rates, errors, ranks...) and its fine-tuning
    # position, so a checkpoint taken during fine-tuning resumes there; None between steps.
    pending: dict | None = None


class Losa:
    """Runs LoSA on a model whose target linears are (or will be) sparse-LoRA layers."""

    def __init__(self, model: nn.Module, cfg: LosaConfig, runtime: Runtime, calib_ids: torch.Tensor,
                 train_examples: list[dict], pad_id: int, metrics: MetricsWriter):
        self.model, self.cfg, self.runtime = model, cfg, runtime
        self.calib_ids = calib_ids
        self.train_examples = train_examples
        self.pad_id = pad_id
        self.metrics = metrics
        self.pruner = cfg.make_pruner(cfg.pruner)
        self.beta = cfg.beta if cfg.beta is not None else (1.0 if cfg.pruner == "wanda" else 100.0)
        self.thetas = cubic_schedule(cfg.sparsity, cfg.steps)
        self.mean_ranks = mean_rank_schedule(cfg.steps, cfg.rank_start, cfg.rank_end)
        self.n_layers = len(decoder_layers(model))
        self.state = LosaState()
        self.dense_targets: list[torch.Tensor] | None = None
        self.seconds: dict[str, float] = {}
        #: this process's memory (``outputs.memory_now``) at the end of each phase, in the order
        #: they end: dense_targets, step1.importance, step1.prune, step1.finetune, step2..., merge
        self.memory: dict[str, dict] = {}
        #: adapter trainer (None: a single-process LocalTrainer); the ZeRO-3 driver sets a DeepSpeed one
        self.trainer = None
        #: ``on_event(losa, kind)`` after "pruned", every "opt_step" and at "step_end" (checkpoints)
        self.on_event = None

    # -- helpers ----------------------------------------------------------------------------
    def _local_ids(self, n: int | None = None) -> torch.Tensor:
        n = self.calib_ids.shape[0] if n is None else min(n, self.calib_ids.shape[0])
        idx = self.runtime.local_indices(n)
        return self.calib_ids[idx]

    def _capture(self, n: int | None = None) -> Activations:
        return capture_inputs(self.model, self._local_ids(n), self.runtime, self.cfg.calib_batch_size)

    def _tick(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - t0
        self.memory[name] = memory_now()
        return now

    def steps_examples(self, t: int) -> int:
        return self.cfg.final_step_samples if t == self.cfg.steps else self.cfg.samples_per_step

    # -- phases -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Attach adapters and compute the dense reconstruction targets D_l once (section 4)."""
        t0 = time.perf_counter()
        self.model.eval()
        self.dense_targets = dense_layer_outputs(self.model, self._capture(), self.runtime, self.cfg.calib_batch_size)
        t0 = self._tick("dense_targets", t0)
        self.attach_adapters()

    def attach_adapters(self) -> None:
        """Sparse-LoRA factors at the maximum rank on the 7 linears of every layer (created
        once: rank changes are slices). Under ZeRO-3 they are partitioned as they are made."""
        with self.runtime.adapter_init():
            attach_sparse_lora(self.model, self.cfg.lora_max_rank, self.cfg.lora_scale, self.cfg.lora_dropout,
                               self.cfg.seed)

    def set_ranks(self, ranks: list[int]) -> None:
        """Active LoRA rank of every layer (restoring a checkpoint)."""
        for l, layer in enumerate(decoder_layers(self.model)):
            for lin in layer_linears(layer).values():
                if isinstance(lin, SparseLoRALinear):
                    lin.set_rank(int(ranks[l]))

    def _event(self, kind: str) -> None:
        if self.on_event is not None:
            self.on_event(self, kind)

    #: per-linear targets that override the layer rates in :meth:`prune_step` (BESA's
    #: learned per-row counts for the current step; None for the other allocations)
    step_targets: list[dict[str, SparsityTarget]] | None = None

    def importance(self, theta: float, delta: float) -> tuple[list[float], list[float] | None, list[float] | None]:
        """Layer rates for this step at mean target Θ^t: RMI (sections 2-3, the default),
        uniform, OWL (rates within Θ^t ± --owl-lambda from the outlier ratios, which are
        returned as the importance), or BESA. All are computed on the current model, whose
        effective weights are the merged ones.

        BESA learns per-row (or per-linear) pruned counts at Θ^t on the merged weights, block
        by block on its own masked chain, without writing any weight; :meth:`prune_step` then
        has the step's pruner prune every linear to exactly those counts (with Wanda: BESA's
        masks; with SparseGPT: BESA's counts, OBS's choice and update). The returned layer
        rates are BESA's realised ones, for the record."""
        self.step_targets = None
        alloc = self.cfg.allocation
        if alloc == "uniform":
            return [theta] * self.n_layers, None, None
        if alloc == "owl":
            from .owl import owl_outlier_ratios, owl_rates

            ratios = owl_outlier_ratios(self.model, self._capture(), self.runtime, self.cfg.calib_batch_size,
                                        self.cfg.owl_m)
            return owl_rates(ratios, theta, self.cfg.owl_lambda), ratios, None
        if alloc == "besa":
            from .besa import BesaOptions, besa_allocate

            besa = besa_allocate(self.model, self._capture(), self.runtime, theta, BesaOptions.from_config(self.cfg),
                                 self.cfg.calib_batch_size)
            self.step_targets = besa.targets
            return besa.layer_rates, None, None
        n = min(self.cfg.cka_nsamples, self.calib_ids.shape[0])
        grams = layer_input_grams(self.model, self._capture(n), self.runtime, self.cfg.calib_batch_size, n)
        importance, redundancy = rmi_importance(grams, self.beta)
        importance = [float(x) for x in importance]
        redundancy = [float(x) for x in redundancy]
        return solve_layer_rates(importance, theta, delta), importance, redundancy

    def prune_step(self, rates: list[float]) -> tuple[list, list[float]]:
        """Merge, prune each layer on the merged weight, and measure e_l (section 5, steps 1 and 3)."""
        errors = [0.0] * self.n_layers
        dense = self.dense_targets
        bs = self.cfg.calib_batch_size

        def before(l: int, block: nn.Module) -> None:
            merge_block_adapters(block, self.runtime, rank_after=0)

        def after(l: int, block: nn.Module, out: torch.Tensor) -> None:
            acc = ReconstructionError(out.shape[-1], device=self.runtime.device)
            for s in range(0, out.shape[0], bs):
                acc.add(dense[l][s:s + bs].to(self.runtime.device), out[s:s + bs].to(self.runtime.device))
            self.runtime.all_reduce_sum_(acc.tensors())
            errors[l] = acc.value()

        def targets(l: int) -> dict[str, SparsityTarget]:
            if self.step_targets is not None:  # BESA: per-row counts learned by importance()
                return self.step_targets[l]
            return {name: SparsityTarget.unstructured(rates[l]) for name in TARGET_LINEARS}

        results = sequential_prune(self.model, self._capture(), self.pruner, targets, self.runtime, bs,
                                   before_block=before, after_block=after, desc=f"prune step {self.state.step + 1}")
        return results, errors

    def allocate(self, errors: list[float], mean_rank: float) -> list[int]:
        """Per-layer ranks from the reconstruction errors (section 4) or uniform (ablation)."""
        basis = errors if self.cfg.rank_allocation == "error" else [1.0] * self.n_layers
        return [int(r) for r in allocate_ranks(basis, mean_rank, r_max=self.cfg.lora_max_rank)]

    def unmerge(self, ranks: list[int]) -> None:
        for l, layer in enumerate(decoder_layers(self.model)):
            with self.runtime.gathered(layer):
                unmerge_block_adapters(layer, self.runtime, ranks[l])

    def run_step(self) -> dict:
        """One iteration t of Algorithm 1; returns its record for the summary. A step restored
        from a checkpoint taken during its fine-tuning (``state.pending``) skips straight to
        the fine-tuning position it had reached: its pruning is in the restored weights."""
        t = self.state.step + 1
        cfg = self.cfg
        theta = self.thetas[t - 1]
        delta = cfg.delta if cfg.delta is not None else band_delta(theta)
        mean_rank = self.mean_ranks[t - 1]
        if self.state.pending is None:
            t0 = time.perf_counter()
            step_seconds: dict[str, float] = {}
            self.model.eval()
            rates, importance, redundancy = self.importance(theta, delta)
            now = time.perf_counter(); step_seconds["importance"] = now - t0; t0 = now
            self.memory[f"step{t}.importance"] = memory_now()
            results, errors = self.prune_step(rates)
            ranks = self.allocate(errors, mean_rank)
            self.unmerge(ranks)
            step_seconds["prune"] = time.perf_counter() - t0
            self.memory[f"step{t}.prune"] = memory_now()
            self.state.pending = {
                "step": t, "rates": list(rates), "importance": importance, "redundancy": redundancy,
                "errors": list(errors), "ranks": list(ranks),
                "pruned": [[sum(v[0] for v in r.pruned.values()), sum(v[1] for v in r.pruned.values())]
                           for r in results],
                "layer_sparsity": [r.sparsity for r in results], "seconds": step_seconds, "train": {},
            }
            self._event("pruned")
        p = self.state.pending
        rates, importance, redundancy, errors, ranks = (p["rates"], p["importance"], p["redundancy"], p["errors"],
                                                        p["ranks"])
        step_seconds = p["seconds"]
        k = self.steps_examples(t)
        examples = self.train_examples[self.state.data_position:self.state.data_position + k]
        train = train_adapters(
            self.model, examples, pad_id=self.pad_id, optimizer_name=cfg.optimizer, lr=cfg.lr,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, warmup_ratio=cfg.warmup_ratio,
            batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, runtime=self.runtime,
            metrics=self.metrics, losa_step=t, trainer=self.trainer, progress=p["train"],
            on_opt_step=lambda progress: self._event("opt_step"), seed=cfg.seed)
        self.model.eval()
        step_seconds["finetune"] = train["seconds"]
        self.memory[f"step{t}.finetune"] = memory_now()
        for key, value in step_seconds.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + value
        pruned = sum(c[0] for c in p["pruned"])
        total = sum(c[1] for c in p["pruned"])
        record = {
            "step": t, "target": theta, "delta": delta, "mean_rank": mean_rank,
            "achieved_sparsity": pruned / total,
            "layers": [
                {"layer": l, "rate": rates[l], "importance": None if importance is None else importance[l],
                 "redundancy": None if redundancy is None else redundancy[l], "error": errors[l],
                 "rank": ranks[l], "sparsity": p["layer_sparsity"][l]}
                for l in range(self.n_layers)
            ],
            "train_loss": train["train_loss"], "first_loss": train["first_loss"], "opt_steps": train["opt_steps"],
            "examples": train["examples"], "tokens_per_s": train["tokens_per_s"], "seconds": step_seconds,
        }
        self.state.history.append(record)
        self.state.step = t
        self.state.data_position += k
        self.state.pending = None
        self.runtime.info(
            f"LoSA step {t}/{cfg.steps}: target {theta:.4f} achieved {record['achieved_sparsity']:.4f} "
            f"mean rank {sum(ranks) / len(ranks):.2f} loss {train['first_loss']:.4f} -> {train['train_loss']:.4f} "
            f"({sum(step_seconds.values()):.1f}s)")
        self._event("step_end")
        return record

    def run(self) -> list[dict]:
        if self.dense_targets is None:
            self.prepare()
        while self.state.step < self.cfg.steps:
            self.run_step()
        self.dense_targets = None
        merge_and_unwrap(self.model, self.runtime)
        self.memory["merge"] = memory_now()
        return self.state.history
