"""One training run in this process on random tokens, with no data pipeline and no Ray: what
``bench/gpu_check.py`` measures throughput and memory with, and what the tests run the loop
with in process (models/runtime.py ``LocalRuntime`` on a 1-process group).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .families import FamilySpec
from .hooks import Hook
from .loop_config import (CheckpointSection, DataSection, DistillationSection, EngineSection,
                          LoggingSection, LoraSection, OptimSection, ScheduleSection, TrainLoopConfig)
from .runtime import LocalRuntime, local_process_group
from .train import Trainer


def random_rows(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``rows`` windows of uniform random token ids, in the shards' column layout."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, vocab, size=(rows, seq_len), dtype=np.int32),
            "read_bytes": np.full(rows, seq_len * 4, dtype=np.int64)}


def probe_config(model: FamilySpec, *, run_uri: str, steps: int, micro_batch: int, grad_accum: int = 1,
                 zero_stage: int = 1, precision: str = "auto", checkpointing: bool = False,
                 loss_chunk: int = 0, deepspeed: dict[str, Any] | None = None,
                 teacher: str = "", init_from: str = "", eval_every: int = 0,
                 lr: float = 1e-4, seed: int = 0, lora: LoraSection | None = None) -> TrainLoopConfig:
    """A loop config for ``steps`` steps without warm-up, evaluation only at the end (or every
    ``eval_every``), a checkpoint (the export) only at the end, no metric sink."""
    return TrainLoopConfig(
        model=model, seed=seed,
        data=DataSection(name="probe", micro_batch=micro_batch, grad_accum=grad_accum),
        optim=OptimSection(lr=lr, warmup=0, clip=1.0),
        schedule=ScheduleSection(steps=steps, eval_every=eval_every or steps, ckpt_every=10**9,
                                 log_every=10**9),
        engine=EngineSection(precision=precision, zero_stage=zero_stage,
                             activation_checkpointing=checkpointing, loss_chunk=loss_chunk,
                             deepspeed=dict(deepspeed or {})),
        checkpointing=CheckpointSection(keep=1),
        logging=LoggingSection(run_name="probe", storage=run_uri, logger="none"),
        init_from=init_from, lora=lora,
        distillation=DistillationSection(teacher=teacher) if teacher else None)


class StepRecorder(Hook):
    """Keeps every step's metrics (a probe's per-step throughput)."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        self.steps.append(dict(metrics))


def train_in_process(cfg: TrainLoopConfig, sets: dict[str, dict[str, np.ndarray]],
                     recorder: StepRecorder | None = None) -> tuple[Trainer, list[dict[str, Any]]]:
    """Run ``cfg`` in this process (world 1) on ``sets`` ({"train": rows, "valid": rows});
    returns the finished Trainer (its engine still holds the weights) and every report.
    A ``recorder`` sees every step's metrics."""
    local_process_group()
    reports: list[dict[str, Any]] = []
    runtime = LocalRuntime(sets, cfg.logging.run_uri, reports.append)
    trainer = Trainer(cfg, runtime)
    if recorder is not None:
        trainer.hooks.insert(-1, recorder)  # before the checkpoint hook, after every metric
    diverged = trainer.fit()
    if diverged is not None:
        raise RuntimeError(diverged)
    return trainer, reports
