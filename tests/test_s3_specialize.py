"""Specialization of a run that lives on object storage: the shared tiny run copied to a real
S3 server (moto_server, bucket ``slm-test``), then trials of slm, nopt, pn and d (with its llm
teacher) specialized on it, once with the Train storage in the run itself (``cluster.storage``
empty) and once under a ``cluster.storage`` prefix. A trial's Train worker may run on another
node than the trial, so everything it reads (starting models, teacher, Ray Train storage) must
be in the bucket, never in the trial's /tmp; the published trials, results and products must be
in the bucket, and the trial's work is removed once it is published.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import uuid

import boto3
import pytest
import ray

from spec_run import build_tiny_run

from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session
from slm.layout import RunLayout, domain_set, run_id, train_subset
from slm.stage import copy_dir, manifest, read_json

BUCKET = "slm-test"  # the s3_server fixture's bucket
METHODS = ["slm", "nopt", "pn", "d"]  # d distils from the llm trial, specialized first
STEPS, LR = 4, 0.002
_RAY = []  # a Ray session restarted here (kept open: the session's ray_local closes it)


def _keys(server, uri: str) -> set[str]:
    """Keys under an s3:// prefix, relative to it (a real listing of the bucket)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    out = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        out |= {o["Key"][len(prefix.rstrip("/")) + 1:] for o in page.get("Contents", [])}
    return out


def _workers_reach(server) -> bool:
    @ray.remote(num_cpus=0)
    def endpoint():
        return os.environ.get("AWS_ENDPOINT_URL", "")

    return ray.get(endpoint.remote()) == server.endpoint


@pytest.fixture(scope="module")
def s3_trials(s3_server, ray_local, tmp_path_factory):
    """The tiny run on S3 and every method specialized on it. Records, for each fine-tuning
    run, what it was given and what was in the bucket under its work directory right after."""
    from slm.tune import specialize as spec_mod
    from slm.tune.finetune import fine_tune
    from slm.tune.grid import Trial, trial_uri
    from slm.tune.specialize import specialize_trial

    local = build_tiny_run(tmp_path_factory.getbasetemp() / "spec-run")
    if not _workers_reach(s3_server):  # Ray was started by another test before the S3 server
        ray.shutdown()
        _RAY.append(ray_session(ClusterConfig(num_cpus=2)))
        _RAY[-1].__enter__()
    prefix = f"s3://{BUCKET}/spec-{uuid.uuid4().hex[:8]}"
    uri = f"{prefix}/run"
    copy_dir(local.run_dir, uri)
    sweep = dataclasses.replace(local.sweep, name="s3")
    specialize = dataclasses.replace(local.specialize, eval_every=2, patience=2)
    in_run = dataclasses.replace(local, run_dir=uri, sweep=sweep, specialize=specialize)
    storage = dataclasses.replace(in_run, cluster=dataclasses.replace(local.cluster, storage=f"{prefix}/storage"))
    recipes = {"slm": in_run, "llm": in_run, "nopt": storage, "pn": storage, "d": storage}

    runs = []

    def recording(recipe, init_dir, sets, **kw):
        out = fine_tune(recipe, init_dir, sets, **kw)
        runs.append({"init": init_dir, "teacher": kw["teacher"], "work": kw["workdir"],
                     "model_dir": out["model_dir"], "keys": _keys(s3_server, kw["workdir"]),
                     "init_keys": _keys(s3_server, init_dir)})
        return out

    tmp_before = set(os.listdir(tempfile.gettempdir()))
    rows, trials, works = {}, {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spec_mod, "fine_tune", recording)
        for m in ["slm", "llm", "nopt", "pn", "d"]:
            t = Trial("numeric", m, STEPS, 1024, 0, LR)
            n = len(runs)
            rows[m] = specialize_trial(recipes[m], t, trial_uri(recipes[m], t))
            trials[m], works[m] = t, runs[n:]
    new_tmp = set(os.listdir(tempfile.gettempdir())) - tmp_before
    return {"local": local, "uri": uri, "prefix": prefix, "recipes": recipes, "rows": rows,
            "trials": trials, "runs": works, "new_tmp": new_tmp}


def test_trials_are_published_in_the_bucket(s3_server, s3_trials):
    from slm.tune.evaluation import evaluate, load_lm

    uri, rows = s3_trials["uri"], s3_trials["rows"]
    layout = RunLayout(uri)
    for m in METHODS + ["llm"]:
        row = rows[m]
        assert row["model_path"] == f"specialize/s3/trials/{s3_trials['trials'][m].key()}"
        keys = _keys(s3_server, layout.resolve(row["model_path"]))
        assert {"model.safetensors", "config.json", "tokenizer.json", "row.json", "training.json",
                "manifest.json"} <= keys, (m, keys)
        assert 1 <= row["steps_run"] <= STEPS and row["spec_flops"] > 0
        assert read_json(f"{layout.resolve(row['model_path'])}/row.json")["trial"] == row["trial"]
    assert rows["nopt"]["pretrain_flops"] == 0 and rows["pn"]["pretrain_flops"] > 0
    assert rows["d"]["teacher"] == s3_trials["trials"]["llm"].key()
    assert rows["d"]["spec_flops"] > rows["llm"]["spec_flops"]
    # the model read back from the bucket is the one the row measured
    test = layout.shards(domain_set("numeric", "test"))
    assert evaluate(load_lm(layout.resolve(rows["slm"]["model_path"])), test) == pytest.approx(
        rows["slm"]["test_loss"], rel=1e-5)
    assert rows["slm"]["test_ppl"] == pytest.approx(math.exp(rows["slm"]["test_loss"]))
    # nothing went to the local run the S3 one was copied from
    assert not os.path.exists(os.path.join(s3_trials["local"].run_dir, "specialize", "s3"))


def test_trial_work_is_on_the_runs_storage_not_in_tmp(s3_server, s3_trials):
    uri, prefix, recipes = s3_trials["uri"], s3_trials["prefix"], s3_trials["recipes"]
    rid = run_id(RunLayout(uri))
    for m in ["slm", "llm", "nopt", "pn", "d"]:
        key = s3_trials["trials"][m].key()
        # the run itself, or <cluster.storage>/<run id>, at the same run-relative path
        root = f"{prefix}/storage/{rid}" if recipes[m].cluster.storage else uri
        work = f"{root}/specialize/s3/work/{key}"
        (run,) = s3_trials["runs"][m]
        assert run["work"] == f"{work}/run-{max(rows_expert(s3_trials, m), 0)}"
        assert run["model_dir"] == f"{run['work']}/best"
        # the Train run's checkpoint (with its export) and the best model were in the bucket
        assert any(k.startswith(f"ray/s3-{key}-e") and k.endswith("/export/model.safetensors")
                   for k in run["keys"]), run["keys"]
        assert {"best/model.safetensors", "best/manifest.json"} <= run["keys"]
        assert not _keys(s3_server, work)  # removed once the trial was published
    # starting models: the run's pretrained ones, or written into the trial's work in the bucket
    assert s3_trials["runs"]["slm"][0]["init"] == f"{uri}/pretrain/slm/final"
    for m, name in (("nopt", "init-nopt"), ("pn", "init-pn-expert-")):
        init = s3_trials["runs"][m][0]["init"]
        work = s3_trials["runs"][m][0]["work"].rsplit("/", 1)[0]
        assert init.startswith(f"{work}/{name}") and {"model.safetensors", "manifest.json"} <= s3_trials["runs"][m][0]["init_keys"]
    # the teacher is the published llm trial, handed over as its URI (the worker reads it)
    assert s3_trials["runs"]["d"][0]["teacher"] == f"{uri}/specialize/s3/trials/{s3_trials['trials']['llm'].key()}"
    # no trial work in this node's temp dir (only its cached copies of models, slm-<kind>-<key>)
    assert not [n for n in s3_trials["new_tmp"] if n.startswith("slm-spec-")], s3_trials["new_tmp"]
    assert {"slm-init", "slm-teacher", "slm-model"} <= {n.rsplit("-", 1)[0] for n in s3_trials["new_tmp"]}


def rows_expert(s3_trials, method: str) -> int:
    return int(s3_trials["rows"][method]["expert"])


def test_data_fingerprint_is_run_relative_and_covers_the_start(s3_trials):
    from slm.tune.finetune import data_fingerprint
    from slm.tune.starts import pretrain_final

    local, uri = RunLayout(s3_trials["local"].run_dir), RunLayout(s3_trials["uri"])
    sets = {"train": train_subset("numeric", 1024), "valid": domain_set("numeric", "valid")}
    on_s3 = data_fingerprint(uri, sets, pretrain_final(uri, "slm"), "")
    assert on_s3 == data_fingerprint(local, sets, pretrain_final(local, "slm"), "")  # same run, copied
    assert on_s3 != data_fingerprint(uri, sets, pretrain_final(uri, "llm"), "")
    teacher = uri.resolve(s3_trials["rows"]["llm"]["model_path"])
    assert data_fingerprint(uri, sets, pretrain_final(uri, "slm"), teacher) != on_s3
    assert manifest(teacher)["fingerprint"]


def test_sweep_on_s3_writes_results_and_products(s3_server, s3_trials):
    """The finished grid as a sweep: nothing trains again; the results table and the products
    are written to the bucket."""
    from slm.tune.sweep import run_sweep

    r = s3_trials["recipes"]["slm"]
    sw = dataclasses.replace(r.sweep, methods=METHODS, budgets=[STEPS], domain_tokens=[1024],
                             seeds=[0], lrs=[LR], domains=["numeric"], levels=[1.0])  # the final models
    out = run_sweep(dataclasses.replace(r, sweep=sw))
    layout = RunLayout(s3_trials["uri"])
    assert out == layout.results("s3")
    assert {"results.parquet", "results.csv"} <= _keys(s3_server, layout.sweep("s3"))
    for m in METHODS:
        assert {"model.safetensors", "training.json", "manifest.json"} <= _keys(s3_server, layout.model("numeric", m))
    assert not _keys(s3_server, layout.sweep_tune("s3"))  # every trial was done: no Tune run
