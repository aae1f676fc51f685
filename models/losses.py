"""Training losses on causal-LM logits: next-token cross-entropy and knowledge distillation.

Both shift inside (logits at position t predict token t+1), so callers pass the unshifted
`input_ids` of a window, as with HF's `labels=input_ids`. Label -100 is ignored (HF convention),
although training windows never contain it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _shift(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (logits[:, :-1], input_ids[:, 1:]) pairs."""
    if logits.shape[:2] != input_ids.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree on (batch, seq)")
    vocab = logits.shape[-1]
    return logits[:, :-1, :].reshape(-1, vocab), input_ids[:, 1:].reshape(-1)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean next-token cross-entropy in nats, number of predicted tokens).

    The count lets callers average exactly over several batches: Σ loss·n / Σ n. Computed in
    float32 whatever the logits' dtype (bf16 log-softmax over 32k classes loses precision).
    """
    flat_logits, targets = _shift(logits, input_ids)
    n_tokens = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(flat_logits.float(), targets.long(), ignore_index=IGNORE_INDEX)
    return loss, n_tokens


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    weight: float,
    temperature: float,
) -> torch.Tensor:
    """(1 - weight)·CE(student, domain tokens) + weight·T²·KL(teacher_T ‖ student_T).

    KL(p_T ‖ q_T) = Σ_v p_T(v)·(log p_T(v) − log q_T(v)) with p_T = softmax(teacher/T),
    q_T = softmax(student/T), averaged over the same shifted positions as the CE (the last
    position, which has no target, is excluded from both). The T² factor keeps the gradient
    scale of the soft term independent of T (Hinton et al. 2015). The teacher is detached.
    At weight 0 the KL term is not computed, so the result is exactly `lm_loss`.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight {weight} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"distillation temperature {temperature} must be > 0")
    ce, _ = lm_loss(student_logits, input_ids)
    if weight == 0.0:
        return ce
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} differ")
    s_flat, targets = _shift(student_logits, input_ids)
    t_flat, _ = _shift(teacher_logits.detach(), input_ids)
    keep = targets != IGNORE_INDEX
    log_q = F.log_softmax(s_flat[keep].float() / temperature, dim=-1)
    log_p = F.log_softmax(t_flat[keep].float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # mean over positions
    return (1.0 - weight) * ce + weight * temperature**2 * kl
