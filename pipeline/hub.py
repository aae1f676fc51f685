"""Hugging Face Hub dataset repos as corpus sources: ``hf://owner/name[:config][/split]``.

A spec names a dataset *repository*, one of its configs and one split; slm resolves it to the
repo's data files (parquet, JSON lines, optionally gzipped) and reads them with Ray Data like
any other corpus, so the files stream through the cluster's tasks and the head (driver) only
lists them. The `datasets` library is not used: `load_dataset` downloads and converts the
whole split on the calling process (hundreds of GB for C4).

Repository layout, as on the Hub (both of the Hub's usual conventions):
* configs are top-level sub-directories (``en/``, ``realnewslike/``); a repo without configs
  keeps its files at the top (or under ``data/``, the Hub's default);
* a split is a sub-directory named after it (``en/train/0000.parquet``, the Hub's parquet
  conversion) or a keyword in the file name (``en/c4-train.00000-of-01024.json.gz``,
  ``data/train-00000-of-00004.parquet``), with the Hub's synonyms (validation: valid, val, dev).

Where the repo is read from: ``corpus.hub_root`` (or env ``SLM_HUB_ROOT``), a directory or
URI holding repos as ``<owner>/<name>/`` (a mirror, or a local copy for offline tests);
otherwise the Hub itself through ``huggingface_hub.HfFileSystem`` (``HF_ENDPOINT`` and
``HF_TOKEN`` are honoured by that library).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from slm.errors import InputError
from slm.stage import filesystem

PREFIX = "hf://"
HUB_ROOT_ENV = "SLM_HUB_ROOT"
HUB_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl",
               ".jsonl.gz": "jsonl", ".json.gz": "jsonl"}
# The Hub's split keywords (datasets.data_files): a file or directory naming any of them
# belongs to that split.
SPLIT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
DEFAULT_DATA_DIR = "data"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf://owner/name[:config][/split]``."""

    repo: str          # owner/name
    config: str = ""   # '' = the repo's only (or default) config
    split: str = "train"
    spec: str = ""     # the text it was parsed from (for messages)

    def with_split(self, split: str) -> str:
        return f"{PREFIX}{self.repo}{':' + self.config if self.config else ''}/{split}"

    def with_config(self, config: str) -> str:
        return f"{PREFIX}{self.repo}:{config}/{self.split}"


def is_hub(source: str) -> bool:
    return source.startswith(PREFIX)


def parse(source: str) -> HubSpec:
    """``hf://owner/name[:config][/split]`` → HubSpec; InputError naming the spec otherwise."""
    body = source.removeprefix(PREFIX).strip("/")
    usage = ("write hf://OWNER/NAME[:CONFIG][/SPLIT], e.g. hf://allenai/c4:en/train or "
             "hf://HuggingFaceFW/fineweb-edu:sample-10BT")
    if ":" in body:
        repo, _, rest = body.partition(":")
        config, _, split = rest.partition("/")
        if not config:
            raise InputError(f"corpus '{source}': empty config after ':'; {usage}")
    else:
        parts = body.split("/")
        repo, config, split = "/".join(parts[:2]), "", "/".join(parts[2:])
    owner_name = repo.split("/")
    if len(owner_name) != 2 or not all(_NAME.match(p) for p in owner_name):
        raise InputError(f"corpus '{source}': '{repo}' is not a dataset repo OWNER/NAME; {usage}")
    if "/" in split or (split and not _NAME.match(split)) or (config and not _NAME.match(config)):
        raise InputError(f"corpus '{source}' is not a valid hub spec; {usage}")
    return HubSpec(repo=repo, config=config, split=split or "train", spec=source)


def hub_root(configured: str = "") -> str:
    """Where repos are read from: the recipe's corpus.hub_root, else $SLM_HUB_ROOT, else ''
    (the Hub)."""
    return configured or os.environ.get(HUB_ROOT_ENV, "")


def repo_filesystem(spec: HubSpec, root: str) -> tuple[pafs.FileSystem, str, str]:
    """(pyarrow filesystem, repo directory inside it, where-to-say-it-is) of a repo."""
    if root:
        fs, base = filesystem(root)
        path = f"{base.rstrip('/')}/{spec.repo}"
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise InputError(f"corpus '{spec.spec}': no repo '{spec.repo}' under the hub root "
                             f"'{root}' (corpus.hub_root / ${HUB_ROOT_ENV}); put the dataset repo "
                             f"there as {spec.repo}/, or unset the hub root to read the Hub")
        return fs, path, root
    from huggingface_hub import HfFileSystem  # the Hub client, only when the Hub is read
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))
    return fs, f"datasets/{spec.repo}", "the Hugging Face Hub"


def _format(path: str) -> str | None:
    name = path.lower()
    for ext, fmt in sorted(HUB_FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(ext):
            return fmt
    return None


def _data_files(fs: pafs.FileSystem, base: str) -> list[str]:
    """Data files under ``base``, relative to it (hidden files and README/scripts skipped)."""
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = i.path[len(base):].lstrip("/")
        if any(p.startswith((".", "_")) for p in rel.split("/")):
            continue
        if _format(rel):
            out.append(rel)
    return sorted(out)


def _words(rel: str) -> list[str]:
    """A repo path's words: its directories and file name split at - . _ /."""
    return re.split(r"[-._/]", rel.lower())


def _split_of(rel: str) -> str | None:
    """The split a data file belongs to, from its directories and file name (Hub rules)."""
    words = _words(rel)
    return next((split for split, keys in SPLIT_KEYWORDS.items() if any(k in words for k in keys)), None)


def _in_split(rel: str, split: str) -> bool:
    """Whether a data file belongs to ``split`` (a Hub split with its synonyms, or any name)."""
    return any(k in _words(rel) for k in SPLIT_KEYWORDS.get(split, (split,)))


def resolve(spec: HubSpec, root: str = "") -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """(filesystem, [(path, format)]) of the spec's split; InputError naming the spec and the
    fix when the config or the split is not in the repo."""
    fs, repo_dir, where = repo_filesystem(spec, root)
    files = _data_files(fs, repo_dir)
    if not files:
        raise InputError(f"corpus '{spec.spec}': repo '{spec.repo}' on {where} holds no "
                         f"parquet or JSON-lines files ({', '.join(HUB_FORMATS)})")
    top = sorted({f.split("/", 1)[0] for f in files if "/" in f})
    configs = [c for c in top if c != DEFAULT_DATA_DIR and _split_of(c + "/") is None]
    if spec.config:
        if spec.config not in configs:
            hint = (f"configs there: {', '.join(configs)}; e.g. {spec.with_config(configs[0])}"
                    if configs else f"it has no configs: use hf://{spec.repo}/{spec.split}")
            raise InputError(f"corpus '{spec.spec}': repo '{spec.repo}' has no config "
                             f"'{spec.config}' ({hint})")
        files = [f.split("/", 1)[1] for f in files if f.startswith(spec.config + "/")]
    else:
        unconfigured = [f for f in files if f.split("/", 1)[0] not in configs]
        if unconfigured:  # files at the top, under data/ or split directories
            files = unconfigured
        elif len(configs) == 1:
            spec = HubSpec(spec.repo, configs[0], spec.split, spec.spec)
            files = [f.split("/", 1)[1] for f in files]
        else:
            raise InputError(f"corpus '{spec.spec}': repo '{spec.repo}' has configs "
                             f"{', '.join(configs)}; name one, e.g. {spec.with_config(configs[0])}")
    config_dir = f"{repo_dir}/{spec.config}" if spec.config else repo_dir
    chosen = [f for f in files if _in_split(f, spec.split)]
    if not chosen:
        found = sorted({s for f in files if (s := _split_of(f))})
        if not found and spec.split == "train":
            chosen = files  # no split keyword anywhere: the Hub reads every file as 'train'
        else:
            fix = (f"splits there: {', '.join(found)}; e.g. {spec.with_split(found[0])}" if found
                   else f"its files name no split: use {spec.with_split('train')}")
            raise InputError(f"corpus '{spec.spec}': no split '{spec.split}' in repo "
                             f"'{spec.repo}'{' config ' + repr(spec.config) if spec.config else ''}"
                             f" ({fix})")
    return fs, [(f"{config_dir}/{f}", _format(f) or "") for f in chosen]
