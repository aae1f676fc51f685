"""Guards on what users hand to slm (issue 11): what `slm submit` ships and where it sends the
token, recipe/flag YAML errors, non-finite numbers, and the stale-artifact fix each command
really has. All unit or CLI level: no Ray is started."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slm.cli import main
from slm.cluster.submit import (check_token_transport, effective_address, is_loopback,
                                working_dir_excludes)
from slm.configkit import ConfigError, finite, from_dict, load_yaml, positive
from slm.errors import InputError, SlmError, StageError
from slm.stage import fingerprint, is_done, publish, rebuild_hint

REPO = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS",
                        "RAY_API_SERVER_ADDRESS")}
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# slm submit: what is shipped
# --------------------------------------------------------------------------------------------

def _shipped(root: Path, excludes: list[str]) -> set[str]:
    """The files Ray would upload from ``root`` with ``excludes`` (Ray's own matcher/walk)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: set[str] = set()
    _dir_travel(root, [_get_excludes(root, excludes)],
                lambda p: files.add(str(p.relative_to(root))) if p.is_file() else None,
                include_gitignore=False)
    return files


def test_submit_never_ships_secrets_envs_or_runs_and_takes_user_excludes(tmp_path):
    secrets = [".env", ".envrc", ".env.local", "sub/.env.prod", ".aws/credentials", ".ssh/id_rsa",
               "id_ed25519", "certs/server.pem", "tls.key", "auth_token", "hf_token",
               "keys/api.token", "token.txt", "gcp/token.json", ".git/config",
               ".venv/bin/python", "runs/demo/recipe.yaml", "pkg/__pycache__/m.cpython-311.pyc",
               ".netrc", ".git-credentials", "sa/credentials.json"]
    user = ["data/raw/big.jsonl", "notes/todo.ckpt"]
    kept = ["recipe.yaml", "tokenizer.py", "tokens/part-0.txt", "data/clean/a.jsonl",
            "environment.md", "README.md"]
    for rel in secrets + user + kept:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    ex = working_dir_excludes(str(tmp_path), ["data/raw/", "*.ckpt"])
    assert {".git", ".venv", "runs", ".env*", ".aws", ".ssh", "*.pem", "*.key", "data/raw/",
            "*.ckpt"} <= set(ex)
    assert _shipped(tmp_path, ex) == set(kept)
    with pytest.raises(InputError, match="--exclude got an empty pattern"):
        working_dir_excludes(str(tmp_path), [" "])


def test_submit_cli_takes_repeatable_excludes_and_insecure_http():
    from slm.cli import build_parser

    args = build_parser().parse_args(["submit", "--exclude", "a/", "--exclude", "*.bin",
                                      "--insecure-http", "--", "slm", "--help"])
    assert args.exclude == ["a/", "*.bin"] and args.insecure_http
    args = build_parser().parse_args(["submit", "--", "slm", "--help"])
    assert args.exclude == [] and not args.insecure_http


# --------------------------------------------------------------------------------------------
# slm submit: where the token goes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "http://127.0.0.1:8265", "http://127.8.9.10:8265", "http://localhost:8265",
    "http://LOCALHOST:8265", "http://[::1]:8265", "http://[::ffff:127.0.0.1]:8265",
    "127.0.0.1:8265", "https://10.0.0.5:8265", "https://head.example.com", "auto"])
def test_token_may_go_to_loopback_or_over_https(address):
    check_token_transport(address, token="Bearer secret")


@pytest.mark.parametrize("address", [
    "http://10.0.0.5:8265", "10.0.0.5:8265", "http://head.example.com:8265",
    "http://0.0.0.0:8265", "http://127.0.0.1.example.com:8265", "ray://10.0.0.5:10001",
    "http://[2001:db8::1]:8265", "HTTP://192.168.1.2:8265"])
def test_token_over_plain_http_off_loopback_is_refused(address):
    with pytest.raises(SlmError, match=r"refusing to send the Ray auth token in clear text") as e:
        check_token_transport(address, token="Bearer secret")
    msg = str(e.value)
    assert address in msg and "https://" in msg and "--insecure-http" in msg and "\n" not in msg
    assert "secret" not in msg
    check_token_transport(address, token="Bearer secret", insecure_http=True)  # the user's call
    check_token_transport(address, token="")  # no token: nothing to leak


def test_loopback_and_effective_address(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.1.2.3") and not is_loopback("example.com") and not is_loopback("")
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert effective_address("http://127.0.0.1:1") == ("http://127.0.0.1:1", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.9:8265")  # Ray lets it win over --address
    assert effective_address("http://127.0.0.1:1") == ("http://10.0.0.9:8265", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.8:8265")
    assert effective_address("")[1] == "RAY_API_SERVER_ADDRESS"


def test_slm_submit_refuses_plain_http_token_without_contacting_anyone(tmp_path):
    """The real CLI: exit 2 with the message, before any connection (a non-routable address
    would hang otherwise), and RAY_ADDRESS overriding --address is caught too."""
    env = _clean_env(HOME=str(tmp_path), RAY_AUTH_TOKEN="s3cr3t-token-value")
    cmd = [sys.executable, "-m", "slm.cli", "submit", "--address"]
    r = subprocess.run(cmd + ["http://10.255.255.1:8265", "--", "slm", "--help"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: refusing to send the Ray auth token in clear text to http://10.255.255.1:8265" \
        in r.stderr and "--insecure-http" in r.stderr
    assert "Traceback" not in r.stderr and "s3cr3t" not in r.stderr
    r = subprocess.run(cmd + ["http://127.0.0.1:9", "--", "slm", "--help"], cwd=REPO,
                       env={**env, "RAY_ADDRESS": "http://10.255.255.1:8265"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "(from RAY_ADDRESS)" in r.stderr, r.stderr


# --------------------------------------------------------------------------------------------
# Recipes and --section.field flags
# --------------------------------------------------------------------------------------------

def _slm(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _recipe_file(tmp_path: Path, body: str) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(f"run_dir: {tmp_path / 'run'}\n" + body)
    return str(p)


def test_recipe_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path, capsys):
    path = _recipe_file(tmp_path, "name: x\npretrain:\n  lr: [1, 2\nseed: 1\n")
    code, err = _slm(["report", "--recipe", path], capsys)
    assert code == 2
    assert err.startswith(f"error: recipe '{path}' is not valid YAML (line ")
    assert "fix the YAML syntax" in err and "\n" not in err


@pytest.mark.parametrize("body, key, line, first", [
    ("name: a\nseed: 1\nseed: 2\n", "seed", 4, 3),
    ("pretrain:\n  steps: 10\n  steps: 20\n", "steps", 4, 3),
    ("name: a\nname: a\n", "name", 3, 2),  # the same value twice is still two keys
])
def test_duplicate_recipe_keys_are_refused_with_their_lines(tmp_path, capsys, body, key, line, first):
    path = _recipe_file(tmp_path, body)
    code, err = _slm(["report", "--recipe", path], capsys)
    assert code == 2, err
    assert err == (f"error: recipe '{path}' has a duplicate key '{key}' at line {line} (first "
                   f"given at line {first}); keep only one of them (merge the two into one entry)")


def test_yaml_merge_keys_still_override_without_being_duplicates():
    doc = load_yaml("base: &b {p: 1, q: 2}\nother:\n  <<: *b\n  p: 3\n", "t.yaml")
    assert doc["other"] == {"p": 3, "q": 2}
    with pytest.raises(ConfigError, match=r"duplicate key 'p' at line 3 \(first given at line 2\)"):
        load_yaml("other:\n  p: 1\n  p: 2\n", "t.yaml")


def test_recipe_path_that_is_a_directory(tmp_path, capsys):
    code, err = _slm(["report", "--recipe", str(tmp_path)], capsys)
    assert code == 2
    assert err == (f"error: recipe '{tmp_path}' is a directory, not a YAML file; pass a recipe "
                   "file (--recipe PATH.yaml) or a built-in recipe (demo, paper, study)")
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: demo\n")
    code, err = _slm(["report", "--recipe", str(run)], capsys)
    assert code == 2 and f"use `--run {run}`" in err


def test_recipe_directory_through_the_real_entry_point_has_no_traceback(tmp_path):
    r = subprocess.run([str(REPO / ".venv" / "bin" / "slm"), "report", "--recipe", str(tmp_path)],
                       cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: recipe '{tmp_path}' is a directory, not a YAML file; "
                                "pass a recipe file (--recipe PATH.yaml) or a built-in recipe "
                                "(demo, paper, study)")


def test_override_flag_yaml_syntax_error_names_the_flag(tmp_path, capsys):
    code, err = _slm(["report", "--recipe", "demo", "--run_dir", str(tmp_path / "r"),
                      "--sweep.methods", "[slm, pn"], capsys)
    assert code == 2
    assert "flag --sweep.methods '[slm, pn' is not valid YAML (line 1" in err, err
    assert "give a YAML value, e.g. --sweep.methods '[slm, slm-d]'" in err and "\n" not in err
    code, err = _slm(["report", "--recipe", "demo", "--run_dir", str(tmp_path / "r"),
                      "--sweep.methods", "{a: 1, a: 2}"], capsys)
    assert code == 2 and "flag --sweep.methods '{a: 1, a: 2}' has a duplicate key 'a'" in err


def test_unreadable_recipe_is_a_clear_error(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, err = _slm(["report", "--recipe", str(p)], capsys)
    assert code == 2 and f"recipe '{p}' is not UTF-8 text" in err


# --------------------------------------------------------------------------------------------
# Non-finite numbers
# --------------------------------------------------------------------------------------------

@dataclass
class _Section:
    lr: float = 1e-3
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    steps: int = 10


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_positive_refuses_non_finite(bad):
    for allow_zero in (False, True):
        with pytest.raises(ConfigError, match=r"field 'lr' must be a finite number"):
            positive(_Section(lr=bad), "lr", allow_zero=allow_zero)
        with pytest.raises(ConfigError, match=r"field 'lrs' must be a finite number"):
            positive(_Section(lrs=[1e-3, bad]), "lrs", allow_zero=allow_zero)
        with pytest.raises(ConfigError, match=r"field 'lr' must be a finite number"):
            finite(_Section(lr=bad), "lr")
    positive(_Section(), "lr", "lrs", "steps")
    positive(_Section(steps=10 ** 400), "steps")  # a huge int is finite (no float overflow)


def test_real_sections_refuse_nan_and_recipes_refuse_inf_anywhere(tmp_path, capsys):
    from slm.config import Recipe
    from slm.tune.config import SpecializeConfig

    with pytest.raises(ConfigError, match=r"field 'lr' must be a finite number, got nan"):
        SpecializeConfig(lr=math.nan).validate()
    # a float field that no positive() guards (min_lr_ratio): refused when read
    with pytest.raises(ConfigError, match=r"pretrain\.train\.min_lr_ratio: expected a finite number"):
        from_dict(Recipe, {"pretrain": {"train": {"min_lr_ratio": math.inf}}})
    path = _recipe_file(tmp_path, "specialize:\n  kd_weight: .nan\n")
    code, err = _slm(["report", "--recipe", path], capsys)
    assert code == 2 and "specialize.kd_weight: expected a finite number, got nan" in err, err
    code, err = _slm(["report", "--recipe", "demo", "--run_dir", str(tmp_path / "r"),
                      "--pretrain.train.lr", "inf"], capsys)
    assert code == 2 and "pretrain.train.lr: expected a finite number, got 'inf'" in err, err


# --------------------------------------------------------------------------------------------
# Stale artifacts: the fix named is one the command has
# --------------------------------------------------------------------------------------------

def test_stale_artifact_message_offers_force_only_where_it_exists(tmp_path):
    uri = str(tmp_path / "art")
    with publish(uri, stage="t", config={"k": 8}):
        pass
    other = fingerprint({"config": {"k": 16}, "inputs": {}})
    with pytest.raises(StageError) as e:
        is_done(uri, other)
    msg = str(e.value)
    assert "--force" not in msg
    assert f"Use another run_dir, or delete '{uri}' (and the artifacts built from it)" in msg
    with rebuild_hint("pass --force"):  # what `slm run` / `slm data run` set around the data stages
        with pytest.raises(StageError, match=r"or pass --force to rebuild it"):
            is_done(uri, other)
    with pytest.raises(StageError) as e:  # scoped: gone after the block
        is_done(uri, other)
    assert "--force" not in str(e.value)


def test_stale_sweep_trial_does_not_tell_to_pass_force(tmp_path):
    """`slm sweep` has no --force (and `slm run --force` rebuilds data stages only): a trial
    published under another specialization config names fixes that exist."""
    from slm.config import load_recipe
    from slm.tune.grid import Trial, trial_done, trial_stage

    recipe = load_recipe("demo", {"run_dir": str(tmp_path / "run")})
    trial = Trial("jargon", "slm", 10, 1000, 0, 1e-3)
    uri = str(tmp_path / "trial")
    with trial_stage(recipe, trial, uri).publish():
        pass
    assert trial_done(recipe, trial, uri)
    changed = load_recipe("demo", {"run_dir": str(tmp_path / "run"), "specialize.kd_weight": "0.25"})
    with pytest.raises(StageError, match="different config") as e:
        trial_done(changed, trial, uri)
    assert "--force" not in str(e.value) and f"delete '{uri}'" in str(e.value)


def test_stale_histograms_name_the_fix_of_the_command_that_met_them(tmp_path):
    """Histograms counted from other assignments: under `slm run`/`slm data run` the fix is
    their --force; anywhere else (e.g. `slm specialize`, which has no --force) the data command
    with the run's own recipe."""
    from slm.layout import RunLayout
    from slm.pipeline.kmeans import histograms

    layout = RunLayout(str(tmp_path / "run"))
    assign = layout.assignments(8, "generic-train")
    with publish(assign, stage="assign", config={"k": 8, "version": 2}):
        pass
    with publish(layout.histograms(8), stage="histograms", config={"k": 8, "sets": ["generic-train"]},
                 inputs={layout.relative(assign): "counted-from-an-older-assignment"}):
        pass
    with pytest.raises(StageError, match="counted from other assignments") as e:
        histograms(layout, 8, ["generic-train"])
    msg = str(e.value)
    assert "pass --force" not in msg
    assert f"re-run `slm data run --recipe {layout.recipe} --force` to recount them" in msg
    with rebuild_hint("pass --force"):
        with pytest.raises(StageError, match=r"pass --force to recount them"):
            histograms(layout, 8, ["generic-train"])


def test_stale_assignment_met_while_joining_shards_names_the_drivers_fix(tmp_path):
    """The join runs in Ray tasks, which do not see the driver's rebuild hint: the fix is
    computed on the driver and passed in, so the task never offers a flag the command lacks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slm.pipeline.shards import _lookup

    path = str(tmp_path / "assign.parquet")
    pq.write_table(pa.table({"unit_id": pa.array([1, 2, 4], pa.int64()),
                             "cluster": pa.array([0, 1, 0], pa.int32())}), path)
    assert _lookup(np.array([1, 4]), str(tmp_path), [path], 8, None, "w.parquet", "x").tolist() == [0, 0]
    with pytest.raises(StageError, match=r"lacks the cluster of 1 unit\(s\) of 'w\.parquet'; the "
                                         r"assignment is stale: re-run `slm data run --recipe R "
                                         r"--force` to rebuild assign-k8"):
        _lookup(np.array([1, 3]), str(tmp_path), [path], 8, None, "w.parquet",
                "re-run `slm data run --recipe R --force`")
