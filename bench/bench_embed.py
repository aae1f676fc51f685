"""Ray Data embedding throughput vs a bare ``SentenceTransformer.encode`` loop.

Same texts, same model, same torch threads, same niceness (the bare process runs at the Ray
workers' niceness, 15 by default). Each side starts from a fresh process, so both pay the same
start-up: the bare side is a child Python process (imports, model load, encode),
timed from spawn to exit; the Ray side is the pipeline's ``embed_texts`` on an embedded Ray
session started beforehand (one actor per run: actor process start, imports, model load, encode,
results in the object store; the input dataset is materialized before the clock starts). After
an uncounted warm-up of each side (the session's first run also reads the model's files from
disk), the sides alternate which goes first (ABBA, ``--pairs``), so load and order hit both alike;
the ratio is Σ bare seconds / Σ Ray seconds. The bare child's encode-only seconds are recorded
too (the start-up that both sides pay is the difference).

Texts are ``--words`` words drawn from the model's own vocabulary. Short texts are the strict
case for the ratio: Ray's per-batch costs do not depend on text length, the encode does.

    .venv/bin/python bench/bench_embed.py --texts 20000 --words 16 --threads 2
Target: ratio (bare seconds / Ray seconds) >= 0.95. Writes ``embed_ratio`` and ``embed`` to
bench/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import ray.data

from record import RESULTS, load_average, record  # bench/record.py (the script's folder is on sys.path)
from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session
from slm.pipeline.config import EmbedConfig
from slm.pipeline.embed import embed_texts, offline_model_dir, resolve_model


def make_texts(n: int, words: int, seed: int) -> list[str]:
    vocab_file = os.path.join(offline_model_dir() or resolve_model("all-MiniLM-L6-v2"), "vocab.txt")
    with open(vocab_file, encoding="utf-8") as f:
        vocab = [w.strip() for w in f if w.strip().isalpha() and len(w.strip()) > 2]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=words)) for _ in range(n)]


# The bare loop, run as a fresh child process: only torch and sentence-transformers, nothing of
# slm or Ray. argv: texts file, model directory, batch size, torch threads.
BARE_LOOP = """
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
texts = json.load(open(sys.argv[1], encoding="utf-8"))
torch.set_num_threads(int(sys.argv[4]))
m = SentenceTransformer(sys.argv[2], device="cpu", local_files_only=True)
t0 = time.perf_counter()
out = m.encode(texts, batch_size=int(sys.argv[3]), normalize_embeddings=True,
               convert_to_numpy=True, show_progress_bar=False)
assert out.shape[0] == len(texts)
print("ENCODE_SECONDS", time.perf_counter() - t0)
"""


def worker_niceness() -> int:
    """The niceness of this session's Ray workers (Ray starts them at 15 by default)."""
    return ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())


def bare(texts_file: str, a: argparse.Namespace, niceness: int) -> tuple[float, float]:
    """(seconds from spawn to exit, encode-only seconds) of the bare loop in a fresh process,
    at ``niceness`` (the Ray workers' own: on a shared machine a niceness-0 process would take
    the CPU from a niceness-15 actor, and the ratio would measure the scheduler)."""
    model_dir = resolve_model(a.model)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BARE_LOOP, texts_file, model_dir,
                           str(a.batch_size), str(a.threads)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          preexec_fn=lambda: os.nice(niceness - os.nice(0)))
    seconds = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ENCODE_SECONDS ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bare encode failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, float(lines[-1].split()[1])


def with_ray(ds, a: argparse.Namespace) -> float:
    cfg = EmbedConfig(model=a.model, batch_size=a.batch_size, pool_size=a.pool,
                      num_cpus=a.actor_cpus, torch_threads=a.threads, num_gpus=0)
    t0 = time.perf_counter()
    out = embed_texts(ds, cfg).materialize()
    seconds = time.perf_counter() - t0
    assert out.count() == a.texts
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=20_000)
    p.add_argument("--words", type=int, default=16)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    p.add_argument("--pool", type=int, default=1, help="embedding actors")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs reserved per actor (leave one for Ray Data's own tasks)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    p.add_argument("--pairs", type=int, default=2, help="bare/Ray pairs timed (ABBA)")
    p.add_argument("--results", default=RESULTS, help="JSON file the figures are merged into")
    a = p.parse_args(argv)
    load0 = load_average()
    texts = make_texts(a.texts, a.words, seed=0)
    times: dict[str, list[float]] = {"bare": [], "bare_encode_only": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="slm-bench-embed-") as tmp:
        texts_file = os.path.join(tmp, "texts.json")
        with open(texts_file, "w", encoding="utf-8") as f:
            json.dump(texts, f)
        with ray_session(ClusterConfig(num_cpus=a.cores)):
            ds = ray.data.from_items([{"text": t} for t in texts]).materialize()  # input in store
            niceness = worker_niceness()
            # uncounted warm-up of each side: the first run of the session also read the
            # model's files from disk (page cache), so the first bare run took 111 s against
            # 73 s for the second (2 cores), and it came first on every run
            warm = {"bare": bare(texts_file, a, niceness)[0], "ray": with_ray(ds, a)}
            print(f"warm-up (uncounted): bare {warm['bare']:.2f} s, Ray {warm['ray']:.2f} s", flush=True)
            for i in range(a.pairs):
                for side in (("bare", "ray") if i % 2 == 0 else ("ray", "bare")):  # ABBA
                    if side == "bare":
                        total, encode = bare(texts_file, a, niceness)
                        times["bare"].append(total)
                        times["bare_encode_only"].append(encode)
                    else:
                        times["ray"].append(with_ray(ds, a))
                print(f"pair {i}: bare {times['bare'][-1]:.2f} s (encode "
                      f"{times['bare_encode_only'][-1]:.2f} s), Ray {times['ray'][-1]:.2f} s", flush=True)
    ratio = sum(times["bare"]) / sum(times["ray"])
    print(f"texts={a.texts} words/text={a.words} batch={a.batch_size} threads={a.threads} "
          f"pool={a.pool} cores={a.cores} pairs={a.pairs}")
    print(f"bare (fresh process): {a.texts * a.pairs / sum(times['bare']):8.1f} texts/s; "
          f"Ray Data pool: {a.texts * a.pairs / sum(times['ray']):8.1f} texts/s")
    print(f"RATIO ray/bare throughput = {ratio:.3f}  (target >= 0.95)")
    record({"embed_ratio": round(ratio, 3), "embed": {
        "goal": "bare seconds / Ray Data seconds >= 0.95 (same texts, model, threads)",
        "ratio": round(ratio, 3), "pass": ratio >= 0.95,
        "order": "an uncounted warm-up of each side, then pairs alternating which side goes first",
        "warmup_seconds": {k: round(v, 3) for k, v in warm.items()},
        "niceness_both_sides": niceness,
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "sizes": {"texts": a.texts, "words_per_text": a.words, "batch_size": a.batch_size,
                  "torch_threads": a.threads, "pool": a.pool, "actor_cpus": a.actor_cpus,
                  "cores": a.cores},
        "load_average_at_start": load0}}, a.results)


if __name__ == "__main__":
    main()
