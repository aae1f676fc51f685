"""Tiny real run directories for the training tests: the synthetic tokenizer and token shards
of slm.models.synthetic, and a recipe for a tiny model on them."""

from __future__ import annotations

import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slm.config import Recipe
from slm.layout import RunLayout, is_set, packed_set
from slm.models.synthetic import VOCAB, windows, write_shards, write_tokenizer  # noqa: F401

SEQ = 16


def tiny_recipe(run_dir: str, **steps: int) -> Recipe:
    """A recipe for a 1-layer, 32-wide model on 16-token windows, 1 CPU worker."""
    r = Recipe(name="tiny", run_dir=run_dir, seed=0)
    r.corpus.generic = "unused"
    r.corpus.domains = {"alpha": "unused"}
    r.data.seq_len = SEQ
    r.kmeans.k_is, r.kmeans.k_mix, r.kmeans.k_pn = 4, 2, 2
    p = r.pretrain
    p.slm_size = p.llm_size = "tiny"
    p.steps = {"slm": 8, "llm": 8, "is": 8, "mix": 8, "pn": 8, **steps}
    p.pn_h, p.pn_m = 2, 2
    p.valid_fraction = 0.1
    p.logger = "tensorboard"
    t = p.train
    t.micro_batch, t.grad_accum, t.lr, t.warmup = 4, 1, 3e-3, 2
    t.eval_every, t.eval_batches, t.ckpt_every, t.log_every = 4, 2, 4, 4
    t.shuffle_window = 64
    p.scaling.num_workers, p.scaling.cpus_per_worker, p.scaling.max_failures = 1, 1.0, 1
    return r


def make_run(run_dir: str, n_generic: int = 512, ks: tuple[int, ...] = (2, 4)) -> RunLayout:
    """Tokenizer + generic shards, plain and packed per cluster (generic-k2, generic-k4: what
    pn and mix train on) + SLM-is and domain valid shards."""
    layout = RunLayout(run_dir)
    write_tokenizer(layout)
    write_shards(layout, "generic", windows(n_generic, SEQ, [], seed=1))
    for k in ks:
        write_shards(layout, packed_set("generic", k), windows(n_generic, SEQ, [k], seed=1, id_base=40_000 * k))
    # SLM-is shards of alpha at the recipe's first default domain size
    write_shards(layout, is_set("alpha", 4, 1_000_000), windows(256, SEQ, list(ks), seed=2, id_base=10_000))
    write_shards(layout, "domain-alpha-valid", windows(64, SEQ, list(ks), seed=3, id_base=20_000))
    with open(os.path.join(run_dir, "NOTE.json"), "w") as f:
        json.dump({"what": "tiny training test run"}, f)
    return layout


def tb_scalars(run_uri: str, tag: str) -> dict[int, float]:
    """{step: value} of one scalar from a training run's TensorBoard event files (rank 0 logs)."""
    out = {}
    d = os.path.join(run_uri, "tensorboard")
    for f in sorted(os.listdir(d)):
        acc = EventAccumulator(os.path.join(d, f))
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out
