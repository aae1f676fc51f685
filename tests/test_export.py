"""`slm export`: the exported directory is a plain Hugging Face model (real tiny run)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_run import build_tiny_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm.cli import main
from slm.deploy.export import export_model, model_card
from slm.errors import InputError
from slm.layout import RunLayout
from slm.tune.methods import get_method


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_run(str(tmp_path_factory.mktemp("run")))


def test_export_loads_with_auto_classes_and_matches_logits(tiny, tmp_path):
    out = str(tmp_path / "code-export")
    assert main(["export", "--run", tiny["root"], "--domain", "code", "--out", out]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md",
              "generation_config.json", "manifest.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("def encode(self, o):\n    return", return_tensors="pt")
    ref = tiny["models"]["code"].eval()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ref(**ids).logits)
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
        ref_gen = ref.generate(**ids, max_new_tokens=8, do_sample=False,
                               pad_token_id=tok.eos_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert torch.equal(gen, ref_gen)
    assert isinstance(tok.decode(gen[0]), str)


def test_model_card_records_training_and_missing_keys(tiny, tmp_path):
    out = export_model(tiny["root"], "legal", out=str(tmp_path / "legal"))
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    info = json.load(open(os.path.join(out, "training.json")))
    assert f"test perplexity: {info['test_ppl']:.4g}" in card
    assert "method `slm`" in card and "40 steps" in card and "40 documents" in card
    assert "specialization compute: not recorded" in card  # absent key, no crash
    assert "pretraining compute: 1.500e+12 FLOPs" in card
    assert json.load(open(os.path.join(out, "manifest.json")))["method"] == "slm"


def test_export_errors_name_the_fix(tiny, capsys):
    with pytest.raises(InputError, match="domains there: code, legal"):
        export_model(tiny["root"], "nope")
    with pytest.raises(InputError, match="available: slm"):
        export_model(tiny["root"], "code", method="mix")
    assert main(["export", "--run", tiny["root"], "--domain", "nope"]) == 2
    assert "error: no specialized models for domain 'nope'" in capsys.readouterr().err


def test_model_card_describes_the_method_from_the_registry():
    card = model_card("code", "d", {"data": {"train": "/elsewhere/run/data/shards/x"}}, {},
                      RunLayout("/elsewhere/run"))
    assert get_method("d").description in card and "distilled from the fine-tuned LLM" in card
    assert "domain data only" not in card and "SLM-d" in card
    assert "- train: data/shards/x" in card and "/elsewhere" not in card  # run-relative
    assert "see the slm documentation" in model_card("code", "no-such-method", {}, {})
