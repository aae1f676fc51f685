"""The `slm` command: a thin layer that parses arguments and calls the library.

Every sub-command that works on a study takes ``--recipe NAME|PATH`` (or ``--run RUN``: the
recipe an existing run was started with, pointed at wherever the run is now) plus one
``--section.field`` flag per recipe field (generated from the dataclasses), so a YAML recipe,
the CLI and the Python API are the same config. The handlers import the library modules they
call (each pulls in Ray, torch or Ray Serve): ``slm --help`` stays fast and never imports them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Callable

from slm.config import Recipe, dump_recipe, load_recipe, load_run_recipe, overrides_from_args
from slm.configkit import add_flags
from slm.errors import SlmError
from slm.layout import RunLayout
from slm.pipeline.config import STAGE_GROUPS
from slm.runlock import run_lock
from slm.stage import check_storage, rebuild_hint, storage_failure
from slm.tune.units import COST_UNIT_NAMES

# Rust tokenizer threads and the processes Ray forks do not mix (tokenizers warns and turns
# them off in every fork); off from the start, unless the user set it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _recipe(args, write: bool = True):
    """The command's recipe, its run directory (and ``cluster.storage``) on object storage
    checked first (``check_storage``: reachable, bucket, credentials, and with ``write`` a
    probe object), so that a bad endpoint, bucket or permission fails before any work."""
    if args.run:
        check_storage(args.run, write=write)
        recipe = load_run_recipe(args.run, overrides_from_args(args))
    else:
        recipe = load_recipe(args.recipe, overrides_from_args(args))
        check_storage(recipe.run_dir, write=write)
    if recipe.cluster.storage:
        check_storage(recipe.cluster.storage, write=write)
    return recipe


def _writing(args, run: str, create: bool = False):
    """The run's lock (slm/runlock.py) for a command that writes it: one writer per run. Only
    the commands that start a run (``create``) make its directory."""
    return run_lock(run, " ".join(["slm", *args.argv])[:300], create=create and not args.run)


def _recipe_path(args) -> str:
    """How the user named the recipe (for messages that say which command to run)."""
    return args.recipe if not args.run else f"{args.run.rstrip('/')}/recipe.yaml"


# --------------------------------------------------------------------------------------------
# Handlers: each one parses nothing, calls one library function, returns an exit status.
# --------------------------------------------------------------------------------------------

def cmd_data_demo(args) -> int:
    from slm.pipeline.demo_corpus import build_demo_corpus  # lazy: the pipeline imports Ray

    with rebuild_hint("pass --force"):  # --force rebuilds the demo corpus
        m = build_demo_corpus(args.out or None, force=args.force)
    print(f"demo corpus ready: {m['path']}")
    return 0


def cmd_data_run(args) -> int:
    recipe = _recipe(args)
    from slm.pipeline.run import run_pipeline  # lazy: imports Ray

    with _writing(args, recipe.run_dir, create=True), rebuild_hint("pass --force"):  # --force: every data stage
        run_pipeline(recipe, force=args.force, until=args.until)
    return 0


def cmd_pretrain(args) -> int:
    recipe = _recipe(args)
    from slm.models.pretrain import pretrain  # lazy: imports Ray Train, torch

    families = args.family or recipe.pretrain.families
    with _writing(args, recipe.run_dir):
        for fam in families:
            for seed in recipe.pretrain_seeds():
                pretrain(recipe, fam, recipe_path=_recipe_path(args), force=args.force, seed=seed)
    return 0


def cmd_specialize(args) -> int:
    check_storage(args.run, write=True)
    check_storage(args.domain, write=False)
    from slm.tune.add_domain import specialize_new_domain  # lazy: imports Ray, torch

    with _writing(args, args.run):
        specialize_new_domain(args.run, args.domain, name=args.name, methods=args.method)
    return 0


def cmd_sweep(args) -> int:
    recipe = _recipe(args)
    from slm.tune.sweep import run_sweep  # lazy: imports Ray Tune, torch

    with _writing(args, recipe.run_dir):
        run_sweep(recipe)
    return 0


def cmd_report(args) -> int:
    recipe = _recipe(args)
    from slm.tune.report import write_report  # lazy: imports matplotlib, pandas

    with _writing(args, recipe.run_dir):
        path = write_report(recipe, extra_results=args.results, cost_unit=args.cost_unit)
    if args.findings_md:  # the generated findings table, for the README
        from slm.tune.report import read_findings_md

        print(read_findings_md(path))
    print(f"report: {path}")
    return 0


def cmd_plan(args) -> int:
    for uri in (args.run, args.results):
        if uri:
            check_storage(uri, write=False)
    from slm.tune.planner import format_plan, plan  # lazy: reads results with pandas

    result = plan(pretrain_budget=args.pretrain_budget, specialize_budget=args.specialize_budget,
                  inference_budget=args.inference_budget, domains=args.domains,
                  domain_tokens=args.domain_tokens, results=args.results, run=args.run,
                  unit=args.cost_unit)
    print(format_plan(result))
    return 0 if result.method else 1  # nothing fits the budgets: say so in the exit status


def cmd_estimate(args) -> int:
    recipe = load_recipe(args.recipe, overrides_from_args(args)) if not args.run else \
        load_run_recipe(args.run, overrides_from_args(args))
    from slm.cluster.nodes import node_type  # lazy: the FLOPs code imports torch
    from slm.estimate import Cluster, estimate, format_estimate

    cluster = Cluster(node_type(args.node_type, args.gpus_per_node), args.nodes, args.price_per_hour)
    e = estimate(recipe, cluster, domains=args.domains, mfu=args.mfu, from_run=bool(args.run))
    print(json.dumps(e, indent=2) if args.json else format_estimate(e))
    return 0


def cmd_run(args) -> int:
    recipe = _recipe(args)
    from slm.tune.study import run_study  # lazy: imports Ray, torch

    with _writing(args, recipe.run_dir, create=True):
        run_study(recipe, force=args.force)
    return 0


def cmd_export(args) -> int:
    check_storage(args.run, write=not args.out)  # the default output is RUN/export/<domain>
    if args.out:
        check_storage(args.out, write=True)
    from slm.deploy.export import export_model  # lazy: imports torch, transformers

    inside = not args.out or RunLayout(args.run).relative(args.out) != args.out
    with _writing(args, args.run) if inside else contextlib.nullcontext():  # RUN/export/...
        path = export_model(args.run, args.domain, method=args.method, out=args.out)
    print(f"exported: {path}")
    return 0


def cmd_serve(args) -> int:
    check_storage(args.run, write=False)
    from slm.deploy.serve import ServeOptions, serve  # lazy: imports Ray Serve, torch

    opts = ServeOptions(token_file=args.token_file, insecure_no_auth=args.insecure_no_auth,
                        num_cpus=args.num_cpus, request_timeout_s=args.request_timeout,
                        max_queued_requests=args.max_queued)
    serve(args.run, domains=args.domain, host=args.host, port=args.port, blocking=True, opts=opts)
    return 0


def cmd_submit(args) -> int:
    from slm.cluster.submit import submit  # lazy: imports Ray's job client

    return submit(args.entrypoint, address=args.address, follow=args.follow,
                  num_cpus=args.entrypoint_num_cpus, num_gpus=args.entrypoint_num_gpus,
                  working_dir=args.working_dir, excludes=args.exclude,
                  insecure_http=args.insecure_http)


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

def _with_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="demo",
                   help="built-in recipe (demo, paper, study) or a YAML path (default: demo)")
    p.add_argument("--run", default="",
                   help="an existing run directory: use the recipe it was started with "
                        "(RUN/recipe.yaml), with run_dir = RUN wherever the run is now "
                        "(instead of --recipe)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe (built-in or file, --run's, and every "
                        "--section.field override applied) as YAML and exit; runs nothing")
    add_flags(p, Recipe)


def _print_config(args) -> int:
    """The recipe the command would run, as YAML (litgpt's --print_config); touches no storage."""
    overrides = overrides_from_args(args)
    recipe = load_run_recipe(args.run, overrides) if args.run else load_recipe(args.recipe, overrides)
    print(dump_recipe(recipe), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm",
        description="Train small, cheap-to-serve language models specialized to domains with "
                    "little data, on Ray. With no cluster given, an embedded local Ray runs "
                    "everything on this machine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str, recipe: bool = True, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, **kw)
        p.set_defaults(fn=fn)
        if recipe:
            _with_recipe(p)
        return p

    p = add("run", cmd_run, "the whole study end to end: data pipeline, pretraining of every "
            "family, specialization sweep, report")
    p.add_argument("--force", action="store_true", help="rebuild data stages that are already done, "
                   "and pretrainings published from another config or data")

    data = sub.add_parser("data", help="the data pipeline (corpus → tokenizer → windows → "
                          "embeddings → k-means → histograms → shards)")
    dsub = data.add_subparsers(dest="data_command", metavar="STEP")
    p = dsub.add_parser("demo", help="build the offline demo corpus from Debian packages")
    p.set_defaults(fn=cmd_data_demo)
    p.add_argument("--out", default="", help="where to write it (default: ~/.cache/slm/demo-corpus)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p = dsub.add_parser("run", help="run every data stage of a recipe (skips completed stages)")
    p.set_defaults(fn=cmd_data_run)
    _with_recipe(p)
    p.add_argument("--force", action="store_true", help="rebuild stages that are already done")
    p.add_argument("--until", default="", metavar="STAGE",
                   choices=("",) + STAGE_GROUPS,
                   help=f"stop after this stage group ({', '.join(STAGE_GROUPS)}; default: all)")

    p = add("pretrain", cmd_pretrain, "pretrain model families (once per pretraining seed) with Ray Train + DeepSpeed")
    p.add_argument("--family", action="append", choices=["slm", "llm", "is", "mix", "pn"],
                   help="family to pretrain (repeatable; default: the recipe's families)")
    p.add_argument("--force", action="store_true", help="rebuild a pretraining published from "
                   "another config or data (refused without it); its checkpoints of that config "
                   "are removed, its model replaced once the rebuild finishes")

    p = add("specialize", cmd_specialize, "add a new domain to an existing run: embed, "
            "histogram and specialize it without pretraining again", recipe=False)
    p.add_argument("--run", required=True, help="run directory of a finished pretraining run")
    p.add_argument("--domain", required=True, help="domain data: a directory or file of text/jsonl/parquet")
    p.add_argument("--name", default="", help="domain name (default: the directory name)")
    p.add_argument("--method", action="append", help="methods (default: the run's sweep methods)")

    p = add("estimate", cmd_estimate, "a recipe's training cost before running it: FLOPs, "
            "GPU-hours, wall time and price per stage on a given cluster")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    p.add_argument("--node-type", default="p5.48xlarge",
                   help="node type (cluster/nodes.py: p5.48xlarge, p4de.24xlarge, g6e.xlarge, "
                        "a3-highgpu-8g, ...) or a GPU model (H100, A100, ...)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default: the node type's)")
    p.add_argument("--price-per-hour", type=float, default=0.0, help="price of one node-hour (e.g. USD)")
    p.add_argument("--domains", type=int, default=0,
                   help="domains to specialize when the recipe names none (default 1)")
    p.add_argument("--mfu", type=float, default=0.0,
                   help="model-FLOPs utilisation to assume (default: measured in "
                        "bench/results/gpu-*.json, else 30%%)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")

    add("sweep", cmd_sweep, "Ray Tune sweep of specialization: domains × methods × budgets × sizes × seeds")
    p = add("report", cmd_report, "write the HTML report (tables and figures) of a run")
    p.add_argument("--results", action="append", default=[], help="extra results.parquet to include")
    p.add_argument("--cost-unit", choices=COST_UNIT_NAMES, default="flops",
                   help="unit of the cost axes, tables and decision chart")
    p.add_argument("--findings-md", action="store_true",
                   help="also print the generated findings table (markdown, for the README)")

    p = add("plan", cmd_plan, "recommend a method for given budgets (from measured results, or "
            "the paper's findings when there are none)", recipe=False)
    p.add_argument("--pretrain-budget", type=float, required=True,
                   help="pretraining budget per domain, in --cost-unit")
    p.add_argument("--specialize-budget", type=float, required=True,
                   help="per-domain specialization budget (to the best step), in --cost-unit")
    p.add_argument("--cost-unit", choices=COST_UNIT_NAMES, default="flops",
                   help="unit of the compute budgets: measured FLOPs or device-hours")
    p.add_argument("--inference-budget", type=float, required=True, help="max parameters of the served model")
    p.add_argument("--domains", type=int, default=1, help="number of domains N")
    p.add_argument("--domain-tokens", type=float, default=1e6, help="in-domain training tokens")
    p.add_argument("--results", default="", help="a sweep's results.parquet")
    p.add_argument("--run", default="", help="a run directory (uses its sweep results)")

    p = add("export", cmd_export, "export a specialized model as a Hugging Face directory", recipe=False)
    p.add_argument("--run", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--method", default="", help="method (default: the best measured for the domain)")
    p.add_argument("--out", default="", help="output directory (default: RUN/export/<domain>)")

    p = add("serve", cmd_serve, "serve specialists with Ray Serve (one deployment per domain + router)",
            recipe=False)
    p.add_argument("--run", required=True)
    p.add_argument("--domain", action="append", help="domains to serve (default: all exported)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default="",
                   help="file holding the bearer token clients must send (required with a "
                        "non-loopback --host)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --token-file")
    p.add_argument("--num-cpus", type=float, default=-1.0,
                   help="CPUs per specialist replica (default: fitted to the cluster's free "
                        "CPUs, at most 1)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds per request before a 504")
    p.add_argument("--max-queued", type=int, default=64,
                   help="generate requests held at once before a 503")

    p = add("submit", cmd_submit, "submit an slm command to a Ray cluster as a job "
            "(e.g. slm submit --address http://HEAD:8265 -- slm run)", recipe=False)
    p.add_argument("--address", default="", help="Ray dashboard address (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0)
    p.add_argument("--entrypoint-num-gpus", type=float, default=0)
    p.add_argument("--working-dir", default="", help="project directory to ship (default: this checkout)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="do not ship files matching PATTERN (gitignore syntax; repeatable), on top "
                        "of the defaults: .git, .venv, runs/, caches, .env*, .aws, .ssh, *.pem, "
                        "*.key, token files")
    p.add_argument("--insecure-http", action="store_true",
                   help="allow sending the Ray auth token over plain http to a non-loopback "
                        "address (default: https, or http to 127.0.0.1/localhost only)")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # names a run lock's holder
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "print_config", False):
            return _print_config(args)
        return int(args.fn(args) or 0)
    except SlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # object storage failing mid-command (endpoint down, access revoked)
        err = storage_failure(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
