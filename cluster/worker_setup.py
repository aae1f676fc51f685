"""Setup hook of every worker process of the embedded Ray session (``ray_env.ray_session``).

Kept apart from ``ray_env`` so that a worker's start imports only ``logging`` here, not Ray Data.

Ray Train V2 starts, per run, a PlacementGroupCleaner actor that asks the State API every second
whether the run's controller still lives. The State API is a dashboard service, which the
embedded session does not start: every query failed and logged a warning, one a second of
training (181 of the 1,570 lines README command 1 printed). The cleaner only acts when a
controller dies while its driver lives on; in the embedded session it never could.
"""

from __future__ import annotations

import logging

_STATE_API_POLLERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_pollers() -> None:
    """Only errors from the loggers of what polls the State API."""
    for name in _STATE_API_POLLERS:
        logging.getLogger(name).setLevel(logging.ERROR)
