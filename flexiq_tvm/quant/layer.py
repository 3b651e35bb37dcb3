"""What the FlexiQ math needs to know about one quantizable layer.

The frontend fills these in from whatever graph it imported; nothing here knows about TVM, so the
math, the plan and the reference executor can be tested with numpy alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

SUPPORTED_OPS = ("conv2d", "dense")

# PrimFunc attributes the rewrite (passes/flexiq_rewrite.py) puts on a layer's quantize and
# conv/dense kernels, so that targets read the layer's geometry back instead of re-deriving it
GEOMETRY_ATTR = "flexiq.geometry"          # ConvGeometry.to_attrs()
ACT_SCALE_ATTR = "flexiq.act_scale"        # the activation scale (float32 value) of the quantize kernel


@dataclass(frozen=True)
class ConvGeometry:
    """The GEMM geometry of one FlexiQ layer at a batch size: the one record the CUDA tensor-core
    schedule (`schedules/cuda.py`, as `GemmShape`) and the NPU codegen (`NPULayer.geometry`) use.

    A conv2d: input (N, C, H, W) unpadded, output (N, O, OH, OW), kernel KH x KW, strides SH/SW,
    dilation DH/DW, padding PT/PL/PB/PR (top, left, bottom, right), `groups`. A dense layer
    (`dense=True`): N = GEMM rows (batch x tokens), C = reduction, O outputs, every spatial entry 1.
    """

    N: int
    C: int
    H: int
    W: int
    O: int
    OH: int
    OW: int
    KH: int = 1
    KW: int = 1
    SH: int = 1
    SW: int = 1
    DH: int = 1
    DW: int = 1
    PT: int = 0
    PL: int = 0
    PB: int = 0
    PR: int = 0
    groups: int = 1
    dense: bool = False

    @property
    def Hp(self) -> int:  # noqa: N802 (the schedules' names)
        return self.H + self.PT + self.PB

    @property
    def Wp(self) -> int:  # noqa: N802
        return self.W + self.PL + self.PR

    @property
    def M(self) -> int:  # noqa: N802
        """GEMM rows: output positions over the batch."""
        return self.N * self.OH * self.OW

    @classmethod
    def padded(cls, N: int, Hp: int, Wp: int, O: int, OH: int, OW: int, C: int = 0, **kw) -> "ConvGeometry":
        """A geometry over an already padded input of Hp x Wp (padding 0), as GEMM kernels see it."""
        return cls(N=N, C=C, H=Hp, W=Wp, O=O, OH=OH, OW=OW, **kw)

    @classmethod
    def from_spec(cls, spec: "LayerSpec", batch: int) -> "ConvGeometry":
        if spec.op == "conv2d":
            kh, kw = spec.kernel_size
            pt, pl, pb, pr = (int(v) for v in spec.padding)
            return cls(N=int(batch), C=spec.in_channels, H=int(spec.in_shape[-2]), W=int(spec.in_shape[-1]),
                       O=spec.out_channels, OH=int(spec.out_shape[-2]), OW=int(spec.out_shape[-1]), KH=kh, KW=kw,
                       SH=int(spec.strides[0]), SW=int(spec.strides[1]), DH=int(spec.dilation[0]),
                       DW=int(spec.dilation[1]), PT=pt, PL=pl, PB=pb, PR=pr, groups=int(spec.groups))
        rows = int(batch) * int(np.prod(spec.in_shape[:-1], dtype=np.int64))
        return cls(N=rows, C=spec.in_channels, H=1, W=1, O=spec.out_channels, OH=1, OW=1, dense=True)

    def to_attrs(self) -> Dict[str, int]:
        """Plain ints by field name (a PrimFunc attribute value)."""
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> "ConvGeometry":
        names = {f.name for f in fields(cls)}
        vals = {str(k): int(v) for k, v in dict(attrs).items() if str(k) in names}
        vals["dense"] = bool(vals.get("dense", 0))
        return cls(**vals)

    def check(self) -> None:
        """The output size follows from input, padding, kernel, strides and dilation."""
        if self.dense:
            return
        oh = (self.Hp - self.DH * (self.KH - 1) - 1) // self.SH + 1
        ow = (self.Wp - self.DW * (self.KW - 1) - 1) // self.SW + 1
        if (oh, ow) != (self.OH, self.OW):
            raise ValueError(f"conv geometry {self}: output {self.OH}x{self.OW}, the input gives {oh}x{ow}")


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

    def geometry(self, batch: int = 1) -> ConvGeometry:
        """This layer's GEMM geometry at a batch size."""
        return ConvGeometry.from_spec(self, batch)

    def weight_input_channel(self) -> np.ndarray:
        """(O, C/groups) map from a weight element's (o, ci) to its global input channel."""
        O, Cg = self.out_channels, self.channels_per_group
        o = np.arange(O)[:, None]
        return (o // (O // self.groups)) * Cg + np.arange(Cg)[None, :]
