"""A one-minute check of a cluster: `slm submit --follow -- python -m slm.cluster.smoke`.

It connects like every slm command (``ray_session``: inside a job, RAY_ADDRESS points at the
cluster), prints the cluster's resources, runs a tiny Ray Data pipeline across the workers and
reports where the driver and a worker import ``slm`` from, so a user sees that the submitted
checkout (not an old copy in the image) is what runs.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import ray
import ray.data

import slm
from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session


def _square(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"id": batch["id"], "sq": batch["id"].astype(np.int64) ** 2}


def _where_slm() -> str:
    return slm.__file__


def run_smoke(rows: int = 1000) -> dict:
    """Sum of squares of ``range(rows)`` computed by Ray Data tasks, plus import locations."""
    ds = ray.data.range(rows, override_num_blocks=4).map_batches(
        _square, batch_format="numpy", compute=ray.data.TaskPoolStrategy())
    total = sum(int(b["sq"].sum()) for b in ds.iter_batches(batch_format="numpy"))
    return {
        "rows": rows,
        "sum_of_squares": total,
        "driver_slm": slm.__file__,
        "worker_slm": ray.get(ray.remote(_where_slm).remote()),
        "resources": {k: v for k, v in sorted(ray.cluster_resources().items())
                      if not k.startswith("node:")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slm.cluster.smoke", description=__doc__)
    p.add_argument("--rows", type=int, default=1000)
    args = p.parse_args(argv)
    with ray_session(ClusterConfig()):
        r = run_smoke(args.rows)
    for key, value in r.items():
        print(f"smoke {key}: {value}")
    expected = sum(i * i for i in range(args.rows))
    if r["sum_of_squares"] != expected:
        print(f"smoke FAILED: sum {r['sum_of_squares']} != {expected}", file=sys.stderr)
        return 1
    print("smoke ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
