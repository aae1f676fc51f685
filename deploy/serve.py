"""`slm serve`: the exported specialists of a run behind one JSON HTTP API (Ray Serve).

One deployment per domain (``Specialist``: the exported HF directory, batched generation with
``serve.batch``) and an ingress ``Router`` (a FastAPI app through ``serve.ingress``; the request
schema is the pydantic model ``GenerateRequest``): a request naming a domain goes to that
domain's specialist; one naming none is embedded with the run's embedding model (in a worker
thread, off the router's event loop) and routed to the specialist of its nearest cluster
(deploy/routing.py). The HTTP schema, limits and status codes are in deploy/API.md.

Hardening, each part of the API:
- every bad request gets a 4xx JSON error naming the field, and the replicas keep serving;
- a batch is cut into groups whose longest prompt + largest ``max_new_tokens`` fits the
  model's context; prompts are left-padded and each request gets at most its own
  ``max_new_tokens``; a request that cannot fit is refused alone (413), never its batch;
- a request body is capped (413), a request has a deadline (504), the router holds a bounded
  number of generate requests (503 + Retry-After beyond it);
- bearer-token auth (``token_file``, constant-time compare), required when binding a
  non-loopback address;
- the replicas' CPU shares are fitted to what the cluster has free, or the deployment is
  refused before anything starts, naming the resources it needs.

Replicas may run on other nodes than the driver: they are handed the run's URIs
(``replica_uri``) and open model directories with ``slm.stage.local_dir`` on their own node
(a node-local cached download for a run on object storage).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import resource
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve as ray_serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm.cluster.ray_env import ray_session
from slm.config import load_run_recipe
from slm.deploy.routing import load_router
from slm.errors import InputError, SlmError
from slm.layout import RunLayout
from slm.pipeline.embed import load_model
from slm.stage import is_done, is_remote, join, local_dir, manifest, read_json, subdirs

log = logging.getLogger(__name__)

APP_NAME = "slm"
API_PREFIX = "/v1"
TEMPERATURE_FLOOR = 1e-3   # 0 < temperature < this is refused: logits / 1e-40 overflow to NaN
MAX_TEMPERATURE = 5.0
MIN_TOKEN_CHARS = 16


@dataclass
class ServeOptions:
    """Limits and resources of a served run (the HTTP limits are part of the API)."""

    max_new_tokens: int = 256          # largest max_new_tokens a request may ask for
    default_new_tokens: int = 32
    max_prompt_chars: int = 20_000     # refused before tokenizing (413)
    max_body_bytes: int = 256 * 1024   # request body cap (413)
    max_batch_size: int = 8
    batch_wait_s: float = 0.02
    request_timeout_s: float = 60.0    # per request, arrival to answer (504 beyond)
    max_queued_requests: int = 64      # generate requests one router replica holds (503 beyond)
    retry_after_s: int = 1             # Retry-After of a 503
    num_cpus: float = -1.0             # per specialist replica; -1: fitted to the free CPUs (<= 1)
    router_cpus: float = 0.1           # the router replica
    num_gpus: float = -1.0             # per specialist replica; -1: 0.25 if the cluster has GPUs
    max_replicas: int = 1              # autoscaling upper bound per specialist
    torch_threads: int = 0             # 0: torch's default
    k: int = 0                         # clustering for routing (0: the run's largest)
    embed_model: str = ""              # '' = the run recipe's embed.model
    token_file: str = ""               # bearer token for every /v1 request ('' = no auth)
    insecure_no_auth: bool = False     # allow a non-loopback host without a token file
    ready_timeout_s: float = 900.0     # how long start() waits for every replica to be ready

    def check(self) -> None:
        def bad(name, why):
            raise InputError(f"serve option '{name}' {why}")
        for name in ("max_new_tokens", "default_new_tokens", "max_prompt_chars", "max_body_bytes",
                     "max_batch_size", "max_queued_requests", "max_replicas"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1 (got {getattr(self, name)})")
        for name in ("batch_wait_s", "request_timeout_s", "router_cpus", "ready_timeout_s",
                     "num_cpus", "num_gpus", "retry_after_s"):
            v = getattr(self, name)
            if not math.isfinite(v):
                bad(name, f"must be finite (got {v})")
        if self.request_timeout_s <= 0 or self.ready_timeout_s <= 0:
            bad("request_timeout_s/ready_timeout_s", "must be > 0")
        if self.batch_wait_s < 0 or self.router_cpus < 0 or self.retry_after_s < 0:
            bad("batch_wait_s/router_cpus/retry_after_s", "must be >= 0")
        if self.num_cpus != -1 and self.num_cpus <= 0:
            bad("num_cpus", f"must be > 0, or -1 to fit the free CPUs (got {self.num_cpus})")
        if self.num_gpus != -1 and self.num_gpus < 0:
            bad("num_gpus", f"must be >= 0, or -1 for automatic (got {self.num_gpus})")


# --------------------------------------------------------------------------------------------
# What is served
# --------------------------------------------------------------------------------------------

def exported_domains(run: str, domains: list[str] | None = None) -> dict[str, str]:
    """domain → exported HF directory (``RUN/export/<domain>``, published by `slm export`)."""
    layout = RunLayout(run)
    root = layout.export()
    have = [d for d in subdirs(root) if is_done(layout.export(d))]
    if not domains:
        if not have:
            raise InputError(f"nothing to serve: no exported models in '{root}'; run "
                             f"`slm export --run {run} --domain DOMAIN` first")
        return {d: layout.export(d) for d in have}
    missing = [d for d in domains if d not in have]
    if missing:
        raise InputError(f"domain(s) {', '.join(missing)} not exported in '{root}' (exported: "
                         f"{', '.join(have) or 'none'}); run `slm export --run {run} --domain "
                         f"{missing[0]}` first")
    return {d: layout.export(d) for d in domains}


def embed_model_name(run: str, override: str = "") -> str:
    """The embedding model that routes prompts: the run recipe's ``embed.model``."""
    return override or load_run_recipe(run).embed.model


def context_tokens(cfg: dict) -> int:
    """A model's context from its HF config (GPT-2: n_positions; others: max_position_embeddings)."""
    return int(cfg.get("n_positions") or cfg.get("max_position_embeddings") or 1024)


# --------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only listens on this machine (every address it names is a
    loopback one); '0.0.0.0', '::', a LAN address or an unresolvable name are not."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(h, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped), checked."""
    fix = ("write one with e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' "
           f"> {path} && chmod 600 {path}`")
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"token file '{path}' cannot be read ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"token file '{path}' is not a regular file; {fix}")
    if st.st_size > 4096:
        raise InputError(f"token file '{path}' is {st.st_size} bytes; a token is one line of at "
                         "most 4096 characters")
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"token file '{path}' cannot be read as ASCII text ({e}); {fix}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise InputError(f"token file '{path}' must hold one token of at least {MIN_TOKEN_CHARS} "
                         f"printable characters without spaces; {fix}")
    if st.st_mode & 0o077:
        log.warning("token file '%s' is readable by other users (mode %o); chmod 600 it",
                    path, st.st_mode & 0o777)
    return token


def token_digest(host: str, opts: ServeOptions) -> str:
    """The sha256 (hex) of the bearer token every request must present, or '' for no auth.
    Refuses a non-loopback ``host`` without a token file (unless ``insecure_no_auth``).
    Only the digest is handed to the router replica: the token itself is not stored in Ray."""
    if opts.token_file:
        return hashlib.sha256(read_token(opts.token_file).encode("ascii")).hexdigest()
    if not is_loopback(host) and not opts.insecure_no_auth:
        raise InputError(f"refusing to serve on '{host}' (not a loopback address) without "
                         "authentication: pass --token-file FILE (clients then send "
                         "'Authorization: Bearer <token>'), bind 127.0.0.1, or accept an open "
                         "server with --insecure-no-auth")
    return ""


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------

def plan_resources(n_domains: int, opts: ServeOptions, available: dict, total: dict,
                   node_cpus: list[float] | None = None) -> dict:
    """Ray resources of the replicas: {"specialist_cpus", "specialist_gpus", "router_cpus",
    "needed_cpus"}. With ``num_cpus = -1`` each specialist gets an equal share of the free CPUs
    after the router's (at most 1); an explicit share that does not fit is refused here,
    before anything is deployed, naming what is needed and what the cluster has (a replica that
    cannot be placed would otherwise wait forever)."""
    free_cpu = float(available.get("CPU", 0.0))
    total_cpu = float(total.get("CPU", 0.0))
    router = float(opts.router_cpus)
    if opts.num_cpus == -1:
        per = min(1.0, math.floor((free_cpu - router) / max(n_domains, 1) * 100) / 100)
        if per < 0.01:
            raise InputError(
                f"serving {n_domains} domain(s) needs at least {n_domains * 0.01 + router:g} CPU "
                f"({n_domains} specialist replica(s) x 0.01 + router {router:g}); the cluster has "
                f"{free_cpu:g} of {total_cpu:g} CPU free. Free some CPUs, add nodes or serve fewer "
                "domains (--domain)")
    else:
        per = float(opts.num_cpus)
    needed = n_domains * per + router
    if needed > free_cpu + 1e-9:
        fit = math.floor((free_cpu - router) / max(n_domains, 1) * 100) / 100
        hint = f"pass a smaller --num-cpus (at most {fit:g} fits), " if fit >= 0.01 else ""
        raise InputError(
            f"serving {n_domains} domain(s) needs {needed:g} CPU ({n_domains} specialist "
            f"replica(s) x {per:g} + router {router:g}); the cluster has {free_cpu:g} of "
            f"{total_cpu:g} CPU free: {hint}serve fewer domains (--domain), or add nodes")
    if node_cpus and per > max(node_cpus) + 1e-9:
        raise InputError(f"a specialist replica asks for {per:g} CPU but the largest node has "
                         f"{max(node_cpus):g}; pass --num-cpus {max(node_cpus):g} or less")
    gpus = opts.num_gpus
    if gpus == -1:
        gpus = 0.25 if total.get("GPU", 0) else 0.0
    if gpus and n_domains * gpus > float(available.get("GPU", 0.0)) + 1e-9:
        raise InputError(f"serving {n_domains} domain(s) needs {n_domains * gpus:g} GPU "
                         f"({gpus:g} per specialist); the cluster has "
                         f"{float(available.get('GPU', 0.0)):g} GPU free")
    return {"specialist_cpus": per, "specialist_gpus": float(gpus), "router_cpus": router,
            "needed_cpus": needed}


def cluster_resources() -> tuple[dict, dict, list[float]]:
    """(available, total, CPUs of each alive node) of the Ray this process is connected to."""
    nodes = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return ray.available_resources(), ray.cluster_resources(), nodes


def _rss() -> dict:
    """This process's resident memory now and its peak (bytes)."""
    import psutil  # a Ray dependency

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": int(peak)}


# --------------------------------------------------------------------------------------------
# Specialist: batched generation
# --------------------------------------------------------------------------------------------

def replica_uri(uri: str) -> str:
    """What a replica is given for a run path: an object-storage URI as it is (each replica
    reads it on its own node), a local path made absolute (a replica's working directory is
    not the driver's; a local run is on the replicas' machine or a shared mount)."""
    return uri if is_remote(uri) else local_dir(uri)


def pack_groups(lengths: list[int], max_new: list[int], context: int, max_size: int) -> list[list[int]]:
    """Indices cut into groups that can be generated together: left-padded to the group's
    longest prompt L and run for the group's largest max_new_tokens N, a group needs
    L + N <= context. Longest prompts first, each into the first group it fits (every request
    fits alone: the router refuses any with length + max_new > context)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], -max_new[i]))
    groups: list[list[int]] = []
    spans: list[tuple[int, int]] = []  # (longest prompt, largest max_new) of each group
    for i in order:
        for g, (L, N) in enumerate(spans):
            if len(groups[g]) < max_size and max(L, lengths[i]) + max(N, max_new[i]) <= context:
                groups[g].append(i)
                spans[g] = (max(L, lengths[i]), max(N, max_new[i]))
                break
        else:
            groups.append([i])
            spans.append((lengths[i], max_new[i]))
    return groups


def _error(code: int, message: str, field: str | None = None) -> dict:
    err = {"code": code, "message": message}
    if field:
        err["field"] = field
    return {"error": err}


class Specialist:
    """One domain's model: batched generation over concurrent requests."""

    def __init__(self, domain: str, path: str, torch_threads: int = 0, max_batch_size: int = 8,
                 batch_wait_s: float = 0.02):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.domain = domain
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.uri = path
        self.local_path = local_dir(path, "model")  # this node's copy of the exported model
        self.tok = AutoTokenizer.from_pretrained(self.local_path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.local_path).to(self.device).eval()
        self.context = context_tokens(self.model.config.to_dict())
        self.method = (manifest(path) or {}).get("method", "")
        self.max_batch_size = max_batch_size
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0, "groups": 0,
                       "largest_group": 0, "expired": 0, "refused": 0, "failed": 0}

    def source(self) -> dict:
        """Where this replica's model comes from: the export's URI and the local directory it
        was loaded from (operators, tests)."""
        return {"uri": self.uri, "local_path": self.local_path}

    def stats(self) -> dict:
        return {**self._stats, "context_tokens": self.context, **_rss()}

    async def generate(self, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, timeout_s: float = 0.0) -> dict:
        """One request; ``timeout_s`` > 0: skipped (504) if its batch starts after that long."""
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
        return await self._batched({"prompt": prompt, "max_new_tokens": int(max_new_tokens),
                                    "temperature": float(temperature), "top_p": float(top_p),
                                    "deadline": deadline})

    @ray_serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, reqs: list[dict]) -> list[dict]:
        self._stats["batches"] += 1
        self._stats["requests"] += len(reqs)
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(reqs))
        # In a thread: the replica's event loop keeps queueing the next batch meanwhile.
        return await asyncio.to_thread(self._run_batch, reqs)

    def _run_batch(self, reqs: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(reqs)
        ids: dict[int, list[int]] = {}
        now = time.monotonic()
        for i, r in enumerate(reqs):
            if now > r["deadline"]:
                self._stats["expired"] += 1
                out[i] = _error(504, "the request's deadline passed while it was queued")
                continue
            t = self.tok(r["prompt"])["input_ids"]
            if not t:
                out[i] = _error(400, "the prompt encodes to no tokens", "prompt")
            elif len(t) + r["max_new_tokens"] > self.context:
                out[i] = _error(413, f"prompt is {len(t)} tokens; domain '{self.domain}' has a "
                                     f"context of {self.context} tokens, so with max_new_tokens="
                                     f"{r['max_new_tokens']} the prompt may have at most "
                                     f"{max(self.context - r['max_new_tokens'], 0)} tokens",
                                "prompt")
            else:
                ids[i] = t
            if out[i] is not None and out[i]["error"]["code"] != 504:
                self._stats["refused"] += 1
        # one generate() per sampling setting and context-fitting group
        settings: dict[tuple[float, float], list[int]] = {}
        for i in ids:
            t = reqs[i]["temperature"]
            key = (t, reqs[i]["top_p"]) if t >= TEMPERATURE_FLOOR else (0.0, 1.0)
            settings.setdefault(key, []).append(i)
        for (temp, top_p), idx in sorted(settings.items()):
            groups = pack_groups([len(ids[i]) for i in idx], [reqs[i]["max_new_tokens"] for i in idx],
                                 self.context, self.max_batch_size)
            for g in groups:
                members = [idx[j] for j in g]
                try:
                    results = self._generate([ids[i] for i in members],
                                             [reqs[i]["max_new_tokens"] for i in members],
                                             temp, top_p)
                except Exception as e:  # one group's failure is its own, not the batch's
                    log.exception("generation failed for a group of %d", len(members))
                    self._stats["failed"] += len(members)
                    results = [_error(500, f"generation failed: {type(e).__name__}: {e}")] * len(members)
                for i, r in zip(members, results):
                    out[i] = r
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], max_new: list[int], temperature: float,
                  top_p: float) -> list[dict]:
        """One group: left-padded to its longest prompt, run for its largest max_new_tokens,
        each row cut to its own max_new_tokens (and its first end-of-text)."""
        n, longest = len(prompts), max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        input_ids = torch.full((n, longest), pad, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, longest - len(p):] = 1
        assert longest + max(max_new) <= self.context  # pack_groups' invariant
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p) \
            if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            seqs = self.model.generate(input_ids=input_ids.to(self.device),
                                       attention_mask=mask.to(self.device),
                                       max_new_tokens=max(max_new), pad_token_id=pad,
                                       eos_token_id=self.tok.eos_token_id, **kw)
        self._stats["groups"] += 1
        self._stats["largest_group"] = max(self._stats["largest_group"], n)
        results = []
        for row, p, limit in zip(seqs, prompts, max_new):
            new = row[longest:longest + limit].tolist()
            finish = "length"
            if self.tok.eos_token_id in new:
                new, finish = new[:new.index(self.tok.eos_token_id)], "stop"
            results.append({"completion": self.tok.decode(new, skip_special_tokens=True),
                            "prompt_tokens": len(p), "completion_tokens": len(new),
                            "finish_reason": finish, "batch_size": n,
                            "domain": self.domain, "model": f"{self.domain}/{self.method}"})
        return results


# --------------------------------------------------------------------------------------------
# Router: the HTTP ingress (FastAPI through serve.ingress)
# --------------------------------------------------------------------------------------------

class GenerateRequest(BaseModel):
    """POST /v1/generate body (strict JSON types; unknown fields refused). Limits that depend
    on the deployment (max_new_tokens <= limit, prompt characters, context) are checked by the
    router after parsing."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    domain: Optional[str] = Field(None, min_length=1, max_length=200)
    max_new_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    timeout_s: Optional[float] = Field(None, gt=0.0, allow_inf_nan=False)

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, v: float) -> float:
        if 0.0 < v < TEMPERATURE_FLOOR:
            raise ValueError(f"must be 0 (greedy) or in [{TEMPERATURE_FLOOR:g}, {MAX_TEMPERATURE:g}]")
        return v


FIELDS = list(GenerateRequest.model_fields)


def validation_message(e: ValidationError) -> tuple[int, str, str | None]:
    """(status, message, field) of a request body that failed GenerateRequest."""
    msgs, field = [], None
    for err in e.errors(include_url=False):
        loc = [str(x) for x in err.get("loc", ())]
        name = loc[0] if loc else None
        kind = err.get("type", "")
        text = str(err.get("msg", "")).removeprefix("Value error, ")
        if kind == "json_invalid":
            return 400, f"request body is not valid JSON: {text.removeprefix('Invalid JSON: ')}", None
        if not loc:
            return 400, "request body must be a JSON object with a 'prompt'", None
        field = field or name
        if kind == "missing":
            msgs.append(f"field '{name}' is required" + (" (a non-empty string)" if name == "prompt" else ""))
        elif kind == "extra_forbidden":
            msgs.append(f"unknown field '{name}'; allowed: {', '.join(FIELDS)}")
        else:
            msgs.append(f"field '{name}': {text}")
    return 400, "; ".join(msgs), field


app = FastAPI(title="slm serve", docs_url=None, redoc_url=None, openapi_url=None)

ENDPOINTS = f"POST {API_PREFIX}/generate, GET {API_PREFIX}/domains or GET {API_PREFIX}/stats"


def _json_error(code: int, message: str, field: str | None = None,
                headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_error(code, message, field), status_code=code, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        msg = f"no endpoint {request.method} {request.url.path}; use {ENDPOINTS}"
    elif exc.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path}; use {ENDPOINTS}"
    else:
        msg = str(exc.detail)
    return _json_error(exc.status_code, msg, headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.error("request %s %s failed: %s: %s", request.method, request.url.path,
              type(exc).__name__, exc)
    return _json_error(500, f"internal error: {type(exc).__name__}")


# The routes are module-level functions calling the replica's Router (Serve's standalone-app
# form of serve.ingress) rather than Router methods: Serve's class-based view re-analyses
# method routes through include_router, which FastAPI >= 0.137 no longer does (`self` then
# reads as a query parameter and every request answers 422).

def _replica() -> "Router":
    return ray_serve.get_replica_context().servable_object


@app.get(f"{API_PREFIX}/domains")
async def _domains_route(request: Request):
    return await _replica().domains(request)


@app.get(f"{API_PREFIX}/stats")
async def _stats_route(request: Request):
    return await _replica().stats(request)


@app.post(f"{API_PREFIX}/generate")
async def _generate_route(request: Request):
    return await _replica().generate(request)


@ray_serve.ingress(app)
class Router:
    """HTTP ingress: authenticates, validates, picks the specialist, returns JSON."""

    def __init__(self, specialists: dict, run: str, paths: dict[str, str], embed_model: str,
                 opts: dict, auth_sha256: str = ""):
        self.handles = specialists
        self.opts = ServeOptions(**opts)
        self.auth = bytes.fromhex(auth_sha256) if auth_sha256 else b""
        self.tok = AutoTokenizer.from_pretrained(local_dir(next(iter(paths.values())), "model"))
        self.context = {d: context_tokens(read_json(join(p, "config.json"))) for d, p in paths.items()}
        self.router = load_router(run, list(paths), self.opts.k)
        self.embed_model_name = embed_model
        self._embedder = None
        self._embed_lock = threading.Lock()
        # CPU work off the event loop: one thread each, so that a slow embedding (the model's
        # first load takes seconds) never holds up tokenizing a request that names its domain
        self._embed_pool = ThreadPoolExecutor(1, thread_name_prefix="slm-embed")
        self._tok_pool = ThreadPoolExecutor(1, thread_name_prefix="slm-tokenize")
        self.in_flight = 0
        self._stats = {"requests": 0, "peak_in_flight": 0, "busy": 0, "timeouts": 0,
                       "status": {}, "embed_load_s": None}

    # ---- helpers -------------------------------------------------------------------------

    def _answer(self, body: dict, code: int = 200, headers: dict | None = None) -> JSONResponse:
        self._stats["status"][str(code)] = self._stats["status"].get(str(code), 0) + 1
        return JSONResponse(body, status_code=code, headers=headers)

    def _fail(self, code: int, message: str, field: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        return self._answer(_error(code, message, field), code, headers)

    def _check_auth(self, request: Request) -> JSONResponse | None:
        if not self.auth:
            return None
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._fail(401, "missing bearer token: send 'Authorization: Bearer <token>' "
                                   "(the token in the server's --token-file)",
                              headers={"WWW-Authenticate": "Bearer"})
        presented = hashlib.sha256(token.strip().encode("latin-1", "replace")).digest()
        if not hmac.compare_digest(presented, self.auth):
            return self._fail(401, "invalid bearer token",
                              headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None

    async def _read_body(self, request: Request) -> bytes | JSONResponse:
        cap = self.opts.max_body_bytes
        too_big = f"request body is larger than the limit of {cap} bytes"
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.strip().isascii() and length.strip().isdigit()):
                return self._fail(400, f"bad Content-Length header '{length[:40]}'")
            if int(length) > cap:
                return self._fail(413, too_big)
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > cap:
                return self._fail(413, too_big)
        return bytes(buf)

    def _load_embedder(self):
        with self._embed_lock:
            if self._embedder is None:  # loaded on the first prompt that names no domain
                t0 = time.monotonic()
                self._embedder = load_model(self.embed_model_name, device="cpu")
                self._stats["embed_load_s"] = round(time.monotonic() - t0, 3)
        return self._embedder

    def _embed(self, text: str) -> np.ndarray:
        v = self._load_embedder().encode([text], normalize_embeddings=True)[0]
        return np.asarray(v, dtype=np.float32)

    def _count_tokens(self, text: str) -> int:
        return len(self.tok(text)["input_ids"])

    def _domains_body(self) -> dict:
        o = self.opts
        return {"domains": sorted(self.handles), "context_tokens": self.context,
                "routing": {"k": int(self.router.centroids.shape[0]),
                            "embed_model": self.embed_model_name},
                "auth": "bearer" if self.auth else "none",
                "limits": {"max_new_tokens": o.max_new_tokens,
                           "default_new_tokens": min(o.default_new_tokens, o.max_new_tokens),
                           "max_prompt_chars": o.max_prompt_chars,
                           "max_body_bytes": o.max_body_bytes,
                           "temperature": {"min_nonzero": TEMPERATURE_FLOOR, "max": MAX_TEMPERATURE},
                           "request_timeout_s": o.request_timeout_s,
                           "max_queued_requests": o.max_queued_requests,
                           "max_batch_size": o.max_batch_size}}

    # ---- endpoints (routed by the module-level FastAPI functions below) ------------------

    async def domains(self, request: Request):
        err = self._check_auth(request)
        return err if err is not None else self._answer(self._domains_body())

    async def stats(self, request: Request):
        """Counters of the router and of every specialist (operators, the load bench)."""
        err = self._check_auth(request)
        if err is not None:
            return err
        spec = {}
        for d, h in self.handles.items():
            try:
                spec[d] = await asyncio.wait_for(h.stats.remote(), timeout=10)
            except Exception as e:  # a busy or restarting replica: say so, do not fail
                spec[d] = {"error": f"{type(e).__name__}: {e}"}
        return self._answer({"router": {**self._stats, "in_flight": self.in_flight, **_rss()},
                             "specialists": spec})

    async def generate(self, request: Request):
        t0 = time.monotonic()
        self._stats["requests"] += 1
        err = self._check_auth(request)
        if err is not None:
            return err
        raw = await self._read_body(request)
        if isinstance(raw, JSONResponse):
            return raw
        try:
            req = GenerateRequest.model_validate_json(raw)
        except ValidationError as e:
            return self._fail(*validation_message(e))
        o = self.opts
        mnt = req.max_new_tokens if req.max_new_tokens is not None else \
            min(o.default_new_tokens, o.max_new_tokens)
        if mnt > o.max_new_tokens:
            return self._fail(400, f"field 'max_new_tokens' must be an integer in "
                                   f"[1, {o.max_new_tokens}] (got {mnt})", "max_new_tokens")
        if len(req.prompt) > o.max_prompt_chars:
            return self._fail(413, f"prompt is {len(req.prompt)} characters; the limit is "
                                   f"{o.max_prompt_chars}", "prompt")
        if req.domain is not None and req.domain not in self.handles:
            return self._fail(404, f"unknown domain '{req.domain[:80]}'; served domains: "
                                   f"{', '.join(sorted(self.handles))} (or omit 'domain' to "
                                   "route by embedding)", "domain")
        if self.in_flight >= o.max_queued_requests:
            self._stats["busy"] += 1
            return self._fail(503, f"server busy: {self.in_flight} requests in progress (limit "
                                   f"{o.max_queued_requests}); retry after {o.retry_after_s} s",
                              headers={"Retry-After": str(int(math.ceil(o.retry_after_s)))})
        timeout = min(req.timeout_s or o.request_timeout_s, o.request_timeout_s)
        self.in_flight += 1
        self._stats["peak_in_flight"] = max(self._stats["peak_in_flight"], self.in_flight)
        try:
            return await asyncio.wait_for(self._generate(req, mnt, t0, timeout), timeout)
        except asyncio.TimeoutError:
            self._stats["timeouts"] += 1
            return self._fail(504, f"request timed out after {timeout:g} s (the server's limit is "
                                   f"{o.request_timeout_s:g} s)")
        except Exception as e:
            if type(e).__name__ in ("BackPressureError", "DeploymentUnavailableError"):
                return self._fail(503, f"specialist unavailable: {e}",
                                  headers={"Retry-After": str(int(math.ceil(o.retry_after_s)))})
            log.exception("generate failed")
            return self._fail(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            self.in_flight -= 1

    async def _generate(self, req: GenerateRequest, mnt: int, t0: float, timeout: float):
        loop = asyncio.get_running_loop()
        cluster = None
        if req.domain is None:
            emb = await loop.run_in_executor(self._embed_pool, self._embed, req.prompt)
            domain, cluster = self.router.route(emb)
            routed_by = "embedding"
        else:
            domain, routed_by = req.domain, "request"
        n_tokens = await loop.run_in_executor(self._tok_pool, self._count_tokens, req.prompt)
        room = self.context[domain] - mnt
        if n_tokens > room:
            return self._fail(413, f"prompt is {n_tokens} tokens; domain '{domain}' has a "
                                   f"context of {self.context[domain]} tokens, so with "
                                   f"max_new_tokens={mnt} the prompt may have at most "
                                   f"{max(room, 0)} tokens", "prompt")
        left = max(timeout - (time.monotonic() - t0), 0.001)
        resp = self.handles[domain].generate.remote(req.prompt, mnt, req.temperature, req.top_p, left)
        try:
            result = await resp
        except asyncio.CancelledError:
            resp.cancel()  # timed out: the specialist drops it if it has not started it
            raise
        if "error" in result:
            return self._fail(result["error"]["code"], result["error"]["message"],
                              result["error"].get("field"))
        return self._answer({**result, "routed_by": routed_by, "cluster": cluster})


# --------------------------------------------------------------------------------------------
# Application
# --------------------------------------------------------------------------------------------

def _backpressure(opts: ServeOptions) -> dict:
    """Serve's own queue limit at the proxy, behind the router's (503 + Retry-After there too,
    where this Ray has BackpressureConfig)."""
    kw: dict = {"max_queued_requests": opts.max_queued_requests}
    try:
        from ray.serve.config import BackpressureConfig
        kw["backpressure_config"] = BackpressureConfig(status_code=503,
                                                       retry_after_s=opts.retry_after_s)
    except ImportError:
        pass
    return kw


def build_app(run: str, domains: list[str] | None = None, opts: ServeOptions | None = None,
              auth_sha256: str = "", resources: dict | None = None):
    """The Serve application: one Specialist deployment per domain + the Router ingress.
    ``resources``: plan_resources' answer (default: planned here on the connected Ray)."""
    opts = opts or ServeOptions()
    opts.check()
    paths = exported_domains(run, domains)
    embed_model = embed_model_name(run, opts.embed_model)
    if resources is None:
        resources = plan_resources(len(paths), opts, *cluster_resources())

    specialists = {}
    for d, p in paths.items():
        dep = ray_serve.deployment(
            Specialist, name=f"specialist-{d}",
            ray_actor_options={"num_cpus": resources["specialist_cpus"],
                               "num_gpus": resources["specialist_gpus"]},
            autoscaling_config={"min_replicas": 1, "max_replicas": opts.max_replicas,
                                "target_ongoing_requests": opts.max_batch_size},
            max_ongoing_requests=2 * opts.max_batch_size)
        specialists[d] = dep.bind(d, replica_uri(p), opts.torch_threads, opts.max_batch_size,
                                  opts.batch_wait_s)
    router = ray_serve.deployment(
        Router, name="router", ray_actor_options={"num_cpus": resources["router_cpus"]},
        # room for the generate requests it admits plus many cheap ones beside them (GET, 4xx,
        # its own JSON 503s), so that overload is answered by the router rather than queued
        # at the proxy (whose own limit, behind, answers a plain-text 503)
        max_ongoing_requests=opts.max_queued_requests + 256, **_backpressure(opts))
    return router.bind(specialists, replica_uri(run), {d: replica_uri(p) for d, p in paths.items()},
                       embed_model, asdict(opts), auth_sha256)


def _wait_ready(timeout_s: float) -> None:
    """Wait until the application is RUNNING; on failure or timeout delete it and say why."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        app_status = ray_serve.status().applications.get(APP_NAME)
        if app_status is not None:
            if app_status.status == "RUNNING":
                return
            waiting = {n: f"{d.status}: {d.message}" if d.message else str(d.status)
                       for n, d in app_status.deployments.items() if d.status != "HEALTHY"}
            last = "; ".join(f"{n} ({s})" for n, s in waiting.items()) or str(app_status.message)
            if app_status.status == "DEPLOY_FAILED":
                ray_serve.delete(APP_NAME)
                raise SlmError(f"serving failed to deploy: {last or app_status.message}")
        if time.monotonic() > deadline:
            ray_serve.delete(APP_NAME)
            raise SlmError(f"serving did not become ready within {timeout_s:g} s; not ready: "
                           f"{last or 'unknown'}")
        time.sleep(0.5)


def start(run: str, domains: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          opts: ServeOptions | None = None) -> str:
    """Deploy on the Ray this process is connected to; return the API's base URL. Refuses,
    before anything starts, a non-loopback host without a token file and replicas that do not
    fit the cluster's free resources; waits (``ready_timeout_s``) for every replica."""
    opts = opts or ServeOptions()
    opts.check()
    auth = token_digest(host, opts)
    if not ray.is_initialized():
        ray.init()
    app_ = build_app(run, domains, opts, auth)
    # the proxy's own timeout, a backstop behind the router's per-request one (a client may
    # lower it with the x-request-timeout-seconds header; the router's limit always holds)
    ray_serve.start(http_options={"host": host, "port": port,
                                  "request_timeout_s": opts.request_timeout_s + 30})
    try:
        from ray.serve.api import _run  # deploy without waiting forever for the replicas
    except ImportError:
        ray_serve.run(app_, name=APP_NAME, route_prefix="/")
    else:
        _run(app_, name=APP_NAME, route_prefix="/", _blocking=False)
        _wait_ready(opts.ready_timeout_s)
    return f"http://{host}:{port}{API_PREFIX}"


def serve(run: str, domains: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          blocking: bool = True, opts: ServeOptions | None = None, cluster=None) -> str:
    """`slm serve`: start the application (embedded local Ray unless --cluster.address /
    RAY_ADDRESS), print the URL; with ``blocking`` serve until Ctrl-C, then shut Serve down."""
    if not blocking:
        return start(run, domains, host, port, opts)
    opts = opts or ServeOptions()
    opts.check()
    token_digest(host, opts)  # refuse before starting Ray
    with ray_session(cluster):
        url = start(run, domains, host, port, opts)
        print(f"serving {url}/generate (domains: {url}/domains); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            ray_serve.shutdown()
    return url
