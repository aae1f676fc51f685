"""slm.audit: no node-local path in a run (planted offenders are found, a clean run and the
real tiny run after a sweep, a report and an export have none)."""

from __future__ import annotations

import dataclasses
import fnmatch
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from spec_run import build_tiny_run

from slm.audit import node_local_paths, scan
from slm.stage import copy_dir, listing


def _clean_run(root):
    """A small synthetic run: manifests, a results table, a recipe, a model card, a report."""
    (root / "data/tokenizer").mkdir(parents=True)
    (root / "data/tokenizer/manifest.json").write_text(json.dumps(
        {"stage": "tokenizer", "inputs": {"data/corpus/generic": "ab12"},
         "config": {"vocab_size": 512, "note": "a/b and 1/2 are not paths"}}))
    # token vocabularies hold corpus strings, not paths
    (root / "data/tokenizer/tokenizer.json").write_text(json.dumps({"model": {"merges": ["/usr /bin"]}}))
    (root / "data/corpus/generic").mkdir(parents=True)
    pq.write_table(pa.table({"doc_id": ["a1", "b2"], "text": ["see /usr/share/doc", "x"]}),
                   root / "data/corpus/generic/part-0.parquet")
    (root / "specialize/main").mkdir(parents=True)
    pq.write_table(pa.table({"method": ["slm"], "model_path": ["models/code/slm"],
                             "test_ppl": [3.5], "source": ["s3://bucket/run/x.parquet"]}),
                   root / "specialize/main/results.parquet")
    (root / "specialize/main/results.csv").write_text("method,model_path\nslm,models/code/slm\n")
    (root / "recipe.yaml").write_text(yaml.safe_dump(
        {"name": "t", "run_dir": str(root), "corpus": {"generic": "/data/corpus/generic",
                                                       "domains": {"code": "/data/code"}}}))
    (root / "export/code").mkdir(parents=True)
    (root / "export/code/README.md").write_text(
        "# card\n- train: data/shards/x\n- licence: https://www.gnu.org/licenses/gpl-3.0\n"
        "- C_pretrain / N per domain, 2024/01/02\n")
    (root / "export/code/model.safetensors").write_bytes(b"/tmp/not-read" * 4)
    (root / "report").mkdir()
    (root / "report/index.html").write_text("<html><td>3.5</td><a href='results.csv'>r</a></html>")
    (root / "pretrain/slm").mkdir(parents=True)
    (root / "pretrain/slm/events.out.tfevents.1.host").write_bytes(b"/root/x/y")


def test_clean_run_has_no_node_local_path(tmp_path):
    _clean_run(tmp_path)
    assert node_local_paths(str(tmp_path)) == []


def test_planted_offenders_are_found(tmp_path):
    _clean_run(tmp_path)
    (tmp_path / "data/shards/x").mkdir(parents=True)
    (tmp_path / "data/shards/x/manifest.json").write_text(json.dumps(
        {"stage": "shards", "config": {"out": "/tmp/x"}, "inputs": {}}))
    pq.write_table(pa.table({"method": ["slm", "slm"], "model_path": ["models/a", "/root/run/models/b"],
                             "test_ppl": [1.0, 2.0]}),
                   tmp_path / "specialize/main/results.parquet")
    (tmp_path / "export/code/README.md").write_text("# card\nweights at file:///srv/models/code\n")
    (tmp_path / "report/log.txt").write_text(f"built in {tmp_path}/report\n")
    (tmp_path / "specialize/main/results.csv").write_text("method,model_path\nslm,/home/u/m\n")
    found = scan(str(tmp_path))
    assert {(f.file, f.value) for f in found} == {
        ("data/shards/x/manifest.json", "/tmp/x"),
        ("specialize/main/results.parquet", "/root/run/models/b"),
        ("export/code/README.md", "file:///srv/models/code"),
        ("report/log.txt", f"{tmp_path}/report"),
        ("specialize/main/results.csv", "/home/u/m"),
    }
    keys = {f.file: f.key for f in found}
    assert keys["data/shards/x/manifest.json"] == "config.out"
    assert keys["specialize/main/results.parquet"] == "model_path"
    assert keys["export/code/README.md"] == "line 2"
    # the recipe's run_dir and corpus paths are user inputs (allowed), any other key is not
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {"run_dir": "/x/run", "corpus": {"generic": "/c"}, "cluster": {"storage": "/mnt/ckpt"}}))
    assert ("recipe.yaml", "/mnt/ckpt") in node_local_paths(str(tmp_path))
    assert not any(v in ("/x/run", "/c") for _, v in node_local_paths(str(tmp_path)))


def test_planted_offenders_are_found_on_object_storage(tmp_path, s3_prefix):
    _clean_run(tmp_path)
    (tmp_path / "report/manifest.json").write_text(json.dumps({"sources": ["/tmp/r.parquet"]}))
    copy_dir(str(tmp_path), s3_prefix)
    assert node_local_paths(s3_prefix) == [("report/manifest.json", "/tmp/r.parquet")]


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    """The shared tiny run, after a sweep, a report and an export."""
    from slm.deploy.export import export_model
    from slm.tune.report import write_report
    from slm.tune.sweep import run_sweep

    recipe = build_tiny_run(tmp_path_factory.getbasetemp() / "spec-run")
    r = dataclasses.replace(recipe, sweep=dataclasses.replace(
        recipe.sweep, name="audit", methods=["slm"], budgets=[4], domain_tokens=[1024],
        seeds=[0], domains=["numeric"]))
    run_sweep(r)
    write_report(r)
    export_model(r.run_dir, "numeric", method="slm")
    return r


# Offenders of the real run whose writers are outside deploy/ and tune/report, results (to fix
# there; then drop them here): (file pattern, key, writer module).
KNOWN: tuple[tuple[str, str, str], ...] = ()  # (file pattern, key, writer) of accepted leftovers


def test_real_run_has_no_node_local_path(finished_run):
    run = finished_run.run_dir
    written = {f for f, _ in listing(run)}
    assert {"export/numeric/README.md", "report/index.html", "specialize/audit/results.parquet",
            "recipe.yaml"} <= written
    found = scan(run)
    # what export, report and the results tables write: nothing, not even a known offender
    assert [f for f in found if f.file.startswith(("export/", "report/", "models/"))
            or f.file.endswith(("results.parquet", "results.csv"))] == []
    unknown = [f for f in found if not any(fnmatch.fnmatchcase(f.file, p) and f.key == k
                                           for p, k, _ in KNOWN)]
    assert unknown == [], "\n".join(f"{f.file} [{f.key}]: {f.value}" for f in unknown)

