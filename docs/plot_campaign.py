"""Plot a training campaign's FID against its compute, from its record in docs/results/.

    python docs/plot_campaign.py docs/results/cifar10_campaign.csv     # -> docs/results/cifar10_campaign.png

The record has one row per sitting (and per scored checkpoint): sitting, steps, images, pflop,
hours, fid, kid, n, floor, sampler, calls, and optionally floor_n (the floor's n, when it is not
the samples' n: the faces hold out 300) and target (a line to reach). FID is plotted against PFLOP
(bottom axis) with the CPU-hours on the top axis, beside the real-vs-real floor.
"""

import csv
import sys
from pathlib import Path


def read(path):
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["fid"]]


def plot(path, out=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read(path)
    pflop = [float(r["pflop"]) for r in rows]
    fid = [float(r["fid"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(pflop, fid, "o-", label=f"model, FID-{rows[0]['n']} ({rows[0]['sampler']}, {rows[0]['calls']} calls)")
    for r in rows:
        ax.annotate(f"{float(r['fid']):.1f}", (float(r["pflop"]), float(r["fid"])), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    floors = {(r["floor"], r.get("floor_n") or r["n"]) for r in rows if r.get("floor")}
    for floor, n in floors:
        ax.axhline(float(floor), color="grey", ls="--", lw=1, label=f"real vs real at n = {n}: {float(floor):.1f}")
    for target in {r["target"] for r in rows if r.get("target")}:
        ax.axhline(float(target), color="tab:red", ls=":", lw=1, label=f"target: {float(target):.1f}")
    ax.set(xlabel="training compute (PFLOP)", ylabel="FID ↓", title=Path(path).stem.replace("_", " "))
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    hours = [float(r["hours"]) for r in rows]
    if len(rows) > 1 and pflop[-1] > 0:
        per_hour = hours[-1] / pflop[-1]
        top = ax.secondary_xaxis("top", functions=(lambda p: p * per_hour, lambda h: h / per_hour))
        top.set_xlabel("CPU-hours (2 cores)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = out or Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot(sys.argv[1]))
