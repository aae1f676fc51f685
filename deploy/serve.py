"""`slm serve`: the exported specialists of a run behind one JSON HTTP API (Ray Serve).

One deployment per domain (``Specialist``: the exported HF directory, batched generation with
``serve.batch``) and an ingress ``Router``: a request naming a domain goes to that domain's
specialist; one naming none is embedded with the run's embedding model and routed to the
specialist of its nearest cluster (deploy/routing.py). The HTTP schema is in deploy/API.md.
Every bad request gets a 4xx JSON error and the replicas keep serving.

Replicas may run on other nodes than the driver: they are handed the run's URIs
(``replica_uri``) and open model directories with ``slm.stage.local_dir`` on their own node
(a node-local cached download for a run on object storage).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray import serve as ray_serve
from starlette.responses import JSONResponse
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm.cluster.ray_env import ray_session
from slm.config import load_run_recipe
from slm.deploy.routing import load_router
from slm.errors import InputError
from slm.layout import RunLayout
from slm.pipeline.embed import load_model
from slm.stage import is_done, is_remote, join, local_dir, manifest, read_json, subdirs

log = logging.getLogger(__name__)

APP_NAME = "slm"
API_PREFIX = "/v1"


@dataclass
class ServeOptions:
    """Limits and resources of a served run (the HTTP limits are part of the API)."""

    max_new_tokens: int = 256          # largest max_new_tokens a request may ask for
    default_new_tokens: int = 32
    max_prompt_chars: int = 20_000     # refused before tokenizing
    max_batch_size: int = 8
    batch_wait_s: float = 0.02
    num_cpus: float = 1.0              # per specialist replica
    num_gpus: float = -1.0             # per specialist replica; -1: 0.25 if the cluster has GPUs
    max_replicas: int = 1              # autoscaling upper bound per specialist
    torch_threads: int = 0             # 0: torch's default
    k: int = 0                         # clustering for routing (0: the run's largest)
    embed_model: str = ""              # '' = the run recipe's embed.model


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


# --------------------------------------------------------------------------------------------
# Deployments
# --------------------------------------------------------------------------------------------

def replica_uri(uri: str) -> str:
    """What a replica is given for a run path: an object-storage URI as it is (each replica
    reads it on its own node), a local path made absolute (a replica's working directory is
    not the driver's; a local run is on the replicas' machine or a shared mount)."""
    return uri if is_remote(uri) else local_dir(uri)


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
        self.tok.padding_side = "left"  # decoder-only: pad on the left so generation continues
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.local_path).to(self.device).eval()
        self.method = (manifest(path) or {}).get("method", "")
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)

    def source(self) -> dict:
        """Where this replica's model comes from: the export's URI and the local directory it
        was loaded from (operators, tests)."""
        return {"uri": self.uri, "local_path": self.local_path}

    async def generate(self, prompt: str, max_new_tokens: int, temperature: float) -> dict:
        return await self._batched(prompt, max_new_tokens, temperature)

    @ray_serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, prompts: list[str], max_new: list[int], temps: list[float]) -> list[dict]:
        # In a thread: the replica's event loop keeps queueing the next batch meanwhile.
        return await asyncio.to_thread(self._batched_impl, prompts, max_new, temps)

    def _batched_impl(self, prompts: list[str], max_new: list[int], temps: list[float]) -> list[dict]:
        out: list[dict | None] = [None] * len(prompts)
        for t in sorted(set(temps)):  # one generate() per sampling setting in the batch
            idx = [i for i, x in enumerate(temps) if x == t]
            for i, r in zip(idx, self._generate([prompts[i] for i in idx],
                                                [max_new[i] for i in idx], t)):
                out[i] = {**r, "batch_size": len(prompts)}
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[str], max_new: list[int], temperature: float) -> list[dict]:
        enc = self.tok(prompts, return_tensors="pt", padding=True).to(self.device)
        kw = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else \
            dict(do_sample=False)
        with torch.no_grad():
            seqs = self.model.generate(**enc, max_new_tokens=max(max_new),
                                       pad_token_id=self.tok.pad_token_id,
                                       eos_token_id=self.tok.eos_token_id, **kw)
        n_in = enc["input_ids"].shape[1]
        results = []
        for row, mask, limit in zip(seqs, enc["attention_mask"], max_new):
            new = row[n_in:n_in + limit].tolist()
            if self.tok.eos_token_id in new:
                new = new[:new.index(self.tok.eos_token_id)]
            results.append({"completion": self.tok.decode(new, skip_special_tokens=True),
                            "prompt_tokens": int(mask.sum()), "completion_tokens": len(new),
                            "domain": self.domain, "model": f"{self.domain}/{self.method}"})
        return results


class Router:
    """HTTP ingress: validates requests, picks the specialist, returns JSON."""

    def __init__(self, specialists: dict, run: str, paths: dict[str, str], embed_model: str,
                 opts: dict):
        self.handles = specialists
        self.opts = ServeOptions(**opts)
        self.tok = AutoTokenizer.from_pretrained(local_dir(next(iter(paths.values())), "model"))
        self.context = {}
        for d, p in paths.items():
            cfg = read_json(join(p, "config.json"))
            self.context[d] = int(cfg.get("n_positions") or cfg.get("max_position_embeddings") or 1024)
        self.router = load_router(run, list(paths), self.opts.k)
        self.embed_model_name = embed_model
        self._embedder = None
        self._embed_lock = threading.Lock()

    def _embed(self, text: str):
        with self._embed_lock:
            if self._embedder is None:  # loaded on the first prompt that names no domain
                self._embedder = load_model(self.embed_model_name, device="cpu")
            v = self._embedder.encode([text], normalize_embeddings=True)[0]
        return np.asarray(v, dtype=np.float32)

    @staticmethod
    def _error(status: int, message: str):
        return JSONResponse({"error": {"code": status, "message": message}}, status_code=status)

    def _domains_body(self) -> dict:
        return {"domains": sorted(self.handles), "context_tokens": self.context,
                "routing": {"k": int(self.router.centroids.shape[0]),
                            "embed_model": self.embed_model_name},
                "limits": {"max_new_tokens": self.opts.max_new_tokens,
                           "max_prompt_chars": self.opts.max_prompt_chars}}

    def _parse(self, raw: bytes) -> tuple[dict | None, Any]:
        """(request fields, None) or (None, error response)."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, self._error(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return None, self._error(400, "request body must be a JSON object with a 'prompt'")
        unknown = set(body) - {"prompt", "domain", "max_new_tokens", "temperature"}
        if unknown:
            return None, self._error(400, f"unknown field(s) {sorted(unknown)}; allowed: prompt, "
                                          "domain, max_new_tokens, temperature")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return None, self._error(400, "field 'prompt' is required and must be a non-empty string")
        domain = body.get("domain")
        if domain is not None and not isinstance(domain, str):
            return None, self._error(400, "field 'domain' must be a string (or omitted to route "
                                          "by embedding)")
        mnt = body.get("max_new_tokens", min(self.opts.default_new_tokens, self.opts.max_new_tokens))
        if isinstance(mnt, bool) or not isinstance(mnt, int) or not 1 <= mnt <= self.opts.max_new_tokens:
            return None, self._error(400, f"field 'max_new_tokens' must be an integer in "
                                          f"[1, {self.opts.max_new_tokens}]")
        temp = body.get("temperature", 0.0)
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not math.isfinite(temp) \
                or not 0 <= temp <= 5:
            return None, self._error(400, "field 'temperature' must be a number in [0, 5] "
                                          "(0 = greedy)")
        if len(prompt) > self.opts.max_prompt_chars:
            return None, self._error(413, f"prompt is {len(prompt)} characters; the limit is "
                                          f"{self.opts.max_prompt_chars}")
        return {"prompt": prompt, "domain": domain, "max_new_tokens": mnt,
                "temperature": float(temp)}, None

    async def __call__(self, request):
        path = request.url.path.rstrip("/")
        if path == f"{API_PREFIX}/domains" and request.method == "GET":
            return JSONResponse(self._domains_body())
        if path != f"{API_PREFIX}/generate":
            return self._error(404, f"no endpoint {request.method} {request.url.path}; use "
                                    f"POST {API_PREFIX}/generate or GET {API_PREFIX}/domains")
        if request.method != "POST":
            return self._error(405, f"use POST {API_PREFIX}/generate")
        req, err = self._parse(await request.body())
        if err is not None:
            return err
        cluster = None
        if req["domain"] is None:
            domain, cluster = self.router.route(self._embed(req["prompt"]))
            routed_by = "embedding"
        else:
            domain, routed_by = req["domain"], "request"
            if domain not in self.handles:
                return self._error(404, f"unknown domain '{domain}'; served domains: "
                                        f"{', '.join(sorted(self.handles))} (or omit 'domain' "
                                        "to route by embedding)")
        n_tokens = len(self.tok(req["prompt"])["input_ids"])
        room = self.context[domain] - req["max_new_tokens"]
        if n_tokens > room:
            return self._error(413, f"prompt is {n_tokens} tokens; domain '{domain}' has a "
                                    f"context of {self.context[domain]} tokens, so with "
                                    f"max_new_tokens={req['max_new_tokens']} the prompt may have "
                                    f"at most {max(room, 0)} tokens")
        result = await self.handles[domain].generate.remote(
            req["prompt"], req["max_new_tokens"], req["temperature"])
        return JSONResponse({**result, "routed_by": routed_by, "cluster": cluster})


# --------------------------------------------------------------------------------------------
# Application
# --------------------------------------------------------------------------------------------

def build_app(run: str, domains: list[str] | None = None, opts: ServeOptions | None = None):
    """The Serve application: one Specialist deployment per domain + the Router ingress."""
    opts = opts or ServeOptions()
    paths = exported_domains(run, domains)
    embed_model = embed_model_name(run, opts.embed_model)
    num_gpus = opts.num_gpus
    if num_gpus < 0:
        num_gpus = 0.25 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) else 0.0

    specialists = {}
    for d, p in paths.items():
        dep = ray_serve.deployment(
            Specialist, name=f"specialist-{d}",
            ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": num_gpus},
            autoscaling_config={"min_replicas": 1, "max_replicas": opts.max_replicas,
                                "target_ongoing_requests": opts.max_batch_size},
            max_ongoing_requests=4 * opts.max_batch_size)
        specialists[d] = dep.bind(d, replica_uri(p), opts.torch_threads, opts.max_batch_size,
                                  opts.batch_wait_s)
    router = ray_serve.deployment(Router, name="router",
                                  ray_actor_options={"num_cpus": min(opts.num_cpus, 1.0)})
    return router.bind(specialists, replica_uri(run), {d: replica_uri(p) for d, p in paths.items()},
                       embed_model, asdict(opts))


def start(run: str, domains: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          opts: ServeOptions | None = None) -> str:
    """Deploy on the Ray this process is connected to; return the API's base URL."""
    app = build_app(run, domains, opts)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}{API_PREFIX}"


def serve(run: str, domains: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          blocking: bool = True, opts: ServeOptions | None = None, cluster=None) -> str:
    """`slm serve`: start the application (embedded local Ray unless --cluster.address /
    RAY_ADDRESS), print the URL; with ``blocking`` serve until Ctrl-C, then shut Serve down."""
    if not blocking:
        return start(run, domains, host, port, opts)
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
