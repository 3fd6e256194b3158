"""Sparse LoRA: a LoRA adapter whose update is masked by the base weight's sparsity mask.

Method doc section 1: the effective weight of an adapted linear is

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
  saved by autograd (:class:`_MaskedLoRAProduct`), so training costs no extra weight-sized
  activation per linear.
- The mask is an attribute read through :meth:`SparseLoRALinear.keep_mask`, not a buffer:
  buffers are replicated on every ZeRO-3 rank, and a model-sized mask must not be.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _MaskedLoRAProduct(torch.autograd.Function):
    """y = x @ ((B @ A) ⊙ M)^T, recomputing B @ A in backward instead of storing it."""

    @staticmethod
    def forward(ctx, x, A, B, keep, keep_fn=None):
        delta = (B @ A) * keep
        # With a ``keep_fn`` (partitioned masks under ZeRO-3) the full mask is not kept alive
        # until backward: it is rebuilt there, so no model-sized mask outlives its layer.
        ctx.keep_fn = keep_fn
        if keep_fn is None:
            ctx.save_for_backward(x, A, B, keep)
        else:
            ctx.save_for_backward(x, A, B)
        return F.linear(x, delta.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.keep_fn is None:
            x, A, B, keep = ctx.saved_tensors
        else:
            x, A, B = ctx.saved_tensors
            keep = ctx.keep_fn()
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            delta = ((B @ A) * keep).to(grad_out.dtype)
            grad_x = grad_out @ delta
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(A.dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(A.dtype)
            # Gradient w.r.t. the masked product: masked entries get exactly zero, so no
            # gradient ever reaches a pruned position.
            grad_delta = (g2.t() @ x2) * keep
            if ctx.needs_input_grad[1]:
                grad_A = B.t() @ grad_delta
            if ctx.needs_input_grad[2]:
                grad_B = grad_delta @ A.t()
        return grad_x, grad_A, grad_B, None, None


class SparseLoRALinear(nn.Module):
    """A linear layer with a masked low-rank adapter of adjustable rank.

    ``rank`` selects how many of the ``max_rank`` components are active (0 disables the
    adapter: the layer is then exactly the base linear). ``scale`` is fixed at creation
    (released code: alpha 16 over the initial rank 8, so s = 2) and does not follow the rank.

    ``mask_store`` (None: the mask is the attribute ``_keep``) lets a runtime keep the mask
    elsewhere, e.g. bit-packed and partitioned across ZeRO-3 ranks; it provides
    ``keep(layer)``, ``set(layer, keep)`` and ``keep_fn(layer)`` (a callable that rebuilds
    the mask in backward, so the full mask is not kept alive between forward and backward).
    """

    mask_store = None

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        r = self.rank
        if r == 0:
            return y
        keep = self.keep_mask()
        A = self.lora_A[:r]
        B = self.lora_B[:, :r]
        xd = self.lora_dropout(x)
        if keep is None:
            lora = F.linear(F.linear(xd.to(A.dtype), A), B)
        else:
            keep_fn = self.mask_store.keep_fn(self) if self.mask_store is not None else None
            lora = _MaskedLoRAProduct.apply(xd.to(A.dtype), A, B, keep, keep_fn)
        return y + (self.scale * lora).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}/{self.max_rank}, scale={self.scale}"


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
