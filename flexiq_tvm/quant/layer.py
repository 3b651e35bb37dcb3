"""What the FlexiQ math needs to know about one quantizable layer.

The frontend fills these in from whatever graph it imported; nothing here knows about TVM, so the
math, the plan and the reference executor can be tested with numpy alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

SUPPORTED_OPS = ("conv2d", "dense")


@dataclass
class LayerSpec:
    """One conv2d (NCHW / OIHW, any groups) or dense layer (`y = x @ W.T`, W stored (O, C)).

    `in_shape` / `out_shape` exclude the batch axis. For dense layers the reduction runs over the
    last axis; leading axes (tokens) are folded into the rows of the GEMM.
    """

    name: str
    op: str
    weight: np.ndarray
    bias: Optional[np.ndarray]
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    groups: int = 1
    strides: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: Tuple[int, int] = (1, 1)
    act_unsigned: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.op not in SUPPORTED_OPS:
            raise ValueError(f"layer {self.name!r}: op {self.op!r} is not one of {SUPPORTED_OPS}")
        self.weight = np.asarray(self.weight, dtype=np.float32)
        if self.bias is None:
            self.bias = np.zeros(self.out_channels, dtype=np.float32)
        self.bias = np.asarray(self.bias, dtype=np.float32)
        want = 4 if self.op == "conv2d" else 2
        if self.weight.ndim != want:
            raise ValueError(f"layer {self.name!r}: {self.op} weight must be {want}-D, got shape {self.weight.shape}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"layer {self.name!r}: groups={self.groups} does not divide C={self.in_channels}, O={self.out_channels}")

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        if self.op == "conv2d":
            return int(self.weight.shape[1]) * self.groups
        return int(self.weight.shape[1])

    @property
    def channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return (int(self.weight.shape[2]), int(self.weight.shape[3])) if self.op == "conv2d" else (1, 1)

    @property
    def rows(self) -> int:
        """Output positions per sample: OH*OW for a conv, the token count for a dense layer."""
        if self.op == "conv2d":
            return int(self.out_shape[-1] * self.out_shape[-2])
        return int(np.prod(self.out_shape[:-1], dtype=np.int64))

    @property
    def macs_per_channel(self) -> int:
        """MACs that involve one input channel, per sample (the same for every channel)."""
        kh, kw = self.kernel_size
        return (self.out_channels // self.groups) * kh * kw * self.rows

    @property
    def macs(self) -> int:
        return self.macs_per_channel * self.in_channels

    def weight_input_channel(self) -> np.ndarray:
        """(O, C/groups) map from a weight element's (o, ci) to its global input channel."""
        O, Cg = self.out_channels, self.channels_per_group
        o = np.arange(O)[:, None]
        return (o // (O // self.groups)) * Cg + np.arange(Cg)[None, :]
