"""The one training loop, for every family and for specialization: a ``Trainer`` built from a
``TrainLoopConfig`` (models/loop_config.py) and a runtime (models/runtime.py: a worker of Ray
Train's ``TorchTrainer``, or the calling process alone for a 1-worker trial).

The loop reads: restore → steps → hooks. ``Trainer.fit`` restores the engine and loop state
from the latest checkpoint, then runs optimizer steps; after each step its hooks
(models/hooks.py) meter costs, evaluate, stop early, log and checkpoint, and its loss hook is
the family's loss or SLM-d's distillation. A step whose (all-reduced) loss or gradient norm is not finite
ends the run before its hooks run (``Diverged``: nothing of it is reported or exported), and
the driver raises it instead of Ray Train retrying a deterministic failure. A family differs only by its ``FamilySpec``
(models/families.py). DeepSpeed is driven directly (``deepspeed.initialize``; Ray has set up the
process group: gloo on CPU, NCCL on GPU): AdamW, linear warm-up + cosine decay, gradient clipping
and accumulation (DeepSpeed's), checkpoints through the runtime (models/runtime.py: Ray Train's
``report`` on a worker, exact resume) or, for a 1-worker trial, in the calling process itself.

Data order (why a re-run or a resumed run sees the same batches): each worker reads only its
share. The driver cuts the kept rows of the train shards, in a row-group order seeded by ``seed``,
into ``world_size`` equal contiguous parts, and rank r's Ray Dataset reads only part r
(models/data.py ``ShardPlan``; equal parts, so every rank runs the same number of steps per
epoch). Each rank cuts its stream into windows of ``shuffle_window / world_size`` rows (rounded
down to a multiple of its batch of ``micro_batch × grad_accum`` rows), permutes each window with
an RNG seeded by (seed, epoch, rank, window index), and cuts the result into its batches (the
last partial one of the epoch is dropped); micro-batch m of rank r is global micro-batch
``r·grad_accum + m``. The order is a function of (seed, epoch, world size), so the data position
is two integers (epoch, batches done in it), the same for every rank. What stays
world-size-independent: the held-out rows, the set of rows an epoch trains on (less fewer than
``world_size`` trailing rows) and their order before the cut into parts; which rows make a step
does depend on the world size (a checkpoint resumes only at the world size it was written with:
``signature``). Tokens arrive as int32 and become int64 on the device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Iterable, Iterator

import deepspeed
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slm.errors import InputError, StageError
from slm.stage import join, local_dir

from . import checkpoint as ckpt
from . import memory
from .ds_config import deepspeed_config, offloads
from .families import LMFamily, build_family
from .flops import device_peak_flops, mfu
from .hooks import hooks_for, loss_hook
from .lm import lm_param_count
from .loop_config import TrainLoopConfig
from .metrics import Costs, console
from .runtime import RayTrainRuntime


# --------------------------------------------------------------------------------------------
# Pieces of the loop (pure functions, unit-testable)
# --------------------------------------------------------------------------------------------

def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up to 1, cosine to min_ratio."""
    warmup = min(warmup, max(total - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_seed(seed: int, step: int, global_micro: int) -> int:
    """Torch RNG seed for one micro-batch: the RNG state is a function of (seed, step, position)
    instead of something to save, and it is the same whatever the world size."""
    return int(np.random.SeedSequence([seed, step, global_micro]).generate_state(1)[0])


def rank_batches(windows: Iterable[dict[str, torch.Tensor]], *, seed: int, epoch: int, rank: int,
                 batch_rows: int, skip: int, columns: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of one epoch in the (seed, epoch, rank) order, after skipping ``skip``
    of them. ``windows``: the rank's stream in windows of a multiple of ``batch_rows`` rows (the
    last one shorter); each is permuted with its own seeded RNG; the last partial batch of the
    epoch is dropped."""
    index = 0
    for w, rows in enumerate(windows):
        n_full = len(rows["input_ids"]) // batch_rows
        if index + n_full <= skip:  # a whole window before the resume point: no work needed
            index += n_full
            continue
        perm = torch.from_numpy(np.random.default_rng([seed, epoch, rank, w]).permutation(len(rows["input_ids"])))
        data = {c: rows[c][perm] for c in columns}
        for b in range(n_full):
            if index >= skip:
                yield {c: v[b * batch_rows:(b + 1) * batch_rows] for c, v in data.items()}
            index += 1


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op. On the CPU
    accelerator ``deepspeed.initialize`` otherwise probes every op's compiler and compiles that
    one (a C++ build of ~1 min per fresh machine) under a file lock in ~/.cache/torch_extensions;
    a build killed midway leaves the lock, and every later run on the machine then waits on it
    forever. slm's CPU runs (tests, small trials) all-reduce a few floats per step, which gloo
    does fine. The probe's result is read only to decide whether to build this op."""
    ops = deepspeed.ops.__dict__.get("__compatible_ops__")
    if ops is None:
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    else:
        ops["deepspeed_shm_comm"] = False


def signature(cfg: TrainLoopConfig, family: LMFamily, world_size: int, precision: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed (see checkpoint.py)."""
    d, o = cfg.data, cfg.optim
    return {**family.shape(), "seq_len": family.spec.seq_len, "seed": cfg.seed,
            "steps": cfg.schedule.steps, "data": d.name, "data_fingerprint": d.fingerprint,
            "lr": o.lr,
            "warmup": o.warmup, "min_lr_ratio": o.min_lr_ratio,
            "weight_decay": o.weight_decay, "clip": o.clip,
            "global_batch": d.micro_batch * d.grad_accum * world_size,
            "micro_batch": d.micro_batch, "zero_stage": cfg.engine.zero_stage,
            "world_size": world_size, "precision": precision,
            "shuffle_window": d.shuffle_window,
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora else None}


def load_init(model: torch.nn.Module, directory: str) -> torch.nn.Module:
    """Load a saved HF model's weights into the freshly built ``model`` (strict: same shape).
    ``directory`` may be a URI (read through this node's cached copy, slm.stage ``local_dir``)."""
    init = AutoModelForCausalLM.from_pretrained(local_dir(directory, "init"))
    try:
        model.load_state_dict(init.state_dict(), strict=True)
    except RuntimeError as e:
        raise InputError(f"init_from '{directory}' does not hold a model of this run's shape: "
                         f"{str(e).splitlines()[0]}; start from a model of the same size") from None
    return model


def check_token_ids(run: str, input_ids: torch.Tensor, vocab: int) -> None:
    """Every token id inside the model's vocabulary. An id past it is a tokenizer that does not
    match the model: on a GPU the embedding lookup would end in a device-side assert that
    takes the whole process down, on a CPU in an IndexError that names nothing."""
    top = int(input_ids.max()) if input_ids.numel() else -1
    if top >= vocab or (input_ids.numel() and int(input_ids.min()) < 0):
        raise InputError(f"training run '{run}': the data holds token id {top}, outside the "
                         f"model's vocabulary of {vocab} tokens: the shards were made with "
                         "another tokenizer; rebuild them with the model's tokenizer "
                         "(`slm data run --force`)")


class Diverged(StageError):
    """A non-finite training loss or gradient norm. Every rank raises it at the same step (it
    is decided on all-reduced values), and a retry would diverge again at that step: the run
    ends (``Trainer.fit`` returns it) instead of Ray Train retrying it."""


def check_finite(run: str, step: int, loss: float, grad_norm: float, last_checkpoint: str | None,
                 lr: float) -> None:
    """Raise ``Diverged`` before a step with a non-finite loss or gradient norm is reported,
    checkpointed or exported (ZeRO would even skip its update silently)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    last = f"the last good checkpoint is '{last_checkpoint}'" if last_checkpoint else "no checkpoint yet"
    raise Diverged(f"training run '{run}' diverged at step {step}: training loss {loss}, gradient "
                   f"norm {grad_norm}; nothing was published ({last}). A re-run diverges again: "
                   f"lower the learning rate (lr {lr}) or check the training data, in a new run "
                   "directory or after deleting this run's")


def grad_norm(module: torch.nn.Module) -> float:
    """The 2-norm of the module's gradients (those of this rank)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks. The tensor lives on ``device``, the
    engine's: the process group's backend is the device's (NCCL takes only CUDA tensors and
    fails "No backend type associated with device type cpu" on a CPU one; gloo takes CPU
    tensors). Float64: byte counts stay exact. Every run, a 1-process one included, takes this
    path, so what the tests run is what a GPU group runs."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


class RankData:
    """This rank's view of the run's datasets: its own part of the train rows (its Dataset,
    ``train_stream_name(rank)``) in the (seed, epoch, rank) order, and the held-out batches
    (every rank iterates all of them and evaluates its slice of each global batch)."""

    def __init__(self, cfg: TrainLoopConfig, runtime, routed: bool, device: torch.device):
        d = cfg.data
        rank, world = runtime.rank, runtime.world
        self.runtime = runtime
        self.seed, self.rank, self.routed, self.device = cfg.seed, rank, routed, device
        self.micro, self.accum = d.micro_batch, d.grad_accum
        self.rank_rows = d.micro_batch * d.grad_accum
        self.global_rows = self.rank_rows * world
        # shuffle_window rows over all ranks: each permutes its share
        self.window_rows = max(d.shuffle_window // self.global_rows, 1) * self.rank_rows
        self.columns = ["input_ids"] + (["cluster"] if routed else [])
        self.read_bytes = 0  # bytes this rank's train feed read (this attempt)

    def windows(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rank's train stream in windows of ``window_rows`` (int32 tokens, on the CPU)."""
        for rows in self.runtime.train_windows(self.window_rows):
            self.read_bytes += int(rows.pop("read_bytes").sum())
            yield rows

    def epoch(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        return rank_batches(self.windows(), seed=self.seed, epoch=epoch, rank=self.rank,
                            batch_rows=self.rank_rows, skip=skip, columns=self.columns)

    def eval_batches(self, name: str) -> Iterator[dict[str, torch.Tensor]]:
        """The global batches of a held-out set (``valid``; ``test`` at the end of a trial).
        Every held-out window counts (small domain valid splits): the last, partial global
        batch leaves some ranks' micro-batches short or empty."""
        return self.runtime.eval_batches(name, self.global_rows)

    def rows(self, batch: dict[str, torch.Tensor], lo: int, hi: int):
        ids = batch["input_ids"][lo:hi].to(self.device).long()
        return ids, (batch["cluster"][lo:hi].to(self.device).long() if self.routed else None)

    def micro_batches(self, batch: dict[str, torch.Tensor], first: int = 0):
        """(global micro index, input_ids, cluster) of this rank's micro-batches: rows ``first``
        on of ``batch`` (0 for its own train batch; its slice of a global valid batch)."""
        for m in range(self.accum):
            lo = first + m * self.micro
            yield (self.rank * self.accum + m, *self.rows(batch, lo, lo + self.micro))

    def valid_micro_batches(self, batch: dict[str, torch.Tensor]):
        """This rank's slice of a global valid batch."""
        return self.micro_batches(batch, self.rank * self.rank_rows)


# --------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """One training run on one Ray Train worker: the DeepSpeed engine, this rank's data, the
    loop state (step, data position, costs) and the hooks."""

    def __init__(self, cfg: TrainLoopConfig, runtime):
        self.runtime = runtime  # models/runtime.py: a Ray Train worker, or this process alone
        self.cfg, self.rank, self.world = cfg, runtime.rank, runtime.world
        self.total = cfg.schedule.steps
        self.stop_at = min(cfg.schedule.stop_at or self.total, self.total)
        self.precision = cfg.engine.resolved_precision(torch.cuda.is_available())
        if cfg.pid_dir:
            os.makedirs(cfg.pid_dir, exist_ok=True)
            with open(os.path.join(cfg.pid_dir, f"rank{self.rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
        self.family = build_family(cfg.model, cfg.engine.loss_chunk)
        model = self.family.build(cfg.seed)  # same seed on every rank: identical initial weights
        if cfg.init_from:                     # specialization: start from a pretrained model
            model = load_init(model, cfg.init_from)
        if cfg.engine.activation_checkpointing:
            self.family.checkpoint_activations(model)
        params = self.family.params(model)   # the served model's, before ZeRO partitions them
        model = self.family.adapt(model, cfg.lora, cfg.seed)  # LoRA: a frozen model with adapters
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        ds_config = deepspeed_config(cfg, self.world, self.precision == "bf16")
        self.memory = self.estimate_memory(model, params, ds_config, n_trainable)
        o = cfg.optim
        optimizer = torch.optim.AdamW(trainable, lr=o.lr, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, o.warmup, self.total, o.min_lr_ratio))
        skip_shm_comm_op()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
            config=ds_config, dist_init_required=False)
        self.signature = signature(cfg, self.family, self.world, self.precision)
        self.peak = device_peak_flops(self.engine.device, "bf16" if self.precision == "bf16" else "fp32")
        self.data = RankData(cfg, runtime, self.family.route_column is not None, self.engine.device)
        self.loss = loss_hook(cfg, self.family, self.engine.device, self.precision)
        self.hooks = hooks_for(cfg, self.rank)
        # DeepSpeed's ZeRO and bf16 optimizers keep the gradient norm they clip with (clip > 0
        # always); a plain torch optimizer (ZeRO 0, fp32) does not: measure it before its step
        self.own_grad_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")
        self.last_checkpoint: str | None = None  # URI of the newest reported (or resumed) one
        self.step = self.epoch = self.batch_in_epoch = self.start_step = 0
        self.costs = Costs(params=params, trainable_params=n_trainable,
                           flops_per_token=self.family.flops_per_token(),
                           world_size=self.world, device=str(self.engine.device.type))
        self.stopping = False
        self.step_cost = (0, 0.0, 0.0)  # the last step's (tokens, seconds, FLOPs of all workers)

    def estimate_memory(self, model: torch.nn.Module, params: int, ds_config: dict[str, Any],
                        trainable: int) -> memory.MemoryEstimate:
        """This worker's memory need (models/memory.py), before the engine allocates anything:
        on a GPU, printed by rank 0 and refused when it exceeds the device's memory."""
        cfg = self.cfg
        teacher = AutoConfig.from_pretrained(local_dir(cfg.distillation.teacher, "teacher")) \
            if cfg.distillation else None
        off_opt, off_par = offloads(ds_config)
        est = memory.estimate(
            family=cfg.model.family, config=self.family.config, params=params,
            largest_layer=memory.largest_layer_params(model), stage=cfg.engine.zero_stage,
            world=self.world, micro_batch=cfg.data.micro_batch, seq_len=cfg.model.seq_len,
            bf16=self.precision == "bf16", checkpointing=cfg.engine.activation_checkpointing,
            loss_chunk=cfg.engine.loss_chunk, offload_optimizer=off_opt, offload_params=off_par,
            teacher_config=teacher, teacher_params=lm_param_count(teacher) if teacher else 0,
            zero_buffers=memory.zero_buffer_bytes(ds_config.get("zero_optimization", {}),
                                                  stage=cfg.engine.zero_stage, bf16=self.precision == "bf16"),
            trainable=trainable)
        if torch.cuda.is_available():
            if self.rank == 0:
                console(f"run '{cfg.logging.run_name}': {est.line()}")
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            memory.check_fits(est, total, cfg.logging.run_name,
                              checkpointing=cfg.engine.activation_checkpointing)
        return est

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over the ranks, on the engine's device (the backend's)."""
        return all_reduce_sum(values, self.engine.device)

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> str | None:
        """restore → steps → hooks. Returns the message of a ``Diverged`` run (Ray Train hands
        rank 0's return value to the driver, which raises it), else None."""
        self.restore()
        diverged = None
        if self.step >= self.total:  # a re-submitted run whose driver died before publishing
            self.runtime.report({"step": self.step, "finished": 1.0})
        else:
            self.engine.train()
            self.call("on_start")
            try:
                while self.step < self.stop_at and not self.stopping:
                    metrics = self.train_step()
                    self.call("on_step", metrics)
            except Diverged as e:
                diverged = str(e)
        self.call("on_end")
        return diverged

    def restore(self) -> None:
        """Engine and loop state from the latest reported checkpoint, if any."""
        resumed = self.runtime.checkpoint()
        if resumed is not None:
            self.last_checkpoint = join(self.cfg.logging.run_uri, os.path.basename(resumed.path.rstrip("/")))
            with resumed.as_directory() as d:
                state = ckpt.load(self.engine, d, self.signature, self.last_checkpoint)
            self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            self.costs = Costs.from_json(state["costs"])
            if self.rank == 0:  # the driver's log says where a restarted worker group went on
                console(f"resumed run '{self.cfg.logging.run_name}' from its checkpoint at step "
                        f"{self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        self.start_step = self.step
        self._batches = self.data.epoch(self.epoch, self.batch_in_epoch)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on this rank's micro-batches of the next global batch."""
        t0, batch = self.next_batch()
        self.step += 1
        loss_sum, flops, own_norm = 0.0, 0.0, 0.0
        for gm, ids, cl in self.data.micro_batches(batch):
            torch.manual_seed(micro_seed(self.cfg.seed, self.step, gm))
            loss = self.loss(self.engine, ids, cl)
            self.engine.backward(loss)  # DeepSpeed scales by 1/grad_accum
            if self.own_grad_norm and self.engine.is_gradient_accumulation_boundary():
                own_norm = grad_norm(self.engine.module)  # all-reduced by backward at the boundary
            self.engine.step()          # optimizer + LR step at the accumulation boundary
            loss_sum += float(loss.detach())
            flops += self.loss.flops(ids, cl)
        lr = self.scheduler.get_last_lr()[0]
        norm = own_norm if self.own_grad_norm else float(self.engine.get_global_grad_norm())
        read = [0.0] * self.world  # each rank's feed bytes so far, in its own slot
        read[self.rank] = float(self.data.read_bytes)
        mean_loss, flops, norm, *read = self.all_reduce_sum([loss_sum / self.data.accum, flops, norm, *read])
        mean_loss, norm = mean_loss / self.world, norm / self.world  # NaN/inf on any rank: on all
        check_finite(self.cfg.logging.run_name, self.step, mean_loss, norm, self.last_checkpoint, lr)
        self.batch_in_epoch += 1
        seconds = time.perf_counter() - t0
        tokens = self.data.global_rows * batch["input_ids"].shape[1]
        self.step_cost = (tokens, seconds, flops)
        return {"train/loss": mean_loss, "train/grad_norm": norm, "train/lr": lr, "perf/step_seconds": seconds,
                "perf/tokens_per_s": tokens / seconds, "perf/mfu": mfu(flops, seconds, self.world, self.peak),
                "data/read_bytes": sum(read), "data/read_bytes_worker_max": max(read),
                "data/read_bytes_worker_min": min(read)}

    # ---- what the hooks use --------------------------------------------------------------------

    def next_batch(self) -> tuple[float, dict[str, torch.Tensor]]:
        """(start time, the next global batch); an epoch's end starts the next (seed, epoch) order."""
        while True:
            t0 = time.perf_counter()
            batch = next(self._batches, None)
            if batch is not None:
                check_token_ids(self.cfg.logging.run_name, batch["input_ids"], self.cfg.model.vocab_size)
                return t0, batch
            if self.batch_in_epoch == 0:
                raise InputError(f"the training data of run '{self.cfg.logging.run_name}' holds "
                                 f"fewer than one global batch ({self.data.global_rows} rows: "
                                 f"{self.data.rank_rows} for each of {self.world} workers); add "
                                 "data or lower pretrain.train.micro_batch / grad_accum / num_workers")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._batches = self.data.epoch(self.epoch, 0)

    def evaluate(self, name: str = "valid") -> float:
        """Mean loss over every window of the held-out set ``name`` (all ranks)."""
        self.engine.eval()
        sums = [0.0, 0.0]
        with torch.no_grad():
            for batch in self.data.eval_batches(name):
                for _, ids, cl in self.data.valid_micro_batches(batch):
                    empty = ids.shape[0] == 0
                    if empty:  # still run a forward: ZeRO-3 gathers weights collectively
                        ids, cl = self.data.rows(batch, 0, 1)
                    loss, n = self.family.loss(self.engine, ids, cl)
                    if not empty:
                        sums[0] += float(loss) * n
                        sums[1] += n
        self.engine.train()
        total_loss, total_n = self.all_reduce_sum(sums)
        return total_loss / max(total_n, 1)

    @property
    def final(self) -> bool:
        """This step ends the run (its last step, or early stopping): the checkpoint exports."""
        return self.step == self.total or self.stopping

    def state(self) -> dict[str, Any]:
        """The loop state a checkpoint carries (JSON-able)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "rng": {"scheme": "torch.manual_seed(micro_seed(seed, step, global_micro))",
                        "seed": self.cfg.seed},
                "costs": self.costs.to_json()}

    def call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)


def train_loop_per_worker(config: dict[str, Any]) -> str | None:
    """Ray Train worker function: ``config`` is ``TrainLoopConfig.to_dict()``. Returns the
    run's ``Diverged`` message, if any (``Trainer.fit``)."""
    cfg = TrainLoopConfig.from_dict(config)
    return Trainer(cfg, RayTrainRuntime(cfg.logging.run_uri)).fit()
