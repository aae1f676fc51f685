"""`slm submit -- slm run …`: run any slm command on a Ray cluster as a Ray job.

The job gets the project through its runtime environment, so the code that runs is this
checkout's, not whatever version the cluster image has:

* ``py_modules``: the ``slm`` package assembled from the installed sub-packages (the repository
  maps ``pipeline/`` → ``slm.pipeline`` etc., so the checkout itself is not an importable tree);
  Ray puts it first on ``PYTHONPATH`` of the job driver and of every worker it starts.
* ``working_dir``: the directory the command is run from (recipes, local data paths resolve as
  they do here), without virtualenvs, run directories, VCS data and the package sources (those
  travel in ``py_modules``; a partial ``slm/`` in the job's cwd would shadow it), and without
  secrets (``.env*``, ``.aws``, ``.ssh``, keys, token files: ``SECRET_EXCLUDES``), plus the
  user's own ``--exclude`` patterns (gitignore syntax, as Ray applies them).

Third-party dependencies (torch, Ray, transformers…) come from the cluster's image or setup
commands (see cluster/README.md). A leading ``slm`` in the entrypoint becomes ``python -m slm.cli``
so the job does not depend on a console script being installed.

Token authentication: the token is read like Ray reads it (``RAY_AUTH_TOKEN``, then the file at
``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) and sent as a bearer header, also when
``RAY_AUTH_MODE`` is unset here; a missing or wrong token fails with a message saying which.
The token is sent only over https, or over plain http to a loopback address (127.0.0.0/8,
::1, localhost: e.g. ``ray dashboard`` forwarding the head's port); any other plain-http
address is refused unless ``--insecure-http`` says the network is trusted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from slm.errors import InputError, SlmError

# The sub-packages that make up `slm` (pyproject package-dir).
SUBPACKAGES = ("pipeline", "models", "tune", "cluster", "deploy", "recipes")
# Never shipped in working_dir: environments, outputs, caches, VCS data.
EXCLUDES = [".git", ".venv", "venv", "runs", "**/__pycache__", "*.egg-info", "build", "dist",
            ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.pyc"]
# Never shipped either: secrets the job does not need and the cluster must not get (gitignore
# patterns, at any depth). Token files by name (``auth_token``, ``hf_token``, ``x.token``,
# ``token.txt``), not every name holding "token": ``tokenizer.py`` or ``tokens/`` are data/code.
SECRET_EXCLUDES = [".env*", ".aws", ".ssh", ".gnupg", ".netrc", ".pypirc",
                   ".docker", ".kube", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*",
                   "id_ed25519*", "*token", "*.token", "*token.txt", "*token.json",
                   "*credentials.json", ".git-credentials"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# --------------------------------------------------------------------------------------------
# Token
# --------------------------------------------------------------------------------------------

def read_auth_token() -> str:
    """The Ray auth token the way Ray looks for it, or '' when there is none (or auth is off)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return ""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def auth_headers() -> dict[str, str]:
    token = read_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


# --------------------------------------------------------------------------------------------
# What the job gets
# --------------------------------------------------------------------------------------------

def package_sources() -> dict[str, str]:
    """Source directory of `slm` and of each sub-package, as this interpreter imports them."""
    out: dict[str, str] = {}
    for name in ("slm",) + tuple(f"slm.{s}" for s in SUBPACKAGES):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SlmError(f"cannot find the source of package '{name}'; install the project "
                           "(pip install -e .) before submitting")
        out[name] = list(spec.submodule_search_locations)[0]
    return out


def stage_package(dest: str) -> str:
    """Assemble an importable ``slm`` tree under ``dest`` (core + sub-packages), return its path."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    src = package_sources()
    root = os.path.join(dest, "slm")
    shutil.copytree(src["slm"], root, ignore=ignore)
    for sub in SUBPACKAGES:
        shutil.copytree(src[f"slm.{sub}"], os.path.join(root, sub), ignore=ignore,
                        dirs_exist_ok=True)
    return root


def working_dir_excludes(working_dir: str, extra: Sequence[str] = ()) -> list[str]:
    """EXCLUDES and SECRET_EXCLUDES, the package source folders when ``working_dir`` is the slm
    checkout, then the user's own patterns ``extra`` (``--exclude``, gitignore syntax)."""
    excludes = list(EXCLUDES) + list(SECRET_EXCLUDES)
    wd = os.path.realpath(working_dir)
    for path in package_sources().values():
        path = os.path.realpath(path)
        if os.path.dirname(path) == wd:
            excludes.append("/" + os.path.basename(path))
    for pattern in extra:
        if not pattern.strip():
            raise InputError("--exclude got an empty pattern; give a gitignore-style pattern, "
                             "e.g. --exclude 'data/raw/' --exclude '*.ckpt'")
        if pattern not in excludes:
            excludes.append(pattern)
    return excludes


def job_entrypoint(argv: Sequence[str]) -> str:
    """The shell command the job runs; a leading ``slm`` becomes ``python -m slm.cli``."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InputError("nothing to submit: give the command after '--', e.g. "
                         "slm submit --address http://HEAD:8265 -- slm run --recipe demo")
    if argv[0] == "slm":
        argv = ["python", "-m", "slm.cli"] + argv[1:]
    return shlex.join(argv)


def runtime_env(working_dir: str, staged_package: str, excludes: Sequence[str] = ()) -> dict:
    if not os.path.isdir(working_dir):
        raise InputError(f"--working-dir '{working_dir}' is not a directory")
    return {
        "working_dir": working_dir,
        "excludes": working_dir_excludes(working_dir, excludes),
        "py_modules": [staged_package],
        # Job logs are files: unbuffered output makes --follow stream line by line.
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------

def _auth_message(e: Exception, address: str) -> str:
    text = str(e)
    if "Unauthorized" in text or "Authentication required" in text:
        return (f"the Ray cluster at {address} requires a token and none was sent. Set "
                "RAY_AUTH_TOKEN to the cluster's token (on the head node: `ray get-auth-token`), "
                "or RAY_AUTH_TOKEN_PATH to a file holding it")
    return (f"the Ray cluster at {address} rejected the authentication token (wrong token). "
            "Set RAY_AUTH_TOKEN to the token the cluster was started with (on the head node: "
            "`ray get-auth-token`)")


def effective_address(address: str = "") -> tuple[str, str]:
    """The address Ray's job client will really contact, and where it came from. Ray lets
    RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, override the address it is given."""
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(var):
            return os.environ[var], var
    return address, "--address"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and ``localhost`` (no DNS look-up: any other
    name may resolve anywhere)."""
    host = (host or "").strip().strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def check_token_transport(address: str, source: str = "--address", token: str = "",
                          insecure_http: bool = False) -> None:
    """Refuse to send ``token`` in clear text (plain http, or an address without a scheme, which
    Ray contacts over http) to a host that is not this machine, unless ``insecure_http``."""
    if not token or insecure_http or address == "auto":  # auto: a Ray on this machine
        return
    url = address if "://" in address else f"http://{address}"
    scheme = url.split("://", 1)[0].lower()
    if scheme == "https":
        return
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    if is_loopback(host):
        return
    raise SlmError(
        f"refusing to send the Ray auth token in clear text to {address} (from {source}): "
        f"{scheme}:// to '{host or address}', which is not a loopback address. Use the "
        "dashboard over https (https://HEAD:8265), or a tunnel to it on 127.0.0.1 (`ray "
        "dashboard CLUSTER.yaml`, ssh -L 8265:localhost:8265 HEAD), or pass --insecure-http if "
        "this network is trusted")


def connect(address: str = "", insecure_http: bool = False):
    """A JobSubmissionClient for ``address`` (or RAY_ADDRESS), with the auth token attached
    (over https or to loopback only, unless ``insecure_http``: ``check_token_transport``)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise SlmError("no cluster to submit to: give --address http://HEAD:8265 (the Ray "
                       "dashboard address; `ray dashboard cluster/aws.yaml` forwards it) or set "
                       "RAY_ADDRESS")
    headers = auth_headers()
    target, source = effective_address(address)
    check_token_transport(target, source, headers.get("Authorization", ""), insecure_http)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise SlmError(_auth_message(e, address)) from None
    except ConnectionError as e:
        raise SlmError(f"cannot reach the Ray dashboard at {address}: {e}. Check --address / "
                       "RAY_ADDRESS (http://HEAD:8265) and that the cluster is up") from None


async def _stream_logs(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow_job(client, job_id: str, out=None, poll_s: float = 1.0) -> int:
    """Stream the job's logs to ``out`` until it ends; return its exit status (0 = succeeded)."""
    out = out or sys.stdout
    try:
        asyncio.run(_stream_logs(client, job_id, out))
    except RuntimeError as e:  # the log socket closed early: fall back to polling the status
        print(f"log stream ended early ({e}); waiting for the job to finish", file=sys.stderr)
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    if status == "SUCCEEDED":
        print(f"job {job_id} succeeded", file=sys.stderr)
        return 0
    code = getattr(info, "driver_exit_code", None)
    print(f"job {job_id} {status.lower()}: {info.message or ''}".rstrip(), file=sys.stderr)
    return int(code) if code else 1


def submit(entrypoint: Sequence[str], address: str = "", follow: bool = False,
           num_cpus: float = 0, num_gpus: float = 0, working_dir: str = "",
           submission_id: str | None = None, agent_wait_s: float = 90,
           excludes: Sequence[str] = (), insecure_http: bool = False) -> int:
    """Submit ``entrypoint`` (e.g. ``["slm", "run", "--recipe", "demo"]``) as a Ray job.

    Prints the job id; with ``follow`` streams its logs and returns the job's exit status
    (0 succeeded, the driver's exit code or 1 otherwise), else returns 0 once submitted.
    A cluster whose job agent is still starting is retried for ``agent_wait_s`` seconds.
    ``excludes``: more working_dir patterns not to ship; ``insecure_http``: allow sending the
    token over plain http to a non-loopback address.
    """
    command = job_entrypoint(entrypoint)
    client = connect(address, insecure_http=insecure_http)
    address = address or os.environ.get("RAY_ADDRESS", "")
    with tempfile.TemporaryDirectory(prefix="slm-submit-") as tmp:
        env = runtime_env(os.path.abspath(working_dir or os.getcwd()), stage_package(tmp), excludes)
        deadline = time.time() + agent_wait_s
        while True:
            try:
                job_id = client.submit_job(entrypoint=command, runtime_env=env,
                                           submission_id=submission_id,
                                           entrypoint_num_cpus=num_cpus or None,
                                           entrypoint_num_gpus=num_gpus or None)
                break
            except AuthenticationError as e:
                raise SlmError(_auth_message(e, address)) from None
            except RuntimeError as e:
                # A head that just started answers before its job agent is up.
                if "No available agent" in str(e) and time.time() < deadline:
                    time.sleep(2)
                    continue
                raise SlmError(f"the Ray cluster at {address} refused the job: {e}") from None
    print(f"submitted job {job_id} to {address}: {command}")
    if not follow:
        print(f"follow it with: ray job logs --follow {job_id}  (or stop: ray job stop {job_id})")
        return 0
    try:
        return follow_job(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (ray job stop {job_id})",
              file=sys.stderr)
        return 130
