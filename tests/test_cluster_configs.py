"""Cluster configs: launcher YAMLs pass Ray's own validation, KubeRay manifests pass the CRD
schema subset shipped in the repo, the Dockerfile passes hadolint."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from slm.cluster.config import SPOT_RESOURCE, SPOT_SHARE, STORAGE_ENV
from slm.cluster.nodes import node_type
from slm.config import load_recipe
from slm.configkit import ConfigError
from slm.estimate import Cluster, estimate
from slm.models.launch import RunSpec, worker_resources
from slm.tune.sweep import trial_resources

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER = sorted((CLUSTER / "launcher").glob("*.yaml"))
KUBERAY = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]


def _ray_validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill defaults, validate the schema."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    raw = yaml.safe_load(path.read_text())
    cfg = _ray_validate(raw)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "cpu-data" in types
    gpus = [n for n in types if n.startswith("gpu")]
    assert len(gpus) >= 2 and all(types[n]["min_workers"] == 0 for n in gpus)  # scale from zero
    spot = types["gpu-spot"]
    assert spot["resources"] == {"spot": 1}
    spot_cfg = json.dumps(spot["node_config"])
    assert "spot" in spot_cfg.lower()
    assert all("RAY_AUTH_MODE=token" in " ".join(cfg[k])
               for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert "~/.ray/auth_token" in raw["file_mounts"]


def test_ray_validation_rejects_a_broken_config():
    raw = yaml.safe_load(LAUNCHER[0].read_text())
    raw["available_node_types"]["gpu-1"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        _ray_validate(raw)


@pytest.fixture(scope="module")
def crd_schema():
    schema = json.loads((CLUSTER / "kuberay" / "crd-schema.json").read_text())
    assert "ray-project/kuberay" in schema["description"]
    return schema


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd_schema(path, crd_schema):
    doc = yaml.safe_load(path.read_text())
    jsonschema.validate(doc, crd_schema)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "cpu-data" in groups and all(g["minReplicas"] == 0 for g in groups.values())
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python -m slm.cli run")
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_crd_schema_rejects_what_kuberay_rejects(crd_schema):
    doc = yaml.safe_load(KUBERAY[0].read_text())
    bad = copy.deepcopy(doc)
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema)
    bad = copy.deepcopy(doc)
    bad["spec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema)
    bad = copy.deepcopy(doc)
    del bad["spec"]["headGroupSpec"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema)


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    r = subprocess.run([str(hadolint), "--no-color", str(CLUSTER / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (CLUSTER / "Dockerfile").read_text()
    assert "torch==${TORCH_VERSION}" in text and "download.pytorch.org/whl/${TORCH_CUDA}" in text


# --------------------------------------------------------------------------------------------
# Sized for the paper (issue 14): node types, spot, service account, storage env, IAM
# --------------------------------------------------------------------------------------------

def _instance(node_config: dict) -> str:
    return node_config.get("InstanceType") or node_config["machineType"]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_gpu_types_fit_the_paper_sizes(path):
    paper = load_recipe("paper")
    types = yaml.safe_load(path.read_text())["available_node_types"]
    gpu = {n: node_type(_instance(t["node_config"])) for n, t in types.items() if n.startswith("gpu")}
    for n, nt in gpu.items():  # GCP names the accelerators: they agree with the registry
        for acc in types[n]["node_config"].get("guestAccelerators", []):
            assert acc["acceleratorCount"] == nt.gpus, n
    # the LLM: paper's 8 workers on one node of 80 GB GPUs; trials: one GPU of >= 40 GB
    big = [n for n, nt in gpu.items() if nt.gpus >= paper.pretrain.scaling.num_workers and nt.gpu_memory_gb >= 80]
    trial = [n for n, nt in gpu.items() if nt.gpus == 1 and nt.gpu_memory_gb >= 40]
    assert big and trial and "gpu-spot" in trial
    assert types["gpu-spot"]["resources"] == {SPOT_RESOURCE: 1}
    # the paper recipe fits that cluster: `slm estimate` refuses one where a run does not
    e = estimate(paper, Cluster(node_type(_instance(types[big[0]]["node_config"])), 1),
                 results_glob="/nonexistent/gpu-*.json")
    assert e["gpus"] >= paper.pretrain.scaling.num_workers


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_run_as_the_service_account_and_set_the_storage_slm_reads(path):
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    assert all(p.get("serviceAccountName") == "slm" for p in pods)
    head_env = {e["name"]: e["value"] for e in pods[0]["containers"][0].get("env", [])}
    assert head_env[STORAGE_ENV].startswith("gs://")
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpus = int(groups["gpu-8"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= load_recipe("paper").pretrain.scaling.num_workers
    if "gpu-spot" in groups:
        assert f'\\"{SPOT_RESOURCE}\\"' in groups["gpu-spot"]["rayStartParams"]["resources"]


def test_slm_storage_env_is_cluster_storage_when_the_recipe_sets_none(monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert load_recipe("demo").cluster.storage == ""
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/slm/ray")
    assert load_recipe("demo").cluster.storage == "s3://bucket/slm/ray"
    assert load_recipe("demo", {"cluster.storage": "s3://other/ray"}).cluster.storage == "s3://other/ray"


def test_spot_runs_ask_for_the_spot_resource():
    paper = load_recipe("paper")
    assert paper.pretrain.scaling.spot_families == ["mix"] and paper.sweep.spot
    spot = {SPOT_RESOURCE: SPOT_SHARE}
    assert worker_resources(RunSpec(None, paper.pretrain.scaling, spot=True)) == {"CPU": 8, "GPU": 1, **spot}
    assert SPOT_RESOURCE not in worker_resources(RunSpec(None, paper.pretrain.scaling))
    assert trial_resources(paper.sweep) == {"CPU": 8, "GPU": 1, **spot}
    assert SPOT_RESOURCE not in trial_resources(load_recipe("demo").sweep)
    with pytest.raises(ConfigError, match="'spot_families' has unknown family 'moe'"):
        load_recipe("demo", {"pretrain.scaling.spot_families": "[moe]"})


def _json_blocks(text: str) -> list[dict]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, flags=re.S)]


def test_readme_iam_policies_cover_the_head_and_the_bucket():
    policies = _json_blocks((CLUSTER / "README.md").read_text())
    statements = [s for p in policies for s in p["Statement"]]
    actions = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    # what Ray's AWS node provider calls from the head to scale workers (ray/autoscaler/_private/aws)
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ec2:DescribeImages"} <= actions
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    s3 = {r for s in statements if any(a.startswith("s3:") for a in s["Action"]) for r in [s["Resource"]]}
    assert s3 == {"arn:aws:s3:::MY-BUCKET", "arn:aws:s3:::MY-BUCKET/*"}
    # the head passes the workers' role: every worker profile aws.yaml names has a PassRole
    passed = {s["Resource"].rsplit("/", 1)[1] for s in statements if s["Action"] == "iam:PassRole"}
    raw = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    profiles = {n: t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
                for n, t in raw["available_node_types"].items()}
    assert profiles[raw["head_node_type"]] == "slm-head"
    assert {p for n, p in profiles.items() if n != raw["head_node_type"]} <= passed
