"""Pretraining seeds (pretrain.seeds, issue 13): recipe checks, where each seed's runs live, the
trials of each seed and their keys, the costs of each seed, and (one tiny real pretraining of
one family at a second seed) a model in that seed's own place that the sweep starts from."""

from __future__ import annotations

import dataclasses
import os

import pandas as pd
import pytest
from synthetic_results import synthetic_results
from train_shards import SEQ, VOCAB, make_run, tiny_recipe, windows, write_shards

from slm.cluster.nodes import node_type
from slm.config import load_recipe
from slm.configkit import ConfigError
from slm.errors import InputError, StageError
from slm.estimate import Cluster, estimate
from slm.layout import RunLayout, domain_run, seed_dir
from slm.models.config import FAMILY_INFO
from slm.models.pretrain import _Family, pretrain
from slm.stage import manifest, write_json
from slm.tune.costs import load_pretrain_costs, pretrain_split, trial_costs
from slm.tune.findings import evaluate_findings
from slm.tune.grid import Trial, method_pretrain_seeds, pretrained_inputs, sweep_trials, trial_config, trial_uri
from slm.tune.methods import get_method
from slm.tune.specialize import specialize_trial
from slm.tune.starts import StartContext


@pytest.mark.parametrize("field, value, says", [
    ("pretrain.seeds", "[0, 1, 0]", r"pretrain: field 'seeds' lists seed\(s\) \[0\] more than once"),
    ("pretrain.seeds", "[1, -2]", "pretrain: field 'seeds' has -2; a seed is a non-negative integer"),
    ("sweep.pretrain_seeds", "[3, 3]", r"sweep: field 'pretrain_seeds' lists seed\(s\) \[3\] more than once"),
])
def test_bad_pretraining_seeds_name_the_field(field, value, says):
    with pytest.raises(ConfigError, match=says):
        load_recipe("demo", {field: value})


def test_the_recipes_seed_keeps_todays_paths_and_another_seed_gets_its_own_tree(tmp_path):
    r = load_recipe("demo")
    assert r.pretrain.seeds == [] and r.pretrain_seeds() == [r.seed] and r.layout_seed(r.seed) is None
    r = load_recipe("demo", {"pretrain.seeds": "[0, 3]"})
    assert r.pretrain_seeds() == [0, 3] and r.layout_seed(0) is None and r.layout_seed(3) == 3
    layout = RunLayout(str(tmp_path))
    pre = os.path.join(str(tmp_path), "pretrain")
    assert layout.pretrain("slm") == layout.pretrain("slm", seed=None) == os.path.join(pre, "slm")
    assert layout.pretrain_final("mix", "expert-1") == os.path.join(pre, "mix", "expert-1", "final")
    assert layout.pretrain_level("is", "a", 0.5) == os.path.join(pre, "is", "a", "level-0.5")
    s3 = os.path.join(pre, "seed-3")
    assert layout.pretrain(seed=3) == s3
    assert layout.pretrain_final("slm", seed=3) == os.path.join(s3, "slm", "final")
    assert layout.pretrain_level("mix", "expert-0", 0.5, 3) == os.path.join(s3, "mix", "expert-0", "level-0.5")
    assert layout.pretrain_costs("is", "a", 3) == os.path.join(s3, "is", "a", "costs.json")
    os.makedirs(os.path.join(s3, "slm"))
    os.makedirs(os.path.join(pre, "seed-10"))
    assert layout.pretrain_seeds() == [3, 10]
    with pytest.raises(InputError, match="not a non-negative integer"):
        seed_dir(-1)


def test_trial_keys_and_configs_of_pretraining_seeds():
    t = Trial("jargon", "slm", 60, 32768, 0, 5e-4)
    assert t.key() == "jargon--slm--b60--t32768--s0--lr0.0005"  # the recipe's seed: keys stay
    assert "pretrain_seed" not in t.to_dict() and Trial.from_dict(t.to_dict()) == t
    t1 = dataclasses.replace(t, pretrain_seed=1, level=0.5)
    assert t1.key() == "jargon--slm--b60--t32768--s0--lr0.0005--p0.5--ps1"
    assert t1.to_dict()["pretrain_seed"] == 1 and Trial.from_dict(t1.to_dict()) == t1
    r = load_recipe("demo", {"pretrain.seeds": "[0, 3]"})
    assert trial_config(r, t)["trial"] != trial_config(r, dataclasses.replace(t, pretrain_seed=3))["trial"]
    assert method_pretrain_seeds(r, "slm") == [None, 3] and method_pretrain_seeds(r, "mix") == [None, 3]
    assert method_pretrain_seeds(r, "nopt") == [None]  # pretrains nothing: the recipe's seed alone
    r = load_recipe("demo", {"pretrain.seeds": "[1, 2]"})  # the recipe's seed 0 is not among them
    assert method_pretrain_seeds(r, "slm") == [1, 2]
    r = load_recipe("demo", {"pretrain.seeds": "[0, 3]", "sweep.pretrain_seeds": "[3]"})
    assert method_pretrain_seeds(r, "pn") == [3]
    r = load_recipe("demo", {"sweep.pretrain_seeds": "[4]"})
    with pytest.raises(ConfigError, match=r"sweep.pretrain_seeds' has 4.*pretraining seeds: \[0\]"):
        method_pretrain_seeds(r, "slm")


def _write_costs(uri: str, flops: float) -> None:
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    write_json(uri, {"flops": flops, "device_seconds": flops / 10, "tokens": 10, "steps": 10, "params": 1})


def test_each_pretraining_seed_is_charged_its_own_costs(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    _write_costs(layout.pretrain_costs("slm"), 100.0)
    assert "by_seed" not in load_pretrain_costs(layout.root)  # one seed: as before seeds
    _write_costs(layout.pretrain_costs("slm", seed=1), 120.0)
    _write_costs(layout.pretrain_costs("is", domain_run("a", 100), seed=1), 30.0)
    pc = load_pretrain_costs(layout.root)
    assert pc["slm"]["flops"] == 100.0 and sorted(pc["by_seed"]) == [0, 1]  # no recipe.yaml: seed 0
    assert load_pretrain_costs(layout.root, seed=1)["slm"]["flops"] == 120.0
    slm = get_method("slm")
    assert pretrain_split(slm, pc, "a", 1.0, 100, seed=0)[0]["flops"] == 100.0
    assert pretrain_split(slm, pc, "a", 1.0, 100, seed=1)[0]["flops"] == 120.0
    assert pretrain_split(slm, pc, "a", 1.0, 100, seed=2)[2] == ["slm"]  # a seed the run did not pretrain
    # SLM-is: the seed's run of the domain at the trial's domain size
    assert pretrain_split(get_method("is"), pc, "a", 1.0, 100, seed=1)[1]["flops"] == 30.0
    row = {"recipe": "r", "domain": "a", "method": "slm", "budget_steps": 10, "domain_tokens": 100,
           "seed": 0, "lr": 1e-3, "expert": -1, "valid_loss": 3.0, "test_loss": 3.0, "test_ppl": 20.0,
           "steps_run": 10, "best_step": 10, "spec_flops": 1.0, "spec_device_seconds": 1.0,
           "pretrain_flops": 0.0, "pretrain_device_seconds": 0.0, "inference_params": 1,
           "inference_flops_per_token": 2.0, "model_path": "", "pretrain_level": 1.0}
    df = pd.DataFrame([{**row, "pretrain_seed": 0}, {**row, "pretrain_seed": 1, "valid_loss": 2.0}])
    t = trial_costs(df, pc).set_index("pretrain_seed")
    assert len(t) == 2  # two trials, not one LR search
    assert t.loc[0, "c_pretrain_flops"] == 100.0 and t.loc[1, "c_pretrain_flops"] == 120.0


def _seeded_run(root: str):
    """The tiny training run (train_shards) with the domain's three splits, pretraining seeds
    0 (the recipe's) and 1, and a sweep of slm and nopt."""
    layout = make_run(root)
    # the domain's other splits and its train subset of 512 tokens (32 windows), for the sweep
    for name, seed, n in (("train", 4, 64), ("test", 5, 32), ("train-512", 4, 32)):
        write_shards(layout, f"domain-alpha-{name}", windows(n, SEQ, [2, 4], seed=seed, id_base=30_000))
    recipe = tiny_recipe(root, slm=4)  # one checkpoint, at the last step
    recipe.pretrain.seeds = [0, 1]
    recipe.data.domain_train_tokens = [512]
    recipe.sweep.methods, recipe.sweep.budgets, recipe.sweep.seeds = ["slm", "nopt"], [4], [0]
    recipe.specialize.micro_batch, recipe.specialize.eval_every, recipe.specialize.eval_batches = 4, 2, 2
    return layout, recipe


def test_each_pretraining_seed_drives_its_runs_init_and_data_order_in_its_own_place(tmp_path):
    layout, recipe = _seeded_run(str(tmp_path / "run"))
    jobs = [_Family(recipe, FAMILY_INFO["slm"], recipe.name, VOCAB, pretrain_seed=s) for s in (0, 1)]
    specs = [j.spec("", "generic") for j in jobs]
    assert [s.loop.seed for s in specs] == [0, 1]  # model init, data order, micro-batch RNG
    assert [j.location("") for j in jobs] == [(layout.pretrain(), "slm"), (layout.pretrain(seed=1), "slm")]
    assert [j.final_config("", "generic")["seed"] for j in jobs] == [0, 1]
    assert _Family(recipe, FAMILY_INFO["slm"], recipe.name, VOCAB).spec("", "generic") == specs[0]


def test_a_pretraining_seed_is_published_in_its_tree_and_the_sweep_starts_from_it(ray_local, tmp_path):
    root = str(tmp_path / "run")
    layout, recipe = _seeded_run(root)
    out = pretrain(recipe, "slm", seed=1)  # one real run (4 steps): seed 0's is the same code
    final = layout.pretrain_final("slm", seed=1)
    assert final == os.path.join(root, "pretrain", "seed-1", "slm", "final")
    assert out["seed"] == 1 and out["runs"] == {"slm": final}
    assert manifest(final)["config"]["seed"] == 1 and manifest(layout.pretrain_final("slm")) is None
    costs = load_pretrain_costs(root, seed=1)["slm"]
    assert costs["flops"] == out["costs"]["flops"] > 0 and costs["steps"] == 4
    assert load_pretrain_costs(root)["by_seed"][1]["slm"] == costs

    trials = sweep_trials(recipe)
    assert sorted((t.method, str(t.pretrain_seed)) for t in trials) == [("nopt", "None"), ("slm", "1"),
                                                                         ("slm", "None")]
    assert len({t.key() for t in trials}) == 3
    seeded = next(t for t in trials if t.pretrain_seed == 1)
    ctx = StartContext(recipe, str(tmp_path / "work"))
    assert [s.path for s in ctx.starts(seeded)] == [final]
    assert list(pretrained_inputs(recipe, seeded)) == [layout.relative(final)]
    own = next(t for t in trials if t.method == "slm" and t.pretrain_seed is None)
    with pytest.raises(StageError, match=r"pretrain/slm/final' is missing"):  # seed 0: not pretrained
        ctx.starts(own)
    row = specialize_trial(recipe, seeded, trial_uri(recipe, seeded))  # 4 fine-tuning steps
    assert row["pretrain_seed"] == 1 and row["trial"].endswith("--ps1") and "/trials/" in trial_uri(recipe, seeded)
    assert row["pretrain_flops"] == costs["flops"]  # the seed's own pretraining


@pytest.mark.parametrize("pretrain_seeds, verdict", [((0,), "not measurable here"), ((0, 1), "reproduced")])
def test_findings_need_two_pretraining_seeds(pretrain_seeds, verdict):
    df = synthetic_results(domains=("a", "b"), levels=(1.0,), pretrain_seeds=pretrain_seeds, seeds=(0, 1))
    found = {r.id: r for r in evaluate_findings(trial_costs(df))}["large_model_wins"]
    assert found.verdict == verdict and found.detail["pretrain_seeds"] == len(pretrain_seeds)
    if len(pretrain_seeds) == 1:
        assert ">= 2 pretraining seeds" in found.reason


def test_the_estimate_counts_every_pretraining_seed():
    cluster, none = Cluster(node_type("L4", 1), 1), "/nonexistent/gpu-*.json"
    one = {s["stage"]: s for s in estimate(load_recipe("demo"), cluster, results_glob=none)["stages"]}
    two = {s["stage"]: s for s in estimate(load_recipe("demo", {"pretrain.seeds": "[0, 1]"}), cluster,
                                           results_glob=none)["stages"]}
    assert two["pretrain slm"]["runs"] == 2 * one["pretrain slm"]["runs"]
    assert two["pretrain mix"]["flops"] == pytest.approx(2 * one["pretrain mix"]["flops"])
    nopt = load_recipe("demo").sweep.methods.count("nopt")  # one trial per grid point, whatever the seeds
    per_method = one["specialize sweep"]["runs"] // len(load_recipe("demo").sweep.methods)
    assert two["specialize sweep"]["runs"] == 2 * one["specialize sweep"]["runs"] - nopt * per_method
