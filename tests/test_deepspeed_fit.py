"""Paper scale on GPUs, tested on the CPU (issue 14): collectives on the engine's device,
DeepSpeed settings (ZeRO stages, user JSON, accumulation), the memory-light loss and the memory
estimate. The loop runs in this process (models/probe.py: ``LocalRuntime`` on a 1-process gloo
group, real DeepSpeed); no Ray is started here.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import model_to_params as zero3_model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from slm.configkit import ConfigError
from slm.errors import InputError
from slm.models import memory
from slm.models.config import TrainConfig
from slm.models.ds_config import deepspeed_config
from slm.models.families import FamilySpec, build_family
from slm.models.hooks import Distillation
from slm.models.lm import count_params, lm_config, lm_param_count, make_lm
from slm.models.loop_config import DistillationSection
from slm.models.losses import kd_loss, lm_loss
from slm.models.probe import probe_config, random_rows, train_in_process

SEQ, VOCAB = 16, 128
TINY = FamilySpec("slm", "tiny", VOCAB, SEQ)


def sets(rows: int = 64) -> dict:
    return {"train": random_rows(rows, SEQ, VOCAB, seed=1), "valid": random_rows(24, SEQ, VOCAB, seed=2)}


# ---- item 1: collectives ----------------------------------------------------------------------

def test_every_collective_of_the_loop_is_on_the_engines_device(tmp_path, monkeypatch):
    """Every sum the loop all-reduces (each step's metrics, each evaluation — which the
    early-stop decision reads) goes through the process group as a tensor on the engine's
    device. Why this check: with NCCL (any GPU run) a CPU tensor fails at the first step ("No
    backend type associated with device type cpu"); this machine has no GPU, so the engine's
    device is the CPU and a device check alone could not tell the two apart. The recorder
    therefore also requires that the loop's float64 sums reach the group at all in a
    1-process run: the old code built them on the CPU whatever the engine's device and skipped
    the group at world size 1, so a GPU path was never exercised by any test (this test fails
    on it). bench/gpu_check.py runs the same path on a CUDA device with NCCL."""
    real = dist.all_reduce
    seen: list[tuple[torch.device, torch.dtype]] = []

    def recording(tensor, *args, **kwargs):
        seen.append((tensor.device, tensor.dtype))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    steps, patience = 4, 5
    cfg = probe_config(TINY, run_uri=str(tmp_path), steps=steps, micro_batch=4, eval_every=2)
    cfg.patience = patience  # early stopping on: it reads the all-reduced valid loss
    trainer, _ = train_in_process(cfg, sets())
    ours = [d for d, t in seen if t == torch.float64]
    evaluations = 1 + steps // 2  # the starting model, then every 2 steps
    assert len(ours) == steps + evaluations
    assert all(d == trainer.engine.device for d, _ in seen), seen


# ---- item 2: DeepSpeed that fits --------------------------------------------------------------

def test_chunked_loss_equals_the_plain_loss_and_its_gradient():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 17))
    logits = torch.randn(3, 17, 50, requires_grad=True)
    teacher = torch.randn(3, 17, 50)
    for chunk in (1, 5, 16, 64):
        plain, n = lm_loss(logits, ids)
        chunked, m = lm_loss(logits, ids, chunk)
        assert n == m == 3 * 16
        g_plain, = torch.autograd.grad(plain, logits)
        g_chunk, = torch.autograd.grad(chunked, logits)
        assert torch.allclose(plain, chunked, atol=1e-6) and torch.allclose(g_plain, g_chunk, atol=1e-7)
        kd_plain = kd_loss(logits, teacher, ids, 0.4, 2.0)
        kd_chunk = kd_loss(logits, teacher, ids, 0.4, 2.0, chunk)
        g_plain, = torch.autograd.grad(kd_plain, logits)
        g_chunk, = torch.autograd.grad(kd_chunk, logits)
        assert torch.allclose(kd_plain, kd_chunk, atol=1e-6) and torch.allclose(g_plain, g_chunk, atol=1e-7)


def test_chunked_loss_keeps_no_full_float32_copy_of_bf16_logits():
    """Autograd keeps the bf16 logits only: the saved tensors of the chunked loss hold no
    float32 tensor of the logits' size (the plain loss keeps its float32 log-softmax)."""
    ids = torch.randint(0, 1000, (2, 64))
    logits = torch.randn(2, 64, 1000, dtype=torch.bfloat16, requires_grad=True)
    full = logits.numel()

    def saved_float32(chunk: int) -> int:
        big = []

        def pack(t):
            if t.dtype == torch.float32 and t.numel() >= full // 2:
                big.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm_loss(logits, ids, chunk)[0].backward()
        return len(big)

    assert saved_float32(0) > 0 and saved_float32(8) == 0


def test_accumulation_equivalence_micro8_accum2_equals_micro16(tmp_path):
    """Global batch = micro × accumulation × workers: 8 × 2 and 16 × 1 take the same steps."""
    runs = {}
    for micro, accum in ((8, 2), (16, 1)):
        cfg = probe_config(TINY, run_uri=str(tmp_path / f"m{micro}"), steps=3, micro_batch=micro,
                           grad_accum=accum, lr=3e-3, zero_stage=1)
        trainer, reports = train_in_process(cfg, sets(96))
        runs[micro] = ({k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()},
                       reports[-1]["train/loss"])
    (w8, l8), (w16, l16) = runs[8], runs[16]
    assert l8 == pytest.approx(l16, rel=1e-5)
    for k in w16:
        assert torch.allclose(w8[k], w16[k], atol=1e-5), k


def test_zero3_trains_and_exports_in_process(tmp_path):
    """ZeRO-3 (parameters partitioned) runs on DeepSpeed's CPU accelerator with gloo: a step,
    an evaluation and the export of the gathered model; its losses equal ZeRO-1's (fp32)."""
    losses = {}
    for stage in (1, 3):
        cfg = probe_config(TINY, run_uri=str(tmp_path / f"z{stage}"), steps=2, micro_batch=8, zero_stage=stage)
        _, reports = train_in_process(cfg, sets())
        losses[stage] = (reports[-1]["train/loss"], reports[-1]["valid/loss"])
        assert (tmp_path / f"z{stage}" / "probe" / "step=00000002" / "export" / "model.safetensors").exists()
    assert losses[3] == pytest.approx(losses[1], rel=1e-5)


def test_user_deepspeed_json_merges_and_owned_keys_are_refused(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"},
                                                      "reduce_bucket_size": 5e7}}))
    t = TrainConfig(zero_stage=2, deepspeed=str(good))
    t.validate()
    cfg = probe_config(TINY, run_uri=str(tmp_path), steps=1, micro_batch=4, grad_accum=3,
                       zero_stage=2, deepspeed=t.deepspeed_overrides())
    ds = deepspeed_config(cfg, world_size=2, bf16=True)
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                       "reduce_bucket_size": 5e7}
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["bf16"] == {"enabled": True}
    for bad, key in (({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
                     ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu"),
                     ({"optimizer": {"type": "Adam"}}, "optimizer")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=f"'{key}'.*pretrain.train"):
            TrainConfig(deepspeed=str(tmp_path / "bad.json")).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig(deepspeed=str(tmp_path / "none.json")).validate()


def test_per_family_zero_stage_is_validated_and_reaches_the_loop():
    t = TrainConfig(zero_stage=1, zero_stages={"llm": 3})
    t.validate()
    assert (t.zero_stage_of("llm"), t.zero_stage_of("slm")) == (3, 1)
    with pytest.raises(ConfigError, match="zero_stages.llm"):
        TrainConfig(zero_stages={"llm": 4}).validate()
    with pytest.raises(ConfigError, match="unknown family 'big'"):
        TrainConfig(zero_stages={"big": 3}).validate()


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("world", [1, 8])
def test_model_state_estimate_matches_deepspeeds_estimators(stage, world):
    """The model-state part of the estimate against DeepSpeed's own estimators (bf16, with and
    without the optimizer offloaded), on a model whose sizes DeepSpeed counts itself."""
    model = make_lm(lm_config("demo-llm", 32000, 64), seed=0)
    params, largest = count_params(model), memory.largest_layer_params(model)
    assert (params, largest) == zero3_model_to_params(model)
    for offload in (False, True):
        ours = memory.model_state_bytes(params, largest, stage=stage, world=world, bf16=True,
                                        offload_optimizer=offload)
        if stage == 2:
            theirs = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=world, cpu_offload=offload)[1]
        else:
            theirs = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=world,
                                                           cpu_offload=offload, cpu_offload_params=False)[1]
        assert ours == pytest.approx(theirs, rel=0.01)


def test_memory_check_refuses_what_cannot_fit_and_names_the_fixes():
    cfg = lm_config("paper-llm", 32000, 1024)
    p = lm_param_count(cfg)
    big = memory.estimate(family="llm", config=cfg, params=p, largest_layer=32000 * 2816, stage=1,
                          world=8, micro_batch=56, seq_len=1024, bf16=True, checkpointing=False,
                          loss_chunk=0)
    with pytest.raises(InputError, match=r"does not fit.*micro_batch.*zero_stages: \{llm: 3\}.*activation_checkpointing"):
        memory.check_fits(big, 24 * memory.GIB, "llm", checkpointing=False)
    small = memory.estimate(family="llm", config=cfg, params=p, largest_layer=32000 * 2816, stage=3,
                            world=8, micro_batch=4, seq_len=1024, bf16=True, checkpointing=True,
                            loss_chunk=128)
    memory.check_fits(small, 80 * memory.GIB, "llm", checkpointing=True)
    assert small.total < big.total / 4


def test_distillation_teacher_has_no_gradients_and_kd_uses_the_chunked_loss(tmp_path):
    """The teacher only runs forward: no parameter of it takes a gradient (on a GPU in bf16 it
    is also loaded in bf16; on this CPU run, in the run's float32)."""
    make_lm(lm_config("tiny", VOCAB, SEQ), seed=1).save_pretrained(tmp_path / "teacher")
    family = build_family(TINY, loss_chunk=4)
    hook = Distillation(family, DistillationSection(teacher=str(tmp_path / "teacher"), weight=0.5),
                        torch.device("cpu"), "bf16")
    assert not any(p.requires_grad for p in hook.teacher.parameters())
    assert next(hook.teacher.parameters()).dtype == torch.float32  # bf16 only on a CUDA device
    student = family.build(0)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    chunked = hook(student, ids, None)
    with torch.no_grad():
        t_logits = hook.teacher(input_ids=ids).logits
    plain = kd_loss(student(input_ids=ids).logits, t_logits, ids, 0.5, 1.0)
    assert torch.allclose(chunked, plain, atol=1e-6)


def test_zero3_reduce_bucket_is_counted_as_deepspeed_allocates_it():
    """ZeRO-3 allocates its reduce bucket at start (measured on an H200: the demo model's peak
    rose by exactly this much from ZeRO-1 to ZeRO-3); the user's JSON can size or disable it."""
    assert memory.zero_buffer_bytes({}, stage=3, bf16=True) == 500_000_000 * 2
    assert memory.zero_buffer_bytes({"reduce_bucket_size": 2e8}, stage=3, bf16=True) == 400_000_000
    assert memory.zero_buffer_bytes({"contiguous_gradients": False}, stage=3, bf16=True) == 0
    assert memory.zero_buffer_bytes({}, stage=1, bf16=True) == 0
    cfg = lm_config("tiny", VOCAB, SEQ)
    kw = dict(family="slm", config=cfg, params=lm_param_count(cfg), largest_layer=VOCAB * 8, stage=3,
              world=1, micro_batch=2, seq_len=SEQ, bf16=True, checkpointing=False, loss_chunk=0)
    plain, buffered = memory.estimate(**kw), memory.estimate(**kw, zero_buffers=10**9)
    assert buffered.total - plain.total == 10**9 and "ZeRO buffers" in buffered.line()
