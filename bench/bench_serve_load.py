"""A bounded localhost load test of `slm serve`: throughput, latency, batching, 5xx, memory.

The bench builds the tiny two-domain run of tests/tiny_run.py (`code` and `legal`: real
byte-level BPE tokenizer, two 2-layer GPT-2 specialists with a 64-token context, real MiniLM
routing) in a temp directory, exports both domains, and serves them on an embedded 2-CPU Ray
(`slm.deploy.serve.start`, default CPU shares, bearer-token auth on) at 127.0.0.1 only.

Phase `load`: ``--clients`` concurrent clients (asyncio + aiohttp, one keep-alive connection
each) for ``--seconds``; each request picks a domain (``--routed`` of them name none and are
routed by embedding), a prompt of 1-48 tokens and max_new_tokens 1-16 (temperature 0 or 0.8).
Phase `overfill`: ``--overfill-clients`` clients (well beyond the router's
``max_queued_requests``) for ``--overfill-seconds``; a client that gets a 503 waits 0.1 s (not
the Retry-After) before its next request. Then ``--after`` sequential requests check that the
server still answers. Every client loop is bounded by a deadline and a request count; every
request by a 60 s client timeout.

Recorded: requests/s (200s per second), p50/p90/p99 latency of the 200s, status counts, the
largest batch (and group) the specialists saw (GET /v1/stats), 5xx counts, and memory: the peak
of the summed RSS of this run's Ray processes (every descendant of this driver process, sampled
each 0.5 s; shared pages count once per process) and each replica's own peak RSS.

    nice -n 10 timeout 900 .venv/bin/python bench/bench_serve_load.py [--clients 32 --seconds 20]
Goal: load phase 0 5xx; overfill phase only 200/503 (no 500, no 504) with some 503s; the server
answers every request after. Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import threading
import time

import numpy as np

from machine_info import machine  # bench/machine_info.py (the script's own folder is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedding model is local
os.environ.pop("RAY_ADDRESS", None)            # always a fresh embedded Ray, never a shared one

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "serve_load.json")
HOST = "127.0.0.1"
CLIENT_TIMEOUT = 60.0
MAX_REQUESTS_PER_CLIENT = 5000


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MemorySampler:
    """Peak summed RSS of this process's descendants (the embedded Ray's processes), sampled
    every ``every`` s for at most ``limit_s`` s."""

    def __init__(self, every: float = 0.5, limit_s: float = 900.0):
        import psutil

        self.psutil, self.every, self.limit_s = psutil, every, limit_s
        self.peak, self.peak_processes, self.samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        total, n = 0, 0
        for p in self.psutil.Process().children(recursive=True):
            try:
                total += p.memory_info().rss
                n += 1
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total, n

    def _run(self):
        end = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < end:
            total, n = self.sample()
            self.samples += 1
            if total > self.peak:
                self.peak, self.peak_processes = total, n
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def make_prompts(texts: dict, tok, rng: random.Random, n: int = 400) -> list[tuple[str, str, int]]:
    """(domain, prompt, prompt tokens) with 1-48 tokens, cut from the domains' held-out text."""
    out = []
    ids = {d: tok(" ".join(t["test"] + t["train"][:4]))["input_ids"] for d, t in texts.items()}
    for _ in range(n):
        d = rng.choice(sorted(ids))
        k = rng.randint(1, 48)
        start = rng.randint(0, max(len(ids[d]) - k, 0))
        p = tok.decode(ids[d][start:start + k])
        if p.strip():
            out.append((d, p, len(tok(p)["input_ids"])))
    return out


async def run_phase(url: str, token: str, prompts: list, clients: int, seconds: float,
                    routed: float, seed: int, backoff_503: float) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    lat: list[float] = []
    status: dict[str, int] = {}
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def client(i: int, session):
        rng = random.Random(seed * 1000 + i)
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= deadline:
                return
            d, p, n = rng.choice(prompts)
            body = {"prompt": p, "max_new_tokens": rng.randint(1, min(16, 64 - n)),
                    "temperature": rng.choice([0.0, 0.0, 0.8])}
            if rng.random() >= routed:
                body["domain"] = d
            t0 = time.monotonic()
            try:
                async with session.post(url + "/generate", json=body, headers=headers) as r:
                    await r.read()
                    code = r.status
            except Exception as e:  # a connection error is a failure the bench reports
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            dt = time.monotonic() - t0
            status[str(code)] = status.get(str(code), 0) + 1
            if code == 200:
                lat.append(dt)
            elif code == 503 and backoff_503:
                await asyncio.sleep(backoff_503)

    conn = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.wait_for(asyncio.gather(*(client(i, session) for i in range(clients))),
                               timeout=seconds + CLIENT_TIMEOUT + 30)
    wall = time.monotonic() - t0
    a = np.array(lat) if lat else np.array([np.nan])
    n5 = {k: v for k, v in status.items() if k.startswith("5")}
    return {"clients": clients, "seconds": round(wall, 2), "requests": sum(status.values()),
            "ok": len(lat), "requests_per_s": round(len(lat) / wall, 2),
            "latency_s": {"p50": round(float(np.nanpercentile(a, 50)), 4),
                          "p90": round(float(np.nanpercentile(a, 90)), 4),
                          "p99": round(float(np.nanpercentile(a, 99)), 4),
                          "max": round(float(np.nanmax(a)), 4)},
            "status": dict(sorted(status.items())), "client_errors": errors,
            "5xx": sum(n5.values()), "5xx_other_than_503": sum(v for k, v in n5.items() if k != "503")}


def get_json(url: str, token: str) -> dict:
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT) as r:
        return json.loads(r.read())


def post_once(url: str, token: str, body: dict) -> tuple[int, float]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT) as r:
            r.read()
            return r.status, time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--overfill-clients", type=int, default=256)
    ap.add_argument("--overfill-seconds", type=float, default=10.0)
    ap.add_argument("--routed", type=float, default=0.1, help="share of requests naming no domain")
    ap.add_argument("--max-queued", type=int, default=64, help="ServeOptions.max_queued_requests")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-wait", type=float, default=0.02)
    ap.add_argument("--after", type=int, default=10, help="requests after the overfill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()
    for name in ("clients", "overfill_clients", "after", "max_queued"):
        if not 1 <= getattr(a, name) <= 2000:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [1, 2000]")
    if not (0 < a.seconds <= 300 and 0 < a.overfill_seconds <= 300):
        raise SystemExit("--seconds and --overfill-seconds must be in (0, 300]")

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from tiny_run import build_tiny_run
    from ray import serve
    from transformers import AutoTokenizer

    from slm.cluster.config import ClusterConfig
    from slm.cluster.ray_env import ray_session
    from slm.deploy.export import export_model
    from slm.deploy.serve import ServeOptions, start

    load_start = os.getloadavg()
    base = tempfile.mkdtemp(prefix="slm-bench-serve-")
    t0 = time.time()
    tiny = build_tiny_run(os.path.join(base, "run"))
    for d in ("code", "legal"):
        export_model(tiny["root"], d)
    token = secrets.token_urlsafe(32)
    token_file = os.path.join(base, "token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(token + "\n")
    tok = AutoTokenizer.from_pretrained(os.path.join(tiny["root"], "export", "code"))
    prompts = make_prompts(tiny["texts"], tok, random.Random(a.seed))
    build_s = time.time() - t0
    opts = ServeOptions(max_new_tokens=16, max_prompt_chars=2000, max_batch_size=a.max_batch,
                        batch_wait_s=a.batch_wait, torch_threads=1,
                        max_queued_requests=a.max_queued, token_file=token_file,
                        ready_timeout_s=300)
    with ray_session(ClusterConfig(num_cpus=2)), MemorySampler() as mem:
        t0 = time.time()
        url = start(tiny["root"], None, HOST, free_port(), opts)
        ready_s = time.time() - t0
        try:
            for d in ("code", "legal", None):  # warm-up: first generate, embedder load
                body = {"prompt": "The licence", "max_new_tokens": 2, **({"domain": d} if d else {})}
                assert post_once(url, token, body)[0] == 200
            load = asyncio.run(run_phase(url, token, prompts, a.clients, a.seconds, a.routed,
                                         a.seed, 0.0))
            stats_load = get_json(url + "/stats", token)
            over = asyncio.run(run_phase(url, token, prompts, a.overfill_clients,
                                         a.overfill_seconds, a.routed, a.seed + 1, 0.1))
            time.sleep(2)
            after = [post_once(url, token, {"prompt": p, "domain": d, "max_new_tokens": 8})
                     for d, p, _ in prompts[:a.after]]
            stats = get_json(url + "/stats", token)
            limits = get_json(url + "/domains", token)["limits"]
        finally:
            serve.shutdown()
    spec = stats["specialists"]
    after_ok = all(s == 200 for s, _ in after)
    ok = (load["5xx"] == 0 and not load["client_errors"] and over["5xx_other_than_503"] == 0
          and not over["client_errors"] and over["status"].get("503", 0) > 0 and after_ok)
    result = {
        "bench": "serve_load",
        "through": "slm.deploy.serve.start on an embedded 2-CPU Ray, HTTP to 127.0.0.1 (aiohttp "
                   "clients, bearer auth on), tiny 2-domain run of tests/tiny_run.py",
        "goal": "load: 0 5xx; overfill: only 200/503 (some 503), no 500/504; all requests "
                "answered 200 after the overfill",
        "pass": bool(ok),
        "load": {**load, "largest_batch": {d: s.get("largest_batch") for d, s in stats_load["specialists"].items()},
                 "largest_group": {d: s.get("largest_group") for d, s in stats_load["specialists"].items()}},
        "overfill": {**over, "max_queued_requests": a.max_queued,
                     "router_busy_503": stats["router"]["busy"],
                     "router_peak_in_flight": stats["router"]["peak_in_flight"]},
        "after_overfill": {"requests": len(after), "all_200": after_ok,
                           "status": [s for s, _ in after],
                           "latency_s_max": round(max(t for _, t in after), 4)},
        "largest_batch": max(s.get("largest_batch", 0) for s in spec.values()),
        "memory": {"ray_processes_peak_rss_bytes": mem.peak,
                   "ray_processes_at_peak": mem.peak_processes, "samples": mem.samples,
                   "replica_peak_rss_bytes": {"router": stats["router"]["peak_rss_bytes"],
                                              **{d: s.get("peak_rss_bytes") for d, s in spec.items()}}},
        "router_status_counts": stats["router"]["status"],
        "settings": {"clients": a.clients, "seconds": a.seconds,
                     "overfill_clients": a.overfill_clients, "overfill_seconds": a.overfill_seconds,
                     "routed_share": a.routed, "max_batch_size": a.max_batch,
                     "batch_wait_s": a.batch_wait, "max_new_tokens": "1-16",
                     "prompt_tokens": "1-48", "context_tokens": 64, "limits": limits,
                     "build_s": round(build_s, 1), "ready_s": round(ready_s, 1), "ray_cpus": 2},
        "load_average": {"start": [round(x, 2) for x in load_start],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "machine": machine(),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    for name in ("load", "overfill"):
        r = result[name]
        print(f"{name}: {r['clients']} clients x {r['seconds']} s: {r['requests']} requests, "
              f"{r['requests_per_s']} ok/s, p50 {r['latency_s']['p50']} s, p99 "
              f"{r['latency_s']['p99']} s, status {r['status']}, client errors {r['client_errors']}")
    print(f"SUMMARY largest batch {result['largest_batch']}, peak RSS of the Ray processes "
          f"{mem.peak / 2**20:.0f} MiB, after overfill all 200: {after_ok}; goal "
          f"{'PASS' if ok else 'FAIL'}; wrote {a.out}")


if __name__ == "__main__":
    main()
