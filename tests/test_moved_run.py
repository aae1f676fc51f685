"""A finished run directory moved or copied elsewhere, and opened through a relative or an
absolute path, works with `slm export`, `slm specialize` and `slm report`: fingerprints key
inputs by run-relative paths, and what a run writes names run paths relative to the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from spec_run import build_corpus, build_tiny_run
from tiny_run import build_tiny_run as build_deploy_run

from slm.cli import main
from slm.config import load_run_recipe
from slm.deploy.export import export_model
from slm.deploy.serve import exported_domains
from slm.layout import SPLITS, RunLayout, domain_set
from slm.pipeline.kmeans import read_histogram
from slm.pipeline.run import run_pipeline
from slm.stage import manifest

SLM = [sys.executable, "-m", "slm.cli"]  # the installed `slm` console script runs this main


def _files_text(root: Path, suffixes: tuple[str, ...]) -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="ignore")
                     for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)


def test_moved_deploy_run_exports_through_relative_and_absolute_paths(tmp_path, monkeypatch):
    built = tmp_path / "built"
    build_deploy_run(str(built))
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    os.rename(built, moved)  # nothing is left where the run was built
    monkeypatch.chdir(moved.parent)

    assert main(["export", "--run", "moved", "--domain", "code"]) == 0  # relative
    out = export_model(str(moved), "legal")  # absolute
    assert out == str(moved / "export" / "legal")
    assert manifest("moved/export/code")["config"]["source"] == "models/code/slm"
    assert manifest(out)["config"]["source"] == "models/legal/slm"
    assert sorted(exported_domains("moved")) == ["code", "legal"]
    text = _files_text(moved / "export", (".md", ".json"))
    assert str(built) not in text and str(moved) not in text  # no machine path in any output
    assert not built.exists()


@pytest.fixture(scope="module")
def moved_spec_run(ray_local, tmp_path_factory):
    """A copy of the shared specialization run (pipeline + every family pretrained), while the
    original is out of the way (restored afterwards: other test files share it)."""
    base = tmp_path_factory.getbasetemp() / "spec-run"
    original = Path(build_tiny_run(base).run_dir)
    moved = tmp_path_factory.mktemp("elsewhere") / "moved"
    shutil.copytree(original, moved, symlinks=True)
    away = original.with_name(original.name + ".away")
    os.rename(original, away)
    try:
        yield original, moved, build_corpus(base / "corpus")
    finally:
        shutil.rmtree(original, ignore_errors=True)  # anything a command wrongly wrote there
        os.rename(away, original)


def _data_started(layout: RunLayout) -> dict[str, float]:
    """When each data artifact of the run was built (its manifest's start time)."""
    out = {}
    for d, _, names in os.walk(layout.data):
        if "manifest.json" in names:
            out[os.path.relpath(d, layout.root)] = manifest(d)["started"]
    return out


def test_moved_run_specializes_reports_and_exports(moved_spec_run, monkeypatch):
    original, moved, corpus = moved_spec_run
    layout = RunLayout(str(moved))
    recipe = load_run_recipe(str(moved))
    before = _data_started(layout)
    assert "data/tokenizer" in before and any(k.startswith("data/shards/") for k in before)
    hists = {k: {s: read_histogram(layout, k, s) for s in manifest(layout.histograms(k))["sets"]}
             for k in recipe.kmeans.ks()}

    # the data stages of the moved run are all done with equal fingerprints: nothing to rebuild
    monkeypatch.chdir(moved.parent)
    stages = run_pipeline(load_run_recipe("moved"))["stages"]
    assert [s["status"] for s in stages] == ["skipped"] * len(stages)

    # slm specialize through a relative path: the run's data stages are reused, not refused
    assert main(["specialize", "--run", "moved", "--domain", corpus["later"], "--name", "later",
                 "--method", "slm"]) == 0
    after = _data_started(layout)
    # only the histograms are republished: with the new domain's added, the others carried over
    rebuilt = {k for k in before if after[k] != before[k]}
    assert rebuilt <= {layout.relative(layout.histograms(k)) for k in hists}
    for k, sets in hists.items():
        assert {s: read_histogram(layout, k, s) for s in sets} == sets
        assert domain_set("later", "train") in manifest(layout.histograms(k))["sets"]
    for split in SPLITS:
        assert manifest(layout.shards(domain_set("later", split))) is not None
    assert manifest(layout.model("later", "slm")) is not None

    # slm report through an absolute path (the CLI in its own process)
    out = subprocess.run([*SLM, "report", "--run", str(moved)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (moved / "report" / "index.html").is_file()

    # slm export through a relative path (the method named: other tests of the session may have
    # specialized more methods to 'later' in the shared run, and export picks the best one)
    assert main(["export", "--run", "moved", "--domain", "later", "--method", "slm"]) == 0
    card = (moved / "export" / "later" / "README.md").read_text(encoding="utf-8")
    assert "method `slm`" in card

    # what the commands wrote names no machine path, and nothing went to the old location
    written = _files_text(moved / "report", (".html", ".csv")) + card + json.dumps(
        manifest(str(moved / "export" / "later")))
    assert str(moved) not in written and str(original) not in written
    assert not original.exists()
