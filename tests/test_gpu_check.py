"""scripts/gpu_check.sh in its CPU dry run (tiny sizes, every probe), so the prepared GPU check
cannot rot while no GPU is at hand: it must run every probe and write its JSON."""

from __future__ import annotations

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_runs_every_probe_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu-dryrun.json"
    env = {**os.environ, "PYTHON": os.path.join(ROOT, ".venv", "bin", "python"), "GPU_CHECK_SECONDS": "1500"}
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--probe-timeout", "400",
                           "--embed-random-weights"], capture_output=True, text=True, env=env, timeout=1600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] and doc["environment"]["torch"]
    probes = doc["probes"]
    assert set(probes) == {"demo-zero1", "demo-zero3", "paper-slm", "paper-llm", "finetune", "finetune-lora",
                           "embed"}
    assert all(p["ok"] for p in probes.values()), {k: p.get("error") for k, p in probes.items()}
    for name in ("demo-zero1", "demo-zero3", "paper-slm", "paper-llm"):
        p = probes[name]
        assert p["steps"] == doc["steps"] and p["tokens_per_s"] > 0 and p["memory_estimate"]["total"] > 0
    assert probes["demo-zero3"]["zero_stage"] == 3
    assert probes["finetune"]["steps"] == 1 and probes["embed"]["texts_per_s"] > 0
    assert probes["embed"]["random_weights"]  # the path taken where the weights cannot travel
    lora = probes["finetune-lora"]  # the paper recipe's LLM with LoRA (App. F)
    assert 0 < lora["trainable_params"] < lora["params"] and lora["steps"] == doc["steps"]
    assert "model.safetensors" in lora["export_files"] and "adapter_config.json" not in lora["export_files"]
    assert "paper-llm" in proc.stdout and "MFU" in proc.stdout
