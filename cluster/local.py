"""A real multi-node Ray cluster and an S3-compatible server on this machine (tests, and by hand
through ``scripts/local_cluster.sh up|down``).

* **S3**: ``moto_server`` (``moto[server]``, test extra) on 127.0.0.1, reached the way a user
  reaches S3: ``AWS_ENDPOINT_URL`` + ``AWS_*`` credentials in the environment, which pyarrow,
  fsspec/s3fs and boto3 all honour. Buckets are created by ``S3Server.create_bucket``.
* **Ray**: a head (``ray start --head``, token auth on, 0 CPUs: it schedules, the workers work)
  and worker nodes (``ray start --address``), each with its own CPUs and a custom resource named
  after it (``{"node-a": 1}``), so a test can pin a trial driver to one node and its Train worker
  to another.

Node-local scratch that the other nodes cannot see: each worker node runs in its own mount
namespace (``unshare --mount --propagation private``) with a private tmpfs on ``/tmp``. That is
the failure a real cluster has: a path one process wrote under ``/tmp`` (pytest's tmp_path, a
trial's temp directory, Ray's session directory) does not exist for a process on another node,
so any code that hands a node-local path across nodes fails in the tests instead of in a user's
cluster. The repository and its venv stay visible (when they are under /tmp, as in a CI clone,
they are bound back into the private /tmp), as a container image would make them. Where ``unshare`` is not permitted (not root), the nodes get distinct
``--temp-dir`` directories only and ``private_tmp`` is False: the cluster still runs, the
isolation is then not enforced (the tests that need it skip).

Every process is started in its own session and stopped by its process group id (SIGTERM, then
SIGKILL), never by name: other Rays on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]  # this checkout (cluster/local.py → its root)


def kept_under_tmp() -> list[str]:
    """What a worker node's private /tmp must still show: this checkout and its venv, when they
    live under /tmp (a CI clone there, say), as a container image would hold them."""
    keep: list[str] = []
    for p in sorted({str(REPO), sys.prefix}):
        if p.startswith("/tmp/") and not any(p.startswith(k + "/") for k in keep):
            keep.append(p)
    return keep


def private_tmp_script(keep: list[str]) -> str:
    """The shell run in a worker node's own mount namespace before the raylet: a fresh tmpfs on
    /tmp, with each ``keep`` directory bound back in from the machine's /tmp (through a bind of
    the old /tmp on /mnt, unmounted before the raylet starts), then ``exec "$@"``."""
    if not keep:
        return 'mount -t tmpfs tmpfs /tmp && exec "$@"'
    binds = "".join(f"mkdir -p '{k}' && mount --rbind '/mnt{k[len('/tmp'):]}' '{k}' && " for k in keep)
    return ("mount --rbind /tmp /mnt && mount -t tmpfs tmpfs /tmp && " + binds
            + 'umount -l /mnt && exec "$@"')

# The ports a Ray node opens besides GCS and the dashboard: each gets a free one, because other
# Rays on this machine may hold the defaults (a second dashboard agent on 52365 dies, and jobs
# then find "no available agent").
_NODE_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                    "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
                    "--object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what outlived it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + (timeout if sig == signal.SIGTERM else 5)
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            _reap(pid)
            time.sleep(0.2)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def private_tmp_supported() -> bool:
    """Whether a worker node can get a private /tmp (mount namespaces need root here)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            private_tmp_script(kept_under_tmp()), "sh", "test", "-x", sys.executable],
                           capture_output=True, timeout=20)
    return probe.returncode == 0


# --------------------------------------------------------------------------------------------
# S3-compatible server
# --------------------------------------------------------------------------------------------

@dataclass
class S3Server:
    """``moto_server`` on 127.0.0.1:port, started in its own process group."""

    port: int
    pid: int = 0
    state_dir: str = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server as 'S3' (pyarrow, fsspec, boto3)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    @classmethod
    def start(cls, state_dir: str, port: int = 0) -> "S3Server":
        exe = BIN / "moto_server"
        if not exe.exists():
            raise RuntimeError(f"'{exe}' is missing; install the test extra (`pip install -e "
                               "'.[test]'`, it brings moto[server])")
        server = cls(port=port or free_port(), state_dir=state_dir)
        os.makedirs(state_dir, exist_ok=True)
        server.pid = _spawn([str(exe), "-H", "127.0.0.1", "-p", str(server.port)],
                            dict(os.environ), Path(state_dir, "s3.log"))
        server.wait_ready()
        return server

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if not _alive(self.pid) or time.time() > deadline:
                    log = Path(self.state_dir, "s3.log")
                    raise RuntimeError("moto_server did not start: "
                                       + (log.read_text()[-2000:] if log.exists() else "no log"))
                time.sleep(0.3)

    def create_bucket(self, name: str) -> None:
        import boto3  # test/cloud extra; only the server's owner creates buckets

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.pid:
            stop_group(self.pid)
            self.pid = 0

    def restart(self) -> None:
        """Stop and start on the same port. moto keeps its state in memory, so buckets and
        objects are gone afterwards unless the caller persisted them (see tests)."""
        self.stop()
        self.pid = _spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                          dict(os.environ), Path(self.state_dir, "s3.log"))
        self.wait_ready()


# --------------------------------------------------------------------------------------------
# Multi-node Ray
# --------------------------------------------------------------------------------------------

@dataclass
class Node:
    name: str
    pid: int
    cpus: int
    temp_dir: str


@dataclass
class LocalCluster:
    """A Ray head plus worker nodes on this machine, token auth on."""

    state_dir: str
    token: str
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    private_tmp: bool
    head: Node | None = None
    workers: list[Node] = field(default_factory=list)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def start(cls, state_dir: str, workers: dict[str, int] | None = None, head_cpus: int = 0,
              env: dict[str, str] | None = None, private_tmp: bool | None = None) -> "LocalCluster":
        """Start a head and one worker node per ``{name: cpus}`` (default two of 1 CPU each;
        ``{}``: the head alone).
        ``env``: extra environment every node gets (e.g. the S3 server's AWS_* variables)."""
        os.makedirs(state_dir, exist_ok=True)
        token = secrets.token_hex(16)
        node_env = dict(os.environ, **(env or {}), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                        PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        cluster = cls(state_dir=state_dir, token=token, gcs_port=free_port(),
                      dashboard_port=free_port(), env=dict(env or {}),
                      private_tmp=private_tmp_supported() if private_tmp is None else private_tmp)
        try:
            cluster._start_head(node_env, head_cpus)
            for name, cpus in ({"node-a": 1, "node-b": 1} if workers is None else workers).items():
                cluster._start_worker(node_env, name, cpus)
            cluster.wait_nodes(1 + len(cluster.workers))
        except BaseException:
            cluster.stop()
            raise
        cluster.save()
        return cluster

    def _ports(self) -> list[str]:
        return [f"{flag}={free_port()}" for flag in _NODE_PORT_FLAGS]

    def _start_head(self, env: dict[str, str], cpus: int) -> None:
        # short: Ray's socket paths under it must fit AF_UNIX's 107 bytes
        temp = tempfile.mkdtemp(prefix="slmh-", dir="/tmp")
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
               f"--ray-client-server-port={free_port()}", f"--num-cpus={cpus}", "--num-gpus=0",
               '--resources={"head": 1}', f"--temp-dir={temp}", "--disable-usage-stats",
               *self._ports()]
        pid = _spawn(cmd, env, Path(self.state_dir, "head.log"))
        self.head = Node("head", pid, cpus, temp)
        self._wait_dashboard(pid)

    def _start_worker(self, env: dict[str, str], name: str, cpus: int) -> None:
        log = Path(self.state_dir, f"{name}.log")
        ray_cmd = [str(BIN / "ray"), "start", "--block", f"--address={self.gcs_address}",
                   "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
                   f"--resources={json.dumps({name: 1})}", "--disable-usage-stats", *self._ports()]
        if self.private_tmp:
            # /tmp is a fresh tmpfs for this node only; its Ray session lives there too
            temp = "/tmp/ray"
            script = private_tmp_script(kept_under_tmp())
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                   *ray_cmd, f"--temp-dir={temp}"]
        else:
            temp = tempfile.mkdtemp(prefix=f"slm{name[-1]}-", dir="/tmp")
            cmd = [*ray_cmd, f"--temp-dir={temp}"]
        pid = _spawn(cmd, env, log)
        self.workers.append(Node(name, pid, cpus, temp))

    def _wait_dashboard(self, pid: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:  # up = the dashboard answers (401: it wants the token)
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if not _alive(pid) or time.time() > deadline:
                    raise RuntimeError("ray head did not start: " + self.log_tail("head"))
                time.sleep(0.5)

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        """Until ``n`` nodes are alive in the GCS (asked through `ray status`-free polling of the
        dashboard's node list)."""
        deadline = time.time() + timeout
        req = urllib.request.Request(f"{self.dashboard}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {self.token}"})
        while True:
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    summary = json.loads(r.read())["data"]["summary"]
                alive = [s for s in summary if s.get("raylet", {}).get("state") == "ALIVE"]
                if len(alive) >= n:
                    return
            except (OSError, KeyError, ValueError):
                pass
            for node in [self.head, *self.workers]:
                if node is not None and not _alive(node.pid):
                    raise RuntimeError(f"ray node '{node.name}' exited: " + self.log_tail(node.name))
            if time.time() > deadline:
                raise RuntimeError(f"only some of {n} ray nodes came up in {timeout:.0f} s: "
                                   + self.log_tail("node-a"))
            time.sleep(1)

    def log_tail(self, name: str, chars: int = 2000) -> str:
        log = Path(self.state_dir, f"{name}.log")
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"

    def kill_worker(self, name: str) -> None:
        """SIGKILL one worker node's process group (a node lost in the middle of a job)."""
        node = next(w for w in self.workers if w.name == name)
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _reap(node.pid)

    def restart_worker(self, name: str) -> None:
        """Start a killed worker node again under the same name and resources (a replacement
        node joining the cluster: a new Ray node id, an empty private /tmp)."""
        old = next(w for w in self.workers if w.name == name)
        if _alive(old.pid):
            raise RuntimeError(f"worker node '{name}' is still running")
        self.workers.remove(old)
        node_env = dict(os.environ, **self.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                        PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        self._start_worker(node_env, name, old.cpus)
        self.wait_nodes(1 + len(self.workers))
        self.save()

    def client_env(self) -> dict[str, str]:
        """Environment of a driver on this machine that connects to the cluster."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token}

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            if node is not None:
                stop_group(node.pid)
                if node.temp_dir.startswith("/tmp/slm") and os.path.isdir(node.temp_dir):
                    shutil.rmtree(node.temp_dir, ignore_errors=True)  # the one we made

    # ---- by hand: scripts/local_cluster.sh ----------------------------------------------------

    def save(self) -> None:
        Path(self.state_dir, "cluster.json").write_text(json.dumps(asdict(self), indent=2))


def load_cluster(state_dir: str) -> LocalCluster:
    data = json.loads(Path(state_dir, "cluster.json").read_text())
    head = Node(**data.pop("head")) if data.get("head") else None
    workers = [Node(**w) for w in data.pop("workers")]
    return LocalCluster(**data, head=head, workers=workers)


def main(argv: list[str] | None = None) -> int:
    """``python -m slm.cluster.local up|down|env [STATE_DIR]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("up", "down", "env"):
        print("usage: python -m slm.cluster.local up|down|env [STATE_DIR]", file=sys.stderr)
        return 2
    state = args[1] if len(args) > 1 else os.path.join(tempfile.gettempdir(), "slm-local-cluster")
    if args[0] == "up":
        if Path(state, "cluster.json").exists():
            print(f"a local cluster is recorded in {state}; run `down` first", file=sys.stderr)
            return 1
        s3 = S3Server.start(state)
        s3.create_bucket("slm")
        Path(state, "s3.json").write_text(json.dumps({"port": s3.port, "pid": s3.pid}))
        cluster = LocalCluster.start(state, env=s3.env)
        _write_env(state, cluster, s3)
        print(f"cluster up: {1 + len(cluster.workers)} nodes, dashboard {cluster.dashboard}, "
              f"S3 {s3.endpoint} (bucket 'slm'), private /tmp per worker: {cluster.private_tmp}")
        print(f"environment for clients: source {state}/env.sh")
        return 0
    if args[0] == "env":
        print(Path(state, "env.sh").read_text(), end="")
        return 0
    if Path(state, "cluster.json").exists():
        load_cluster(state).stop()
        Path(state, "cluster.json").unlink()
    if Path(state, "s3.json").exists():
        stop_group(json.loads(Path(state, "s3.json").read_text())["pid"])
        Path(state, "s3.json").unlink()
    print(f"cluster in {state} stopped")
    return 0


def _write_env(state: str, cluster: LocalCluster, s3: S3Server) -> None:
    env = {**cluster.client_env(), **s3.env, "SLM_DASHBOARD": cluster.dashboard}
    Path(state, "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in sorted(env.items())))


if __name__ == "__main__":
    sys.exit(main())
