"""N:M sparsity patterns: parsing ``--nm``, mixed N per layer, and how LoSA's progressive
steps reach a pattern.

2:4 is the pattern GPU sparse kernels accelerate, and the released LoSA code has no N:M
path (method doc section 7 only reports N:M results). LoSA prunes in T steps, and a weight
it pruned never comes back, so the steps before the last must leave every group of M
completable to exactly N survivors. :class:`NMSteps` decides each step's target per layer;
``--nm-schedule`` names the designs compared on the fixture (README, "LoSA to 2:4";
``patterns``, the default, measured best of the first three with the released per-step
fine-tuning):

* ``patterns``: every step is an N:M pattern, N falling with the schedule (for 2:4 with
  M = 4 only 3:4 and 2:4 exist, so the steps are coarse).
* ``descend``: every step is an N:M pattern, N falling by one per step from M - 1 until it
  reaches N (for 2:4: 3:4, then 2:4). Unlike ``patterns`` no two steps share a pattern
  while T <= M - N, so no step only restarts the fine-tuning on the same mask.
* ``capped``: steps t < T prune unstructured (per row, like Wanda's comparison group) at
  the layer's cubic-schedule rate, but never more than M - N of any group; step T prunes
  exactly N:M. Every group still holds N survivors before the last step, so the final
  pattern is exact and the sparsity is exactly the pattern's.
* ``project``: unstructured steps, N:M at the last. Groups that lost more than M - N
  before the last step stay so (a pruned weight never comes back), so the model ends
  valid N:M but sparser than the pattern.
"""
from __future__ import annotations

from torch import nn

from .allocation import cubic_schedule, mixed_nm_allocation
from .config import NM_SCHEDULES, nm_patterns
from .errors import LosaZeroError
from .modeling import decoder_layers, layer_linears
from .pruners import SparsityTarget


def parse_nm(spec: str, n_layers: int) -> list[tuple[int, int]]:
    """'2:4' for every layer, or one 'N:M' per layer, comma-separated (mixed N per layer)."""
    out = nm_patterns(spec)
    if len(out) == 1:
        out = out * n_layers
    if len(out) != n_layers:
        raise LosaZeroError(f"--nm lists {len(out)} patterns for a model of {n_layers} layers: give one, or one per layer")
    return out


def check_nm_fits(model: nn.Module, patterns: list[tuple[int, int]]) -> None:
    """A user error naming the linear when a layer's M does not divide its input width."""
    for l, layer in enumerate(decoder_layers(model)):
        n, m = patterns[l]
        for name, lin in layer_linears(layer).items():
            if lin.in_features % m:
                raise LosaZeroError(
                    f"N:M {n}:{m} needs input width divisible by {m}; {name} of layer {l} has {lin.in_features} "
                    "inputs: use 2:4 or unstructured")


def mixed_patterns(importance, pattern: tuple[int, int], spread: int) -> list[tuple[int, int]]:
    """Mixed N per layer (method doc section 7): N within ``pattern``'s N +- ``spread`` (and
    1 .. M-1), more important layers keeping more, the mean N exactly ``pattern``'s."""
    n, m = pattern
    ns = mixed_nm_allocation(importance, n, m, n_min=min(n, max(1, n - spread)), n_max=max(n, min(m - 1, n + spread)))
    return [(k, m) for k in ns]


class NMSteps:
    """Each LoSA step's target per layer when the run ends in N:M patterns.

    ``patterns`` are the final per-layer patterns once known: given (one pattern for all
    layers, or a list) or, for a mixed N (``mixed``), chosen at step 1 from the allocation's
    importance on the dense model and then kept, so every later step heads for the same
    pattern. Each layer follows the cubic schedule (method doc section 5) toward its own
    final rate 1 - N_l/M, so the mean over layers is the schedule of the mean sparsity.
    """

    def __init__(self, spec: str, n_layers: int, steps: int, schedule: str = "patterns", mixed: bool = False,
                 spread: int = 1):
        if schedule not in NM_SCHEDULES:
            raise LosaZeroError(f"--nm-schedule must be one of {', '.join(NM_SCHEDULES)} (got {schedule!r})")
        self.given = parse_nm(spec, n_layers)
        if mixed and len(set(self.given)) > 1:
            raise LosaZeroError("--nm lists one N:M per layer already: a mixed N per layer needs one N:M")
        self.steps, self.schedule, self.mixed, self.spread = steps, schedule, mixed, spread

    def initial_patterns(self) -> list[tuple[int, int]] | None:
        """The final patterns when they do not depend on importance (None for a mixed N)."""
        return None if self.mixed else list(self.given)

    def choose(self, importance) -> list[tuple[int, int]]:
        """Mixed N per layer from the step-1 importance."""
        return mixed_patterns(importance, self.given[0], self.spread)

    def target(self, t: int, pattern: tuple[int, int]) -> SparsityTarget:
        """What a layer heading for ``pattern`` prunes to at step ``t`` (1-based)."""
        n, m = pattern
        if t >= self.steps:
            return SparsityTarget.nm_pattern(n, m)
        rate = cubic_schedule(1.0 - n / m, self.steps)[t - 1]
        if self.schedule == "capped":
            return SparsityTarget.toward_nm(rate, n, m)
        if self.schedule == "patterns":
            n_t = max(n, min(m, int(m * (1.0 - rate) + 0.5)))
            return SparsityTarget.nm_pattern(n_t, m)
        if self.schedule == "descend":
            return SparsityTarget.nm_pattern(max(n, m - t), m)
        return SparsityTarget.unstructured(rate)
