"""Training shards, ``data/shards/<set>``, and the per-cluster packings ``<set>-k<K>``.

**Plain shards** ``data/shards/<set>``: the windows (``window_id``, ``input_ids``,
``unit_tokens``) and, per K of the recipe, ``unit_clusters_k<K>``: the cluster of each unit a
window is cut from (pipeline/windows.py: a window may end one document and start the next). A
set of windows' cluster histogram is therefore exact: each unit's cluster weighted by its
tokens in the window (``token_histogram``, ``shard_token_histogram``; SLM-is and the expert choice of mix/pn use it on a
domain train subset). The join (windows ⋈ unit assignments on ``unit_id``) runs as one Ray Data
task per windows file: the task reads its file (bounded by ``data.rows_per_file``), then, for
each K, reads only the assignment rows in the range of the file's unit ids through a pyarrow
dataset filter. It is correct whatever order the assignment files are in; because every stage
keeps order (Ray Data ``preserve_order``), parquet row-group statistics make the range read
touch only the matching row groups. Why not the alternatives: ``Dataset.join`` needs polars
(not a dependency) and hash-shuffles the token windows (the big side) for every K;
``Dataset.zip`` is a bulk operator that materializes both inputs in the object store. Nothing
is collected on the driver, and the shards keep the windows' order (deterministic).

**Packed shards** ``data/shards/<set>-k<K>`` (``build_packed_shards``, for the generic set at
each K): the units joined with their cluster, grouped by cluster (Ray Data ``groupby`` +
``map_groups``: one call sees every unit of one cluster), concatenated in unit order and cut
into windows of ``seq_len``; each cluster's tail shorter than a window is dropped. So every
token of a window in ``cluster_k<K>`` = c is text assigned to cluster c: SLM-mix's expert c,
SLM-pn's routing and SLM-is's resampling train on text of the cluster they name. Rows are then
put in the order of a seeded hash of ``window_id`` (a distributed sort), so the files mix
clusters and the artifact does not depend on how Ray scheduled the groups.

**Why parquet** for the shards Train workers stream: measured with
``bench/bench_pipeline_scaling.py --compare-formats`` (100k windows of 128 int32 tokens, read
through Ray Data ``iter_batches``, 2 shared cores, local disk): parquet 17.5k windows/s on 27.9 MB,
JSON lines 17.0k windows/s on 90.6 MB. Read throughput from local disk is on par (the Ray Data
pipeline, not decoding, is the bottleneck at this size), but parquet is 3.2x smaller, which is
the bytes a Train worker pulls from object storage on a cluster; it keeps the types
(``list<int32>``, no JSON parsing or int64 widening), and it is columnar: the mixture's expert
``i`` reads ``cluster_k<K>`` to filter without decoding ``input_ids`` of other rows' columns,
with row groups for parallel, splittable reads.

**Train subsets**: windows ranked by a seeded hash of their ``window_id`` (a permutation that
does not depend on row order), sorted by rank with Ray Data's distributed sort, and the first
``tokens // seq_len`` kept; so a smaller subset is a prefix of a larger one.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data

from slm.configkit import ConfigError
from slm.errors import InputError, StageError
from slm.hashing import hash64
from slm.layout import RunLayout, domain_set, packed_set, train_subset
from slm.pipeline.artifacts import count_rows, parquet_files, read_artifact, write_dataset
from slm.pipeline.counters import fail, new_counter
from slm.pipeline.windows import FILE_BITS, WINDOW_BITS, set_hash
from slm.stage import Stage, filesystem, input_fingerprints, manifest, rebuild_fix


# --------------------------------------------------------------------------------------------
# windows ⋈ assignments
# --------------------------------------------------------------------------------------------

def _lookup(ids: np.ndarray, assign_uri: str, files: list[str], k: int, counter: Any,
            where: str, fix: str) -> np.ndarray:
    """Cluster of each unit id, read from the assignment rows in [min(ids), max(ids)]."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int32)
    fs, _ = filesystem(assign_uri)
    lo, hi = int(ids.min()), int(ids.max())
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(
        columns=["unit_id", "cluster"],
        filter=(pc.field("unit_id") >= lo) & (pc.field("unit_id") <= hi))
    a_ids = table.column("unit_id").to_numpy()
    order = np.argsort(a_ids, kind="stable")
    a_ids = a_ids[order]
    clusters = table.column("cluster").to_numpy()[order]
    pos = np.searchsorted(a_ids, ids)
    pos_c = np.minimum(pos, max(len(a_ids) - 1, 0))
    if len(a_ids) == 0 or not np.array_equal(a_ids[pos_c], ids):
        missing = int(np.sum(a_ids[pos_c] != ids)) if len(a_ids) else len(ids)
        fail(counter, where, StageError(
            f"'{assign_uri}' lacks the cluster of {missing} unit(s) of '{where}'; the assignment "
            f"is stale: {fix} to rebuild assign-k{k} and the shards"))
    return clusters[pos_c].astype(np.int32)


class _JoinFile:
    """One windows file → its rows with ``unit_clusters_k<K>`` list columns (``unit_ids``
    dropped: the clusters are what training reads)."""

    def __init__(self, windows_uri: str, assigns: dict[int, tuple[str, list[str]]], counter: Any,
                 fix: str):
        self.windows_uri = windows_uri
        self.assigns = assigns
        self.counter = counter
        self.fix = fix  # how to rebuild, from the driver's command (rebuild_fix)

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        fs, _ = filesystem(self.windows_uri)
        for path in batch["path"]:
            table = pq.read_table(fs.open_input_file(str(path)),
                                  columns=["window_id", "input_ids", "unit_ids", "unit_tokens"])
            if table.num_rows == 0:
                continue
            units = table.column("unit_ids").combine_chunks()
            ids = units.flatten().to_numpy()
            offsets = units.offsets
            table = table.drop_columns(["unit_ids"])
            for k, (uri, files) in sorted(self.assigns.items()):
                clusters = _lookup(ids, uri, files, k, self.counter, str(path), self.fix)
                table = table.append_column(f"unit_clusters_k{k}", pa.ListArray.from_arrays(
                    offsets, pa.array(clusters, type=pa.int32())))
            yield table


def build_shards(layout: RunLayout, set_name: str, ks: list[int], *, rows_per_file: int = 4096,
                 force: bool = False) -> str:
    """``data/shards/<set_name>``: windows with the cluster of each of their units, per K."""
    uri = layout.shards(set_name)
    windows_uri = layout.windows(set_name)
    assign_uris = {k: layout.assignments(k, set_name) for k in sorted(set(ks))}
    st = Stage(uri, stage="shards", config={"set": set_name, "ks": sorted(set(ks))},
               inputs=input_fingerprints(layout, windows_uri, *assign_uris.values()), force=force)
    if st.done:
        return uri
    counter = new_counter()
    with st.publish() as out:
        files = parquet_files(windows_uri)
        assigns = {k: (u, parquet_files(u)) for k, u in assign_uris.items()}
        ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=max(1, len(files)))
        ds = ds.map_batches(_JoinFile(windows_uri, assigns, counter, rebuild_fix(layout)), batch_size=1,
                            batch_format="numpy", compute=ray.data.TaskPoolStrategy())
        write_dataset(ds, out, counter, max_rows_per_file=rows_per_file)
        rows = count_rows(out.uri)
        expected = int((manifest(windows_uri) or {}).get("rows", rows))
        if rows != expected:
            raise StageError(f"shards '{set_name}': {rows} rows written but the windows have "
                             f"{expected}; {rebuild_fix(layout)}")
        m = manifest(windows_uri) or {}
        out.manifest.update({"rows": rows, "seq_len": m.get("seq_len"), "vocab_size": m.get("vocab_size"),
                             "tokens": rows * int(m.get("seq_len") or 0),
                             "columns": ["window_id", "input_ids", "unit_tokens"]
                             + [f"unit_clusters_k{k}" for k in assign_uris]})
    return uri


def token_histogram(table: pa.Table, k: int, where: str = "shards") -> np.ndarray:
    """K token counts of the windows of ``table`` (plain shards): each unit's cluster at ``k``
    weighted by its tokens in the window. InputError naming ``where`` when the column is
    missing."""
    col = f"unit_clusters_k{k}"
    if col not in table.column_names:
        raise InputError(f"{where} have no column '{col}' (columns: {table.column_names}); rebuild "
                         f"them with `slm data run --force` so that k={k} has its column")
    clusters = pc.list_flatten(table.column(col)).to_numpy()
    tokens = pc.list_flatten(table.column("unit_tokens")).to_numpy()
    if len(clusters) and (clusters.min() < 0 or clusters.max() >= k):
        raise InputError(f"cluster ids outside [0, {k}) in column '{col}'; rebuild the shards "
                         "with `slm data run --force`")
    return np.bincount(clusters, weights=tokens, minlength=k).round().astype(np.int64)


def shard_token_histogram(uri: str, k: int) -> np.ndarray:
    """K token counts of the plain shard set ``uri``: ``token_histogram`` of each file, summed
    (a domain train subset is small, and only its two small list columns are read)."""
    fs, _ = filesystem(uri)
    counts = np.zeros(k, dtype=np.int64)
    for path in parquet_files(uri):
        names = pq.read_schema(path, filesystem=fs).names
        cols = [c for c in (f"unit_clusters_k{k}", "unit_tokens") if c in names]
        counts += token_histogram(pq.read_table(fs.open_input_file(path), columns=cols), k,
                                  where=f"shards '{path}'")
    return counts


# --------------------------------------------------------------------------------------------
# Windows packed per cluster
# --------------------------------------------------------------------------------------------

class _UnitClusters:
    """One units file → (unit_id, input_ids, cluster) of its units at one K."""

    def __init__(self, units_uri: str, assign: tuple[str, list[str]], k: int, counter: Any, fix: str):
        self.units_uri, self.assign, self.k = units_uri, assign, k
        self.counter, self.fix = counter, fix

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        fs, _ = filesystem(self.units_uri)
        uri, files = self.assign
        for path in batch["path"]:
            table = pq.read_table(fs.open_input_file(str(path)), columns=["unit_id", "input_ids"])
            if table.num_rows == 0:
                continue
            clusters = _lookup(table.column("unit_id").to_numpy(), uri, files, self.k,
                               self.counter, str(path), self.fix)
            yield table.append_column("cluster", pa.array(clusters, type=pa.int32()))


def _pack_cluster(group: pa.Table, seq_len: int, k: int, base: int) -> pa.Table:
    """map_groups function: every unit of one cluster, in unit order, cut into windows."""
    column = f"cluster_k{k}"
    empty = pa.table({"window_id": pa.array([], pa.int64()),
                      "input_ids": pa.array([], pa.list_(pa.int32())),
                      column: pa.array([], pa.int32())})
    if group.num_rows == 0:
        return empty
    group = group.sort_by("unit_id")
    cluster = int(group.column("cluster")[0].as_py())
    tokens = pc.list_flatten(group.column("input_ids")).to_numpy().astype(np.int32)
    n = len(tokens) // seq_len
    if n == 0:
        return empty
    if n >= 1 << WINDOW_BITS:
        raise StageError(f"cluster {cluster} at k={k} holds {n} windows, more than the id scheme's "
                         f"{1 << WINDOW_BITS}; use a larger k")
    ids = base | (cluster << WINDOW_BITS) | np.arange(n, dtype=np.int64)
    offsets = pa.array(np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32))
    return pa.table({"window_id": pa.array(ids, pa.int64()),
                     "input_ids": pa.ListArray.from_arrays(offsets, pa.array(tokens[: n * seq_len], pa.int32())),
                     column: pa.array(np.full(n, cluster, np.int32))})


def build_packed_shards(layout: RunLayout, set_name: str, k: int, seq_len: int, seed: int = 0, *,
                        rows_per_file: int = 4096, force: bool = False) -> str:
    """``data/shards/<set_name>-k<K>``: the set's units packed into windows one cluster at a
    time (see the module doc). Returns the URI."""
    uri = layout.shards(packed_set(set_name, k))
    units_uri, assign_uri = layout.units(set_name), layout.assignments(k, set_name)
    if k >= 1 << FILE_BITS:
        raise ConfigError(f"k={k}: packed shards number clusters with {FILE_BITS} bits; use k < "
                          f"{1 << FILE_BITS}")
    st = Stage(uri, stage="packed-shards", config={"set": set_name, "k": k, "seq_len": seq_len, "seed": seed},
               inputs=input_fingerprints(layout, units_uri, assign_uri), force=force)
    if st.done:
        return uri
    counter = new_counter()
    base = set_hash(f"{set_name}/k{k}") << (FILE_BITS + WINDOW_BITS)
    with st.publish() as out:
        files = parquet_files(units_uri)
        ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=max(1, len(files)))
        ds = ds.map_batches(_UnitClusters(units_uri, (assign_uri, parquet_files(assign_uri)), k, counter,
                                          rebuild_fix(layout)),
                            batch_size=1, batch_format="numpy", compute=ray.data.TaskPoolStrategy())
        # one shuffle partition per units file (Ray's default, 200, is 200 tasks on any input):
        # a partition then holds about one file's units, whatever the k
        ds = ds.groupby("cluster", num_partitions=max(1, min(k, len(files)))).map_groups(
            _pack_cluster, fn_kwargs={"seq_len": seq_len, "k": k, "base": base}, batch_format="pyarrow")
        write_dataset(_in_seeded_order(ds, seed), out, counter, max_rows_per_file=rows_per_file)
        rows = count_rows(out.uri)
        if rows == 0:
            raise InputError(f"no cluster of the '{set_name}' set at k={k} holds {seq_len} tokens "
                             "(one window): use a smaller k or more data")
        um = manifest(units_uri) or {}
        out.manifest.update({"rows": rows, "seq_len": seq_len, "vocab_size": um.get("vocab_size"),
                             "tokens": rows * seq_len, "k": k,
                             "dropped_tokens": int(um.get("tokens", 0)) - rows * seq_len,
                             "columns": ["window_id", "input_ids", f"cluster_k{k}"]})
    return uri


# --------------------------------------------------------------------------------------------
# Nested domain train subsets
# --------------------------------------------------------------------------------------------

def _add_rank(batch: pa.Table, seed: int) -> pa.Table:
    rank = hash64(batch.column("window_id").to_numpy(), seed)  # a seeded permutation
    return batch.append_column("_rank", pa.array(rank, type=pa.uint64()))


def _in_seeded_order(ds, seed: int):
    """The rows of ``ds`` sorted by a seeded hash of their ``window_id`` (Ray Data's
    distributed sort): an order that depends on the rows only, not on how Ray ran the stage."""
    ds = ds.map_batches(_add_rank, fn_kwargs={"seed": seed}, batch_format="pyarrow",
                        compute=ray.data.TaskPoolStrategy())
    return ds.sort("_rank").drop_columns(["_rank"])


def build_train_subset(layout: RunLayout, domain: str, tokens: int, seed: int, *,
                       rows_per_file: int = 4096, force: bool = False) -> str:
    """``data/shards/domain-<d>-train-<tokens>``: the first ``tokens // seq_len`` windows of a
    seeded permutation of the domain's train shards."""
    src = layout.shards(domain_set(domain, "train"))
    uri = layout.shards(train_subset(domain, tokens))
    m = manifest(src)
    if m is None:
        raise StageError(f"input artifact '{src}' is not done; run its stage first")
    seq_len = int(m["seq_len"])
    want = tokens // seq_len
    if want < 1:
        raise ConfigError(f"field 'data.domain_train_tokens' has {tokens}, less than one window "
                          f"of data.seq_len={seq_len} tokens; use sizes >= {seq_len}")
    have = int(m["rows"])
    if want > have:
        raise InputError(f"domain '{domain}' has {have * seq_len} train tokens ({have} windows of "
                         f"{seq_len}) but data.domain_train_tokens asks for {tokens}; add domain "
                         "data or lower data.domain_train_tokens")
    st = Stage(uri, stage="train_subset",
               config={"domain": domain, "tokens": tokens, "seed": seed, "windows": want},
               inputs=input_fingerprints(layout, src), force=force)
    if st.done:
        return uri
    with st.publish() as out:
        write_dataset(_in_seeded_order(read_artifact(src), seed).limit(want), out,
                      max_rows_per_file=rows_per_file)
        rows = count_rows(out.uri)
        out.manifest.update({"rows": rows, "seq_len": seq_len, "tokens": rows * seq_len,
                             "domain": domain, "vocab_size": (manifest(src) or {}).get("vocab_size")})
    return uri
