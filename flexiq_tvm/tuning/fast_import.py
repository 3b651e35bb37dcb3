"""Import TVM's tensor intrinsics without TVMScript's `inspect.stack()` cost.

MetaSchedule's `TuneContext` imports `tvm.s_tir.tensor_intrin` on first use. That module defines
some 500 TVMScript functions at import time, and each `@T.prim_func` calls `inspect.stack()`,
which resolves the source file and module of every frame on the stack by scanning `sys.modules`.
With TVM, numpy and the rest loaded that import took 23-25 s in a bare process here and about a
minute inside pytest (torch loaded), before the first trial of a tuning run.

TVMScript reads only each frame's object, line number and one line of source context from that
stack (`is_defined_in_class`, `resolve_closure_vars`). `import_tensor_intrinsics` runs the import
with an `inspect.stack` that builds the same `FrameInfo` records straight from the frames and
`linecache`, skipping the module lookup: 2.2 s instead of 24.6 s, the same intrinsics registered.
The patch is undone when the import returns, and a later import (already done) costs nothing.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import sys


def _frame_stack(context: int = 1):
    """`inspect.stack(context)` without the per-frame module lookup (same fields, same lines)."""
    frame = sys._getframe(1)
    out = []
    while frame is not None:
        lineno, filename = frame.f_lineno, frame.f_code.co_filename
        lines, index = None, None
        if context > 0:
            start = max(lineno - 1 - context // 2, 0)
            got = [linecache.getline(filename, i + 1) for i in range(start, start + context)]
            if any(got):
                lines, index = got, lineno - 1 - start
        out.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name, lines, index))
        frame = frame.f_back
    return out


@contextlib.contextmanager
def _fast_inspect_stack():
    saved = inspect.stack
    inspect.stack = _frame_stack
    try:
        yield
    finally:
        inspect.stack = saved


def import_tensor_intrinsics() -> None:
    """Import `tvm.s_tir.tensor_intrin` (what `TuneContext` would import) the fast way, once."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with _fast_inspect_stack():
        import tvm.s_tir.tensor_intrin  # noqa: F401
