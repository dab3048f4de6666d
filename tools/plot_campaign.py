"""Plot a training campaign's FID against its compute, from its record in docs/results/.

    python -m tools.plot_campaign docs/results/cifar10_campaign.csv     # -> docs/results/cifar10_campaign.png

The record has one row per sitting and score: sitting, steps, images, pflop, hours, fid, kid, n,
floor, sampler, calls, and optionally guidance (how the samples were guided, e.g. "w = 1"; empty:
none), floor_n (the floor's n, when it is not the samples' n: the faces hold out 300) with
fid<floor_n> (the FID at that n, plotted too, as the one to hold against the floor), target (a
line to reach at the row's n), budget (the PFLOP the row's campaign may spend, on any of its rows:
a vertical line, so the plot shows how far the run has to go) and campaign (a name: each
campaign's sittings are their own curve on the same axes, at the PFLOP the record gives; a
campaign that continues another counts on from its total). Rows at another n than the first
row's (CIFAR-10: FID-2k after every sitting, FID-10k at the end) are their own points, beside
their own floor, one series for each way of sampling (sampler, calls, guidance). FID is plotted
against PFLOP (bottom axis) with the CPU-hours on the top axis, beside the real-vs-real floor.
The top axis follows the record's own hours, piecewise between sittings: a sitting that shared
the CPU took more hours for its PFLOP, and its stretch of the axis shows it. With several
campaigns the top axis is left out: they ran on different machines, so their hours do not
compare; PFLOP do.
"""

import argparse
import csv
from itertools import cycle
from pathlib import Path

CURVES = ("o-", "^-", "v-", "P-", "s-", "d-", "<-", ">-")    # one a campaign, again from the first past the last
POINTS = "D*XphH8d"                                          # one a way of sampling at the larger n


def read(path):
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["fid"]]


def by_n(rows):
    """The rows grouped by their samples' n, the first row's n first."""
    groups = {}
    for r in rows:
        groups.setdefault(r["n"], []).append(r)
    return groups


def by_campaign(rows):
    """The rows grouped by their campaign column, in the record's order (one group if it has none)."""
    groups = {}
    for r in rows:
        groups.setdefault(r.get("campaign") or "", []).append(r)
    return groups


def sampling_words(row):
    """How a row's samples were drawn, for a legend: "ddpm, 85 calls, w = 2 for 0.28 < σ ≤ 5.42"."""
    return ", ".join(filter(None, (row["sampler"], f"{row['calls']} calls", row.get("guidance"))))


def hours_axis(pflop, hours):
    """(PFLOP -> hours, hours -> PFLOP): piecewise linear through (0, 0) and each sitting's
    (pflop, hours), past the last sitting at the campaign's average rate. Both increase, as
    matplotlib's secondary axis needs."""
    import numpy as np
    rate = hours[-1] / pflop[-1]
    p = np.array([0.0, *pflop, 1e3 * pflop[-1]])
    h = np.array([0.0, *hours, hours[-1] + rate * (p[-1] - pflop[-1])])
    return (lambda x: np.interp(x, p, h)), (lambda y: np.interp(y, h, p))


def label_points(ax, xs, ys, offset, **style):
    """Each point's FID beside it, `offset` points away."""
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=offset, fontsize=8, **style)


def plot(path, out=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    everything = read(path)
    groups = by_n(everything)
    scored = groups.pop(everything[0]["n"])           # the sittings' scores; the axes follow them
    campaigns = by_campaign(scored)
    fig, ax = plt.subplots(figsize=(9.5, 4))
    colours = {}                                      # a campaign's curve's colour, for its budget line
    for (name, rows), style in zip(campaigns.items(), cycle(CURVES)):
        pflop, fid = [float(r["pflop"]) for r in rows], [float(r["fid"]) for r in rows]
        curve, = ax.plot(pflop, fid, style, label=f"{name or 'model'}, FID-{rows[0]['n']} ({sampling_words(rows[0])})")
        colours[name] = curve.get_color()
        floor_n = rows[0].get("floor_n")
        small_too = bool(floor_n and rows[0].get(f"fid{floor_n}"))
        label_points(ax, pflop, fid, (4, -12 if small_too else 6))     # below where the floor line runs above
    rows = next(iter(campaigns.values()))             # the first campaign's: the small n and the hours
    pflop = [float(r["pflop"]) for r in rows]
    floor_n = rows[0].get("floor_n")
    small_too = bool(floor_n and rows[0].get(f"fid{floor_n}"))
    for n, other in groups.items():                   # the end scored at a larger n: its own points,
        ways = {}                                     # a series for each way of sampling
        for r in other:
            ways.setdefault(sampling_words(r), []).append(r)
        offsets = cycle(((-30, -3), (8, -3), (-30, -12), (8, -12)))
        for (words, these), marker, offset in zip(ways.items(), cycle(POINTS), offsets):
            xs, ys = [float(r["pflop"]) for r in these], [float(r["fid"]) for r in these]
            ax.plot(xs, ys, marker, color="black", ms=9 if marker == "*" else 6, label=f"model, FID-{n} ({words})")
            label_points(ax, xs, ys, offset, color="black")
    if small_too:                                     # the floor's n differs: plot the FID at that n as well
        small = [float(r[f"fid{floor_n}"]) for r in rows]
        ax.plot(pflop, small, "s--", color="tab:blue", alpha=0.5, ms=4,
                label=f"model, FID-{floor_n} (the first {floor_n} of the same samples)")
        label_points(ax, pflop, small, (4, 6), alpha=0.7)
    floors = {(r["floor"], r.get("floor_n") or r["n"]) for r in everything if r.get("floor")}
    for floor, n in sorted(floors, key=lambda f: -float(f[0])):
        ax.axhline(float(floor), color="grey", ls="--" if n == rows[0]["n"] or n == floor_n else "-.", lw=1,
                   label=f"real vs real at n = {n}: {float(floor):.1f}")
    targets = {(r["target"], r["n"]) for r in everything if r.get("target")}
    for target, n in sorted(targets, key=lambda t: -float(t[0])):
        ax.axhline(float(target), color="tab:red", ls=":", lw=1, label=f"target for FID-{n}: {float(target):.1f}")
    budgets = {(r["budget"], r.get("campaign") or "") for r in everything if r.get("budget")}
    for budget, name in sorted(budgets, key=lambda b: float(b[0])):
        ax.axvline(float(budget), color=colours.get(name, "grey"), ls=(0, (1, 3)), lw=1.2,
                   label=f"budget of {name or 'the campaign'}: {float(budget):g} PFLOP")
    ax.set(xlabel="training compute (PFLOP)", ylabel="FID ↓", title=Path(path).stem.replace("_", " "))
    right = max([float(r["pflop"]) for r in scored] + [float(b) for b, _ in budgets])
    ax.set_xlim(0, max(ax.get_xlim()[1], 1.1 * right))   # room for the labels and the budgets
    ax.set_ylim(0, 1.12 * max(ax.get_ylim()[1], max(float(r["fid"]) for r in scored)))
    hours = [float(r["hours"]) for r in rows]
    if len(campaigns) == 1 and len(rows) > 1 and pflop[-1] > 0:      # one campaign: its hours on top
        top = ax.secondary_xaxis("top", functions=hours_axis(pflop, hours))
        top.set_xlabel("CPU-hours (2 cores)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))    # beside the plot: no point hidden
    fig.tight_layout()
    out = out or Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("record", help="a campaign's record, e.g. docs/results/cifar10_campaign.csv")
    p.add_argument("--out", default=None, help="the PNG to write (default: the record's name, .png)")
    args = p.parse_args(argv)
    print(plot(args.record, args.out))


if __name__ == "__main__":
    main()
