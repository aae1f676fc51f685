"""Every family pretrains end to end through ``pretrain()`` on tiny shards (real Ray Train +
DeepSpeed on CPU, Ray Tune for the SLM-mix experts), publishes its served model(s) and a
measured costs.json, and is not retrained when asked again. One run directory for the module."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from train_shards import make_run, tiny_recipe  # noqa: E402

from slm.config import dump_recipe  # noqa: E402
from slm.models.pretrain import pretrain  # noqa: E402

COST_KEYS = {"flops", "device_seconds", "tokens", "steps", "params"}


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fam"))
    make_run(root)
    return root, tiny_recipe(root, slm=6, llm=4, **{"is": 4}, mix=4, pn=6)


def _costs(path: str) -> dict:
    with open(path) as f:
        c = json.load(f)
    assert COST_KEYS <= set(c) and c["flops"] > 0 and c["device_seconds"] > 0
    return c


def test_slm_and_llm_publish_hf_models_and_are_not_retrained(run):
    from transformers import AutoModelForCausalLM

    root, recipe = run
    for fam, steps in (("slm", 6), ("llm", 4)):
        out = pretrain(recipe, fam)
        final = os.path.join(root, "pretrain", fam, "final")
        assert out["runs"] == {fam: final}
        model = AutoModelForCausalLM.from_pretrained(final)
        assert model.config.n_embd == 32 and model.config.vocab_size == 128
        c = _costs(os.path.join(root, "pretrain", fam, "costs.json"))
        assert c["steps"] == steps and c["tokens"] == steps * 4 * 16
    assert os.listdir(os.path.join(root, "pretrain", "slm", "tensorboard"))
    before = os.stat(os.path.join(root, "pretrain", "slm", "final", "manifest.json")).st_mtime_ns
    again = pretrain(recipe, "slm")  # finished: returns the published result, trains nothing
    assert again["costs"]["steps"] == 6
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


def test_is_trains_one_model_per_domain(run):
    from transformers import AutoModelForCausalLM

    root, recipe = run
    out = pretrain(recipe, "is")
    final = os.path.join(root, "pretrain", "is", "alpha", "final")
    assert out["runs"] == {"alpha": final}
    AutoModelForCausalLM.from_pretrained(final)
    c = _costs(os.path.join(root, "pretrain", "is", "alpha", "costs.json"))
    assert c["steps"] == 4
    total = _costs(os.path.join(root, "pretrain", "is", "costs.json"))
    assert total["flops"] == c["flops"]


def test_mix_trains_k_experts_in_parallel_on_their_clusters(run):
    from transformers import AutoModelForCausalLM

    root, recipe = run
    recipe = copy.deepcopy(recipe)
    recipe.pretrain.scaling.cpus_per_worker = 0.5  # 2 runs at once on 2 CPUs, 1 left for data
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


def test_pn_trains_a_projected_model_routed_by_cluster(run):
    from slm.models.flops import train_flops_per_token
    from slm.models.lm import lm_config
    from slm.models.projected import ProjectedLM

    root, recipe = run
    pretrain(recipe, "pn")
    final = os.path.join(root, "pretrain", "pn", "final")
    pn = ProjectedLM.from_pretrained(final)
    assert pn.n_experts == 2 and pn.h == 2
    expert = pn.materialize(1)
    assert expert.config.n_embd == 32
    c = _costs(os.path.join(root, "pretrain", "pn", "costs.json"))
    dense = train_flops_per_token(lm_config("tiny", 128, 16), 16) * c["tokens"]
    assert c["flops"] > dense  # + materialising the experts present in each micro-batch
    assert c["params"] == pn.param_counts()["total"]
