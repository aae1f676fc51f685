"""Ray Tune sweep of specialization: domains x methods x budgets x domain sizes x seeds (x LRs).

Layout of a sweep (``RUN/specialize/<sweep.name>/``, the name is deterministic so a re-run
resumes it):

    tune/                      the Ray Tune experiment (restored with resume_unfinished)
    trials/<trial key>/        one published artifact per finished trial: HF model,
                               training.json, row.json (its row of the results table)
    results.parquet, .csv      every finished trial's row (written atomically)

A trial is *finished* exactly when its ``trials/<key>/`` artifact is published, so a sweep that
was killed mid-way and re-run skips finished trials twice over: Tune does not restart trials it
recorded as terminated, and a trial whose artifact exists returns its row without training
(the artifact may have been published after Tune's last state save). Pretrained checkpoints are
read by every trial, never retrained.

Products: for each (domain, method) the trial with the lowest domain valid loss is published to
``RUN/models/<domain>/<method>/`` (HF directory + training.json).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from itertools import product
from typing import Any

from slm.configkit import ConfigError
from slm.errors import StageError
from slm.layout import RunLayout
from slm.stage import (exists, filesystem, fingerprint, is_remote, join, manifest, publish, read_json,
                       write_json)

from .specialize import (RESULT_COLUMNS, Trial, check_methods, run_domains, specialize_trial,
                         trial_done, trial_uri)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------

def sweep_trials(recipe, domains: list[str] | None = None) -> list[Trial]:
    """Every trial of the recipe's sweep, in a deterministic order; ConfigError names the field
    that asks for something the run cannot do (unknown domain, size, method, budget)."""
    sw, spec = recipe.sweep, recipe.specialize
    layout = RunLayout(recipe.run_dir)
    known = run_domains(layout)
    wanted = list(domains if domains is not None else (sw.domains or known))
    for d in wanted:
        if d not in known:
            raise ConfigError(f"field 'sweep.domains' names domain '{d}', which the run has no "
                              f"shards for; known: {', '.join(known) or '(none: run `slm data run`)'}")
    for b in sw.budgets:
        if b <= 0:
            raise ConfigError(f"field 'sweep.budgets' has {b}; a specialization budget must be > 0 steps")
    sizes = sw.domain_tokens or list(recipe.data.domain_train_tokens)
    for t in sizes:
        if t not in recipe.data.domain_train_tokens:
            raise ConfigError(f"field 'sweep.domain_tokens' has {t}, which is not one of the run's "
                              f"domain train subsets (data.domain_train_tokens = "
                              f"{recipe.data.domain_train_tokens}); use one of those")
    methods = check_methods(recipe, sw.methods)
    lrs = sw.lrs or [spec.lr]
    return [Trial(d, m, b, t, s, lr)
            for d, m, b, t, s, lr in product(wanted, methods, sw.budgets, sizes, sw.seeds, lrs)]


def sweep_dir(recipe) -> str:
    return RunLayout(recipe.run_dir).sweep(recipe.sweep.name)


# --------------------------------------------------------------------------------------------
# The trainable
# --------------------------------------------------------------------------------------------

def _trial_fn(config: dict[str, Any], recipe=None) -> None:
    """Tune trainable: one specialization trial. Reports the published row if the trial's
    artifact already exists (a re-run after an interruption), else trains and publishes."""
    import ray.tune

    trial = Trial.from_dict(config["trial"])
    uri = trial_uri(recipe, trial)
    if trial_done(recipe, trial, uri):
        row = read_json(join(uri, "row.json"))
        ray.tune.report({**_numeric(row), "valid/loss": row["valid_loss"], "skipped": 1})
        return
    row = specialize_trial(recipe, trial, uri, in_tune=True)
    ray.tune.report({**_numeric(row), "valid/loss": row["valid_loss"], "skipped": 0})


def _numeric(row: dict[str, Any]) -> dict[str, Any]:
    """Tune metrics: the row's numbers (Tune logs them; strings go to the results table)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tuner(recipe, trials: list[Trial]):
    """A new Tuner over ``trials``, or the restored one when the experiment exists."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from slm.cluster.ray_env import TRIAL_DRIVER_RESOURCES

    sw = recipe.sweep
    # The trial only drives: its Train worker holds the trial's CPUs/GPU, so concurrency is
    # bounded by max_concurrent_trials, not by the driver's resources.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial_fn, recipe=recipe),
                                        TRIAL_DRIVER_RESOURCES)
    storage = sweep_dir(recipe)
    exp = _abs(join(storage, "tune"))
    grid_fp = fingerprint([t.key() for t in trials])
    fs, path = filesystem(storage)
    marker = join(storage, "grid.json")
    if ray.tune.Tuner.can_restore(exp) and exists(marker) and read_json(marker).get("grid") == grid_fp:
        log.info("sweep '%s': restoring the Tune experiment %s (finished trials are not re-run)",
                 sw.name, exp)
        return ray.tune.Tuner.restore(exp, trainable, resume_unfinished=True,
                                      restart_errored=True)
    if exists(exp):  # another grid: its finished trials stay published under trials/
        log.info("sweep '%s': the grid changed; starting a new Tune experiment", sw.name)
        if not is_remote(exp):
            shutil.rmtree(path + "/tune", ignore_errors=True)
    fs.create_dir(path, recursive=True)
    write_json(marker, {"grid": grid_fp, "trials": [t.key() for t in trials]})
    param_space = {"trial": ray.tune.grid_search([t.to_dict() for t in trials])}
    scheduler = None
    if sw.asha:
        # every valid evaluation of the loop reaches Tune as one result with "valid/loss"
        scheduler = ASHAScheduler(time_attr="training_iteration", metric="valid/loss", mode="min",
                                  grace_period=sw.asha_grace, max_t=max(2, max(sw.budgets)))
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(scheduler=scheduler,
                                        max_concurrent_trials=_concurrency(recipe)),
        run_config=ray.tune.RunConfig(name="tune", storage_path=_abs(storage), verbose=1,
                                      failure_config=ray.tune.FailureConfig(max_failures=sw.max_failures)),
    )


def _concurrency(recipe) -> int:
    """As many trials as the cluster has room for (their Train workers' CPUs/GPUs; on CPUs one
    CPU stays free for the Ray Data tasks that feed the workers and for each trial's driver),
    capped by sweep.max_concurrent. More would leave a trial's worker group waiting for
    resources until Ray Train's start-up timeout fails it."""
    import ray

    sw = recipe.sweep
    res = ray.cluster_resources()
    if sw.gpus_per_trial > 0:
        fits = int(res.get("GPU", 0) // sw.gpus_per_trial)
    else:
        fits = int((res.get("CPU", 1) - 1) // sw.cpus_per_trial)
    fits = max(1, fits)
    if sw.max_concurrent and sw.max_concurrent > fits:
        log.warning("sweep.max_concurrent = %d but the cluster fits %d trial(s) at once; "
                    "running %d", sw.max_concurrent, fits, fits)
    return min(sw.max_concurrent, fits) if sw.max_concurrent else fits


def _abs(uri: str) -> str:
    return uri if is_remote(uri) else os.path.abspath(uri)


# --------------------------------------------------------------------------------------------
# Results and products
# --------------------------------------------------------------------------------------------

def collect_rows(recipe, trials: list[Trial]) -> list[dict[str, Any]]:
    """Rows of the trials whose artifact is published (the others did not finish)."""
    rows = []
    for t in trials:
        uri = trial_uri(recipe, t)
        if manifest(uri) is not None:
            rows.append(read_json(join(uri, "row.json")))
    return rows


def teacher_trials(trials: list[Trial]) -> list[Trial]:
    """The llm trials SLM-d trials use as teachers that are not in ``trials`` themselves."""
    import dataclasses

    have = {t.key() for t in trials}
    out = []
    for t in trials:
        ref = dataclasses.replace(t, method="llm")
        if t.method == "d" and ref.key() not in have:
            have.add(ref.key())
            out.append(ref)
    return out


def write_results(recipe, rows: list[dict[str, Any]]) -> str:
    """``results.parquet`` + ``results.csv`` of the sweep, each replaced atomically."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cols = RESULT_COLUMNS + sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows],
                                 schema=_schema(cols, rows))
    out = join(sweep_dir(recipe), "results.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _atomic_write(out, buf.getvalue())
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    _atomic_write(join(sweep_dir(recipe), "results.csv"), buf.getvalue())
    return out


def _schema(cols: list[str], rows: list[dict[str, Any]]):
    import pyarrow as pa

    str_cols = {"recipe", "domain", "method", "model_path", "trial", "data", "expert_selection"}
    int_cols = {"budget_steps", "domain_tokens", "seed", "expert", "steps_run", "best_step",
                "inference_params"}
    fields = []
    for c in cols:
        if c in str_cols:
            fields.append(pa.field(c, pa.string()))
        elif c in int_cols:
            fields.append(pa.field(c, pa.int64()))
        else:
            vals = [r.get(c) for r in rows if r.get(c) is not None]
            if vals and all(isinstance(v, str) for v in vals):
                fields.append(pa.field(c, pa.string()))
            else:
                fields.append(pa.field(c, pa.float64()))
    return pa.schema(fields)


def _atomic_write(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if is_remote(uri):  # object stores replace a key atomically
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
        if m is not None and m.get("trial") == r["trial"] and m.get("trial_uri") == r["model_path"]:
            out[(domain, method)] = dst
            continue
        copy_model(r["model_path"], dst, stage="model",
                   extra={"trial": r["trial"], "trial_uri": r["model_path"], "valid_loss": r["valid_loss"],
                          "test_ppl": r["test_ppl"]})
        out[(domain, method)] = dst
    return out


def copy_model(src: str, dst: str, *, stage: str, extra: dict[str, Any]) -> None:
    """Publish a copy of the model files (HF files + training.json) of ``src`` at ``dst``."""
    import pyarrow.fs as pafs

    sfs, spath = filesystem(src)
    files = [f for f in sfs.get_file_info(pafs.FileSelector(spath))
             if f.type == pafs.FileType.File and f.base_name not in ("manifest.json", "row.json")]
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
    ``gpus_per_trial`` GPUs for its Train worker). Trials that fail are reported and left
    unfinished (a re-run retries them); the table and products cover the finished ones.
    """
    from slm.cluster.ray_env import ray_session
    from slm.config import resolve_paths

    recipe = resolve_paths(recipe)  # trials run in their own working directories
    trials = sweep_trials(recipe)
    pending = [t for t in trials if not trial_done(recipe, t, trial_uri(recipe, t))]
    log.info("sweep '%s': %d trials, %d already finished", recipe.sweep.name, len(trials),
             len(trials) - len(pending))
    if pending:
        t0 = time.time()
        with ray_session(recipe.cluster):
            grid = _tuner(recipe, trials)
            results = grid.fit()
        errors = [r.error for r in results if r.error is not None]
        log.info("sweep '%s': Tune finished in %.0f s (%d errored trials)", recipe.sweep.name,
                 time.time() - t0, len(errors))
        for e in errors:
            log.warning("trial failed: %s", e)
    grid_rows = collect_rows(recipe, trials)
    # SLM-d's teachers are llm trials; where the grid leaves llm out (over the inference budget)
    # they ran anyway, and their rows are the large-model reference the report compares with.
    rows = grid_rows + collect_rows(recipe, teacher_trials(trials))
    if not grid_rows:
        raise StageError(f"sweep '{recipe.sweep.name}' finished no trial; see the errors above "
                         f"and the Tune logs under {join(sweep_dir(recipe), 'tune')}")
    out = write_results(recipe, rows)
    publish_products(recipe, rows)
    missing = len(trials) - len(grid_rows)
    if missing:
        log.warning("sweep '%s': %d of %d trials did not finish; re-run `slm sweep` to retry them",
                    recipe.sweep.name, missing, len(trials))
    return out
