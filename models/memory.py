"""Device memory a training run needs per worker, estimated before the engine is built, and the
check that refuses a run that cannot fit (naming the fix).

Model states (bytes per parameter Ψ, N data-parallel workers), as DeepSpeed's own estimators
count them for mixed precision (deepspeed/runtime/zero/stage_1_and_2.py
``estimate_zero2_model_states_mem_needs``, stage3.py ``estimate_zero3_model_states_mem_needs``):
16-bit parameters 2Ψ, 16-bit gradients 2Ψ, and 16Ψ of float32 state (gradients, master weights,
Adam's two moments) partitioned by ZeRO:

  stage 0: 2Ψ + 2Ψ + 16Ψ       stage 1: 2Ψ + 2Ψ + 16Ψ/N
  stage 2: 2Ψ + 18Ψ/N          stage 3: 4·largest layer + 18Ψ/N

In float32 (CPU runs) the 16-bit copies are the float32 ones: 4Ψ parameters, 4Ψ gradients, 8Ψ
moments, partitioned the same way. A LoRA run's frozen weights hold no gradient or optimizer
state, only their copy in the run's precision (partitioned at ZeRO-3); its adapters count as
above. Offloading the optimizer (or the parameters, ZeRO-3) in the user's DeepSpeed JSON moves
the partitioned part to host memory (DeepSpeed's cpu_offload rows).

Activations of one micro-batch of b windows of s tokens (GPT-2 block, d model width, f MLP
width, bytes per element e; SDPA attention keeps no s×s scores): per block and token, the
saved inputs of the two LayerNorms, q/k/v, the attention output and the projections (9d) and
the MLP's input, GELU intermediates (tanh form) and output (6f) — Korthikanti et al. 2022's
count with the GELU's extra intermediates. With activation checkpointing each block keeps only
its input (d) and one block is recomputed at a time. On top: the logits (b·s·V·e, twice with
their gradient) and the float32 loss work (one ``loss_chunk`` of positions, or all of them, ×3
for the float32 copy, its log-softmax and its gradient), and for distillation the teacher's
weights and logits. ZeRO-3 also allocates its gradient reduce bucket up front, whatever the model's
size (``reduce_bucket_size`` elements in 16-bit, 5e8 by default: 0.93 GiB; stage3.py "IPG"), measured
on an H200 as the whole difference between the demo model's ZeRO-1 and ZeRO-3 peaks.
The peak is the larger of two phases: the backward pass (activations live) and the optimizer
step (activations freed). In bf16 the float32 copy of the gradients (4Ψ, or 4Ψ/N partitioned)
exists only in the step (DeepSpeed casts the 16-bit gradients when it steps), so it is not
added to the activations: peak = max(states − fp32 gradients + activations, states). Measured
on an H200 (bench/results/gpu-nvidia-h200.json), counting it with the activations put the
126M and 771M models' estimates 10–27 % over the peak; the two-phase rule gives 7–13 % on the
same figures (derived from them: to be confirmed by the next GPU run).
``bench/gpu_check.py`` measures the estimate against
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn
from transformers import GPT2Config

from slm.errors import InputError

GIB = 1024**3
ZERO3_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
HEADROOM = 0.9  # of the device's memory: CUDA context, allocator fragmentation, NCCL buffers


def largest_layer_params(model: nn.Module) -> int:
    """Parameters of the module holding the most of its own (what ZeRO-3 gathers at once;
    DeepSpeed's ``estimate_zero3_model_states_mem_needs_all_live`` counts the same)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def model_state_bytes(params: int, largest_layer: int, *, stage: int, world: int, bf16: bool,
                      offload_optimizer: bool = False, offload_params: bool = False,
                      trainable: int | None = None) -> int:
    """Device bytes of parameters, gradients and optimizer state per worker (module docstring);
    ``trainable`` < ``params``: the rest is frozen (LoRA)."""
    if trainable is not None and trainable < params:
        frozen = (params - trainable) * (2 if bf16 else 4) // (world if stage == 3 else 1)
        return frozen + model_state_bytes(trainable, largest_layer, stage=stage, world=world, bf16=bf16,
                                          offload_optimizer=offload_optimizer, offload_params=offload_params)
    p = params
    if not bf16:  # float32: params 4, grads 4, Adam moments 8
        full, part = {0: (16 * p, 0), 1: (8 * p, 8 * p), 2: (4 * p, 12 * p), 3: (4 * largest_layer, 16 * p)}[stage]
    else:
        full, part = {0: (20 * p, 0), 1: (4 * p, 16 * p), 2: (2 * p, 18 * p), 3: (4 * largest_layer, 18 * p)}[stage]
    if offload_optimizer and stage >= 1:  # DeepSpeed's cpu_offload rows: the partition on the host
        if stage == 3:
            return 4 * largest_layer + (0 if offload_params else int(2 * p / world))
        return 2 * p
    return full + int(part / world)


def zero_buffer_bytes(zero: dict, *, stage: int, bf16: bool) -> int:
    """ZeRO-3's reduce bucket, allocated at start when gradients are contiguous (the default);
    ``zero`` is the DeepSpeed config's ``zero_optimization`` section (the user's JSON included)."""
    if stage != 3 or not zero.get("contiguous_gradients", True):
        return 0
    return int(float(zero.get("reduce_bucket_size", ZERO3_REDUCE_BUCKET))) * (2 if bf16 else 4)


def activation_bytes(config: GPT2Config, *, micro_batch: int, seq_len: int, bf16: bool,
                     checkpointing: bool, loss_chunk: int) -> dict[str, int]:
    """Activation bytes of one micro-batch's forward+backward: blocks, logits, loss."""
    e = 2 if bf16 else 4
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    f = config.n_inner or 4 * d
    tokens = micro_batch * seq_len
    block = tokens * (9 * d + 6 * f) * e
    blocks = (L * tokens * d * e + block) if checkpointing else L * block
    logits = 2 * tokens * V * e
    positions = min(loss_chunk, seq_len) if loss_chunk > 0 else seq_len
    loss = 3 * micro_batch * positions * V * 4
    return {"blocks": int(blocks), "logits": int(logits), "loss": int(loss)}


@dataclass
class MemoryEstimate:
    """One worker's device memory for a run (bytes)."""

    family: str
    params: int
    zero_stage: int
    world: int
    micro_batch: int
    model_states: int
    activations: int
    teacher: int
    total: int
    buffers: int = 0  # ZeRO-3's reduce bucket (included in total)
    step_only: int = 0  # of model_states: the float32 gradient copy, alive only in the step

    def line(self) -> str:
        return (f"memory estimate ({self.family}, {self.params / 1e6:.0f}M params, ZeRO-{self.zero_stage} "
                f"on {self.world} worker(s), micro-batch {self.micro_batch}): model states "
                f"{self.model_states / GIB:.1f} GiB + activations {self.activations / GIB:.1f} GiB"
                + (f" + teacher {self.teacher / GIB:.1f} GiB" if self.teacher else "")
                + (f" + ZeRO buffers {self.buffers / GIB:.1f} GiB" if self.buffers else "")
                + (f"; peak {self.total / GIB:.1f} GiB per worker (the {self.step_only / GIB:.1f} GiB "
                   "float32 gradient copy lives only in the optimizer step)" if self.step_only
                   else f" = {self.total / GIB:.1f} GiB per worker"))

    def to_json(self) -> dict[str, int | str]:
        return asdict(self)


def estimate(*, family: str, config: GPT2Config, params: int, largest_layer: int, stage: int,
             world: int, micro_batch: int, seq_len: int, bf16: bool, checkpointing: bool,
             loss_chunk: int, offload_optimizer: bool = False, offload_params: bool = False,
             teacher_config: GPT2Config | None = None, teacher_params: int = 0,
             zero_buffers: int = 0, trainable: int | None = None) -> MemoryEstimate:
    states = model_state_bytes(params, largest_layer, stage=stage, world=world, bf16=bf16,
                               offload_optimizer=offload_optimizer, offload_params=offload_params,
                               trainable=trainable)
    acts = sum(activation_bytes(config, micro_batch=micro_batch, seq_len=seq_len, bf16=bf16,
                                checkpointing=checkpointing, loss_chunk=loss_chunk).values())
    teacher = 0
    if teacher_config is not None:  # weights in the run's precision, no gradients; its logits
        e = 2 if bf16 else 4
        teacher = teacher_params * e + micro_batch * seq_len * teacher_config.vocab_size * e
    step_only, trained = 0, params if trainable is None else trainable
    if bf16 and not offload_optimizer:  # the float32 gradients of what trains (LoRA: its adapters)
        step_only = 4 * trained if stage == 0 else int(4 * trained / world)
    total = max(states - step_only + acts, states) + teacher + zero_buffers
    return MemoryEstimate(family, params, stage, world, micro_batch, states, acts, teacher,
                          total, zero_buffers, step_only)


def check_fits(est: MemoryEstimate, device_bytes: int, run: str, *, checkpointing: bool) -> None:
    """Refuse a run whose estimate exceeds the device's memory (less headroom), naming fixes."""
    budget = HEADROOM * device_bytes
    if est.total <= budget:
        return
    fixes = []
    if est.micro_batch > 1:
        fixes.append("lower pretrain.train.micro_batch (raise grad_accum to keep the global batch)")
    if est.zero_stage < 3 and est.world > 1:
        fixes.append(f"raise the ZeRO stage (pretrain.train.zero_stages: {{{est.family}: 3}})")
    if not checkpointing:
        fixes.append("set pretrain.train.activation_checkpointing: true")
    fixes.append("use GPUs with more memory")
    raise InputError(f"training run '{run}' does not fit: {est.line()}, above {HEADROOM:.0%} of the "
                     f"worker's {device_bytes / GIB:.1f} GiB; " + "; or ".join(fixes))
