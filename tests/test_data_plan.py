"""Each Train worker reads only its share (slm.models.data ``ShardPlan``), on real parquet shards
through real Ray Data: the ranks' rows are disjoint, equal in number and together the kept rows
(less fewer than ``world`` trailing ones), in the same order on every run; the bytes each rank's
reading tasks pull through the files halve with two workers; and a resumed epoch continues the
same order (``rank_batches``).

The shards: 2048 windows of 16 tokens in 32 files of one row group each (a rank part ends inside
at most one row group, which both neighbouring ranks then read); window i's tokens are
i, i+1, ..., so a row read back names its window."""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_shards import SEQ, write_shards  # noqa: E402

from slm.layout import RunLayout  # noqa: E402
from slm.models import data as md  # noqa: E402
from slm.models.train import rank_batches  # noqa: E402

FRACTION = 0.1


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    layout = RunLayout(str(tmp_path_factory.mktemp("plan")))
    n = 2048
    ids = np.arange(n, dtype=np.int32)[:, None] + np.arange(SEQ, dtype=np.int32)
    table = pa.table({"window_id": pa.array(np.arange(n, dtype=np.int64)),
                      "input_ids": pa.array(list(ids), type=pa.list_(pa.int32())),
                      "cluster_k2": pa.array(np.random.default_rng(5).integers(0, 2, n).astype(np.int32))})
    write_shards(layout, "generic", table, rows_per_file=64)
    return md.open_shards(layout, "generic", "tiny", ["cluster_k2"], SEQ)


def kept_rows(shards: md.ShardSet, split: str, select: str | None = None, value: int = 0) -> set[int]:
    """The window ids the split keeps, straight from the files."""
    t = pq.read_table(shards.files)
    keep = md.keep_mask({c: t.column(c).to_numpy() for c in ("window_id", "cluster_k2")}, split=split,
                        fraction=FRACTION, select=select, value=value)
    return set(t.column("window_id").to_numpy()[keep].tolist())


def window_ids(input_ids: np.ndarray) -> list[int]:
    """The windows of rows read back (window i's tokens are i, i+1, ...)."""
    assert (input_ids == input_ids[:, :1] + np.arange(SEQ)).all()
    return input_ids[:, 0].tolist()


def read(ds) -> tuple[list[int], int]:
    """(window ids in stream order, bytes its reading tasks read) of one rank's Dataset."""
    rows, nbytes = [], 0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        assert b["input_ids"].dtype == np.int32  # int64 only on the device
        rows += window_ids(b["input_ids"])
        nbytes += int(b["read_bytes"].sum())
    return rows, nbytes


def plan(shards, seed: int = 0, **kw) -> md.ShardPlan:
    return md.shard_dataset(shards, seed=seed, split=kw.pop("split", "train"), fraction=FRACTION, **kw)


@pytest.mark.parametrize("select", [None, "cluster_k2"])
def test_two_ranks_read_disjoint_equal_parts_of_the_kept_rows(shards, select):
    kw = {"select": select, "value": 1} if select else {}
    kept = kept_rows(shards, "train", select, 1)
    (r0, _), (r1, _) = (read(ds) for ds in plan(shards, **kw).rank_streams(2))
    assert len(r0) == len(r1) == len(kept) // 2
    assert not set(r0) & set(r1)
    assert set(r0) | set(r1) <= kept and len(kept) - len(r0) - len(r1) < 2
    # the order before the cut does not depend on the world size: one worker reads rank 0's
    # part, then rank 1's (then the odd trailing row, if any)
    (whole, _), = (read(ds) for ds in plan(shards, **kw).rank_streams(1))
    assert whole[:len(r0) + len(r1)] == r0 + r1 and set(whole) == kept


def test_same_seed_gives_the_same_per_rank_order(shards):
    first = [read(ds)[0] for ds in plan(shards, seed=3).rank_streams(2)]
    again = [read(ds)[0] for ds in plan(shards, seed=3).rank_streams(2)]  # a new plan: recounted
    other = [read(ds)[0] for ds in plan(shards, seed=4).rank_streams(2)]
    assert first == again
    assert first[0] != other[0] and set(first[0]) != set(other[0])  # the seed moves rows between ranks


def test_bytes_read_per_rank_halve_with_two_workers(shards):
    p = plan(shards)
    (_, one), = (read(ds) for ds in p.rank_streams(1))
    two = [read(ds)[1] for ds in p.rank_streams(2)]
    # really read: at least the compressed column chunks of the columns read, at most each file
    # once plus the reader's speculative read of its tail for the footer (64 KiB, pyarrow's
    # default footer read size; it covers these small files whole)
    chunks = 0
    for f in shards.files:
        md_ = pq.ParquetFile(f).metadata
        for g in range(md_.num_row_groups):
            rg = md_.row_group(g)
            chunks += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                          if rg.column(c).path_in_schema.split(".")[0] in ("input_ids", "window_id"))
    assert chunks <= one <= sum(os.path.getsize(f) + min(os.path.getsize(f), 64 << 10)
                                for f in shards.files)
    for b in two:  # 16 or 17 of the 32 row groups each
        assert abs(b / (one / 2) - 1) < 0.1, (two, one)


def test_valid_is_every_held_out_row_once_and_routed_rows_carry_their_cluster(shards):
    valid = md.valid_dataset(plan(shards, split="valid"), 10**6, "generic")
    rows = [i for b in valid.iter_batches(batch_size=None) for i in window_ids(b["input_ids"])]
    assert sorted(rows) == sorted(kept_rows(shards, "valid")) and "read_bytes" not in valid.schema().names
    routed = plan(shards, split="all", route="cluster_k2").rank_streams(2)[1]
    b = next(iter(routed.iter_batches(batch_size=None)))
    assert b["cluster"].dtype == np.int32 and set(b["cluster"].tolist()) <= {0, 1}


def test_rank_batches_resume_continues_the_same_order():
    stream = [{"input_ids": torch.arange(i, i + 10, dtype=torch.int32)[:, None].repeat(1, 4)}
              for i in range(0, 30, 10)] + [{"input_ids": torch.arange(30, 33, dtype=torch.int32)[:, None]}]
    kw = dict(seed=0, epoch=1, rank=1, batch_rows=5, columns=["input_ids"])
    full = [b["input_ids"][:, 0].tolist() for b in rank_batches(stream, skip=0, **kw)]
    assert len(full) == 6 and sorted(sum(full, [])) == list(range(30))  # the 3 trailing rows dropped
    for skip in range(7):
        assert [b["input_ids"][:, 0].tolist() for b in rank_batches(stream, skip=skip, **kw)] == full[skip:]
    other_rank = [b["input_ids"][:, 0].tolist() for b in rank_batches(stream, skip=0, **{**kw, "rank": 0})]
    next_epoch = [b["input_ids"][:, 0].tolist() for b in rank_batches(stream, skip=0, **{**kw, "epoch": 2})]
    assert other_rank != full and next_epoch != full
