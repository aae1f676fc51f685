"""Summarize a finished sweep for the README: macro test perplexity per method x domain size x
budget (mean ± std over seeds), the pretrained-only domain perplexity (the first evaluation of
each trial, step 0, valid split), and the per-domain costs. Reads the sweep's published trials
and the report's tables; prints Markdown.

    .venv/bin/python scripts/study_findings.py --run runs/study [--sweep main]
"""

from __future__ import annotations

import argparse
import glob
import json
import math

import pandas as pd

from slm.layout import TRIAL_TRAINING, RunLayout
from slm.stage import join
from slm.tune.report import METHOD_COSTS, PERPLEXITY_TABLE


def pretrained_only(layout: RunLayout, sweep: str) -> pd.DataFrame:
    """Domain valid perplexity of the starting model of each trial (before fine-tuning)."""
    rows = []
    pattern = join(RunLayout(glob.escape(layout.root)).trial(sweep, "*"), TRIAL_TRAINING)
    for path in glob.glob(pattern):
        with open(path, encoding="utf-8") as f:
            t = json.load(f)
        hist = t.get("history") or []
        first = hist[0] if hist else None
        if isinstance(first, dict) and int(first.get("step", -1)) == 0:
            loss = float(first["loss"])
        elif isinstance(first, (list, tuple)) and int(first[0]) == 0:
            loss = float(first[1])
        else:
            continue
        rows.append({"method": t["method"], "domain": t["domain"], "domain_tokens": t["domain_tokens"],
                     "seed": t["seed"], "loss": loss})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--sweep", default="main")
    a = ap.parse_args()
    layout = RunLayout(a.run)
    pt = pd.read_csv(join(layout.report, PERPLEXITY_TABLE))
    macro = pt[pt["domain"] == "(macro)"]
    cols = sorted({(int(t), int(b)) for t, b in zip(macro["domain_tokens"], macro["budget_steps"])})
    print("| method | " + " | ".join(f"{t} tok, {b} steps" for t, b in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for m, g in macro.groupby("method", sort=False):
        cells = []
        for t, b in cols:
            c = g[(g["domain_tokens"] == t) & (g["budget_steps"] == b)]
            cells.append(f"{c['mean'].iloc[0]:.2f} ± {c['std'].iloc[0]:.2f}" if len(c) else "")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print()
    for dom, g in pt[pt["domain"] != "(macro)"].groupby("domain"):
        best = g.loc[g.groupby(["domain_tokens", "budget_steps"])["mean"].idxmin()]
        print(f"{dom}: best per column: " + ", ".join(
            f"{int(r.domain_tokens)}/{int(r.budget_steps)}: {r.method} {r['mean']:.2f}" for _, r in best.iterrows()))
    po = pretrained_only(layout, a.sweep)
    if len(po):
        print("\npretrained only (step-0 domain valid ppl, macro over domains, mean over seeds):")
        agg = po.groupby(["method", "domain"])["loss"].mean().groupby("method").mean()
        print(", ".join(f"{m} {math.exp(v):.1f}" for m, v in agg.sort_values().items()))
    costs = pd.read_csv(join(layout.report, METHOD_COSTS))
    keep = [c for c in costs.columns if c in ("method", "domain_tokens", "budget_steps", "c_pretrain_flops",
                                                "c_spec_flops", "inference_params")]
    print("\ncosts (per domain; FLOPs):")
    print(costs[keep].drop_duplicates().to_string(index=False))


if __name__ == "__main__":
    main()
