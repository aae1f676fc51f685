"""Ray Data embedding throughput vs a bare ``SentenceTransformer.encode`` loop.

Same texts, same model, same cores, same torch threads. Both timings INCLUDE loading the model
(the Ray side: actor start + model load + encode + results in the object store; the bare side:
model load + encode), because a pipeline stage pays both; the bare encode time without the load
is printed too, for context. Texts are ~`--words` words drawn from the model's own vocabulary
(comparable to a decoded 128-token window).

    .venv/bin/python bench/bench_embed.py --texts 2000 --threads 2
Target: ratio (bare seconds / Ray seconds) >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import ray.data

from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session
from slm.pipeline.config import EmbedConfig
from slm.pipeline.embed import embed_texts, load_model, offline_model_dir, resolve_model


def make_texts(n: int, words: int, seed: int) -> list[str]:
    vocab_file = os.path.join(offline_model_dir() or resolve_model("all-MiniLM-L6-v2"), "vocab.txt")
    with open(vocab_file, encoding="utf-8") as f:
        vocab = [w.strip() for w in f if w.strip().isalpha() and len(w.strip()) > 2]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=words)) for _ in range(n)]


def bare(texts: list[str], model: str, batch_size: int, threads: int) -> tuple[float, float]:
    """(seconds incl. model load, seconds of encode only)."""
    t0 = time.perf_counter()
    m = load_model(model, device="cpu", torch_threads=threads)
    t1 = time.perf_counter()
    out = m.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                   convert_to_numpy=True, show_progress_bar=False)
    t2 = time.perf_counter()
    assert out.shape[0] == len(texts)
    return t2 - t0, t2 - t1


def with_ray(texts: list[str], model: str, batch_size: int, threads: int, pool: int,
             cpus: float) -> float:
    ds = ray.data.from_items([{"text": t} for t in texts]).materialize()  # input ready in store
    cfg = EmbedConfig(model=model, batch_size=batch_size, pool_size=pool, num_cpus=cpus,
                      torch_threads=threads, num_gpus=0)
    t0 = time.perf_counter()
    out = embed_texts(ds, cfg).materialize()
    seconds = time.perf_counter() - t0
    assert out.count() == len(texts)
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--words", type=int, default=90)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    p.add_argument("--pool", type=int, default=1, help="embedding actors")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs reserved per actor (leave one for Ray Data's own tasks)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    a = p.parse_args(argv)
    texts = make_texts(a.texts, a.words, seed=0)
    b_total, b_encode = bare(texts, a.model, a.batch_size, a.threads)
    with ray_session(ClusterConfig(num_cpus=a.cores)):
        r_total = with_ray(texts, a.model, a.batch_size, a.threads, a.pool, a.actor_cpus)
    print(f"texts={a.texts} words/text={a.words} batch={a.batch_size} threads={a.threads} "
          f"pool={a.pool} cores={a.cores}")
    print(f"bare encode (incl. model load):   {b_total:8.2f} s  {a.texts / b_total:8.1f} texts/s "
          f"(encode only {b_encode:.2f} s, {a.texts / b_encode:.1f} texts/s)")
    print(f"Ray Data pool (incl. model load): {r_total:8.2f} s  {a.texts / r_total:8.1f} texts/s")
    print(f"RATIO ray/bare throughput = {b_total / r_total:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
