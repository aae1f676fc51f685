"""`slm estimate` (slm/estimate.py) on the built-in recipes: how FLOPs become GPU-hours, wall
time and price on a cluster, measured MFU taken from bench results, bad clusters refused.
(The estimate against the FLOPs a real run recorded is in test_pretrain_families.py, on the
run that test module trains.)"""

from __future__ import annotations

import json
import math

import pytest

from slm.cli import main
from slm.cluster.nodes import NODE_TYPES, node_type
from slm.config import load_recipe
from slm.configkit import ConfigError
from slm.errors import InputError
import slm.estimate as estimate_module
from slm.estimate import DEFAULT_MFU, Cluster, estimate, measured_mfu
from slm.models.flops import DEVICE_PEAK_FLOPS, train_flops_per_token
from slm.models.lm import lm_config, lora_param_count

NONE = "/nonexistent/gpu-*.json"  # no measured MFU: the default applies


def _stages(e):
    return {s["stage"]: s for s in e["stages"]}


def test_gpu_hours_are_flops_over_peak_times_mfu_and_wall_time_follows_the_gpus():
    paper = load_recipe("paper")
    small = estimate(paper, Cluster(node_type("p5.48xlarge"), 1), results_glob=NONE)
    big = estimate(paper, Cluster(node_type("p5.48xlarge"), 4), results_glob=NONE)
    peak = DEVICE_PEAK_FLOPS["H100"]["bf16"]
    for s in small["stages"]:
        assert s["mfu"] == DEFAULT_MFU and s["mfu_source"] == "default"
        assert s["device_hours"] == pytest.approx(s["flops"] / (peak * DEFAULT_MFU) / 3600)
    a, b = _stages(small), _stages(big)
    # 8 workers per run: one run at a time on 8 GPUs, four SLM-mix experts at once on 32
    assert a["pretrain llm"]["wall_hours"] == pytest.approx(a["pretrain llm"]["device_hours"] / 8)
    assert b["pretrain mix"]["device_hours"] == pytest.approx(a["pretrain mix"]["device_hours"])
    assert b["pretrain mix"]["wall_hours"] == pytest.approx(a["pretrain mix"]["wall_hours"] / 4)
    assert a["pretrain mix"]["runs"] == paper.kmeans.k_mix
    # SLM-is: one run per domain and domain size (its resampling follows that size's subset)
    assert a["pretrain is"]["runs"] == small["domains"] * len(paper.data.domain_train_tokens) == 3
    # per token the 771M LLM costs over 5x the 126M SLM (the paper recipe matches the families'
    # GPU-hours, so the LLM sees fewer tokens and its total is only ~1.7x)
    per_token = {f: a[f"pretrain {f}"]["flops"] / a[f"pretrain {f}"]["tokens"] for f in ("llm", "slm")}
    assert per_token["llm"] > 5 * per_token["slm"]
    assert small["total"]["flops"] == pytest.approx(sum(s["flops"] for s in small["stages"]))


def test_price_is_busy_node_hours_times_the_node_price():
    e = estimate(load_recipe("paper"), Cluster(node_type("p4de.24xlarge"), 2, price_per_hour=40.0),
                 results_glob=NONE)
    for s in e["stages"]:
        assert s["price"] == pytest.approx(s["device_hours"] / 8 * 40.0)
    assert e["total"]["price"] == pytest.approx(e["total"]["device_hours"] / 8 * 40.0)


def test_measured_mfu_from_gpu_bench_results(tmp_path):
    (tmp_path / "gpu-h100.json").write_text(json.dumps(
        {"device": "NVIDIA H100 80GB HBM3",
         "throughput": [{"size": "paper-slm", "mfu": 0.45, "tokens_per_s": 1e6},
                        {"size": "paper-llm", "mfu": 0.52}]}))
    pattern = str(tmp_path / "gpu-*.json")
    assert measured_mfu(pattern) == {"paper-slm": (0.45, "gpu-h100.json"), "paper-llm": (0.52, "gpu-h100.json")}
    e = _stages(estimate(load_recipe("paper"), Cluster(node_type("H100", 8), 1), results_glob=pattern))
    assert e["pretrain slm"]["mfu"] == 0.45 and e["pretrain llm"]["mfu"] == 0.52
    assert e["pretrain slm"]["mfu_source"] == "gpu-h100.json"
    forced = _stages(estimate(load_recipe("paper"), Cluster(node_type("H100", 8), 1), mfu=0.4,
                              results_glob=pattern))
    assert forced["pretrain slm"]["mfu"] == 0.4 and forced["pretrain slm"]["mfu_source"] == "--mfu"


def test_measured_mfu_reads_gpu_check_probes_at_the_recipes_micro_batch(tmp_path):
    """bench/gpu_check.py's own layout (probes.<name>.spec.size); the probe at the recipe's
    micro-batch wins over one at another (MFU grows with the per-GPU batch)."""
    def probe(size, micro, mfu):
        return {"ok": True, "spec": {"size": size, "micro": micro}, "micro_batch": micro, "mfu": mfu}
    (tmp_path / "gpu-nvidia-h200.json").write_text(json.dumps(
        {"probes": {"paper-slm": probe("paper-slm", 7, 0.13), "paper-llm": probe("paper-llm", 7, 0.31)},
         "zz_micro_batch_28": {"paper-slm": probe("paper-slm", 28, 0.20)}}))
    pattern = str(tmp_path / "gpu-*.json")
    assert measured_mfu(pattern, micro_batch=7)["paper-slm"] == (0.13, "gpu-nvidia-h200.json")
    assert measured_mfu(pattern, micro_batch=28)["paper-slm"][0] == 0.20
    e = _stages(estimate(load_recipe("paper"), Cluster(node_type("H100", 8), 1), results_glob=pattern))
    assert load_recipe("paper").pretrain.train.micro_batch == 7
    assert e["pretrain slm"]["mfu"] == 0.13 and e["pretrain llm"]["mfu"] == 0.31


def test_a_cluster_too_small_or_unknown_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        estimate(load_recipe("paper"), Cluster(node_type("g6e.xlarge"), 4), results_glob=NONE)
    assert "pretrain slm needs 8 GPUs per run" in str(e.value) and "num_workers" in str(e.value)
    with pytest.raises(InputError) as e:
        node_type("p3.2xlarge")
    assert "unknown node type 'p3.2xlarge'" in str(e.value) and "p5.48xlarge" in str(e.value)
    assert all(n.gpu in DEVICE_PEAK_FLOPS for n in NODE_TYPES.values())


def test_sweep_counts_the_grid_and_the_teacher():
    demo = load_recipe("demo")
    e = _stages(estimate(demo, Cluster(node_type("L4", 1), 1), results_glob=NONE))
    sw = demo.sweep
    # one trial per pretraining level of every method built from pretrained families
    assert e["specialize sweep"]["runs"] == (len(sw.methods) * len(sw.budgets) * len(sw.domain_tokens)
                                             * len(sw.seeds) * len(demo.pretrain.levels))
    no_d = _stages(estimate(load_recipe("demo", {"sweep.methods": "[slm, llm, is, mix, pn]"}),
                            Cluster(node_type("L4", 1), 1), results_glob=NONE))
    slm_only = _stages(estimate(load_recipe("demo", {"sweep.methods": "[slm]"}),
                                Cluster(node_type("L4", 1), 1), results_glob=NONE))
    # SLM-d = an SLM fine-tuning + the LLM teacher's forward on the same tokens
    d_flops = e["specialize sweep"]["flops"] - no_d["specialize sweep"]["flops"]
    assert d_flops > slm_only["specialize sweep"]["flops"]


def test_sweep_counts_levels_and_pretraining_seeds_of_pretrained_methods_only():
    """The study's grid: SLM-nopt (nothing pretrained) is one trial per (domain, budget, size,
    seed); every other method one per pretraining level and pretraining seed too."""
    study = load_recipe("study")
    e = _stages(estimate(study, Cluster(node_type("L4", 1), 1), results_glob=NONE))
    sw, p = study.sweep, study.pretrain
    per_point = len(sw.domains) * len(sw.budgets) * len(sw.domain_tokens) * len(sw.seeds)
    pretrained = [m for m in sw.methods if m != "nopt"]
    assert len(p.levels) == 3 and len(p.seeds) == 2 and "nopt" in sw.methods
    expected = per_point * (len(pretrained) * len(p.levels) * len(p.seeds) + 1)
    assert e["specialize sweep"]["runs"] == expected == 592


def test_sweep_counts_lora_trials_at_loras_flops_per_token():
    """The paper recipe fine-tunes the LLM with LoRA (App. F): its trials cost 4 FLOPs per
    frozen weight + 6 per adapter weight per token instead of 6 per weight."""
    cluster = Cluster(node_type("p5.48xlarge"), 1)
    llm = {"sweep.methods": "[llm]"}
    lora = _stages(estimate(load_recipe("paper", llm), cluster, results_glob=NONE))["specialize sweep"]
    full = _stages(estimate(load_recipe("paper", {**llm, "specialize.lora.methods": "[]"}), cluster,
                            results_glob=NONE))["specialize sweep"]
    config = lm_config("paper-llm", 32000, 1024)
    adapters = lora_param_count(config, ["c_attn"], 64)
    ratio = train_flops_per_token(config, 1024, lora_params=adapters) / train_flops_per_token(config, 1024)
    assert lora["flops"] == pytest.approx(full["flops"] * ratio, rel=1e-12) and 0.6 < ratio < 0.75
    assert lora["tokens"] == full["tokens"] and any("5,046,272 trainable" in n for n in lora["notes"])


def test_cli_prints_the_table_and_json(capsys, monkeypatch):
    monkeypatch.setattr(estimate_module, "RESULTS_GLOB", NONE)  # not the repo's measured GPU results
    assert main(["estimate", "--recipe", "paper", "--nodes", "2", "--node-type", "a3-highgpu-8g",
                 "--price-per-hour", "88", "--domains", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 x a3-highgpu-8g (16 x H100" in out and "domains 3 (--domains)" in out
    assert "pretrain llm" in out and "price" in out and "MFU 'default' = 30%" in out
    assert main(["estimate", "--recipe", "demo", "--node-type", "L4", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["gpus"] == 1 and math.isclose(e["total"]["flops"], sum(s["flops"] for s in e["stages"]))
    assert main(["estimate", "--recipe", "paper", "--node-type", "nope"]) == 2
    assert "unknown node type 'nope'" in capsys.readouterr().err
