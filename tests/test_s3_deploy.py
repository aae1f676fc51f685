"""A finished run on object storage (a real S3 server, moto): `slm export` to a local and to an
s3:// directory, `slm serve` with replicas loading from their node-local copies (the original
local run moved away meanwhile), report and plan, and no node-local path left in the run."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import urllib.request
import uuid

import pytest
import torch
from ray import serve
from tiny_results import RECIPE, SWEEP
from tiny_results import build_run as build_results_run
from tiny_run import build_tiny_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm.audit import node_local_paths
from slm.cli import main
from slm.config import load_run_recipe
from slm.deploy.export import export_model
from slm.deploy.serve import ServeOptions, start
from slm.layout import RunLayout
from slm.stage import copy_dir, exists, filesystem, listing, local_dir, manifest
from slm.tune.planner import plan
from slm.tune.report import shown_path, write_report
from slm.tune.results import find_results

TIMEOUT = 60  # seconds per request
S3_BUCKET = "slm-test"  # the s3_server fixture's bucket (tests/conftest.py)


@pytest.fixture(scope="module")
def s3_run(s3_server, ray_local, tmp_path_factory):
    """(in-memory models, s3:// run, local original): a deploy run (tokenizer, two specialists,
    k-means) and a sweep's results + pretraining costs, built locally and copied to S3.
    (s3_server before ray_local: the Ray workers it starts inherit the AWS_* variables.)"""
    local = tmp_path_factory.mktemp("s3-deploy") / "run"
    tiny = build_tiny_run(str(local))
    build_results_run(str(local), budgets=(4,), domain_tokens=(1024,), seeds=(0,))
    uri = f"s3://{S3_BUCKET}/s3-deploy-{uuid.uuid4().hex[:6]}/run"
    copy_dir(str(local), uri)
    return tiny, uri, local


def _logits(path: str, prompt: str) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits


def test_export_from_s3_run_to_a_local_directory(s3_run, tmp_path):
    tiny, uri, _ = s3_run
    out = export_model(uri, "code", method="slm", out=str(tmp_path / "code"))
    prompt = "def encode(self, o):\n    return"
    ids = tiny["tokenizer"](prompt, return_tensors="pt")
    with torch.no_grad():
        ref = tiny["models"]["code"].eval()(**ids).logits
    assert torch.equal(_logits(out, prompt), ref)
    assert manifest(out)["config"]["source"] == "models/code/slm"
    assert node_local_paths(out) == []


def test_export_from_s3_run_to_s3(s3_run):
    tiny, uri, _ = s3_run
    out = f"{uri.rsplit('/', 1)[0]}/exports/legal"
    assert main(["export", "--run", uri, "--domain", "legal", "--out", out]) == 0
    m = manifest(out)
    assert m["method"] == "slm" and m["config"]["source"] == "models/legal/slm"
    files = {f for f, _ in listing(out)}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md",
            "generation_config.json", "training.json", "manifest.json"} <= files
    path = local_dir(out, "export")
    assert os.path.basename(path).startswith("slm-export-")
    prompt = "Licensed under the terms of"
    ids = tiny["tokenizer"](prompt, return_tensors="pt")
    with torch.no_grad():
        ref = tiny["models"]["legal"].eval()(**ids).logits
    assert torch.equal(_logits(path, prompt), ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_from_s3_run_loads_node_local_copies(s3_run):
    tiny, uri, local = s3_run
    assert main(["export", "--run", uri, "--domain", "code", "--method", "slm"]) == 0  # RUN/export
    away = local.with_name("run.away")
    os.rename(local, away)  # the replicas cannot use the local original
    try:
        opts = ServeOptions(num_cpus=0.25, max_new_tokens=8, max_batch_size=2, batch_wait_s=0.1,
                            torch_threads=1)
        url = start(uri, ["code"], "127.0.0.1", _free_port(), opts)
        body = json.dumps({"prompt": "def dumps(obj", "domain": "code", "max_new_tokens": 6})
        req = urllib.request.Request(url + "/generate", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            assert r.status == 200
            got = json.loads(r.read())
        assert got["domain"] == "code" and got["model"] == "code/slm" and got["completion_tokens"] > 0
        src = serve.get_deployment_handle("specialist-code", app_name="slm").source.remote().result(
            timeout_s=TIMEOUT)
        assert src["uri"] == f"{uri}/export/code"
        assert os.path.basename(src["local_path"]).startswith("slm-model-")
        assert str(local) not in src["local_path"] and str(away) not in src["local_path"]
        assert not local.exists()  # nothing was written to the original's place
    finally:
        serve.shutdown()
        os.rename(away, local)


def test_report_and_plan_on_s3_run(s3_run):
    _, uri, _ = s3_run
    results = RunLayout(uri).results(SWEEP)
    assert find_results(uri) == [results]
    recipe = dataclasses.replace(load_run_recipe(uri), name=RECIPE)
    index = write_report(recipe)
    assert index == f"{uri}/report/index.html" and exists(index)
    report = manifest(f"{uri}/report")
    assert report["sources"] == [f"specialize/{SWEEP}/results.parquet"] and report["rows"] > 0
    fs, path = filesystem(index)
    with fs.open_input_stream(path) as f:
        page = f.read().decode("utf-8")
    assert "results.parquet" in page and str(s3_run[2]) not in page
    # a local file outside a run on object storage is shown by its name only
    assert shown_path(RunLayout(uri), "/elsewhere/extra/results.parquet") == "results.parquet"
    assert shown_path(RunLayout(uri), "s3://other/r.parquet") == "s3://other/r.parquet"

    measured = plan(pretrain_budget=1e18, specialize_budget=1e18, inference_budget=1e12,
                    domains=1, domain_tokens=1024, run=uri)
    assert measured.source == "measured" and uri in measured.source_detail
    assert measured.method in {c.method for c in measured.candidates if c.fits}
    by_file = plan(1e18, 1e18, 1e12, domains=1, domain_tokens=1024, results=results)
    assert by_file.source == "measured"


def test_no_node_local_path_in_the_s3_run(s3_run):
    _, uri, _ = s3_run
    if not exists(f"{uri}/export/code/manifest.json"):  # when run on its own
        export_model(uri, "code", method="slm")
    if not exists(f"{uri}/report/manifest.json"):
        write_report(dataclasses.replace(load_run_recipe(uri), name=RECIPE))
    assert node_local_paths(uri) == []
