"""The plan: everything the compiler and the runtime need from quantization, in one versioned file.

A plan is JSON (self-describing, diffable) wrapped with a format tag, a version and a SHA-256 of its
body, so a truncated or edited file, a plan from a newer release, or a plan for another model fails
loudly instead of producing wrong numbers. Writes are atomic.
"""
from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .int8 import quantize_weight_with_scale
from .layer import LayerSpec
from .ranking import num_groups
from .schedule import check_ratio, counts_at, cumulative_mac_share, prefix_for_ratio

FORMAT = "flexiq-plan"
VERSION = 2          # 2: optional stored INT8 weight codes (error-compensating rounding); reads 1 too


# the VM function of a compiled module that lowers the weights for given counts (passes/hoist_weights.py
# emits it); when present, `main` takes its result as the last argument (see `Plan.runtime_args`)
RUNTIME_WEIGHTS_FUNC = "flexiq_lower_weights"


class PlanError(ValueError):
    """A plan that cannot be used: unreadable, corrupted, too new, or for another model."""


def model_fingerprint(layers: Sequence[LayerSpec]) -> str:
    """SHA-256 over the quantizable layers' names, geometry and float weights."""
    h = hashlib.sha256()
    for layer in layers:
        h.update(json.dumps([layer.name, layer.op, list(layer.weight.shape), layer.groups, list(layer.strides),
                             list(layer.padding), list(layer.dilation), list(layer.in_shape)]).encode())
        h.update(np.ascontiguousarray(layer.weight, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(layer.bias, dtype=np.float32).tobytes())
    return h.hexdigest()


@dataclass
class LayerPlan:
    """One layer's quantization: INT8 scales, lowering order, bit-extraction shifts."""

    name: str
    op: str
    in_channels: int
    out_channels: int
    groups: int
    group_size: int
    order: np.ndarray            # (C,) input channels in lowering order
    weight_scale: np.ndarray     # (O,) float32
    act_scale: float             # float32 value
    act_unsigned: bool
    act_shift: np.ndarray        # (n_groups,) static activation shift per group
    weight_shift: np.ndarray     # (O, n_groups) weight shift per (output channel, group)
    macs_per_channel: int
    group_sizes: Optional[Sequence[int]] = None   # channels per group, in lowering order
    # dynamic extraction: bits subtracted from the live max-rule shift, per group (calibrated:
    # how far below the max rule the static shift choice went; all 0 = the plain max rule)
    act_dynamic_offset: Optional[Sequence[int]] = None
    # INT8 weight codes chosen from calibration data (quant/rounding.py); None: nearest rounding of
    # the model's weights with weight_scale, re-derived wherever needed
    weight_codes: Optional[np.ndarray] = None

    def __post_init__(self):
        self.order = np.asarray(self.order, dtype=np.int32)
        if self.group_sizes is None:
            n = num_groups(self.in_channels, self.group_size)
            sizes = [self.group_size] * n
            sizes[-1] = self.in_channels - self.group_size * (n - 1)
            self.group_sizes = sizes
        self.group_sizes = [int(v) for v in self.group_sizes]
        if self.act_dynamic_offset is None:
            self.act_dynamic_offset = [0] * len(self.group_sizes)
        self.act_dynamic_offset = np.asarray(self.act_dynamic_offset, dtype=np.int32)
        self.weight_scale = np.asarray(self.weight_scale, dtype=np.float32)
        self.act_scale = float(np.float32(self.act_scale))
        self.act_shift = np.asarray(self.act_shift, dtype=np.int32)
        self.weight_shift = np.asarray(self.weight_shift, dtype=np.int32).reshape(self.out_channels, -1)
        if isinstance(self.weight_codes, dict):
            self.weight_codes = _decode_codes(self.weight_codes, self.name)
        elif self.weight_codes is not None:
            self.weight_codes = np.asarray(self.weight_codes, dtype=np.int8)

    def int8_weight(self, weight: np.ndarray) -> np.ndarray:
        """The layer's INT8 weight codes: the stored ones, or nearest rounding of `weight`."""
        if self.weight_codes is None:
            return quantize_weight_with_scale(weight, self.weight_scale)
        if self.weight_codes.shape != np.shape(weight):
            raise PlanError(f"layer {self.name!r}: plan stores INT8 weights of shape {self.weight_codes.shape}, "
                            f"the model's weight is {np.shape(weight)}")
        return self.weight_codes

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def rank(self) -> np.ndarray:
        """rank[c]: lowering position of the group that input channel c belongs to."""
        rank = np.empty(self.in_channels, dtype=np.int32)
        rank[self.order] = np.repeat(np.arange(self.n_groups, dtype=np.int32), self.group_sizes)
        return rank

    def group_channels(self, g: int) -> np.ndarray:
        start = int(np.sum(self.group_sizes[:g]))
        return self.order[start:start + self.group_sizes[g]]

    def reorder_groups(self, perm: Sequence[int]) -> "LayerPlan":
        """The same groups (channel sets and shifts) lowered in the order `perm` (old group ids)."""
        perm = [int(p) for p in perm]
        if sorted(perm) != list(range(self.n_groups)):
            raise ValueError(f"layer {self.name!r}: {perm} is not a permutation of its {self.n_groups} groups")
        order = np.concatenate([self.group_channels(g) for g in perm]) if perm else self.order
        return LayerPlan(name=self.name, op=self.op, in_channels=self.in_channels, out_channels=self.out_channels,
                         groups=self.groups, group_size=self.group_size, order=order,
                         weight_scale=self.weight_scale, act_scale=self.act_scale, act_unsigned=self.act_unsigned,
                         act_shift=self.act_shift[perm], weight_shift=self.weight_shift[:, perm],
                         act_dynamic_offset=self.act_dynamic_offset[perm],
                         macs_per_channel=self.macs_per_channel, group_sizes=[self.group_sizes[g] for g in perm],
                         weight_codes=self.weight_codes)

    @property
    def act_shift_per_channel(self) -> np.ndarray:
        return self.act_shift[self.rank]

    @property
    def group_macs(self) -> np.ndarray:
        return np.asarray(self.group_sizes, dtype=np.int64) * int(self.macs_per_channel)

    def validate(self):
        C, n = self.in_channels, self.n_groups
        if sum(self.group_sizes) != C or min(self.group_sizes, default=1) < 1:
            raise PlanError(f"layer {self.name!r}: group sizes {self.group_sizes} do not cover {C} channels")
        if sorted(self.order.tolist()) != list(range(C)):
            raise PlanError(f"layer {self.name!r}: channel order is not a permutation of 0..{C - 1}")
        if self.act_shift.shape != (n,) or self.weight_shift.shape != (self.out_channels, n):
            raise PlanError(f"layer {self.name!r}: shift tables do not match {n} groups of {self.group_size}")
        if self.weight_scale.shape != (self.out_channels,):
            raise PlanError(f"layer {self.name!r}: {self.weight_scale.shape[0]} weight scales for {self.out_channels} outputs")
        for arr in (self.act_shift, self.weight_shift):
            if arr.size and (arr.min() < 0 or arr.max() > 4):
                raise PlanError(f"layer {self.name!r}: shifts must lie in 0..4")
        if self.weight_codes is not None and (self.weight_codes.shape[:1] != (self.out_channels,)
                                              or self.weight_codes.size and self.weight_codes.min() < -127):
            raise PlanError(f"layer {self.name!r}: stored INT8 weights do not fit {self.out_channels} outputs "
                            "and the code range [-127, 127]")

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "groups": self.groups, "group_size": self.group_size,
                "order": self.order.tolist(), "weight_scale": [float(v) for v in self.weight_scale],
                "act_scale": self.act_scale, "act_unsigned": bool(self.act_unsigned),
                "act_shift": self.act_shift.tolist(), "weight_shift": self.weight_shift.tolist(),
                "macs_per_channel": int(self.macs_per_channel), "group_sizes": list(self.group_sizes),
                "act_dynamic_offset": self.act_dynamic_offset.tolist(),
                **({} if self.weight_codes is None else {"weight_codes": _encode_codes(self.weight_codes)})}

    @classmethod
    def from_json(cls, d: dict) -> "LayerPlan":
        return cls(**d)


def _encode_codes(codes: np.ndarray) -> dict:
    """INT8 codes as JSON: shape plus base64 of the zlib-compressed bytes (C order)."""
    raw = np.ascontiguousarray(codes, dtype=np.int8).tobytes()
    return {"shape": list(codes.shape), "int8_zlib_base64": base64.b64encode(zlib.compress(raw, 9)).decode("ascii")}


def _decode_codes(d: dict, layer: str) -> np.ndarray:
    try:
        shape = tuple(int(v) for v in d["shape"])
        raw = zlib.decompress(base64.b64decode(d["int8_zlib_base64"], validate=True))
        return np.frombuffer(raw, dtype=np.int8).reshape(shape).copy()
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise PlanError(f"layer {layer!r}: stored INT8 weights are unreadable ({type(e).__name__}: {e})") from None


@dataclass
class Plan:
    """Per-layer plans plus the model-level lowering schedule and the named ratio levels."""

    fingerprint: str
    group_size: int
    layers: List[LayerPlan]
    schedule: List[int]                      # layer index lowered at each step
    levels: Dict[float, int]                 # ratio level -> schedule prefix length
    meta: dict = field(default_factory=dict)
    version: int = VERSION
    # accuracy recovery: per ratio level, per layer, the float32 amount subtracted from the bias
    bias_correction: Dict[float, List[np.ndarray]] = field(default_factory=dict)
    # dynamic extraction: activation shifts from the live tensor (per sample and group) instead of
    # the calibrated act_shift tables; weight shifts stay static. JSON body key "dynamic".
    dynamic: bool = False

    def __post_init__(self):
        self.dynamic = bool(self.dynamic)
        self.bias_correction = {float(r): [np.asarray(d, dtype=np.float32) for d in deltas]
                                for r, deltas in self.bias_correction.items()}
        self.schedule = [int(v) for v in self.schedule]
        self.levels = {float(k): int(v) for k, v in self.levels.items()}
        self._share = None
        self.timings = {}       # seconds spent per quantization step; not saved (plans are reproducible)

    # ---- ratios ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def mac_share(self) -> np.ndarray:
        """MAC share of every schedule prefix 0..len(schedule)."""
        if self._share is None:
            self._share = cumulative_mac_share(self.schedule, [l.group_macs for l in self.layers])
        return self._share

    def counts_for_prefix(self, prefix: int) -> np.ndarray:
        return counts_at(self.schedule, prefix, self.num_layers)

    def counts_for_ratio(self, ratio: float) -> np.ndarray:
        """Per-layer 4-bit group counts for a model ratio: a named level if it is one, else the
        schedule prefix whose 4-bit MAC share is closest."""
        r = check_ratio(ratio)
        prefix = self.levels.get(r)
        if prefix is None:
            prefix = prefix_for_ratio(self.mac_share, r)
        return self.counts_for_prefix(prefix)

    def mac_ratio(self, counts: Sequence[int]) -> float:
        counts = self.check_counts(counts)
        total = sum(int(l.group_macs.sum()) for l in self.layers)
        low = sum(int(l.group_macs[:k].sum()) for l, k in zip(self.layers, counts))
        return low / total if total else 0.0

    def channel_ratio(self, counts: Sequence[int]) -> float:
        counts = self.check_counts(counts)
        total = sum(l.in_channels for l in self.layers)
        low = sum(int(np.sum(l.group_sizes[:k])) for l, k in zip(self.layers, counts))
        return low / total if total else 0.0

    def check_counts(self, counts) -> np.ndarray:
        c = np.asarray(counts)
        if c.shape != (self.num_layers,):
            raise ValueError(f"expected {self.num_layers} per-layer counts, got shape {c.shape}")
        if not np.issubdtype(c.dtype, np.integer):
            raise ValueError("per-layer counts must be integers")
        for layer, k in zip(self.layers, c):
            if not 0 <= k <= layer.n_groups:
                raise ValueError(f"layer {layer.name!r}: count {int(k)} outside 0..{layer.n_groups}")
        return c.astype(np.int32)

    # ---- model matching --------------------------------------------------------------------
    def check_model(self, fingerprint: str, layer_names: Sequence[str], source: str = "the model"):
        names = [l.name for l in self.layers]
        if list(layer_names) != names:
            missing = sorted(set(names) ^ set(layer_names))
            raise PlanError(f"plan does not match {source}: its quantizable layers differ "
                            f"(plan has {len(names)}, model has {len(layer_names)}; differing: {missing[:5]})")
        if fingerprint != self.fingerprint:
            raise PlanError(f"plan does not match {source}: model fingerprint {fingerprint[:12]}... "
                            f"!= plan's {self.fingerprint[:12]}... (weights or shapes changed)")

    # ---- files ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "group_size": self.group_size,
                "layers": [l.to_json() for l in self.layers], "schedule": self.schedule,
                "levels": {repr(k): v for k, v in sorted(self.levels.items())}, "meta": self.meta,
                "bias_correction": {repr(r): [[float(v) for v in d] for d in deltas]
                                    for r, deltas in sorted(self.bias_correction.items())},
                "dynamic": bool(self.dynamic)}

    def dumps(self) -> str:
        body = self.to_json()
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return json.dumps({"format": FORMAT, "version": self.version,
                           "checksum": "sha256:" + hashlib.sha256(canon.encode()).hexdigest(),
                           "body": body}, sort_keys=True)

    def save(self, path) -> None:
        atomic_write_bytes(path, self.dumps().encode())

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> "Plan":
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{source}: not a FlexiQ plan (unreadable JSON: {e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise PlanError(f"{source}: not a FlexiQ plan (missing format tag {FORMAT!r})")
        version = doc.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise PlanError(f"{source}: plan format version {version!r} is newer than this flexiq-tvm "
                            f"reads (<= {VERSION}); upgrade flexiq-tvm")
        body = doc.get("body")
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if doc.get("checksum") != "sha256:" + hashlib.sha256(canon.encode()).hexdigest():
            raise PlanError(f"{source}: plan is corrupted (checksum mismatch)")
        try:
            plan = cls(fingerprint=body["fingerprint"], group_size=int(body["group_size"]),
                       layers=[LayerPlan.from_json(d) for d in body["layers"]], schedule=body["schedule"],
                       levels={float(k): v for k, v in body["levels"].items()}, meta=body.get("meta", {}),
                       version=version,
                       bias_correction={float(k): v for k, v in body.get("bias_correction", {}).items()},
                       dynamic=bool(body.get("dynamic", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{source}: plan is malformed ({type(e).__name__}: {e})") from None
        plan.validate(source)
        return plan

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise PlanError(f"cannot read plan {path}: {e.strerror}") from None
        return cls.loads(data.decode("utf-8", errors="replace"), source=str(path))

    def validate(self, source: str = "plan"):
        for layer in self.layers:
            layer.validate()
        steps = np.bincount(np.asarray(self.schedule, dtype=np.int64), minlength=self.num_layers)
        for layer, n in zip(self.layers, steps[: self.num_layers]):
            if n != layer.n_groups:
                raise PlanError(f"{source}: schedule lowers layer {layer.name!r} {n} times, it has {layer.n_groups} groups")
        if len(steps) > self.num_layers:
            raise PlanError(f"{source}: schedule refers to layers beyond {self.num_layers}")
        for r, p in self.levels.items():
            if not 0 <= p <= len(self.schedule):
                raise PlanError(f"{source}: level {r} points past the schedule")
        for r, deltas in self.bias_correction.items():
            if r not in self.levels or len(deltas) != self.num_layers or any(
                    d.shape != (l.out_channels,) for d, l in zip(deltas, self.layers)):
                raise PlanError(f"{source}: bias correction for ratio {r} does not match the plan's levels/layers")

    # ---- the run-time contract of a compiled module --------------------------------------------
    def runtime_arrays(self, ratio) -> List[np.ndarray]:
        """The arrays a FlexiQ-rewritten `main` takes after its input, for a ratio, as numpy:
        `counts` (int32, one entry per layer: its number of 4-bit groups), then, for a plan with
        per-ratio bias corrections, `bias_row` (int32, shape (1,): the row of the compiled bias
        tables). One source of truth for `runtime_args` and `CompiledModel.set_ratio`."""
        out = [np.ascontiguousarray(self.counts_for_ratio(ratio), dtype=np.int32)]
        if self.bias_correction:
            out.append(np.array([self.bias_row(ratio)], dtype=np.int32))
        return out

    def runtime_args(self, ratio, device=None, vm=None) -> list:
        """`runtime_arrays(ratio)` as `tvm.runtime.Tensor`s on `device` (default CPU): pass them to
        the VM after the input, `vm["main"](x, *plan.runtime_args(0.5, dev, vm))`. With `vm` (a
        `relax.VirtualMachine` of the compiled module) whose executable has the hoisted weight
        lowering (`RUNTIME_WEIGHTS_FUNC`, llvm deployment builds), the weights lowered for these
        counts follow as the last argument (call this once per ratio change and keep the list:
        the lowering is the expensive part). tvm is imported here only: the rest of `quant/`
        stays numpy-only."""
        import tvm

        dev = tvm.cpu() if device is None else device
        args = [tvm.runtime.tensor(a, dev) for a in self.runtime_arrays(ratio)]
        if vm is not None and vm.module.implements_function(RUNTIME_WEIGHTS_FUNC):
            args.append(vm[RUNTIME_WEIGHTS_FUNC](args[0]))
        return args

    def bias_row(self, ratio) -> int:
        """Row of the compiled bias tables for a ratio: 0 is the model's own bias; corrected levels
        follow in ascending order. A ratio between levels uses the nearest corrected level below it."""
        if not self.bias_correction:
            return 0
        r = check_ratio(ratio)
        levels = sorted(self.bias_correction)
        below = [i for i, lv in enumerate(levels) if lv <= r + 1e-12]
        return below[-1] + 1 if below else 0
