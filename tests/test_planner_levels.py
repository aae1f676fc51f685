"""The measured planner on synthetic results with pretraining levels (no training, pure Python):
2-D interpolation, domain sizes in log tokens, selection on valid NLL, cost units, costs to the
best step, budgets below every measured point, leave-one-cell-out accuracy."""

from __future__ import annotations

import math

import pytest
from slm.tune.costs import aggregate_points, trial_costs
from slm.tune.planner import format_plan, leave_one_cell_out, measured_levels, plan, predict
from synthetic_results import synthetic_results

from slm.cli import main


@pytest.fixture()
def results(tmp_path):
    df = synthetic_results(methods=("slm", "pn", "llm", "nopt"))
    path = str(tmp_path / "results.parquet")
    df.to_parquet(path)
    return df, path


def test_costs_to_best_and_total_and_the_fallback(results):
    df, _ = results
    t = trial_costs(df)
    assert (t["c_spec_flops"] == t["spec_flops_to_best"]).all()
    assert (t["c_spec_total_flops"] == t["spec_flops"]).all()
    assert (t["c_spec_flops"] < t["c_spec_total_flops"]).all()
    old = trial_costs(df.drop(columns=["spec_flops_to_best", "spec_device_seconds_to_best"]))
    expect = old["spec_flops"] * old["best_step"] / old["steps_run"]
    assert old["c_spec_flops"].to_numpy() == pytest.approx(expect.to_numpy())
    # levels are separate points; absent level columns read as level 1.0, seed 0
    pts = aggregate_points(t)
    assert set(pts["pretrain_level"]) == {0.5, 1.0}
    one = aggregate_points(trial_costs(df[df.pretrain_level == 1.0].drop(
        columns=["pretrain_level", "pretrain_seed"])))
    assert set(one["pretrain_level"]) == {1.0} and set(one["n_pretrain_seeds"]) == {1}


def test_interpolates_between_levels_and_domain_sizes(results):
    df, _ = results
    pts = aggregate_points(trial_costs(df))
    m = measured_levels(pts)["slm"]
    s = pts[(pts.method == "slm") & (pts.budget_steps == 200)]
    lo_t, hi_t = sorted(set(s.domain_tokens))
    big_spec = float(pts.c_spec_flops.max()) * 10
    # halfway in log pretraining cost between the two levels, at the smallest size
    a = s[(s.domain_tokens == lo_t)].sort_values("pretrain_level")
    mid = math.sqrt(a.c_pretrain_flops.iloc[0] * a.c_pretrain_flops.iloc[1])
    (valid, test, rows), _ = predict(m, mid, big_spec, 1, lo_t)
    assert valid == pytest.approx(a.macro_valid_nll.mean())
    assert test == pytest.approx(a.macro_nll.mean())
    # halfway in log tokens between the two sizes, at the top level
    top = float(s.c_pretrain_flops.max()) * 2
    (_, t_lo, _), _ = predict(m, top, big_spec, 1, lo_t)
    (_, t_hi, _), _ = predict(m, top, big_spec, 1, hi_t)
    (_, t_mid, _), _ = predict(m, top, big_spec, 1, math.sqrt(lo_t * hi_t))
    assert t_mid == pytest.approx((t_lo + t_hi) / 2) and t_lo != t_hi


def test_selects_on_valid_and_predicts_test(tmp_path):
    df = synthetic_results(methods=("slm", "pn"))
    # pn: best on test, worse on valid -> the planner must not see the test split
    df.loc[df.method == "pn", "valid_loss"] += 1.0
    path = str(tmp_path / "r.parquet")
    df.to_parquet(path)
    r = plan(1e30, 1e30, 1e9, domain_tokens=8192, results=path)
    assert r.method == "slm"
    pn = next(c for c in r.candidates if c.method == "pn")
    assert pn.predicted_nll < r.candidates[0].predicted_nll  # the test prediction it reports


def test_budgets_below_every_measured_point_give_no_recommendation(results, capsys):
    _, path = results
    r = plan(1.0, 1.0, 1e9, domain_tokens=8192, results=path)
    assert r.method is None and r.predicted_ppl is None
    text = format_plan(r)
    assert "below every measured point" in text and "none fits" in text
    assert main(["plan", "--pretrain-budget", "1", "--specialize-budget", "1",
                 "--inference-budget", "1e9", "--results", path]) == 1
    assert "below every measured point" in capsys.readouterr().out


def test_cost_unit_device_hours_sees_pn_slower(results):
    df, path = results
    pts = aggregate_points(trial_costs(df))
    top = pts[pts.pretrain_level == 1.0].groupby("method")
    flops, hours = top.c_pretrain_flops.mean(), top.c_pretrain_hours.mean()
    # a pretraining budget in device-hours between slm's and pn's (pn is slower per FLOP)
    budget = (hours["slm"] + hours["pn"]) / 2
    assert hours["pn"] > budget > hours["slm"]
    r = plan(budget, 1e9, 1e9, domain_tokens=8192, results=path, unit="device-hours")
    assert r.budgets["cost_unit"] == "device-hours" and "device-hours" in format_plan(r)
    fits = {c.method for c in r.candidates if c.fits}
    assert "slm" in fits
    assert next(c for c in r.candidates if c.method == "pn").predicted_valid_nll is not None  # level 0.5 fits
    assert flops["pn"] > flops["slm"]
    with pytest.raises(SystemExit):
        main(["plan", "--pretrain-budget", "1", "--specialize-budget", "1", "--inference-budget",
              "1e9", "--cost-unit", "gpus"])


def test_leave_one_cell_out(results):
    df, path = results
    pts = aggregate_points(trial_costs(df))
    acc = leave_one_cell_out(pts)
    assert acc["cells"] == 2 * 2 * 2  # sizes x budgets x levels
    assert 0 < acc["cells_predicted"] <= acc["cells"]
    # the LLM is the best everywhere in these results, and the planner sees that
    assert acc["pick_accuracy"] == 1.0
    assert all(c["measured_best"] == "llm" for c in acc["per_cell"])
    assert acc["median_abs_ppl_error"] >= 0
    small = leave_one_cell_out(pts, inference_budget=1_000_000)
    assert all(c["measured_best"] != "llm" for c in small["per_cell"])
    assert "planner accuracy (leave one cell out" in format_plan(
        plan(1e30, 1e30, 1e9, domain_tokens=8192, results=path))


def test_interpolation_in_any_unit_and_from_zero_cost():
    from slm.tune.planner import interpolate

    # device-hours are often < 1: log-cost interpolation must not clamp them
    v, idx = interpolate([(0.001, 3.0), (0.1, 2.0)], 0.01)
    assert v == pytest.approx(2.5) and idx == [0, 1]
    # from a zero cost (nothing pretrained) there is no log scale: the zero-cost point until
    # the next point is affordable
    assert interpolate([(0.0, 3.0), (0.01, 2.0)], 0.005) == (3.0, [0])
    assert interpolate([(0.0, 3.0), (0.01, 2.0)], 0.01) == (2.0, [1])
