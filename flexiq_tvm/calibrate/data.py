"""Calibration and evaluation data: `.npz` files or arrays, checked against the model's input."""
from __future__ import annotations

import os
import zipfile
from typing import Optional, Tuple

import numpy as np

from ..errors import DataError


def load_npz(path, input_name: Optional[str] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(inputs, labels or None) from an `.npz` with `inputs` (or a key named like the model input)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = "inputs" if "inputs" in keys else (input_name if input_name in keys else None)
            if key is None:
                raise DataError(f"{path}: no 'inputs' array (keys: {keys})")
            inputs = z[key]
            labels = z["labels"] if "labels" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != inputs.shape[0] or labels.dtype.kind not in "iu":
            raise DataError(f"{path}: 'labels' must be {inputs.shape[0]} integers, got {labels.dtype} {labels.shape}")
    return inputs, labels


def load_data(source, model=None, what: str = "data"):
    """Accepts an array, a dict with 'inputs'[/'labels'], an `.npz` path, an image folder (path or
    `images.ImageFolder` with its preprocessing); validates vs `model`."""
    labels = None
    if hasattr(source, "load") and hasattr(source, "preprocess"):      # images.ImageFolder
        inputs, labels = source.load(model)
        what = os.fspath(source.path)
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        from .images import load_image_folder     # a folder of images (preprocess.json or a default)

        inputs, labels = load_image_folder(source, input_shape=getattr(model, "input_shape", None))
        what = os.fspath(source)
    elif isinstance(source, (str, os.PathLike)):
        inputs, labels = load_npz(source, getattr(model, "input_name", None))
        what = os.fspath(source)
    elif isinstance(source, dict):
        if "inputs" not in source:
            raise DataError(f"{what}: dict has no 'inputs' entry")
        inputs, labels = source["inputs"], source.get("labels")
    else:
        inputs = source
    if model is not None:
        inputs = model.check_inputs(inputs, what=what)
    return inputs, labels
