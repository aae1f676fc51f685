"""Bad input to pretraining gets a clear error naming the artifact/field and the fix."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_shards import SEQ, make_run, tiny_recipe, windows, write_shards, write_tokenizer  # noqa: E402

from slm.configkit import ConfigError  # noqa: E402
from slm.errors import InputError, StageError  # noqa: E402
from slm.hashing import sha256_file  # noqa: E402
from slm.layout import RunLayout, packed_set  # noqa: E402
from slm.models import data as md  # noqa: E402
from slm.models import launch  # noqa: E402
from slm.models import pretrain as pt  # noqa: E402
from slm.models.families import FamilySpec  # noqa: E402
from slm.models.loop_config import pretraining_config  # noqa: E402
from slm.models.train import Diverged, check_finite  # noqa: E402


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
    # pn trains on the generic text packed per cluster at k_pn = 2: not built yet
    with pytest.raises(StageError, match=r"shards '.*data/shards/generic-k2' are missing.*slm data run"):
        pt.pretrain(tiny_recipe(str(tmp_path)), "pn")
    write_shards(layout, packed_set("generic", 2), windows(64, SEQ, [], seed=0))
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


def short_run(root: str):
    """A short real run (2 steps, one checkpoint) to tamper with: (spec, result, train, valid)."""
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


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    return short_run(str(tmp_path_factory.mktemp("bad")))


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


def test_check_finite_names_the_run_the_step_and_the_last_good_checkpoint():
    check_finite("r", 3, 2.5, 0.7, None, 1e-3)  # finite: nothing to say
    with pytest.raises(Diverged, match=r"training run 'r' diverged at step 3: training loss 2.5, "
                                       r"gradient norm inf; nothing was published \(no checkpoint yet\)"):
        check_finite("r", 3, 2.5, float("inf"), None, 1e-3)
    with pytest.raises(Diverged, match=r"loss nan.*last good checkpoint is '/runs/r/step=00000002'"):
        check_finite("r", 3, float("nan"), 0.7, "/runs/r/step=00000002", 1e-3)


def test_diverging_run_stops_at_its_step_publishes_nothing_and_is_not_retried(ray_local, tmp_path):
    """lr 1e30: the first update makes the weights ~1e30, the next forward overflows (a real
    NaN, fp32 on CPU). The run stops at step 2 with one line naming the step and its
    checkpoint of step 1; nothing is published; Ray Train does not retry it (max_failures 3)."""
    root = str(tmp_path)
    layout = make_run(root, n_generic=128)
    r = tiny_recipe(root)
    r.pretrain.train.lr, r.pretrain.train.ckpt_every = 1e30, 1
    r.pretrain.scaling.max_failures = 3
    with pytest.raises(StageError) as info:
        pt.pretrain(r, "slm")
    msg = str(info.value)
    assert "\n" not in msg and type(info.value) is StageError
    assert "diverged at step 2: training loss nan" in msg
    assert f"last good checkpoint is '{os.path.join(layout.pretrain('slm'), 'step=00000001')}'" in msg
    assert not os.path.exists(layout.pretrain_final("slm"))
    assert not os.path.exists(layout.pretrain_costs("slm"))
    assert not glob.glob(os.path.join(root, "**", "costs.json"), recursive=True)
    # one attempt: a retry would have opened a second TensorBoard event file
    assert len(os.listdir(os.path.join(layout.pretrain("slm"), "tensorboard"))) == 1


class Payload:
    """A pickle that runs a command when unpickled (torch.save stores os.system and its args)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_needs_a_pickled_object_is_refused_and_never_runs(ray_local, tmp_path):
    """Someone with write access to the storage swaps a DeepSpeed file for a pickle payload and
    updates its sha256 marker (markers show integrity, not authenticity): resume refuses it,
    naming the file and the type, and the payload never runs (weights_only=True)."""
    spec, out, train, valid = short_run(str(tmp_path / "run"))
    ck, marker = out["checkpoint"], str(tmp_path / "PAYLOAD-RAN")
    [victim] = glob.glob(os.path.join(ck, "ds", "*model_states.pt"))
    torch.save({"module": Payload(marker)}, victim, _use_new_zipfile_serialization=False)
    rank_file = os.path.join(ck, "slm-rank0.json")
    record = json.load(open(rank_file))
    rel = os.path.relpath(victim, ck)
    record["files"][rel] = {"size": os.path.getsize(victim), "sha256": sha256_file(victim)}
    json.dump(record, open(rank_file, "w"))
    assert launch.check_resumable(spec) == ck  # intact as far as the markers tell
    with pytest.raises(StageError, match=re.escape(f"checkpoint file '{ck}/{rel}' needs the pickled "
                                                   "type posix.system to load, which slm refuses")):
        launch.run_training(spec, train, valid)
    assert not os.path.exists(marker)


def test_tokenizer_that_does_not_match_the_model_is_refused_before_training(tmp_path):
    """Shards tokenized with a larger vocabulary than the run's tokenizer (the tokenizer was
    replaced after the data was built): refused on the driver, naming the shards and both sizes."""
    layout = RunLayout(str(tmp_path))
    write_tokenizer(layout, vocab=64)  # the model gets 64 tokens; the windows use ids up to 127
    write_shards(layout, "generic", windows(64, SEQ, [], seed=0))
    with pytest.raises(InputError, match=r"shards '.*data/shards/generic' were made with token id "
                                         r"1\d\d, but the model's vocabulary has 64 tokens: the "
                                         r"tokenizer does not match the model"):
        pt.pretrain(tiny_recipe(str(tmp_path)), "slm")

    # shards that recorded their tokenizer's size: exact, even when the sampled ids would fit
    with open(os.path.join(layout.shards("generic"), "manifest.json")) as f:
        m = json.load(f)
    m["vocab_size"] = 32000
    with open(os.path.join(layout.shards("generic"), "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(InputError, match=r"made with a tokenizer of 32000 tokens, but the model's "
                                         r"vocabulary has 64"):
        md.open_shards(layout, "generic", "tiny", [], SEQ, vocab=64)
    md.open_shards(layout, "generic", "tiny", [], SEQ)  # without a model to match: no check


def test_every_training_batch_is_checked_against_the_vocabulary():
    from slm.models.train import check_token_ids

    check_token_ids("r", torch.tensor([[0, 5, 63]]), 64)
    with pytest.raises(InputError, match=r"run 'r': the data holds token id 64, outside the "
                                         r"model's vocabulary of 64 tokens"):
        check_token_ids("r", torch.tensor([[0, 64, 3]]), 64)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        check_token_ids("r", torch.tensor([[-1, 2]]), 64)
