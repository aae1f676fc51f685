"""k-means over unit embeddings (pieces of one document), cluster assignment and cluster
histograms.

* ``fit_kmeans_all`` (``fit_kmeans``: one K): fits centroids of every K in one Ray task on
  one bounded, seeded sample of ``data/embeddings/generic``
  with ``kmeans.backend`` (scikit-learn: k-means++ then Lloyd; or faiss), optionally balanced
  (c-BTM style, see below), and writes ``data/kmeans-k<K>/centroids.safetensors``.
* ``assign_all``: one distributed pass for every set at every K (a Ray task per embeddings
  file, centroids in the object store, a matrix multiply and an argmin per batch and K) writing
  each ``data/assign-k<K>/<set>`` (unit_id, tokens, cluster, distance); ``assign_sets`` does
  one K, ``assign`` one set.
* ``histograms``: per-block partial counts summed on the driver (K numbers per block, never
  rows) into ``data/histograms-k<K>/<set>.json``. A histogram counts *tokens* (each unit weighs
  its length: a unit is 1 to seq_len tokens, and training sees tokens), ``"unit": "tokens"``.

scikit-learn or faiss: the fit runs once per k on a sample (``fit_sample`` rows). At the paper's
k=1024 on 200k × 384, 20 Lloyd iterations on 2 otherwise idle cores, scikit-learn (k-means++
init, then Lloyd) took 176 s and faiss-cpu (random init, Lloyd) 20.6 s, with an inertia 0.07 %
above scikit-learn's (bench_kmeans_assign.py --fit; on cores shared with other jobs scikit-learn
did not finish in 23 minutes), so faiss is offered as ``kmeans.backend: faiss`` (optional
extra ``slm[faiss]``: a native wheel, not on every platform; sklearn stays the default). The
distributed part that scales with the corpus (assignment) is ours and runs on Ray.

Balanced clusters (``balanced``): c-BTM trains experts on equal-sized clusters. We run a few
balanced Lloyd rounds (E-step: equal-size assignment from Sinkhorn dual prices; M-step: means)
from the fitted centroids, and store the final per-cluster prices as tensor ``offsets``.
Assignment is then ``argmin_c ||x - c||² - offset_c`` for every row independently, which keeps
the distributed pass embarrassingly parallel and gives near-equal sizes on the whole set
(the prices are fit on a sample of the same distribution). Unbalanced fits store zero offsets,
so the rule is plain nearest-centroid and agrees with ``KMeans.predict``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from safetensors.numpy import load, save

from slm.cluster.ray_env import configure_data_context
from slm.errors import InputError, StageError
from slm.hashing import hash_uniform
from slm.layout import RunLayout
from slm.pipeline.artifacts import (arrow_to_vectors, count_rows, input_files, owner_of,
                                    parquet_files, read_artifact, user_errors)
from slm.pipeline.config import FAISS_MISSING, KMeansConfig
from slm.stage import (Stage, exists, filesystem, input_fingerprints, join, manifest, read_json,
                       rebuild_fix,
                       write_json)

log = logging.getLogger(__name__)

CENTROIDS_FILE = "centroids.safetensors"
# Rows per assignment batch: bounds the [rows, K] score matrix (4096 × 1024 × 4 B = 16 MiB).
ASSIGN_BATCH = 4096
# Cap on the [rows, K] cost matrix the balancing step holds (rows are subsampled beyond it).
BALANCE_MAX_CELLS = 40_000_000


# --------------------------------------------------------------------------------------------
# Small numeric pieces (pure numpy, also used by importance.py and the benchmarks)
# --------------------------------------------------------------------------------------------

def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[n, K] squared Euclidean distances, as one matrix multiply."""
    xx = np.einsum("ij,ij->i", x, x)[:, None]
    cc = np.einsum("ij,ij->i", centroids, centroids)[None, :]
    return np.maximum(xx - 2.0 * (x @ centroids.T) + cc, 0.0)


def nearest(x: np.ndarray, centroids: np.ndarray, offsets: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(cluster int32, Euclidean distance float32) of each row: argmin ||x-c||² - offset_c."""
    x = x.astype(np.float32, copy=False)
    centroids = centroids.astype(np.float32, copy=False)
    off = np.zeros(len(centroids), np.float32) if offsets is None else offsets.astype(np.float32)
    # ||x||² is the same for every c, so the argmin needs only ||c||² - offset_c - 2 x·c: one
    # matrix multiply and one in-place add over [n, K] (the full d2 took four [n, K] passes,
    # ~30 % of the assignment's compute); d2 is then completed for the chosen centroid only.
    score = x @ centroids.T
    score *= -2.0
    score += np.einsum("ij,ij->i", centroids, centroids) - off
    cluster = np.argmin(score, axis=1)
    d2 = np.einsum("ij,ij->i", x, x) + score[np.arange(len(x)), cluster] + off[cluster]
    return cluster.astype(np.int32), np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def balance_offsets(x: np.ndarray, centroids: np.ndarray, seed: int = 0,
                    sinkhorn_iters: int = 100, refine_iters: int = 300) -> np.ndarray:
    """Per-cluster prices g such that ``argmin_c ||x-c||² - g_c`` splits ``x`` into (near)
    equal clusters. Sinkhorn (entropic optimal transport to the uniform cluster marginal) gives
    the prices; a few hundred hard price updates then remove what entropy smoothing left."""
    rng = np.random.default_rng(seed)
    n, k = len(x), len(centroids)
    if n * k > BALANCE_MAX_CELLS:
        x = x[rng.choice(n, BALANCE_MAX_CELLS // k, replace=False)]
        n = len(x)
    cost = squared_distances(x.astype(np.float64), centroids.astype(np.float64))
    eps = max(float(cost.std()) * 0.05, 1e-6)
    g = np.zeros(k)
    log_col = np.log(n / k)
    for _ in range(sinkhorn_iters):
        f = -eps * _logsumexp((g[None, :] - cost) / eps, axis=1)
        g = eps * log_col - eps * _logsumexp((f[:, None] - cost) / eps, axis=0)
    g -= g.mean()
    target = n / k
    best, best_dev = g.copy(), np.inf
    step = eps
    for _ in range(refine_iters):
        sizes = np.bincount(np.argmin(cost - g[None, :], axis=1), minlength=k)
        dev = np.abs(sizes - target).max()
        if dev < best_dev:
            best, best_dev = g.copy(), dev
        if dev <= max(1.0, 0.01 * target):
            break
        g -= step * (sizes - target) / target  # overfull clusters get dearer
        step *= 0.98
    return best.astype(np.float32)


def balanced_lloyd(x: np.ndarray, centroids: np.ndarray, rounds: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Balanced k-means from ``centroids``: E-step by equal-size prices, M-step by means.
    Returns (centroids, offsets)."""
    c = centroids.astype(np.float32).copy()
    for r in range(rounds):
        off = balance_offsets(x, c, seed=seed + r)
        labels, _ = nearest(x, c, off)
        for j in range(len(c)):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(axis=0)
    return c, balance_offsets(x, c, seed=seed + rounds)


# --------------------------------------------------------------------------------------------
# Centroids artifact
# --------------------------------------------------------------------------------------------

def save_centroids(path: str, centroids: np.ndarray, offsets: np.ndarray) -> None:
    blob = save({"centroids": np.ascontiguousarray(centroids, dtype=np.float32),
                 "offsets": np.ascontiguousarray(offsets, dtype=np.float32)})
    fs, p = filesystem(path)
    with fs.open_output_stream(p) as f:
        f.write(blob)


def load_centroids(layout: RunLayout, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [K, dim] float32, offsets [K] float32) of ``data/kmeans-k<K>``."""
    uri = layout.kmeans(k)
    if manifest(uri) is None:
        raise InputError(f"k-means artifact '{uri}' is not done; run fit_kmeans for k={k} first")
    fs, p = filesystem(join(uri, CENTROIDS_FILE))
    with fs.open_input_stream(p) as f:
        tensors = load(f.read())
    c = tensors["centroids"]
    return c, tensors.get("offsets", np.zeros(len(c), dtype=np.float32))


# --------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------

def _keep_sampled(batch: pa.Table, fraction: float, seed: int) -> pa.Table:
    ids = batch.column("unit_id").to_numpy()
    return batch.filter(pa.array(hash_uniform(ids, seed) < fraction))


def sample_embeddings(uri: str, rows: int, n_total: int, seed: int) -> np.ndarray:
    """About ``rows`` embeddings (at most ``rows``) drawn with a seeded hash of unit_id in a
    distributed filter; only the sample reaches the driver."""
    ds = read_artifact(uri, ["unit_id", "embedding"], file_blocks=True)
    if rows < n_total:
        # a little slack so the binomial count rarely falls short; the cap below trims it
        fraction = min(1.0, rows * 1.02 / n_total + 10.0 / n_total)
        ds = ds.map_batches(_keep_sampled, fn_kwargs={"fraction": fraction, "seed": seed},
                            batch_format="pyarrow", batch_size=None,
                            compute=ray.data.TaskPoolStrategy())
    parts, have = [], 0
    with user_errors():
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if batch.num_rows == 0:
                continue
            parts.append(arrow_to_vectors(batch.column("embedding"))[: rows - have])
            have += len(parts[-1])
            if have >= rows:
                break
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def fit_kmeans(layout: RunLayout, k: int, cfg: KMeansConfig, seed: int, force: bool = False, *,
               balanced: bool | None = None, balance_rounds: int = 5) -> str:
    """Stage: fit k-means with ``k`` clusters on ≤ ``cfg.fit_sample`` generic embeddings.

    ``balanced`` defaults to ``cfg.balanced_mix and k == cfg.k_mix`` (the mixture's experts;
    a k shared with another method shares the balanced clustering). Returns the artifact URI."""
    fit_kmeans_all(layout, [k], cfg, seed, force, balanced=balanced, balance_rounds=balance_rounds)
    return layout.kmeans(k)


def fit_kmeans_all(layout: RunLayout, ks: list[int], cfg: KMeansConfig, seed: int,
                   force: bool = False, *, balanced: bool | None = None,
                   balance_rounds: int = 5) -> list[int]:
    """Stages: ``data/kmeans-k<K>`` for every K of ``ks`` not done yet, fitted in one Ray task
    (its own CPUs, ``kmeans.fit_cpus``, where the cluster has them, not on the head): it reads
    the seeded sample once and imports scikit-learn once (~1-2 s in a fresh worker), where a
    task per K paid both per K. Each K's centroids are what a fit of that K alone gives (same
    sample, same seed), and each K is published on its own. Returns the Ks fitted now."""
    src = layout.embeddings("generic")
    plans: dict[int, dict[str, Any]] = {}
    for k in dict.fromkeys(ks):
        if k < 1:
            raise InputError(f"k is {k}; the number of clusters must be at least 1")
        bal = bool(cfg.balanced_mix and k == cfg.k_mix) if balanced is None else balanced
        config = {"k": k, "fit_sample": cfg.fit_sample, "max_iter": cfg.max_iter,
                  "n_init": cfg.n_init, "seed": seed, "balanced": bal,
                  "balance_rounds": balance_rounds if bal else 0}
        if cfg.backend != "sklearn":  # keyed only when set, so runs fitted before it stay done
            config["backend"] = cfg.backend
        st = Stage(layout.kmeans(k), stage="kmeans", config=config,
                   inputs=input_fingerprints(layout, src), force=force)
        if not st.done:
            plans[k] = {"stage": st, "balanced": bal}
    if not plans:
        return []
    n_total = count_rows(src)
    if max(plans) > n_total:
        raise InputError(f"k={max(plans)} clusters but the generic set has only {n_total} units "
                         f"('{src}'); lower kmeans.k_is/k_mix/k_pn to at most {n_total} or use "
                         "a bigger generic corpus")
    fits = [(k, max(cfg.fit_sample, k), p["balanced"]) for k, p in plans.items()]
    args = (src, fits, n_total, seed, cfg.n_init, cfg.max_iter, balance_rounds, cfg.backend)
    if ray.is_initialized():
        cpus = min(cfg.fit_cpus, ray.cluster_resources().get("CPU", cfg.fit_cpus) or cfg.fit_cpus)
        task = ray.remote(num_cpus=cpus)(fit_all_centroids)
        results = ray.get(task.options(name=f"kmeans-fit-k{'-'.join(map(str, plans))}").remote(*args))
    else:
        results = fit_all_centroids(*args)
    for (k, plan), res in zip(plans.items(), results):
        centroids, offsets = res.pop("centroids"), res.pop("offsets")
        with plan["stage"].publish() as out:
            save_centroids(out.file(CENTROIDS_FILE), centroids, offsets)
            out.manifest.update(k=k, dim=int(centroids.shape[1]), generic_rows=n_total,
                                balanced=plan["balanced"], **res)
        log.info("k-means k=%d on %d sampled units (balanced=%s)", k, res["sample_rows"],
                 plan["balanced"])
    return list(plans)


def fit_with(backend: str, x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int
             ) -> tuple[np.ndarray, int]:
    """(centroids [k, dim] float32, Lloyd iterations run) of ``x`` with the given backend:
    scikit-learn (k-means++ init, stops on convergence) or faiss (random init, ``max_iter``
    iterations; bench_kmeans_assign.py --fit compares them)."""
    if backend == "faiss":
        try:
            import faiss  # optional dependency (extra "faiss"): imported only when chosen
        except ImportError:
            raise InputError(FAISS_MISSING) from None
        x = np.ascontiguousarray(x, dtype=np.float32)
        km = faiss.Kmeans(x.shape[1], k, niter=max_iter, nredo=n_init, seed=seed, verbose=False,
                          max_points_per_centroid=-(-len(x) // k))  # no subsampling: x is one
        km.train(x)
        return np.asarray(km.centroids, dtype=np.float32), max_iter
    # imported here, not at the top: every Ray worker that runs an assignment or histogram
    # batch imports this module, and scikit-learn is ~1 s of its ~1.7 s import (more under
    # load), paid again by each fresh worker; only the fit task needs it
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter,
                random_state=seed, algorithm="lloyd").fit(x)
    return km.cluster_centers_.astype(np.float32), int(km.n_iter_)


def fit_all_centroids(src: str, fits: list[tuple[int, int, bool]], n_total: int, seed: int,
                      n_init: int, max_iter: int, balance_rounds: int,
                      backend: str = "sklearn") -> list[dict[str, Any]]:
    """For each ``(k, target, balanced)`` of ``fits``: sample ≤ ``target`` embeddings of ``src``
    (once per distinct target) and fit ``k`` centroids (``fit_with``, then the balanced rounds);
    returns, per fit, the centroids, offsets and the figures the manifest records."""
    if ray.is_initialized():
        configure_data_context()  # the sample's Dataset reads in the driver's (seeded) order
    samples: dict[tuple[int, int], np.ndarray] = {}
    out = []
    for k, target, balanced in fits:
        t0 = time.time()
        x, shared = _sample_for(samples, src, target, n_total, k, seed)
        sample_seconds = time.time() - t0
        centroids, iterations = fit_with(backend, x, k, seed, n_init, max_iter)
        offsets = np.zeros(k, dtype=np.float32)
        if balanced:
            centroids, offsets = balanced_lloyd(x, centroids, balance_rounds, seed)
        labels, dist = nearest(x, centroids, offsets)
        out.append({"centroids": centroids, "offsets": offsets, "sample_rows": int(len(x)),
                    "inertia": float(np.square(dist, dtype=np.float64).sum()),
                    "backend": backend, "iterations": iterations,
                    "sizes": np.bincount(labels, minlength=k).tolist(),
                    "sample_seconds": round(sample_seconds, 3), "sample_shared": shared,
                    "fit_seconds": round(time.time() - t0 - sample_seconds, 3),
                    # where it ran: a Ray worker (a task with its own CPUs) or the calling process
                    "fit_in_ray_task": ray.is_initialized()
                    and ray.get_runtime_context().worker.mode == ray.WORKER_MODE})
    return out


def _sample_for(samples: dict[tuple[int, int], np.ndarray], src: str, target: int, n_total: int, k: int, seed: int
                ) -> tuple[np.ndarray, bool]:
    """The seeded sample of ``target`` rows (read once per target, kept in ``samples``); the
    first rows instead when the seeded sample fell short of ``k``. Returns (rows, reused)."""
    key = (target, 0)
    reused = key in samples
    if not reused:
        samples[key] = sample_embeddings(src, target, n_total, seed)
    x = samples[key]
    if len(x) < k:
        key = (target, 1)
        reused = key in samples
        if not reused:
            samples[key] = sample_embeddings(src, target, target, seed)
        x = samples[key]
    return x, reused


# --------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------

def assign_file(fs: Any, path: str, models: dict[int, tuple[np.ndarray, np.ndarray]],
                dests: list[tuple[int, Any, str]], name: str, fix: str) -> int:
    """Ray task: the nearest (offset-adjusted) centroid of every embedding of one embeddings
    file, for every K of ``dests`` (``(k, filesystem, staging dir)``), written as
    ``<dir>/<name>`` (unit_id[, tokens], cluster, distance). Reads the file in batches of
    ``ASSIGN_BATCH`` rows, so a task holds one batch of vectors and the small outputs. Returns
    the rows read. Re-running it rewrites the same files (a retried task is harmless). ``fix``:
    how to rebuild the embeddings, named in the error on a bad file (``rebuild_fix``)."""
    pf = pq.ParquetFile(fs.open_input_file(path))
    names = pf.schema_arrow.names
    if "embedding" not in names or "unit_id" not in names:
        raise InputError(f"embeddings file '{path}' has columns {names}, not unit_id and "
                         f"embedding; {fix}")
    columns = [c for c in ("unit_id", "tokens", "embedding") if c in names]
    kept: list[pa.RecordBatch] = []
    found: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k, _, _ in dests}
    for batch in pf.iter_batches(batch_size=ASSIGN_BATCH, columns=columns):
        if batch.num_rows == 0:
            continue
        x = arrow_to_vectors(batch.column("embedding"))
        kept.append(batch.drop_columns(["embedding"]))
        for k in found:
            centroids, offsets = models[k]
            if x.shape[1] != centroids.shape[1]:
                raise InputError(f"embeddings '{path}' have dim {x.shape[1]} but the k={k} "
                                 f"centroids have {centroids.shape[1]}; {fix}")
            found[k].append(nearest(x, centroids, offsets))
    if not kept:
        return 0
    keys = pa.Table.from_batches(kept)
    for k, out_fs, out_dir in dests:
        cluster = np.concatenate([c for c, _ in found[k]])
        distance = np.concatenate([d for _, d in found[k]])
        table = keys.append_column("cluster", pa.array(cluster, pa.int32())).append_column(
            "distance", pa.array(distance, pa.float32()))
        pq.write_table(table, f"{out_dir}/{name}", filesystem=out_fs)
    return keys.num_rows


def assign(layout: RunLayout, k: int, set_name: str, force: bool = False) -> str:
    """Stage: ``data/embeddings/<set>`` → ``data/assign-k<K>/<set>``. Returns the URI."""
    assign_sets(layout, k, [set_name], force=force)
    return layout.assignments(k, set_name)


def assign_sets(layout: RunLayout, k: int, set_names: list[str], force: bool = False) -> list[str]:
    """Stages: ``data/assign-k<K>/<set>`` for every set of ``set_names`` not done yet (see
    ``assign_all``). Returns the sets assigned now."""
    return [n for _, n in assign_all(layout, [k], set_names, force=force)]


def assign_all(layout: RunLayout, ks: list[int], set_names: list[str], force: bool = False
               ) -> list[tuple[int, str]]:
    """Stages: ``data/embeddings/<set>`` → ``data/assign-k<K>/<set>`` for every (K, set) not
    done yet, in one pass: a Ray task per embeddings file reads it once and assigns it at every
    K that set still needs (``assign_file``), each (K, set) published on its own with its own
    manifest. Output file ``part-<i>`` holds the rows of input file ``i``, so an assignment is in
    its set's row order.

    Plain Ray tasks over files, not a Ray Data pipeline: the pass is a per-file map with no
    shuffle, and Ray Data's execution (blocks through the object store, its operator scheduling)
    cost 2.8-3.6 s against 1.2-1.5 s for these tasks on 200k × 384 at k=1024 (2 cores; scikit-
    learn's read + predict + write: 1.5-2.8 s; bench_kmeans_assign.py). Returns the (K, set)
    pairs assigned now."""
    stages = {(k, n): Stage(layout.assignments(k, n), stage="assign", config={"k": k},
                            inputs=input_fingerprints(layout, layout.embeddings(n), layout.kmeans(k)),
                            force=force)
              for k in dict.fromkeys(ks) for n in dict.fromkeys(set_names)}
    todo = [key for key, st in stages.items() if not st.done]
    if not todo:
        return []
    models = {k: load_centroids(layout, k) for k in dict.fromkeys(k for k, _ in todo)}
    sets = list(dict.fromkeys(n for _, n in todo))
    with contextlib.ExitStack() as publishing:
        outs = {key: publishing.enter_context(stages[key].publish()) for key in todo}
        t0 = time.time()
        model_ref = ray.put(models)  # one copy in the object store, shared by every task
        task = ray.remote(num_cpus=1)(assign_file)
        fix = rebuild_fix(layout)  # on the driver: a task does not see the command's hint
        pending: dict[str, list[ray.ObjectRef]] = {}
        for n in sets:
            fs, _ = filesystem(layout.embeddings(n))
            dests = [(k, outs[(k, n)].fs, outs[(k, n)].path) for k in models if (k, n) in outs]
            pending[n] = [task.options(name=f"assign-{n}").remote(fs, f, model_ref, dests,
                                                                   f"part-{i:06d}.parquet", fix)
                          for i, f in enumerate(input_files(layout.embeddings(n)))]
        with user_errors():  # each set's rows, as its tasks read them (no footer pass here)
            rows = {n: sum(ray.get(refs)) for n, refs in pending.items()}
        seconds = time.time() - t0
        for (k, n), out in outs.items():
            written = count_rows(out.uri)
            if written != rows[n]:
                raise StageError(f"assignment of '{n}' at k={k} wrote {written} rows for {rows[n]}; re-run")
            out.manifest.update(k=k, rows=rows[n], seconds_assign=round(seconds, 3),
                                shared_pass={"sets": sets, "ks": list(models),
                                             "rows": sum(rows.values())})
    return todo


# --------------------------------------------------------------------------------------------
# Histograms
# --------------------------------------------------------------------------------------------

def partial_counts(batch: dict[str, np.ndarray], k: int, dirs: list[str]
                   ) -> dict[str, np.ndarray]:
    """map_batches function: K cluster counts per set present in this block (the set is
    known from the file path: ``dirs[i]`` is set i's directory)."""
    c, paths = batch["cluster"], batch["path"]
    weight = batch["tokens"] if "tokens" in batch else np.ones(len(c), dtype=np.int64)
    if len(c) and (c.min() < 0 or c.max() >= k):
        raise InputError(f"cluster ids outside [0, {k}) in assignments for k={k}; "
                         "re-run assign for this k")
    sets, counts = [], []
    for path in np.unique(paths):
        i = owner_of(str(path), dirs)
        sets.append(i)
        mine = paths == path
        counts.append(np.bincount(c[mine], weights=weight[mine], minlength=k).round().astype(np.int64))
    return {"set": np.asarray(sets, dtype=np.int64),
            "counts": np.asarray(counts, dtype=np.int64).reshape(-1, k)}


def cluster_counts(uris: list[str], k: int) -> list[np.ndarray]:
    """K token counts per cluster (each row weighs its ``tokens``; 1 without that column) of
    each artifact in ``uris``, in one Ray Data pass (partial counts per block, summed on the
    driver: K numbers per block, never rows)."""
    totals = [np.zeros(k, dtype=np.int64) for _ in uris]
    fs, _ = filesystem(uris[0]) if uris else (None, None)
    dirs = [filesystem(u)[1].rstrip("/") + "/" for u in uris]
    files = [f for u in uris for f in parquet_files(u)]
    if not files:
        return totals
    ds = ray.data.read_parquet(files, filesystem=fs, include_paths=True)
    names = pq.read_schema(files[0], filesystem=fs).names
    parts = ds.select_columns(["cluster", "path"] + (["tokens"] if "tokens" in names else [])).map_batches(
        partial_counts, fn_kwargs={"k": k, "dirs": dirs}, batch_format="numpy",
        batch_size=None, compute=ray.data.TaskPoolStrategy())
    with user_errors():
        for b in parts.iter_batches(batch_format="numpy", batch_size=None):
            for i, row in zip(b["set"], np.asarray(b["counts"]).reshape(-1, k)):
                totals[int(i)] += row
    return totals


def histogram_file(layout: RunLayout, k: int, set_name: str) -> str:
    return join(layout.histograms(k), f"{set_name}.json")


def read_histogram(layout: RunLayout, k: int, set_name: str) -> dict[str, Any]:
    """``{"k", "counts", "n"}`` of one set; InputError when it was not computed."""
    f = histogram_file(layout, k, set_name)
    if not exists(f):
        raise InputError(f"histogram '{f}' does not exist; run histograms(k={k}) for "
                         f"set '{set_name}' first")
    return read_json(f)


def histograms(layout: RunLayout, k: int, set_names: list[str], force: bool = False) -> str:
    """Stage: ``data/histograms-k<K>/<set>.json`` for every set in ``set_names``.

    The directory is one artifact. Asking for sets it already holds (from the same
    assignments) is a no-op; asking for new ones (a domain added later) republishes it with the
    union: the new sets are counted, the others carried over. All sets are counted in one
    Ray Data pass."""
    uri = layout.histograms(k)
    wanted = list(dict.fromkeys(set_names))
    inputs = input_fingerprints(layout, *(layout.assignments(k, s) for s in wanted))
    old = manifest(uri)
    carried: dict[str, dict[str, Any]] = {}
    if old is not None and not force:
        recorded = old.get("inputs", {})
        stale = [u for u, f in inputs.items() if u in recorded and recorded[u] != f]
        if stale:
            raise StageError(
                f"histograms '{uri}' were counted from other assignments ({', '.join(stale)}); "
                f"{rebuild_fix(layout)} to recount them")
        if all(u in recorded for u in inputs):
            return uri
        rel = {s: layout.relative(layout.assignments(k, s)) for s in old.get("sets", [])}
        carried = {s: read_histogram(layout, k, s) for s, r in rel.items()
                   if s not in wanted and r in recorded}
        inputs.update({rel[s]: recorded[rel[s]] for s in carried})
        force = True  # republish with the union
    counted = dict(zip(wanted, cluster_counts([layout.assignments(k, s) for s in wanted], k)))
    every = sorted({*carried, *wanted})
    st = Stage(uri, stage="histograms", config={"k": k, "sets": every}, inputs=inputs, force=force)
    with st.publish() as out:
        for s, counts in counted.items():
            write_json(out.file(f"{s}.json"), {"k": k, "counts": counts.tolist(), "n": int(counts.sum()),
                                              "unit": "tokens"})
        for s, hist in carried.items():
            write_json(out.file(f"{s}.json"), hist)
        out.manifest.update(k=k, sets=every, rows={s: int(c.sum()) for s, c in counted.items()}
                            | {s: int(h["n"]) for s, h in carried.items()})
    return uri
