"""The Ray Tune sweep: results table, products, and a real interruption (the sweep runs in a
subprocess that is killed after some trials finished; the re-run does only the rest)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from spec_run import build_tiny_run

from slm.configkit import ConfigError


@pytest.fixture(scope="module")
def recipe(ray_local, tmp_path_factory):
    return build_tiny_run(tmp_path_factory.getbasetemp() / "spec-run")


def _sweep(recipe, **kw):
    return dataclasses.replace(recipe, sweep=dataclasses.replace(recipe.sweep, **kw))


def _finished(recipe):
    from slm.layout import TRIAL_ROW
    from slm.stage import join, manifest, read_json
    from slm.tune.grid import sweep_trials, trial_uri

    out = {}
    for t in sweep_trials(recipe):
        if manifest(trial_uri(recipe, t)) is not None:
            out[t.key()] = read_json(join(trial_uri(recipe, t), TRIAL_ROW))["finished_at"]
    return out


def test_interrupted_sweep_reruns_only_unfinished_trials(recipe, tmp_path):
    import pyarrow.parquet as pq
    import yaml

    from slm.configkit import to_dict
    from slm.layout import RunLayout
    from slm.tune.grid import sweep_trials
    from slm.tune.results import RESULT_COLUMNS
    from slm.tune.sweep import run_sweep

    # trials run in their Tune actors and a 6-step trial of the tiny model takes well under a
    # second: 150 steps give the kill below (polled every 0.1 s) time to land between two trials
    r = _sweep(recipe, name="interrupt", domains=["numeric"], methods=["slm", "nopt"],
               budgets=[150], domain_tokens=[1024], seeds=[0], max_concurrent=1)
    r = dataclasses.replace(r, specialize=dataclasses.replace(r.specialize, eval_every=50, max_steps=150))
    trials = sweep_trials(r)
    assert len(trials) == 3  # slm from both pretraining levels (0.5, 1) + nopt (pretrains nothing)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(to_dict(r)))
    script = textwrap.dedent(f"""
        from slm.config import load_recipe
        from slm.tune.sweep import run_sweep
        run_sweep(load_recipe({str(path)!r}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and len(_finished(r)) < 1 and proc.poll() is None:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the subprocess's own group: its Ray goes too
        proc.wait()
    before = _finished(r)
    assert 1 <= len(before) < len(trials), "kill the sweep after some, not all, trials finished"

    out = run_sweep(r)                                     # the re-run, in this process
    after = _finished(r)
    assert set(after) == {t.key() for t in trials}
    for key, stamp in before.items():                     # finished trials were not re-run
        assert after[key] == stamp
    table = pq.read_table(out).to_pylist()
    assert len(table) == len(trials)
    assert set(RESULT_COLUMNS) <= set(table[0])
    assert {(row["method"], row["seed"]) for row in table} == {
        (m, 0) for m in ("slm", "nopt")}
    assert os.path.isfile(out.replace(".parquet", ".csv"))
    layout = RunLayout(r.run_dir)
    for m in ("slm", "nopt"):
        prod = layout.model("numeric", m)
        assert os.path.isfile(os.path.join(prod, "model.safetensors"))
        assert os.path.isfile(os.path.join(prod, "training.json"))

    again = run_sweep(r)                                   # nothing left: no trial runs
    assert _finished(r) == after and again == out


def test_sweep_rejects_what_it_does_not_know(recipe):
    from slm.tune.grid import sweep_trials

    with pytest.raises(ConfigError, match="sweep.domains"):
        sweep_trials(_sweep(recipe, domains=["nosuch"]))
    with pytest.raises(ConfigError, match="sweep.domain_tokens"):
        sweep_trials(_sweep(recipe, domain_tokens=[999]))
    with pytest.raises(ConfigError, match="sweep.budgets"):
        sweep_trials(_sweep(recipe, budgets=[0]))
    with pytest.raises(ConfigError, match="unknown method 'gpt'"):
        sweep_trials(_sweep(recipe, methods=["gpt"]))
    fam = dataclasses.replace(recipe.pretrain, families=["slm", "llm"])
    with pytest.raises(ConfigError, match="needs the 'pn' family"):
        sweep_trials(dataclasses.replace(_sweep(recipe, methods=["pn"]), pretrain=fam))
    with pytest.raises(ConfigError, match="sweep.levels.*0.25.*pretrain.levels"):
        sweep_trials(_sweep(recipe, levels=[0.25]))
    # the domain named: other tests may add domains to the shared run (`slm specialize`)
    every_size = _sweep(recipe, domains=["numeric"], methods=["slm", "pn"], seeds=[0, 1],
                        budgets=[5, 9], domain_tokens=[])
    # domains x methods x budgets x sizes x seeds x pretraining levels
    assert len(sweep_trials(every_size)) == 1 * 2 * 2 * 2 * 2 * 2


def _newest_mtime(path):
    times = [os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs]
    return max(times, default=0.0)


def _sweep_in_subprocess(r, path) -> str:
    """run_sweep(r) in a process with its own embedded Ray; returns its log (INFO and up)."""
    import yaml

    from slm.configkit import to_dict

    path.write_text(yaml.safe_dump(to_dict(r)))
    script = textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        from slm.config import load_recipe
        from slm.tune.sweep import run_sweep
        run_sweep(load_recipe({str(path)!r}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def test_asha_stopped_trials_are_recorded_as_stopped_and_not_announced_as_retryable(recipe, tmp_path):
    from slm.layout import RunLayout
    from slm.stage import manifest, read_json
    from slm.tune.grid import sweep_trials, trial_uri, trial_workdir

    # the first trial barely moves; the second's LR is 1000x: worse at ASHA's rung (2nd valid
    # evaluation), so ASHA stops it (one recorded value: the cutoff is that value). In its own
    # Ray: a trial Tune stops may leave its Train worker's reservation to the end of the job
    # (seen: the next test's trial then waited for a CPU), so it must not share the session.
    r = _sweep(recipe, name="asha", domains=["numeric"], methods=["slm"], budgets=[6],
               domain_tokens=[1024], seeds=[0], lrs=[1e-4, 0.1], asha=True, asha_grace=2,
               max_concurrent=1)
    r = _sweep(r, levels=[1.0])  # from the final models only
    r = dataclasses.replace(r, specialize=dataclasses.replace(r.specialize, eval_every=2, patience=5))
    good, bad = sweep_trials(r)
    assert (good.lr, bad.lr) == (1e-4, 0.1)
    text = _sweep_in_subprocess(r, tmp_path / "recipe.yaml")
    assert manifest(trial_uri(r, good)) is not None and manifest(trial_uri(r, bad)) is None
    record = read_json(RunLayout(r.run_dir).sweep_stopped("asha"))["trials"]
    assert [t["trial"] for t in record] == [bad.key()]
    assert record[0]["status"] == "stopped" and record[0]["last_step"] == 4
    assert record[0]["last_valid_loss"] > 0
    # each trial's fine-tuning is a run of the recipe's logger (TensorBoard here), its own
    # TensorBoard: one folder per fine-tuning beside the sweep's results (a trial's work goes)
    tb = RunLayout(r.run_dir).sweep_tensorboard("asha")
    events = [os.path.join(d, f) for d, _, fs in os.walk(tb) for f in fs if "tfevents" in f]
    assert len(events) == 2, events  # the stopped trial logged its evaluations too
    events = [e for e in events if good.key() in e]
    assert len(events) == 1, events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(events[0])
    acc.Reload()
    assert [e.step for e in acc.Scalars("valid/loss")] == [2, 4, 6]
    assert "1 of 2 trials were stopped early by ASHA (not retried" in text
    assert "re-run `slm sweep` to retry" not in text  # was announced for the stopped trial

    before = _newest_mtime(trial_workdir(r, bad))
    text = _sweep_in_subprocess(r, tmp_path / "recipe.yaml")  # Tune restores: it stays stopped
    assert _newest_mtime(trial_workdir(r, bad)) == before
    assert read_json(RunLayout(r.run_dir).sweep_stopped("asha"))["trials"] == record
    assert "re-run `slm sweep` to retry" not in text


def test_a_trial_process_killed_mid_training_is_retried_and_the_sweep_completes(recipe, tmp_path):
    """SIGKILL of a trial's training process (a local trial trains in its Tune actor) after its
    first evaluation: Tune retries the trial (sweep.max_failures), which trains again whole,
    and the sweep ends with every trial's row."""
    import threading

    import pyarrow.parquet as pq

    from slm.tune.grid import sweep_trials
    from slm.tune.sweep import run_sweep

    pid_dir = str(tmp_path / "pids")
    r = _sweep(recipe, name="killed-trial", domains=["numeric"], methods=["slm", "nopt"],
               budgets=[40], domain_tokens=[1024], seeds=[0], max_concurrent=1, max_failures=1,
               pid_dir=pid_dir)
    r = dataclasses.replace(r, specialize=dataclasses.replace(r.specialize, eval_every=2, patience=100))
    trials = sweep_trials(r)
    from slm.layout import RunLayout

    tb = RunLayout(r.run_dir).sweep_tensorboard("killed-trial")
    killed: dict[str, object] = {}

    def pid_files() -> dict[str, str]:
        return {d: os.path.join(d, f) for d, _, fs in os.walk(pid_dir) for f in fs if f == "rank0.pid"}

    def events_size(run: str) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tb) for f in fs
                   if "tfevents" in f and run in d)

    def killer() -> None:
        deadline = time.time() + 1500
        while time.time() < deadline and not pid_files():
            time.sleep(0.2)
        run, path = next(iter(pid_files().items()))
        name = os.path.basename(run)
        start = events_size(name)
        while time.time() < deadline and events_size(name) <= start:  # its first evaluation is flushed
            time.sleep(0.1)
        pid = int(open(path).read())
        os.kill(pid, signal.SIGKILL)
        killed.update(pid=pid, path=path, run=name)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    out = run_sweep(r)
    th.join(timeout=5)
    assert "pid" in killed, "the trial was not killed"
    assert int(open(killed["path"]).read()) != killed["pid"]   # a new process trained it again
    table = pq.read_table(out).to_pylist()
    assert sorted(row["trial"] for row in table) == sorted(t.key() for t in trials)
    assert all(row["steps_run"] == 40 for row in table)
