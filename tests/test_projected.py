"""SLM-pn, the projected network (slm.models.projected)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from slm.models.lm import count_params, lm_config, make_lm
from slm.models.projected import ProjectedLM, pn_params
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from slm.configkit import ConfigError
from slm.errors import InputError

VOCAB, SEQ, K = 100, 16, 4
CFG = lm_config((2, 32, 2, 64), VOCAB, SEQ)


def batch(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained_pn() -> ProjectedLM:
    """A ProjectedLM after a few optimizer steps, so biases and shared weights are non-trivial."""
    model = ProjectedLM(CFG, n_experts=K, h=3, m=2, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, cl = batch(8, seed=1), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        model(x, cl, labels=x).loss.backward()
        opt.step()
    return model.eval()


def test_materialized_experts_reproduce_the_routed_logits(trained_pn):
    x = batch(10, seed=2)
    cluster = torch.tensor([2, 0, 3, 2, 1, 0, 0, 3, 1, 2])
    with torch.no_grad():
        routed = trained_pn(x, cluster).logits
        for i in range(K):
            expert = trained_pn.materialize(i)
            assert isinstance(expert, GPT2LMHeadModel)
            rows = cluster == i
            assert torch.allclose(expert(x[rows]).logits, routed[rows], atol=1e-5), f"expert {i}"
        # routing matters: the same rows through another expert give other logits
        other = trained_pn.materialize(1)(x[cluster == 0]).logits
        assert (other - routed[cluster == 0]).abs().max() > 1e-3


def test_single_cluster_batch_takes_the_fast_path_and_agrees(trained_pn):
    x = batch(3, seed=3)
    with torch.no_grad():
        routed = trained_pn(x, torch.full((3,), 2)).logits
        assert torch.allclose(trained_pn.materialize(2)(x).logits, routed, atol=1e-5)


def test_materialized_expert_saves_and_loads_with_auto_model(trained_pn, tmp_path):
    expert = trained_pn.materialize(3)
    expert.save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = batch(2, seed=4)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, trained_pn(x, torch.tensor([3, 3])).logits, atol=1e-5)
    assert count_params(loaded) == pn_params(CFG, K, 3, 2)["per_expert"]


def test_only_present_clusters_are_materialized_and_get_gradients():
    model = ProjectedLM(CFG, n_experts=6, h=4, m=3, seed=1)
    x, cluster = batch(4, seed=5), torch.tensor([4, 1, 4, 1])
    route = model._route(cluster, 4)
    assert route.coef_rows.shape == (2, 3) and route.counts == [2, 2]  # 2 of 6 experts built
    w_fc = model.mlps[0].materialize(model.mlps[0].coefficients(route.coef_rows))[0]
    assert w_fc.shape == (2, 32, 64)
    model(x, cluster, labels=x).loss.backward()
    grad_rows = model.E.grad.abs().sum(dim=1)
    assert (grad_rows[[1, 4]] > 0).all()
    assert (grad_rows[[0, 2, 3, 5]] == 0).all()
    assert all(mlp.T_fc.grad.abs().sum() > 0 and mlp.M.grad.abs().sum() > 0 for mlp in model.mlps)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, cluster = batch(4, seed=8), torch.tensor([2, 0, 2, 1])
    grads = []
    for checkpointing in (False, True):
        model = ProjectedLM(CFG, n_experts=K, h=3, m=2, seed=5).train()
        if checkpointing:
            model.backbone.activation_checkpointing_enable()
        model(x, cluster, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_hard_mixture_special_case_gives_each_expert_its_own_slice():
    # paper.md §3.6: h = k, E = one-hot, M = I is the hard mixture of experts
    model = ProjectedLM(CFG, n_experts=K, h=K, m=K, seed=2)
    with torch.no_grad():
        model.E.copy_(torch.eye(K))
        for mlp in model.mlps:
            mlp.M.copy_(torch.eye(K))
            mlp.T_fc_bias.normal_()
            mlp.T_proj_bias.normal_()
    for i in range(K):
        expert = model.materialize(i)
        for mlp, block in zip(model.mlps, expert.transformer.h):
            assert torch.equal(block.mlp.c_fc.weight, mlp.T_fc[i])
            assert torch.equal(block.mlp.c_fc.bias, mlp.T_fc_bias[i])
            assert torch.equal(block.mlp.c_proj.weight, mlp.T_proj[i])
            assert torch.equal(block.mlp.c_proj.bias, mlp.T_proj_bias[i])


@pytest.mark.parametrize("h,m", [(8, 8), (8, 4), (4, 8)])
def test_init_gives_every_expert_the_gpt2_weight_scale(h, m):
    cfg = lm_config((2, 64, 2, 256), VOCAB, SEQ)
    model = ProjectedLM(cfg, n_experts=16, h=h, m=m, seed=3)
    plain = make_lm(cfg, seed=3)
    sigma, sigma_proj = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(plain.transformer.h[0].mlp.c_proj.weight.std().item() - sigma_proj) / sigma_proj < 0.05
    stds_fc, stds_proj = [], []
    for i in range(16):
        block = model.materialize(i).transformer.h[1].mlp
        stds_fc.append(block.c_fc.weight.std().item())
        stds_proj.append(block.c_proj.weight.std().item())
        assert torch.all(block.c_fc.bias == 0) and torch.all(block.c_proj.bias == 0)
    mean_fc, mean_proj = sum(stds_fc) / 16, sum(stds_proj) / 16
    assert abs(mean_fc - sigma) / sigma < 0.05, stds_fc
    assert abs(mean_proj - sigma_proj) / sigma_proj < 0.05, stds_proj
    if m <= h:  # orthonormal M rows: every expert is exactly on scale (up to sampling noise)
        assert max(abs(s - sigma) / sigma for s in stds_fc) < 0.05, stds_fc


def test_save_and_load_round_trip_without_pickle(trained_pn, tmp_path):
    trained_pn.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "projected_config.json"]
    cfg = json.loads((tmp_path / "projected_config.json").read_text())
    assert (cfg["n_experts"], cfg["h"], cfg["m"], cfg["gpt2"]["n_embd"]) == (K, 3, 2, 32)
    loaded = ProjectedLM.from_pretrained(tmp_path, expect={"n_experts": K, "h": 3, "n_embd": 32})
    x, cl = batch(4, seed=6), torch.tensor([3, 1, 0, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, cl).logits, trained_pn(x, cl).logits)
    assert loaded.backbone.lm_head.weight.data_ptr() == loaded.backbone.transformer.wte.weight.data_ptr()


def test_loading_another_config_names_the_mismatching_field(trained_pn, tmp_path):
    trained_pn.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"h=3 but 5 is expected"):
        ProjectedLM.from_pretrained(tmp_path, expect={"h": 5})
    wider = ProjectedLM(lm_config((2, 48, 2, 64), VOCAB, SEQ), n_experts=K, h=3, m=2)
    with pytest.raises(ConfigError, match=r"n_embd=32 but 48 is expected"):
        wider.load_weights(tmp_path)
    more_experts = ProjectedLM(CFG, n_experts=K + 1, h=3, m=2)
    with pytest.raises(ConfigError, match=r"n_experts=4 but 5 is expected"):
        more_experts.load_weights(tmp_path)
    with pytest.raises(InputError, match="projected_config.json is missing"):
        ProjectedLM.from_pretrained(tmp_path / "nowhere")


def test_bad_cluster_ids_are_input_errors(trained_pn):
    x = batch(2)
    with pytest.raises(InputError, match=r"cluster id 4 is outside \[0, 4\)"):
        trained_pn(x, torch.tensor([0, 4]))
    with pytest.raises(InputError, match="cluster has 3 ids for a batch of 2"):
        trained_pn(x, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="expert 7"):
        trained_pn.materialize(7)


def test_param_counts_match_the_module():
    model = ProjectedLM(CFG, n_experts=K, h=3, m=2, seed=0)
    counts = pn_params(CFG, K, 3, 2)
    assert counts == model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == count_params(model)
    assert counts["per_expert"] == count_params(model.materialize(0))
    d, f, L = 32, 64, 2
    assert counts["projection"] == L * (3 * (2 * d * f + d + f) + 2 * 3) + K * 2


def test_training_lowers_the_loss_and_is_reproducible():
    def run() -> list[float]:
        model = ProjectedLM(CFG, n_experts=K, h=3, m=2, seed=4)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, cl = batch(8, seed=7), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        losses = []
        for _ in range(6):
            opt.zero_grad()
            loss = model(x, cl, labels=x).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    first = run()
    assert first[-1] < first[0] - 0.1, first
    assert abs(first[0] - math.log(VOCAB)) < 0.2  # at init the model is near uniform
    assert run() == first
