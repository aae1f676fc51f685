"""Cost model (tune/costs.py) on a real tiny run: measured FLOPs/seconds, paper Eq. 1."""

from __future__ import annotations

import json
import math
import os

import pytest
from slm.tune.costs import (
    amortization_table,
    load_pretrain_costs,
    method_costs,
    total_cost,
    trial_costs,
)
from slm.tune.results import read_results
from tiny_results import build_run

from slm.errors import InputError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny-run"))
    path = build_run(root)
    return root, read_results(path)


def _json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_load_pretrain_costs_sums_experts_and_keeps_is_per_domain_and_size(run):
    root, _ = run
    pc = load_pretrain_costs(root)
    pre = os.path.join(root, "pretrain")
    assert pc["slm"]["flops"] == _json(pre, "slm", "costs.json")["flops"]
    assert pc["llm"]["device_seconds"] == _json(pre, "llm", "costs.json")["device_seconds"]
    experts = [_json(pre, "mix", f"expert-{i}", "costs.json") for i in range(2)]
    assert pc["mix"]["flops"] == pytest.approx(sum(e["flops"] for e in experts), rel=1e-12)
    assert pc["mix"]["device_seconds"] == pytest.approx(sum(e["device_seconds"] for e in experts), rel=1e-12)
    assert sorted(pc["is"]) == ["code-1024", "code-4096", "prose-1024", "prose-4096"]
    assert pc["is"]["code-4096"]["flops"] == _json(pre, "is", "code-4096", "costs.json")["flops"]
    assert "pn" not in pc  # never pretrained in this run


def test_method_costs_follow_the_accounting_rules(run):
    root, df = run
    pc = load_pretrain_costs(root)
    mc = method_costs(df, pc).set_index(["method", "budget_steps", "domain_tokens"])
    for (method, budget, tokens), r in mc.iterrows():
        rows = df[(df.method == method) & (df.budget_steps == budget) & (df.domain_tokens == tokens)]
        # these rows predate the to-best columns: fine-tuning to the best step is charged
        # spec x best_step / steps_run (every fine-tuning step costs the same)
        to_best = rows.best_step.clip(upper=rows.steps_run) / rows.steps_run
        if method == "is":  # no shared pretraining; the run of each (domain, size) is specialization
            own = rows["domain"].map(lambda d: pc["is"][f"{d}-{tokens}"]["flops"])
            assert r.c_pretrain_flops == 0.0
            assert r.c_spec_total_flops == pytest.approx((rows.spec_flops + own).mean(), rel=1e-12)
            assert r.c_spec_flops == pytest.approx((rows.spec_flops * to_best + own).mean(), rel=1e-12)
        else:
            expected_pre = {"slm": pc["slm"]["flops"], "llm": pc["llm"]["flops"], "mix": pc["mix"]["flops"],
                            "d": pc["slm"]["flops"] + pc["llm"]["flops"], "nopt": 0.0}[method]
            assert r.c_pretrain_flops == pytest.approx(expected_pre, rel=1e-12)
            assert r.c_spec_total_flops == pytest.approx(rows.spec_flops.mean(), rel=1e-12)
            assert r.c_spec_flops == pytest.approx((rows.spec_flops * to_best).mean(), rel=1e-12)
        own_s = rows["domain"].map(lambda d: pc["is"][f"{d}-{tokens}"]["device_seconds"]) if method == "is" else 0
        assert r.c_spec_total_hours == pytest.approx((rows.spec_device_seconds + own_s).mean() / 3600, rel=1e-9)
        assert r.c_spec_hours == pytest.approx((rows.spec_device_seconds * to_best + own_s).mean() / 3600,
                                               rel=1e-9)
        nll = rows.groupby("domain").test_loss.mean().mean()
        assert r.macro_ppl == pytest.approx(math.exp(nll), rel=1e-12)
        assert r.inference_params == rows.inference_params.max()
    # SLM-d's specialization includes its teacher's (the llm trial's) fine-tuning
    assert (mc.xs("d").c_spec_flops > mc.xs("slm").c_spec_flops).all()
    # the rows' own cost columns and the run's costs.json agree (same measured numbers)
    from_rows = method_costs(df, None)
    assert from_rows.c_pretrain_flops.tolist() == pytest.approx(method_costs(df, pc).c_pretrain_flops.tolist())
    assert set(trial_costs(df, None).cost_basis) == {"results", "none"}


def test_total_cost_is_eq1_and_is_grows_fastest_with_n(run):
    root, df = run
    mc = method_costs(df, load_pretrain_costs(root))
    for n in (1, 7, 50):
        t = total_cost(mc, n)
        assert (t.c_total_flops == t.c_pretrain_flops + n * t.c_spec_flops).all()
        assert (t.c_total_hours == t.c_pretrain_hours + n * t.c_spec_hours).all()
    amort = amortization_table(mc, ns=(1, 7, 50))
    assert sorted(set(amort.n)) == [1, 7, 50] and len(amort) == 3 * len(mc)
    wide = amort.pivot_table(index=["method", "budget_steps", "domain_tokens"], columns="n",
                             values="c_total_flops")
    growth = (wide[50] - wide[1]) / 49  # = C_specialize: what each extra domain costs
    for (budget, tokens), g in growth.groupby(level=["budget_steps", "domain_tokens"]):
        assert g.idxmax()[0] == "is", g
    # with many domains SLM-is (no shared pretraining) ends up dearer than SLM (shared)
    at50 = wide[50].groupby(level="method").min()
    at1 = wide[1].groupby(level="method").min()
    assert at1["is"] / at1["slm"] < at50["is"] / at50["slm"]


def test_bad_inputs_are_named(run, tmp_path):
    _, df = run
    bad = tmp_path / "results.parquet"
    df.drop(columns=["spec_flops"]).to_parquet(bad)
    with pytest.raises(InputError, match="spec_flops"):
        read_results(str(bad))
    with pytest.raises(InputError, match="does not exist"):
        read_results(str(tmp_path / "nope.parquet"))
    with pytest.raises(InputError, match="N >= 1"):
        total_cost(method_costs(df), 0)
    broken = tmp_path / "run" / "pretrain" / "slm"
    broken.mkdir(parents=True)
    (broken / "costs.json").write_text(json.dumps({"flops": -1, "device_seconds": 2}))
    with pytest.raises(InputError, match="costs.json"):
        load_pretrain_costs(str(tmp_path / "run"))
