"""LoRA fine-tuning (models/lora.py, recipe ``specialize.lora``): the recipe section and its
errors, the adapters' count and FLOPs against the built model and torch's FlopCounterMode, a
LoRA run of the one training loop that trains only the adapters and exports the merged plain
model (loaded without peft, same logits), exact resume of a LoRA run, and a target the model
does not have refused before training. The loop runs in this process (models/probe.py: a
1-process gloo group, real DeepSpeed); no Ray is started."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray.train
import torch
from test_flops import counted  # the FlopCounterMode set-up of the dense formula's test
from transformers import AutoModelForCausalLM

from slm.config import load_recipe
from slm.configkit import ConfigError
from slm.errors import StageError
from slm.models import lora
from slm.models.config import LORA_TARGETS
from slm.models.families import FamilySpec
from slm.models.flops import train_flops, train_flops_per_token
from slm.models.lm import count_params, lm_config, lora_param_count, make_lm
from slm.models.loop_config import LoraSection, TrainLoopConfig
from slm.models.probe import probe_config, random_rows, train_in_process
from slm.models.runtime import LocalRuntime, local_process_group
from slm.models.train import Trainer
from slm.tune.config import LoraConfig
from slm.tune.finetune import lora_section

SEQ, VOCAB = 16, 128
TINY = FamilySpec("slm", "tiny", VOCAB, SEQ)
ADAPTERS = LoraSection(rank=4, alpha=8.0, target_modules=["c_attn", "c_fc"])


def sets() -> dict:
    return {"train": random_rows(64, SEQ, VOCAB, seed=1), "valid": random_rows(24, SEQ, VOCAB, seed=2)}


@pytest.fixture
def init_dir(tmp_path) -> str:
    """A 'pretrained' tiny model to fine-tune (seeded, so every test starts from the same one)."""
    d = str(tmp_path / "init")
    make_lm(lm_config("tiny", VOCAB, SEQ), seed=5).save_pretrained(d)
    return d


def lora_config(tmp_path, init_dir: str, name: str, steps: int = 4, lora_cfg: LoraSection | None = ADAPTERS,
                **kw) -> TrainLoopConfig:
    return probe_config(TINY, run_uri=str(tmp_path / name), steps=steps, micro_batch=8, lr=1e-2,
                        init_from=init_dir, lora=lora_cfg, **kw)


# ---- the recipe ---------------------------------------------------------------------------------

def test_recipes_choose_which_methods_fine_tune_with_lora():
    assert load_recipe("demo").specialize.lora.methods == []  # the demo trains every weight
    paper = load_recipe("paper").specialize.lora
    assert paper.methods == ["llm"] and paper.rank == 64 and paper.target_modules == ["c_attn"]
    # App. F's "5M trainable parameters" of the 771M LLM
    assert lora_param_count(lm_config("paper-llm", 32000, 1024), paper.target_modules, paper.rank) == 5_046_272
    assert lora_section(paper, "llm") == LoraSection(rank=64, alpha=64.0, dropout=0.0, target_modules=["c_attn"])
    assert lora_section(paper, "slm") is None


@pytest.mark.parametrize("override,message", [
    ({"specialize.lora.rank": 0}, r"specialize.lora: field 'rank' must be > 0"),
    ({"specialize.lora.alpha": -1}, r"specialize.lora: field 'alpha' must be > 0"),
    ({"specialize.lora.dropout": 1.0}, r"specialize.lora: field 'dropout' is 1.0; use a probability in \[0, 1\)"),
    ({"specialize.lora.methods": "[llm, gpt]"}, r"specialize.lora: field 'methods' has unknown method 'gpt'; known: slm, llm"),
    ({"specialize.lora.target_modules": "[]"}, r"specialize.lora: field 'target_modules' is empty"),
    ({"specialize.lora.target_modules": "[c_attn, q_proj]"},
     r"specialize.lora: field 'target_modules' has 'q_proj', .* adaptable modules are c_attn, c_proj, c_fc"),
])
def test_bad_lora_settings_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("demo", override)


# ---- adapters and FLOPs --------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [["c_attn"], ["c_proj"], ["c_attn", "c_proj", "c_fc"]])
def test_adapter_count_and_target_table_match_the_built_model(targets):
    config = lm_config((2, 32, 2, 48), VOCAB, SEQ)
    model = make_lm(config, seed=0)
    assert set(lora.adaptable_modules(model)) == set(LORA_TARGETS)  # the recipe's check = the model's
    peft_model = lora.adapt(model, LoraSection(rank=3, target_modules=targets), seed=0)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)   # only the adapters train
    assert lora.trainable_params(peft_model) == lora_param_count(config, targets, 3)


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"]])
def test_lora_flops_formula_matches_the_flop_counter(targets):
    """4 FLOPs per frozen weight and 6 per adapter weight per token, against the matmuls torch
    runs (non-causal attention and SDPA's QKᵀ recomputation, as in tests/test_flops.py). The one
    difference is what the formula counts and autograd skips (models/flops.py): below the first
    adapter nothing needs a gradient, here layer 0's c_attn input gradient, 2·3d² + 2·r·d per
    token (frozen weight and adapter A)."""
    config, rank, rows = lm_config((2, 32, 2, 64), VOCAB, SEQ), 4, 3
    model = lora.adapt(make_lm(config, seed=0), LoraSection(rank=rank, target_modules=targets), seed=0)
    n = lora.trainable_params(model)
    x = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(0))
    tokens, d = rows * SEQ, config.n_embd

    def step():
        model(input_ids=x).logits.sum().backward()

    recompute = 2 * config.n_layer * SEQ * d * tokens
    skipped = (2 * d * 3 * d + 2 * rank * d) * tokens
    formula = train_flops("lm", config, tokens, seq_len=SEQ, causal=False, lora_params=n)
    assert counted(step) == pytest.approx(formula + recompute - skipped, rel=1e-12)


# ---- a LoRA run of the one training loop ----------------------------------------------------------

def test_lora_run_trains_only_the_adapters_and_exports_the_merged_plain_model(tmp_path, init_dir):
    trainer, reports = train_in_process(lora_config(tmp_path, init_dir, "run"), sets())
    engine_model = trainer.engine.module
    n = lora_param_count(lm_config("tiny", VOCAB, SEQ), ADAPTERS.target_modules, ADAPTERS.rank)

    # the frozen model's weights are the starting model's; the adapters moved
    start = AutoModelForCausalLM.from_pretrained(init_dir)
    base = engine_model.get_base_model()
    assert torch.equal(base.transformer.h[0].attn.c_attn.base_layer.weight, start.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(base.transformer.wte.weight, start.transformer.wte.weight)
    assert base.transformer.h[0].attn.c_attn.lora_B["default"].weight.abs().max() > 0  # B starts at 0

    # costs: the served model's size, the adapters as what trained, LoRA's FLOPs per token
    costs = trainer.costs
    assert costs.params == count_params(start) and costs.trainable_params == n == trainer.family.lora_params
    per_token = train_flops_per_token(lm_config("tiny", VOCAB, SEQ), SEQ, lora_params=n)
    assert costs.flops_per_token == per_token and costs.flops == pytest.approx(per_token * costs.tokens, rel=1e-12)
    assert per_token < train_flops_per_token(lm_config("tiny", VOCAB, SEQ), SEQ)
    # the memory estimate: frozen weights hold no gradient or Adam state (fp32, ZeRO-1, 1 worker)
    assert trainer.memory.model_states == 4 * (costs.params - n) + 16 * n

    export = tmp_path / "run" / "probe" / "step=00000004" / "export"
    assert sorted(os.listdir(export)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert "peft" not in json.loads((export / "config.json").read_text()).get("architectures", [""])[0].lower()

    # the exported model, loaded where peft cannot be imported, gives the adapted model's logits
    ids = torch.from_numpy(sets()["valid"]["input_ids"][:4]).long()
    engine_model.eval()
    with torch.no_grad():
        adapted = engine_model(input_ids=ids).logits
        started = start(input_ids=ids).logits
    np.save(tmp_path / "ids.npy", ids.numpy())
    script = ("import sys; sys.modules['peft'] = None\n"  # any `import peft` now fails
              "import numpy as np, torch\n"
              "from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(export)!r})\n"
              f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))\n"
              "with torch.no_grad():\n"
              f"    np.save({str(tmp_path / 'logits.npy')!r}, m(input_ids=ids).logits.numpy())\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    exported = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    assert torch.allclose(exported, adapted, atol=1e-5), (exported - adapted).abs().max()
    assert (adapted - started).abs().max() > 1e-2  # fine-tuning changed the outputs


class KeptCheckpoints(LocalRuntime):
    """The in-process runtime, resumable: it keeps what the Checkpointer reports (DeepSpeed's
    state included) and hands the newest back to the next Trainer, as Ray Train does."""

    resumable = True

    def checkpoint(self):
        return ray.train.Checkpoint(self.last_checkpoint) if self.last_checkpoint else None


def test_lora_run_resumes_exactly_and_only_with_its_adapters(tmp_path, init_dir):
    """A LoRA run stopped at step 3 and resumed ends like the uninterrupted one (fp32 on the
    CPU, the same floating-point operations: equal to 1e-6); its checkpoint is refused by the
    same run without LoRA (the resume signature holds the adapters' settings)."""
    local_process_group()
    data = sets()
    full_cfg = lora_config(tmp_path, init_dir, "full", steps=6)
    full = KeptCheckpoints(data, full_cfg.logging.run_uri)
    Trainer(full_cfg, full).fit()

    cfg = lora_config(tmp_path, init_dir, "split", steps=6)
    split = KeptCheckpoints(data, cfg.logging.run_uri)
    Trainer(dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, stop_at=3)), split).fit()
    assert split.last_metrics["step"] == 3
    Trainer(cfg, split).fit()
    assert split.last_metrics["start_step"] == 3 and split.last_metrics["attempts"] == 2
    for key in ("train/loss", "valid/loss"):
        assert split.last_metrics[key] == pytest.approx(full.last_metrics[key], abs=1e-6)
    a = AutoModelForCausalLM.from_pretrained(os.path.join(full.last_checkpoint, "export")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(os.path.join(split.last_checkpoint, "export")).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    plain = lora_config(tmp_path, init_dir, "split", steps=6, lora_cfg=None)
    with pytest.raises(StageError, match=r"cannot be resumed: lora: checkpoint=\{"):
        Trainer(plain, split).fit()


def test_a_target_the_model_does_not_have_is_refused_before_training(tmp_path, init_dir):
    local_process_group()
    bad = dataclasses.replace(ADAPTERS, target_modules=["c_attn", "q_proj"])
    cfg = lora_config(tmp_path, init_dir, "bad", lora_cfg=bad)
    with pytest.raises(ConfigError, match=r"field 'specialize.lora.target_modules' has 'q_proj', which the "
                                          r"model \(GPT2LMHeadModel\) does not have; its modules that take "
                                          r"adapters are: c_attn, c_fc, c_proj"):
        Trainer(cfg, LocalRuntime(sets(), cfg.logging.run_uri))
    assert not (tmp_path / "bad").exists()  # nothing ran, nothing was written


def test_a_lora_recipe_section_reaches_the_loop_config():
    section = lora_section(LoraConfig(methods=["slm", "d"], rank=8, alpha=16.0, dropout=0.1,
                                      target_modules=["c_fc"]), "d")
    cfg = probe_config(TINY, run_uri="/tmp/x", steps=1, micro_batch=1, lora=section)
    back = TrainLoopConfig.from_dict(cfg.to_dict())  # what crosses the Ray boundary
    assert back.lora == LoraSection(rank=8, alpha=16.0, dropout=0.1, target_modules=["c_fc"])
