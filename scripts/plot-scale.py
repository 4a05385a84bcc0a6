#!/usr/bin/env python3
"""Draw the scale curves of a scripts/bench-scale run as one PNG.

    scripts/plot-scale.py DIR [--out PNG]

Reads DIR/scale-summary.json and writes DIR/scale.png (or PNG): one panel
per curve, zhome and Synapse over the sizes, both axes logarithmic.
Needs matplotlib (pip install matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--out")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("plot-scale: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    summary = json.load(open(os.path.join(args.dir, "scale-summary.json")))
    curves = [c for c in summary["curves"] if len(c["points"]) >= 2]
    if not curves:
        print("plot-scale: no curve with two sizes or more", file=sys.stderr)
        return 1
    cols = 2
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.6 * rows), squeeze=False)
    for ax, c in zip([a for row in axes for a in row], curves):
        for who, style in (("zhome", "o-"), ("synapse", "s--")):
            pts = [(p["size"], p[who]) for p in c["points"] if p[who] is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, label="Synapse" if who == "synapse" else who)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(c["label"], fontsize=10)
        ax.set_xlabel(c["unit"])
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in [a for row in axes for a in row][len(curves):]:
        ax.axis("off")
    fig.suptitle(f"zhome and Synapse as rooms and users grow ({summary['engine']})")
    fig.tight_layout()
    out = args.out or os.path.join(args.dir, "scale.png")
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
