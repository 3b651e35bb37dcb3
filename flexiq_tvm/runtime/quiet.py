"""Filters TVM 0.27's stray "Scope Saving:/Scope Loaded:" log lines (an unconditional LOG(WARNING)
in the VM executable's (de)serializer) from stderr while an artifact is written or read."""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

_NOISE = ("Warning: Scope Saving:", "Warning: Scope Loaded:")


@contextmanager
def tvm_serialization_logs_filtered():
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            keep = [ln for ln in tmp.read().decode(errors="replace").splitlines(True)
                    if not any(n in ln for n in _NOISE)]
            if keep:
                sys.stderr.write("".join(keep))
                sys.stderr.flush()
