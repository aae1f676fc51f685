"""Ray Tune sweep of specialization: domains x methods x budgets x domain sizes x seeds (x LRs).

Layout of a sweep (``RUN/specialize/<sweep.name>/``, slm.layout.RunLayout; the name is
deterministic so a re-run resumes it):

    tune/<phase>/              the Ray Tune experiments (restored with resume_unfinished):
                               'teachers' first, then 'grid' (the other trials)
    grid.json                  the trial keys each phase was started with
    trials/<trial key>/        one published artifact per finished trial: HF model,
                               training.json, row.json (its row of the results table)
    results.parquet, .csv      every finished trial's row (written atomically)

Teachers are dependencies: the trials other trials distil from (SLM-d's llm trial of the same
domain, budget, domain size, seed and LR; ``Method.teacher``), in the grid or not, run as a
first Tune phase; a student only looks its teacher up. Their rows stay in the table (the llm
rows are the large-model reference even where the grid leaves llm out).

A trial is *finished* exactly when its ``trials/<key>/`` artifact is published, so a sweep that
was killed mid-way and re-run skips finished trials twice over: Tune does not restart trials it
recorded as terminated, and a trial whose artifact exists returns its row without training
(the artifact may have been published after Tune's last state save). Pretrained checkpoints are
read by every trial, never retrained.

Products: for each (domain, method) the trial with the lowest domain valid loss is published to
``RUN/models/<domain>/<method>/`` (HF directory + training.json).
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.tune

from slm.cluster.config import spot_resources
from slm.cluster.ray_env import TRIAL_DRIVER_RESOURCES, ray_session, warn_without_spot
from slm.config import resolve_paths
from slm.errors import StageError
from slm.layout import TRIAL_ROW, RunLayout
from slm.models.launch import storage_path
from slm.stage import MANIFEST, exists, filesystem, is_remote, join, manifest, publish, read_json, write_json

from .grid import Trial, sweep_trials, teacher_trials, trial_done, trial_uri
from .results import write_table
from .schedulers import GroupedASHA
from .specialize import specialize_trial

log = logging.getLogger(__name__)

TEACHERS, GRID = "teachers", "grid"  # the Tune phases, in order


def sweep_phases(trials: list[Trial]) -> list[tuple[str, list[Trial]]]:
    """[(phase, trials)]: every teacher the grid depends on, then the rest of the grid."""
    teachers = teacher_trials(trials)
    keys = {t.key() for t in teachers}
    return [(TEACHERS, teachers), (GRID, [t for t in trials if t.key() not in keys])]


# --------------------------------------------------------------------------------------------
# The trainable
# --------------------------------------------------------------------------------------------

def _trial_fn(config: dict[str, Any], recipe=None) -> None:
    """Tune trainable: one specialization trial. Reports the published row if the trial's
    artifact already exists (a re-run after an interruption), else trains and publishes."""
    trial = Trial.from_dict(config["trial"])
    uri = trial_uri(recipe, trial)
    if trial_done(recipe, trial, uri):
        row = read_json(join(uri, TRIAL_ROW))
        ray.tune.report({**_numeric(row), "valid/loss": row["valid_loss"], "skipped": 1})
        return
    row = specialize_trial(recipe, trial, uri, in_tune=True)
    ray.tune.report({**_numeric(row), "valid/loss": row["valid_loss"], "skipped": 0})


def _numeric(row: dict[str, Any]) -> dict[str, Any]:
    """Tune metrics: the row's numbers (Tune logs them; strings go to the results table)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tuner(recipe, phase: str, trials: list[Trial]):
    """A new Tuner of one phase over ``trials``, or the restored one when that phase's
    experiment exists and was started with the same trials."""
    sw = recipe.sweep
    layout = RunLayout(recipe.run_dir)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial_fn, recipe=recipe),
                                        trial_resources(sw))
    storage = storage_path(layout.sweep_tune(sw.name))
    exp = join(storage, phase)
    marker = layout.sweep_grid(sw.name)
    phases = read_json(marker).get("phases", {}) if exists(marker) else {}
    keys = [t.key() for t in trials]
    if ray.tune.Tuner.can_restore(exp) and phases.get(phase) == keys:
        log.info("sweep '%s': restoring the Tune experiment %s (finished trials are not re-run)",
                 sw.name, exp)
        return ray.tune.Tuner.restore(exp, trainable, resume_unfinished=True,
                                      restart_errored=True)
    if exists(exp):  # another grid: its finished trials stay published under trials/
        log.info("sweep '%s': the grid of phase '%s' changed; starting a new Tune experiment",
                 sw.name, phase)
        if not is_remote(exp):
            shutil.rmtree(exp, ignore_errors=True)
    fs, path = filesystem(layout.sweep(sw.name))
    fs.create_dir(path, recursive=True)
    write_json(marker, {"phases": {**phases, phase: keys}})
    param_space = {"trial": ray.tune.grid_search([t.to_dict() for t in trials])}
    scheduler = None
    if sw.asha and phase != TEACHERS:  # a teacher stopped early would leave its students none
        # every valid evaluation of the loop reaches Tune as one result with "valid/loss" and
        # "step"; like trials only are ranked together (tune/schedulers.py)
        every = recipe.specialize.eval_every
        # (a trial ends itself at its budget: ASHA stopping it there would stop its final
        # report, before it publishes)
        scheduler = GroupedASHA(time_attr="step", metric="valid/loss", mode="min",
                                grace_period=sw.asha_grace * every, max_t=max(2 * every, max(sw.budgets)),
                                stop_last_trials=False)
    if sw.spot:
        warn_without_spot(f"sweep '{sw.name}'", "sweep.spot")
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        # a trial's actor is kept for the next one (same resources): its imports, process
        # group, DeepSpeed set-up and the domain rows it read are already there
        tune_config=ray.tune.TuneConfig(scheduler=scheduler, reuse_actors=True,
                                        max_concurrent_trials=_concurrency(recipe)),
        run_config=ray.tune.RunConfig(name=phase, storage_path=storage, verbose=1,
                                      failure_config=ray.tune.FailureConfig(max_failures=sw.max_failures)),
    )


def _stopped_trials(recipe, results) -> dict[str, dict[str, Any]]:
    """The trials of a Tune result grid that ended without an error and without a published
    artifact: the scheduler stopped them. Keyed by trial key, with their last metrics."""
    out = {}
    for r in results:
        if r.error is not None or not r.config or "trial" not in r.config:
            continue
        trial = Trial.from_dict(r.config["trial"])
        if trial_done(recipe, trial, trial_uri(recipe, trial)):
            continue
        m = r.metrics or {}
        out[trial.key()] = {"trial": trial.key(), **trial.to_dict(), "status": "stopped",
                            "last_valid_loss": m.get("valid/loss"), "last_step": m.get("step"),
                            "evaluations": m.get("training_iteration")}
    return out


def trial_resources(sw) -> dict[str, float]:
    """What a trial's Tune actor holds. A local trial trains in that actor (tune/finetune.py),
    so it holds the trial's CPUs and GPU (a fraction of one reaches it as such). A ``train``
    trial only drives its Ray Train worker group, which holds them."""
    if sw.trial_runtime != "local":
        return TRIAL_DRIVER_RESOURCES  # its Train workers ask for spot (tune/finetune.py)
    return ({"CPU": sw.cpus_per_trial} | ({"GPU": sw.gpus_per_trial} if sw.gpus_per_trial > 0 else {})
            | spot_resources(sw.spot))


def _concurrency(recipe) -> int:
    """As many trials as the cluster has room for, capped by sweep.max_concurrent: local trials
    read their rows themselves, so every CPU (GPU) can hold trials; ``train`` trials need their
    workers' CPUs/GPUs, and on CPUs one CPU stays free for the Ray Data tasks that feed them. More would leave a trial's worker group waiting for resources until
    Ray Train's start-up timeout fails it."""
    sw = recipe.sweep
    res = ray.cluster_resources()
    workers = sw.workers_per_trial
    if sw.gpus_per_trial > 0:
        fits = int(res.get("GPU", 0) // (sw.gpus_per_trial * workers))
    elif sw.trial_runtime == "local":
        fits = int(res.get("CPU", 1) // sw.cpus_per_trial)
    else:
        fits = int((res.get("CPU", 1) - 1) // (sw.cpus_per_trial * workers))
    fits = max(1, fits)
    if sw.max_concurrent and sw.max_concurrent > fits:
        log.warning("sweep.max_concurrent = %d but the cluster fits %d trial(s) at once; "
                    "running %d", sw.max_concurrent, fits, fits)
    return min(sw.max_concurrent, fits) if sw.max_concurrent else fits


# --------------------------------------------------------------------------------------------
# Results and products
# --------------------------------------------------------------------------------------------

def collect_rows(recipe, trials: list[Trial]) -> list[dict[str, Any]]:
    """Rows of the trials whose artifact is published (the others did not finish)."""
    rows = []
    for t in trials:
        uri = trial_uri(recipe, t)
        if manifest(uri) is not None:
            rows.append(read_json(join(uri, TRIAL_ROW)))
    return rows


def write_results(recipe, rows: list[dict[str, Any]]) -> str:
    """``results.parquet`` + ``results.csv`` of the sweep, each replaced atomically."""
    layout = RunLayout(recipe.run_dir)
    out = layout.results(recipe.sweep.name)
    write_table(rows, out, layout.results(recipe.sweep.name, "csv"))
    return out


def publish_products(recipe, rows: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """Publish, for each (domain, method), the trial with the lowest valid loss to
    ``RUN/models/<domain>/<method>/``. Returns {(domain, method): uri}."""
    layout = RunLayout(recipe.run_dir)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["domain"], r["method"])
        if key not in best or r["valid_loss"] < best[key]["valid_loss"]:
            best[key] = r
    out = {}
    for (domain, method), r in sorted(best.items()):
        dst = layout.model(domain, method)
        m = manifest(dst)
        # model_path is run-relative (older runs: absolute); the manifest records it as stored
        if m is None or m.get("trial") != r["trial"] or m.get("trial_uri") != r["model_path"]:
            copy_model(layout.resolve(r["model_path"]), dst, stage="model",
                       extra={"trial": r["trial"], "trial_uri": r["model_path"],
                              "valid_loss": r["valid_loss"], "test_ppl": r["test_ppl"]})
        out[(domain, method)] = dst
    return out


def copy_model(src: str, dst: str, *, stage: str, extra: dict[str, Any]) -> None:
    """Publish a copy of the model files (HF files + training.json) of ``src`` at ``dst``."""
    sfs, spath = filesystem(src)
    files = [f for f in sfs.get_file_info(pafs.FileSelector(spath))
             if f.type == pafs.FileType.File and f.base_name not in (MANIFEST, TRIAL_ROW)]
    with publish(dst, stage=stage, config=extra, force=True) as out:
        for f in files:
            pafs.copy_files(f.path, join(out.path, f.base_name), source_filesystem=sfs,
                            destination_filesystem=out.fs)
        out.manifest.update(extra)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def run_sweep(recipe) -> str:
    """Run (or resume) the recipe's specialization sweep; returns the results.parquet URI.

    Trials whose artifact is already published are not run again; the others run as Ray Tune
    trials (``sweep.max_concurrent`` at once, each with ``sweep.cpus_per_trial`` CPUs /
    ``gpus_per_trial`` GPUs for its Train worker), teachers first. Trials that fail are
    reported and left unfinished (a re-run retries them); trials ASHA stops early are recorded
    in ``stopped.json`` with their last metrics (a re-run does not retry them); the table and
    products cover the finished ones.
    """
    recipe = resolve_paths(recipe)  # trials run in their own working directories
    trials = sweep_trials(recipe)
    phases = sweep_phases(trials)
    todo = {phase: [t for t in ts if not trial_done(recipe, t, trial_uri(recipe, t))] for phase, ts in phases}
    total = sum(len(ts) for _, ts in phases)
    log.info("sweep '%s': %d trials (%d of them teachers, run first), %d already finished",
             recipe.sweep.name, total, len(phases[0][1]), total - sum(map(len, todo.values())))
    stopped: dict[str, dict[str, Any]] = {}
    if any(todo.values()):
        with ray_session(recipe.cluster):
            for phase, ts in phases:
                if not todo[phase]:
                    continue
                t0 = time.time()
                results = _tuner(recipe, phase, ts).fit()
                errors = [r.error for r in results if r.error is not None]
                stopped.update(_stopped_trials(recipe, results))
                log.info("sweep '%s': Tune phase '%s' finished in %.0f s (%d errored trials)",
                         recipe.sweep.name, phase, time.time() - t0, len(errors))
                for e in errors:
                    log.warning("trial failed: %s", e)
        write_json(RunLayout(recipe.run_dir).sweep_stopped(recipe.sweep.name),
                   {"trials": [stopped[k] for k in sorted(stopped)]})
    grid_rows = collect_rows(recipe, trials)
    keys = {t.key() for t in trials}
    # the teachers outside the grid (e.g. llm over the inference budget) ran anyway: their rows
    # are the large-model reference the report compares with
    rows = grid_rows + collect_rows(recipe, [t for t in teacher_trials(trials) if t.key() not in keys])
    if not grid_rows:
        raise StageError(f"sweep '{recipe.sweep.name}' finished no trial; see the errors above "
                         f"and the Tune logs under {RunLayout(recipe.run_dir).sweep_tune(recipe.sweep.name)}")
    out = write_results(recipe, rows)
    publish_products(recipe, rows)
    early = sum(1 for t in trials if t.key() in stopped)
    if early:
        # Tune keeps them TERMINATED in its experiment: a re-run restores it and does not run
        # them again, so they are not announced as retryable
        log.info("sweep '%s': %d of %d trials were stopped early by ASHA (not retried; their "
                 "last metrics are in %s)", recipe.sweep.name, early, len(trials),
                 RunLayout(recipe.run_dir).sweep_stopped(recipe.sweep.name))
    missing = len(trials) - len(grid_rows) - early
    if missing:
        log.warning("sweep '%s': %d of %d trials did not finish (failed or interrupted); "
                    "re-run `slm sweep` to retry them", recipe.sweep.name, missing, len(trials))
    return out
