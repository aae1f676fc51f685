"""The plain GPT-2 LM builder and the losses (slm.models.lm, slm.models.losses)."""

from __future__ import annotations

import pytest
import torch
from slm.models.config import SIZES
from slm.models.lm import count_params, lm_config, lm_param_count, make_lm
from slm.models.losses import kd_loss, lm_loss
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from slm.configkit import ConfigError

TINY = (2, 32, 2, 64)  # layers, d_model, heads, d_ff
VOCAB, SEQ = 100, 16


def test_lm_config_fields_follow_the_preset():
    cfg = lm_config("demo-slm", vocab_size=VOCAB, seq_len=SEQ, bos_token_id=0, eos_token_id=0)
    layers, d, heads, d_ff = SIZES["demo-slm"]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner) == (layers, d, heads, d_ff)
    assert (cfg.vocab_size, cfg.n_positions) == (VOCAB, SEQ)
    assert cfg.tie_word_embeddings is True
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.0, 0.0, 0.0)
    assert cfg.activation_function.startswith("gelu")
    assert (cfg.bos_token_id, cfg.eos_token_id) == (0, 0)
    assert make_lm(cfg).config._attn_implementation == "sdpa"


def test_bad_sizes_and_token_ids_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown model size 'huge'"):
        lm_config("huge", VOCAB, SEQ)
    with pytest.raises(ConfigError, match="not divisible by heads"):
        lm_config((2, 30, 4, 64), VOCAB, SEQ)
    with pytest.raises(ConfigError, match="eos_token_id=500"):
        lm_config(TINY, VOCAB, SEQ, eos_token_id=500)
    with pytest.raises(ConfigError, match="needs vocab_size and seq_len"):
        make_lm("tiny")


def test_make_lm_seed_is_reproducible_and_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = make_lm(TINY, VOCAB, SEQ, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = make_lm(TINY, VOCAB, SEQ, seed=7)
    c = make_lm(TINY, VOCAB, SEQ, seed=8)
    wa, wb, wc = (m.transformer.h[0].mlp.c_fc.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.lm_head.weight.data_ptr() == a.transformer.wte.weight.data_ptr()  # tied


def test_param_counts_closed_form_match_the_model():
    model = make_lm(TINY, VOCAB, SEQ, seed=0)
    cfg = model.config
    assert count_params(model) == lm_param_count(cfg) == sum(p.numel() for p in model.parameters())
    # non-embedding = total minus token and position tables (tied head counted once, in wte)
    assert count_params(model, non_embedding=True) == lm_param_count(cfg, True) == lm_param_count(cfg) - (VOCAB + SEQ) * 32


def test_paper_presets_are_close_to_the_paper_sizes():
    # paper.md §6: 126M and 771M at a 32k vocab. GPT-2 adds learned position embeddings and
    # biases/LayerNorms; the paper's count is 7·12d² + V·d. We land within 4% of the paper.
    slm = lm_param_count(lm_config("paper-slm", 32000, 1024))
    llm = lm_param_count(lm_config("paper-llm", 32000, 1024))
    assert abs(slm - 126e6) / 126e6 < 0.04, slm
    assert abs(llm - 771e6) / 771e6 < 0.04, llm
    d = 1024
    assert lm_param_count(lm_config("paper-slm", 32000, 1024), True) - 7 * 12 * d * d == 7 * (9 * d + 4096) + 2 * d  # biases + LayerNorms


def test_save_pretrained_round_trips_through_auto_model(tmp_path):
    model = make_lm(TINY, VOCAB, SEQ, seed=1).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GPT2LMHeadModel)
    x = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, loaded(x).logits, atol=1e-6)


def test_lm_loss_matches_hf_shifted_loss_and_counts_tokens():
    model = make_lm(TINY, VOCAB, SEQ, seed=2).eval()
    x = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, labels=x)
    loss, n = lm_loss(out.logits, x)
    assert n == 4 * (SEQ - 1)
    assert torch.allclose(loss, out.loss, atol=1e-6)
    # by hand: position t predicts token t+1
    logp = torch.log_softmax(out.logits.float(), -1)
    manual = -logp[:, :-1].gather(-1, x[:, 1:, None]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)


def test_kd_loss_weight_zero_is_exactly_the_domain_loss_and_kl_is_correct():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    student = torch.randn(2, SEQ, VOCAB, generator=g, requires_grad=True)
    teacher = torch.randn(2, SEQ, VOCAB, generator=g)
    ce, _ = lm_loss(student, x)
    assert torch.equal(kd_loss(student, teacher, x, weight=0.0, temperature=2.0), ce)
    # same logits -> KL = 0, so the loss is (1 - w)·CE
    same = kd_loss(student, student.detach(), x, weight=0.3, temperature=2.0)
    assert torch.allclose(same, 0.7 * ce, atol=1e-6)
    # explicit KL(p_T || q_T) on the shifted positions, ×T²
    T, w = 2.0, 0.5
    p = torch.softmax(teacher[:, :-1] / T, -1)
    q = torch.softmax(student[:, :-1] / T, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    got = kd_loss(student, teacher, x, weight=w, temperature=T)
    assert torch.allclose(got, (1 - w) * ce + w * T * T * kl, atol=1e-5)
    got.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="weight"):
        kd_loss(student, teacher, x, weight=1.5, temperature=T)
