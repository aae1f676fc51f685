"""Ray Train + DeepSpeed step throughput vs a bare PyTorch loop: same model, data, cores.

Both train the same GPT-2 preset on the same parquet token shards with AdamW and clipping, one
worker with ``--cpus`` torch threads. The Ray side is the real thing (``models/launch.py``
``run_training``: TorchTrainer, DeepSpeed ZeRO-1, Ray Data ingest); its per-step tokens/s come
from the loop's own TensorBoard log. Steady state: steps after ``--warmup`` only, evaluation and
checkpoints (once, at the end) excluded on both sides. Target: ratio >= 0.97.

    .venv/bin/python bench/bench_train_throughput.py [--size demo-slm --steps 60 --cpus 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session
from slm.layout import RunLayout
from slm.models.config import ScalingConfig, TrainConfig
from slm.models.data import open_shards, shard_dataset, valid_dataset
from slm.models.families import FamilySpec, build_family
from slm.models.launch import RunSpec, run_training
from slm.models.loop_config import pretraining_config
from slm.models.synthetic import windows, write_shards, write_tokenizer
from slm.models.train import lr_factor


def bare_loop(spec, rows: np.ndarray, batch: int, steps: int, warmup: int, threads: int) -> float:
    """Steady-state tokens/s of a plain PyTorch loop on the same family and rows."""
    torch.set_num_threads(threads)
    fam = build_family(spec)
    model = fam.build(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, steps, 0.1))
    toks, secs = 0, 0.0
    for s in range(steps):
        t0 = time.perf_counter()
        ids = torch.from_numpy(rows[(s * batch) % (len(rows) - batch):][:batch]).long()
        loss, _ = fam.loss(model, ids, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if s >= warmup:
            toks, secs = toks + ids.numel(), secs + dt
    return toks / secs


def ray_loop(root: str, spec, batch: int, steps: int, warmup: int, cpus: int) -> float:
    """Steady-state tokens/s of the one training loop (rank 0's TensorBoard log)."""
    shards = open_shards(RunLayout(root), "generic", "bench", [], spec.seq_len)
    train = shard_dataset(shards, seed=0, split="train", fraction=0.02)
    valid = valid_dataset(shard_dataset(shards, seed=0, split="valid", fraction=0.02), batch, "v")
    # evaluation and the checkpoint once, at the end (excluded from the steady state)
    t = TrainConfig(micro_batch=batch, lr=3e-3, warmup=2, eval_every=steps, ckpt_every=steps,
                    eval_batches=1, log_every=10, shuffle_window=1024)
    loop = pretraining_config(t, spec, steps=steps, seed=0, data="generic", run_name="bench",
                              storage=os.path.join(root, "runs"), logger="tensorboard")
    run = RunSpec(loop, ScalingConfig(num_workers=1, cpus_per_worker=float(cpus), max_failures=1))
    run_training(run, train, valid)
    d = os.path.join(run.run_uri, "tensorboard")
    acc = EventAccumulator(os.path.join(d, os.listdir(d)[0]))
    acc.Reload()
    secs = {e.step: e.value for e in acc.Scalars("perf/step_seconds")}
    tps = {e.step: e.value for e in acc.Scalars("perf/tokens_per_s")}
    steady = [k for k in secs if k > warmup]
    tokens = sum(tps[k] * secs[k] for k in steady)
    return tokens / sum(secs[k] for k in steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="demo-slm")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=1, help="cores (torch threads) for both loops")
    ap.add_argument("--rows", type=int, default=4096)
    a = ap.parse_args()

    root = tempfile.mkdtemp(prefix="slm-bench-train-")
    layout = RunLayout(root)
    write_tokenizer(layout, a.vocab)
    table = windows(a.rows, a.seq_len, [2], seed=0, vocab=a.vocab)
    write_shards(layout, "generic", table, rows_per_file=1024)
    rows = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False))
    spec = FamilySpec("slm", a.size, a.vocab, a.seq_len)

    bare = bare_loop(spec, rows, a.batch, a.steps, a.warmup, a.cpus)
    with ray_session(ClusterConfig(num_cpus=max(2, a.cpus + 1))):
        ray = ray_loop(root, spec, a.batch, a.steps, a.warmup, a.cpus)
    print(f"bare PyTorch      : {bare:10.0f} tokens/s")
    print(f"Ray Train+DeepSpeed: {ray:10.0f} tokens/s")
    print(f"ratio ray/bare     : {ray / bare:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
