"""Embeddings of token windows with the real all-MiniLM-L6-v2 on a real local Ray."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slm import stage
from slm.errors import InputError, StageError
from slm.layout import RunLayout
from slm.pipeline.artifacts import arrow_to_vectors, parquet_files
from slm.pipeline.config import EmbedConfig
from slm.pipeline.coverage import embedding_coverage, unit_coverage
from slm.pipeline.embed import (embed_texts, embed_unit_sets, embed_units, load_model, offline_model_dir,
                                resolve_model)

SEQ = 32
TOPICS = {
    "cooking": "Simmer the {0} with garlic and olive oil, then season the {1} before serving.",
    "networks": "The {0} forwards packets to the {1} after the routing table lookup succeeds.",
    "astronomy": "Astronomers observed the {0} orbiting a distant {1} with the new telescope.",
    "football": "The {0} scored twice against the {1} in the second half of the match.",
}
WORDS = ["red", "small", "quiet", "northern", "bright", "old", "fast", "green", "tall", "soft"]


def documents() -> list[str]:
    docs = []
    for i in range(24):
        for topic, template in TOPICS.items():
            a, b = WORDS[i % 10], WORDS[(3 * i + 1) % 10]
            docs.append(" ".join(template.format(f"{a} {topic} item", f"{b} thing {j}")
                                 for j in range(2)))
    return docs


def build_run(root: str) -> tuple[RunLayout, object, list[list[int]]]:
    """A run with a tiny byte-level BPE (trained here) and generic units cut with it as
    pipeline/windows.py says: each document + EOS cut into pieces of at most SEQ tokens."""
    layout = RunLayout(root)
    docs = documents()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    with stage.publish(layout.tokenizer, stage="tokenizer", config={}) as out:
        tok.save_pretrained(out.local_dir)
    units = []
    for d in docs:
        ids = tok(d)["input_ids"] + [tok.eos_token_id]
        units += [ids[i:i + SEQ] for i in range(0, len(ids), SEQ)]
    n = len(units)
    with stage.publish(layout.units("generic"), stage="units", config={}) as out:
        for i, part in enumerate(np.array_split(np.arange(n), 2)):
            pq.write_table(pa.table({"unit_id": pa.array(part, pa.int64()),
                                     "input_ids": pa.array([units[j] for j in part], pa.list_(pa.int32())),
                                     "tokens": pa.array([len(units[j]) for j in part], pa.int32())}),
                           os.path.join(out.local_dir, f"part-{i}.parquet"))
    return layout, tok, units


@pytest.fixture(scope="module")
def bare_model():
    return load_model("all-MiniLM-L6-v2")


def test_default_model_resolves_to_the_offline_package():
    local = offline_model_dir()
    assert local is not None and os.path.isfile(os.path.join(local, "model.safetensors"))
    assert resolve_model("all-MiniLM-L6-v2") == local
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == local
    assert resolve_model(local) == local  # a path is used as is


def test_embed_units_matches_bare_sentence_transformers(ray_local, tmp_path, bare_model):
    layout, tok, ids = build_run(str(tmp_path / "run"))
    assert 80 <= len(ids) <= 400  # a small but real set
    cfg = EmbedConfig(batch_size=16, pool_size=1, num_cpus=1, torch_threads=2)
    uri = embed_units(layout, "generic", cfg)
    table = pa.concat_tables([pq.read_table(f) for f in parquet_files(uri)]).sort_by("unit_id")
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert table.column("unit_id").to_pylist() == list(range(len(ids)))
    assert table.column("tokens").to_pylist() == [len(u) for u in ids]  # carried for histograms
    got = arrow_to_vectors(table.column("embedding"))
    texts = tok.batch_decode([list(r) for r in ids], skip_special_tokens=True)
    want = bare_model.encode(texts, batch_size=16, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = (got * want).sum(axis=1)
    assert cosine.min() > 0.999, cosine.min()
    m = stage.manifest(uri)
    assert m["dim"] == 384 and m["rows"] == len(ids) and m["texts_per_s"] > 0
    # same topic → nearer than other topics (the vectors carry meaning, not just shape)
    assert float(got[0] @ got[1]) > float(np.median(got[0] @ got.T))
    assert embed_units(layout, "generic", cfg) == uri  # done: reused
    # how much of a unit the model reads changes the vectors: never reused silently
    with pytest.raises(StageError, match="another|other"):
        embed_units(layout, "generic", dataclasses.replace(cfg, max_seq_length=16))


def _write_units(layout: RunLayout, name: str, units: list[list[int]], force: bool = False) -> None:
    with stage.publish(layout.units(name), stage="units", config={"set": name, "units": len(units)},
                       force=force) as out:
        pq.write_table(pa.table({"unit_id": pa.array(range(len(units)), pa.int64()),
                                 "input_ids": pa.array(units, pa.list_(pa.int32())),
                                 "tokens": pa.array([len(u) for u in units], pa.int32())}),
                       os.path.join(out.local_dir, "part-0.parquet"))


def _embedded(uri: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in parquet_files(uri)]).sort_by("unit_id")


def test_one_pass_embeds_every_set_into_its_own_artifact(ray_local, tmp_path, bare_model):
    """Several sets share one pass over one actor pool (an actor starts once), yet each set
    gets exactly its own units' vectors, its own manifest, and is skipped once done."""
    layout, tok, ids = build_run(str(tmp_path / "run"))
    other = [u[::-1] for u in ids[:37]]  # other text, ids overlapping generic's (0..36)
    _write_units(layout, "domain-x-train", other)
    cfg = EmbedConfig(batch_size=16, pool_size=1, num_cpus=1, torch_threads=2)
    assert embed_unit_sets(layout, ["generic", "domain-x-train"], cfg) == ["generic", "domain-x-train"]
    for name, units in (("generic", ids), ("domain-x-train", other)):
        table = _embedded(layout.embeddings(name))
        assert table.column_names == ["unit_id", "tokens", "embedding"]  # the set tag is not written
        assert table.column("unit_id").to_pylist() == list(range(len(units)))
        want = bare_model.encode(tok.batch_decode(units, skip_special_tokens=True), batch_size=16,
                                 normalize_embeddings=True)
        assert (arrow_to_vectors(table.column("embedding")) * want).sum(axis=1).min() > 0.999
        m = stage.manifest(layout.embeddings(name))
        assert m["rows"] == len(units) and m["shared_pass"]["sets"] == ["generic", "domain-x-train"]
        assert m["shared_pass"]["units"] == len(ids) + len(other)
    assert embed_unit_sets(layout, ["generic", "domain-x-train"], cfg) == []  # both done
    # a set whose units changed is refused as built from other data, before any work; with
    # force it is embedded again, alone, and the other set is kept as it was
    kept = stage.manifest(layout.embeddings("generic"))["started"]
    _write_units(layout, "domain-x-train", other[:20], force=True)
    with pytest.raises(StageError, match="another|other"):
        embed_unit_sets(layout, ["generic", "domain-x-train"], cfg)
    assert embed_unit_sets(layout, ["domain-x-train"], cfg, force=True) == ["domain-x-train"]
    assert _embedded(layout.embeddings("domain-x-train")).num_rows == 20
    assert stage.manifest(layout.embeddings("generic"))["started"] == kept


def test_one_pass_with_an_empty_set_publishes_nothing(ray_local, tmp_path):
    layout, _, ids = build_run(str(tmp_path / "run"))
    _write_units(layout, "domain-x-train", [])
    with pytest.raises(InputError, match="domain-x-train.*empty"):
        embed_unit_sets(layout, ["generic", "domain-x-train"], EmbedConfig(batch_size=16))
    for name in ("generic", "domain-x-train"):
        assert stage.manifest(layout.embeddings(name)) is None


def test_coverage_counts_the_tokens_the_embedder_reads_and_units_spanning_documents(tmp_path, bare_model):
    """The report's 'what the clustering saw' figures: the fraction of each unit's text tokens
    within the embedder's limit (16 here, 2 of them special), and the units with an EOS between
    two pieces of text (none: a unit is cut inside one document; the same measure finds the
    windows cut across documents)."""
    layout, tok, ids = build_run(str(tmp_path / "run"))
    cov = embedding_coverage(layout, "generic", EmbedConfig(max_seq_length=16), sample=50)
    texts = tok.batch_decode([list(r) for r in ids[:50]], skip_special_tokens=True)
    lengths = [len(bare_model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert max(lengths) > 14  # some units are truncated at this limit
    assert cov["embedded_token_fraction"] == pytest.approx(sum(min(n, 14) for n in lengths) / sum(lengths))
    assert cov["multi_document_fraction"] == 0
    assert cov["sampled_units"] == 50 and cov["units"] == len(ids)
    stream = [t for u in ids for t in u]
    windows = [stream[i:i + SEQ] for i in range(0, len(stream) - SEQ + 1, SEQ)][:50]
    spanning = unit_coverage(windows, tok.eos_token_id, tok.batch_decode(windows, skip_special_tokens=True),
                             bare_model.tokenizer, 16)["multi_document_fraction"]
    assert spanning == sum(tok.eos_token_id in w[1:-1] for w in windows) / 50 and 0 < spanning < 1
    # at the model's own limit (256 tokens) every token of these short units is read
    assert embedding_coverage(layout, "generic", EmbedConfig(), sample=50)["embedded_token_fraction"] == 1.0
    # a plain transformers model directory (no sentence-transformers config): its tokenizer's limit
    plain = tmp_path / "plain-model"
    plain.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(offline_model_dir(), name), plain / name)
    cov = embedding_coverage(layout, "generic", EmbedConfig(model=str(plain)), sample=50)
    # (512: its tokenizer_config.json, what sentence-transformers reads for such a directory)
    assert cov["embedder_max_tokens"] == 512


def test_embedder_on_any_text_dataset_keeps_other_columns(ray_local, bare_model):
    texts = documents()[:40]
    ds = ray.data.from_items([{"doc": i, "text": t} for i, t in enumerate(texts)])
    out = embed_texts(ds, EmbedConfig(batch_size=8), output_column="vec").to_pandas()
    assert list(out.columns) == ["doc", "vec"] and out["doc"].tolist() == list(range(40))
    got = np.stack(out["vec"].to_list())
    want = bare_model.encode(texts, normalize_embeddings=True)
    assert (got * want).sum(axis=1).min() > 0.999

    # embed.max_seq_length truncates: equal to the bare model truncated the same way, and not
    # to the untruncated embeddings of these long documents
    short = embed_texts(ds, EmbedConfig(batch_size=8, max_seq_length=16)).to_pandas()
    got16 = np.stack(short["embedding"].to_list())
    bare_model.max_seq_length, full = 16, bare_model.max_seq_length
    try:
        want16 = bare_model.encode(texts, normalize_embeddings=True)
    finally:
        bare_model.max_seq_length = full
    assert (got16 * want16).sum(axis=1).min() > 0.999
    assert (got16 * want).sum(axis=1).min() < 0.99


def test_unknown_model_fails_on_the_driver_before_any_work(ray_local, tmp_path):
    layout, _, _ = build_run(str(tmp_path / "run"))
    with pytest.raises(InputError, match=r"'no-such-org/no-such-model-xyz'.*local model directory"):
        embed_units(layout, "generic", EmbedConfig(model="no-such-org/no-such-model-xyz"))
    assert stage.manifest(layout.embeddings("generic")) is None
    assert not os.path.exists(layout.embeddings("generic"))
    not_a_model = tmp_path / "empty-dir"
    not_a_model.mkdir()
    with pytest.raises(InputError, match="not a sentence-transformers model directory"):
        embed_units(layout, "generic", EmbedConfig(model=str(not_a_model)))
