"""A picture of an `evaluate` report: accuracy (or agreement with FP32) per ratio against latency.

Two panels. Left, the trade-off a deployment picks from: y = top-1 accuracy when the data has labels,
else top-1 agreement with FP32; x = measured batch-1 latency; FP32 and INT8 marked, every ratio point
labelled with its 4-bit MAC share, the ratio points joined in ratio order. Right, the same y against
the 4-bit MAC share, which is what moves on targets whose 4-bit path is not faster (the CPU:
METHOD section 7), so the accuracy cost of each level stays readable even when the latencies
overlap; a report's `baselines` (other quantizers, the data's noise floor) are drawn there as
dotted lines. Needs matplotlib (`pip install 'flexiq-tvm[plot]'`).
"""
from __future__ import annotations

import os
from typing import Dict

from ..errors import FlexiQError


def _metric(report: Dict):
    """(report key, axis label) of the quantity on the y axis (stored as a fraction)."""
    if report["fp32"].get("top1") is not None:
        return "top1", "top-1 accuracy (%)"
    return "agree_top1", "top-1 agreement with FP32 (%)"


def plot_report(report: Dict, path, title: str = None) -> str:
    """Writes the figure to `path` (.png, .pdf or .svg) atomically and returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FlexiQError(f"--plot needs matplotlib: pip install 'flexiq-tvm[plot]' ({e})") from None
    from ..quant.atomic import atomic_path

    path = os.fspath(path)
    key, ylabel = _metric(report)
    entries = sorted(report["ratios"], key=lambda e: e["ratio"])
    if not entries:
        raise FlexiQError("the report has no ratio entries to plot")
    ys = [100 * e[key] for e in entries]
    lat = [e.get("latency_ms") for e in entries]
    has_lat = all(v is not None for v in lat)
    macs = [100 * e["mac_ratio"] for e in entries]
    fp32_y = 100 * report["fp32"]["top1"] if key == "top1" else 100.0
    fp32_lat = report["fp32"].get("latency_ms")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.25, 1]})
    ax = axes[0]
    if has_lat:
        for i, (e, x, y, m) in enumerate(zip(entries, lat, ys, macs)):
            int8 = e["ratio"] == 0
            ax.scatter([x], [y], s=70 if int8 else 45, marker="s" if int8 else "o",
                       color="tab:orange" if int8 else "tab:blue", zorder=3,
                       label="INT8 (ratio 0)" if int8 else None)
            # alternate label sides (right, left): ratio points often share a latency on the CPU,
            # and neighbours in accuracy then label on opposite sides instead of on top of each other
            right = i % 2 == 0
            ax.annotate("INT8" if int8 else f"r={e['ratio']:g} ({m:.0f}% 4-bit)", (x, y), textcoords="offset points",
                        xytext=(8 if right else -8, -3), ha="left" if right else "right", fontsize=8)
        if fp32_lat is not None:
            ax.scatter([fp32_lat], [fp32_y], s=110, marker="*", color="tab:red", zorder=3, label="FP32 (TVM build)")
            ax.annotate("FP32", (fp32_lat, fp32_y), textcoords="offset points", xytext=(7, 5), fontsize=8)
        xs = [v for v in lat + [fp32_lat] if v is not None]
        if max(xs) / min(xs) > 8:
            from matplotlib.ticker import LogLocator, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            fmt = ScalarFormatter()
            fmt.set_scientific(False)
            ax.xaxis.set_major_formatter(fmt)
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_xlim(min(xs) / 5, max(xs) * 2.2)           # room for the left-hand labels
            ax.set_xlabel("latency per image, batch 1 (ms, log scale)")
        else:
            span = max(xs) - min(xs) or max(xs) * 0.1
            ax.set_xlim(min(xs) - 0.6 * span, max(xs) + 0.6 * span)
            ax.set_xlabel("latency per image, batch 1 (ms)")
        ax.scatter([], [], marker="o", color="tab:blue", label="FlexiQ ratios (one artifact)")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no latency measured\n(evaluate(..., latency=True))", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xlabel("latency per image, batch 1 (ms)")
    ax.set_ylabel(ylabel)
    short = "accuracy" if key == "top1" else "agreement"
    ax.set_title(f"{short} vs measured latency")
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1]
    ax.plot(macs, ys, "o-", color="tab:blue", label="FlexiQ ratios")
    if entries[0]["ratio"] == 0:
        ax.scatter([macs[0]], [ys[0]], s=70, marker="s", color="tab:orange", zorder=3, label="INT8")
    ax.axhline(fp32_y, color="tab:red", ls="--", lw=1, label="FP32")
    # reference rows a report may carry (other quantizers, the data's noise floor): dotted lines
    refs = [(name, 100 * e[key]) for name, e in report.get("baselines", {}).items() if e.get(key) is not None]
    for (name, y), color in zip(refs, ["tab:gray", "tab:green", "tab:purple", "tab:brown"]):
        ax.axhline(y, color=color, ls=":", lw=1.2, label=name)
    ax.set_xlabel("MACs computed in 4-bit (%)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-3, 103)
    ax.set_title(f"{short} vs 4-bit share")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    lo = min(ys + [fp32_y] + [y for _, y in refs])
    hi = max(ys + [fp32_y] + [y for _, y in refs])
    pad = max(0.5, 0.15 * (hi - lo))
    for a in axes:
        a.set_ylim(lo - pad, hi + pad)

    what = "top-1 on labelled data" if key == "top1" else "agreement with FP32 (no labels)"
    fig.suptitle(title or f"{report['model']}: FlexiQ on {report.get('target', 'llvm')}, {report['samples']} samples, "
                 f"{what}, group size {report.get('group_size')}", fontsize=10)
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lower() or ".png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=ext.lstrip("."))
    plt.close(fig)
    return path
