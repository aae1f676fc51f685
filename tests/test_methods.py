"""The method registry (tune/methods.py): adding a method is adding one entry. Toy methods
registered here are accepted by recipe validation, the grid, the teacher phase, the cost model,
the planner and the report through the registry alone; unknown methods and malformed entries
are refused naming the field."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pandas as pd
import pytest

from slm.config import Recipe
from slm.configkit import ConfigError
from slm.errors import InputError
from slm.layout import RunLayout
from slm.models.config import PretrainConfig
from slm.tune import paper_findings as paper
from slm.tune.config import SweepConfig
from slm.tune.costs import load_pretrain_costs, method_costs, pretrain_split, trial_costs
from slm.tune.grid import Trial, check_methods, size_params, teacher_trials
from slm.tune.methods import METHODS, FromFamily, Method, get_method, method_names, register
from slm.tune.planner import plan, rank_paper
from slm.tune.report import write_report
from slm.tune.results import check_results
from slm.tune.sweep import sweep_phases

# A variant of SLM that serves the large model and starts from it; one pretrained per domain;
# one distilled from plain SLM fine-tuning (a teacher that is not the llm).
BIG = Method("big", "SLM-big", "the large generic model fine-tuned on the domain, served as is",
             FromFamily("llm"), ("llm",), served="llm", color="#123456")
OWN = Method("own", "SLM-own", "the domain's own importance-resampled model, fine-tuned",
             FromFamily("is"), ("is",))
KD = Method("kd", "SLM-kd", "a small model distilled from the fine-tuned small model",
            FromFamily("slm"), ("slm",), teacher="slm")


@pytest.fixture(scope="module", autouse=True)
def toys():
    for m in (BIG, OWN, KD):
        register(m)
    yield
    for m in (BIG, OWN, KD):
        METHODS.pop(m.name)


def _recipe(root, **pretrain) -> Recipe:
    p = dataclasses.replace(PretrainConfig(), slm_size="tiny", llm_size="demo-slm", **pretrain)
    return Recipe(name="toy", run_dir=str(root), pretrain=p)


def test_grid_and_recipe_validation_accept_registered_methods(tmp_path):
    SweepConfig(methods=["slm", "big", "own", "kd"]).validate()
    assert method_names()[-3:] == ("big", "own", "kd")
    r = _recipe(tmp_path)
    big = size_params(r, "demo-slm")
    wide = dataclasses.replace(r, specialize=dataclasses.replace(r.specialize, inference_budget=big))
    assert check_methods(wide, ["slm", "big", "own", "kd"]) == ["slm", "big", "own", "kd"]
    # the toy serves the large preset: a budget of the small model's size leaves it out
    assert check_methods(r, ["slm", "big", "kd"]) == ["slm", "kd"]
    # its pretrained family must be in the recipe, named in the error
    no_llm = _recipe(tmp_path, families=["slm", "is", "mix", "pn"])
    no_llm = dataclasses.replace(no_llm, specialize=wide.specialize)
    with pytest.raises(ConfigError, match="'big', which needs the 'llm' family"):
        check_methods(no_llm, ["big"])


def test_teachers_come_from_the_registry():
    trials = [Trial("a", "kd", 4, 1024, 0, 1e-3), Trial("a", "d", 4, 1024, 0, 1e-3),
              Trial("a", "slm", 4, 1024, 0, 1e-3)]
    teachers = teacher_trials(trials)
    assert [t.method for t in teachers] == ["slm", "llm"]
    (p1, first), (p2, rest) = sweep_phases(trials)
    assert (p1, [t.key() for t in first]) == ("teachers", [t.key() for t in teachers])
    assert [t.method for t in rest] == ["kd", "d"]  # the slm trial ran as a teacher


def _rows(method: str, params: int, nll: float, pre: float) -> list[dict]:
    rows = []
    for dom in ("a", "b"):
        for budget, gain in ((4, 0.0), (16, 0.2)):
            loss = nll - gain
            rows.append({"recipe": "toy", "domain": dom, "method": method, "budget_steps": budget,
                         "domain_tokens": 1024, "seed": 0, "lr": 1e-3, "expert": -1,
                         "valid_loss": loss, "test_loss": loss, "test_ppl": math.exp(loss),
                         "steps_run": budget, "best_step": budget, "spec_flops": 1e9 * budget,
                         "spec_device_seconds": 0.1 * budget, "pretrain_flops": pre,
                         "pretrain_device_seconds": pre / 1e12, "inference_params": params,
                         "inference_flops_per_token": 2.0 * params, "model_path": ""})
    return rows


@pytest.fixture()
def run(tmp_path):
    """A run directory with pretraining costs and one sweep's results of slm and the toys."""
    layout = RunLayout(str(tmp_path))
    costs = {layout.pretrain_costs("slm"): 1e12, layout.pretrain_costs("llm"): 5e12,
             layout.pretrain_costs("is", "a-1024"): 3e12, layout.pretrain_costs("is", "b-1024"): 4e12}
    for uri, flops in costs.items():
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        with open(uri, "w") as f:
            json.dump({"flops": flops, "device_seconds": flops / 1e12}, f)
    df = pd.DataFrame(_rows("slm", 1000, 3.0, 1e12) + _rows("big", 9000, 2.0, 5e12)
                      + _rows("own", 1000, 2.5, 3e12))
    path = layout.results("toys")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    df.to_parquet(path)
    return layout, df, path


def test_costs_follow_the_entry(run):
    layout, df, _ = run
    check_results(df, "toys")
    pc = load_pretrain_costs(layout.root)
    shared, own, missing = pretrain_split(get_method("own"), pc, "b", domain_tokens=1024)
    assert (shared["flops"], own["flops"], missing) == (0.0, 4e12, [])
    assert pretrain_split(get_method("kd"), {}, "a")[2] == ["slm"]
    mc = method_costs(df, pc).set_index(["method", "budget_steps"])
    assert mc.loc[("big", 4), "c_pretrain_flops"] == 5e12           # its family's pretraining
    assert mc.loc[("own", 4), "c_pretrain_flops"] == 0.0            # per domain: specialization
    assert mc.loc[("own", 4), "c_spec_flops"] == pytest.approx(4e9 + (3e12 + 4e12) / 2)
    assert set(trial_costs(df, pc).cost_basis) == {"costs.json"}


def test_a_per_domain_family_is_charged_and_started_per_domain_size(tmp_path):
    """SLM-is is pretrained once per (domain, domain size): a trial of size T is charged the
    run of its own size only (never the other size's, never a sum), and starts from it."""
    from slm.tune.starts import StartContext

    layout = RunLayout(str(tmp_path))
    costs = {("a", 1024): 3e12, ("a", 4096): 5e12}
    for (d, t), flops in costs.items():
        os.makedirs(layout.pretrain_final("is", f"{d}-{t}"))
        with open(layout.pretrain_costs("is", f"{d}-{t}"), "w") as f:
            json.dump({"flops": flops, "device_seconds": flops / 1e12}, f)
    pc = load_pretrain_costs(layout.root)
    assert sorted(pc["is"]) == ["a-1024", "a-4096"]
    for (d, t), flops in costs.items():
        shared, own, missing = pretrain_split(get_method("is"), pc, d, 1.0, t)
        assert (shared["flops"], own["flops"], missing) == (0.0, flops, [])
    assert pretrain_split(get_method("is"), pc, "a", 1.0, 2048)[2] == ["is"]  # no run of that size
    rows = [r for r in _rows("is", 1000, 2.5, 0.0) if r["domain"] == "a" and r["budget_steps"] == 4]
    df = pd.DataFrame([{**rows[0], "domain_tokens": t} for t in (1024, 4096)])
    t = trial_costs(df, pc).set_index("domain_tokens")
    assert (t.c_pretrain_flops == 0.0).all()                          # not shared: specialization
    assert t.loc[1024, "c_spec_flops"] == pytest.approx(4e9 + 3e12)
    assert t.loc[4096, "c_spec_flops"] == pytest.approx(4e9 + 5e12)
    recipe = _recipe(tmp_path)
    for size in (1024, 4096):
        (start,) = StartContext(recipe, str(tmp_path / "work")).starts(Trial("a", "is", 4, size, 0, 1e-3))
        assert start.path == layout.pretrain_final("is", f"a-{size}")


def test_planner_and_report_accept_the_toys(run):
    layout, df, path = run
    r = plan(1e15, 1e13, 1e6, domains=1, domain_tokens=1024, results=path)
    assert r.method == "big" and {c.method for c in r.candidates} == {"slm", "big", "own"}
    r = plan(1e15, 1e13, 5000, domains=1, domain_tokens=1024, results=path)
    assert r.method == "own"                                          # big serves 9000 > 5000
    assert "serves 9,000 params" in {c.method: c for c in r.candidates}["big"].reason
    # the paper has no numbers for a method without a paper reading: left out of the fallback
    cands, _ = rank_paper(paper.gpuh_to_flops(650), paper.gpuh_to_flops(0.1), 1e9, 1, 1e6)
    assert {c.method for c in cands} == {m for m in method_names() if get_method(m).paper}
    assert "big" not in {c.method for c in cands}
    index = write_report(Recipe(name="toy", run_dir=layout.root))
    page = open(index, encoding="utf-8").read()
    assert "<b>SLM-big</b> (<code>big</code>): the large generic model" in page
    assert "own: + the domain&#x27;s own is pretraining" in page
    assert layout.root not in page                                    # no machine paths


def test_unknown_methods_and_bad_entries_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="field 'sweep.methods' has unknown method 'gpt'; known: slm"):
        get_method("gpt")
    with pytest.raises(ConfigError, match="field 'methods' has unknown method 'gpt'"):
        SweepConfig(methods=["slm", "gpt"]).validate()
    with pytest.raises(InputError, match="unknown method"):
        check_results(pd.DataFrame(_rows("gpt", 1, 1.0, 0.0)), "x.parquet")
    with pytest.raises(ConfigError, match="field 'pretrains' has unknown family 'xl'"):
        Method("x", "X", "x", FromFamily("xl"), ("xl",))
    with pytest.raises(ConfigError, match="field 'served' is 'huge'"):
        Method("x", "X", "x", FromFamily("slm"), ("slm",), served="huge")
    with pytest.raises(ConfigError, match="field 'paper' is 'table9'"):
        Method("x", "X", "x", FromFamily("slm"), ("slm",), paper="table9")
    with pytest.raises(ConfigError, match="'--'"):
        Method("a--b", "X", "x", FromFamily("slm"))
    with pytest.raises(ConfigError, match="teacher 'nosuch' is not a registered method"):
        register(Method("x", "X", "x", FromFamily("slm"), teacher="nosuch"))
    with pytest.raises(ConfigError, match="already registered"):
        register(BIG)
    assert "x" not in METHODS
