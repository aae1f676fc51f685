"""Distributed cluster assignment (``slm.pipeline.kmeans.assign``) vs scikit-learn ``predict``.

Both go artifact to artifact on the same data: parquet embeddings in, parquet
(window_id, cluster, distance) out. The scikit-learn side reads the parquet files with pyarrow,
calls ``KMeans.predict`` (its OpenMP/BLAS threads use every core), computes the distance to the
chosen centroid and writes one parquet file; the Ray side is the pipeline stage (streamed read,
one matrix multiply + argmin per batch in parallel tasks, parquet write). Their cluster ids are
checked to be equal. Fitting is not timed (done once, beforehand, on a sample).

    .venv/bin/python bench/bench_kmeans_assign.py --rows 200000 --k 1024
Target: ratio (sklearn seconds / Ray seconds) >= 1.0.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.cluster import KMeans

from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session
from slm.layout import RunLayout
from slm.pipeline.artifacts import arrow_to_vectors, read_rows, vectors_to_arrow
from slm.pipeline.kmeans import CENTROIDS_FILE, assign, save_centroids
from slm.stage import publish


def write_inputs(layout: RunLayout, rows: int, dim: int, k: int, files: int, seed: int):
    """Embeddings artifact + a fitted KMeans (centroids artifact), as the pipeline writes them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(k // 4, 1), dim)).astype(np.float32)
    with publish(layout.embeddings("generic"), stage="embed", config={"bench": rows}) as out:
        for i, part in enumerate(np.array_split(np.arange(rows), files)):
            x = centres[rng.integers(0, len(centres), len(part))] + rng.normal(
                scale=0.7, size=(len(part), dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            pq.write_table(pa.table({"window_id": pa.array(part, pa.int64()),
                                     "embedding": vectors_to_arrow(x)}),
                           os.path.join(out.local_dir, f"part-{i:05d}.parquet"))
            if i == 0:
                sample = x[: max(4 * k, 2000)]
    km = KMeans(n_clusters=k, n_init=1, max_iter=10, random_state=seed).fit(sample)
    with publish(layout.kmeans(k), stage="kmeans", config={"k": k}) as out:
        save_centroids(out.file(CENTROIDS_FILE), km.cluster_centers_, np.zeros(k, np.float32))
    return km


def sklearn_side(layout: RunLayout, km, out_file: str) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    table = read_rows(layout.embeddings("generic"))
    x = arrow_to_vectors(table.column("embedding"))
    labels = km.predict(x)
    dist = np.linalg.norm(x - km.cluster_centers_[labels], axis=1).astype(np.float32)
    pq.write_table(pa.table({"window_id": table.column("window_id"),
                             "cluster": pa.array(labels.astype(np.int32)),
                             "distance": pa.array(dist)}), out_file)
    return time.perf_counter() - t0, labels


def ray_side(layout: RunLayout, k: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    uri = assign(layout, k, "generic")
    seconds = time.perf_counter() - t0
    got = read_rows(uri).sort_by("window_id")
    return seconds, got.column("cluster").to_numpy()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slm-bench-assign-") as tmp:
        layout = RunLayout(os.path.join(tmp, "run"))
        km = write_inputs(layout, a.rows, a.dim, a.k, a.files, a.seed)
        s_sec, s_labels = sklearn_side(layout, km, os.path.join(tmp, "sklearn.parquet"))
        with ray_session(ClusterConfig(num_cpus=a.cores)):
            r_sec, r_labels = ray_side(layout, a.k)
        agree = float((s_labels == r_labels).mean())
    print(f"rows={a.rows} dim={a.dim} k={a.k} files={a.files} cores={a.cores}")
    print(f"sklearn read+predict+write: {s_sec:8.2f} s  {a.rows / s_sec:10.0f} rows/s")
    print(f"Ray Data assign stage:      {r_sec:8.2f} s  {a.rows / r_sec:10.0f} rows/s")
    print(f"cluster ids equal on {agree:.4%} of rows")
    print(f"RATIO ray/sklearn throughput = {s_sec / r_sec:.3f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
