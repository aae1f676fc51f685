"""Where the one training loop runs: what the Trainer (models/train.py) asks of its process —
its rank and world size, its data, where reports and checkpoints go, the checkpoint it resumes
from. Two runtimes:

* ``RayTrainRuntime``: a Ray Train worker (``TorchTrainer``; every pretraining run and
  multi-worker trials). Data are the Ray Datasets the launcher gave the run, reports and
  checkpoints go through ``ray.train.report`` (Ray persists and registers them; a restarted
  worker group resumes from the newest one). Rank 0 waits until Ray Train has registered a
  reported checkpoint before training on: ``report`` only queues it for the controller, which
  polls every ~2 s, and a driver killed meanwhile would resume from the one before, losing
  more than one checkpoint interval.
* ``LocalRuntime``: the calling process itself (a 1-worker specialization trial, inside its
  Ray Tune trial's actor). Nothing is started: no worker group, no Ray Data executor. Its data
  are rows already in memory (models/data.py ``load_rows``, cached per process, so a Tune
  actor reused for the next trial of the same domain reads nothing), and it keeps no resumable
  checkpoint: its final report writes only what the caller publishes (the served model and
  the costs), and a trial that crashes is re-run whole, as trials always were (they checkpoint
  only at the end). Reports go to a callback (a Tune trial forwards evaluations to
  ``ray.tune.report``, so ASHA sees them).

Why not Ray Train's own local mode (``ScalingConfig(num_workers=0)``, ray/train/v2/_internal/
execution/local_mode): its ``report`` keeps the last metrics and checkpoint *object* in memory
(no storage, no callbacks such as Tune's), and its ``get_dataset_shard`` hands back the Ray
Dataset itself, so every trial would still start a Ray Data executor per dataset.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from slm.errors import StageError
from slm.stage import copy_dir, join

from . import checkpoint as ckpt
from .data import train_stream_name

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class RayTrainRuntime:
    """The Trainer inside a Ray Train worker of a ``TorchTrainer``."""

    resumable = True  # Ray Train registers the reported checkpoints and hands back the newest
    register_timeout_s = 600.0  # then warn and train on (a controller that slow is stuck anyway)

    def __init__(self, run_uri: str):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_uri = run_uri  # Ray Train's storage of the run: where its record lives

    def train_windows(self, rows: int) -> Iterator[Batch]:
        shard = ray.train.get_dataset_shard(train_stream_name(self.rank))
        return shard.iter_torch_batches(batch_size=rows, prefetch_batches=1, drop_last=False)

    def eval_batches(self, name: str, rows: int) -> Iterator[Batch]:
        return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=rows, drop_last=False)

    def checkpoint(self):
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None,
               dir_name: str | None = None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=dir_name)
            if self.rank == 0 and dir_name:  # the others wait for rank 0 at the next all-reduce
                self.wait_registered(dir_name)

    def wait_registered(self, dir_name: str) -> None:
        """Until Ray Train's record of the run (checkpoint.registered) names ``dir_name``."""
        want = join(self.run_uri, dir_name)
        deadline = time.monotonic() + self.register_timeout_s
        while want not in _registered(self.run_uri):
            if time.monotonic() > deadline:
                log.warning("checkpoint '%s' is not registered by Ray Train after %.0f s; training "
                            "on (a crash now resumes from an older one)", want, self.register_timeout_s)
                return
            time.sleep(0.1)


def _registered(run_uri: str) -> list[str]:
    try:
        return ckpt.registered(run_uri)
    except StageError:  # the record caught mid-write: read it again
        return []


class LocalRuntime:
    """The Trainer in the calling process, world size 1, on in-memory rows (see the module
    docstring). ``sets``: {"train": rows, "valid": rows, "test": rows (optional)}, each a dict
    of numpy arrays (``input_ids`` int32 [n, seq_len], ``cluster``, ``read_bytes``).
    ``run_uri``: where the final report's export and costs are written (``<run_uri>/<step>``).
    ``on_report``: called with every report's metrics."""

    resumable = False  # the loop writes no optimizer/engine state: nothing would resume it

    def __init__(self, sets: dict[str, dict[str, np.ndarray]], run_uri: str,
                 on_report: Callable[[dict[str, Any]], None] | None = None):
        self.rank, self.world = 0, 1
        self.sets, self.run_uri, self.on_report = sets, run_uri, on_report
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: str | None = None

    def train_windows(self, rows: int) -> Iterator[Batch]:
        return _slices(self.sets["train"], rows)

    def eval_batches(self, name: str, rows: int) -> Iterator[Batch]:
        return _slices(self.sets[name], rows)

    def checkpoint(self):
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None,
               dir_name: str | None = None) -> None:
        self.last_metrics = dict(metrics)
        if checkpoint_dir is not None:
            uri = join(self.run_uri, dir_name or "checkpoint")
            _replace_dir(checkpoint_dir, uri)
            self.last_checkpoint = uri
        if self.on_report is not None:
            self.on_report(metrics)


def _slices(rows: dict[str, np.ndarray], n: int) -> Iterator[Batch]:
    """Consecutive slices of ``n`` rows (the last one shorter) as torch tensors (no copy)."""
    total = len(rows["input_ids"])
    for lo in range(0, total, max(n, 1)):
        yield {k: torch.from_numpy(v[lo:lo + n]) for k, v in rows.items()}


def _replace_dir(src: str, uri: str) -> None:
    """Copy a local directory to ``uri`` (local path or URI), replacing what the same run
    wrote there before (a re-run trial's earlier attempt)."""
    if "://" not in uri:
        shutil.rmtree(uri, ignore_errors=True)
        os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
        shutil.copytree(src, uri)
    else:
        copy_dir(src, uri)


def local_process_group() -> None:
    """A torch.distributed group of one (this process) for DeepSpeed, which needs one even
    alone: made once per process (a Tune actor reused for many trials keeps it), with an
    in-memory store (no port)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("a local training run needs a process of its own; this one is "
                               f"rank {dist.get_rank()} of a group of {dist.get_world_size()}")
        return
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)  # DeepSpeed's launcher checks read these
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def assigned_threads() -> int | None:
    """The CPUs Ray assigned to this process (a Tune trial actor), or None outside Ray's
    workers: a local run uses that many torch threads, like a Train worker of that size."""
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return None
    cpus = ctx.get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None

