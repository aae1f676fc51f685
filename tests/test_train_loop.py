"""The one training loop under real Ray Train + DeepSpeed (CPU, gloo): exact resume, recovery
from a killed worker, resume past a torn checkpoint, two workers each reading its own share,
and FLOP accounting.

Tolerances: runs are fp32 on CPU with a per-(seed, step, micro-batch) RNG and a data order that
depends only on (seed, epoch, world size), so a resumed run and an uninterrupted one (and two
runs at one world size) compute the same floating-point operations: losses agree to 1e-6.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_shards import make_run, tb_scalars, tiny_recipe  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402

from slm.configkit import ConfigError  # noqa: E402

from slm.models import checkpoint as ckpt  # noqa: E402
from slm.models import data as md  # noqa: E402
from slm.models import launch  # noqa: E402
from slm.models.families import FamilySpec  # noqa: E402
from slm.models.flops import train_flops_per_token  # noqa: E402
from slm.models.lm import lm_config  # noqa: E402
from slm.models.loop_config import DistillationSection, TrainLoopConfig, pretraining_config  # noqa: E402


@pytest.fixture(scope="module")
def env(ray_local, tmp_path_factory):
    """One tiny run directory and its datasets, shared by every test of the module."""
    root = str(tmp_path_factory.mktemp("loop"))
    layout = make_run(root)
    recipe = tiny_recipe(root)
    shards = md.open_shards(layout, "generic", "tiny", [], recipe.data.seq_len)
    kw = dict(seed=0, fraction=recipe.pretrain.valid_fraction)
    train = md.shard_dataset(shards, split="train", **kw)
    valid = md.valid_dataset(md.shard_dataset(shards, split="valid", **kw), 16, "generic")
    return {"root": root, "recipe": recipe, "train": train, "valid": valid}


def spec(env, name: str, steps: int, scaling: dict | None = None, *, stop_at: int = 0,
         pid_dir: str = "", **train) -> launch.RunSpec:
    r = env["recipe"]
    t = dataclasses.replace(r.pretrain.train, **train)
    s = dataclasses.replace(r.pretrain.scaling, **(scaling or {}))
    fam = FamilySpec("slm", "tiny", 128, r.data.seq_len)
    loop = pretraining_config(t, fam, steps=steps, seed=0, data="generic", run_name=name,
                              storage=os.path.join(env["root"], "runs"), logger="tensorboard")
    loop.schedule.stop_at, loop.pid_dir = stop_at, pid_dir
    return launch.RunSpec(loop, s)


def tb_losses(run_uri: str) -> dict[int, float]:
    """train/loss per step (rank 0 logs every step)."""
    return tb_scalars(run_uri, "train/loss")


def test_loop_config_round_trips_and_refuses_unknown_keys(tmp_path):
    """What crosses the Ray boundary is the typed config as a dict; the worker rebuilds it."""
    r = tiny_recipe(str(tmp_path))
    cfg = pretraining_config(r.pretrain.train, FamilySpec("pn", "tiny", 128, 16, 2, 2, 2), steps=8,
                             seed=3, data="generic", run_name="x", storage=str(tmp_path))
    cfg.distillation = DistillationSection(teacher="/t", weight=0.25, temperature=2.0)
    back = TrainLoopConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back.distillation, DistillationSection)
    assert back.model.route_column == "cluster_k2" and back.logging.run_uri == str(tmp_path / "x")
    assert TrainLoopConfig.from_dict({**cfg.to_dict(), "distillation": None}).distillation is None
    bad = cfg.to_dict()
    bad["schedule"]["eval_evry"] = 4
    with pytest.raises(ConfigError, match=r"unknown train loop config key 'schedule.eval_evry'"):
        TrainLoopConfig.from_dict(bad)
    with pytest.raises(ConfigError, match=r"key 'patiense'"):
        TrainLoopConfig.from_dict({**cfg.to_dict(), "patiense": 2})


def test_resume_is_exact_and_costs_follow_the_formula(env):
    full = launch.run_training(spec(env, "full", 8), env["train"], env["valid"])
    assert full["finished"] and full["metrics"]["step"] == 8

    s = spec(env, "split", 8)
    first = launch.run_training(spec(env, "split", 8, stop_at=4), env["train"], env["valid"])
    assert not first["finished"] and first["metrics"]["step"] == 4
    second = launch.run_training(s, env["train"], env["valid"])
    assert second["finished"] and second["metrics"]["start_step"] == 4
    assert second["metrics"]["attempts"] == 2
    # same loss at step 8 (and at every step before) as the uninterrupted run
    assert abs(second["metrics"]["train/loss"] - full["metrics"]["train/loss"]) < 1e-6
    assert abs(second["metrics"]["valid/loss"] - full["metrics"]["valid/loss"]) < 1e-6
    a, b = tb_losses(s.run_uri), tb_losses(spec(env, "full", 8).run_uri)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert max(abs(a[k] - b[k]) for k in a) < 1e-6
    assert b[8] < b[1]  # it learns

    # costs.json: FLOPs = formula per token × tokens trained
    costs = json.load(open(os.path.join(full["checkpoint"], "costs.json")))
    cfg = lm_config("tiny", 128, 16)
    assert costs["steps"] == 8 and costs["tokens"] == 8 * 4 * 16
    assert costs["flops"] == pytest.approx(train_flops_per_token(cfg, 16) * costs["tokens"], rel=1e-12)
    assert costs["device_seconds"] > 0 and costs["params"] > 0
    # the resumed run counts the steps of both attempts
    costs2 = json.load(open(os.path.join(second["checkpoint"], "costs.json")))
    assert costs2["steps"] == 8 and costs2["flops"] == pytest.approx(costs["flops"], rel=1e-12)


def test_two_workers_read_their_own_share_in_a_repeatable_order(env):
    """Each of two workers reads only its part of the rows (models/data.py); a re-run at the
    same world size repeats every step exactly; one worker with accumulation 2 trains on the
    same global batch size from the same start (its rows per step differ: the parts depend on
    the world size)."""
    w2 = {"num_workers": 2, "cpus_per_worker": 0.5}
    one = spec(env, "w1-acc2", 6, grad_accum=2)
    two, again = (spec(env, name, 6, w2, grad_accum=1) for name in ("w2-acc1", "w2-acc1-again"))
    r1, r2, r3 = (launch.run_training(s, env["train"], env["valid"]) for s in (one, two, again))
    assert r1["finished"] and r2["finished"] and r3["finished"]
    a, b, c = (tb_losses(s.run_uri) for s in (one, two, again))
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 7))
    assert max(abs(b[k] - c[k]) for k in b) < 1e-6
    assert abs(r2["metrics"]["valid/loss"] - r3["metrics"]["valid/loss"]) < 1e-6
    assert abs(a[1] - b[1]) < 0.05 * a[1]  # same initial model, same batch size, other rows
    # bytes each worker's feed read are reported (that they halve with two workers on shards
    # of many row groups is bench/bench_data_feed.py's measure: here both parts of the few
    # row groups are inside the same ones, which each rank then reads)
    m1, m2 = r1["metrics"], r2["metrics"]
    assert m1["data/read_bytes_worker_max"] > 0 and m2["data/read_bytes_worker_min"] > 0
    print("bytes read per worker: 1 worker", m1["data/read_bytes_worker_max"],
          "| 2 workers", m2["data/read_bytes_worker_min"], "-", m2["data/read_bytes_worker_max"])


def test_zero3_on_two_cpu_workers_trains_like_zero1_and_exports_the_gathered_model(env):
    """ZeRO-3 (parameters partitioned over the two workers) runs on DeepSpeed's CPU accelerator
    with gloo: the same losses as ZeRO-1 (fp32: the same arithmetic up to summation order), and
    the export at the end gathers the partitions into the whole served model."""
    w2 = {"num_workers": 2, "cpus_per_worker": 0.5}
    runs = {z: spec(env, f"w2-zero{z}", 3, w2, zero_stage=z, ckpt_every=3) for z in (1, 3)}
    results = {z: launch.run_training(s, env["train"], env["valid"]) for z, s in runs.items()}
    assert all(r["finished"] for r in results.values())
    l1, l3 = tb_losses(runs[1].run_uri), tb_losses(runs[3].run_uri)
    assert sorted(l3) == [1, 2, 3] and max(abs(l1[k] - l3[k]) for k in l1) < 1e-5 * l1[1]
    one, three = (AutoModelForCausalLM.from_pretrained(launch.export_of(results[z]["checkpoint"])[0]).state_dict()
                  for z in (1, 3))
    assert one.keys() == three.keys()
    assert all(torch.allclose(one[k], three[k], atol=1e-5) for k in one)


def test_killed_worker_recovers_from_last_checkpoint(env):
    pid_dir = os.path.join(env["root"], "pids")
    s = spec(env, "killed", 60, ckpt_every=4, eval_every=30, pid_dir=pid_dir)
    killed = {}

    def killer():
        # kill once the controller has registered a checkpoint (its snapshot names it):
        # reports still queued in a dead worker are lost, as in any crash
        snap = os.path.join(s.run_uri, "checkpoint_manager_snapshot.json")
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if "step=00000004" in open(snap).read():
                    break
            except OSError:
                pass
            time.sleep(0.05)
        pid = int(open(os.path.join(pid_dir, "rank0.pid")).read())
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    out = launch.run_training(s, env["train"], env["valid"])
    th.join(timeout=5)
    assert "pid" in killed
    assert out["finished"] and out["metrics"]["step"] == 60
    assert out["metrics"]["attempts"] == 2          # a second worker process resumed
    assert out["metrics"]["start_step"] >= 4         # ... from a checkpoint, not from scratch
    new_pid = int(open(os.path.join(pid_dir, "rank0.pid")).read())
    assert new_pid != killed["pid"]


def test_resume_skips_a_torn_checkpoint_with_a_warning(env, caplog):
    """The newest checkpoint Ray registered lost a rank's completion marker (a rank died during
    its upload): the re-run warns, naming it, resumes from the previous complete one and
    finishes, exactly as an uninterrupted run; an unregistered step=* directory is ignored.
    ZeRO 0 here: the loop measures the gradient norm itself (ZeRO 1-3: DeepSpeed's)."""
    s = spec(env, "torn", 8, ckpt_every=2, zero_stage=0)
    first = launch.run_training(spec(env, "torn", 8, stop_at=6, ckpt_every=2, zero_stage=0),
                                env["train"], env["valid"])
    assert first["metrics"]["step"] == 6
    newest, previous = (os.path.join(s.run_uri, ckpt.step_dir_name(k)) for k in (6, 4))
    assert ckpt.registered(s.run_uri) == [newest, previous]  # keep = 2
    os.remove(os.path.join(newest, "slm-rank0.json"))
    with caplog.at_level("WARNING", logger="slm.models.launch"):
        second = launch.run_training(s, env["train"], env["valid"])
    warned = [r.getMessage() for r in caplog.records if "torn checkpoint" in r.getMessage()]
    assert len(warned) == 1 and f"'{newest}'" in warned[0] and f"resuming from '{previous}'" in warned[0]
    m = second["metrics"]
    assert second["finished"] and m["step"] == 8 and m["start_step"] == 4
    assert 0 < m["train/grad_norm"] < float("inf")
    ckpt.verify(newest)  # rewritten by the resumed run, registered once
    assert ckpt.registered(s.run_uri) == [os.path.join(s.run_uri, ckpt.step_dir_name(8)), newest]
    plain = launch.run_training(spec(env, "torn-plain", 8, ckpt_every=2, zero_stage=0),
                                env["train"], env["valid"])
    assert abs(m["train/loss"] - plain["metrics"]["train/loss"]) < 1e-6
    assert abs(m["valid/loss"] - plain["metrics"]["valid/loss"]) < 1e-6
    # a directory Ray never registered (a crash before its report) is not what resumes
    os.makedirs(os.path.join(s.run_uri, ckpt.step_dir_name(9)))
    assert launch.check_resumable(s) == os.path.join(s.run_uri, ckpt.step_dir_name(8))


def test_tracker_run_ids_are_unique_per_run_directory_and_stable_across_resume():
    from slm.models.metrics import tracker_run_id

    a = tracker_run_id("slm", "/runs/a/pretrain/slm")
    assert a == tracker_run_id("slm", "/runs/a/pretrain/slm")          # a resume continues it
    assert a != tracker_run_id("slm", "s3://bucket/b/pretrain/slm")    # same name, other run
    assert a.startswith("slm-")
    odd = tracker_run_id("main-code--slm--b6/x y", "/r")
    assert odd.startswith("main-code--slm--b6-x-y-") and " " not in odd and "/" not in odd
