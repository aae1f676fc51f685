"""`slm report`: a static HTML page (``RUN/report/index.html`` + PNG figures) of a run's sweeps.

Contents: the perplexity table (test split, mean ± std over seeds, per domain × method × budget ×
domain size, plus the macro-average row of paper Table 4), perplexity against pretraining and
against specialization cost, the amortization plot over N = 1, 7, 50 domains (paper Fig. 6), the
decision chart (paper Fig. 1, from our measurements), the cost tables, the raw results (parquet +
csv next to the page), the recipe and the cost assumptions. Published atomically
(``slm.stage.publish``): a reader never sees half a report.

Results of several recipes are never mixed (InputError naming the files and recipes).
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import math
import os
import time
from collections.abc import Iterable

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure  # no pyplot: files only, no display backend on a cluster node
from matplotlib.patches import Patch

from slm.config import dump_recipe
from slm.errors import InputError
from slm.layout import RunLayout, domain_set
from slm.pipeline.coverage import embedding_coverage
from slm.stage import is_remote, join, publish

from .costs import (aggregate_points, amortization_table, load_pretrain_costs, macro_ppl_by_seed,
                    one_row_per_trial, trial_costs)
from .findings import evaluate_findings, findings_json, findings_markdown, summary
from .methods import get_method, method_names
from .planner import format_accuracy, leave_one_cell_out, measured_levels, rank_levels
from .units import CostUnit
from .units import cost_unit as get_unit
from .results import check_one_recipe, find_results, read_results

AMORTIZATION_NS = (1, 7, 50)
FINDINGS_MD = "findings.md"
FINDINGS_JSON = "findings.json"
PLANNER_ACCURACY = "planner_accuracy.json"
CLUSTERING_COVERAGE = "clustering_coverage.json"
FIGURES = ("ppl_vs_pretrain.png", "ppl_vs_pretrain_levels.png", "ppl_vs_specialize.png", "amortization.png",
           "decision.png")
PERPLEXITY_TABLE = "perplexity_table.csv"
METHOD_COSTS = "method_costs.csv"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def perplexity_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Long table of the report's perplexity cells: one row per (domain, method, domain_tokens,
    budget_steps) with mean/std of test perplexity over seeds (every pair of pretraining and
    fine-tuning seed: ``n_seeds`` counts the pairs); domain '(macro)' rows hold the macro
    average (exp of the mean over domains of the mean test NLL over seeds) and the std over
    seed pairs of the per-pair macro perplexity."""
    keys = ["method", "domain_tokens", "budget_steps"]
    rows = []
    for (dom, *k), g in trials.groupby(["domain"] + keys, sort=True):
        ppl = g["test_ppl"].astype(float)
        rows.append({"domain": dom, **dict(zip(keys, k)), "mean": float(ppl.mean()),
                     "std": float(ppl.std(ddof=1)) if len(ppl) > 1 else 0.0, "n_seeds": len(ppl)})
    for k, g in trials.groupby(keys, sort=True):
        nll = g.groupby("domain")["test_loss"].mean().mean()
        by_seed = macro_ppl_by_seed(g)
        rows.append({"domain": "(macro)", **dict(zip(keys, k)), "mean": float(math.exp(nll)),
                     "std": float(np.std(by_seed, ddof=1)) if len(by_seed) > 1 else 0.0,
                     "n_seeds": len(by_seed)})
    return pd.DataFrame(rows)


def _ppl_table_html(pt: pd.DataFrame) -> str:
    cols = sorted({(int(t), int(b)) for t, b in zip(pt["domain_tokens"], pt["budget_steps"])})
    domains = sorted(d for d in set(pt["domain"]) if d != "(macro)") + ["(macro)"]
    head = "".join(f"<th>{t:,} tokens<br>{b:,} steps</th>" for t, b in cols)
    out = [f"<table class='ppl'><tr><th>domain</th><th>method</th>{head}</tr>"]
    idx = {(r.domain, r.method, int(r.domain_tokens), int(r.budget_steps)): r
           for r in pt.itertuples(index=False)}
    for dom in domains:
        sub = pt[pt["domain"] == dom]
        best = {c: sub[(sub["domain_tokens"] == c[0]) & (sub["budget_steps"] == c[1])]["mean"].min()
                for c in cols}
        for m in sorted(set(sub["method"])):
            cells = []
            for c in cols:
                r = idx.get((dom, m, c[0], c[1]))
                if r is None:
                    cells.append("<td>–</td>")
                    continue
                txt = f"{r.mean:.2f}" + (f" ± {r.std:.2f}" if r.n_seeds > 1 else "")
                cls = " class='best'" if r.mean == best[c] else ""
                cells.append(f"<td{cls} data-domain='{html.escape(dom)}' data-method='{m}' "
                             f"data-tokens='{c[0]}' data-budget='{c[1]}' data-mean='{r.mean!r}' "
                             f"data-std='{r.std!r}' data-seeds='{r.n_seeds}'>{txt}</td>")
            rowcls = " class='macro'" if dom == "(macro)" else ""
            out.append(f"<tr{rowcls}><td>{html.escape(dom)}</td><td>{m}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _df_html(df: pd.DataFrame, formats: dict[str, str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = []
    for r in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, r):
            f = formats.get(c)
            cells.append(f"<td>{html.escape(format(v, f) if f else str(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _color(method: str) -> str:
    return get_method(method).color


def _sizes(points: pd.DataFrame) -> list[int]:
    return sorted(int(t) for t in set(points["domain_tokens"]))


def fig_ppl_vs_cost(points: pd.DataFrame, cost: str, xlabel: str) -> bytes:
    """Macro perplexity against a cost column, one panel per domain size, one line per method
    (pretraining: best budget at each pretraining level; specialization: over budgets)."""
    sizes = _sizes(points)
    fig = Figure(figsize=(5 * len(sizes), 4))
    axes = fig.subplots(1, len(sizes), squeeze=False)
    fig.subplots_adjust(wspace=0.3)
    for ax, t in zip(axes[0], sizes):
        at = points[points["domain_tokens"] == t]
        for m, g in at.groupby("method"):
            if cost.startswith("c_pretrain"):  # one point per level: its best-valid budget
                g = g.loc[g.groupby("pretrain_level")["macro_valid_nll"].idxmin()]
            g = g.sort_values(cost)
            ax.plot(g[cost], g["macro_ppl"], marker="o", color=_color(m), label=m)
        positive = at[cost][at[cost] > 0]
        ax.set_xscale("symlog", linthresh=float(positive.min()) / 10 if len(positive) else 1.0)
        ax.set_yscale("log")
        ax.set_title(f"{t:,} domain tokens")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("macro test perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def fig_pretrain_levels(points: pd.DataFrame, cost: str = "c_pretrain_flops",
                        xlabel: str = "C_pretrain of the level [FLOPs]") -> bytes:
    """The paper's Fig. 4 view: macro perplexity against the pretraining cost of the level the
    models were specialized from (pretrain.levels), one panel per (specialization budget,
    domain size), one curve per method (a method that pretrains nothing: a point at 0)."""
    budgets, sizes = sorted(set(points["budget_steps"])), _sizes(points)
    fig = Figure(figsize=(4.5 * len(sizes), 3.6 * len(budgets)))
    axes = fig.subplots(len(budgets), len(sizes), squeeze=False)
    fig.subplots_adjust(wspace=0.3, hspace=0.45)
    for row, b in zip(axes, budgets):
        for ax, t in zip(row, sizes):
            at = points[(points["budget_steps"] == b) & (points["domain_tokens"] == t)]
            for m, g in at.groupby("method"):
                g = g.sort_values(cost)
                ax.plot(g[cost], g["macro_ppl"], marker="o", color=_color(m), label=m)
            positive = at[cost][at[cost] > 0]
            ax.set_xscale("symlog", linthresh=float(positive.min()) / 10 if len(positive) else 1.0)
            ax.set_yscale("log")
            ax.set_title(f"{b} steps, {t:,} domain tokens", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("macro test perplexity")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _png(fig)


def fig_amortization(amort: pd.DataFrame) -> bytes:
    """C_total(N) vs macro perplexity for each N (paper Fig. 6); marker = domain size."""
    ns = sorted(set(amort["n"]))
    markers = "osD^v<>"
    sizes = _sizes(amort)
    fig = Figure(figsize=(5 * len(ns), 4))
    axes = fig.subplots(1, len(ns), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], ns):
        at = amort[amort["n"] == n]
        for (m, t), g in at.groupby(["method", "domain_tokens"]):
            g = g.sort_values("c_total_flops")
            ax.plot(g["c_total_flops"], g["macro_ppl"], marker=markers[sizes.index(int(t)) % len(markers)],
                    color=_color(m), label=f"{m} ({int(t):,} tok)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"N = {n} domains")
        ax.set_xlabel("C_total(N) = C_pretrain + N·C_specialize [FLOPs]")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("macro test perplexity")
    axes[0][-1].legend(fontsize=7, loc="best")
    return _png(fig)


def decision_grid(points: pd.DataFrame, inference_budget: float, domain_tokens: int,
                  n_domains: int = 1, resolution: int = 24, unit: str = "flops"
                  ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """(pretrain budgets, specialization budgets, best method per cell or '') over a log grid
    spanning the measured costs in ``unit``; the choice is the planner's (rank_levels) at
    each cell."""
    u = get_unit(unit)
    pre = points[u.pretrain] / n_domains
    pos = pre[pre > 0]
    lo_p = float(pos.min()) / 10 if len(pos) else 1.0
    hi_p = float(pre.max()) * 3 if pre.max() > 0 else 10.0
    spec = points[u.spec]
    xs = np.geomspace(lo_p, hi_p, resolution)
    ys = np.geomspace(max(float(spec.min()), 1e-12) / 3, max(float(spec.max()), 1e-12) * 3, resolution)
    levels = measured_levels(points, u.name)
    grid = []
    for y in ys:
        row = []
        for x in xs:
            cands = rank_levels(levels, x, y, inference_budget, n_domains, domain_tokens)
            row.append(cands[0].method if cands and cands[0].fits else "")
        grid.append(row)
    return xs, ys, grid


def fig_decision(points: pd.DataFrame, small_params: float, n_domains: int = 1,
                 unit: str = "flops") -> bytes:
    """Paper Fig. 1 from measurements: best measured method over pretraining × specialization
    budgets, one row per inference budget (the small served model; any model), one column per
    domain size."""
    methods = sorted(set(points["method"]))
    cmap = ListedColormap(["#ffffff"] + [_color(m) for m in methods])
    sizes = _sizes(points)
    budgets = [("inference ≤ small model", small_params),
               ("inference unconstrained", float(points["inference_params"].max()))]
    fig = Figure(figsize=(5 * len(sizes), 4 * len(budgets)))
    axes = fig.subplots(len(budgets), len(sizes), squeeze=False)
    for i, (label, inf) in enumerate(budgets):
        for j, t in enumerate(sizes):
            ax = axes[i][j]
            xs, ys, grid = decision_grid(points, inf, t, n_domains, unit=unit)
            z = np.array([[0 if m == "" else methods.index(m) + 1 for m in row] for row in grid])
            ax.pcolormesh(xs, ys, z, cmap=cmap, vmin=0, vmax=len(methods), shading="nearest")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{label} ({inf:,.0f} params), {t:,} tokens", fontsize=9)
            ax.set_xlabel(f"pretraining budget per domain [{get_unit(unit).label}] (N = {n_domains})")
            ax.set_ylabel(f"specialization budget per domain, to best step [{get_unit(unit).label}]")
    fig.subplots_adjust(hspace=0.4)
    fig.legend(handles=[Patch(color=_color(m), label=m) for m in methods]
               + [Patch(facecolor="#ffffff", edgecolor="#999999", label="nothing fits")],
               loc="upper center", ncol=len(methods) + 1, bbox_to_anchor=(0.5, 1.02))
    return _png(fig)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

def load_report_inputs(recipe, extra_results: Iterable[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(raw results of every source, costed selected trials, source paths). The run's own
    sweeps are costed with its pretrain/**/costs.json; extra files with their own columns."""
    own = find_results(recipe.run_dir)
    extra = [p for p in extra_results if p and p not in own]
    paths = own + extra
    if not paths:
        raise InputError(f"no results to report: nothing under "
                         f"{RunLayout(recipe.run_dir).path('specialize', '*', 'results.parquet')} and no "
                         "--results given; run `slm sweep` first")
    tables = {p: read_results(p) for p in paths}
    found = check_one_recipe(tables)
    if found != recipe.name:
        raise InputError(f"the results ({', '.join(paths)}) are of recipe '{found}' but the report "
                         f"is for recipe '{recipe.name}'; pass --recipe {found} (or that recipe's "
                         f"YAML) or results of recipe '{recipe.name}'")
    pc = load_pretrain_costs(recipe.run_dir)
    trials = pd.concat([trial_costs(tables[p], pc if p in own else None) for p in paths],
                       ignore_index=True)
    raw = pd.concat([t.assign(source=p) for p, t in tables.items()], ignore_index=True)
    return raw, trials, paths


def shown_path(layout: RunLayout, path: str) -> str:
    """A path as the report shows it: relative to the run directory (never a machine path).
    A URI outside the run is shown as it is; a local path outside a local run relative to the
    run, outside a run on object storage by its file name (another node has no such path)."""
    if not path:
        return path
    rel = layout.relative(path)
    if is_remote(rel) or not os.path.isabs(rel):
        return rel
    if is_remote(layout.root):
        return os.path.basename(rel.rstrip("/"))
    return os.path.relpath(rel, os.path.abspath(layout.root))


def portable_recipe(recipe, layout: RunLayout):
    """The recipe with its local paths relative to the run directory (for the page)."""
    c = recipe.corpus
    corpus = dataclasses.replace(c, generic=shown_path(layout, c.generic),
                                 domains={d: shown_path(layout, p) for d, p in c.domains.items()})
    cluster = dataclasses.replace(recipe.cluster, storage=shown_path(layout, recipe.cluster.storage))
    return dataclasses.replace(recipe, run_dir=".", corpus=corpus, cluster=cluster)


def report_command(recipe, unit: str) -> str:
    """The command that writes this report (the findings table says how it was generated)."""
    return f"slm report --recipe {recipe.name}" + (f" --cost-unit {unit}" if unit != "flops" else "")


def read_findings_md(index_uri: str) -> str:
    """The findings table a report wrote (next to its index.html)."""
    from slm.stage import filesystem  # the report may be on object storage

    fs, path = filesystem(index_uri.rsplit("/", 1)[0] + "/" + FINDINGS_MD)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_report(recipe, extra_results: Iterable[str] = (), cost_unit: str = "flops") -> str:
    """Write ``RUN/report/`` (index.html, figures, raw results, the paper's findings computed
    on the results, the planner's leave-one-cell-out accuracy) for ``recipe``, costs in
    ``cost_unit`` ('flops' or 'device-hours'); returns the index.html URI. Every path it shows
    or stores is relative to the run directory."""
    unit = get_unit(cost_unit)
    layout = RunLayout(recipe.run_dir)
    raw, trials, paths = load_report_inputs(recipe, extra_results)
    sources = [shown_path(layout, p) for p in paths]
    raw = raw.assign(source=raw["source"].map(lambda p: shown_path(layout, p)))
    points = aggregate_points(trials)
    amort = amortization_table(points, AMORTIZATION_NS)
    # the perplexity table is of the final models (pretraining level 1); the levels have
    # their own figure
    # every pretraining seed stays: keying on the fine-tuning seed alone kept only the
    # luckier pretraining seed of each pair
    final = one_row_per_trial(trials)
    pt = perplexity_table(final[final["pretrain_level"] >= 1.0])
    small_served = points[points["method"].map(lambda m: not get_method(m).serves_large)]
    small = float(recipe.specialize.inference_budget
                  or (small_served["inference_params"].max() if len(small_served)
                      else points["inference_params"].min()))
    figures = {
        "ppl_vs_pretrain.png": fig_ppl_vs_cost(points, unit.pretrain,
                                               f"C_pretrain [{unit.label}] (0 = none shared)"),
        "ppl_vs_pretrain_levels.png": fig_pretrain_levels(points, unit.pretrain,
                                                          f"C_pretrain of the level [{unit.label}]"),
        "ppl_vs_specialize.png": fig_ppl_vs_cost(points[points["pretrain_level"] >= 1.0], unit.spec,
                                                 f"C_specialize per domain, to best step [{unit.label}] "
                                                 "(final pretrained models)"),
        "amortization.png": fig_amortization(amort),
        "decision.png": fig_decision(points, small, unit=unit.name),
    }
    command = report_command(recipe, unit.name)
    coverage = clustering_coverage(recipe, layout, sorted(trials["domain"].unique()))
    found = evaluate_findings(trials, unit.name)
    summ = summary(trials)
    accuracy = {"any_model": leave_one_cell_out(points, unit.name),
                "small_model": leave_one_cell_out(points, unit.name, small)}
    page = _page(recipe, sources, pt, points, amort, small,
                 dump_recipe(portable_recipe(recipe, layout)), trials, found, accuracy, unit,
                 coverage)
    csv = raw.to_csv(index=False).encode("utf-8")
    pq_buf = io.BytesIO()
    raw.to_parquet(pq_buf, index=False)
    with publish(layout.report, stage="report", config={"recipe": recipe.name, "sources": sources},
                 force=True) as out:
        files = {**figures, "index.html": page.encode("utf-8"), "results.csv": csv,
                 "results.parquet": pq_buf.getvalue(),
                 METHOD_COSTS: points.to_csv(index=False).encode("utf-8"),
                 PERPLEXITY_TABLE: pt.to_csv(index=False).encode("utf-8"),
                 FINDINGS_MD: findings_markdown(found, summ, command).encode("utf-8"),
                 FINDINGS_JSON: findings_json(found, summ, command).encode("utf-8"),
                 PLANNER_ACCURACY: json.dumps(accuracy, indent=2, default=float).encode("utf-8"),
                 CLUSTERING_COVERAGE: json.dumps(coverage, indent=2).encode("utf-8")}
        for name, data in files.items():
            with out.fs.open_output_stream(f"{out.path}/{name}") as f:
                f.write(data)
        out.manifest.update({"files": sorted(files), "sources": sources, "rows": len(raw),
                             "cost_unit": unit.name})
    return join(layout.report, "index.html")


def clustering_coverage(recipe, layout: RunLayout, domains: list[str]) -> list[dict]:
    """What the embedding (and so every cluster label) saw of the generic set and each
    reported domain's train set (``slm.pipeline.coverage``); sets the run does not hold, or a
    model with no local copy, are left out."""
    sets = ["generic"] + [domain_set(d, "train") for d in domains]
    return [c for c in (embedding_coverage(layout, s, recipe.embed) for s in sets) if c]


def _coverage_html(coverage: list[dict]) -> str:
    if not coverage:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(c['set'])}</td><td>{c['units']:,}</td><td>{c['sampled_units']:,}</td>"
        f"<td>{c['embedder_max_tokens']}</td><td>{c['embedder_tokens_per_unit_mean']:.1f}</td>"
        f"<td>{100 * c['embedded_token_fraction']:.1f} %</td>"
        f"<td>{100 * c['multi_document_fraction']:.1f} %</td></tr>" for c in coverage)
    return (f"<h2>What the clustering saw</h2><p>SLM-is, SLM-mix and SLM-pn use k-means clusters "
            f"of units: pieces of at most one window of one document, embedded and assigned one "
            f"by one; their training windows are packed from the units of one cluster, and a "
            f"domain subset's histogram counts each unit's tokens. The embedding model reads at "
            f"most its token limit of a unit's text. Measured on the first units of each set: "
            f"<a href='{CLUSTERING_COVERAGE}'>{CLUSTERING_COVERAGE}</a>.</p>"
            "<table><tr><th>set</th><th>units</th><th>sampled</th><th>embedder token limit</th>"
            "<th>embedder tokens per unit</th><th>text tokens embedded</th>"
            f"<th>units spanning documents</th></tr>{rows}</table>")


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;
margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,td:nth-child(2){text-align:left}.best{font-weight:bold;background:#e8f5e9}
.macro td{border-top:2px solid #333;background:#f5f5f5}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:1em;overflow:auto}"""


def _assumptions(methods: list, n_lrs: int, small: float) -> list[str]:
    """The cost model's rules as the page states them, for the reported methods (registry)."""
    extras = "; ".join(f"{m.name}: + {', + '.join(m.spec_notes())}" for m in methods if m.spec_notes())
    return [
        ("C_total(N) = C_pretrain + N · C_specialize (paper Eq. 1), in measured FLOPs and device-hours "
         "(device-seconds / 3600 as recorded by the runs: GPU-seconds on GPUs, worker-seconds on CPU)."),
        "C_pretrain (shared): " + "; ".join(f"{m.name}: {m.pretrain_note()}" for m in methods) + ".",
        ("C_specialize (per domain, averaged over domains and seeds): fine-tuning to the best "
         "validation step (the paper's convention, §3.7; the planner and charts use it), and in "
         "total (every step run, patience tail included: c_spec_total_*); expert selection by "
         "lowest loss (every expert's valid evaluation) is charged to the trial"
         + (f"; {extras}" if extras else "") + "."),
        ("Costs of pretraining come from the run's pretrain/**/costs.json where present, else from "
         "the results rows (column cost_basis says which)."),
        (f"Learning rate: the LR with the lowest valid loss per trial key is kept (up to {n_lrs} LR(s) "
         "per key); only the kept trial's cost is charged (paper §3.7 convention)."),
        ("Perplexity: test split; cells are mean ± std over seeds; the macro row is exp of the mean "
         "over domains of the mean test NLL over seeds (paper §3.1), its ± the std over seeds of the "
         "per-seed macro perplexity."),
        (f"Decision chart: best method by the planner's interpolation of measured points (log-cost, "
         f"non-increasing envelope), N = 1; top row: inference budget = {small:,.0f} params "
         "(the small served model), bottom row: any measured model."),
    ]


def _findings_html(found, accuracy: dict, unit: CostUnit) -> str:
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td class='finding'>{e(str(c))}</td>" for c in (
        f"{r.claim} ({r.source})", r.comparison, r.sign, r.effect, r.test,
        f"{r.verdict}: {r.reason}")) + "</tr>" for r in found)
    acc = "".join(f"<li>{e(k.replace('_', ' '))}: {e(format_accuracy(a))}</li>" for k, a in accuracy.items())
    return (f"<h2>The paper's findings, computed on these results</h2>"
            f"<p>From <a href='{FINDINGS_JSON}'>{FINDINGS_JSON}</a> "
            f"(<a href='{FINDINGS_MD}'>{FINDINGS_MD}</a>); tune/findings.py states the test.</p>"
            "<table><tr><th>finding (paper)</th><th>comparison</th><th>sign</th><th>effect size</th>"
            f"<th>test</th><th>verdict</th></tr>{rows}</table>"
            f"<h2>Planner accuracy</h2><p>Costs in {e(unit.label)}; "
            f"<a href='{PLANNER_ACCURACY}'>{PLANNER_ACCURACY}</a>.</p><ul>{acc}</ul>")


def _page(recipe, sources: list[str], pt: pd.DataFrame, points: pd.DataFrame, amort: pd.DataFrame,
          small: float, recipe_yaml: str, trials: pd.DataFrame, found, accuracy: dict,
          unit: CostUnit, coverage: list[dict] = ()) -> str:
    cost_cols = ["method", "budget_steps", "domain_tokens", "pretrain_level", "c_pretrain_flops",
                 "c_pretrain_hours", "c_spec_flops", "c_spec_hours", "c_spec_total_flops",
                 "c_spec_total_hours", "inference_params", "inference_flops_per_token",
                 "macro_ppl", "macro_ppl_std", "n_domains", "n_seeds", "n_pretrain_seeds",
                 "cost_basis"]
    fmt = {c: ".4g" for c in cost_cols if c.startswith(("c_", "inference_f"))}
    fmt.update({"macro_ppl": ".2f", "macro_ppl_std": ".2f", "inference_params": ","})
    am = amort[["n", "method", "budget_steps", "domain_tokens", "c_total_flops", "c_total_hours",
                "macro_ppl"]].sort_values(["n", "domain_tokens", "c_total_flops"])
    e = html.escape
    listed = "".join(f"<li><code>{e(p)}</code></li>" for p in sources)
    n_lrs = int(trials["n_lrs"].max()) if "n_lrs" in trials else 1
    reported = set(points["method"])
    methods = [get_method(m) for m in method_names() if m in reported]
    described = "".join(f"<li><b>{e(m.label)}</b> (<code>{e(m.name)}</code>): {e(m.description)}</li>"
                        for m in methods)
    assumptions = "".join(f"<li>{e(a)}</li>" for a in _assumptions(methods, n_lrs, small))
    figs = "".join(f"<h3>{e(n)}</h3><img src='{n}' alt='{e(n)}'>" for n in FIGURES)
    run_name = recipe.run_dir.rstrip("/").rsplit("/", 1)[-1]
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>slm report: {e(recipe.name)}</title>
<style>{_CSS}</style></head><body>
<h1>slm report: recipe <code>{e(recipe.name)}</code></h1>
<p>Run directory <code>{e(run_name)}</code> (every path below is relative to it); generated
{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {len(trials)} trials from:</p><ul>{listed}</ul>
<p>Raw results: <a href='results.parquet'>results.parquet</a>, <a href='results.csv'>results.csv</a>;
cost model: <a href='{METHOD_COSTS}'>{METHOD_COSTS}</a>;
table: <a href='{PERPLEXITY_TABLE}'>{PERPLEXITY_TABLE}</a>.</p>
<h2>Methods</h2><ul>{described}</ul>
<h2>Test perplexity (domain × method × domain size × budget)</h2>
{_ppl_table_html(pt)}
<h2>Figures</h2>{figs}
<h2>Costs per measured point</h2>
{_df_html(points[cost_cols], fmt)}
<h2>Amortization over N domains</h2>
{_df_html(am, {"c_total_flops": ".4g", "c_total_hours": ".4g", "macro_ppl": ".2f"})}
{_findings_html(found, accuracy, unit)}
{_coverage_html(list(coverage))}
<h2>Cost assumptions</h2><ul>{assumptions}</ul>
<h2>Recipe</h2><pre>{e(recipe_yaml)}</pre>
</body></html>
"""
