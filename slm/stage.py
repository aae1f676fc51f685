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
import contextvars
import functools
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import tempfile
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
    """(pyarrow filesystem, path inside it) for a local path or s3:// / gs:// URI.

    ``s3://`` gets an ``S3FileSystem`` with bounded connect timeout and retries (so an
    unreachable endpoint fails in seconds, not minutes), the endpoint of ``AWS_ENDPOINT_URL_S3``
    / ``AWS_ENDPOINT_URL`` (as boto3 reads them) and, like ``from_uri``, the bucket's region
    resolved when no endpoint is set; one filesystem per bucket and environment (cached).
    Credentials come from the usual AWS chain (environment, ~/.aws, instance metadata)."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    try:
        if uri.startswith("s3://") and "?" not in uri:
            path = uri.removeprefix("s3://").rstrip("/")
            return _s3_filesystem(path.split("/", 1)[0], *_s3_environment()), path
        return pafs.FileSystem.from_uri(uri)
    except OSError as e:
        raise storage_error(e, uri) from None
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
    if not is_remote(dst):  # a local copy needs its folders (object storage has none)
        for info in sfs.get_file_info(pafs.FileSelector(spath, recursive=True)):
            if info.type == pafs.FileType.File:
                rel = os.path.relpath(os.path.dirname(info.path), spath)
                os.makedirs(os.path.normpath(os.path.join(dpath, rel)), exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def listing(uri: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file under ``uri``, sorted ([] when it does not exist)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    root = path.rstrip("/") + "/"
    return sorted((i.path[len(root):], i.size) for i in infos if i.type == pafs.FileType.File)


def local_dir(uri: str, kind: str = "artifact") -> str:
    """A node-local directory holding the files of the directory ``uri``, for libraries that
    open local paths only (``from_pretrained``, safetensors): ``uri`` itself when it is local,
    else a copy in this node's temp dir, keyed by the artifact's manifest fingerprint (or its
    URI and file listing when it has none), downloaded once per node and published there by a
    rename (concurrent readers on one node never see a partial copy). ``kind`` names the
    cache directory (``slm-<kind>-<key>``), for people reading /tmp."""
    if not is_remote(uri):
        return os.path.abspath(uri.removeprefix("file://"))
    m = manifest(uri)
    key = fingerprint({"uri": uri, "fp": m["fingerprint"]} if m and m.get("fingerprint")
                      else {"uri": uri, "files": listing(uri)})
    dest = os.path.join(tempfile.gettempdir(), f"slm-{kind}-{key}")
    if not os.path.isdir(dest):
        tmp = f"{dest}.part-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        os.makedirs(tmp, exist_ok=True)  # pyarrow's copy_files does not create the root
        try:
            copy_dir(uri, tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise storage_error(e, uri) from None
        try:
            os.rename(tmp, dest)
        except OSError:  # another process on this node published it first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


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


# How the running command can rebuild a stale artifact besides deleting it, e.g. "pass --force"
# (set with ``rebuild_hint`` only around the stages that the command's --force rebuilds).
_REBUILD_HINT: contextvars.ContextVar[str] = contextvars.ContextVar("slm_rebuild_hint", default="")


@contextlib.contextmanager
def rebuild_hint(hint: str) -> Iterator[None]:
    """Within the block, the stale-artifact error of ``is_done`` also offers ``hint`` (e.g.
    "pass --force") as a fix. Only for code whose artifacts that fix really rebuilds."""
    token = _REBUILD_HINT.set(hint)
    try:
        yield
    finally:
        _REBUILD_HINT.reset(token)


def rebuild_fix(layout: RunLayout) -> str:
    """How to rebuild a stale data artifact of a run: the command's own hint where it has one
    (``rebuild_hint``), else the data command, which every run has (its recipe is in the run).
    Computed on the driver: a Ray task does not see the driver's context variables."""
    return _REBUILD_HINT.get() or f"re-run `slm data run --recipe {layout.recipe} --force`"


def is_done(uri: str, fp: str | None = None) -> bool:
    """True when ``uri`` is a published artifact. With ``fp``, a done artifact built from
    another config/inputs raises StageError instead of being reused silently; the error names
    the fixes that always work (another run_dir, deleting the artifact) and the command's own
    (``rebuild_hint``) where it has one."""
    m = manifest(uri)
    if m is None:
        return False
    if fp is not None and m.get("fingerprint") not in (None, fp):
        hint = _REBUILD_HINT.get()
        raise StageError(
            f"artifact '{uri}' was built with a different config or inputs "
            f"(fingerprint {m.get('fingerprint')} != {fp}). Use another run_dir, or delete "
            f"'{uri}' (and the artifacts built from it) to rebuild it"
            + (f", or {hint} to rebuild it (and the stages after it)." if hint else "."))
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


PARTIAL = ".slm-partial"  # object storage: marks a stage's own unfinished output (no rename there)


def _owned(uri: str, stage: str) -> bool:
    """May publishing ``stage`` at ``uri`` replace what is there? Only nothing, an empty
    directory, an artifact of the same stage (its manifest says so), or, on object storage, the
    unfinished output of the same stage (its PARTIAL marker says so). Anything else is refused
    with a StageError: slm never deletes what it did not create."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    fix = "move it away, or choose another output path"
    if info.type != pafs.FileType.Directory:
        raise StageError(f"'{uri}' is a file, not an slm artifact; refusing to replace it: {fix}")
    m = manifest(uri)
    if m is not None:
        if m.get("stage") != stage:
            raise StageError(f"'{uri}' holds a '{m.get('stage')}' artifact, not a '{stage}' one; "
                             f"refusing to replace it: {fix}")
        return True
    entries = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
    if not entries:
        return True
    if PARTIAL in entries:
        try:
            if read_json(join(uri, PARTIAL)).get("stage") == stage:
                return True
        except (OSError, ValueError):
            pass
    shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
    raise StageError(f"'{uri}' exists and was not written by slm's '{stage}' stage (no "
                     f"{MANIFEST}; it holds {shown}); slm does not delete what it did not "
                     f"create: {fix}")


@contextlib.contextmanager
def publish(uri: str, *, stage: str, config: Any = None, inputs: dict[str, str] | None = None,
            force: bool = False) -> Iterator[Staging]:
    """Write an artifact atomically (see module doc). Yields a Staging; on normal exit the
    manifest (stage, fingerprint, config, inputs, versions, timings + what the stage added)
    is written and the artifact published; on an exception nothing is published. What is at
    ``uri`` is replaced only when ``_owned`` says slm wrote it; locally the old artifact stays
    until the new one is complete."""
    fp = fingerprint({"config": config, "inputs": inputs or {}})
    fs, final_path = filesystem(uri)
    if not force and is_done(uri, fp):  # callers normally check first; publishing twice is a bug
        raise StageError(f"artifact '{uri}' is already done")
    replace = _owned(uri, stage)
    t0 = time.time()
    if is_remote(uri):
        if replace:  # no rename on object storage: the old or unfinished output goes first
            remove(uri)
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
        for leftover in os.listdir(parent):  # crashed attempts of this artifact (our names)
            if re.fullmatch(re.escape(os.path.basename(final_path)) + r"\.(tmp|old)-[0-9a-f]{8}", leftover):
                shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
        stage_path = f"{final_path}.tmp-{uuid.uuid4().hex[:8]}"
        stage_uri = stage_path
    fs.create_dir(stage_path, recursive=True)
    if is_remote(uri):
        write_json(join(stage_uri, PARTIAL), {"stage": stage, "started": t0})
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
        if is_remote(uri):
            remove(join(stage_uri, PARTIAL))
        else:
            old = f"{final_path}.old-{uuid.uuid4().hex[:8]}"
            if os.path.exists(final_path):  # checked by _owned: ours, or an empty directory
                os.rename(final_path, old)
            os.rename(stage_path, final_path)
            shutil.rmtree(old, ignore_errors=True)
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


# --------------------------------------------------------------------------------------------
# Object storage: the S3 client, a preflight, and its errors as one line each
# --------------------------------------------------------------------------------------------

S3_CONNECT_TIMEOUT = 3.0   # seconds per connection attempt
S3_REQUEST_TIMEOUT = 30.0  # seconds without progress on a request (where the SDK honours it)
S3_MAX_ATTEMPTS = 3        # per request; AWS_MAX_ATTEMPTS overrides it, as for boto3


def _s3_environment() -> tuple[str, str, str, str, str, int]:
    """What an S3 client is built from: (endpoint, region, access key id, a digest of the secret
    key and session token, profile, max attempts); also the filesystem cache key."""
    env = os.environ
    secret = hashlib.sha256(f"{env.get('AWS_SECRET_ACCESS_KEY', '')}\0"
                            f"{env.get('AWS_SESSION_TOKEN', '')}".encode()).hexdigest()
    try:
        attempts = max(1, int(env.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS)))
    except ValueError:
        attempts = S3_MAX_ATTEMPTS
    return (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "",
            env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "",
            env.get("AWS_ACCESS_KEY_ID", ""), secret, env.get("AWS_PROFILE", ""), attempts)


@functools.lru_cache(maxsize=64)
def _s3_filesystem(bucket: str, endpoint: str, region: str, key_id: str, secret: str,
                   profile: str, attempts: int) -> pafs.S3FileSystem:
    if not endpoint and bucket:  # AWS itself: the bucket's region, as from_uri resolves it
        region = pafs.resolve_s3_region(bucket)
    return pafs.S3FileSystem(endpoint_override=endpoint or None, region=region or None,
                             connect_timeout=S3_CONNECT_TIMEOUT, request_timeout=S3_REQUEST_TIMEOUT,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))


def storage_endpoint(uri: str) -> str:
    """Who serves ``uri``, for messages: the endpoint URL, or the cloud service."""
    if uri.startswith("s3://"):
        endpoint = _s3_environment()[0]
        return endpoint or "AWS S3"
    if uri.startswith(("gs://", "gcs://")):
        return "Google Cloud Storage"
    return uri.split("://", 1)[0]


_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode: 7", "curlCode: 28", "curlCode: 6",
                "Couldn't connect", "Could not connect", "Connection refused",
                "Could not resolve host", "Timeout was reached", "EndpointConnectionError")
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "The specified bucket does not exist")
_NO_BUCKET_RE = re.compile(r"Bucket '[^']+' not found")  # pyarrow's region lookup
_BAD_CREDENTIALS = ("SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY_ID",
                    "InvalidAccessKeyId", "InvalidClientTokenId", "EXPIRED_TOKEN",
                    "ExpiredToken", "NoCredentialsError", "Unable to locate credentials")
_DENIED = ("ACCESS_DENIED", "AccessDenied", "Access Denied", "403 Forbidden")


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def storage_error(e: BaseException, uri: str, action: str = "read") -> StageError:
    """An object-storage failure (pyarrow ``OSError`` text, or boto3/fsspec errors) on ``uri``
    as one line naming the URI, the endpoint and the fix. ``action``: "read" or "write" (what
    the caller was doing, for access-denied errors)."""
    err = storage_failure(e, uri, action)
    if err is not None:
        return err
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return StageError(f"object storage error on '{uri}' at {storage_endpoint(uri)}: {first}")


def storage_failure(e: BaseException, uri: str | None = None, action: str = "read") -> StageError | None:
    """``storage_error`` for the failures it recognises (unreachable endpoint, no such bucket,
    rejected credentials, access denied); None for any other error. ``uri`` defaults to the
    bucket named in a pyarrow message."""
    text = f"{type(e).__name__}: {e}"
    if uri is None:
        m = re.search(r"in bucket '([^']+)'", text) or re.search(r"bucket '([^']+)'", text)
        if m is None:
            return None
        uri = f"s3://{m.group(1)}"
    endpoint = storage_endpoint(uri)
    code = re.search(r"AWS Error ([A-Z_]+)", text)
    why = code.group(1) if code else type(e).__name__
    if any(s in text for s in _UNREACHABLE):
        return StageError(
            f"cannot reach the object store at {endpoint} for '{uri}' (connection failed: {why}). "
            "Start the server or fix AWS_ENDPOINT_URL and the network so that every node reaches "
            "it, then re-run (completed stages are kept)")
    if any(s in text for s in _NO_BUCKET) or _NO_BUCKET_RE.search(text):
        return _no_bucket(uri)
    if any(s in text for s in _BAD_CREDENTIALS):
        return StageError(
            f"the object store at {endpoint} rejected the credentials for '{uri}' ({why}). Set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to a valid key pair for "
            "this endpoint, on every node")
    if any(s in text for s in _DENIED):
        if action == "write":
            return StageError(
                f"cannot write to '{uri}': access denied by {endpoint} (permission). Use "
                "credentials allowed to put and delete objects under it (s3:PutObject, "
                "s3:DeleteObject), or choose another run_dir")
        return StageError(
            f"cannot read '{uri}': access denied by {endpoint} (permission). Use credentials "
            "allowed to list and read it (s3:ListBucket, s3:GetObject)")
    return None


def _no_bucket(uri: str) -> StageError:
    bucket = _bucket(uri)
    return StageError(f"bucket '{bucket}' does not exist at {storage_endpoint(uri)} (for '{uri}'). "
                      f"Create it (e.g. `aws s3 mb s3://{bucket}`, with --endpoint-url for an "
                      "S3-compatible store) or choose a run_dir in an existing bucket")


def check_storage(uri: str, write: bool = True) -> None:
    """Preflight for a command that uses ``uri`` on object storage (a no-op for local paths):
    reach the bucket, list ``uri`` and, with ``write``, put and delete a small probe object
    under it, so that a wrong endpoint, bucket, credentials or permission fails at once, with
    one line naming the URI, the endpoint and the fix (a StageError), before any work."""
    if not is_remote(uri):
        return
    fs, path = filesystem(uri)
    # One listing of the prefix: it needs only s3:ListBucket (HeadBucket is refused to users
    # whose listing is limited to a prefix), answers NoSuchBucket for a missing bucket (with
    # allow_not_found pyarrow would hide it) and carries the error code a HEAD cannot.
    try:
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=False))
    except (FileNotFoundError, NotADirectoryError):
        pass  # not written yet, or a file: the bucket answered
    except OSError as e:
        raise storage_error(e, uri, "read") from None
    if not write:
        return
    probe = f"{path}/.slm-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"slm write probe\n")
    except OSError as e:
        raise storage_error(e, uri, "write") from None
    try:
        fs.delete_file(probe)
    except OSError as e:
        raise StageError(f"{storage_error(e, uri, 'write')} (the probe object "
                         f"'{uri.split('://', 1)[0]}://{probe}' "
                         "it wrote may be left behind)") from None
