"""The data-pipeline benches that run in seconds, at a tiny size, so they cannot rot: each must
finish and write its figures into the results file (the others start Ray and a model: minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kmeans_fit_bench_compares_faiss_and_sklearn(tmp_path):
    pytest.importorskip("faiss")  # the optional extra slm[faiss] (in slm[all])
    out = tmp_path / "data_pipeline.json"
    out.write_text(json.dumps({"embed_ratio": 0.5}))  # another bench's figure is kept
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_kmeans_assign.py"),
                           "--fit", "--rows", "3000", "--dim", "16", "--k", "32", "--max-iter", "10",
                           "--results", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["embed_ratio"] == 0.5
    fit = doc["kmeans_fit"]
    assert fit["complete"] and fit["sizes"]["k"] == 32 and "bench_kmeans_assign.py" in fit["command"]
    assert fit["faiss"]["iterations"] == 10 and 1 <= fit["sklearn"]["iterations"] <= 10
    assert fit["faiss"]["seconds"] > 0 and fit["sklearn"]["seconds"] > 0
    assert abs(fit["faiss_inertia_vs_sklearn"]) < 0.05
