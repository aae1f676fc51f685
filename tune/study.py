"""`slm run`: the whole study end to end, each step skipping what is already done.

data pipeline → pretraining of every family of the recipe → specialization sweep → report.
Every step publishes atomically, so an interrupted study re-run picks up where it stopped.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def run_study(recipe, force: bool = False) -> str:
    """Run the study of ``recipe``; returns the report's path. ``force`` rebuilds the data
    stages (pretraining and trials resume from what is published; delete them to redo them)."""
    from slm.cluster.ray_env import ray_session
    from slm.models.pretrain import pretrain
    from slm.pipeline.run import run_pipeline
    from slm.tune.report import write_report
    from slm.tune.sweep import run_sweep

    times: dict[str, float] = {}
    # One Ray session for every step: starting Ray once saves ~10 s per step.
    with ray_session(recipe.cluster):
        t = time.time()
        run_pipeline(recipe, force=force)
        times["data"] = time.time() - t
        for family in recipe.pretrain.families:
            t = time.time()
            # SLM-is pretrains one model per domain: only for the domains the sweep specializes
            domains = (recipe.sweep.domains or None) if family == "is" else None
            pretrain(recipe, family, domains=domains)
            times[f"pretrain-{family}"] = time.time() - t
        t = time.time()
        run_sweep(recipe)
        times["sweep"] = time.time() - t
        t = time.time()
        path = write_report(recipe)
        times["report"] = time.time() - t
    log.info("study '%s' done: %s (report: %s)", recipe.name,
             ", ".join(f"{k} {v:.0f}s" for k, v in times.items()), path)
    return path
