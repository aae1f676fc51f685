"""SLM-pn: the projected network (paper.md §3.6; v1's "hyper-network").

A GPT-2 backbone whose attention, embeddings and LayerNorms are shared by all experts; only the
FFN (MLP) of each block is expert-specific. For layer l and expert i, each FFN matrix is a linear
projection of shared tensors:

    W(l,i)[a,b] = Σ_q Σ_r E[i,q] · M(l)[q,r] · T(l)[a,b,r]
                = Σ_r coef(l,i)[r] · T(l)[a,b,r],     coef(l,i) = E[i] @ M(l)  ∈ R^h

with E ∈ R^{k×m} (one vector per expert/cluster, shared by all layers), M(l) ∈ R^{m×h} and
T(l) ∈ R^{d×d'×h}. Decisions where the paper is silent:
- One M(l) per block, shared by the block's two FFN matrices (c_fc: d×d', c_proj: d'×d), so
  both matrices of expert i in layer l use the same h coefficients.
- Biases are projected the same way (b(l,i) = Σ_r coef(l,i)[r] · Tb(l)[:, r]), so that the
  hard mixture special case (h = k, E = one-hot, M = I) gives each expert its own full FFN,
  biases included.
- T is stored r-first, [h, d, d'], so materialising U experts is one GEMM
  (coef [U,h] @ T.view(h, d·d')).

Routing: every example carries its cluster id (no learned router). A forward pass materialises
the FFN matrices only for the clusters present in the batch (U ≤ k matrices of d×d' per FFN
matrix) and runs each cluster's rows through its own matrices; no per-example weight copy.

Initialisation (why training is stable): GPT-2 draws c_fc entries from N(0, σ²), σ = 0.02,
and c_proj entries from N(0, σ_p²), σ_p = σ/√(2·n_layer). Given coef, W = Σ_r coef_r·T_r with
iid T entries N(0, s²) has entries N(0, s²·‖coef‖²). So T is drawn with s = σ (resp. σ_p) and
E, M are drawn so that ‖coef(l,i)‖ = 1: E rows are unit vectors and M(l) is semi-orthogonal
(orthonormal rows when m ≤ h, which makes ‖E[i] @ M(l)‖ = ‖E[i]‖ = 1 exactly; when m > h,
orthonormal columns rescaled so that the mean over experts of ‖coef‖² is 1). Every materialised
expert thus has the weight distribution of a freshly initialised GPT-2 MLP (tested). Biases start at 0 as in GPT-2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutput

from slm.configkit import ConfigError
from slm.errors import InputError

from .lm import lm_param_count
from .losses import lm_loss

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "projected_config.json"
FORMAT = "slm-projected-lm"
FORMAT_VERSION = 1
# GPT-2 fields that change tensor shapes: compared field by field when loading a checkpoint
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_inner", "vocab_size", "n_positions")


@dataclass
class _Route:
    """Row grouping of one batch, computed once per forward and shared by all layers."""

    coef_rows: torch.Tensor  # E[unique clusters], [U, m]
    order: torch.Tensor | None  # permutation that sorts rows by cluster (None if U == 1)
    inverse: torch.Tensor | None  # its inverse
    counts: list[int]  # rows per present cluster, in sorted-cluster order


class ProjectedMLP(nn.Module):
    """A GPT-2 MLP whose two matrices and biases are projections of shared tensors T."""

    def __init__(self, d: int, d_ff: int, h: int, m: int, activation: str):
        super().__init__()
        self.d, self.d_ff, self.h, self.m = d, d_ff, h, m
        self.M = nn.Parameter(torch.empty(m, h))
        # r-first storage so materialising is one GEMM; Conv1D layout (x @ W): fc [d, d'], proj [d', d]
        self.T_fc = nn.Parameter(torch.empty(h, d, d_ff))
        self.T_fc_bias = nn.Parameter(torch.zeros(h, d_ff))
        self.T_proj = nn.Parameter(torch.empty(h, d_ff, d))
        self.T_proj_bias = nn.Parameter(torch.zeros(h, d))
        self.act = ACT2FN[activation]
        self.route: _Route | None = None  # set by ProjectedLM.forward for the current batch

    def coefficients(self, expert_vectors: torch.Tensor) -> torch.Tensor:
        """coef = E[i] @ M(l) for the given expert vectors [U, m] -> [U, h]."""
        return expert_vectors @ self.M

    def materialize(self, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """FFN weights of U experts from their coefficients [U, h]: (w_fc, b_fc, w_proj, b_proj)."""
        u, h = coef.shape
        w_fc = (coef @ self.T_fc.reshape(h, -1)).view(u, self.d, self.d_ff)
        w_proj = (coef @ self.T_proj.reshape(h, -1)).view(u, self.d_ff, self.d)
        return w_fc, coef @ self.T_fc_bias, w_proj, coef @ self.T_proj_bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route is None:
            raise RuntimeError("ProjectedMLP called outside ProjectedLM.forward (no cluster routing set)")
        w_fc, b_fc, w_proj, b_proj = self.materialize(self.coefficients(route.coef_rows))
        if route.order is None:  # the whole batch is one cluster
            return self.act(hidden_states @ w_fc[0] + b_fc[0]) @ w_proj[0] + b_proj[0]
        groups = hidden_states.index_select(0, route.order).split(route.counts, dim=0)
        outs = [self.act(x @ w_fc[j] + b_fc[j]) @ w_proj[j] + b_proj[j] for j, x in enumerate(groups)]
        return torch.cat(outs, dim=0).index_select(0, route.inverse)


class ProjectedLM(nn.Module):
    """SLM-pn: GPT-2 backbone with projected, cluster-routed FFNs (see module docstring)."""

    def __init__(self, config: GPT2Config, n_experts: int, h: int, m: int, *, seed: int | None = None):
        super().__init__()
        for name, val in (("n_experts", n_experts), ("h", h), ("m", m)):
            if int(val) <= 0:
                raise ConfigError(f"ProjectedLM field '{name}' is {val}; it must be > 0")
        self.config = config
        self.n_experts, self.h, self.m = int(n_experts), int(h), int(m)
        d = config.n_embd
        self.d_ff = config.n_inner if config.n_inner is not None else 4 * d
        # seed: reproducible init without disturbing the caller's RNG stream
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.backbone = GPT2LMHeadModel(config)
            for block in self.backbone.transformer.h:
                block.mlp = ProjectedMLP(d, self.d_ff, self.h, self.m, config.activation_function)
            self.E = nn.Parameter(torch.empty(self.n_experts, self.m))
            self.reset_projection_parameters()

    @property
    def mlps(self) -> list[ProjectedMLP]:
        return [block.mlp for block in self.backbone.transformer.h]

    @torch.no_grad()
    def reset_projection_parameters(self) -> None:
        """Draw E, M, T so that every materialised expert matches GPT-2's init scale.

        T entries ~ N(0, σ²) (σ = initializer_range for c_fc, σ/√(2·n_layer) for c_proj, as
        GPT-2), so expert i's weights have entries N(0, σ²·‖coef(l,i)‖²) with
        coef(l,i) = E[i] @ M(l). E rows are unit vectors and M(l) is (semi-)orthogonal: when
        m ≤ h its rows are orthonormal, so ‖coef(l,i)‖ = ‖E[i]‖ = 1 exactly for every expert
        and layer. When m > h, M(l) has orthonormal columns scaled by √(m/h) and ‖coef‖² is 1
        on average over experts (each M(l) is rescaled to make that mean exact).
        """
        sigma = self.config.initializer_range
        sigma_proj = sigma / math.sqrt(2 * self.config.n_layer)
        nn.init.normal_(self.E)
        self.E.div_(self.E.norm(dim=1, keepdim=True))
        for mlp in self.mlps:
            nn.init.orthogonal_(mlp.M)
            if self.m > self.h:
                mean_sq = (self.E @ mlp.M).pow(2).sum(dim=1).mean()
                mlp.M.div_(mean_sq.sqrt())
            nn.init.normal_(mlp.T_fc, std=sigma)
            nn.init.normal_(mlp.T_proj, std=sigma_proj)
            mlp.T_fc_bias.zero_()
            mlp.T_proj_bias.zero_()

    # --- routing and forward -------------------------------------------------------------
    def _route(self, cluster: torch.Tensor, batch: int) -> _Route:
        cluster = torch.as_tensor(cluster).reshape(-1).to(device=self.E.device, dtype=torch.long)
        if cluster.numel() != batch:
            raise InputError(f"cluster has {cluster.numel()} ids for a batch of {batch} rows; pass one cluster id per row")
        present, counts = torch.unique(cluster, sorted=True, return_counts=True)
        lo, hi = int(present[0]), int(present[-1])
        if lo < 0 or hi >= self.n_experts:
            bad = lo if lo < 0 else hi
            raise InputError(f"cluster id {bad} is outside [0, {self.n_experts}); the shards' cluster column must match k={self.n_experts}")
        coef_rows = self.E.index_select(0, present)
        if present.numel() == 1:
            return _Route(coef_rows, None, None, [batch])
        order = torch.argsort(cluster, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(batch, device=order.device)
        return _Route(coef_rows, order, inverse, counts.tolist())

    def forward(
        self,
        input_ids: torch.Tensor,
        cluster: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits (and the shifted LM loss when `labels` is given) with row b routed to expert cluster[b]."""
        route = self._route(cluster, input_ids.shape[0])
        # The route stays set until the next forward: activation checkpointing re-runs the
        # blocks during backward and must see the same grouping.
        for mlp in self.mlps:
            mlp.route = route
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        loss = lm_loss(out.logits, labels)[0] if labels is not None else None
        return CausalLMOutput(loss=loss, logits=out.logits)

    # --- materialisation ------------------------------------------------------------------
    @torch.no_grad()
    def materialize(self, i: int) -> GPT2LMHeadModel:
        """Expert i as a plain `GPT2LMHeadModel` of the backbone's shape (closed form)."""
        if not 0 <= int(i) < self.n_experts:
            raise InputError(f"expert {i} is outside [0, {self.n_experts})")
        model = GPT2LMHeadModel(self.config).to(device=self.E.device, dtype=self.E.dtype)
        own = self.backbone.state_dict()
        shared = {k: v for k, v in own.items() if ".mlp." not in k}
        missing, unexpected = model.load_state_dict(shared, strict=False)
        if unexpected or any(".mlp." not in k for k in missing):
            raise RuntimeError(f"backbone/plain GPT-2 mismatch: missing={missing} unexpected={unexpected}")
        e = self.E[int(i)].unsqueeze(0)
        for mlp, block in zip(self.mlps, model.transformer.h):
            w_fc, b_fc, w_proj, b_proj = mlp.materialize(mlp.coefficients(e))
            block.mlp.c_fc.weight.copy_(w_fc[0])
            block.mlp.c_fc.bias.copy_(b_fc[0])
            block.mlp.c_proj.weight.copy_(w_proj[0])
            block.mlp.c_proj.bias.copy_(b_proj[0])
        model.tie_weights()
        return model.eval()

    # --- parameter counts -----------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Measured counts: total (training), per materialised expert (inference), projection-only."""
        return pn_params(self.config, self.n_experts, self.h, self.m)

    # --- persistence (safetensors + json, no pickle) --------------------------------------
    def projected_config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_experts": self.n_experts,
            "h": self.h,
            "m": self.m,
            "gpt2": self.config.to_dict(),
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `model.safetensors` (all parameters, tied table once) and `projected_config.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / WEIGHTS_NAME))  # handles the tied wte/lm_head tensor
        (directory / CONFIG_NAME).write_text(json.dumps(self.projected_config(), indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        expect: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> ProjectedLM:
        """Load a saved ProjectedLM.

        `expect` (optional) holds the configuration the caller requires, with keys among
        n_experts, h, m and the GPT-2 shape fields (n_layer, n_embd, n_head, n_inner,
        vocab_size, n_positions); the first mismatch raises ConfigError naming that field.
        """
        directory = Path(directory)
        cfg = read_projected_config(directory)
        if expect:
            check_projected_config(cfg, expect, source=str(directory))
        model = cls(GPT2Config.from_dict(cfg["gpt2"]), cfg["n_experts"], cfg["h"], cfg["m"])
        model.load_weights(directory, _config_checked=True)
        return model.to(device)

    def load_weights(self, directory: str | Path, _config_checked: bool = False) -> None:
        """Load weights saved by `save_pretrained` into this model, checking the config first."""
        directory = Path(directory)
        if not _config_checked:
            check_projected_config(read_projected_config(directory), self._expectation(), source=str(directory))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise InputError(f"{weights} is missing; a ProjectedLM checkpoint needs {WEIGHTS_NAME} next to {CONFIG_NAME}")
        own = self.state_dict()
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shape = tuple(f.get_slice(key).get_shape())
                if key in own and tuple(own[key].shape) != shape:
                    raise InputError(f"{weights}: tensor '{key}' has shape {shape}, the config implies {tuple(own[key].shape)}; the weights do not match {CONFIG_NAME}")
        missing, unexpected = load_model(self, str(weights), strict=False)
        if missing or unexpected:
            raise InputError(f"{weights} does not hold a ProjectedLM of this config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        self.backbone.tie_weights()

    def _expectation(self) -> dict[str, Any]:
        exp: dict[str, Any] = {"n_experts": self.n_experts, "h": self.h, "m": self.m}
        exp.update({f: getattr(self.config, f) for f in SHAPE_FIELDS})
        return exp


def read_projected_config(directory: Path) -> dict[str, Any]:
    """Read and sanity-check `projected_config.json`."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{path} is missing; is {directory} a ProjectedLM checkpoint (ProjectedLM.save_pretrained)?")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); re-save the model") from exc
    if cfg.get("format") != FORMAT:
        raise InputError(f"{path}: 'format' is {cfg.get('format')!r}, expected {FORMAT!r}")
    for key in ("n_experts", "h", "m", "gpt2"):
        if key not in cfg:
            raise InputError(f"{path} lacks field '{key}'; re-save the model with ProjectedLM.save_pretrained")
    return cfg


def check_projected_config(cfg: dict[str, Any], expect: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming the first field where checkpoint `cfg` differs from `expect`."""
    flat = {"n_experts": cfg["n_experts"], "h": cfg["h"], "m": cfg["m"]}
    gpt2 = cfg["gpt2"]
    d = gpt2.get("n_embd")
    flat.update({f: gpt2.get(f) for f in SHAPE_FIELDS})
    if flat["n_inner"] is None and d is not None:
        flat["n_inner"] = 4 * d
    for field_name, want in expect.items():
        if field_name not in flat:
            raise ConfigError(f"cannot check unknown field '{field_name}'; known: {', '.join(flat)}")
        if field_name == "n_inner" and want is None and d is not None:
            want = 4 * d
        if flat[field_name] != want:
            raise ConfigError(
                f"checkpoint {source} has {field_name}={flat[field_name]} but {want} is expected; "
                f"load it with a matching config (or retrain with {field_name}={want})"
            )


def pn_params(config: GPT2Config, n_experts: int, h: int, m: int) -> dict[str, int]:
    """Closed-form parameter counts of ProjectedLM(config, n_experts, h, m).

    total: what is trained (shared backbone without FFNs + all T, M, E);
    per_expert: a materialised expert = a plain GPT2LMHeadModel of the config;
    shared: backbone parameters outside the FFNs (embeddings, attention, norms).
    """
    d, L = config.n_embd, config.n_layer
    f = config.n_inner if config.n_inner is not None else 4 * d
    plain = lm_param_count(config)
    ffn_per_layer = d * f + f + f * d + d
    shared = plain - L * ffn_per_layer
    projection = L * (h * ffn_per_layer + m * h) + n_experts * m
    return {"total": shared + projection, "per_expert": plain, "shared": shared, "projection": projection}
