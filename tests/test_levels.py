"""Pretraining levels (pretrain.levels): recipe checks, the trials of each level, and the cost
model at a level. Fast: no training here (the levels a real pretraining publishes are checked by
test_pretrain_families.py::test_every_run_publishes_its_pretraining_levels_from_the_same_run,
and a trial specialized from a level by test_specialize.py)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from slm.config import load_recipe
from slm.configkit import ConfigError
from slm.layout import RunLayout, expert_name
from slm.stage import publish, write_json
from slm.tune.costs import load_pretrain_costs, pretrain_split, trial_costs
from slm.tune.grid import Trial, method_levels
from slm.tune.methods import get_method


@pytest.mark.parametrize("levels, says", [
    ("[0, 1.0]", "in \\(0, 1\\]"),
    ("[0.5, 1.5]", "in \\(0, 1\\]"),
    ("[-0.25, 1.0]", "in \\(0, 1\\]"),
    ("[0.5, 0.25, 1.0]", "increasing"),
    ("[0.5, 0.5, 1.0]", "increasing"),
    ("[0.25, 0.5]", "end it with 1.0"),
    ("[]", "empty"),
    ("[yes, 1.0]", "expected a number"),
])
def test_bad_levels_name_the_field_and_the_fix(levels, says):
    with pytest.raises(ConfigError, match=says) as e:
        load_recipe("demo", {"pretrain.levels": levels})
    assert "levels" in str(e.value)


def test_two_levels_on_one_step_are_refused_naming_the_family():
    with pytest.raises(ConfigError, match="family 'mix' .*same step"):
        # 0.1 and 0.11 of mix's 40 steps are both step 4; the other families have 60+ steps
        load_recipe("demo", {"pretrain.levels": "[0.1, 0.11, 1.0]"})


def test_level_steps_are_fractions_of_each_familys_steps():
    r = load_recipe("demo", {"pretrain.levels": "[0.25, 0.5, 1.0]"})
    assert r.pretrain.level_steps("slm") == {0.25: 25, 0.5: 50, 1.0: 100}
    assert r.pretrain.level_steps("mix") == {0.25: 10, 0.5: 20, 1.0: 40}  # mix: per expert


def test_trials_of_each_level_and_their_keys():
    r = load_recipe("demo", {"pretrain.levels": "[0.25, 1.0]"})
    assert method_levels(r, "slm") == [0.25, 1.0] and method_levels(r, "mix") == [0.25, 1.0]
    assert method_levels(r, "nopt") == [1.0]  # pretrains nothing: one level
    t = Trial("jargon", "slm", 60, 32768, 0, 5e-4, 0.25)
    assert t.key().endswith("--p0.25") and Trial.from_dict(t.to_dict()) == t
    final = Trial("jargon", "slm", 60, 32768, 0, 5e-4)
    assert final.key() == "jargon--slm--b60--t32768--s0--lr0.0005"  # keys of runs without levels stay
    assert Trial.from_dict({k: v for k, v in final.to_dict().items() if k != "level"}) == final


def test_a_sweep_can_specialize_from_some_levels_only():
    r = load_recipe("demo", {"pretrain.levels": "[0.25, 0.5, 1.0]", "sweep.levels": "[0.5, 1.0]"})
    assert method_levels(r, "pn") == [0.5, 1.0] and method_levels(r, "nopt") == [1.0]
    r = load_recipe("demo", {"sweep.levels": "[0.25]"})  # demo saves 0.5 and 1
    with pytest.raises(ConfigError, match="sweep.levels.*0.25.*pretrain.levels"):
        method_levels(r, "slm")


def _costs(flops: float, seconds: float, steps: int) -> dict:
    return {"flops": flops, "device_seconds": seconds, "tokens": steps * 10, "steps": steps, "params": 1}


def _run(root: str) -> RunLayout:
    """A run directory with what pretraining publishes for costs: costs.json per run and a
    level-0.5/ model whose manifest holds its costs to that step (here without model files:
    the cost model reads only manifests)."""
    layout = RunLayout(root)
    runs = {("slm", ""): 100.0, ("is", "a-100"): 30.0, ("is", "a-200"): 70.0, ("mix", expert_name(0)): 40.0, ("mix", expert_name(1)): 60.0}
    for (fam, sub), flops in runs.items():
        os.makedirs(layout.pretrain(fam, sub), exist_ok=True)
        write_json(layout.pretrain_costs(fam, sub), _costs(flops, flops / 10, 10))
        with publish(layout.pretrain_level(fam, sub, 0.5), stage="pretrain-test", config={"level": 0.5}) as out:
            out.manifest["costs"] = _costs(flops / 2, flops / 20, 5)
    return layout


def test_costs_at_a_level_are_the_costs_to_that_step(tmp_path):
    layout = _run(str(tmp_path / "run"))
    pc = load_pretrain_costs(layout.root)
    shared, _, missing = pretrain_split(get_method("slm"), pc, "a", 0.5)
    assert shared == {"flops": 50.0, "device_seconds": 5.0} and not missing
    shared, _, _ = pretrain_split(get_method("mix"), pc, "a", 0.5)   # summed over the experts
    assert shared["flops"] == 50.0
    assert pretrain_split(get_method("mix"), pc, "a", 1.0)[0]["flops"] == 100.0
    _, own, _ = pretrain_split(get_method("is"), pc, "a", 0.5, 100)  # per domain and size:
    assert own["flops"] == 15.0                                        # specialization
    assert pretrain_split(get_method("is"), pc, "a", 0.5, 200)[1]["flops"] == 35.0
    assert pretrain_split(get_method("slm"), pc, "a", 0.25)[2] == ["slm"]  # not published: missing


def test_rows_of_two_levels_are_two_trials_each_with_its_levels_cost(tmp_path):
    layout = _run(str(tmp_path / "run"))
    row = {"recipe": "r", "domain": "a", "method": "slm", "budget_steps": 10, "domain_tokens": 100,
           "seed": 0, "lr": 1e-3, "expert": -1, "valid_loss": 3.0, "test_loss": 3.0, "test_ppl": 20.0,
           "steps_run": 10, "best_step": 10, "spec_flops": 1.0, "spec_device_seconds": 1.0,
           "pretrain_flops": 0.0, "pretrain_device_seconds": 0.0, "inference_params": 1,
           "inference_flops_per_token": 2.0, "model_path": ""}
    df = pd.DataFrame([{**row, "pretrain_level": 0.5, "valid_loss": 2.0}, {**row, "pretrain_level": 1.0}])
    t = trial_costs(df, load_pretrain_costs(layout.root)).set_index("pretrain_level")
    assert len(t) == 2  # not collapsed to the lower valid loss
    assert t.loc[0.5, "c_pretrain_flops"] == 50.0 and t.loc[1.0, "c_pretrain_flops"] == 100.0
    old = trial_costs(pd.DataFrame([row]), load_pretrain_costs(layout.root))  # no level column
    assert old["pretrain_level"].tolist() == [1.0] and old["c_pretrain_flops"].tolist() == [100.0]
