"""The one training loop, run by Ray Train's ``TorchTrainer`` on every worker, for every family.

A family differs only by its ``FamilySpec`` (models/families.py). The loop drives DeepSpeed
directly (``deepspeed.initialize``; Ray has set up the process group: gloo on CPU, NCCL on GPU):
AdamW, linear warm-up + cosine decay, gradient clipping and accumulation (DeepSpeed's), periodic
evaluation on held-out windows, checkpoints through ``ray.train.report`` and exact resume.

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

Config keys (a dict, built by models/pretrain.py ``loop_config``): ``family`` (FamilySpec
dict), ``train`` (TrainConfig dict), ``steps``, ``seed``, ``data`` (a name recorded in the
checkpoint signature), ``run_name``, ``run_uri`` (the run's storage directory, for TensorBoard),
``logger``, and optional ``stop_at`` (end this attempt at that step after a checkpoint; the run
continues when re-submitted) and ``pid_dir`` (each worker writes ``rank<r>.pid`` there: lets
operators, and the fault-tolerance test, find the worker processes).

Specialization (tune/finetune.py) sets optional keys; absent, pretraining is unchanged:
``init_from`` (a local HF directory whose weights replace the fresh initialisation; same
shape), ``patience`` (> 0: evaluate before the first step and every ``eval_every`` steps; stop
after ``patience`` evaluations without a better valid loss; the final checkpoint and export hold
the best-valid weights, reported as ``valid/best_loss`` / ``valid/best_step``; every evaluation
is also reported without a checkpoint, so a Tune scheduler sees it), ``kd_teacher`` (a local HF
directory) with ``kd_weight`` / ``kd_temperature`` (SLM-d: ``losses.kd_loss`` against the
teacher's next-token distributions; the teacher's forward FLOPs are counted).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

from slm.errors import InputError

from . import checkpoint as ckpt
from .families import build_family
from .metrics import Costs, MetricLogger, Progress

EXPORT_DIR = "export"        # inside the final checkpoint: the HF directory of the served model
COSTS_FILE = "costs.json"


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


def deepspeed_config(train: dict[str, Any], world_size: int, bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": train["micro_batch"],
        "gradient_accumulation_steps": train["grad_accum"],
        "train_batch_size": train["micro_batch"] * train["grad_accum"] * world_size,
        "gradient_clipping": train["clip"],
        "zero_optimization": {"stage": train["zero_stage"]},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**12,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def signature(config: dict[str, Any], family, world_size: int, precision: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed (see checkpoint.py)."""
    t = config["train"]
    return {**family.shape(), "seq_len": family.spec.seq_len, "seed": config["seed"],
            "steps": config["steps"], "data": config.get("data", ""), "lr": t["lr"],
            "warmup": t["warmup"], "min_lr_ratio": t["min_lr_ratio"],
            "weight_decay": t["weight_decay"], "clip": t["clip"],
            "global_batch": t["micro_batch"] * t["grad_accum"] * world_size,
            "micro_batch": t["micro_batch"], "zero_stage": t["zero_stage"],
            "world_size": world_size, "precision": precision,
            "shuffle_window": t["shuffle_window"]}


def load_init(model: torch.nn.Module, directory: str) -> torch.nn.Module:
    """Load a saved HF model's weights into the freshly built ``model`` (strict: same shape)."""
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(directory)
    try:
        model.load_state_dict(init.state_dict(), strict=True)
    except RuntimeError as e:
        raise InputError(f"init_from '{directory}' does not hold a model of this run's shape: "
                         f"{str(e).splitlines()[0]}; start from a model of the same size") from None
    return model


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function (see the module docstring for the config keys)."""
    import deepspeed
    import ray.train

    from .flops import device_peak_flops

    # ---- Context: rank, device, precision ----------------------------------------------------
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = config["train"]
    seed, total = int(config["seed"]), int(config["steps"])
    stop_at = min(int(config.get("stop_at") or total), total)
    use_gpu = torch.cuda.is_available()
    precision = t["precision"] if t["precision"] != "auto" else ("bf16" if use_gpu else "fp32")
    if config.get("pid_dir"):
        os.makedirs(config["pid_dir"], exist_ok=True)
        with open(os.path.join(config["pid_dir"], f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))

    # ---- Model, optimizer, schedule: DeepSpeed engine ----------------------------------------
    family = build_family(config["family"])
    model = family.build(seed)          # same seed on every rank: identical initial weights
    if config.get("init_from"):         # specialization: start from a pretrained model
        model = load_init(model, config["init_from"])
    params = family.params(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t["warmup"], total, t["min_lr_ratio"]))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(t, world, precision == "bf16"), dist_init_required=False)
    device = engine.device
    sig = signature(config, family, world, precision)

    # ---- Resume: engine state + loop state from the latest reported checkpoint ---------------
    step, epoch, batch_in_epoch = 0, 0, 0
    costs = Costs(params=params, flops_per_token=family.flops_per_token(), world_size=world,
                  device=str(device.type))
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = ckpt.load(engine, d, sig)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        costs = Costs.from_json(state["costs"])
    costs.attempts += 1
    start_step = step

    # ---- Logging (rank 0) ---------------------------------------------------------------------
    logger = MetricLogger(config.get("logger", "none"), config["run_uri"], config["run_name"],
                          {"family": config["family"], **t, "steps": total, "seed": seed}) \
        if rank == 0 else None
    progress = Progress(config["run_name"], total, start_step, t["log_every"])
    peak = device_peak_flops(device, "bf16" if precision == "bf16" else "fp32")

    # ---- Data ---------------------------------------------------------------------------------
    mb, accum = t["micro_batch"], t["grad_accum"]
    global_rows = mb * accum * world
    window_rows = max(t["shuffle_window"] // global_rows, 1) * global_rows
    routed = family.route_column is not None
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")

    def epoch_batches(e: int, skip: int):
        return global_batches(train_shard, seed=seed, epoch=e, global_rows=global_rows,
                              window_rows=window_rows, skip=skip, route_column=routed)

    def my_micro_batches(batch: dict[str, torch.Tensor]):
        """(global micro index, input_ids, cluster) of this rank's slice of a global batch."""
        for m in range(accum):
            lo = (rank * accum + m) * mb
            ids = batch["input_ids"][lo:lo + mb].to(device)
            cl = batch["cluster"][lo:lo + mb].to(device) if routed else None
            yield rank * accum + m, ids, cl

    # ---- Evaluation on the held-out windows -----------------------------------------------------
    def evaluate() -> float:
        engine.eval()
        sums = [0.0, 0.0]
        with torch.no_grad():
            # every held-out window counts (small domain valid splits): the last, partial
            # global batch leaves some ranks' micro-batches short or empty
            for batch in valid_shard.iter_torch_batches(batch_size=global_rows, dtypes=torch.long,
                                                        drop_last=False):
                for _, ids, cl in my_micro_batches(batch):
                    empty = ids.shape[0] == 0
                    if empty:  # still run a forward: ZeRO-3 gathers weights collectively
                        ids = batch["input_ids"][:1].to(device)
                        cl = batch["cluster"][:1].to(device) if routed else None
                    loss, n = family.loss(engine, ids, cl)
                    if not empty:
                        sums[0] += float(loss) * n
                        sums[1] += n
        engine.train()
        total_loss, total_n = _all_reduce_sum(sums)
        return total_loss / max(total_n, 1)

    # ---- Specialization extras: KD teacher, early stopping on valid (off in pretraining) -------
    teacher, teacher_fpt = None, 0.0
    kd_weight, kd_temperature = float(config.get("kd_weight", 0.0)), float(config.get("kd_temperature", 1.0))
    if config.get("kd_teacher"):
        from transformers import AutoModelForCausalLM

        from .flops import inference_flops_per_token
        from .losses import kd_loss

        teacher = AutoModelForCausalLM.from_pretrained(config["kd_teacher"]).to(device).eval()
        teacher_fpt = inference_flops_per_token(teacher.config, family.spec.seq_len)

    def train_loss(ids: torch.Tensor, cl: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        if teacher is None:
            return family.loss(engine, ids, cl)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        return kd_loss(engine(input_ids=ids).logits, teacher_logits, ids, kd_weight,
                       kd_temperature), int(ids.numel())

    patience = int(config.get("patience") or 0)
    best = {"loss": math.inf, "step": -1, "state": None, "bad": 0}
    history: list[list[float]] = []

    def track_best(valid_loss: float) -> bool:
        """Record an evaluation; keep the best weights (CPU copy); True when patience ran out."""
        history.append([step, valid_loss])
        if valid_loss < best["loss"]:
            best.update(loss=valid_loss, step=step, bad=0,
                        state={k: v.detach().to("cpu", copy=True)
                               for k, v in engine.module.state_dict().items()})
        else:
            best["bad"] += 1
        costs.extra["valid_history"] = history
        return best["bad"] >= patience

    def best_metrics() -> dict[str, float]:
        return {"valid/best_loss": best["loss"], "valid/best_step": float(best["step"])}

    # ---- Checkpoint: every rank saves its shards, then every rank reports (a barrier) ---------
    def save_and_report(metrics: dict[str, float], final: bool) -> None:
        t0 = time.perf_counter()
        state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "rng": {"scheme": "torch.manual_seed(micro_seed(seed, step, global_micro))",
                         "seed": seed},
                 "costs": costs.to_json()}
        d = tempfile.mkdtemp(prefix=f"slm-ckpt-{rank}-")
        try:
            ckpt.save(engine, d, rank=rank, world_size=world, signature=sig, state=state)
            if final:
                export(d)
            if logger is not None:
                logger.flush()
            costs.checkpoint_seconds += time.perf_counter() - t0
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=ckpt.step_dir_name(step))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def export(d: str) -> None:
        """Final checkpoint only: rank 0 adds the served model (HF dir) and the costs."""
        import json

        def write():
            if rank == 0:
                family.export(engine.module, os.path.join(d, EXPORT_DIR))
                with open(os.path.join(d, COSTS_FILE), "w") as f:
                    json.dump(costs.to_json(), f, indent=2, sort_keys=True)

        if t["zero_stage"] == 3:  # parameters are partitioned: gather them on every rank
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                write()
        else:
            write()

    # ---- Already finished (a re-submitted run whose driver died before publishing) ------------
    if step >= total:
        ray.train.report({"step": step, "finished": 1.0})
        if logger is not None:
            logger.close()
        return

    # ---- Training ------------------------------------------------------------------------------
    engine.train()
    batches = epoch_batches(epoch, batch_in_epoch)
    metrics: dict[str, float] = {}
    if patience and step == 0:  # the starting model is a candidate: fine-tuning may not help
        track_best(evaluate())
    stopping = False
    while step < stop_at:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:                           # epoch done: next (seed, epoch) order
            if batch_in_epoch == 0:
                raise InputError(f"the training data of run '{config['run_name']}' holds fewer "
                                 f"than one global batch ({global_rows} rows); add data or lower "
                                 "pretrain.train.micro_batch / grad_accum / num_workers")
            epoch, batch_in_epoch = epoch + 1, 0
            batches = epoch_batches(epoch, 0)
            continue
        step += 1
        loss_sum, flops = 0.0, 0.0
        for gm, ids, cl in my_micro_batches(batch):
            torch.manual_seed(micro_seed(seed, step, gm))
            loss, _ = train_loss(ids, cl)
            engine.backward(loss)                   # DeepSpeed scales by 1/grad_accum
            engine.step()                           # optimizer + LR step at the accumulation boundary
            loss_sum += float(loss.detach())
            flops += family.micro_flops(ids, cl) + teacher_fpt * ids.numel()
        lr = scheduler.get_last_lr()[0]
        mean_loss, flops = _all_reduce_sum([loss_sum / accum, flops])
        mean_loss /= world
        batch_in_epoch += 1
        seconds = time.perf_counter() - t0
        tokens = global_rows * batch["input_ids"].shape[1]
        costs.add_step(tokens, seconds, flops)
        metrics = {"train/loss": mean_loss, "train/lr": lr, "perf/step_seconds": seconds,
                   "perf/tokens_per_s": tokens / seconds,
                   "perf/mfu": float("nan") if peak is None else flops / (seconds * world * peak),
                   "cost/flops": costs.flops, "cost/device_seconds": costs.device_seconds,
                   "cost/tokens": float(costs.tokens)}

        # ---- Evaluation ------------------------------------------------------------------------
        if step % t["eval_every"] == 0 or step == total:
            te = time.perf_counter()
            metrics["valid/loss"] = evaluate()
            costs.eval_device_seconds += (time.perf_counter() - te) * world
            if patience:
                stopping = track_best(metrics["valid/loss"])
                metrics.update(best_metrics())

        # ---- Logging (rank 0) -------------------------------------------------------------------
        if logger is not None:
            logger.log(metrics, step)
            progress.maybe_print(step, metrics)

        # ---- Checkpoint ------------------------------------------------------------------------
        final = step == total or stopping
        if patience and final and best["state"] is not None:
            engine.module.load_state_dict(best["state"])  # the exported model is the best-valid one
        if step % t["ckpt_every"] == 0 or step == stop_at or stopping:
            save_and_report({"step": step, "epoch": epoch, **metrics, "start_step": start_step,
                             "attempts": costs.attempts}, final=final)
        elif patience and "valid/loss" in metrics:
            ray.train.report({"step": step, **metrics})  # progress for Tune (ASHA), no checkpoint
        if stopping:
            break

    if logger is not None:
        logger.close()
