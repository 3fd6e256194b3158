"""losa-zero: LoSA (dynamic low-rank sparse adaptation) and its building blocks
(magnitude, Wanda, SparseGPT, N:M, layer-wise allocation) for LLaMA-family models,
from one process up to DeepSpeed ZeRO-3 across many ranks."""

__version__ = "0.1.0"
