"""Cluster importance resampling (SLM-is; the DSIR/CRISP idea over k-means clusters).

The generic corpus is resampled so that its cluster histogram matches a domain's: draw a
cluster c ~ P(c | domain), then a window uniformly within c. Equivalently, generic windows get
importance weights w(c) = P(c | domain) / P(c | generic).

``ClusterImportance`` is the in-memory API over two histograms (``fit`` → ``weights`` →
``draw_counts`` / ``resample``). Two distributed stages feed SLM-is pretraining, one pair per
(domain, domain train size), as SLM-is is held to the domain data budget of the trials it
starts (a trial of size T never gets a model whose resampling saw more than T tokens of the
domain):

* ``write_subset_histogram``: ``data/subset-histograms-k<K>/domain-<d>-train-<T>/histogram.json``,
  the cluster token counts of exactly the windows of the specialization train subset
  ``data/shards/domain-<d>-train-<T>`` (pipeline/shards.py ``build_train_subset`` chose them;
  its ``unit_clusters_k<K>`` / ``unit_tokens`` columns are read, nothing else of the domain:
  each unit's cluster weighted by its tokens in the subset's windows, ``shards.token_histogram``).
  The whole split's histogram (``data/histograms-k<K>``) is not used.
* ``write_is_shard``: ``data/shards/is-k<K>-<d>-<T>`` from ``data/shards/generic-k<K>`` (the
  generic windows packed per cluster, so a drawn window of cluster c is text of cluster c):

1. per-file cluster counts of the generic shards (one Ray Data task per parquet file reads only
   the ``cluster_k<K>`` column; F × K numbers come back: ``file_cluster_counts``);
2. on the driver: per-cluster draw counts d ~ Multinomial(rows, P(·|subset)) (K numbers), and
   for each cluster the split of its draws over the files (a multivariate hypergeometric over
   the files' member counts, so the chosen windows are a uniform subset of the cluster);
3. one Ray Data task per file reads it and emits its picked rows (locally shuffled), which are
   written as parquet. Output rows = exactly ``rows``.

Within a cluster, draws go *without* replacement until the cluster is used up, then start over
(with replacement only when a cluster runs short): a window of cluster c appears
floor(d_c/m_c) or ceil(d_c/m_c) times. Every window is still equally likely (the uniform
within-cluster draw), and the resampled set has as few repeats as the histogram allows, which
the paper names as the cost of a large k ("many repeated points").

Clusters with domain mass but no generic windows cannot be drawn from; their mass is dropped
and the domain distribution renormalised over the other clusters (``dropped_mass`` records it,
the manifest too). If *all* the domain mass falls there, InputError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from slm.errors import InputError, StageError
from slm.layout import RunLayout, is_set, packed_set, train_subset
from slm.pipeline.artifacts import count_rows, parquet_files, user_errors, write_dataset
from slm.pipeline.shards import shard_token_histogram
from slm.stage import (Stage, exists, filesystem, input_fingerprints, join, manifest, read_json,
                       rebuild_fix, write_json)

log = logging.getLogger(__name__)

Histogram = Mapping[str, Any] | Sequence[int] | np.ndarray


def _counts(hist: Histogram, what: str) -> np.ndarray:
    """Counts of a histogram given as the artifact's dict (``{"k", "counts", "n"}``) or a list."""
    if isinstance(hist, Mapping):
        if "counts" not in hist:
            raise InputError(f"{what} histogram has no 'counts' field (keys: {sorted(hist)}); "
                             "give the {'k', 'counts', 'n'} dict written by histograms()")
        counts = np.asarray(hist["counts"], dtype=np.int64)
        if "k" in hist and int(hist["k"]) != len(counts):
            raise InputError(f"{what} histogram says k={hist['k']} but has {len(counts)} counts")
    else:
        counts = np.asarray(hist, dtype=np.int64)
    if counts.ndim != 1 or len(counts) == 0:
        raise InputError(f"{what} histogram must be a non-empty list of K counts")
    if (counts < 0).any():
        raise InputError(f"{what} histogram has negative counts")
    return counts


@dataclass(frozen=True)
class ClusterImportance:
    """Importance of generic clusters for one domain (see module doc)."""

    generic_counts: np.ndarray
    domain_counts: np.ndarray

    @classmethod
    def fit(cls, generic_hist: Histogram, domain_hist: Histogram) -> "ClusterImportance":
        g, d = _counts(generic_hist, "generic"), _counts(domain_hist, "domain")
        if len(g) != len(d):
            raise InputError(f"generic histogram has k={len(g)} but the domain's has k={len(d)};"
                             " use histograms of the same k-means")
        if d.sum() == 0:
            raise InputError("domain histogram is empty (n=0): the domain has no windows to "
                             "match. Check the domain's train split and data.seq_len")
        if g.sum() == 0:
            raise InputError("generic histogram is empty (n=0); there is nothing to resample")
        if d[g > 0].sum() == 0:
            raise InputError("all the domain's windows fall in clusters with no generic window; "
                             "there is nothing to resample. Use a smaller k or refit k-means")
        return cls(g, d)

    @property
    def k(self) -> int:
        return len(self.generic_counts)

    @property
    def dropped_mass(self) -> float:
        """Fraction of domain windows in clusters that have no generic window (not drawable)."""
        return float(self.domain_counts[self.generic_counts == 0].sum() / self.domain_counts.sum())

    def p_domain(self) -> np.ndarray:
        """P(c | domain) over the drawable clusters (renormalised if mass was dropped)."""
        d = np.where(self.generic_counts > 0, self.domain_counts, 0).astype(np.float64)
        return d / d.sum()

    def p_generic(self) -> np.ndarray:
        return self.generic_counts / self.generic_counts.sum()

    def weights(self) -> np.ndarray:
        """w(c) = P(c | domain) / P(c | generic); 0 where the domain has no mass (and where the
        generic set has no window, since nothing can be drawn there)."""
        pg = self.p_generic()
        return np.divide(self.p_domain(), pg, out=np.zeros(self.k), where=pg > 0)

    def draw_counts(self, n_windows: int, seed: int) -> np.ndarray:
        """How many of ``n_windows`` draws land in each cluster: Multinomial(n, P(·|domain))."""
        if n_windows < 0:
            raise InputError(f"n_windows is {n_windows}; it must be >= 0")
        return np.random.default_rng(seed).multinomial(n_windows, self.p_domain()).astype(np.int64)

    def resample(self, n_windows: int, seed: int, cluster_of_windows: np.ndarray) -> np.ndarray:
        """Indices into ``cluster_of_windows`` of ``n_windows`` draws (cluster ~ domain
        histogram, window uniform within it; repeats only once a cluster is used up).
        Deterministic for a seed; the same rule ``write_is_shard`` applies per file."""
        clusters = np.asarray(cluster_of_windows)
        members = np.bincount(clusters, minlength=self.k)[: self.k]
        draws = self.draw_counts(n_windows, seed)
        short = np.flatnonzero((draws > 0) & (members == 0))
        if len(short):
            raise InputError(f"clusters {short[:10].tolist()} are drawn but have no window in "
                             "cluster_of_windows; pass the clusters of the generic set the "
                             "histogram was counted on")
        repeats, extras = split_draws(draws, members[None, :], seed)
        return pick_rows(clusters, repeats, extras[0], np.random.default_rng([seed, 0]))


def split_draws(draws: np.ndarray, per_file: np.ndarray, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Turn per-cluster draw counts into what each file must emit.

    ``per_file`` is [F, K] member counts. Returns (repeats [K]: every member of cluster c is
    emitted ``repeats[c]`` times; extras [F, K]: how many further distinct members each file
    emits, a uniform subset of the cluster split over files by a multivariate hypergeometric)."""
    m = per_file.sum(axis=0)
    repeats = np.floor_divide(draws, m, out=np.zeros_like(draws), where=m > 0)
    rest = draws - repeats * m
    extras = np.zeros_like(per_file)
    rng = np.random.default_rng([seed, 1])
    for c in np.flatnonzero(rest):
        extras[:, c] = rng.multivariate_hypergeometric(per_file[:, c], int(rest[c]))
    return repeats.astype(np.int64), extras.astype(np.int64)


def pick_rows(clusters: np.ndarray, repeats: np.ndarray, extras: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """Row indices one file emits: each member of cluster c ``repeats[c]`` times plus
    ``extras[c]`` distinct members chosen uniformly, shuffled (so repeats are not adjacent)."""
    order = np.argsort(clusters, kind="stable")
    bounds = np.searchsorted(clusters[order], np.arange(len(repeats) + 1))
    picked = []
    for c in np.flatnonzero((repeats > 0) | (extras > 0)):
        rows = order[bounds[c]: bounds[c + 1]]
        if repeats[c]:
            picked.append(np.tile(rows, int(repeats[c])))
        if extras[c]:
            picked.append(rng.choice(rows, int(extras[c]), replace=False))
    out = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------------------------
# Distributed stage
# --------------------------------------------------------------------------------------------

def _file_counts(batch: dict[str, np.ndarray], root: str, column: str, k: int
                 ) -> dict[str, np.ndarray]:
    """map_batches function: cluster counts of each listed file (reads one column)."""
    fs, _ = filesystem(root)
    out = []
    for path in batch["path"]:
        c = pq.read_table(str(path), columns=[column], filesystem=fs).column(column).to_numpy()
        if len(c) and (c.min() < 0 or c.max() >= k):
            raise InputError(f"column '{column}' of '{path}' has ids outside [0, {k}); rebuild "
                             "the generic shards from the k-means of this k")
        out.append(np.bincount(c, minlength=k))
    return {"index": batch["index"], "counts": np.stack(out).astype(np.int64)}


def _file_picks(batch: dict[str, np.ndarray], root: str, column: str, repeats: np.ndarray,
                seed: int) -> pa.Table:
    """map_batches function (one file per batch): the file's picked rows, all columns."""
    fs, _ = filesystem(root)
    tables = []
    for path, index, extras in zip(batch["path"], batch["index"], batch["extras"]):
        table = pq.read_table(str(path), filesystem=fs)
        clusters = table.column(column).to_numpy()
        rows = pick_rows(clusters, repeats, np.asarray(extras, dtype=np.int64),
                         np.random.default_rng([seed, 2, int(index)]))
        tables.append(table.take(pa.array(rows, pa.int64())))
    return pa.concat_tables(tables)


def file_cluster_counts(uri: str, k: int) -> tuple[list[str], np.ndarray]:
    """(parquet files, [F, K] counts of their ``cluster_k<K>`` column) of a shard set: one Ray
    Data task per file reads that column only. InputError when a file lacks it."""
    column = f"cluster_k{k}"
    fs, _ = filesystem(uri)
    files = parquet_files(uri)
    if not files:
        return files, np.zeros((0, k), dtype=np.int64)
    names = pq.read_schema(files[0], filesystem=fs).names
    if column not in names:
        raise InputError(f"shards '{uri}' have no column '{column}' (columns: {names}); "
                         f"rebuild the shards with k={k} in the recipe's kmeans.k_is/k_mix/k_pn")
    listing = [{"path": p, "index": i} for i, p in enumerate(files)]
    counts_ds = ray.data.from_items(listing, override_num_blocks=len(files)).map_batches(
        _file_counts, fn_kwargs={"root": uri, "column": column, "k": k}, batch_size=1,
        batch_format="numpy", compute=ray.data.TaskPoolStrategy())
    per_file = np.zeros((len(files), k), dtype=np.int64)
    with user_errors():
        for b in counts_ds.iter_batches(batch_format="numpy", batch_size=None):
            per_file[np.asarray(b["index"], dtype=np.int64)] = np.asarray(b["counts"]).reshape(-1, k)
    return files, per_file


HISTOGRAM = "histogram.json"  # the file of a subset-histogram artifact


def write_subset_histogram(layout: RunLayout, k: int, domain: str, tokens: int,
                           force: bool = False) -> str:
    """Stage: the cluster token histogram ``{"k", "counts", "n", "unit", "domain", "tokens",
    "shards"}`` of the specialization train subset of ``domain`` of ``tokens`` tokens, counted
    from that subset's shards only (see the module doc). Returns the artifact's URI."""
    src, uri = layout.shards(train_subset(domain, tokens)), layout.subset_histogram(k, domain, tokens)
    m = manifest(src)
    if m is None:
        raise StageError(f"input artifact '{src}' is not done; run its stage first "
                         "(the domain train subsets of data.domain_train_tokens)")
    st = Stage(uri, stage="subset-histogram", config={"k": k, "domain": domain, "tokens": tokens},
               inputs=input_fingerprints(layout, src), force=force)
    if st.done:
        return uri
    counts = shard_token_histogram(src, k)
    want = int(m["rows"]) * int(m["seq_len"])
    if int(counts.sum()) != want:  # every token of the subset's windows, and only those
        raise StageError(f"counted {int(counts.sum())} tokens in '{src}' but its manifest says "
                         f"{m['rows']} windows of {m['seq_len']}; {rebuild_fix(layout)}")
    with st.publish() as out:
        write_json(out.file(HISTOGRAM), {"k": k, "counts": counts.tolist(), "n": int(counts.sum()),
                                         "unit": "tokens", "domain": domain, "tokens": tokens,
                                         "shards": layout.relative(src)})
        out.manifest.update(k=k, domain=domain, tokens=tokens, rows=int(m["rows"]))
    return uri


def read_subset_histogram(layout: RunLayout, k: int, domain: str, tokens: int) -> dict[str, Any]:
    """The published histogram of a domain train subset; StageError naming its stage if absent."""
    uri = layout.subset_histogram(k, domain, tokens)
    f = join(uri, HISTOGRAM)
    if manifest(uri) is None or not exists(f):
        raise StageError(f"histogram '{uri}' of domain '{domain}' at {tokens} train tokens is not "
                         f"done; run the data pipeline (`slm data run`) with {tokens} in "
                         "data.domain_train_tokens")
    return read_json(f)


def write_is_shard(layout: RunLayout, k: int, domain: str, domain_tokens: int, n_tokens: int,
                   seq_len: int, seed: int, force: bool = False) -> str:
    """Stage: ``data/shards/is-k<K>-<domain>-<domain_tokens>``, ``n_tokens // seq_len`` rows
    (0 tokens = as many rows as the packed generic shards) resampled from
    ``data/shards/generic-k<K>`` to
    match the histogram of the domain's train subset of ``domain_tokens`` tokens
    (``write_subset_histogram``). Returns the URI."""
    src, out_uri = layout.shards(packed_set("generic", k)), layout.shards(is_set(domain, k, domain_tokens))
    if n_tokens < 0 or seq_len <= 0:
        raise InputError(f"n_tokens={n_tokens}, seq_len={seq_len}: use n_tokens >= 0 "
                         "(data.is_tokens) and seq_len > 0 (data.seq_len)")
    hist_uri = layout.subset_histogram(k, domain, domain_tokens)
    domain_hist = read_subset_histogram(layout, k, domain, domain_tokens)
    st = Stage(out_uri, stage="is-shard",
               config={"k": k, "domain": domain, "domain_tokens": domain_tokens, "n_tokens": n_tokens,
                       "seq_len": seq_len, "seed": seed},
               inputs=input_fingerprints(layout, src, hist_uri), force=force)
    if st.done:
        return out_uri
    if int(domain_hist.get("n", 0)) == 0 or sum(domain_hist.get("counts", [])) == 0:
        raise InputError(f"histogram '{hist_uri}' (k={k}) is empty: domain '{domain}' has no "
                         f"windows in its {domain_tokens}-token train subset. Give the domain more "
                         "text or lower data.seq_len")
    files, per_file = file_cluster_counts(src, k)
    if not files:
        raise InputError(f"generic shards '{src}' hold no parquet files; rebuild them")
    column = f"cluster_k{k}"
    generic_counts = per_file.sum(axis=0)
    imp = ClusterImportance.fit(generic_counts, domain_hist)
    rows = n_tokens // seq_len if n_tokens else int(generic_counts.sum())
    if rows == 0:
        raise InputError(f"n_tokens={n_tokens} is less than one window of seq_len={seq_len}; "
                         "raise data.is_tokens (0 = as many as the generic set)")
    draws = imp.draw_counts(rows, seed)
    repeats, extras = split_draws(draws, per_file, seed)
    emits = (extras > 0).any(axis=1) | ((per_file > 0) & (repeats[None, :] > 0)).any(axis=1)
    plan = [{"path": p, "index": i, "extras": extras[i].tolist()}
            for i, p in enumerate(files) if emits[i]]
    with st.publish() as out:
        picked = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
            _file_picks, fn_kwargs={"root": src, "column": column, "repeats": repeats,
                                    "seed": seed},
            batch_size=1, batch_format="numpy", compute=ray.data.TaskPoolStrategy())
        with user_errors():
            write_dataset(picked, out)
        written = count_rows(out.uri)
        if written != rows:
            raise StageError(f"SLM-is shard '{out_uri}' got {written} rows, expected {rows}; re-run")
        m = generic_counts
        out.manifest.update(
            k=k, domain=domain, rows=rows, tokens=rows * seq_len, seq_len=seq_len,
            unique_windows=int(np.minimum(draws, m).sum()),
            max_repeats=int(np.max(np.ceil(np.divide(draws, np.maximum(m, 1))))),
            dropped_mass=imp.dropped_mass, draws=draws.tolist(), domain_tokens=domain_tokens,
            histogram=layout.relative(hist_uri))
    log.info("SLM-is shard %s: %d rows, %d distinct windows", out_uri, rows,
             int(np.minimum(draws, m).sum()))
    return out_uri
