"""One fine-tuning run of specialization, on the one training loop (models/train.py) through the
same launcher as pretraining (models/launch.py).

The loop config differs from pretraining's only in values: ``init_from`` (start from a
pretrained HF directory), ``patience`` (early stopping on the domain valid split; the exported
model is the best-valid one) and, for SLM-d, ``distillation`` (the teacher and the KD loss). It
runs as a Ray Train ``TorchTrainer`` with one worker (Train-in-Tune inside a sweep trial: the
worker holds the trial's CPUs/GPU).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs as pafs
from ray.tune.integration.ray_train import TuneReportCallback

from slm.layout import RunLayout
from slm.models.config import ScalingConfig
from slm.models.data import open_shards, shard_dataset, valid_dataset
from slm.models.families import FamilySpec
from slm.models.launch import RunSpec, export_of, run_training
from slm.models.loop_config import (CheckpointSection, DataSection, DistillationSection, EngineSection,
                                    LoggingSection, OptimSection, ScheduleSection, TrainLoopConfig)
from slm.pipeline.artifacts import count_rows
from slm.stage import filesystem

# Specialization checkpoints only at the end: the run is short, and the best model is kept in
# memory by the loop; a crashed trial is re-run as a whole.
_NO_MID_CHECKPOINTS = 10**9


def loop_config(recipe, init_dir: str, *, steps: int, lr: float, seed: int, teacher: str,
                run_name: str, storage: str) -> TrainLoopConfig:
    """The loop's config for a specialization run: the pretraining settings the recipe keeps
    (``pretrain.train``), the specialization ones (``specialize``), and the model of ``init_dir``."""
    with open(os.path.join(init_dir, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    t, spec = recipe.pretrain.train, recipe.specialize
    return TrainLoopConfig(
        model=FamilySpec(family="slm", size=_size_of(hf), vocab_size=int(hf["vocab_size"]),
                         seq_len=recipe.data.seq_len),
        seed=int(seed),
        data=DataSection(name=run_name, micro_batch=spec.micro_batch, grad_accum=1,
                         shuffle_window=t.shuffle_window),
        optim=OptimSection(lr=lr, weight_decay=0.0, clip=spec.clip, warmup=spec.warmup,
                           min_lr_ratio=t.min_lr_ratio),
        schedule=ScheduleSection(steps=int(steps), eval_every=spec.eval_every,
                                 ckpt_every=_NO_MID_CHECKPOINTS, log_every=max(spec.eval_every, 1)),
        # one worker: ZeRO-3 partitioning buys nothing, and the loop keeps the best-valid
        # weights by copying the (unpartitioned) module state
        engine=EngineSection(precision=t.precision, zero_stage=min(int(t.zero_stage), 2)),
        checkpointing=CheckpointSection(keep=t.keep_checkpoints),
        logging=LoggingSection(run_name=run_name, storage=storage, logger="none"),
        init_from=init_dir, patience=spec.patience,
        distillation=DistillationSection(teacher=teacher, weight=spec.kd_weight,
                                         temperature=spec.kd_temperature) if teacher else None)


def _size_of(hf: dict[str, Any]) -> tuple[int, int, int, int]:
    """The (layers, d_model, heads, d_ff) of a saved GPT-2 config (any preset, or a pn expert)."""
    d = int(hf["n_embd"])
    return (int(hf["n_layer"]), d, int(hf["n_head"]), int(hf.get("n_inner") or 4 * d))


def fine_tune(recipe, init_dir: str, sets: dict[str, str], *, steps: int, lr: float, seed: int,
              teacher: str, workdir: str, name: str, in_tune: bool = False) -> dict[str, Any]:
    """Fine-tune the HF model in ``init_dir`` on the shard set ``sets['train']`` with early
    stopping on ``sets['valid']`` (set names, see slm.layout); with a ``teacher`` (a local HF
    directory), by distillation. Returns {model_dir (local HF dir of the best-valid model),
    valid_loss, best_step, steps_run, flops, device_seconds, history}."""
    os.makedirs(workdir, exist_ok=True)
    sw = recipe.sweep
    loop = loop_config(recipe, init_dir, steps=steps, lr=lr, seed=seed, teacher=teacher,
                       run_name=name, storage=os.path.join(workdir, "ray"))
    spec = RunSpec(loop, ScalingConfig(num_workers=1, use_gpu=sw.gpus_per_trial > 0,
                                       cpus_per_worker=sw.cpus_per_trial, max_failures=0))
    layout = RunLayout(recipe.run_dir)
    train_sh, valid_sh = (open_shards(layout, sets[s], recipe.name, [], recipe.data.seq_len)
                          for s in ("train", "valid"))
    kw = dict(seed=int(seed), split="all", fraction=recipe.pretrain.valid_fraction)
    rows = recipe.specialize.eval_batches * spec.global_batch() or count_rows(valid_sh.uri)
    valid = valid_dataset(shard_dataset(valid_sh, **kw), rows, f"'{valid_sh.uri}'")
    # in a sweep trial, every evaluation goes on to the Tune trial (progress, ASHA)
    callbacks = [TuneReportCallback()] if in_tune else []
    out = run_training(spec, shard_dataset(train_sh, **kw), valid, callbacks=callbacks)
    export, costs = export_of(out["checkpoint"])
    local = os.path.join(workdir, "best")
    fs, src = filesystem(export)
    os.makedirs(local, exist_ok=True)  # pyarrow copies a directory's files, not the directory
    pafs.copy_files(src, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    m = out["metrics"]
    return {"model_dir": local, "valid_loss": float(m["valid/best_loss"]),
            "best_step": int(m["valid/best_step"]), "steps_run": int(m["step"]),
            "flops": float(costs["flops"]), "device_seconds": float(costs["device_seconds"]),
            "history": costs.get("valid_history", [])}
