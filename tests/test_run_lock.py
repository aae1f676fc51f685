"""One writer per run directory (issue 11, item 2): a second writer is refused with the holder
named; a dead holder's lock is taken over; on object storage as on local disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slm import runlock
from slm.errors import StageError
from slm.runlock import lock_path, run_lock
from slm.stage import exists, read_json, write_json

BIN = Path(sys.executable).parent


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_local_second_writer_is_refused_with_the_holder_named(tmp_path):
    run = str(tmp_path / "run")
    with run_lock(run, "slm run --recipe a"):
        with pytest.raises(StageError, match=r"being written by `slm run --recipe a` \(pid "
                                             rf"{os.getpid()} on {socket.gethostname()}"):
            with run_lock(run, "slm sweep"):
                pass
    with run_lock(run, "slm sweep"):  # released when the block ends
        pass


def test_local_lock_of_a_killed_holder_is_free(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from slm.runlock import run_lock\n"
         f"with run_lock({str(run)!r}, 'holder'):\n print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match="`holder`"):
            with run_lock(str(run), "second"):
                pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    with run_lock(str(run), "second") as h:
        assert h["pid"] == os.getpid()


def test_remote_lock_refuses_a_live_holder_and_releases(s3_prefix, monkeypatch):
    monkeypatch.setattr(runlock, "SETTLE_S", 0.1)
    run = f"{s3_prefix}/run"
    with run_lock(run, "slm run") as h:
        assert read_json(lock_path(run))["owner"] == h["owner"]
        with pytest.raises(StageError, match="being written by `slm run`"):
            with run_lock(run, "slm pretrain"):
                pass
    assert not exists(lock_path(run))  # the holder removes its own lock object


def test_remote_lock_of_another_live_host_is_refused(s3_prefix, monkeypatch):
    monkeypatch.setattr(runlock, "SETTLE_S", 0.1)
    run = f"{s3_prefix}/run"
    now = time.time()
    other = {"owner": "x", "host": "node-elsewhere", "pid": 1, "command": "slm sweep",
             "started": now - 30, "heartbeat": now - 5}
    write_json(lock_path(run), other)
    with pytest.raises(StageError, match="pid 1 on node-elsewhere"):
        with run_lock(run, "slm run"):
            pass
    assert read_json(lock_path(run)) == other  # a live holder's lock is left as it was


@pytest.mark.parametrize("why", ["dead pid on this host", "no heartbeat"])
def test_remote_stale_lock_is_taken_over_with_a_warning(s3_prefix, monkeypatch, capsys, why):
    monkeypatch.setattr(runlock, "SETTLE_S", 0.1)
    run = f"{s3_prefix}/run"
    now = time.time()
    stale = ({"owner": "x", "host": socket.gethostname(), "pid": _dead_pid(), "command": "old",
              "started": now, "heartbeat": now} if why == "dead pid on this host" else
             {"owner": "x", "host": "gone", "pid": 1, "command": "old", "started": now - 500,
              "heartbeat": now - runlock.STALE_S - 1})
    write_json(lock_path(run), stale)
    with run_lock(run, "slm run") as h:
        assert read_json(lock_path(run))["owner"] == h["owner"]
    assert "taking over the stale lock" in capsys.readouterr().err


def test_remote_heartbeat_keeps_a_long_command_live(s3_prefix, monkeypatch):
    monkeypatch.setattr(runlock, "SETTLE_S", 0.1)
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.5)
    run = f"{s3_prefix}/run"
    with run_lock(run, "slm run"):
        first = read_json(lock_path(run))["heartbeat"]
        time.sleep(2.0)
        assert read_json(lock_path(run))["heartbeat"] > first


def test_two_concurrent_slm_runs_one_is_refused(tmp_path):
    """Two `slm run` of one recipe: the second exits non-zero naming the first, at once, and
    the first goes on (it is stopped here once the second has been refused)."""
    run = tmp_path / "run"
    cmd = [str(BIN / "slm"), "run", "--recipe", "demo", "--run_dir", str(run)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(cmd, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            lock = run / ".slm-lock"
            if lock.exists() and lock.read_text().strip():
                break
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read()[-3000:]
        held = json.loads((run / ".slm-lock").read_text())
        t0 = time.time()
        second = subprocess.run(cmd, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"pid {held['pid']}" in second.stderr and "Traceback" not in second.stderr, second.stderr
        assert time.time() - t0 < 60
        assert first.poll() is None  # the first writer was not disturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
