"""`slm plan` (tune/planner.py): measured recommendation, interpolation, paper fallback, errors."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from slm.tune import paper_findings as paper
from slm.tune.planner import format_plan, interpolate, plan
from tiny_results import build_run

from slm.configkit import ConfigError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny-run"))
    path = build_run(root)
    return root, path, pd.read_parquet(path)


def _macro(df: pd.DataFrame) -> pd.Series:
    """Direct computation: exp(mean over domains of mean test NLL over seeds) per point."""
    return (df.groupby(["method", "domain_tokens", "budget_steps", "domain"]).test_loss.mean()
            .groupby(level=["method", "domain_tokens", "budget_steps"]).mean().map(math.exp))


def test_plan_recommends_the_measured_best(run):
    root, path, df = run
    r = plan(pretrain_budget=1e15, specialize_budget=1e15, inference_budget=1e9, domains=1,
             domain_tokens=4096, results=path)
    macro = _macro(df).xs(4096, level="domain_tokens")
    best = macro.groupby(level="method").min()
    assert r.source == "measured"
    assert r.method == best.idxmin()
    assert r.predicted_ppl == pytest.approx(best.min(), rel=1e-12)
    assert [c.method for c in r.candidates if c.fits] == list(best.sort_values().index)
    text = format_plan(r)
    assert f"recommended method: {r.method}" in text and "source: measured" in text
    assert f"method={r.method}, budget_steps=" in text  # the evidence row it used

    # the LLM is excluded by an inference budget between the two model sizes
    small = int(df[df.method != "llm"].inference_params.max())
    r2 = plan(1e15, 1e15, small, domains=1, domain_tokens=4096, run=root)
    assert "llm" not in [c.method for c in r2.candidates if c.fits]
    assert r2.method == best.drop("llm").idxmin()


def test_plan_interpolates_in_log_cost_and_amortises_pretraining(run):
    _, path, df = run
    from slm.tune.costs import method_costs

    mc = method_costs(df)
    slm = mc[(mc.method == "slm") & (mc.domain_tokens == 1024)].sort_values("c_spec_flops")
    (c0, n0), (c1, n1) = zip(slm.c_spec_flops, slm.macro_nll)
    mid = math.sqrt(c0 * c1)  # halfway in log-cost
    expected = min(n0, n0 + 0.5 * (min(n1, n0) - n0))
    pre = float(slm.c_pretrain_flops.iloc[0])
    r = plan(pre, mid, 1e9, domains=1, domain_tokens=1000, results=path)
    cand = {c.method: c for c in r.candidates}["slm"]
    assert cand.fits and cand.predicted_nll == pytest.approx(expected, rel=1e-12)
    assert {e["budget_steps"] for e in cand.evidence} <= {4, 16}
    assert r.domain_tokens_used == 1024  # nearest measured size to 1000
    # below the cheapest specialization point a method does not fit
    r = plan(pre, c0 * 0.5, 1e9, domains=1, domain_tokens=1024, results=path)
    assert not {c.method: c for c in r.candidates}["slm"].fits
    # shared pretraining amortised over N: too dear for 1 domain, affordable for 7
    budget = pre / 3
    one = {c.method: c for c in plan(budget, 1e15, 1e9, 1, 1024, results=path).candidates}
    seven = {c.method: c for c in plan(budget, 1e15, 1e9, 7, 1024, results=path).candidates}
    assert not one["slm"].fits and "C_pretrain/N" in one["slm"].reason
    assert seven["slm"].fits
    assert one["is"].fits and one["nopt"].fits  # nothing shared to amortise


def test_interpolate_envelope():
    pts = [(10.0, 3.0), (1000.0, 2.0), (100.0, 2.5)]
    assert interpolate(pts, 5.0) == (None, [])
    assert interpolate(pts, 1e6) == (2.0, [1])
    v, idx = interpolate(pts, math.sqrt(10 * 100))
    assert v == pytest.approx(2.75) and idx == [0, 2]
    # a worse point at a higher cost never raises the prediction (early stopping keeps the best)
    assert interpolate([(10.0, 2.0), (100.0, 3.0)], 100.0)[0] == 2.0


def test_paper_fallback_says_so_and_follows_the_decision_chart(tmp_path):
    g = paper.gpuh_to_flops
    # small inference, small specialization budget -> projected nets / mixtures (Fig. 1)
    r = plan(g(650), g(0.1), 2e8, domains=1, domain_tokens=1e6)
    assert r.source == "paper" and "paper" in r.source_detail and "MFU" in r.source_detail
    assert r.method in ("pn", "mix")
    assert r.predicted_ppl == pytest.approx(min(row[2] for m in ("pn", "mix") for row in paper.TABLE8[m]))
    assert "Table 8" in format_plan(r)
    # small inference, large specialization budget -> importance sampling
    r = plan(g(650), g(200), 2e8, domains=1, domain_tokens=1e6)
    assert r.method == "is" and r.predicted_text.startswith("< ")
    # large inference budget beyond 1M tokens -> the large model
    r = plan(g(650), g(200), 1e9, domains=1, domain_tokens=8e6)
    assert r.method == "llm"
    # a run directory without sweeps also falls back, and says why
    r = plan(g(650), g(0.1), 2e8, run=str(tmp_path))
    assert r.source == "paper" and "no sweep results" in r.source_detail


@pytest.mark.parametrize("field,value", [("pretrain_budget", 0), ("specialize_budget", -1.0),
                                         ("inference_budget", float("nan")), ("domain_tokens", 0),
                                         ("pretrain_budget", float("inf"))])
def test_bad_budgets(field, value):
    kw = {"pretrain_budget": 1e20, "specialize_budget": 1e18, "inference_budget": 1e9,
          "domains": 1, "domain_tokens": 1e6}
    kw[field] = value
    with pytest.raises(ConfigError, match="--" + field.replace("_", "-")):
        plan(**kw)
    with pytest.raises(ConfigError, match="--domains"):
        plan(1e20, 1e18, 1e9, domains=0)


def test_inference_budget_below_every_model_lists_sizes(run, capsys):
    from slm.cli import main

    _, path, df = run
    sizes = sorted(set(df.inference_params))
    with pytest.raises(ConfigError) as e:
        plan(1e15, 1e15, sizes[0] - 1, results=path)
    for s in sizes:
        assert f"{s:,}" in str(e.value)
    with pytest.raises(ConfigError, match="126,000,000 .*771,000,000"):
        plan(1e20, 1e18, 1e6)
    assert main(["plan", "--pretrain-budget", "1e15", "--specialize-budget", "1e15",
                 "--inference-budget", "1e9", "--results", path]) == 0
    assert "recommended method:" in capsys.readouterr().out
    assert main(["plan", "--pretrain-budget", "0", "--specialize-budget", "1",
                 "--inference-budget", "1e9"]) == 2
    assert "--pretrain-budget" in capsys.readouterr().err

