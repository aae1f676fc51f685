"""hf://owner/name[:config][/split] corpora (pipeline/hub.py) on local repos laid out as on the
Hugging Face Hub (the Hub is unreachable here): specs parsed, files resolved per config and
split, clear errors; and the paper recipe's first stages (ingest → tokenizer → windows) on such
a repo at a small sample, through Ray Data."""

from __future__ import annotations

import os
import pickle

import pyarrow.fs as pafs
import pytest

from slm.config import load_recipe
from slm.errors import InputError
from slm.pipeline import hub
from slm.pipeline.artifacts import read_rows
from slm.pipeline.config import CorpusConfig
from slm.pipeline.ingest import ingest_source, source_fingerprint
from slm.pipeline.sample_corpus import paragraphs, write_hub_repo, write_parquet
from slm.stage import manifest


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hub"))
    write_hub_repo(root, "allenai/c4", configs=("en", "realnewslike"))      # <config>/<split>/*.parquet
    write_hub_repo(root, "mirror/c4-json", configs=("en",), style="c4")      # <config>/c4-<split>.*.json.gz
    # a repo without configs, the Hub's default layout: data/<split>-*.parquet
    for split, n in (("train", 6), ("test", 3)):
        write_parquet(os.path.join(root, "plain", "corpus", "data", f"{split}-00000-of-00001.parquet"),
                      paragraphs(n, offset=500))
    return root


@pytest.mark.parametrize("spec,expected", [
    ("hf://allenai/c4:en", hub.HubSpec("allenai/c4", "en", "train")),
    ("hf://allenai/c4:en/validation", hub.HubSpec("allenai/c4", "en", "validation")),
    ("hf://plain/corpus", hub.HubSpec("plain/corpus", "", "train")),
    ("hf://plain/corpus/test", hub.HubSpec("plain/corpus", "", "test")),
    ("hf://HuggingFaceFW/fineweb-edu:sample-10BT/train", hub.HubSpec("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")),
])
def test_spec_names_repo_config_and_split(spec, expected):
    got = hub.parse(spec)
    assert (got.repo, got.config, got.split) == (expected.repo, expected.config, expected.split)


@pytest.mark.parametrize("spec,words", [
    ("hf://c4", ["'c4' is not a dataset repo OWNER/NAME", "hf://OWNER/NAME[:CONFIG][/SPLIT]"]),
    ("hf://allenai/c4:", ["empty config"]),
    ("hf://allenai/c4:en/train/extra", ["not a valid hub spec"]),
])
def test_malformed_specs_name_the_spec_and_the_syntax(spec, words):
    with pytest.raises(InputError) as e:
        hub.parse(spec)
    assert spec in str(e.value) and all(w in str(e.value) for w in words)


def _rel(files, root):
    return [os.path.relpath(p, root) for p, _ in files]


def test_config_and_split_pick_their_shards(hub_dir):
    fs, files = hub.resolve(hub.parse("hf://allenai/c4:en"), hub_dir)
    assert isinstance(fs, pafs.LocalFileSystem)
    assert _rel(files, hub_dir) == ["allenai/c4/en/train/0000.parquet", "allenai/c4/en/train/0001.parquet"]
    assert {f for _, f in files} == {"parquet"}
    _, files = hub.resolve(hub.parse("hf://allenai/c4:realnewslike/validation"), hub_dir)
    assert _rel(files, hub_dir) == ["allenai/c4/realnewslike/validation/0000.parquet",
                                    "allenai/c4/realnewslike/validation/0001.parquet"]
    # allenai/c4's own naming: the split is a word of the file name; gzipped JSON lines
    _, files = hub.resolve(hub.parse("hf://mirror/c4-json:en/validation"), hub_dir)
    assert _rel(files, hub_dir) == [f"mirror/c4-json/en/c4-validation.0000{i}-of-00002.json.gz" for i in (0, 1)]
    assert {f for _, f in files} == {"jsonl"}
    # the only config is taken when none is named; a repo without configs reads data/
    _, files = hub.resolve(hub.parse("hf://mirror/c4-json"), hub_dir)
    assert len(files) == 2 and all("c4-train" in p for p, _ in files)
    _, files = hub.resolve(hub.parse("hf://plain/corpus/test"), hub_dir)
    assert _rel(files, hub_dir) == ["plain/corpus/data/test-00000-of-00001.parquet"]


@pytest.mark.parametrize("spec,words", [
    ("hf://allenai/c4", ["has configs en, realnewslike", "hf://allenai/c4:en/train"]),
    ("hf://allenai/c4:fr", ["no config 'fr'", "configs there: en, realnewslike"]),
    ("hf://allenai/c4:en/trian", ["no split 'trian'", "splits there: train, validation",
                                  "hf://allenai/c4:en/train"]),
    ("hf://plain/corpus:en", ["no config 'en'", "it has no configs: use hf://plain/corpus/train"]),
    ("hf://someone/else", ["no repo 'someone/else' under the hub root", "SLM_HUB_ROOT"]),
])
def test_bad_specs_name_the_spec_and_the_fix(hub_dir, spec, words):
    with pytest.raises(InputError) as e:
        hub.resolve(hub.parse(spec), hub_dir)
    msg = str(e.value)
    assert f"corpus '{spec}'" in msg and all(w in msg for w in words), msg


def test_hub_root_from_recipe_then_env(hub_dir, monkeypatch):
    monkeypatch.setenv(hub.HUB_ROOT_ENV, hub_dir)
    assert hub.hub_root("") == hub_dir and hub.hub_root("/elsewhere") == "/elsewhere"
    a = source_fingerprint("hf://allenai/c4:en")  # read from $SLM_HUB_ROOT
    assert a == source_fingerprint("hf://allenai/c4:en", hub_root=hub_dir)
    assert a != source_fingerprint("hf://allenai/c4:realnewslike", hub_root=hub_dir)
    monkeypatch.delenv(hub.HUB_ROOT_ENV)
    assert hub.hub_root("") == ""


def test_fingerprint_changes_with_a_shard(hub_dir, tmp_path):
    root = str(tmp_path)
    write_hub_repo(root, "allenai/c4", configs=("en",))
    before = source_fingerprint("hf://allenai/c4:en", hub_root=root)
    write_parquet(os.path.join(root, "allenai/c4/en/train/0002.parquet"), paragraphs(3))
    assert source_fingerprint("hf://allenai/c4:en", hub_root=root) != before


def test_the_hub_filesystem_travels_to_ray_workers():
    """Without a hub root the Hub is read through huggingface_hub's fsspec filesystem, wrapped
    for pyarrow; Ray Data pickles it into every read task (no network needed to check that)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    fs, path, where = hub.repo_filesystem(hub.parse("hf://allenai/c4:en"), "")
    assert path == "datasets/allenai/c4" and where == "the Hugging Face Hub"
    again = pickle.loads(pickle.dumps(fs))
    assert isinstance(again.handler.fs, huggingface_hub.HfFileSystem)


def test_paper_recipe_first_stages_on_a_local_hub_repo(hub_dir, tmp_path, ray_local):
    """`slm data run --recipe paper --corpus.hub_root DIR --until windows` at a small sample:
    the paper's own corpus spec (hf://allenai/c4:en/train), 32k BPE and 1024-token windows."""
    from slm.pipeline.run import run_pipeline  # imports Ray Data stages

    root = str(tmp_path / "hub")
    write_hub_repo(root, "allenai/c4", configs=("en",), splits={"train": 400, "validation": 20},
                   shards=4)
    recipe = load_recipe("paper", {"run_dir": str(tmp_path / "run"), "cluster.storage": "",
                                   "corpus.hub_root": root, "corpus.max_generic_docs": 300,
                                   "tokenizer.train_docs": 300})
    assert recipe.corpus.generic == "hf://allenai/c4:en/train"
    assert recipe.data.seq_len == 1024 and recipe.tokenizer.vocab_size == 32000
    out = run_pipeline(recipe, until="windows")
    assert [r["stage"] for r in out["stages"]] == ["corpus generic", "tokenizer", "windows generic",
                                                   "units generic"]
    run = out["run_dir"]
    corpus = manifest(os.path.join(run, "data", "corpus", "generic"))
    assert corpus["rows"] == 300 and corpus["source"] == "hf://allenai/c4:en/train"
    texts = set(paragraphs(420)[:400])  # the train split only: no validation document ingested
    docs = read_rows(os.path.join(run, "data", "corpus", "generic"), ["text"]).column("text").to_pylist()
    assert len(docs) == 300 and set(docs) <= texts
    windows = read_rows(os.path.join(run, "data", "windows", "generic"),
                        ["input_ids"]).column("input_ids").to_pylist()
    assert len(windows) > 0 and {len(w) for w in windows} == {1024}
    assert not os.path.exists(os.path.join(run, "data", "embeddings"))  # stopped after windows

    # the same stage on allenai/c4's own file layout: gzipped JSON-lines shards
    uri = str(tmp_path / "json-corpus")
    cfg = CorpusConfig(hub_root=hub_dir)
    ingest_source(uri, "hf://mirror/c4-json:en/validation", cfg, what="generic corpus")
    want = set(paragraphs(48)[40:48])  # write_hub_repo: train 40 then validation 8
    got = read_rows(uri, ["text"]).column("text").to_pylist()
    assert sorted(got) == sorted(want)
