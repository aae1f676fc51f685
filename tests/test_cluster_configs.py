"""Cluster configs: launcher YAMLs pass Ray's own validation, KubeRay manifests pass the CRD
schema subset shipped in the repo, the Dockerfile passes hadolint."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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
