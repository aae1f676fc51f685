"""`slm submit` against a real local Ray cluster (`ray start --head` on 127.0.0.1, token auth on).

The head runs in its own process group and is killed with it at teardown, also when a test
fails (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slm.cluster.local import LocalCluster
from slm.cluster.submit import job_entrypoint, read_auth_token, working_dir_excludes
from slm.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A one-node Ray head with token auth (2 CPUs, slm.cluster.local); yields (dashboard
    address, token). Killed by its process group at teardown, also when a test fails."""
    cluster = LocalCluster.start(str(tmp_path_factory.mktemp("submit-head")), workers={}, head_cpus=2)
    try:
        yield cluster.dashboard, cluster.token
    finally:
        cluster.stop()


def _slm_submit(args: list[str], token: str | None, home: str, timeout: float = 240):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = home  # no ~/.ray/auth_token of this machine's user leaks in
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "slm.cli", "submit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_pipeline_job_streams_logs_and_ships_checkout(token_cluster, tmp_path):
    address, token = token_cluster
    r = _slm_submit(["--address", address, "--follow", "--", "python", "-m", "slm.cluster.smoke",
                     "--rows", "500"], token, str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted job raysubmit_" in r.stdout
    expected = sum(i * i for i in range(500))
    assert f"smoke sum_of_squares: {expected}" in r.stdout  # streamed job output
    assert "smoke ok" in r.stdout
    # driver and worker import the shipped copy (py_modules), not the editable checkout
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if line.startswith("smoke ") and ": " in line)
    for key in ("smoke driver_slm", "smoke worker_slm"):
        assert "runtime_resources" in lines[key] and str(REPO) not in lines[key], lines[key]


def test_submit_propagates_exit_status_and_runs_slm_entrypoint(token_cluster, tmp_path):
    address, token = token_cluster
    r = _slm_submit(["--address", address, "--follow", "--", "python", "-c",
                     "import sys; print('about to fail'); sys.exit(3)"], token, str(tmp_path))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "about to fail" in r.stdout and "failed" in r.stderr
    r = _slm_submit(["--address", address, "--follow", "--", "slm", "--help"], token,
                    str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "python -m slm.cli --help" in r.stdout and "usage: slm" in r.stdout


def test_wrong_or_missing_token_fails_cleanly(token_cluster, tmp_path):
    address, _ = token_cluster
    r = _slm_submit(["--address", address, "--", "slm", "--help"], "0" * 32, str(tmp_path), 60)
    assert r.returncode == 2
    assert "error: the Ray cluster at" in r.stderr and "wrong token" in r.stderr
    assert "Traceback" not in r.stderr
    r = _slm_submit(["--address", address, "--", "slm", "--help"], None, str(tmp_path), 60)
    assert r.returncode == 2
    assert "requires a token and none was sent" in r.stderr and "RAY_AUTH_TOKEN" in r.stderr
    assert "Traceback" not in r.stderr


def test_entrypoint_and_excludes():
    assert job_entrypoint(["--", "slm", "run", "--recipe", "my recipe.yaml"]) == \
        "python -m slm.cli run --recipe 'my recipe.yaml'"
    assert job_entrypoint(["python", "x.py"]) == "python x.py"
    with pytest.raises(InputError, match="nothing to submit"):
        job_entrypoint(["--"])
    ex = working_dir_excludes(str(REPO))
    assert {".venv", "runs", ".git", "/pipeline", "/slm"} <= set(ex)


def test_token_lookup_order(tmp_path, monkeypatch):
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(f))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert read_auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert read_auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert read_auth_token() == ""
