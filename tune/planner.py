"""`slm plan`: which method to use for given budgets, and the perplexity to expect.

Budgets (all > 0):
  * pretrain_budget: pretraining FLOPs per domain once shared pretraining is amortised over the
    N domains, i.e. a method fits when C_pretrain / N <= pretrain_budget (paper Eq. 1: shared
    pretraining is paid once for all N domains);
  * specialize_budget: FLOPs per domain for specialization (SLM-is's per-domain pretraining
    counts here, as in the paper's Table 3);
  * inference_budget: the most parameters the served model may have.

From measured results (a sweep's results.parquet): at the measured domain size nearest to the
requested one (log scale), each method's measured points (budget_steps x pretraining level) are
turned into a prediction at the budgets by interpolating the macro test NLL linearly in
log-cost, first along specialization cost, then along amortised pretraining cost, over the
non-increasing envelope of the points (more budget never hurts: early stopping keeps the best
valid checkpoint). A method fits when its cheapest measured point fits; a budget beyond the
largest measured point predicts that point's value (no extrapolation). The evidence (the points
each prediction used) is returned with the recommendation.

Without results, the paper's findings are used (tune/paper_findings.py: Table 8 / Table 3 /
Table 4, the decision chart of Fig. 1), with its GPU-hours converted to FLOPs under a stated
assumption; the result says which source it used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from slm.configkit import ConfigError
from slm.errors import InputError
from slm.layout import RunLayout
from slm.stage import exists

from . import paper_findings as paper
from .costs import load_pretrain_costs, method_costs
from .methods import METHODS, Method, get_method
from .results import check_one_recipe, find_results, read_results


@dataclass
class Candidate:
    """One method's prediction at the budgets, or why it does not fit."""

    method: str
    fits: bool
    predicted_nll: float | None = None
    predicted_text: str = ""  # e.g. '< 14.50' when the source gives only a bound
    reason: str = ""
    evidence: list[dict[str, Any]] = field(default_factory=list)

    @property
    def predicted_ppl(self) -> float | None:
        return math.exp(self.predicted_nll) if self.predicted_nll is not None else None


@dataclass
class PlanResult:
    """The recommendation, where it came from, and every method's standing."""

    method: str | None
    predicted_ppl: float | None
    predicted_text: str
    source: str  # 'measured' or 'paper'
    source_detail: str
    budgets: dict[str, float]
    domain_tokens_used: float
    candidates: list[Candidate]
    notes: list[str]


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------

def _log(x: float) -> float:
    return math.log(max(float(x), 1.0))  # a zero cost (is/nopt pretraining) sits at log 1 = 0


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float | None, list[int]]:
    """Value at cost ``x`` of the non-increasing envelope of ``points`` (cost, nll), linear in
    log-cost; (None, []) when ``x`` is below the cheapest point. Also returns the indices of the
    points the value came from."""
    if not points:
        return None, []
    order = sorted(range(len(points)), key=lambda i: points[i][0])
    env, arg = [], []
    for i in order:  # running minimum: the best point affordable at each cost
        if env and env[-1] <= points[i][1]:
            env.append(env[-1])
            arg.append(arg[-1])
        else:
            env.append(points[i][1])
            arg.append(i)
    costs = [points[i][0] for i in order]
    if x < costs[0]:
        return None, []
    if x >= costs[-1]:
        return env[-1], [arg[-1]]
    j = max(k for k in range(len(costs)) if costs[k] <= x)
    lo, hi = _log(costs[j]), _log(costs[j + 1])
    if hi == lo or env[j] == env[j + 1]:
        return env[j], [arg[j]]
    w = (_log(x) - lo) / (hi - lo)
    return env[j] + w * (env[j + 1] - env[j]), sorted({arg[j], arg[j + 1]})


def _check_budgets(pretrain_budget: float, specialize_budget: float, inference_budget: float,
                   domains: int, domain_tokens: float) -> None:
    for flag, v in (("--pretrain-budget", pretrain_budget), ("--specialize-budget", specialize_budget),
                    ("--inference-budget", inference_budget), ("--domain-tokens", domain_tokens)):
        if v is None or not math.isfinite(float(v)) or float(v) <= 0:
            raise ConfigError(f"{flag} is {v}; budgets and sizes must be finite numbers > 0 "
                              "(FLOPs for the compute budgets, parameters for inference, tokens "
                              "for the domain size)")
    if int(domains) != domains or int(domains) < 1:
        raise ConfigError(f"--domains is {domains}; the number of domains N must be an integer >= 1")


# --------------------------------------------------------------------------------------------
# From measured results
# --------------------------------------------------------------------------------------------

def nearest_size(mc: pd.DataFrame, domain_tokens: float) -> int:
    """The measured domain size nearest to ``domain_tokens`` in log scale."""
    return min(sorted(set(mc["domain_tokens"])), key=lambda t: abs(math.log(t) - math.log(domain_tokens)))


def measured_levels(mc: pd.DataFrame, domain_tokens: int) -> dict[str, tuple[int, list]]:
    """Per method at one domain size: (served params, [(C_pretrain, [(C_spec, nll, row)...])...]),
    the pandas work of ``rank_measured`` done once (the decision chart asks many budgets)."""
    out = {}
    at = mc[mc["domain_tokens"] == domain_tokens]
    for method, g in at.groupby("method", sort=True):
        levels = [(float(lvl), [(float(r["c_spec_flops"]), float(r["macro_nll"]), r) for _, r in lg.iterrows()])
                  for lvl, lg in g.groupby("c_pretrain_flops", sort=True)]
        out[method] = (int(g["inference_params"].max()), levels)
    return out


def rank_levels(levels: dict[str, tuple[int, list]], pretrain_budget: float, specialize_budget: float,
                inference_budget: float, domains: int) -> list[Candidate]:
    """Every method's candidate at the budgets (see the module doc), best first."""
    cands = []
    for method, (params, lvls) in levels.items():
        if params > inference_budget:
            cands.append(Candidate(method, False, reason=f"serves {params:,} params > inference "
                                   f"budget {inference_budget:,.0f}"))
            continue
        fitted = []  # (amortised pretraining, nll, rows used)
        for lvl, pts in lvls:
            v, idx = interpolate([(c, n) for c, n, _ in pts], specialize_budget)
            if v is not None:
                fitted.append((lvl / domains, v, [pts[i][2] for i in idx]))
        if not fitted:
            need = min(c for _, pts in lvls for c, _, _ in pts)
            cands.append(Candidate(method, False, reason=f"needs >= {need:.3g} specialization FLOPs "
                                   f"per domain (cheapest measured point) > budget {specialize_budget:.3g}"))
            continue
        v, idx = interpolate([(a, n) for a, n, _ in fitted], pretrain_budget)
        if v is None:
            need = min(a for a, _, _ in fitted)
            cands.append(Candidate(method, False, reason=f"needs >= {need:.3g} pretraining FLOPs per "
                                   f"domain (C_pretrain/N, N={domains}) > budget {pretrain_budget:.3g}"))
            continue
        cands.append(Candidate(method, True, predicted_nll=v, predicted_text=f"{math.exp(v):.2f}",
                               reason="fits", evidence=[(i, fitted) for i in idx]))
    for c in cands:  # evidence rows are only formatted for the candidates returned
        c.evidence = [_point(r, domains) for i, fitted in c.evidence for r in fitted[i][2]]
    cands.sort(key=lambda c: (not c.fits, c.predicted_nll if c.predicted_nll is not None else math.inf,
                              c.method))
    return cands


def rank_measured(mc: pd.DataFrame, pretrain_budget: float, specialize_budget: float,
                  inference_budget: float, domains: int, domain_tokens: float
                  ) -> tuple[list[Candidate], float]:
    """Every method's candidate at the budgets from ``method_costs`` rows, best first (fitting
    methods by predicted NLL), and the domain size used (nearest measured, log scale)."""
    used = nearest_size(mc, domain_tokens)
    cands = rank_levels(measured_levels(mc, used), pretrain_budget, specialize_budget,
                        inference_budget, domains)
    return cands, float(used)


def _point(r: pd.Series, domains: int) -> dict[str, Any]:
    return {"method": r["method"], "budget_steps": int(r["budget_steps"]),
            "domain_tokens": int(r["domain_tokens"]), "c_pretrain_flops": float(r["c_pretrain_flops"]),
            "c_pretrain_per_domain": float(r["c_pretrain_flops"]) / domains,
            "c_spec_flops": float(r["c_spec_flops"]), "macro_ppl": float(r["macro_ppl"]),
            "domains": r["domains"], "n_seeds": int(r["n_seeds"])}


def check_inference_budget(sizes: dict[str, float], inference_budget: float, where: str) -> None:
    """ConfigError listing the model sizes when no model fits the inference budget."""
    if inference_budget < min(sizes.values()):
        by_size: dict[float, list[str]] = {}
        for m, p in sizes.items():
            by_size.setdefault(float(p), []).append(m)
        listing = "; ".join(f"{p:,.0f} ({', '.join(sorted(ms))})" for p, ms in sorted(by_size.items()))
        raise ConfigError(f"--inference-budget {inference_budget:,.0f} params is smaller than every "
                          f"model in {where}; served parameters: {listing}. Raise it to at least "
                          f"{min(sizes.values()):,.0f}")


# --------------------------------------------------------------------------------------------
# From the paper
# --------------------------------------------------------------------------------------------

def rank_paper(pretrain_budget: float, specialize_budget: float, inference_budget: float,
               domains: int, domain_tokens: float) -> tuple[list[Candidate], float]:
    """Candidates from the paper's numbers (tune/paper_findings.py) for every method the paper
    reports (``Method.paper``), best first."""
    si = paper.size_index(domain_tokens)
    cands = [_paper_candidate(m, si, pretrain_budget, specialize_budget, inference_budget, domains)
             for m in METHODS.values() if m.paper]
    return _order_paper(cands, si), float(paper.DOMAIN_TOKENS[si])


def _paper_candidate(m: Method, si: int, pretrain_budget: float, specialize_budget: float,
                     inference_budget: float, domains: int) -> Candidate:
    """One method's standing from the paper, read as its ``paper`` field says."""
    g = paper.gpuh_to_flops
    method = m.name
    params = paper.INFERENCE_PARAMS[method]
    if params > inference_budget:
        return Candidate(method, False, reason=f"serves {params:,.0f} params > inference "
                         f"budget {inference_budget:,.0f} ({paper.CITE['table1']})")
    spec = g(paper.SPEC_GPUH[method][si])
    spec_ok = specialize_budget >= spec
    if m.paper == "table8":
        return _table8_candidate(method, si, spec_ok, pretrain_budget, domains)
    if not spec_ok:
        return Candidate(method, False, reason=(
            f"needs {paper.SPEC_GPUH[method][si]} GPUh = {spec:.3g} FLOPs of specialization per "
            f"domain ({paper.CITE['table3']}) > budget {specialize_budget:.3g}"))
    if m.paper == "table4":
        ppl = paper.NOPT_PPL[si]
        return Candidate(method, True, predicted_nll=math.log(ppl), predicted_text=f"{ppl:.2f}",
                         reason="fits", evidence=[{"method": method, "ppl": ppl,
                                                   "source": paper.CITE["table4"]}])
    if m.paper == "unreported":
        pre = g(paper.PRETRAIN_GPUH[method]) / domains
        if pre > pretrain_budget:
            return Candidate(method, False, reason=f"needs {paper.PRETRAIN_GPUH[method]} GPUh of "
                             f"{m.pretrain_note()} ({pre:.3g} FLOPs per domain) "
                             f"({paper.CITE['table3']})")
        return Candidate(method, False, reason=f"fits the budgets but has no perplexity "
                         f"to compare: {paper.CITE[method]}")
    bound = _bound(si)  # "bound": fits; the paper gives a bound, not a number
    return Candidate(method, True, predicted_nll=None, predicted_text=f"< {bound:.2f}",
                     reason="fits", evidence=[{"method": method, "ppl_bound": bound,
                                               "source": paper.CITE[method]}])


def _table8_candidate(method: str, si: int, spec_ok: bool, pretrain_budget: float,
                      domains: int) -> Candidate:
    g = paper.gpuh_to_flops
    col = 2 + si if spec_ok else 1  # below the fine-tuning cost: pretrained-only column
    pts = [(g(row[0]) / domains, math.log(row[col])) for row in paper.TABLE8[method]]
    v, idx = interpolate(pts, pretrain_budget)
    if v is None:
        return Candidate(method, False, reason=(
            f"the paper's cheapest pretraining ({paper.TABLE8[method][0][0]} GPUh = "
            f"{pts[0][0] * domains:.3g} FLOPs; {pts[0][0]:.3g} per domain at N={domains}) "
            f"exceeds the budget ({paper.CITE['table8']})"))
    evidence = [{"method": method, "pretrain_gpuh": paper.TABLE8[method][i][0],
                 "column": ["no fine-tuning", "FT 1M", "FT 8M", "FT 64M"][col - 1],
                 "ppl": paper.TABLE8[method][i][col], "source": paper.CITE["table8"]}
                for i in idx]
    why = "fits" if spec_ok else (f"specialization budget < the paper's fine-tuning cost "
                                  f"({paper.SPEC_GPUH[method][si]} GPUh, {paper.CITE['table3']}): "
                                  "pretrained-only perplexity")
    return Candidate(method, True, predicted_nll=v, predicted_text=f"{math.exp(v):.2f}",
                     reason=why, evidence=evidence)


def _bound(si: int) -> float:
    """The perplexity bound of a ``bound`` method (SLM-is): at 1M it beats the best large
    model; at every size it beats every small-inference method (paper.md §5): the best Table 8
    fine-tuned value of those."""
    table8 = [m for m in METHODS.values() if m.paper == "table8"]
    small = min(row[2 + si] for m in table8 if not m.serves_large for row in paper.TABLE8[m.name])
    if si == 0:
        return min(small, min(row[2] for m in table8 if m.serves_large for row in paper.TABLE8[m.name]))
    return small


def _order_paper(cands: list[Candidate], si: int) -> list[Candidate]:
    """Best first. A bound (SLM-is) ranks first among small-inference methods when it fits; a
    large model ranks above it only beyond 1M tokens (the decision chart: large inference
    budget -> large model; at 1M SLM-is beats the LLM)."""
    fit = [c for c in cands if c.fits]
    rest = [c for c in cands if not c.fits]
    numeric = sorted([c for c in fit if c.predicted_nll is not None], key=lambda c: c.predicted_nll)
    bounds = [c for c in fit if get_method(c.method).paper == "bound"]
    if bounds:
        large = [c for c in numeric if get_method(c.method).serves_large]
        others = [c for c in numeric if not get_method(c.method).serves_large]
        if large and si > 0:
            numeric = large + bounds + others
        else:
            numeric = bounds + large + others
    return numeric + sorted(rest, key=lambda c: c.method)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def plan(pretrain_budget: float, specialize_budget: float, inference_budget: float,
         domains: int = 1, domain_tokens: float = 1e6, results: str = "", run: str = "") -> PlanResult:
    """Recommend a method for the budgets (see the module doc): from ``results`` (a
    results.parquet) or the sweeps of ``run``, else from the paper's findings."""
    _check_budgets(pretrain_budget, specialize_budget, inference_budget, domains, domain_tokens)
    budgets = {"pretrain_flops_per_domain": float(pretrain_budget),
               "specialize_flops_per_domain": float(specialize_budget),
               "inference_params": float(inference_budget), "domains": int(domains),
               "domain_tokens": float(domain_tokens)}
    notes = [(f"pretraining is amortised over N = {int(domains)} domains: a method fits when "
             f"C_pretrain / N <= the pretraining budget ({paper.CITE['amortization']})")]
    paths = [results] if results else (find_results(run) if run else [])
    if results and not exists(results):
        raise InputError(f"--results '{results}' does not exist; pass a sweep's results.parquet "
                         "(RUN/specialize/<sweep>/results.parquet) or leave it out")
    if paths:
        tables = {p: read_results(p) for p in paths}
        recipe = check_one_recipe(tables)
        df = pd.concat(tables.values(), ignore_index=True)
        pc = load_pretrain_costs(run) if run else None
        mc = method_costs(df, pc)
        sizes = mc.groupby("method")["inference_params"].max().to_dict()
        check_inference_budget(sizes, inference_budget, f"the results ({', '.join(paths)})")
        cands, used = rank_measured(mc, pretrain_budget, specialize_budget, inference_budget,
                                    int(domains), domain_tokens)
        source, detail = "measured", f"measured results of recipe '{recipe}': {', '.join(paths)}"
        if used != domain_tokens:
            notes.append(f"domain size: {domain_tokens:,.0f} tokens requested; the nearest measured "
                         f"size {used:,.0f} was used (sizes measured: "
                         f"{', '.join(f'{t:,}' for t in sorted(set(mc['domain_tokens'])))})")
        notes.append("costs are measured FLOPs (C_pretrain, and C_specialize per domain averaged "
                     "over domains and seeds); perplexity is the macro average over "
                     f"{', '.join(sorted(set(df['domain'])))}")
    else:
        check_inference_budget({m: p for m, p in paper.INFERENCE_PARAMS.items()}, inference_budget,
                               "the paper (Table 1)")
        cands, used = rank_paper(pretrain_budget, specialize_budget, inference_budget, int(domains),
                                 domain_tokens)
        why = (f"no sweep results under {RunLayout(run).path('specialize')}" if run
               else "no --results or --run given")
        source, detail = "paper", f"the paper's findings ({why}); {paper.CONVERSION_NOTE}"
        notes.append(f"domain size: the paper's nearest size {used:,.0f} tokens was used")
        notes.append(paper.CITE["chart"])
    best = next((c for c in cands if c.fits), None)
    if best is None:
        notes.append("no method fits these budgets; see each method's reason above")
    return PlanResult(method=best.method if best else None,
                      predicted_ppl=best.predicted_ppl if best else None,
                      predicted_text=best.predicted_text if best else "",
                      source=source, source_detail=detail, budgets=budgets,
                      domain_tokens_used=used, candidates=cands, notes=notes)


def format_plan(result: PlanResult) -> str:
    """The plan as text for the terminal: recommendation, source, candidates, evidence."""
    b = result.budgets
    lines = []
    if result.method:
        lines.append(f"recommended method: {result.method}  (predicted macro perplexity "
                     f"{result.predicted_text})")
    else:
        lines.append("recommended method: none fits the budgets")
    lines.append(f"source: {result.source} - {result.source_detail}")
    lines.append(f"budgets: pretraining {b['pretrain_flops_per_domain']:.3g} FLOPs per domain, "
                 f"specialization {b['specialize_flops_per_domain']:.3g} FLOPs per domain, "
                 f"inference <= {b['inference_params']:,.0f} params, N = {b['domains']} domains, "
                 f"{b['domain_tokens']:,.0f} domain tokens (used: {result.domain_tokens_used:,.0f})")
    lines.append("candidates (best first):")
    for c in result.candidates:
        pred = c.predicted_text or "-"
        lines.append(f"  {c.method:<5} {pred:>9}  {c.reason}")
    lines.append("evidence:")
    for c in result.candidates:
        for e in c.evidence:
            lines.append("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in e.items()))
    lines.append("notes:")
    lines.extend(f"  - {n}" for n in result.notes)
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
