"""One tiny, real run directory shared by the specialization / sweep / add-domain / study tests.

Corpus: docstrings of Python's standard library (ships with every Python, no download). The
generic corpus is the docstrings of general-purpose modules; the held-out domain is the
docstrings of numeric modules ("numeric"); another set of modules ("later", codecs and shlex)
is kept aside for the add-a-domain-later test. (One domain only: every window set costs an
embedding stage, and the tests must stay short on two cores.) The whole real pipeline runs on
it (BPE tokenizer, windows, real MiniLM embeddings, k-means, histograms, shards) and every
family is really pretrained with the one training loop (Ray Train + DeepSpeed), a few steps each.

Every stage publishes atomically and skips when done, so the build is paid once per pytest
session (the directory lives under the session's base temp dir) however many test files use it.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

GENERIC_MODULES = ["os", "collections", "typing", "argparse", "json"]
DOMAIN_MODULES = {"numeric": ["fractions", "statistics"]}
LATER_MODULES = ["codecs", "shlex"]


def docstrings(modules: list[str]) -> list[str]:
    """Docstrings of the modules and their public members, in a deterministic order."""
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        seen = set()
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                          or inspect.isroutine(obj)) else None
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                out.append(doc.strip())
            if inspect.isclass(obj):
                for m in sorted(vars(obj)):
                    d = inspect.getdoc(getattr(obj, m, None)) if not m.startswith("_") else None
                    if d and len(d) > 40 and d not in seen:
                        seen.add(d)
                        out.append(d.strip())
    return out


def write_docs(path: Path, docs: list[str]) -> None:
    """One text file, documents separated by form feeds (the ingest's document break)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\f".join(d.replace("\f", " ") for d in docs), encoding="utf-8")


def write_domain(root: Path, docs: list[str]) -> None:
    """train/valid/test files: 60/20/20 in order (deterministic; valid and test need a few
    batches of windows each)."""
    n = len(docs)
    a, b = int(n * 0.6), int(n * 0.8)
    for split, part in (("train", docs[:a]), ("valid", docs[a:b]), ("test", docs[b:])):
        write_docs(root / f"{split}.txt", part)


def build_corpus(root: Path) -> dict[str, str]:
    """Corpus files under ``root``; returns {generic, numeric, later} paths."""
    if not (root / "done").exists():
        generic = docstrings(GENERIC_MODULES)
        write_docs(root / "generic" / "generic.txt", generic)
        for d, mods in DOMAIN_MODULES.items():
            write_domain(root / "domains" / d, docstrings(mods))
        write_docs(root / "later" / "docs.txt", docstrings(LATER_MODULES))  # flat: no splits
        (root / "done").write_text("ok")
    return {"generic": str(root / "generic"), "numeric": str(root / "domains" / "numeric"),
            "later": str(root / "later")}


def tiny_recipe(base: Path, **sweep):
    """A recipe with tiny sizes: 64-token windows, a 1-layer model, a few steps everywhere."""
    from slm.config import Recipe
    from slm.configkit import from_dict, validate

    recipe = from_dict(Recipe, tiny_recipe_dict(str(base / "run"), build_corpus(base / "corpus"),
                                                **sweep))
    validate(recipe)
    return recipe


def tiny_recipe_dict(run_dir: str, paths: dict[str, str], **sweep) -> dict:
    """The tiny recipe as a dict (a recipe file's content), on the corpus ``paths`` (local
    paths or URIs, as ``build_corpus`` names them)."""
    return {
        "name": "tiny", "run_dir": run_dir, "seed": 0,
        "corpus": {"generic": paths["generic"],
                   "domains": {"numeric": paths["numeric"]}},
        "tokenizer": {"vocab_size": 512},
        "data": {"seq_len": 64, "domain_train_tokens": [1024, 2048], "is_tokens": 8192,
                 "rows_per_file": 512},
        "embed": {"batch_size": 64, "pool_size": 1, "num_cpus": 1},
        "kmeans": {"k_is": 4, "k_mix": 2, "k_pn": 2, "fit_sample": 4000, "max_iter": 20},
        "pretrain": {"slm_size": "tiny", "llm_size": "demo-slm",
                     "steps": {"slm": 30, "llm": 30, "is": 20, "mix": 20, "pn": 30},
                     "levels": [0.5, 1.0],  # every run also publishes its model at half its steps
                     "pn_h": 2, "pn_m": 2, "logger": "tensorboard", "valid_fraction": 0.05,
                     "train": {"micro_batch": 8, "lr": 0.003, "warmup": 5, "eval_every": 10,
                               "eval_batches": 2, "ckpt_every": 30, "zero_stage": 1},
                     # 0.5 CPU a run: the two SLM-mix experts train at once on 2 CPUs
                     "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}},
        "specialize": {"max_steps": 30, "lr": 0.001, "small_data_tokens": 1024, "micro_batch": 8,
                       "eval_every": 5, "patience": 2},
        # one domain size by default (each trial is a Ray Train run); tests ask for more
        "sweep": {"name": "main", "methods": ["slm"], "budgets": [20], "seeds": [0],
                  "domain_tokens": [1024],
                  "cpus_per_trial": 1, **sweep},
        "cluster": {"num_cpus": 2},
    }


def build_tiny_run(base: Path):
    """Data pipeline + pretraining of every family (each skipped when already done); SLM-is,
    per (domain, size), at the sizes the sweep specializes (1024), as `slm run` does: the
    families whose runs fit train at once (two of 0.5 CPU on a 2-CPU Ray), the mix experts
    before them."""
    from slm.models.pretrain import pretrain_families
    from slm.pipeline.run import run_pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe = tiny_recipe(base)
    run_pipeline(recipe)
    pretrain_families(recipe, list(recipe.pretrain.families))
    return recipe
