"""Early stopping of sweep trials that compares like with like (``sweep.asha``).

Ray Tune's ASHA ranks every trial of an experiment at each rung. A sweep grid mixes trials that
must not be ranked against each other: another method, domain, domain size, budget (another LR
schedule) or pretraining level has another loss curve by design, so plain ASHA would stop, say,
every SLM-nopt trial because SLM trials are lower at the same step. ``GroupedASHA`` keeps one
ASHA per group of like trials (``like_key``: the trial's grid point without its seed and LR),
so only the trials that differ by what the sweep searches over (LRs, seeds) compete.

Time is in optimizer steps (``time_attr="step"``, reported with every evaluation), the unit of
``max_t`` (the largest budget) and of the grace period (``asha_grace`` evaluations x
``specialize.eval_every`` steps).
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler


def like_key(config: dict[str, Any]) -> tuple:
    """The group a sweep trial is ranked in: its grid point (tune/grid.py ``Trial``) without
    the seeds (fine-tuning and pretraining, like replicates) and the LR."""
    t = config.get("trial", {})
    return (t.get("domain"), t.get("method"), t.get("domain_tokens"), t.get("budget_steps"),
            float(t.get("level", 1.0)))


class GroupedASHA(FIFOScheduler):
    """One ``ASHAScheduler`` (built with ``asha_kwargs``) per ``like_key`` group; every event
    of a trial goes to its group's scheduler."""

    def __init__(self, **asha_kwargs: Any):
        super().__init__()
        self._kwargs = asha_kwargs
        self._groups: dict[tuple, ASHAScheduler] = {}
        self._of: dict[str, ASHAScheduler] = {}  # trial id -> its group's scheduler

    def group(self, trial) -> ASHAScheduler:
        key = like_key(trial.config)
        if key not in self._groups:
            self._groups[key] = ASHAScheduler(**self._kwargs)
        return self._groups[key]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of[trial.trial_id] = asha = self.group(trial)
        asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self._of.get(trial.trial_id)
        return asha.on_trial_result(tune_controller, trial, result) if asha else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        asha = self._of.pop(trial.trial_id, None)
        if asha is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self._of.pop(trial.trial_id, None)
        if asha is not None:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"GroupedASHA: {len(self._groups)} groups of like trials"
