"""One fine-tuning run of specialization, on the one training loop (models/train.py).

The loop is the same as pretraining's; specialization only sets its optional keys:
``init_from`` (start from a pretrained HF directory), ``patience`` (early stopping on the
domain valid split; the exported model is the best-valid one) and ``kd_teacher`` /
``kd_weight`` / ``kd_temperature`` (SLM-d). It runs as a Ray Train ``TorchTrainer`` with one
worker (Train-in-Tune inside a sweep trial: the worker holds the trial's CPUs/GPU).
"""

from __future__ import annotations

import json
import os
from typing import Any


# The loop keys only specialization sets (models/train.py documents them).
_SPEC_KEYS = ("init_from", "patience", "kd_teacher", "kd_weight", "kd_temperature")

# Specialization checkpoints only at the end: the run is short, and the best model is kept in
# memory by the loop; a crashed trial is re-run as a whole.
_NO_MID_CHECKPOINTS = 10**9


def loop_config(recipe, init_dir: str, *, steps: int, lr: float, seed: int, teacher: str,
                run_name: str, run_uri: str, kd: bool) -> dict[str, Any]:
    """The loop's config for a specialization run (same keys as pretraining + the optional
    specialization keys)."""
    from dataclasses import asdict

    from slm.models.families import FamilySpec

    with open(os.path.join(init_dir, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    size = _size_of(hf)
    spec = recipe.specialize
    train = asdict(recipe.pretrain.train)
    train.update({"micro_batch": spec.micro_batch, "grad_accum": 1, "lr": lr,
                  "warmup": spec.warmup, "clip": spec.clip, "eval_every": spec.eval_every,
                  "ckpt_every": _NO_MID_CHECKPOINTS, "weight_decay": 0.0,
                  "log_every": max(spec.eval_every, 1),
                  # one worker: ZeRO-3 partitioning buys nothing, and the loop keeps the
                  # best-valid weights by copying the (unpartitioned) module state
                  "zero_stage": min(int(train["zero_stage"]), 2)})
    family = FamilySpec(family="slm", size=size, vocab_size=int(hf["vocab_size"]),
                        seq_len=recipe.data.seq_len)
    return {
        "family": family.to_dict(), "train": train, "steps": int(steps), "seed": int(seed),
        "data": run_name, "run_name": run_name, "run_uri": run_uri, "logger": "none",
        "init_from": init_dir, "patience": spec.patience,
        "kd_teacher": teacher if kd else "", "kd_weight": spec.kd_weight if kd else 0.0,
        "kd_temperature": spec.kd_temperature,
    }


def _size_of(hf: dict[str, Any]) -> tuple[int, int, int, int]:
    """The (layers, d_model, heads, d_ff) of a saved GPT-2 config (any preset, or a pn expert)."""
    d = int(hf["n_embd"])
    return (int(hf["n_layer"]), d, int(hf["n_head"]), int(hf.get("n_inner") or 4 * d))


def fine_tune(recipe, init_dir: str, sets: dict[str, str], *, steps: int, lr: float, seed: int,
              teacher: str, workdir: str, name: str, in_tune: bool = False) -> dict[str, Any]:
    """Fine-tune the HF model in ``init_dir`` on the shard set ``sets['train']`` with early
    stopping on ``sets['valid']`` (set names, see slm.layout). Returns {model_dir (local HF dir
    of the best-valid model), valid_loss, best_step, steps_run, flops, device_seconds, history}.
    The run goes through pretraining's ``run_training`` (the same TorchTrainer set-up)."""
    from slm.layout import RunLayout
    from slm.models.pretrain import RunSpec, open_shards, run_training, shard_dataset, valid_dataset
    from slm.models.train import COSTS_FILE, EXPORT_DIR
    from slm.pipeline.artifacts import count_rows
    from slm.stage import filesystem, join, read_json

    os.makedirs(workdir, exist_ok=True)
    storage = os.path.join(workdir, "ray")
    config = loop_config(recipe, init_dir, steps=steps, lr=lr, seed=seed, teacher=teacher,
                         run_name=name, run_uri=os.path.join(storage, name), kd=bool(teacher))
    sw = recipe.sweep
    extra = {k: config[k] for k in _SPEC_KEYS}
    spec = RunSpec(name=name, storage=storage, family=config["family"], train=config["train"],
                   scaling={"num_workers": 1, "use_gpu": sw.gpus_per_trial > 0,
                            "cpus_per_worker": sw.cpus_per_trial, "max_failures": 0},
                   steps=int(steps), seed=int(seed), data=name, logger="none", extra=extra)
    layout = RunLayout(recipe.run_dir)
    where = f"recipe '{recipe.name}'"
    train_sh = open_shards(layout, sets["train"], where, [], recipe.data.seq_len)
    valid_sh = open_shards(layout, sets["valid"], where, [], recipe.data.seq_len)
    kw = dict(seed=int(seed), split="all", fraction=recipe.pretrain.valid_fraction)
    gb = spec.global_batch()
    rows = recipe.specialize.eval_batches * gb or count_rows(valid_sh.uri)
    valid = valid_dataset(shard_dataset(valid_sh, **kw), rows, f"'{valid_sh.uri}'")
    callbacks = []
    if in_tune:  # forward every evaluation to the Tune trial (progress, ASHA)
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    out = run_training(spec, shard_dataset(train_sh, **kw), valid, callbacks=callbacks)
    ck = out["checkpoint"]
    local = os.path.join(workdir, "best")
    import pyarrow.fs as pafs

    fs, src = filesystem(join(ck, EXPORT_DIR))
    os.makedirs(local, exist_ok=True)  # pyarrow copies a directory's files, not the directory
    pafs.copy_files(src, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    costs = read_json(join(ck, COSTS_FILE))
    m = out["metrics"]
    return {"model_dir": local, "valid_loss": float(m["valid/best_loss"]),
            "best_step": int(m["valid/best_step"]), "steps_run": int(m["step"]),
            "flops": float(costs["flops"]), "device_seconds": float(costs["device_seconds"]),
            "history": costs.get("valid_history", [])}
