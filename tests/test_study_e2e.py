"""`slm run` end to end on the tiny run: data → pretraining of every family → sweep → report.
(The data and pretraining stages are shared with the other specialization tests and skip when
done; the sweep and the report are this test's own.)"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from spec_run import build_tiny_run


@pytest.fixture(scope="module")
def recipe(ray_local, tmp_path_factory):
    return build_tiny_run(tmp_path_factory.getbasetemp() / "spec-run")


def test_run_study_end_to_end(recipe, capsys):
    import pyarrow.parquet as pq

    from slm.layout import RunLayout
    from slm.tune.study import run_study

    r = dataclasses.replace(recipe, sweep=dataclasses.replace(
        recipe.sweep, name="study", methods=["slm", "pn"], budgets=[4],
        domain_tokens=[1024], domains=["numeric"]))
    report = run_study(r)
    layout = RunLayout(r.run_dir)
    # it ends with a one-screen summary: every stage once, with what it left (run-relative)
    out = capsys.readouterr().out
    lines = out[out.index("== study 'tiny' done in "):].splitlines()
    # (Ray may interleave a late worker log line; the summary's own lines are indented)
    tail = lines[:1] + [line for line in lines[1:] if line.startswith("  ")]
    assert len(tail) == 2 + 1 + len(r.pretrain.families) + 2, tail
    assert tail[1].split()[0] == "data" and "stages:" in tail[1]
    for line, family in zip(tail[2:], r.pretrain.families):
        assert line.split()[:2] == ["pretrain", family] and f"pretrain/{family}" in line and "FLOPs" in line
    # 2 methods x 2 pretraining levels (0.5, 1)
    assert "4 result rows; grid of 4 trials, 0 stopped early by ASHA -> specialize/study/results.parquet" in tail[-3]
    assert tail[-2].split()[0] == "report" and tail[-1].startswith("  next: slm report --run ")
    assert os.path.exists(report)
    rows = pq.read_table(layout.results("study")).to_pylist()
    assert sorted((row["method"], row["pretrain_level"]) for row in rows) == [
        ("pn", 0.5), ("pn", 1.0), ("slm", 0.5), ("slm", 1.0)]
    assert all(row["recipe"] == "tiny" and row["test_ppl"] > 1 for row in rows)
    # the pretraining-budget axis: each level charged its own pretraining
    by = {(row["method"], row["pretrain_level"]): row for row in rows}
    for m in ("slm", "pn"):
        assert 0 < by[(m, 0.5)]["pretrain_flops"] < by[(m, 1.0)]["pretrain_flops"]
    assert os.path.isfile(os.path.join(os.path.dirname(report), "ppl_vs_pretrain_levels.png"))
    # what the clustering saw: the generic set and the domain's train set, measured
    with open(os.path.join(os.path.dirname(report), "clustering_coverage.json"), encoding="utf-8") as f:
        coverage = {c["set"]: c for c in json.load(f)}
    # (every domain of the run is measured: the shared run may also hold test_add_domain's)
    assert {"generic", "domain-numeric-train"} <= set(coverage), sorted(coverage)
    assert all(s == "generic" or (s.startswith("domain-") and s.endswith("-train")) for s in coverage)
    for c in coverage.values():  # units: pieces of one document each
        assert 0 < c["embedded_token_fraction"] <= 1 and c["multi_document_fraction"] == 0
        assert c["sampled_units"] == min(c["units"], 2000)
    assert "What the clustering saw" in open(report, encoding="utf-8").read()
    for m in ("slm", "pn"):
        assert os.path.isfile(os.path.join(layout.model("numeric", m), "model.safetensors"))

    # The planner, given this real sweep's results and budgets every method fits, recommends
    # the method with the lowest measured valid loss (it selects on valid), predicts its test
    # perplexity, and says it measured it.
    from slm.tune.planner import plan

    best = min(rows, key=lambda row: row["valid_loss"])  # one domain, one seed
    result = plan(pretrain_budget=1e30, specialize_budget=1e30, inference_budget=1e12,
                  domains=1, domain_tokens=1024,
                  results=layout.results("study"))
    assert result.source == "measured"
    assert result.method == best["method"]
    assert abs(result.predicted_ppl - best["test_ppl"]) < 1e-6 * result.predicted_ppl
