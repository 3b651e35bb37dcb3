"""The report stage: accuracy / latency evaluation over ratios (evaluate.py), the sensitivity
report (sensitivity.py), plots (plot.py) and the numpy whole-model reference (reference_model.py).

Re-exports sensitivity.py, the module that was `flexiq_tvm.report`."""
from .sensitivity import *  # noqa: F401,F403
