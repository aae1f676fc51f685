"""Output a user reads in a log (no TTY: CI, `slm submit`, nohup): one line per progress event,
no progress-bar escape sequences, no periodic progress tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

HERE = os.path.dirname(__file__)


def test_training_progress_in_a_log_is_one_line_per_event_and_has_no_bars(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        from train_shards import make_run, tiny_recipe
        from slm.cluster.ray_env import ray_session
        from slm.models import pretrain as pt
        make_run({str(tmp_path / "run")!r})
        with ray_session():
            pt.pretrain(tiny_recipe({str(tmp_path / "run")!r}, slm=12), "slm")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("SLM_PROGRESS_BARS", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    steps = re.findall(r"\[slm\] step (\d+)/12 \|", out)
    assert steps == ["4", "8", "12"], steps  # log_every 4: each once, in order
    assert "\x1b[A" not in out and "Running Dataset:" not in out  # no bars redrawn in a file
    assert "Progress bars disabled" in out  # Ray Data says why, once
    # Ray Train's placement-group cleaner asks the State API (a dashboard service the embedded
    # session does not start) every second: one warning a second, unless silenced
    assert "Failed to query Ray Train Controller actor state" not in out


def test_datasets_built_in_workers_draw_no_bars_in_a_log():
    """A sweep trial and its Train workers build their Datasets in Ray workers, which start
    from Ray Data's defaults, not from the driver's DataContext."""
    script = textwrap.dedent("""
        import ray
        from ray.data import DataContext
        from slm.cluster.ray_env import ray_session

        @ray.remote(num_cpus=0)
        def bars():
            return DataContext.get_current().enable_progress_bars

        with ray_session():
            print("WORKER_BARS", ray.get(bars.remote()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("SLM_PROGRESS_BARS", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "WORKER_BARS False" in proc.stdout, proc.stdout[-3000:]
