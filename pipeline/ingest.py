"""Ingest any corpus into the run directory: ``data/corpus/generic`` and
``data/corpus/domains/<d>/<split>`` as parquet ``(doc_id, text)``.

Sources (``corpus.generic`` and each ``corpus.domains`` directory):
* a file, a directory (searched recursively) or a glob, on local disk or object storage
  (s3://, gs://): every path goes through a pyarrow filesystem (``slm.stage.filesystem``), so
  local and remote share one code path;
* formats by extension (or ``corpus.format``): ``.parquet``; ``.jsonl``/``.json`` (JSON lines);
  ``.txt``/``.text``/``.md`` plain text, **one document per file**, except that a form feed
  (``\\f``) separates documents inside a file (the classic page/document break; blank lines are
  paragraph breaks, not document breaks, so they never split);
* ``hf://owner/name[:config][/split]``: a Hugging Face dataset repo's data files
  (``pipeline/hub.py``), from the Hub or a local/object-storage mirror (``corpus.hub_root``),
  read by Ray Data like any other files.

A domain directory holds ``train``/``valid``/``test`` either as files (``train.parquet``,
``train.jsonl``, ``train.txt``, ``train-00001.parquet`` ...) or as sub-directories.

Everything streams through Ray Data (read → normalise → ``write_parquet``); nothing is
collected on the driver. Only parquet *footers* are read on the driver, to name a corrupt file
or a missing text column before any work starts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from slm.errors import InputError, StageError
from slm.layout import SPLITS, RunLayout
from slm.pipeline.artifacts import count_rows, write_dataset
from slm.pipeline import hub
from slm.pipeline.config import CorpusConfig
from slm.pipeline.corpus_checks import json_problem, looks_utf16, walk_local
from slm.pipeline.counters import fail, new_counter, report
from slm.stage import MANIFEST, Stage, filesystem, fingerprint, manifest

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text",
           ".text": "text", ".md": "text"}
DOC_SEPARATOR = "\f"
# Documents per corpus file: bounds the memory of one tokenization task (windows.py tokenizes
# a corpus file per task) and keeps per-file tails small relative to a file.
MIN_DOCS_PER_FILE = 2_000
MAX_DOCS_PER_FILE = 20_000


def doc_id(text: str) -> str:
    """sha256 of the text, 16 hex characters (the artifact's ``doc_id``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Finding the files of a source
# --------------------------------------------------------------------------------------------

def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _format_of(path: str, forced: str) -> str | None:
    if forced != "auto":
        return forced
    name = path.lower()
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    return None


def _visible(path: str) -> bool:
    base = os.path.basename(path)
    return not (base.startswith((".", "_")) or base == MANIFEST)


def _files_under(fs: pafs.FileSystem, base: str) -> list[str]:
    """Every file under a directory. On local disk our own walk, which refuses a symlink loop
    (pyarrow's follows it until the OS stops it, listing the corpus ~40 times)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return walk_local(base) if os.path.isdir(base) else []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def list_source(source: str, fmt: str = "auto",
                hub_root: str = "") -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """(filesystem, [(path, format)]) of a file, directory, glob or hub spec (read from
    ``hub_root`` when given); InputError when empty."""
    if hub.is_hub(source):
        return hub.resolve(hub.parse(source), hub.hub_root(hub_root))
    fs, path = filesystem(source)
    explicit = False  # the source is one file, named explicitly
    if _has_glob(path):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if _has_glob(p))
        base = "/".join(parts[:first]) or "/"
        files = [f for f in _files_under(fs, base) if fnmatch.fnmatch(f, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"corpus path '{source}' does not exist; give a file, a directory, a "
                             "glob, an s3:// / gs:// URI or hf://OWNER/NAME[:CONFIG][/SPLIT]")
        if info.type == pafs.FileType.File:
            files, explicit = [path], True
        else:
            files = _files_under(fs, path)
    out = []
    for f in sorted(files):
        if not _visible(f):
            continue
        ff = _format_of(f, fmt)
        if ff is None and explicit:
            ff = "text"  # a single file named explicitly: read it as text
        if ff is not None:
            out.append((f, ff))
    if not out:
        raise InputError(f"corpus '{source}' holds no .parquet, .jsonl/.json or .txt files; put "
                         "documents there, or set corpus.format for files without an extension")
    return fs, out


def source_fingerprint(source: str, fmt: str = "auto", hub_root: str = "") -> str:
    """Identity of a source's contents (file names relative to the source, and sizes), to
    notice a changed corpus; the same files elsewhere (a moved run's own sources) keep it."""
    fs, files = list_source(source, fmt, hub_root)
    if hub.is_hub(source):  # the spec, and the files' names inside the repo and sizes
        infos = fs.get_file_info([p for p, _ in files])
        repo = hub.parse(source).repo
        return fingerprint([source] + [(i.path.split(repo, 1)[-1], i.size) for i in infos])
    _, path = filesystem(source)
    base = path.split("*")[0].split("?")[0].split("[")[0] if _has_glob(path) else path
    base = base if fs.get_file_info(base).type == pafs.FileType.Directory else os.path.dirname(base)
    sizes = fs.get_file_info([p for p, _ in files])
    return fingerprint([(i.path[len(base):].lstrip("/"), i.size) for i in sizes])


def domain_split_source(domain: str, domain_dir: str, split: str) -> str:
    """The file, glob or directory holding one split of a domain directory."""
    fs, path = filesystem(domain_dir)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise InputError(f"domain '{domain}': '{domain_dir}' is not a directory; give a directory "
                         "holding train/valid/test files (train.parquet, train.jsonl, train.txt) "
                         "or sub-directories")
    entries = fs.get_file_info(pafs.FileSelector(path))
    for e in entries:
        if e.base_name == split and e.type == pafs.FileType.Directory:
            return _uri_like(domain_dir, e.path)
    matches = [e.path for e in entries if e.type == pafs.FileType.File and
               (e.base_name.split(".")[0] == split or e.base_name.startswith((split + "-", split + "_")))
               and _format_of(e.path, "auto")]
    if not matches:
        raise InputError(f"domain '{domain}': no '{split}' split in '{domain_dir}'; add "
                         f"{split}.parquet, {split}.jsonl, {split}.txt or a '{split}/' directory")
    if len(matches) == 1:
        return _uri_like(domain_dir, matches[0])
    return _uri_like(domain_dir, os.path.join(path, f"{split}[-_.]*"))


def _uri_like(original: str, path: str) -> str:
    """A path found inside ``original``'s filesystem, spelled like ``original`` (keeps s3://)."""
    if "://" in original and not original.startswith("file://"):
        scheme = original.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path


# --------------------------------------------------------------------------------------------
# Reading: one Ray Dataset of (doc_id, text) for a source
# --------------------------------------------------------------------------------------------

def _check_parquet(fs: pafs.FileSystem, path: str, text_column: str) -> None:
    """Footer check on the driver: a corrupt file or a missing column named before work starts."""
    try:
        schema = pq.read_schema(fs.open_input_file(path))
    except Exception as e:  # ArrowInvalid, OSError: not a parquet file
        raise InputError(f"'{path}' is not a readable parquet file ({e}); re-export it or remove "
                         "it from the corpus") from None
    if text_column not in schema.names:
        raise InputError(f"'{path}' has no text column '{text_column}' (columns: "
                         f"{', '.join(schema.names)}); set corpus.text_column "
                         f"(--corpus.text_column NAME) to the column holding the text")


class _Normalise:
    """Batch → (doc_id, text): decode text files, split on form feeds, drop empty documents.
    A plain function object (task pool): it holds only small settings."""

    def __init__(self, cfg: CorpusConfig, counter: Any, source: str) -> None:
        self.text_column = cfg.text_column
        self.on_bad_utf8 = cfg.on_bad_utf8
        self.max_chars = cfg.max_document_chars
        self.counter = counter
        self.source = source

    def _bad_text(self, path: str, message: str) -> None:
        """A text file that is not UTF-8 text: the error, or skipped (``on_bad_utf8``)."""
        if self.on_bad_utf8 == "fail":
            fail(self.counter, path, InputError(
                f"'{path}' {message}, or set corpus.on_bad_utf8: skip to skip such files"))
        report(self.counter, path, skipped_files=1)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        texts: list[str] = []
        if "bytes" in batch:  # plain-text files: one document per file (form feeds split)
            for raw, path in zip(batch["bytes"], batch["path"]):
                raw = bytes(raw)
                if looks_utf16(raw[:4096]):  # valid UTF-8 bytes, but the text is UTF-16
                    self._bad_text(path, "is UTF-16 (or binary), not UTF-8: it holds NUL bytes; "
                                   "convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
                    continue
                try:
                    content = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad_text(path, f"is not UTF-8 text (bad byte at offset {e.start}); "
                                   "convert it to UTF-8")
                    continue
                texts.extend((t, path) for t in content.split(DOC_SEPARATOR))
        else:
            if self.text_column not in batch:
                where = batch.get("path", [self.source])
                where = where[0] if len(where) else self.source
                fail(self.counter, where, InputError(
                    f"'{where}' has no text field '{self.text_column}' (fields: "
                    f"{', '.join(k for k in batch if k != 'path')}); set corpus.text_column "
                    "(--corpus.text_column NAME)"))
            where = batch.get("path", [self.source] * len(batch[self.text_column]))
            texts = [(t, p) for t, p in zip(batch[self.text_column], where) if isinstance(t, str)]
        docs = []
        for text, path in texts:
            text = text.strip()
            if len(text) > self.max_chars:
                fail(self.counter, path, InputError(
                    f"'{path}' holds a document of {len(text):,} characters, more than "
                    f"corpus.max_document_chars ({self.max_chars:,}); split it into documents "
                    "(form feeds in a text file, one JSON line or parquet row each), or raise "
                    "--corpus.max_document_chars"))
            if text:
                docs.append(text)
        return {"doc_id": [doc_id(t) for t in docs], "text": docs}


def read_documents(source: str, cfg: CorpusConfig, counter: Any = None):
    """A Ray Dataset of ``(doc_id, text)`` for a source (see module doc); streamed."""
    fs, paths = list_source(source, cfg.format, cfg.hub_root)
    fn = _Normalise(cfg, counter, source)
    raw = []  # one raw dataset per format: each is normalised on its own, then unioned
    by_format: dict[str, list[str]] = {}
    for p, f in paths:
        by_format.setdefault(f, []).append(p)
    for f, files in by_format.items():
        if f == "parquet":
            for p in files:
                _check_parquet(fs, p, cfg.text_column)
            raw.append(ray.data.read_parquet(files, filesystem=fs, file_extensions=None)
                       .select_columns([cfg.text_column]))
        elif f == "jsonl":
            # lines=False is pyarrow's reader, which *is* a JSON-lines reader and, unlike
            # Ray's pandas path (lines=True), accepts a filesystem (needed for s3:// / gs://).
            raw.append(ray.data.read_json(files, filesystem=fs, include_paths=True,
                                          file_extensions=None))
        else:
            raw.append(ray.data.read_binary_files(files, filesystem=fs, include_paths=True))
    parts = [r.map_batches(fn, batch_format="default", batch_size=256,
                           compute=ray.data.TaskPoolStrategy()) for r in raw]
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

def _json_diagnosis(source: str, cfg: CorpusConfig) -> InputError | None:
    """After a failed read: the first JSON file of the source that is malformed, named with its
    line (Ray's reader error names neither), or None when every JSON file reads."""
    fs, files = list_source(source, cfg.format, cfg.hub_root)
    for path, fmt in files:
        if fmt == "jsonl":
            problem = json_problem(fs, path)
            if problem is not None:
                return problem
    return None


# max_document_chars is not part of a corpus's config fingerprint: it only refuses input, so
# every corpus it lets through is the same artifact as before (runs made earlier stay valid).
def _corpus_config(cfg: CorpusConfig) -> dict[str, Any]:
    return {"text_column": cfg.text_column, "format": cfg.format, "on_bad_utf8": cfg.on_bad_utf8}


def ingest_source(uri: str, source: str, cfg: CorpusConfig, *, what: str, limit: int = 0,
                  force: bool = False, run: RunLayout | None = None) -> str:
    """Ingest one source into the artifact ``uri`` (skipped when done). ``what`` names the
    corpus in error messages (e.g. "generic corpus", "domain 'law' train split"). The source
    is known by its contents (``source_fingerprint``), not its path, so a run's own sources
    (``data/sources``) move with it; the manifest names it relative to ``run``."""
    config = {**_corpus_config(cfg), "limit": limit,
              "source_fingerprint": source_fingerprint(source, cfg.format, cfg.hub_root)}
    st = Stage(uri, stage="corpus", config=config, force=force)
    if st.done:
        return uri
    counter = new_counter()
    with st.publish() as out:
        ds = read_documents(source, cfg, counter)
        if limit:
            # a uniform, deterministic sample: the `limit` smallest content hashes (doc_id), not
            # the first documents in read order (files are often grouped by source: a prefix
            # would be one genre); Ray Data's sort is distributed
            ds = ds.sort("doc_id").limit(limit)
        try:
            write_dataset(ds, out, counter, min_rows_per_file=MIN_DOCS_PER_FILE,
                          max_rows_per_file=MAX_DOCS_PER_FILE)
        except StageError:
            problem = _json_diagnosis(source, cfg)
            if problem is None:
                raise
            raise problem from None
        rows = count_rows(out.uri)
        totals = counter.totals()
        skipped = counter.keys_with("skipped_files")
        if rows == 0:
            raise InputError(f"the {what} '{source}' has no documents (every file is empty"
                             f"{' or was skipped as non-UTF-8' if skipped else ''}); give a corpus "
                             "with text")
        out.manifest.update({"source": run.relative(source) if run else source,
                             "rows": rows, "documents": rows,
                             "skipped_documents": int(totals.get("skipped_files", 0)),
                             "skipped_files": skipped})
    if skipped:
        log.warning("%s: skipped %d non-UTF-8 file(s), e.g. %s", what, len(skipped), skipped[0])
    return uri


def ingest_generic(layout: RunLayout, cfg: CorpusConfig, source: str | None = None,
                   force: bool = False) -> str:
    """``data/corpus/generic`` from ``source`` (default ``cfg.generic``)."""
    source = source or cfg.generic
    return ingest_source(layout.corpus_generic(), source, cfg, what="generic corpus",
                         limit=cfg.max_generic_docs, force=force, run=layout)


def ingest_domain_split(layout: RunLayout, cfg: CorpusConfig, domain: str, domain_dir: str,
                        split: str, force: bool = False) -> str:
    """``data/corpus/domains/<domain>/<split>`` from the split's files in ``domain_dir``."""
    src = domain_split_source(domain, domain_dir, split)
    return ingest_source(layout.corpus_domain(domain, split), src, cfg,
                         what=f"domain '{domain}' {split} split", force=force, run=layout)


def ingest_domain(layout: RunLayout, cfg: CorpusConfig, domain: str, domain_dir: str,
                  force: bool = False) -> dict[str, str]:
    """``data/corpus/domains/<domain>/<split>`` for train, valid and test."""
    return {split: ingest_domain_split(layout, cfg, domain, domain_dir, split, force=force)
            for split in SPLITS}


def corpus_documents(uri: str) -> int:
    """Documents in a published corpus artifact (from its manifest)."""
    m = manifest(uri)
    return int(m["rows"]) if m else 0
