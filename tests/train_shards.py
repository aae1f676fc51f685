"""Tiny real run directories for the training tests: a WordLevel tokenizer and parquet token
shards in the design's schema (window_id, input_ids list<int32>[seq_len], cluster_k<K>),
published with slm.stage.publish like the data pipeline does.

Tokens follow a cluster-dependent Markov chain (next = (a·t + c_cluster) mod V, with noise), so
a tiny model's loss really drops and experts see different distributions."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slm.config import Recipe
from slm.layout import RunLayout
from slm.stage import publish

VOCAB = 128
SEQ = 16


def write_tokenizer(layout: RunLayout, vocab: int = VOCAB) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    with publish(layout.tokenizer, stage="tokenizer", config={"vocab": vocab}) as out:
        tok.save(os.path.join(out.local_dir, "tokenizer.json"))


def windows(n: int, seq: int, ks: list[int], seed: int, id_base: int = 0,
            vocab: int = VOCAB, bad_cluster: int | None = None) -> pa.Table:
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
    with publish(layout.shards(name), stage="shards", config={"name": name}) as out:
        for i in range(0, table.num_rows, rows_per_file):
            pq.write_table(table.slice(i, rows_per_file),
                           os.path.join(out.local_dir, f"part-{i // rows_per_file:05d}.parquet"))


def tiny_recipe(run_dir: str, **steps: int) -> Recipe:
    """A recipe for a 1-layer, 32-wide model on 16-token windows, 1 CPU worker."""
    r = Recipe(name="tiny", run_dir=run_dir, seed=0)
    r.corpus.generic = "unused"
    r.corpus.domains = {"alpha": "unused"}
    r.data.seq_len = SEQ
    r.kmeans.k_is, r.kmeans.k_mix, r.kmeans.k_pn = 4, 2, 2
    p = r.pretrain
    p.slm_size = p.llm_size = "tiny"
    p.steps = {"slm": 8, "llm": 8, "is": 8, "mix": 8, "pn": 8, **steps}
    p.pn_h, p.pn_m = 2, 2
    p.valid_fraction = 0.1
    p.logger = "tensorboard"
    t = p.train
    t.micro_batch, t.grad_accum, t.lr, t.warmup = 4, 1, 3e-3, 2
    t.eval_every, t.eval_batches, t.ckpt_every, t.log_every = 4, 2, 4, 4
    t.shuffle_window = 64
    p.scaling.num_workers, p.scaling.cpus_per_worker, p.scaling.max_failures = 1, 1.0, 1
    return r


def make_run(run_dir: str, n_generic: int = 512, ks: tuple[int, ...] = (2, 4)) -> RunLayout:
    """Tokenizer + generic shards (cluster_k2, cluster_k4) + SLM-is and domain valid shards."""
    layout = RunLayout(run_dir)
    write_tokenizer(layout)
    write_shards(layout, "generic", windows(n_generic, SEQ, list(ks), seed=1))
    write_shards(layout, "is-k4-alpha", windows(256, SEQ, list(ks), seed=2, id_base=10_000))
    write_shards(layout, "domain-alpha-valid", windows(64, SEQ, list(ks), seed=3, id_base=20_000))
    with open(os.path.join(run_dir, "NOTE.json"), "w") as f:
        json.dump({"what": "tiny training test run"}, f)
    return layout
