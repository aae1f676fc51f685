"""The prepared GPU check (issue 14): what slm's training does on one GPU, in a few minutes,
without network. Run through ``scripts/gpu_check.sh`` (which bounds it to 8 minutes):

    scripts/gpu_check.sh                 # on a GPU machine: bench/results/gpu-<gpu>.json
    .venv/bin/python bench/gpu_check.py --dry-run --out /tmp/gpu-dryrun.json   # CPU, tiny sizes

It prints the environment, then runs each probe in a fresh process (its own CUDA context, peak
memory counter and 1-process NCCL group; one probe failing or running out of memory is
recorded, not fatal), writing the JSON after each:

* ``demo-zero1`` / ``demo-zero3``: the demo model size pretraining with bf16 at ZeRO-1 and
  ZeRO-3 (the training loop on the GPU: every collective on the device, ZeRO-3's gathers);
* ``paper-slm`` / ``paper-llm``: the paper recipe's 126M and 771M models at its sequence
  length, micro-batch, accumulation and ZeRO stage, ``--steps`` steps: tokens/s and MFU
  (median after the first steps) against the goals (SLM ≥ 40 %, LLM ≥ 50 %);
* ``finetune``: one SLM-d fine-tuning step of the paper SLM at the recipe's
  ``specialize.micro_batch``, its teacher the paper LLM (bf16, no gradients);
* ``finetune-lora`` (a recipe with ``specialize.lora.methods``): ``--steps`` LoRA fine-tuning
  steps of the first such method's served model at ``specialize.micro_batch`` (peft adapters
  on the frozen model in bf16; MFU with LoRA's FLOPs), its export merged into a plain model;
* every training probe: the memory estimate (models/memory.py) against
  ``torch.cuda.max_memory_allocated`` (goal: within 15 %);
* ``embed``: embedding throughput of the recipe's model on one GPU Ray Data actor (the model
  from the offline package, no hub).

Models are built from the repo's size presets with random weights, data are random token ids
(models/probe.py): throughput and memory do not depend on the values. ``--dry-run`` runs every
probe on the CPU at tiny sizes (tests/test_gpu_check.py runs it, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # machine_info, beside this file

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import ray.data  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from machine_info import machine  # noqa: E402

from slm.cluster.config import ClusterConfig  # noqa: E402
from slm.cluster.ray_env import ray_session  # noqa: E402
from slm.config import load_recipe  # noqa: E402
from slm.models import checkpoint as ckpt  # noqa: E402
from slm.models.families import FamilySpec  # noqa: E402
from slm.models.lm import lm_config, make_lm  # noqa: E402
from slm.models.loop_config import LoraSection  # noqa: E402
from slm.models.probe import StepRecorder, probe_config, random_rows, train_in_process  # noqa: E402
from slm.pipeline.config import EmbedConfig  # noqa: E402
from slm.pipeline.embed import embed_texts, resolve_model  # noqa: E402
from slm.tune.methods import get_method  # noqa: E402

GOALS = {"paper-slm": 0.40, "paper-llm": 0.50}  # MFU goals on an H100/H200 class GPU (bf16)
MEMORY_TOLERANCE = 0.15


# --------------------------------------------------------------------------------------------
# The plan: which probes, at which sizes
# --------------------------------------------------------------------------------------------

def plan(recipe_path: str, dry_run: bool, steps: int, embed_model: str = "",
         embed_random_weights: bool = False, micro_batch: int = 0) -> list[dict[str, Any]]:
    """The probes' specs (JSON-able: each runs in its own process)."""
    r = load_recipe(recipe_path)
    t, spec = r.pretrain.train, r.specialize
    vocab, seq = (128, 32) if dry_run else (r.tokenizer.vocab_size, r.data.seq_len)
    size = {"paper-slm": "tiny", "paper-llm": "tiny", "demo": "tiny"} if dry_run else \
        {"paper-slm": r.pretrain.slm_size, "paper-llm": r.pretrain.llm_size, "demo": "demo-slm"}
    micro = (lambda m: 2) if dry_run else (lambda m: m)
    precision = "auto" if dry_run else "bf16"
    common = dict(vocab=vocab, steps=steps, precision=precision, loss_chunk=t.loss_chunk,
                  checkpointing=t.activation_checkpointing)
    probes = [
        {**common, "name": f"demo-zero{z}", "family": "slm", "size": size["demo"],
         "seq": 32 if dry_run else 256, "micro": micro(16), "accum": 1, "zero": z}
        for z in (1, 3)
    ] + [
        {**common, "name": f"paper-{f}", "family": f, "size": size[f"paper-{f}"], "seq": seq,
         "micro": micro(micro_batch or t.micro_batch), "accum": t.grad_accum, "zero": t.zero_stage_of(f)}
        for f in ("slm", "llm")
    ] + [
        {**common, "name": "finetune", "family": "slm", "size": size["paper-slm"], "seq": seq,
         "micro": micro(spec.micro_batch), "accum": spec.grad_accum, "steps": 1,
         "zero": min(t.zero_stage_of("slm"), 2), "teacher_size": size["paper-llm"],
         "kd_weight": spec.kd_weight},
    ] + [
        {**common, "name": "finetune-lora", "family": "slm", "size": size[f"paper-{m.served}"], "seq": seq,
         "micro": micro(spec.micro_batch), "accum": spec.grad_accum, "zero": min(t.zero_stage_of("slm"), 2),
         "lora": {"rank": spec.lora.rank, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                  "target_modules": list(spec.lora.target_modules)}}
        for m in [get_method(n) for n in spec.lora.methods[:1]]
    ] + [
        {"name": "embed", "model": embed_model or r.embed.model, "random_weights": embed_random_weights,
         "batch_size": 64 if dry_run else r.embed.batch_size,
         "texts": 256 if dry_run else 20000, "num_gpus": 0 if dry_run else 1},
    ]
    return probes


# --------------------------------------------------------------------------------------------
# One probe (child process)
# --------------------------------------------------------------------------------------------

def run_training_probe(p: dict[str, Any]) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    work = tempfile.mkdtemp(prefix=f"slm-gpu-check-{p['name']}-")
    init_from = teacher = ""
    if "lora" in p:  # LoRA fine-tunes a saved model
        init_from = os.path.join(work, "start")
        make_lm(lm_config(p["size"], p["vocab"], p["seq"]), seed=0).save_pretrained(init_from)
    if "teacher_size" in p:  # a fine-tuning step: a saved student to start from, a saved teacher
        init_from, teacher = os.path.join(work, "student"), os.path.join(work, "teacher")
        make_lm(lm_config(p["size"], p["vocab"], p["seq"]), seed=0).save_pretrained(init_from)
        make_lm(lm_config(p["teacher_size"], p["vocab"], p["seq"]), seed=1).save_pretrained(teacher)
    spec = FamilySpec(p["family"], p["size"], p["vocab"], p["seq"])
    cfg = probe_config(spec, run_uri=os.path.join(work, "run"), steps=p["steps"], micro_batch=p["micro"],
                       grad_accum=p["accum"], zero_stage=p["zero"], precision=p["precision"],
                       checkpointing=p["checkpointing"], loss_chunk=p["loss_chunk"],
                       teacher=teacher, init_from=init_from,
                       lora=LoraSection(**p["lora"]) if "lora" in p else None)
    if cfg.distillation is not None:
        cfg.distillation.weight = p["kd_weight"]
    rows = p["micro"] * p["accum"] * p["steps"]
    sets = {"train": random_rows(rows, p["seq"], p["vocab"], seed=1),
            "valid": random_rows(p["micro"], p["seq"], p["vocab"], seed=2)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    recorder = StepRecorder()
    t0 = time.perf_counter()
    trainer, _ = train_in_process(cfg, sets, recorder)
    wall = time.perf_counter() - t0
    steady = recorder.steps[min(2, len(recorder.steps) - 1):]  # the first steps warm up kernels
    est = trainer.memory
    peak = torch.cuda.max_memory_allocated() if cuda else None
    out = {"params": est.params, "trainable_params": trainer.costs.trainable_params, "micro_batch": p["micro"], "grad_accum": p["accum"],
           "zero_stage": p["zero"], "seq_len": p["seq"], "precision": trainer.precision,
           "steps": len(recorder.steps), "wall_seconds": wall,
           "loss_first": recorder.steps[0]["train/loss"], "loss_last": recorder.steps[-1]["train/loss"],
           "tokens_per_s": statistics.median(s["perf/tokens_per_s"] for s in steady),
           "step_seconds": statistics.median(s["perf/step_seconds"] for s in steady),
           "mfu": statistics.median(s["perf/mfu"] for s in steady),
           "memory_estimate": est.to_json(), "memory_estimate_line": est.line(),
           "max_memory_allocated": peak,
           "device": str(trainer.engine.device)}
    if peak:
        out["memory_estimate_error"] = est.total / peak - 1.0
        out["memory_within_tolerance"] = abs(out["memory_estimate_error"]) <= MEMORY_TOLERANCE
    if "lora" in p:  # the served model: merged, plain (no adapter files)
        export = os.path.join(work, "run", "probe", ckpt.step_dir_name(p["steps"]), ckpt.EXPORT_DIR)
        out["export_files"] = sorted(os.listdir(export))
    if p["name"] in GOALS:
        out["mfu_goal"] = GOALS[p["name"]]
        out["mfu_goal_met"] = out["mfu"] >= GOALS[p["name"]]
    return out


def random_weights_copy(model_dir: str) -> str:
    """A copy of a sentence-transformers directory whose transformer has random weights of the
    same architecture: for a GPU machine the model's weights cannot travel to (throughput does
    not depend on the weights' values; the tokenizer, sequence length and pooling are the model's)."""
    out = tempfile.mkdtemp(prefix="slm-embed-random-")
    shutil.copytree(model_dir, out, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "openvino"))
    transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(out)).save_pretrained(out)
    return out


def run_embed_probe(p: dict[str, Any], emit) -> None:
    """Embedding throughput on one Ray Data actor; ``emit``s the result before Ray shuts down
    (a slow shutdown does not lose it)."""
    model_dir = resolve_model(p["model"])
    if p.get("random_weights"):
        model_dir = random_weights_copy(model_dir)
    with open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = [w.strip() for w in f if w.strip().isalpha() and len(w.strip()) > 2]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(vocab, size=90)) for _ in range(p["texts"])]
    with ray_session(ClusterConfig(num_cpus=min(os.cpu_count() or 1, 8))):
        ds = ray.data.from_items([{"text": t} for t in texts]).materialize()
        cfg = EmbedConfig(model=model_dir, batch_size=p["batch_size"], pool_size=1, num_gpus=p["num_gpus"])
        t0 = time.perf_counter()
        n = embed_texts(ds, cfg).materialize().count()
        seconds = time.perf_counter() - t0
        if n != len(texts):
            raise RuntimeError(f"embedded {n} of {len(texts)} texts")
        emit({"texts": n, "seconds": seconds, "texts_per_s": n / seconds, "num_gpus": p["num_gpus"],
              "model": p["model"], "random_weights": bool(p.get("random_weights")),
              "note": "includes the actor's start and model load"})


def emit(result: dict[str, Any]) -> None:
    print("PROBE_RESULT " + json.dumps(result), flush=True)


def child(spec_json: str) -> None:
    p = json.loads(spec_json)
    if p["name"] == "embed":
        run_embed_probe(p, emit)
    else:
        emit(run_training_probe(p))


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    env = {**machine(), "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
           "node": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                    "gpu_memory_bytes": props.total_memory, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                    "bf16_supported": torch.cuda.is_bf16_supported()})
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    return env


def run_probe(p: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One probe in a fresh process; its result, or its failure with the output's tail."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", json.dumps(p)],
                              capture_output=True, text=True, timeout=timeout)
        stdout, output, error = proc.stdout, proc.stdout + proc.stderr, f"exit code {proc.returncode}"
        done = proc.returncode == 0
    except subprocess.TimeoutExpired as e:  # a result emitted before the hang still counts
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output, error, done = stdout, f"timed out after {timeout:.0f} s", True
    lines = [ln for ln in stdout.splitlines() if ln.startswith("PROBE_RESULT ")]
    if not (done and lines):
        return {"ok": False, "error": error, "output_tail": output[-3000:], "seconds": time.perf_counter() - t0}
    for ln in stdout.splitlines():  # the loop's own console lines (estimate, progress)
        if ln.startswith("run '") or ln.startswith("[probe]"):
            print("    " + ln)
    return {"ok": True, **json.loads(lines[-1][len("PROBE_RESULT "):]), "probe_seconds": time.perf_counter() - t0}


def summary(name: str, r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return f"{name}: FAILED ({r.get('error')})"
    if name == "embed":
        return f"{name}: {r['texts_per_s']:.0f} texts/s ({r['texts']} texts, {r['seconds']:.1f} s)"
    mem = ""
    if r.get("max_memory_allocated"):
        mem = (f", peak {r['max_memory_allocated'] / 2**30:.1f} GiB vs estimate "
               f"{r['memory_estimate']['total'] / 2**30:.1f} GiB ({r['memory_estimate_error']:+.0%})")
    goal = f" (goal {r['mfu_goal']:.0%}: {'met' if r['mfu_goal_met'] else 'NOT met'})" if "mfu_goal" in r else ""
    lora = (f" ({r['trainable_params'] / 1e6:.1f}M LoRA)" if r.get("trainable_params", r["params"]) < r["params"]
            else "")
    return (f"{name}: {r['params'] / 1e6:.0f}M params{lora}, ZeRO-{r['zero_stage']}, micro {r['micro_batch']} × "
            f"accum {r['grad_accum']}: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}{goal}{mem}; "
            f"loss {r['loss_first']:.3f} → {r['loss_last']:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every probe on the CPU at tiny sizes (a test runs this)")
    ap.add_argument("--recipe", default="paper", help="recipe whose sizes, batch and ZeRO settings are probed")
    ap.add_argument("--steps", type=int, default=0, help="steps per training probe (0: 20, dry run 3)")
    ap.add_argument("--only", default="", help="comma-separated probe names (default: all)")
    ap.add_argument("--probe-timeout", type=float, default=150.0, help="seconds per probe")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="paper-slm/paper-llm micro-batch instead of the recipe's (MFU against the per-GPU batch)")
    ap.add_argument("--embed-model", default="", help="embedding model directory (default: the recipe's)")
    ap.add_argument("--embed-random-weights", action="store_true",
                    help="embed with random weights of the model's architecture (when its weights cannot travel)")
    ap.add_argument("--out", default="", help="JSON path (default bench/results/gpu-<gpu>.json)")
    ap.add_argument("--probe", default="", help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args(argv)
    if a.probe:
        child(a.probe)
        return 0
    env = environment()
    print("== environment")
    for k, v in env.items():
        print(f"  {k}: {v}" if k != "nvidia_smi" else v)
    if not env["cuda_available"] and not a.dry_run:
        print("no CUDA device: run with --dry-run for the CPU check, or on a GPU machine", file=sys.stderr)
        return 2
    steps = a.steps or (3 if a.dry_run else 20)
    probes = plan(a.recipe, a.dry_run, steps, a.embed_model, a.embed_random_weights, a.micro_batch)
    if a.only:
        keep = set(a.only.split(","))
        probes = [p for p in probes if p["name"] in keep]
    slug = "dryrun" if a.dry_run else re.sub(r"[^a-z0-9]+", "-", env.get("gpu", "gpu").lower()).strip("-")
    out = a.out or os.path.join(HERE, "results", f"gpu-{slug}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    doc: dict[str, Any] = {"environment": env, "dry_run": a.dry_run, "recipe": a.recipe, "steps": steps,
                           "probes": {}}
    failed = 0
    for p in probes:
        print(f"== {p['name']}", flush=True)
        r = run_probe(p, a.probe_timeout)
        doc["probes"][p["name"]] = {"spec": p, **r}
        failed += not r["ok"]
        print("  " + summary(p["name"], r), flush=True)
        if not r["ok"]:
            print(r.get("output_tail", ""), flush=True)
        with open(out, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
    print(f"== wrote {out} ({len(probes) - failed}/{len(probes)} probes ok)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
