"""`slm run`: the whole study end to end, each step skipping what is already done.

data pipeline → pretraining of every family of the recipe → specialization sweep → report.
Every step publishes atomically, so an interrupted study re-run picks up where it stopped.
"""

from __future__ import annotations

import logging
import time

from slm.cluster.ray_env import ray_session
from slm.models.config import FAMILY_INFO
from slm.models.pretrain import pretrain
from slm.pipeline.run import run_pipeline
from slm.stage import rebuild_hint

from .report import write_report
from .sweep import run_sweep

log = logging.getLogger(__name__)


def run_study(recipe, force: bool = False) -> str:
    """Run the study of ``recipe``; returns the report's path. ``force`` rebuilds the data
    stages (pretraining and trials resume from what is published; delete them to redo them)."""
    times: dict[str, float] = {}
    # One Ray session for every step: starting Ray once saves ~10 s per step.
    with ray_session(recipe.cluster):
        t = time.time()
        with rebuild_hint("pass --force"):  # `slm run --force` rebuilds the data stages only
            run_pipeline(recipe, force=force)
        times["data"] = time.time() - t
        for family in recipe.pretrain.families:
            t = time.time()
            # a family pretrained per domain (SLM-is): only for the domains the sweep specializes
            per_domain = FAMILY_INFO[family].runs == "per_domain"
            pretrain(recipe, family, domains=(recipe.sweep.domains or None) if per_domain else None)
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
