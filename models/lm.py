"""The plain served model: a Hugging Face GPT-2 causal LM built from a size preset.

Every family ends in this model (design.md, "Model families"), so it follows HF conventions
exactly: `save_pretrained(safe_serialization=True)` writes safetensors + config.json and
`AutoModelForCausalLM.from_pretrained` loads it back with no custom code.

Differences from the paper's architecture (paper.md §6), kept on purpose:
- GPT-2 has *learned* absolute position embeddings (`wpe`, seq_len × d_model parameters),
  which the paper's count (7·12d² + V·d ≈ 121M) does not include. They are counted as
  embedding parameters (`count_params(non_embedding=True)` excludes them).
- GPT-2 blocks carry biases and two LayerNorms per block (+ a final one); they add well
  under 1% of the parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from slm.configkit import ConfigError

from .config import SIZES, lora_target_shapes


def resolve_size(size: str | tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Return (layers, d_model, heads, d_ff) for a preset name or an explicit 4-tuple."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ConfigError(f"unknown model size '{size}'; presets: {', '.join(SIZES)}")
        return SIZES[size]
    dims = tuple(int(v) for v in size)
    if len(dims) != 4 or min(dims) <= 0:
        raise ConfigError(f"model size {size!r} must be (layers, d_model, heads, d_ff), all > 0")
    layers, d_model, heads, d_ff = dims
    if d_model % heads:
        raise ConfigError(f"model size {size!r}: d_model={d_model} is not divisible by heads={heads}")
    return layers, d_model, heads, d_ff


def lm_config(
    size: str | tuple[int, int, int, int],
    vocab_size: int,
    seq_len: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    initializer_range: float = 0.02,
) -> GPT2Config:
    """GPT-2 config of a size preset: tied embeddings, GELU MLP, no dropout, SDPA attention.

    Dropout is 0 because pretraining sees each window about once (and it keeps runs
    deterministic); `n_positions = seq_len` because every training row is exactly one window.
    """
    layers, d_model, heads, d_ff = resolve_size(size)
    if vocab_size <= 0 or seq_len <= 0:
        raise ConfigError(f"vocab_size={vocab_size} and seq_len={seq_len} must both be > 0")
    for name, tok in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if tok is not None and not 0 <= tok < vocab_size:
            raise ConfigError(f"{name}={tok} is outside the vocabulary [0, {vocab_size}); pass the tokenizer's id")
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=d_model,
        n_layer=layers,
        n_head=heads,
        n_inner=d_ff,
        activation_function="gelu_new",  # GPT-2's tanh-approximated GELU
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        use_cache=False,  # training default; generation passes use_cache explicitly
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attn_implementation="sdpa",
    )


def make_lm(
    config_or_size: GPT2Config | str | tuple[int, int, int, int],
    vocab_size: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 LM; `seed` makes the initial weights reproducible."""
    if isinstance(config_or_size, GPT2Config):
        config = config_or_size
    else:
        if vocab_size is None or seq_len is None:
            raise ConfigError("make_lm(size, ...) needs vocab_size and seq_len (or pass a GPT2Config)")
        config = lm_config(config_or_size, vocab_size, seq_len)
    if seed is None:
        return GPT2LMHeadModel(config)
    # fork_rng so that seeding the init does not disturb the caller's RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def embedding_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of every nn.Embedding (token and position tables)."""
    return {id(p) for mod in model.modules() if isinstance(mod, nn.Embedding) for p in mod.parameters()}


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once).

    `non_embedding=True` drops token and position embeddings (Kaplan et al. 2020's N); the
    tied LM head is the token table, so it is dropped too.
    """
    skip = embedding_param_ids(model) if non_embedding else set()
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied tensors
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def lm_param_count(config: GPT2Config, non_embedding: bool = False) -> int:
    """Closed-form parameter count of `GPT2LMHeadModel(config)` (tied head), no allocation.

    Lets callers size paper-scale models (126M / 771M) without building them.
    """
    d, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.n_positions
    f = config.n_inner if config.n_inner is not None else 4 * d
    per_layer = (
        2 * 2 * d  # ln_1, ln_2 (weight + bias)
        + d * 3 * d + 3 * d  # c_attn
        + d * d + d  # attn c_proj
        + d * f + f  # mlp c_fc
        + f * d + d  # mlp c_proj
    )
    body = L * per_layer + 2 * d  # + ln_f
    return body if non_embedding else body + V * d + P * d


def lora_param_count(config: GPT2Config, target_modules: list[str], rank: int) -> int:
    """Closed-form count of the LoRA adapter weights on ``target_modules`` at ``rank`` (each
    adapted (in, out) matrix gets rank·(in + out)): what ``models/lora.py`` trains, no allocation."""
    d = config.n_embd
    shapes = lora_target_shapes(d, config.n_inner if config.n_inner is not None else 4 * d)
    return config.n_layer * sum(rank * (i + o) for t in set(target_modules) for i, o in shapes[t])
