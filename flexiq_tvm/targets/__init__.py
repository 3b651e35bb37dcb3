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


def get_target(name: str, **options):
    from . import llvm  # noqa: F401  (registers itself)

    if name not in _TARGETS:
        raise ValueError(f"unknown target {name!r}; available: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name](**options)


def available_targets():
    from . import llvm  # noqa: F401

    return sorted(_TARGETS)
