"""`slm run`: the whole study end to end, each step skipping what is already done.

data pipeline → pretraining of every family of the recipe → specialization sweep → report.
Every step publishes atomically, so an interrupted study re-run picks up where it stopped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow.parquet as pq

from slm.cluster.ray_env import ray_session
from slm.layout import RunLayout
from slm.models.metrics import console
from slm.models.pretrain import pretrain_families
from slm.pipeline.run import run_pipeline
from slm.stage import exists, filesystem, rebuild_hint, read_json

from .grid import sweep_trials, teacher_trials
from .report import write_report
from .sweep import run_sweep

log = logging.getLogger(__name__)


def run_study(recipe, force: bool = False) -> str:
    """Run the study of ``recipe``; returns the report's path. ``force`` rebuilds the data
    stages, and pretrainings published from another config or data (models/pretrain.py);
    trials resume from what is published (a stale one is refused: delete it to redo it)."""
    layout = RunLayout(recipe.run_dir)
    lines: list[tuple[str, float, str]] = []  # (stage, seconds, what it left), for the summary
    t_all = time.time()
    # One Ray session for every step: starting Ray once saves ~10 s per step.
    with ray_session(recipe.cluster):
        t = time.time()
        with rebuild_hint("pass --force"):  # `slm run --force` rebuilds the data stages only
            data = run_pipeline(recipe, force=force)
        lines.append(("data", time.time() - t, _data_result(data)))
        # families train at once where the cluster holds several runs; a family pretrained
        # per (domain, train size) (SLM-is) only for the domains and sizes the sweep specializes
        for done in pretrain_families(recipe, recipe.pretrain.families, domains=recipe.sweep.domains or None,
                                      force=force):
            seed = "" if recipe.layout_seed(done["seed"]) is None else f" seed {done['seed']}"
            lines.append((f"pretrain {done['family']}{seed}", done["seconds"], _pretrain_result(layout, done["out"])))
        t = time.time()
        results = run_sweep(recipe)
        lines.append((f"sweep {recipe.sweep.name}", time.time() - t, _sweep_result(recipe, layout, results)))
        t = time.time()
        path = write_report(recipe)
        lines.append(("report", time.time() - t, layout.relative(path)))
    for line in summary(recipe.name, layout.root, time.time() - t_all, lines):
        console(line)
    log.info("study '%s' done: %s (report: %s)", recipe.name,
             ", ".join(f"{k} {v:.0f}s" for k, v, _ in lines), path)
    return path


def summary(name: str, run_dir: str, seconds: float, lines: list[tuple[str, float, str]]) -> list[str]:
    """The one-screen summary `slm run` ends with: each stage's wall time and what it left
    (run-relative), then the commands that use the run."""
    width = max(len(stage) for stage, _, _ in lines)
    out = [f"== study '{name}' done in {_duration(seconds)} · run {run_dir}"]
    out += [f"  {stage:<{width}}  {_duration(s):>8}  {what}" for stage, s, what in lines]
    out.append(f"  next: slm report --run {run_dir} | slm export --run {run_dir} --domain D | "
               f"slm serve --run {run_dir}")
    return out


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _data_result(out: dict[str, Any]) -> str:
    stages = out["stages"]
    built = sum(1 for st in stages if st["status"] == "done")
    return f"{len(stages)} stages: {built} built, {len(stages) - built} reused"


def _pretrain_result(layout: RunLayout, out: dict[str, Any]) -> str:
    runs = sorted(layout.relative(u) for u in out["runs"].values())
    where = runs[0] if len(runs) == 1 else f"{len(runs)} runs ({runs[0]}, ...)"
    c = out.get("costs") or {}
    cost = (f" · {float(c['flops']):.2g} FLOPs, {float(c['device_seconds']):.0f} device-s"
            if "flops" in c and "device_seconds" in c else "")
    return where + cost


def _sweep_result(recipe, layout: RunLayout, results: str) -> str:
    fs, path = filesystem(results)
    finished = pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
    stopped_uri = layout.sweep_stopped(recipe.sweep.name)
    stopped = len(read_json(stopped_uri)["trials"]) if exists(stopped_uri) else 0
    grid = sweep_trials(recipe)
    # teachers outside the grid (an LLM over the inference budget still teaches SLM-d)
    in_grid = set(grid)
    teachers = [t for t in teacher_trials(grid) if t not in in_grid]
    extra = f" + {len(teachers)} SLM-d teachers" if teachers else ""
    return (f"{finished} result rows; grid of {len(grid)} trials{extra}, {stopped} stopped "
            f"early by ASHA -> {layout.relative(results)}")
