"""The whole study of the tiny recipe on a real multi-node Ray cluster with its run on S3.

The cluster (tests/conftest.py ``local_cluster``, slm/cluster/local.py): a head with no CPUs
and two 1-CPU worker nodes, each raylet under ``unshare --mount`` with a private tmpfs /tmp, so
anything one node writes to its /tmp and another reads fails here as it would on two machines.
The object store: a real ``moto_server`` on 127.0.0.1 (``s3_server``). The corpus is uploaded
to the bucket, ``run_dir`` and ``cluster.storage`` are ``s3://`` URIs, and the study is run the
way a user runs it: ``slm submit --address http://HEAD:PORT --follow -- slm run --recipe R``
against the token-authenticated dashboard.

Checked: the job finishes (every family pretrained, every method specialized, the report
written), its logs come back, the products are in the bucket, Ray Train workers ran on both
worker nodes, trial drivers and their Train workers ran on different nodes, no run file holds a
node-local path, and a second submit of the same command skips everything. Then a worker node
is killed in the middle of a pretraining run: Ray Train restarts the worker group on the other
node from the last checkpoint in the bucket and the run finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from spec_run import build_corpus, tiny_recipe_dict

from slm.audit import node_local_paths
from slm.layout import RunLayout, run_id
from slm.stage import copy_dir, exists, filesystem, manifest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METHODS = ["slm", "llm", "is", "mix", "pn", "d", "nopt"]
# the study fixture runs the whole tiny study on two 1-CPU nodes: 461 s on an idle machine,
# over the suite's 900 s per test when the machine is shared
pytestmark = pytest.mark.timeout(2400)


def _ray_list(cluster, what: str, *filters: str) -> list[dict]:
    """`ray list WHAT --detail` of the cluster, through its dashboard with the token."""
    args = [str(BIN / "ray"), "list", what, "--address", cluster.dashboard, "--format", "json",
            "--detail", "--limit", "10000"]
    for f in filters:
        args += ["--filter", f]
    out = subprocess.run(args, env={**os.environ, **cluster.client_env()}, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    # an empty answer is this sentence, not "[]"
    return [] if out.strip() == "No resource in the cluster" else json.loads(out)


def _node_names(cluster) -> dict[str, str]:
    """Ray node id → our node name (its custom resource: head, node-a, node-b)."""
    names = {}
    for n in _ray_list(cluster, "nodes"):
        res = n.get("resources_total") or {}
        names[n["node_id"]] = next((k for k in ("head", *(w.name for w in cluster.workers))
                                    if k in res), n["node_id"][:8])
    return names


def _slm_env(cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    return {**env, **cluster.client_env(), "HF_HUB_OFFLINE": "1"}


def _submit(cluster, *command: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = subprocess.run([str(BIN / "slm"), "submit", "--address", cluster.dashboard, "--follow",
                           "--", *command], cwd=REPO, env=_slm_env(cluster), capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def study(local_cluster, s3_server, tmp_path_factory):
    """The tiny study submitted to the cluster with its corpus, run and storage on S3;
    yields (recipe path, run URI, prefix, first job, its wall seconds)."""
    base = tmp_path_factory.mktemp("cluster-study")
    prefix = f"s3://slm-test/cluster-{uuid.uuid4().hex[:8]}"
    paths = build_corpus(base / "corpus")
    copy_dir(str(base / "corpus"), f"{prefix}/corpus")
    remote = {k: f"{prefix}/corpus/{os.path.relpath(v, base / 'corpus')}" for k, v in paths.items()}
    data = tiny_recipe_dict(f"{prefix}/run", remote, name="cluster", methods=METHODS,
                            budgets=[4], cpus_per_trial=0.5)
    data["cluster"] = {"storage": f"{prefix}/storage"}
    # one pretraining level: the levels' trials and exports are tested on one node
    # (test_levels, test_study_e2e); here they would double the sweep on two 1-CPU nodes
    data["pretrain"]["levels"] = [1.0]
    recipe = base / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    proc, seconds = _submit(local_cluster, "slm", "run", "--recipe", str(recipe), timeout=2400)
    print(f"cluster study: first submit {seconds:.0f} s, exit {proc.returncode}")
    return recipe, f"{prefix}/run", prefix, proc, seconds


def test_study_on_s3_across_two_worker_nodes(study, local_cluster):
    recipe, run, prefix, proc, _ = study
    assert proc.returncode == 0, (proc.stdout[-6000:], proc.stderr[-3000:])
    assert "submitted job raysubmit_" in proc.stdout
    layout = RunLayout(run)
    # the products are in the bucket
    fs, path = filesystem(layout.results("cluster"))
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    assert sorted({r["method"] for r in rows}) == sorted(METHODS)
    assert all(r["test_ppl"] > 1 and not r["model_path"].startswith("/") for r in rows)
    for m in METHODS:
        assert manifest(layout.model("numeric", m)) is not None, m
        assert exists(f"{layout.model('numeric', m)}/model.safetensors"), m
    assert exists(layout.report)
    for fam in ("slm", "llm", "is", "mix", "pn"):
        assert any(exists(u) for u in _finals(layout, fam)), fam
    assert "report" in proc.stdout  # the job's log came back through `--follow`

    # where the work ran: Train workers on both worker nodes; trial drivers (0 CPU) elsewhere
    names = _node_names(local_cluster)
    workers = _ray_list(local_cluster, "actors", "class_name=RayTrainWorker")
    worker_nodes = sorted({names.get(a["node_id"], "?") for a in workers})
    drivers = [a for a in _ray_list(local_cluster, "actors")
               if "_trial_fn" in (a.get("class_name") or "") or "ImplicitFunc" in (a.get("class_name") or "")]
    driver_nodes = sorted({names.get(a["node_id"], "?") for a in drivers})
    print(f"Train workers: {len(workers)} on {worker_nodes}; trial drivers: {len(drivers)} on {driver_nodes}")
    assert {"node-a", "node-b"} <= set(worker_nodes), worker_nodes
    assert "head" not in worker_nodes  # the head has no CPUs for work
    assert drivers, [a.get("class_name") for a in _ray_list(local_cluster, "actors")][:50]
    # a trial's driver and its Train worker on different nodes: every Train worker is on a
    # worker node, and some trial driver is not on the node of every worker
    assert any(set(worker_nodes) - {d} for d in driver_nodes)

    # no node-local path anywhere in the run
    assert node_local_paths(run) == []


def _finals(layout: RunLayout, family: str) -> list[str]:
    """The published final model(s) of a family (mix and is have one per expert/domain)."""
    fs, path = filesystem(layout.pretrain(family))
    subs = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if i.type == pafs.FileType.Directory]
    return [layout.pretrain_final(family)] + [layout.pretrain_final(family, s) for s in subs]


def test_second_submit_skips_everything(study, local_cluster):
    recipe, run, prefix, first, first_seconds = study
    assert first.returncode == 0, first.stderr[-3000:]
    proc, seconds = _submit(local_cluster, "slm", "run", "--recipe", str(recipe), timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    print(f"cluster study: second submit {seconds:.0f} s (first {first_seconds:.0f} s)")
    assert "train/loss" not in log and "specialized " not in log, log[-4000:]
    assert seconds < first_seconds / 3, (seconds, first_seconds)


def test_worker_node_killed_during_pretraining_resumes(study, local_cluster, s3_server):
    """A copy of the study's data stages in a new run (its own run id: its own checkpoints),
    `slm pretrain --family slm` with a checkpoint every 10 steps; once the first checkpoint is
    in the bucket, the worker node running the Train worker is killed (SIGKILL of its process
    group). Ray Train restarts the worker group on the other node from that checkpoint."""
    _, run, prefix, first, _ = study
    assert first.returncode == 0, first.stderr[-3000:]
    fault = f"{prefix}/fault-run"
    copy_dir(f"{run}/data", f"{fault}/data")
    _copy_file(f"{run}/recipe.yaml", f"{fault}/recipe.yaml")
    bucket, key_prefix = fault.removeprefix("s3://").split("/", 1)
    # the fault run's own checkpoints (its id made here, before the command reads it): the
    # study's are under the same storage with another run id
    storage_prefix = f"{key_prefix.rsplit('/', 1)[0]}/storage/{run_id(RunLayout(fault))}/"
    cmd = [str(BIN / "slm"), "pretrain", "--run", fault, "--family", "slm",
           "--pretrain.steps", "{slm: 200, llm: 30, is: 20, mix: 20, pn: 30}",
           "--pretrain.train.ckpt_every", "10",
           "--pretrain.train.eval_every", "50"]
    proc = subprocess.Popen(cmd, env=_slm_env(local_cluster), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    def keys() -> list[str]:
        return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=storage_prefix) for o in page.get("Contents", [])]

    killed, saved = "", []
    try:
        deadline = time.time() + 900
        while not killed and time.time() < deadline and proc.poll() is None:
            if any("checkpoint_" in k for k in keys() if "/pretrain/slm" in k):
                names = _node_names(local_cluster)
                alive = _ray_list(local_cluster, "actors", "class_name=RayTrainWorker", "state=ALIVE")
                nodes = {names.get(a["node_id"]) for a in alive} & {w.name for w in local_cluster.workers}
                if nodes:
                    killed = sorted(nodes)[0]
                    local_cluster.kill_worker(killed)
                    saved = _saved_steps(s3, bucket, keys())  # what was there at the kill
                    break
            time.sleep(2)
        assert killed, "no checkpoint of the slm run appeared in the bucket"
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if killed:
            local_cluster.restart_worker(killed)
    assert proc.returncode == 0, out[-6000:]
    resumed = [line for line in out.splitlines() if "resumed run" in line]
    assert resumed, out[-6000:]
    step = int(resumed[-1].split("checkpoint at step ")[1].split()[0])
    # at most one checkpoint interval lost: the newest record written before the kill may be
    # of a checkpoint whose upload Ray had not registered yet
    assert saved and step >= max(saved) - 10, (step, saved)
    layout = RunLayout(fault)
    assert manifest(layout.pretrain_final("slm")) is not None
    print(f"node {killed} killed after checkpoints {sorted(saved)}; resumed at step {step}")


def _saved_steps(s3, bucket: str, keys: list[str]) -> list[int]:
    """The steps of the checkpoint records (models/checkpoint.py RECORD) among ``keys``."""
    return [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read())["state"]["step"]
            for k in keys if k.endswith("/slm_checkpoint.json") and "/pretrain/slm" in k]


def _copy_file(src: str, dst: str) -> None:
    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    with sfs.open_input_stream(spath) as f, dfs.open_output_stream(dpath) as g:
        g.write(f.read())
