"""Shared fixtures. Tests use the real things: a real local Ray, real Ray Data/Train/Tune,
real DeepSpeed, the real embedding model and real parquet files."""

from __future__ import annotations

import os
import uuid

import pytest

from slm.cluster.config import ClusterConfig
from slm.cluster.local import LocalCluster, S3Server
from slm.cluster.ray_env import ray_session

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One embedded local Ray for the whole test session (starting Ray costs ~10 s). Started
    after the S3 server, so that its workers inherit the server's AWS_* variables, as a user's
    embedded Ray inherits the environment ``slm`` was started in."""
    with ray_session(ClusterConfig(num_cpus=2)):
        yield


# --------------------------------------------------------------------------------------------
# Object storage and a multi-node cluster on this machine (slm.cluster.local)
# --------------------------------------------------------------------------------------------

S3_BUCKET = "slm-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto_server) on 127.0.0.1 with bucket ``slm-test``; its
    AWS_* variables are set in this process's environment (pyarrow, fsspec and boto3 read them,
    and so does every Ray worker this process starts)."""
    server = S3Server.start(str(tmp_path_factory.mktemp("s3")))
    server.create_bucket(S3_BUCKET)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh s3:// prefix for one test (nothing is deleted afterwards: the server's state is
    in memory and goes with it)."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"s3://{S3_BUCKET}/{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def local_cluster(s3_server, tmp_path_factory):
    """A real multi-node Ray cluster: a 0-CPU head and worker nodes ``node-a`` and ``node-b``
    (1 CPU each, each with a private /tmp), token auth on, every node reaching the S3 server.
    Drivers connect with ``cluster.client_env()`` (tests run `slm` as a subprocess with it)."""
    cluster = LocalCluster.start(str(tmp_path_factory.mktemp("cluster")), env=s3_server.env)
    try:
        yield cluster
    finally:
        cluster.stop()
