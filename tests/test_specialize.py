"""Specialization of every method on a tiny real run: loadable HF models, early stopping that
keeps the best valid checkpoint, KD at weight 0 = plain fine-tuning, and the config errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from spec_run import build_tiny_run, tiny_recipe

from slm.configkit import ConfigError
from slm.layout import RunLayout, domain_set, train_subset


@pytest.fixture(scope="module")
def recipe(ray_local, tmp_path_factory):
    return build_tiny_run(tmp_path_factory.getbasetemp() / "spec-run")


def _with(recipe, **spec):
    return dataclasses.replace(recipe, specialize=dataclasses.replace(recipe.specialize, **spec))


@pytest.fixture(scope="module")
def trials(recipe):
    """Every method specialized once (llm before d, so SLM-d reuses the llm trial as teacher)."""
    from slm.tune.grid import Trial, trial_uri
    from slm.tune.specialize import specialize_trial

    r = dataclasses.replace(recipe, sweep=dataclasses.replace(recipe.sweep, name="unit"))
    out = {}
    for m in ["slm", "llm", "d", "is", "mix", "pn", "nopt"]:
        t = Trial("numeric", m, 10, 1024, 0, 0.002)
        row = specialize_trial(r, t, trial_uri(r, t))
        out[m] = (t, row)
    return out


@pytest.mark.parametrize("method", ["slm", "llm", "d", "is", "mix", "pn", "nopt"])
def test_every_method_gives_a_loadable_hf_model(recipe, trials, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slm.tune.evaluation import evaluate
    from slm.tune.grid import size_params
    from slm.tune.results import RESULT_COLUMNS

    t, row = trials[method]
    assert not os.path.isabs(row["model_path"])            # stored relative to the run
    path = RunLayout(recipe.run_dir).resolve(row["model_path"])
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.vocab_size > 0
    size = recipe.pretrain.llm_size if method == "llm" else recipe.pretrain.slm_size
    n = sum(p.numel() for p in model.parameters())
    assert n == row["inference_params"] == size_params(recipe, size)
    # the published model's test loss is the one in the row (measured on the test shard)
    test = RunLayout(recipe.run_dir).shards(domain_set("numeric", "test"))
    assert evaluate(model, test) == pytest.approx(row["test_loss"], rel=1e-5)
    assert row["test_ppl"] == pytest.approx(math.exp(row["test_loss"]))
    assert set(RESULT_COLUMNS) <= set(row)
    info = json.loads(open(os.path.join(path, "training.json")).read())
    for key in ("domain", "method", "budget_steps", "domain_tokens", "seed", "lr", "expert",
                "valid_loss", "test_loss", "test_ppl", "best_step", "steps_run", "spec_flops",
                "spec_device_seconds", "pretrain_flops", "pretrain_device_seconds",
                "inference_params", "inference_flops_per_token", "data"):
        assert key in info, key
    assert info["data"]["train"].endswith(train_subset("numeric", 1024))
    assert 1 <= row["steps_run"] <= 10 and 0 <= row["best_step"] <= row["steps_run"]
    assert row["spec_flops"] > 0 and row["spec_device_seconds"] > 0
    # small-data LR: 1024 tokens <= small_data_tokens -> LR / small_data_lr_div
    assert row["lr"] == pytest.approx(0.002 / recipe.specialize.small_data_lr_div)
    if method == "nopt":
        assert row["pretrain_flops"] == 0
    else:
        assert row["pretrain_flops"] > 0


def test_method_specifics(recipe, trials):
    from slm.tune.starts import top_cluster

    layout = RunLayout(recipe.run_dir)
    subset = train_subset("numeric", 1024)
    assert trials["pn"][1]["expert"] == top_cluster(layout, recipe.kmeans.k_pn, subset)
    assert trials["mix"][1]["expert"] == top_cluster(layout, recipe.kmeans.k_mix, subset)
    # SLM-d counts its teacher's fine-tuning and both pretrainings
    d, llm, slm = trials["d"][1], trials["llm"][1], trials["slm"][1]
    assert d["spec_flops"] > llm["spec_flops"]
    assert d["pretrain_flops"] == pytest.approx(llm["pretrain_flops"] + slm["pretrain_flops"])
    info = json.loads(open(os.path.join(layout.resolve(d["model_path"]), "training.json")).read())
    assert info["teacher"] == llm["model_path"]
    assert d["teacher"] == trials["llm"][0].key()             # the dependency, in the results
    assert llm["inference_params"] > slm["inference_params"] == d["inference_params"]


def test_early_stopping_keeps_the_best_valid_checkpoint(recipe, tmp_path):
    """A far too high LR: valid loss rises after the first evaluations; the saved model is the
    best one, not the last."""
    from slm.tune.evaluation import evaluate, load_lm
    from slm.tune.grid import Trial, trial_uri
    from slm.tune.specialize import specialize_trial

    r = _with(recipe, eval_every=2, patience=2)
    t = Trial("numeric", "slm", 30, 2048, 0, 0.5)
    row = specialize_trial(r, t, trial_uri(r, t, sweep="early"))
    model_dir = RunLayout(r.run_dir).resolve(row["model_path"])
    info = json.loads(open(os.path.join(model_dir, "training.json")).read())
    losses = [v for _, v in info["history"]]
    assert row["valid_loss"] == pytest.approx(min(losses))
    assert losses[-1] > min(losses)                       # the last evaluation was worse
    assert row["steps_run"] < 30                          # patience ran out before the budget
    assert row["best_step"] < row["steps_run"]
    valid = RunLayout(r.run_dir).shards(domain_set("numeric", "valid"))
    assert evaluate(load_lm(model_dir), valid) == pytest.approx(row["valid_loss"], rel=1e-4)


def test_kd_at_weight_zero_equals_plain_fine_tuning(recipe, trials, tmp_path):
    """The slm trial is plain fine-tuning and the d trial KD at the recipe's weight (0.5), from
    the same start, data, LR, steps and seed; KD at weight 0 must retrace the slm trial."""
    from slm.tune.finetune import fine_tune
    from slm.tune.starts import pretrain_final

    layout = RunLayout(recipe.run_dir)

    def history(row):
        return json.loads(open(os.path.join(layout.resolve(row["model_path"]), "training.json")).read())["history"]

    (t, plain), (_, kd5) = trials["slm"], trials["d"]
    assert recipe.specialize.kd_weight == 0.5 and kd5["lr"] == plain["lr"]
    shards = {"train": train_subset("numeric", t.domain_tokens), "valid": domain_set("numeric", "valid")}
    kd0 = fine_tune(_with(recipe, kd_weight=0.0), pretrain_final(layout, "slm"), shards,
                    teacher=layout.resolve(trials["llm"][1]["model_path"]), workdir=str(tmp_path / "kd0"),
                    name="kd0", steps=t.budget_steps, lr=plain["lr"], seed=t.seed)
    assert [s for s, _ in kd0["history"]] == [s for s, _ in history(plain)]
    assert [v for _, v in kd0["history"]] == pytest.approx([v for _, v in history(plain)], rel=1e-6)
    assert kd0["valid_loss"] == pytest.approx(plain["valid_loss"], rel=1e-6)
    assert history(kd5)[-1][1] != pytest.approx(history(plain)[-1][1], rel=1e-6)
    assert kd0["flops"] > plain["spec_flops"]              # the teacher's forwards are counted


def test_mix_expert_selection_lowest_loss_and_all(recipe):
    from slm.tune.evaluation import evaluate, load_lm
    from slm.tune.grid import Trial, trial_uri
    from slm.tune.specialize import specialize_trial
    from slm.tune.starts import pretrain_final

    layout = RunLayout(recipe.run_dir)
    valid = layout.shards(domain_set("numeric", "valid"))
    before = [evaluate(load_lm(pretrain_final(layout, "mix", expert=i)), valid)
              for i in range(recipe.kmeans.k_mix)]
    t = Trial("numeric", "mix", 4, 1024, 0, 0.002)
    low = specialize_trial(_with(recipe, expert_selection="lowest_loss"), t,
                           trial_uri(recipe, t, sweep="mix-low"))
    assert low["expert"] == min(range(len(before)), key=before.__getitem__)
    # choosing the expert is paid for: every expert's valid evaluation, forward FLOPs per token
    # x the tokens it read, charged to the trial (total and to-best)
    from slm.models.flops import inference_flops_per_token
    from slm.tune.evaluation import evaluate_counted

    spec = recipe.specialize
    expected = 0.0
    for i in range(recipe.kmeans.k_mix):
        m = load_lm(pretrain_final(layout, "mix", expert=i))
        expected += inference_flops_per_token(m.config) * evaluate_counted(
            m, valid, spec.micro_batch, spec.eval_batches)[1]
    assert low["select_flops"] == pytest.approx(expected, rel=1e-9) and expected > 0
    assert low["select_device_seconds"] > 0
    assert low["spec_flops"] >= low["spec_flops_to_best"] >= low["select_flops"]
    steps = low["steps_run"]
    tuned = low["spec_flops"] - low["select_flops"]
    assert low["spec_flops_to_best"] - low["select_flops"] == pytest.approx(
        tuned * min(low["best_step"], steps) / steps, rel=1e-9)
    every = specialize_trial(_with(recipe, expert_selection="all"), t, trial_uri(recipe, t, sweep="mix-all"))
    assert every["expert"] in range(recipe.kmeans.k_mix)
    # every expert was fine-tuned (compared without low's selection evaluations)
    assert every["spec_flops"] > (low["spec_flops"] - low["select_flops"]) * 1.5
    assert every["select_flops"] == 0.0                     # nothing evaluated to choose


def test_inference_budget_errors_and_llm_exclusion(recipe, caplog):
    from slm.tune.grid import check_methods, size_params

    slm_p = size_params(recipe, recipe.pretrain.slm_size)
    with pytest.raises(ConfigError, match="inference_budget"):
        check_methods(_with(recipe, inference_budget=slm_p - 1), ["slm", "llm"])
    with caplog.at_level("WARNING"):
        kept = check_methods(_with(recipe, inference_budget=slm_p), ["slm", "llm", "d"])
    assert kept == ["slm", "d"] and "method 'llm' excluded" in caplog.text
    with pytest.raises(ConfigError, match="unknown method 'big'"):
        check_methods(recipe, ["slm", "big"])


@pytest.mark.parametrize("override,field", [
    ({"sweep.budgets": "[0]"}, "budgets"),
    ({"sweep.budgets": "[-5]"}, "budgets"),
    ({"sweep.methods": "[slm, nosuch]"}, "methods"),
    ({"specialize.patience": "0"}, "patience"),
    ({"specialize.expert_selection": "random"}, "expert_selection"),
])
def test_bad_sweep_config_names_the_field(tmp_path, override, field):
    import yaml

    from slm.config import load_recipe
    from slm.configkit import to_dict

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_recipe(tmp_path))))
    with pytest.raises(ConfigError, match=field):
        load_recipe(str(path), override)


def test_trials_from_a_pretraining_level_start_from_that_levels_models(recipe, trials):
    """A trial at pretraining level 0.5 starts from the models saved at half their steps (the
    experts' for SLM-mix, the domain's own at the trial's size for SLM-is, the materialised
    expert for SLM-pn) and
    is charged the pretraining to that level only."""
    from slm.stage import manifest
    from slm.tune.grid import Trial, trial_uri
    from slm.tune.specialize import specialize_trial

    layout = RunLayout(recipe.run_dir)
    r = dataclasses.replace(recipe, sweep=dataclasses.replace(recipe.sweep, name="unit"))
    for m, runs in (("slm", [("slm", "")]), ("is", [("is", "numeric-1024")]),
                    ("mix", [("mix", f"expert-{i}") for i in range(recipe.kmeans.k_mix)]),
                    ("pn", [("pn", "")])):
        t = Trial("numeric", m, 10, 1024, 0, 0.002, 0.5)
        row = specialize_trial(r, t, trial_uri(r, t))
        level = sum(manifest(layout.pretrain_level(f, s, 0.5))["costs"]["flops"] for f, s in runs)
        assert row["pretrain_level"] == 0.5 and row["trial"].endswith("--p0.5")
        assert row["pretrain_flops"] == pytest.approx(level)
        assert 0 < row["pretrain_flops"] < trials[m][1]["pretrain_flops"]
        assert trials[m][1]["pretrain_level"] == 1.0
        # another start than the final model's trial: another fine-tuned model
        assert row["valid_loss"] != trials[m][1]["valid_loss"]
        # it started from (and is fingerprinted on) those runs' level models: for SLM-is the
        # run of the trial's domain *and* size
        inputs = manifest(trial_uri(r, t))["inputs"]
        assert {layout.relative(layout.pretrain_level(f, s, 0.5)) for f, s in runs} == set(inputs)


def test_lora_trial_publishes_the_merged_plain_model_and_what_it_trained(recipe):
    """specialize.lora.methods [llm] (the paper's App. F): the llm trial trains rank-4 adapters
    on c_attn of the frozen pretrained LLM; it publishes the merged plain model (the served
    size, no adapter files, its test loss the row's), and its row says what trained and costs
    LoRA's FLOPs per token (4 per frozen weight, 6 per adapter weight)."""
    from transformers import AutoModelForCausalLM

    from slm.models.flops import train_flops_per_token
    from slm.models.lm import lm_config, lora_param_count
    from slm.tune.config import LoraConfig
    from slm.tune.evaluation import evaluate
    from slm.tune.grid import Trial, trial_uri
    from slm.tune.specialize import specialize_trial

    lora = LoraConfig(methods=["llm"], rank=4, alpha=8.0, target_modules=["c_attn"])
    r = dataclasses.replace(_with(recipe, lora=lora), sweep=dataclasses.replace(recipe.sweep, name="lora"))
    t = Trial("numeric", "llm", 10, 1024, 0, 0.002)
    row = specialize_trial(r, t, trial_uri(r, t))
    path = RunLayout(r.run_dir).resolve(row["model_path"])
    assert not os.path.exists(os.path.join(path, "adapter_config.json"))
    model = AutoModelForCausalLM.from_pretrained(path)
    config = lm_config(recipe.pretrain.llm_size, model.config.vocab_size, recipe.data.seq_len)
    adapters = lora_param_count(config, ["c_attn"], 4)
    assert row["lora_rank"] == 4 and row["trainable_params"] == adapters
    assert sum(p.numel() for p in model.parameters()) == row["inference_params"]
    test = RunLayout(r.run_dir).shards(domain_set("numeric", "test"))
    assert evaluate(model, test) == pytest.approx(row["test_loss"], rel=1e-4)
    spec = r.specialize
    tokens = row["steps_run"] * spec.micro_batch * spec.grad_accum * recipe.data.seq_len
    per_token = train_flops_per_token(config, recipe.data.seq_len, lora_params=adapters)
    assert row["spec_flops"] == pytest.approx(per_token * tokens, rel=1e-12)
    assert per_token < train_flops_per_token(config, recipe.data.seq_len)
