"""`slm report` (tune/report.py) on a real tiny run: files, numbers, recipe mixing."""

from __future__ import annotations

import math
import os
from html.parser import HTMLParser

import pandas as pd
import pytest
from slm.tune.report import FIGURES, write_report
from slm.tune.results import read_results
from tiny_results import RECIPE, build_run

from slm.config import Recipe
from slm.errors import InputError
from slm.stage import manifest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny-run"))
    path = build_run(root)
    return root, path


class _Cells(HTMLParser):
    """The perplexity cells (td elements with data-mean) of the report."""

    def __init__(self):
        super().__init__()
        self.cells = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-mean" in a:
            self.cells.append(a)


def test_report_writes_page_figures_and_exact_table(run):
    root, path = run
    index = write_report(Recipe(name=RECIPE, run_dir=root))
    report = os.path.join(root, "report")
    assert index == os.path.join(report, "index.html")
    assert manifest(report)["stage"] == "report"  # published: manifest written last
    for name in FIGURES:
        with open(os.path.join(report, name), "rb") as f:
            data = f.read()
        assert data[:8] == PNG_MAGIC
        import matplotlib.image
        img = matplotlib.image.imread(os.path.join(report, name))
        assert img.shape[0] > 100 and img.shape[1] > 100
    with open(index, encoding="utf-8") as f:
        page = f.read()
    for name in FIGURES + ("results.parquet", "results.csv"):
        assert f"'{name}'" in page
    raw = pd.read_parquet(path)
    copied = pd.read_parquet(os.path.join(report, "results.parquet"))
    assert len(copied) == len(raw) == len(pd.read_csv(os.path.join(report, "results.csv")))
    assert "C_total(N) = C_pretrain + N · C_specialize" in page and "name: tiny-test" in page

    parser = _Cells()
    parser.feed(page)
    cells = {(c["data-domain"], c["data-method"], int(c["data-tokens"]), int(c["data-budget"])): c
             for c in parser.cells}
    keys = ["method", "domain_tokens", "budget_steps"]
    # every (domain, method, size, budget) cell + one macro row per (method, size, budget)
    n_points = raw.groupby(keys).ngroups
    assert len(cells) == raw.groupby(["domain"] + keys).ngroups + n_points
    for (dom, m, t, b), g in raw.groupby(["domain"] + keys):
        c = cells[(dom, m, t, b)]
        assert float(c["data-mean"]) == pytest.approx(g.test_ppl.mean(), rel=1e-12)
        assert float(c["data-std"]) == pytest.approx(g.test_ppl.std(ddof=1), rel=1e-9)
        assert int(c["data-seeds"]) == 2
    for (m, t, b), g in raw.groupby(keys):
        macro = math.exp(g.groupby("domain").test_loss.mean().mean())
        assert float(cells[("(macro)", m, t, b)]["data-mean"]) == pytest.approx(macro, rel=1e-12)
        per_seed = [math.exp(s.groupby("domain").test_loss.mean().mean()) for _, s in g.groupby("seed")]
        assert float(cells[("(macro)", m, t, b)]["data-std"]) == pytest.approx(pd.Series(per_seed).std(), rel=1e-9)

    # re-running replaces the report (still published, same table)
    write_report(Recipe(name=RECIPE, run_dir=root))
    assert manifest(report)["rows"] == len(raw)


def test_mixed_recipes_are_refused_naming_files(run, tmp_path):
    root, path = run
    raw = read_results(path)
    other = tmp_path / "other" / "results.parquet"
    other.parent.mkdir()
    raw.assign(recipe="paper").to_parquet(other)  # the same rows, labelled as another recipe
    with pytest.raises(InputError, match=r"recipe 'paper' in .*other.*recipe 'tiny-test' in .*tiny"):
        write_report(Recipe(name=RECIPE, run_dir=root), extra_results=[str(other)])
    two = tmp_path / "two.parquet"
    pd.concat([raw, raw.assign(recipe="demo")]).to_parquet(two)
    with pytest.raises(InputError, match="two.parquet"):
        write_report(Recipe(name=RECIPE, run_dir=root), extra_results=[str(two)])
    with pytest.raises(InputError, match="recipe 'tiny-test' but the report is for recipe 'demo'"):
        write_report(Recipe(name="demo", run_dir=root))
    with pytest.raises(InputError, match="run `slm sweep` first"):
        write_report(Recipe(name=RECIPE, run_dir=str(tmp_path / "empty-run")))


def test_cli_report_exit_status(run, tmp_path, capsys):
    from slm.cli import main

    root, _ = run
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"name: {RECIPE}\nrun_dir: {root}\n")
    assert main(["report", "--recipe", str(recipe)]) == 0
    assert "report: " in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: other\nrun_dir: {root}\n")
    assert main(["report", "--recipe", str(bad)]) == 2
    assert "error: " in capsys.readouterr().err


def test_report_computes_the_findings_from_synthetic_results(tmp_path, capsys):
    """A run whose results have pretraining levels and two pretraining seeds (synthetic: no
    training): the report writes the generated findings table (markdown + JSON), the planner's
    leave-one-cell-out accuracy, and draws costs in the unit asked for."""
    import json

    from slm.cli import main
    from slm.tune.costs import trial_costs
    from slm.tune.findings import evaluate_findings, findings_markdown, summary
    from synthetic_results import RECIPE as SYN, synthetic_results

    from slm.layout import RunLayout

    layout = RunLayout(str(tmp_path / "run"))
    df = synthetic_results(domains=("a", "b"), levels=(0.5, 1.0), pretrain_seeds=(0, 1), seeds=(0, 1))
    os.makedirs(os.path.dirname(layout.results("main")), exist_ok=True)
    df.to_parquet(layout.results("main"))
    index = write_report(Recipe(name=SYN, run_dir=layout.root), cost_unit="device-hours")
    report = os.path.dirname(index)
    assert manifest(report)["cost_unit"] == "device-hours"
    for name in ("findings.md", "findings.json", "planner_accuracy.json"):
        assert name in manifest(report)["files"]
    # the perplexity table holds the final level, every (pretraining seed, seed) pair: the
    # mean over all 4 pairs, not over the lower-valid-loss pretraining seed of each seed
    pt = pd.read_csv(os.path.join(report, "perplexity_table.csv"))
    cell = pt[(pt["domain"] == "a") & (pt["method"] == "slm") & (pt["domain_tokens"] == 8192)
              & (pt["budget_steps"] == 50)]
    rows = df[(df["domain"] == "a") & (df["method"] == "slm") & (df["domain_tokens"] == 8192)
              & (df["budget_steps"] == 50) & (df["pretrain_level"] == 1.0)]
    assert len(rows) == 4 and int(cell["n_seeds"].iloc[0]) == 4
    assert cell["mean"].iloc[0] == pytest.approx(rows["test_ppl"].mean())
    macro = pt[(pt["domain"] == "(macro)") & (pt["method"] == "slm")]
    assert set(macro["n_seeds"]) == {4}
    md = open(os.path.join(report, "findings.md"), encoding="utf-8").read()
    trials = trial_costs(df)
    expected = findings_markdown(evaluate_findings(trials, "device-hours"), summary(trials),
                                 f"slm report --recipe {SYN} --cost-unit device-hours")
    assert md == expected
    data = json.load(open(os.path.join(report, "findings.json"), encoding="utf-8"))
    verdicts = {f["id"]: f["verdict"] for f in data["findings"]}
    assert verdicts["large_model_wins"] == "reproduced" and verdicts["is_k_ablation"] == "not measurable here"
    acc = json.load(open(os.path.join(report, "planner_accuracy.json"), encoding="utf-8"))
    assert acc["any_model"]["cells"] == 2 * 2 * 2 and acc["any_model"]["cost_unit"] == "device-hours"
    page = open(index, encoding="utf-8").read()
    assert "The paper&#x27;s findings, computed on these results" in page or "findings, computed" in page
    assert page.count("<td class='finding'>") == 6 * len(data["findings"])
    assert "planner accuracy (leave one cell out" in page and "device-hours" in page
    # the CLI prints the generated table for the README
    recipe = tmp_path / "syn.yaml"
    recipe.write_text(f"name: {SYN}\nrun_dir: {layout.root}\n")
    assert main(["report", "--recipe", str(recipe), "--findings-md"]) == 0
    out = capsys.readouterr().out
    assert "| finding (paper) | comparison |" in out and f"Generated by `slm report --recipe {SYN}`" in out
    with pytest.raises(SystemExit) as e:
        main(["report", "--recipe", str(recipe), "--cost-unit", "gpus"])
    assert e.value.code == 2 and "--cost-unit" in capsys.readouterr().err


def test_readme_findings_table_is_the_committed_studys_generated_one():
    """The README's findings table is `slm report --findings-md` of the committed study, as
    generated (docs/results/study/findings.md), not typed: the same lines, in order."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "results", "study", "findings.md"), encoding="utf-8") as f:
        generated = [line for line in f.read().splitlines() if line.strip()]
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read().splitlines()
    start = readme.index(generated[0])
    assert [line for line in readme[start:start + 2 * len(generated)] if line.strip()][:len(generated)] == generated
    assert "592 trials" in generated[0] and "2 pretraining seed(s), 2 fine-tuning seed(s)" in generated[0]
