"""What each target adds: kernel schedules for the FlexiQ layer kernels and a build function.

A target is a small object with a name, a `tvm.target.Target` and a `schedule` module pass; new
targets register here without touching `quant/` or `passes/`.
"""
from __future__ import annotations

from typing import Callable, Dict

_TARGETS: Dict[str, Callable] = {}


def register_target(name: str):
    def deco(factory):
        _TARGETS[name] = factory
        return factory
    return deco


def _register_lazy(name: str):
    if name == "npu" and "npu" not in _TARGETS:
        from . import npu  # noqa: F401  (registers itself; imported on demand like llvm)
    if name == "cuda" and "cuda" not in _TARGETS:
        from . import cuda  # noqa: F401  (registers itself; imported on demand)


def get_target(name: str, **options):
    from . import llvm  # noqa: F401  (registers itself)

    _register_lazy(name)

    if name not in _TARGETS:
        raise ValueError(f"unknown target {name!r}; available: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name](**options)


def available_targets():
    from . import llvm  # noqa: F401

    _register_lazy("npu")
    _register_lazy("cuda")

    return sorted(_TARGETS)
