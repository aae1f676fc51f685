"""Early stopping that ranks like trials only (tune/schedulers.py), driven with Tune's own
Trial objects and results, as Tune's controller would (no trial runs: fast)."""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from slm.tune.schedulers import GroupedASHA, like_key

KW = dict(time_attr="step", metric="valid/loss", mode="min", grace_period=4, max_t=16, reduction_factor=2,
          stop_last_trials=False)  # as tune/sweep.py builds it


def _trial(method: str, lr: float, level: float = 1.0) -> Trial:
    point = {"domain": "a", "method": method, "budget_steps": 16, "domain_tokens": 1024, "seed": 0,
             "lr": lr, "level": level}
    return Trial("trainable", config={"trial": point}, stub=True)


def _results(scheduler, trials_losses: list[tuple[Trial, float]], step: int = 4) -> list[str]:
    for t, _ in trials_losses:
        scheduler.on_trial_add(None, t)
    return [scheduler.on_trial_result(None, t, {"step": step, "valid/loss": loss}) for t, loss in trials_losses]


def test_plain_asha_stops_a_method_for_being_another_method():
    """Why the grouping: SLM-nopt is far above SLM at the first rung by design."""
    slm, nopt = _trial("slm", 1e-3), _trial("nopt", 1e-3)
    assert _results(ASHAScheduler(**KW), [(slm, 3.0), (nopt, 7.0)]) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_grouped_asha_ranks_only_like_trials():
    slm, nopt, half = _trial("slm", 1e-3), _trial("nopt", 1e-3), _trial("slm", 1e-3, level=0.5)
    slm_bad_lr = _trial("slm", 1.0)
    got = _results(GroupedASHA(**KW), [(slm, 3.0), (nopt, 7.0), (half, 4.0), (slm_bad_lr, 9.0)])
    # another method or pretraining level is its own group; a worse LR of the same point stops
    assert got == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert like_key(slm.config) == like_key(slm_bad_lr.config) != like_key(half.config)


def test_time_is_in_steps_and_a_trial_is_never_stopped_at_its_last_step():
    """Rungs are in optimizer steps (a report at step 2 is before the grace period of 4); a
    trial reaching max_t (the largest budget) is not stopped: that report is its last one, and
    stopping it there would stop it before it publishes its model."""
    s = GroupedASHA(**KW)
    t = _trial("slm", 1e-3)
    s.on_trial_add(None, t)
    assert s.on_trial_result(None, t, {"step": 2, "valid/loss": 5.0}) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, t, {"step": 16, "valid/loss": 4.0}) == TrialScheduler.CONTINUE
    s.on_trial_complete(None, t, {"step": 16, "valid/loss": 4.0})
