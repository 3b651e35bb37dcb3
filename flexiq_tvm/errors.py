"""Errors a user sees: each names the file, layer or option at fault."""


class FlexiQError(Exception):
    """Base class of flexiq-tvm's user-facing errors."""


class ModelError(FlexiQError, ValueError):
    """The model file or module cannot be used (unreadable, malformed, unsupported)."""


class DataError(FlexiQError, ValueError):
    """Calibration or evaluation data cannot be used (missing, wrong shape, NaN/inf)."""
