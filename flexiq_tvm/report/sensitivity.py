"""The sensitivity report of a plan: which layers hurt most in 4-bit, which stay 8-bit longest."""
from __future__ import annotations

from typing import Dict

import numpy as np

from ..quant.plan import Plan


def sensitivity_report(plan: Plan) -> Dict:
    """Per layer: output error when lowered wholly (relative MSE vs INT8 on calibration data, from
    the quantize run), MAC share, and the model 4-bit MAC share at which the schedule first and
    last lowers one of its groups (late = kept at 8-bit longest)."""
    share = plan.mac_share
    first, last = {}, {}
    for step, l in enumerate(plan.schedule):
        first.setdefault(l, share[step + 1])
        last[l] = share[step + 1]
    errors = plan.meta.get("layer_error_at_full_4bit", {})
    total = sum(int(l.group_macs.sum()) for l in plan.layers)
    rows = []
    for i, l in enumerate(plan.layers):
        rows.append({"layer": l.name, "op": l.op, "in_channels": l.in_channels, "groups": l.n_groups,
                     "mac_share": int(l.group_macs.sum()) / total, "error_full_4bit": errors.get(l.name),
                     "first_lowered_at": float(first.get(i, np.nan)), "fully_lowered_at": float(last.get(i, np.nan))})
    keep_high = sorted(rows, key=lambda r: (-r["first_lowered_at"], r["layer"]))
    levels = {str(r): {"mac_share": float(share[p]), "counts": plan.counts_for_prefix(p).tolist()}
              for r, p in sorted(plan.levels.items())}
    return {"model": plan.meta.get("model"), "search": plan.meta.get("search"), "group_size": plan.group_size,
            "layers": rows, "stay_8bit_longest": [r["layer"] for r in keep_high], "levels": levels}


def format_sensitivity(rep: Dict) -> str:
    lines = [f"{rep['model']}: search {rep['search']}, group size {rep['group_size']}",
             f"{'layer':<14}{'op':<8}{'C':>6}{'groups':>7}{'MACs':>8}{'err@4bit':>11}{'first 4b at':>12}{'all 4b at':>10}"]
    for r in rep["layers"]:
        err = f"{r['error_full_4bit']:.5f}" if r["error_full_4bit"] is not None else "-"
        lines.append(f"{r['layer']:<14}{r['op']:<8}{r['in_channels']:>6}{r['groups']:>7}{100 * r['mac_share']:>7.1f}%"
                     f"{err:>11}{100 * r['first_lowered_at']:>11.1f}%{100 * r['fully_lowered_at']:>9.1f}%")
    lines.append("stay at 8-bit longest: " + ", ".join(rep["stay_8bit_longest"][:5]))
    by_err = [r for r in rep["layers"] if r["error_full_4bit"] is not None]
    if by_err:
        worst = sorted(by_err, key=lambda r: -r["error_full_4bit"])[:5]
        lines.append("most sensitive in 4-bit: " + ", ".join(r["layer"] for r in worst))
    return "\n".join(lines)
