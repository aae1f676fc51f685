"""Token shards → the Ray Datasets a training run reads (streamed; nothing but a plan is held on
the driver). Used by pretraining (models/pretrain.py) and specialization (tune/finetune.py).

Held-out generic rows are those whose ``window_id`` hashes (slm.hashing) below
``pretrain.valid_fraction``: the same rows whatever the file layout, seed or world size, and
never trained on.

Each Train worker reads only its share. ``shard_dataset`` returns a ``ShardPlan``, not a
Dataset: only the launcher knows the number of workers. ``ShardPlan.rank_streams(world)`` (called
by models/launch.py ``run_training``) turns it into one Ray Dataset per rank:

1. the *units* are the parquet row groups of the shard set, in an order seeded by ``seed``
   (footers only, read on the driver);
2. the driver counts each unit's *kept* rows (the split's holdout filter and, for an SLM-mix
   expert, ``select == value``) by reading only the small columns ``window_id`` / ``select``
   (8-12 bytes a row against ``4·seq_len`` for the tokens; no columns at all for a split
   ``"all"`` without ``select``: the footers' row counts are the kept counts);
3. the kept rows, concatenated in unit order, are cut into ``world`` equal contiguous parts of
   ``kept // world`` rows (the last ``kept % world`` rows are dropped: every rank runs the same
   number of steps per epoch, or its collectives would hang);
4. rank r's Dataset reads the pieces of its part, one Ray task per piece (``read_pieces``: one
   row group, only the columns the run needs, then the kept rows ``[lo, hi)`` of it). A row
   group straddling two parts is read by both ranks: at most ``world - 1`` row groups are read
   twice per epoch.

The order is a function of (seed, shard files, world size) only, so a re-run and a resumed run
see the same rows in the same order (the loop permutes each rank's stream by (seed, epoch,
rank); models/train.py). Why not Ray's ``streaming_split`` (``DataConfig(datasets_to_split=
["train"])``): its OutputSplitter (ray/data/_internal/execution/operators/output_splitter.py)
hands each block to the split that has received the fewest rows so far and, without
``preserve_order``, to whichever iterator asks first; which rows a rank gets then depends on
Ray Data's block boundaries (read parallelism, which follows the cluster's CPUs, and dynamic
block splitting), so the same seed would not give the same per-rank rows on another cluster, and
the data position (epoch, batches done) would not name the same rows after a restart.

Every row of a rank's stream carries ``read_bytes``: the bytes its reading task pulled through
the input file it opened (footer and column chunks; counted by ``_CountingFile``), on the first
row of each piece and 0 on the others, so the Train worker can sum the bytes its feed really
read (models/train.py reports them; bench/bench_data_feed.py measures them). Tokens stay int32
(as stored) until the loop moves them to the device.

``valid`` evaluation does not use rank parts: ``valid_dataset`` materializes the first held-out
rows of ``ShardPlan.stream()`` (every unit in the seeded order, no counting pass) once, every
rank iterates all of it and evaluates its slice of each global batch, so every held-out window
counts once over all ranks.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data.aggregate import Max, Min

from slm.errors import InputError, StageError
from slm.hashing import hash_uniform
from slm.layout import RunLayout
from slm.pipeline.artifacts import parquet_files
from slm.stage import filesystem, manifest

# driver threads reading footers and the small filter columns (I/O bound: pyarrow drops the GIL)
_DRIVER_THREADS = 8
# CPUs of one reading task (at most two per stream). Reading a row group is I/O and a copy;
# with a whole CPU per task, a stream beside a fractional-CPU Train worker on a small node gets
# no task scheduled at all (two 0.5-CPU experts on two 1-CPU nodes leave 0.5 free on each: Ray
# Data's resource coordinator reserves nothing for a 1-CPU task and the run waits forever).
READ_CPUS = 0.25


def holdout_mask(window_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the held-out windows: a fixed hash of window_id is below ``fraction``."""
    return hash_uniform(window_ids, seed=0) < fraction


def filter_columns(split: str, select: str | None) -> list[str]:
    """The columns the kept-row filter of ``split`` / ``select`` reads."""
    return (["window_id"] if split != "all" else []) + ([select] if select else [])


def keep_mask(columns: Mapping[str, np.ndarray], *, split: str, fraction: float,
              select: str | None, value: int) -> np.ndarray | None:
    """The kept rows of one row group (None: all of them): this split's rows (``train``: not
    held out, ``valid``: held out, ``all``), and for a mix expert the rows of one cluster."""
    keep = None
    if split != "all":
        held = holdout_mask(np.asarray(columns["window_id"]), fraction)
        keep = held if split == "valid" else ~held
    if select is not None:
        mine = np.asarray(columns[select]) == value
        keep = mine if keep is None else keep & mine
    return keep


class _CountingFile:
    """A read-only file object over a pyarrow input file that counts the bytes read through it
    (pyarrow's parquet reader reads the footer and the column chunks it needs through it)."""

    def __init__(self, raw):
        self.raw, self.bytes = raw, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.bytes += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.raw.seek(pos, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:  # the opener closes the raw file
        pass


def _token_matrix(column, where: str) -> np.ndarray:
    """``input_ids`` list<int32> → int32 [n, seq_len] (no copy to int64)."""
    arr = column.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), dtype=np.int32)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        raise InputError(f"token shards file '{where}' holds windows of different lengths "
                         f"({lengths.min()}..{lengths.max()} tokens); rebuild the shards with "
                         "`slm data run --force`")
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False).reshape(len(arr), -1)


def read_pieces(batch: dict[str, np.ndarray], *, uri: str, split: str, fraction: float,
                route: str | None, select: str | None, value: int,
                meter: bool) -> dict[str, np.ndarray]:
    """Ray Data map over pieces (``path``, ``row_group``, ``lo``, ``hi``): read each piece's row
    group (only the columns needed), keep its kept rows ``[lo, hi)`` (``hi`` < 0: to the end).
    Returns ``input_ids`` int32 [n, seq_len], ``cluster`` int32 [n] when ``route``, and with
    ``meter`` ``read_bytes`` int64 [n] (the piece's bytes read, on its first row)."""
    fs, _ = filesystem(uri)
    columns = sorted(set(["input_ids"] + filter_columns(split, select) + ([route] if route else [])))
    parts: dict[str, list[np.ndarray]] = {"input_ids": [], "cluster": [], "read_bytes": []}
    for path, rg, lo, hi in zip(batch["path"], batch["row_group"], batch["lo"], batch["hi"]):
        path = str(path)
        with fs.open_input_file(path) as raw:
            f = _CountingFile(raw)
            table = pq.ParquetFile(f).read_row_group(int(rg), columns=columns)
        keep = keep_mask({c: table.column(c).to_numpy() for c in filter_columns(split, select)},
                         split=split, fraction=fraction, select=select, value=value)
        rows = np.flatnonzero(keep) if keep is not None else np.arange(table.num_rows)
        rows = rows[int(lo):(int(hi) if hi >= 0 else None)]
        parts["input_ids"].append(_token_matrix(table.column("input_ids"), path)[rows])
        if route:
            parts["cluster"].append(table.column(route).to_numpy()[rows].astype(np.int32, copy=False))
        if meter:
            read = np.zeros(len(rows), dtype=np.int64)
            read[:1] = f.bytes  # a piece with no kept rows carries no count (not in rank parts)
            parts["read_bytes"].append(read)
    seq = max((p.shape[1] for p in parts["input_ids"]), default=0)
    out = {"input_ids": np.concatenate([p.reshape(-1, seq) for p in parts["input_ids"]])
           if parts["input_ids"] else np.zeros((0, 0), dtype=np.int32)}
    if route:
        out["cluster"] = np.concatenate(parts["cluster"]) if parts["cluster"] else np.zeros(0, np.int32)
    if meter:
        out["read_bytes"] = np.concatenate(parts["read_bytes"]) if parts["read_bytes"] else np.zeros(0, np.int64)
    return out


@dataclass
class ShardSet:
    """One shard set of the run (a published parquet artifact) and its checked properties."""

    uri: str
    files: list[str]


def open_shards(layout: RunLayout, name: str, recipe_path: str, need: list[str],
                seq_len: int, vocab: int = 0) -> ShardSet:
    """Check a shard set exists, has the columns the family needs, windows of seq_len and (with
    ``vocab``, the model's vocabulary) token ids of the model's tokenizer."""
    uri = layout.shards(name)
    make = f"`slm data run --recipe {recipe_path}`"
    m = manifest(uri)
    if m is None:
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
    if vocab:
        # exact where the shards recorded their tokenizer's size (windows.py), else a sample;
        # every batch is checked again on the workers (models/train.py check_token_ids)
        recorded = m.get("vocab_size")
        top = -1
        if pf.metadata.num_rows:
            top = int(pc.max(pc.list_flatten(pf.read_row_group(0, columns=["input_ids"]).column(0))).as_py())
        if (recorded and int(recorded) != vocab) or top >= vocab:
            found = f"a tokenizer of {recorded} tokens" if recorded and int(recorded) != vocab else f"token id {top}"
            raise InputError(f"token shards '{uri}' were made with {found}, but the model's "
                             f"vocabulary has {vocab} tokens: the tokenizer does not match the "
                             f"model. Rebuild the shards with the model's tokenizer ({make} with "
                             "--force after restoring data/tokenizer), or train on a run whose "
                             "tokenizer made these shards")
    return ShardSet(uri, files)


@dataclass(frozen=True)
class Unit:
    """One parquet row group of a shard set: the unit of reading and of the seeded order."""

    path: str
    row_group: int
    rows: int


@dataclass(frozen=True)
class Piece:
    """The kept rows ``[lo, hi)`` of one row group (``hi`` < 0: to the end) that one rank reads."""

    path: str
    row_group: int
    lo: int = 0
    hi: int = -1


@dataclass
class ShardPlan:
    """Which rows of a shard set a run reads, in which order, and which rank reads which (see
    the module docstring). Built by ``shard_dataset``; holds no rows, only (once asked) the
    units and their kept-row counts."""

    shards: ShardSet
    seed: int
    split: str
    fraction: float
    route: str | None = None
    select: str | None = None
    value: int = 0
    _units: list[Unit] | None = field(default=None, init=False, repr=False, compare=False)
    _kept: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    def units(self) -> list[Unit]:
        """The shard set's row groups in the order seeded by ``seed`` (from the footers)."""
        if self._units is None:
            fs, _ = filesystem(self.shards.uri)

            def footer(path: str) -> list[Unit]:
                with fs.open_input_file(path) as f:
                    md = pq.ParquetFile(f).metadata
                return [Unit(path, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]

            with ThreadPoolExecutor(_DRIVER_THREADS) as ex:
                units = [u for us in ex.map(footer, self.shards.files) for u in us]
            order = np.random.default_rng(self.seed).permutation(len(units))
            self._units = [units[i] for i in order]
        return self._units

    def kept(self) -> list[int]:
        """Kept rows of each unit (``units()`` order): the driver's counting pass over the
        filter's small columns (none for a split ``all`` without ``select``)."""
        if self._kept is None:
            units, cols = self.units(), filter_columns(self.split, self.select)
            if not cols:
                self._kept = [u.rows for u in units]
            else:
                fs, _ = filesystem(self.shards.uri)

                def count(path: str) -> dict[tuple[str, int], int]:
                    with fs.open_input_file(path) as f:
                        pf = pq.ParquetFile(f)
                        out = {}
                        for i in range(pf.metadata.num_row_groups):
                            t = pf.read_row_group(i, columns=cols)
                            keep = keep_mask({c: t.column(c).to_numpy() for c in cols}, split=self.split,
                                             fraction=self.fraction, select=self.select, value=self.value)
                            out[(path, i)] = int(keep.sum())
                    return out

                counts: dict[tuple[str, int], int] = {}
                with ThreadPoolExecutor(_DRIVER_THREADS) as ex:
                    for c in ex.map(count, self.shards.files):
                        counts.update(c)
                self._kept = [counts[(u.path, u.row_group)] for u in units]
        return self._kept

    def parts(self, world: int) -> list[list[Piece]]:
        """Rank r's pieces: kept rows ``[r·n, (r+1)·n)`` of the unit order, ``n = kept // world``."""
        kept = self.kept()
        n = sum(kept) // world
        parts: list[list[Piece]] = [[] for _ in range(world)]
        start = 0  # kept rows before this unit
        for u, k in zip(self.units(), kept):
            end = start + k
            if n and k:
                for r in range(start // n, min((end - 1) // n, world - 1) + 1):
                    lo, hi = max(start, r * n), min(end, (r + 1) * n)
                    if lo < hi:
                        parts[r].append(Piece(u.path, u.row_group, lo - start, hi - start))
            start = end
        return parts

    def rank_streams(self, world: int) -> list[ray.data.Dataset]:
        """One Dataset per rank: its equal part of the kept rows, in order, metered."""
        return [self.read(p, meter=True) for p in self.parts(world)]

    def stream(self) -> ray.data.Dataset:
        """Every kept row in unit order, no counting pass (the held-out rows; unmetered)."""
        return self.read([Piece(u.path, u.row_group) for u in self.units()], meter=False)

    def read(self, pieces: list[Piece], *, meter: bool) -> ray.data.Dataset:
        """A Dataset reading ``pieces`` in order, one Ray task per piece."""
        items = [asdict(p) for p in pieces]
        ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
        # the pieces' order is the data order, whatever the caller's DataContext (this is the
        # Dataset's own copy of it)
        ds.context.execution_options.preserve_order = True
        return ds.map_batches(read_pieces, batch_size=1, batch_format="numpy",
                              fn_kwargs={"uri": self.shards.uri, "split": self.split,
                                         "fraction": self.fraction, "route": self.route,
                                         "select": self.select, "value": self.value, "meter": meter},
                              num_cpus=READ_CPUS, compute=ray.data.TaskPoolStrategy(size=2))


def shard_dataset(shards: ShardSet, *, seed: int, split: str, fraction: float,
                  route: str | None = None, select: str | None = None, value: int = 0) -> ShardPlan:
    """The plan of what a run reads from ``shards``: ``split`` (train / valid / all) of the rows,
    for a mix expert only ``select == value``, ``route`` carried as ``cluster``; row groups in an
    order seeded by ``seed``. The launcher turns it into per-rank Datasets (``rank_streams``)."""
    return ShardPlan(shards, int(seed), split, fraction, route, select, int(value))


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


def valid_dataset(plan: ShardPlan, rows: int, what: str) -> ray.data.Dataset:
    """The first ``rows`` held-out rows, materialized once (every evaluation reads the same
    small set; every rank iterates all of it). Fewer rows than a global batch are fine:
    evaluation takes partial batches."""
    valid = plan.stream().limit(rows).materialize()
    if valid.count() == 0:
        raise InputError(f"{what} has no held-out rows; raise pretrain.valid_fraction (generic "
                         "shards) or give the domain a larger valid split (at least one window "
                         "of data.seq_len tokens)")
    return valid


# --------------------------------------------------------------------------------------------
# Rows in this process (a local 1-worker run, models/runtime.py LocalRuntime)
# --------------------------------------------------------------------------------------------

# Rows kept per process, newest last: a Tune actor reused for the next trial of the same
# (domain, size) reads nothing. Domain sets are small (64M tokens = 256 MB of int32); the cap
# keeps a long-lived actor bounded.
ROW_CACHE_BYTES = 2 << 30
_row_cache: "OrderedDict[tuple, dict[str, np.ndarray]]" = OrderedDict()


def load_rows(plan: ShardPlan, pieces: list[Piece], *, meter: bool, limit: int = 0) -> dict[str, np.ndarray]:
    """The kept rows of ``pieces`` (first ``limit`` of them when > 0), read in this process with
    the same reader the Ray Datasets use (``read_pieces``), cached by the shard set's manifest
    fingerprint. A cached answer's ``read_bytes`` are 0: nothing was read for it."""
    key = (plan.shards.uri, (manifest(plan.shards.uri) or {}).get("fingerprint", ""), plan.split,
           plan.fraction, plan.route, plan.select, plan.value, tuple(pieces), meter, limit)
    hit = _row_cache.get(key)
    if hit is not None:
        _row_cache.move_to_end(key)
        return {**hit, "read_bytes": np.zeros_like(hit["read_bytes"])} if meter else hit
    kw = dict(uri=plan.shards.uri, split=plan.split, fraction=plan.fraction, route=plan.route,
              select=plan.select, value=plan.value, meter=meter)
    parts, n = [], 0
    for p in pieces:
        parts.append(read_pieces({"path": [p.path], "row_group": [p.row_group], "lo": [p.lo],
                                  "hi": [p.hi]}, **kw))
        n += len(parts[-1]["input_ids"])
        if limit and n >= limit:
            break
    if not parts:
        parts = [read_pieces({"path": [], "row_group": [], "lo": [], "hi": []}, **kw)]
    seq = max(p["input_ids"].shape[1] for p in parts)
    rows = {k: np.concatenate([p[k].reshape(-1, seq) if k == "input_ids" else p[k] for p in parts])
            for k in parts[0]}
    if limit:
        rows = {k: v[:limit] for k, v in rows.items()}
    _row_cache[key] = rows
    while len(_row_cache) > 1 and sum(a.nbytes for r in _row_cache.values() for a in r.values()) > ROW_CACHE_BYTES:
        _row_cache.popitem(last=False)
    return rows


def local_train_rows(plan: ShardPlan) -> dict[str, np.ndarray]:
    """Every kept train row of ``plan`` for a run of one worker (rank 0's part of 1), metered."""
    return load_rows(plan, plan.parts(1)[0], meter=True)


def local_eval_rows(plan: ShardPlan, rows: int, what: str) -> dict[str, np.ndarray]:
    """The first ``rows`` kept rows of ``plan`` in unit order (0: all), as ``valid_dataset``
    takes them for a worker group."""
    out = load_rows(plan, [Piece(u.path, u.row_group) for u in plan.units()], meter=False, limit=rows)
    if len(out["input_ids"]) == 0:
        raise InputError(f"{what} has no held-out rows; give the domain a larger split (at "
                         "least one window of data.seq_len tokens)")
    return out


def train_stream_name(rank: int) -> str:
    """The Ray Train dataset name of rank ``rank``'s train stream (launch.py gives every rank
    its own; the Trainer asks for its own)."""
    return f"train_rank{rank}"
