"""Synthetic token shards for benchmarks and tests: a WordLevel tokenizer and parquet token
shards in the design's schema (window_id, input_ids list<int32>[seq_len], cluster_k<K>),
published with slm.stage.publish like the data pipeline does.

Tokens follow a cluster-dependent Markov chain (next = (a·t + c_cluster) mod V, with noise), so
a tiny model's loss really drops and experts see different distributions."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from slm.layout import RunLayout
from slm.stage import publish

VOCAB = 128


def write_tokenizer(layout: RunLayout, vocab: int = VOCAB) -> None:
    """Publish a WordLevel tokenizer of ``vocab`` tokens t0..t<vocab-1> as the run's tokenizer."""
    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    with publish(layout.tokenizer, stage="tokenizer", config={"vocab": vocab}) as out:
        tok.save(os.path.join(out.local_dir, "tokenizer.json"))


def windows(n: int, seq: int, ks: list[int], seed: int, id_base: int = 0,
            vocab: int = VOCAB, bad_cluster: int | None = None) -> pa.Table:
    """``n`` windows of ``seq`` tokens with a cluster_k<k> column per k in ``ks`` (the chain
    follows the smallest k's cluster); ``bad_cluster`` overwrites the first row's ids."""
    rng = np.random.default_rng(seed)
    clusters = {k: rng.integers(0, k, size=n).astype(np.int32) for k in ks}
    base = clusters[min(ks)] if ks else np.zeros(n, dtype=np.int32)
    ids = np.zeros((n, seq), dtype=np.int32)
    ids[:, 0] = rng.integers(0, vocab, size=n)
    for t in range(1, seq):
        nxt = (5 * ids[:, t - 1] + 17 * base + 3) % vocab
        noise = rng.random(n) < 0.1
        ids[:, t] = np.where(noise, rng.integers(0, vocab, size=n), nxt)
    cols = {"window_id": pa.array(np.arange(id_base, id_base + n, dtype=np.int64)),
            "input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}
    for k, c in clusters.items():
        if bad_cluster is not None:
            c = c.copy()
            c[0] = bad_cluster
        cols[f"cluster_k{k}"] = pa.array(c)
    return pa.table(cols)


def write_shards(layout: RunLayout, name: str, table: pa.Table, rows_per_file: int = 128) -> None:
    """Publish ``table`` as the run's shard set ``name`` (``rows_per_file`` rows per parquet file)."""
    with publish(layout.shards(name), stage="shards", config={"name": name}) as out:
        for i in range(0, table.num_rows, rows_per_file):
            pq.write_table(table.slice(i, rows_per_file),
                           os.path.join(out.local_dir, f"part-{i // rows_per_file:05d}.parquet"))
