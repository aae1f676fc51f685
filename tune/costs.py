"""The cost model: what each method costs to pretrain, to specialize per domain, and to serve.

Paper Eq. 1 (docs/paper.md §4): serving N domains costs

    C_total(N) = C_pretrain + N · C_specialize

in FLOPs and in device-hours, both measured by the runs (never estimated here). Per method (the
rules follow from its registry entry, tune/methods.py: ``pretrains``, ``teacher``, ``start``):

    method  C_pretrain (shared by all domains)      C_specialize (paid per domain)
    slm     slm pretraining                          fine-tuning
    llm     llm pretraining                          fine-tuning
    mix     all experts' pretraining                 fine-tuning (every expert tried, for `all`)
    pn      pn pretraining                           fine-tuning
    d       teacher llm + student slm pretraining    student fine-tuning + teacher fine-tuning
    is      0                                        the own pretraining of the trial's
                                                     (domain, domain size) + fine-tuning
    nopt    0                                        training on the domain data

SLM-is is pretrained once per (domain, domain train size): its resampling follows the histogram
of that size's train subset only (pipeline/importance.py), so each size has its own run,
``pretrain/is/<domain>-<tokens>``. Its cost is charged to the trials of exactly that domain and
size (``pretrain_split`` looks the run up by both), never shared across sizes, and it lands in
C_specialize of the point (method, budget, domain_tokens, level) those trials make: the planner
and the amortization tables (C_total(N) = N · C_specialize) read it from there.

Inference cost is the served model's parameters and forward FLOPs per token.

Where the numbers come from: each results row carries the pretraining cost its model was built
with and the specialization it spent (tune/specialize.py charges mix's experts and SLM-d's
teacher fine-tuning into the row). When the run's ``pretrain/**/costs.json`` files are given
(``load_pretrain_costs``) they are the source of C_pretrain instead; the per-row columns are the
fallback (e.g. for a results file from another run directory). ``pretrain_split`` is the one sum
of a method's pretraining cost: the rows' columns are written with it too.

Trial selection: the LR is a hyper-parameter search, so among the rows of one trial key
(domain, method, budget, domain size, seed) the one with the lowest *valid* loss is kept and
only its cost is charged (the paper's convention, §3.7). Perplexities are macro-averaged like the
paper: mean test NLL per domain (over seeds), averaged over domains, then exponentiated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import yaml

from slm.errors import InputError
from slm.layout import RunLayout, expert_name
from slm.models.config import FAMILY_INFO, level_name
from slm.stage import exists, filesystem, join, manifest, read_json, subdirs

from .methods import Method, get_method

TRIAL_KEY = ("recipe", "domain", "method", "budget_steps", "domain_tokens", "pretrain_level",
             "pretrain_seed", "seed")
POINT_KEY = ("method", "budget_steps", "domain_tokens", "pretrain_level")
COST_KEYS = ("flops", "device_seconds")
# A results table without pretraining levels is of one level: the family's full pretraining
# (level 1.0), pretraining seed 0.
LEVEL_DEFAULTS = {"pretrain_level": 1.0, "pretrain_seed": 0}


def with_levels(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``pretrain_level``/``pretrain_seed`` (LEVEL_DEFAULTS where absent or null)."""
    out = df.copy()
    for col, default in LEVEL_DEFAULTS.items():
        out[col] = (out[col].fillna(default) if col in out else default)
    return out.astype({"pretrain_level": float, "pretrain_seed": int})


# --------------------------------------------------------------------------------------------
# Pretraining costs: read once per run, summed per method one way
# --------------------------------------------------------------------------------------------

def _costs_file(uri: str) -> dict[str, Any]:
    c = read_json(uri)
    for k in COST_KEYS:
        v = c.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise InputError(f"'{uri}' has {k}={v!r}; costs.json needs non-negative numbers "
                             f"{', '.join(COST_KEYS)} (re-run that pretraining)")
    return c


def _run_costs(layout: RunLayout, fam: str, sub: str, seed: int | None = None) -> dict[str, Any] | None:
    """One training run's costs.json, with ``levels``: {level name: costs to that level} from
    its published level models' manifests (pretrain.levels below 1); None if it did not finish."""
    if not exists(layout.pretrain_costs(fam, sub, seed)):
        return None
    c = _costs_file(layout.pretrain_costs(fam, sub, seed))
    levels = {}
    run = layout.pretrain(fam, sub, seed)
    for name in subdirs(run):
        if name.startswith("level-"):
            found = (manifest(join(run, name)) or {}).get("costs")
            if found is not None:
                levels[name.removeprefix("level-")] = {k: float(found[k]) for k in COST_KEYS}
    return {**c, "levels": levels}


def load_pretrain_costs(run_dir: str, seed: int | None = None) -> dict[str, Any]:
    """The measured pretraining costs of a run, per family (models/config.py FAMILY_INFO):
    a family trained once: its ``costs.json``; per expert (mix): summed over
    ``expert-<i>/costs.json`` (kept under ``experts``), else the family's summed file; per
    domain and domain size (is): ``{"<domain>-<tokens>": costs}`` (slm.layout ``domain_run``).
    Each carries ``levels``: {level name: costs to that
    pretraining level} (a mixture's: summed over experts). Families that did not finish are
    absent. Of one pretraining seed's runs (``seed`` as the layout names it; None: the recipe's
    own). When the run also holds other pretraining seeds' runs (``pretrain/seed-<s>/``), the
    recipe's own costs carry ``by_seed``: {pretraining seed: its costs, as above} for every
    seed, the recipe's own included (``pretrain_split`` picks a row's)."""
    layout = RunLayout(run_dir)
    out = _seed_costs(layout, seed)
    others = layout.pretrain_seeds() if seed is None else []
    if others:
        out["by_seed"] = {_recipe_seed(layout): dict(out), **{s: _seed_costs(layout, s) for s in others}}
    return out


def _recipe_seed(layout: RunLayout) -> int:
    """The seed of the recipe the run was started with (its pretraining runs at today's
    paths; 0 without a recipe.yaml, like a recipe without ``seed``)."""
    if not exists(layout.recipe):
        return 0
    fs, path = filesystem(layout.recipe)
    with fs.open_input_stream(path) as f:
        data = yaml.safe_load(f.read().decode("utf-8")) or {}
    return int(data.get("seed", 0)) if isinstance(data, dict) else 0


def _seed_costs(layout: RunLayout, seed: int | None) -> dict[str, Any]:
    """``load_pretrain_costs`` of one pretraining seed's runs."""
    out: dict[str, Any] = {}
    for fam, info in FAMILY_INFO.items():
        if info.runs == "per_domain":
            per = {s: c for s in subdirs(layout.pretrain(fam, seed=seed)) if (c := _run_costs(layout, fam, s, seed))}
            if per:
                out[fam] = per
            continue
        if info.runs == "per_expert":
            names = subdirs(layout.pretrain(fam, seed=seed))
            experts = {str(i): c for i in range(len(names))
                       if expert_name(i) in names and (c := _run_costs(layout, fam, expert_name(i), seed))}
            if experts:
                out[fam] = {k: float(sum(e[k] for e in experts.values())) for k in COST_KEYS}
                out[fam]["params"] = int(sum(e.get("params", 0) for e in experts.values()))
                out[fam]["experts"] = experts
                common = set.intersection(*(set(e["levels"]) for e in experts.values()))
                out[fam]["levels"] = {lv: {k: float(sum(e["levels"][lv][k] for e in experts.values()))
                                           for k in COST_KEYS} for lv in sorted(common)}
                continue
        c = _run_costs(layout, fam, "", seed)
        if c is not None:
            out[fam] = c
    return out


def pretrain_split(method: Method, pc: dict[str, Any], domain: str, level: float = 1.0,
                   domain_tokens: int = 0,
                   seed: int | None = None) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """The one sum of a method's pretraining cost at a pretraining ``level`` (the models it
    starts from were saved at that fraction of their steps) and pretraining ``seed`` (a row's
    ``pretrain_seed``; read from ``pc``'s ``by_seed`` when it has one): (shared, per-domain,
    missing families). Shared: its families pretrained once (C_pretrain); per-domain: the own
    pretraining of ``domain`` at ``domain_tokens`` train tokens (SLM-is: one run per domain and
    size, charged to that size's trials only; specialization, C_generic = 0); ``missing``:
    families ``pc`` (load_pretrain_costs) lacks, at that level and seed."""
    if seed is not None and "by_seed" in pc:
        pc = pc["by_seed"].get(int(seed), {})
    shared = {k: 0.0 for k in COST_KEYS}
    own = {k: 0.0 for k in COST_KEYS}
    missing = []
    for fam in method.pretrains:
        per_domain = FAMILY_INFO[fam].runs == "per_domain"
        c = pc.get(fam, {}).get(FAMILY_INFO[fam].sub(domain, domain_tokens)) if per_domain else pc.get(fam)
        if c is not None and float(level) < 1.0:
            c = c.get("levels", {}).get(level_name(level))
        if c is None:
            missing.append(fam)
            continue
        for k in COST_KEYS:
            (own if per_domain else shared)[k] += float(c[k])
    return shared, own, missing


# --------------------------------------------------------------------------------------------
# Per-trial costs
# --------------------------------------------------------------------------------------------

def select_trials(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial key: the LR with the lowest valid loss (ties: the first row)."""
    order = with_levels(df).reset_index(drop=True).sort_values("valid_loss", kind="stable")
    best = order.drop_duplicates(list(TRIAL_KEY), keep="first")
    best = best.assign(n_lrs=order.groupby(list(TRIAL_KEY))["lr"].transform("count").loc[best.index])
    return best.sort_values(list(TRIAL_KEY), kind="stable").reset_index(drop=True)


def trial_costs(df: pd.DataFrame, pretrain_costs: dict[str, Any] | None = None) -> pd.DataFrame:
    """Selected trials (``select_trials``) with the cost model's columns added:
    ``c_pretrain_flops/_hours`` (shared), ``c_spec_flops/_hours`` (per domain, fine-tuning to
    its best validation step: the paper's convention, §3.7, and what the planner uses),
    ``c_spec_total_flops/_hours`` (per domain, every step run, patience tail included) and
    ``cost_basis`` (where the pretraining cost came from: 'costs.json', 'results' (the row's
    own columns: when the run's costs.json files and level manifests do not cover the method
    at the row's pretraining level) or 'none').

    Specialization to the best step: the row's ``spec_flops_to_best`` /
    ``spec_device_seconds_to_best`` (tune/specialize.py); a row written before those columns
    existed is charged ``spec_* x best_step / steps_run`` (fine-tuning steps cost the same)."""
    pc = pretrain_costs or {}
    t = select_trials(df)
    pre_f, pre_s, spec_f, spec_s, tot_f, tot_s, basis = [], [], [], [], [], [], []
    for row in t.to_dict("records"):
        method = get_method(row["method"])
        shared, own, missing = pretrain_split(method, pc, row["domain"], float(row["pretrain_level"]),
                                              int(row["domain_tokens"]), int(row["pretrain_seed"]))
        src = "costs.json" if method.pretrains else "none"
        if missing:  # e.g. another run's results, or a level the run's files do not hold
            src = "results"  # the row's columns, per domain only if every family is
            measured = {"flops": float(row["pretrain_flops"]),
                        "device_seconds": float(row["pretrain_device_seconds"])}
            zero = {k: 0.0 for k in COST_KEYS}
            shared, own = (measured, zero) if method.shared_families else (zero, measured)
        total = {"flops": float(row["spec_flops"]), "device_seconds": float(row["spec_device_seconds"])}
        best = {k: _to_best(row, k, v) for k, v in total.items()}
        pre_f.append(shared["flops"])
        pre_s.append(shared["device_seconds"])
        spec_f.append(best["flops"] + own["flops"])
        spec_s.append(best["device_seconds"] + own["device_seconds"])
        tot_f.append(total["flops"] + own["flops"])
        tot_s.append(total["device_seconds"] + own["device_seconds"])
        basis.append(src)
    return t.assign(c_pretrain_flops=pre_f, c_pretrain_hours=np.array(pre_s) / 3600.0,
                    c_spec_flops=spec_f, c_spec_hours=np.array(spec_s) / 3600.0,
                    c_spec_total_flops=tot_f, c_spec_total_hours=np.array(tot_s) / 3600.0,
                    cost_basis=basis)


def _to_best(row: dict[str, Any], key: str, total: float) -> float:
    """The row's specialization ``key`` ('flops'/'device_seconds') spent up to its best step."""
    v = row.get(f"spec_{key}_to_best")
    if v is not None and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    steps = int(row["steps_run"])
    return total * min(int(row["best_step"]), steps) / steps if steps > 0 else total


# --------------------------------------------------------------------------------------------
# Per-method costs and perplexity, amortization
# --------------------------------------------------------------------------------------------

def macro_nll(trials: pd.DataFrame) -> float:
    """Mean over domains of the mean test NLL over seeds (paper §3.1 macro-average)."""
    per_domain = trials.groupby("domain")["test_loss"].mean()
    return float(per_domain.mean())


def macro_ppl_by_seed(trials: pd.DataFrame) -> list[float]:
    """exp(mean test NLL over domains) for each (pretraining seed, fine-tuning seed) that has
    every domain of ``trials``."""
    n_dom = trials["domain"].nunique()
    keys = [k for k in ("pretrain_seed", "seed") if k in trials]
    out = []
    for _, g in trials.groupby(keys):
        if g["domain"].nunique() == n_dom:
            out.append(math.exp(g.groupby("domain")["test_loss"].mean().mean()))
    return out


def method_costs(results_df: pd.DataFrame, pretrain_costs: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per measured point (method, budget_steps, domain_tokens, pretraining level):
    C_pretrain and the mean per-domain C_specialize (to the best step, and in total; FLOPs,
    device-hours), the served model's inference cost, the macro perplexity (± std over seeds),
    the macro valid NLL (what the planner selects on) and what it averages over."""
    return aggregate_points(trial_costs(results_df, pretrain_costs))


def one_row_per_trial(trials: pd.DataFrame) -> pd.DataFrame:
    """Costed trials of several sources concatenated: a trial key (every pretraining and
    fine-tuning seed its own) seen twice keeps its lowest-valid-loss row."""
    return (with_levels(trials).sort_values("valid_loss", kind="stable")
            .drop_duplicates(list(TRIAL_KEY), keep="first"))


def aggregate_points(trials: pd.DataFrame) -> pd.DataFrame:
    """``method_costs`` from already costed trials (``trial_costs``; several sources may be
    concatenated: ``one_row_per_trial``)."""
    t = one_row_per_trial(trials)
    rows = []
    for key, g in t.groupby(list(POINT_KEY), sort=True):
        nll = macro_nll(g)
        by_seed = macro_ppl_by_seed(g)
        rows.append({
            **dict(zip(POINT_KEY, key)),
            "c_pretrain_flops": float(g["c_pretrain_flops"].mean()),
            "c_pretrain_hours": float(g["c_pretrain_hours"].mean()),
            "c_spec_flops": float(g["c_spec_flops"].mean()),
            "c_spec_hours": float(g["c_spec_hours"].mean()),
            "c_spec_total_flops": float(g["c_spec_total_flops"].mean()),
            "c_spec_total_hours": float(g["c_spec_total_hours"].mean()),
            "inference_params": int(g["inference_params"].max()),
            "inference_flops_per_token": float(g["inference_flops_per_token"].max()),
            "macro_nll": nll, "macro_ppl": math.exp(nll),
            "macro_valid_nll": float(g.groupby("domain")["valid_loss"].mean().mean()),
            "macro_ppl_std": float(np.std(by_seed, ddof=1)) if len(by_seed) > 1 else 0.0,
            "n_domains": int(g["domain"].nunique()), "n_seeds": int(g["seed"].nunique()),
            "n_pretrain_seeds": int(g["pretrain_seed"].nunique()),
            "domains": ",".join(sorted(g["domain"].unique())),
            "cost_basis": ",".join(sorted(g["cost_basis"].unique())),
        })
    return pd.DataFrame(rows).sort_values(list(POINT_KEY), kind="stable").reset_index(drop=True)


def total_cost(method_costs: pd.DataFrame, n_domains: int) -> pd.DataFrame:
    """``method_costs`` with C_total(N) = C_pretrain + N·C_specialize for N = ``n_domains``
    (columns ``n``, ``c_total_flops``, ``c_total_hours``)."""
    if int(n_domains) < 1:
        raise InputError(f"number of domains N is {n_domains}; C_total(N) needs N >= 1")
    n = int(n_domains)
    return method_costs.assign(
        n=n,
        c_total_flops=method_costs["c_pretrain_flops"] + n * method_costs["c_spec_flops"],
        c_total_hours=method_costs["c_pretrain_hours"] + n * method_costs["c_spec_hours"])


def amortization_table(method_costs: pd.DataFrame, ns: Iterable[int] = (1, 7, 50)) -> pd.DataFrame:
    """``total_cost`` for each N in ``ns`` (paper Fig. 6 uses 1, 7, 50), stacked."""
    return pd.concat([total_cost(method_costs, n) for n in ns], ignore_index=True)
