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

from ...schedules.compute import KERNEL_ATTR
from .config import NPUConfig

CODEGEN = "flexiq_npu"
STATS_FUNC = "flexiq_npu_stats"
STATS_COLS = 12
OP = {"LDREG": 1, "QUANT": 2, "LDX": 3, "LDW": 4, "GEMM": 5, "VEC": 6, "ST": 7, "SYNC": 8}
IW = 12
MAX_REQ = 8

_RUNTIME_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime.c")

# The codegen is called by RunCodegen with the external functions only; the PrimFuncs they call
# (looked up for attributes and geometry) and the configuration come from the build in progress.
_CTX: Dict[str, object] = {}


@contextlib.contextmanager
def build_context(mod: tvm.IRModule, config: NPUConfig, num_layers: int):
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    old = dict(_CTX)
    _CTX.clear()
    _CTX.update(prims=prims, config=config, num_layers=num_layers, programs={})
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
    relu: bool = False
    act_scale: float = 1.0
    weight: np.ndarray = None        # (O, Cg, KH, KW) int8
    rank: np.ndarray = None          # (C,) int32
    act_shift_c: np.ndarray = None   # (C,) int32
    weight_shift: np.ndarray = None  # (O, n_groups) int32
    scale: np.ndarray = None         # (O,) f32
    bias: np.ndarray = None          # (O,) f32
    # program wiring
    in_param: int = -1
    out_index: int = -1
    req: List[int] = field(default_factory=list)

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
    """(activation scale, pad top, pad left) from a quantize_act PrimFunc."""
    text = qf.script()
    m = re.search(r"/ T\.float32\(([-0-9.eE+]+)\) \+ T\.float32\(0\.5\)", text)
    if not m:
        raise ValueError("quantize_act kernel without a constant scale")
    scale = float(np.float32(float(m.group(1))))
    pt = pl = 0
    loads = [a for a in _accesses(qf, ("x",)) if len(a) == 4]
    if loads:
        pt = -_eval_index(loads[0][2], {})
        pl = -_eval_index(loads[0][3], {})
    return scale, pt, pl


def _conv_geometry(kf) -> Tuple[int, int, int, int]:
    """(SH, SW, DH, DW) from a conv2d_int8 PrimFunc (the activation read in its reduction)."""
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
    """Reads one composite (FlexiQ layer [+ ReLU]); returns (layer, x expr, counts expr) where the
    exprs are the outer-function arguments bound to the layer's input and counts."""
    calls = {}
    relu = False

    def resolve(e):
        if isinstance(e, relax.Var) and e in arg_of_param:
            return arg_of_param[e]
        return e

    for block in comp.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
                if v.op.name == "relax.call_tir":
                    kind = str(prims[v.args[0].name_hint].attrs[KERNEL_ATTR])
                    calls[kind] = v
                elif v.op.name == "relax.nn.relu":
                    relu = True
    q, wl = calls["quantize_act"], calls["lower_weight"]
    if bool(prims[q.args[0].name_hint].attrs.get("flexiq.dynamic", False)):
        raise ValueError("dynamic activation extraction is not implemented on the NPU")
    kcall = calls["conv2d_int8"] if "conv2d_int8" in calls else calls["dense_int8"]
    qf, kf = prims[q.args[0].name_hint], prims[kcall.args[0].name_hint]
    qargs, wargs, kargs = q.args[1].fields, wl.args[1].fields, kcall.args[1].fields
    x_expr, counts_expr = resolve(qargs[0]), resolve(qargs[1])
    op = "conv2d" if str(kf.attrs[KERNEL_ATTR]) == "conv2d_int8" else "dense"
    scale_x, pt, pl = _quantize_geometry(qf)
    w = _const(resolve(wargs[0])).astype(np.int8)
    x_shape = _shape(qargs[0].ty)
    y_shape = _shape(kcall.ty)
    common = dict(layer=int(qf.attrs["flexiq.layer_index"]), unsigned=bool(qf.attrs["flexiq.unsigned"]),
                  relu=relu, act_scale=scale_x,
                  rank=_const(resolve(qargs[2])).astype(np.int32),
                  act_shift_c=_const(resolve(qargs[3])).astype(np.int32),
                  weight_shift=np.ascontiguousarray(_const(resolve(wargs[3])), np.int32).reshape(w.shape[0], -1),
                  scale=_const(resolve(kargs[2])).astype(np.float32),
                  bias=_const(resolve(kargs[3])).astype(np.float32))
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
        M, C = x_shape
        O = y_shape[1]
        L = NPULayer(name="", op=op, N=M, C=C, H=1, W=1, O=O, OH=1, OW=1, weight=w.reshape(O, C, 1, 1), **common)
    return L, x_expr, counts_expr


# --------------------------------------------------------------------------- tiling
@dataclass
class Tiling:
    jc: int          # input channels (of a conv group) per K chunk
    ob: int          # output channels per n-block
    ohlen: int       # output rows per m-block (per image)
    nlen: int        # images per m-block (> 1 only when ohlen == OH)

    def chunks(self, Cg):
        return [(j, min(self.jc, Cg - j)) for j in range(0, Cg, self.jc)]


def _rows_needed(L: NPULayer, ohlen: int) -> int:
    return (ohlen - 1) * L.SH + (L.KH - 1) * L.DH + 1


def plan_tiles(L: NPULayer, cfg: NPUConfig) -> Optional[Tiling]:
    """Largest tiles that fit one SRAM bank each (half of each SRAM: the other half is the double
    buffer). None when not even one output row of one channel fits."""
    IB, WB, OB = cfg.ibuf_bytes // 2, cfg.wbuf_bytes // 2, cfg.obuf_bytes // 2
    KK = L.KH * L.KW
    rows1 = _rows_needed(L, 1)
    min_ob = min(L.opg, cfg.cols)
    jc = min(L.Cg, WB // (min_ob * KK), IB // (rows1 * L.Wp))
    if jc < 1:
        min_ob = 1
        jc = min(L.Cg, WB // KK, IB // (rows1 * L.Wp))
        if jc < 1:
            return None
    # output channels per block: as many as the weight bank holds (multiple of the array width)
    ob = min(L.opg, WB // (jc * KK))
    if ob > cfg.cols:
        ob = ob // cfg.cols * cfg.cols
    ob = max(ob, 1)
    if L.OW * ob * 4 > OB:                     # one output row must fit the accumulator bank
        ob = max(1, OB // (L.OW * 4))
        if ob > cfg.cols:
            ob = ob // cfg.cols * cfg.cols
        if L.OW * ob * 4 > OB:
            return None
    # output rows per block: bounded by the input bank (patch rows) and the accumulator bank
    ohlen = 0
    for oh in range(L.OH, 0, -1):
        if jc * _rows_needed(L, oh) * L.Wp <= IB and oh * L.OW * ob * 4 <= OB:
            ohlen = oh
            break
    if ohlen == 0:
        return None
    nlen = 1
    if ohlen == L.OH:
        per_img_in = jc * _rows_needed(L, L.OH) * L.Wp
        per_img_out = L.OH * L.OW * ob * 4
        nlen = max(1, min(L.N, IB // per_img_in, OB // per_img_out))
    return Tiling(jc=jc, ob=ob, ohlen=ohlen, nlen=nlen)


def emit_layer(L: NPULayer, li: int, t: Tiling, code: List[List[int]]):
    """Instruction stream of one layer (li = index in the program's layer table)."""
    def ins(op, *f):
        row = [OP[op], li] + [int(v) for v in f]
        code.append(row + [0] * (IW - len(row)))

    ins("LDREG")
    if L.in_param >= 0:
        ins("QUANT", L.in_param)
    chunks = t.chunks(L.Cg)
    oblocks = [(o, min(t.ob, L.opg - o)) for o in range(0, L.opg, t.ob)]
    mblocks = []
    for n0 in range(0, L.N, t.nlen):
        for oh0 in range(0, L.OH, t.ohlen):
            mblocks.append((n0, min(t.nlen, L.N - n0), oh0, min(t.ohlen, L.OH - oh0)))
    w_resident = len(oblocks) == 1 and len(chunks) == 1
    x_reuse = len(chunks) == 1
    # steps: (loads, gemm, block_end)
    steps = []
    xb = wb = obk = 1
    for gi in range(L.groups):
        w_loaded = False
        for (n0, nl, oh0, ohl) in mblocks:
            x_loaded = False
            for (o0, ol) in oblocks:
                obk ^= 1
                for ci, (j0, jl) in enumerate(chunks):
                    loads = []
                    if not (x_reuse and x_loaded):
                        xb ^= 1
                        loads.append(("LDX", xb, gi, n0, nl, oh0, ohl, j0, jl))
                        x_loaded = True
                    if not (w_resident and w_loaded):
                        wb ^= 1
                        loads.append(("LDW", wb, gi, o0, ol, j0, jl))
                        w_loaded = True
                    steps.append((loads, ("GEMM", xb, wb, obk, 1 if ci else 0), ci == len(chunks) - 1, obk))
    # software pipelining: the loads of step s+1 are issued before the GEMM of step s
    for ld in steps[0][0]:
        ins(*ld)
    for s, (loads, gemm, end, ob) in enumerate(steps):
        if s + 1 < len(steps):
            for ld in steps[s + 1][0]:
                ins(*ld)
        ins(*gemm)
        if end:
            ins("VEC", ob)
            ins("ST", ob)
    ins("SYNC")


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


def _layer_c(L: NPULayer, blob: _Blob) -> str:
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
    offs = dict(w_off=blob.add(wn), chan_off=blob.add(chan), rank_off=blob.add(rankj), ex_off=blob.add(ex),
                ew_off=blob.add(np.ascontiguousarray(L.weight_shift, np.int32)),
                scale_off=blob.add(L.scale.astype(np.float32)), bias_off=blob.add(L.bias.astype(np.float32)))
    req = list(L.req) + [0] * (MAX_REQ - len(L.req))
    scale_bits = np.float32(L.act_scale).view(np.uint32)
    vals = [L.layer, L.N, L.C, L.H, L.W, L.O, L.OH, L.OW, L.KH, L.KW, L.SH, L.SW, L.DH, L.DW, L.PT, L.PL,
            L.Hp, L.Wp, L.groups, Cg, opg, int(L.unsigned), int(L.relu), L.n_groups]
    return ("{" + ", ".join(map(str, vals)) + f", npu_f32(0x{int(scale_bits):08x}u), "
            + ", ".join(f"{offs[k]}" for k in ("w_off", "chan_off", "rank_off", "ex_off", "ew_off",
                                                 "scale_off", "bias_off"))
            + f", {L.in_param}, {L.out_index}, {len(L.req)}, {{{', '.join(map(str, req))}}}}}")


@dataclass
class Program:
    symbol: str
    layers: List[NPULayer]
    tilings: List[Tiling]
    code: np.ndarray
    n_params: int
    n_outputs: int
    counts_param: int


def lower_function(sym: str, func: relax.Function, prims, cfg: NPUConfig) -> Program:
    params = list(func.params)
    pidx = {p: i for i, p in enumerate(params)}
    local_funcs = {}
    layers: List[NPULayer] = []
    var_layer = {}          # bound var -> layer index (program-local)
    alias = {}
    inputs = []
    counts_param = None
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Function):
                local_funcs[b.var] = v
                continue
            if isinstance(v, relax.Call) and isinstance(v.op, relax.Var) and v.op in local_funcs:
                comp = local_funcs[v.op]
                arg_of_param = dict(zip(comp.params, v.args))
                L, x_expr, c_expr = extract_layer(comp, arg_of_param, prims)
                x_expr = alias.get(x_expr, x_expr)
                if not (isinstance(c_expr, relax.Var) and c_expr in pidx):
                    raise ValueError(f"{sym}: counts is not an argument of the external function")
                counts_param = pidx[c_expr]
                var_layer[b.var] = len(layers)
                inputs.append(x_expr)
                L.name = f"layer{L.layer}"
                layers.append(L)
                continue
            if isinstance(v, relax.Var):
                alias[b.var] = alias.get(v, v)
                continue
            raise ValueError(f"{sym}: unexpected binding {type(v).__name__} in an NPU function")
    if not layers:
        raise ValueError(f"{sym}: no FlexiQ layer inside")
    for li, x in enumerate(inputs):
        if x in pidx:
            layers[li].in_param = pidx[x]
        elif x in var_layer:
            layers[var_layer[x]].req.append(li)
        else:
            raise ValueError(f"{sym}: layer {layers[li].layer} reads a value the NPU does not produce")
    out = func.body.body
    outs = list(out.fields) if isinstance(out, relax.Tuple) else [out]
    for k, o in enumerate(outs):
        o = alias.get(o, o)
        if o not in var_layer:
            raise ValueError(f"{sym}: output {k} is not a layer result")
        if layers[var_layer[o]].out_index >= 0:
            raise ValueError(f"{sym}: one layer result returned twice")
        layers[var_layer[o]].out_index = k
    for L in layers:
        if len(L.req) > MAX_REQ:
            raise ValueError(f"{sym}: layer {L.layer} feeds more than {MAX_REQ} NPU layers")
    code: List[List[int]] = []
    tilings = []
    for li, L in enumerate(layers):
        t = plan_tiles(L, cfg)
        if t is None:
            raise ValueError(f"layer {L.layer} does not fit the NPU's SRAMs ({cfg})")
        tilings.append(t)
        emit_layer(L, li, t, code)
    return Program(sym, layers, tilings, np.asarray(code, np.int32).reshape(-1, IW), len(params), len(outs),
                   counts_param)


def generate_c(programs: List[Program], cfg: NPUConfig, num_layers: int) -> str:
    src = [open(_RUNTIME_C).read()]
    blob = _Blob()
    bodies = []
    for k, P in enumerate(programs):
        lt = ",\n  ".join(_layer_c(L, blob) for L in P.layers)
        words = ",".join(map(str, P.code.reshape(-1).tolist()))
        bodies.append(f"static const npu_layer_t npu_layers_{k}[] = {{\n  {lt}\n}};\n"
                      f"static const int32_t npu_code_{k}[] = {{{words}}};\n"
                      f"static const npu_program_t npu_prog_{k} = {{npu_layers_{k}, {len(P.layers)}, npu_code_{k}, "
                      f"{P.code.shape[0]}, {P.n_params}, {P.n_outputs}, {P.counts_param}}};\n")
    lit, size = blob.c_literal()
    src.append("static float npu_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }\n")
    src.append(f"static const unsigned char npu_blob[{size + 1}] __attribute__((aligned(64))) =\n{lit};\n")
    src.append(f"static const npu_config_t npu_cfg = {{{cfg.rows}, {cfg.cols}, {cfg.ibuf_bytes}, {cfg.wbuf_bytes}, "
               f"{cfg.obuf_bytes}, {cfg.dma_bytes_per_cycle}, {cfg.dma_setup_cycles}, {cfg.vector_lanes}, "
               f"{cfg.fill_cycles}, {float(cfg.clock_mhz)!r}}};\n")
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
  d[9] = NPU_NUM_LAYERS; d[10] = {len(programs)}; d[11] = 1;
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
        programs.append(lower_function(sym, f, prims, cfg))
    _CTX["programs"] = {P.symbol: P for P in programs}
    code = generate_c(programs, cfg, num_layers)
    _CTX["c_source"] = code
    symbols = [P.symbol for P in programs] + [STATS_FUNC]
    create = tvm.get_global_func("runtime.CSourceModuleCreate")
    return [create(code, "c", symbols, [])]
