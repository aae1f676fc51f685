"""FLOP accounting (slm.models.flops) checked against torch's FlopCounterMode on real passes.

FlopCounterMode counts matmul-like ops (mm, addmm, bmm, SDPA kernels) and nothing elementwise,
which is exactly the convention of the formula (softmax, GELU, LayerNorm, bias adds, the loss
and embedding lookups are excluded on both sides). One term the counter cannot see: on CPU,
SDPA without dropout runs `_scaled_dot_product_flash_attention_for_cpu`, which torch registers
no formula for (only the CUDA kernels), so we map it to torch's own SDPA formulas through
`custom_mapping`. Those count the full T×T score matrix (no causal discount), so we compare with
`causal=False`. Torch's SDPA backward formula also counts the recomputation of QKᵀ that
flash-style kernels do instead of storing the scores (2·T·d per token per layer): hardware
FLOPs, which model FLOPs (and MFU, PaLM App. B) exclude; we add it on the counter's side.
With those conventions the counts agree exactly; we allow 1e-9 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from slm.models.flops import (
    DEVICE_PEAK_FLOPS,
    attention_flops_per_token,
    device_peak_flops,
    expected_present_experts,
    inference_flops_per_token,
    matmul_params,
    measure_cpu_peak_flops,
    mfu,
    peak_flops_for_name,
    pn_materialize_flops,
    train_flops,
    train_flops_per_token,
)
from slm.models.lm import count_params, lm_config, make_lm
from slm.models.projected import ProjectedLM
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

VOCAB, SEQ, B = 100, 16, 3
CFG = lm_config((2, 32, 2, 64), VOCAB, SEQ)


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def counted(fn) -> int:
    """Matmul FLOPs of running fn, CPU flash attention included."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_formula_matches_flop_counter_on_forward_and_backward():
    model = make_lm(CFG, seed=0)
    x = torch.randint(0, VOCAB, (B, SEQ), generator=torch.Generator().manual_seed(0))
    tokens = B * SEQ
    fwd = counted(lambda: model(x))
    assert close(fwd, inference_flops_per_token(CFG, SEQ, causal=False) * tokens)

    def step():
        model(x, labels=x).loss.backward()

    recompute = 2 * CFG.n_layer * SEQ * CFG.n_embd * tokens  # QKᵀ again in the SDPA backward
    total = counted(step)
    assert close(total, train_flops("lm", CFG, tokens, seq_len=SEQ, causal=False) + recompute)
    assert close(total - recompute, 3 * fwd)


def test_projected_lm_adds_exactly_the_materialisation_cost():
    h, m = 3, 2
    model = ProjectedLM(CFG, n_experts=5, h=h, m=m, seed=0)
    x = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    cluster = torch.tensor([0, 3, 3, 4])  # 3 experts present
    tokens = 4 * SEQ

    def step():
        model(x, cluster, labels=x).loss.backward()

    total = counted(step) - 2 * CFG.n_layer * SEQ * CFG.n_embd * tokens  # minus SDPA's QKᵀ recompute
    expected = train_flops("pn", CFG, tokens, seq_len=SEQ, causal=False, pn_h=h, pn_m=m, steps=1, experts_per_step=3)
    assert close(total, expected)
    assert close(expected - train_flops("lm", CFG, tokens, seq_len=SEQ, causal=False), pn_materialize_flops(CFG, h, m, 3))
    fwd = counted(lambda: model(x, cluster))
    assert close(fwd, inference_flops_per_token(CFG, SEQ, causal=False) * tokens + pn_materialize_flops(CFG, h, m, 3, backward=False))


def test_convention_terms():
    d, L, f = 32, 2, 64
    assert matmul_params(CFG) == L * (4 * d * d + 2 * d * f)
    # Kaplan's N_matmul is the non-embedding count minus biases and LayerNorms
    biases_norms = L * (3 * d + d + f + d + 4 * d) + 2 * d
    assert count_params(make_lm(CFG), non_embedding=True) - matmul_params(CFG) == biases_norms
    assert attention_flops_per_token(CFG, SEQ) == 2 * L * SEQ * d  # causal: half of PaLM's 4·L·T·d
    assert attention_flops_per_token(CFG, SEQ, causal=False) == 4 * L * SEQ * d
    assert train_flops_per_token(CFG) == 6 * (matmul_params(CFG) + d * VOCAB) + 6 * L * SEQ * d
    assert math.isclose(inference_flops_per_token(CFG), train_flops_per_token(CFG) / 3)
    with pytest.raises(ValueError, match="pn_h, pn_m"):
        train_flops("pn", CFG, 100)
    with pytest.raises(ValueError, match="unknown model kind"):
        train_flops("moe", CFG, 100)


def test_paper_slm_throughput_implies_a_plausible_a100_mfu():
    # paper.md §4 Table 2: the SLM trains at 2.2 A100-hours per 1B tokens.
    cfg = lm_config("paper-slm", 32000, 1024)
    flops = train_flops("slm", cfg, 10**9)
    util = mfu(flops, seconds=2.2 * 3600, n_devices=1, peak_flops_per_device=DEVICE_PEAK_FLOPS["A100"]["bf16"])
    assert 0.2 < util < 0.5, util  # ≈ 0.31: a realistic MFU, so formula and table agree in scale


def test_expected_present_experts():
    assert expected_present_experts(1, 10) == 1.0
    assert math.isclose(expected_present_experts(4, 1), 1.0)
    assert 7.9 < expected_present_experts(8, 256) <= 8.0
    assert math.isclose(expected_present_experts(32, 8), 32 * (1 - (31 / 32) ** 8))


def test_mfu_and_peaks():
    assert math.isclose(mfu(1e15, 10.0, 2, 1e14), 0.5)
    assert math.isnan(mfu(1e15, 10.0, 1, None))
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == peak_flops_for_name("NVIDIA H100 80GB HBM3")
    assert peak_flops_for_name("Tesla T4") is None
    cpu = measure_cpu_peak_flops(n=256, repeats=2)
    assert 1e8 < cpu < 1e14  # any real CPU: between 0.1 GFLOP/s and 100 TFLOP/s
    assert device_peak_flops("cpu") > 1e8
    assert device_peak_flops("meta") is None
