"""NPU tuning records (`<db_dir>/npu/records.json`): the best measured mapping per (layer geometry,
ratio level, NPU configuration), written by `tune.tune_npu` and read by the codegen.

A record's key describes everything the layer's time depends on and nothing else, so one file
serves several models: the geometry (shapes, kernel, strides, padding, groups), the layer's wiring
in its program (input from the host / the ABUF / DRAM, float result, number of INT8 / float
copies, dynamic extraction), the 4-bit run structure at the level's count (each conv group's
sorted lowering ranks with every high rank folded into one value: which K runs are 4-bit and
where they break) and a digest of the NPU configuration.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, Optional

import numpy as np

from ...errors import FlexiQError
from .config import NPUConfig

RECORDS_VERSION = 1


def records_path(db_dir) -> str:
    return os.path.join(os.fspath(db_dir), "npu", "records.json")


def config_digest(cfg: NPUConfig) -> str:
    d = cfg.to_dict()
    d.pop("clock_mhz", None)              # the clock only converts cycles to time
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def runs_digest(L, k: int) -> str:
    """The 4-bit run structure of layer L at count k (what the GEMM cycles depend on)."""
    k = int(min(max(k, 0), L.n_groups))
    h = hashlib.sha1()
    if L.depthwise:
        parts = [np.sort(L.rank, kind="stable")]
    else:
        parts = [np.sort(L.rank[g * L.Cg:(g + 1) * L.Cg], kind="stable") for g in range(L.groups)]
    for p in parts:
        h.update(np.minimum(p, k).astype(np.int32).tobytes())
    return h.hexdigest()[:12]


def geometry(L) -> str:
    g = (f"{L.op} n{L.N} c{L.C} h{L.H} w{L.W} o{L.O} oh{L.OH} ow{L.OW} k{L.KH}x{L.KW} s{L.SH}x{L.SW} "
         f"d{L.DH}x{L.DW} p{L.PT},{L.PL},{L.PB},{L.PR} g{L.groups}")
    wiring = (f"in:{'host' if L.in_param >= 0 else ('abuf' if L.in_onchip else 'dram')} "
              f"out:{int(L.out_index >= 0)} req{len(L.req)}/{L.req_off}/{L.req_dyn} "
              f"fadd{len(L.fadd)}/{L.fadd_off} dyn{int(L.dynamic)}")
    return g + " " + wiring


def record_key(L, cfg: NPUConfig, level: float, k: int) -> str:
    return (f"{geometry(L)} | level {float(level):g} k{int(k)}/{L.n_groups} runs {runs_digest(L, k)} "
            f"| cfg {config_digest(cfg)}")


def tiling_to_dict(t) -> dict:
    return {"jc": int(t.jc), "ob": int(t.ob), "ohlen": int(t.ohlen), "nlen": int(t.nlen), "order": str(t.order)}


def tiling_from_dict(d):
    from .codegen import Tiling

    try:
        return Tiling(jc=int(d["jc"]), ob=int(d["ob"]), ohlen=int(d["ohlen"]), nlen=int(d["nlen"]),
                      order=str(d.get("order", "mo")))
    except (KeyError, TypeError, ValueError) as e:
        raise FlexiQError(f"npu tuning record: bad mapping {d!r} ({e})") from None


def load_records(db_dir) -> Dict[str, dict]:
    """{key: record} of `<db_dir>/npu/records.json` ({} when the file does not exist)."""
    path = records_path(db_dir)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise FlexiQError(f"npu tuning records {path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("version") != RECORDS_VERSION or not isinstance(data.get("records"), dict):
        raise FlexiQError(f"npu tuning records {path}: not a version-{RECORDS_VERSION} records file")
    return data["records"]


def save_records(db_dir, new: Dict[str, dict]) -> str:
    """Merge `new` into the file (re-read first, so that concurrent or earlier runs are kept; per key
    the mapping with fewer cycles wins and `trials` is the larger count) and write it atomically
    (temporary file in the same folder + os.replace)."""
    path = records_path(db_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    recs = load_records(db_dir)
    for k, r in new.items():
        old = recs.get(k)
        if old is None or r["cycles"] < old["cycles"]:
            best = dict(r)
        else:
            best = dict(old)
        if old is not None:
            best["trials"] = max(int(r.get("trials", 0)), int(old.get("trials", 0)))
        recs[k] = best
    fd, tmp = tempfile.mkstemp(prefix=".records.", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": RECORDS_VERSION, "records": recs}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def tiling_fits(L, cfg: NPUConfig, t) -> str:
    """Why mapping t is illegal for layer L on cfg (empty when it is legal): every tile must fit one
    SRAM bank (half of each SRAM)."""
    from .codegen import _rows_needed

    IB, WB, OB = cfg.ibuf_bytes // 2, cfg.wbuf_bytes // 2, cfg.obuf_bytes // 2
    KK = L.KH * L.KW
    if min(t.jc, t.ob, t.ohlen, t.nlen) < 1 or t.order not in ("mo", "om"):
        return f"non-positive tile or unknown loop order in {t}"
    if t.ohlen > L.OH or t.nlen > L.N or (t.nlen > 1 and t.ohlen != L.OH):
        return f"m-block {t.nlen} x {t.ohlen} rows does not tile {L.N} x {L.OH}"
    if L.depthwise:
        if t.ob != t.jc or t.jc > L.C:
            return f"depthwise block of {t.jc} channels (ob {t.ob}) for {L.C} channels"
        wbytes, patch = t.jc * KK, t.nlen * t.jc * _rows_needed(L, t.ohlen) * L.Wp
        acc = t.nlen * t.ohlen * L.OW * t.jc * 4
    else:
        if t.jc > L.Cg or t.ob > L.opg:
            return f"chunk {t.jc} / block {t.ob} larger than the {L.Cg} input / {L.opg} output channels per group"
        wbytes, patch = t.ob * t.jc * KK, t.nlen * t.jc * _rows_needed(L, t.ohlen) * L.Wp
        acc = t.nlen * t.ohlen * L.OW * t.ob * 4
    if wbytes > WB:
        return f"weight tile {wbytes} B > WBUF bank {WB} B"
    if patch > IB:
        return f"activation patch {patch} B > IBUF bank {IB} B"
    if acc > OB:
        return f"accumulator tile {acc} B > OBUF bank {OB} B"
    return ""


def lookup(records: Optional[Dict[str, dict]], L, cfg: NPUConfig, level: float, k: int):
    """(tiling or None, problem, recorded cycles): the recorded mapping for this layer at this
    level, if legal."""
    if not records:
        return None, "no record", None
    rec = records.get(record_key(L, cfg, level, k))
    if rec is None:
        return None, "no record", None
    t = tiling_from_dict(rec["tiling"])
    why = tiling_fits(L, cfg, t)
    if why:
        return None, f"recorded mapping {t} is illegal here ({why})", None
    return t, "", int(rec["cycles"])
