"""Tokenizer (byte-level BPE / named), windows, units and shards on a small real corpus (real
Ray Data)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from slm.errors import InputError
from slm.layout import RunLayout, domain_set, packed_set, train_subset
from slm.pipeline.artifacts import read_rows
from slm.pipeline.config import CorpusConfig, TokenizerConfig
from slm.pipeline.ingest import ingest_generic, ingest_source
from slm.pipeline.sample_corpus import paragraphs, write_parquet
from slm.pipeline.artifacts import parquet_files
from slm.pipeline.shards import (build_packed_shards, build_shards, build_train_subset,
                                shard_token_histogram)
from slm.pipeline.tokenizer import EOS, build_tokenizer, run_tokenizer
from slm.pipeline.windows import _cached_core, build_units, build_windows, tokenize_file
from slm.stage import manifest, publish

SEQ = 32
VOCAB = 320


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """A run directory with a generic corpus (60 docs), a BPE tokenizer, generic windows and
    units."""
    root = tmp_path_factory.mktemp("tokwin")
    texts = paragraphs(60)
    write_parquet(str(root / "generic.parquet"), texts)
    layout = RunLayout(str(root / "run"))
    ingest_generic(layout, CorpusConfig(), str(root / "generic.parquet"))
    build_tokenizer(layout, TokenizerConfig(vocab_size=VOCAB))
    build_windows(layout, "generic", layout.corpus_generic(), SEQ)
    build_units(layout, "generic", layout.corpus_generic(), SEQ)
    return layout, texts


def _stream(layout: RunLayout) -> tuple[list[list[int]], int]:
    """Each corpus document's tokens + EOS, in corpus order, and the EOS id."""
    tok = run_tokenizer(layout)
    corpus = read_rows(layout.corpus_generic()).column("text").to_pylist()
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in corpus], tok.eos_token_id


def test_bpe_tokenizer_is_a_transformers_fast_tokenizer(run):
    layout, texts = run
    tok = AutoTokenizer.from_pretrained(layout.tokenizer)
    assert tok.is_fast and len(tok) == VOCAB == manifest(layout.tokenizer)["vocab_size"]
    assert tok.eos_token == EOS and tok.convert_tokens_to_ids(EOS) == tok.eos_token_id
    ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == texts[0]  # byte-level: lossless
    assert len(ids) < len(texts[0].encode()) / 1.5  # merges learned: well under one token per byte
    assert run_tokenizer(layout).eos_token_id == tok.eos_token_id


def test_named_tokenizer_by_path(run, tmp_path):
    layout, _ = run
    other = RunLayout(str(tmp_path / "run2"))
    build_tokenizer(other, TokenizerConfig(name=layout.tokenizer))
    assert manifest(other.tokenizer)["vocab_size"] == VOCAB
    a, b = run_tokenizer(layout), run_tokenizer(other)
    assert a("hello windows")["input_ids"] == b("hello windows")["input_ids"]


def test_windows_are_the_eos_joined_token_stream(run):
    layout, texts = run
    uri = layout.windows("generic")
    rows = read_rows(uri)
    assert rows.schema.field("window_id").type == pa.int64()
    assert rows.schema.field("input_ids").type == pa.list_(pa.int32())
    ids = np.array(rows.column("input_ids").to_pylist(), dtype=np.int64)
    assert ids.shape[1] == SEQ

    # The corpus artifact is one file: its documents in order, each + EOS, cut into windows.
    tok = run_tokenizer(layout)
    corpus = read_rows(layout.corpus_generic()).column("text").to_pylist()
    assert sorted(corpus) == sorted(texts)
    stream = []
    for t in corpus:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // SEQ
    assert ids.shape[0] == n == manifest(uri)["rows"]
    assert ids.reshape(-1).tolist() == stream[: n * SEQ]
    assert manifest(uri)["tokens"] == len(stream)

    wid = rows.column("window_id").to_numpy()
    assert len(set(wid.tolist())) == len(wid) and np.all(np.diff(wid) == 1)


def test_window_ids_deterministic_across_rebuild_and_compute(run):
    layout, _ = run
    before = read_rows(layout.windows("generic"))
    build_windows(layout, "generic", layout.corpus_generic(), SEQ, force=True, compute="actors")
    after = read_rows(layout.windows("generic"))
    assert before.equals(after)
    other = RunLayout(layout.root + "-other-set")
    ingest_source(other.corpus_generic(), layout.corpus_generic(), CorpusConfig(), what="copy")
    build_tokenizer(other, TokenizerConfig(name=layout.tokenizer))
    build_windows(other, "domain-x-train", other.corpus_generic(), SEQ)
    ids_other = read_rows(other.windows("domain-x-train")).column("window_id").to_numpy()
    assert not set(ids_other.tolist()) & set(before.column("window_id").to_numpy().tolist())


def test_units_are_pieces_of_one_document(run):
    """Every document + EOS cut into pieces of at most seq_len tokens, in order; a unit never
    holds text of two documents."""
    layout, _ = run
    docs, eos = _stream(layout)
    rows = read_rows(layout.units("generic"))
    units = rows.column("input_ids").to_pylist()
    assert rows.column("tokens").to_pylist() == [len(u) for u in units]
    want = [d[i:i + SEQ] for d in docs for i in range(0, len(d), SEQ)]
    assert units == want
    assert all(eos not in u[:-1] for u in units)  # an EOS only ends a document
    assert manifest(layout.units("generic"))["tokens"] == sum(map(len, docs))
    uid = rows.column("unit_id").to_numpy()
    assert np.all(np.diff(uid) == 1)


def test_windows_name_their_units_whatever_the_batching(run):
    """A window's (unit_ids, unit_tokens) rebuild its tokens from the units artifact, and the
    rows do not depend on how many documents a tokenization batch holds (the carry between
    batches keeps its units)."""
    layout, _ = run
    windows = read_rows(layout.windows("generic"))
    units = read_rows(layout.units("generic"))
    by_id = dict(zip(units.column("unit_id").to_pylist(), units.column("input_ids").to_pylist()))
    used: dict[int, int] = {}  # tokens of each unit consumed so far
    for ids, uids, counts in zip(windows.column("input_ids").to_pylist(),
                                 windows.column("unit_ids").to_pylist(),
                                 windows.column("unit_tokens").to_pylist()):
        assert sum(counts) == SEQ and all(c > 0 for c in counts)
        rebuilt = []
        for u, c in zip(uids, counts):
            at = used.get(u, 0)
            rebuilt += by_id[u][at:at + c]
            used[u] = at + c
        assert rebuilt == ids
    tok, eos = _cached_core(layout.tokenizer)
    [path] = parquet_files(layout.corpus_generic())
    tables = {b: pa.concat_tables(list(tokenize_file(tok, eos, layout.corpus_generic(), path, 0, "generic",
                                                     SEQ, None, batch_size=b)))
              for b in (7, 512)}
    assert tables[7].equals(tables[512])
    assert tables[7].equals(windows.select(tables[7].column_names))


def _write_assignments(layout: RunLayout, k: int, set_name: str) -> dict[int, int]:
    """A real assignment artifact of the set's units (cluster = unit_id mod k), rows in
    *reverse* order so the join cannot rely on order."""
    ids = read_rows(layout.units(set_name)).column("unit_id").to_numpy()[::-1]
    clusters = (ids % k).astype(np.int32)
    with publish(layout.assignments(k, set_name), stage="assign", config={"k": k}) as out:
        half = len(ids) // 2
        for i, sl in enumerate((slice(0, half), slice(half, None))):
            pq.write_table(pa.table({"unit_id": ids[sl], "cluster": clusters[sl],
                                     "distance": np.zeros(len(ids[sl]), np.float32)}),
                           f"{out.local_dir}/part-{i}.parquet")
        out.manifest["rows"] = len(ids)
    return dict(zip(ids.tolist(), clusters.tolist()))


def test_shards_join_clusters_and_nested_train_subsets(run, ray_local):
    layout, _ = run
    train = domain_set("d", "train")
    build_windows(layout, train, layout.corpus_generic(), SEQ)  # the generic text as a domain
    build_units(layout, train, layout.corpus_generic(), SEQ)
    want = {k: _write_assignments(layout, k, train) for k in (2, 3)}

    uri = build_shards(layout, train, [2, 3], rows_per_file=16)
    rows = read_rows(uri)
    assert rows.column_names == ["window_id", "input_ids", "unit_tokens", "unit_clusters_k2",
                                 "unit_clusters_k3"]
    windows = read_rows(layout.windows(train))
    assert rows.column("window_id").equals(windows.column("window_id"))  # windows' order kept
    assert rows.column("input_ids").equals(windows.column("input_ids"))
    assert rows.column("unit_tokens").equals(windows.column("unit_tokens"))
    for k in (2, 3):
        got = rows.column(f"unit_clusters_k{k}").to_pylist()
        assert got == [[want[k][u] for u in us] for us in windows.column("unit_ids").to_pylist()]

    n_windows = rows.num_rows
    small, large = 4 * SEQ, 10 * SEQ
    s = read_rows(build_train_subset(layout, "d", small, seed=0)).column("window_id").to_pylist()
    big = read_rows(build_train_subset(layout, "d", large, seed=0)).column("window_id").to_pylist()
    assert len(s) == 4 and len(big) == 10 and big[:4] == s      # nested: a prefix
    assert manifest(layout.shards(train_subset("d", large)))["tokens"] == large
    assert sorted(big) != big[:]  # a permutation, not the first windows
    with pytest.raises(InputError, match=r"domain 'd' has \d+ train tokens .* asks for"):
        build_train_subset(layout, "d", (n_windows + 1) * SEQ, seed=0)
    assert manifest(layout.shards(train_subset("d", (n_windows + 1) * SEQ))) is None


def test_a_subsets_histogram_counts_the_tokens_of_its_units(run, ray_local):
    """The token histogram of a train subset: each unit's cluster, weighted by its tokens in
    the subset's windows (a window cut across two documents counts both, by their share)."""
    layout, _ = run
    train = domain_set("d", "train")
    sub = layout.shards(train_subset("d", 10 * SEQ))
    assert manifest(sub) is not None  # built by the test above (module order)
    rows = read_rows(sub)
    want = np.zeros(3, dtype=np.int64)
    for clusters, counts in zip(rows.column("unit_clusters_k3").to_pylist(),
                                rows.column("unit_tokens").to_pylist()):
        for c, n in zip(clusters, counts):
            want[c] += n
    got = shard_token_histogram(sub, 3)
    assert got.tolist() == want.tolist() and got.sum() == 10 * SEQ
    assert (want > 0).sum() >= 2  # the subset's windows span clusters


def test_packed_windows_hold_the_text_of_one_cluster(run, ray_local):
    """``<set>-k<K>``: each cluster's units, in unit order, concatenated and cut into windows;
    every token of a window labelled c is text of a unit of cluster c, and the ids and rows
    are the same when rebuilt."""
    layout, _ = run
    train = domain_set("d", "train")
    k = 3
    assigned = read_rows(layout.assignments(k, train))  # written by the shards test (module order)
    want = dict(zip(assigned.column("unit_id").to_pylist(), assigned.column("cluster").to_pylist()))
    uri = build_packed_shards(layout, train, k, SEQ, seed=0, rows_per_file=8)
    assert uri == layout.shards(packed_set(train, k))
    rows = read_rows(uri)
    assert rows.column_names == ["window_id", "input_ids", f"cluster_k{k}"]
    units = read_rows(layout.units(train))
    streams = {c: [] for c in range(k)}
    for uid, ids in zip(units.column("unit_id").to_pylist(), units.column("input_ids").to_pylist()):
        streams[want[uid]] += ids
    got = {c: [] for c in range(k)}
    order = np.argsort(rows.column("window_id").to_numpy(), kind="stable")
    for i in order:
        got[rows.column(f"cluster_k{k}")[int(i)].as_py()] += rows.column("input_ids")[int(i)].as_py()
    for c in range(k):
        n = len(streams[c]) // SEQ
        assert got[c] == streams[c][: n * SEQ], c  # the cluster's text, only its tail dropped
    assert rows.num_rows == sum(len(s) // SEQ for s in streams.values()) == manifest(uri)["rows"]
    # clusters are interleaved in the files (a seeded order), not one after the other
    labels = rows.column(f"cluster_k{k}").to_numpy()
    assert (np.diff(labels) != 0).sum() > k
    again = build_packed_shards(layout, train, k, SEQ, seed=0, rows_per_file=8, force=True)
    assert read_rows(again).equals(rows)
