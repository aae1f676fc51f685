"""Bad input gets a clear error naming the file/field and the fix, and nothing is published.

Real files, real Ray Data, real filesystems (the full disk and the read-only directory are real
tmpfs mounts: the tests run as root, as CI does)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from slm.config import load_recipe
from slm.configkit import ConfigError
from slm.errors import InputError, StageError
from slm.layout import RunLayout
from slm.pipeline.config import CorpusConfig, TokenizerConfig
from slm.pipeline.ingest import ingest_domain, ingest_generic
from slm.pipeline.sample_corpus import paragraphs, write_domain, write_jsonl, write_parquet, write_text
from slm.pipeline.tokenizer import build_tokenizer
from slm.pipeline.windows import build_windows
from slm.stage import manifest


def _nothing_published(uri: str) -> None:
    assert manifest(uri) is None
    parent = os.path.dirname(uri.rstrip("/"))
    if os.path.isdir(parent):
        assert not [f for f in os.listdir(parent) if ".tmp-" in f], "staging leftovers"


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tiny tmpfs (size, options) under tmp_path; unmounted afterwards."""
    mounted = []

    def mount(name: str, options: str) -> str:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        mounted.append(path)
        return str(path)

    yield mount
    for p in mounted:
        subprocess.run(["umount", str(p)], check=False)


def test_empty_corpus(tmp_path, ray_local):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "empty.txt").write_text("")
    write_jsonl(str(src / "blank.jsonl"), ["   ", "\n"])
    layout = RunLayout(str(tmp_path / "run"))
    with pytest.raises(InputError, match=r"generic corpus '.*corpus' has no documents"):
        ingest_generic(layout, CorpusConfig(), str(src))
    _nothing_published(layout.corpus_generic())

    (tmp_path / "nofiles").mkdir()
    with pytest.raises(InputError, match=r"'.*nofiles' holds no \.parquet"):
        ingest_generic(layout, CorpusConfig(), str(tmp_path / "nofiles"))
    _nothing_published(layout.corpus_generic())


def test_non_utf8_text_file_fail_and_skip(tmp_path, ray_local):
    src = tmp_path / "corpus"
    texts = paragraphs(3)
    for i, t in enumerate(texts):
        write_text(str(src / f"ok{i}.txt"), [t])
    (src / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve".encode("latin-1"))
    layout = RunLayout(str(tmp_path / "run"))
    with pytest.raises(InputError, match=r"latin1\.txt' is not UTF-8 .*on_bad_utf8: skip"):
        ingest_generic(layout, CorpusConfig(on_bad_utf8="fail"), str(src))
    _nothing_published(layout.corpus_generic())

    ingest_generic(layout, CorpusConfig(on_bad_utf8="skip"), str(src))
    m = manifest(layout.corpus_generic())
    assert m["rows"] == 3 and m["skipped_documents"] == 1
    assert m["skipped_files"][0].endswith("latin1.txt")


def test_missing_text_column(tmp_path, ray_local):
    path = write_parquet(str(tmp_path / "docs.parquet"), paragraphs(4), column="content")
    layout = RunLayout(str(tmp_path / "run"))
    with pytest.raises(InputError, match=r"docs\.parquet' has no text column 'text' \(columns: "
                                         r"content, source\); set corpus\.text_column"):
        ingest_generic(layout, CorpusConfig(), path)
    _nothing_published(layout.corpus_generic())

    jl = write_jsonl(str(tmp_path / "docs.jsonl"), paragraphs(4), column="body")
    with pytest.raises(InputError, match=r"docs\.jsonl' has no text field 'text'.*corpus\.text_column"):
        ingest_generic(layout, CorpusConfig(), jl)
    _nothing_published(layout.corpus_generic())


def test_corrupt_parquet(tmp_path, ray_local):
    good = write_parquet(str(tmp_path / "src" / "good.parquet"), paragraphs(4))
    data = open(good, "rb").read()
    (tmp_path / "src" / "broken.parquet").write_bytes(data[: len(data) // 2])  # truncated copy
    layout = RunLayout(str(tmp_path / "run"))
    with pytest.raises(InputError, match=r"broken\.parquet' is not a readable parquet file"):
        ingest_generic(layout, CorpusConfig(), str(tmp_path / "src"))
    _nothing_published(layout.corpus_generic())


def test_empty_domain_and_domain_too_small_for_a_window(tmp_path, ray_local):
    layout = RunLayout(str(tmp_path / "run"))
    empty = tmp_path / "domains" / "empty"
    write_parquet(str(empty / "train.parquet"), [])
    write_parquet(str(empty / "valid.parquet"), paragraphs(2))
    write_parquet(str(empty / "test.parquet"), paragraphs(2))
    with pytest.raises(InputError, match=r"domain 'empty' train split '.*train\.parquet' has no documents"):
        ingest_domain(layout, CorpusConfig(), "empty", str(empty))
    _nothing_published(layout.corpus_domain("empty", "train"))

    nosplit = tmp_path / "domains" / "nosplit"
    write_parquet(str(nosplit / "train.parquet"), paragraphs(2))
    with pytest.raises(InputError, match=r"domain 'nosplit': no 'valid' split in .*valid\.parquet"):
        ingest_domain(layout, CorpusConfig(), "nosplit", str(nosplit))

    # a domain whose valid split is one short document: fewer tokens than one window
    tiny = write_domain(str(tmp_path / "domains"), "tiny", n_train=5, n_valid=1, n_test=1)
    write_jsonl(os.path.join(tiny, "valid.jsonl"), ["A short note."])
    write_parquet(str(tmp_path / "generic.parquet"), paragraphs(20))
    ingest_generic(layout, CorpusConfig(), str(tmp_path / "generic.parquet"))
    build_tokenizer(layout, TokenizerConfig(vocab_size=300))
    ingest_domain(layout, CorpusConfig(), "tiny", tiny)
    with pytest.raises(InputError, match=r"domain 'tiny' valid split .* has \d+ tokens, fewer than "
                                         r"one window of data\.seq_len=64"):
        build_windows(layout, "domain-tiny-valid", layout.corpus_domain("tiny", "valid"), 64,
                      what="domain 'tiny' valid split")
    _nothing_published(layout.windows("domain-tiny-valid"))


def test_unknown_tokenizer(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    with pytest.raises(InputError, match=r"tokenizer\.name '\./no/such/tokenizer' is not a local "
                                         r"tokenizer directory"):
        build_tokenizer(layout, TokenizerConfig(name="./no/such/tokenizer"))
    _nothing_published(layout.tokenizer)


def test_unknown_recipe_field_and_bad_sizes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus:\n  txt_column: body\n")
    with pytest.raises(ConfigError, match=r"unknown recipe field 'corpus\.txt_column'.*'text_column'"):
        load_recipe(str(bad))
    for yaml_text, field in [("data:\n  seq_len: 0\n", "seq_len"),
                             ("tokenizer:\n  vocab_size: -5\n", "vocab_size"),
                             ("data:\n  domain_train_tokens: [1024, -1]\n", "domain_train_tokens")]:
        bad.write_text(yaml_text)
        with pytest.raises(ConfigError, match=rf"field '{field}' must be > 0"):
            load_recipe(str(bad))


def test_cli_bad_recipe_exits_nonzero_with_the_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  seq_len: -3\n")
    proc = subprocess.run([sys.executable, "-m", "slm.cli", "data", "run", "--recipe", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "seq_len" in proc.stderr and "bad.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory(tmp_path, tmpfs, ray_local):
    readonly = tmpfs("readonly", "ro,size=64k")
    src = write_parquet(str(tmp_path / "docs.parquet"), paragraphs(4))
    layout = RunLayout(os.path.join(readonly, "run"))
    with pytest.raises(StageError, match=r"cannot create output directory '.*readonly/run/data/corpus'"
                                         r".*writable run_dir"):
        ingest_generic(layout, CorpusConfig(), src)
    assert os.listdir(readonly) == []


def test_disk_full_mid_stage_publishes_nothing(tmp_path, tmpfs, ray_local):
    small = tmpfs("small", "size=64k")
    src = tmp_path / "corpus"
    texts = paragraphs(400)  # ~300 KB of text: more than the 64 KiB disk
    write_parquet(str(src / "a.parquet"), texts[:200])
    write_jsonl(str(src / "b.jsonl"), texts[200:])
    layout = RunLayout(os.path.join(small, "run"))
    with pytest.raises(StageError, match=r"writing '.*run/data/corpus/generic' failed: .*"
                                         r"(No space left|space).*Nothing was published"):
        ingest_generic(layout, CorpusConfig(), str(src))
    _nothing_published(layout.corpus_generic())


def _ingest_error(tmp_path, name: str, src, cfg: CorpusConfig | None = None) -> str:
    """The InputError message of ingesting ``src`` (nothing may be published)."""
    layout = RunLayout(str(tmp_path / f"run-{name}"))
    with pytest.raises(InputError) as err:
        ingest_generic(layout, cfg or CorpusConfig(), str(src))
    _nothing_published(layout.corpus_generic())
    return str(err.value)


def test_malformed_json_lines_name_the_file_and_the_line(tmp_path, ray_local):
    good = [json.dumps({"text": t}) for t in paragraphs(4)]
    bad = tmp_path / "malformed"
    bad.mkdir()
    (bad / "a.jsonl").write_text("\n".join(good[:2] + ['{"text": "cut off'] + good[2:]) + "\n")
    msg = _ingest_error(tmp_path, "malformed", bad)
    assert re.search(r"malformed/a\.jsonl' line 3 is not valid JSON \(Unterminated string", msg), msg
    assert "fix or remove that line" in msg

    scalar = tmp_path / "scalar"
    scalar.mkdir()
    (scalar / "a.jsonl").write_text(good[0] + '\n"just a string"\n')
    msg = _ingest_error(tmp_path, "scalar", scalar)
    assert re.search(r"scalar/a\.jsonl' line 2 is a JSON str, not an object", msg), msg


def test_json_array_file_of_objects_reads_and_of_strings_is_refused(tmp_path, ray_local):
    docs = paragraphs(3)
    objects = tmp_path / "objects"
    objects.mkdir()
    (objects / "docs.json").write_text(json.dumps([{"text": t} for t in docs], indent=2))
    layout = RunLayout(str(tmp_path / "run-objects"))
    ingest_generic(layout, CorpusConfig(), str(objects))
    assert manifest(layout.corpus_generic())["rows"] == 3  # an array export is three documents

    strings = tmp_path / "strings"
    strings.mkdir()
    (strings / "docs.json").write_text(json.dumps(docs))
    msg = _ingest_error(tmp_path, "strings", strings)
    assert re.search(r"docs\.json' is a JSON array whose element 0 is a str, not an object", msg), msg


def test_utf16_without_bom_is_refused_or_skipped_not_read_as_nul_text(tmp_path, ray_local):
    src = tmp_path / "utf16"
    src.mkdir()
    write_text(str(src / "ok.txt"), paragraphs(1))
    text = "A specialised document written by a Windows tool."
    (src / "wide.txt").write_bytes(text.encode("utf-16-le"))  # no byte-order mark
    (src / "wide.jsonl").write_bytes((json.dumps({"text": text}) + "\n").encode("utf-16-be"))
    msg = _ingest_error(tmp_path, "utf16", src)
    assert re.search(r"wide\.(txt|jsonl)' is UTF-16 \(or binary\), not UTF-8.*iconv", msg), msg

    (src / "wide.jsonl").unlink()
    layout = RunLayout(str(tmp_path / "run-skip"))
    ingest_generic(layout, CorpusConfig(on_bad_utf8="skip"), str(src))
    m = manifest(layout.corpus_generic())
    assert m["rows"] == 1 and m["skipped_files"][0].endswith("wide.txt")


def test_symlink_loop_in_a_corpus_directory_is_refused_before_reading(tmp_path, ray_local):
    src = tmp_path / "looped"
    (src / "sub").mkdir(parents=True)
    write_text(str(src / "a.txt"), paragraphs(1))
    os.symlink("..", src / "sub" / "back")  # sub/back -> looped: a cycle
    msg = _ingest_error(tmp_path, "loop", src)
    assert re.search(r"has a symlink loop: '.*sub/back' leads back to '.*looped'", msg), msg

    # a link to a sub-corpus is followed, and a file reached twice is read once
    (src / "sub" / "back").unlink()
    other = tmp_path / "other"
    write_text(str(other / "b.txt"), paragraphs(2)[1:])
    os.symlink(other, src / "linked")
    os.symlink(other, src / "sub" / "again")
    layout = RunLayout(str(tmp_path / "run-linked"))
    ingest_generic(layout, CorpusConfig(), str(src))
    assert manifest(layout.corpus_generic())["rows"] == 2


def test_a_single_200_mb_line_is_refused_naming_the_file_and_the_limit(tmp_path, ray_local):
    src = tmp_path / "huge"
    src.mkdir()
    with open(src / "dump.jsonl", "w") as f:
        f.write(json.dumps({"text": "paragraph " * 20_000_000}) + "\n")  # one 200 MB line
    assert (src / "dump.jsonl").stat().st_size > 200_000_000
    msg = _ingest_error(tmp_path, "huge", src)
    assert re.search(r"dump\.jsonl' holds a document of 199,999,999 characters, more than "
                     r"corpus\.max_document_chars \(32,000,000\); split it", msg), msg
    (src / "dump.jsonl").unlink()  # 200 MB of tmp space back at once
