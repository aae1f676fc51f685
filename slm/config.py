"""The recipe: one typed config for a whole study, composed of sections that each sub-package
owns (pipeline/config.py, models/config.py, tune/config.py, cluster/config.py).

Dataclasses ↔ YAML recipes ↔ ``--section.field`` CLI flags; the machinery is in
``slm.configkit``. Built-in recipes live in ``recipes/`` (installed as ``slm.recipes``).
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from slm.cluster.config import ClusterConfig, default_storage
from slm.configkit import (ConfigError, add_flags, apply_overrides, from_dict, load_yaml,  # noqa: F401
                           overrides_from_args, to_dict, validate)
from slm.errors import InputError
from slm.layout import RunLayout
from slm.stage import exists, filesystem
from slm.models.config import PretrainConfig
from slm.pipeline.config import CorpusConfig, DataConfig, EmbedConfig, KMeansConfig, TokenizerConfig
from slm.tune.config import SpecializeConfig, SweepConfig

@dataclass
class Recipe:
    """A whole study: data, pretraining, specialization, sweeps, and where it runs."""

    name: str = field(default="demo", metadata={"help": "recipe name; results of different recipes never mix"})
    run_dir: str = field(default="runs/demo", metadata={"help": "run directory: a local path or s3:// / gs:// URI"})
    seed: int = field(default=0, metadata={"help": "global seed"})
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    specialize: SpecializeConfig = field(default_factory=SpecializeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def domain_sizes(self) -> list[int]:
        """The domain train sizes the sweep specializes (``sweep.domain_tokens``, else every
        size of ``data.domain_train_tokens``), sorted: the sizes SLM-is data and models are
        built for (one per domain and size: the data pipeline, `slm pretrain`, `slm run`)."""
        return sorted(set(self.sweep.domain_tokens or self.data.domain_train_tokens))

    def pretrain_seeds(self) -> list[int]:
        """The pretraining seeds: ``pretrain.seeds``, or the recipe's ``seed`` alone."""
        return list(self.pretrain.seeds) or [self.seed]

    def layout_seed(self, seed: int) -> int | None:
        """A pretraining seed as the run layout names its runs (``RunLayout.pretrain``): None
        for the recipe's own ``seed`` (today's paths, trial keys and fingerprints), else the
        seed (its own tree ``pretrain/seed-<s>/``)."""
        return None if int(seed) == int(self.seed) else int(seed)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("field 'name' is empty; give the recipe a name")
        if not self.run_dir:
            raise ConfigError("field 'run_dir' is empty; give a directory or URI for the run")


BUILTIN_RECIPES = ("demo", "paper", "study")


def recipe_path(name_or_path: str) -> Path:
    """A built-in recipe name (demo, paper, study) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.is_dir() and name_or_path not in BUILTIN_RECIPES:  # a folder 'demo' here: the built-in
        run = (f"; it is a run directory: use `--run {p}` for the recipe it was started with"
               if (p / "recipe.yaml").is_file() else "")
        raise ConfigError(f"recipe '{p}' is a directory, not a YAML file{run}; pass a recipe "
                          f"file (--recipe PATH.yaml) or a built-in recipe "
                          f"({', '.join(BUILTIN_RECIPES)})")
    if p.suffix in (".yaml", ".yml") or (p.exists() and not p.is_dir()):
        if not p.exists():
            raise ConfigError(f"recipe file '{p}' does not exist; pass a built-in recipe "
                              f"({', '.join(BUILTIN_RECIPES)}) or a path to a YAML file")
        return p
    res = importlib.resources.files("slm.recipes") / f"{name_or_path}.yaml"
    if not res.is_file():
        raise ConfigError(f"unknown recipe '{name_or_path}'; built-in recipes are "
                          f"{', '.join(BUILTIN_RECIPES)}, or pass a path to a YAML file")
    return Path(str(res))


def load_recipe(name_or_path: str = "demo", overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe (built-in name or YAML path), apply dotted overrides, validate it."""
    path = recipe_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe '{path}' is not UTF-8 text (byte {e.start}); save it as "
                          "UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe '{path}': {e.strerror or e}; check the path and "
                          "its permissions") from None
    return resolve_paths(_parse(text, str(path), overrides))


def _parse(text: str, where: str, overrides: dict[str, Any] | None) -> Recipe:
    data = load_yaml(text, f"recipe '{where}'",
                     fix="fix the YAML syntax there (indentation, 'key: value', quotes)") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{where}' must be a YAML mapping of sections")
    try:
        recipe = from_dict(Recipe, data)
        if overrides:
            recipe = apply_overrides(recipe, overrides)
        validate(recipe)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return recipe


def load_run_recipe(run: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe a run was started with (``RUN/recipe.yaml``), pointed at ``run`` wherever
    the run directory is now (moved, copied, opened through a relative path)."""
    layout = RunLayout(run)
    if not exists(run):
        raise InputError(f"run '{run}' does not exist; pass the run directory of a finished "
                         "pretraining run (--run RUN, e.g. runs/demo)")
    if not exists(layout.recipe):
        raise InputError(f"'{run}' is not an slm run directory (no recipe.yaml); pass the run "
                         "directory that `slm run` / `slm data run` created")
    fs, path = filesystem(layout.recipe)
    with fs.open_input_stream(path) as f:
        recipe = _parse(f.read().decode("utf-8"), layout.recipe, overrides)
    return resolve_paths(replace(recipe, run_dir=run))


def _absolute(path: str) -> str:
    """A local relative path made absolute; URIs (s3://, gs://, hf://), 'demo' and '' as they are."""
    if not path or path == "demo" or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def resolve_paths(recipe: Recipe) -> Recipe:
    """The recipe with its local paths absolute, resolved against the caller's working
    directory. Ray Tune runs trials in their own directories, so a relative ``run_dir`` read
    inside a trial would point elsewhere; idempotent. An empty ``cluster.storage`` takes
    ``$SLM_STORAGE`` (set by the cluster, cluster/kuberay)."""
    corpus = replace(recipe.corpus, generic=_absolute(recipe.corpus.generic),
                     hub_root=_absolute(recipe.corpus.hub_root),
                     domains={d: _absolute(p) for d, p in recipe.corpus.domains.items()})
    cluster = replace(recipe.cluster, storage=_absolute(default_storage(recipe.cluster.storage)))
    return replace(recipe, run_dir=_absolute(recipe.run_dir), corpus=corpus, cluster=cluster)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
