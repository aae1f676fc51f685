"""The launcher of one training run, shared by pretraining (models/pretrain.py) and
specialization (tune/finetune.py): a Ray Train ``TorchTrainer`` running the Trainer
(models/train.py) with deterministic name and storage, so a re-submitted run resumes; and the
publication of a finished run's model and costs. Each worker reads only its part of the train
rows (models/data.py explains the plan; models/train.py the order).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray.train
import torch
from ray.train.torch import TorchTrainer

from slm.cluster.config import spot_resources
from slm.errors import StageError, reraise_user_error
from slm.layout import RunLayout
from slm.stage import exists, filesystem, is_remote, join, manifest, publish, read_json, write_json

from . import checkpoint as ckpt
from .config import ScalingConfig
from .data import ShardPlan, local_train_rows, train_stream_name
from .families import build_family
from .hooks import level_export_uri
from .loop_config import TrainLoopConfig
from .runtime import LocalRuntime, assigned_threads, local_process_group
from .train import Trainer, signature, train_loop_per_worker

log = logging.getLogger(__name__)


def worker_resources(spec: "RunSpec") -> dict[str, float]:
    """What each Ray Train worker of a run holds: its CPUs, one GPU with use_gpu, and a sliver
    of the ``spot`` resource when the run goes to spot nodes."""
    sc = spec.scaling
    return ({"CPU": sc.cpus_per_worker} | ({"GPU": 1} if sc.use_gpu else {})
            | spot_resources(spec.spot))


@dataclass
class RunSpec:
    """One training run: the loop's config (which also names the run and its storage) and
    Ray Train's scaling."""

    loop: TrainLoopConfig
    scaling: ScalingConfig
    spot: bool = False  # workers ask for the `spot` resource (cluster.config.spot_resources)

    @property
    def name(self) -> str:
        return self.loop.logging.run_name

    @property
    def run_uri(self) -> str:
        return self.loop.logging.run_uri

    def precision(self) -> str:
        return self.loop.engine.resolved_precision(self.scaling.use_gpu)

    def global_batch(self) -> int:
        return self.loop.data.micro_batch * self.loop.data.grad_accum * self.scaling.num_workers


def check_resumable(spec: RunSpec) -> str | None:
    """Before starting workers: the checkpoint this run resumes from (the newest one Ray Train
    registered that is complete) must be of this model/config. Returns its URI (None: the run
    starts afresh); raises StageError when registered checkpoints exist but none is complete."""
    return _resume_point(spec)[0]


def _resume_point(spec: RunSpec) -> tuple[str | None, list[tuple[str, str]]]:
    """(checkpoint to resume from, the (URI, what is wrong) of newer torn ones)."""
    uri, record, torn = ckpt.newest_complete(spec.run_uri)
    if uri is None:
        if torn:
            raise StageError(f"{torn[0][1]}. No checkpoint of run '{spec.run_uri}' is complete: "
                             "delete the run's directory to start it over")
        return None, []
    expected = signature(spec.loop, build_family(spec.loop.model), spec.scaling.num_workers,
                         spec.precision())
    ckpt.check_signature(record["signature"], expected, uri)
    return uri, torn


def clear_foreign(spec: RunSpec) -> bool:
    """``--force``: when the run's checkpoints cannot be resumed by this config (another
    model/config, or none complete), forget them (``checkpoint.clear``) so that the run starts
    afresh; checkpoints of this very config are kept (an interrupted rebuild resumes). True when
    something was cleared."""
    try:
        check_resumable(spec)
        return False
    except StageError as e:
        gone = ckpt.clear(spec.run_uri)
        if gone:
            log.warning("run '%s': --force: starting afresh; removed its checkpoints of another "
                        "config (%s)", spec.name, str(e).split(". ")[0])
        return bool(gone)


def prepare_resume(spec: RunSpec) -> str | None:
    """``check_resumable``, then make Ray Train resume from that checkpoint: the newer torn
    ones (a crash during an upload, a lost file) are named in a warning and dropped from Ray's
    record (``checkpoint.unregister``), since Ray would hand them to the workers."""
    uri, torn = _resume_point(spec)
    for bad, why in torn:
        log.warning("run '%s': skipping torn checkpoint '%s' (%s); resuming from '%s'",
                    spec.name, bad, why, uri)
    if torn:
        ckpt.unregister(spec.run_uri, [bad for bad, _ in torn])
    return uri


def storage_path(storage: str) -> str:
    """A storage location as Ray wants it: a URI, or an absolute local path."""
    return storage if is_remote(storage) else os.path.abspath(storage)


def train_datasets(train: ShardPlan, valid_ds, world: int, test_ds=None) -> dict[str, Any]:
    """The datasets a TorchTrainer of ``world`` workers gets: each rank's own part of the train
    rows (``train_stream_name(r)``; models/data.py), the one materialized ``valid`` set and,
    for a run that evaluates its ``test`` set at the end, that one."""
    return ({train_stream_name(r): ds for r, ds in enumerate(train.rank_streams(world))}
            | {"valid": valid_ds} | ({"test": test_ds} if test_ds is not None else {}))


def data_config() -> ray.train.DataConfig:
    """Nothing is split by Ray (each rank iterates only its own train stream, and all of
    ``valid``), and every stream keeps its order (deterministic batches), whatever the
    DataContext of the process that launches the run (a Tune trial's, say)."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def run_training(spec: RunSpec, train: ShardPlan, valid_ds, callbacks: list | None = None,
                 test_ds=None) -> dict[str, Any]:
    """Run (or resume) one training run to its last step (or ``schedule.stop_at``) on the rows
    of the ``train`` plan (models/data.py ``shard_dataset``; cut here into one part per worker)
    and the materialized ``valid_ds`` (``valid_dataset``). Returns ``{"checkpoint": uri,
    "metrics": {...}, "finished": bool}``. ``callbacks``: Ray Train callbacks (a Tune trial
    passes TuneReportCallback to forward the reports)."""
    prepare_resume(spec)
    sc = spec.scaling
    resources = worker_resources(spec)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.loop.to_dict(),  # the worker rebuilds the typed config
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=storage_path(spec.loop.logging.storage),
            callbacks=callbacks or None,
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.loop.checkpointing.keep)),
        datasets=train_datasets(train, valid_ds, sc.num_workers, test_ds),
        dataset_config=data_config(),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        reraise_user_error(e)
        raise StageError(f"training run '{spec.run_uri}' failed: {e}") from e
    if result.return_value is not None:  # the run diverged (models/train.py Diverged)
        raise StageError(result.return_value)
    if result.checkpoint is None:
        raise StageError(f"training run '{spec.run_uri}' reported no checkpoint; check its logs")
    ck_uri = _checkpoint_uri(result.checkpoint, spec.loop.logging.storage)
    return {"checkpoint": ck_uri, "metrics": dict(result.metrics or {}),
            "finished": exists(join(ck_uri, ckpt.COSTS_FILE))}


def run_local(spec: RunSpec, train: ShardPlan, eval_rows: dict[str, dict[str, np.ndarray]],
              on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one training run of one worker in this process (models/runtime.py ``LocalRuntime``):
    a specialization trial inside its Tune trial's actor, which holds the trial's CPUs/GPU. No
    worker group and no Ray Data executor start; the rows are read in this process and cached
    (models/data.py ``load_rows``). ``eval_rows``: {"valid": rows, "test": rows (when the loop
    has ``test_at_end``)}. Returns what ``run_training`` returns; the final checkpoint holds
    only the export and the costs (a crashed local run is re-run whole)."""
    if spec.scaling.num_workers != 1:
        raise StageError(f"run '{spec.name}' has {spec.scaling.num_workers} workers; a local run has one")
    threads = assigned_threads()
    if threads:
        torch.set_num_threads(threads)
    local_process_group()
    runtime = LocalRuntime({"train": local_train_rows(train), **eval_rows}, spec.run_uri, on_report)
    diverged = Trainer(spec.loop, runtime).fit()
    if diverged is not None:
        raise StageError(diverged)
    if runtime.last_checkpoint is None:
        raise StageError(f"training run '{spec.run_uri}' reported no checkpoint")
    return {"checkpoint": runtime.last_checkpoint, "metrics": dict(runtime.last_metrics),
            "finished": exists(join(runtime.last_checkpoint, ckpt.COSTS_FILE))}


def _checkpoint_uri(checkpoint, storage: str) -> str:
    """A Ray Checkpoint's location as a URI our filesystem helpers take."""
    path = checkpoint.path
    if is_remote(storage):
        scheme = storage.split("://", 1)[0]
        return path if "://" in path else f"{scheme}://{path}"
    return path


def export_of(checkpoint_uri: str) -> tuple[str, dict[str, Any]]:
    """The final checkpoint's served model (URI) and costs."""
    return join(checkpoint_uri, ckpt.EXPORT_DIR), read_json(join(checkpoint_uri, ckpt.COSTS_FILE))


def publish_export(src_uri: str, dst: str, layout: RunLayout, *, stage: str,
                   config: dict[str, Any]) -> dict[str, Any]:
    """Copy the export a run wrote under ``src_uri`` (a checkpoint, or a level's export) to
    ``dst`` (atomic publish; its costs and the run-relative source in the manifest). Returns
    the costs."""
    export, costs = export_of(src_uri)
    src_fs, src = filesystem(export)
    with publish(dst, stage=stage, config=config, force=True) as out:
        pafs.copy_files(src, out.path, source_filesystem=src_fs, destination_filesystem=out.fs)
        out.manifest["costs"] = costs
        out.manifest["checkpoint"] = layout.relative(src_uri)
    return costs


def publish_final(checkpoint_uri: str, layout: RunLayout, family: str, sub: str = "", *,
                  stage: str, config: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """Publish the final checkpoint's export as the run's ``final/``, then write its
    ``costs.json``. Returns the costs."""
    costs = publish_export(checkpoint_uri, layout.pretrain_final(family, sub, seed), layout, stage=stage,
                           config=config)
    write_json(layout.pretrain_costs(family, sub, seed), costs)
    return costs


def publish_levels(run_uri: str, layout: RunLayout, family: str, sub: str, levels: dict[float, int], *,
                   stage: str, config: dict[str, Any], seed: int | None = None) -> dict[float, dict[str, Any]]:
    """Publish a finished run's models at its pretraining levels below 1 (``levels``: {level:
    step}; the worker exported each to ``<run_uri>/levels/step=<N>/``, models/hooks.py
    ``LevelExport``) as ``pretrain/<f>[/<sub>]/level-<x>/`` (in the pretraining ``seed``'s
    tree), each with its costs to that step in its manifest. Called before the final model is published, so a published ``final/``
    means every level is there. Returns {level: costs}."""
    out_costs = {}
    for level, step in sorted(levels.items()):
        if level >= 1.0:
            continue
        src = level_export_uri(run_uri, step)
        if not exists(join(src, ckpt.COSTS_FILE)):
            raise StageError(f"training run '{run_uri}' has no complete export at step {step} "
                             f"(level {level:g}): re-run the pretraining with --force to rebuild it")
        out_costs[level] = publish_export(src, layout.pretrain_level(family, sub, level, seed), layout, stage=stage,
                                          config={**config, "level": level, "level_step": step})
    return out_costs


def run_done(layout: RunLayout, family: str, sub: str = "", seed: int | None = None) -> bool:
    """A pretraining run with a published model and costs is not retrained."""
    return (manifest(layout.pretrain_final(family, sub, seed)) is not None
            and exists(layout.pretrain_costs(family, sub, seed)))
