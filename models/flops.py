"""FLOP accounting and model-FLOPs utilisation (MFU).

Convention (Kaplan et al. 2020, with PaLM's attention term, Chowdhery et al. 2022 App. B):
training costs 6 FLOPs per matmul weight per token (2 forward, 4 backward: grad of input and
grad of weight), inference 2. Per token of a GPT-2 model with L layers, width d, FFN width d',
vocabulary V and context T:

    N_matmul  = L·(4d² + 2·d·d')          weight matrices of attention (qkv + out) and FFN;
                                            biases and LayerNorms are elementwise (<1% of N)
                                            and, like embedding lookups, are not counted
    head      = d·V                         the (tied) LM head is a matmul too
    attention = 2·L·T·d forward, causal:    QKᵀ and AV each cost 2·d FLOPs per attended key, and
                                            a causal token attends T/2 keys on average

    train FLOPs/token     = 6·(N_matmul + d·V) + 6·L·T·d      (causal; PaLM's 12·L·T·d halved)
    inference FLOPs/token = 2·(N_matmul + d·V) + 2·L·T·d      (= train / 3)

`causal=False` gives PaLM's full 12·L·T·d, which is what dense kernels (and
`torch.utils.flop_counter.FlopCounterMode`) actually execute; flash attention skips the masked
half, so the causal count is the useful work. Softmax, GELU, LayerNorm and the loss are
elementwise (O(T·d) or O(V) per token, not O(d²)) and excluded, as in Kaplan/PaLM. These are
model FLOPs: recomputation (activation checkpointing, flash attention recomputing QKᵀ in its
backward) is not counted, so `mfu` is PaLM's MFU, not hardware utilisation.

LoRA (a frozen model with N_lora trainable adapter weights, models/lora.py): a frozen weight
still costs 2 forward and 2 backward FLOPs per token (the gradient of its input, which the
adapters below it need) but no weight gradient, and each adapter weight costs the full 6:

    LoRA train FLOPs/token = 4·(N_matmul + d·V) + 6·L·T·d + 6·N_lora   (causal)

The attention term keeps its 3× (it has no weights). Below the first adapter nothing needs a
gradient (the embeddings are frozen too), so autograd skips that backward, which the formula
still counts: an upper bound by that much. For adapters on c_attn (the paper's 5M-parameter
LoRA) it is layer 0's c_attn input gradient, 2·3d² + 2·r·d per token (~1.5% of the paper LLM's
LoRA step); tests/test_lora.py checks both against torch's FlopCounterMode.

SLM-pn adds, per optimizer micro-step, the cost of materialising the U experts present in the
batch: for each layer, W = coef @ T for both FFN matrices and biases is
2·h·(2·d·d' + d + d') FLOPs forward per expert, ×3 with the backward (grad of coef and of T);
the coefficients E[i] @ M(l) cost 2·m·h (negligible, counted anyway).
"""

from __future__ import annotations

import functools
import time

import torch
from transformers import GPT2Config

from .config import FAMILY_INFO

# Model kinds: "lm" or a family name; a routed family trains a projected network ("pn")
LM_KINDS = ("lm",) + tuple(f for f, info in FAMILY_INFO.items() if not info.routed)
PN_KINDS = tuple(f for f, info in FAMILY_INFO.items() if info.routed)

# Dense peak FLOP/s per device, from vendor datasheets (no sparsity). Keys: device family, then
# precision. H200 has the H100 SXM compute die (more/faster memory only).
DEVICE_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},  # SXM
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
}


def _dims(config: GPT2Config) -> tuple[int, int, int, int]:
    d = config.n_embd
    return config.n_layer, d, (config.n_inner if config.n_inner is not None else 4 * d), config.vocab_size


def matmul_params(config: GPT2Config) -> int:
    """N_matmul: weight-matrix parameters of the transformer blocks (Kaplan's non-embedding N)."""
    L, d, f, _ = _dims(config)
    return L * (4 * d * d + 2 * d * f)


def attention_flops_per_token(config: GPT2Config, seq_len: int | None = None, causal: bool = True) -> float:
    """Forward FLOPs per token of QKᵀ and AV over a context of `seq_len` (default n_positions)."""
    L, d, _, _ = _dims(config)
    T = seq_len if seq_len is not None else config.n_positions
    full = 4.0 * L * T * d  # 2·T·d for QKᵀ + 2·T·d for AV
    return full / 2 if causal else full


def inference_flops_per_token(config: GPT2Config, seq_len: int | None = None, causal: bool = True) -> float:
    """Forward FLOPs per token: 2·(N_matmul + d·V) + attention (see module docstring)."""
    _, d, _, V = _dims(config)
    return 2.0 * (matmul_params(config) + d * V) + attention_flops_per_token(config, seq_len, causal)


def train_flops_per_token(config: GPT2Config, seq_len: int | None = None, causal: bool = True,
                          lora_params: int = 0) -> float:
    """Forward + backward FLOPs per token = 3 × inference; with ``lora_params`` > 0 (LoRA
    adapter weights on the frozen model), 4 per frozen weight and 6 per adapter weight."""
    if not lora_params:
        return 3.0 * inference_flops_per_token(config, seq_len, causal)
    _, d, _, V = _dims(config)
    return (4.0 * (matmul_params(config) + d * V) + 3.0 * attention_flops_per_token(config, seq_len, causal)
            + 6.0 * lora_params)


def pn_materialize_flops(config: GPT2Config, h: int, m: int, n_present: int, backward: bool = True) -> float:
    """FLOPs to materialise `n_present` experts' FFNs in every layer (one forward [+ backward])."""
    L, d, f, _ = _dims(config)
    per_expert_layer = 2.0 * h * (2 * d * f + d + f) + 2.0 * m * h
    return (3.0 if backward else 1.0) * L * n_present * per_expert_layer


def expected_present_experts(n_experts: int, rows: int) -> float:
    """Expected number of distinct clusters among `rows` uniform draws from `n_experts`."""
    return n_experts * (1.0 - (1.0 - 1.0 / n_experts) ** rows)


def train_flops(
    model_kind: str,
    config: GPT2Config,
    tokens: int,
    *,
    seq_len: int | None = None,
    causal: bool = True,
    pn_h: int | None = None,
    pn_m: int | None = None,
    steps: int | None = None,
    experts_per_step: float | None = None,
    lora_params: int = 0,
) -> float:
    """Training FLOPs for `tokens` tokens of a model kind ('lm' or a family name; 'pn').

    For 'pn' also pass pn_h, pn_m, `steps` (forward+backward passes, i.e. micro-steps) and
    `experts_per_step` (mean distinct clusters per micro-batch; measure it, or use
    `expected_present_experts`). `lora_params`: LoRA adapter weights on a frozen model.
    """
    dense = train_flops_per_token(config, seq_len, causal, lora_params) * tokens
    if model_kind in LM_KINDS:
        return dense
    if model_kind in PN_KINDS:
        if pn_h is None or pn_m is None or steps is None or experts_per_step is None:
            raise ValueError("train_flops('pn', ...) needs pn_h, pn_m, steps and experts_per_step")
        return dense + steps * pn_materialize_flops(config, pn_h, pn_m, 1) * experts_per_step
    raise ValueError(f"unknown model kind '{model_kind}'; use one of {', '.join(LM_KINDS + PN_KINDS)}")


def mfu(flops: float, seconds: float, n_devices: int, peak_flops_per_device: float | None) -> float:
    """Model-FLOPs utilisation: achieved FLOP/s over the devices' peak (nan if peak unknown)."""
    if not peak_flops_per_device or seconds <= 0 or n_devices <= 0:
        return float("nan")
    return flops / (seconds * n_devices * peak_flops_per_device)


@functools.lru_cache(maxsize=4)
def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best observed FLOP/s of an n×n matmul on this CPU (all torch threads); cached.

    A measured stand-in for a datasheet peak: real peak is higher, so CPU MFU reads optimistic.
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (thread pool, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops(device: str | torch.device | None = None, precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s of one device: datasheet for known GPUs, a measurement on CPU.

    Returns None for an unknown accelerator (MFU is then reported as nan rather than guessed).
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        return measure_cpu_peak_flops()
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision)


def peak_flops_for_name(device_name: str, precision: str = "bf16") -> float | None:
    """Datasheet peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3' (None if unknown)."""
    for family in ("H100 PCIe", "H200", "H100", "A100", "L40S", "L4"):  # most specific first
        if family in device_name:
            return DEVICE_PEAK_FLOPS[family].get(precision)
    return None
