"""LoSA, Algorithm 1 (docs/method.md section 5): progressive pruning over T steps with
layer-wise rates from representation mutual information, sparse-LoRA adapters whose ranks
follow the reconstruction error, and fine-tuning between steps.

Every weight access goes through the :class:`~losa_zero.runtime.Runtime`, and every
statistic is a sum reduced across ranks, so this module is the same on one process and
under ZeRO-3.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .allocation import ReconstructionError, allocate_ranks, band_delta, cubic_schedule, mean_rank_schedule
from .allocators import Allocation, get_allocator
from .blockwise import CalibrationInputs, dense_layer_outputs, sequential_prune
from .config import LosaConfig
from .errors import LosaZeroError
from .finetune import MetricsWriter, train_adapters
from .lora import SparseLoRALinear, unwrap_linear, wrap_linear
from .modeling import decoder_layers, layer_linears, target_names
from .nm import NMSteps, check_nm_fits
from .outputs import PhaseRecorder
from .pruners import SparsityTarget
from .runtime import Runtime


def adapter_seed(seed: int, layer: int, position: int, per_layer: int) -> int:
    """The init seed of the adapter of the ``position``-th target linear of ``layer``: a
    function of the run seed and where the linear sits in the model only, so it does not
    depend on the world size or on how modules are created; distinct for every linear."""
    return seed * 100003 + layer * per_layer + position


def attach_sparse_lora(model: nn.Module, max_rank: int, scale: float, dropout: float, seed: int) -> None:
    """Replace the target linears of every decoder layer by SparseLoRALinear (rank 0).

    Each linear's A init uses its own seed (:func:`adapter_seed`), so the factors are the
    same whatever the number of ranks or the order modules are created in."""
    per_layer = len(target_names(model))
    for l, layer in enumerate(decoder_layers(model)):
        for j, (name, lin) in enumerate(layer_linears(layer).items()):
            parent_name, child = name.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            init_seed = adapter_seed(seed, l, j, per_layer)
            setattr(parent, child, wrap_linear(lin, max_rank, scale, dropout, init_seed=init_seed))
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
            merged = runtime.read_weight(lin) + lin.delta_weight()
            if not bool(torch.isfinite(merged).all()):  # the same full weight on every rank
                raise LosaZeroError("fine-tuning made the weights overflow (a merged weight is not finite): "
                                    "the learning rate is too large for this model; lower --lr (run config: lr)")
            runtime.write_linear(lin, merged)
        if isinstance(lin, SparseLoRALinear):
            lin.set_rank(rank_after)


@torch.no_grad()
def unmerge_block_adapters(block: nn.Module, runtime: Runtime, rank: int) -> None:
    """W <- W_merged - s (B_r A_r) ⊙ M_new with the rank the layer will train at next
    (docs/method.md section 5, step 4). Using the *new* rank keeps W_eff equal to the pruned
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
    # With --nm: every layer's final [n, m], fixed at step 1 (a mixed N comes from that
    # step's importance); None before step 1 and without --nm.
    nm_patterns: list[list[int]] | None = None


def attach_adapters(model: nn.Module, cfg: LosaConfig, runtime: Runtime) -> None:
    """Sparse-LoRA factors at the maximum rank on the target linears of every layer (created
    once: rank changes are slices). Under ZeRO-3 they are partitioned as they are made."""
    with runtime.adapter_init(model):
        attach_sparse_lora(model, cfg.lora_max_rank, cfg.lora_scale, cfg.lora_dropout, cfg.seed)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """``--gradient-checkpointing`` (one option for one process and ZeRO-3): each decoder
    layer keeps only its input and recomputes the rest in backward. Non-reentrant: the
    recomputation restores the RNG state (the same LoRA dropout masks) and works when the
    layer inputs need no gradient (frozen embeddings), so gradients equal those without it."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def dense_targets(model: nn.Module, calib_ids: torch.Tensor, cfg: LosaConfig, runtime: Runtime) -> list[torch.Tensor]:
    """LoSA's reconstruction targets D_l: every layer's output on the dense model, this
    rank's calibration sequences (docs/method.md section 4). Computed once, before any adapter."""
    model.eval()
    acts = CalibrationInputs(model, calib_ids, runtime, cfg.calib_batch_size).capture()
    return dense_layer_outputs(model, acts, runtime, cfg.calib_batch_size)


class Losa:
    """Runs the steps of LoSA on a model whose target linears are sparse-LoRA layers
    (:func:`attach_adapters`), against the dense targets of :func:`dense_targets`.

    ``trainer`` trains the adapters (a :class:`~losa_zero.finetune.LocalTrainer`, or the
    ZeRO-3 one); ``phases`` records each phase's seconds and memory; ``on_event(losa,
    kind)`` runs after "pruned", every "opt_step" and at "step_end" (checkpoints)."""

    def __init__(self, model: nn.Module, cfg: LosaConfig, runtime: Runtime, calib_ids: torch.Tensor,
                 train_examples: list[dict], pad_id: int, metrics: MetricsWriter, *,
                 dense_targets: list[torch.Tensor], trainer, phases: PhaseRecorder,
                 on_event: Callable[["Losa", str], None] | None = None):
        self.model, self.cfg, self.runtime = model, cfg, runtime
        self.train_examples = train_examples
        self.pad_id = pad_id
        self.metrics = metrics
        self.dense_targets = dense_targets
        self.trainer = trainer
        self.phases = phases
        self.on_event = on_event
        self.pruner = cfg.make_pruner(cfg.pruner)
        self.allocator = get_allocator(cfg.allocation, cfg, cfg.pruner)
        self.calib = CalibrationInputs(model, calib_ids, runtime, cfg.calib_batch_size)
        self.thetas = cubic_schedule(cfg.sparsity, cfg.steps)
        self.mean_ranks = mean_rank_schedule(cfg.steps, cfg.rank_start, cfg.rank_end)
        self.n_layers = len(decoder_layers(model))
        #: step targets toward N:M patterns (None: unstructured rates)
        self.nm = None
        if cfg.nm:
            self.nm = NMSteps(cfg.nm, self.n_layers, cfg.steps, cfg.nm_schedule, mixed=self.allocator.mixed_nm
                              and cfg.allocation != "uniform", spread=cfg.nm_spread)
            check_nm_fits(model, self.nm.given)
        self.state = LosaState()

    # -- helpers ----------------------------------------------------------------------------
    def steps_examples(self, t: int) -> int:
        return self.cfg.final_step_samples if t == self.cfg.steps else self.cfg.samples_per_step

    def opt_steps(self, t: int) -> int:
        """Optimizer steps of step ``t``'s fine-tuning."""
        return -(-self.steps_examples(t) // self.cfg.batch_size)

    @property
    def continuous(self) -> bool:
        """``--finetune-schedule continuous``: one optimizer and one learning-rate schedule over
        all steps (the released code restarts both at every step, method doc section 5 step 6)."""
        return self.cfg.finetune_schedule == "continuous"

    def finetune_schedule(self, t: int) -> tuple[int, int] | None:
        """Where step ``t``'s fine-tuning sits in the run's one schedule (offset, total optimizer
        steps) when continuous; None: its own schedule."""
        if not self.continuous:
            return None
        return (sum(self.opt_steps(s) for s in range(1, t)),
                sum(self.opt_steps(s) for s in range(1, self.cfg.steps + 1)))

    def optimizer_in_flight(self) -> bool:
        """Whether the optimizer state at this point belongs to the run (a checkpoint must hold
        it): inside a step's fine-tuning, or, when continuous, once any step has trained."""
        opt_step = self.state.pending["train"].get("opt_step", 0) if self.state.pending else 0
        return opt_step > 0 or (self.continuous and self.state.step > 0)

    def set_ranks(self, ranks: list[int]) -> None:
        """Active LoRA rank of every layer (restoring a checkpoint)."""
        for l, layer in enumerate(decoder_layers(self.model)):
            for lin in layer_linears(layer).values():
                if isinstance(lin, SparseLoRALinear):
                    lin.set_rank(int(ranks[l]))

    def _event(self, kind: str) -> None:
        if self.on_event is not None:
            self.on_event(self, kind)

    def layer_rates(self, theta: float, delta: float) -> Allocation:
        """The layers' rates for this step at mean target Θ^t from the ``--allocation``
        allocator (RMI, sections 2-3, by default), measured on the current model, whose
        effective weights are the merged ones. With --nm, each layer's target on its way to
        its N:M pattern instead; a mixed N per layer is chosen once, at step 1, from the
        allocator's importance on the dense model (section 7)."""
        if self.nm is None:
            return self.allocator.allocate(self.model, self.calib, self.runtime, theta, delta)
        importance = redundancy = None
        if self.state.nm_patterns is None:
            patterns = self.nm.initial_patterns()
            if patterns is None:
                importance, redundancy = self.allocator.importance(self.model, self.calib, self.runtime)
                patterns = self.nm.choose(importance)
                check_nm_fits(self.model, patterns)
            self.state.nm_patterns = [list(p) for p in patterns]
        t = self.state.step + 1
        names = target_names(self.model)
        targets = [self.nm_target(t, l) for l in range(self.n_layers)]
        return Allocation([tg.rate for tg in targets], importance, redundancy,
                          targets=[{name: tg for name in names} for tg in targets])

    def nm_target(self, t: int, l: int) -> SparsityTarget:
        """Layer ``l``'s target at step ``t`` with --nm (see :class:`~losa_zero.nm.NMSteps`)."""
        return self.nm.target(t, tuple(self.state.nm_patterns[l]))

    def prune_step(self, allocation: Allocation) -> tuple[list, list[float]]:
        """Merge, prune each layer on the merged weight to the allocation's rates (or its
        per-linear targets: BESA's learned counts), and measure e_l (section 5, steps 1 and 3)."""
        rates = allocation.rates
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
            if allocation.targets is not None:
                return allocation.targets[l]
            return {name: SparsityTarget.unstructured(rates[l]) for name in target_names(self.model)}

        results = sequential_prune(self.model, self.calib.capture(), self.pruner, targets, self.runtime, bs,
                                   before_block=before, after_block=after, desc=f"prune step {self.state.step + 1}")
        return results, errors

    def layer_ranks(self, errors: list[float], mean_rank: float) -> list[int]:
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
            self.model.eval()
            with self.phases.phase("importance", f"step{t}.importance") as timing:
                allocation = self.layer_rates(theta, delta)
            rates, importance, redundancy = allocation.rates, allocation.importance, allocation.redundancy
            step_seconds = {"importance": timing["seconds"]}
            with self.phases.phase("prune", f"step{t}.prune") as timing:
                results, errors = self.prune_step(allocation)
                ranks = self.layer_ranks(errors, mean_rank)
                self.unmerge(ranks)
            step_seconds["prune"] = timing["seconds"]
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
        with self.phases.phase("finetune", f"step{t}.finetune"):
            train = train_adapters(
                self.model, examples, self.trainer, pad_id=self.pad_id, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio,
                batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, runtime=self.runtime,
                metrics=self.metrics, losa_step=t, progress=p["train"],
                on_opt_step=lambda progress: self._event("opt_step"), seed=cfg.seed,
                schedule=self.finetune_schedule(t), fresh_optimizer=not (self.continuous and t > 1),
                keep_optimizer=self.continuous and t < cfg.steps)
        self.model.eval()
        step_seconds["finetune"] = train["seconds"]
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
        if self.nm is not None:
            record["nm_schedule"] = cfg.nm_schedule
            for l, row in enumerate(record["layers"]):
                row["nm"] = "{}:{}".format(*self.state.nm_patterns[l])
                row["step_target"] = self.nm_target(t, l).describe()
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
        """The remaining steps (all of them, unless a checkpoint was restored); the history."""
        while self.state.step < self.cfg.steps:
            self.run_step()
        self.dense_targets = None
        return self.state.history
