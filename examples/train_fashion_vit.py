#!/usr/bin/env python3
"""Train the small vision transformer that ships beside the demo CNN (flexiq_tvm/assets/).

Self-contained like examples/train_fashion_cnn.py: reads the Fashion-MNIST IDX files directly,
trains on the CPU with fixed seeds, exports ONNX (opset 17, dynamic batch), checks the export
with onnxruntime and writes:

    <out-dir>/fashion_vit.onnx        the model
    <out-dir>/fashion_vit_meta.json   preprocessing, architecture, accuracies, provenance

It uses the same preprocessing, calibration set and test subset as the CNN
(fashion_calib.npz / fashion_test.npz): x = (pixel / 255 - 0.2860) / 0.3530, NCHW (N, 1, 28, 28).

Model (~150k parameters), a standard pre-norm ViT:

    patch embedding   Conv2d 1->64, kernel 4, stride 4  -> 7x7 = 49 tokens of 64 features
    class token + learned position embedding             -> (N, 50, 64)
    4 x encoder block [x + Attn(LN(x)); x + MLP(LN(x))]  4 heads of 16, MLP 64->128->64 GELU
    final LayerNorm, class token, Linear 64->10

Attention is written out (one qkv Linear, q @ k^T, softmax, @ v, projection Linear) so the ONNX
graph has plain MatMul / Softmax / LayerNormalization nodes. FlexiQ quantizes every Linear
(qkv, proj, fc1, fc2, head: constant weights, reduction over the token features) and the
patch-embedding conv; q @ k^T and attn @ v multiply two activations and stay float by policy.

Reproducibility: seeds of random / numpy / torch fixed, seeded data order, deterministic
algorithms, one torch thread by default.

Usage::

    python3 examples/train_fashion_vit.py                  # defaults: 6 epochs, seed 0
    python3 examples/train_fashion_vit.py --epochs 1 --out-dir /tmp/vit
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fashion_cnn import (CLASSES, DEFAULT_OUT_DIR, N_TEST_SUBSET, _atomic, evaluate,  # noqa: E402
                               find_data_dir, load_split, preprocess, save_text, seed_everything)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                              # (b, h, t, hd)
        att = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class FashionViT(nn.Module):
    def __init__(self, num_classes: int = 10, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp: int = 128, image: int = 28):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)                 # (b, 49, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke tests)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    data_dir = args.data_dir or find_data_dir()
    if data_dir is None:
        raise SystemExit("Fashion-MNIST not found; apt-get install dataset-fashion-mnist or pass --data-dir")
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tr_u8, tr_y = load_split(data_dir, "train")
    te_u8, te_y = load_split(data_dir, "t10k")
    if args.limit:
        tr_u8, tr_y = tr_u8[:args.limit], tr_y[:args.limit]
    x_train, y_train = torch.from_numpy(preprocess(tr_u8)), torch.from_numpy(tr_y)
    x_test, y_test = torch.from_numpy(preprocess(te_u8)), torch.from_numpy(te_y)

    model = FashionViT(len(CLASSES))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data {data_dir}  params {n_params}  torch {torch.__version__}", flush=True)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, args.epochs * steps_per_epoch),
                                                pct_start=0.15, anneal_strategy="cos")
    gen = torch.Generator().manual_seed(args.seed)
    train_seconds, test_acc = 0.0, 0.0
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        tot, seen = 0.0, 0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            seen += len(idx)
        dt = time.perf_counter() - t0
        train_seconds += dt
        test_acc = evaluate(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {tot / max(seen, 1):.4f}  test_top1(10k) {test_acc:.4f}  "
              f"epoch_s {dt:.1f}", flush=True)

    model.eval()
    x_sub, y_sub = x_test[:N_TEST_SUBSET], y_test[:N_TEST_SUBSET]
    torch_sub_acc = evaluate(model, x_sub, y_sub)

    def write_onnx(tmp):
        torch.onnx.export(model, x_test[:1].clone(), tmp, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
        import onnx
        onnx.checker.check_model(onnx.load(tmp))

    onnx_path = _atomic(out_dir, "fashion_vit.onnx", write_onnx)
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x_test[:64]).numpy()
    diff = float(np.abs(ref - sess.run(["logits"], {"input": x_test[:64].numpy()})[0]).max())
    print(f"ORT vs torch max |diff|: {diff:.3e}")
    if diff > 1e-4:
        raise SystemExit(f"ONNX export mismatch: {diff}")
    ort_acc = float((sess.run(["logits"], {"input": x_sub.numpy()})[0].argmax(1) == y_sub.numpy()).mean())
    op_types = sorted({n.op_type for n in onnx.load(str(onnx_path)).graph.node})
    meta = {"name": "fashion_vit", "dataset": "Fashion-MNIST", "classes": CLASSES, "mean": 0.2860, "std": 0.3530,
            "input_shape": [1, 1, 28, 28], "layout": "NCHW", "input_name": "input", "output_name": "logits",
            "opset": 17, "arch": {"patch": 4, "dim": 64, "depth": 4, "heads": 4, "mlp": 128, "tokens": 50,
                                  "norm": "pre", "class_token": True},
            "torch_test_top1_full10k": round(test_acc, 6), "test_subset_top1": round(ort_acc, 6),
            "test_subset_top1_torch": round(torch_sub_acc, 6), "test_subset_size": N_TEST_SUBSET,
            "train_seconds": round(train_seconds, 1), "epochs": args.epochs, "seed": args.seed,
            "lr": args.lr, "batch_size": args.batch_size, "threads": args.threads, "limit": args.limit,
            "params": n_params, "torch_version": torch.__version__, "onnx_op_types": op_types}
    save_text(out_dir, "fashion_vit_meta.json", json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: meta[k] for k in ("torch_test_top1_full10k", "test_subset_top1", "train_seconds")}))
    print(f"{onnx_path} {os.path.getsize(onnx_path):,d} bytes; ops {op_types}")


if __name__ == "__main__":
    main()
