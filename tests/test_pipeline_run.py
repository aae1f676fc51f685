"""The whole data pipeline on a small real corpus: every stage runs, publishes, and is skipped on
re-run (real Ray Data, the real embedding model, real k-means)."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow.parquet as pq
import yaml

from slm.cli import main
from slm.config import Recipe, load_recipe
from slm.layout import RunLayout, domain_set, is_set, packed_set, train_subset
from slm.pipeline.artifacts import read_rows
from slm.pipeline.importance import read_subset_histogram
from slm.pipeline.run import run_pipeline
from slm.pipeline.sample_corpus import paragraphs, write_domain, write_jsonl, write_parquet
from slm.stage import manifest

SEQ = 32


def _recipe(tmp_path) -> Recipe:
    texts = paragraphs(120)
    write_parquet(str(tmp_path / "generic" / "part-0.parquet"), texts[:70])
    write_jsonl(str(tmp_path / "generic" / "part-1.jsonl"), texts[70:])
    domains = tmp_path / "domains"
    write_domain(str(domains), "alpha", n_train=14, n_valid=4, n_test=4, offset=3)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "run_dir": str(tmp_path / "run"), "seed": 1,
        "corpus": {"generic": str(tmp_path / "generic"),
                   "domains": {"alpha": str(domains / "alpha")}},
        "tokenizer": {"vocab_size": 300},
        "data": {"seq_len": SEQ, "domain_train_tokens": [64, 160], "is_tokens": 640,
                 "rows_per_file": 64},
        "embed": {"batch_size": 32, "pool_size": 1},
        "kmeans": {"k_is": 4, "k_mix": 2, "k_pn": 3, "fit_sample": 2000, "max_iter": 20},
    }))
    return load_recipe(str(path))


def test_run_pipeline_end_to_end_then_resume(tmp_path, ray_local, capsys):
    recipe = _recipe(tmp_path)
    layout = RunLayout(recipe.run_dir)

    result = run_pipeline(recipe)

    stages = result["stages"]
    assert all(s["status"] == "done" for s in stages), [s for s in stages if s["status"] != "done"]
    assert yaml.safe_load(open(layout.recipe))["name"] == "tiny"
    ks = [2, 3, 4]
    sets = ["generic"] + [domain_set(d, s) for d in ("alpha",) for s in ("train", "valid", "test")]
    for name in sets:
        shard = read_rows(layout.shards(name))
        assert shard.column_names == ["window_id", "input_ids", "unit_tokens"] + [
            f"unit_clusters_k{k}" for k in ks]
        assert shard.num_rows == manifest(layout.windows(name))["rows"] > 0
        ids = np.array(shard.column("input_ids").to_pylist())
        assert ids.shape[1] == SEQ
        assert all(sum(t) == SEQ for t in shard.column("unit_tokens").to_pylist())
        for k in ks:
            c = np.concatenate([np.asarray(x, dtype=np.int64) for x in shard.column(f"unit_clusters_k{k}").to_pylist()])
            assert c.min() >= 0 and c.max() < k
        # every unit of the set was embedded and assigned (units, not windows, are clustered)
        assert manifest(layout.embeddings(name))["rows"] == manifest(layout.units(name))["rows"]
    for k in ks:  # the generic text packed per cluster: each window one cluster's text
        packed = read_rows(layout.shards(packed_set("generic", k)))
        assert packed.column_names == ["window_id", "input_ids", f"cluster_k{k}"]
        c = packed.column(f"cluster_k{k}").to_numpy()
        assert packed.num_rows > 0 and c.min() >= 0 and c.max() < k
    for d in ("alpha",):
        small = read_rows(layout.shards(train_subset(d, 64))).column("window_id").to_pylist()
        large = read_rows(layout.shards(train_subset(d, 160))).column("window_id").to_pylist()
        assert len(small) == 2 and len(large) == 5 and large[:2] == small
        for tokens, subset in ((64, small), (160, large)):  # SLM-is: per (domain, size)
            hist = read_subset_histogram(layout, 4, d, tokens)
            assert hist["n"] == sum(hist["counts"]) == len(subset) * SEQ == tokens
            uri = layout.shards(is_set(d, 4, tokens))
            is_rows = sum(pq.ParquetFile(os.path.join(uri, f)).metadata.num_rows
                          for f in os.listdir(uri) if f.endswith(".parquet"))
            assert is_rows == 640 // SEQ
            assert manifest(uri)["histogram"] == f"data/subset-histograms-k4/{train_subset(d, tokens)}"
    for k in ks:
        assert os.path.exists(os.path.join(layout.histograms(k), "domain-alpha-train.json"))
    names = [s["stage"] for s in stages]
    assert names.index("tokenizer") < names.index("windows generic") < names.index("units generic") < names.index(
        "embeddings generic") < names.index("kmeans k=2") < names.index("shards generic") < names.index(
        "shards generic-k2") < names.index(f"shards {is_set('alpha', 4, 64)}")

    started = manifest(layout.shards("generic"))["started"]
    again = run_pipeline(recipe)
    assert [s["status"] for s in again["stages"]] == ["skipped"] * len(stages)
    assert manifest(layout.shards("generic"))["started"] == started

    # a domain size larger than the domain: `slm data run` exits non-zero naming the domain,
    # its size and the fix (every stage before the subsets is skipped: this takes seconds)
    too_big = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    too_big["data"]["domain_train_tokens"] = [64, 160, 100_000]
    (tmp_path / "too-big.yaml").write_text(yaml.safe_dump(too_big))
    assert main(["data", "run", "--recipe", str(tmp_path / "too-big.yaml")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"domain 'alpha' has \d+ train tokens \(\d+ windows of 32\) but "
                     r"data.domain_train_tokens asks for 100000; add domain data or lower "
                     r"data.domain_train_tokens", err), err
    assert manifest(layout.shards(train_subset("alpha", 100_000))) is None
