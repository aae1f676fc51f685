"""The driver of `slm pretrain` killed (issue 11, item 8): SIGKILL of its whole process group
(the driver, its embedded Ray and Ray's workers) at a random step after the first checkpoint;
the same command re-run at once takes the run's lock, resumes from the newest checkpoint the
killed run completed, and ends with the validation loss of an uninterrupted run.

What "≤ 1 checkpoint interval lost" is measured against: the newest checkpoint directory N the
killed run wrote *completely* (it verifies: every rank's marker, every file's sha256); the kill
comes the moment a random one of them is complete, when Ray Train may not have registered it
yet. The re-run resumes from N, or from N - interval when N was not registered: then the killed
run was still at step N (rank 0 trains on only once its checkpoint is registered), so at most
one interval is lost either way. Without that wait the worker may run up to one report ahead
of Ray Train's controller (which polls every ~2 s). Not shown here: on this 2-core machine the
test also passed twice without the wait (the controller had registered N at the kill).

Tolerance of the final validation loss: 1e-5. The loop is deterministic on CPU in fp32 (RNG per
(seed, step, micro-batch), data order a function of (seed, epoch, world size), DeepSpeed's
optimizer and scheduler state restored exactly), so a resumed run computes the same operations
as an uninterrupted one (tests/test_train_loop.py: losses agree to 1e-6). The noise allowed is
float summation order only; resuming at a wrong data position or with a lost optimizer state
moves the loss of this tiny model by far more (> 1e-3).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

from train_shards import make_run, tb_scalars, tiny_recipe

from slm.config import dump_recipe
from slm.errors import StageError
from slm.models import checkpoint as ckpt

STEPS, EVERY = 120, 20
TOLERANCE = 1e-5


def _recipe_file(root: str) -> str:
    make_run(root)
    r = tiny_recipe(root, slm=STEPS)
    t = r.pretrain.train
    t.ckpt_every, t.eval_every, t.log_every, t.keep_checkpoints = EVERY, EVERY, 1, 2
    r.cluster.num_cpus = 2
    path = os.path.join(root, "recipe-in.yaml")
    with open(path, "w") as f:
        f.write(dump_recipe(r))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(recipe: str) -> list[str]:
    return [sys.executable, "-m", "slm.cli", "pretrain", "--recipe", recipe, "--family", "slm"]


def _newest_complete_dir(run_uri: str) -> int:
    """The highest step whose checkpoint directory the killed run wrote completely."""
    best = 0
    for name in os.listdir(run_uri):
        m = re.fullmatch(r"step=(\d+)", name)
        if not m:
            continue
        try:
            ckpt.verify(os.path.join(run_uri, name))
        except StageError:
            continue
        best = max(best, int(m.group(1)))
    return best


def test_killed_driver_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    killed_root, plain_root = str(tmp_path / "killed"), str(tmp_path / "plain")
    recipe = _recipe_file(killed_root)
    run_uri = os.path.join(killed_root, "pretrain", "slm")
    # killed as soon as a random checkpoint (the 2nd or later) is complete on storage: the
    # moment Ray Train may not have registered it yet
    target = EVERY * random.Random().randint(2, STEPS // EVERY - 1)
    target_dir = os.path.join(run_uri, ckpt.step_dir_name(target))
    print(f"killing the driver once checkpoint {target} is complete (one every {EVERY} steps)")

    proc = subprocess.Popen(_cmd(recipe), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), start_new_session=True)  # its own group
    seen: list[str] = []
    drain = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    drain.start()
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None:
        try:
            ckpt.verify(target_dir)
            break
        except StageError:
            time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    drain.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    newest = _newest_complete_dir(run_uri)
    assert target <= newest < STEPS, "".join(seen[-30:])

    # the same command, at once: the dead driver's lock is free, the run resumes
    again = subprocess.run(_cmd(recipe), capture_output=True, text=True, env=_env(), timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "being written by" not in again.stderr
    m = re.search(r"resumed run 'slm' from its checkpoint at step (\d+)", again.stdout + again.stderr)
    assert m, again.stdout[-3000:]
    start = int(m.group(1))
    print(f"killed with checkpoint {newest} complete; resumed at {start}")
    assert start in (newest - EVERY, newest)         # ≤ 1 interval lost (see the module doc)

    plain = subprocess.run(_cmd(_recipe_file(plain_root)), capture_output=True, text=True,
                           env=_env(), timeout=1200)
    assert plain.returncode == 0, plain.stderr[-3000:]
    resumed_loss = tb_scalars(run_uri, "valid/loss")[STEPS]
    plain_loss = tb_scalars(os.path.join(plain_root, "pretrain", "slm"), "valid/loss")[STEPS]
    print(f"final valid loss: resumed {resumed_loss:.6f}, uninterrupted {plain_loss:.6f}")
    assert abs(resumed_loss - plain_loss) <= TOLERANCE
