"""Atomic, resumable artifacts: the one mechanism every stage shares.

An artifact is a directory (local path or object-storage URI) that is *done* exactly when its
``manifest.json`` exists. A stage writes into a staging location and publishes last:

* local paths: everything is written to ``<dir>.tmp-<id>/``, the manifest is written there,
  then the directory is renamed onto ``<dir>`` (a rename is atomic on one filesystem);
* object storage (no rename): files are written into ``<dir>/``, the manifest last, so a
  reader that waits for the manifest never sees a partial artifact.

A crash (or a full disk) mid-stage leaves no manifest, so the artifact is not done and the next
run redoes it, clearing the leftovers. A done artifact whose recorded fingerprint (config +
inputs) differs from the current one is *stale*: we refuse to reuse it silently.

A stage opens with ``Stage`` (fingerprint → done? → build in a staging location → publish):

    st = Stage(layout.windows(name), stage="windows", config={"seq_len": 1024},
               inputs=input_fingerprints(layout, layout.corpus_generic(), layout.tokenizer))
    if st.done:                          # published with this fingerprint: nothing to do
        return st.uri
    with st.publish() as out:            # nothing is visible until the block exits normally
        write_files(out.path, out.fs)    # or out.local_dir for libraries that want a directory
        out.manifest["rows"] = ...

Input fingerprints are keyed by the inputs' paths *relative to the run*, so a run opened
through another path (relative, absolute, moved, copied) has the same fingerprints.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import pyarrow.fs as pafs

from slm.errors import StageError

if TYPE_CHECKING:  # slm.layout imports this module
    from slm.layout import RunLayout

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------------
# Paths on local disk or object storage
# --------------------------------------------------------------------------------------------

def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or s3:// / gs:// URI."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pragma: no cover - depends on cloud credentials
        raise StageError(f"cannot open '{uri}': {e}. Check the URI scheme and the credentials "
                         "(AWS_*/GOOGLE_APPLICATION_CREDENTIALS) on every node") from None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    fs, path = filesystem(uri)
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")
    with fs.open_output_stream(path) as f:
        f.write(data)


def subdirs(uri: str) -> list[str]:
    """Names of the sub-directories of ``uri``, sorted ([] when it does not exist)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory's files from ``src`` to ``dst``, each a local path or a URI."""
    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (config, input manifests)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact (recorded in every manifest)."""
    out = {"python": platform.python_version()}
    for pkg in ("slm", "ray", "torch", "deepspeed", "transformers", "tokenizers",
                "sentence-transformers", "pyarrow", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------

def manifest(uri: str) -> dict[str, Any] | None:
    """The artifact's manifest, or None when it is not done."""
    m = join(uri, MANIFEST)
    if not exists(m):
        return None
    try:
        return read_json(m)
    except (OSError, ValueError) as e:
        raise StageError(f"manifest '{m}' is unreadable ({e}); delete '{uri}' to rebuild it") from None


def is_done(uri: str, fp: str | None = None) -> bool:
    """True when ``uri`` is a published artifact. With ``fp``, a done artifact built from
    another config/inputs raises StageError instead of being reused silently."""
    m = manifest(uri)
    if m is None:
        return False
    if fp is not None and m.get("fingerprint") not in (None, fp):
        raise StageError(
            f"artifact '{uri}' was built with a different config or inputs "
            f"(fingerprint {m.get('fingerprint')} != {fp}). Use another run_dir, or pass --force "
            "to rebuild it (and the stages after it).")
    return True


def input_fingerprints(run: RunLayout, *uris: str) -> dict[str, str]:
    """Fingerprints of the input artifacts (from their manifests), keyed by their run-relative
    paths (``run.relative``), to record and compare."""
    out = {}
    for u in uris:
        m = manifest(u)
        if m is None:
            raise StageError(f"input artifact '{u}' is not done; run its stage first")
        out[run.relative(u)] = m.get("fingerprint", "")
    return out


@dataclass(frozen=True)
class Stage:
    """The opening of one stage (see module doc): ``done`` when ``uri`` is published with this
    config and these inputs (StageError when it was built from others), else ``publish()``."""

    uri: str
    stage: str
    config: Any = None
    inputs: dict[str, str] = field(default_factory=dict)  # from input_fingerprints (+ extras)
    force: bool = False  # rebuild even when done

    @property
    def fingerprint(self) -> str:
        return fingerprint({"config": self.config, "inputs": self.inputs})

    @property
    def done(self) -> bool:
        return not self.force and is_done(self.uri, self.fingerprint)

    def publish(self) -> ContextManager[Staging]:
        return publish(self.uri, stage=self.stage, config=self.config, inputs=self.inputs,
                       force=self.force)


@dataclass
class Staging:
    """Where a running stage writes: ``uri`` (through ``fs``/``path``), or ``local_dir`` for
    libraries that want a local directory (only for local artifacts)."""

    uri: str
    fs: pafs.FileSystem
    path: str
    final_uri: str
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def local_dir(self) -> str:
        if is_remote(self.uri):
            raise StageError(f"'{self.final_uri}' is on object storage; write through Staging.fs")
        return self.path

    def file(self, *parts: str) -> str:
        return join(self.uri, *parts)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@contextlib.contextmanager
def publish(uri: str, *, stage: str, config: Any = None, inputs: dict[str, str] | None = None,
            force: bool = False) -> Iterator[Staging]:
    """Write an artifact atomically (see module doc). Yields a Staging; on normal exit the
    manifest (stage, fingerprint, config, inputs, versions, timings + what the stage added)
    is written and the artifact published; on an exception nothing is published."""
    fp = fingerprint({"config": config, "inputs": inputs or {}})
    fs, final_path = filesystem(uri)
    if force and exists(uri):
        remove(uri)
    elif is_done(uri, fp):  # callers normally check first; publishing twice is a bug
        raise StageError(f"artifact '{uri}' is already done")
    t0 = time.time()
    if is_remote(uri):
        if exists(uri):
            remove(uri)  # leftovers of a crashed attempt: never mixed with new output
        stage_uri, stage_path = uri, final_path
    else:
        parent = os.path.dirname(final_path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise StageError(f"cannot create output directory '{parent}': {e.strerror}. "
                             "Choose a writable run_dir (--run_dir PATH)") from None
        if not os.access(parent, os.W_OK):
            raise StageError(f"output directory '{parent}' is not writable. "
                             "Choose a writable run_dir (--run_dir PATH) or fix its permissions")
        for leftover in os.listdir(parent):  # crashed attempts of this artifact
            if leftover.startswith(os.path.basename(final_path) + ".tmp-"):
                shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
        stage_path = f"{final_path}.tmp-{uuid.uuid4().hex[:8]}"
        stage_uri = stage_path
    fs.create_dir(stage_path, recursive=True)
    staging = Staging(uri=stage_uri, fs=fs, path=stage_path, final_uri=uri)
    try:
        yield staging
        record = {
            "stage": stage,
            "fingerprint": fp,
            "config": config,
            "inputs": inputs or {},
            "versions": versions(),
            "started": t0,
            "seconds": round(time.time() - t0, 3),
            "complete": True,
            **staging.manifest,
        }
        write_json(join(stage_uri, MANIFEST), record)
        if not is_remote(uri):
            if os.path.exists(final_path):  # an undone (manifest-less) earlier attempt
                shutil.rmtree(final_path)
            os.rename(stage_path, final_path)
    except BaseException as e:
        if not is_remote(uri):
            shutil.rmtree(stage_path, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permission lost mid-stage: nothing published
            raise wrap_os_error(e, uri) from e
        raise


def wrap_os_error(e: OSError, uri: str) -> StageError:
    """A write failure (disk full, permission) as a user-facing error; nothing was published."""
    return StageError(f"writing '{uri}' failed: {e.strerror or e}. Nothing was published; free "
                      "space or choose another run_dir, then re-run (completed stages are kept)")
