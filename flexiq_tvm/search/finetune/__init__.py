"""Gradient finetuning of a FlexiQ plan (METHOD section 5): one set of INT8 codes for every ratio.

Torch is an optional extra: this package imports it only when `finetune_plan` runs, and says how
to install it when it is missing. The result is an ordinary plan (same file format, kernels,
reference and levels); a build without torch loads and runs it.
"""
from .config import METHODS, FinetuneConfig, as_config

TORCH_HINT = "pip install 'flexiq-tvm[torch]'"


def require_torch():
    """The torch module, or a clear error naming the extra to install."""
    try:
        import torch
    except ImportError as e:
        from ...errors import FlexiQError

        raise FlexiQError(f"finetuning needs PyTorch, which is not installed: {TORCH_HINT} ({e})") from None
    return torch


def finetune_plan(model, plan, calib, config=None, progress: bool = True):
    """Finetune `plan` for `model` on the calibration inputs `calib`; returns a new Plan (the
    report is in plan.meta["finetune"])."""
    require_torch()
    from .trainer import finetune_plan as _run

    return _run(model, plan, calib, as_config(True if config is None else config), progress=progress)


__all__ = ["FinetuneConfig", "METHODS", "finetune_plan", "require_torch", "TORCH_HINT"]
