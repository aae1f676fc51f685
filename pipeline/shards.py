"""Training shards, ``data/shards/<set>``: ``window_id``, ``input_ids`` and one ``cluster_k<K>``
column per K of the recipe; and the nested domain train subsets ``domain-<d>-train-<tokens>``.

**The join** (windows ⋈ assignments on ``window_id``) runs as one Ray Data task per windows
file: the task reads its file (bounded by ``data.rows_per_file``), then, for each K, reads only
the assignment rows in the file's ``window_id`` range through a pyarrow dataset filter. It is
correct whatever order the assignment files are in; because every stage keeps window order
(Ray Data ``preserve_order``), parquet row-group statistics make the range read touch only
the matching row groups. Why not the alternatives: ``Dataset.join`` needs polars (not a
dependency) and hash-shuffles the token windows (the big side) for every K; ``Dataset.zip`` is
a bulk operator that materializes both inputs in the object store. Nothing is collected on the
driver, and the shards keep the windows' order (deterministic).

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
from slm.layout import RunLayout, domain_set, train_subset
from slm.pipeline.artifacts import count_rows, parquet_files, read_artifact, write_dataset
from slm.pipeline.counters import fail, new_counter
from slm.stage import Stage, filesystem, input_fingerprints, manifest, rebuild_fix


# --------------------------------------------------------------------------------------------
# windows ⋈ assignments
# --------------------------------------------------------------------------------------------

def _lookup(ids: np.ndarray, assign_uri: str, files: list[str], k: int, counter: Any,
            where: str, fix: str) -> np.ndarray:
    """Cluster of each window id, read from the assignment rows in [min(ids), max(ids)]."""
    fs, _ = filesystem(assign_uri)
    lo, hi = int(ids.min()), int(ids.max())
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(
        columns=["window_id", "cluster"],
        filter=(pc.field("window_id") >= lo) & (pc.field("window_id") <= hi))
    a_ids = table.column("window_id").to_numpy()
    order = np.argsort(a_ids, kind="stable")
    a_ids = a_ids[order]
    clusters = table.column("cluster").to_numpy()[order]
    pos = np.searchsorted(a_ids, ids)
    pos_c = np.minimum(pos, max(len(a_ids) - 1, 0))
    if len(a_ids) == 0 or not np.array_equal(a_ids[pos_c], ids):
        missing = int(np.sum(a_ids[pos_c] != ids)) if len(a_ids) else len(ids)
        fail(counter, where, StageError(
            f"'{assign_uri}' lacks the cluster of {missing} window(s) of '{where}'; the assignment "
            f"is stale: {fix} to rebuild assign-k{k} and the shards"))
    return clusters[pos_c].astype(np.int32)


class _JoinFile:
    """One windows file → the same rows plus ``cluster_k<K>`` columns."""

    def __init__(self, windows_uri: str, assigns: dict[int, tuple[str, list[str]]], counter: Any,
                 fix: str):
        self.windows_uri = windows_uri
        self.assigns = assigns
        self.counter = counter
        self.fix = fix  # how to rebuild, from the driver's command (rebuild_fix)

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        fs, _ = filesystem(self.windows_uri)
        for path in batch["path"]:
            table = pq.read_table(fs.open_input_file(str(path)), columns=["window_id", "input_ids"])
            if table.num_rows == 0:
                continue
            ids = table.column("window_id").to_numpy()
            for k, (uri, files) in sorted(self.assigns.items()):
                table = table.append_column(f"cluster_k{k}", pa.array(
                    _lookup(ids, uri, files, k, self.counter, str(path), self.fix), type=pa.int32()))
            yield table


def build_shards(layout: RunLayout, set_name: str, ks: list[int], *, rows_per_file: int = 4096,
                 force: bool = False) -> str:
    """``data/shards/<set_name>``: windows joined with the assignments of every K."""
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
                             "columns": ["window_id", "input_ids"] + [f"cluster_k{k}" for k in assign_uris]})
    return uri


# --------------------------------------------------------------------------------------------
# Nested domain train subsets
# --------------------------------------------------------------------------------------------

def _add_rank(batch: pa.Table, seed: int) -> pa.Table:
    rank = hash64(batch.column("window_id").to_numpy(), seed)  # a seeded permutation
    return batch.append_column("_rank", pa.array(rank, type=pa.uint64()))


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
        ds = read_artifact(src).map_batches(_add_rank, fn_kwargs={"seed": seed},
                                            batch_format="pyarrow",
                                            compute=ray.data.TaskPoolStrategy())
        ds = ds.sort("_rank").limit(want).drop_columns(["_rank"])
        write_dataset(ds, out, max_rows_per_file=rows_per_file)
        rows = count_rows(out.uri)
        out.manifest.update({"rows": rows, "seq_len": seq_len, "tokens": rows * seq_len,
                             "domain": domain, "vocab_size": (manifest(src) or {}).get("vocab_size")})
    return uri
