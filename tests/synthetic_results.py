"""A synthetic results table (no training): every column a sweep writes, with pretraining levels
and pretraining seeds, from a stated model of the losses, so the cost model, planner and
findings are tested in pure Python, fast.

Loss model (nats): a per-method base (the LLM lowest, then SLM-is, pn, mix, d, slm, nopt),
+ 0.4·(1 - level) (less pretraining is worse), - 0.15·log2(size / smallest) / 3 (more domain
data helps), - 0.05 at the larger budget, pn/mix's advantage over slm halving at each 8x of
domain data (erosion), and a deterministic per-(pretraining seed, seed, domain) noise of
±0.01. Costs scale with level, budget and model size; pn pretrains 1.6x slower per FLOP.
"""

from __future__ import annotations

import math
import zlib

import pandas as pd

RECIPE = "synthetic"
BASE = {"llm": 2.90, "is": 3.00, "pn": 3.10, "mix": 3.12, "d": 3.16, "slm": 3.20, "nopt": 4.50}
PARAMS = {"llm": 6_000_000}
PRETRAIN_FLOPS = {"slm": 1e15, "llm": 6e15, "mix": 2e15, "pn": 1.6e15, "d": 7e15, "is": 0.5e15,
                  "nopt": 0.0}
SECONDS_PER_FLOP = {"pn": 1.6e-12}


def _noise(*key) -> float:
    return (zlib.crc32(repr(key).encode()) % 2001 - 1000) / 1000 * 0.01


def synthetic_results(domains=("a", "b"), levels=(0.5, 1.0), pretrain_seeds=(0, 1), seeds=(0, 1),
                      sizes=(8192, 65536), budgets=(50, 200), methods=tuple(BASE)) -> pd.DataFrame:
    rows = []
    for m in methods:
        pretrained = m != "nopt"
        for lvl in (levels if pretrained else (1.0,)):
            for ps in (pretrain_seeds if pretrained else (0,)):
                for t in sizes:
                    for b in budgets:
                        for s in seeds:
                            for d in domains:
                                loss = BASE[m] + (0.4 * (1 - lvl) if pretrained else 0.0)
                                loss -= 0.15 * math.log2(t / min(sizes)) / 3
                                loss -= 0.05 * (b == max(budgets))
                                if m in ("pn", "mix"):  # erosion of the advantage over slm
                                    adv = BASE["slm"] - BASE[m]
                                    loss += adv * (1 - 0.5 ** (math.log(t / min(sizes), 8)))
                                loss += _noise(m, lvl, ps, s, d, t, b)
                                params = PARAMS.get(m, 1_000_000)
                                spec = 6.0 * params * b * 256 * (t / min(sizes)) ** 0.25
                                pre = PRETRAIN_FLOPS[m] * lvl
                                best = max(1, int(b * 0.8))
                                rows.append({
                                    "recipe": RECIPE, "domain": d, "method": m, "budget_steps": b,
                                    "domain_tokens": t, "seed": s, "lr": 1e-3, "expert": -1,
                                    "valid_loss": loss + 0.02, "test_loss": loss,
                                    "test_ppl": math.exp(loss), "steps_run": b, "best_step": best,
                                    "spec_flops": spec, "spec_device_seconds": spec * 1e-12,
                                    "spec_flops_to_best": spec * best / b,
                                    "spec_device_seconds_to_best": spec * 1e-12 * best / b,
                                    "pretrain_flops": pre,
                                    "pretrain_device_seconds": pre * SECONDS_PER_FLOP.get(m, 1e-12),
                                    "inference_params": params,
                                    "inference_flops_per_token": 2.0 * params,
                                    "model_path": f"specialize/syn/trials/{m}-{d}-{t}-{b}-{s}",
                                    "pretrain_level": lvl, "pretrain_seed": ps,
                                })
    return pd.DataFrame(rows)
