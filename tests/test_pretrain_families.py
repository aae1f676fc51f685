"""Every family pretrains end to end through ``pretrain()`` on the shared tiny run (real BPE,
MiniLM embeddings and k-means from the data pipeline; real Ray Train + DeepSpeed on CPU, Ray
Tune for the SLM-mix experts, two at once), publishes its served model(s) and a measured
costs.json, and is not retrained when asked again. (The run is built once per test session by
spec_run.build_tiny_run, which pretrains every family; the specialization tests start from it.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from spec_run import build_tiny_run

from slm.cluster.nodes import node_type
from slm.config import dump_recipe, load_run_recipe
from slm.estimate import Cluster, estimate
from slm.models.flops import train_flops_per_token
from slm.models.lm import lm_config
from slm.models.pretrain import _parallel_experts, pretrain
from slm.models.projected import ProjectedLM
from slm.tune.costs import load_pretrain_costs

COST_KEYS = {"flops", "device_seconds", "tokens", "steps", "params"}


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    recipe = build_tiny_run(tmp_path_factory.getbasetemp() / "spec-run")
    return os.path.abspath(recipe.run_dir), recipe


def _vocab(root: str) -> int:
    return len(AutoTokenizer.from_pretrained(os.path.join(root, "data", "tokenizer")))


def _costs(path: str) -> dict:
    with open(path) as f:
        c = json.load(f)
    assert COST_KEYS <= set(c) and c["flops"] > 0 and c["device_seconds"] > 0
    return c


def test_slm_and_llm_publish_hf_models_and_are_not_retrained(run):
    root, recipe = run
    p, seq = recipe.pretrain, recipe.data.seq_len
    for fam, width in (("slm", 32), ("llm", 128)):   # the recipe's sizes: tiny, demo-slm
        out = pretrain(recipe, fam)
        final = os.path.join(root, "pretrain", fam, "final")
        assert out["runs"] == {fam: final}
        model = AutoModelForCausalLM.from_pretrained(final)
        assert model.config.n_embd == width and model.config.vocab_size == _vocab(root)
        c = _costs(os.path.join(root, "pretrain", fam, "costs.json"))
        assert c["steps"] == p.steps[fam] and c["tokens"] == p.steps[fam] * p.train.micro_batch * seq
    assert os.listdir(os.path.join(root, "pretrain", "slm", "tensorboard"))
    before = os.stat(os.path.join(root, "pretrain", "slm", "final", "manifest.json")).st_mtime_ns
    again = pretrain(recipe, "slm")  # finished: returns the published result, trains nothing
    assert again["costs"]["steps"] == p.steps["slm"]
    assert os.stat(os.path.join(root, "pretrain", "slm", "final", "manifest.json")).st_mtime_ns == before


def test_cli_pretrain_on_a_finished_run_and_on_missing_data(run, tmp_path):
    root, recipe = run
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    cli = [sys.executable, "-m", "slm.cli", "pretrain", "--recipe", str(path)]
    ok = subprocess.run(cli + ["--family", "slm"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    empty = subprocess.run(cli + ["--family", "slm", "--run_dir", str(tmp_path / "none")],
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "slm data run" in empty.stderr


def test_is_trains_one_model_per_domain_and_size(run):
    """SLM-is: one run per (domain, domain size), on the generic set resampled to that size's
    train subset; by default at the sizes the sweep specializes (the tiny run's: 1024 only)."""
    root, recipe = run
    assert recipe.domain_sizes() == [1024] != recipe.data.domain_train_tokens
    out = pretrain(recipe, "is")
    final = os.path.join(root, "pretrain", "is", "numeric-1024", "final")
    assert out["runs"] == {"numeric-1024": final}
    assert not os.path.exists(os.path.join(root, "pretrain", "is", "numeric-2048"))  # not asked
    AutoModelForCausalLM.from_pretrained(final)
    c = _costs(os.path.join(root, "pretrain", "is", "numeric-1024", "costs.json"))
    assert c["steps"] == recipe.pretrain.steps["is"]
    rec = json.load(open(os.path.join(final, "manifest.json")))
    assert rec["config"]["data"] == f"is-k{recipe.kmeans.k_is}-numeric-1024"   # the resampled set
    # the checkpoint it was exported from, stored relative to the run
    assert rec["checkpoint"].startswith("pretrain/is/numeric-1024/step=")
    assert os.path.isdir(os.path.join(root, rec["checkpoint"]))
    total = _costs(os.path.join(root, "pretrain", "is", "costs.json"))
    assert total["flops"] == c["flops"]


def test_mix_trains_k_experts_in_parallel_on_their_clusters(run):
    root, recipe = run
    assert _parallel_experts(recipe, [0, 1]) == 2   # 0.5 CPU each on 2 CPUs, 1 left for data
    out = pretrain(recipe, "mix")
    assert sorted(out["runs"]) == ["expert-0", "expert-1"]
    parts = []
    for i in range(2):
        d = os.path.join(root, "pretrain", "mix", f"expert-{i}")
        AutoModelForCausalLM.from_pretrained(os.path.join(d, "final"))
        parts.append(_costs(os.path.join(d, "costs.json")))
        rec = json.load(open(os.path.join(d, "final", "manifest.json")))
        assert rec["config"]["data"] == f"generic:cluster_k2=={i}"
    total = _costs(os.path.join(root, "pretrain", "mix", "costs.json"))
    assert total["flops"] == pytest.approx(sum(p["flops"] for p in parts))
    assert total["params"] == sum(p["params"] for p in parts)
    assert all(p["steps"] == recipe.pretrain.steps["mix"] for p in parts)


def test_pn_trains_a_projected_model_routed_by_cluster(run):
    root, recipe = run
    pretrain(recipe, "pn")
    final = os.path.join(root, "pretrain", "pn", "final")
    pn = ProjectedLM.from_pretrained(final)
    assert pn.n_experts == 2 and pn.h == 2
    expert = pn.materialize(1)
    assert expert.config.n_embd == 32
    c = _costs(os.path.join(root, "pretrain", "pn", "costs.json"))
    seq = recipe.data.seq_len
    dense = train_flops_per_token(lm_config("tiny", _vocab(root), seq), seq) * c["tokens"]
    assert c["flops"] > dense  # + materialising the experts present in each micro-batch
    assert c["params"] == pn.param_counts()["total"]


def test_every_run_publishes_its_pretraining_levels_from_the_same_run(run):
    """pretrain.levels [0.5, 1]: one pretraining run per family (and per expert / per domain)
    also publishes its model at half its steps (level-0.5/), with the costs to that step in its
    manifest; the level's model is the run's weights at that step, not the final ones."""
    import torch
    from safetensors.torch import load_file

    from slm.layout import RunLayout, expert_name
    from slm.stage import manifest

    root, recipe = run
    layout = RunLayout(root)
    runs = [("slm", ""), ("llm", ""), ("pn", ""), ("is", "numeric-1024")]
    runs += [("mix", expert_name(i)) for i in range(recipe.kmeans.k_mix)]
    for fam, sub in runs:
        level = manifest(layout.pretrain_level(fam, sub, 0.5))
        final = manifest(layout.pretrain_final(fam, sub))
        assert level is not None and final is not None, (fam, sub)
        half = recipe.pretrain.level_steps(fam)[0.5]
        assert level["config"]["level_step"] == half == round(recipe.pretrain.steps[fam] / 2)
        assert level["costs"]["steps"] == half and final["costs"]["steps"] == recipe.pretrain.steps[fam]
        assert 0 < level["costs"]["flops"] < final["costs"]["flops"]
        assert level["costs"]["tokens"] == half * recipe.pretrain.train.micro_batch * recipe.data.seq_len
        # same run, other weights: the level is a model of its own
        a = load_file(os.path.join(layout.pretrain_level(fam, sub, 0.5), "model.safetensors"))
        b = load_file(os.path.join(layout.pretrain_final(fam, sub), "model.safetensors"))
        assert a.keys() == b.keys()
        assert any(not torch.equal(a[k], b[k]) for k in a), (fam, sub)


def test_families_whose_runs_fit_pretrain_at_once(run, tmp_path):
    """The tiny recipe's runs take 0.5 CPU of a 2-CPU Ray (one CPU kept for the data feed): two
    fit, so `slm run` pretrains slm and llm at once (each in its own TorchTrainer), and their
    training steps overlap in time. Their data comes from a copy of the shared run's data."""
    import dataclasses
    import shutil

    from slm.models.pretrain import pretrain_families, runs_that_fit

    root, recipe = run
    new = tmp_path / "run"
    shutil.copytree(os.path.join(root, "data"), new / "data")
    p = dataclasses.replace(recipe.pretrain, steps={**recipe.pretrain.steps, "slm": 40, "llm": 40},
                            levels=[1.0])
    r = dataclasses.replace(recipe, run_dir=str(new), pretrain=p)
    assert runs_that_fit(r) == 2
    done = pretrain_families(r, ["slm", "llm"])
    assert [d["family"] for d in done] == ["slm", "llm"]
    spans = []
    for fam in ("slm", "llm"):
        c = _costs(os.path.join(new, "pretrain", fam, "costs.json"))
        assert c["steps"] == 40 and os.path.isdir(os.path.join(new, "pretrain", fam, "final"))
        spans.append((c["first_step_at"], c["last_step_at"]))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, f"the two runs trained one after the other: {spans}"
    # parallel_families: 1 trains them one after another
    one = dataclasses.replace(r, run_dir=str(tmp_path / "one"),
                              pretrain=dataclasses.replace(p, scaling=dataclasses.replace(p.scaling, parallel_families=1)))
    shutil.copytree(os.path.join(root, "data"), tmp_path / "one" / "data")
    pretrain_families(one, ["slm", "llm"])
    s = [(c["first_step_at"], c["last_step_at"]) for c in
         (_costs(os.path.join(tmp_path, "one", "pretrain", f, "costs.json")) for f in ("slm", "llm"))]
    assert s[0][1] < s[1][0]
def test_estimate_matches_the_flops_the_run_recorded(run):
    """`slm estimate --run` on this run, before the fact, vs the FLOPs each family's training
    metered into its costs.json: within 5 % (SLM-pn's routing is measured per micro-batch in
    the run, uniform in the estimate)."""
    root, _ = run
    e = estimate(load_run_recipe(root), Cluster(node_type("H100", 1), 1), from_run=True,
                 results_glob="/nonexistent/gpu-*.json")
    assert e["vocab_from"] == "the run's tokenizer" and e["vocab_size"] == _vocab(root)
    stages = {s["stage"]: s for s in e["stages"]}
    recorded = load_pretrain_costs(root)
    for fam in ("slm", "llm", "is", "mix", "pn"):
        got = recorded[fam]
        flops = sum(c["flops"] for c in got.values()) if fam == "is" else got["flops"]
        assert stages[f"pretrain {fam}"]["flops"] == pytest.approx(flops, rel=0.05), fam
