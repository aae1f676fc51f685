"""One fine-tuning run of specialization, on the one training loop (models/train.py) through the
same launcher as pretraining (models/launch.py).

The loop config differs from pretraining's only in values: ``init_from`` (start from a
pretrained HF directory), ``patience`` (early stopping on the domain valid split; the exported
model is the best-valid one), ``test_at_end`` (the test loss of that model, measured where it
was trained), for SLM-d, ``distillation`` (the teacher and the KD loss) and, for a method the
recipe's ``specialize.lora`` lists, ``lora`` (adapters on the frozen starting model; the
published model is the merged plain one).

Where it runs (``sweep.trial_runtime``): ``local``, in the calling process — a sweep
trial's Tune actor, which holds the trial's CPUs/GPU and is reused for the next trial (Tune's
``reuse_actors``), so a trial starts no worker group and no Ray Data executor, and the domain's
rows, read once, stay in memory for the next trial of that domain (models/runtime.py).
``train``: as a Ray Train ``TorchTrainer`` of ``sweep.workers_per_trial`` workers
(Train-in-Tune), whose workers may run on other nodes:
its Ray Train storage and everything it reads (the starting model, the teacher) are on storage
every node reads (the trial's work directory, tune/grid.py ``trial_workdir``; the run's
artifacts), and workers read model directories through their node's cached copy (slm.stage
``local_dir``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from slm.errors import StageError
from slm.layout import RunLayout
from slm.models.config import ScalingConfig
from slm.models.data import local_eval_rows, open_shards, shard_dataset, valid_dataset
from slm.models.families import FamilySpec
from slm.models.launch import RunSpec, check_resumable, export_of, run_local, run_training, storage_path
from slm.models.loop_config import (CheckpointSection, DataSection, DistillationSection, EngineSection,
                                    LoggingSection, LoraSection, OptimSection, ScheduleSection,
                                    TrainLoopConfig)
from slm.pipeline.artifacts import count_rows
from slm.stage import copy_dir, fingerprint, input_fingerprints, join, manifest, publish, read_json, remove

from .config import LoraConfig

log = logging.getLogger(__name__)

# Specialization checkpoints only at the end: the run is short, and the best model is kept in
# memory by the loop; a crashed trial is re-run as a whole.
_NO_MID_CHECKPOINTS = 10**9


def data_fingerprint(layout: RunLayout, sets: dict[str, str], init_dir: str, teacher: str) -> str:
    """Content fingerprint of what a fine-tuning run is built from: the manifest fingerprints of
    its train/valid shard sets (keyed run-relative) and of its starting model and teacher (when
    they have a manifest), so its checkpoint is never resumed for changed data or models."""
    models = {role: (manifest(uri) or {}).get("fingerprint", "")
              for role, uri in (("init", init_dir), ("teacher", teacher)) if uri}
    shards = input_fingerprints(layout, *(layout.shards(sets[s]) for s in ("train", "valid")))
    return fingerprint({"shards": shards, **models})


def lora_section(lora: LoraConfig, method: str) -> LoraSection | None:
    """The loop's LoRA section for a trial of ``method``: the recipe's ``specialize.lora``
    when it lists the method, else None (every weight trains)."""
    if method not in lora.methods:
        return None
    return LoraSection(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                       target_modules=list(lora.target_modules))


def loop_config(recipe, init_dir: str, *, steps: int, lr: float, seed: int, teacher: str,
                run_name: str, storage: str, data_fingerprint: str = "",
                test_at_end: bool = False, lora: LoraSection | None = None) -> TrainLoopConfig:
    """The loop's config for a specialization run: the pretraining settings the recipe keeps
    (``pretrain.train``), the specialization ones (``specialize``; ``lora_section`` of the
    trial's method), and the model of ``init_dir`` (a local path or URI)."""
    hf = read_json(join(init_dir, "config.json"))
    t, spec = recipe.pretrain.train, recipe.specialize
    return TrainLoopConfig(
        model=FamilySpec(family="slm", size=_size_of(hf), vocab_size=int(hf["vocab_size"]),
                         seq_len=recipe.data.seq_len),
        seed=int(seed),
        data=DataSection(name=run_name, fingerprint=data_fingerprint, micro_batch=spec.micro_batch,
                         grad_accum=spec.grad_accum, shuffle_window=t.shuffle_window),
        optim=OptimSection(lr=lr, weight_decay=0.0, clip=spec.clip, warmup=spec.warmup,
                           min_lr_ratio=t.min_lr_ratio),
        schedule=ScheduleSection(steps=int(steps), eval_every=spec.eval_every,
                                 ckpt_every=_NO_MID_CHECKPOINTS, log_every=max(spec.eval_every, 1)),
        # one worker: ZeRO-3 partitioning buys nothing, and the loop keeps the best-valid
        # weights by copying the (unpartitioned) module state
        engine=EngineSection(precision=t.precision, zero_stage=min(t.zero_stage_of("slm"), 2),
                             activation_checkpointing=t.activation_checkpointing,
                             loss_chunk=t.loss_chunk, deepspeed=t.deepspeed_overrides()),
        checkpointing=CheckpointSection(keep=t.keep_checkpoints),
        # each trial's fine-tuning is one tracker run (the run's logger), grouped by its sweep;
        # TensorBoard events go beside the sweep's results, since a trial's work is removed
        logging=LoggingSection(run_name=run_name, storage=storage, logger=recipe.pretrain.logger,
                               group=f"{recipe.name}/{recipe.sweep.name}",
                               tensorboard=join(RunLayout(recipe.run_dir).sweep_tensorboard(
                                   recipe.sweep.name), run_name)),
        init_from=init_dir, patience=spec.patience, test_at_end=test_at_end, lora=lora,
        distillation=DistillationSection(teacher=teacher, weight=spec.kd_weight,
                                         temperature=spec.kd_temperature) if teacher else None)


def _size_of(hf: dict[str, Any]) -> tuple[int, int, int, int]:
    """The (layers, d_model, heads, d_ff) of a saved GPT-2 config (any preset, or a pn expert)."""
    d = int(hf["n_embd"])
    return (int(hf["n_layer"]), d, int(hf["n_head"]), int(hf.get("n_inner") or 4 * d))


def fine_tune(recipe, init_dir: str, sets: dict[str, str], *, steps: int, lr: float, seed: int,
              teacher: str, workdir: str, name: str, in_tune: bool = False,
              lora: LoraSection | None = None) -> dict[str, Any]:
    """Fine-tune the HF model in ``init_dir`` on the shard set ``sets['train']`` with early
    stopping on ``sets['valid']`` and, when ``sets`` names one, the loss of the best-valid model
    on ``sets['test']`` (set names, see slm.layout); with a ``teacher`` (an HF directory), by
    distillation; with ``lora``, by LoRA adapters (``lora_section``). ``init_dir``, ``teacher``
    and ``workdir`` are local paths or URIs on storage every node reads.

    With ``sweep.trial_runtime`` local, this process trains (a sweep trial's actor, which holds
    the trial's CPUs/GPU), on rows read here and kept for the next trial (models/launch.py
    ``run_local``). With ``train``, a Ray Train worker group of ``sweep.workers_per_trial``
    workers runs it; its storage
    is ``<workdir>/ray`` (a re-run resumes a finished run there, unless it is from another
    config or data: then it starts afresh). Returns {model_dir (``<workdir>/best``, the
    best-valid model, published), valid_loss, test_loss (NaN without a test set), best_step,
    steps_run, flops, trainable_params, device_seconds, eval_device_seconds, history, phases}:
    ``phases`` are this process's wall seconds by phase (data: planning and reading rows;
    start: model, engine and loop set-up; train; eval; publish)."""
    t0 = time.perf_counter()
    sw = recipe.sweep
    layout = RunLayout(recipe.run_dir)
    loop = loop_config(recipe, init_dir, steps=steps, lr=lr, seed=seed, teacher=teacher,
                       run_name=name, storage=storage_path(join(workdir, "ray")),
                       data_fingerprint=data_fingerprint(layout, sets, init_dir, teacher),
                       test_at_end="test" in sets, lora=lora)
    if sw.pid_dir:
        loop.pid_dir = os.path.join(sw.pid_dir, name)
    spec = RunSpec(loop, ScalingConfig(num_workers=sw.workers_per_trial, use_gpu=sw.gpus_per_trial > 0,
                                       cpus_per_worker=sw.cpus_per_trial, max_failures=0),
                   spot=sw.spot)
    try:
        check_resumable(spec)
    except StageError as e:  # the trial's own leftover work, from another config or data
        log.warning("discarding the trial's earlier work '%s': %s", spec.run_uri, e)
        remove(spec.run_uri)
    plans = {s: shard_dataset(open_shards(layout, sets[s], recipe.name, [], recipe.data.seq_len,
                                          vocab=loop.model.vocab_size),
                              seed=int(seed), split="all", fraction=recipe.pretrain.valid_fraction)
             for s in sets}
    rows = {"valid": recipe.specialize.eval_batches * spec.global_batch(), "test": 0}  # 0: all
    if sw.trial_runtime == "local":
        evals = {s: local_eval_rows(plans[s], rows[s], f"'{plans[s].shards.uri}'") for s in sets if s != "train"}
        t_data = time.perf_counter() - t0
        # in a sweep trial, every evaluation goes on to the Tune trial (progress, ASHA)
        out = run_local(spec, plans["train"], evals, on_report=ray.tune.report if in_tune else None)
    else:
        evals = {s: valid_dataset(plans[s], rows[s] or count_rows(plans[s].shards.uri), f"'{plans[s].shards.uri}'")
                 for s in sets if s != "train"}
        t_data = time.perf_counter() - t0
        out = run_training(spec, plans["train"], evals["valid"], test_ds=evals.get("test"),
                           callbacks=[TuneReportCallback()] if in_tune else [])
    t_run = time.perf_counter() - t0 - t_data
    export, costs = export_of(out["checkpoint"])
    # published with its costs (measured per attempt): a node's cached copy of an earlier
    # attempt's model (slm.stage local_dir) is never taken for this one
    best = join(workdir, "best")
    with publish(best, stage="fine-tune", config={"run": name, "costs": costs}, force=True) as st:
        copy_dir(export, st.uri)
    m = out["metrics"]
    train_s, eval_s = float(costs["device_seconds"]), float(costs.get("eval_device_seconds", 0.0))
    workers = spec.scaling.num_workers
    phases = {"data": t_data, "train": train_s / workers, "eval": eval_s / workers,
              "start": max(t_run - (train_s + eval_s) / workers - float(costs.get("checkpoint_seconds", 0.0)), 0.0),
              "publish": time.perf_counter() - t0 - t_data - t_run + float(costs.get("checkpoint_seconds", 0.0))}
    return {"model_dir": best, "valid_loss": float(m["valid/best_loss"]),
            "test_loss": float(costs.get("extra", {}).get("test_loss", m.get("test/loss", math.nan))),
            "best_step": int(m["valid/best_step"]), "steps_run": int(m["step"]),
            "flops": float(costs["flops"]), "trainable_params": int(costs["trainable_params"]),
            "device_seconds": train_s, "eval_device_seconds": eval_s,
            "history": costs.get("valid_history", []), "phases": phases}
