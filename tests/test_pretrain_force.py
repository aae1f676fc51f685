"""`slm pretrain --force` (issue 11, item 3): a finished pretraining built from another config
is refused without it, and rebuilt with it, replacing only what slm wrote: Ray Train's record
and slm's checkpoint directories of the old config, then its ``final/`` once the rebuild is
done; a run finished from this very config is kept even under --force."""

from __future__ import annotations

import dataclasses
import os

import pytest
from train_shards import make_run, tiny_recipe

from slm.errors import StageError
from slm.layout import RunLayout
from slm.models import checkpoint as ckpt
from slm.models.pretrain import pretrain
from slm.stage import manifest


def test_force_rebuilds_a_pretraining_of_another_config_and_keeps_what_slm_did_not_write(ray_local, tmp_path):
    root = str(tmp_path / "run")
    layout = make_run(root)
    recipe = tiny_recipe(root)  # 8 steps, a checkpoint every 4
    pretrain(recipe, "slm")
    final, run_uri = layout.pretrain_final("slm"), layout.pretrain("slm")
    old = manifest(final)
    assert old["config"]["train"]["lr"] == recipe.pretrain.train.lr
    notes = os.path.join(run_uri, "notes.txt")  # the user's own file beside the run
    with open(notes, "w") as f:
        f.write("mine")

    changed = dataclasses.replace(recipe, pretrain=dataclasses.replace(
        recipe.pretrain, train=dataclasses.replace(recipe.pretrain.train, lr=1e-2)))
    with pytest.raises(StageError, match=r"differs in: train\).*slm pretrain --force"):
        pretrain(changed, "slm")
    assert manifest(final)["fingerprint"] == old["fingerprint"]  # refused: nothing replaced

    out = pretrain(changed, "slm", force=True)
    new = manifest(final)
    assert out["runs"]["slm"] == final
    assert new["config"]["train"]["lr"] == 1e-2 and new["fingerprint"] != old["fingerprint"]
    assert new["costs"]["attempts"] == 1 and new["costs"]["steps"] == 8  # trained afresh, not resumed
    registered = ckpt.registered(run_uri)
    assert registered and all(ckpt.verify(u)["signature"]["lr"] == 1e-2 for u in registered)
    assert open(notes).read() == "mine"                          # not slm's: kept

    before = os.stat(os.path.join(final, "manifest.json")).st_mtime_ns
    pretrain(changed, "slm", force=True)  # built from this very config: kept, nothing retrained
    assert os.stat(os.path.join(final, "manifest.json")).st_mtime_ns == before
    assert RunLayout(root).pretrain_final("slm") == final
