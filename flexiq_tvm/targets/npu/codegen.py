"""`relax.ext.flexiq_npu`: NPU programs for the external functions made by partition.py.

For every external function (a chain of FlexiQ layers merged by MergeCompositeFunctions) the
codegen

1. reads each layer out of its composite function: the constants (INT8 weights, rank table,
   activation and weight shift tables, scale, bias) and the geometry (padding and activation scale
   from the quantize_act PrimFunc, strides / dilation / groups from the conv kernel);
2. lays the weights out for the NPU (input channels of each conv group sorted into lowering
   order, so that the 4-bit groups form contiguous runs of the reduction);
3. tiles the layer to the array and SRAM sizes (:func:`plan_tiles`) and emits the instruction
   stream (LDREG, QUANT, LDX, LDW, GEMM, VEC, ST, SYNC; docs/npu.md section 4), software-pipelined
   so that the loads of step s+1 are queued before the GEMM of step s (double buffering);
4. writes everything (constants as one byte blob, layer table, programs) into C source appended
   to runtime.c, and returns one `CSourceModule` for all functions, so the artifact exports and
   loads like any TVM library.

The program never contains a count of 4-bit groups: LDREG reads it from the `counts` argument.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import tvm
from tvm import relax

from ...quant.layer import ACT_SCALE_ATTR, GEOMETRY_ATTR, ConvGeometry
from ...schedules.compute import KERNEL_ATTR
from .config import NPUConfig

CODEGEN = "flexiq_npu"
STATS_FUNC = "flexiq_npu_stats"
STATS_COLS = 16
OP = {"LDREG": 1, "QUANT": 2, "LDX": 3, "LDW": 4, "GEMM": 5, "VEC": 6, "ST": 7, "SYNC": 8, "DWGEMM": 9,
      "PREF": 10, "ADD": 11}
IW = 12
MAX_REQ = 8
MAX_VARIANTS = 9         # mapping variants per layer (LDREG words 3..11)

_RUNTIME_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime.c")

# The codegen is called by RunCodegen with the external functions only; the PrimFuncs they call
# (looked up for attributes and geometry) and the configuration come from the build in progress.
_CTX: Dict[str, object] = {}


@contextlib.contextmanager
def build_context(mod: tvm.IRModule, config: NPUConfig, num_layers: int, levels=None, records=None,
                  level_ratios=None):
    """records: tuning records ({key: record}, records.py) or None; level_ratios: the ratio of each
    entry of `levels` (the records are keyed by level). The context collects `untuned`: the layers
    (name, level) without a usable record when records were given."""
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    old = dict(_CTX)
    _CTX.clear()
    _CTX.update(prims=prims, config=config, num_layers=num_layers, programs={}, levels=levels, records=records,
                level_ratios=level_ratios, untuned=[])
    try:
        yield _CTX
    finally:
        _CTX.clear()
        _CTX.update(old)


# --------------------------------------------------------------------------- layer extraction
@dataclass
class NPULayer:
    layer: int               # flexiq.layer index (counts / stats row)
    name: str
    op: str                  # conv2d | dense
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
    unsigned: bool = False
    relu: bool = False               # a fused activation clamp(y, act_lo, act_hi): ReLU or ReLU6 (clip)
    act_lo: float = 0.0
    act_hi: float = float("inf")
    act_scale: float = 1.0
    dynamic: bool = False            # dynamic extraction: act_shift_c holds per-group offsets
    samples: int = 1                 # samples in N (dense layers fold tokens into N)
    weight: np.ndarray = None        # (O, Cg, KH, KW) int8
    rank: np.ndarray = None          # (C,) int32
    act_shift_c: np.ndarray = None   # (C,) int32
    weight_shift: np.ndarray = None  # (O, n_groups) int32
    scale: np.ndarray = None         # (O,) f32
    bias: np.ndarray = None          # (O,) f32, or (rows, O): per-ratio bias rows picked at run time
    # program wiring
    in_param: int = -1
    out_index: int = -1
    req: List[int] = field(default_factory=list)
    in_onchip: bool = False          # the INT8 input stays in the ABUF (set by the program's allocator)
    req_off: int = 0                 # consumers whose INT8 copy goes to DRAM (ABUF full)
    req_dyn: int = 0                 # consumers with dynamic extraction (the vector unit tracks maxima)
    fadd: List[int] = field(default_factory=list)   # float copies for residual adds: add * 2 + operand
    fadd_off: int = 0                # of which go through DRAM (ABUF full)
    spill: str = ""                  # why the layer does not run from SRAM alone (empty: it does)
    resident: bool = False           # the model's weights stay in the WBUF between calls: no LDW traffic

    @property
    def depthwise(self):
        """One input and one output channel per conv group: mapped channels-across-columns."""
        return self.groups > 1 and self.Cg == 1 and self.opg == 1

    @property
    def bias_table(self):
        return self.bias.reshape(-1, self.O)

    @property
    def in_bytes(self):
        return self.N * self.C * self.H * self.W

    @property
    def Cg(self):
        return self.C // self.groups

    @property
    def opg(self):
        return self.O // self.groups

    @property
    def Hp(self):
        return self.H + self.PT + self.PB

    @property
    def Wp(self):
        return self.W + self.PL + self.PR

    @property
    def n_groups(self):
        return int(self.weight_shift.shape[1])

    @property
    def macs(self):
        return self.N * self.O * self.OH * self.OW * self.Cg * self.KH * self.KW

    @property
    def geometry(self) -> ConvGeometry:
        """The layer's geometry record (shared with the CUDA schedule's GemmShape)."""
        return ConvGeometry(N=self.N, C=self.C, H=self.H, W=self.W, O=self.O, OH=self.OH, OW=self.OW, KH=self.KH,
                            KW=self.KW, SH=self.SH, SW=self.SW, DH=self.DH, DW=self.DW, PT=self.PT, PL=self.PL,
                            PB=self.PB, PR=self.PR, groups=self.groups, dense=self.op == "dense")


@dataclass(eq=False)          # identity: two operators of one shape are distinct program entries
class NPUAdd:
    """A residual add `a + b` of two float32 tensors on the vector unit. Its operands are float
    copies written by their producers (layers or adds; in the ABUF when they fit) or host inputs.
    With `pool` > 0 it is a global average pool instead: one operand of n x pool values (NCHW, the
    H x W positions of each (sample, channel) contiguous), out[i] = float32 sum in order / pool."""
    n: int                                             # elements
    shape: Tuple[int, ...] = ()
    in_param: List[int] = field(default_factory=lambda: [-1, -1])
    out_index: int = -1
    req: List[int] = field(default_factory=list)       # layers reading a requantized INT8 copy
    fadd: List[int] = field(default_factory=list)      # adds reading a float copy (add * 2 + operand)
    onchip: List[bool] = field(default_factory=lambda: [True, True])   # operand copies in the ABUF
    act: bool = False                                  # fused ReLU / ReLU6: clamp(a + b, act_lo, act_hi)
    act_lo: float = 0.0
    act_hi: float = float("inf")
    fadd_off: int = 0
    req_off: int = 0
    pool: int = 0                                      # > 0: global average pool over `pool` positions
    # token-tensor operators (kind > 0, section 4.3): VEC_KINDS; operand k is a producer's float copy,
    # a host input or a constant (consts[k]); params: layer norm gamma + beta
    kind: int = 0
    n_op: List[int] = field(default_factory=lambda: [0, 0])
    consts: List[Optional[np.ndarray]] = field(default_factory=lambda: [None, None])
    params: Optional[np.ndarray] = None
    s: float = 0.0
    d: List[int] = field(default_factory=list)
    g: List[int] = field(default_factory=list)
    g0: int = 0
    op_name: str = ""
    chain: bool = False              # chained into the pass of the operator before it (section 4.3)
    chain_slot: int = -1             # with chain: the operand that streams from that operator

    @property
    def n_in(self):
        return self.n * max(self.pool, 1)

    def operand_elems(self, k: int) -> int:
        """Elements of operand k (0 when the operator has no such tensor operand)."""
        if self.kind:
            return int(self.n_op[k])
        if self.pool:
            return self.n_in if k == 0 else 0
        return self.n

    def uses_slot(self, k: int) -> bool:
        """Operand k is a tensor read from a producer's copy or a host input (not a constant)."""
        return self.operand_elems(k) > 0 and (self.kind == 0 or self.consts[k] is None)


VEC_KINDS = {"copy": 1, "add": 2, "mul": 3, "adds": 4, "muls": 5, "divs": 6, "erf": 7, "layer_norm": 8,
             "softmax": 9, "matmul": 10, "gather": 11, "concat": 12}


# This wheel has no Python TIR visitor (no tirx.stmt_functor), so the few numbers the codegen needs
# from a kernel (activation scale, padding, strides, dilation) are read from its TVMScript text:
# the kernels come from schedules/compute.py, whose access patterns are fixed.
_ACCESS = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\[([^\[\]]*)\]")


def _accesses(func, buffer_names):
    return [[p.strip() for p in m.group(2).split(",")]
            for m in _ACCESS.finditer(func.script()) if m.group(1) in buffer_names]


def _eval_index(expr: str, values: Dict[str, int]) -> int:
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr))
    env = {n: values.get(n, 0) for n in names}
    return int(eval(expr, {"__builtins__": {}}, env))  # noqa: S307 (index arithmetic of our own kernels)


def _quantize_geometry(qf) -> Tuple[float, int, int]:
    """(activation scale, pad top, pad left) from a quantize_act PrimFunc: the rewrite's attributes
    (quant/layer.py GEOMETRY_ATTR, ACT_SCALE_ATTR); kernels without them are read from their text."""
    if qf.attrs is not None and GEOMETRY_ATTR in qf.attrs and ACT_SCALE_ATTR in qf.attrs:
        g = ConvGeometry.from_attrs(qf.attrs[GEOMETRY_ATTR])
        return float(np.float32(float(qf.attrs[ACT_SCALE_ATTR]))), g.PT, g.PL
    text = qf.script()
    m = re.search(r"/ T\.float32\(([-0-9.eE+]+)\) \+ T\.float32\(0\.5\)", text)
    if not m:
        raise ValueError("quantize_act kernel without a constant scale")
    scale = float(np.float32(float(m.group(1))))
    pt = pl = 0
    # dynamic kernels read the input unpadded in stage q0 and pad in the last stage (reads of q0
    # at the output's h, w); static kernels pad while reading x
    loads = [a for a in _accesses(qf, ("q0",)) if len(a) == 4 and "h" in a[2]] or \
        [a for a in _accesses(qf, ("x",)) if len(a) == 4]
    if loads:
        pt = -_eval_index(loads[0][2], {})
        pl = -_eval_index(loads[0][3], {})
    return scale, pt, pl


def _conv_geometry(kf) -> Tuple[int, int, int, int]:
    """(SH, SW, DH, DW) from a conv2d_int8 PrimFunc: the rewrite's GEOMETRY_ATTR, else the
    activation read in its reduction."""
    if kf.attrs is not None and GEOMETRY_ATTR in kf.attrs:
        g = ConvGeometry.from_attrs(kf.attrs[GEOMETRY_ATTR])
        return g.SH, g.SW, g.DH, g.DW
    for a in _accesses(kf, ("qx", "x_r")):
        if len(a) < 4 or "rh" not in a[2]:
            continue
        ih, iw = a[2], a[3]
        base_h, base_w = _eval_index(ih, {}), _eval_index(iw, {})
        sh = _eval_index(ih, {"v_oh": 1, "oh": 1}) - base_h
        dh = _eval_index(ih, {"v_rh": 1, "rh": 1}) - base_h
        sw = _eval_index(iw, {"v_ow": 1, "ow": 1}) - base_w
        dw = _eval_index(iw, {"v_rw": 1, "rw": 1}) - base_w
        return sh, sw, dh, dw
    raise ValueError("conv2d_int8 kernel: cannot find the activation access")


def _const(e) -> np.ndarray:
    if isinstance(e, tvm.ir.GenericConst) or isinstance(e, tvm.ir.Constant):
        return e.value.numpy()
    raise ValueError(f"expected a constant operand, got {type(e).__name__}")


def _shape(ty):
    return tuple(int(v) for v in ty.shape.values)


def extract_layer(comp: relax.Function, arg_of_param, prims) -> Tuple[NPULayer, object, object]:
    """Reads one composite (FlexiQ layer [+ ReLU / ReLU6]); returns (layer, x expr, counts expr,
    bias-row expr or None) where the exprs are the outer-function arguments bound to the layer's
    input, counts and bias row."""
    calls = {}
    relu, act_lo, act_hi = False, 0.0, float("inf")
    bound = {}
    take = None

    def resolve(e):
        if isinstance(e, relax.Var) and e in arg_of_param:
            return arg_of_param[e]
        return e

    for block in comp.body.blocks:
        for b in block.bindings:
            v = b.value
            bound[b.var] = v
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
                if v.op.name == "relax.call_tir":
                    kind = str(prims[v.args[0].name_hint].attrs[KERNEL_ATTR])
                    calls[kind] = v
                elif v.op.name == "relax.nn.relu":
                    relu = True
                elif v.op.name in ("relax.clip", "relax.maximum", "relax.minimum"):
                    from .partition import act_bounds

                    lo, hi = act_bounds(relax.Call(v.op, [resolve(a) for a in v.args], v.attrs))
                    relu = True
                    if v.op.name in ("relax.clip", "relax.maximum"):
                        act_lo = lo
                    if v.op.name in ("relax.clip", "relax.minimum"):
                        act_hi = hi
                elif v.op.name == "relax.take":
                    take = v
    q, wl = calls["quantize_act"], calls["lower_weight"]
    kcall = calls["conv2d_int8"] if "conv2d_int8" in calls else calls["dense_int8"]
    qf, kf = prims[q.args[0].name_hint], prims[kcall.args[0].name_hint]
    dynamic = bool(qf.attrs.get("flexiq.dynamic", False))
    qargs, wargs, kargs = q.args[1].fields, wl.args[1].fields, kcall.args[1].fields
    x_expr, counts_expr = resolve(qargs[0]), resolve(qargs[1])
    op = "conv2d" if str(kf.attrs[KERNEL_ATTR]) == "conv2d_int8" else "dense"
    scale_x, pt, pl = _quantize_geometry(qf)
    w = _const(resolve(wargs[0])).astype(np.int8)
    x_shape = _shape(qargs[0].ty)
    y_shape = _shape(kcall.ty)
    bias_row_expr = None
    bias_arg = resolve(kargs[3])
    if isinstance(bias_arg, (tvm.ir.GenericConst, tvm.ir.Constant)):
        bias = _const(bias_arg).astype(np.float32)
    else:
        # accuracy recovery: bias = reshape(take(table, bias_row, axis=0, mode="clip"))
        if take is None:
            raise ValueError("the bias is neither a constant nor a bias-table row")
        bias = _const(resolve(take.args[0])).astype(np.float32)
        bias_row_expr = resolve(take.args[1])
    common = dict(layer=int(qf.attrs["flexiq.layer_index"]), unsigned=bool(qf.attrs["flexiq.unsigned"]),
                  relu=relu, act_lo=act_lo, act_hi=act_hi, act_scale=scale_x, dynamic=dynamic,
                  samples=int(x_shape[0]),
                  rank=_const(resolve(qargs[2])).astype(np.int32),
                  act_shift_c=_const(resolve(qargs[3])).astype(np.int32),
                  weight_shift=np.ascontiguousarray(_const(resolve(wargs[3])), np.int32).reshape(w.shape[0], -1),
                  scale=_const(resolve(kargs[2])).astype(np.float32),
                  bias=bias)
    if op == "conv2d":
        N, C, H, W = x_shape
        _, O, OH, OW = y_shape
        Hp, Wp = _shape(q.ty)[2:]
        sh, sw, dh, dw = _conv_geometry(kf)
        groups = int(kf.attrs["flexiq.groups"])
        L = NPULayer(name="", op=op, N=N, C=C, H=H, W=W, O=O, OH=OH, OW=OW, KH=w.shape[2], KW=w.shape[3],
                     SH=sh, SW=sw, DH=dh, DW=dw, PT=pt, PL=pl, PB=Hp - H - pt, PR=Wp - W - pl,
                     groups=groups, weight=w, **common)
        if (Hp - dh * (L.KH - 1) - 1) // sh + 1 != OH or (Wp - dw * (L.KW - 1) - 1) // sw + 1 != OW:
            raise ValueError(f"layer {L.layer}: recovered conv geometry does not reproduce its output shape")
    else:
        M, C = _shape(kargs[0].ty)
        O = y_shape[1]
        L = NPULayer(name="", op=op, N=M, C=C, H=1, W=1, O=O, OH=1, OW=1, weight=w.reshape(O, C, 1, 1), **common)
    if L.N % L.samples:
        raise ValueError(f"layer {L.layer}: {L.N} rows are not a whole number of {L.samples} samples")
    if L.bias.size % L.O:
        raise ValueError(f"layer {L.layer}: bias table of {L.bias.size} values for {L.O} output channels")
    return L, x_expr, counts_expr, bias_row_expr


# --------------------------------------------------------------------------- tiling
@dataclass(frozen=True)
class Tiling:
    jc: int          # input channels (of a conv group) per K chunk; depthwise: channels per block
    ob: int          # output channels per n-block (depthwise: = jc)
    ohlen: int       # output rows per m-block (per image)
    nlen: int        # images per m-block (> 1 only when ohlen == OH)
    order: str = "mo"   # loop order: "mo" m-blocks outside o-blocks, "om" o-blocks outside (weights stay)

    def chunks(self, Cg):
        return [(j, min(self.jc, Cg - j)) for j in range(0, Cg, self.jc)]


def _rows_needed(L: NPULayer, ohlen: int) -> int:
    return (ohlen - 1) * L.SH + (L.KH - 1) * L.DH + 1


def _fit_rows(L: NPULayer, cfg: NPUConfig, in_per_row_ch: int, jc: int, ob: int, cap: int):
    """(ohlen, nlen): the most output rows (then images) whose patch and accumulators fit a bank."""
    IB, OB = cfg.ibuf_bytes // 2, cfg.obuf_bytes // 2
    for oh in range(min(cap, L.OH), 0, -1):
        if jc * _rows_needed(L, oh) * L.Wp <= IB and oh * L.OW * ob * 4 <= OB:
            nlen = 1
            if oh == L.OH:
                nlen = max(1, min(L.N, IB // (jc * _rows_needed(L, L.OH) * L.Wp), OB // (L.OH * L.OW * ob * 4)))
            return oh, nlen
    return 0, 0


def _dw_tiles(L: NPULayer, cfg: NPUConfig) -> List[Tiling]:
    WB = cfg.wbuf_bytes // 2
    KK = L.KH * L.KW
    out = []
    for jc in sorted({min(L.C, cfg.cols * m) for m in (1, 2, 4, 8, 16, 1024)}, reverse=True):
        if jc * KK > WB:
            continue
        oh, nlen = _fit_rows(L, cfg, L.Wp, jc, jc, L.OH)
        if oh:
            out.append(Tiling(jc=jc, ob=jc, ohlen=oh, nlen=nlen))
            oh2, _ = _fit_rows(L, cfg, L.Wp, jc, jc, max(1, oh // 2))
            if oh2 and oh2 < oh:
                out.append(Tiling(jc=jc, ob=jc, ohlen=oh2, nlen=1))
    return out


def candidate_tilings(L: NPULayer, cfg: NPUConfig) -> List[Tiling]:
    """The mapping space of one layer (small, so the compiler tries all of it per ratio level):
    the largest tiles that fit one SRAM bank each (half of each SRAM: the other half is the double
    buffer), narrower output blocks, shorter m-blocks, and both loop orders. Empty when not even
    one output row of one channel fits."""
    if L.depthwise:
        return _dw_tiles(L, cfg)
    IB, WB, OB = cfg.ibuf_bytes // 2, cfg.wbuf_bytes // 2, cfg.obuf_bytes // 2
    KK = L.KH * L.KW
    rows1 = _rows_needed(L, 1)
    min_ob = min(L.opg, cfg.cols)
    jc = min(L.Cg, WB // (min_ob * KK), IB // (rows1 * L.Wp))
    if jc < 1:
        min_ob = 1
        jc = min(L.Cg, WB // KK, IB // (rows1 * L.Wp))
        if jc < 1:
            return []
    obs = []
    ob = min(L.opg, WB // (jc * KK))
    if ob > cfg.cols:
        ob = ob // cfg.cols * cfg.cols
    ob = max(ob, 1)
    if L.OW * ob * 4 > OB:                     # one output row must fit the accumulator bank
        ob = max(1, OB // (L.OW * 4))
        if ob > cfg.cols:
            ob = ob // cfg.cols * cfg.cols
        if L.OW * ob * 4 > OB:
            return []
    obs.append(ob)
    for o2 in (ob // 2 // cfg.cols * cfg.cols, cfg.cols):
        if 0 < o2 < ob and o2 not in obs:
            obs.append(o2)
    out = []
    for ob in obs:
        oh, nlen = _fit_rows(L, cfg, L.Wp, jc, ob, L.OH)
        if not oh:
            continue
        shapes = [(oh, nlen)]
        oh2, _ = _fit_rows(L, cfg, L.Wp, jc, ob, max(1, oh // 2))
        if oh2 and oh2 < oh:
            shapes.append((oh2, 1))
        for ohl, nl in shapes:
            multi = (len(range(0, L.opg, ob)) > 1) and (L.N > nl or L.OH > ohl)
            for order in (("mo", "om") if multi else ("mo",)):
                out.append(Tiling(jc=jc, ob=ob, ohlen=ohl, nlen=nl, order=order))
    return out


def plan_tiles(L: NPULayer, cfg: NPUConfig) -> Optional[Tiling]:
    """The default (largest) tiling, or None when the layer cannot be tiled to the SRAMs."""
    c = candidate_tilings(L, cfg)
    return c[0] if c else None


def _steps(L: NPULayer, t: Tiling):
    """(loads, gemm, block_end, obank) per step of one mapping; banks alternate per load."""
    steps = []
    xb = wb = obk = 1
    mblocks = []
    for n0 in range(0, L.N, t.nlen):
        for oh0 in range(0, L.OH, t.ohlen):
            mblocks.append((n0, min(t.nlen, L.N - n0), oh0, min(t.ohlen, L.OH - oh0)))
    if L.depthwise:
        for c0 in range(0, L.C, t.jc):
            cl = min(t.jc, L.C - c0)
            w_loaded = False
            for (n0, nl, oh0, ohl) in mblocks:
                obk ^= 1
                loads = []
                if not w_loaded:
                    wb ^= 1
                    loads.append(("LDW", wb, -1, c0, cl, 0, 1))
                    w_loaded = True
                xb ^= 1
                loads.append(("LDX", xb, -1, n0, nl, oh0, ohl, c0, cl))
                steps.append((loads, ("DWGEMM", xb, wb, obk, 0), True, obk))
        return steps
    chunks = t.chunks(L.Cg)
    oblocks = [(o, min(t.ob, L.opg - o)) for o in range(0, L.opg, t.ob)]
    single = len(chunks) == 1
    for gi in range(L.groups):
        if t.order == "mo":
            pairs = [(mb, ob) for mb in mblocks for ob in oblocks]
        else:
            pairs = [(mb, ob) for ob in oblocks for mb in mblocks]
        cur_x = cur_w = None
        for (mb, obl) in pairs:
            (n0, nl, oh0, ohl), (o0, ol) = mb, obl
            obk ^= 1
            for ci, (j0, jl) in enumerate(chunks):
                loads = []
                if not (single and cur_w == (o0, ol)):
                    wb ^= 1
                    loads.append(("LDW", wb, gi, o0, ol, j0, jl))
                    cur_w = (o0, ol)
                if not (single and cur_x == mb):
                    xb ^= 1
                    loads.append(("LDX", xb, gi, n0, nl, oh0, ohl, j0, jl))
                    cur_x = mb
                steps.append((loads, ("GEMM", xb, wb, obk, 1 if ci else 0), ci == len(chunks) - 1, obk))
    return steps


def emit_variant(L: NPULayer, li: int, t: Tiling, pref_next: Optional[int]) -> List[List[int]]:
    """Instruction stream of one mapping of one layer (li: slot in the program's layer table).
    Starts with its first weight load (flag word 11 = 1, so that the previous layer's PREF can take
    it over) unless the layer quantizes a host input first; ends with SYNC (patched: next pc)."""
    code: List[List[int]] = []

    def ins(op, *f, flag=0):
        row = [OP[op], li] + [int(v) for v in f]
        row = row + [0] * (IW - len(row))
        row[11] = flag
        code.append(row)

    if L.in_param >= 0:
        ins("QUANT", L.in_param)
    steps = _steps(L, t)
    first = True
    for ld in steps[0][0]:
        ins(*ld, flag=int(first and ld[0] == "LDW" and L.in_param < 0))
        first = False
    for s, (loads, gemm, end, ob) in enumerate(steps):
        if s + 1 < len(steps):
            for ld in steps[s + 1][0]:
                ins(*ld)
        ins(*gemm)
        if s + 1 == len(steps) and pref_next is not None:
            # after the last GEMM: the other weight bank is free (functionally and in time)
            ins("PREF", pref_next, 0)          # word 3 (the next layer's LDREG pc) is patched later
        if end:
            ins("VEC", ob)
            ins("ST", ob)
    ins("SYNC", 0, int(bool(L.spill)))
    return code


# --------------------------------------------------------------------------- mapping choice
def _group_runs(L: NPULayer, gi: int) -> np.ndarray:
    ranks = L.rank[gi * L.Cg:(gi + 1) * L.Cg] if not L.depthwise else L.rank
    return np.sort(ranks, kind="stable")


def estimate_cycles(L: NPULayer, cfg: NPUConfig, code: List[List[int]], k4: int) -> int:
    """The simulator's scoreboard (runtime.c) replayed in Python for one layer alone, input ready at
    0 and no prefetch: the compiler's cost model for choosing a mapping per ratio level. It uses the
    same cycle formulas; tests check it against the simulator."""
    KK = L.KH * L.KW
    R, Cc = cfg.rows, cfg.cols
    dma = arr = vec = 0
    xr = [0, 0]; xf = [0, 0]; wr = [0, 0]; wf = [0, 0]; orr = [0, 0]; of = [0, 0]
    xm = [None, None]; wm = [None, None]
    end = 0
    sorted_ranks = {}
    for row in code:
        op = row[0]
        if op == OP["QUANT"]:
            n = L.in_bytes
            d = cfg.dma_setup_cycles + -(-n * (4 if L.in_onchip else 5) // cfg.dma_bytes_per_cycle)
            v = -(-n // cfg.vector_lanes) * (2 if L.dynamic else 1)
            s = max(dma, vec)
            dma = vec = s + max(d, v)
            end = max(end, dma)
        elif op == OP["LDX"]:
            b, gi, n0, nl, oh0, ohl, j0, jl = row[2:10]
            rows = _rows_needed(L, ohl)
            by = nl * jl * rows * L.Wp
            d = (2 + -(-by // cfg.sram_bytes_per_cycle)) if L.in_onchip else \
                (cfg.dma_setup_cycles + -(-by // cfg.dma_bytes_per_cycle))
            s = max(dma, xf[b])
            dma = xr[b] = s + d
            xm[b] = (gi, nl, ohl, j0, jl)
            end = max(end, dma)
        elif op == OP["LDW"]:
            b, gi, o0, ol, j0, jl = row[2:8]
            if L.resident:                     # weights resident in the WBUF: no DMA
                wr[b] = 0
                wm[b] = (gi, o0, ol, j0, jl)
                continue
            by = ol * jl * KK
            s = max(dma, wf[b])
            dma = wr[b] = s + cfg.dma_setup_cycles + -(-by // cfg.dma_bytes_per_cycle)
            wm[b] = (gi, o0, ol, j0, jl)
            end = max(end, dma)
        elif op in (OP["GEMM"], OP["DWGEMM"]):
            xb, wb, ob, acc = row[2:6]
            gi, nl, ohl, j0, jl = xm[xb]
            mrows = nl * ohl * L.OW
            if gi not in sorted_ranks:
                sorted_ranks[gi] = _group_runs(L, max(gi, 0))
            rk = sorted_ranks[gi][j0:j0 + jl]
            if op == OP["DWGEMM"]:
                mp = -(-mrows // R)
                kc = 0
                for c0 in range(0, jl, Cc):
                    low = bool(np.all(rk[c0:c0 + Cc] < k4))
                    kc += mp * max((KK + 1) // 2 if low else KK, cfg.drain_cycles)
            else:
                ol = wm[wb][2]
                kcyc = 0
                if len(rk):
                    brk = np.flatnonzero(np.diff(rk)) + 1
                    starts = np.concatenate([[0], brk]); ends = np.concatenate([brk, [len(rk)]])
                    for a, e in zip(starts, ends):
                        ln = (e - a) * KK
                        kcyc += (ln + 1) // 2 if rk[a] < k4 else ln
                kc = -(-mrows // R) * -(-ol // Cc) * max(kcyc, cfg.drain_cycles)
            s = max(arr, xr[xb], wr[wb], orr[ob] if acc else of[ob])
            dur = (cfg.fill_cycles if s > arr else 0) + kc
            arr = s + dur
            xf[xb] = max(xf[xb], arr); wf[wb] = max(wf[wb], arr)
            orr[ob] = arr; of[ob] = max(of[ob], arr)
            end = max(end, arr)
            last_m = mrows * (jl if op == OP["DWGEMM"] else wm[wb][2])
        elif op == OP["VEC"]:
            b = row[2]
            v = -(-last_m // cfg.vector_lanes) * (max(1, len(L.req) + len(L.fadd)) + L.req_dyn)
            s = max(vec, orr[b])
            vec = orr[b] = s + v
            of[b] = max(of[b], vec)
            end = max(end, vec)
        elif op == OP["ST"]:
            b = row[2]
            by = last_m * ((4 if L.out_index >= 0 else 0) + L.req_off + 4 * L.fadd_off)
            s = max(dma, orr[b])
            d = (cfg.dma_setup_cycles + -(-by // cfg.dma_bytes_per_cycle)) if by else 0
            if by:
                dma = s + d
            of[b] = max(of[b], s + d)
            end = max(end, s + d)
    return end


# --------------------------------------------------------------------------- C source
class _Blob:
    def __init__(self):
        self.parts: List[bytes] = []
        self.size = 0

    def add(self, arr: np.ndarray) -> int:
        pad = (-self.size) % 16
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        off = self.size
        b = np.ascontiguousarray(arr).tobytes()
        self.parts.append(b)
        self.size += len(b)
        return off

    def c_literal(self) -> str:
        data = b"".join(self.parts) or b"\0"
        lines = []
        for i in range(0, len(data), 96):
            lines.append('"' + "".join(f"\\x{c:02x}" for c in data[i:i + 96]) + '"')
        return "\n".join(lines), len(data)


def _layer_c(L: NPULayer, blob: _Blob, sel: np.ndarray) -> str:
    if L.depthwise:
        # depthwise: all C channels sorted into lowering order; weights [C][KH][KW] in that order
        order = np.lexsort((np.arange(L.C), L.rank))
        chan, rankj = order.astype(np.int32), L.rank[order].astype(np.int32)
        wn = np.ascontiguousarray(L.weight.reshape(L.C, L.KH, L.KW)[order])
    else:
        # weights with each conv group's input channels sorted into lowering order (rank, channel)
        Cg, g, opg = L.Cg, L.groups, L.opg
        chan = np.zeros((g, Cg), np.int32)
        rankj = np.zeros((g, Cg), np.int32)
        wn = np.zeros((g, opg, Cg, L.KH, L.KW), np.int8)
        for gi in range(g):
            ranks = L.rank[gi * Cg:(gi + 1) * Cg]
            order = np.lexsort((np.arange(Cg), ranks))
            chan[gi], rankj[gi] = order, ranks[order]
            wn[gi] = L.weight[gi * opg:(gi + 1) * opg][:, order]
    ex = np.zeros(L.n_groups, np.int32)
    ex[L.rank] = L.act_shift_c
    table = L.bias_table
    offs = dict(w_off=blob.add(wn), chan_off=blob.add(chan), rank_off=blob.add(rankj), ex_off=blob.add(ex),
                ew_off=blob.add(np.ascontiguousarray(L.weight_shift, np.int32)),
                scale_off=blob.add(L.scale.astype(np.float32)),
                bias_off=blob.add(np.ascontiguousarray(table, np.float32)),
                sel_off=blob.add(np.asarray(sel, np.int32)))
    req = list(L.req) + [0] * (MAX_REQ - len(L.req))

    def f32(v):
        if np.isinf(v):
            return "INFINITY" if v > 0 else "-INFINITY"
        return f"npu_f32(0x{int(np.float32(v).view(np.uint32)):08x}u)"

    vals = [L.layer, L.N, L.C, L.H, L.W, L.O, L.OH, L.OW, L.KH, L.KW, L.SH, L.SW, L.DH, L.DW, L.PT, L.PL,
            L.Hp, L.Wp, L.groups, L.Cg, L.opg, int(L.unsigned), int(L.relu), L.n_groups]
    return ("{" + ", ".join(map(str, vals)) + f", {f32(L.act_scale)}, {f32(L.act_lo)}, {f32(L.act_hi)}, "
            + ", ".join(f"{offs[k]}" for k in ("w_off", "chan_off", "rank_off", "ex_off", "ew_off",
                                                 "scale_off", "bias_off", "sel_off"))
            + f", {table.shape[0]}, {int(L.depthwise)}, {int(L.dynamic)}, {L.samples}"
            + f", {L.in_param}, {L.out_index}, {int(L.in_onchip)}, {len(L.req)}, {{{', '.join(map(str, req))}}}"
            + f", {len(L.fadd)}, {{{', '.join(map(str, list(L.fadd) + [0] * (MAX_REQ - len(L.fadd))))}}}}}")


@dataclass
class Program:
    symbol: str
    layers: List[NPULayer]
    tilings: List[List[Tiling]]      # per layer: its mapping variants
    sel: List[np.ndarray]            # per layer: variant per value of K4 (0..n_groups)
    code: np.ndarray
    n_params: int
    n_outputs: int
    counts_param: int
    bias_param: int = -1
    adds: List[NPUAdd] = field(default_factory=list)
    resident: bool = False           # weights (and operator constants) stay in SRAM between calls

    def weight_load_cycles(self, cfg: NPUConfig) -> int:
        """DMA cycles of loading every weight tile and operator constant once (program load)."""
        sizes = [int(L.weight.size) for L in self.layers]
        for A in self.adds:
            sizes += [4 * c.size for c in A.consts if c is not None]
            if A.params is not None:
                sizes.append(4 * A.params.size)
        return sum(cfg.dma_setup_cycles + -(-b // cfg.dma_bytes_per_cycle) for b in sizes if b)


CHAINABLE = {VEC_KINDS[k] for k in ("copy", "add", "mul", "adds", "muls", "divs", "erf")}


def mark_chains(nodes, adds) -> None:
    """Vector chaining (docs/npu.md section 4.3): an elementwise operator whose operand is the
    result of the operator just before it in the program, when that result has no other use (no
    INT8 copy, no host output, one float consumer), takes its input from the pipeline instead of
    the ABUF and runs as another stage of the same pass."""
    for i in range(1, len(nodes)):
        x, p = nodes[i], nodes[i - 1]
        if not (isinstance(x, NPUAdd) and x.kind in CHAINABLE and isinstance(p, NPUAdd) and p.kind > 0):
            continue
        ai = adds.index(x)
        if p.req or p.out_index >= 0 or len(p.fadd) != 1 or p.fadd[0] // 2 != ai:
            continue
        x.chain = True
        x.chain_slot = p.fadd[0] % 2


def allocate_abuf(nodes, cfg: NPUConfig) -> None:
    """Which inputs stay in the activation SRAM (ABUF): INT8 layer inputs and float residual-add
    operands. Each copy is live from its producer's position to its consumer's; a copy is placed
    when it fits beside every copy live over that span (first come, first placed, in program order;
    bytes are counted, fragmentation is not modelled); the rest go through DRAM. The operand a
    chained operator streams from the operator before it (`mark_chains`, run first) is in neither:
    it passes from one pipeline stage to the next, so it takes no ABUF space and no DRAM traffic."""
    n = len(nodes)
    used = np.zeros(max(n, 1), np.int64)
    pos = {id(x): i for i, x in enumerate(nodes)}
    layers = [x for x in nodes if isinstance(x, NPULayer)]
    adds = [x for x in nodes if isinstance(x, NPUAdd)]
    producer = {}
    for x in nodes:
        for c in x.req:
            producer[("L", c)] = pos[id(x)]
        for f in x.fadd:
            producer[("A", f)] = pos[id(x)]
    for i, x in enumerate(nodes):
        if isinstance(x, NPULayer):
            li = layers.index(x)
            p = producer.get(("L", li), i)          # host inputs: quantized into the ABUF at the layer
            size = x.in_bytes
            x.in_onchip = bool(used[p:i + 1].max() + size <= cfg.abuf_bytes)
            if x.in_onchip:
                used[p:i + 1] += size
        else:
            ai = adds.index(x)
            for k in range(2):
                if not x.uses_slot(k):
                    continue
                if x.in_param[k] >= 0:
                    x.onchip[k] = False                 # read from the host tensor in DRAM
                    continue
                if x.chain and k == x.chain_slot:
                    x.onchip[k] = True                  # streamed from the previous stage
                    continue
                p = producer.get(("A", 2 * ai + k), i)
                size = 4 * x.operand_elems(k)
                x.onchip[k] = bool(used[p:i + 1].max() + size <= cfg.abuf_bytes)
                if x.onchip[k]:
                    used[p:i + 1] += size
    for x in nodes:
        x.req_off = sum(1 for c in x.req if not layers[c].in_onchip)
        x.fadd_off = sum(1 for f in x.fadd if not adds[f // 2].onchip[f % 2])
        if isinstance(x, NPULayer):
            x.req_dyn = sum(1 for c in x.req if layers[c].dynamic)


def _spill(L: NPULayer, t: Tiling, cfg: NPUConfig) -> str:
    """Why a layer does not run from SRAM alone (empty when it does): its weights (per conv group)
    exceed a WBUF bank, so they stream in tiles, or its NPU-produced input did not fit the ABUF."""
    why = []
    wbytes = (L.C if L.depthwise else L.opg * L.Cg) * L.KH * L.KW
    if wbytes > cfg.wbuf_bytes // 2:
        why.append(f"weights {wbytes} B > WBUF bank {cfg.wbuf_bytes // 2} B")
    if not L.in_onchip:
        why.append(f"input {L.in_bytes} B in DRAM (ABUF full)")
    return "; ".join(why)


def choose_mappings(L: NPULayer, li: int, cfg: NPUConfig, levels_k: List[int], records=None,
                    level_ratios=None, untuned=None):
    """Per ratio level: the mapping with the fewest estimated cycles (every candidate is tried: the
    space is small), or the tuned mapping of that level when `records` (tuning records, see
    records.py and tune.py) hold one for this layer's geometry, level and configuration. Returns
    (variants, sel) with sel[k] the variant used when K4 = k: a level's own choice, else that of
    the nearest level. Levels without a usable record are appended to `untuned` as (name, level, why)."""
    from .records import lookup

    cands = candidate_tilings(L, cfg)
    if not cands:
        raise ValueError(f"layer {L.layer} ({L.name}) does not fit the NPU's SRAMs ({cfg})")
    ks = sorted({int(min(max(k, 0), L.n_groups)) for k in levels_k} | {0, L.n_groups})
    tuned, tuned_cyc = {}, {}
    if records is not None and level_ratios is not None:
        for r, k in zip(level_ratios, levels_k):
            k = int(min(max(k, 0), L.n_groups))
            t, why, cyc = lookup(records, L, cfg, r, k)
            if t is None:
                if untuned is not None:
                    untuned.append((L.name, float(r), why))
            elif k not in tuned or cyc < tuned_cyc[k]:      # levels that share a count: the faster record
                tuned[k], tuned_cyc[k] = t, cyc
    n_default = len(cands)                     # counts without a record keep the cost model's space
    for t in tuned.values():
        if t not in cands:
            cands.append(t)
    codes = {}
    best = {}
    for k in ks:
        if k in tuned:
            best[k] = cands.index(tuned[k])
            continue
        cyc = []
        for i in range(n_default):
            if i not in codes:
                codes[i] = emit_variant(L, li, cands[i], None)
            cyc.append(estimate_cycles(L, cfg, codes[i], k))
        best[k] = int(np.argmin(cyc))
    used = []
    for k in ks:
        if best[k] not in used:
            used.append(best[k])
    used = used[:MAX_VARIANTS]
    variants = [cands[i] for i in used]
    sel = np.zeros(L.n_groups + 1, np.int32)
    for k in range(L.n_groups + 1):
        near = min(ks, key=lambda kk: (abs(kk - k), kk))
        i = best[near]
        sel[k] = used.index(i) if i in used else 0
    return variants, sel


def _composite_kind(comp: relax.Function) -> str:
    name = str(comp.attrs["Composite"]) if comp.attrs is not None and "Composite" in comp.attrs else ""
    if ".vec_" in name:
        return "vec"
    if name.endswith(".pool") or name.endswith(".pool_flat"):
        return "pool"
    return "add" if name.endswith(".add") or name.endswith(".add_relu") else "layer"


def _add_activation(comp: relax.Function, A: "NPUAdd") -> None:
    """Reads the fused activation of an add composite (relu, clip, maximum / minimum by constants)."""
    from .partition import act_bounds

    for block in comp.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in (
                    "relax.nn.relu", "relax.clip", "relax.maximum", "relax.minimum"):
                lo, hi = act_bounds(v)
                A.act = True
                if v.op.name in ("relax.nn.relu", "relax.clip", "relax.maximum"):
                    A.act_lo = lo
                if v.op.name in ("relax.clip", "relax.minimum"):
                    A.act_hi = hi


def _vec_node(comp: relax.Function, outer_args, alias) -> Tuple["NPUAdd", list]:
    """A token-tensor operator (vecops.py) from its composite: the NPUAdd and its tensor inputs as
    (operand slot, expr of the external function)."""
    from .vecops import vec_spec

    pmap = dict(zip(comp.params, outer_args))
    call = None
    for block in comp.body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op):
                call = b.value

    def res(e):
        if isinstance(e, relax.Var) and e in pmap:
            return pmap[e]
        if isinstance(e, relax.Tuple):
            return relax.Tuple([res(f) for f in e.fields])
        return e

    spec = vec_spec(call, [res(a) for a in call.args], _shape(call.ty))
    A = NPUAdd(n=int(spec["n"]), shape=_shape(call.ty), kind=VEC_KINDS[spec["kind"]], n_op=list(spec["n_op"]),
               consts=list(spec.get("consts", [None, None])), params=spec.get("params"),
               s=float(spec.get("s", 0.0)), d=[int(v) for v in spec.get("d", [])],
               g=[int(v) for v in spec.get("g", [])], g0=int(spec.get("g0", 0)), op_name=call.op.name,
               onchip=[True, True])
    return A, [(k, alias.get(e, e)) for k, e in spec["inputs"]]


def lower_function(sym: str, func: relax.Function, prims, cfg: NPUConfig, levels=None, records=None,
                   level_ratios=None, untuned=None) -> Program:
    params = list(func.params)
    pidx = {p: i for i, p in enumerate(params)}
    local_funcs = {}
    nodes = []              # layers and adds in program order
    layers: List[NPULayer] = []
    adds: List[NPUAdd] = []
    var_node = {}           # bound var -> ("L", i) | ("A", i)
    alias = {}
    node_inputs = []        # per node: its input exprs
    counts_param = -1
    bias_param = -1
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Function):
                local_funcs[b.var] = v
                continue
            if isinstance(v, relax.Call) and isinstance(v.op, relax.Var) and v.op in local_funcs:
                comp = local_funcs[v.op]
                if _composite_kind(comp) == "vec":
                    A, ins = _vec_node(comp, v.args, alias)
                    var_node[b.var] = ("A", len(adds))
                    adds.append(A)
                    nodes.append(A)
                    node_inputs.append(ins)
                    continue
                if _composite_kind(comp) == "pool":
                    N, C, H, W = (int(d) for d in v.args[0].ty.shape.values)
                    A = NPUAdd(n=N * C, shape=(N, C), pool=H * W, onchip=[True, True])
                    var_node[b.var] = ("A", len(adds))
                    adds.append(A)
                    nodes.append(A)
                    node_inputs.append([(0, alias.get(v.args[0], v.args[0]))])
                    continue
                if _composite_kind(comp) == "add":
                    shape = tuple(int(d) for d in v.args[0].ty.shape.values)
                    A = NPUAdd(n=int(np.prod(shape)), shape=shape)
                    _add_activation(comp, A)
                    var_node[b.var] = ("A", len(adds))
                    adds.append(A)
                    nodes.append(A)
                    node_inputs.append([(k, alias.get(e, e)) for k, e in enumerate(v.args)])
                    continue
                arg_of_param = dict(zip(comp.params, v.args))
                L, x_expr, c_expr, b_expr = extract_layer(comp, arg_of_param, prims)
                x_expr = alias.get(x_expr, x_expr)
                if not (isinstance(c_expr, relax.Var) and c_expr in pidx):
                    raise ValueError(f"{sym}: counts is not an argument of the external function")
                counts_param = pidx[c_expr]
                if b_expr is not None:
                    if not (isinstance(b_expr, relax.Var) and b_expr in pidx):
                        raise ValueError(f"{sym}: layer {L.layer}: bias_row is not an argument of the external function")
                    if bias_param not in (-1, pidx[b_expr]):
                        raise ValueError(f"{sym}: two different bias-row arguments")
                    bias_param = pidx[b_expr]
                var_node[b.var] = ("L", len(layers))
                L.name = f"layer{L.layer}"
                layers.append(L)
                nodes.append(L)
                node_inputs.append([(0, x_expr)])
                continue
            if isinstance(v, relax.Var):
                alias[b.var] = alias.get(v, v)
                continue
            raise ValueError(f"{sym}: unexpected binding {type(v).__name__} in an NPU function")
    if not nodes:
        raise ValueError(f"{sym}: no FlexiQ layer or residual add inside")

    def node(kind_idx):
        k, i = kind_idx
        return layers[i] if k == "L" else adds[i]

    for x, ins in zip(nodes, node_inputs):
        for k, e in ins:
            what = f"layer {x.layer}" if isinstance(x, NPULayer) else \
                ("a global pool" if x.pool else (x.op_name or "a residual add"))
            if e in pidx:
                if isinstance(x, NPULayer):
                    x.in_param = pidx[e]
                else:
                    x.in_param[k] = pidx[e]
            elif e in var_node:
                src = node(var_node[e])
                if isinstance(x, NPULayer):
                    src.req.append(layers.index(x))
                else:
                    src.fadd.append(2 * adds.index(x) + k)
            else:
                raise ValueError(f"{sym}: {what} reads a value the NPU does not produce")
    out = func.body.body
    outs = list(out.fields) if isinstance(out, relax.Tuple) else [out]
    for k, o in enumerate(outs):
        o = alias.get(o, o)
        if o not in var_node:
            raise ValueError(f"{sym}: output {k} is not a layer or add result")
        x = node(var_node[o])
        if x.out_index >= 0:
            raise ValueError(f"{sym}: one result returned twice")
        x.out_index = k
    for x in nodes:
        if len(x.req) > MAX_REQ or len(x.fadd) > MAX_REQ:
            raise ValueError(f"{sym}: a layer or add feeds more than {MAX_REQ} NPU consumers")
    mark_chains(nodes, adds)
    allocate_abuf(nodes, cfg)
    resident = bool(cfg.resident_weights) and sum(int(L.weight.size) for L in layers) <= cfg.wbuf_bytes
    for L in layers:
        L.resident = resident
    code: List[List[int]] = []
    all_variants, sels = [], []
    block_end = {}           # layer slot -> pc after its block
    ldreg_pc = {}
    pref_rows, sync_rows = [], []
    for ni, x in enumerate(nodes):
        if isinstance(x, NPUAdd):
            code.append([OP["ADD"], adds.index(x)] + [0] * (IW - 2))
            continue
        L, li = x, layers.index(x)
        lk = [] if levels is None else [int(c[L.layer]) for c in levels if L.layer < len(c)]
        lr = level_ratios if lk and level_ratios is not None and len(level_ratios) == len(lk) else None
        if not lk:
            lk = [0, L.n_groups // 2, L.n_groups]
        variants, sel = choose_mappings(L, li, cfg, lk, records, lr, untuned)
        L.spill = _spill(L, variants[0], cfg)
        all_variants.append(variants)
        sels.append(sel)
        nxt_layer = next((y for y in nodes[ni + 1:] if isinstance(y, NPULayer)), None)
        nxt = layers.index(nxt_layer) if nxt_layer is not None and nxt_layer.in_param < 0 else None
        ldreg_pc[li] = len(code)
        head = [OP["LDREG"], li, len(variants)] + [0] * (IW - 3)
        code.append(head)
        starts = []
        for t in variants:
            starts.append(len(code))
            for row in emit_variant(L, li, t, nxt):
                if row[0] == OP["PREF"]:
                    pref_rows.append((len(code), nxt))
                if row[0] == OP["SYNC"]:
                    sync_rows.append((len(code), li))
                code.append(row)
        for v, pcv in enumerate(starts):
            head[3 + v] = pcv
        block_end[li] = len(code)
    for pc, tgt in pref_rows:
        code[pc][3] = ldreg_pc[tgt]
    for pc, li in sync_rows:
        code[pc][2] = block_end[li]
    return Program(sym, layers, all_variants, sels, np.asarray(code, np.int32).reshape(-1, IW), len(params),
                   len(outs), counts_param, bias_param, adds, resident)


def _add_c(A: NPUAdd, blob: "_Blob") -> str:
    req = list(A.req) + [0] * (MAX_REQ - len(A.req))
    fadd = list(A.fadd) + [0] * (MAX_REQ - len(A.fadd))
    def f32(v):
        if np.isinf(v):
            return "INFINITY" if v > 0 else "-INFINITY"
        return f"npu_f32(0x{int(np.float32(v).view(np.uint32)):08x}u)"

    return (f"{{{A.n}, {int(A.act)}, {f32(A.act_lo)}, {f32(A.act_hi)}, "
            f"{{{A.in_param[0]}, {A.in_param[1]}}}, {{{int(A.onchip[0])}, {int(A.onchip[1])}}}, "
            f"{A.out_index}, {len(A.req)}, {{{', '.join(map(str, req))}}}, {len(A.fadd)}, "
            f"{{{', '.join(map(str, fadd))}}}, {int(A.pool)}, " + _vec_c(A, blob, f32) + "}")


def _vec_c(A: NPUAdd, blob: "_Blob", f32) -> str:
    """The token-tensor operator fields of npu_add_t (kind, operand sizes, constants, sizes)."""
    c_off = [blob.add(c.astype(np.float32)) if c is not None else -1 for c in A.consts]
    p_off = blob.add(A.params.astype(np.float32)) if A.params is not None else -1
    n_op = [A.operand_elems(0), A.operand_elems(1)]
    d = list(A.d) + [0] * (8 - len(A.d))
    g = list(A.g) + [0] * (8 - len(A.g))
    return (f"{A.kind}, {{{n_op[0]}, {n_op[1]}}}, {{{c_off[0]}, {c_off[1]}}}, {p_off}, {f32(A.s)}, {len(A.g)}, "
            f"{{{', '.join(map(str, d))}}}, {{{', '.join(map(str, g))}}}, {A.g0}, {int(A.chain)}")


def host_has_fma() -> bool:
    """Whether the host llvm target contracts `llvm.fmuladd` into one FMA (the token operators
    must round as the host kernels do; docs/npu.md section 4.3)."""
    try:
        from tvm.target import codegen as cg

        from ..llvm import host_target

        triple = str(cg.llvm_get_system_triple())
        if triple.startswith(("aarch64", "arm64")):
            return True                      # FMA is part of the AArch64 base ISA
        return bool(cg.target_has_features("fma", host_target()))
    except Exception:                        # no LLVM query available: assume a current x86-64 / ARM host
        return True


def generate_c(programs: List[Program], cfg: NPUConfig, num_layers: int) -> str:
    with open(_RUNTIME_C) as fh:
        src = [f"#define NPU_HOST_FMA {int(host_has_fma())}\n", fh.read()]
    blob = _Blob()
    bodies = []
    for k, P in enumerate(programs):
        lt = ",\n  ".join(_layer_c(L, blob, sel) for L, sel in zip(P.layers, P.sel)) or "{0}"
        at = ",\n  ".join(_add_c(A, blob) for A in P.adds) or "{0}"
        words = ",".join(map(str, P.code.reshape(-1).tolist()))
        bodies.append(f"static const npu_layer_t npu_layers_{k}[] = {{\n  {lt}\n}};\n"
                      f"static const npu_add_t npu_adds_{k}[] = {{\n  {at}\n}};\n"
                      f"static const int32_t npu_code_{k}[] = {{{words}}};\n"
                      f"static int32_t npu_loaded_{k} = 0;\n"
                      f"static const npu_program_t npu_prog_{k} = {{npu_layers_{k}, {len(P.layers)}, npu_code_{k}, "
                      f"{P.code.shape[0]}, {P.n_params}, {P.n_outputs}, {P.counts_param}, {P.bias_param}, npu_adds_{k}, "
                      f"{len(P.adds)}, {int(P.resident)}, {P.weight_load_cycles(cfg)}, &npu_loaded_{k}}};\n")
    lit, size = blob.c_literal()
    src.append("static float npu_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }\n")
    src.append(f"static const unsigned char npu_blob[{size + 1}] __attribute__((aligned(64))) =\n{lit};\n")
    src.append(f"static const npu_config_t npu_cfg = {{{cfg.rows}, {cfg.cols}, {cfg.ibuf_bytes}, {cfg.wbuf_bytes}, "
               f"{cfg.obuf_bytes}, {cfg.abuf_bytes}, {cfg.dma_bytes_per_cycle}, {cfg.dma_setup_cycles}, "
               f"{cfg.sram_bytes_per_cycle}, {cfg.vector_lanes}, {cfg.fill_cycles}, {cfg.drain_cycles}, "
               f"{float(cfg.clock_mhz)!r}}};\n")
    src.append(f"#define NPU_NUM_LAYERS {num_layers}\n"
               f"static double npu_stats[(NPU_NUM_LAYERS + 1) * NPU_STATS_COLS];\n")
    src.extend(bodies)
    for k, P in enumerate(programs):
        src.append(f"TVM_FFI_DLL_EXPORT int __tvm_ffi_{P.symbol}(void* self, const TVMFFIAny* args, int32_t num_args, "
                   f"TVMFFIAny* result) {{\n  npu_ret_none(result);\n"
                   f"  return npu_run(&npu_prog_{k}, npu_blob, &npu_cfg, npu_stats, NPU_NUM_LAYERS, args, num_args);\n}}\n")
    # stats: DPS, out float64[(L + 1), STATS_COLS]; row 0 is the configuration header
    src.append(f"""TVM_FFI_DLL_EXPORT int __tvm_ffi_{STATS_FUNC}(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result) {{
  npu_ret_none(result);
  if (num_args != 1) return npu_fail("{STATS_FUNC}: expects one output tensor");
  DLTensor* t = npu_arg_tensor(&args[0]);
  if (!t || t->ndim != 2 || t->shape[0] != NPU_NUM_LAYERS + 1 || t->shape[1] != NPU_STATS_COLS)
    return npu_fail("{STATS_FUNC}: output must be float64[num_layers + 1, {STATS_COLS}]");
  double* d = (double*)((char*)t->data + t->byte_offset);
  memcpy(d, npu_stats, sizeof npu_stats);
  d[0] = npu_cfg.rows; d[1] = npu_cfg.cols; d[2] = npu_cfg.ibuf; d[3] = npu_cfg.wbuf; d[4] = npu_cfg.obuf;
  d[5] = npu_cfg.dma_bw; d[6] = npu_cfg.dma_setup; d[7] = npu_cfg.lanes; d[8] = npu_cfg.clock_mhz;
  d[9] = NPU_NUM_LAYERS; d[10] = {len(programs)}; d[11] = 2; d[12] = npu_cfg.abuf; d[13] = npu_cfg.sram_bw;
  return 0;
}}
#ifdef __cplusplus
}}
#endif
""")
    return "".join(src)


@tvm.register_global_func("relax.ext." + CODEGEN, override=True)
def flexiq_npu_codegen(functions, options, constant_names):
    """RunCodegen entry: all external functions -> one C source module."""
    if not _CTX:
        raise RuntimeError("relax.ext.flexiq_npu runs inside NPUTarget.build (no build context)")
    prims, cfg, num_layers = _CTX["prims"], _CTX["config"], int(_CTX["num_layers"])
    programs = []
    for f in functions:
        sym = str(f.attrs["global_symbol"])
        programs.append(lower_function(sym, f, prims, cfg, _CTX.get("levels"), _CTX.get("records"),
                                       _CTX.get("level_ratios"), _CTX.get("untuned")))
    if sum(int(L.weight.size) for P in programs for L in P.layers) > cfg.wbuf_bytes:
        for P in programs:                   # together they do not fit the WBUF: per-inference loads
            P.resident = False
            for L in P.layers:
                L.resident = False
    _CTX["programs"] = {P.symbol: P for P in programs}
    code = generate_c(programs, cfg, num_layers)
    _CTX["c_source"] = code
    symbols = [P.symbol for P in programs] + [STATS_FUNC]
    create = tvm.get_global_func("runtime.CSourceModuleCreate")
    return [create(code, "c", symbols, [])]
