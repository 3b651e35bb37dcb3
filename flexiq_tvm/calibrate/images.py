"""Image folders as calibration / evaluation data, with an explicit preprocessing spec.

A folder holds image files (JPEG, PNG, BMP, GIF, TIFF, WebP, PPM/PGM), either directly or one
sub-folder per class (`DIR/<class>/*.jpg`, ImageNet style: labels are the indices of the sorted
class folder names). Files are read in sorted order, so a folder always gives the same batch.

The preprocessing (`Preprocess`) is what the model was trained with:

    resize   the shorter side is scaled to this many pixels (bilinear), or None: straight to `crop`
    crop     center crop (H, W)
    mode     "RGB" or "L" (grayscale)
    mean/std per channel, applied to pixel / 255
    layout   "NCHW" or "NHWC"

Where the spec comes from, in order: the `preprocess=` argument (a `Preprocess`, a dict, a preset
name such as "imagenet", or a "key=value,..." string), else a `preprocess.json` file inside the
folder, else a default derived from the model's input shape (ImageNet mean/std for 3 channels,
[0, 1] gray for 1 channel) with a warning, because a wrong normalization silently costs accuracy.

A file with an image extension that cannot be decoded is an error naming the file; files with
other extensions (README, labels.txt, preprocess.json, hidden files) are ignored.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
SPEC_FILE = "preprocess.json"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How an image file becomes one model input (see the module docstring)."""

    crop: Tuple[int, int] = (224, 224)
    resize: Optional[int] = 256
    mode: str = "RGB"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    layout: str = "NCHW"

    def __post_init__(self):
        crop = self.crop
        if isinstance(crop, (int, np.integer)):
            crop = (int(crop), int(crop))
        self.crop = tuple(int(c) for c in crop)
        if len(self.crop) == 1:
            self.crop = self.crop * 2
        if len(self.crop) != 2 or min(self.crop) < 1:
            raise DataError(f"preprocess: crop must be one or two positive sizes, got {self.crop}")
        if self.resize is not None:
            self.resize = int(self.resize)
            if self.resize < 1:
                raise DataError(f"preprocess: resize must be positive, got {self.resize}")
        self.mode = str(self.mode).upper()
        if self.mode not in ("RGB", "L"):
            raise DataError(f"preprocess: mode must be RGB or L (grayscale), got {self.mode!r}")
        n = 3 if self.mode == "RGB" else 1
        self.mean = _per_channel(self.mean, n, "mean")
        self.std = _per_channel(self.std, n, "std")
        if any(s <= 0 for s in self.std):
            raise DataError(f"preprocess: std must be positive, got {self.std}")
        self.layout = str(self.layout).upper()
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"preprocess: layout must be NCHW or NHWC, got {self.layout!r}")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        h, w = self.crop
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crop"], d["mean"], d["std"] = list(self.crop), list(self.mean), list(self.std)
        return d

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, size: Optional[int] = None) -> "Preprocess":
        name = name.lower()
        if name == "imagenet":                      # torchvision: resize 256, center crop 224
            crop = size or 224
            return cls(crop=crop, resize=int(round(crop * 256 / 224)), mode="RGB")
        if name == "fashion":                       # the shipped Fashion-MNIST models
            crop = size or 28
            return cls(crop=crop, resize=None, mode="L", mean=(0.2860,), std=(0.3530,))
        if name in ("unit", "none"):                # pixel / 255 only
            crop = size or 224
            return cls(crop=crop, resize=None, mode="RGB", mean=(0.0,) * 3, std=(1.0,) * 3)
        raise DataError(f"preprocess: unknown preset {name!r} (imagenet, fashion, unit)")

    @classmethod
    def parse(cls, spec: Union[str, dict, "Preprocess", None]) -> Optional["Preprocess"]:
        """A `Preprocess` from a preset name, a JSON file path, a dict, or "key=value,..." text.

        Text form: `imagenet` or `resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,
        layout=NCHW,mode=RGB` (a preset name may lead: `imagenet,layout=NHWC`); `resize=none` skips
        the resize."""
        if spec is None or isinstance(spec, Preprocess):
            return spec
        if isinstance(spec, dict):
            try:
                return cls(**spec)
            except TypeError as e:
                raise DataError(f"preprocess: {e}") from None
        text = str(spec).strip()
        if text.endswith(".json") and os.path.isfile(text):
            return cls.from_file(text)
        base: dict = {}
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items and "=" not in items[0]:
            base = cls.preset(items.pop(0)).to_dict()
        try:
            cls._parse_items(items, base, text)
            return cls(**base)
        except ValueError as e:
            raise DataError(f"preprocess: bad value in {text!r} ({e})") from None

    @staticmethod
    def _parse_items(items, base: dict, text: str) -> None:
        for item in items:
            if "=" not in item:
                raise DataError(f"preprocess: expected key=value, got {item!r} in {text!r}")
            k, v = (s.strip() for s in item.split("=", 1))
            k = k.lower()
            if k in ("mean", "std"):
                base[k] = [float(x) for x in v.replace(":", "/").split("/")]
            elif k == "crop":
                base[k] = [int(x) for x in v.lower().replace("x", "/").split("/")]
            elif k == "resize":
                base[k] = None if v.lower() in ("none", "0", "") else int(v)
            elif k in ("layout", "mode"):
                base[k] = v
            else:
                raise DataError(f"preprocess: unknown key {k!r} (resize, crop, mean, std, layout, mode)")

    @classmethod
    def from_file(cls, path) -> "Preprocess":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable preprocessing spec ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise DataError(f"{path}: a preprocessing spec is a JSON object")
        try:
            return cls.parse(d)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    @classmethod
    def default_for(cls, input_shape: Sequence[int]) -> "Preprocess":
        """A guess from the model's per-sample input shape (C, H, W) or (H, W, C)."""
        s = tuple(int(v) for v in input_shape)
        if len(s) != 3:
            raise DataError(f"image folders feed image models; this model's input is {s}")
        layout = "NCHW" if s[0] in (1, 3) else "NHWC"
        c, h, w = (s[0], s[1], s[2]) if layout == "NCHW" else (s[2], s[0], s[1])
        if c == 3:
            p = cls.preset("imagenet", size=h)
        elif c == 1:
            p = cls(crop=h, resize=None, mode="L", mean=(0.0,), std=(1.0,))
        else:
            raise DataError(f"image folders give 1 or 3 channels; this model's input is {s}")
        p.crop, p.layout = (h, w), layout
        return p

    # ---- applying -------------------------------------------------------------------------------
    def __call__(self, image) -> np.ndarray:
        """A PIL image -> one float32 sample in `layout`."""
        from PIL import Image

        img = image.convert(self.mode)
        ch, cw = self.crop
        if self.resize is not None:
            w, h = img.size
            r = self.resize / min(w, h)
            img = img.resize((max(cw, round(w * r)), max(ch, round(h * r))), Image.BILINEAR)
        else:
            img = img.resize((cw, ch), Image.BILINEAR)
        w, h = img.size
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
        a = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        if a.ndim == 2:
            a = a[:, :, None]
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            a = a.transpose(2, 0, 1)
        return np.ascontiguousarray(a, dtype=np.float32)


def _per_channel(v, n: int, what: str) -> Tuple[float, ...]:
    vals = [float(x) for x in (v if isinstance(v, (list, tuple, np.ndarray)) else [v])]
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise DataError(f"preprocess: {what} has {len(vals)} values for {n} channels")
    return tuple(vals)


@dataclass
class ImageFolder:
    """A folder of images plus its preprocessing: accepted wherever a `.npz` path is
    (`fq.quantize(model, ImageFolder("calib/", "imagenet"))`, `evaluate(...)`)."""

    path: str
    preprocess: Union[str, dict, Preprocess, None] = None
    limit: Optional[int] = None
    files: List[str] = field(default_factory=list, init=False)
    classes: List[str] = field(default_factory=list, init=False)

    def load(self, model=None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        shape = getattr(model, "input_shape", None)
        return load_image_folder(self.path, self.preprocess, input_shape=shape, limit=self.limit, _into=self)


def list_images(path) -> Tuple[List[str], Optional[List[int]], List[str]]:
    """(files, labels or None, class names) of an image folder, in a fixed order."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such image folder")
    entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    direct = [os.path.join(path, e) for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)
              and os.path.isfile(os.path.join(path, e))]
    if subdirs and not direct:
        files, labels = [], []
        for i, d in enumerate(subdirs):
            sub = os.path.join(path, d)
            for e in sorted(os.listdir(sub)):
                if not e.startswith(".") and e.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(sub, e))
                    labels.append(i)
        out_labels: Optional[List[int]] = labels
        classes = subdirs
    else:
        files, out_labels, classes = direct, None, []
    if not files:
        raise DataError(f"{path}: no image files (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return files, out_labels, classes


def read_image(file: str):
    """A decoded PIL image, or a DataError naming the file."""
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError(f"reading image folders needs Pillow: pip install 'flexiq-tvm[images]' ({e})") from None
    try:
        with Image.open(file) as img:
            img.load()
            return img.copy()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise DataError(f"{file}: not a readable image ({type(e).__name__}: {msg})") from None


def resolve_preprocess(path, preprocess=None, input_shape=None) -> Preprocess:
    spec = Preprocess.parse(preprocess)
    if spec is None:
        spec_file = os.path.join(os.fspath(path), SPEC_FILE)
        if os.path.isfile(spec_file):
            spec = Preprocess.from_file(spec_file)
    if spec is None:
        if input_shape is None:
            raise DataError(f"{path}: no preprocessing spec (pass preprocess=... or add {SPEC_FILE})")
        spec = Preprocess.default_for(input_shape)
        warnings.warn(f"{path}: no preprocessing spec given (preprocess=... or {SPEC_FILE}); using "
                      f"{spec.to_dict()} from the model's input shape", UserWarning, stacklevel=3)
    if input_shape is not None and tuple(spec.sample_shape) != tuple(input_shape):
        raise DataError(f"{path}: preprocessing gives samples of shape {spec.sample_shape} "
                        f"({spec.layout}, {spec.mode}, crop {spec.crop}) but the model's input is {tuple(input_shape)}")
    return spec


def load_image_folder(path, preprocess=None, input_shape=None, limit: Optional[int] = None,
                      _into: Optional[ImageFolder] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(inputs (N, ...) float32, labels or None) from an image folder (see the module docstring)."""
    path = os.fspath(path)
    files, labels, classes = list_images(path)
    spec = resolve_preprocess(path, preprocess, input_shape)
    if limit is not None:
        files = files[:int(limit)]
        labels = labels[:int(limit)] if labels is not None else None
    out = np.empty((len(files),) + spec.sample_shape, np.float32)
    for i, f in enumerate(files):
        out[i] = spec(read_image(f))
    if _into is not None:
        _into.files, _into.classes = files, classes
    return out, (np.asarray(labels, np.int64) if labels is not None else None)
