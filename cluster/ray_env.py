"""Where work runs: an embedded local Ray (default) or an existing cluster.

``ray_session(cfg)`` is the one entry every command uses. With no address (and no RAY_ADDRESS)
it starts a local Ray sized to this machine and stops it on exit; with an address it connects
(token authentication is Ray's: RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token) and
leaves the cluster running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Iterator

import ray
import ray.data

from slm.cluster.config import SPOT_RESOURCE, ClusterConfig
from slm.errors import SlmError

log = logging.getLogger(__name__)

# Environment every Ray worker gets: no hub look-ups where no hub is reachable (a sentence-
# transformers model given by name then resolves to a local copy, see pipeline/embed.py), quiet
# tokenizer threads inside forked workers, and Ray Train's controller polling its worker group
# every 0.5 s instead of 2 s: each training run (a pretraining, every sweep trial) waits on
# that poll to start and to finish; measured here 3-4 s less per run of a trivial TorchTrainer
# (about 17 s -> 14 s), for one cheap status call per poll.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# set by the user, these win over WORKER_ENV
_PASS_THROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "SLM_CACHE_DIR",
                 "OMP_NUM_THREADS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")


# Resources of a Tune trial that only drives a TorchTrainer (a sweep's trial, an SLM-mix expert):
# its Train workers hold the CPUs/GPUs. Memory, not a CPU fraction: Tune refuses an all-zero
# bundle, and a token 0.01 CPU leaves a fractional CPU free, where no 1-CPU Ray Data task feeding
# the trial's workers can ever be scheduled (seen: the Train worker waited for its first batch
# forever on a 2-CPU machine).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}

# Ray Data's DataSourceV2 parquet reader (the default since Ray 2.5x) starts a pool of 32
# footer-reader actors for every read_parquet: on small shards and few cores that start-up is
# most of the read (bench here: 2.7 s vs 0.32 s per read of a 2-file shard set). The classic
# reader is used unless ClusterConfig.parquet_reader_v2 (or the variable, set by the user).
_PARQUET_V2_VAR = "RAY_DATA_USE_DATASOURCE_V2"


def parquet_v2(cfg: ClusterConfig) -> bool:
    if _PARQUET_V2_VAR in os.environ:
        return os.environ[_PARQUET_V2_VAR].strip().lower() in ("1", "true", "yes")
    return cfg.parquet_reader_v2


def worker_env(cfg: ClusterConfig | None = None) -> dict[str, str]:
    env = dict(WORKER_ENV)
    # every process that builds a Dataset (Tune trials, Train workers) reads the same way
    env[_PARQUET_V2_VAR] = "1" if parquet_v2(cfg or ClusterConfig()) else "0"
    if not progress_bars():
        # Datasets built in workers (a sweep trial's streams, its Train workers') start from
        # Ray Data's defaults, not from this driver's DataContext: without this they drew bars
        # into the log (~1,000 redrawn lines in one demo sweep)
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
    # Inside a Ray job (`slm submit`) ray.init refuses env vars the job's runtime env already
    # sets; the job's values win there.
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    return env


PROGRESS_BARS_VAR = "SLM_PROGRESS_BARS"  # 1/0: force Ray Data's progress bars on/off


def progress_bars() -> bool:
    """Ray Data's progress bars only on a terminal. In a log (no TTY: `slm submit`, CI, nohup)
    they are escape sequences, Ray re-prints every worker line printed under them (each
    training progress line came out twice) and the driver logs a progress table every 10 s;
    there each dataset logs one "execution finished in N s" line instead."""
    forced = os.environ.get(PROGRESS_BARS_VAR, "").strip().lower()
    if forced:
        return forced in ("1", "true", "yes")
    return sys.stdout.isatty()


def configure_data_context(cfg: ClusterConfig | None = None) -> None:
    """Ray Data settings we rely on: deterministic order (seeded pipelines give the same
    artifacts), progress bars on a terminal only (``progress_bars``; the context travels with
    each dataset to the workers that run it), and the parquet reader of ``cfg`` (see
    parquet_v2)."""
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = parquet_v2(cfg or ClusterConfig())
    ctx.execution_options.preserve_order = True
    # The pipeline's shuffles (the train subsets' sort, the per-cluster packing's groupby and
    # sort) on Ray Data's task-based pull shuffle: the default (SHUFFLE_V2) starts aggregator
    # actors per shuffle, which cost 12-13 s a packing stage against 1.2-4 s here on the tiny
    # pipeline of tests/test_pipeline_run.py (2 cores; its whole pipeline: 117 s -> 71 s)
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    bars = progress_bars()
    ctx.enable_operator_progress_bars = bars
    ctx.enable_progress_bars = bars


@contextlib.contextmanager
def ray_session(cfg: ClusterConfig | None = None) -> Iterator[None]:
    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        configure_data_context(cfg)
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": worker_env(cfg)}
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # no dashboard, so no State API: silence what polls it (slm.cluster.worker_setup)
            runtime_env["worker_process_setup_hook"] = "slm.cluster.worker_setup.quiet_state_api_pollers"
            ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False,
                     runtime_env=runtime_env, log_to_driver=True,
                     logging_level=logging.WARNING)
    except ConnectionError as e:
        raise SlmError(f"cannot connect to the Ray cluster at '{address}': {e}. Check "
                       "--cluster.address / RAY_ADDRESS, and RAY_AUTH_TOKEN if the cluster "
                       "uses token authentication") from None
    configure_data_context(cfg)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def warn_without_spot(what: str, field: str) -> None:
    """``what`` asks for spot nodes (the ``spot`` resource): say so when none is up, since it
    then waits until the autoscaler starts one (and forever on a cluster without spot types)."""
    if ray.cluster_resources().get(SPOT_RESOURCE, 0) <= 0:
        log.warning("%s asks for spot nodes (%s) and none is up now: it waits for the autoscaler "
                    "to start one (gpu-spot in cluster/launcher, cluster/kuberay); on a cluster "
                    "without spot node types unset %s", what, field, field)
