"""Where work runs: an embedded local Ray (default) or an existing cluster.

``ray_session(cfg)`` is the one entry every command uses. With no address (and no RAY_ADDRESS)
it starts a local Ray sized to this machine and stops it on exit; with an address it connects
(token authentication is Ray's: RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token) and
leaves the cluster running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from slm.cluster.config import ClusterConfig
from slm.errors import SlmError

log = logging.getLogger(__name__)

# Environment every Ray worker gets: no hub look-ups where no hub is reachable (a sentence-
# transformers model given by name then resolves to a local copy, see pipeline/embed.py), and
# quiet tokenizer threads inside forked workers.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}
_PASS_THROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "SLM_CACHE_DIR",
                 "OMP_NUM_THREADS")


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
    # Inside a Ray job (`slm submit`) ray.init refuses env vars the job's runtime env already
    # sets; the job's values win there.
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        import json

        job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    return env


def configure_data_context() -> None:
    """Ray Data settings we rely on: deterministic order (seeded pipelines give the same
    artifacts), and operator progress bars also under `ray job` (off there by default)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_operator_progress_bars = True
    ctx.enable_progress_bars = True


@contextlib.contextmanager
def ray_session(cfg: ClusterConfig | None = None) -> Iterator[None]:
    import ray

    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        configure_data_context()
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": worker_env()}
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False,
                     runtime_env=runtime_env, log_to_driver=True,
                     logging_level=logging.WARNING)
    except ConnectionError as e:
        raise SlmError(f"cannot connect to the Ray cluster at '{address}': {e}. Check "
                       "--cluster.address / RAY_ADDRESS, and RAY_AUTH_TOKEN if the cluster "
                       "uses token authentication") from None
    configure_data_context()
    try:
        yield
    finally:
        ray.shutdown()


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
