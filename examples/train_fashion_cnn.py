#!/usr/bin/env python3
"""Train the small residual CNN that ships as flexiq-tvm's default model.

This script is self-contained: it reads the Fashion-MNIST IDX files directly
(no torchvision), trains a tiny "ResNet-8"-style network on the CPU, exports it
to ONNX, checks the export with onnxruntime and writes the embedded assets:

    <out-dir>/fashion_cnn.onnx          the model (opset 17, dynamic batch)
    <out-dir>/fashion_calib.npz         512 preprocessed TRAIN images + labels
                                        (fixed-seed, class-balanced) for
                                        post-training quantization calibration
    <out-dir>/fashion_test.npz          the first 2000 t10k images + labels
    <out-dir>/fashion_meta.json         preprocessing, accuracies, provenance
    <out-dir>/LICENSE-fashion-mnist.txt dataset license and attribution

Every output is written atomically (temporary file in the same directory,
then ``os.replace``), so a crashed run never leaves a half-written asset.

Preprocessing (must be reproduced by anything that feeds the model)::

    x = (pixel / 255 - 0.2860) / 0.3530      float32, NCHW, shape (N, 1, 28, 28)

Model (NCHW, ~78k parameters)::

    stem   conv3x3 1->16, BN, ReLU                          28x28
    block1 [conv3x3 16->16, BN, ReLU, conv3x3, BN] + x, ReLU  28x28
    block2 [conv3x3 s2 16->32, BN, ReLU, conv3x3, BN]
           + (conv1x1 s2 16->32, BN), ReLU                  14x14
    block3 same as block2, 32->64                            7x7
    global average pool, flatten, Linear 64->10

Reproducibility: the seeds of ``random``, ``numpy`` and ``torch`` are fixed,
the data order comes from a seeded ``torch.Generator``, torch uses one thread
and deterministic algorithms. Re-running with the same arguments on the same
torch build gives the same weights.

Usage::

    python3 examples/train_fashion_cnn.py                # defaults: 3 epochs, seed 0
    python3 examples/train_fashion_cnn.py --epochs 5 --out-dir /tmp/assets
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = 0.2860
STD = 0.3530
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
N_CALIB = 512
N_TEST_SUBSET = 2000

# Where Debian's ``dataset-fashion-mnist`` package (and a few other common
# layouts) put the IDX files.
DATA_DIR_CANDIDATES = [
    "/usr/share/datasets/fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/share/datasets/fashion_mnist",
    "~/.cache/fashion-mnist",
    "data/fashion-mnist",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "flexiq_tvm" / "assets"

LICENSE_TEXT = """\
Fashion-MNIST
=============

The Fashion-MNIST images and labels included in this directory
(fashion_calib.npz, fashion_test.npz) are derived from the Fashion-MNIST
data set by Zalando Research, https://github.com/zalandoresearch/fashion-mnist
and are redistributed under its MIT license, reproduced below.

Included subsets (preprocessed as x = (pixel/255 - 0.2860) / 0.3530, float32,
shape (N, 1, 28, 28); labels int64):
  * fashion_calib.npz: {n_calib} images from the TRAIN split (train-images-idx3-ubyte),
    a class-balanced random selection drawn with seed {seed}.
  * fashion_test.npz:  the first {n_test} images of the TEST split (t10k-images-idx3-ubyte),
    in their original order.
fashion_cnn.onnx is a model trained by examples/train_fashion_cnn.py on the
full Fashion-MNIST training split.

Please cite:
  Han Xiao, Kashif Rasul, Roland Vollgraf, "Fashion-MNIST: a Novel Image
  Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.

-------------------------------------------------------------------------------

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a
copy of this software and associated documentation files (the "Software"),
to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense,
and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included
in all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS
OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY
CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,
TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


# --------------------------------------------------------------------------- data


def find_data_dir() -> Path | None:
    """Return the first candidate directory holding the Fashion-MNIST IDX files."""
    env = os.environ.get("FASHION_MNIST_DIR")
    candidates = ([env] if env else []) + DATA_DIR_CANDIDATES
    for cand in candidates:
        p = Path(cand).expanduser()
        if (p / "train-images-idx3-ubyte.gz").exists():
            return p
    return None


def _read_idx(path: Path, offset: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split`` ("train" or "t10k") as uint8 images (N,28,28) and int64 labels."""

    def pick(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (data_dir / name).exists():
                return data_dir / name
        raise FileNotFoundError(data_dir / (stem + ".gz"))

    images = _read_idx(pick(f"{split}-images-idx3-ubyte"), 16).reshape(-1, 28, 28)
    labels = _read_idx(pick(f"{split}-labels-idx1-ubyte"), 8).astype(np.int64)
    assert len(images) == len(labels), (images.shape, labels.shape)
    return images, labels


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) -> float32 (N,1,28,28), normalized with MEAN/STD."""
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)


def balanced_selection(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a fixed-seed random, class-balanced subset of size ``n``.

    Each class gets ``n // 10`` images; the remainder (``n % 10``) goes one
    extra image to each of the first classes. The result is shuffled.
    """
    rng = np.random.default_rng(seed)
    n_cls = len(CLASSES)
    per = [n // n_cls + (1 if c < n % n_cls else 0) for c in range(n_cls)]
    picked = []
    for c in range(n_cls):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, size=per[c], replace=False))
    out = np.concatenate(picked)
    rng.shuffle(out)
    return out


# -------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """Two conv3x3+BN layers with an identity or 1x1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FashionResNet8(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.block1 = BasicBlock(16, 16, 1)
        self.block2 = BasicBlock(16, 32, 2)
        self.block3 = BasicBlock(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# ------------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        correct += (model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum().item()
    return correct / len(x)


def _atomic(out_dir: Path, name: str, write) -> Path:
    """Call ``write(tmp_path)`` then atomically move the result to out_dir/name."""
    final = out_dir / name
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


def save_npz(out_dir: Path, name: str, **arrays) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: savez won't append ".npz"
            np.savez_compressed(f, **arrays)

    return _atomic(out_dir, name, write)


def save_text(out_dir: Path, name: str, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return _atomic(out_dir, name, write)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory with the Fashion-MNIST IDX(.gz) files "
        "(default: auto-detect, e.g. /usr/share/datasets/fashion-mnist from "
        "the Debian package dataset-fashion-mnist, or $FASHION_MNIST_DIR)",
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2, help="peak SGD learning rate")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    data_dir = args.data_dir or find_data_dir()
    if data_dir is None:
        raise SystemExit(
            "Fashion-MNIST not found; install it (apt-get install dataset-fashion-mnist) "
            "or pass --data-dir"
        )
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"data: {data_dir}  out: {out_dir}  torch {torch.__version__}", flush=True)

    tr_u8, tr_y = load_split(data_dir, "train")
    te_u8, te_y = load_split(data_dir, "t10k")
    x_train = torch.from_numpy(preprocess(tr_u8))
    y_train = torch.from_numpy(tr_y)
    x_test = torch.from_numpy(preprocess(te_u8))
    y_test = torch.from_numpy(te_y)
    print(f"train {tuple(x_train.shape)}  test {tuple(x_test.shape)}", flush=True)

    model = FashionResNet8(len(CLASSES))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}", flush=True)

    # SGD + Nesterov momentum with a one-cycle (warm-up then cosine anneal) LR.
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=args.lr,
        total_steps=args.epochs * steps_per_epoch,
        pct_start=0.25,
        anneal_strategy="cos",
    )
    gen = torch.Generator().manual_seed(args.seed)

    train_seconds = 0.0
    test_acc = 0.0
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        tot_loss, seen = 0.0, 0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            # Random horizontal flip (seeded): cheap and helpful for clothing.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            seen += len(idx)
        dt = time.perf_counter() - t0
        train_seconds += dt
        test_acc = evaluate(model, x_test, y_test)
        print(
            f"epoch {epoch + 1}/{args.epochs}  train_loss {tot_loss / seen:.4f}  "
            f"test_top1(10k) {test_acc:.4f}  epoch_s {dt:.1f}",
            flush=True,
        )
    print(f"training time: {train_seconds:.1f} s", flush=True)

    model.eval()
    x_sub = x_test[:N_TEST_SUBSET]
    y_sub = y_test[:N_TEST_SUBSET]
    torch_sub_acc = evaluate(model, x_sub, y_sub)
    print(f"torch test_top1 full10k {test_acc:.4f}  subset{N_TEST_SUBSET} {torch_sub_acc:.4f}")

    # ---------------------------------------------------------------- ONNX export
    dummy = x_test[:1].clone()

    def write_onnx(tmp):
        torch.onnx.export(
            model.eval(),
            dummy,
            tmp,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
        import onnx

        onnx.checker.check_model(onnx.load(tmp))

    onnx_path = _atomic(out_dir, "fashion_cnn.onnx", write_onnx)

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    check = x_test[:64]
    with torch.no_grad():
        ref = model(check).numpy()
    got = sess.run(["logits"], {"input": check.numpy()})[0]
    max_diff = float(np.abs(ref - got).max())
    print(f"ORT vs torch max |diff| on batch of {len(check)}: {max_diff:.3e}")
    if max_diff > 1e-4:
        raise SystemExit(f"ONNX export mismatch: max |diff| {max_diff} > 1e-4")
    ort_logits = sess.run(["logits"], {"input": x_sub.numpy()})[0]
    ort_sub_acc = float((ort_logits.argmax(1) == y_sub.numpy()).mean())
    print(f"ORT test_top1 subset{N_TEST_SUBSET} {ort_sub_acc:.4f}")
    op_types = sorted({n.op_type for n in onnx.load(str(onnx_path)).graph.node})
    print(f"ONNX op types: {op_types}")

    # --------------------------------------------------------------- data assets
    calib_idx = balanced_selection(tr_y, N_CALIB, args.seed)
    save_npz(
        out_dir,
        "fashion_calib.npz",
        inputs=preprocess(tr_u8[calib_idx]),
        labels=tr_y[calib_idx].astype(np.int64),
    )
    save_npz(
        out_dir,
        "fashion_test.npz",
        inputs=preprocess(te_u8[:N_TEST_SUBSET]),
        labels=te_y[:N_TEST_SUBSET].astype(np.int64),
    )

    meta = {
        "name": "fashion_cnn",
        "dataset": "Fashion-MNIST",
        "classes": CLASSES,
        "mean": MEAN,
        "std": STD,
        "input_shape": [1, 1, 28, 28],
        "layout": "NCHW",
        "input_name": "input",
        "output_name": "logits",
        "opset": 17,
        "torch_test_top1_full10k": round(test_acc, 6),
        "test_subset_top1": round(ort_sub_acc, 6),
        "test_subset_top1_torch": round(torch_sub_acc, 6),
        "test_subset_size": N_TEST_SUBSET,
        "calib_size": N_CALIB,
        "train_seconds": round(train_seconds, 1),
        "epochs": args.epochs,
        "seed": args.seed,
        "params": n_params,
        "torch_version": torch.__version__,
        "onnx_op_types": op_types,
    }
    save_text(out_dir, "fashion_meta.json", json.dumps(meta, indent=2) + "\n")
    save_text(
        out_dir,
        "LICENSE-fashion-mnist.txt",
        LICENSE_TEXT.format(n_calib=N_CALIB, n_test=N_TEST_SUBSET, seed=args.seed),
    )

    for name in sorted(os.listdir(out_dir)):
        p = out_dir / name
        if p.is_file() and not name.startswith("."):
            print(f"  {p.stat().st_size:>10,d}  {p}")


if __name__ == "__main__":
    main()
