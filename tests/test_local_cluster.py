"""The test cluster itself (slm.cluster.local): several real Ray nodes with token auth, each
worker node with a /tmp the others cannot see, and every node reaching the S3 server the way a
user reaches S3 (AWS_* variables; pyarrow, fsspec and boto3 alike)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from slm.cluster.local import private_tmp_supported

# Runs as a Ray driver on this machine against the cluster (RAY_ADDRESS + token from the env).
PROBE = textwrap.dedent("""
    import json, os, sys, uuid
    import ray

    ray.init()

    @ray.remote(num_cpus=0)
    def where(path, write, bucket):
        import boto3, fsspec, pyarrow.fs as pafs
        if write:
            with open(path, "w") as f:
                f.write("node-local")
        key = f"probe/{uuid.uuid4().hex}"
        fs, p = pafs.FileSystem.from_uri(f"s3://{bucket}/{key}")
        with fs.open_output_stream(p) as f:
            f.write(b"pyarrow")
        s3 = boto3.client("s3")
        got_boto = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        with fsspec.open(f"s3://{bucket}/{key}", "rb") as f:
            got_fsspec = f.read().decode()
        return {"node": ray.get_runtime_context().get_node_id(), "sees": os.path.exists(path),
                "boto3": got_boto, "fsspec": got_fsspec}

    path = f"/tmp/slm-probe-{uuid.uuid4().hex}"
    a = ray.get(where.options(resources={"node-a": 0.01}).remote(path, True, sys.argv[1]))
    b = ray.get(where.options(resources={"node-b": 0.01}).remote(path, False, sys.argv[1]))
    a2 = ray.get(where.options(resources={"node-a": 0.01}).remote(path, False, sys.argv[1]))
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"a": a, "b": b, "a2": a2, "driver_sees": os.path.exists(path),
                      "nodes": len(nodes),
                      "cpus": sorted(n["Resources"].get("CPU", 0) for n in nodes)}))
""")


def test_nodes_have_private_tmp_and_all_reach_s3(local_cluster, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, **local_cluster.client_env()}
    out = subprocess.run([sys.executable, str(script), "slm-test"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["nodes"] == 3 and got["cpus"] == [0.0, 1.0, 1.0]   # a 0-CPU head + 2 workers
    assert got["a"]["node"] != got["b"]["node"]
    for r in (got["a"], got["b"]):
        assert r["boto3"] == r["fsspec"] == "pyarrow"   # one object, three clients
    assert got["a2"]["sees"]                           # node-a sees what node-a wrote...
    if local_cluster.private_tmp:
        assert not got["b"]["sees"] and not got["driver_sees"]   # ...nobody else does
    elif private_tmp_supported():
        pytest.fail("private /tmp is supported here but the cluster did not use it")


def test_a_driver_without_the_token_is_refused(local_cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update({"RAY_ADDRESS": local_cluster.gcs_address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": "0" * 32})
    out = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print('connected')"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "connected" not in out.stdout
