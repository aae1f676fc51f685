"""Run identity: Train storage scoped by the run, resume signatures and published models keyed
by the content of what they were built from (issue: two runs on one storage never share a
checkpoint; changed config/data never silently reuses)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
from spec_run import build_tiny_run

from slm.config import dump_recipe
from slm.errors import StageError
from slm.layout import RunLayout, run_id, train_root
from slm.models.config import FAMILY_INFO
from slm.models.pretrain import _Family
from slm.models.train import signature
from slm.models.families import build_family
from slm.stage import read_json


@pytest.fixture(scope="module")
def recipe(ray_local, tmp_path_factory):
    return build_tiny_run(tmp_path_factory.getbasetemp() / "spec-run")


def _job(recipe, family="slm"):
    return _Family(recipe, FAMILY_INFO[family], recipe.name, 512)


def test_run_id_is_made_once_and_travels_with_the_run(tmp_path):
    a = RunLayout(str(tmp_path / "a"))
    os.makedirs(a.root)
    first = run_id(a)
    assert run_id(a) == first and read_json(a.identity)["run_id"] == first
    shutil.copytree(a.root, tmp_path / "b")
    assert run_id(RunLayout(str(tmp_path / "b"))) == first   # a copied run keeps its checkpoints
    c = RunLayout(str(tmp_path / "c"))
    os.makedirs(c.root)
    assert run_id(c) != first


def test_two_runs_on_one_shared_storage_never_share_train_storage(recipe, tmp_path):
    storage = str(tmp_path / "shared-storage")
    other_dir = tmp_path / "other-run"
    shutil.copytree(os.path.join(recipe.run_dir, "data"), other_dir / "data")  # same data, no id
    mine = dataclasses.replace(recipe, cluster=dataclasses.replace(recipe.cluster, storage=storage))
    other = dataclasses.replace(mine, run_dir=str(other_dir))
    (s1, n1), (s2, n2) = _job(mine).location(""), _job(other).location("")
    assert n1 == n2 == "slm" and s1 != s2
    assert s1.startswith(storage) and s2.startswith(storage)
    assert s1 == f"{train_root(RunLayout(mine.run_dir), storage)}/pretrain"
    # without cluster.storage, the run's own directory is its Train storage
    assert _job(recipe).location("")[0] == os.path.join(recipe.run_dir, "pretrain")


def test_resume_signature_covers_the_data_content(recipe):
    job = _job(recipe)
    spec = job.spec("", "generic")
    fp = spec.loop.data.fingerprint
    assert fp and fp == job.data_fingerprint("", "generic")
    sig = signature(spec.loop, build_family(spec.loop.model), 1, "fp32")
    assert sig["data_fingerprint"] == fp
    # the same rows' name with other content (another selection) is another signature
    assert job.data_fingerprint("", "generic:cluster_k2==0") != fp


def test_a_finished_model_built_from_another_config_is_refused_not_reused(recipe, tmp_path):
    path = tmp_path / "changed.yaml"
    path.write_text(dump_recipe(recipe))
    final = os.path.join(recipe.run_dir, "pretrain", "slm", "final", "manifest.json")
    before = os.stat(final).st_mtime_ns
    out = subprocess.run([sys.executable, "-m", "slm.cli", "pretrain", "--recipe", str(path),
                          "--family", "slm", "--pretrain.train.lr", "0.5"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "built from another config or data" in out.stderr and "train" in out.stderr
    assert "Traceback" not in out.stderr
    assert os.stat(final).st_mtime_ns == before          # nothing rebuilt, nothing removed
    # (the levels' steps are fractions of the steps: they differ too)
    with pytest.raises(StageError, match="differs in: levels, steps"):
        changed = dataclasses.replace(recipe, pretrain=dataclasses.replace(
            recipe.pretrain, steps={**recipe.pretrain.steps, "slm": 31}))
        _job(changed).done("", "generic")


def test_a_finished_trial_is_refused_once_its_pretrained_model_is_rebuilt(tmp_path):
    """A trial's fingerprint covers the pretrained models its method starts from: a family
    pretrained again from another config makes its finished trials stale (refused, naming the
    fix), where before they were reused silently; trials of methods that do not start from
    that family stay finished."""
    from slm.config import load_recipe
    from slm.stage import publish
    from slm.tune.grid import Trial, trial_done, trial_stage

    recipe = load_recipe("demo", {"run_dir": str(tmp_path / "run")})
    layout = RunLayout(recipe.run_dir)

    def pretrained(family: str, lr: float, sub: str = "") -> None:
        with publish(layout.pretrain_final(family, sub), stage=f"pretrain-{family}",
                     config={"train": {"lr": lr}}, force=True):
            pass

    pretrained("slm", 1e-3)
    for i in range(recipe.kmeans.k_mix):
        pretrained("mix", 1e-3, f"expert-{i}")
    slm, mix, nopt = (Trial("jargon", m, 10, 1000, 0, 1e-3) for m in ("slm", "mix", "nopt"))
    uris = {t.method: str(tmp_path / t.key()) for t in (slm, mix, nopt)}
    for t in (slm, mix, nopt):
        with trial_stage(recipe, t, uris[t.method]).publish():
            pass
        assert trial_done(recipe, t, uris[t.method])

    pretrained("slm", 5e-3)                      # `slm pretrain --force` from another config
    with pytest.raises(StageError, match="different config") as e:
        trial_done(recipe, slm, uris["slm"])
    assert f"delete '{uris['slm']}'" in str(e.value)
    assert trial_done(recipe, mix, uris["mix"]) and trial_done(recipe, nopt, uris["nopt"])
    pretrained("mix", 5e-3, "expert-1")           # one expert of a mixture is enough
    with pytest.raises(StageError, match="different config"):
        trial_done(recipe, mix, uris["mix"])
