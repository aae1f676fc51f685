"""The one training loop, run by Ray Train's ``TorchTrainer`` on every worker, for every family
and for specialization: a ``Trainer`` built from a ``TrainLoopConfig`` (models/loop_config.py).

The loop reads: restore → steps → hooks. ``Trainer.fit`` restores the engine and loop state
from the latest checkpoint, then runs optimizer steps; after each step its hooks
(models/hooks.py) meter costs, evaluate, stop early, log and checkpoint, and its loss hook is
the family's loss or SLM-d's distillation. A family differs only by its ``FamilySpec``
(models/families.py). DeepSpeed is driven directly (``deepspeed.initialize``; Ray has set up the
process group: gloo on CPU, NCCL on GPU): AdamW, linear warm-up + cosine decay, gradient clipping
and accumulation (DeepSpeed's), checkpoints through ``ray.train.report`` and exact resume.

Data order (why a resumed run sees the same batches): every worker iterates the *whole*
``train`` dataset (it is not split; the driver fixes its row order: files in an order seeded by
``seed``), cuts it into windows of ``shuffle_window`` rows, permutes each window with an RNG
seeded by (seed, epoch, window index), and cuts the result into global batches of
``micro_batch × grad_accum × world_size`` rows. Rank r takes the r-th contiguous slice of each
global batch, micro-batch m of it is global micro-batch ``r·grad_accum + m``. The order is a
function of (seed, epoch) only, so the data position is two integers (epoch, global batches
done in it) and the same rows make a step whatever the world size: 2 workers × accumulation 1
see exactly what 1 worker × accumulation 2 sees. Reading the whole stream on every worker costs
I/O of tokens (cheap next to the model's FLOPs) and buys that determinism.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Iterator

import deepspeed
import numpy as np
import ray.train
import torch
from transformers import AutoModelForCausalLM

from slm.errors import InputError

from . import checkpoint as ckpt
from .families import LMFamily, build_family
from .flops import device_peak_flops, mfu
from .hooks import hooks_for, loss_hook
from .loop_config import TrainLoopConfig
from .metrics import Costs


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


def global_batches(shard, *, seed: int, epoch: int, global_rows: int, window_rows: int,
                   skip: int, route_column: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Global batches of one epoch in the (seed, epoch) order, after skipping ``skip`` of them.

    Each window of ``window_rows`` rows (a multiple of ``global_rows``) is permuted with its own
    seeded RNG; the last partial global batch of the epoch is dropped."""
    index = 0
    columns = ["input_ids"] + (["cluster"] if route_column else [])
    for w, rows in enumerate(shard.iter_torch_batches(batch_size=window_rows, prefetch_batches=1,
                                                      dtypes=torch.long, drop_last=False)):
        n_full = len(rows["input_ids"]) // global_rows
        if index + n_full <= skip:  # a whole window before the resume point: no work needed
            index += n_full
            continue
        perm = torch.from_numpy(np.random.default_rng([seed, epoch, w]).permutation(len(rows["input_ids"])))
        data = {c: rows[c][perm] for c in columns}
        for b in range(n_full):
            if index >= skip:
                yield {c: v[b * global_rows:(b + 1) * global_rows] for c, v in data.items()}
            index += 1


def deepspeed_config(cfg: TrainLoopConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    d = cfg.data
    return {
        "train_micro_batch_size_per_gpu": d.micro_batch,
        "gradient_accumulation_steps": d.grad_accum,
        "train_batch_size": d.micro_batch * d.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**12,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def signature(cfg: TrainLoopConfig, family: LMFamily, world_size: int, precision: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed (see checkpoint.py)."""
    d, o = cfg.data, cfg.optim
    return {**family.shape(), "seq_len": family.spec.seq_len, "seed": cfg.seed,
            "steps": cfg.schedule.steps, "data": d.name, "lr": o.lr,
            "warmup": o.warmup, "min_lr_ratio": o.min_lr_ratio,
            "weight_decay": o.weight_decay, "clip": o.clip,
            "global_batch": d.micro_batch * d.grad_accum * world_size,
            "micro_batch": d.micro_batch, "zero_stage": cfg.engine.zero_stage,
            "world_size": world_size, "precision": precision,
            "shuffle_window": d.shuffle_window}


def load_init(model: torch.nn.Module, directory: str) -> torch.nn.Module:
    """Load a saved HF model's weights into the freshly built ``model`` (strict: same shape)."""
    init = AutoModelForCausalLM.from_pretrained(directory)
    try:
        model.load_state_dict(init.state_dict(), strict=True)
    except RuntimeError as e:
        raise InputError(f"init_from '{directory}' does not hold a model of this run's shape: "
                         f"{str(e).splitlines()[0]}; start from a model of the same size") from None
    return model


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


class RankData:
    """This rank's view of the run's datasets: the (seed, epoch) order of global batches, its
    micro-batch slices of each, and the held-out batches."""

    def __init__(self, cfg: TrainLoopConfig, rank: int, world: int, routed: bool, device: torch.device):
        d = cfg.data
        self.seed, self.rank, self.routed, self.device = cfg.seed, rank, routed, device
        self.micro, self.accum = d.micro_batch, d.grad_accum
        self.global_rows = d.micro_batch * d.grad_accum * world
        self.window_rows = max(d.shuffle_window // self.global_rows, 1) * self.global_rows
        self.train = ray.train.get_dataset_shard("train")
        self.valid = ray.train.get_dataset_shard("valid")

    def epoch(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        return global_batches(self.train, seed=self.seed, epoch=epoch, global_rows=self.global_rows,
                              window_rows=self.window_rows, skip=skip, route_column=self.routed)

    def valid_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        # every held-out window counts (small domain valid splits): the last, partial global
        # batch leaves some ranks' micro-batches short or empty
        return self.valid.iter_torch_batches(batch_size=self.global_rows, dtypes=torch.long,
                                             drop_last=False)

    def rows(self, batch: dict[str, torch.Tensor], lo: int, hi: int):
        ids = batch["input_ids"][lo:hi].to(self.device)
        return ids, (batch["cluster"][lo:hi].to(self.device) if self.routed else None)

    def micro_batches(self, batch: dict[str, torch.Tensor]):
        """(global micro index, input_ids, cluster) of this rank's slice of a global batch."""
        for m in range(self.accum):
            lo = (self.rank * self.accum + m) * self.micro
            yield (self.rank * self.accum + m, *self.rows(batch, lo, lo + self.micro))


# --------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """One training run on one Ray Train worker: the DeepSpeed engine, this rank's data, the
    loop state (step, data position, costs) and the hooks."""

    def __init__(self, cfg: TrainLoopConfig):
        ctx = ray.train.get_context()
        self.cfg, self.rank, self.world = cfg, ctx.get_world_rank(), ctx.get_world_size()
        self.total = cfg.schedule.steps
        self.stop_at = min(cfg.schedule.stop_at or self.total, self.total)
        self.precision = cfg.engine.resolved_precision(torch.cuda.is_available())
        if cfg.pid_dir:
            os.makedirs(cfg.pid_dir, exist_ok=True)
            with open(os.path.join(cfg.pid_dir, f"rank{self.rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
        self.family = build_family(cfg.model)
        model = self.family.build(cfg.seed)  # same seed on every rank: identical initial weights
        if cfg.init_from:                     # specialization: start from a pretrained model
            model = load_init(model, cfg.init_from)
        params = self.family.params(model)   # before ZeRO partitions the parameters
        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, o.warmup, self.total, o.min_lr_ratio))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
            config=deepspeed_config(cfg, self.world, self.precision == "bf16"), dist_init_required=False)
        self.signature = signature(cfg, self.family, self.world, self.precision)
        self.peak = device_peak_flops(self.engine.device, "bf16" if self.precision == "bf16" else "fp32")
        self.data = RankData(cfg, self.rank, self.world, self.family.route_column is not None,
                             self.engine.device)
        self.loss = loss_hook(cfg, self.family, self.engine.device)
        self.hooks = hooks_for(cfg, self.rank)
        self.step = self.epoch = self.batch_in_epoch = self.start_step = 0
        self.costs = Costs(params=params, flops_per_token=self.family.flops_per_token(),
                           world_size=self.world, device=str(self.engine.device.type))
        self.stopping = False
        self.step_cost = (0, 0.0, 0.0)  # the last step's (tokens, seconds, FLOPs of all workers)

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        """restore → steps → hooks."""
        self.restore()
        if self.step >= self.total:  # a re-submitted run whose driver died before publishing
            ray.train.report({"step": self.step, "finished": 1.0})
        else:
            self.engine.train()
            self.call("on_start")
            while self.step < self.stop_at and not self.stopping:
                metrics = self.train_step()
                self.call("on_step", metrics)
        self.call("on_end")

    def restore(self) -> None:
        """Engine and loop state from the latest reported checkpoint, if any."""
        resumed = ray.train.get_checkpoint()
        if resumed is not None:
            with resumed.as_directory() as d:
                state = ckpt.load(self.engine, d, self.signature)
            self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            self.costs = Costs.from_json(state["costs"])
        self.start_step = self.step
        self._batches = self.data.epoch(self.epoch, self.batch_in_epoch)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on this rank's micro-batches of the next global batch."""
        t0, batch = self.next_batch()
        self.step += 1
        loss_sum, flops = 0.0, 0.0
        for gm, ids, cl in self.data.micro_batches(batch):
            torch.manual_seed(micro_seed(self.cfg.seed, self.step, gm))
            loss = self.loss(self.engine, ids, cl)
            self.engine.backward(loss)  # DeepSpeed scales by 1/grad_accum
            self.engine.step()          # optimizer + LR step at the accumulation boundary
            loss_sum += float(loss.detach())
            flops += self.loss.flops(ids, cl)
        lr = self.scheduler.get_last_lr()[0]
        mean_loss, flops = all_reduce_sum([loss_sum / self.data.accum, flops])
        self.batch_in_epoch += 1
        seconds = time.perf_counter() - t0
        tokens = self.data.global_rows * batch["input_ids"].shape[1]
        self.step_cost = (tokens, seconds, flops)
        return {"train/loss": mean_loss / self.world, "train/lr": lr, "perf/step_seconds": seconds,
                "perf/tokens_per_s": tokens / seconds, "perf/mfu": mfu(flops, seconds, self.world, self.peak)}

    # ---- what the hooks use --------------------------------------------------------------------

    def next_batch(self) -> tuple[float, dict[str, torch.Tensor]]:
        """(start time, the next global batch); an epoch's end starts the next (seed, epoch) order."""
        while True:
            t0 = time.perf_counter()
            batch = next(self._batches, None)
            if batch is not None:
                return t0, batch
            if self.batch_in_epoch == 0:
                raise InputError(f"the training data of run '{self.cfg.logging.run_name}' holds "
                                 f"fewer than one global batch ({self.data.global_rows} rows); add "
                                 "data or lower pretrain.train.micro_batch / grad_accum / num_workers")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._batches = self.data.epoch(self.epoch, 0)

    def evaluate(self) -> float:
        """Mean loss over every held-out window (all ranks)."""
        self.engine.eval()
        sums = [0.0, 0.0]
        with torch.no_grad():
            for batch in self.data.valid_batches():
                for _, ids, cl in self.data.micro_batches(batch):
                    empty = ids.shape[0] == 0
                    if empty:  # still run a forward: ZeRO-3 gathers weights collectively
                        ids, cl = self.data.rows(batch, 0, 1)
                    loss, n = self.family.loss(self.engine, ids, cl)
                    if not empty:
                        sums[0] += float(loss) * n
                        sums[1] += n
        self.engine.train()
        total_loss, total_n = all_reduce_sum(sums)
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: ``config`` is ``TrainLoopConfig.to_dict()``."""
    Trainer(TrainLoopConfig.from_dict(config)).fit()
