"""The data pipeline with its run_dir on a local S3 server vs on local disk, same corpus.

A real S3-compatible server (``slm.cluster.local.S3Server``: moto_server on 127.0.0.1) holds one
bucket; its AWS_* variables are put in the environment before Ray starts, so every Ray worker
reaches it. The corpus is the tiny docstring corpus of tests/spec_run.py (``build_corpus``), on
local disk in both cases; the recipe is tests/spec_run.py ``tiny_recipe_dict`` with only
``run_dir`` changed (a fresh local directory, or a fresh ``s3://<bucket>/...`` prefix, per run).
Every run is the whole ``slm.pipeline.run.run_pipeline`` (corpus, tokenizer, windows, MiniLM
embeddings, k-means, assignments, histograms, shards, SLM-is shards) in the same process and the
same embedded Ray; the order alternates (``--first``, other, other, ``--first``, ...) and
``--warmup`` runs a local pipeline first that is not counted. ``--append`` adds the runs to those
already in the results file (two invocations, ``--first s3`` then ``--first local --append``,
give each side one run first and one second in ~5 min each on 2 cores). Ratio = local seconds /
S3 seconds (means over the runs). The load average is recorded: other work on the machine
moves the timings.

    .venv/bin/python bench/bench_pipeline_s3.py [--repeats 1 --first s3 --warmup --append]
Goal: ratio >= 0.8. Writes bench/results/pipeline_s3.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine  # bench/machine_info.py (the script's own folder is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedding model is local

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pipeline_s3.json")
GOAL = 0.8
BUCKET = "slm-bench"


def run_once(base: str, paths: dict[str, str], run_dir: str) -> dict:
    """One whole pipeline run with ``run_dir``; wall seconds and per-stage seconds."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from spec_run import tiny_recipe_dict

    from slm.config import Recipe
    from slm.configkit import from_dict, validate
    from slm.pipeline.run import run_pipeline

    recipe = from_dict(Recipe, tiny_recipe_dict(run_dir, paths))
    validate(recipe)
    t0 = time.time()
    out = run_pipeline(recipe)
    wall = time.time() - t0
    assert all(s["status"] == "done" for s in out["stages"]), "a fresh run_dir skipped a stage"
    # a local run_dir relative to the bench's temp dir: the JSON names no path of this machine
    shown = run_dir if "://" in run_dir else os.path.relpath(run_dir, base)
    return {"run_dir": shown, "seconds": round(wall, 2), "pipeline_seconds": out["seconds"],
            "stage_seconds": round(sum(s["seconds"] for s in out["stages"]), 2),
            "per_stage": {s["stage"]: round(s["seconds"], 2) for s in out["stages"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per side (order alternates)")
    ap.add_argument("--warmup", action="store_true", help="one uncounted local run first")
    ap.add_argument("--first", choices=["s3", "local"], default="s3",
                    help="which side runs first in this process (it pays Ray's first-run warm-ups)")
    ap.add_argument("--append", action="store_true",
                    help="add this invocation's runs to those already in --out (e.g. one invocation "
                         "--first s3, one --first local: each side once first and once second)")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()
    load0 = list(os.getloadavg())

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from spec_run import build_corpus

    from slm.cluster.config import ClusterConfig
    from slm.cluster.local import S3Server
    from slm.cluster.ray_env import ray_session

    base = tempfile.mkdtemp(prefix="slm-bench-s3-")
    paths = build_corpus(Path(base) / "corpus")
    corpus_bytes = sum(f.stat().st_size for f in (Path(base) / "corpus").rglob("*.txt"))
    server = S3Server.start(os.path.join(base, "s3"))
    runs: dict[str, list[dict]] = {"local": [], "s3": []}
    warm = None
    try:
        server.create_bucket(BUCKET)
        os.environ.update(server.env)  # before Ray starts: every worker reaches the server
        with ray_session(ClusterConfig(num_cpus=2)):
            if a.warmup:
                warm = run_once(base, paths, os.path.join(base, "run-warmup"))
            other = "local" if a.first == "s3" else "s3"
            order = [side for i in range(a.repeats)
                     for side in ((a.first, other) if i % 2 == 0 else (other, a.first))]
            for i, side in enumerate(order):
                run_dir = (f"s3://{BUCKET}/run-{i}" if side == "s3" else os.path.join(base, f"run-{i}"))
                r = run_once(base, paths, run_dir)
                r["order"] = i
                runs[side].append(r)
                print(f"run {i}: {side:5s} {r['seconds']:7.1f} s (stages {r['stage_seconds']:.1f} s)", flush=True)
    finally:
        server.stop()
    invocation = {"first": a.first, "repeats": a.repeats, "warmup": a.warmup, "load_average_at_start": load0,
                  "load_average_at_end": list(os.getloadavg()),
                  "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    for side in runs.values():
        for r in side:
            r["invocation"] = invocation["date"]
    invocations = [invocation]
    if a.append and os.path.exists(a.out):
        with open(a.out) as f:
            before = json.load(f)
        for side in runs:
            runs[side] = before["runs"][side] + runs[side]
        invocations = before.get("invocations", []) + invocations

    mean = {k: sum(r["seconds"] for r in v) / len(v) for k, v in runs.items()}
    ratio = mean["local"] / mean["s3"]
    # each invocation's own ratio (its runs share one Ray and about the same machine load)
    for inv in invocations:
        mine = {k: [r["seconds"] for r in v if r.get("invocation") == inv["date"]] for k, v in runs.items()}
        if mine["local"] and mine["s3"]:
            inv["ratio"] = round((sum(mine["local"]) / len(mine["local"])) / (sum(mine["s3"]) / len(mine["s3"])), 3)
    stages = sorted(runs["local"][0]["per_stage"])
    per_stage = {s: {"local": round(sum(r["per_stage"][s] for r in runs["local"]) / len(runs["local"]), 2),
                     "s3": round(sum(r["per_stage"][s] for r in runs["s3"]) / len(runs["s3"]), 2)}
                 for s in stages}
    slowest_s3 = sorted(per_stage, key=lambda s: per_stage[s]["local"] - per_stage[s]["s3"])[:5]
    result = {
        "bench": "pipeline_s3",
        "goal": "local seconds / S3 seconds >= 0.8 (whole run_pipeline, same corpus, same embedded Ray)",
        "ratio": round(ratio, 3), "pass": ratio >= GOAL,
        "ratio_is": "mean local seconds / mean S3 seconds over every run of every invocation",
        "seconds": {"local_mean": round(mean["local"], 2), "s3_mean": round(mean["s3"], 2)},
        "per_stage_mean": per_stage,
        "largest_s3_penalties": {s: round(per_stage[s]["s3"] - per_stage[s]["local"], 2) for s in slowest_s3},
        "runs": runs, "warmup_run": warm,
        "sizes": {"corpus_bytes": corpus_bytes, "recipe": "tests/spec_run.py tiny_recipe_dict",
                  "runs_per_side": len(runs["local"]), "stages": len(stages)},
        "invocations": invocations,
        "s3": {"server": "moto_server (slm.cluster.local.S3Server) on 127.0.0.1", "bucket": BUCKET},
        "machine": machine(),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print("largest S3 penalties (s):", ", ".join(f"{k} {v:+.1f}" for k, v in result["largest_s3_penalties"].items()))
    print(f"SUMMARY local {mean['local']:.1f} s / S3 {mean['s3']:.1f} s = {ratio:.3f} "
          f"(goal >= {GOAL}: {'PASS' if ratio >= GOAL else 'FAIL'}); wrote {a.out}")


if __name__ == "__main__":
    main()
