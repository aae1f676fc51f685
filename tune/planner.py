"""`slm plan`: which method to use for given budgets, and the perplexity to expect.

Budgets (all > 0), compute budgets in the cost unit asked for (``--cost-unit``: measured
FLOPs, or measured device-hours, which show what FLOPs hide, e.g. pn's slower pretraining):
  * pretrain_budget: pretraining cost per domain once shared pretraining is amortised over the
    N domains, i.e. a method fits when C_pretrain / N <= pretrain_budget (paper Eq. 1: shared
    pretraining is paid once for all N domains);
  * specialize_budget: cost per domain for specialization, fine-tuning to its best validation
    step as the paper counts it (SLM-is's own pretraining counts here, as in the paper's
    Table 3: one run per domain *and* domain size, charged to the measured point of that size
    only, tune/costs.py; expert selection by lowest loss is charged);
  * inference_budget: the most parameters the served model may have.

From measured results (a sweep's results.parquet): each method's measured points
(specialization budget x pretraining level x domain size) are turned into a prediction at the
budgets. At a domain size: linear in log-cost along specialization cost at each pretraining
level, then along amortised pretraining cost across levels, over the non-increasing envelope
of the macro *valid* NLL (more budget never hurts: early stopping keeps the best valid
checkpoint); the test NLL is predicted with the same weights. Across sizes: linear in log
tokens between the two measured sizes around the requested one (outside them: the nearest).
Methods are ranked by predicted valid NLL (what one can measure before testing) and the
recommendation states the predicted test perplexity. A method fits when its cheapest measured
point fits; a budget beyond the largest measured point predicts that point's value (no
extrapolation); budgets below every measured point give no recommendation and say so. The
evidence (the points each prediction used) is returned with the recommendation, and
``leave_one_cell_out`` measures the planner's own accuracy on a results table.

Without results, the paper's findings are used (tune/paper_findings.py: Table 8 / Table 3 /
Table 4, the decision chart of Fig. 1), with its GPU-hours converted to FLOPs under a stated
assumption; the result says which source it used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from slm.configkit import ConfigError
from slm.errors import InputError
from slm.layout import RunLayout
from slm.stage import exists

from . import paper_findings as paper
from .costs import load_pretrain_costs, method_costs
from .methods import METHODS, Method, get_method
from .results import check_one_recipe, find_results, read_results
from .units import cost_unit


@dataclass
class Candidate:
    """One method's prediction at the budgets, or why it does not fit."""

    method: str
    fits: bool
    predicted_nll: float | None = None  # test NLL
    predicted_valid_nll: float | None = None  # what the ranking uses (measured results)
    predicted_text: str = ""  # e.g. '< 14.50' when the source gives only a bound
    reason: str = ""
    evidence: list[dict[str, Any]] = field(default_factory=list)
    limit: str = ""  # why it does not fit: 'inference' or 'budget'

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
    accuracy: dict[str, Any] | None = None  # leave_one_cell_out on the results used


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------

def envelope_weights(points: list[tuple[float, float]], x: float) -> list[tuple[int, float]] | None:
    """Weights (index, weight) of ``points`` (cost, nll) that give the value at cost ``x`` of
    their non-increasing envelope, linear in log-cost; None when ``x`` is below the cheapest
    point. Beyond the largest cost: that envelope point (no extrapolation)."""
    if not points:
        return None
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
        return None
    if x >= costs[-1]:
        return [(arg[-1], 1.0)]
    j = max(k for k in range(len(costs)) if costs[k] <= x)
    if costs[j] <= 0 or costs[j + 1] == costs[j] or arg[j] == arg[j + 1]:
        # from a zero cost (is/nopt pretraining) there is no log-scale to interpolate on: below
        # the next point only the zero-cost point is affordable (any unit: FLOPs or hours < 1)
        return [(arg[j], 1.0)]
    lo, hi = math.log(costs[j]), math.log(costs[j + 1])
    w = (math.log(x) - lo) / (hi - lo)
    return [(arg[j], 1.0 - w), (arg[j + 1], w)]


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float | None, list[int]]:
    """Value at cost ``x`` of the non-increasing envelope of ``points`` (cost, nll), linear in
    log-cost; (None, []) when ``x`` is below the cheapest point. Also returns the indices of the
    points the value came from."""
    w = envelope_weights(points, x)
    if w is None:
        return None, []
    return sum(points[i][1] * wi for i, wi in w), sorted(i for i, _ in w)


def _check_budgets(pretrain_budget: float, specialize_budget: float, inference_budget: float,
                   domains: int, domain_tokens: float) -> None:
    for flag, v in (("--pretrain-budget", pretrain_budget), ("--specialize-budget", specialize_budget),
                    ("--inference-budget", inference_budget), ("--domain-tokens", domain_tokens)):
        if v is None or not math.isfinite(float(v)) or float(v) <= 0:
            raise ConfigError(f"{flag} is {v}; budgets and sizes must be finite numbers > 0 "
                              "(FLOPs or device-hours (--cost-unit) for the compute budgets, "
                              "parameters for inference, tokens for the domain size)")
    if int(domains) != domains or int(domains) < 1:
        raise ConfigError(f"--domains is {domains}; the number of domains N must be an integer >= 1")


# --------------------------------------------------------------------------------------------
# From measured results: 2-D (pretraining x specialization cost) per domain size, then across
# domain sizes (log tokens); select on valid NLL, predict test NLL with the same weights
# --------------------------------------------------------------------------------------------

@dataclass
class Measured:
    """One method's measured points: {domain size: [(C_pretrain, [(C_spec, valid, test, row)])]}
    (one inner list per pretraining level), in one cost unit."""

    params: int
    sizes: dict[int, list[tuple[float, list[tuple[float, float, float, dict]]]]]


def measured_levels(mc: pd.DataFrame, unit: str = "flops") -> dict[str, Measured]:
    """Per method, its points (``method_costs`` rows) in the cost unit ``unit``
    (tune/costs.py COST_UNITS): the pandas work done once (the decision chart asks many budgets)."""
    u = cost_unit(unit)
    out = {}
    for method, g in mc.groupby("method", sort=True):
        sizes = {}
        for t, tg in g.groupby("domain_tokens", sort=True):
            levels = []
            for _, lg in tg.groupby("pretrain_level", sort=True):
                pts = [(float(r[u.spec]), float(r["macro_valid_nll"]), float(r["macro_nll"]), r)
                       for r in lg.to_dict("records")]
                levels.append((float(lg[u.pretrain].mean()), pts))
            sizes[int(t)] = levels
        out[method] = Measured(int(g["inference_params"].max()), sizes)
    return out


def _at_size(levels, pretrain_budget: float, specialize_budget: float, domains: int
             ) -> tuple[tuple[float, float, list[dict]] | None, str]:
    """(valid, test, rows used) at the budgets from one domain size's levels, or (None, why)."""
    fitted = []  # per level: (amortised pretraining, valid, test, rows)
    for pre, pts in levels:
        w = envelope_weights([(c, v) for c, v, _, _ in pts], specialize_budget)
        if w is not None:
            fitted.append((pre / domains, sum(pts[i][1] * x for i, x in w),
                           sum(pts[i][2] * x for i, x in w), [pts[i][3] for i, _ in w]))
    if not fitted:
        need = min(c for _, pts in levels for c, _, _, _ in pts)
        return None, f"needs >= {need:.3g} specialization per domain (cheapest measured point)"
    w = envelope_weights([(a, v) for a, v, _, _ in fitted], pretrain_budget)
    if w is None:
        need = min(a for a, _, _, _ in fitted)
        return None, (f"needs >= {need:.3g} pretraining per domain (C_pretrain/N, N={domains}; "
                      "cheapest measured level)")
    return (sum(fitted[i][1] * x for i, x in w), sum(fitted[i][2] * x for i, x in w),
            [r for i, _ in w for r in fitted[i][3]]), ""


def predict(m: Measured, pretrain_budget: float, specialize_budget: float, domains: int,
            domain_tokens: float) -> tuple[tuple[float, float, list[dict]] | None, str]:
    """(valid NLL, test NLL, rows used) of one method at the budgets and domain size, or
    (None, why): at each measured size bracketing ``domain_tokens`` the 2-D prediction, then
    linear in log tokens between the two (outside the measured sizes: the nearest one)."""
    sizes = sorted(m.sizes)
    lo = max([t for t in sizes if t <= domain_tokens], default=sizes[0])
    hi = min([t for t in sizes if t >= domain_tokens], default=sizes[-1])
    a, why_a = _at_size(m.sizes[lo], pretrain_budget, specialize_budget, domains)
    if hi == lo:
        return a, why_a
    b, why_b = _at_size(m.sizes[hi], pretrain_budget, specialize_budget, domains)
    if a is None or b is None:  # one bracketing size is out of budget: the other alone
        return (a or b), (why_a or why_b) if (a or b) is None else ""
    w = (math.log(domain_tokens) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return ((1 - w) * a[0] + w * b[0], (1 - w) * a[1] + w * b[1], a[2] + b[2]), ""


def rank_levels(levels: dict[str, Measured], pretrain_budget: float, specialize_budget: float,
                inference_budget: float, domains: int, domain_tokens: float) -> list[Candidate]:
    """Every method's candidate at the budgets (see the module doc): fitting methods first,
    ordered by predicted *valid* NLL (what a practitioner can measure), each with its predicted
    test NLL."""
    cands = []
    for method, m in levels.items():
        if m.params > inference_budget:
            cands.append(Candidate(method, False, reason=f"serves {m.params:,} params > inference "
                                   f"budget {inference_budget:,.0f}", limit="inference"))
            continue
        p, why = predict(m, pretrain_budget, specialize_budget, domains, domain_tokens)
        if p is None:
            cands.append(Candidate(method, False, reason=why, limit="budget"))
            continue
        valid, test, rows = p
        cands.append(Candidate(method, True, predicted_nll=test, predicted_valid_nll=valid,
                               predicted_text=f"{math.exp(test):.2f}", reason="fits",
                               evidence=[_point(r, domains) for r in rows]))
    cands.sort(key=lambda c: (not c.fits, c.predicted_valid_nll if c.predicted_valid_nll is not None
                              else math.inf, c.method))
    return cands


def rank_measured(mc: pd.DataFrame, pretrain_budget: float, specialize_budget: float,
                  inference_budget: float, domains: int, domain_tokens: float, unit: str = "flops"
                  ) -> list[Candidate]:
    """Every method's candidate at the budgets from ``method_costs`` rows, best first."""
    return rank_levels(measured_levels(mc, unit), pretrain_budget, specialize_budget,
                       inference_budget, domains, domain_tokens)


def _point(r: dict, domains: int) -> dict[str, Any]:
    return {"method": r["method"], "budget_steps": int(r["budget_steps"]),
            "domain_tokens": int(r["domain_tokens"]), "pretrain_level": float(r["pretrain_level"]),
            "c_pretrain_flops": float(r["c_pretrain_flops"]),
            "c_pretrain_hours": float(r["c_pretrain_hours"]),
            "c_pretrain_flops_per_domain": float(r["c_pretrain_flops"]) / domains,
            "c_spec_flops": float(r["c_spec_flops"]), "c_spec_hours": float(r["c_spec_hours"]),
            "macro_valid_nll": float(r["macro_valid_nll"]), "macro_ppl": float(r["macro_ppl"]),
            "domains": r["domains"], "n_seeds": int(r["n_seeds"]),
            "n_pretrain_seeds": int(r.get("n_pretrain_seeds", 1))}


def below_every_point(mc: pd.DataFrame, pretrain_budget: float, specialize_budget: float,
                      inference_budget: float, domains: int, unit: str = "flops") -> str:
    """A sentence when the budgets are below every measured point of every method that fits
    the inference budget (nothing to interpolate from: no recommendation), else ''."""
    u = cost_unit(unit)
    ok = mc[mc["inference_params"] <= inference_budget]
    if ok.empty:
        return ""
    fits = ok[(ok[u.pretrain] / domains <= pretrain_budget) & (ok[u.spec] <= specialize_budget)]
    if len(fits):
        return ""
    return (f"the budgets (pretraining {pretrain_budget:.3g}, specialization {specialize_budget:.3g} "
            f"{u.label} per domain) are below every measured point: the cheapest measured "
            f"pretraining is {float((ok[u.pretrain] / domains).min()):.3g} per domain (N={domains}) "
            f"and the cheapest specialization {float(ok[u.spec].min()):.3g}; the planner does not "
            "extrapolate below what was measured, so it makes no recommendation")


# --------------------------------------------------------------------------------------------
# The planner's own accuracy: leave one cell out
# --------------------------------------------------------------------------------------------

CELL_KEY = ("domain_tokens", "budget_steps", "pretrain_level")


def leave_one_cell_out(mc: pd.DataFrame, unit: str = "flops", inference_budget: float = math.inf,
                       domains: int = 1) -> dict[str, Any]:
    """Leave-one-cell-out accuracy of the measured planner over ``method_costs`` rows.

    A cell is one (domain size, specialization budget, pretraining level) of the sweep. Each
    cell in turn is removed from the table; every method measured in it (and serving at most
    ``inference_budget`` params) is predicted at its own measured costs of that cell from the
    remaining cells. The planner's pick is the lowest predicted valid NLL; the measured best is
    the lowest measured test NLL in the cell. Reported: cells, cells with a pick (a cell whose
    methods all sit below the remaining points cannot be predicted: no extrapolation), the
    fraction of picked cells where the pick is the measured best, and the median |predicted -
    measured| test perplexity over every predicted (cell, method)."""
    u = cost_unit(unit)
    mc = mc[mc["inference_params"] <= inference_budget]
    cells, errors, hits, picked = [], [], 0, 0
    for key, cell in mc.groupby(list(CELL_KEY), sort=True):
        rest = mc[~(mc[list(CELL_KEY)] == pd.Series(key, index=list(CELL_KEY))).all(axis=1)]
        levels = measured_levels(rest, unit) if len(rest) else {}
        preds = {}
        for r in cell.to_dict("records"):
            m = levels.get(r["method"])
            if m is None:
                continue
            p, _ = predict(m, float(r[u.pretrain]) / domains, float(r[u.spec]), domains,
                           float(r["domain_tokens"]))
            if p is not None:
                preds[r["method"]] = p
                errors.append(abs(math.exp(p[1]) - float(r["macro_ppl"])))
        best = cell.loc[cell["macro_nll"].idxmin(), "method"]
        pick = min(preds, key=lambda k: preds[k][0]) if preds else None
        picked += pick is not None
        hits += pick == best
        cells.append({**dict(zip(CELL_KEY, (int(key[0]), int(key[1]), float(key[2])))),
                      "measured_best": best, "pick": pick,
                      "predicted_ppl": {k: math.exp(v[1]) for k, v in preds.items()},
                      "measured_ppl": dict(zip(cell["method"], cell["macro_ppl"].astype(float)))})
    return {"cost_unit": u.name, "inference_budget": inference_budget, "domains": domains,
            "cells": len(cells), "cells_predicted": picked,
            "pick_accuracy": hits / picked if picked else None,
            "median_abs_ppl_error": float(np.median(errors)) if errors else None,
            "predictions": len(errors), "per_cell": cells}


def format_accuracy(acc: dict[str, Any]) -> str:
    """One line: the planner's leave-one-cell-out accuracy."""
    if not acc["cells_predicted"]:
        return (f"planner accuracy (leave one cell out, {acc['cost_unit']}): no cell could be "
                f"predicted from the others ({acc['cells']} cells)")
    return (f"planner accuracy (leave one cell out, {acc['cost_unit']}): picked the measured-best "
            f"method in {acc['pick_accuracy']:.0%} of {acc['cells_predicted']} predictable cells "
            f"(of {acc['cells']}); median |predicted - measured| perplexity "
            f"{acc['median_abs_ppl_error']:.3g} over {acc['predictions']} predictions")


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
         domains: int = 1, domain_tokens: float = 1e6, results: str = "", run: str = "",
         unit: str = "flops") -> PlanResult:
    """Recommend a method for the budgets (see the module doc): from ``results`` (a
    results.parquet) or the sweeps of ``run``, else from the paper's findings. ``unit``: the
    compute budgets' unit ('flops' or 'device-hours', tune/costs.py COST_UNITS)."""
    u = cost_unit(unit)
    _check_budgets(pretrain_budget, specialize_budget, inference_budget, domains, domain_tokens)
    budgets = {"pretrain_per_domain": float(pretrain_budget),
               "specialize_per_domain": float(specialize_budget), "cost_unit": u.name,
               "inference_params": float(inference_budget), "domains": int(domains),
               "domain_tokens": float(domain_tokens)}
    accuracy = None
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
        cands = rank_measured(mc, pretrain_budget, specialize_budget, inference_budget,
                              int(domains), domain_tokens, u.name)
        used = float(domain_tokens)
        source, detail = "measured", f"measured results of recipe '{recipe}': {', '.join(paths)}"
        measured = sorted(set(int(t) for t in mc["domain_tokens"]))
        if not measured[0] <= domain_tokens <= measured[-1]:
            used = float(min(measured, key=lambda t: abs(math.log(t) - math.log(domain_tokens))))
            notes.append(f"domain size: {domain_tokens:,.0f} tokens requested is outside the "
                         f"measured sizes ({', '.join(f'{t:,}' for t in measured)}); the nearest, "
                         f"{used:,.0f}, was used (no extrapolation)")
        else:
            notes.append(f"domain size: interpolated in log tokens between the measured sizes "
                         f"({', '.join(f'{t:,}' for t in measured)})")
        below = below_every_point(mc, pretrain_budget, specialize_budget, inference_budget,
                                  int(domains), u.name)
        if below:  # then no method fits either (each needs one of its points within budget)
            notes.append(below)
        notes.append(f"costs are measured {u.label} (C_pretrain, and C_specialize per domain to the "
                     "best validation step, averaged over domains and seeds); methods are ranked "
                     "by predicted macro valid NLL; the perplexity shown is the predicted macro "
                     f"test perplexity over {', '.join(sorted(set(df['domain'])))}")
        accuracy = leave_one_cell_out(mc, u.name, inference_budget, int(domains))
        notes.append(format_accuracy(accuracy))
    else:
        if u.name != "flops":
            raise ConfigError(f"--cost-unit {u.name} needs measured results (--results or --run): "
                              "the paper's numbers are planned in FLOPs (its GPU-hours converted "
                              "under a stated assumption); use --cost-unit flops")
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
                      domain_tokens_used=used, candidates=cands, notes=notes, accuracy=accuracy)


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
    unit = cost_unit(b["cost_unit"]).label
    lines.append(f"budgets: pretraining {b['pretrain_per_domain']:.3g} {unit} per domain, "
                 f"specialization {b['specialize_per_domain']:.3g} {unit} per domain, "
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
