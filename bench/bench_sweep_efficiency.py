"""Benchmark: how much of a sweep's time is training (issue 12).

Runs the same specialization sweeps twice on one finished run (data and pretraining done), in
one Ray session, once per trial runtime:

* ``train`` (before): every trial starts a Ray Train worker group (Train-in-Tune), a Ray Data
  pipeline per dataset, and evaluates its test split in the trial's driver;
* ``local`` (after): every trial trains inside its Tune trial's actor, reused for the next
  trial, on rows it read once (tune/finetune.py, models/runtime.py).

Grids: ``demo`` (the recipe's own sweep, every pretraining level) and ``fifty`` (5 methods x 5
seeds x 2 domain sizes = 50 trials, from the final pretrained models only). Each sweep gets a fresh name, so nothing is reused. Figures per (grid, runtime):

* ``sweep_efficiency`` = sum of the trials' device seconds (their own training steps and
  evaluations, as the loop measured them) / sum of the trials' wall seconds (from the trial's
  start to its publication, in its process) — the issue's definition;
* ``slot_efficiency`` = the same device seconds / (sweep wall x concurrent trials): also counts
  Tune's scheduling, actor start-up and everything between trials;
* the phases of the trials' wall time (data, start, train, eval, publish, other) and, for the
  sweep, ``scheduling`` = sweep wall x slots - sum of trial walls.

    python bench/bench_sweep_efficiency.py --run runs/demo            # after `slm run`
    python bench/bench_sweep_efficiency.py --run runs/demo --sweeps demo/local

Writes bench/results/sweep_efficiency.json (top-level ``sweep_efficiency``: the local runtime's
figure on each grid). Not a test: the two 50-trial sweeps take most of an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import pyarrow.parquet as pq

from slm.cluster.ray_env import ray_session
from slm.config import load_run_recipe, resolve_paths
from slm.stage import filesystem
from slm.tune.grid import sweep_trials
from slm.tune.specialize import PHASES
from slm.tune.sweep import _concurrency, run_sweep

from machine_info import machine  # bench/machine_info.py (the script's own folder is on sys.path)

GRIDS = ("demo", "fifty")
RUNTIMES = ("train", "local")


def grid_recipe(recipe, grid: str, runtime: str, stamp: str):
    """The run's recipe with one bench sweep: a fresh name, the runtime, the grid."""
    sw = dataclasses.replace(recipe.sweep, name=f"bench-{grid}-{runtime}-{stamp}", trial_runtime=runtime,
                             workers_per_trial=1, asha=False)
    if grid == "fifty":
        sw = dataclasses.replace(sw, methods=["slm", "pn", "mix", "is", "nopt"], seeds=[0, 1, 2, 3, 4],
                                 domain_tokens=list(recipe.data.domain_train_tokens)[:2],
                                 domains=(recipe.sweep.domains or [])[:1] or sw.domains)
        return dataclasses.replace(recipe, sweep=dataclasses.replace(sw, levels=[1.0]))
    return dataclasses.replace(recipe, sweep=sw)


def measure(recipe) -> dict:
    trials = sweep_trials(recipe)
    slots = _concurrency(recipe)
    t0 = time.perf_counter()
    out = run_sweep(recipe)
    wall = time.perf_counter() - t0
    fs, path = filesystem(out)
    rows = pq.read_table(fs.open_input_file(path)).to_pylist()
    device = sum(r["trial_device_seconds"] + r["eval_device_seconds"] for r in rows)
    trial_wall = sum(r["wall_seconds"] for r in rows)
    phases = {k: round(sum(r[f"phase_{k}_seconds"] for r in rows), 2) for k in (*PHASES, "other")}
    return {"sweep": recipe.sweep.name, "trials": len(rows), "grid_trials": len(trials),
            # rows >= grid (teachers outside the grid add rows); False: stopped (Ctrl-C) midway
            "complete": len(rows) >= len(trials),
            "concurrent_trials": slots, "sweep_wall_seconds": round(wall, 2),
            "trial_wall_seconds": round(trial_wall, 2), "device_seconds": round(device, 2),
            "train_device_seconds": round(sum(r["trial_device_seconds"] for r in rows), 2),
            "eval_device_seconds": round(sum(r["eval_device_seconds"] for r in rows), 2),
            "sweep_efficiency": round(device / trial_wall, 4),
            "slot_efficiency": round(device / (wall * slots), 4),
            "phases_seconds": {**phases, "scheduling": round(max(wall * slots - trial_wall, 0.0), 2)},
            "trials_per_minute": round(60 * len(rows) / wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a finished run (data and pretraining done)")
    ap.add_argument("--sweeps", default="demo/train,demo/local,fifty/local,fifty/train",
                    help=f"<grid>/<runtime> pairs in the order run (grids {GRIDS}, runtimes {RUNTIMES}); "
                         "the JSON is written after each")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sweep_efficiency.json"))
    args = ap.parse_args()
    recipe = resolve_paths(load_run_recipe(args.run))
    stamp = time.strftime("%Y%m%d%H%M%S")
    results: dict = {"machine": machine(), "run": args.run, "command": " ".join(sys.argv), "sweeps": {}}
    with ray_session(recipe.cluster):
        for pair in args.sweeps.split(","):
            grid, runtime = pair.split("/")
            r = measure(grid_recipe(recipe, grid, runtime, stamp))
            results["sweeps"][pair] = r
            print(f"{pair}: {json.dumps(r)}", flush=True)
            write(results, args.out)  # after every sweep: a long bench cut short keeps its figures
    print(json.dumps({k: v for k, v in results.items() if k != "sweeps"}, indent=2))


def write(results: dict, out: str) -> None:
    results["sweep_efficiency"] = {g.split("/")[0]: r["sweep_efficiency"]
                                   for g, r in results["sweeps"].items() if g.endswith("/local")}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
