"""The Trainer's hooks (OLMo-core's callbacks): everything a training run does besides its
optimizer steps. The Trainer (models/train.py) calls, on each hook in list order:

  ``on_start(tr)``            before the first step of this attempt (not for a finished run)
  ``on_step(tr, metrics)``    after each optimizer step; a hook may add metrics, set
                              ``tr.stopping``, or report to Ray Train
  ``on_checkpoint(tr)``       while a checkpoint is being written, before it is reported
  ``on_end(tr)``              when the attempt ends (also for an already finished run)

and, separately, its loss hook (``FamilyLoss`` or ``Distillation``) on every micro-batch. Order
matters only where one hook reads what another wrote: costs, then evaluation, then early
stopping (reads valid/loss, restores the best weights at the end), then the test evaluation
(of those weights), then logging, then the checkpoint (reports what all the others produced).
Reports and checkpoints go through the Trainer's runtime (models/runtime.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from slm.stage import copy_dir, join, local_dir, write_json

from . import checkpoint as ckpt
from .flops import inference_flops_per_token
from .loop_config import DistillationSection, TrainLoopConfig
from .losses import kd_loss
from .metrics import MetricLogger, Progress


class Hook:
    """A no-op hook; subclasses override the events they care about. ``tr`` is the Trainer."""

    def on_start(self, tr) -> None:
        pass

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, tr) -> None:
        pass

    def on_end(self, tr) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Loss hooks: the training loss of a micro-batch and its model FLOPs
# --------------------------------------------------------------------------------------------

class FamilyLoss:
    """The family's own next-token loss."""

    def __init__(self, family):
        self.family = family

    def __call__(self, model, ids: torch.Tensor, cluster: torch.Tensor | None) -> torch.Tensor:
        return self.family.loss(model, ids, cluster)[0]

    def flops(self, ids: torch.Tensor, cluster: torch.Tensor | None) -> float:
        return self.family.micro_flops(ids, cluster)


class Distillation(FamilyLoss):
    """SLM-d: ``kd_loss`` against the teacher's next-token distributions (the teacher runs even
    at weight 0, and its forward FLOPs count as the run's). The teacher directory may be a URI:
    this worker reads it through its node's cached copy (slm.stage ``local_dir``). The teacher
    only runs forward: no gradients (``requires_grad_(False)``), and in bf16 on a GPU run in
    bf16 (half the memory of float32 weights and logits; the KD loss works in float32)."""

    def __init__(self, family, cfg: DistillationSection, device: torch.device, precision: str = "fp32"):
        super().__init__(family)
        self.cfg = cfg
        dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
        self.teacher = AutoModelForCausalLM.from_pretrained(
            local_dir(cfg.teacher, "teacher"), torch_dtype=dtype).to(device).eval().requires_grad_(False)
        self.teacher_flops_per_token = inference_flops_per_token(self.teacher.config, family.spec.seq_len)

    def __call__(self, model, ids: torch.Tensor, cluster: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids).logits
        return kd_loss(model(input_ids=ids).logits, teacher_logits, ids, self.cfg.weight,
                       self.cfg.temperature, self.family.loss_chunk)

    def flops(self, ids: torch.Tensor, cluster: torch.Tensor | None) -> float:
        return super().flops(ids, cluster) + self.teacher_flops_per_token * ids.numel()


# --------------------------------------------------------------------------------------------
# Step hooks
# --------------------------------------------------------------------------------------------

class CostMeter(Hook):
    """Meters each step (tokens, device seconds, model FLOPs) into the run's ``Costs``, which
    the checkpoint carries across restarts, and reports the running totals."""

    def on_start(self, tr) -> None:
        tr.costs.attempts += 1

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        c = tr.costs
        c.add_step(*tr.step_cost)
        # when the run trained (wall clock): which runs of a study overlapped
        c.extra.setdefault("first_step_at", time.time())
        c.extra["last_step_at"] = time.time()
        metrics.update({"cost/flops": c.flops, "cost/device_seconds": c.device_seconds,
                        "cost/tokens": float(c.tokens)})


class Evaluation(Hook):
    """Valid loss every ``every`` steps and at the last one (its device time metered apart)."""

    def __init__(self, every: int):
        self.every = every

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        if tr.step % self.every == 0 or tr.step == tr.total:
            t0 = time.perf_counter()
            metrics["valid/loss"] = tr.evaluate()
            tr.costs.eval_device_seconds += (time.perf_counter() - t0) * tr.world


class TestEvaluation(Hook):
    """At the run's end, the loss of the final (for early stopping: the restored best-valid)
    model on the ``test`` set, on the worker's device: ``test/loss`` in the final report and
    ``costs.extra["test_loss"]``; its device time counts as evaluation."""

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        if tr.final:
            t0 = time.perf_counter()
            metrics["test/loss"] = tr.costs.extra["test_loss"] = tr.evaluate("test")
            tr.costs.eval_device_seconds += (time.perf_counter() - t0) * tr.world


class EarlyStopping(Hook):
    """Stop after ``patience`` evaluations without a better valid loss. The best weights are
    kept (a CPU copy) and put back before the final checkpoint, so the exported model is the
    best-valid one; ``valid/best_loss`` / ``valid/best_step`` are reported with every evaluation,
    and the evaluations in ``costs.extra["valid_history"]``."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_loss, self.best_step, self.best_state, self.bad = math.inf, -1, None, 0
        self.history: list[list[float]] = []

    def on_start(self, tr) -> None:
        if tr.step == 0:  # the starting model is a candidate: fine-tuning may not help
            t0 = time.perf_counter()
            loss = tr.evaluate()
            tr.costs.eval_device_seconds += (time.perf_counter() - t0) * tr.world  # device work too
            self.track(tr, loss)

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        if "valid/loss" not in metrics:
            return
        tr.stopping = self.track(tr, metrics["valid/loss"])
        metrics.update({"valid/best_loss": self.best_loss, "valid/best_step": float(self.best_step)})
        if tr.final and self.best_state is not None:
            tr.engine.module.load_state_dict(self.best_state)

    def track(self, tr, valid_loss: float) -> bool:
        """Record an evaluation; True when patience ran out."""
        self.history.append([tr.step, valid_loss])
        if valid_loss < self.best_loss:
            self.best_loss, self.best_step, self.bad = valid_loss, tr.step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in tr.engine.module.state_dict().items()}
        else:
            self.bad += 1
        tr.costs.extra["valid_history"] = self.history
        return self.bad >= self.patience


class MetricLogging(Hook):
    """Rank 0: every step's metrics to the run's logger, and a console progress line."""

    def __init__(self, cfg: TrainLoopConfig, rank: int):
        lg = cfg.logging
        self.cfg = cfg
        self.logger = MetricLogger(lg.logger, lg.run_uri, lg.run_name, cfg.flat(),
                                   group=lg.group, tensorboard=lg.tensorboard) if rank == 0 else None
        self.progress: Progress | None = None

    def on_start(self, tr) -> None:
        s = self.cfg.schedule
        self.progress = Progress(self.cfg.logging.run_name, s.steps, tr.step, s.log_every)

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(metrics, tr.step)
            self.progress.maybe_print(tr.step, metrics)
            if "valid/loss" in metrics:  # a run stopped from outside (ASHA) keeps its evaluations
                self.logger.flush()

    def on_checkpoint(self, tr) -> None:
        if self.logger is not None:
            self.logger.flush()

    def on_end(self, tr) -> None:
        if self.logger is not None:
            self.logger.close()


class Checkpointer(Hook):
    """Every ``every`` steps, at ``stop_at`` and at the end: every rank saves its shards, then
    every rank reports (Ray Train's barrier). The final checkpoint also holds the export (the
    served model, gathered from its ZeRO-3 partitions when ``gather``) and the costs. With
    ``report_evaluations``, an evaluation between checkpoints is reported without one (a Tune
    scheduler such as ASHA sees every evaluation)."""

    def __init__(self, every: int, *, gather: bool, report_evaluations: bool):
        self.every, self.gather, self.report_evaluations = every, gather, report_evaluations

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        # a level's step is a checkpoint too (after LevelExport ran): a resumed run never
        # starts past a level whose export was cut short
        due = (tr.step % self.every == 0 or tr.step == tr.stop_at or tr.stopping
               or tr.step in tr.cfg.schedule.export_at)
        # a runtime that never resumes (a local 1-worker trial) checkpoints only the end: the
        # export and costs its caller publishes
        if due and (tr.runtime.resumable or tr.final):
            self.save(tr, {"step": tr.step, "epoch": tr.epoch, **metrics, "start_step": tr.start_step,
                           "attempts": tr.costs.attempts})
        elif self.report_evaluations and "valid/loss" in metrics:
            tr.runtime.report({"step": tr.step, **metrics})

    def save(self, tr, metrics: dict[str, float]) -> None:
        t0 = time.perf_counter()
        d = tempfile.mkdtemp(prefix=f"slm-ckpt-{tr.rank}-")
        try:
            if tr.runtime.resumable:  # the engine's state, for a restarted worker group
                ckpt.save(tr.engine, d, rank=tr.rank, world_size=tr.world, signature=tr.signature,
                          state=tr.state())
            if tr.final:
                self.export(tr, d)
            tr.call("on_checkpoint")
            tr.costs.checkpoint_seconds += time.perf_counter() - t0
            tr.runtime.report(metrics, checkpoint_dir=d, dir_name=ckpt.step_dir_name(tr.step))
            tr.last_checkpoint = join(tr.cfg.logging.run_uri, ckpt.step_dir_name(tr.step))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def export(self, tr, d: str) -> None:
        """Rank 0 adds the served model (HF dir) and the costs to the final checkpoint."""
        write_export(tr, d, gather=self.gather)


def write_export(tr, d: str, *, gather: bool) -> None:
    """Rank 0 writes the served model (HF dir, ``export/``) and the costs so far into the local
    directory ``d``; with ``gather`` (ZeRO-3) every rank takes part in gathering the weights."""

    def write() -> None:
        if tr.rank == 0:
            tr.family.export(tr.engine.module, os.path.join(d, ckpt.EXPORT_DIR))
            with open(os.path.join(d, ckpt.COSTS_FILE), "w") as f:
                json.dump(tr.costs.to_json(), f, indent=2, sort_keys=True)

    if gather:  # parameters are partitioned: gather them on every rank
        with deepspeed.zero.GatheredParameters(list(tr.engine.module.parameters()), modifier_rank=None):
            write()
    else:
        write()


class LevelExport(Hook):
    """At each step of ``schedule.export_at`` (the pretraining levels before the last step):
    the model and the costs so far, exported to ``<run>/levels/step=<N>/`` on the run's
    storage (costs.json written last: its presence says the export is whole). One pretraining
    run thus gives every level's model; the driver publishes them once the run has finished
    (models/launch.py ``publish_levels``). A run resumed from before a level exports it again
    (the same weights: data order and seeds are exact on resume)."""

    def __init__(self, steps: list[int], *, gather: bool):
        self.steps, self.gather = set(steps), gather

    def on_step(self, tr, metrics: dict[str, float]) -> None:
        if tr.step not in self.steps or tr.final:
            return
        t0 = time.perf_counter()
        d = tempfile.mkdtemp(prefix=f"slm-level-{tr.rank}-")
        try:
            write_export(tr, d, gather=self.gather)
            if tr.rank == 0:
                dst = level_export_uri(tr.cfg.logging.run_uri, tr.step)
                copy_dir(os.path.join(d, ckpt.EXPORT_DIR), join(dst, ckpt.EXPORT_DIR))
                write_json(join(dst, ckpt.COSTS_FILE), tr.costs.to_json())  # last: marks it whole
        finally:
            shutil.rmtree(d, ignore_errors=True)
        tr.costs.checkpoint_seconds += time.perf_counter() - t0


def level_export_uri(run_uri: str, step: int) -> str:
    """Where a run's model at ``step`` is exported (``LevelExport``)."""
    return join(run_uri, "levels", ckpt.step_dir_name(step))


def loss_hook(cfg: TrainLoopConfig, family, device: torch.device, precision: str = "fp32") -> FamilyLoss:
    return Distillation(family, cfg.distillation, device, precision) if cfg.distillation else FamilyLoss(family)


def hooks_for(cfg: TrainLoopConfig, rank: int) -> list[Hook]:
    """The run's hooks, in calling order."""
    early = [EarlyStopping(cfg.patience)] if cfg.patience > 0 else []
    test = [TestEvaluation()] if cfg.test_at_end else []  # after the best weights are back
    gather = cfg.engine.zero_stage == 3
    levels = [LevelExport(cfg.schedule.export_at, gather=gather)] if cfg.schedule.export_at else []
    return [CostMeter(), Evaluation(cfg.schedule.eval_every), *early, *test, *levels, MetricLogging(cfg, rank),
            Checkpointer(cfg.schedule.ckpt_every, gather=gather,
                         report_evaluations=bool(early))]
