"""The tuning database on disk: one MetaSchedule JSON database per target, plus a ledger.

Layout of a database directory ``DIR``::

    DIR/<target key>/database_workload.json        MetaSchedule's JSON database (workloads keyed by
    DIR/<target key>/database_tuning_record.json   structural hash; every record carries its target)
    DIR/<target key>/flexiq_ledger.json            trials spent per workload and budget (resume)
    DIR/npu/...                                    the NPU target's own mapping database

The target key (``llvm-znver4``, ``cuda-sm_80``) keeps records of different machines apart: a
MetaSchedule query matches by workload only, so two targets never share one JSON pair. Workloads
are PrimFuncs, so one database serves any number of models, batch sizes and plans: a layer that
two models share is tuned once.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from typing import Dict, List, Optional, Tuple

import tvm

from ..errors import FlexiQError
from ..quant.atomic import atomic_write_bytes

LEDGER = "flexiq_ledger.json"
LEDGER_VERSION = 1


def target_key(target: tvm.target.Target) -> str:
    """Sub-directory name of a target: its kind and the attribute that selects the machine code."""
    kind = target.kind.name
    attrs = target.attrs
    extra = None
    for name in ("arch", "mcpu", "mtriple"):
        if name in attrs and str(attrs[name]):
            extra = str(attrs[name])
            break
    key = kind if extra is None else f"{kind}-{extra}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def check_db_dir(path) -> str:
    """Create ``path`` if needed and check that files can be written there; returns it absolute."""
    if path is None:
        raise FlexiQError("a tuning database directory is needed (db=DIR / --db DIR)")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise FlexiQError(f"tuning database {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".flexiq_write_probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FlexiQError(f"tuning database directory {path} is not writable: {e.strerror or e}") from None
    return path


def workload_hash(mod: tvm.IRModule) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def normalize(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """A PrimFunc as MetaSchedule keys it (the same normalization its task extraction and
    MetaScheduleApplyDatabase use)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def register_intrinsics(target) -> None:
    """Loading a JSON database replays every record's trace: the FlexiQ kernels' own tensor
    intrinsics (schedules/x86_intrin.py) must be registered in this process first."""
    if target.kind.name != "llvm":
        return
    try:
        from ..schedules import x86_intrin

        for kind in (16, 8, "spatial16"):
            x86_intrin.get_intrin(kind, target)
    except Exception:  # noqa: BLE001  no VNNI here: no record can use it either
        pass


def _register_shape_intrinsics(mod) -> None:
    """The AMX kernels' tensor intrinsics are made per tile shape (schedules/x86_amx.py): their
    hand schedule registers the one a record of this kernel replays."""
    f = mod["main"] if "main" in [gv.name_hint for gv in mod.get_global_vars()] else None
    if f is not None and f.attrs is not None and int(f.attrs.get("flexiq.amx", 0)):
        from ..schedules import llvm as llvm_schedules

        llvm_schedules.schedule_llvm(f)


class TuningDB:
    """One target's part of a tuning database directory."""

    def __init__(self, root, target: tvm.target.Target, create: bool = True):
        self.root = check_db_dir(root) if create else os.path.abspath(os.fspath(root))
        self.target = target
        self.key = target_key(target)
        self.dir = os.path.join(self.root, self.key)
        if create:
            os.makedirs(self.dir, exist_ok=True)
        self.ledger_path = os.path.join(self.dir, LEDGER)
        self._json = None

    # ---- MetaSchedule's database ---------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.dir, "database_tuning_record.json"))

    def json_database(self):
        """The MetaSchedule JSON database itself (appends to its files on every commit)."""
        if self._json is None:
            from tvm.s_tir import meta_schedule as ms

            register_intrinsics(self.target)
            try:
                self._json = ms.database.JSONDatabase(work_dir=self.dir, module_equality="structural")
            except Exception:  # noqa: BLE001  a record that no longer replays: drop it, load the rest
                self.repair()
                self._json = ms.database.JSONDatabase(work_dir=self.dir, module_equality="structural")
        return self._json

    def memory_copy(self):
        """The records in a MemoryDatabase: queries there (which commit the queried workload)
        leave the files on disk as they are. Records whose trace no longer replays are left out
        (with one warning), so one bad record never costs the others."""
        from tvm.s_tir import meta_schedule as ms

        mem = ms.database.MemoryDatabase(module_equality="structural")
        if not self.exists:
            return mem
        register_intrinsics(self.target)
        for wl, rec in self._replayable_records()[0]:
            w = mem.commit_workload(wl.mod)
            mem.commit_tuning_record(ms.database.TuningRecord(rec.trace, w, rec.run_secs, rec.target, rec.args_info))
        return mem

    def repair(self) -> int:
        """Rewrite the record file without the records whose trace no longer replays on its
        workload (atomically); returns how many were dropped. Why: MetaSchedule's JSONDatabase
        replays every record when it opens and fails as a whole on the first bad one (seen with
        TVM 0.27: a default-space trace of a float mean reduction, `GetLoops` 4 vs 3 outputs on
        replay), which would lock the user out of a database that took minutes to build."""
        register_intrinsics(self.target)
        _good, bad_lines = self._replayable_records()
        if not bad_lines:
            return 0
        path = os.path.join(self.dir, "database_tuning_record.json")
        with open(path) as f:
            lines = [ln for i, ln in enumerate(f) if ln.strip() and i not in bad_lines]
        atomic_write_bytes(path, "".join(lines).encode())
        return len(bad_lines)

    def _replayable_records(self) -> Tuple[List[tuple], set]:
        """((workload, record) that replay, line numbers of the record file that do not); warns
        once, naming the kernels whose records were dropped."""
        from tvm.s_tir import Schedule
        from tvm.s_tir import meta_schedule as ms

        with open(os.path.join(self.dir, "database_workload.json")) as f:
            wl_json = [json.loads(ln) for ln in f if ln.strip()]
        workloads, good, bad, dropped = {}, [], set(), Counter()
        with open(os.path.join(self.dir, "database_tuning_record.json")) as f:
            for i, ln in enumerate(f):
                if not ln.strip():
                    continue
                name = "?"
                try:
                    idx, rec_json = json.loads(ln)
                    if idx not in workloads:
                        workloads[idx] = ms.database.Workload.from_json(wl_json[idx])
                    wl = workloads[idx]
                    name = _kernel_name(wl.mod)
                    _register_shape_intrinsics(wl.mod)
                    rec = ms.database.TuningRecord.from_json(rec_json, wl)
                    rec.trace.apply_to_schedule(Schedule(wl.mod), remove_postproc=False)
                except Exception:  # noqa: BLE001  (malformed line or a trace that fails to replay)
                    bad.add(i)
                    dropped[name] += 1
                    continue
                good.append((wl, rec))
        if bad:
            warnings.warn(f"tuning database {self.dir}: {len(bad)} record(s) left out because their schedule "
                          f"no longer replays ({', '.join(f'{k} x{v}' for k, v in sorted(dropped.items()))}); "
                          "those kernels use their other records or today's schedule", stacklevel=3)
        return good, bad

    # ---- the ledger: trials spent per workload -----------------------------------------------
    def load_ledger(self) -> Dict[str, dict]:
        if not os.path.exists(self.ledger_path):
            return {}
        try:
            with open(self.ledger_path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise FlexiQError(f"tuning ledger {self.ledger_path} is unreadable ({e}); delete it to re-tune") from None
        if data.get("version") != LEDGER_VERSION:
            raise FlexiQError(f"tuning ledger {self.ledger_path} has version {data.get('version')}, "
                              f"expected {LEDGER_VERSION}")
        return dict(data.get("workloads", {}))

    def save_ledger(self, ledger: Dict[str, dict]) -> None:
        data = {"version": LEDGER_VERSION, "target": str(self.target), "workloads": ledger}
        atomic_write_bytes(self.ledger_path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _kernel_name(mod: tvm.IRModule) -> str:
    """A readable name for a workload in messages: its FlexiQ kernel kind, else its blocks' op."""
    f = mod["main"]
    if f.attrs is not None and "flexiq.kernel" in f.attrs:
        return str(f.attrs["flexiq.kernel"])
    params = [str(p.name) for p in f.params]
    return "kernel(" + ", ".join(params) + ")"


def best_record(db, mod: tvm.IRModule, target) -> Optional[object]:
    """The best valid tuning record of a workload, or None."""
    if not db.has_workload(mod):
        return None
    recs = db.get_top_k(db.commit_workload(mod), 1)
    return recs[0] if recs else None
