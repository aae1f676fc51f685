"""Bad object storage fails fast and clearly: a missing bucket, wrong credentials, an endpoint
nobody listens on, a read-only prefix and a store that went away between two commands each end
the `slm` command with one line (``error: ...`` naming the URI/endpoint and the fix), exit
status 2, no traceback, before any work, and nothing already stored is lost.

Real ``moto_server`` S3 servers (``slm.cluster.local.S3Server``), the real CLI in subprocesses,
the real pyarrow S3 client. moto accepts any credentials until its auth mode is switched on
(``POST /moto-api/reset-auth`` with ``0``: every later request must be signed by an IAM user
of the server and is checked against that user's policy); the ``auth_s3`` fixture sets up such
a server with a read-write and a read-only user.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
import yaml

from slm.cluster.local import S3Server, free_port
from slm.pipeline.sample_corpus import paragraphs, write_domain, write_parquet
from slm.stage import check_storage

SLM = str(Path(sys.executable).parent / "slm")
FAST = 20.0  # seconds: a storage fault must end the command within this (no retry hang)


def _recipe(tmp_path: Path) -> str:
    """A tiny data-pipeline recipe (local corpus files); run_dir is given on the command line."""
    write_parquet(str(tmp_path / "generic" / "part-0.parquet"), paragraphs(40))
    write_domain(str(tmp_path / "domains"), "alpha", n_train=6, n_valid=2, n_test=2, offset=3)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "run_dir": str(tmp_path / "unused-run"), "seed": 1,
        "corpus": {"generic": str(tmp_path / "generic"),
                   "domains": {"alpha": str(tmp_path / "domains" / "alpha")}},
        "tokenizer": {"vocab_size": 300},
        "data": {"seq_len": 32, "domain_train_tokens": [64], "is_tokens": 128, "rows_per_file": 64},
        "embed": {"batch_size": 32, "pool_size": 1},
        "kmeans": {"k_is": 2, "k_mix": 2, "k_pn": 2, "fit_sample": 500, "max_iter": 5},
        "cluster": {"num_cpus": 2},
    }))
    return str(path)


def _slm(*args: str, env: dict[str, str] | None = None, timeout: float = 600):
    """Run `slm ARGS` with os.environ + env; (completed process, wall seconds)."""
    t0 = time.time()
    proc = subprocess.run([SLM, *args], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.time() - t0


def _one_line_error(proc, *needles: str) -> str:
    """The command failed with exit status 2 and one `error:` line holding every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _s3(server: S3Server, key: str = "test", secret: str = "test"):
    return boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name="us-east-1")


def _objects(server: S3Server, bucket: str) -> dict[str, bytes]:
    client = _s3(server)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


# --------------------------------------------------------------------------------------------
# 1. bucket missing
# --------------------------------------------------------------------------------------------

def test_missing_bucket(tmp_path, s3_server):
    recipe = _recipe(tmp_path)
    run = "s3://no-such-bucket-xyz/run"
    proc, seconds = _slm("data", "run", "--recipe", recipe, "--run_dir", run)
    _one_line_error(proc, "bucket 'no-such-bucket-xyz' does not exist", s3_server.endpoint,
                    f"'{run}'", "Create it", "aws s3 mb s3://no-such-bucket-xyz")
    assert seconds < FAST, seconds
    # an existing-run command (--run) is checked before it reads RUN/recipe.yaml
    proc, _ = _slm("report", "--run", run)
    _one_line_error(proc, "bucket 'no-such-bucket-xyz' does not exist", s3_server.endpoint)
    # nothing was created: neither the bucket nor a local run directory
    names = [b["Name"] for b in _s3(s3_server).list_buckets()["Buckets"]]
    assert "no-such-bucket-xyz" not in names
    assert not (tmp_path / "unused-run").exists()


# --------------------------------------------------------------------------------------------
# 2. wrong credentials, 4. read-only prefix: a server with moto's IAM auth on
# --------------------------------------------------------------------------------------------

AUTH_BUCKET = "slm-auth"
KEEP = "ro/run/data/keep.txt"  # stored before: must survive every failed command


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """A moto_server that checks every request's signature and IAM policy, with bucket
    ``slm-auth``, users ``writer`` (s3:* on the bucket) and ``reader`` (s3:GetObject and
    s3:ListBucket only), and an object under ``ro/run/``. Yields (server, {user: (key,
    secret)})."""
    server = S3Server.start(str(tmp_path_factory.mktemp("s3-auth")))
    try:
        server.create_bucket(AUTH_BUCKET)
        _s3(server).put_object(Bucket=AUTH_BUCKET, Key=KEEP, Body=b"kept")
        iam = boto3.client("iam", endpoint_url=server.endpoint, aws_access_key_id="test",
                           aws_secret_access_key="test", region_name="us-east-1")
        users = {}
        for name, actions in {"writer": ["s3:*"], "reader": ["s3:GetObject", "s3:ListBucket"]}.items():
            iam.create_user(UserName=name)
            iam.put_user_policy(UserName=name, PolicyName=f"{name}-s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions,
                               "Resource": [f"arn:aws:s3:::{AUTH_BUCKET}",
                                            f"arn:aws:s3:::{AUTH_BUCKET}/*"]}]}))
            key = iam.create_access_key(UserName=name)["AccessKey"]
            users[name] = (key["AccessKeyId"], key["SecretAccessKey"])
        req = urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth", data=b"0",
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()  # from now on: signed and authorized
        # The server must authorize as AWS does (listing needs s3:ListBucket): moto 5.2.6 asks
        # for "s3:ListObjectsV2" instead, which would turn every read-only case into a denial.
        try:
            _s3(server, *users["reader"]).list_objects_v2(Bucket=AUTH_BUCKET, Prefix="ro/")
        except botocore.exceptions.ClientError as e:
            pytest.fail(f"moto {importlib.metadata.version('moto')} refuses s3:ListBucket's "
                        f"ListObjectsV2 to a user allowed s3:ListBucket ({e}); install the "
                        "test extra's moto (pyproject.toml pins it below 5.2.6)")
        yield server, users
    finally:
        server.stop()


def _as(server: S3Server, key: str, secret: str) -> dict[str, str]:
    return {**server.env, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


def _kept(server: S3Server, users) -> bytes:
    return _s3(server, *users["writer"]).get_object(Bucket=AUTH_BUCKET, Key=KEEP)["Body"].read()


def test_wrong_credentials(tmp_path, auth_s3, monkeypatch):
    server, users = auth_s3
    recipe = _recipe(tmp_path)
    run = f"s3://{AUTH_BUCKET}/run"
    key, _ = users["writer"]
    proc, seconds = _slm("data", "run", "--recipe", recipe, "--run_dir", run,
                         env=_as(server, key, "not-the-secret"))
    _one_line_error(proc, "rejected the credentials", server.endpoint, f"'{run}'",
                    "SIGNATURE_DOES_NOT_MATCH", "AWS_SECRET_ACCESS_KEY")
    assert seconds < FAST, seconds
    proc, _ = _slm("data", "run", "--recipe", recipe, "--run_dir", run,
                   env=_as(server, "AKIANOSUCHKEY0000000", "whatever"))
    _one_line_error(proc, "rejected the credentials", "INVALID_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID")
    # the right key pair passes the same preflight; nothing was written by the failed commands
    env = _as(server, *users["writer"])
    assert _s3(server, *users["writer"]).list_objects_v2(Bucket=AUTH_BUCKET, Prefix="run/")["KeyCount"] == 0
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    check_storage(run, write=True)
    assert _kept(server, users) == b"kept"


def test_read_only_prefix(tmp_path, auth_s3, monkeypatch):
    server, users = auth_s3
    recipe = _recipe(tmp_path)
    run = f"s3://{AUTH_BUCKET}/ro/run"
    env = _as(server, *users["reader"])
    proc, seconds = _slm("data", "run", "--recipe", recipe, "--run_dir", run, env=env)
    _one_line_error(proc, f"cannot write to '{run}'", "(permission)", server.endpoint,
                    "s3:PutObject")
    assert seconds < FAST, seconds
    proc, _ = _slm("report", "--run", run, env=env)  # a writer on an existing run: same check
    _one_line_error(proc, f"cannot write to '{run}'", "(permission)")
    # nothing lost, nothing added; reading there is allowed (the read-only preflight passes)
    listing = _s3(server, *users["writer"]).list_objects_v2(Bucket=AUTH_BUCKET, Prefix="ro/")
    assert [o["Key"] for o in listing["Contents"]] == [KEEP]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    check_storage(run, write=False)


# --------------------------------------------------------------------------------------------
# 3. endpoint unreachable
# --------------------------------------------------------------------------------------------

def test_unreachable_endpoint_fails_fast(tmp_path):
    recipe = _recipe(tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    proc, seconds = _slm("data", "run", "--recipe", recipe, "--run_dir", "s3://slm-test/run",
                         env=env)
    _one_line_error(proc, f"cannot reach the object store at {endpoint}", "'s3://slm-test/run'",
                    "AWS_ENDPOINT_URL")
    assert seconds < FAST, seconds
    print(f"unreachable endpoint: failed in {seconds:.1f} s")


# --------------------------------------------------------------------------------------------
# 5. the object store restarted between two commands
# --------------------------------------------------------------------------------------------

def test_store_down_then_back_between_commands(tmp_path):
    """`slm data run` on s3:// completes (up to the windows); the store goes away; the next `slm data run` fails
    fast naming the endpoint; the store comes back with the same data; the next `slm data run`
    resumes: every completed stage is skipped (its manifest is the one written before).

    moto keeps its objects in memory and a stopped moto_server loses them, so "the same data"
    is a snapshot of every object taken (through boto3) before the stop and uploaded again after
    the restart on the same port: the fault exercised is "store unavailable, then back with its
    data", not the durability of the store itself."""
    server = S3Server.start(str(tmp_path / "s3"))
    try:
        server.create_bucket("slm-restart")
        recipe = _recipe(tmp_path)
        run = "s3://slm-restart/run"
        # up to the windows: every stage that reads and writes the store, without the embedding
        # and k-means work (tests/test_cluster_study.py runs the whole pipeline on s3://)
        args = ("data", "run", "--recipe", recipe, "--run_dir", run, "--until", "windows")
        proc, first = _slm(*args, env=server.env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        done = [line for line in proc.stderr.splitlines() if " done " in line and "stage " in line]
        assert done, proc.stderr[-2000:]
        snapshot = _objects(server, "slm-restart")
        manifests = {k: v for k, v in snapshot.items() if k.endswith("manifest.json")}
        assert len(manifests) == len(done)

        server.stop()
        proc, seconds = _slm(*args, env=server.env)
        _one_line_error(proc, f"cannot reach the object store at {server.endpoint}", f"'{run}'")
        assert seconds < FAST, seconds

        server.restart()
        server.create_bucket("slm-restart")
        client = _s3(server)
        for key, body in snapshot.items():
            client.put_object(Bucket="slm-restart", Key=key, Body=body)
        proc, again = _slm(*args, env=server.env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        stages = [line for line in proc.stderr.splitlines() if "slm.pipeline.run: stage " in line]
        assert len(stages) == len(done) and all(" skipped " in s for s in stages), stages
        after = _objects(server, "slm-restart")
        assert {k: after[k] for k in manifests} == manifests  # nothing redone
        print(f"first run {first:.1f} s, store down: failed in {seconds:.1f} s, resumed {again:.1f} s")
    finally:
        server.stop()
