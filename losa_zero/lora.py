"""Sparse LoRA: a LoRA adapter whose update is masked by the base weight's sparsity mask.

docs/method.md section 1: the effective weight of an adapted linear is

    W_eff = (W + s * B[:, :r] @ A[:r, :]) ⊙ M

and W is already zero outside M, so the forward is y = x W^T + s * x ((B_r A_r) ⊙ M)^T.
Because the update is masked, it merges into W after training without losing a single
zero: that is what lets LoSA fine-tune between pruning steps and still ship a plain sparse
model.

Design choices that matter at scale:
- The layer *owns* the base ``weight`` and ``bias`` parameters (it replaces the
  ``nn.Linear`` rather than wrapping it), so under ZeRO-3 the forward that reads the weight
  is the module that holds it, and state-dict keys of the base weights do not change.
- ``lora_A`` / ``lora_B`` are created once at the maximum rank and never change shape. A
  rank change is a slice (``A[:r]``, ``B[:, :r]``); the optimizer and DeepSpeed engine never
  need rebuilding (deepspeed-notes, "Optimizers").
- The dense product ``B_r A_r`` (the size of W) is recomputed in backward instead of being
  saved by autograd, so training keeps no extra weight-sized tensor alive between forward
  and backward; every weight-sized tensor below is a transient of one forward or backward.
- The mask is an attribute read through :meth:`SparseLoRALinear.keep_mask`, not a buffer:
  buffers are replicated on every ZeRO-3 rank, and a model-sized mask must not be.

Where the time goes, and the two masked paths (``SparseLoRALinear.masked_path``):
the masked update cannot stay low-rank, so besides the frozen base's two T x d_in x d_out
matmuls per step (forward, input gradient) a masked adapter costs weight-sized products,
while peft's unmasked LoRA costs only ~6 T r (d_in + d_out).

- ``"separate"``: base linear plus the masked product as its own matmul: forward x delta^T,
  backward g delta and g^T x, i.e. three extra T x d_in x d_out matmuls (about 2.5x the
  frozen linear's cost). This is the only correct path while LoRA dropout is active,
  because the adapter then sees dropout(x) and the base sees x.
- ``"merged"`` (default): with no dropout active (dropout 0, or eval mode) and a float32
  weight, the forward is one matmul x (W + s (B_r A_r) ⊙ M)^T and the input gradient one
  matmul g (W + s (B_r A_r) ⊙ M); only g^T x (the gradient of the masked update, which has
  no low-rank shortcut) remains extra: one extra matmul instead of three (about 1.5x the
  frozen linear). The merged weight is a transient of the forward (rebuilt in backward)
  and is never saved. The Function saves x, the parameters themselves (weight, lora_A,
  lora_B: never a derived view, so ZeRO-3 can release them between forward and backward;
  a released one is gathered around the backward as DeepSpeed's own ZeRO-3 linear does)
  and the mask (the layer's own tensor, or nothing when a ``mask_store`` rebuilds it in
  backward). The base weight gets no gradient.
  The layer falls back to "separate" where merging would be wrong or lossy: LoRA dropout
  active (so the released recipe, dropout 0.1, trains on the separate path); a bf16/fp16
  weight (W + s delta rounded to W's 8 or 11 bits per element loses every update below
  half an ulp of W, deterministically; the separate path keeps the update's own
  precision, as peft does. Measured: ZeRO-3 LoSA on stories260K, 70% in 5 steps, dropout 0,
  bf16: perplexity 60.48 merged, 59.05 separate; float32: 58.44 both, to 3e-8); a weight
  that requires grad; autocast.

Both paths apply the mask in place in row blocks on CPU (multiplying by a bool tensor
otherwise materialises a float copy of the whole mask) and build the masked update (or the
merged weight) as the one weight-sized tensor alive at a time.

Precision policy (the same for the single-process layer and the ZeRO-3 layer):
- The factors' master copy and the optimizer state are float32: on one process the
  parameters themselves; under ZeRO-3 DeepSpeed's float32 master partition, of which a
  bf16 run's partitioned parameters are the bf16 compute copies (as for every parameter of
  a bf16 ZeRO-3 model).
- The masked update s * (B_r A_r) ⊙ M is formed from the factors in float32 and rounded
  once to the compute dtype; on the merged path W + s * update is summed in float32 (the
  merged path only runs for float32 weights, see above: a bf16 W would swallow the update).
- The compute dtype is the base linear's (the weights' dtype, or autocast's): every
  weight-sized product (forward x update^T, input gradient g update, and g^T x) runs in it,
  which is bf16 on tensor cores when the model is bf16. The rank-sized products of the
  factor gradients run in it too, as under autocast; the gradients are returned in the
  factors' dtype. The unmasked low-rank adapter (no mask yet) runs in float32: its cost is
  rank-sized.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

MASKED_PATHS = ("merged", "separate")
# Weight dtypes the merged path is used for (others take the separate path; module docstring).
_MERGE_DTYPES = (torch.float32, torch.float64)

# Row blocks for the in-place mask product on CPU (bool -> float promotion would otherwise
# allocate a weight-sized float copy of the mask): ~1 MiB of float32 per block.
_CPU_BLOCK_ELEMENTS = 1 << 18


def _row_block(rows: int, cols: int, device: torch.device) -> int:
    if device.type != "cpu":  # GPU elementwise kernels cast the mask on the fly: one block
        return rows
    return max(1, min(rows, _CPU_BLOCK_ELEMENTS // max(1, cols)))


def _masked_update(A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, scale: float,
                   base: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``base + scale * (B @ A) ⊙ keep`` (``base`` None: without it) as a new tensor of
    ``dtype`` (default A's). The product, mask and sum are formed in float32 (at least) from
    the factors, whatever their storage dtype (precision policy, module docstring); the
    result is the only weight-sized tensor made (plus, on one-block devices, the float32
    product before the cast to ``dtype``)."""
    rows, cols = B.shape[0], A.shape[1]
    dtype = dtype or A.dtype
    work = torch.promote_types(A.dtype, torch.float32)
    A, B = A.to(work), B.to(work)
    step = _row_block(rows, cols, A.device)
    if step >= rows:
        d = B @ A
        d.mul_(keep)
        d = d.mul_(scale) if base is None else torch.add(base, d, alpha=scale, out=d)
        return d.to(dtype)
    out = torch.empty(rows, cols, dtype=dtype, device=A.device)
    for o in range(0, rows, step):
        d = B[o:o + step] @ A
        d.mul_(keep[o:o + step])
        if base is None:
            torch.mul(d, scale, out=out[o:o + step])
        else:
            torch.add(base[o:o + step], d, alpha=scale, out=out[o:o + step])
    return out


def _mask_(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t *= keep`` in place, in row blocks on CPU."""
    step = _row_block(t.shape[0], t.shape[1], t.device)
    if step >= t.shape[0]:
        return t.mul_(keep)
    for o in range(0, t.shape[0], step):
        t[o:o + step].mul_(keep[o:o + step])
    return t


def _matmul_t(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ bias) with plain ops: ``F.linear`` may be DeepSpeed's ZeRO-3 replacement,
    an autograd Function of its own, and is not wanted inside ours."""
    out = torch.matmul(x, w.t())
    if bias is not None:
        out = out.add_(bias)
    return out


def _zero3_status(p: torch.Tensor) -> str | None:
    return getattr(getattr(p, "ds_status", None), "name", None)


@contextlib.contextmanager
def _available(*params):
    """A ZeRO-3 parameter saved for backward may be released (partitioned) when the backward
    runs if DeepSpeed's module hooks did not gather it: gather it around the use, as
    DeepSpeed's own ZeRO-3 linear does. No-op for ordinary tensors (and gathered ones)."""
    gathered = [p for p in params if p is not None and _zero3_status(p) == "NOT_AVAILABLE"]
    for p in gathered:
        p.all_gather()
    try:
        yield
    finally:
        for p in gathered:
            p.partition()


def _grad_2d(grad_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])


def _adapter_grads(g2, x2, A, B, keep, scale, need_A: bool, need_B: bool):
    """Gradients of A_r and B_r from the gradient of the masked update,
    s * (g^T x) ⊙ M: masked entries get exactly zero, so no gradient reaches a pruned
    position. g^T x, the weight-sized product, runs in the compute dtype (``x2``'s) and is
    the only tensor of its size alive here; the rank-sized products run in it too, and the
    gradients come back in the factors' dtype."""
    compute = x2.dtype
    grad_delta = _mask_(g2.to(compute).t() @ x2, keep)
    grad_A = (B.to(compute).t() @ grad_delta).mul_(scale).to(A.dtype) if need_A else None
    grad_B = (grad_delta @ A.to(compute).t()).mul_(scale).to(B.dtype) if need_B else None
    return grad_A, grad_B


class _MaskedLoRAProduct(torch.autograd.Function):
    """The "separate" path's adapter term: y = x @ (s * (B @ A) ⊙ M)^T, recomputing
    B @ A in backward instead of storing it. ``x`` is the adapter's (dropout) input."""

    @staticmethod
    def forward(ctx, x, A, B, keep, keep_fn=None, scale=1.0):
        delta = _masked_update(A, B, keep, scale, dtype=x.dtype)
        # With a ``keep_fn`` (partitioned masks under ZeRO-3) the full mask is not kept alive
        # until backward: it is rebuilt there, so no model-sized mask outlives its layer.
        ctx.keep_fn, ctx.scale = keep_fn, scale
        if keep_fn is None:
            ctx.save_for_backward(x, A, B, keep)
        else:
            ctx.save_for_backward(x, A, B)
        return _matmul_t(x, delta)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.keep_fn is None:
            x, A, B, keep = ctx.saved_tensors
        else:
            x, A, B = ctx.saved_tensors
            keep = ctx.keep_fn()
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            delta = _masked_update(A, B, keep, ctx.scale, dtype=grad_out.dtype)
            grad_x = grad_out @ delta
            del delta
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2, x2 = _grad_2d(grad_out, x)
            grad_A, grad_B = _adapter_grads(g2, x2, A, B, keep, ctx.scale, ctx.needs_input_grad[1],
                                            ctx.needs_input_grad[2])
        return grad_x, grad_A, grad_B, None, None, None


class _MergedSparseLoRALinear(torch.autograd.Function):
    """The "merged" path, the whole layer: y = x @ (W + s * (B_r @ A_r) ⊙ M)^T + b.

    Saves x, the parameters themselves and the mask (none with a ``keep_fn``); the merged
    weight is rebuilt in backward. The weight and bias are frozen (the layer takes the
    separate path otherwise): they get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, rank, scale, keep, keep_fn=None):
        A, B = lora_A[:rank], lora_B[:, :rank]
        w_eff = _masked_update(A, B, keep, scale, base=weight, dtype=weight.dtype)
        ctx.rank, ctx.scale, ctx.keep_fn = rank, scale, keep_fn
        saved = (x, weight, lora_A, lora_B) + ((keep,) if keep_fn is None else ())
        ctx.save_for_backward(*saved)
        return _matmul_t(x, w_eff, bias)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        x, weight, lora_A, lora_B = saved[:4]
        keep = saved[4] if ctx.keep_fn is None else ctx.keep_fn()
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        r, s = ctx.rank, ctx.scale
        grad_x = grad_lora_A = grad_lora_B = None
        with _available(lora_A, lora_B):
            A, B = lora_A[:r], lora_B[:, :r]
            if need_x:
                with _available(weight):
                    w_eff = _masked_update(A, B, keep, s, base=weight, dtype=weight.dtype)
                grad_x = grad_out.matmul(w_eff.to(grad_out.dtype))
                del w_eff
            if need_A or need_B:
                g2, x2 = _grad_2d(grad_out, x)
                grad_A, grad_B = _adapter_grads(g2, x2, A, B, keep, s, need_A, need_B)
                # full-shape gradients, zero beyond the active rank (as a slice's backward gives)
                if need_A:
                    grad_lora_A = torch.zeros_like(lora_A)
                    grad_lora_A[:r] = grad_A
                if need_B:
                    grad_lora_B = torch.zeros_like(lora_B)
                    grad_lora_B[:, :r] = grad_B
        return grad_x, None, None, grad_lora_A, grad_lora_B, None, None, None, None


class SparseLoRALinear(nn.Module):
    """A linear layer with a masked low-rank adapter of adjustable rank.

    ``rank`` selects how many of the ``max_rank`` components are active (0 disables the
    adapter: the layer is then exactly the base linear). ``scale`` is fixed at creation
    (released code: alpha 16 over the initial rank 8, so s = 2) and does not follow the rank.

    ``mask_store`` (None: the mask is the attribute ``_keep``) lets a runtime keep the mask
    elsewhere, e.g. bit-packed and partitioned across ZeRO-3 ranks; it provides
    ``keep(layer)``, ``set(layer, keep)`` and ``keep_fn(layer)`` (a callable that rebuilds
    the mask in backward, so the full mask is not kept alive between forward and backward).

    ``masked_path`` (class attribute, may be set per instance): how a masked adapter is
    computed, ``"merged"`` (default: one matmul on the merged weight when no LoRA dropout is
    active and the weight is float32, else the separate path) or ``"separate"`` (base linear
    plus the masked product); see the module docstring. Both give the same values within
    float rounding.
    """

    mask_store = None
    masked_path = "merged"

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        max_rank: int,
        scale: float,
        dropout: float = 0.0,
        rank: int = 0,
        init_seed: int | None = None,
    ):
        super().__init__()
        if max_rank < 1:
            raise ValueError("max_rank must be >= 1")
        # A ZeRO-3 partitioned weight has an empty .data; its logical shape is ds_shape.
        out_features, in_features = getattr(weight, "ds_shape", weight.shape)
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.max_rank = max_rank
        self.scale = float(scale)
        self.rank = 0
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # peft's default init: A Kaiming-uniform, B zero, so the adapter starts as a no-op.
        a = torch.empty(max_rank, in_features, dtype=torch.float32, device=weight.device)
        gen = None
        if init_seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(init_seed)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) gives this bound
        a.copy_(torch.rand(a.shape, generator=gen) * 2 * bound - bound)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(out_features, max_rank, dtype=torch.float32, device=weight.device))
        self._keep: torch.Tensor | None = None
        self.set_rank(rank)

    # -- mask -----------------------------------------------------------------------------
    def keep_mask(self) -> torch.Tensor | None:
        """The full-shape boolean keep mask M (None = dense, nothing pruned yet)."""
        if self.mask_store is not None:
            return self.mask_store.keep(self)
        return self._keep

    def set_keep_mask(self, keep: torch.Tensor | None) -> None:
        if keep is not None:
            if keep.shape != (self.out_features, self.in_features):
                raise ValueError(f"mask shape {tuple(keep.shape)} != weight shape {(self.out_features, self.in_features)}")
            keep = keep.to(device=self.lora_A.device, dtype=torch.bool)
        if self.mask_store is not None:
            self.mask_store.set(self, keep)
            return
        self._keep = keep

    # -- rank -----------------------------------------------------------------------------
    def set_rank(self, rank: int) -> None:
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside [0, {self.max_rank}]")
        self.rank = int(rank)

    # -- math -----------------------------------------------------------------------------
    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """s * (B_r A_r) ⊙ M in float32 (merging in fp32 as peft does avoids bf16 round-off)."""
        r = self.rank if rank is None else rank
        A = self.lora_A[:r].float()
        B = self.lora_B[:, :r].float()
        delta = self.scale * (B @ A)
        keep = self.keep_mask()
        if keep is not None:
            delta = delta * keep
        return delta

    def _use_merged(self, x: torch.Tensor) -> bool:
        if self.masked_path not in MASKED_PATHS:
            raise ValueError(f"masked_path {self.masked_path!r} is not one of {MASKED_PATHS}")
        if self.masked_path != "merged":
            return False
        drop = self.lora_dropout
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            return False  # the adapter sees dropout(x), the base x: no single merged weight
        if self.weight.dtype not in _MERGE_DTYPES:
            return False  # a bf16/fp16 merged weight would round the update to W's precision
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return False  # the merged Function gives the base weight no gradient
        return not torch.is_autocast_enabled(x.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        if r == 0:
            return F.linear(x, self.weight, self.bias)
        keep = self.keep_mask()
        keep_fn = None
        if keep is not None and self.mask_store is not None:
            keep_fn = self.mask_store.keep_fn(self)
        if keep is not None and self._use_merged(x):
            return _MergedSparseLoRALinear.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, r,
                                                 self.scale, keep, keep_fn)
        y = F.linear(x, self.weight, self.bias)
        A = self.lora_A[:r]
        B = self.lora_B[:, :r]
        xd = self.lora_dropout(x)
        if keep is None:  # low-rank: rank-sized cost, float32 (precision policy, module docstring)
            return y + (self.scale * F.linear(F.linear(xd.float(), A.float()), B.float())).to(y.dtype)
        # weight-sized products in the compute dtype: the base linear's output dtype
        return y + _MaskedLoRAProduct.apply(xd.to(y.dtype), A, B, keep, keep_fn, self.scale)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}/{self.max_rank}, "
                f"scale={self.scale}, masked_path={self.masked_path}")


def wrap_linear(linear: nn.Linear, max_rank: int, scale: float, dropout: float, init_seed: int | None = None) -> SparseLoRALinear:
    """Replace-by-value: a SparseLoRALinear that takes over ``linear``'s parameters."""
    return SparseLoRALinear(linear.weight, linear.bias, max_rank, scale, dropout, rank=0, init_seed=init_seed)


def unwrap_linear(layer: SparseLoRALinear) -> nn.Linear:
    """A plain nn.Linear holding ``layer``'s base weight (call after merging)."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device="meta")
    lin.weight = layer.weight
    lin.weight.requires_grad_(True)
    if layer.bias is not None:
        lin.bias = layer.bias
    return lin
