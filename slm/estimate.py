"""`slm estimate`: what a recipe's training will cost on a given cluster, before anything runs.

Per stage (each pretraining family, the specialization sweep) and in total:
* **FLOPs**, with the formula the training loop meters into every run's ``costs.json``
  (models/flops.py through the family's ``micro_flops``): tokens × train FLOPs per token of the
  family's model, + SLM-pn's expert materialisation (expected distinct clusters per micro-batch,
  uniform routing) + SLM-d's teacher forward; a method of ``specialize.lora.methods`` fine-tunes
  at LoRA's FLOPs per token (its adapters counted in closed form). Evaluation is not counted
  (the runs' ``flops`` exclude it too). The sweep is an upper bound: every trial runs its whole
  budget (early stopping ends some sooner).
* **device-hours** = FLOPs / (peak FLOP/s of the node's GPU × MFU). MFU per model size comes
  from ``bench/results/gpu-*.json`` (scripts/gpu_check.sh: objects with ``size`` and ``mfu``)
  when measured, else ``DEFAULT_MFU`` (stated in the output);
* **wall hours**: runs of a stage side by side as far as the cluster's GPUs allow (a
  pretraining run holds ``scaling.num_workers`` GPUs, a trial ``gpus_per_trial``), stages one
  after another;
* **price** = busy node-hours × ``--price-per-hour`` (per node) when given.

The data pipeline (tokenizer, embeddings, k-means) is not estimated: it runs on CPUs and its
cost depends on the corpus, not on FLOPs.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from slm.cluster.nodes import NodeType
from slm.configkit import ConfigError
from slm.layout import RunLayout
from slm.models.config import FAMILY_INFO
from slm.models.flops import (DEVICE_PEAK_FLOPS, expected_present_experts,
                              inference_flops_per_token, pn_materialize_flops, train_flops_per_token)
from slm.models.lm import lm_config, lora_param_count
from slm.stage import manifest
from slm.tune.methods import get_method

DEFAULT_MFU = 0.30  # stated in the output; the goals on H100 are 40 % (126M) / 50 % (771M)
RESULTS_GLOB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "bench", "results", "gpu-*.json")


@dataclass(frozen=True)
class Cluster:
    node: NodeType
    nodes: int
    price_per_hour: float = 0.0  # per node; 0 = not given

    @property
    def gpus(self) -> int:
        return self.node.gpus * self.nodes

    @property
    def peak(self) -> float:
        return DEVICE_PEAK_FLOPS[self.node.gpu]["bf16"]


@dataclass
class StageEstimate:
    stage: str
    size: str            # model size preset trained
    runs: int            # independent runs (experts, domains, trials)
    devices_per_run: float
    tokens: float
    flops: float
    mfu: float
    mfu_source: str
    device_hours: float = 0.0
    wall_hours: float = 0.0
    price: float = 0.0
    notes: list[str] = field(default_factory=list)


def measured_mfu(pattern: str = "", micro_batch: int = 0) -> dict[str, tuple[float, str]]:
    """{size preset: (MFU, file)} from GPU benchmark results: any JSON object holding a size
    (``size``/``model``/``preset``, or ``spec.size`` as bench/gpu_check.py writes its probes) and
    an ``mfu``. A measurement at ``micro_batch`` (the recipe's per-GPU batch: MFU depends on it)
    wins over one at another micro-batch; among equals the last file (by name) wins."""
    found: dict[str, tuple[float, str, bool]] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            spec = node.get("spec") if isinstance(node.get("spec"), dict) else {}
            size = next((src[k] for src in (node, spec) for k in ("size", "model", "preset")
                         if isinstance(src.get(k), str)), None)
            if size and isinstance(node.get("mfu"), (int, float)) and node["mfu"] > 0:
                same_batch = bool(micro_batch) and node.get("micro_batch") == micro_batch
                if same_batch or not found.get(size, (0, "", False))[2]:
                    found[size] = (float(node["mfu"]), os.path.basename(path), same_batch)
            for v in node.values():
                walk(v, path)
        elif isinstance(node, list):
            for v in node:
                walk(v, path)

    for path in sorted(glob.glob(pattern or RESULTS_GLOB)):
        with open(path, encoding="utf-8") as f:
            walk(json.load(f), path)
    return {size: (m, f) for size, (m, f, _) in found.items()}


def vocab_size(recipe, from_run: bool = False) -> tuple[int, str]:
    """With ``from_run`` (an existing run: `slm estimate --run`) its tokenizer's vocabulary
    when built (a BPE stops short of vocab_size on a small corpus), else ``tokenizer.vocab_size``
    (a recipe's run directory is not read: it may not exist yet)."""
    m = manifest(RunLayout(recipe.run_dir).tokenizer) if from_run else None
    if m and m.get("vocab_size"):
        return int(m["vocab_size"]), "the run's tokenizer"
    return recipe.tokenizer.vocab_size, "tokenizer.vocab_size"


def domain_count(recipe, given: int = 0) -> tuple[int, str]:
    if recipe.sweep.domains:
        return len(recipe.sweep.domains), "sweep.domains"
    if recipe.corpus.domains:
        return len(recipe.corpus.domains), "corpus.domains"
    if recipe.corpus.generic == "demo":
        return len(recipe.corpus.demo_domains), "corpus.demo_domains"
    return max(given, 1), "--domains" if given else "the recipe names none: pass --domains"


def _pretrain_stages(recipe, vocab: int, n_domains: int) -> Iterator[StageEstimate]:
    p, t, sc = recipe.pretrain, recipe.pretrain.train, recipe.pretrain.scaling
    seq = recipe.data.seq_len
    for fam in p.families:
        info = FAMILY_INFO[fam]
        size = p.slm_size if info.size == "slm" else p.llm_size
        config = lm_config(size, vocab, seq)
        # per_domain (SLM-is): one run per domain and domain train size the sweep specializes
        sizes = len(recipe.domain_sizes())
        runs = {"one": 1, "per_expert": recipe.kmeans.k_mix, "per_domain": n_domains * sizes}[info.runs]
        runs *= len(recipe.pretrain_seeds())  # every run once per pretraining seed
        steps = p.steps.get(fam, 0)
        micro_steps = steps * t.grad_accum * sc.num_workers  # micro-batches over all workers
        tokens = float(micro_steps * t.micro_batch * seq)
        flops = train_flops_per_token(config, seq) * tokens
        notes = []
        if info.routed:  # the experts present in each micro-batch are materialised
            present = expected_present_experts(recipe.kmeans.k_pn, t.micro_batch)
            flops += micro_steps * present * pn_materialize_flops(config, p.pn_h, p.pn_m, 1)
            notes.append(f"{present:.2f} experts per micro-batch (uniform routing)")
        yield StageEstimate(f"pretrain {fam}", size, runs, sc.num_workers, tokens * runs,
                            flops * runs, 0.0, "", notes=notes)


def _sweep_stage(recipe, vocab: int, n_domains: int) -> StageEstimate:
    sw, spec, p = recipe.sweep, recipe.specialize, recipe.pretrain
    seq = recipe.data.seq_len
    sizes = len(sw.domain_tokens or recipe.data.domain_train_tokens)
    per_grid_point = n_domains * sizes * len(sw.seeds) * max(1, len(sw.lrs))
    tokens = flops = 0.0
    trials = 0
    served = set()
    notes = ["upper bound: every trial runs its whole budget"]
    for name in sw.methods:
        m = get_method(name)
        size = m.served_preset(p)
        served.add(size)
        config = lm_config(size, vocab, seq)
        adapters = (lora_param_count(config, spec.lora.target_modules, spec.lora.rank)
                    if name in spec.lora.methods else 0)
        if adapters:
            notes.append(f"{name}: LoRA rank {spec.lora.rank}, {adapters:,} trainable parameters")
        starts = recipe.kmeans.k_mix if m.expert_selection and spec.expert_selection == "all" else 1
        teacher = (inference_flops_per_token(lm_config(get_method(m.teacher).served_preset(p), vocab, seq), seq)
                   if m.teacher else 0.0)
        # a method built from pretrained families: one trial per pretraining seed and level it
        # starts from (as tune.grid.sweep_trials makes them)
        points = per_grid_point * (len(sw.pretrain_seeds or recipe.pretrain_seeds())
                                   * len(sw.levels or p.levels) if m.pretrains else 1)
        for budget in sw.budgets:
            t = float(budget * spec.micro_batch * sw.workers_per_trial * seq) * starts
            tokens += t * points
            flops += (train_flops_per_token(config, seq, lora_params=adapters) + teacher) * t * points
            trials += points
    devices = sw.gpus_per_trial * (sw.workers_per_trial if sw.trial_runtime == "train" else 1)
    return StageEstimate("specialize sweep", "+".join(sorted(served)), trials, devices or 1.0,
                         tokens, flops, 0.0, "", notes=notes)


def estimate(recipe, cluster: Cluster, domains: int = 0, mfu: float = 0.0,
             results_glob: str = "", from_run: bool = False) -> dict[str, Any]:
    """The recipe's training cost per stage and in total on ``cluster`` (module doc)."""
    vocab, vocab_from = vocab_size(recipe, from_run)
    n_domains, domains_from = domain_count(recipe, domains)
    measured = measured_mfu(results_glob, recipe.pretrain.train.micro_batch)
    stages = [*_pretrain_stages(recipe, vocab, n_domains), _sweep_stage(recipe, vocab, n_domains)]
    for s in stages:
        if s.devices_per_run > cluster.gpus:
            raise ConfigError(f"{s.stage} needs {s.devices_per_run:g} GPUs per run; the cluster "
                              f"has {cluster.gpus} ({cluster.nodes} x {cluster.node.name}); add "
                              "nodes or lower pretrain.scaling.num_workers / sweep.gpus_per_trial")
        first = s.size.split("+")[0]
        s.mfu, s.mfu_source = ((mfu, "--mfu") if mfu else
                               (measured[first][0], measured[first][1]) if first in measured else
                               (DEFAULT_MFU, "default"))
        s.device_hours = s.flops / (cluster.peak * s.mfu) / 3600.0
        at_once = max(1, min(s.runs, int(cluster.gpus // s.devices_per_run)))
        if s.stage == "pretrain mix" and recipe.pretrain.scaling.parallel_experts:
            at_once = min(at_once, recipe.pretrain.scaling.parallel_experts)
        if s.stage == "specialize sweep" and recipe.sweep.max_concurrent:
            at_once = min(at_once, recipe.sweep.max_concurrent)
        per_run_wall = s.device_hours / s.runs / s.devices_per_run
        s.wall_hours = math.ceil(s.runs / at_once) * per_run_wall
        s.price = s.device_hours / cluster.node.gpus * cluster.price_per_hour
    total = {k: sum(getattr(s, k) for s in stages)
             for k in ("flops", "tokens", "device_hours", "wall_hours", "price")}
    return {"recipe": recipe.name, "node_type": cluster.node.name, "gpu": cluster.node.gpu,
            "nodes": cluster.nodes, "gpus": cluster.gpus, "peak_flops_per_gpu": cluster.peak,
            "price_per_node_hour": cluster.price_per_hour, "vocab_size": vocab,
            "vocab_from": vocab_from, "domains": n_domains, "domains_from": domains_from,
            "stages": [vars(s) for s in stages], "total": total}


def _source_tag(source: str) -> str:
    """An MFU source in 8 columns: 'default', '--mfu', or the results file without 'gpu-'/.json."""
    if source in ("default", "--mfu"):
        return source
    return source.removeprefix("gpu-").removesuffix(".json")[:8]


def format_estimate(e: dict[str, Any]) -> str:
    """The estimate as a table (what `slm estimate` prints)."""
    price = e["price_per_node_hour"] > 0
    lines = [f"recipe {e['recipe']} on {e['nodes']} x {e['node_type']} ({e['gpus']} x {e['gpu']}, "
             f"{e['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s bf16 peak each); vocabulary "
             f"{e['vocab_size']} ({e['vocab_from']}); domains {e['domains']} ({e['domains_from']})",
             f"{'stage':<20} {'size':<20} {'runs':>6} {'FLOPs':>10} {'MFU':>14} {'GPU-h':>10} "
             f"{'wall h':>9}" + (f" {'price':>11}" if price else "")]
    for s in e["stages"]:
        lines.append(f"{s['stage']:<20} {s['size']:<20} {s['runs']:>6} {s['flops']:>10.3e} "
                     f"{s['mfu']:>5.0%} {_source_tag(s['mfu_source']):>8} {s['device_hours']:>10.1f} "
                     f"{s['wall_hours']:>9.1f}" + (f" {s['price']:>11,.0f}" if price else ""))
    t = e["total"]
    lines.append(f"{'total':<20} {'':<20} {'':>6} {t['flops']:>10.3e} {'':>14} "
                 f"{t['device_hours']:>10.1f} {t['wall_hours']:>9.1f}"
                 + (f" {t['price']:>11,.0f}" if price else ""))
    notes = [f"{s['stage']}: {n}" for s in e["stages"] for n in s["notes"]]
    if any(s["mfu_source"] == "default" for s in e["stages"]):
        notes.append(f"MFU 'default' = {DEFAULT_MFU:.0%}: no bench/results/gpu-*.json measures that "
                     "size yet (scripts/gpu_check.sh), or pass --mfu")
    files = sorted({s["mfu_source"] for s in e["stages"] if s["mfu_source"] not in ("default", "--mfu")})
    notes += [f"MFU '{_source_tag(f)}' measured in bench/results/{f}" for f in files]
    notes.append("not counted: evaluation, the data pipeline (CPU), start-up and checkpoint time")
    return "\n".join(lines + [f"  note: {n}" for n in notes])
