"""The offline demo corpus: a generic corpus and held-out domains built from Debian packages.

The paper's corpora (c4, the Pile) cannot be downloaded here, but the Debian archive can, and
many of its documentation packages are large, real, human-written English text in clearly
different genres. ``build_demo_corpus`` downloads those ``.deb`` files with ``apt-get download``
(no root needed), reads them with ``dpkg-deb --fsys-tarfile`` (nothing is installed), converts
each file format to plain text (:mod:`slm.pipeline.demo_text`), splits it into documents and
writes::

    <out>/generic/part-00000.parquet ...           doc_id, text, source
    <out>/domains/<name>/{train,valid,test}.parquet
    <out>/manifest.json                            packages (version, sha256), counts, path

Domain packages never feed the generic corpus, and any generic document whose hash is also a
domain document is dropped. The build is deterministic: the same ``.deb`` files give
byte-identical parquet files (documents sorted by ``doc_id``, splits by a seeded hash of it).
It is written atomically (:func:`slm.stage.publish`): a half-built corpus is never cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from slm.errors import StageError
from slm.pipeline import demo_text as dt
from slm.pipeline.debian import fetch_debs, read_deb, resolve_package, sha256_file, unpack
from slm.stage import Stage, manifest

CORPUS_VERSION = "v1"
SPLIT_SEED = 0
VALID_PERCENT = 10
TEST_PERCENT = 10
PART_CHARS = 8_000_000          # generic text per parquet part (several parts: parallel reads)
ROW_GROUP_SIZE = 4096
MIN_DOC_CHARS = 20              # shorter pieces (empty sections, stray headings) are dropped


@dataclass(frozen=True)
class Source:
    """Documents from one Debian package: the files matching ``include`` (fnmatch patterns on
    paths inside the package; ``*`` crosses ``/``) minus ``exclude``, converted as ``fmt``.
    ``package`` may list alternatives ``a|b`` (first one the archive has). ``max_chars`` > 0
    keeps a deterministic subset (smallest doc_ids first) of about that much text.
    ``min_chars``: consecutive sections/entries are grouped into documents of at least this
    many characters (0: one document per section)."""

    package: str
    fmt: str  # html | man | pod | dict | fortune | wordnet | text
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    max_chars: int = 0
    min_chars: int = 2000


@dataclass(frozen=True)
class CorpusSpec:
    """What goes into the corpus: held-out domains and the generic mix."""

    domains: dict[str, tuple[Source, ...]]
    generic: tuple[Source, ...]
    version: str = CORPUS_VERSION


_NO_LICENCE = ("*/copyright", "*license*", "*licence*", "*copying*", "*/copyright.html")

DOMAINS: dict[str, tuple[Source, ...]] = {
    "jargon": (Source("dict-jargon", "dict", ("usr/share/dictd/jargon.*",)),),
    "foldoc": (Source("dict-foldoc", "dict", ("usr/share/dictd/foldoc.*",)),),
    "fortunes": (
        Source("fortunes-min", "fortune", ("usr/share/games/fortunes/*",), ("*.dat", "*.u8")),
        Source("fortunes", "fortune", ("usr/share/games/fortunes/*",),
               ("*.dat", "*.u8", "*/ascii-art")),
    ),
    "perl": (Source("perl-doc", "pod", ("usr/share/perl/*/pod/*.pod",),
                    ("*/perlartistic.pod", "*/perlgpl.pod")),),
    "sqlite": (Source("sqlite3-doc", "html", ("usr/share/doc/sqlite3/*.html",),
                      _NO_LICENCE + ("*/sitemap.html", "*/keyword_index.html", "*/toc.html",
                                     "*/docs.html", "*/doclist.html")),),
    # a small manual: one document per section, so its splits hold enough documents
    "gnu-standards": (Source("gnu-standards", "html", ("usr/share/doc/gnu-standards/*.html",),
                             min_chars=0),),
}

GENERIC: tuple[Source, ...] = (
    Source("manpages", "man", ("usr/share/man/man*/*",)),
    Source("manpages-dev", "man", ("usr/share/man/man*/*",)),
    Source("debian-reference-en", "html", ("usr/share/debian-reference/*.en.html",),
           ("*/index.en.html",)),
    Source("python3.11-doc|python3.12-doc|python3.13-doc", "html",
           ("usr/share/doc/python3.*/html/*.html",),
           _NO_LICENCE + ("*/_sources/*", "*/genindex*", "*/py-modindex.html", "*/search.html",
                          "*/contents.html", "*/whatsnew/changelog.html", "*/html/index.html",
                          "*/bugs.html", "*/about.html")),
    Source("octave-doc", "html", ("usr/share/doc/octave/octave.html/*.html",),
           ("*Index.html", "*/index.html", "*/Copying.html", "*/XREF*.html")),
    Source("maxima-doc", "html", ("usr/share/doc/maxima-doc/html/maxima_*.html",),
           ("*maxima_toc.html", "*singlepage*")),
    # large reference texts, capped so that no single genre dominates the generic mix
    Source("vim-runtime", "text", ("usr/share/vim/vim*/doc/*.txt",), ("*/uganda.txt",),
           max_chars=5_000_000),
    Source("wordnet-base", "wordnet", ("usr/share/wordnet/data.*",), max_chars=3_000_000),
    Source("dict-gcide", "dict", ("usr/share/dictd/gcide.*",), max_chars=3_000_000),
)

DEMO_SPEC = CorpusSpec(DOMAINS, GENERIC)


@dataclass
class Doc:
    """One document: ``doc_id`` = first 16 hex of sha256(text); ``source`` = package:path."""

    text: str
    source: str
    doc_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.doc_id = hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------

def cache_root() -> str:
    """``$SLM_CACHE_DIR``, else ``~/.cache/slm``."""
    return os.environ.get("SLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "slm")


def default_corpus_dir() -> str:
    return os.path.join(cache_root(), "demo-corpus", CORPUS_VERSION)


def default_deb_cache() -> str:
    return os.path.join(cache_root(), "debs")


# --------------------------------------------------------------------------------------------
# Files of a package → documents (one function per format in demo_text)
# --------------------------------------------------------------------------------------------

def _docs_html(files: dict[str, bytes], min_chars: int) -> list[tuple[str, str]]:
    return [(p, d) for p, data in files.items()
            for d in dt.group_sections(dt.html_to_sections(dt.decode(data)), min_chars)]


def _docs_man(files: dict[str, bytes], min_chars: int) -> list[tuple[str, str]]:
    # one document per man page: min_chars does not apply
    groff = dt.groff_command()
    pages = {p: data for p, data in files.items() if not dt.is_man_alias(data)}
    # groff runs out of process: threads keep every core busy without pickling anything
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        texts = pool.map(lambda data: dt.man_to_text(data, groff), pages.values())
        return [(p, t) for p, t in zip(pages, texts) if t]


def _docs_pod(files: dict[str, bytes], min_chars: int) -> list[tuple[str, str]]:
    return [(p, d) for p, data in files.items()
            for d in dt.group_sections(dt.pod_to_sections(dt.decode(data)), min_chars)]


def _docs_dict(files: dict[str, bytes], min_chars: int) -> list[tuple[str, str]]:
    out = []
    for p in sorted(files):
        if p.endswith(".index"):
            data = files.get(p[:-len(".index")] + ".dict")
            if data is None:
                raise StageError(f"dictionary index '{p}' has no matching .dict(.dz) file")
            out += [(p[:-len(".index")], d)
                    for d in dt.group_chunks(dt.dict_entries(dt.decode(files[p]), data), min_chars)]
    return out


def _docs_fortune(files: dict[str, bytes], min_chars: int) -> list[tuple[str, str]]:
    # one document per fortune: min_chars does not apply
    return [(p, d) for p, data in files.items() for d in dt.fortunes_to_docs(dt.decode(data))]


def _docs_wordnet(files: dict[str, bytes], min_chars: int) -> list[tuple[str, str]]:
    glosses = []
    for p in sorted(files):
        pos = p.rsplit(".", 1)[-1]
        glosses += [(lex, pos, g) for lex, g in dt.wordnet_glosses(dt.decode(files[p]), pos)]
    glosses.sort()  # group by lexicographer file (noun.animal, verb.motion...): topical documents
    out = []
    for lex in sorted({g[0] for g in glosses}):
        chunk = [g[2] for g in glosses if g[0] == lex]
        out += [(f"usr/share/wordnet/lexfile-{lex:02d}", d) for d in dt.group_chunks(chunk, min_chars)]
    return out


def _docs_text(files: dict[str, bytes], min_chars: int) -> list[tuple[str, str]]:
    return [(p, d) for p, data in files.items()
            for d in dt.group_sections(dt.text_to_sections(dt.decode(data)), min_chars)]


CONVERTERS = {"html": _docs_html, "man": _docs_man, "pod": _docs_pod, "dict": _docs_dict,
              "fortune": _docs_fortune, "wordnet": _docs_wordnet, "text": _docs_text}


def source_docs(src: Source, package: str, deb: str) -> list[Doc]:
    """The documents of one Source, deduplicated, sorted by doc_id, capped by max_chars."""
    raw = read_deb(deb, src.include, src.exclude)
    files = dict(sorted(unpack(p, d) for p, d in raw.items()))
    if not files:
        raise StageError(f"package '{package}' has no files matching {list(src.include)}; the "
                         "package layout changed: update the demo corpus spec")
    docs = {}
    for path, text in CONVERTERS[src.fmt](files, src.min_chars):
        if len(text) >= MIN_DOC_CHARS:
            d = Doc(text, f"{package}:{path}")
            docs.setdefault(d.doc_id, d)
    out = sorted(docs.values(), key=lambda d: d.doc_id)
    if src.max_chars:
        kept, total = [], 0
        for d in out:
            if total >= src.max_chars:
                break
            kept.append(d)
            total += len(d.text)
        out = kept
    return out


def convert_sources(sources: list[Source], names: list[str], debs: dict[str, str]) -> list[list[Doc]]:
    """``source_docs`` of every source, in order. Serial on purpose: a process pool would have
    to re-import the caller's ``__main__`` (spawn) or fork a process holding Ray's threads; the
    expensive external step (groff) already runs on a thread pool."""
    return [source_docs(s, n, debs[n]) for s, n in zip(sources, names)]


# --------------------------------------------------------------------------------------------
# Splits, parquet, counts
# --------------------------------------------------------------------------------------------

def split_of(doc_id: str, seed: int = SPLIT_SEED) -> str:
    """train / valid / test from a seeded hash of the doc_id (deterministic, ~80/10/10)."""
    bucket = int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:8], 16) % 100
    if bucket < VALID_PERCENT:
        return "valid"
    if bucket < VALID_PERCENT + TEST_PERCENT:
        return "test"
    return "train"


def merge_docs(groups: list[list[Doc]]) -> list[Doc]:
    """One sorted list without duplicate texts (the first source in sort order keeps it)."""
    best: dict[str, Doc] = {}
    for d in (d for g in groups for d in g):
        if d.doc_id not in best or d.source < best[d.doc_id].source:
            best[d.doc_id] = d
    return [best[k] for k in sorted(best)]


def write_parquet(docs: list[Doc], path: str) -> dict[str, Any]:
    """Write docs (already sorted) as doc_id/text/source; no timestamps, fixed row groups."""
    table = pa.table({"doc_id": pa.array([d.doc_id for d in docs], pa.string()),
                      "text": pa.array([d.text for d in docs], pa.string()),
                      "source": pa.array([d.source for d in docs], pa.string())})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_SIZE)
    return {"sha256": sha256_file(path)}


def counts(docs: list[Doc]) -> dict[str, int]:
    return {"documents": len(docs), "chars": sum(len(d.text) for d in docs),
            "words": sum(len(d.text.split()) for d in docs),
            "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}


def _write_generic(docs: list[Doc], root: str) -> dict[str, Any]:
    parts: list[list[Doc]] = [[]]
    size = 0
    for d in docs:
        if size >= PART_CHARS:
            parts.append([])
            size = 0
        parts[-1].append(d)
        size += len(d.text)
    files = {}
    for i, part in enumerate(parts):
        rel = f"generic/part-{i:05d}.parquet"
        files[rel] = write_parquet(part, os.path.join(root, rel))["sha256"]
    return {**counts(docs), "files": files}


def _write_domain(name: str, docs: list[Doc], root: str) -> dict[str, Any]:
    out = {}
    for split in ("train", "valid", "test"):
        part = [d for d in docs if split_of(d.doc_id) == split]
        rel = f"domains/{name}/{split}.parquet"
        out[split] = {**counts(part), "files": {rel: write_parquet(part, os.path.join(root, rel))["sha256"]}}
    return out


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _build_lock(out: str) -> Iterator[None]:
    """One builder per output at a time (several processes may ask for the default cache)."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        f = open(os.path.abspath(out) + ".lock", "w")
    except OSError as e:
        raise StageError(f"cannot write the demo corpus next to '{out}': {e.strerror}. Choose a "
                         "writable location (`slm data demo --out PATH` or $SLM_CACHE_DIR)") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _spec_config(spec: CorpusSpec) -> dict[str, Any]:
    return {"version": spec.version,
            "domains": {k: [asdict(s) for s in v] for k, v in spec.domains.items()},
            "generic": [asdict(s) for s in spec.generic],
            "split": {"seed": SPLIT_SEED, "valid_percent": VALID_PERCENT,
                      "test_percent": TEST_PERCENT}}


def _build(out: str, deb_cache: str, spec: CorpusSpec, force: bool = False) -> dict[str, Any]:
    """Build ``spec`` into ``out`` atomically (see module doc); return the manifest."""
    config = _spec_config(spec)
    out = os.path.abspath(out)
    with _build_lock(out):
        st = Stage(out, stage="demo-corpus", config=config, force=force)
        if st.done:
            return {**(manifest(out) or {}), "path": out}
        t0 = time.time()
        with st.publish() as staging:
            root = staging.local_dir
            sources = [(None, s) for s in spec.generic] + \
                      [(d, s) for d, srcs in spec.domains.items() for s in srcs]
            records = {s.package: resolve_package(s.package) for _, s in sources}
            debs = fetch_debs(list({r["name"]: r for r in records.values()}.values()), deb_cache)
            converted = convert_sources([s for _, s in sources],
                                        [records[s.package]["name"] for _, s in sources], debs)
            generic, domains = [], {d: [] for d in spec.domains}
            for (domain, _), docs in zip(sources, converted):
                (generic if domain is None else domains[domain]).append(docs)
            domain_docs = {d: merge_docs(g) for d, g in domains.items()}
            held_out = {d.doc_id for docs in domain_docs.values() for d in docs}
            all_generic = merge_docs(generic)
            generic_docs = [d for d in all_generic if d.doc_id not in held_out]
            package_roles: dict[str, list[str]] = {}
            for domain, s in sources:
                package_roles.setdefault(records[s.package]["name"], []).append(
                    "generic" if domain is None else f"domain:{domain}")
            staging.manifest.update({
                "corpus": "slm-demo-corpus",
                "version": spec.version,
                "path": out,
                "packages": {r["name"]: {**r, "roles": sorted(set(package_roles[r["name"]]))}
                             for r in sorted(records.values(), key=lambda r: r["name"])},
                "generic": {**_write_generic(generic_docs, root),
                            "held_out_duplicates": len(all_generic) - len(generic_docs)},
                "domains": {d: _write_domain(d, docs, root) for d, docs in domain_docs.items()},
                "build_seconds": round(time.time() - t0, 1),
            })
        return manifest(out) or {}


def build_demo_corpus(out: str | None = None, force: bool = False) -> dict[str, Any]:
    """Build the demo corpus at ``out`` (default ``$SLM_CACHE_DIR/demo-corpus/v1`` or
    ``~/.cache/slm/demo-corpus/v1``), or return the manifest of the one already there.
    Downloaded .debs are cached in ``<cache>/debs`` and reused when their sha256 matches.
    ``force`` rebuilds. Raises StageError/InputError (naming the package and the fix) when
    apt-get is missing, a package is unknown or a download fails; nothing is then published."""
    return _build(out or default_corpus_dir(), default_deb_cache(), DEMO_SPEC, force=force)


def demo_corpus_sources(manifest_or_path: dict[str, Any] | str) -> tuple[str, dict[str, str]]:
    """``(generic directory, {domain: domain directory})`` of a built demo corpus, given its
    manifest or its path. Each domain directory holds train/valid/test.parquet."""
    if isinstance(manifest_or_path, dict):
        path = manifest_or_path.get("path")
        m = manifest_or_path
    else:
        path = manifest_or_path
        m = manifest(path) if path else None
    if not path or m is None or "domains" not in m:
        raise StageError(f"no built demo corpus at '{path}'; run `slm data demo` (or "
                         "build_demo_corpus()) first")
    return (os.path.join(path, "generic"),
            {d: os.path.join(path, "domains", d) for d in sorted(m["domains"])})
