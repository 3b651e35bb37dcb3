"""Decoding of the simulator's per-layer cycle table (`CompiledModel.npu_stats()`)."""
from __future__ import annotations

import numpy as np

from ...errors import FlexiQError

COLS = ("valid", "total", "compute", "dma", "vector", "macs8", "macs4", "ibuf_max", "wbuf_max", "obuf_max",
        "gemm_instr", "k4", "variant", "spill", "dram_bytes", "onchip_in")


def decode(table: np.ndarray, names=None) -> dict:
    """table: float64[(L + 1), 16]; row 0 = configuration header, row 1 + i = layer i."""
    h = table[0]
    cfg = {"rows": int(h[0]), "cols": int(h[1]), "ibuf_bytes": int(h[2]), "wbuf_bytes": int(h[3]),
           "obuf_bytes": int(h[4]), "dma_bytes_per_cycle": int(h[5]), "dma_setup_cycles": int(h[6]),
           "vector_lanes": int(h[7]), "clock_mhz": float(h[8]), "abuf_bytes": int(h[12]),
           "sram_bytes_per_cycle": int(h[13])}
    pes = cfg["rows"] * cfg["cols"]
    layers = []
    for i, row in enumerate(table[1:]):
        if row[0] != 1:
            continue
        d = {k: (int(v) if k not in ("valid",) else None) for k, v in zip(COLS, row)}
        d.pop("valid")
        d["layer"] = i
        if names is not None and i < len(names):
            d["name"] = names[i]
        slots = d["macs8"] + d["macs4"] / 2.0          # a dual 4-bit MAC fills half a PE-cycle
        d["utilization"] = slots / (pes * d["total"]) if d["total"] else 0.0
        d["compute_utilization"] = slots / (pes * d["compute"]) if d["compute"] else 0.0
        d["bound"] = "compute" if d["compute"] >= max(d["dma"], d["vector"]) else \
            ("dma" if d["dma"] >= d["vector"] else "vector")
        if d["total"] > 1.5 * max(d["compute"], d["dma"], d["vector"], 1):
            # no unit is busy most of the time: a small layer whose time is its serial chain (input
            # ready -> load -> GEMM -> output stage -> store, behind the next layer's weight prefetch)
            d["bound"] = "latency"
        d["spill"] = bool(d["spill"])
        d["onchip_in"] = bool(d["onchip_in"])
        layers.append(d)
    total = sum(l["total"] for l in layers)
    return {"config": cfg, "layers": layers, "total_cycles": total,
            # resident weights (docs/npu.md section 4.4): loaded once at program load, not per call
            "weights_resident": bool(int(h[15]) & 1), "weight_load_cycles": int(h[14]),
            "weights_loaded_this_call": bool(int(h[15]) & 2),
            "latency_us": total / cfg["clock_mhz"] if cfg["clock_mhz"] else float("nan"),
            "compute_cycles": sum(l["compute"] for l in layers), "dma_cycles": sum(l["dma"] for l in layers),
            "vector_cycles": sum(l["vector"] for l in layers)}


def read_stats(cm) -> dict:
    """Cycle counts of the last call of `cm` (a CompiledModel built for target 'npu')."""
    from . import STATS_RELAX_FUNC

    if cm.target != "npu":
        raise FlexiQError(f"npu_stats() needs an artifact built for target 'npu' (this one: {cm.target!r})")
    try:
        f = cm.vm[STATS_RELAX_FUNC]
    except Exception:
        raise FlexiQError("this npu artifact has no layer on the NPU (no cycle table)") from None
    table = f().numpy()
    return decode(table, [l.name for l in cm.plan.layers])
