"""The one config system: recipes <-> dataclasses <-> CLI flags, with errors that name the field."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from slm.cli import build_parser
from slm.config import BUILTIN_RECIPES, Recipe, dump_recipe, load_recipe, overrides_from_args
from slm.configkit import ConfigError, apply_overrides, from_dict, iter_leaf_fields


@pytest.mark.parametrize("name", BUILTIN_RECIPES)
def test_builtin_recipes_load_and_validate(name):
    r = load_recipe(name)
    assert r.name == name
    assert r.data.seq_len > 0 and r.kmeans.k_is > 0


def test_paper_recipe_has_the_papers_sizes():
    r = load_recipe("paper")
    assert r.tokenizer.vocab_size == 32000
    assert r.data.seq_len == 1024
    assert (r.kmeans.k_is, r.kmeans.k_mix, r.kmeans.k_pn) == (1024, 16, 32)
    assert r.data.domain_train_tokens == [1_000_000, 8_000_000, 64_000_000]
    assert (r.pretrain.slm_size, r.pretrain.llm_size) == ("paper-slm", "paper-llm")
    assert r.pretrain.train.lr == 1e-4 and r.pretrain.train.clip == 5.0 and r.pretrain.train.warmup == 1000


def test_yaml_roundtrip(tmp_path):
    r = load_recipe("demo")
    p = tmp_path / "r.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(str(p)) == r


def test_unknown_field_names_the_field_and_suggests(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"kmeans": {"k_iss": 8}}))
    with pytest.raises(ConfigError, match=r"kmeans\.k_iss.*Did you mean 'k_is'") as e:
        load_recipe(str(p))
    assert str(p) in str(e.value)


@pytest.mark.parametrize("override, field", [
    ({"data.seq_len": "0"}, "seq_len"),
    ({"data.domain_train_tokens": "[1000, -5]"}, "domain_train_tokens"),
    ({"tokenizer.vocab_size": "-1"}, "vocab_size"),
    ({"pretrain.steps": "{slm: 0}"}, "steps.slm"),
    ({"sweep.budgets": "[0]"}, "budgets"),
    ({"embed.batch_size": "0"}, "batch_size"),
])
def test_zero_or_negative_sizes_are_rejected(override, field):
    with pytest.raises(ConfigError, match=field):
        load_recipe("demo", override)


@pytest.mark.parametrize("override, field", [
    ({"sweep.seeds": "[0, 1, 0]"}, "seeds"),
    ({"sweep.methods": "[slm, pn, slm]"}, "methods"),
    ({"sweep.budgets": "[20, 20]"}, "budgets"),
    ({"sweep.levels": "[0.5, 0.5]"}, "levels"),
])
def test_a_sweep_axis_listing_a_value_twice_is_refused(override, field):
    with pytest.raises(ConfigError, match=rf"field '{field}' lists .* more than once"):
        load_recipe("demo", override)


def test_type_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"kmeans\.k_mix: expected an integer"):
        from_dict(Recipe, {"kmeans": {"k_mix": "many"}})


def test_overrides_parse_yaml_values():
    r = apply_overrides(load_recipe("demo"), {"sweep.methods": "[slm, pn]", "kmeans.k_mix": "8",
                                              "corpus.domains": "{law: /data/law}"})
    assert r.sweep.methods == ["slm", "pn"] and r.kmeans.k_mix == 8
    assert r.corpus.domains == {"law": "/data/law"}


def test_every_leaf_field_is_a_cli_flag_with_help():
    names = [n for n, _, _ in iter_leaf_fields(Recipe)]
    assert "pretrain.train.zero_stage" in names and "kmeans.k_is" in names
    missing = [n for n, _, h in iter_leaf_fields(Recipe) if not h]
    assert not missing, f"fields without help text: {missing}"


def test_cli_flag_overrides_reach_the_recipe(tmp_path):
    args = build_parser().parse_args(["sweep", "--kmeans.k_is", "64", "--sweep.seeds", "[0, 1, 2]"])
    r = load_recipe(args.recipe, overrides_from_args(args))
    assert r.kmeans.k_is == 64 and r.sweep.seeds == [0, 1, 2]


def test_unknown_recipe_is_a_clear_cli_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "slm.cli", "sweep", "--recipe", "nosuch"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown recipe 'nosuch'" in out.stderr and "demo" in out.stderr


def test_print_config_prints_the_resolved_recipe_and_runs_nothing(tmp_path, capsys):
    import yaml

    from slm.cli import main

    run = tmp_path / "run"
    assert main(["sweep", "--print-config", "--run_dir", str(run), "--sweep.budgets", "[10, 20]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sweep"]["budgets"] == [10, 20] and printed["run_dir"] == str(run)
    assert printed["name"] == "demo" and "pretrain" in printed
    assert not run.exists()  # nothing was created, locked or run

    run.mkdir()  # --run: the run's own recipe, with the overrides on top
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "mine", "data": {"seq_len": 32}}))
    assert main(["report", "--print-config", "--run", str(run), "--seed", "7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["name"], printed["data"]["seq_len"], printed["seed"]) == ("mine", 32, 7)
    assert printed["run_dir"] == str(run)
    assert sorted(os.listdir(run)) == ["recipe.yaml"]
