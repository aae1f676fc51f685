"""The paper's published numbers, used by the planner when no sweep of ours exists.

Source: Grangier et al. 2024 (arXiv 2402.01093 v2), as transcribed in docs/paper.md
(/work/shared/notes/paper.md); every constant below cites its section/table there. Nothing is
invented: where the paper gives no number (SLM-is and SLM-d perplexities are only drawn in
figures) the planner says so and uses the paper's stated finding instead of a value.

Units: the paper reports costs in A100 GPU-hours; the planner takes FLOPs. The conversion is an
assumption, stated wherever it is used: A100 bf16 dense peak 312 TFLOP/s x an assumed model
FLOPs utilisation of 40 %, i.e. 1 GPU-hour = 4.49e17 FLOPs. (Cross-check from the paper's own
Table 2: 6 x 126M params x 1B tokens / 2.2 GPUh gives 31 % MFU for the SLM; the same for the
771M LLM at 7.7 GPUh gives 53 %; 40 % sits between them.)
"""

from __future__ import annotations

import math

A100_BF16_PEAK_FLOPS = 312e12  # NVIDIA A100 datasheet, dense bf16 tensor-core peak
ASSUMED_MFU = 0.40
FLOPS_PER_GPU_HOUR = A100_BF16_PEAK_FLOPS * ASSUMED_MFU * 3600.0
CONVERSION_NOTE = (f"paper GPU-hours converted at 1 A100 GPU-hour = {FLOPS_PER_GPU_HOUR:.3g} FLOPs "
                   f"(bf16 peak {A100_BF16_PEAK_FLOPS:.3g} FLOP/s x assumed MFU {ASSUMED_MFU:.0%})")

# Domain sizes of the paper's specialization sets [paper.md §1].
DOMAIN_TOKENS = (1_000_000, 8_000_000, 64_000_000)

# Served parameters [paper.md §4 Table 1, §3]: every small method serves the 126M SLM.
INFERENCE_PARAMS = {"slm": 126e6, "mix": 126e6, "pn": 126e6, "is": 126e6, "d": 126e6,
                    "nopt": 126e6, "llm": 771e6}

# Training-cost upper limits in GPU-hours [paper.md §4 Table 3]: pretraining; specialization
# at 1M / 8M / 64M domain tokens. SLM-is's per-domain pretraining is its specialization.
PRETRAIN_GPUH = {"llm": 650.0, "slm": 530.0, "is": 0.0, "d": 1850.0, "mix": 650.0, "pn": 650.0,
                 "nopt": 0.0}
SPEC_GPUH = {"llm": (0.12, 0.5, 3.5), "slm": (0.02, 0.07, 0.5), "is": (130.0, 130.0, 130.0),
             "d": (0.7, 2.8, 21.0), "mix": (0.02, 0.07, 0.5), "pn": (0.02, 0.07, 0.5)}
# SLM-nopt is not in Table 3; assumption: the same model on the same data under the same
# step caps (§3.7) costs what SLM's fine-tuning costs.
SPEC_GPUH["nopt"] = SPEC_GPUH["slm"]

# Macro Pile perplexity at fixed pretraining cost [paper.md §5 Table 8]:
# {method: [(pretraining GPUh, no fine-tuning, FT 1M, FT 8M, FT 64M), ...]}.
TABLE8 = {
    "slm": [(100, 33.74, 19.31, 15.61, 12.37), (200, 34.43, 18.58, 15.12, 12.09),
            (400, 36.61, 18.22, 14.80, 12.00)],
    "mix": [(100, 34.35, 19.82, 15.82, 12.62), (200, 31.94, 18.48, 14.98, 12.15),
            (400, 31.04, 17.56, 14.42, 11.84), (600, 31.03, 17.18, 14.21, 11.73)],
    "pn": [(100, 33.44, 18.57, 15.58, 12.53), (200, 32.30, 17.76, 14.95, 12.13),
           (400, 32.54, 17.17, 14.48, 11.86), (600, 32.53, 16.95, 14.29, 11.74)],
    "llm": [(100, 29.22, 17.11, 15.49, 11.55), (200, 28.18, 15.62, 14.03, 10.81),
            (400, 28.98, 15.03, 13.05, 10.28), (600, 28.62, 14.50, 12.64, 10.07)],
}
# Generic (pre)training throughput in GPU-hours per 1B tokens [paper.md §4 Table 2]; SLM-is
# trains the SLM (2.2). recipes/paper.yaml's step counts are set from these.
TRAIN_GPUH_PER_BTOK = {"slm": 2.2, "mix": 2.2, "pn": 3.6, "is": 2.2, "llm": 7.7}
# The matched pretraining budget recipes/paper.yaml gives the shared families (a Table 8 row,
# where all four families are measured) and SLM-is's per-domain budget (Table 3).
RECIPE_PRETRAIN_GPUH = {"slm": 400.0, "mix": 400.0, "pn": 400.0, "llm": 400.0, "is": 130.0}

# SLM-nopt (domain data only) [paper.md §5 Table 4], FT 1M / 8M / 64M.
NOPT_PPL = (227.1, 45.6, 17.6)

CITE = {
    "table1": "paper.md §4 Table 1 (served parameters)",
    "table3": "paper.md §4 Table 3 (training-cost upper limits, GPUh)",
    "table4": "paper.md §5 Table 4 (SLM-nopt perplexity)",
    "table8": "paper.md §5 Table 8 (interpolated perplexity at fixed pretraining cost)",
    "is": ("paper.md §5 key findings / §0: SLM-is has the best fine-tuned perplexity of all "
           "small-inference methods and at 1M tokens beats the best LLM (14.50, Table 8); its "
           "exact perplexity is only drawn in Fig. 4 (no number in the text)"),
    "d": ("paper.md §3.3: at equal total pretraining cost SLM-pn and SLM-mix beat SLM-d; no "
          "SLM-d perplexity is given in the text"),
    "chart": ("paper.md §5 decision chart (Fig. 1): large inference budget -> large model; small "
              "inference and large specialization budget -> SLM-is; small inference and small "
              "specialization budget -> SLM-pn / SLM-mix"),
    "amortization": "paper.md §4 Eq. 1: C_total(N) = C_generic + N * C_specialization",
}


def gpuh_to_flops(gpuh: float) -> float:
    """Paper GPU-hours as FLOPs under the stated conversion (CONVERSION_NOTE)."""
    return gpuh * FLOPS_PER_GPU_HOUR


def size_index(domain_tokens: float) -> int:
    """Index of the paper's domain size (1M, 8M, 64M) nearest in log scale."""
    return min(range(len(DOMAIN_TOKENS)),
               key=lambda i: abs(math.log(DOMAIN_TOKENS[i]) - math.log(domain_tokens)))
