"""Data feed: bytes read per Ray Train worker with 1 vs 2 workers on the same token shards.

Each Train worker reads only its share of the train rows (models/data.py ``ShardPlan``): rank
r's Ray Dataset reads the row groups of its part, and every row carries ``read_bytes`` (what its
reading task pulled through the parquet file: footer and column chunks). The Trainer sums them
per rank and reports ``data/read_bytes`` (all ranks) and ``data/read_bytes_worker_max/min``.

This bench measures them through REAL training runs (models/launch.py ``run_training``:
TorchTrainer, DeepSpeed, the one loop) with 1 then 2 workers, on the same synthetic shards
(``--files`` files x ``--groups`` row groups of ``--rows`` windows of ``--seq-len`` tokens). Each
run trains exactly one epoch: the window ids are chosen so that exactly ``--valid`` rows are held
out (the holdout is a hash of window_id), which makes each rank's kept rows a whole number of
its shuffle windows and batches, so the last reported step has consumed every row of its part
and the two runs cover the same rows. The same per-rank bytes are also read straight through
the Ray Data streams (``ShardPlan.rank_streams``, as tests/test_data_plan.py does) as a cross-
check. The driver's counting pass (window_id only) is not part of the workers' bytes.

    .venv/bin/python bench/bench_data_feed.py [--files 16 --groups 4 --rows 256 --seq-len 128 --vocab 1024]
Goal: 2-worker per-worker max bytes / 1-worker bytes = 0.5 +- 10 %.
Writes bench/results/data_feed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session
from slm.layout import RunLayout
from slm.models.config import ScalingConfig, TrainConfig
from slm.models.data import holdout_mask, open_shards, shard_dataset, valid_dataset
from slm.models.families import FamilySpec
from slm.models.launch import RunSpec, run_training
from slm.models.loop_config import pretraining_config
from slm.models.synthetic import write_tokenizer

from machine_info import machine  # bench/machine_info.py (the script's own folder is on sys.path)
from slm.stage import publish

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_feed.json")
GOAL, TOLERANCE = 0.5, 0.10


def exact_ids(n: int, n_valid: int, fraction: float, seed: int) -> np.ndarray:
    """``n`` window ids of which exactly ``n_valid`` are held out at ``fraction``, shuffled."""
    cand = np.arange(n * 4, dtype=np.int64)
    held = holdout_mask(cand, fraction)
    v, t = cand[held], cand[~held]
    assert len(v) >= n_valid and len(t) >= n - n_valid, "raise the candidate pool"
    ids = np.concatenate([v[:n_valid], t[:n - n_valid]])
    return np.random.default_rng(seed).permutation(ids)


def write_inputs(root: str, a) -> dict:
    """Tokenizer + the generic shard set: files x groups row groups of rows windows."""
    layout = RunLayout(root)
    write_tokenizer(layout, a.vocab)
    n = a.files * a.groups * a.rows
    rng = np.random.default_rng(a.seed)
    ids = exact_ids(n, a.valid, a.fraction, a.seed)
    tokens = rng.integers(0, a.vocab, size=(n, a.seq_len), dtype=np.int32)
    table = pa.table({"window_id": pa.array(ids),
                      "input_ids": pa.array(list(tokens), type=pa.list_(pa.int32())),
                      "cluster_k2": pa.array(rng.integers(0, 2, n).astype(np.int32))})
    per_file = a.groups * a.rows
    with publish(layout.shards("generic"), stage="shards", config={"bench": "data_feed"}) as out:
        for i in range(a.files):
            pq.write_table(table.slice(i * per_file, per_file),
                           os.path.join(out.local_dir, f"part-{i:05d}.parquet"), row_group_size=a.rows)
    files = sorted(os.path.join(layout.shards("generic"), f) for f in os.listdir(layout.shards("generic"))
                   if f.endswith(".parquet"))
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    return {"files": len(files), "row_groups": groups, "rows": n, "valid_rows": a.valid,
            "train_rows": n - a.valid, "seq_len": a.seq_len, "rows_per_group": a.rows,
            "bytes_on_disk": sum(os.path.getsize(f) for f in files)}


def chunk_bytes(plan, world: int, columns: list[str]) -> list[int]:
    """Per-rank compressed size of the column chunks its pieces need (the floor of any reader:
    what is read beyond it is footer / speculative tail reads)."""
    meta: dict[str, pq.FileMetaData] = {}
    out = []
    for part in plan.parts(world):
        total = 0
        for piece in part:
            md_ = meta.setdefault(piece.path, pq.ParquetFile(piece.path).metadata)
            rg = md_.row_group(piece.row_group)
            total += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                         if rg.column(c).path_in_schema.split(".")[0] in columns)
        out.append(total)
    return out


def stream_bytes(plan, world: int) -> list[int]:
    """Per-rank bytes of the rank streams read straight through Ray Data (no Train)."""
    out = []
    for ds in plan.rank_streams(world):
        out.append(int(sum(int(b["read_bytes"].sum())
                           for b in ds.iter_batches(batch_size=None, batch_format="numpy"))))
    return out


def train_run(root: str, a, world: int) -> dict:
    """One real training run of exactly one epoch with ``world`` workers; its last report."""
    layout = RunLayout(root)
    shards = open_shards(layout, "generic", "bench", [], a.seq_len)
    plan = shard_dataset(shards, seed=a.seed, split="train", fraction=a.fraction)
    kept = sum(plan.kept())
    per_rank = kept // world
    rank_rows = a.micro_batch
    window_rows = max(a.shuffle_window // (rank_rows * world), 1) * rank_rows
    if per_rank % window_rows or kept % world:
        raise SystemExit(f"{kept} kept rows do not cut into whole windows of {window_rows} rows "
                         f"for {world} workers; change --valid / --shuffle-window")
    steps = per_rank // rank_rows
    valid = valid_dataset(shard_dataset(shards, seed=a.seed, split="valid", fraction=a.fraction),
                          rank_rows * world, "bench")
    t = TrainConfig(micro_batch=a.micro_batch, lr=3e-3, warmup=2, eval_every=steps, ckpt_every=steps,
                    eval_batches=1, log_every=max(steps // 4, 1), shuffle_window=a.shuffle_window)
    spec = FamilySpec("slm", a.size, a.vocab, a.seq_len)
    loop = pretraining_config(t, spec, steps=steps, seed=a.seed, data="generic",
                              run_name=f"feed-w{world}", storage=os.path.join(root, "runs"), logger="none")
    run = RunSpec(loop, ScalingConfig(num_workers=world, cpus_per_worker=a.cpus_per_worker, max_failures=0))
    t0 = time.time()
    out = run_training(run, plan, valid)
    seconds = time.time() - t0
    m = out["metrics"]
    return {"workers": world, "steps": steps, "rows_per_worker": per_rank, "kept_rows": kept,
            "seconds": round(seconds, 1), "finished": out["finished"], "last_step": m.get("step"),
            "read_bytes_total": int(m["data/read_bytes"]),
            "read_bytes_worker_max": int(m["data/read_bytes_worker_max"]),
            "read_bytes_worker_min": int(m["data/read_bytes_worker_min"]),
            "pieces_per_worker": [len(p) for p in plan.parts(world)],
            "column_chunk_bytes_per_worker": chunk_bytes(plan, world, ["input_ids", "window_id"]),
            "stream_bytes_per_worker": stream_bytes(plan, world)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--groups", type=int, default=4, help="row groups per file")
    ap.add_argument("--rows", type=int, default=256, help="windows per row group")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--valid", type=int, default=512, help="held-out rows (exactly)")
    ap.add_argument("--fraction", type=float, default=0.03, help="pretrain.valid_fraction")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--shuffle-window", type=int, default=512)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1,
                    help="data and row-group order (1: the 2-worker cut falls inside a row group)")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()

    root = tempfile.mkdtemp(prefix="slm-bench-feed-")
    sizes = write_inputs(root, a)
    with ray_session(ClusterConfig(num_cpus=2)):
        runs = {w: train_run(root, a, w) for w in (1, 2)}
    one, two = runs[1], runs[2]
    one_bytes = one["read_bytes_worker_max"]
    ratio = two["read_bytes_worker_max"] / one_bytes
    ratio_min = two["read_bytes_worker_min"] / one_bytes
    ok = abs(ratio / GOAL - 1) <= TOLERANCE and abs(ratio_min / GOAL - 1) <= TOLERANCE
    like_for_like = all(r["read_bytes_worker_max"] == max(r["stream_bytes_per_worker"])
                        and r["read_bytes_worker_min"] == min(r["stream_bytes_per_worker"])
                        and r["last_step"] == r["steps"] for r in runs.values())
    result = {
        "bench": "data_feed", "through": "ray train run (models/launch.py run_training, TorchTrainer "
                                        "+ DeepSpeed), one epoch each; cross-checked against the "
                                        "Ray Data rank streams",
        "goal": "2-worker per-worker max read bytes / 1-worker read bytes = 0.5 +- 10 %",
        "ratio_max": round(ratio, 4), "ratio_min": round(ratio_min, 4),
        "pass": bool(ok), "train_bytes_match_streams": bool(like_for_like),
        "one_worker_bytes": one_bytes,
        "two_worker_bytes_per_worker": {"max": two["read_bytes_worker_max"], "min": two["read_bytes_worker_min"]},
        "total_bytes": {"1": one["read_bytes_total"], "2": two["read_bytes_total"]},
        "total_overhead_2_vs_1": round(two["read_bytes_total"] / one["read_bytes_total"] - 1, 4),
        # bytes read beyond the needed column chunks (footer + pyarrow's speculative tail read,
        # once per piece), as a fraction of the bytes read
        "beyond_column_chunks_fraction_1w": round(1 - one["column_chunk_bytes_per_worker"][0] / one_bytes, 4),
        "runs": runs, "sizes": sizes,
        "settings": {"micro_batch": a.micro_batch, "shuffle_window": a.shuffle_window, "size": a.size,
                     "cpus_per_worker": a.cpus_per_worker, "valid_fraction": a.fraction, "ray_cpus": 2},
        "machine": machine(),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"shards: {sizes['files']} files, {sizes['row_groups']} row groups of {a.rows} x {a.seq_len}-token "
          f"windows, {sizes['bytes_on_disk'] / 1e6:.1f} MB")
    for r in (one, two):
        print(f"{r['workers']} worker(s): {r['steps']} steps, bytes/worker max {r['read_bytes_worker_max']:,} "
              f"min {r['read_bytes_worker_min']:,}, total {r['read_bytes_total']:,} ({r['seconds']} s); "
              f"streams {r['stream_bytes_per_worker']}")
    print(f"SUMMARY per-worker bytes 2w/1w = {ratio:.3f} (max) / {ratio_min:.3f} (min) "
          f"(goal 0.5 +- 10 %: {'PASS' if ok else 'FAIL'}); train == streams: {like_for_like}; "
          f"{100 * result['beyond_column_chunks_fraction_1w']:.0f} % of the bytes are beyond the "
          f"needed column chunks; wrote {a.out}")


if __name__ == "__main__":
    main()
