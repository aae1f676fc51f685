"""The paper's findings (docs/paper.md §5, §3), evaluated on a run's results, not written by hand.

Each finding is a registry entry (``FINDINGS``): a comparison of macro test NLL between methods
(``beats``: A lower than B; ``erodes``: A's advantage over B shrinks from the smallest to the
largest domain size), or a finding these results cannot measure, with the reason.

Units of evidence: one unit is one (domain size, specialization budget, pretraining level,
pretraining seed, fine-tuning seed) where both sides are measured on every domain; its value is
the macro NLL (mean over domains). A method without pretraining (nopt) is paired with the other
side at every level and pretraining seed. The test is a one-sided exact **sign test** over the
units' paired differences (ties dropped), at ALPHA; units of one cell share data, so the test
is read as "consistent across seeds and cells", not as independent trials. Verdicts:

* reproduced: the paper's sign, significant;
* not reproduced: the opposite sign, significant, or no significant difference;
* not measurable here: a method or domain size is missing, or fewer than 2 pretraining seeds
  or 2 fine-tuning seeds (the issue's bar for a claim), or the results hold no such quantity.

Effect size: the median over units of the relative perplexity gap exp(NLL_B - NLL_A) - 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .costs import with_levels
from .methods import get_method
from .units import cost_unit

ALPHA = 0.05
MIN_SEEDS = 2  # pretraining seeds and fine-tuning seeds a verdict needs
UNIT = ("domain_tokens", "budget_steps", "pretrain_level", "pretrain_seed", "seed")
VERDICTS = ("reproduced", "not reproduced", "not measurable here")


@dataclass(frozen=True)
class Finding:
    """One claim of the paper and how it is checked."""

    id: str
    claim: str
    source: str  # where in docs/paper.md
    kind: str  # 'beats', 'erodes' or 'unmeasurable'
    a: str = ""
    b: tuple[str, ...] = ()  # B side: the best (lowest NLL) of these methods per unit
    where: str = ""  # 'smallest_size': only the smallest domain size
    reason: str = ""  # kind 'unmeasurable': why


FINDINGS = (
    Finding("fine_tuning_essential", "Fine-tuning is essential for every method", "§5 Table 8",
            "unmeasurable", reason="the results hold no pretrained-only (no fine-tuning) "
            "test perplexity: every trial fine-tunes (a trial's step-0 valid loss is in its "
            "training log only; scripts/study_findings.py lists it)"),
    Finding("pretraining_helps", "Pretraining on generic data beats training on the domain "
            "data alone (SLM vs SLM-nopt)", "§5 Table 4", "beats", "slm", ("nopt",)),
    Finding("large_model_wins", "The LLM beats the SLM after fine-tuning", "§5 Table 4, Table 8",
            "beats", "llm", ("slm",)),
    Finding("pn_beats_slm", "SLM-pn beats SLM at equal pretraining budget", "§5 Table 8, Fig. 4",
            "beats", "pn", ("slm",)),
    Finding("mix_beats_slm", "SLM-mix beats SLM at equal pretraining budget", "§5 Table 8, Fig. 4",
            "beats", "mix", ("slm",)),
    Finding("pn_erosion", "SLM-pn's advantage over SLM erodes as the domain data grows",
            "§5 key findings", "erodes", "pn", ("slm",)),
    Finding("mix_erosion", "SLM-mix's advantage over SLM erodes as the domain data grows",
            "§5 key findings", "erodes", "mix", ("slm",)),
    Finding("is_best_small", "SLM-is has the best fine-tuned perplexity of the small-inference "
            "methods", "§5 key findings", "beats", "is", ("slm", "mix", "pn", "d")),
    Finding("is_beats_llm_small_data", "With the least domain data, SLM-is beats the LLM",
            "§0, §5 key findings", "beats", "is", ("llm",), where="smallest_size"),
    Finding("distillation_not_worth", "SLM-pn beats SLM-d (distillation is not worth its "
            "teacher's pretraining)", "§3.3", "beats", "pn", ("d",)),
    Finding("preft_ranking", "The ranking before fine-tuning does not predict the ranking "
            "after", "§5 key findings", "unmeasurable", reason="the results hold no "
            "pretrained-only test perplexity to rank (step-0 valid losses are in the trials' "
            "training logs only)"),
    Finding("is_k_ablation", "SLM-is with k = 1024 clusters is best among k in {16, 64, 256, "
            "1024}", "§5, Fig. 10", "unmeasurable", reason="a run has one kmeans.k_is; the "
            "ablation needs one run per k"),
    Finding("mix_experts_ablation", "16 experts is the mixture's best trade-off (4 underfits)",
            "§5, Fig. 11", "unmeasurable", reason="a run has one kmeans.k_mix; the ablation "
            "needs one run per k"),
)


@dataclass
class Result:
    """A finding evaluated: the comparison, its sign, effect size, test and verdict."""

    id: str
    claim: str
    source: str
    comparison: str
    sign: str
    effect: str
    test: str
    verdict: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


def sign_test(k: int, n: int) -> float:
    """One-sided exact sign test: P(X >= k) for X ~ Binomial(n, 1/2)."""
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)


def unit_nll(trials: pd.DataFrame, method: str) -> pd.Series:
    """Macro test NLL per unit (UNIT) of ``method``: mean over domains, units measured on every
    domain of the table only. A method without pretraining is indexed without the level and
    pretraining seed (it is paired with every one of them)."""
    t = trials[trials["method"] == method]
    n_dom = trials["domain"].nunique()
    keys = list(UNIT) if get_method(method).pretrains else [k for k in UNIT if not k.startswith("pretrain_")]
    if t.empty:
        return pd.Series(dtype=float)
    g = t.groupby(keys + ["domain"])["test_loss"].mean().groupby(level=keys)
    full = g.count() == n_dom
    return g.mean()[full]


def _paired(trials: pd.DataFrame, a: str, bs: tuple[str, ...]) -> pd.DataFrame:
    """Columns a, b (B: best of ``bs`` per unit), indexed by unit; only units with both."""
    sa = unit_nll(trials, a).rename("a")
    sb = [unit_nll(trials, b) for b in bs]
    sb = [s for s in sb if len(s)]
    if not len(sa) or not sb:
        return pd.DataFrame(columns=["a", "b"])
    frames = []
    for s in sb:  # broadcast a method without pretraining over levels and pretraining seeds
        left, right = sa.to_frame(), s.rename("b").to_frame()
        on = [k for k in left.index.names if k in right.index.names]
        merged = left.reset_index().merge(right.reset_index(), on=on)
        frames.append(merged.set_index([k for k in UNIT if k in merged.columns]))
    both = pd.concat(frames)
    both = both.groupby(level=list(both.index.names)).agg({"a": "first", "b": "min"})
    return both


def _seeds(units: pd.DataFrame) -> tuple[int, int]:
    idx = units.index.to_frame(index=False)
    ps = int(idx["pretrain_seed"].nunique()) if "pretrain_seed" in idx else 1
    fs = int(idx["seed"].nunique()) if "seed" in idx else 1
    return ps, fs


def _verdict(diffs: np.ndarray, ps: int, fs: int) -> tuple[str, str, str, str]:
    """(sign, test, verdict, reason) from paired differences (positive: the paper's sign)."""
    n = int((diffs != 0).sum())
    k = int((diffs > 0).sum())
    p_for, p_against = sign_test(k, n), sign_test(n - k, n)
    sign = "as the paper" if k > n - k else "opposite" if k < n - k else "none"
    test = f"sign test: {k}/{n} units in the paper's direction, one-sided p = {p_for:.3g}"
    if ps < MIN_SEEDS or fs < MIN_SEEDS:
        return sign, test, "not measurable here", (
            f"a verdict needs >= {MIN_SEEDS} pretraining seeds and >= {MIN_SEEDS} fine-tuning "
            f"seeds; these units have {ps} and {fs}")
    if p_for < ALPHA:
        return sign, test, "reproduced", f"the paper's sign in {k} of {n} units (p < {ALPHA})"
    if p_against < ALPHA:
        return sign, test, "not reproduced", (f"the opposite sign in {n - k} of {n} units "
                                              f"(p = {p_against:.3g} < {ALPHA})")
    return sign, test, "not reproduced", f"no significant difference (p = {p_for:.3g} >= {ALPHA})"


def _missing(trials: pd.DataFrame, f: Finding) -> str:
    have = set(trials["method"])
    need = [f.a] + ([b for b in f.b if b not in have] if not (set(f.b) & have) else [])
    lack = [m for m in need if m not in have]
    return f"the results have no {', '.join(lack)} trials" if lack else ""


def _unmeasurable(f: Finding, comparison: str, reason: str) -> Result:
    return Result(f.id, f.claim, f.source, comparison, "-", "-", "-", "not measurable here", reason)


def _comparison(f: Finding) -> str:
    b = f.b[0] if len(f.b) == 1 else f"best of {', '.join(f.b)}"
    if f.kind == "erodes":
        return (f"relative ppl gap {b} / {f.a} - 1 at the smallest vs the largest domain size, "
                "per (budget, level, pretraining seed, seed)")
    at = " at the smallest domain size" if f.where == "smallest_size" else ""
    return f"macro test NLL of {f.a} < {b}{at}, paired per (size, budget, level, pretraining seed, seed)"


def evaluate_finding(trials: pd.DataFrame, f: Finding, unit: str = "flops") -> Result:
    """One finding on costed trials (tune/costs.py ``trial_costs``)."""
    cmp = _comparison(f) if f.kind != "unmeasurable" else "-"
    if f.kind == "unmeasurable":
        return _unmeasurable(f, cmp, f.reason)
    missing = _missing(trials, f)
    if missing:
        return _unmeasurable(f, cmp, missing)
    t = trials
    if f.where == "smallest_size":
        t = t[t["domain_tokens"] == t["domain_tokens"].min()]
    units = _paired(t, f.a, f.b)
    if units.empty:
        return _unmeasurable(f, cmp, "no (size, budget, level, seed) unit has both sides on every domain")
    ps, fs = _seeds(units)
    if f.kind == "beats":
        diffs = (units["b"] - units["a"]).to_numpy()
        gap = np.exp(diffs) - 1.0
        b = f.b[0] if len(f.b) == 1 else "best other"
        effect = f"ppl({b}) / ppl({f.a}) - 1 = {np.median(gap):+.1%} (median over {len(gap)} units)"
        detail = {"units": len(gap), "median_rel_gap": float(np.median(gap))}
    else:  # erodes: the gap at the smallest size minus the gap at the largest
        sizes = sorted(set(units.index.get_level_values("domain_tokens")))
        if len(sizes) < 2:
            return _unmeasurable(f, cmp, "needs >= 2 domain sizes measured for both methods")
        gap = (units["b"] - units["a"]).rename("gap").reset_index()
        keys = [k for k in UNIT if k != "domain_tokens"]
        lo = gap[gap["domain_tokens"] == sizes[0]].set_index(keys)["gap"]
        hi = gap[gap["domain_tokens"] == sizes[-1]].set_index(keys)["gap"]
        lo, hi = lo.align(hi, join="inner")
        if lo.empty:
            return _unmeasurable(f, cmp, "no unit is measured at both the smallest and largest size")
        diffs = (lo - hi).to_numpy()
        units = lo.to_frame()
        effect = (f"gap {np.median(np.exp(lo) - 1):+.1%} at {sizes[0]:,} tokens vs "
                  f"{np.median(np.exp(hi) - 1):+.1%} at {sizes[-1]:,} (medians over {len(lo)} units)")
        detail = {"units": len(lo), "gap_smallest": float(np.median(np.exp(lo) - 1)),
                  "gap_largest": float(np.median(np.exp(hi) - 1))}
    sign, test, verdict, reason = _verdict(diffs, ps, fs)
    detail.update({"pretrain_seeds": ps, "seeds": fs, "cost_unit": cost_unit(unit).name})
    return Result(f.id, f.claim, f.source, cmp, sign, effect, test, verdict, reason, detail)


def evaluate_findings(trials: pd.DataFrame, unit: str = "flops") -> list[Result]:
    """Every finding of ``FINDINGS`` on costed trials."""
    t = with_levels(trials)
    return [evaluate_finding(t, f, unit) for f in FINDINGS]


def summary(trials: pd.DataFrame) -> dict[str, Any]:
    """What the results cover (the findings table's header says it)."""
    t = with_levels(trials)
    return {"rows": int(len(t)), "methods": sorted(map(str, set(t["method"]))),
            "domains": sorted(map(str, set(t["domain"]))),
            "domain_tokens": sorted(int(x) for x in set(t["domain_tokens"])),
            "budget_steps": sorted(int(x) for x in set(t["budget_steps"])),
            "pretrain_levels": sorted(float(x) for x in set(t["pretrain_level"])),
            "pretrain_seeds": int(t["pretrain_seed"].nunique()), "seeds": int(t["seed"].nunique())}


def findings_markdown(results: list[Result], summ: dict[str, Any], command: str) -> str:
    """The findings table as markdown (what the README shows), with what it was computed on."""
    lines = [f"Generated by `{command}` on {summ['rows']} trials: methods "
             f"{', '.join(summ['methods'])}; domains {', '.join(summ['domains'])}; domain sizes "
             f"{', '.join(f'{x:,}' for x in summ['domain_tokens'])} tokens; budgets "
             f"{', '.join(map(str, summ['budget_steps']))} steps; pretraining levels "
             f"{', '.join(f'{x:g}' for x in summ['pretrain_levels'])}; "
             f"{summ['pretrain_seeds']} pretraining seed(s), {summ['seeds']} fine-tuning seed(s). "
             f"Test: one-sided exact sign test over paired units, alpha = {ALPHA}; a verdict needs "
             f">= {MIN_SEEDS} pretraining and fine-tuning seeds.", "",
             "| finding (paper) | comparison | sign | effect size | test | verdict |",
             "|---|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r.claim} ({r.source})", r.comparison, r.sign, r.effect, r.test,
                 f"**{r.verdict}**: {r.reason}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def findings_json(results: list[Result], summ: dict[str, Any], command: str) -> str:
    return json.dumps({"command": command, "summary": summ, "alpha": ALPHA, "min_seeds": MIN_SEEDS,
                       "findings": [r.__dict__ for r in results]}, indent=2, default=float)
