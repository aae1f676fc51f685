"""Add a domain to a finished run, later: ingest → tokenize (the run's tokenizer) → embed →
assign to the run's centroids → histograms → shards → specialize, without pretraining again.

The domain is any text files / jsonl / parquet (read with the run's ``corpus`` settings): a
directory with train/valid/test files or sub-directories (used as given), or a flat set of
documents (a file, or a directory without splits), which is split deterministically by
document hash (80/10/10). The data stages are the pipeline's own functions; nothing under
``RUN/pretrain`` is written. A method whose model is pretrained per domain (SLM-is:
``Method.per_domain_families``) would need that pretraining for the new domain, so it is
excluded unless asked for by name.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import pyarrow.fs as pafs
import ray.data

from slm.cluster.ray_env import ray_session
from slm.config import load_run_recipe
from slm.errors import InputError
from slm.layout import SPLITS, RunLayout
from slm.models.pretrain import pretrain
from slm.pipeline.artifacts import count_rows, write_dataset
from slm.pipeline.ingest import domain_split_source, list_source, read_documents, source_fingerprint
from slm.pipeline.run import corpus_sources, run_pipeline
from slm.stage import Stage, exists, filesystem, manifest

from .methods import get_method
from .sweep import run_sweep

log = logging.getLogger(__name__)

SPLIT_PERCENT = {"train": (0, 80), "valid": (80, 90), "test": (90, 100)}


def _domain_name(domain_path: str, name: str) -> str:
    base = name or re.sub(r"\.[^.]*$", "", domain_path.rstrip("/").split("/")[-1])
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-")
    if not clean:
        raise InputError(f"cannot derive a domain name from '{domain_path}'; pass --name NAME")
    return clean


def _has_splits(domain: str, domain_path: str) -> bool:
    """True when the path is a directory holding train, valid and test."""
    fs, path = filesystem(domain_path)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    try:
        for split in SPLITS:
            domain_split_source(domain, domain_path, split)
    except InputError:
        return False
    return True


def _bucket(doc_id: str) -> int:
    return int(doc_id[:8], 16) % 100


class _InSplit:
    """Row filter: documents whose hash bucket falls in [lo, hi)."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, row: dict[str, Any]) -> bool:
        return self.lo <= _bucket(row["doc_id"]) < self.hi


def split_flat_domain(layout: RunLayout, recipe, domain: str, source: str) -> str:
    """Split a flat set of documents into ``RUN/data/sources/<domain>/<split>`` (parquet
    doc_id, text), deterministically by document hash; returns that directory."""
    cfg = recipe.corpus
    config = {"source": source, "fingerprint": source_fingerprint(source, cfg.format),
              "split_percent": SPLIT_PERCENT, "text_column": cfg.text_column}
    if read_documents(source, cfg).count() == 0:
        raise InputError(f"domain path '{source}' holds no text (every document is empty); give "
                         "files with documents in them")
    for split, (lo, hi) in SPLIT_PERCENT.items():
        uri = layout.sources(domain, split)
        st = Stage(uri, stage="domain-split", config=config)
        if st.done:
            continue
        with st.publish() as out:
            ds = read_documents(source, cfg).filter(_InSplit(lo, hi),
                                                    compute=ray.data.TaskPoolStrategy(size=1))
            write_dataset(ds, out)
            rows = count_rows(out.uri)
            if rows == 0:
                raise InputError(f"domain '{domain}': '{source}' has too few documents to give its "
                                 f"{split} split any (split {lo}-{hi}% by document hash); add "
                                 "documents, or give a directory with train/valid/test files")
            out.manifest["rows"] = rows
    return layout.sources(domain)


def _check_source(domain_path: str, recipe) -> None:
    """InputError when the path does not exist or holds no text files."""
    if not exists(domain_path):
        raise InputError(f"domain path '{domain_path}' does not exist; give a directory or file of "
                         "text/jsonl/parquet documents (--domain PATH)")
    try:
        list_source(domain_path, recipe.corpus.format)
    except InputError as e:
        raise InputError(f"domain path '{domain_path}' holds no text: {e}") from None


def specialize_new_domain(run: str, domain_path: str, name: str = "", methods: list[str] | None = None,
                          sweep_name: str = "") -> dict[tuple[str, str], str]:
    """Add ``domain_path`` as a new domain of the finished run ``run`` and specialize it.

    Returns {(domain, method): published model URI} (``RUN/models/<domain>/<method>/``,
    published once, by the sweep). The sweep is the run's recipe's sweep restricted to this
    domain, under ``RUN/specialize/<sweep_name or 'domain-<name>'>``.
    """
    recipe = load_run_recipe(run)
    _check_source(domain_path, recipe)
    domain = _domain_name(domain_path, name)
    layout = RunLayout(recipe.run_dir)
    _check_pretrained(layout)

    asked = list(methods or [m for m in recipe.sweep.methods if not get_method(m).per_domain_families])
    skipped = [m for m in recipe.sweep.methods if m not in asked] if not methods else []
    if skipped:
        log.warning("method(s) %s skipped for the new domain '%s': they pretrain a model per domain "
                    "(on generic data resampled for this domain: its own pretraining run). Ask for "
                    "them with --method NAME to run that pretraining too", ", ".join(skipped), domain)
    per_domain = sorted({f for m in asked for f in get_method(m).per_domain_families})
    with ray_session(recipe.cluster):
        _, existing = corpus_sources(recipe)  # the run's domains (the demo's, for generic=demo)
        source = domain_path if _has_splits(domain, domain_path) else split_flat_domain(layout, recipe, domain, domain_path)
        if domain in existing and existing[domain] != source:
            raise InputError(f"run '{run}' already has a domain '{domain}' (from '{existing[domain]}'); "
                             "pass another --name")
        corpus = dataclasses.replace(recipe.corpus, domains={**existing, domain: source})
        recipe = dataclasses.replace(recipe, corpus=corpus)
        # the data stages skip every artifact already done and build the new domain's; nothing
        # under RUN/pretrain is written unless a per-domain family is asked for
        run_pipeline(recipe)
        for fam in per_domain:
            for seed in recipe.pretrain_seeds():
                pretrain(recipe, fam, domains=[domain], seed=seed)
        sweep = dataclasses.replace(recipe.sweep, name=sweep_name or f"domain-{domain}",
                                    domains=[domain], methods=asked)
        run_sweep(dataclasses.replace(recipe, sweep=sweep))
    return {(domain, m): layout.model(domain, m) for m in asked
            if manifest(layout.model(domain, m)) is not None}


def _check_pretrained(layout: RunLayout) -> None:
    if not exists(layout.pretrain("")):
        raise InputError(f"run '{layout.root}' has no pretrained models (no pretrain/ directory); "
                         "run `slm pretrain` (or `slm run`) on it first")
