"""Bad input to pretraining gets a clear error naming the artifact/field and the fix."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from train_shards import SEQ, make_run, tiny_recipe, windows, write_shards, write_tokenizer  # noqa: E402

from slm.configkit import ConfigError  # noqa: E402
from slm.errors import InputError, StageError  # noqa: E402
from slm.layout import RunLayout  # noqa: E402
from slm.models import data as md  # noqa: E402
from slm.models import launch  # noqa: E402
from slm.models import pretrain as pt  # noqa: E402
from slm.models.families import FamilySpec  # noqa: E402
from slm.models.loop_config import pretraining_config  # noqa: E402


def test_unknown_family(tmp_path):
    with pytest.raises(ConfigError, match="unknown family 'gpt5'.*slm, llm, is, mix, pn"):
        pt.pretrain(tiny_recipe(str(tmp_path)), "gpt5")


def test_budget_of_zero_steps(tmp_path):
    r = tiny_recipe(str(tmp_path), slm=0)
    with pytest.raises(ConfigError, match="steps.slm.*> 0"):
        pt.pretrain(r, "slm")


def test_no_shards_names_the_artifact_and_the_command(tmp_path):
    layout = RunLayout(str(tmp_path))
    write_tokenizer(layout)
    with pytest.raises(StageError, match=r"data/shards/generic.*slm data run --recipe tiny"):
        pt.pretrain(tiny_recipe(str(tmp_path)), "slm")


def test_no_tokenizer(tmp_path):
    with pytest.raises(StageError, match=r"tokenizer .*data/tokenizer.*slm data run"):
        pt.pretrain(tiny_recipe(str(tmp_path)), "slm")


def test_shards_without_cluster_column_for_pn_and_mix(tmp_path):
    layout = RunLayout(str(tmp_path))
    write_tokenizer(layout)
    write_shards(layout, "generic", windows(64, SEQ, [], seed=0))
    with pytest.raises(InputError, match=r"no column 'cluster_k2'.*slm data run"):
        pt.pretrain(tiny_recipe(str(tmp_path)), "pn")
    with pytest.raises(InputError, match=r"no column 'cluster_k2'"):
        md.open_shards(layout, "generic", "tiny", ["cluster_k2"], SEQ)


def test_wrong_window_length(tmp_path):
    layout = RunLayout(str(tmp_path))
    write_tokenizer(layout)
    write_shards(layout, "generic", windows(64, 8, [2], seed=0))
    with pytest.raises(InputError, match=r"windows of 8 tokens but data.seq_len is 16"):
        pt.pretrain(tiny_recipe(str(tmp_path)), "slm")


def test_cluster_id_out_of_range(ray_local, tmp_path):
    layout = RunLayout(str(tmp_path))
    write_shards(layout, "generic", windows(64, SEQ, [2], seed=0, bad_cluster=7))
    shards = md.open_shards(layout, "generic", "tiny", ["cluster_k2"], SEQ)
    with pytest.raises(InputError, match=r"cluster_k2 = 7, outside \[0, 2\)"):
        md.check_cluster_ids(shards, "cluster_k2", 2)


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    """A short real run (2 steps, one checkpoint) to tamper with."""
    root = str(tmp_path_factory.mktemp("bad"))
    layout = make_run(root, n_generic=128)
    r = tiny_recipe(root)
    shards = md.open_shards(layout, "generic", "tiny", [], SEQ)
    train = md.shard_dataset(shards, seed=0, split="train", fraction=0.1)
    valid = md.valid_dataset(md.shard_dataset(shards, seed=0, split="valid", fraction=0.1), 8, "g")
    loop = pretraining_config(dataclasses.replace(r.pretrain.train, ckpt_every=2, eval_every=2),
                              FamilySpec("slm", "tiny", 128, SEQ), steps=2, seed=0, data="generic",
                              run_name="r", storage=os.path.join(root, "runs"), logger="none")
    spec = launch.RunSpec(loop, r.pretrain.scaling)
    out = launch.run_training(spec, train, valid)
    assert out["finished"]
    return spec, out, train, valid


def test_checkpoint_of_another_model_is_refused(finished_run):
    spec, _, train, valid = finished_run
    other = dataclasses.replace(spec, loop=dataclasses.replace(
        spec.loop, model=FamilySpec("slm", "demo-slm", 128, SEQ)))
    with pytest.raises(StageError, match=r"another model/config.*n_embd: checkpoint=32 run=128"):
        launch.run_training(other, train, valid)
    lr = dataclasses.replace(spec, loop=dataclasses.replace(
        spec.loop, optim=dataclasses.replace(spec.loop.optim, lr=1.0)))
    with pytest.raises(StageError, match=r"lr: checkpoint=0.003 run=1.0"):
        launch.check_resumable(lr)


def test_corrupted_checkpoint_is_refused(finished_run):
    spec, out, train, valid = finished_run
    victim = None
    for root, _, names in os.walk(out["checkpoint"]):
        for n in names:
            if n.endswith("model_states.pt"):
                victim = os.path.join(root, n)
    assert victim is not None
    with open(victim, "r+b") as f:
        f.truncate(100)
    with pytest.raises(StageError, match=r"model_states.pt' has 100 bytes.*corrupted"):
        launch.run_training(spec, train, valid)
