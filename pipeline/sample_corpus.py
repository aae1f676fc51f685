"""A small real corpus from any Debian/Ubuntu machine: paragraphs of the licence texts every
system ships (/usr/share/common-licenses), written as the files a recipe's ``corpus`` section
reads (parquet, JSON lines, text files, a domain directory with train/valid/test). For the
benchmarks and the tests; no download.
"""

from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

LICENSES = "/usr/share/common-licenses"


def paragraphs(n: int, min_chars: int = 200, offset: int = 0) -> list[str]:
    """``n`` distinct real English paragraphs (cycling over the licences with a suffix if needed)."""
    paras: list[str] = []
    for name in sorted(os.listdir(LICENSES)):
        path = os.path.join(LICENSES, name)
        if os.path.isfile(path):
            text = open(path, encoding="utf-8", errors="ignore").read()
            for p in re.split(r"\n\s*\n", text):
                p = " ".join(p.split())
                if len(p) >= min_chars:
                    paras.append(p)
    paras = list(dict.fromkeys(paras))
    out = []
    i = offset
    while len(out) < n:
        p = paras[i % len(paras)]
        out.append(p if i < len(paras) else f"{p} (copy {i // len(paras)})")
        i += 1
    return out


def write_parquet(path: str, texts: list[str], column: str = "text") -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(pa.table({column: texts, "source": ["test"] * len(texts)}), path)
    return path


def write_jsonl(path: str, texts: list[str], column: str = "text") -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({column: t, "meta": 1}) + "\n")
    return path


def write_text(path: str, texts: list[str]) -> str:
    """One file; several texts are separated by form feeds (the ingest's document separator)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\f\n".join(texts))
    return path


def write_domain(root: str, name: str, n_train: int, n_valid: int, n_test: int,
                 offset: int = 0) -> str:
    """A domain directory with train.parquet, valid.jsonl and test/ (text files)."""
    d = os.path.join(root, name)
    texts = paragraphs(n_train + n_valid + n_test, offset=offset)
    write_parquet(os.path.join(d, "train.parquet"), texts[:n_train])
    write_jsonl(os.path.join(d, "valid.jsonl"), texts[n_train:n_train + n_valid])
    for i, t in enumerate(texts[n_train + n_valid:]):
        write_text(os.path.join(d, "test", f"doc{i:03d}.txt"), [t])
    return d


def write_hub_repo(root: str, repo: str = "allenai/c4", configs: tuple[str, ...] = ("en",),
                   splits: dict[str, int] | None = None, shards: int = 2,
                   style: str = "parquet") -> str:
    """A local copy of a Hugging Face dataset repo, laid out as on the Hub (configs as
    sub-directories, shards per split), under ``root/<owner>/<name>`` (give ``root`` as
    ``corpus.hub_root``; ``pipeline/hub.py`` reads it). ``style``: "parquet" =
    ``<config>/<split>/0000.parquet`` (the Hub's parquet conversion), "c4" =
    ``<config>/c4-<split>.00000-of-00002.json.gz`` (allenai/c4's own files). Each config and
    split holds different paragraphs. Returns the repo directory."""
    import gzip  # only here: the other writers are plain files

    splits = splits or {"train": 40, "validation": 8}
    base = os.path.join(root, repo)
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "README.md"), "w", encoding="utf-8") as f:
        f.write(f"---\npretty_name: {repo} (local copy for slm)\n---\n")
    offset = 0
    for config in configs:
        for split, n in splits.items():
            texts = paragraphs(n, offset=offset)
            offset += n
            for i in range(shards):
                part = texts[i::shards]
                if style == "parquet":
                    write_parquet(os.path.join(base, config, split, f"{i:04d}.parquet"), part)
                else:
                    path = os.path.join(base, config, f"c4-{split}.{i:05d}-of-{shards:05d}.json.gz")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with gzip.open(path, "wt", encoding="utf-8") as f:
                        for t in part:
                            f.write(json.dumps({"text": t, "url": "local"}) + "\n")
    return base
