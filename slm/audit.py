"""No node-local path in a run: a run directory must be movable, copyable to object storage and
openable from any node, so nothing slm writes into it may name a path of the machine that
wrote it (docs/design.md: every stored path is run-relative, ``RunLayout.relative``).

``node_local_paths(run)`` reads every text-like file of a run (local or ``s3://``/``gs://``,
through ``slm.stage.filesystem``) and returns ``(run-relative file, value)`` for every string
that is a node-local path:

* a string value that is an absolute local path (starts with ``/``: ``/tmp/x``, ``/root/...``,
  the run's own absolute root), or a ``file://`` URI;
* any string (a value, a table cell, a line of text) containing a ``file://`` URI, an absolute
  path of two or more segments (``/home/u/x``), or the run root's absolute local path.

Read: JSON (also JSON lines), YAML, Markdown, CSV, HTML and text files, and the string columns
of parquet tables: manifests, results tables, the report, model cards, checkpoint pointers,
costs. Skipped: binary files (safetensors, .pt, PNG, ...), TensorBoard event files, token
vocabularies (``tokenizer.json``, ``vocab.json``, ``merges.txt``) and the corpus's document
``text`` column: their strings are data, not paths. Fine: URLs (``http(s)://``), object
storage URIs (``s3://``, ``gs://``), relative paths and plain words.

Allowed (``ALLOWED``): paths the *user* gave, recorded as given (``USER_INPUTS``: the recipe's
``run_dir`` and corpus paths, the corpus sources the ingest read): they name inputs outside the
run, not artifacts of it, and reopening a run never reads them (``load_run_recipe`` replaces
``run_dir`` with wherever the run is now; a moved run reuses its published data); and the
checkpoint paths Ray Tune logs for a trial (``RAY_LOGS``), which slm never reads. Binary
content is skipped whatever the file's name (Ray pickles its searcher state into ``*.json``).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from slm.stage import filesystem, is_remote, listing

TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".md", ".csv", ".txt", ".html", ".htm")
PARQUET_SUFFIX = ".parquet"
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt")  # token strings are data
DOCUMENT_COLUMNS = ("text",)  # the corpus's documents (docs/design.md, corpus artifact)

# (file pattern, key pattern) of values that may name local paths (see module doc)
USER_INPUTS = (
    ("recipe.yaml", "run_dir"),                          # where the run was started
    ("recipe.yaml", "corpus.*"),                         # the user's corpus files
    ("data/corpus/*/manifest.json", "source"),           # ... as the ingest stage read them
    ("data/sources/*/*/manifest.json", "config.source"),  # `slm add-domain`'s flat document set
)
RAY_LOGS = (  # Ray Tune's per-trial logs: Ray relays a Train run's result with its checkpoint's
    # absolute storage path; a log slm never reads (trials resume from their own storage)
    ("*/result.json", "*checkpoint_path"),
    ("*/progress.csv", "checkpoint_path"),
)
ALLOWED = USER_INPUTS + RAY_LOGS

_FILE_URI = re.compile(r"file://\S+")
# an absolute path inside text: '/' + at least two segments, not part of a URL (':/', '//'),
# a word (a/b), a closing tag (</td>) or a home path (~/x)
_ABS_IN_TEXT = re.compile(r"(?<![\w.:/<>~@\\-])/[\w.+@%=-]+(?:/[\w.+@%=-]*)+")


@dataclass(frozen=True)
class Finding:
    """One node-local path: the run-relative file, where in it (key path, column or line) and
    the offending value."""

    file: str
    key: str
    value: str


def node_local_paths(run_uri: str) -> list[tuple[str, str]]:
    """(run-relative file, offending value) of every node-local path in the run (module doc)."""
    return [(f.file, f.value) for f in scan(run_uri)]


def scan(run_uri: str) -> list[Finding]:
    """``node_local_paths`` with where in each file the value is (``Finding.key``)."""
    root_abs = "" if is_remote(run_uri) else filesystem(run_uri)[1].rstrip("/")
    out = []
    for rel, _ in listing(run_uri):
        name = rel.rsplit("/", 1)[-1]
        if not _readable(name):
            continue
        uri = f"{run_uri.rstrip('/')}/{rel}"
        for key, value, whole in _strings(uri, name):
            bad = _offending(value, root_abs, whole)
            if bad and not _allowed(rel, key):
                out.append(Finding(rel, key, bad))
    return out


def _readable(name: str) -> bool:
    if name in VOCABULARY_FILES or "tfevents" in name:
        return False
    return name.endswith(TEXT_SUFFIXES + (PARQUET_SUFFIX,))


def _allowed(rel: str, key: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, f) and fnmatch.fnmatchcase(key, k) for f, k in ALLOWED)


def _offending(value: str, root_abs: str, whole: bool) -> str:
    """The node-local path ``value`` is (``whole``: a value of its own) or holds ('' when none)."""
    if whole and (value.startswith("file://") or (value.startswith("/") and len(value) > 1)):
        return value
    if root_abs and root_abs in value:
        m = re.search(rf"\S*{re.escape(root_abs)}\S*", value)
        return value if whole else m.group(0)
    m = _FILE_URI.search(value) or _ABS_IN_TEXT.search(value)
    return m.group(0) if m else ""


# --------------------------------------------------------------------------------------------
# The strings of a file: (where, string, whether it is a value of its own or a line of text)
# --------------------------------------------------------------------------------------------

def _strings(uri: str, name: str) -> Iterator[tuple[str, str, bool]]:
    fs, path = filesystem(uri)
    if name.endswith(PARQUET_SUFFIX):
        yield from _values(_parquet_strings(pq.read_table(path, filesystem=fs)))
        return
    with fs.open_input_stream(path) as f:
        data = f.read()
    if b"\0" in data:  # binary whatever its name (Ray's pickled searcher state is "*.json")
        return
    text = data.decode("utf-8", errors="replace")
    if name.endswith((".json", ".jsonl")):
        yield from _json_strings(text)
    elif name.endswith((".yaml", ".yml")):
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            yield from _lines(text)
        else:
            yield from _values(_walk(doc))
    elif name.endswith(".csv"):
        yield from _values(_csv_strings(text))
    else:
        yield from _lines(text)


def _values(pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str, bool]]:
    for key, value in pairs:
        yield key, value, True


def _walk(obj: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every string of a parsed JSON/YAML document, with its dotted key path."""
    if isinstance(obj, str):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{key}.{i}" if key else str(i))


def _json_strings(text: str) -> Iterator[tuple[str, str, bool]]:
    try:
        doc = json.loads(text)
    except ValueError:
        pass
    else:
        yield from _values(_walk(doc))
        return
    for i, line in enumerate(text.splitlines(), 1):  # JSON lines (Ray's result.json), else text
        try:
            doc = json.loads(line)
        except ValueError:
            yield f"line {i}", line, False
        else:
            yield from _values(_walk(doc, f"line {i}"))


def _csv_strings(text: str) -> Iterator[tuple[str, str]]:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, [])
    for row in rows:
        for i, cell in enumerate(row):
            column = header[i] if i < len(header) else str(i)
            if column not in DOCUMENT_COLUMNS:
                yield column, cell


def _lines(text: str) -> Iterator[tuple[str, str, bool]]:
    for i, line in enumerate(text.splitlines(), 1):
        yield f"line {i}", line, False


def _parquet_strings(table: pa.Table) -> Iterator[tuple[str, str]]:
    for name in table.column_names:
        col = table.column(name)
        if name in DOCUMENT_COLUMNS or not (pa.types.is_string(col.type)
                                            or pa.types.is_large_string(col.type)):
            continue
        for v in col.unique().to_pylist():
            if v:
                yield name, v
