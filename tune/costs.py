"""The cost model: what each method costs to pretrain, to specialize per domain, and to serve.

Paper Eq. 1 (docs/paper.md §4): serving N domains costs

    C_total(N) = C_pretrain + N · C_specialize

in FLOPs and in device-hours, both measured by the runs (never estimated here). Per method:

    method  C_pretrain (shared by all domains)      C_specialize (paid per domain)
    slm     slm pretraining                          fine-tuning
    llm     llm pretraining                          fine-tuning
    mix     all experts' pretraining                 fine-tuning (every expert tried, for `all`)
    pn      pn pretraining                           fine-tuning
    d       teacher llm + student slm pretraining    student fine-tuning + teacher fine-tuning
    is      0                                        the domain's own pretraining + fine-tuning
    nopt    0                                        training on the domain data

Inference cost is the served model's parameters and forward FLOPs per token.

Where the numbers come from: each results row carries the pretraining cost its model was built
with and the specialization it spent (tune/specialize.py charges mix's experts and SLM-d's
teacher fine-tuning into the row). When the run's ``pretrain/**/costs.json`` files are given
(``load_pretrain_costs``) they are the source of C_pretrain instead; the per-row columns are the
fallback (e.g. for a results file from another run directory).

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

from slm.errors import InputError
from slm.stage import exists, filesystem, join, read_json

RESULT_COLUMNS = ("recipe", "domain", "method", "budget_steps", "domain_tokens", "seed", "lr",
                  "expert", "valid_loss", "test_loss", "test_ppl", "steps_run", "best_step",
                  "spec_flops", "spec_device_seconds", "pretrain_flops",
                  "pretrain_device_seconds", "inference_params", "inference_flops_per_token",
                  "model_path")
TRIAL_KEY = ("recipe", "domain", "method", "budget_steps", "domain_tokens", "seed")
POINT_KEY = ("method", "budget_steps", "domain_tokens")
METHODS = ("slm", "llm", "is", "mix", "pn", "d", "nopt")
COST_KEYS = ("flops", "device_seconds")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def read_results(path: str) -> pd.DataFrame:
    """A sweep's results table (parquet, local or object storage), checked for the columns the
    cost model needs; InputError names the file and what is wrong."""
    import pyarrow.parquet as pq

    if not exists(path):
        raise InputError(f"results file '{path}' does not exist; run `slm sweep` first or pass "
                         "the results.parquet of a finished sweep")
    fs, p = filesystem(path)
    try:
        df = pq.read_table(p, filesystem=fs).to_pandas()
    except Exception as e:  # noqa: BLE001 - any parquet failure is the file's fault
        raise InputError(f"results file '{path}' is not a readable parquet table ({e}); "
                         "re-run `slm sweep` to rewrite it") from None
    check_results(df, path)
    return df


def check_results(df: pd.DataFrame, source: str) -> None:
    """InputError when ``df`` lacks result columns, rows, or has unknown methods."""
    missing = [c for c in RESULT_COLUMNS if c not in df.columns and c != "model_path"]
    if missing:
        raise InputError(f"results '{source}' lack the column(s) {', '.join(missing)}; a results "
                         f"table has {', '.join(RESULT_COLUMNS)} (docs/design.md). Re-run `slm sweep`")
    if df.empty:
        raise InputError(f"results '{source}' have no rows; the sweep finished no trial")
    unknown = sorted(set(df["method"]) - set(METHODS))
    if unknown:
        raise InputError(f"results '{source}' have unknown method(s) {', '.join(unknown)}; "
                         f"known: {', '.join(METHODS)}")
    bad = df[~np.isfinite(df["test_loss"].astype(float)) | ~np.isfinite(df["valid_loss"].astype(float))]
    if len(bad):
        raise InputError(f"results '{source}' have {len(bad)} row(s) with a non-finite valid/test "
                         f"loss (e.g. {bad.iloc[0]['domain']}/{bad.iloc[0]['method']}); drop them "
                         "or re-run those trials")


def check_one_recipe(tables: dict[str, pd.DataFrame]) -> str:
    """The one recipe the tables share; InputError naming the files and recipes otherwise
    (results of different recipes are not comparable: other data, sizes, budgets)."""
    seen: dict[str, list[str]] = {}
    for src, df in tables.items():
        for r in sorted(set(map(str, df["recipe"]))):
            seen.setdefault(r, []).append(src)
    if len(seen) != 1:
        detail = "; ".join(f"recipe '{r}' in {', '.join(srcs)}" for r, srcs in sorted(seen.items()))
        raise InputError(f"results of several recipes cannot be mixed in one report/plan: {detail}. "
                         "Pass only results of one recipe (one run), or report each separately")
    return next(iter(seen))


def _costs_file(uri: str) -> dict[str, Any]:
    c = read_json(uri)
    for k in COST_KEYS:
        v = c.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise InputError(f"'{uri}' has {k}={v!r}; costs.json needs non-negative numbers "
                             f"{', '.join(COST_KEYS)} (re-run that pretraining)")
    return c


def _subdirs(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))
                  if i.type == pafs.FileType.Directory)


def load_pretrain_costs(run_dir: str) -> dict[str, Any]:
    """The measured pretraining costs of a run: ``{family: costs}`` for slm, llm, pn (their
    ``costs.json``), ``mix`` summed over ``expert-<i>/costs.json`` (kept under ``experts``),
    and ``is`` as ``{domain: costs}``. Families that did not finish are absent."""
    root = join(run_dir, "pretrain")
    out: dict[str, Any] = {}
    for fam in ("slm", "llm", "pn"):
        uri = join(root, fam, "costs.json")
        if exists(uri):
            out[fam] = _costs_file(uri)
    experts = {d.removeprefix("expert-"): _costs_file(join(root, "mix", d, "costs.json"))
               for d in _subdirs(join(root, "mix"))
               if d.startswith("expert-") and exists(join(root, "mix", d, "costs.json"))}
    if experts:
        out["mix"] = {k: float(sum(e[k] for e in experts.values())) for k in COST_KEYS}
        out["mix"]["params"] = int(sum(e.get("params", 0) for e in experts.values()))
        out["mix"]["experts"] = experts
    elif exists(join(root, "mix", "costs.json")):
        out["mix"] = _costs_file(join(root, "mix", "costs.json"))
    is_costs = {d: _costs_file(join(root, "is", d, "costs.json")) for d in _subdirs(join(root, "is"))
                if exists(join(root, "is", d, "costs.json"))}
    if is_costs:
        out["is"] = is_costs
    return out


# --------------------------------------------------------------------------------------------
# Per-trial costs
# --------------------------------------------------------------------------------------------

def select_trials(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial key: the LR with the lowest valid loss (ties: the first row)."""
    order = df.reset_index(drop=True).sort_values("valid_loss", kind="stable")
    best = order.drop_duplicates(list(TRIAL_KEY), keep="first")
    best = best.assign(n_lrs=order.groupby(list(TRIAL_KEY))["lr"].transform("count").loc[best.index])
    return best.sort_values(list(TRIAL_KEY), kind="stable").reset_index(drop=True)


def _shared_pretrain(method: str, pc: dict[str, Any]) -> dict[str, float] | None:
    """C_pretrain of ``method`` from costs.json files, or None when they do not cover it."""
    if method in ("is", "nopt"):
        return {k: 0.0 for k in COST_KEYS}
    fams = ("llm", "slm") if method == "d" else (method,)
    if not all(f in pc for f in fams):
        return None
    return {k: float(sum(pc[f][k] for f in fams)) for k in COST_KEYS}


def trial_costs(df: pd.DataFrame, pretrain_costs: dict[str, Any] | None = None) -> pd.DataFrame:
    """Selected trials (``select_trials``) with the cost model's columns added:
    ``c_pretrain_flops/_hours`` (shared), ``c_spec_flops/_hours`` (per domain) and
    ``cost_basis`` ('costs.json' or 'results' for where C_pretrain came from)."""
    pc = pretrain_costs or {}
    t = select_trials(df)
    pre_f, pre_s, spec_f, spec_s, basis = [], [], [], [], []
    for row in t.itertuples(index=False):
        sf, ss = float(row.spec_flops), float(row.spec_device_seconds)
        if row.method == "is":  # the domain's own pretraining is specialization (C_generic = 0)
            own = pc.get("is", {}).get(row.domain)
            src = "costs.json" if own else "results"
            own = own or {"flops": row.pretrain_flops, "device_seconds": row.pretrain_device_seconds}
            sf, ss = sf + float(own["flops"]), ss + float(own["device_seconds"])
            shared = {k: 0.0 for k in COST_KEYS}
        elif row.method == "nopt":
            shared, src = {k: 0.0 for k in COST_KEYS}, "none"
        else:
            shared = _shared_pretrain(row.method, pc)
            src = "costs.json"
            if shared is None:
                shared = {"flops": float(row.pretrain_flops),
                          "device_seconds": float(row.pretrain_device_seconds)}
                src = "results"
        pre_f.append(shared["flops"])
        pre_s.append(shared["device_seconds"])
        spec_f.append(sf)
        spec_s.append(ss)
        basis.append(src)
    return t.assign(c_pretrain_flops=pre_f, c_pretrain_hours=np.array(pre_s) / 3600.0,
                    c_spec_flops=spec_f, c_spec_hours=np.array(spec_s) / 3600.0, cost_basis=basis)


# --------------------------------------------------------------------------------------------
# Per-method costs and perplexity, amortization
# --------------------------------------------------------------------------------------------

def macro_nll(trials: pd.DataFrame) -> float:
    """Mean over domains of the mean test NLL over seeds (paper §3.1 macro-average)."""
    per_domain = trials.groupby("domain")["test_loss"].mean()
    return float(per_domain.mean())


def macro_ppl_by_seed(trials: pd.DataFrame) -> list[float]:
    """exp(mean test NLL over domains) for each seed that has every domain of ``trials``."""
    n_dom = trials["domain"].nunique()
    out = []
    for _, g in trials.groupby("seed"):
        if g["domain"].nunique() == n_dom:
            out.append(math.exp(g.groupby("domain")["test_loss"].mean().mean()))
    return out


def method_costs(results_df: pd.DataFrame, pretrain_costs: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per measured point (method, budget_steps, domain_tokens, C_pretrain level):
    C_pretrain and the mean per-domain C_specialize (FLOPs, device-hours), the served model's
    inference cost, the macro perplexity (± std over seeds) and what it averages over."""
    return aggregate_points(trial_costs(results_df, pretrain_costs))


def aggregate_points(trials: pd.DataFrame) -> pd.DataFrame:
    """``method_costs`` from already costed trials (``trial_costs``; several sources may be
    concatenated: a trial key seen twice keeps its lowest-valid-loss row)."""
    t = (trials.sort_values("valid_loss", kind="stable")
         .drop_duplicates(list(TRIAL_KEY), keep="first"))
    rows = []
    for key, g in t.groupby(list(POINT_KEY) + ["c_pretrain_flops"], sort=True):
        nll = macro_nll(g)
        by_seed = macro_ppl_by_seed(g)
        rows.append({
            **dict(zip(list(POINT_KEY) + ["c_pretrain_flops"], key)),
            "c_pretrain_hours": float(g["c_pretrain_hours"].mean()),
            "c_spec_flops": float(g["c_spec_flops"].mean()),
            "c_spec_hours": float(g["c_spec_hours"].mean()),
            "inference_params": int(g["inference_params"].max()),
            "inference_flops_per_token": float(g["inference_flops_per_token"].max()),
            "macro_nll": nll, "macro_ppl": math.exp(nll),
            "macro_ppl_std": float(np.std(by_seed, ddof=1)) if len(by_seed) > 1 else 0.0,
            "n_domains": int(g["domain"].nunique()), "n_seeds": int(g["seed"].nunique()),
            "domains": ",".join(sorted(g["domain"].unique())),
            "cost_basis": ",".join(sorted(g["cost_basis"].unique())),
        })
    cols = list(POINT_KEY) + ["c_pretrain_flops"]
    return pd.DataFrame(rows).sort_values(cols, kind="stable").reset_index(drop=True)


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
