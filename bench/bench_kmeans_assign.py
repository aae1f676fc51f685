"""k-means in the pipeline vs scikit-learn: distributed assignment, and (``--fit``) the fit.

Assignment (default): ``slm.pipeline.kmeans.assign`` vs scikit-learn ``predict``, both artifact
to artifact on the same data: parquet embeddings in, parquet (unit_id, tokens, cluster, distance) out.
The scikit-learn side (a Ray task holding every core, so that it runs at the Ray workers'
niceness) reads the parquet files with pyarrow, calls ``KMeans.predict`` (its OpenMP/BLAS
threads use every core), computes the distance to the chosen centroid and writes one
parquet file; the Ray side is the pipeline stage (``assign``: a Ray task per input file that
reads it in batches, one matrix multiply + argmin per batch, and writes its rows). The sides alternate (``--pairs``: each side first in half the pairs; each timed run follows an
uncounted run of the same side, since the first run after a switch is slower for either side) inside one
embedded Ray session (started before, not timed), after one uncounted warm-up run of each side:
the first Ray run also starts and warms the Ray workers (imports), a once-per-session cost that
the pipeline pays in its first stage, recorded as ``ray_first_run_seconds``. Cluster ids are
checked to be equal. Fitting is not timed here.

    .venv/bin/python bench/bench_kmeans_assign.py --rows 200000 --k 1024
Target: ratio (sklearn seconds / Ray seconds) >= 1.0. Writes ``kmeans_assign_ratio`` and
``kmeans_assign`` to bench/results/data_pipeline.json.

Fit (``--fit``): the centroids fit as ``fit_all_centroids`` runs it, scikit-learn (k-means++ then
Lloyd) vs faiss (``faiss-cpu``: random init then Lloyd), same sample, k, iteration cap and
threads (every core); quality = inertia of each result computed the same way (goal: within 1 %).

    .venv/bin/python bench/bench_kmeans_assign.py --fit --rows 200000 --k 1024 --max-iter 20
Writes ``kmeans_fit`` to bench/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_info

from record import RESULTS, load_average, record  # bench/record.py (the script's folder is on sys.path)
from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session
from slm.layout import RunLayout
from slm.pipeline.artifacts import arrow_to_vectors, read_rows, vectors_to_arrow
from slm.pipeline.kmeans import ASSIGN_BATCH, CENTROIDS_FILE, assign, fit_with, nearest, save_centroids
from slm.stage import publish


def make_vectors(rows: int, dim: int, k: int, seed: int) -> np.ndarray:
    """Unit vectors around k/4 random centres (clustered like sentence embeddings, not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(k // 4, 1), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), rows)] + rng.normal(
        scale=0.7, size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_inputs(layout: RunLayout, rows: int, dim: int, k: int, files: int, seed: int):
    """Embeddings artifact + a fitted KMeans (centroids artifact), as the pipeline writes them."""
    x = make_vectors(rows, dim, k, seed)
    with publish(layout.embeddings("generic"), stage="embed", config={"bench": rows}) as out:
        for i, part in enumerate(np.array_split(np.arange(rows), files)):
            pq.write_table(pa.table({"unit_id": pa.array(part, pa.int64()),
                                     "tokens": pa.array(1 + part % 128, pa.int32()),
                                     "embedding": vectors_to_arrow(x[part])}),
                           os.path.join(out.local_dir, f"part-{i:05d}.parquet"))
    # centroids from a few Lloyd steps started at k rows (sklearn's k-means++ init alone takes
    # minutes at k=1024 on 2 cores; the assignment's cost does not depend on how they were found)
    km = KMeans(n_clusters=k, init=x[:k], n_init=1, max_iter=3).fit(x[: max(4 * k, 2000)])
    with publish(layout.kmeans(k), stage="kmeans", config={"k": k}) as out:
        save_centroids(out.file(CENTROIDS_FILE), km.cluster_centers_, np.zeros(k, np.float32))
    return km


def sklearn_side(layout: RunLayout, km, out_file: str) -> tuple[float, np.ndarray, dict]:
    """Read + predict + write; also each phase's seconds and the task's thread pools, so that
    a slow run shows which phase slowed (the first run after a switch of sides was up to 4x
    slower, in the phases that allocate fresh memory)."""
    t0 = time.perf_counter()
    table = read_rows(layout.embeddings("generic"))
    x = arrow_to_vectors(table.column("embedding"))
    t1 = time.perf_counter()
    labels = km.predict(x)
    t2 = time.perf_counter()
    # the distance to the chosen centroid, a batch at a time as the stage does: in one go,
    # x - centres[labels] allocated two fresh 300 MB arrays, and took 0.4-2.8 s from run to run
    dist = np.empty(len(x), np.float32)
    for i in range(0, len(x), ASSIGN_BATCH):
        rows = slice(i, i + ASSIGN_BATCH)
        dist[rows] = np.linalg.norm(x[rows] - km.cluster_centers_[labels[rows]], axis=1)
    t3 = time.perf_counter()
    pq.write_table(pa.table({"unit_id": table.column("unit_id"), "tokens": table.column("tokens"),
                             "cluster": pa.array(labels.astype(np.int32)),
                             "distance": pa.array(dist)}), out_file)
    t4 = time.perf_counter()
    info = {"read": t1 - t0, "predict": t2 - t1, "distance": t3 - t2, "write": t4 - t3, "pid": os.getpid(),
            "threads": sorted({(p["user_api"], p["num_threads"]) for p in threadpool_info()})}
    return t4 - t0, labels, info


def ray_side(layout: RunLayout, k: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    uri = assign(layout, k, "generic", force=True)
    seconds = time.perf_counter() - t0
    got = read_rows(uri).sort_by("unit_id")
    return seconds, got.column("cluster").to_numpy()


def bench_assign(a: argparse.Namespace) -> None:
    load0 = load_average()
    with tempfile.TemporaryDirectory(prefix="slm-bench-assign-") as tmp:
        layout = RunLayout(os.path.join(tmp, "run"))
        km = write_inputs(layout, a.rows, a.dim, a.k, a.files, a.seed)
        out_file = os.path.join(tmp, "sklearn.parquet")
        times: dict[str, list[float]] = {"sklearn": [], "ray": []}
        phases: list[dict] = []  # the sklearn side's phases, in run order
        with ray_session(ClusterConfig(num_cpus=a.cores)):
            # the sklearn side runs as a Ray task holding every core: same niceness as the
            # assign tasks (Ray's workers run at 15; a niceness-0 driver would take the CPU from
            # them on a shared machine) and OMP/BLAS threads = cores, as Ray sets them
            plain = ray.remote(num_cpus=a.cores)(sklearn_side)
            first, _ = ray_side(layout, a.k)  # warm-up (uncounted): starts the Ray workers
            ray.get(plain.remote(layout, km, out_file))  # warm-up (uncounted): imports, cache
            for i in range(a.pairs):
                # each side is timed right after an uncounted run of itself: the first run
                # after a switch is slower for either side (scikit-learn's phases that allocate
                # fresh memory, up to 8x; Ray's stage ~1.2 s), so plain
                # ABBA measured mostly that penalty, not the sides
                sides = ("sklearn", "ray") if i % 2 == 0 else ("ray", "sklearn")
                for side in sides:
                    if side == "sklearn":
                        ray.get(plain.remote(layout, km, out_file))  # switch-in, uncounted
                        s_sec, s_labels, info = ray.get(plain.remote(layout, km, out_file))
                    else:
                        ray_side(layout, a.k)  # switch-in, uncounted
                        r_sec, r_labels = ray_side(layout, a.k)
                phases.append({"pair": i, **{
                    k: round(v, 3) if isinstance(v, float) else v for k, v in info.items()}})
                times["sklearn"].append(s_sec)
                times["ray"].append(r_sec)
        agree = float((s_labels == r_labels).mean())
    s_sum, r_sum = sum(times["sklearn"]), sum(times["ray"])
    ratio = s_sum / r_sum
    print(f"rows={a.rows} dim={a.dim} k={a.k} files={a.files} cores={a.cores} pairs={a.pairs}")
    print(f"sklearn read+predict+dist+write: {times['sklearn']} s  {a.rows * a.pairs / s_sum:10.0f} rows/s")
    print(f"Ray assign stage:                {times['ray']} s  {a.rows * a.pairs / r_sum:10.0f} rows/s "
          f"(first run, uncounted: {first:.2f} s)")
    for ph in phases:
        print(f"sklearn phases: {ph}")
    print(f"cluster ids equal on {agree:.4%} of rows")
    print(f"RATIO ray/sklearn throughput = {ratio:.3f}  (target >= 1.0)")
    record({"kmeans_assign_ratio": round(ratio, 3), "kmeans_assign": {
        "goal": "sklearn read+predict+distance+write seconds / assign stage seconds >= 1.0",
        "ratio": round(ratio, 3), "pass": ratio >= 1.0,
        # the fastest run of each side: scikit-learn's read of the whole table varies the most
        "ratio_of_fastest_runs": round(min(times["sklearn"]) / min(times["ray"]), 3), "order": "warm-up of each side, then pairs (alternating which side goes first), each side timed right after an uncounted run of itself",
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "ray_first_run_seconds": round(first, 3), "cluster_ids_equal": agree,
        "sklearn_phases": phases,
        "sizes": {"rows": a.rows, "dim": a.dim, "k": a.k, "files": a.files, "cores": a.cores},
        "load_average_at_start": load0}}, a.results)


def bench_fit(a: argparse.Namespace) -> None:
    load0 = load_average()
    x = make_vectors(a.rows, a.dim, a.k, a.seed)
    res: dict[str, dict] = {}
    sizes = {"rows": a.rows, "dim": a.dim, "k": a.k, "max_iter": a.max_iter, "threads": os.cpu_count()}
    for backend in ("faiss", "sklearn"):  # faiss first: the short one, so a cut run still tells
        t0 = time.perf_counter()
        centroids, iters = fit_with(backend, x, a.k, a.seed, n_init=1, max_iter=a.max_iter)
        seconds = time.perf_counter() - t0
        _, dist = nearest(x, centroids)
        res[backend] = {"seconds": round(seconds, 2), "iterations": iters,
                        "inertia": float(np.square(dist, dtype=np.float64).sum())}
        print(f"{backend:8s} fit {seconds:8.1f} s  {iters} iterations  inertia "
              f"{res[backend]['inertia']:.1f}", flush=True)
        if backend == "faiss":  # kept if the sklearn fit is cut short
            record({"kmeans_fit": {"complete": False, **res, "sizes": sizes,
                                   "load_average_at_start": load0}}, a.results)
    speedup = res["sklearn"]["seconds"] / res["faiss"]["seconds"]
    rel = res["faiss"]["inertia"] / res["sklearn"]["inertia"] - 1.0
    print(f"RATIO sklearn/faiss fit seconds = {speedup:.2f}; faiss inertia {rel:+.3%} vs sklearn "
          "(quality goal: within 1 %)")
    record({"kmeans_fit": {
        "goal": "faiss vs sklearn fit seconds at k=1024 on 200k x 384; inertia within 1 %",
        "complete": True,
        "sklearn_over_faiss_seconds": round(speedup, 2), "faiss_inertia_vs_sklearn": round(rel, 5),
        "quality_pass": abs(rel) <= 0.01, **res,
        "sizes": sizes, "load_average_at_start": load0}}, a.results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--pairs", type=int, default=2, help="sklearn/Ray pairs timed (ABBA: the first side alternates)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", action="store_true", help="benchmark the fit (sklearn vs faiss)")
    p.add_argument("--max-iter", type=int, default=20, help="--fit: Lloyd iterations cap (both)")
    p.add_argument("--results", default=RESULTS, help="JSON file the figures are merged into")
    a = p.parse_args(argv)
    bench_fit(a) if a.fit else bench_assign(a)


if __name__ == "__main__":
    main()
