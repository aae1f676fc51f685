"""Summarize a finished sweep for the study README, from the run's own files (nothing typed):

* macro test perplexity of the final pretrained models per method × domain size × budget
  (mean ± std over every pair of pretraining and fine-tuning seed: the report's table);
* macro test perplexity per method × pretraining level at each (domain size, budget): the
  pretraining-budget axis;
* the pretrained-only domain perplexity per method × level (each trial's step-0 valid
  evaluation, before fine-tuning);
* each family's generic valid loss over its pretraining (the small model's flattening check:
  last evaluation vs the one 25 % of the steps earlier);
* how many trials stopped before their budget and where their best step was.

    .venv/bin/python scripts/study_findings.py --run runs/study [--sweep main]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import struct

import pandas as pd
from tensorboardX.proto import event_pb2

from slm.layout import TRIAL_TRAINING, RunLayout
from slm.stage import join
from slm.config import load_run_recipe
from slm.tune.costs import TRIAL_KEY, one_row_per_trial, with_levels
from slm.tune.report import PERPLEXITY_TABLE, load_report_inputs


def trainings(layout: RunLayout, sweep: str) -> pd.DataFrame:
    """Every published trial's training.json as a row (its step-0 valid loss too)."""
    rows = []
    pattern = join(RunLayout(glob.escape(layout.root)).sweep(sweep), "trials", "*", TRIAL_TRAINING)
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            t = json.load(f)
        hist = t.get("history") or []
        first = hist[0] if hist else None
        step0 = float(first[1]) if isinstance(first, (list, tuple)) and int(first[0]) == 0 else math.nan
        rows.append({k: t.get(k) for k in TRIAL_KEY + ("test_loss", "best_step", "steps_run")}
                    | {"step0_loss": step0})
    return with_levels(pd.DataFrame(rows))


def macro_table(pt: pd.DataFrame) -> list[str]:
    macro = pt[pt["domain"] == "(macro)"]
    cols = sorted({(int(t), int(b)) for t, b in zip(macro["domain_tokens"], macro["budget_steps"])})
    out = ["| method | " + " | ".join(f"{t:,} tok, {b} steps" for t, b in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for m, g in macro.groupby("method", sort=False):
        cells = []
        for t, b in cols:
            c = g[(g["domain_tokens"] == t) & (g["budget_steps"] == b)]
            best = macro[(macro["domain_tokens"] == t) & (macro["budget_steps"] == b)]["mean"].min()
            if not len(c):
                cells.append("–")
                continue
            txt = f"{c['mean'].iloc[0]:.1f} ± {c['std'].iloc[0]:.1f}"
            cells.append(f"**{txt}**" if c["mean"].iloc[0] == best else txt)
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    n = sorted(set(macro["n_seeds"].astype(int)))
    out.append(f"\n(seed pairs per cell: {', '.join(map(str, n))}; bold: lowest in its column)")
    return out


def levels_table(trials: pd.DataFrame) -> list[str]:
    """Macro test ppl (exp of the mean over domains of the mean NLL over seed pairs) per method
    × level, one column per (size, budget)."""
    cols = sorted({(int(t), int(b)) for t, b in zip(trials["domain_tokens"], trials["budget_steps"])})
    levels = sorted(trials["pretrain_level"].unique())
    out = ["| method | level | " + " | ".join(f"{t:,} tok, {b} steps" for t, b in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for m, g in trials.groupby("method", sort=False):
        for lv in levels:
            gl = g[g["pretrain_level"] == lv]
            if not len(gl):
                continue
            cells = []
            for t, b in cols:
                c = gl[(gl["domain_tokens"] == t) & (gl["budget_steps"] == b)]
                cells.append(f"{math.exp(c.groupby('domain')['test_loss'].mean().mean()):.1f}"
                             if len(c) else "–")
            out.append(f"| {m} | {lv:g} | " + " | ".join(cells) + " |")
    return out


def valid_losses(tb_dir: str) -> dict[int, float]:
    """{step: generic valid loss} from a pretraining run's TensorBoard event files (the
    ``valid/loss`` scalars the training loop logs; a resumed run's later file wins)."""
    out: dict[int, float] = {}
    for path in sorted(glob.glob(join(glob.escape(tb_dir), "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            n = struct.unpack("<Q", data[i:i + 8])[0]
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                if v.tag == "valid/loss":
                    out[int(ev.step)] = float(v.simple_value)
    return out


def pretraining_curves(layout: RunLayout) -> list[str]:
    """Generic valid loss of each pretraining run over its steps, and the flattening figure:
    the last evaluation against the one 25 % of the steps earlier."""
    out = []
    for tb in sorted(glob.glob(join(glob.escape(layout.root), "pretrain", "**", "tensorboard"),
                               recursive=True)):
        losses = valid_losses(tb)
        if len(losses) < 2:
            continue
        steps = sorted(losses)
        last = steps[-1]
        earlier = max((s for s in steps if s <= 0.75 * last), default=steps[0])
        drop = (losses[earlier] - losses[last]) / losses[earlier]
        rel = tb[len(layout.root):].strip("/").rsplit("/tensorboard", 1)[0]
        out.append(f"{rel}: generic valid loss {losses[steps[0]]:.3f} (step {steps[0]}), "
                   f"{losses[earlier]:.3f} (step {earlier}), {losses[last]:.3f} (step {last}): "
                   f"{100 * drop:.2f} % lower over the last 25 % of the steps")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--sweep", default="main")
    a = ap.parse_args()
    layout = RunLayout(a.run)
    pt = pd.read_csv(join(layout.report, PERPLEXITY_TABLE))
    print("## Macro test perplexity, final pretrained models (level 1)\n")
    print("\n".join(macro_table(pt)))
    _, trials, _ = load_report_inputs(load_run_recipe(a.run))
    trials = one_row_per_trial(trials)
    print("\n## Macro test perplexity by pretraining level\n")
    print("\n".join(levels_table(trials)))
    tr = trainings(layout, a.sweep)
    if len(tr):
        po = tr.dropna(subset=["step0_loss"])
        agg = (po.groupby(["method", "pretrain_level", "domain"])["step0_loss"].mean()
               .groupby(["method", "pretrain_level"]).mean())
        print("\n## Pretrained only (step-0 domain valid perplexity, macro over domains)\n")
        for (m, lv), v in agg.items():
            print(f"- {m} level {lv:g}: {math.exp(v):.1f}")
        early = tr[tr["best_step"] < tr["steps_run"]]
        stopped = tr[tr["steps_run"] < tr["budget_steps"]]
        print(f"\n{len(tr)} trials; best valid step before the last in {len(early)} "
              f"({', '.join(sorted(early['method'].unique())) or 'none'}); stopped early in {len(stopped)}")
    curves = pretraining_curves(layout)
    if curves:
        print("\n## Pretraining: generic valid loss\n")
        print("\n".join(f"- {c}" for c in curves))


if __name__ == "__main__":
    main()
