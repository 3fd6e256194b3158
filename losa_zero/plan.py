"""``losa-zero plan``: will a LoSA run fit these GPUs, and where does it need offload?

An analytic estimate of the per-GPU and per-node host memory of ``losa-zero train`` (the
ZeRO-3 path) or, with ``--single-process``, of ``losa-zero losa`` on one GPU, from the
model's shape alone (a known name or any HF ``config.json`` of a supported architecture:
no weights are read). The layer's linears, their widths and which of them share an input
come from the architecture registry (:mod:`losa_zero.architectures`). 1 GB here is 10^9 bytes, for the estimates and for ``--gpu-memory`` /
``--host-memory`` alike (an "80GB" A100 has 85.9e9 bytes, so ``--gpu-memory 80`` keeps a
margin).

What is counted, per GPU (P = all parameters, P_lin = the decoder linears, W = nodes x
GPUs per node, b = bytes of the run's dtype, 2 for bf16):

==========================  ================================================================
weights                     b*P/W (ZeRO-3 partitions); 0 on the GPU with parameter offload
masks                       P_lin/(8W): one bit per linear weight, partitioned like the weights
LoRA factors                r_max*(in+out) for the target linears of every layer, /W, each with:
                            b (param) + b (grad) on the GPU; fp32 master 4 + fp32 grad 4 +
                            optimizer state (8-bit Adam: 2; torch AdamW: 8) on the GPU, or on
                            the host where the DeepSpeed config offloads the optimizer
gathered block              the largest decoder layer at b bytes/param, plus DeepSpeed's
                            prefetch bucket, plus its masks unpacked to bool (1 byte/weight)
calibration buffers         3 x n_local x seqlen x hidden x b: a block's input, its outputs
                            and their concatenation (n_local = this rank's calibration share)
calibration forward         one calibration micro-batch through one block (no autograd): the
                            MLP's peak, (3h + 3i) values per token at b bytes, plus the fp32
                            copy (4i bytes per token) of the widest input the statistics take
pruning workspace           Wanda: this rank's share of the block's new weights + masks
                            (4+1 bytes/weight) and one linear's score/clone/sort space (9 B);
                            SparseGPT: every linear's Hessian (4*in^2) + the inverse and
                            Cholesky of the widest (3*4*in^2) + two fp32 weight copies
fine-tuning activations     micro_batch x max_length tokens. Activation checkpointing
                            (``gradient_checkpointing: true``): every layer's input (h*b per
                            token per layer) + one layer's full set; without it every layer's
                            set. A layer's set per token, from the architecture entry: every
                            adapter's dropped-out input (sum of the linears' input widths) and
                            its dropout mask (1 byte each), each shared-input group's input,
                            six attention-wide tensors (projections, rotated q/k, attention
                            output), four MLP-wide ones (gate, up, activation, product), each
                            norm's input, and two more attention-wide tensors with per-head q/k
                            norms; all at b bytes but the masks. For a LLaMA layer this is
                            (17h + 6i)*b + (6h + i), what saved-tensor hooks counted for a
                            LLaMA layer with the sparse LoRA adapters under ZeRO-3. SDPA/flash
                            attention keeps no seq^2 term
                            (``--attention math``, the default for an architecture whose
                            default kernel is eager, adds heads*seq*b per token). Times the
                            backward peak factor (2.0, below)
logits                      micro_batch x max_length x vocab x (b + 4 + 4 + 4) (the logits, their
                            fp32 copy, log-softmax and gradient), times the same factor
backward peak factor        2.0: the peak memory of a fine-tuning micro-step over the bytes
                            autograd saves (gradients of one layer's activations, temporaries,
                            allocator). Measured on this project's CPU test machine with
                            ``losa-zero train`` on stories260K: 107-110 KB per token of peak
                            growth for 53 KB per token saved
LoRA transient              the widest linear's masked update B@A, its gradient and mask,
                            (4*b_lora + 1) bytes per weight, recomputed per linear
runtime allowance           GPU: CUDA context + NCCL buffers (1.5 GB) and 10% of the rest for
                            the caching allocator's fragmentation
==========================  ================================================================

The GPU peak is the largest of three phases, each counting the persistent terms (weights,
masks, LoRA) plus that phase's transients: dense targets (gathered block, calibration
buffers and forward), pruning (the same plus the pruning workspace) and fine-tuning
(gathered block, LoRA transient, activations, logits).

**Dense reconstruction targets D_l** (the dense model's output of every layer on the
calibration set, LoSA's reconstruction error): nsamples x seqlen x hidden x L values, 344
GB in bf16 for LLaMA-2-70B at 128 x 2048. They never live in GPU or host memory: the run
writes them once to ``CHECKPOINT_DIR/dense_targets/`` (one file per layer and rank) and
reads them back memory-mapped, one layer's share at a time, in calibration micro-batches.
The plan therefore counts them as disk (per node: its ranks' share of every layer), one
layer's local share as page cache on the host, and one calibration micro-batch of them on
the GPU (inside the calibration buffers' allowance). ``--dense-targets host|gpu`` shows
what keeping them in memory would cost instead.

Per node host memory: a process baseline per rank (CUDA/NCCL/torch/DeepSpeed; on CPU runs,
torch + DeepSpeed + transformers), the offloaded weights / masks / optimizer, the copy of
each rank's shards that a checkpoint save makes (torch.save of CPU tensors), the largest
safetensors shard being loaded (page cache), one layer of dense targets, and, with NVMe
offload, DeepSpeed's pinned swap buffers. On a CPU-only run (``--device cpu``, the test
machine) every GPU term above is host memory too.

**One process** (``--single-process``, ``losa-zero losa`` on one GPU): the whole model at b
bytes per parameter and its masks (one bool per target weight) stay on the GPU, the fp32
adapters carry fp32 gradients and the optimizer state (no separate master copy), there is
no block to gather, the calibration buffers hold all sequences, and the dense targets D_l
are kept where the run keeps them, in host memory (``--dense-targets gpu`` shows the cost
of keeping them on the GPU instead). The host holds the whole model once while it loads.

Exit codes: 0 fits, 3 does not fit (the table says by how much), 2 bad input (also an
unsupported architecture, and a non-finite or non-positive memory size).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .architectures import Architecture, Widths, architecture_of, linear_shapes
from .config import (AT_LEAST_1, POSITIVE, LosaConfig, Options, add_config_flags, check_fields, config_from_args,
                     load_yaml, opt)
from .errors import LosaZeroError, OneLineParser

GB = 1e9
EXIT_FITS, EXIT_USAGE, EXIT_DOES_NOT_FIT = 0, 2, 3

#: CUDA context + NCCL communicator buffers per GPU process
CUDA_CONTEXT_BYTES = 1.5 * GB
#: caching-allocator fragmentation, as a fraction of everything else on the GPU
FRAGMENTATION = 0.10
#: peak of a fine-tuning micro-step / bytes autograd saves (see the module docstring)
BACKWARD_PEAK_FACTOR = 2.0
#: host memory of one rank's process besides model data: CUDA runtime, NCCL, torch, DeepSpeed,
#: transformers, bitsandbytes, tokenizers (GPU nodes: an allowance); on CPU runs measured here,
#: the peak RSS of a ZeRO-3 rank of ``losa-zero train`` on stories260K whose model terms are
#: under 0.03 GB (0.62-0.65 GB per rank)
HOST_BASELINE_GPU_RANK = 4.0 * GB
HOST_BASELINE_CPU_RANK = 0.6 * GB
#: safetensors shard size assumed when a model directory does not say (HF's default 5GB; the
#: LLaMA-2-70B release uses ~10 GB shards)
DEFAULT_SHARD_BYTES = 10 * GB

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "adamw": 8}


@dataclass
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_position: int = 4096
    tied_embeddings: bool = False
    head_dim_override: int | None = None  # config.json "head_dim" where it differs from hidden / heads
    shard_bytes: float | None = None   # largest safetensors file, when a model directory says
    model_type: str = "llama"          # the entry of losa_zero.architectures giving the layer's linears

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def architecture(self) -> Architecture:
        return architecture_of({"model_type": self.model_type})

    @property
    def widths(self) -> Widths:
        return Widths(hidden=self.hidden, q=self.heads * self.head_dim, kv=self.kv_dim, ffn=self.intermediate)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the target linears of one decoder layer."""
        return linear_shapes(self.architecture, self.widths)

    def group_inputs(self) -> list[int]:
        """The input width of each group of linears that read the same input."""
        w = self.widths
        return [w.of(group[0].inputs) for group in self.architecture.input_groups]

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def norm_params_per_layer(self) -> int:
        arch = self.architecture
        return arch.norms * self.hidden + (2 * self.head_dim if arch.head_norms else 0)

    @property
    def block_params(self) -> int:
        return self.linear_params_per_layer + self.norm_params_per_layer

    @property
    def linear_params(self) -> int:
        return self.layers * self.linear_params_per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * self.block_params + self.embedding_params + head + self.hidden

    @property
    def largest_linear(self) -> int:
        return max(a * b for a, b in self.linears().values())

    def lora_params(self, rank: int) -> int:
        return self.layers * rank * sum(a + b for a, b in self.linears().values())

    def saved_per_token_layer(self, b: int) -> float:
        """Bytes autograd saves per token for one decoder layer with sparse LoRA adapters
        (module docstring): every adapter's dropped-out input and its dropout mask, each
        shared-input group's input, six attention-wide tensors, four MLP-wide ones, the
        norms' inputs and, with per-head q/k norms, two more attention-wide tensors."""
        arch, w = self.architecture, self.widths
        adapter_inputs = sum(a for a, _ in self.linears().values())
        values = (adapter_inputs + sum(self.group_inputs()) + 6 * w.q + 4 * w.ffn + arch.norms * w.hidden
                  + (2 * w.q if arch.head_norms else 0))
        return values * b + adapter_inputs


#: shapes of released checkpoints (config.json values)
KNOWN_MODELS: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-2-13b": ModelShape("llama-2-13b", 5120, 13824, 40, 40, 40, 32000, 4096),
    "llama-2-70b": ModelShape("llama-2-70b", 8192, 28672, 80, 64, 8, 32000, 4096),
    "llama-3-8b": ModelShape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, 8192),
    "llama-3-70b": ModelShape("llama-3-70b", 8192, 28672, 80, 64, 8, 128256, 8192),
}


def _normalise_name(spec: str) -> str:
    s = spec.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-hf", "-instruct", "-chat"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    s = s.replace("meta-llama-3", "llama-3").replace("llama3", "llama-3").replace("llama2", "llama-2")
    return s


def resolve_model(spec: str) -> ModelShape:
    """A known model name (``llama-2-70b``, ``meta-llama/Llama-2-70b-hf``...), a HF
    ``config.json`` file, or a model directory holding one."""
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except ValueError as e:
            raise LosaZeroError(f"{p} is not valid JSON: {e}") from None
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            model_type = cfg.get("model_type")
            if model_type is None:
                raise LosaZeroError(f"{p} has no model_type: pass the config.json that save_pretrained wrote")
            architecture_of(cfg)  # unsupported architectures: the one-line error naming the supported ones
            shape = ModelShape(
                model_type=str(model_type),
                name=str(cfg.get("_name_or_path") or p.parent.name or p.name),
                hidden=hidden, intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab=int(cfg["vocab_size"]),
                max_position=int(cfg.get("max_position_embeddings") or 2048),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim_override=int(cfg["head_dim"]) if cfg.get("head_dim") else None)
        except (KeyError, TypeError, ValueError) as e:
            raise LosaZeroError(f"{p}: not a decoder config losa-zero can read (missing or bad {e})") from None
        index = p.parent / "model.safetensors.index.json"
        files = sorted(p.parent.glob("*.safetensors"))
        if files:
            shape.shard_bytes = float(max(f.stat().st_size for f in files))
        elif index.is_file():
            shape.shard_bytes = None
        return shape
    key = _normalise_name(spec)
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    raise LosaZeroError(f"unknown model {spec!r}: give a HF config.json (or its directory) or one of "
                        f"{', '.join(KNOWN_MODELS)}")


@dataclass
class PlanInputs:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    host_memory_gb: float | None = None
    offload: str = "none"                # none | cpu | nvme (parameters; "auto" is resolved by plan_auto)
    offload_optimizer: bool | None = None  # None: with parameter offload (as in ds_configs/zero3_offload_*.json)
    device: str = "gpu"                  # gpu | cpu (a CPU-only run: "GPU" terms are host memory)
    dtype: str = "bfloat16"
    nsamples: int = 128
    seqlen: int | None = None
    calib_batch_size: int = 8
    cka_nsamples: int = 64
    micro_batch_size: int = 1
    batch_size: int = 8
    max_length: int = 1024
    lora_max_rank: int = 16
    optimizer: str = "paged_adamw_8bit"
    pruner: str = "wanda"
    gradient_checkpointing: bool = True
    attention: str | None = None         # flash (SDPA flash / memory-efficient kernels) | math (seq^2 kept);
                                         # None: what the architecture's default kernel does (eager: math)
    dense_targets: str | None = None     # None: where the run keeps them (ZeRO-3: disk; one process: the
                                         # host) | disk | host | gpu (what-if)
    single_process: bool = False         # ``losa-zero losa`` on one GPU instead of ``losa-zero train``
    prefetch_bucket: float | None = None  # params; None: DeepSpeed "auto" = 0.9 hidden^2
    nvme_buffer_count: int = 5
    nvme_buffer_size: float = 1e9        # params per swap buffer (ds_configs/zero3_offload_nvme.json)
    nvme_max_in_cpu: float = 1e9

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dense_targets_at(self) -> str:
        if self.dense_targets is not None:
            return self.dense_targets
        return "host" if self.single_process else "disk"


def split_share(n: int, world: int, unit: int) -> int:
    """The most calibration sequences any rank holds (units of a calibration micro-batch,
    as the run splits them)."""
    units = math.ceil(n / unit)
    per = math.ceil(units / world)
    return min(n, per * unit)


def check_inputs(inp: PlanInputs) -> None:
    """Refuse inputs no estimate can be made for, with the flag to fix."""
    if inp.offload not in ("none", "cpu", "nvme"):
        raise LosaZeroError(f"offload must be none, cpu or nvme here (got {inp.offload!r})")
    if inp.device not in ("gpu", "cpu"):
        raise LosaZeroError(f"device must be gpu or cpu (got {inp.device!r})")
    if inp.attention not in (None, "flash", "math"):
        raise LosaZeroError(f"attention must be flash or math (got {inp.attention!r})")
    if inp.dense_targets_at not in ("disk", "host", "gpu"):
        raise LosaZeroError(f"dense_targets must be disk, host or gpu (got {inp.dense_targets!r})")
    if inp.dtype not in DTYPE_BYTES or inp.optimizer not in OPTIMIZER_STATE_BYTES:
        raise LosaZeroError(f"dtype must be one of {', '.join(DTYPE_BYTES)} and optimizer one of "
                            f"{', '.join(OPTIMIZER_STATE_BYTES)}")
    if min(inp.nodes, inp.gpus_per_node, inp.nsamples, inp.calib_batch_size, inp.micro_batch_size,
           inp.max_length, inp.lora_max_rank) < 1:
        raise LosaZeroError("nodes, gpus per node, nsamples, batch sizes, max_length and the LoRA rank must be >= 1")
    for flag, gb in (("--gpu-memory", inp.gpu_memory_gb), ("--host-memory", inp.host_memory_gb)):
        if gb is not None and not (math.isfinite(gb) and gb > 0):
            raise LosaZeroError(f"{flag} must be a positive number of GB (got {gb})")
    if inp.single_process:
        if inp.world != 1 or inp.offload != "none":
            raise LosaZeroError("--single-process plans one process on one GPU: drop --nodes/--gpus-per-node "
                                "and --offload (those are for losa-zero train under ZeRO-3)")
        if inp.dense_targets_at == "disk":
            raise LosaZeroError("--single-process keeps the dense targets in memory: use --dense-targets host or gpu")


def persistent_terms(shape: ModelShape, inp: PlanInputs, opt_off: bool) -> tuple[dict, dict]:
    """What stays for the whole run: (per-GPU bytes, per-rank host bytes).

    ZeRO-3 partitions the weights, bit-packed masks and LoRA state over the ranks (or moves
    them to the host with offload). One process keeps the whole model and its masks (one
    bool per weight) on the GPU, and fp32 adapters whose gradients and optimizer state are
    fp32 too (no separate master copy)."""
    b, W = DTYPE_BYTES[inp.dtype], inp.world
    n_lora = shape.lora_params(inp.lora_max_rank)
    opt_state = OPTIMIZER_STATE_BYTES[inp.optimizer]
    if inp.single_process:
        return ({"weights": b * shape.total_params, "masks": float(shape.linear_params),
                 "lora_params_grads": n_lora * (4 + 4), "lora_master_optimizer": n_lora * opt_state}, {})
    weights = b * shape.total_params / W
    masks = shape.linear_params / (8 * W)
    lora_master = n_lora / W * (4 + 4 + opt_state)
    offload = inp.offload
    dev = {"weights": 0.0 if offload != "none" else weights,
           "masks": 0.0 if offload != "none" else masks,
           "lora_params_grads": n_lora / W * (b + b),
           "lora_master_optimizer": 0.0 if opt_off else lora_master}
    host_rank = {"weights_offloaded": weights if offload == "cpu" else 0.0,
                 "masks_offloaded": masks if offload != "none" else 0.0,
                 "lora_master_optimizer_offloaded": lora_master if opt_off else 0.0}
    if offload == "nvme":
        host_rank["nvme_swap_buffers"] = (inp.nvme_buffer_count * inp.nvme_buffer_size + inp.nvme_max_in_cpu) * b
    return dev, host_rank


def attention_kind(shape: ModelShape, inp: PlanInputs) -> str:
    """flash or math: given, else math where the architecture's default kernel is eager
    (Gemma 2: its soft-capped logits keep the seq^2 attention weights)."""
    if inp.attention is not None:
        return inp.attention
    return "math" if shape.architecture.attn_implementations[0] == "eager" else "flash"


def finetune_activations(shape: ModelShape, inp: PlanInputs, gradient_checkpointing: bool) -> float:
    """Peak bytes of one fine-tuning micro-step's activations (module docstring)."""
    b = DTYPE_BYTES[inp.dtype]
    tokens = inp.micro_batch_size * inp.max_length
    per_token_layer = shape.saved_per_token_layer(b)
    if attention_kind(shape, inp) == "math":
        per_token_layer += shape.heads * inp.max_length * b
    if gradient_checkpointing:
        return BACKWARD_PEAK_FACTOR * tokens * (shape.layers * shape.hidden * b + per_token_layer)
    return BACKWARD_PEAK_FACTOR * tokens * shape.layers * per_token_layer


def transient_terms(shape: ModelShape, inp: PlanInputs, seqlen: int, n_local: int) -> dict:
    """Per-GPU bytes that exist only inside one phase (calibration, pruning, fine-tuning)."""
    b, W, h, i = DTYPE_BYTES[inp.dtype], inp.world, shape.hidden, shape.intermediate
    if inp.single_process:  # the whole model is already on the GPU: nothing to gather
        gathered = block_masks = 0.0
    else:
        prefetch = inp.prefetch_bucket if inp.prefetch_bucket is not None else 0.9 * h * h
        gathered = max(shape.block_params, shape.embedding_params) * b + prefetch * b
        block_masks = shape.linear_params_per_layer * 1.0
    bc = min(inp.calib_batch_size, n_local)
    linears = shape.linears()
    lin_max = shape.largest_linear
    if inp.pruner == "sparsegpt":
        hessians = 4 * sum(a * a for a, _ in linears.values())
        widest = max(a for a, _ in linears.values())
        prune_ws = hessians + 3 * 4 * widest * widest + 2 * 4 * lin_max
    else:
        share = max(lin_max, shape.linear_params_per_layer / W)
        prune_ws = share * (4 + 1) + lin_max * 9
    tokens = inp.micro_batch_size * inp.max_length
    return {"gathered_block": gathered, "block_masks_bool": block_masks,
            "calibration_buffers": 3 * n_local * seqlen * h * b,
            "calibration_forward": bc * seqlen * ((3 * h + 3 * i) * b + 4 * i),
            "pruning_workspace": prune_ws,
            "finetune_activations": finetune_activations(shape, inp, inp.gradient_checkpointing),
            "logits": BACKWARD_PEAK_FACTOR * tokens * shape.vocab * (b + 4 + 4 + 4),
            "lora_transient": lin_max * (4 * b + 1)}


def gpu_phases(persistent: float, t: dict) -> dict:
    """Each phase's GPU bytes: the persistent terms plus that phase's transients."""
    calib = t["gathered_block"] + t["block_masks_bool"] + t["calibration_buffers"] + t["calibration_forward"]
    return {"dense_targets": persistent + calib,
            "prune": persistent + calib + t["pruning_workspace"],
            "finetune": persistent + t["gathered_block"] + t["block_masks_bool"] + t["lora_transient"]
            + t["finetune_activations"] + t["logits"]}


def host_node_terms(shape: ModelShape, inp: PlanInputs, host_rank: dict, gpu_total: float) -> tuple[dict, float]:
    """Per node host bytes, and the peak of one rank's process. A single process loads the
    whole model into host memory before moving it to the GPU."""
    b, W, G = DTYPE_BYTES[inp.dtype], inp.world, inp.gpus_per_node
    on_cpu = inp.device == "cpu"
    n_lora = shape.lora_params(inp.lora_max_rank)
    baseline = HOST_BASELINE_CPU_RANK if on_cpu else HOST_BASELINE_GPU_RANK
    if inp.single_process:
        ckpt_copy = b * shape.total_params  # from_pretrained materialises the model here first
    else:
        ckpt_copy = (b * shape.total_params / W + shape.linear_params / (8 * W) + n_lora / W * 4
                     + OPTIMIZER_STATE_BYTES[inp.optimizer] * n_lora / W)
    shard = shape.shard_bytes if shape.shard_bytes is not None else DEFAULT_SHARD_BYTES
    if on_cpu:
        shard = min(shard, b * shape.total_params)
    host_node = {
        "process_baseline": G * baseline,
        **{k: G * v for k, v in host_rank.items()},
        ("model_loading_copy" if inp.single_process else "checkpoint_save_copy"): G * ckpt_copy,
        "model_loading_page_cache": shard,
    }
    if on_cpu:
        host_node["ranks_device_memory"] = G * gpu_total   # the "GPU" is this host
        host_rank["device_memory"] = gpu_total
    peak = baseline + sum(v for k, v in host_rank.items() if k != "device_memory") + ckpt_copy + \
        (gpu_total if on_cpu else 0.0)
    return host_node, peak


def estimate(shape: ModelShape, inp: PlanInputs) -> dict:
    """Every term, per GPU and per node host, in bytes; the phases; and whether it fits."""
    check_inputs(inp)
    W, b, L = inp.world, DTYPE_BYTES[inp.dtype], shape.layers
    seqlen = inp.seqlen or min(2048, shape.max_position)
    opt_off = not inp.single_process and (inp.offload_optimizer if inp.offload_optimizer is not None
                                          else inp.offload != "none")
    on_cpu = inp.device == "cpu"
    where = inp.dense_targets_at
    notes: list[str] = []

    dev, host_rank = persistent_terms(shape, inp, opt_off)
    n_local = inp.nsamples if inp.single_process else split_share(inp.nsamples, W, inp.calib_batch_size)
    transients = transient_terms(shape, inp, seqlen, n_local)
    dense_total = inp.nsamples * seqlen * shape.hidden * L * b            # every layer, every rank
    dense_local_layer = n_local * seqlen * shape.hidden * b                # one layer, this rank
    dense_dev = dense_local_layer * L if where == "gpu" else 0.0
    host_rank["dense_targets"] = (dense_local_layer * L if where == "host"
                                  else (dense_local_layer if where == "disk" else 0.0))

    persistent = sum(dev.values()) + dense_dev
    phases = gpu_phases(persistent, transients)
    peak_phase = max(phases, key=phases.get)
    fragmentation = 0.0 if on_cpu else FRAGMENTATION * phases[peak_phase]
    context = 0.0 if on_cpu else CUDA_CONTEXT_BYTES
    gpu_total = phases[peak_phase] + fragmentation + context
    dev.update({"dense_targets_on_gpu": dense_dev, **transients, "fragmentation": fragmentation,
                "cuda_context": context})
    host_node, per_rank_host_peak = host_node_terms(shape, inp, host_rank, gpu_total)
    host_total = sum(host_node.values())

    problems = []
    gpu_cap = inp.gpu_memory_gb * GB
    if not on_cpu and gpu_total > gpu_cap:
        problems.append(f"GPU: needs {gpu_total / GB:.1f} GB per GPU > {inp.gpu_memory_gb:g} GB "
                        f"(peak in {peak_phase})")
    if inp.host_memory_gb is not None and host_total > inp.host_memory_gb * GB:
        problems.append(f"host: needs {host_total / GB:.1f} GB per node > {inp.host_memory_gb:g} GB")
    if inp.batch_size % (inp.micro_batch_size * W):
        notes.append(f"batch_size {inp.batch_size} is not a multiple of micro_batch_size {inp.micro_batch_size} x "
                     f"{W} ranks: the run will refuse it (set batch_size to a multiple of {inp.micro_batch_size * W})")
    other = finetune_activations(shape, inp, not inp.gradient_checkpointing)
    notes.append(f"activation checkpointing {'on' if inp.gradient_checkpointing else 'off'}: fine-tuning "
                 f"activations {transients['finetune_activations'] / GB:.2f} GB "
                 f"({'off' if inp.gradient_checkpointing else 'on'}: {other / GB:.2f} GB)")
    notes.append(f"dense targets D_l: {dense_total / GB:.1f} GB for all {L} layers x {inp.nsamples} x {seqlen} "
                 + {"disk": f"on disk (CHECKPOINT_DIR/dense_targets, {dense_total / inp.nodes / GB:.1f} GB per "
                            f"node), memory-mapped one layer at a time",
                    "host": "kept in host memory" + ("" if inp.single_process else " (what-if)"),
                    "gpu": "kept in GPU memory" + (" (what losa-zero losa does)" if inp.single_process
                                                   else " (what-if)")}[where])
    if inp.offload == "nvme":
        notes.append(f"NVMe: {b * shape.total_params / inp.nodes / GB:.1f} GB of weights per node on the NVMe "
                     f"path of the DeepSpeed config")
    return {
        "model": asdict(shape) | {"total_params": shape.total_params, "linear_params": shape.linear_params,
                                  "block_params": shape.block_params, "largest_linear": shape.largest_linear,
                                  "lora_params": shape.lora_params(inp.lora_max_rank)},
        "inputs": asdict(inp) | {"seqlen": seqlen, "world": W, "offload_optimizer": opt_off, "dense_targets": where,
                                 "attention": attention_kind(shape, inp)},
        "calibration_share": n_local,
        "gpu_bytes": dev,
        "gpu_phases": phases,
        "gpu_peak_phase": peak_phase,
        "gpu_total": gpu_total,
        "gpu_capacity": None if on_cpu else gpu_cap,
        "host_rank_bytes": host_rank,
        "host_node_bytes": host_node,
        "host_total": host_total,
        "host_rank_peak": per_rank_host_peak,
        "host_capacity": None if inp.host_memory_gb is None else inp.host_memory_gb * GB,
        "dense_targets_total": dense_total,
        "dense_targets_disk_per_node": dense_total / inp.nodes if where == "disk" else 0.0,
        "fits": not problems,
        "problems": problems,
        "notes": notes,
    }


def plan(shape: ModelShape, inp: PlanInputs) -> dict:
    """``estimate`` for the given offload; ``offload="auto"`` tries none, cpu, nvme in order
    and keeps the first that fits (or the last, with its problems)."""
    if inp.offload != "auto":
        return estimate(shape, inp)
    tried = {}
    for off in ("none", "cpu", "nvme"):
        r = estimate(shape, PlanInputs(**{**asdict(inp), "offload": off}))
        tried[off] = {"fits": r["fits"], "gpu_total": r["gpu_total"], "host_total": r["host_total"],
                      "problems": r["problems"]}
        if r["fits"]:
            break
    r["auto_tried"] = tried
    return r


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GB:10.2f}"


LABELS = {
    "weights": "weights (partition)", "masks": "masks (bits, partition)", "lora_params_grads": "LoRA params + grads",
    "lora_master_optimizer": "LoRA fp32 master/grad + optimizer", "dense_targets_on_gpu": "dense targets (what-if)",
    "gathered_block": "largest gathered block + prefetch", "block_masks_bool": "block masks (bool, open)",
    "calibration_buffers": "calibration buffers (3 x share)", "calibration_forward": "calibration forward",
    "pruning_workspace": "pruning workspace", "finetune_activations": "fine-tuning activations",
    "logits": "logits + loss", "lora_transient": "LoRA masked-update transient",
    "fragmentation": f"fragmentation ({FRAGMENTATION:.0%})", "cuda_context": "CUDA context + NCCL",
}
#: where one process differs (--single-process)
SINGLE_PROCESS_LABELS = {
    "weights": "weights (whole model)", "masks": "masks (bool per weight)", "lora_params_grads": "LoRA fp32 params + grads",
    "lora_master_optimizer": "LoRA optimizer state", "dense_targets_on_gpu": "dense targets D_l",
    "calibration_buffers": "calibration buffers (3 x all)", "cuda_context": "CUDA context",
}


def format_plan(r: dict) -> str:
    m, inp = r["model"], r["inputs"]
    dev_word = "GPU" if inp["device"] == "gpu" else "rank (CPU run: host memory)"
    lines = [
        f"losa-zero plan: {m['name']} ({m['total_params'] / 1e9:.2f}B params, {m['layers']} layers, hidden "
        f"{m['hidden']}, {m['model_type']}) "
        + ("as one process (losa-zero losa) on one GPU, " if inp["single_process"] else
           f"on {inp['nodes']} node(s) x {inp['gpus_per_node']} = {inp['world']} rank(s), ")
        + f"{inp['dtype']}, offload {inp['offload']}" + (" (+ optimizer)" if inp["offload_optimizer"] else ""),
        f"  calibration {inp['nsamples']} x {inp['seqlen']} ({r['calibration_share']} sequences on the busiest "
        f"rank), fine-tuning micro-batch {inp['micro_batch_size']} x {inp['max_length']}, activation "
        f"checkpointing {'on' if inp['gradient_checkpointing'] else 'off'}, pruner {inp['pruner']}, "
        f"LoRA rank {inp['lora_max_rank']} ({m['lora_params'] / 1e6:.1f}M params), optimizer {inp['optimizer']}",
        "",
        f"  per {dev_word}{'':<22} GB",
    ]
    labels = LABELS | (SINGLE_PROCESS_LABELS if inp["single_process"] else {})
    for k, v in r["gpu_bytes"].items():
        if v or k in ("weights", "masks"):
            lines.append(f"    {labels.get(k, k):<38}{_gb(v)}")
    ph = r["gpu_phases"]
    lines.append("    phases (persistent + transients):   " + ", ".join(
        f"{k} {v / GB:.2f}" for k, v in ph.items()) + f"  -> peak in {r['gpu_peak_phase']}")
    cap = r["gpu_capacity"]
    lines.append(f"    {'TOTAL per ' + dev_word.split(' ')[0]:<38}{_gb(r['gpu_total'])}"
                 + (f"   of {cap / GB:.0f} GB" if cap else ""))
    lines += ["", "  per node host memory" + " " * 20 + "GB"]
    for k, v in r["host_node_bytes"].items():
        if v:
            lines.append(f"    {k.replace('_', ' '):<38}{_gb(v)}")
    hc = r["host_capacity"]
    lines.append(f"    {'TOTAL per node':<38}{_gb(r['host_total'])}" + (f"   of {hc / GB:.0f} GB" if hc else ""))
    lines.append("")
    for n in r["notes"]:
        lines.append(f"  note: {n}")
    if "auto_tried" in r:
        lines.append("  offload auto: " + ", ".join(
            f"{k}: {'fits' if v['fits'] else 'does not fit'} ({v['gpu_total'] / GB:.1f} GB/GPU, "
            f"{v['host_total'] / GB:.0f} GB/node)" for k, v in r["auto_tried"].items()))
    if r["fits"]:
        lines.append(f"  FITS (offload: {inp['offload']})")
    else:
        lines.append("  DOES NOT FIT: " + "; ".join(r["problems"]))
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------------
RUN_CONFIG_KEYS = ("nsamples", "seqlen", "calib_batch_size", "cka_nsamples", "micro_batch_size", "batch_size",
                   "max_length", "lora_max_rank", "optimizer", "pruner", "dtype", "gradient_checkpointing")


def _ds_settings(path: str | None) -> dict:
    """Offload and bucket settings of a DeepSpeed config (ds_configs/*.json)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        repo = Path(__file__).resolve().parents[1]
        for c in (repo / path, repo / "ds_configs" / p.name):
            if c.is_file():
                p = c
                break
        else:
            raise LosaZeroError(f"DeepSpeed config {path} not found")
    try:
        ds = json.loads(p.read_text())
    except ValueError as e:
        raise LosaZeroError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    z = ds.get("zero_optimization") or {}
    out: dict = {}
    op = z.get("offload_param") or {}
    dev = str(op.get("device", "none")).lower()
    out["offload"] = dev if dev in ("cpu", "nvme") else "none"
    oo = z.get("offload_optimizer") or {}
    out["offload_optimizer"] = str(oo.get("device", "none")).lower() in ("cpu", "nvme")
    if isinstance(z.get("stage3_prefetch_bucket_size"), (int, float)):
        out["prefetch_bucket"] = float(z["stage3_prefetch_bucket_size"])
    if dev == "nvme":
        for key, name in (("buffer_count", "nvme_buffer_count"), ("buffer_size", "nvme_buffer_size"),
                          ("max_in_cpu", "nvme_max_in_cpu")):
            if isinstance(op.get(key), (int, float)):
                out[name] = type(getattr(PlanInputs(), name))(op[key])
    return out


def _run_option(key: str, kind: type):
    """A plan option that overrides the run config's ``key`` (same name, same choices)."""
    default = getattr(PlanInputs(), key)
    shown = default if default is not None else "min(2048, context)"
    meta = LosaConfig.__dataclass_fields__[key].metadata
    return opt(None, f"as in the run config (default: {shown})", meta.get("choices") if kind is str else None,
               range=meta.get("range"))


@dataclass
class PlanConfig(Options):
    """``losa-zero plan``: the cluster, the run's settings that size its memory, the output."""

    model: str | None = opt(None, f"known name ({', '.join(KNOWN_MODELS)}), a HF config.json, or a model directory",
                            required=True)
    nodes: int = opt(1, "nodes", range=AT_LEAST_1)
    gpus_per_node: int | None = opt(None, "ranks per node (GPUs; CPU processes with --device cpu; default 8, 1 with "
                                          "--single-process)", range=AT_LEAST_1)
    single_process: bool = opt(False, "plan losa-zero losa on one GPU (whole model on the GPU, no ZeRO-3) instead "
                                      "of losa-zero train")
    gpu_memory: float = opt(80.0, "GB per GPU (A100 80GB)", range=POSITIVE)
    host_memory: float | None = opt(None, "GB of host memory per node (unchecked if absent)", range=POSITIVE)
    offload: str | None = opt(None, "parameter offload (default: what --deepspeed says, else none); auto = the "
                                    "first of none, cpu, nvme that fits", ("none", "cpu", "nvme", "auto"))
    offload_optimizer: bool | None = opt(None, "optimizer state on the host (default: with parameter offload)")
    device: str = opt("gpu", "cpu: a CPU-only run (ranks are processes)", ("gpu", "cpu"))
    attention: str | None = opt(None, "flash: SDPA flash/memory-efficient attention (no seq^2 activations); math: "
                                      "eager or math SDPA (default: what the run's attn_implementation, else the "
                                      "architecture's default, does)", ("flash", "math"))
    dense_targets: str | None = opt(None, "where the dense reconstruction targets live (default: where the run "
                                          "keeps them, disk under ZeRO-3 and the host with --single-process; the "
                                          "others: what-if)", ("disk", "host", "gpu"))
    run_config: str | None = opt(None, "a losa-zero train run config (YAML): its nsamples, seqlen, batch sizes, "
                                       "max_length, lora_max_rank, optimizer, pruner, dtype, gradient_checkpointing "
                                       "and deepspeed are used unless given here")
    deepspeed: str | None = opt(None, "DeepSpeed config (offload, buckets)")
    nsamples: int | None = _run_option("nsamples", int)
    seqlen: int | None = _run_option("seqlen", int)
    calib_batch_size: int | None = _run_option("calib_batch_size", int)
    cka_nsamples: int | None = _run_option("cka_nsamples", int)
    micro_batch_size: int | None = _run_option("micro_batch_size", int)
    batch_size: int | None = _run_option("batch_size", int)
    max_length: int | None = _run_option("max_length", int)
    lora_max_rank: int | None = _run_option("lora_max_rank", int)
    optimizer: str | None = _run_option("optimizer", str)
    pruner: str | None = _run_option("pruner", str)
    dtype: str | None = opt(None, "as in the run config (default: auto, bfloat16 on GPUs and float32 with --device cpu)",
                            LosaConfig.__dataclass_fields__["dtype"].metadata["choices"])
    gradient_checkpointing: bool | None = opt(None, "recompute activations in backward (default: the run config's "
                                                    "value, off as losa-zero losa's default with --single-process, "
                                                    "else on)")
    json: str | None = opt(None, "write the plan as JSON to FILE (or, without FILE, print JSON instead of the "
                                 "table)", const="-")

    def validate(self) -> "PlanConfig":
        check_fields(self)
        return self


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="losa-zero plan",
        description="Per-GPU and per-node memory of a LoSA run under ZeRO-3 (losa-zero train) or on one GPU "
                    "(--single-process: losa-zero losa), and whether it fits. "
                    "Exit 0: fits; 3: does not fit; 2: bad input. 1 GB = 1e9 bytes.")
    add_config_flags(p, PlanConfig)
    return p


def inputs_from_config(cfg: PlanConfig) -> tuple[ModelShape, PlanInputs]:
    import torch

    from .modeling import resolve_dtype

    values: dict = {}
    ds_path = cfg.deepspeed
    if cfg.run_config:
        rc = load_yaml(cfg.run_config)
        for key in RUN_CONFIG_KEYS:
            if rc.get(key) is not None:
                values[key] = rc[key]
        if isinstance(values.get("gradient_checkpointing"), str):
            values["gradient_checkpointing"] = values["gradient_checkpointing"].lower() in ("1", "true", "yes")
        ds_path = ds_path or rc.get("deepspeed")
        if rc.get("attn_implementation") is not None:
            values["attention"] = "math" if rc["attn_implementation"] == "eager" else "flash"
        if rc.get("gradient_checkpointing") is None:
            values["gradient_checkpointing"] = False   # LosaConfig's default
        if rc.get("micro_batch_size") is None:
            values["micro_batch_size"] = 8  # LosaConfig's default
    values.update(_ds_settings(ds_path))
    if cfg.attention is not None:
        values["attention"] = cfg.attention
    for key in RUN_CONFIG_KEYS:
        v = getattr(cfg, key)
        if v is not None:
            values[key] = v
    if cfg.offload is not None:
        values["offload"] = cfg.offload
    if cfg.offload_optimizer is not None:
        values["offload_optimizer"] = cfg.offload_optimizer
    if cfg.single_process and not cfg.run_config:
        # losa-zero losa's own defaults (LosaConfig): every layer's activations kept, micro-batch 8
        for key in ("gradient_checkpointing", "micro_batch_size"):
            if getattr(cfg, key) is None:
                values[key] = LosaConfig.__dataclass_fields__[key].default
    if values.get("dtype", "auto") == "auto":
        # dtype: auto, the run's default, is bfloat16 on the GPUs planned for and float32 on CPU
        values["dtype"] = resolve_dtype("auto", torch.device("cuda" if cfg.device == "gpu" else "cpu"))
    gpus = cfg.gpus_per_node if cfg.gpus_per_node is not None else (1 if cfg.single_process else 8)
    inp = PlanInputs(nodes=cfg.nodes, gpus_per_node=gpus, gpu_memory_gb=cfg.gpu_memory,
                     single_process=cfg.single_process, host_memory_gb=cfg.host_memory, device=cfg.device,
                     dense_targets=cfg.dense_targets, **values)
    return resolve_model(cfg.model), inp


def main_plan(argv: list[str] | None = None) -> int:
    """``losa-zero plan ...``; returns the exit code (0 fits, 3 does not fit, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    try:
        cfg = config_from_args(PlanConfig, args)
        shape, inp = inputs_from_config(cfg)
        result = plan(shape, inp)
    except LosaZeroError as e:
        print(f"losa-zero: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.json == "-":
        print(json.dumps(result, indent=1))
    else:
        print(format_plan(result))
        if cfg.json:
            Path(cfg.json).write_text(json.dumps(result, indent=1))
    return EXIT_FITS if result["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main_plan())
