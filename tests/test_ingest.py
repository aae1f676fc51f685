"""Ingest: parquet / JSON lines / text files, globs, domain directories, resume (real Ray Data)."""

from __future__ import annotations

import hashlib
import os

import pytest

from slm.errors import StageError
from slm.layout import RunLayout
from slm.pipeline.artifacts import read_rows
from slm.pipeline.config import CorpusConfig
from slm.pipeline.ingest import ingest_domain, ingest_generic, ingest_source
from slm.pipeline.sample_corpus import paragraphs, write_domain, write_jsonl, write_parquet, write_text
from slm.stage import manifest


def test_mixed_formats_custom_column_and_form_feed(tmp_path, ray_local):
    texts = paragraphs(40)
    src = tmp_path / "corpus"
    write_parquet(str(src / "a.parquet"), texts[:20], column="body")
    write_jsonl(str(src / "b.jsonl"), texts[20:30], column="body")
    write_text(str(src / "nested" / "c.txt"), texts[30:33])      # 3 documents (form feeds)
    (src / "nested" / "d.txt").write_text("\n\n".join(texts[33:35]))  # blank lines: 1 document
    (src / "ignored.csv").write_text("not,a,corpus\n")
    layout = RunLayout(str(tmp_path / "run"))

    uri = ingest_generic(layout, CorpusConfig(text_column="body"), str(src))

    rows = read_rows(uri)
    got = sorted(rows.column("text").to_pylist())
    want = sorted(texts[:33] + ["\n\n".join(texts[33:35])])
    assert got == want
    assert rows.column_names == ["doc_id", "text"]
    for did, t in zip(rows.column("doc_id").to_pylist(), rows.column("text").to_pylist()):
        assert did == hashlib.sha256(t.encode()).hexdigest()[:16]
    m = manifest(uri)
    assert m["rows"] == 34 and m["skipped_documents"] == 0


def test_glob_limit_and_resume(tmp_path, ray_local):
    texts = paragraphs(30)
    write_jsonl(str(tmp_path / "src" / "x1.jsonl"), texts[:10])
    write_jsonl(str(tmp_path / "src" / "x2.jsonl"), texts[10:20])
    write_parquet(str(tmp_path / "src" / "y.parquet"), texts[20:])
    cfg = CorpusConfig()
    out = str(tmp_path / "out")
    ingest_source(out, str(tmp_path / "src" / "x*.jsonl"), cfg, what="generic corpus")
    assert sorted(read_rows(out).column("text").to_pylist()) == sorted(texts[:20])

    first = manifest(out)["started"]
    ingest_source(out, str(tmp_path / "src" / "x*.jsonl"), cfg, what="generic corpus")
    assert manifest(out)["started"] == first  # done: skipped
    ingest_source(out, str(tmp_path / "src" / "x*.jsonl"), cfg, what="generic corpus", force=True)
    assert manifest(out)["started"] != first  # force: rebuilt

    limited = str(tmp_path / "limited")
    ingest_source(limited, str(tmp_path / "src"), cfg, what="generic corpus", limit=7)
    assert manifest(limited)["rows"] == 7 == read_rows(limited).num_rows
    # the sample is the 7 smallest content hashes of the whole source, not a prefix of a file
    want = sorted(hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts)[:7]
    assert sorted(read_rows(limited).column("doc_id").to_pylist()) == want


def test_half_written_artifact_is_not_done(tmp_path, ray_local):
    """A crashed attempt's staging directory (ours: ``<out>.tmp-<id>``) is cleared and the
    stage redone; files at the output itself with no manifest are not slm's (a local stage
    writes only into its staging directory) and are refused, never deleted."""
    texts = paragraphs(5)
    write_parquet(str(tmp_path / "src.parquet"), texts)
    out = tmp_path / "out"
    (tmp_path / "out.tmp-deadbeef").mkdir()                                    # crashed staging
    ingest_source(str(out), str(tmp_path / "src.parquet"), CorpusConfig(), what="generic corpus")
    assert sorted(read_rows(str(out)).column("text").to_pylist()) == sorted(texts)
    assert not (tmp_path / "out.tmp-deadbeef").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-0.parquet").write_bytes(b"someone else's file")  # no manifest
    with pytest.raises(StageError, match="does not delete what it did not create"):
        ingest_source(str(foreign), str(tmp_path / "src.parquet"), CorpusConfig(), what="generic corpus")
    assert (foreign / "part-0.parquet").read_bytes() == b"someone else's file"


def test_domain_directory_files_and_subdirectories(tmp_path, ray_local):
    d = write_domain(str(tmp_path / "domains"), "law", n_train=12, n_valid=5, n_test=4)
    layout = RunLayout(str(tmp_path / "run"))
    uris = ingest_domain(layout, CorpusConfig(), "law", d)
    assert set(uris) == {"train", "valid", "test"}
    assert [manifest(uris[s])["rows"] for s in ("train", "valid", "test")] == [12, 5, 4]
    assert uris["valid"] == layout.corpus_domain("law", "valid")
    assert os.path.isdir(layout.corpus_domain("law", "test"))
