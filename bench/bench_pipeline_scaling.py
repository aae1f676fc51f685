"""Benchmark: the whole data pipeline at 1x and 10x generic-corpus size.

Targets (issue 3): cost per document flat within ±10 % from 1x to 10x, and peak driver memory
that does not grow with corpus size. Each size runs in a fresh subprocess (its own embedded Ray,
its own peak RSS), in the order 1x, 10x, 1x so that load drift on a shared machine hits both
sizes alike. Cost = the sum of the stages' seconds (Ray start-up excluded) per generic
document; the same run also reports the marginal cost (10x - 1x) per added document and the
fixed cost (a run at zero documents, by the same line). Writes ``pipeline_cost_per_doc_ratio``
and ``pipeline_scaling`` to bench/results/data_pipeline.json.

    python bench/bench_pipeline_scaling.py [--docs 6000] [--factor 10]
    python bench/bench_pipeline_scaling.py --compare-formats   # parquet vs JSON lines reads
    python bench/bench_pipeline_scaling.py --compare-compute   # tokenize: task vs actor pool

Text: paragraphs of the licences in /usr/share/common-licenses (real English), cycled with a
numbered suffix when more documents are needed. Not a test: takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from record import RESULTS, load_average, record  # bench/record.py (the script's folder is on sys.path)
from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session
from slm.config import Recipe, from_dict, validate
from slm.layout import RunLayout
from slm.pipeline.config import CorpusConfig, TokenizerConfig
from slm.pipeline.ingest import ingest_generic
from slm.pipeline.run import run_pipeline
from slm.pipeline.sample_corpus import paragraphs, write_domain, write_parquet
from slm.pipeline.tokenizer import build_tokenizer
from slm.pipeline.windows import build_windows


def _write_inputs(root: str, docs: int) -> dict:
    texts = paragraphs(docs)
    per_file = 2000
    for i in range(0, docs, per_file):
        write_parquet(os.path.join(root, "generic", f"part-{i // per_file:05d}.parquet"),
                      texts[i:i + per_file])
    write_domain(os.path.join(root, "domains"), "alpha", n_train=40, n_valid=8, n_test=8, offset=5)
    write_domain(os.path.join(root, "domains"), "beta", n_train=40, n_valid=8, n_test=8, offset=77)
    return {"generic": os.path.join(root, "generic"),
            "domains": {d: os.path.join(root, "domains", d) for d in ("alpha", "beta")}}


class _PeakByStage(logging.Handler):
    """The driver's peak RSS (VmHWM, MB) when each stage's log line is written: which stage
    raises the driver's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.peaks: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"stage (.+?)\s+(done|skipped)\s+rows=", record.getMessage())
        if m:
            with open("/proc/self/status") as f:
                hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
            self.peaks[m.group(1)] = hwm // 1024


def _rises(peaks: dict[str, int], at_least: int = 3) -> dict[str, int]:
    """The stages after which the driver's peak RSS had risen by ``at_least`` MB or more."""
    out, last = {}, 0
    for stage, mb in peaks.items():
        if mb - last >= at_least:
            out[stage] = mb
        last = max(last, mb)
    return out


def run_one(docs: int) -> dict:
    """One pipeline run (in this process) on ``docs`` generic documents."""
    root = tempfile.mkdtemp(prefix=f"slm-bench-{docs}-")
    corpus = _write_inputs(root, docs)
    recipe = from_dict(Recipe, {
        "name": "bench", "run_dir": os.path.join(root, "run"),
        "corpus": corpus, "tokenizer": {"vocab_size": 400},
        "data": {"seq_len": 64, "domain_train_tokens": [256, 512], "is_tokens": 2048},
        "embed": {"batch_size": 64, "pool_size": 1},
        "kmeans": {"k_is": 8, "k_mix": 2, "k_pn": 4, "fit_sample": 5000, "max_iter": 20},
        "cluster": {"num_cpus": 2},
    })
    validate(recipe)
    peaks = _PeakByStage()
    logging.getLogger("slm.pipeline.run").addHandler(peaks)
    logging.getLogger("slm.pipeline.run").setLevel(logging.INFO)
    t0 = time.time()
    result = run_pipeline(recipe)
    wall = time.time() - t0
    stage_seconds = sum(s["seconds"] for s in result["stages"])
    return {"docs": docs, "stage_seconds": stage_seconds, "wall_seconds": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "windows": next(s["rows"] for s in result["stages"] if s["stage"] == "windows generic"),
            "per_stage": {s["stage"]: s["seconds"] for s in result["stages"]},
            "peak_rss_mb_after_stage": peaks.peaks}


def _run_subprocess(docs: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", str(docs)], capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"pipeline run on {docs} docs failed (exit {proc.returncode})")
    return json.loads(lines[-1][7:])


def scaling(docs: int, factor: int, results: str) -> None:
    """1x, 10x, 1x (ABA: the shared machine's load drift hits both sizes alike); the 1x figures
    are the mean of its two runs."""
    load0 = load_average()
    runs = []
    for n in (docs, docs * factor, docs):
        r = _run_subprocess(n)
        runs.append(r)
        r["s_per_doc"] = r["stage_seconds"] / r["docs"]
        print(f"docs={r['docs']:>7}  windows={r['windows']:>7}  stages={r['stage_seconds']:8.1f}s  "
              f"cost/doc={1000 * r['s_per_doc']:8.2f} ms  peak driver RSS={r['peak_rss_mb']:7.0f} MB",
              flush=True)
    big = runs[1]
    small_seconds = (runs[0]["stage_seconds"] + runs[2]["stage_seconds"]) / 2
    small_rss = max(runs[0]["peak_rss_mb"], runs[2]["peak_rss_mb"])
    ratio = (big["stage_seconds"] / big["docs"]) / (small_seconds / docs)
    marginal = (big["stage_seconds"] - small_seconds) / (big["docs"] - docs)
    fixed = small_seconds - marginal * docs  # what a run costs at zero documents
    rss_ratio = big["peak_rss_mb"] / small_rss
    per_stage = {k: round(v, 2) for k, v in big["per_stage"].items()}
    fixed_by_group = _fixed_by_group(runs, docs)
    print("fixed cost by stage group (s at zero documents, same line): " +
          ", ".join(f"{g} {v:.1f}" for g, v in fixed_by_group.items()))
    slowest = sorted(per_stage.items(), key=lambda kv: -kv[1])[:5]
    print("slowest stages at 10x:", ", ".join(f"{k} {v:.1f}s" for k, v in slowest))
    print(f"SUMMARY cost/doc ratio {factor}x/1x = {ratio:.2f} (target 0.90-1.10: "
          f"{'PASS' if 0.9 <= ratio <= 1.1 else 'FAIL'}); marginal cost/doc = "
          f"{1000 * marginal:.2f} ms vs {1000 * small_seconds / docs:.2f} ms at 1x; fixed cost "
          f"{fixed:.1f} s over {len(big['per_stage'])} stages; peak driver RSS ratio = "
          f"{rss_ratio:.2f} (target <= 1.10: {'PASS' if rss_ratio <= 1.1 else 'FAIL'})")
    record({"pipeline_cost_per_doc_ratio": round(ratio, 3), "pipeline_scaling": {
        "goal": "cost per document (sum of stage seconds / generic documents) at 10x over 1x "
                "within 0.90-1.10; peak driver RSS ratio <= 1.10",
        "ratio": round(ratio, 3), "pass": 0.9 <= ratio <= 1.1,
        "peak_driver_rss_ratio": round(rss_ratio, 3), "rss_pass": rss_ratio <= 1.1,
        "marginal_seconds_per_doc": round(marginal, 5), "fixed_seconds": round(fixed, 2),
        "fixed_seconds_by_group": fixed_by_group,
        "order": "1x, 10x, 1x (each a fresh process with its own embedded Ray)",
        "runs": [{k: r[k] for k in ("docs", "windows", "stage_seconds", "wall_seconds",
                                    "peak_rss_mb")}
                 | {"peak_rss_rises_mb": _rises(r["peak_rss_mb_after_stage"])} for r in runs],
        "per_stage_seconds": {"1x": [{k: round(v, 2) for k, v in runs[i]["per_stage"].items()}
                                     for i in (0, 2)], "10x": per_stage},
        "load_average_at_start": load0}}, results)


def _group(stage: str) -> str:
    """A stage's group: its first word ("assign k=2 generic" -> "assign")."""
    return stage.split(" ", 1)[0]


def _fixed_by_group(runs: list[dict], docs: int) -> dict[str, float]:
    """Per stage group, the seconds a run would spend at zero documents: the 1x mean minus the
    group's own marginal cost per document (from 1x to 10x) times the 1x documents."""
    small, big = (runs[0], runs[2]), runs[1]
    out: dict[str, float] = {}
    for g in dict.fromkeys(_group(s) for s in big["per_stage"]):
        s1 = sum(sum(v for k, v in r["per_stage"].items() if _group(k) == g) for r in small) / 2
        s10 = sum(v for k, v in big["per_stage"].items() if _group(k) == g)
        out[g] = round(s1 - (s10 - s1) / (big["docs"] - docs) * docs, 2)
    return out


def compare_formats(windows: int = 100_000, seq_len: int = 128) -> None:
    """Read the same token shards through Ray Data as parquet and as JSON lines."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, size=(windows, seq_len), dtype=np.int32)
    table = pa.table({"window_id": np.arange(windows, dtype=np.int64),
                      "input_ids": pa.array(list(ids), type=pa.list_(pa.int32())),
                      "cluster_k16": rng.integers(0, 16, windows).astype(np.int32)})
    root = tempfile.mkdtemp(prefix="slm-formats-")
    os.makedirs(f"{root}/pq")
    os.makedirs(f"{root}/jl")
    per = 4096
    for i in range(0, windows, per):
        part = table.slice(i, per)
        pq.write_table(part, f"{root}/pq/part-{i:07d}.parquet")
        with open(f"{root}/jl/part-{i:07d}.jsonl", "w") as f:
            for row in part.to_pylist():
                f.write(json.dumps(row) + "\n")
    size = {k: sum(os.path.getsize(os.path.join(root, k, f)) for f in os.listdir(f"{root}/{k}"))
            for k in ("pq", "jl")}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        out = {}
        for name, make in (("parquet", lambda: ray.data.read_parquet(f"{root}/pq")),
                           ("jsonl", lambda: ray.data.read_json(f"{root}/jl", lines=True))):
            best = float("inf")
            for _ in range(2):
                t0 = time.time()
                n = sum(len(b["window_id"]) for b in make().iter_batches(batch_size=256,
                                                                          batch_format="numpy"))
                best = min(best, time.time() - t0)
            assert n == windows
            out[name] = best
            print(f"{name:8s} {windows / best:10.0f} windows/s  ({best:.2f}s, "
                  f"{size['pq' if name == 'parquet' else 'jl'] / 1e6:.1f} MB on disk)")
        print(f"SUMMARY parquet reads {out['jsonl'] / out['parquet']:.1f}x faster than JSON lines, "
              f"{size['jl'] / size['pq']:.1f}x smaller")
    finally:
        ray.shutdown()


def compare_compute(docs: int = 4000) -> None:
    """Tokenization into windows: Ray Data task pool vs actor pool, same corpus."""
    root = tempfile.mkdtemp(prefix="slm-compute-")
    corpus = _write_inputs(root, docs)
    layout = RunLayout(os.path.join(root, "run"))
    with ray_session(ClusterConfig(num_cpus=2)):
        ingest_generic(layout, CorpusConfig(), corpus["generic"])
        build_tokenizer(layout, TokenizerConfig(vocab_size=400))
        times: dict[str, float] = {}
        for compute in ("tasks", "actors", "tasks", "actors"):
            t0 = time.time()
            build_windows(layout, "generic", layout.corpus_generic(), 64, compute=compute, force=True)
            times[compute] = min(times.get(compute, float("inf")), time.time() - t0)
        print(f"SUMMARY windows over {docs} docs: task pool {times['tasks']:.2f}s, actor pool "
              f"{times['actors']:.2f}s (best of 2)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=6000,
                   help="generic documents at 1x (6000: ~21k windows at 1x, ~210k at 10x; the "
                        "issue's realistic size is >= 20k windows; ~1 h on 2 cores)")
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--results", default=RESULTS, help="JSON file the figures are merged into")
    p.add_argument("--compare-formats", action="store_true")
    p.add_argument("--compare-compute", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one)), flush=True)
    elif args.compare_formats:
        compare_formats()
    elif args.compare_compute:
        compare_compute()
    else:
        scaling(args.docs, args.factor, args.results)


if __name__ == "__main__":
    main()
