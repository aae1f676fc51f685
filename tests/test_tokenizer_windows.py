"""Tokenizer (byte-level BPE / named), windows and shards on a small real corpus (real Ray Data)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from slm.errors import InputError
from slm.layout import RunLayout, domain_set, train_subset
from slm.pipeline.artifacts import read_rows
from slm.pipeline.config import CorpusConfig, TokenizerConfig
from slm.pipeline.ingest import ingest_generic, ingest_source
from slm.pipeline.sample_corpus import paragraphs, write_parquet
from slm.pipeline.shards import build_shards, build_train_subset
from slm.pipeline.tokenizer import EOS, build_tokenizer, run_tokenizer
from slm.pipeline.windows import build_windows
from slm.stage import manifest, publish

SEQ = 32
VOCAB = 320


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """A run directory with a generic corpus (60 docs), a BPE tokenizer and generic windows."""
    root = tmp_path_factory.mktemp("tokwin")
    texts = paragraphs(60)
    write_parquet(str(root / "generic.parquet"), texts)
    layout = RunLayout(str(root / "run"))
    ingest_generic(layout, CorpusConfig(), str(root / "generic.parquet"))
    build_tokenizer(layout, TokenizerConfig(vocab_size=VOCAB))
    build_windows(layout, "generic", layout.corpus_generic(), SEQ)
    return layout, texts


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


def _write_assignments(layout: RunLayout, k: int, set_name: str) -> dict[int, int]:
    """A real assignment artifact (cluster = window_id mod k), rows in *reverse* order so the
    join cannot rely on order."""
    ids = read_rows(layout.windows(set_name)).column("window_id").to_numpy()[::-1]
    clusters = (ids % k).astype(np.int32)
    with publish(layout.assignments(k, set_name), stage="assign", config={"k": k}) as out:
        half = len(ids) // 2
        for i, sl in enumerate((slice(0, half), slice(half, None))):
            pq.write_table(pa.table({"window_id": ids[sl], "cluster": clusters[sl],
                                     "distance": np.zeros(len(ids[sl]), np.float32)}),
                           f"{out.local_dir}/part-{i}.parquet")
        out.manifest["rows"] = len(ids)
    return dict(zip(ids.tolist(), clusters.tolist()))


def test_shards_join_clusters_and_nested_train_subsets(run, ray_local):
    layout, _ = run
    train = domain_set("d", "train")
    build_windows(layout, train, layout.corpus_generic(), SEQ)  # the generic text as a domain
    want = {k: _write_assignments(layout, k, train) for k in (2, 3)}

    uri = build_shards(layout, train, [2, 3], rows_per_file=16)
    rows = read_rows(uri)
    assert rows.column_names == ["window_id", "input_ids", "cluster_k2", "cluster_k3"]
    windows = read_rows(layout.windows(train))
    assert rows.column("window_id").equals(windows.column("window_id"))  # windows' order kept
    assert rows.column("input_ids").equals(windows.column("input_ids"))
    for k in (2, 3):
        got = rows.column(f"cluster_k{k}").to_pylist()
        assert got == [want[k][w] for w in rows.column("window_id").to_pylist()]

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
