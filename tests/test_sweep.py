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

    r = _sweep(recipe, name="interrupt", domains=["numeric"], methods=["slm", "nopt"],
               budgets=[6], domain_tokens=[1024], seeds=[0], max_concurrent=1)
    r = dataclasses.replace(r, specialize=dataclasses.replace(r.specialize, eval_every=3))
    trials = sweep_trials(r)
    assert len(trials) == 2
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
            time.sleep(1)
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
    # the domain named: other tests may add domains to the shared run (`slm specialize`)
    every_size = _sweep(recipe, domains=["numeric"], methods=["slm", "pn"], seeds=[0, 1],
                        budgets=[5, 9], domain_tokens=[])
    assert len(sweep_trials(every_size)) == 1 * 2 * 2 * 2 * 2  # domains x methods x budgets x sizes x seeds


def _newest_mtime(path):
    times = [os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs]
    return max(times, default=0.0)


def test_asha_stopped_trials_are_recorded_as_stopped_and_not_announced_as_retryable(recipe, caplog):
    import logging

    from slm.layout import RunLayout
    from slm.stage import manifest, read_json
    from slm.tune.grid import sweep_trials, trial_uri, trial_workdir
    from slm.tune.sweep import run_sweep

    # the first trial barely moves; the second's LR is 1000x: worse at ASHA's rung (2nd valid
    # evaluation), so ASHA stops it (one recorded value: the cutoff is that value)
    r = _sweep(recipe, name="asha", domains=["numeric"], methods=["slm"], budgets=[6],
               domain_tokens=[1024], seeds=[0], lrs=[1e-4, 0.1], asha=True, asha_grace=2,
               max_concurrent=1)
    r = dataclasses.replace(r, specialize=dataclasses.replace(r.specialize, eval_every=2, patience=5))
    good, bad = sweep_trials(r)
    assert (good.lr, bad.lr) == (1e-4, 0.1)
    with caplog.at_level(logging.INFO, logger="slm.tune.sweep"):
        run_sweep(r)
    assert manifest(trial_uri(r, good)) is not None and manifest(trial_uri(r, bad)) is None
    record = read_json(RunLayout(r.run_dir).sweep_stopped("asha"))["trials"]
    assert [t["trial"] for t in record] == [bad.key()]
    assert record[0]["status"] == "stopped" and record[0]["last_step"] == 4
    assert record[0]["last_valid_loss"] > 0
    text = caplog.text
    assert "1 of 2 trials were stopped early by ASHA (not retried" in text
    assert "re-run `slm sweep` to retry" not in text  # was announced for the stopped trial

    caplog.clear()
    before = _newest_mtime(trial_workdir(r, bad))
    with caplog.at_level(logging.INFO, logger="slm.tune.sweep"):
        run_sweep(r)                                       # Tune restores: the trial stays stopped
    assert _newest_mtime(trial_workdir(r, bad)) == before
    assert read_json(RunLayout(r.run_dir).sweep_stopped("asha"))["trials"] == record
    assert "re-run `slm sweep` to retry" not in caplog.text
