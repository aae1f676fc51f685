"""Token shards → the Ray Datasets a training run reads (streamed; nothing is collected on the
driver). Used by pretraining (models/pretrain.py) and specialization (tune/finetune.py).

Held-out generic rows are those whose ``window_id`` hashes (slm.hashing) below
``pretrain.valid_fraction``: the same rows whatever the file layout, seed or world size, and
never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import ray.data
from ray.data.aggregate import Max, Min

from slm.errors import InputError, StageError
from slm.hashing import hash_uniform
from slm.layout import RunLayout
from slm.pipeline.artifacts import parquet_files
from slm.stage import filesystem, manifest


def holdout_mask(window_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the held-out windows: a fixed hash of window_id is below ``fraction``."""
    return hash_uniform(window_ids, seed=0) < fraction


def prepare_rows(batch: dict[str, np.ndarray], *, split: str, fraction: float,
                 route: str | None, select: str | None, value: int) -> dict[str, np.ndarray]:
    """Ray Data map: keep this split's rows (and one cluster for a mix expert), as int64
    ``input_ids`` [n, seq_len] (+ ``cluster`` [n] when a column routes the batch)."""
    keep = np.ones(len(batch["window_id"]), dtype=bool)
    if split != "all":
        held = holdout_mask(batch["window_id"], fraction)
        keep &= held if split == "valid" else ~held
    if select is not None:
        keep &= batch[select] == value
    ids = batch["input_ids"][keep]
    out = {"input_ids": np.stack(list(ids)).astype(np.int64) if len(ids) else
           np.zeros((0, 0), dtype=np.int64)}
    if route is not None:
        out["cluster"] = batch[route][keep].astype(np.int64)
    return out


@dataclass
class ShardSet:
    """One shard set of the run (a published parquet artifact) and its checked properties."""

    uri: str
    files: list[str]


def open_shards(layout: RunLayout, name: str, recipe_path: str, need: list[str],
                seq_len: int) -> ShardSet:
    """Check a shard set exists, has the columns the family needs and windows of seq_len."""
    uri = layout.shards(name)
    make = f"`slm data run --recipe {recipe_path}`"
    if manifest(uri) is None:
        raise StageError(f"token shards '{uri}' are missing (not done); build them with {make}")
    files = parquet_files(uri)
    if not files:
        raise InputError(f"token shards '{uri}' hold no parquet files; delete the directory and "
                         f"re-run {make}")
    fs, _ = filesystem(uri)
    pf = pq.ParquetFile(fs.open_input_file(files[0]))
    cols = set(pf.schema_arrow.names)
    for c in ["window_id", "input_ids"] + need:
        if c not in cols:
            raise InputError(f"token shards '{uri}' (file '{files[0]}') have no column '{c}' "
                             f"(columns: {', '.join(sorted(cols))}); rebuild them with {make} "
                             "so that every k of the recipe has its cluster column")
    if pf.metadata.num_rows:
        first = pf.read_row_group(0, columns=["input_ids"]).column(0)[0].as_py()
        if len(first) != seq_len:
            raise InputError(f"token shards '{uri}' hold windows of {len(first)} tokens but "
                             f"data.seq_len is {seq_len}; rebuild the shards or set "
                             f"--data.seq_len {len(first)}")
    return ShardSet(uri, files)


def shard_dataset(shards: ShardSet, *, seed: int, split: str, fraction: float,
                  route: str | None = None, select: str | None = None, value: int = 0):
    """A Ray Dataset of prepared rows. Files are read in an order seeded by ``seed`` (the
    first half of the data order; the loop permutes windows by (seed, epoch))."""
    fs, _ = filesystem(shards.uri)
    files = [shards.files[i] for i in np.random.default_rng(seed).permutation(len(shards.files))]
    cols = ["window_id", "input_ids"] + sorted({c for c in (route, select) if c})
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(cols)
    return ds.map_batches(prepare_rows, batch_format="numpy",
                          fn_kwargs={"split": split, "fraction": fraction, "route": route,
                                     "select": select, "value": value},
                          compute=ray.data.TaskPoolStrategy(size=2))


def check_cluster_ids(shards: ShardSet, column: str, k: int) -> None:
    """Every cluster id in [0, k): a distributed min/max over the one column."""
    fs, _ = filesystem(shards.uri)
    ds = ray.data.read_parquet(shards.files, filesystem=fs).select_columns([column])
    agg = ds.aggregate(Min(column), Max(column)) or {}
    lo, hi = agg.get(f"min({column})"), agg.get(f"max({column})")
    if lo is None:
        return
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise InputError(f"token shards '{shards.uri}' have {column} = {bad}, outside [0, {k}); "
                         "the shards were built with another k-means: rebuild them with "
                         "`slm data run --force`")


def valid_dataset(ds, rows: int, what: str):
    """The first ``rows`` held-out rows, materialized once (every evaluation reads the same
    small set). Fewer rows than a global batch are fine: evaluation takes partial batches."""
    valid = ds.limit(rows).materialize()
    if valid.count() == 0:
        raise InputError(f"{what} has no held-out rows; raise pretrain.valid_fraction (generic "
                         "shards) or give the domain a larger valid split (at least one window "
                         "of data.seq_len tokens)")
    return valid
