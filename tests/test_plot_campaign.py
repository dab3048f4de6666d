"""tools/plot_campaign.py: the campaign plot's top axis gives each sitting's own CPU-hours, and the
plot is drawn from a record in the format docs/results/*_campaign.csv keep, one curve a campaign."""

import csv
import importlib.util

import numpy as np
import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("plot_campaign", ROOT / "tools" / "plot_campaign.py")
plot_campaign = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_campaign)


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot_campaign saves, in order, each still open to read its lines from."""
    import matplotlib.figure
    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    return figures


def test_top_axis_puts_each_sitting_at_its_own_hours_not_at_an_average_rate():
    pflop, hours = [0.84, 1.37, 2.08], [1.46, 2.49, 3.57]    # sitting 2 shared the CPU: a slower stretch
    to_hours, to_pflop = plot_campaign.hours_axis(pflop, hours)
    assert np.allclose(to_hours(np.array(pflop)), hours)
    assert np.allclose(to_pflop(np.array(hours)), pflop)
    assert to_hours(0.0) == 0.0
    grid = np.linspace(0, 5, 51)                               # past the last sitting: the average rate
    assert np.all(np.diff(to_hours(grid)) > 0)
    assert np.isclose(to_hours(5.0), 3.57 + (5.0 - 2.08) * 3.57 / 2.08)
    assert np.allclose(to_pflop(to_hours(grid)), grid)


def test_plot_writes_a_png_from_a_campaign_record(tmp_path):
    record = tmp_path / "toy_campaign.csv"
    fields = ["sitting", "steps", "images", "pflop", "hours", "fid", "kid", "kid_std", "n", "floor",
              "floor_kid", "sampler", "calls", "floor_n", "fid300"]      # the floor at n = 300, as the faces'
    rows = [[1, 100, 6400, 0.5, 0.7, 80.0, 0.06, 0.001, 2000, 33.6, 0.0, "ddpm", 50, 300, 95.0],
            [2, 200, 12800, 1.0, 1.6, 60.0, 0.04, 0.001, 2000, 33.6, 0.0, "ddpm", 50, 300, 75.0],
            [3, 300, 19200, 1.5, "", "", "", "", 2000, 33.6, 0.0, "ddpm", 50, 300, ""]]   # not scored yet: skipped
    with open(record, "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    assert [r["sitting"] for r in plot_campaign.read(record)] == ["1", "2"]
    out = plot_campaign.plot(record)
    assert out == record.with_suffix(".png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_end_scored_at_a_larger_n_is_its_own_series(tmp_path):
    record = tmp_path / "cifar_campaign.csv"
    fields = ["sitting", "steps", "images", "pflop", "hours", "fid", "kid", "kid_std", "n", "floor",
              "floor_kid", "sampler", "calls", "target"]
    rows = [[1, 100, 6400, 0.5, 0.7, 64.0, 0.04, 0.001, 2000, 25.1, 0.0, "ddpm", 50, ""],
            [2, 200, 12800, 1.0, 1.6, 50.0, 0.03, 0.001, 2000, 25.1, 0.0, "ddpm", 50, ""],
            [2, 200, 12800, 1.0, 1.6, 30.0, 0.03, 0.001, 10000, 5.13, 0.0, "ddpm", 50, 35]]   # FID-10k at the end
    with open(record, "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    groups = plot_campaign.by_n(plot_campaign.read(record))
    assert list(groups) == ["2000", "10000"]                 # the sittings' n first
    assert [float(r["fid"]) for r in groups["2000"]] == [64.0, 50.0]
    assert [float(r["fid"]) for r in groups["10000"]] == [30.0]
    assert plot_campaign.plot(record).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_campaign_is_its_own_curve_on_one_pflop_axis_without_an_hours_axis(tmp_path, drawn):
    record = tmp_path / "two_campaign.csv"
    fields = ["campaign", "sitting", "steps", "images", "pflop", "hours", "fid", "kid", "kid_std", "n", "floor",
              "floor_kid", "sampler", "calls", "target"]
    rows = [["campaign 1", 1, 100, 6400, 1.0, 1.5, 60.0, 0.04, 0.001, 2000, 25.1, 0.0, "ddpm", 50, ""],
            ["campaign 1", 2, 200, 12800, 5.0, 7.8, 48.8, 0.03, 0.001, 2000, 25.1, 0.0, "ddpm", 50, ""],
            ["campaign 1", 2, 200, 12800, 5.0, 7.8, 28.4, 0.02, 0.001, 10000, 5.13, "", "ddpm", 50, 35],
            ["campaign 2", 1, 300, 19200, 6.0, 10.0, 45.0, 0.02, 0.001, 2000, 25.1, 0.0, "ddpm", 50, ""],
            ["campaign 2", 2, 400, 25600, 7.5, 13.0, 42.0, 0.02, 0.001, 2000, 25.1, 0.0, "ddpm", 50, ""]]
    with open(record, "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    groups = plot_campaign.by_campaign(plot_campaign.read(record))
    assert list(groups) == ["campaign 1", "campaign 2"] and [len(g) for g in groups.values()] == [3, 2]
    plot_campaign.plot(record)
    ax = drawn[-1].axes[0]
    curves = {line.get_label(): list(line.get_xdata()) for line in ax.lines
              if not line.get_label().startswith(("real", "target"))}
    assert curves["campaign 1, FID-2000 (ddpm, 50 calls)"] == [1.0, 5.0]
    assert curves["campaign 2, FID-2000 (ddpm, 50 calls)"] == [6.0, 7.5]
    assert curves["model, FID-10000 (ddpm, 50 calls)"] == [5.0]
    assert not ax.child_axes                        # no CPU-hours axis: the campaigns' machines differ
    one = tmp_path / "one_campaign.csv"                  # the same record with one campaign: the hours axis is back
    with open(one, "w", newline="") as f:
        csv.writer(f).writerows([fields, *[r for r in rows if r[0] == "campaign 1"]])
    plot_campaign.plot(one)
    assert drawn[-1].axes[0].child_axes


def test_each_way_of_sampling_at_the_larger_n_is_its_own_series(tmp_path, drawn):
    # FID-10k of one model sampled three ways (unguided, w = 1, w = 2 in an interval): three
    # series at the same PFLOP, each named by its sampler, calls and guidance
    record = tmp_path / "guided_campaign.csv"
    fields = ["sitting", "steps", "images", "pflop", "hours", "fid", "kid", "kid_std", "n", "floor",
              "floor_kid", "sampler", "calls", "target", "guidance"]
    rows = [[1, 100, 6400, 2.0, 3.0, 60.0, 0.04, 0.001, 2000, 25.1, 0.0, "ddpm", 50, "", ""],
            [2, 200, 12800, 5.0, 7.8, 48.8, 0.03, 0.001, 2000, 25.1, 0.0, "ddpm", 50, "", ""],
            [2, 200, 12800, 5.0, 7.8, 28.4, 0.02, 0.001, 10000, 5.13, "", "ddpm", 50, 35, ""],
            [2, 200, 12800, 5.0, 7.8, 21.0, 0.01, 0.001, 10000, 5.13, "", "ddpm", 100, "", "w = 1"],
            [2, 200, 12800, 5.0, 7.8, 19.0, 0.01, 0.001, 10000, 5.13, "", "ddpm", 85, "", "w = 2 for 0.28 < σ ≤ 5.42"]]
    with open(record, "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    plot_campaign.plot(record)
    points = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in drawn[-1].axes[0].lines}
    assert points["model, FID-2000 (ddpm, 50 calls)"] == ([2.0, 5.0], [60.0, 48.8])
    assert points["model, FID-10000 (ddpm, 50 calls)"] == ([5.0], [28.4])
    assert points["model, FID-10000 (ddpm, 100 calls, w = 1)"] == ([5.0], [21.0])
    assert points["model, FID-10000 (ddpm, 85 calls, w = 2 for 0.28 < σ ≤ 5.42)"] == ([5.0], [19.0])


def test_no_campaign_and_no_way_of_sampling_is_dropped_past_the_styles_at_hand(tmp_path, drawn):
    # six campaigns and five ways of sampling at the larger n: more than there are line styles and
    # markers, each still drawn (the styles come round again)
    record = tmp_path / "many_campaign.csv"
    fields = ["campaign", "sitting", "steps", "images", "pflop", "hours", "fid", "kid", "kid_std", "n", "floor",
              "floor_kid", "sampler", "calls", "target", "guidance"]
    rows = [[f"campaign {c}", 1, 100, 6400, float(c), 1.0, 60.0 - c, 0.04, 0.001, 2000, 25.1, 0.0, "ddpm", 50, "", ""]
            for c in range(1, 7)]
    rows += [["campaign 1", 1, 100, 6400, 1.0, 1.0, 30.0 - w, 0.02, 0.001, 10000, 5.13, "", "ddpm", 50, "", f"w = {w}"]
             for w in range(1, 6)]
    with open(record, "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    plot_campaign.plot(record)
    points = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in drawn[-1].axes[0].lines}
    for c in range(1, 7):
        assert points[f"campaign {c}, FID-2000 (ddpm, 50 calls)"] == ([float(c)], [60.0 - c])
    for w in range(1, 6):
        assert points[f"model, FID-10000 (ddpm, 50 calls, w = {w})"] == ([1.0], [30.0 - w])


def test_a_campaigns_budget_is_a_vertical_line_the_axis_reaches(tmp_path, drawn):
    # campaign 2 is at 3 of its 10 PFLOP: its budget is drawn at 10 and the axis runs past it,
    # though no point is beyond 5; campaign 1's budget (on one of its rows only) at 5
    record = tmp_path / "budget_campaign.csv"
    fields = ["campaign", "sitting", "steps", "images", "pflop", "hours", "fid", "kid", "kid_std", "n", "floor",
              "floor_kid", "sampler", "calls", "target", "budget"]
    rows = [["campaign 1", 1, 100, 6400, 2.0, 3.0, 60.0, 0.04, 0.001, 2000, 25.1, 0.0, "ddpm", 50, "", ""],
            ["campaign 1", 2, 200, 12800, 5.0, 7.8, 48.8, 0.03, 0.001, 2000, 25.1, 0.0, "ddpm", 50, "", 5],
            ["campaign 2", 1, 300, 19200, 1.5, 2.1, 55.0, 0.03, 0.001, 2000, 25.1, 0.0, "ddpm", 50, "", 10],
            ["campaign 2", 2, 400, 25600, 3.0, 4.4, 49.0, 0.03, 0.001, 2000, 25.1, 0.0, "ddpm", 50, "", 10]]
    with open(record, "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    plot_campaign.plot(record)
    ax = drawn[-1].axes[0]
    budgets = {line.get_label(): list(line.get_xdata()) for line in ax.lines if line.get_label().startswith("budget")}
    assert budgets == {"budget of campaign 1: 5 PFLOP": [5.0, 5.0], "budget of campaign 2: 10 PFLOP": [10.0, 10.0]}
    assert ax.get_xlim()[1] > 10.0
