"""The calibration stage: run the float model with TVM and gather per-tensor / per-channel
statistics (stats.py); calibration data files and image folders (data.py, images.py).

Re-exports stats.py, the module that was `flexiq_tvm.calibrate`."""
from .stats import *  # noqa: F401,F403
