"""Training losses on causal-LM logits: next-token cross-entropy and knowledge distillation.

Both shift inside (logits at position t predict token t+1), so callers pass the unshifted
`input_ids` of a window, as with HF's `labels=input_ids`. Label -100 is ignored (HF convention),
although training windows never contain it.

Memory (``chunk`` > 0): the float32 log-softmax over a 32k vocabulary is the largest tensor of a
step (micro-batch 56 × 1024 positions × 32k × 4 bytes = 7.3 GB, twice over with its gradient).
With ``chunk`` positions at a time, each chunk's float32 work is recomputed in the backward
(``torch.utils.checkpoint``): autograd keeps only the model's own (bf16 on GPU) logits, and at
most one chunk's float32 copy exists at a time. The result equals the plain loss up to float
summation order (tests/test_deepspeed_fit.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _shift(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (logits[:, :-1], input_ids[:, 1:]) pairs."""
    if logits.shape[:2] != input_ids.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree on (batch, seq)")
    vocab = logits.shape[-1]
    return logits[:, :-1, :].reshape(-1, vocab), input_ids[:, 1:].reshape(-1)


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed float32 cross-entropy of a [batch, positions, vocab] chunk."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _chunks(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int):
    """(logits[:, a:b], input_ids[:, a+1:b+1]) over the shifted positions, ``chunk`` at a time."""
    if logits.shape[:2] != input_ids.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree on (batch, seq)")
    positions = logits.shape[1] - 1
    for a in range(0, positions, chunk):
        b = min(a + chunk, positions)
        yield logits[:, a:b], input_ids[:, a + 1:b + 1]


def _recompute(fn, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, its float32 intermediates recomputed in the backward instead of kept."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, int]:
    """(mean next-token cross-entropy in nats, number of predicted tokens).

    The count lets callers average exactly over several batches: Σ loss·n / Σ n. Computed in
    float32 whatever the logits' dtype (bf16 log-softmax over 32k classes loses precision).
    ``chunk`` > 0: ``chunk`` positions at a time, without a full float32 copy (module docstring).
    """
    if chunk <= 0:
        flat_logits, targets = _shift(logits, input_ids)
        n_tokens = int((targets != IGNORE_INDEX).sum())
        loss = F.cross_entropy(flat_logits.float(), targets.long(), ignore_index=IGNORE_INDEX)
        return loss, n_tokens
    n_tokens = int((input_ids[:, 1:] != IGNORE_INDEX).sum())
    total = sum(_recompute(_ce_sum, lg, t) for lg, t in _chunks(logits, input_ids, chunk))
    return total / max(n_tokens, 1), n_tokens


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    weight: float,
    temperature: float,
    chunk: int = 0,
) -> torch.Tensor:
    """(1 - weight)·CE(student, domain tokens) + weight·T²·KL(teacher_T ‖ student_T).

    KL(p_T ‖ q_T) = Σ_v p_T(v)·(log p_T(v) − log q_T(v)) with p_T = softmax(teacher/T),
    q_T = softmax(student/T), averaged over the same shifted positions as the CE (the last
    position, which has no target, is excluded from both). The T² factor keeps the gradient
    scale of the soft term independent of T (Hinton et al. 2015). The teacher is detached.
    At weight 0 the KL term is not computed, so the result is exactly `lm_loss`. ``chunk`` > 0:
    both terms ``chunk`` positions at a time (module docstring).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight {weight} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"distillation temperature {temperature} must be > 0")
    ce, n_tokens = lm_loss(student_logits, input_ids, chunk)
    if weight == 0.0:
        return ce
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} differ")
    if chunk > 0:
        def kl_sum(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            keep = ids.reshape(-1) != IGNORE_INDEX
            log_q = F.log_softmax(s.reshape(-1, s.shape[-1])[keep].float() / temperature, dim=-1)
            log_p = F.log_softmax(t.reshape(-1, t.shape[-1])[keep].float() / temperature, dim=-1)
            return F.kl_div(log_q, log_p, log_target=True, reduction="sum")

        teacher = teacher_logits.detach()
        kl = sum(_recompute(kl_sum, s, t, ids) for (s, ids), (t, _) in
                 zip(_chunks(student_logits, input_ids, chunk), _chunks(teacher, input_ids, chunk)))
        return (1.0 - weight) * ce + weight * temperature**2 * kl / max(n_tokens, 1)
    s_flat, targets = _shift(student_logits, input_ids)
    t_flat, _ = _shift(teacher_logits.detach(), input_ids)
    keep = targets != IGNORE_INDEX
    log_q = F.log_softmax(s_flat[keep].float() / temperature, dim=-1)
    log_p = F.log_softmax(t_flat[keep].float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # mean over positions
    return (1.0 - weight) * ce + weight * temperature**2 * kl
